//! A local ECS API emulator with a real OpenSSH `sshd` behind every instance.
//!
//! Why it exists: the executor must be testable end to end — selection, `RunInstances` with its
//! fallbacks, SSH with a pinned host key, cleanup that never leaks — without an Aliyun account
//! and without ever contacting Aliyun. The emulator speaks the ECS RPC API closely enough that
//! Aliyun's own Python SDK works against it unchanged (signature v1 verification, error shapes,
//! paging), gives each instance its own loopback address with a real `sshd`, serves the
//! metadata paths the driver uses, injects faults on demand (stock-out, throttling, 5xx,
//! latency, spot reclaim, instances that never boot) and records everything it did so tests can
//! prove that nothing leaked.
//!
//! Layout: [`catalogue`](self) (the shipped world), `auth` (signature, timestamp, nonce, STS),
//! `rpc` (the actions), `instances` (state, lifecycle, the sshd supervisor), `server` (HTTP
//! routing, metadata, inspection and control endpoints), `cloudconfig` (the user-data subset),
//! `sts` (STS `AssumeRole`, routed by `Version`) and `ram` (session policies enforced on ECS calls).

mod api;
mod auth;
mod boot;
mod catalogue;
mod cloudconfig;
mod faults;
mod github;
mod instances;
mod ram;
mod rpc;
mod server;
mod sshd;
mod sts;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

pub use instances::RequestRecord;
pub use instances::{EventRecord, InstanceRecord};
pub use sshd::sshd_config;

/// The documented default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";
/// The documented default AccessKey id.
pub const DEFAULT_ACCESS_KEY_ID: &str = "LTAIemulatorAccessKey";
/// The documented default AccessKey secret (public on purpose: it only opens the emulator).
pub const DEFAULT_ACCESS_KEY_SECRET: &str = "emulator-secret-do-not-use-in-production";
/// The region that has resources.
pub const DEFAULT_REGION: &str = "cn-hangzhou";
/// How long a reclaimed instance stays `Stopped` with a `Recycling` lock before it disappears.
pub const RECLAIM_LINGER: Duration = Duration::from_secs(5);

pub use faults::DEFAULT_INITIALIZING;

/// Faults injected into the API and the instances; the JSON names (`no-stock`, …) are the CLI
/// flag names, as accepted by `POST /_emulator/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Faults {
    /// `TYPE@ZONE` patterns (`*` wildcards; a zone may be its letter) that are out of stock.
    pub no_stock: Vec<String>,
    /// Every Nth authenticated RPC request answers 400 `Throttling.User`.
    pub throttle_every: Option<u64>,
    /// This share of RPC requests answers 503 `ServiceUnavailable` (deterministic per seed).
    pub error_rate: f64,
    /// Added to every RPC answer.
    pub latency_ms: u64,
    /// Spot instances are reclaimed this long after they are Running.
    #[serde(with = "opt_secs")]
    pub reclaim_after: Option<Duration>,
    /// `TYPE@ZONE` patterns whose instances never reach Running.
    pub never_boot: Vec<String>,
    /// Seed of the fault dice (error rate).
    pub seed: u64,
    /// The metadata token request (`PUT /latest/api/token`, hardened mode) answers 404, so
    /// clients must fall back to plain requests.
    pub metadata_token_error: bool,
    /// The account's currency (`Currency` of `DescribeSpotPriceHistory`): `CNY` (the China
    /// site, the default) or `USD` (the international site).
    pub currency: Option<String>,
    /// `TYPE@ZONE=CODE` (`*` wildcards): RunInstances of TYPE in ZONE answers CODE with the
    /// HTTP status and message of Aliyun's published error table.
    pub run_error: Vec<String>,
    /// New instances refuse DeleteInstance with `IncorrectInstanceStatus.Initializing` this
    /// long ([`DEFAULT_INITIALIZING`] unless set; 0 turns it off).
    #[serde(with = "secs")]
    pub initializing: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            no_stock: Vec::new(),
            throttle_every: None,
            error_rate: 0.0,
            latency_ms: 0,
            reclaim_after: None,
            never_boot: Vec::new(),
            seed: 0,
            metadata_token_error: false,
            currency: None,
            run_error: Vec::new(),
            initializing: DEFAULT_INITIALIZING,
        }
    }
}

