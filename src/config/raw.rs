//! The file as serde reads it: every table `deny_unknown_fields`, so a misspelt key fails
//! loudly instead of silently falling back to a default.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::durations::Dur;
use super::{Override, SpotStrategy};
use crate::selection::Ranking;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) aliyun: RawAliyun,
    pub(super) credentials: RawCredentials,
    pub(super) network: RawNetwork,
    pub(super) images: RawImages,
    pub(super) instance: RawInstance,
    pub(super) shape: RawShapes,
    pub(super) spot: RawSpot,
    pub(super) ssh: RawSsh,
    pub(super) job_overrides: RawJobOverrides,
    pub(super) safety: RawSafety,
    pub(super) self_destruct: crate::sts::RawSelfDestruct,
    pub(super) paths: RawPaths,
    pub(super) runner: RawRunner,
    pub(super) timeouts: RawTimeouts,
    pub(super) helper: super::helper::RawHelper,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAliyun {
    pub(super) region_id: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) retry_base_delay_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCredentials {
    pub(super) access_key_id: Option<String>,
    pub(super) access_key_secret: Option<String>,
    pub(super) security_token: Option<String>,
    pub(super) profile_file: Option<PathBuf>,
    pub(super) profile_name: Option<String>,
    pub(super) instance_ram_role: Option<String>,
    pub(super) use_instance_role: Option<bool>,
    pub(super) metadata_endpoint: Option<String>,
    pub(super) hardened_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawNetwork {
    pub(super) vpc_id: Option<String>,
    pub(super) security_group_id: Option<String>,
    pub(super) private_ip: Option<bool>,
    pub(super) internet_max_bandwidth_out: Option<u32>,
    pub(super) vswitches: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawImages {
    pub(super) amd64: Option<String>,
    pub(super) arm64: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawInstance {
    pub(super) default_arch: Option<String>,
    pub(super) name_prefix: Option<String>,
    pub(super) hostname: Option<String>,
    pub(super) system_disk_category: Option<String>,
    pub(super) system_disk_size_gib: Option<u32>,
    pub(super) ram_role_name: Option<String>,
    pub(super) tags: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShapes {
    pub(super) amd64: RawShape,
    pub(super) arm64: RawShape,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawShape {
    pub(super) min_cpu: Option<u32>,
    pub(super) max_cpu: Option<u32>,
    pub(super) min_mem: Option<f64>,
    pub(super) max_mem: Option<f64>,
    pub(super) families: Option<Vec<String>>,
    pub(super) deny_types: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSpot {
    pub(super) strategy: Option<SpotStrategy>,
    pub(super) price_limit_factor: Option<f64>,
    pub(super) max_price_per_hour: Option<f64>,
    pub(super) ranking: Option<Ranking>,
    pub(super) price_cache_ttl: Option<Dur>,
    pub(super) stock_cooldown: Option<Dur>,
    pub(super) protection_hours: Option<u32>,
    pub(super) allow_shared: Option<bool>,
    pub(super) allow_burstable: Option<bool>,
    pub(super) allow_gpu: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSsh {
    pub(super) user: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) connect_timeout: Option<Dur>,
    pub(super) boot_timeout: Option<Dur>,
    pub(super) key_pair_name: Option<String>,
    pub(super) private_key_file: Option<PathBuf>,
    pub(super) keepalive_interval: Option<Dur>,
    pub(super) keepalive_count_max: Option<u32>,
    pub(super) keep_session: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawJobOverrides {
    pub(super) allow: Option<Vec<Override>>,
    pub(super) archs: Option<Vec<String>>,
    pub(super) max_cpu: Option<u32>,
    pub(super) max_mem: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSafety {
    pub(super) max_lifetime: Option<Dur>,
    pub(super) watchdog: Option<bool>,
    pub(super) idle_timeout: Option<Dur>,
    pub(super) tag_prefix: Option<String>,
    pub(super) managed_tag_key: Option<String>,
    pub(super) managed_tag_value: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPaths {
    pub(super) state_dir: Option<PathBuf>,
    pub(super) cache_dir: Option<PathBuf>,
    pub(super) ledger: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRunner {
    pub(super) id: Option<String>,
    pub(super) builds_dir: Option<String>,
    pub(super) cache_dir: Option<String>,
    pub(super) shell: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTimeouts {
    pub(super) prepare: Option<Dur>,
    pub(super) api_call: Option<Dur>,
}
