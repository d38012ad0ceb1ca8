//! Debug logging for administrators, kept apart from the job log.
//!
//! Stage output for people is plain lines on stderr; `log` records are off unless `RUST_LOG`
//! asks for them (e.g. `RUST_LOG=aliyun_spot_executor=debug`). Nothing logged at any level
//! contains a secret: credentials are [`crate::secret::Secret`] and requests are logged
//! without their signature or token.

/// Installs the logger (stderr, filtered by `RUST_LOG`, default `warn`).
pub fn init() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .try_init();
}
