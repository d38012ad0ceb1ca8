//! The configuration: one TOML file, the administrator's environment, and the few values a job
//! may override, merged once and validated before anything is billed.
//!
//! Why it looks like this (docs/configuration.md):
//! - **Two steps.** The file is read into raw serde structs with `deny_unknown_fields`, so a
//!   misspelt key fails loudly instead of silently falling back to a default; then it is merged
//!   with the environment and the defaults into [`Config`], where every bound has been checked
//!   and no `Option` is left where a default exists.
//! - **Precedence**: environment over file over defaults. The environment is the driver's own
//!   (`ALIYUN_*`, `MIN_CPU`, …, the names of the reference GitHub setup), never `CUSTOM_ENV_*`:
//!   credentials, endpoint, network, images and tags are not the job's to choose.
//! - **Job overrides** ([`load_for_job`]) read only `CUSTOM_ENV_ALIYUN_SPOT_*`, each checked
//!   against an allow-list and the administrator's ceilings.
//! - **Every error is one line** naming the key or variable, the value and the fix, because
//!   gitlab-runner shows the `config` stage's stderr in the job log and nothing else.
//!
//! Durations are written as strings: `"90s"`, `"10m"`, `"3h"`, `"1h30m"` (units `s`, `m`, `h`,
//! `d`); a bare integer is rejected with a hint, so `300` can never mean minutes by mistake.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use time::OffsetDateTime;

pub(crate) use crate::ecs::check_url;
use crate::env::Env;
use crate::secret::Secret;
use crate::selection::{Arch, Ranking, Shape};

/// Where the configuration file is when neither `--config` nor `ALIYUN_SPOT_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/aliyun-spot-executor/config.toml";
/// The environment variable naming the configuration file.
pub const CONFIG_PATH_VAR: &str = "ALIYUN_SPOT_CONFIG";
/// The ECS metadata service, which serves the runner host's RAM-role credentials.
pub use crate::credentials::DEFAULT_METADATA_ENDPOINT;
/// Aliyun's shortest accepted distance between now and `AutoReleaseTime`.
pub const MIN_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Tags Aliyun accepts per instance; the executor's own tags take seven of them (managed marker,
/// runner, project, job, attempt binding, pipeline, host: `crate::stages::tags`).
const MAX_TAGS: usize = 20;
const OWN_TAGS: usize = 7;

// ---------------------------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------------------------

/// The validated configuration of one runner host.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from, if any.
    pub source: Option<PathBuf>,
    /// Region (`cn-hangzhou`); `None` until the file or `ALIYUN_REGION_ID` gives one
    /// ([`Config::region`] says what to set).
    pub region_id: Option<String>,
    /// ECS endpoint override (`https://…`, or `http://` on loopback for the emulator); `None`
    /// means the public endpoint of the region ([`Config::endpoint_url`]).
    pub endpoint: Option<String>,
    /// Where credentials come from.
    pub credentials: CredentialSpec,
    /// VPC, security group, vswitches, public or private addressing.
    pub network: Network,
    /// Image id per architecture.
    pub images: BTreeMap<Arch, String>,
    /// Instance settings that do not depend on the job.
    pub instance: InstanceConfig,
    /// The default shape per architecture (both architectures are always present).
    pub shapes: BTreeMap<Arch, Shape>,
    /// Spot strategy, price limit and ranking.
    pub spot: SpotConfig,
    /// How the driver reaches the instance.
    pub ssh: SshConfig,
    /// What a job may change through `CUSTOM_ENV_ALIYUN_SPOT_*`.
    pub job_overrides: JobOverrides,
    /// The nets that catch an instance nobody released.
    pub safety: Safety,
    /// The self-destruct watchdog's credentials and endpoint (`[self_destruct]`).
    pub self_destruct: crate::sts::SelfDestruct,
    /// Local files of the driver.
    pub paths: Paths,
    /// What the `config` stage tells gitlab-runner.
    pub runner: RunnerConfig,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// gitlab-runner's helper binary on the instance, and the distributed cache.
    pub helper: HelperConfig,
    /// Things that work but probably are not what the administrator meant; the `config` stage
    /// and `doctor` print them.
    pub warnings: Vec<String>,
}

/// Where the ECS client gets its credentials (see [`crate::credentials`]).
pub use crate::credentials::CredentialSpec;

mod helper;
mod job;
pub use helper::{valid_version, HelperConfig, HelperInstall, DEFAULT_CHECKSUM_URL, DEFAULT_DOWNLOAD_URL};
use job::parse_gib;
pub use job::{AskedBy, Ceiling, JobOverrides, JobSpec, Override, ShapeRequest, JOB_VAR_ARCH};

/// Networking of the created instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// VPC (`ALIYUN_VPC_ID`); checked by `doctor`, not needed to create instances.
    pub vpc_id: Option<String>,
    /// Security group (`ALIYUN_SECURITY_GROUP_ID`).
    pub security_group_id: Option<String>,
    /// Zone id → vswitch id. Only zones listed here are candidates.
    pub vswitches: BTreeMap<String, String>,
    /// No public IP: the driver connects to the private IP (runner inside the same VPC).
    pub private_ip: bool,
    /// `InternetMaxBandwidthOut` in Mbit/s (0 in private-IP mode, else 1..=100).
    pub internet_max_bandwidth_out: u32,
}

/// Per-instance settings that do not depend on the job.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceConfig {
    /// Architecture of jobs that do not ask for one.
    pub default_arch: Arch,
    /// Instances are named `{name_prefix}-{arch}-spot-{yyyymmddhhmmss}`.
    pub name_prefix: String,
    /// `HostName` of the instance; `None` uses the instance name.
    pub hostname: Option<String>,
    /// `SystemDisk.Category` (`cloud_essd`, `cloud_auto`, …).
    pub system_disk_category: String,
    /// `SystemDisk.Size` in GiB.
    pub system_disk_size_gib: u32,
    /// RAM role given to the instance (`RamRoleName`), which the self-destruct watchdog uses.
    pub ram_role_name: Option<String>,
    /// Tags added to every instance besides the executor's own.
    pub extra_tags: BTreeMap<String, String>,
}

impl InstanceConfig {
    /// The instance name for an instance of `arch` created at `at` (UTC).
    pub fn instance_name(&self, arch: Arch, at: OffsetDateTime) -> String {
        let at = at.to_offset(time::UtcOffset::UTC);
        format!(
            "{}-{arch}-spot-{:04}{:02}{:02}{:02}{:02}{:02}",
            self.name_prefix,
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        )
    }

    /// The `HostName` for an instance named `instance_name`.
    pub fn host_name(&self, instance_name: &str) -> String {
        self.hostname.clone().unwrap_or_else(|| instance_name.to_string())
    }
}

/// ECS `SpotStrategy`: `spot.strategy` is `SpotWithPriceLimit` (the default) or `SpotAsPriceGo`.
pub use crate::ecs::SpotStrategy;

/// Spot bidding and ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotConfig {
    /// `SpotWithPriceLimit` (default) or `SpotAsPriceGo`.
    pub strategy: SpotStrategy,
    /// `SpotPriceLimit` = factor × the offer's spot price (≥ 1.0, default 1.2).
    pub price_limit_factor: f64,
    /// Offers above this price per hour are never used; in the account's currency (CNY on the
    /// China site, USD on the international one: `crate::pricing`).
    pub max_price_per_hour: Option<f64>,
    /// `SpotDuration`, the protection period in hours (0 or 1, default 1), sent alike to pricing,
    /// availability and creation (`crate::pricing`).
    pub protection_hours: u32,
    /// Shared, burstable and GPU types allowed (`allow_shared`, `allow_burstable`, `allow_gpu`;
    /// all off by default: `crate::families`).
    pub kinds: crate::families::TypeKinds,
    /// Per core (default) or total price.
    pub ranking: Ranking,
    /// How long price data may be reused across jobs on this host (default 5 minutes).
    pub price_cache_ttl: Duration,
    /// How long an offer that ran out of stock is tried last by later jobs on this host
    /// (default 10 minutes; zero turns it off).
    pub stock_cooldown: Duration,
}

