//! Debug logging for administrators, kept apart from the job log.
//!
//! Stage output for people is plain lines on stderr; `log` records are off unless `RUST_LOG`
//! asks for them (e.g. `RUST_LOG=aliyun_spot_executor=debug`). Nothing logged at any level
//! contains a secret: credentials are [`crate::secret::Secret`] and requests are logged
//! without their signature or token.
//!
//! Dependencies are another matter: at debug and trace level the HTTP client (`ureq`) logs
//! every request's URL and header block ("writing prelude"), which for the metadata service
//! carries the session token (`X-aliyun-ecs-metadata-token`), and the TLS stack logs its
//! handshake. So whatever `RUST_LOG` says (`debug`, `trace`, `ureq=trace`), a record whose
//! target is not this crate is dropped unless it is a warning or an error: debugging the
//! driver never puts a credential request's headers or body on the screen.

use log::{Level, Log, Metadata, Record};

/// Writes one line to stderr, ignoring a failed write.
///
/// `eprintln!` panics when the write fails, and Rust programs ignore SIGPIPE, so a stage whose
/// stderr is a closed pipe (`prepare 2>&1 | head -4`, a runner that went away) would die with
/// exit code 101 half-way through creating an instance. A progress line nobody can read is
/// not worth that: the stage goes on and records or releases what it created.
pub fn stderr_line(line: &str) {
    let _ = write_text(&mut std::io::stderr().lock(), &format!("{line}\n"));
}

/// Writes `line` and a newline to stdout; an error instead of `println!`'s panic when stdout
/// fails (see [`stderr_line`]; `aliyun-spot prices | head -1` closes it after one line).
///
/// Output on stdout is what the caller asked for (the runner JSON of `config`, the tables of
/// `aliyun-spot`), so a failed write is not ignored: the caller stops, and
/// [`crate::exit::admin_code`] maps a closed stdout ([`StdoutError::closed`]) to a quiet exit
/// status.
pub fn stdout_line(line: &str) -> Result<(), StdoutError> {
    stdout_text(&format!("{line}\n"))
}

/// [`stdout_line`] for text that carries its own line ends (or continues a line).
pub fn stdout_text(text: &str) -> Result<(), StdoutError> {
    write_text(&mut std::io::stdout().lock(), text).map_err(StdoutError)
}

/// Writing to stdout failed (a closed pipe, a full disk).
#[derive(Debug, thiserror::Error)]
#[error("failed to write to stdout: {0}")]
pub struct StdoutError(#[source] pub std::io::Error);

impl StdoutError {
    /// Whether the reader went away (`EPIPE`): nobody is left to tell.
    pub fn closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// The one writer of both streams: the text, flushed (so a closed pipe is noticed at this
/// line, not at exit).
fn write_text(w: &mut dyn std::io::Write, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes())?;
    w.flush()
}

/// The target prefix of this crate's own records.
const OWN_TARGET: &str = "aliyun_spot_executor";

/// Installs the logger (stderr, filtered by `RUST_LOG`, default `warn`; other crates' records
/// only at `warn` and `error`).
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(OwnRecordsOnly(inner))).is_ok() {
        log::set_max_level(max);
    }
}

/// Passes this crate's records on as filtered by `RUST_LOG`, and only warnings and errors of
/// every other target.
struct OwnRecordsOnly<L>(L);

/// Whether a record of `target` at `level` may be logged at all.
fn allowed(target: &str, level: Level) -> bool {
    level <= Level::Warn || target == OWN_TARGET || target.starts_with("aliyun_spot_executor::")
}

impl<L: Log> Log for OwnRecordsOnly<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        allowed(metadata.target(), metadata.level()) && self.0.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if allowed(record.target(), record.level()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_records_pass_below_warn() {
        assert!(allowed("aliyun_spot_executor::credentials", Level::Trace));
        assert!(allowed("aliyun_spot_executor", Level::Debug));
        assert!(!allowed("ureq::unit", Level::Debug));
        assert!(!allowed("rustls::client::hs", Level::Trace));
        assert!(!allowed("aliyun_spot_executor_evil", Level::Debug));
        assert!(allowed("ureq::unit", Level::Warn));
        assert!(allowed("rustls", Level::Error));
    }
}