impl Faults {
    /// Whether `pattern` (`TYPE@ZONE`, `*` wildcards) covers `instance_type` in `zone`.
    pub fn pattern_matches(pattern: &str, instance_type: &str, zone: &str) -> bool {
        let (tp, zp) = pattern.split_once('@').unwrap_or((pattern, "*"));
        let short = zone.rsplit('-').next().unwrap_or(zone);
        let glob = crate::pattern::glob_match;
        glob(tp.trim(), instance_type) && (glob(zp.trim(), zone) || glob(zp.trim(), short))
    }

    pub(crate) fn no_stock(&self, instance_type: &str, zone: &str) -> bool {
        self.no_stock.iter().any(|p| Self::pattern_matches(p, instance_type, zone))
    }

    /// The currency prices are answered in.
    pub(crate) fn currency(&self) -> &str {
        self.currency.as_deref().unwrap_or(crate::pricing::DEFAULT_CURRENCY)
    }

    /// Checks the entries that must name something real (`run-error` codes).
    pub fn validate(&self) -> Result<(), String> {
        faults::validate(self)
    }

    pub(crate) fn never_boots(&self, instance_type: &str, zone: &str) -> bool {
        self.never_boot.iter().any(|p| Self::pattern_matches(p, instance_type, zone))
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Duration::try_from_secs_f64(f64::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v = Option::<f64>::deserialize(d)?;
        match v {
            None => Ok(None),
            Some(x) => Duration::try_from_secs_f64(x).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// How to run an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Listen address; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// Accepted AccessKey pairs.
    pub access_keys: Vec<(String, Secret<String>)>,
    /// Faults to start with.
    pub faults: Faults,
    /// Pending → Running takes this long (half Pending, half Starting).
    pub boot_delay: Duration,
    /// sshd starts this long after Running.
    pub ssh_delay: Duration,
    /// RAM role of the runner host, served by metadata to requests not from an instance.
    pub host_ram_role: Option<String>,
    /// Where instance files (sshd config, keys, logs) go; a temporary directory when `None`.
    pub work_dir: Option<PathBuf>,
    /// Instances boot their `#cloud-config` user data (`write_files`, then `runcmd`) inside
    /// themselves once sshd is up, as cloud-init would (needs root; off by default).
    pub boot_user_data: bool,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        EmulatorOptions {
            listen: DEFAULT_LISTEN.parse().expect("the default listen address is valid"),
            access_keys: vec![(
                DEFAULT_ACCESS_KEY_ID.to_string(),
                Secret::new(DEFAULT_ACCESS_KEY_SECRET.to_string()),
            )],
            faults: Faults::default(),
            boot_delay: Duration::from_secs(1),
            ssh_delay: Duration::from_millis(500),
            host_ram_role: None,
            work_dir: None,
            boot_user_data: false,
        }
    }
}

/// STS credentials issued by the emulator (as its metadata service serves them).
#[derive(Debug, Clone)]
pub struct StsCredentials {
    /// `STS.…`
    pub access_key_id: String,
    /// The secret.
    pub access_key_secret: Secret<String>,
    /// The security token.
    pub security_token: Secret<String>,
    /// When the credentials stop working.
    pub expiration: time::OffsetDateTime,
}

/// A running emulator: HTTP workers, the instance supervisor and the instance files.
pub struct Emulator {
    core: Arc<instances::Core>,
    github: Arc<github::GithubFake>,
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    supervisor: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Number of HTTP worker threads.
const WORKERS: usize = 6;

impl Emulator {
    /// Binds the listener and starts serving.
    pub fn start(opts: EmulatorOptions) -> anyhow::Result<Emulator> {
        if opts.access_keys.is_empty() {
            anyhow::bail!("the emulator needs at least one AccessKey");
        }
        if !opts.listen.ip().is_loopback() {
            // Anyone who reaches it can read every instance's RAM role credentials and user
            // data (the per-job host key) from its metadata service: loopback only.
            anyhow::bail!(
                "refusing to listen on `{}`: the emulator serves every instance's credentials and user data to \
                 whoever can connect; use a loopback address such as `{DEFAULT_LISTEN}`",
                opts.listen
            );
        }
        let catalogue = catalogue::Catalogue::builtin()?;
        let (tmp, work_dir) = match &opts.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("failed to create `{}`", d.display()))?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("aliyun-spot-emulator-")
                    .tempdir()
                    .context("failed to create the emulator's temporary directory")?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let listener = std::net::TcpListener::bind(opts.listen)
            .with_context(|| format!("failed to listen on `{}`", opts.listen))?;
        set_nodelay(&listener);
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| anyhow::anyhow!("failed to listen on `{}`: {e}", opts.listen))?;
        let addr = server.server_addr().to_ip().context("the emulator listener has no IP address")?;
        let server = Arc::new(server);
        let core = Arc::new(instances::Core::new(catalogue, &opts, work_dir, addr));
        let supervisor = {
            let core = core.clone();
            std::thread::Builder::new()
                .name("emulator-supervisor".into())
                .spawn(move || instances::supervise(core))
                .context("failed to start the emulator's supervisor thread")?
        };
        let github = Arc::new(github::GithubFake::default());
        let mut workers = Vec::new();
        for i in 0..WORKERS {
            let core = core.clone();
            let github = github.clone();
            let server = server.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("emulator-http-{i}"))
                    .spawn(move || server::serve(core, github, server))
                    .context("failed to start an emulator HTTP thread")?,
            );
        }
        Ok(Emulator { core, github, addr, server, workers, supervisor: Some(supervisor), _tmp: tmp })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the endpoint to give clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory holding instance files.
    pub fn work_dir(&self) -> &Path {
        &self.core.work_dir
    }