/// How the driver reaches the instance over SSH.
#[derive(Debug, Clone, PartialEq)]
pub struct SshConfig {
    /// Login user (default `root`).
    pub user: String,
    /// Port (default 22).
    pub port: u16,
    /// One TCP connect + handshake attempt.
    pub connect_timeout: Duration,
    /// From `RunInstances` to SSH answering.
    pub boot_timeout: Duration,
    /// A registered key pair attached to every instance (`KeyPairName`), e.g. for people.
    pub key_pair_name: Option<String>,
    /// The private key of `key_pair_name`: when set, the driver logs in with it instead of a
    /// per-job key (the per-job host key is still pinned).
    pub private_key_file: Option<PathBuf>,
    /// When a silent sshd counts as a lost connection during `run` (default 10s × 3).
    pub keepalive: crate::ssh::Keepalive,
}

impl SshConfig {
    /// Whether each job gets its own client key (the default).
    pub fn uses_ephemeral_keys(&self) -> bool {
        self.private_key_file.is_none()
    }
}

/// Safety nets against leaked instances.
#[derive(Debug, Clone, PartialEq)]
pub struct Safety {
    /// Sent as `AutoReleaseTime` = creation + this (≥ 30 minutes, default 3 hours).
    pub max_lifetime: Duration,
    /// Install the in-instance self-destruct watchdog.
    pub watchdog: bool,
    /// The watchdog releases the instance after this long without a driver session.
    pub idle_timeout: Duration,
    /// Prefix of the executor's tag keys: `{tag_prefix}:runner`, `{tag_prefix}:job`, ….
    pub tag_prefix: String,
    /// The tag key that marks managed instances (default `{tag_prefix}:managed-by`).
    pub managed_tag_key: String,
    /// Its value (default `aliyun-spot-executor`).
    pub managed_tag_value: String,
}

impl Safety {
    /// The executor's tag key for `name` (`runner`, `project`, `job`, `pipeline`, `created-by-host`).
    pub fn tag_key(&self, name: &str) -> String {
        format!("{}:{name}", self.tag_prefix)
    }
}

/// Local files of the driver on the runner host.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    /// Job state (default `/var/lib/aliyun-spot-executor`).
    pub state_dir: PathBuf,
    /// Price cache (default `/var/cache/aliyun-spot-executor`).
    pub cache_dir: PathBuf,
    /// Cost ledger, JSON lines (default `{state_dir}/ledger.jsonl`).
    pub ledger: PathBuf,
}

/// What the `config` stage reports to gitlab-runner (paths on the instance).
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerConfig {
    /// `id` / `ALIYUN_SPOT_RUNNER_ID`: the runner id in tags and state paths; `None` means this
    /// host's name ([`crate::identity::runner_id`]).
    pub id: Option<String>,
    /// `builds_dir` (default `/builds`).
    pub builds_dir: String,
    /// `cache_dir` (default `/cache`).
    pub cache_dir: String,
    /// `shell`: always `bash` (see docs/gitlab-runner.md, "Shell").
    pub shell: String,
}

/// Deadlines.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// The whole `prepare` stage (default 15 minutes).
    pub prepare: Duration,
    /// One ECS API request (default 30 seconds).
    pub api_call: Duration,
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Which file to read: `--config PATH`, else `ALIYUN_SPOT_CONFIG`, else the default path.
/// The flag is `true` when the file was named explicitly (then it must exist).
pub fn resolve_path(cli: Option<&Path>, env: &Env) -> (PathBuf, bool) {
    if let Some(p) = cli {
        return (p.to_path_buf(), true);
    }
    if let Some(p) = env.value(CONFIG_PATH_VAR) {
        return (PathBuf::from(p), true);
    }
    (PathBuf::from(DEFAULT_CONFIG_PATH), false)
}

/// Reads and validates the configuration: the file (optional when not named explicitly), the
/// driver's environment, the defaults; refuses a file or host path other users could read or
/// plant ([`crate::config_perms`]).
pub fn load(path: Option<&Path>, env: &Env) -> anyhow::Result<Config> {
    let (path, explicit) = resolve_path(path, env);
    load_file(&path, explicit, env)
}

/// [`load`] from `path`, which may be missing unless `explicit` (then the environment and the
/// defaults are the whole configuration). Tests call this with a path of their own, so they
/// never read the machine's real configuration.
pub fn load_file(path: &Path, explicit: bool, env: &Env) -> anyhow::Result<Config> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => None,
        Err(e) => {
            let how = if explicit {
                format!(" (named by `--config` or `{CONFIG_PATH_VAR}`)")
            } else {
                String::new()
            };
            return Err(e)
                .with_context(|| format!("cannot read the configuration file `{}`{how}", path.display()));
        }
    };
    let mut cfg = from_toml(text.as_deref().unwrap_or(""), text.as_ref().map(|_| path), env)?;
    crate::config_perms::check(&mut cfg, text.as_deref().map(|t| (path, t)))?;
    Ok(cfg)
}

/// [`load`], then the job's overrides.
pub fn load_for_job(path: Option<&Path>, env: &Env) -> anyhow::Result<(Config, JobSpec)> {
    let cfg = load(path, env)?;
    let spec = cfg.job_spec(env)?;
    Ok((cfg, spec))
}

/// Parses and validates configuration text; `path` is where it came from (for messages and for
/// resolving relative paths).
pub fn from_toml(text: &str, path: Option<&Path>, env: &Env) -> anyhow::Result<Config> {
    let raw = parse_raw(text, path)?;
    Validator::new(path, env).build(raw)
}

