//! The validated sections of [`super::Config`]: what the rest of the program reads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use time::OffsetDateTime;

use crate::selection::{Arch, Ranking};

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

    /// The runner (and instance) name of `aliyun-spot github start` for `arch` at `at`:
    /// [`Self::instance_name`] and a random `suffix`, so that two starts in the same second (a
    /// matrix) do not collide.
    pub fn runner_name(&self, arch: Arch, at: OffsetDateTime, suffix: u16) -> String {
        format!("{}-{suffix:04x}", self.instance_name(arch, at))
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
    /// China site, USD on the international one: `crate::selection::pricing`).
    pub max_price_per_hour: Option<f64>,
    /// `SpotDuration`, the protection period in hours (0 or 1, default 1), sent alike to pricing,
    /// availability and creation (`crate::selection::pricing`).
    pub protection_hours: u32,
    /// Shared, burstable and GPU types allowed (`allow_shared`, `allow_burstable`, `allow_gpu`;
    /// all off by default: `crate::selection::families`).
    pub kinds: crate::selection::families::TypeKinds,
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
    /// Keep one SSH session per job open across the stages ([`crate::keeper`]; default true).
    pub keep_session: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn instance_name_has_arch_and_utc_timestamp() {
        let cfg = Config::defaults();
        let at = time::macros::datetime!(2025-01-02 03:04:05 +08:00);
        assert_eq!(cfg.instance.instance_name(Arch::Arm64, at), "ci-runner-arm64-spot-20250101190405");
        assert_eq!(cfg.instance.host_name("x-1"), "x-1");
    }
}