    /// Every instance ever created, oldest first.
    pub fn instances(&self) -> Vec<InstanceRecord> {
        self.core.instance_records()
    }

    /// The request log (secrets redacted), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.core.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Instances not yet deleted or released.
    pub fn live_instances(&self) -> usize {
        self.core.instance_records().iter().filter(|r| r.live).count()
    }

    /// Counts: live instances, created, deleted, calls per action (as `GET /_emulator/summary`).
    pub fn summary(&self) -> serde_json::Value {
        self.core.summary()
    }

    /// The current faults.
    pub fn faults(&self) -> Faults {
        self.core.faults()
    }

    /// Replaces the faults.
    pub fn set_faults(&self, f: Faults) {
        self.core.set_faults(f);
    }

    /// Changes how long instances created from now on take to boot and to start sshd (as
    /// `boot-delay` and `ssh-delay` of `POST /_emulator/faults`).
    pub fn set_delays(&self, boot: Duration, ssh: Duration) {
        self.core.set_delays(Some(boot), Some(ssh));
    }

    /// Reclaims a spot (or any) instance now: termination notice, sshd killed, `Stopped` with
    /// `Recycling`, released shortly after. False when the instance is not live.
    pub fn reclaim(&self, id: &str) -> bool {
        self.core.schedule_reclaim(id, Duration::ZERO)
    }

    /// Issues STS credentials for `role` as the metadata service would, with a chosen lifetime
    /// (tests of expiry).
    pub fn issue_sts_credentials(&self, role: &str, ttl: Duration) -> StsCredentials {
        self.core.issue_sts("runner-host", role, ttl, false)
    }

    /// The boot log of instance `id` (`--boot-user-data`): what its `write_files` and
    /// `runcmd` printed; empty before it boots or when booting is off.
    pub fn boot_log(&self, id: &str) -> String {
        self.core.boot_log(id)
    }

    /// A file instance `id` wrote at `path` (in its own `/tmp`, `/root`, … or, when it boots,
    /// in its copies of `/etc`, `/var`, `/run`, …), while the emulator runs, even after the
    /// instance is deleted; `None` when the instance never wrote it.
    pub fn instance_file(&self, id: &str, path: &str) -> Option<Vec<u8>> {
        self.core.instance_file(id, path)
    }

    /// The GitHub fake's runners and request log, as `GET /_emulator/github` returns them.
    pub fn github(&self) -> serde_json::Value {
        self.github.snapshot()
    }

    /// Plays a GitHub runner's side (`{"status", "busy", "deleted"}`), as
    /// `POST /_emulator/github/runners/{name}`; false when no runner has that name.
    pub fn github_set_runner(&self, name: &str, patch: &serde_json::Value) -> bool {
        self.github.set_runner(name, patch)
    }