fn parse_raw(text: &str, path: Option<&Path>) -> anyhow::Result<RawConfig> {
    let shown = path.map(|p| p.display().to_string()).unwrap_or_else(|| "<configuration>".into());
    serde_path_to_error::deserialize::<_, RawConfig>(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.inner();
        let line = inner.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let at = line.map(|l| format!(" at line {l}")).unwrap_or_default();
        let msg = inner.message().replace('\n', " ");
        let msg = msg.trim();
        if let Some(rest) = msg.strip_prefix("unknown field ") {
            let (name, expected) = rest.split_once(", expected ").unwrap_or((rest, ""));
            let table = match key.rsplit_once('.') {
                Some((t, _)) => format!("in table `[{t}]`"),
                None => "at the top level".to_string(),
            };
            let expected = if expected.is_empty() { String::new() } else { format!("; expected {expected}") };
            anyhow!(
                "invalid configuration file `{shown}`{at}: unknown key {name} {table}{expected} \
                 (see docs/configuration.md)"
            )
        } else if key.is_empty() || key == "." {
            anyhow!("invalid configuration file `{shown}`{at}: {msg}")
        } else {
            anyhow!("invalid configuration file `{shown}`{at}: `{key}`: {msg}")
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------------------------

impl Config {
    /// All defaults, with nothing from a file or the environment.
    pub fn defaults() -> Config {
        from_toml("", None, &Env::default()).expect("the defaults are valid")
    }

    /// The region, or the line saying how to set it.
    pub fn region(&self) -> anyhow::Result<&str> {
        self.region_id.as_deref().ok_or_else(|| {
            anyhow!("no region configured; set `aliyun.region_id` or `ALIYUN_REGION_ID` (e.g. `cn-hangzhou`)")
        })
    }

    /// The endpoint to call: the override, else `https://ecs.<region>.aliyuncs.com`.
    pub fn endpoint_url(&self) -> anyhow::Result<String> {
        match &self.endpoint {
            Some(e) => Ok(e.clone()),
            None => Ok(format!("https://ecs.{}.aliyuncs.com", self.region()?)),
        }
    }

    /// The default shape of `arch`.
    pub fn shape(&self, arch: Arch) -> &Shape {
        &self.shapes[&arch]
    }

    /// Checks what every API command needs (region and credentials); one line listing all
    /// that is missing.
    pub fn require_for_api(&self) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        self.missing_for_api(&mut missing);
        report_missing("the configuration is incomplete for calling the ECS API", missing)
    }

    /// Checks everything `prepare` needs to create an instance of `arch`: region, credentials,
    /// security group, at least one vswitch, the image of `arch`, and the SSH key file when one
    /// is configured. One line lists all that is missing.
    pub fn require_for_prepare(&self, arch: Arch) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        self.missing_for_api(&mut missing);
        if self.network.security_group_id.is_none() {
            missing.push("security group (`network.security_group_id` or `ALIYUN_SECURITY_GROUP_ID`)".into());
        }
        if self.network.vswitches.is_empty() {
            missing.push(
                "a vswitch (`[network.vswitches]` zone = vswitch, or `ALIYUN_VSWITCH_ID_<ZONE LETTER>`)"
                    .into(),
            );
        }
        if !self.images.contains_key(&arch) {
            missing.push(format!(
                "{arch} image (`images.{arch}` or `ALIYUN_{}_IMAGE_ID`)",
                arch.to_string().to_uppercase()
            ));
        }
        if let Some(file) = &self.ssh.private_key_file {
            if !file.is_file() {
                missing
                    .push(format!("the SSH private key file `{}` (`ssh.private_key_file`)", file.display()));
            }
        }
        if self.helper.install == HelperInstall::Upload && !self.helper.upload.contains_key(&arch) {
            missing.push(format!("gitlab-runner's linux-{arch} binary (`helper.upload_{arch}`)"));
        }
        report_missing("the configuration is incomplete for creating instances", missing)
    }

    fn missing_for_api(&self, missing: &mut Vec<String>) {
        if self.region_id.is_none() {
            missing.push("region (`aliyun.region_id` or `ALIYUN_REGION_ID`)".into());
        }
        if !self.credentials.is_configured() {
            missing.push(
                "credentials (`ALIYUN_ACCESS_KEY_ID` + `ALIYUN_ACCESS_KEY_SECRET`, `credentials.profile_file`, \
                 or `credentials.use_instance_role = true`)"
                    .into(),
            );
        }
    }
}

fn report_missing(what: &str, missing: Vec<String>) -> anyhow::Result<()> {
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("{what}: missing {}", missing.join(", "))
    }
}

/// A number without a needless `.0`.
fn num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

// ---------------------------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------------------------

/// Parses `"90s"`, `"10m"`, `"3h"`, `"1d"`, `"1h30m"`, `"0s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an empty duration; write e.g. \"90s\", \"10m\" or \"3h\"".into());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => {
                return Err(format!(
                    "`{t}` is not a duration; write e.g. \"90s\", \"10m\", \"3h\" or \"1h30m\""
                ))
            }
        };
        if digits.is_empty() {
            return Err(format!("`{t}` is not a duration; write e.g. \"90s\", \"10m\", \"3h\" or \"1h30m\""));
        }
        let n: u64 = digits.parse().map_err(|_| format!("`{t}` is too long a duration"))?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(|| format!("`{t}` is too long a duration"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!("`{t}` has no unit; write \"{t}s\" for seconds (units: s, m, h, d)"));
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way [`parse_duration`] reads it, for people: every unit from the
/// largest to the smallest that is not zero, two digits after the first (`90s` → `1m30s`,
/// `1h30m`, `1h02m`, `1h00m05s`, `1d`). The one format of durations in messages, job logs and
/// tables.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let parts: Vec<(u64, &str)> =
        [(secs / 86_400, "d"), (secs % 86_400 / 3600, "h"), (secs % 3600 / 60, "m"), (secs % 60, "s")].into();
    let (Some(first), Some(last)) = (parts.iter().position(|p| p.0 > 0), parts.iter().rposition(|p| p.0 > 0))
    else {
        return "0s".into();
    };
    parts[first..=last]
        .iter()
        .enumerate()
        .map(|(i, (n, unit))| if i == 0 { format!("{n}{unit}") } else { format!("{n:02}{unit}") })
        .collect()
}

