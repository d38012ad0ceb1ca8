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
//!
//! Files: `raw` (the serde structs), `validate` (raw + environment + defaults → [`Config`]),
//! `sections` (the validated sections), `job` (`[job_overrides]` and the job's shape),
//! `durations`, `helper` (gitlab-runner's helper binary), [`perms`] (who may read the file and
//! touch the driver's paths).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

pub(crate) use crate::ecs::check_url;
use crate::env::Env;
use crate::selection::{Arch, Shape};

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
    /// How ECS and STS calls are retried: [`crate::retry::RetryPolicy::default`] with the
    /// backoff's base from `aliyun.retry_base_delay_ms`.
    pub api_retry: crate::retry::RetryPolicy,
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

mod durations;
mod helper;
mod job;
mod names;
pub mod perms;
mod raw;
mod sections;
mod validate;
pub use durations::{format_duration, parse_duration};
pub use helper::{valid_version, HelperConfig, HelperInstall, DEFAULT_CHECKSUM_URL, DEFAULT_DOWNLOAD_URL};
use job::parse_gib;
pub use job::{AskedBy, Ceiling, JobOverrides, JobSpec, Override, ShapeRequest, JOB_VAR_ARCH};
use raw::RawConfig;
pub use sections::*;
pub use validate::zone_for_letter;
use validate::{Origin, Validator};

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
/// plant ([`perms`]).
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
    perms::check(&mut cfg, text.as_deref().map(|t| (path, t)))?;
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