    /// Deletes every instance, stops every sshd and the HTTP server.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.core.shutdown.swap(true, Ordering::SeqCst) {
            return;
        }
        self.core.delete_all("emulator shutdown");
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(s) = self.supervisor.take() {
            let _ = s.join();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns Nagle's algorithm off for the connections `listener` accepts (Linux copies the option
/// to them). tiny_http writes an answer's headers and a large body separately; with Nagle on,
/// the body waits for the client's delayed ACK of the headers, adding about 40 ms to every call.
fn set_nodelay(listener: &std::net::TcpListener) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor we own, and a pointer to a c_int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "could not set TCP_NODELAY on the emulator's listener: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An `ID:SECRET` AccessKey pair from the command line.
#[derive(Clone)]
pub struct AccessKeyArg {
    /// The AccessKey id.
    pub id: String,
    /// The secret.
    pub secret: Secret<String>,
}

impl std::fmt::Debug for AccessKeyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:REDACTED", self.id)
    }
}

fn parse_access_key(s: &str) -> Result<AccessKeyArg, String> {
    match s.split_once(':') {
        Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
            Ok(AccessKeyArg { id: id.to_string(), secret: Secret::new(secret.to_string()) })
        }
        _ => Err("expected `ID:SECRET`".to_string()),
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let x: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(x).map_err(|_| format!("`{s}` is not a valid number of seconds"))
}

fn check_run_error(s: &str) -> Result<String, String> {
    faults::parse_run_error(s).map(|_| s.to_string())
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("`{s}` is not a fraction between 0 and 1")),
    }
}

/// `aliyun-spot emulator` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on (RPC API at `/`, metadata, `/_emulator/…`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// An accepted AccessKey pair (repeatable; default: the documented emulator pair).
    #[arg(long = "access-key", value_name = "ID:SECRET", value_parser = parse_access_key)]
    pub access_key: Vec<AccessKeyArg>,
    /// RAM role of the runner host, served by the metadata service.
    #[arg(long, value_name = "NAME")]
    pub host_ram_role: Option<String>,
    /// Seed of the fault dice.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Make TYPE out of stock in ZONE (`*` wildcards; repeatable).
    #[arg(long = "no-stock", value_name = "TYPE@ZONE")]
    pub no_stock: Vec<String>,
    /// Every Nth RPC request answers `Throttling.User`.
    #[arg(long, value_name = "N")]
    pub throttle_every: Option<u64>,
    /// Share of RPC requests answering 503 `ServiceUnavailable`.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0, value_parser = parse_fraction)]
    pub error_rate: f64,
    /// Delay added to every RPC answer.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Time from RunInstances to Running.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    pub boot_delay: Duration,
    /// Time from Running to sshd listening.
    #[arg(long, value_name = "SECONDS", default_value = "0.5", value_parser = parse_seconds)]
    pub ssh_delay: Duration,
    /// Reclaim spot instances this long after they are Running.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub reclaim_after: Option<Duration>,
    /// Instances of TYPE in ZONE never reach Running (`*` wildcards; repeatable).
    #[arg(long = "never-boot", value_name = "TYPE@ZONE")]
    pub never_boot: Vec<String>,
    /// The metadata service gives no hardened-mode token (`PUT /latest/api/token` answers 404).
    #[arg(long)]
    pub metadata_token_error: bool,
    /// RunInstances of TYPE in ZONE answers CODE with the HTTP status and message of Aliyun's
    /// published error table (`*` wildcards; repeatable).
    #[arg(long = "run-error", value_name = "TYPE@ZONE=CODE", value_parser = check_run_error)]
    pub run_error: Vec<String>,
    /// New instances refuse DeleteInstance with `IncorrectInstanceStatus.Initializing` this long
    /// (default 2; 0 turns it off).
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub initializing: Option<Duration>,
    /// Directory for instance files (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The account's currency: CNY (China site, the default) or USD (international site).
    #[arg(long, value_name = "CODE", value_parser = ["CNY", "USD"])]
    pub currency: Option<String>,
    /// Instances run their `#cloud-config` user data (`write_files`, then `runcmd`) inside
    /// themselves once sshd is up, as cloud-init would (needs root).
    #[arg(long)]
    pub boot_user_data: bool,
}