/// A duration in the file: only a string such as `"90s"`.
#[derive(Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"90s\", \"10m\" or \"3h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "durations are strings with a unit; write \"{v}s\" for {v} seconds (or \"10m\", \"3h\")"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                self.visit_i64(v as i64)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file structure (serde)
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    aliyun: RawAliyun,
    credentials: RawCredentials,
    network: RawNetwork,
    images: RawImages,
    instance: RawInstance,
    shape: RawShapes,
    spot: RawSpot,
    ssh: RawSsh,
    job_overrides: RawJobOverrides,
    safety: RawSafety,
    self_destruct: crate::sts::RawSelfDestruct,
    paths: RawPaths,
    runner: RawRunner,
    timeouts: RawTimeouts,
    helper: helper::RawHelper,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAliyun {
    region_id: Option<String>,
    endpoint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawCredentials {
    access_key_id: Option<String>,
    access_key_secret: Option<String>,
    security_token: Option<String>,
    profile_file: Option<PathBuf>,
    profile_name: Option<String>,
    instance_ram_role: Option<String>,
    use_instance_role: Option<bool>,
    metadata_endpoint: Option<String>,
    hardened_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawNetwork {
    vpc_id: Option<String>,
    security_group_id: Option<String>,
    private_ip: Option<bool>,
    internet_max_bandwidth_out: Option<u32>,
    vswitches: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawImages {
    amd64: Option<String>,
    arm64: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawInstance {
    default_arch: Option<String>,
    name_prefix: Option<String>,
    hostname: Option<String>,
    system_disk_category: Option<String>,
    system_disk_size_gib: Option<u32>,
    ram_role_name: Option<String>,
    tags: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawShapes {
    amd64: RawShape,
    arm64: RawShape,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawShape {
    min_cpu: Option<u32>,
    max_cpu: Option<u32>,
    min_mem: Option<f64>,
    max_mem: Option<f64>,
    families: Option<Vec<String>>,
    deny_types: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSpot {
    strategy: Option<SpotStrategy>,
    price_limit_factor: Option<f64>,
    max_price_per_hour: Option<f64>,
    ranking: Option<Ranking>,
    price_cache_ttl: Option<Dur>,
    stock_cooldown: Option<Dur>,
    protection_hours: Option<u32>,
    allow_shared: Option<bool>,
    allow_burstable: Option<bool>,
    allow_gpu: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSsh {
    user: Option<String>,
    port: Option<u16>,
    connect_timeout: Option<Dur>,
    boot_timeout: Option<Dur>,
    key_pair_name: Option<String>,
    private_key_file: Option<PathBuf>,
    keepalive_interval: Option<Dur>,
    keepalive_count_max: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawJobOverrides {
    allow: Option<Vec<Override>>,
    archs: Option<Vec<String>>,
    max_cpu: Option<u32>,
    max_mem: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSafety {
    max_lifetime: Option<Dur>,
    watchdog: Option<bool>,
    idle_timeout: Option<Dur>,
    tag_prefix: Option<String>,
    managed_tag_key: Option<String>,
    managed_tag_value: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPaths {
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    ledger: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRunner {
    id: Option<String>,
    builds_dir: Option<String>,
    cache_dir: Option<String>,
    shell: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    prepare: Option<Dur>,
    api_call: Option<Dur>,
}

// ---------------------------------------------------------------------------------------------
// Validation: raw + environment + defaults → Config
// ---------------------------------------------------------------------------------------------

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
enum Origin<'a> {
    Default(&'a str),
    File(&'a str),
    Env(&'a str),
}

struct Validator<'a> {
    path: Option<&'a Path>,
    env: &'a Env,
    warnings: Vec<String>,
}

impl<'a> Validator<'a> {
    fn new(path: Option<&'a Path>, env: &'a Env) -> Self {
        Validator { path, env, warnings: Vec::new() }
    }

    /// "`key` = `value` in `file`" / "environment variable `VAR`=`value`".
    fn subject(&self, origin: Origin<'_>, value: impl fmt::Display) -> String {
        match origin {
            Origin::Default(key) => format!("`{key}` = `{value}` (the default)"),
            Origin::File(key) => match self.path {
                Some(p) => format!("`{key}` = `{value}` in `{}`", p.display()),
                None => format!("`{key}` = `{value}`"),
            },
            Origin::Env(var) => format!("environment variable `{var}`=`{value}`"),
        }
    }

    fn err(&self, origin: Origin<'_>, value: impl fmt::Display, problem: &str) -> anyhow::Error {
        anyhow!("{} {problem}", self.subject(origin, value))
    }

    /// A string from the environment (first non-empty of `vars`), else the file, else `None`.
    fn string<'s>(
        &'s self,
        vars: &[&'s str],
        key: &'s str,
        file: Option<String>,
    ) -> Option<(String, Origin<'s>)> {
        for var in vars {
            if let Some(v) = self.env.value(var) {
                return Some((v.to_string(), Origin::Env(var)));
            }
        }
        file.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).map(|v| (v, Origin::File(key)))
    }

    fn resolve(&self, p: PathBuf) -> PathBuf {
        match self.path.and_then(Path::parent) {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }

    fn build(mut self, raw: RawConfig) -> anyhow::Result<Config> {
        // [aliyun]
        let region = self.string(&["ALIYUN_REGION_ID"], "aliyun.region_id", raw.aliyun.region_id);
        if let Some((r, o)) = &region {
            if let Err(why) = crate::ecs::check_region_id(r) {
                return Err(self.err(*o, r, &why));
            }
        }
        let region_id = region.map(|(r, _)| r);
        let endpoint = match self.string(&["ALIYUN_ECS_ENDPOINT"], "aliyun.endpoint", raw.aliyun.endpoint) {
            None => None,
            Some((e, o)) => Some(check_url(&e, true).map_err(|why| self.err(o, &e, &why))?),
        };

        let credentials = self.credentials(raw.credentials)?;
        let network = self.network(raw.network, region_id.as_deref())?;

        // [images]
        let mut images = BTreeMap::new();
        for (arch, var, key, file) in [
            (Arch::Amd64, "ALIYUN_AMD64_IMAGE_ID", "images.amd64", raw.images.amd64),
            (Arch::Arm64, "ALIYUN_ARM64_IMAGE_ID", "images.arm64", raw.images.arm64),
        ] {
            if let Some((v, _)) = self.string(&[var], key, file) {
                images.insert(arch, v);
            }
        }

        let instance = self.instance(raw.instance)?;
        let mut shapes = self.shapes(raw.shape)?;
        let spot = self.spot(raw.spot)?;
        for shape in shapes.values_mut() {
            shape.kinds = spot.kinds;
        }
        let ssh = self.ssh(raw.ssh)?;
        let job_overrides = self.job_overrides(raw.job_overrides, &shapes, instance.default_arch)?;
        let safety = self.safety(raw.safety, &instance)?;
        let self_destruct = crate::sts::SelfDestruct::from_raw(raw.self_destruct, region_id.as_deref())?;
        let paths = self.paths(raw.paths);
        let runner = self.runner(raw.runner)?;
        let timeouts = self.timeouts(raw.timeouts, &ssh)?;
        let helper = self.helper(raw.helper)?;

        if let Some(w) = crate::sts::config_warning(&safety, &instance, &self_destruct) {
            self.warnings.push(w);
        }

        Ok(Config {
            source: self.path.map(Path::to_path_buf),
            region_id,
            endpoint,
            credentials,
            network,
            images,
            instance,
            shapes,
            spot,
            ssh,
            job_overrides,
            safety,
            self_destruct,
            paths,
            runner,
            timeouts,
            helper,
            warnings: self.warnings,
        })
    }

    fn credentials(&self, raw: RawCredentials) -> anyhow::Result<CredentialSpec> {
        let env = self.env;
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|n| env.value(n).map(|v| (n, v.to_string())))
        };
        let env_id = first(["ALIYUN_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID"]);
        let env_secret = first(["ALIYUN_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"]);
        let env_token = first(["ALIYUN_SECURITY_TOKEN", "ALIBABA_CLOUD_SECURITY_TOKEN"]);

        // The explicit pair is taken whole from one place: mixing an id from the environment
        // with a secret from the file would sign with a key that does not exist.
        let (access_key_id, access_key_secret, security_token) = if env_id.is_some()
            || env_secret.is_some()
            || env_token.is_some()
        {
            match (env_id, env_secret) {
                (Some((_, id)), Some((_, secret))) => {
                    (Some(id), Some(Secret::new(secret)), env_token.map(|(_, t)| Secret::new(t)))
                }
                (Some((name, _)), None) => bail!(
                    "environment variable `{name}` is set but `{}` is not; set both, or neither to use the \
                         configuration file",
                    name.replace("_ID", "_SECRET")
                ),
                (None, Some((name, _))) => bail!(
                    "environment variable `{name}` is set but `{}` is not; set both, or neither to use the \
                         configuration file",
                    name.replace("_SECRET", "_ID")
                ),
                (None, None) => bail!(
                    "environment variable `{}` is set without an AccessKey pair; an STS token needs \
                         `ALIYUN_ACCESS_KEY_ID` and `ALIYUN_ACCESS_KEY_SECRET` too",
                    env_token.map(|(n, _)| n).unwrap_or("ALIYUN_SECURITY_TOKEN")
                ),
            }
        } else {
            let id = raw.access_key_id.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
            let secret = raw.access_key_secret.filter(|s| !s.trim().is_empty());
            let token = raw.security_token.filter(|s| !s.trim().is_empty());
            match (&id, &secret) {
                    (Some(_), None) => bail!(
                        "`credentials.access_key_id` is set but `credentials.access_key_secret` is not{}; set both",
                        self.in_file()
                    ),
                    (None, Some(_)) => bail!(
                        "`credentials.access_key_secret` is set but `credentials.access_key_id` is not{}; set both",
                        self.in_file()
                    ),
                    (None, None) if token.is_some() => bail!(
                        "`credentials.security_token` is set without an AccessKey pair{}; set \
                         `credentials.access_key_id` and `credentials.access_key_secret` too",
                        self.in_file()
                    ),
                    _ => {}
                }
            (
                id,
                secret.map(|s| Secret::new(s.trim().to_string())),
                token.map(|t| Secret::new(t.trim().to_string())),
            )
        };

        let profile_name = raw.profile_name.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let profile_file = match raw.profile_file {
            Some(p) => Some(self.resolve(p)),
            None if profile_name.is_some() => match env.value("HOME") {
                Some(home) => Some(Path::new(home).join(".aliyun/config.json")),
                None => bail!(
                    "`credentials.profile_name` is set but neither `credentials.profile_file` nor `HOME` is; set \
                     `credentials.profile_file` to the aliyun CLI's `config.json`"
                ),
            },
            // Like the aliyun CLI: its profile file is used when it exists and nothing explicit
            // comes first. (The instance RAM role is never assumed: it must be asked for, so a
            // host without credentials fails with a clear line instead of calling the metadata
            // service of a machine that may not be an ECS instance.)
            None if access_key_id.is_none() => env
                .value("HOME")
                .map(|home| Path::new(home).join(".aliyun/config.json"))
                .filter(|p| p.is_file()),
            None => None,
        };
        let instance_ram_role = raw.instance_ram_role.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let use_instance_role = match (raw.use_instance_role, &instance_ram_role) {
            (Some(false), Some(role)) => bail!(
                "`credentials.instance_ram_role` = `{role}` contradicts `credentials.use_instance_role = false`{}; \
                 remove one of them",
                self.in_file()
            ),
            (Some(b), _) => b,
            (None, role) => role.is_some(),
        };
        let metadata_endpoint =
            match raw.metadata_endpoint.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
                None => DEFAULT_METADATA_ENDPOINT.to_string(),
                Some(e) => check_url(&e, false)
                    .map_err(|why| self.err(Origin::File("credentials.metadata_endpoint"), &e, &why))?,
            };
        Ok(CredentialSpec {
            access_key_id,
            access_key_secret,
            security_token,
            profile_file,
            profile_name,
            instance_ram_role,
            use_instance_role,
            metadata_endpoint,
            hardened_only: raw.hardened_only.unwrap_or(false),
        })
    }

    fn in_file(&self) -> String {
        self.path.map(|p| format!(" in `{}`", p.display())).unwrap_or_default()
    }

    fn network(&self, raw: RawNetwork, region: Option<&str>) -> anyhow::Result<Network> {
        let vpc_id = self.string(&["ALIYUN_VPC_ID"], "network.vpc_id", raw.vpc_id).map(|(v, _)| v);
        let security_group_id = self
            .string(&["ALIYUN_SECURITY_GROUP_ID"], "network.security_group_id", raw.security_group_id)
            .map(|(v, _)| v);
        let mut vswitches = BTreeMap::new();
        for (zone, vsw) in raw.vswitches {
            let (zone, vsw) = (zone.trim().to_string(), vsw.trim().to_string());
            if vsw.is_empty() {
                continue;
            }
            if let Some(region) = region {
                let suffix = zone.strip_prefix(region).map(|s| s.strip_prefix('-').unwrap_or(s));
                let ok = matches!(suffix, Some(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
                if !ok {
                    return Err(self.err(
                        Origin::File("network.vswitches"),
                        format!("{{ \"{zone}\" = \"{vsw}\" }}"),
                        &format!(
                            "names a zone outside region `{region}`; use zone ids of that region, such as `{}`",
                            zone_for_letter(region, 'b')
                        ),
                    ));
                }
            }
            vswitches.insert(zone, vsw);
        }
        // ALIYUN_VSWITCH_ID_A … _Z: the vswitch of zone `${region}-a` … (or `${region}a` where the
        // region id ends in a digit, as in `ap-southeast-1a`). The environment wins per zone.
        for letter in 'A'..='Z' {
            let var = format!("ALIYUN_VSWITCH_ID_{letter}");
            if let Some(v) = self.env.value(&var) {
                match region {
                    Some(region) => {
                        vswitches.insert(zone_for_letter(region, letter.to_ascii_lowercase()), v.to_string());
                    }
                    None => bail!(
                        "environment variable `{var}` is set but no region is; set `ALIYUN_REGION_ID` (its zones \
                         are named after the region) or `aliyun.region_id`"
                    ),
                }
            }
        }
        let private_ip = raw.private_ip.unwrap_or(false);
        let internet_max_bandwidth_out = match (private_ip, raw.internet_max_bandwidth_out) {
            (true, Some(n)) if n > 0 => {
                return Err(self.err(
                    Origin::File("network.internet_max_bandwidth_out"),
                    n,
                    "contradicts `network.private_ip = true` (no public IP); remove one of them",
                ))
            }
            (true, _) => 0,
            (false, None) => 100,
            (false, Some(n)) if (1..=100).contains(&n) => n,
            (false, Some(n)) => {
                return Err(self.err(
                    Origin::File("network.internet_max_bandwidth_out"),
                    n,
                    "is out of range; set 1 to 100 (Mbit/s, billed by traffic), or `network.private_ip = true` for \
                     no public IP",
                ))
            }
        };
        Ok(Network { vpc_id, security_group_id, vswitches, private_ip, internet_max_bandwidth_out })
    }

    fn instance(&self, raw: RawInstance) -> anyhow::Result<InstanceConfig> {
        let default_arch = match raw.default_arch {
            None => Arch::Amd64,
            Some(a) => a.parse().map_err(|_| {
                self.err(
                    Origin::File("instance.default_arch"),
                    &a,
                    "is not an architecture; use `amd64` (or `x86_64`) or `arm64` (or `aarch64`)",
                )
            })?,
        };
        let name_prefix = raw.name_prefix.unwrap_or_else(|| "ci-runner".into());
        let ok = (1..=38).contains(&name_prefix.len())
            && name_prefix.starts_with(|c: char| c.is_ascii_alphabetic())
            && name_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(self.err(
                Origin::File("instance.name_prefix"),
                &name_prefix,
                "is not usable in instance and host names; use 1 to 38 letters, digits and `-`, starting with a \
                 letter",
            ));
        }
        let hostname = raw.hostname.map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
        if let Some(h) = &hostname {
            let ok = (2..=64).contains(&h.len())
                && !h.starts_with(['.', '-'])
                && !h.ends_with(['.', '-'])
                && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !ok {
                return Err(self.err(
                    Origin::File("instance.hostname"),
                    h,
                    "is not a valid host name; use 2 to 64 letters, digits, `.` and `-`, or leave it out to use the \
                     instance name",
                ));
            }
        }
        let system_disk_category = raw.system_disk_category.unwrap_or_else(|| "cloud_essd".into());
        if system_disk_category.is_empty()
            || !system_disk_category.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        {
            return Err(self.err(
                Origin::File("instance.system_disk_category"),
                &system_disk_category,
                "is not a disk category; use e.g. `cloud_essd`, `cloud_auto` or `cloud_efficiency`",
            ));
        }
        let system_disk_size_gib = raw.system_disk_size_gib.unwrap_or(40);
        if !(20..=2048).contains(&system_disk_size_gib) {
            return Err(self.err(
                Origin::File("instance.system_disk_size_gib"),
                system_disk_size_gib,
                "is out of range; set 20 to 2048 (GiB)",
            ));
        }
        let ram_role_name = raw.ram_role_name.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let extra_tags: BTreeMap<String, String> =
            raw.tags.into_iter().map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
        if extra_tags.len() > MAX_TAGS - OWN_TAGS {
            return Err(self.err(
                Origin::File("instance.tags"),
                format!("{} tags", extra_tags.len()),
                &format!(
                    "is too many: an instance takes {MAX_TAGS} tags and the executor uses {OWN_TAGS}; keep at most {}",
                    MAX_TAGS - OWN_TAGS
                ),
            ));
        }
        for (k, v) in &extra_tags {
            if let Err(why) = check_tag_key(k) {
                return Err(self.err(Origin::File("instance.tags"), format!("{k} = {v}"), &why));
            }
            if v.len() > 128 || v.starts_with("acs:") || v.contains("http://") || v.contains("https://") {
                return Err(self.err(
                    Origin::File("instance.tags"),
                    format!("{k} = {v}"),
                    "has a value Aliyun rejects; use at most 128 characters, not starting with `acs:` and without \
                     `http://` or `https://`",
                ));
            }
        }
        Ok(InstanceConfig {
            default_arch,
            name_prefix,
            hostname,
            system_disk_category,
            system_disk_size_gib,
            ram_role_name,
            extra_tags,
        })
    }

    fn shapes(&self, raw: RawShapes) -> anyhow::Result<BTreeMap<Arch, Shape>> {
        let env_min_cpu = match self.env.value("MIN_CPU") {
            None => None,
            Some(v) => Some(v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                self.err(
                    Origin::Env("MIN_CPU"),
                    v,
                    "is not a whole number of vCPUs of at least 1; set e.g. `8`",
                )
            })?),
        };
        let env_min_mem = match self.env.value("MIN_MEM") {
            None => None,
            Some(v) => Some(parse_gib(v).filter(|n| *n > 0.0).ok_or_else(|| {
                self.err(Origin::Env("MIN_MEM"), v, "is not a positive number of GiB; set e.g. `16`")
            })?),
        };
        let mut out = BTreeMap::new();
        for (arch, r) in [(Arch::Amd64, raw.amd64), (Arch::Arm64, raw.arm64)] {
            let key = |f: &str| -> &'static str {
                // Keys are few and fixed; leak-free static names for messages.
                match (arch, f) {
                    (Arch::Amd64, "min_cpu") => "shape.amd64.min_cpu",
                    (Arch::Amd64, "max_cpu") => "shape.amd64.max_cpu",
                    (Arch::Amd64, "min_mem") => "shape.amd64.min_mem",
                    (Arch::Amd64, _) => "shape.amd64.max_mem",
                    (Arch::Arm64, "min_cpu") => "shape.arm64.min_cpu",
                    (Arch::Arm64, "max_cpu") => "shape.arm64.max_cpu",
                    (Arch::Arm64, "min_mem") => "shape.arm64.min_mem",
                    (Arch::Arm64, _) => "shape.arm64.max_mem",
                }
            };
            let mut s = Shape::defaults(arch);
            let ratio = arch.default_mem_per_core();
            let (mut o_min_cpu, mut o_max_cpu) =
                (Origin::Default(key("min_cpu")), Origin::Default(key("max_cpu")));
            let (mut o_min_mem, mut o_max_mem) =
                (Origin::Default(key("min_mem")), Origin::Default(key("max_mem")));
            // Each layer: a minimum CPU without a minimum memory implies memory by the ratio.
            if let Some(n) = r.min_cpu {
                s.min_cpu = n;
                o_min_cpu = Origin::File(key("min_cpu"));
                if r.min_mem.is_none() {
                    s.min_mem_gib = f64::from(n) * ratio;
                    o_min_mem = o_min_cpu;
                }
            }
            if let Some(n) = r.max_cpu {
                s.max_cpu = n;
                o_max_cpu = Origin::File(key("max_cpu"));
            }
            if let Some(n) = r.min_mem {
                s.min_mem_gib = n;
                o_min_mem = Origin::File(key("min_mem"));
            }
            if let Some(n) = r.max_mem {
                s.max_mem_gib = n;
                o_max_mem = Origin::File(key("max_mem"));
            }
            if let Some(n) = env_min_cpu {
                s.min_cpu = n;
                o_min_cpu = Origin::Env("MIN_CPU");
                if env_min_mem.is_none() {
                    s.min_mem_gib = f64::from(n) * ratio;
                    o_min_mem = o_min_cpu;
                }
            }
            if let Some(n) = env_min_mem {
                s.min_mem_gib = n;
                o_min_mem = Origin::Env("MIN_MEM");
            }
            if let Some(f) = r.families {
                s.families = f.into_iter().map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
            }
            if let Some(d) = r.deny_types {
                s.deny_types =
                    d.into_iter().map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
            }
            if s.min_cpu == 0 {
                return Err(self.err(o_min_cpu, 0, "is zero; set at least 1 (vCPU)"));
            }
            if !(s.min_mem_gib.is_finite() && s.min_mem_gib > 0.0) {
                return Err(self.err(
                    o_min_mem,
                    num(s.min_mem_gib),
                    "is not positive; set a memory size in GiB",
                ));
            }
            if s.min_cpu > s.max_cpu {
                return Err(anyhow!(
                    "{} is above the maximum {}; make the minimum at most the maximum",
                    self.subject(o_min_cpu, s.min_cpu),
                    self.subject(o_max_cpu, s.max_cpu)
                ));
            }
            if s.min_mem_gib > s.max_mem_gib {
                let what = match o_min_mem {
                    Origin::Env("MIN_CPU") | Origin::File("shape.amd64.min_cpu" | "shape.arm64.min_cpu") => {
                        format!(
                            " (minimum memory {} GiB implied at {ratio} GiB per vCPU)",
                            num(s.min_mem_gib)
                        )
                    }
                    _ => String::new(),
                };
                let shown = match o_min_mem {
                    Origin::Env("MIN_CPU") => s.min_cpu.to_string(),
                    Origin::File(k) if k.ends_with("min_cpu") => s.min_cpu.to_string(),
                    _ => num(s.min_mem_gib),
                };
                return Err(anyhow!(
                    "{}{what} is above the maximum {}; make the minimum at most the maximum",
                    self.subject(o_min_mem, shown),
                    self.subject(o_max_mem, num(s.max_mem_gib))
                ));
            }
            for (field, list) in [("families", &s.families), ("deny_types", &s.deny_types)] {
                if let Some(bad) = list.iter().find(|x| !x.starts_with("ecs.")) {
                    return Err(self.err(
                        Origin::File(if arch == Arch::Amd64 {
                            if field == "families" {
                                "shape.amd64.families"
                            } else {
                                "shape.amd64.deny_types"
                            }
                        } else if field == "families" {
                            "shape.arm64.families"
                        } else {
                            "shape.arm64.deny_types"
                        }),
                        bad,
                        "is not an ECS name; families look like `ecs.c8y` and types like `ecs.c8y.2xlarge`",
                    ));
                }
            }
            out.insert(arch, s);
        }
        Ok(out)
    }

    fn spot(&self, raw: RawSpot) -> anyhow::Result<SpotConfig> {
        let price_limit_factor = raw.price_limit_factor.unwrap_or(1.2);
        if !(price_limit_factor.is_finite() && price_limit_factor >= 1.0) {
            return Err(self.err(
                Origin::File("spot.price_limit_factor"),
                num(price_limit_factor),
                "is below 1.0, so the limit would be under the offer's own price and every creation would fail; \
                 set 1.0 or more (default 1.2)",
            ));
        }
        if price_limit_factor > 10.0 {
            return Err(self.err(
                Origin::File("spot.price_limit_factor"),
                num(price_limit_factor),
                "is above 10; set a factor between 1.0 and 10 (default 1.2), or `spot.strategy = \"SpotAsPriceGo\"`",
            ));
        }
        if let Some(cap) = raw.max_price_per_hour {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(self.err(
                    Origin::File("spot.max_price_per_hour"),
                    num(cap),
                    "is not a positive price; set a price per hour in the account's currency (CNY or USD), or leave it out for no cap",
                ));
            }
        }
        let price_cache_ttl = raw.price_cache_ttl.map(|d| d.0).unwrap_or(Duration::from_secs(300));
        if price_cache_ttl > Duration::from_secs(3600) {
            return Err(self.err(
                Origin::File("spot.price_cache_ttl"),
                format_duration(price_cache_ttl),
                "is longer than an hour, and spot prices move; set at most \"1h\" (\"0s\" disables the cache)",
            ));
        }
        let stock_cooldown = raw.stock_cooldown.map(|d| d.0).unwrap_or(Duration::from_secs(600));
        if stock_cooldown > Duration::from_secs(6 * 3600) {
            return Err(self.err(
                Origin::File("spot.stock_cooldown"),
                format_duration(stock_cooldown),
                "is longer than 6 hours, and spot stock comes back; set at most \"6h\" (\"0s\" turns it off)",
            ));
        }
        let protection_hours = raw.protection_hours.unwrap_or(crate::pricing::DEFAULT_PROTECTION_HOURS);
        if !crate::pricing::PROTECTION_HOURS.contains(&protection_hours) {
            return Err(self.err(
                Origin::File("spot.protection_hours"),
                protection_hours.to_string(),
                "is not a protection period ECS offers; set 1 (the default) or 0 (cheaper, but the instance may be reclaimed at any time)",
            ));
        }
        Ok(SpotConfig {
            strategy: raw.strategy.unwrap_or(SpotStrategy::SpotWithPriceLimit),
            price_limit_factor,
            max_price_per_hour: raw.max_price_per_hour,
            protection_hours,
            kinds: crate::families::TypeKinds {
                shared: raw.allow_shared.unwrap_or(false),
                burstable: raw.allow_burstable.unwrap_or(false),
                gpu: raw.allow_gpu.unwrap_or(false),
            },
            ranking: raw.ranking.unwrap_or_default(),
            price_cache_ttl,
            stock_cooldown,
        })
    }

    fn ssh(&self, raw: RawSsh) -> anyhow::Result<SshConfig> {
        let user = raw.user.map(|u| u.trim().to_string()).unwrap_or_else(|| "root".into());
        let ok = !user.is_empty()
            && user.len() <= 32
            && user.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(self.err(Origin::File("ssh.user"), &user, "is not a user name; use e.g. `root`"));
        }
        let port = raw.port.unwrap_or(22);
        if port == 0 {
            return Err(self.err(Origin::File("ssh.port"), 0, "is not a port; set 1 to 65535 (default 22)"));
        }
        let connect_timeout = raw.connect_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(10));
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&connect_timeout) {
            return Err(self.err(
                Origin::File("ssh.connect_timeout"),
                format_duration(connect_timeout),
                "is out of range; set between \"1s\" and \"5m\" (default \"10s\")",
            ));
        }
        let boot_timeout = raw.boot_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(600));
        if !(Duration::from_secs(30)..=Duration::from_secs(3600)).contains(&boot_timeout) {
            return Err(self.err(
                Origin::File("ssh.boot_timeout"),
                format_duration(boot_timeout),
                "is out of range; set between \"30s\" and \"1h\" (default \"10m\")",
            ));
        }
        let key_pair_name =
            self.string(&["ALIYUN_KEY_PAIR_NAME"], "ssh.key_pair_name", raw.key_pair_name).map(|(v, _)| v);
        let private_key_file = raw.private_key_file.map(|p| self.resolve(p));
        if private_key_file.is_some() && key_pair_name.is_none() {
            bail!(
                "`ssh.private_key_file` is set but `ssh.key_pair_name` is not{}; name the registered key pair \
                 whose private key it is (or `ALIYUN_KEY_PAIR_NAME`), or remove the file to use per-job keys",
                self.in_file()
            );
        }
        let interval = raw.keepalive_interval.map(|d| d.0).unwrap_or(Duration::from_secs(10));
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&interval) {
            let why = "is out of range; set between \"1s\" and \"5m\" (default \"10s\")";
            return Err(self.err(Origin::File("ssh.keepalive_interval"), format_duration(interval), why));
        }
        let count_max = raw.keepalive_count_max.unwrap_or(3);
        if !(1..=100).contains(&count_max) {
            let why = "is out of range; set 1 to 100 (default 3)";
            return Err(self.err(Origin::File("ssh.keepalive_count_max"), count_max, why));
        }
        let keepalive = crate::ssh::Keepalive { interval, count_max };
        Ok(SshConfig {
            user,
            port,
            connect_timeout,
            boot_timeout,
            key_pair_name,
            private_key_file,
            keepalive,
        })
    }

    fn job_overrides(
        &self,
        raw: RawJobOverrides,
        shapes: &BTreeMap<Arch, Shape>,
        default_arch: Arch,
    ) -> anyhow::Result<JobOverrides> {
        let allow: BTreeSet<Override> = match raw.allow {
            Some(list) => list.into_iter().collect(),
            None => Override::ALL.into_iter().collect(),
        };
        let archs: BTreeSet<Arch> = match raw.archs {
            None => [Arch::Amd64, Arch::Arm64].into_iter().collect(),
            Some(list) => list
                .iter()
                .map(|a| {
                    a.parse::<Arch>().map_err(|_| {
                        self.err(
                            Origin::File("job_overrides.archs"),
                            a,
                            "is not an architecture; use `amd64` or `arm64`",
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        };
        if !archs.contains(&default_arch) {
            bail!(
                "`job_overrides.archs` does not include `instance.default_arch` = `{default_arch}`{}; add it",
                self.in_file()
            );
        }
        let mut ceilings = BTreeMap::new();
        for (arch, shape) in shapes {
            let max_cpu = raw.max_cpu.unwrap_or(shape.max_cpu);
            let max_mem_gib = raw.max_mem.unwrap_or(shape.max_mem_gib);
            if max_cpu < shape.min_cpu {
                return Err(self.err(
                    Origin::File("job_overrides.max_cpu"),
                    max_cpu,
                    &format!(
                        "is below the {arch} minimum of {} vCPU; set a ceiling of at least {}",
                        shape.min_cpu, shape.min_cpu
                    ),
                ));
            }
            if !(max_mem_gib.is_finite() && max_mem_gib >= shape.min_mem_gib) {
                return Err(self.err(
                    Origin::File("job_overrides.max_mem"),
                    num(max_mem_gib),
                    &format!(
                        "is below the {arch} minimum of {} GiB; set a ceiling of at least {}",
                        num(shape.min_mem_gib),
                        num(shape.min_mem_gib)
                    ),
                ));
            }
            ceilings.insert(*arch, Ceiling { max_cpu, max_mem_gib });
        }
        Ok(JobOverrides { allow, archs, ceilings })
    }

    fn safety(&self, raw: RawSafety, instance: &InstanceConfig) -> anyhow::Result<Safety> {
        let max_lifetime = raw.max_lifetime.map(|d| d.0).unwrap_or(Duration::from_secs(3 * 3600));
        if max_lifetime < MIN_LIFETIME {
            return Err(self.err(
                Origin::File("safety.max_lifetime"),
                format_duration(max_lifetime),
                "is shorter than the 30 minutes Aliyun requires for `AutoReleaseTime`; set at least \"30m\" \
                 (default \"3h\")",
            ));
        }
        if max_lifetime > Duration::from_secs(7 * 86_400) {
            return Err(self.err(
                Origin::File("safety.max_lifetime"),
                format_duration(max_lifetime),
                "is longer than 7 days, which defeats the safety net; set between \"30m\" and \"7d\"",
            ));
        }
        let idle_timeout = raw.idle_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(30 * 60));
        if idle_timeout < Duration::from_secs(60) {
            return Err(self.err(
                Origin::File("safety.idle_timeout"),
                format_duration(idle_timeout),
                "is under a minute, so the watchdog could release a busy instance; set at least \"1m\" (default \
                 \"30m\")",
            ));
        }
        let tag_prefix =
            raw.tag_prefix.map(|s| s.trim().to_string()).unwrap_or_else(|| "ci-spot-executor".into());
        if let Err(why) = check_tag_key(&tag_prefix) {
            return Err(self.err(Origin::File("safety.tag_prefix"), &tag_prefix, &why));
        }
        let managed_tag_key = raw
            .managed_tag_key
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| format!("{tag_prefix}:managed-by"));
        if let Err(why) = check_tag_key(&managed_tag_key) {
            return Err(self.err(Origin::File("safety.managed_tag_key"), &managed_tag_key, &why));
        }
        let managed_tag_value = raw
            .managed_tag_value
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| crate::DRIVER_NAME.to_string());
        if managed_tag_value.is_empty()
            || managed_tag_value.len() > 128
            || managed_tag_value.starts_with("acs:")
        {
            return Err(self.err(
                Origin::File("safety.managed_tag_value"),
                &managed_tag_value,
                "is not a usable tag value; use 1 to 128 characters, not starting with `acs:`",
            ));
        }
        if instance
            .extra_tags
            .keys()
            .any(|k| k == &managed_tag_key || k.starts_with(&format!("{tag_prefix}:")))
        {
            bail!(
                "`instance.tags` uses the executor's own tag prefix `{tag_prefix}:`{}; choose other tag keys",
                self.in_file()
            );
        }
        Ok(Safety {
            max_lifetime,
            watchdog: raw.watchdog.unwrap_or(true),
            idle_timeout,
            tag_prefix,
            managed_tag_key,
            managed_tag_value,
        })
    }

    fn paths(&self, raw: RawPaths) -> Paths {
        let state_dir = raw
            .state_dir
            .map(|p| self.resolve(p))
            .unwrap_or_else(|| PathBuf::from("/var/lib/aliyun-spot-executor"));
        let cache_dir = raw
            .cache_dir
            .map(|p| self.resolve(p))
            .unwrap_or_else(|| PathBuf::from("/var/cache/aliyun-spot-executor"));
        let ledger = raw.ledger.map(|p| self.resolve(p)).unwrap_or_else(|| state_dir.join("ledger.jsonl"));
        Paths { state_dir, cache_dir, ledger }
    }

    fn runner(&self, raw: RawRunner) -> anyhow::Result<RunnerConfig> {
        let builds_dir = raw.builds_dir.unwrap_or_else(|| "/builds".into());
        let cache_dir = raw.cache_dir.unwrap_or_else(|| "/cache".into());
        for (key, v) in [("runner.builds_dir", &builds_dir), ("runner.cache_dir", &cache_dir)] {
            if !v.starts_with('/') || v.contains(char::is_whitespace) || v.split('/').any(|c| c == "..") {
                return Err(self.err(
                    Origin::File(key),
                    v,
                    "is not an absolute path on the instance; use e.g. `/builds` (no spaces or `..`)",
                ));
            }
        }
        let shell = raw.shell.unwrap_or_else(|| "bash".into());
        // gitlab-runner's POSIX scripts quote with bash's `$'…'` (v18.3.0-1857-gd79f3e7b8,
        // `shells/bash.go` `escape` → `helpers.ShellEscape`), which dash runs as literal text
        // (`eval $'echo a\nb'` → `anb: not found`): bash is the only POSIX shell that works.
        if shell != "bash" {
            return Err(self.err(
                Origin::File("runner.shell"),
                &shell,
                "is not supported: gitlab-runner's scripts need bash (they quote with `$'…'`); remove the key or set `bash`",
            ));
        }
        let id = match self.string(&[crate::identity::RUNNER_ID_VAR], "runner.id", raw.id) {
            Some((v, origin)) if !crate::identity::is_id(&v) => {
                return Err(self.err(
                    origin,
                    &v,
                    "is not a usable runner id; use at most 64 letters, digits, `.`, `_` or `-`",
                ))
            }
            other => other.map(|(v, _)| v),
        };
        Ok(RunnerConfig { id, builds_dir, cache_dir, shell })
    }

    fn timeouts(&self, raw: RawTimeouts, ssh: &SshConfig) -> anyhow::Result<Timeouts> {
        let prepare = raw.prepare.map(|d| d.0).unwrap_or(Duration::from_secs(15 * 60));
        if prepare <= ssh.boot_timeout {
            return Err(self.err(
                Origin::File("timeouts.prepare"),
                format_duration(prepare),
                &format!(
                    "is not longer than `ssh.boot_timeout` = `{}`, so prepare could never wait for SSH; make it longer",
                    format_duration(ssh.boot_timeout)
                ),
            ));
        }
        if prepare > Duration::from_secs(3600) {
            return Err(self.err(
                Origin::File("timeouts.prepare"),
                format_duration(prepare),
                "is longer than gitlab-runner's default `prepare_exec_timeout` of 1 hour; set at most \"1h\"",
            ));
        }
        let api_call = raw.api_call.map(|d| d.0).unwrap_or(Duration::from_secs(30));
        if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&api_call) {
            return Err(self.err(
                Origin::File("timeouts.api_call"),
                format_duration(api_call),
                "is out of range; set between \"1s\" and \"5m\" (default \"30s\")",
            ));
        }
        Ok(Timeouts { prepare, api_call })
    }
}

/// The zone id Aliyun gives zone `letter` of `region`: `cn-hangzhou` + `b` → `cn-hangzhou-b`,
/// `ap-southeast-1` + `a` → `ap-southeast-1a`.
pub fn zone_for_letter(region: &str, letter: char) -> String {
    if region.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{region}{letter}")
    } else {
        format!("{region}-{letter}")
    }
}

/// Aliyun's rules for tag keys: 1..=128 characters, not starting with `aliyun` or `acs:`
/// (case-insensitive), no `http://` or `https://`.
fn check_tag_key(k: &str) -> Result<(), String> {
    let lower = k.to_ascii_lowercase();
    if k.is_empty() || k.len() > 128 {
        return Err("is not a usable tag key; use 1 to 128 characters".into());
    }
    if lower.starts_with("aliyun") || lower.starts_with("acs:") {
        return Err(
            "starts with a prefix Aliyun reserves (`aliyun`, `acs:`), so ECS would reject it; choose \
                    another key"
                .into(),
        );
    }
    if lower.contains("http://") || lower.contains("https://") {
        return Err(
            "contains `http://` or `https://`, which Aliyun rejects in tag keys; choose another key".into()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("300").unwrap_err(),
            "`300` has no unit; write \"300s\" for seconds (units: s, m, h, d)"
        );
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        for (secs, shown) in [
            (5, "5s"),
            (192, "3m12s"),
            (3720, "1h02m"),
            (3605, "1h00m05s"),
            (86_400, "1d"),
            (90_061, "1d01h01m01s"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), shown);
            assert_eq!(parse_duration(shown), Ok(Duration::from_secs(secs)), "{shown} reads back");
        }
    }

    #[test]
    fn zones_follow_aliyun_naming() {
        assert_eq!(zone_for_letter("cn-hangzhou", 'b'), "cn-hangzhou-b");
        assert_eq!(zone_for_letter("ap-southeast-1", 'a'), "ap-southeast-1a");
    }

    #[test]
    fn tag_keys() {
        assert!(check_tag_key("team").is_ok());
        assert!(check_tag_key("ci-spot-executor:job").is_ok());
        assert!(check_tag_key("aliyun-spot-executor:job").is_err());
        assert!(check_tag_key("Aliyun").is_err());
        assert!(check_tag_key("acs:x").is_err());
    }

    #[test]
    fn gib_values() {
        assert_eq!(parse_gib("16"), Some(16.0));
        assert_eq!(parse_gib("0.5"), Some(0.5));
        assert_eq!(parse_gib("16G"), Some(16.0));
        assert_eq!(parse_gib("16GiB"), Some(16.0));
        assert_eq!(parse_gib("lots"), None);
        assert_eq!(parse_gib("inf"), None);
    }

    #[test]
    fn instance_name_has_arch_and_utc_timestamp() {
        let cfg = Config::defaults();
        let at = time::macros::datetime!(2025-01-02 03:04:05 +08:00);
        assert_eq!(cfg.instance.instance_name(Arch::Arm64, at), "ci-runner-arm64-spot-20250101190405");
        assert_eq!(cfg.instance.host_name("x-1"), "x-1");
    }
}