impl EmulatorArgs {
    /// The options these flags describe.
    pub fn options(&self) -> EmulatorOptions {
        let mut o = EmulatorOptions {
            listen: self.listen,
            faults: Faults {
                no_stock: self.no_stock.clone(),
                throttle_every: self.throttle_every.filter(|n| *n > 0),
                error_rate: self.error_rate,
                latency_ms: self.latency_ms,
                reclaim_after: self.reclaim_after,
                never_boot: self.never_boot.clone(),
                seed: self.seed,
                metadata_token_error: self.metadata_token_error,
                currency: self.currency.clone(),
                run_error: self.run_error.clone(),
                initializing: self.initializing.unwrap_or(DEFAULT_INITIALIZING),
            },
            boot_delay: self.boot_delay,
            ssh_delay: self.ssh_delay,
            host_ram_role: self.host_ram_role.clone(),
            work_dir: self.work_dir.clone(),
            boot_user_data: self.boot_user_data,
            ..EmulatorOptions::default()
        };
        if !self.access_key.is_empty() {
            o.access_keys = self.access_key.iter().map(|k| (k.id.clone(), k.secret.clone())).collect();
        }
        o
    }
}

/// Runs the emulator until SIGTERM or SIGINT, then deletes every instance.
pub fn run_cli(args: EmulatorArgs) -> anyhow::Result<()> {
    let opts = args.options();
    let key_id = opts.access_keys[0].0.clone();
    let term = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, term.clone()).context("failed to install a signal handler")?;
    }
    let emu = Emulator::start(opts)?;
    eprintln!(
        "aliyun-spot emulator: serving ECS API at {} (region {DEFAULT_REGION}, AccessKeyId {key_id}); \
         instance files in `{}`; stop with Ctrl-C",
        emu.endpoint(),
        emu.work_dir().display()
    );
    while !term.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let live = emu.live_instances();
    emu.shutdown();
    eprintln!("aliyun-spot emulator: stopped ({live} live instance(s) deleted)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Emulator>();
    }

    #[test]
    fn fault_patterns() {
        assert!(Faults::pattern_matches("ecs.c7.large@cn-hangzhou-b", "ecs.c7.large", "cn-hangzhou-b"));
        assert!(Faults::pattern_matches("ecs.c7.*@b", "ecs.c7.large", "cn-hangzhou-b"));
        assert!(Faults::pattern_matches("*@*", "x", "cn-hangzhou-k"));
        assert!(Faults::pattern_matches("ecs.c7.large", "ecs.c7.large", "cn-hangzhou-k"));
        assert!(!Faults::pattern_matches("ecs.c7.large@j", "ecs.c7.large", "cn-hangzhou-k"));
        assert!(!Faults::pattern_matches("ecs.c7.large@*", "ecs.c7.xlarge", "cn-hangzhou-k"));
    }

    #[test]
    fn faults_json_uses_flag_names() {
        let f: Faults =
            serde_json::from_str(r#"{"no-stock":["a@b"],"throttle-every":3,"reclaim-after":1.5}"#).unwrap();
        assert_eq!(f.no_stock, ["a@b"]);
        assert_eq!(f.throttle_every, Some(3));
        assert_eq!(f.reclaim_after, Some(Duration::from_millis(1500)));
        assert!(serde_json::from_str::<Faults>(r#"{"no_stock":[]}"#).is_err());
        let f: Faults = serde_json::from_str(r#"{"currency":"USD"}"#).unwrap();
        assert_eq!(f.currency(), "USD");
        assert_eq!(Faults::default().currency(), "CNY");
        let f: Faults =
            serde_json::from_str(r#"{"run-error":["*@b=Zone.NotOnSale"],"initializing":0}"#).unwrap();
        assert_eq!(f.run_error, ["*@b=Zone.NotOnSale"]);
        assert_eq!(f.initializing, Duration::ZERO);
        let f: Faults = serde_json::from_str("{}").unwrap();
        assert_eq!(f.initializing, DEFAULT_INITIALIZING);
    }
}
