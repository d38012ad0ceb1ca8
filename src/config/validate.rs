//! Raw file + environment + defaults → [`Config`]: every value checked once, every error one
//! line naming the key or variable, the value and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail};

use super::durations::format_duration;
use super::raw::*;
use super::*;
use crate::env::Env;
use crate::secret::Secret;
use crate::selection::{Arch, Shape};

/// Where a value came from, for error messages.
#[derive(Clone, Copy)]
pub(super) enum Origin<'a> {
    Default(&'a str),
    File(&'a str),
    Env(&'a str),
}

pub(super) struct Validator<'a> {
    pub(super) path: Option<&'a Path>,
    pub(super) env: &'a Env,
    pub(super) warnings: Vec<String>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(path: Option<&'a Path>, env: &'a Env) -> Self {
        Validator { path, env, warnings: Vec::new() }
    }

    /// "`key` = `value` in `file`" / "environment variable `VAR`=`value`".
    pub(super) fn subject(&self, origin: Origin<'_>, value: impl fmt::Display) -> String {
        match origin {
            Origin::Default(key) => format!("`{key}` = `{value}` (the default)"),
            Origin::File(key) => match self.path {
                Some(p) => format!("`{key}` = `{value}` in `{}`", p.display()),
                None => format!("`{key}` = `{value}`"),
            },
            Origin::Env(var) => format!("environment variable `{var}`=`{value}`"),
        }
    }

    pub(super) fn err(&self, origin: Origin<'_>, value: impl fmt::Display, problem: &str) -> anyhow::Error {
        anyhow!("{} {problem}", self.subject(origin, value))
    }

    /// A string from the environment (first non-empty of `vars`), else the file, else `None`.
    pub(super) fn string<'s>(
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

    pub(super) fn resolve(&self, p: PathBuf) -> PathBuf {
        match self.path.and_then(Path::parent) {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    }

    pub(super) fn build(mut self, raw: RawConfig) -> anyhow::Result<Config> {
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
            Some((e, o)) => Some(crate::ecs::check_endpoint(&e, true).map_err(|why| self.err(o, &e, &why))?),
        };

        let api_retry = self.api_retry(raw.aliyun.retry_base_delay_ms)?;

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
            api_retry,
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

    pub(super) fn credentials(&self, raw: RawCredentials) -> anyhow::Result<CredentialSpec> {
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
                Some(e) => crate::ecs::check_endpoint(&e, false)
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

    pub(super) fn in_file(&self) -> String {
        self.path.map(|p| format!(" in `{}`", p.display())).unwrap_or_default()
    }

    pub(super) fn network(&self, raw: RawNetwork, region: Option<&str>) -> anyhow::Result<Network> {
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

    pub(super) fn instance(&self, raw: RawInstance) -> anyhow::Result<InstanceConfig> {
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
        // Checked with the names made of them, below (`names.rs`).
        let name_prefix = raw.name_prefix.unwrap_or_else(|| "ci-runner".into());
        let hostname = raw.hostname.map(|h| h.trim().to_string()).filter(|h| !h.is_empty());
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
        let instance = InstanceConfig {
            default_arch,
            name_prefix,
            hostname,
            system_disk_category,
            system_disk_size_gib,
            ram_role_name,
            extra_tags,
        };
        self.instance_names(&instance)?;
        Ok(instance)
    }

    pub(super) fn shapes(&self, raw: RawShapes) -> anyhow::Result<BTreeMap<Arch, Shape>> {
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

    pub(super) fn spot(&self, raw: RawSpot) -> anyhow::Result<SpotConfig> {
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
        let protection_hours =
            raw.protection_hours.unwrap_or(crate::selection::pricing::DEFAULT_PROTECTION_HOURS);
        if !crate::selection::pricing::PROTECTION_HOURS.contains(&protection_hours) {
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
            kinds: crate::selection::families::TypeKinds {
                shared: raw.allow_shared.unwrap_or(false),
                burstable: raw.allow_burstable.unwrap_or(false),
                gpu: raw.allow_gpu.unwrap_or(false),
            },
            ranking: raw.ranking.unwrap_or_default(),
            price_cache_ttl,
            stock_cooldown,
        })
    }

    pub(super) fn ssh(&self, raw: RawSsh) -> anyhow::Result<SshConfig> {
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
        // No rule of ECS sets a floor: how soon SSH answers depends on the image and the type
        // (tens of seconds to minutes on ECS, well under a second in the emulator), and a value
        // too short for them fails prepare with a line that names this key. Only `0s`, which
        // could never wait at all, is refused.
        let boot_timeout = raw.boot_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(600));
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&boot_timeout) {
            return Err(self.err(
                Origin::File("ssh.boot_timeout"),
                format_duration(boot_timeout),
                "is out of range; set between \"1s\" and \"1h\" (default \"10m\")",
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
            keep_session: raw.keep_session.unwrap_or(true),
        })
    }

    /// The retry policy of ECS and STS calls ([`crate::ecs::retry`]) with the backoff's base
    /// from `aliyun.retry_base_delay_ms`. At most the policy's longest pause (5 s): a larger
    /// base would make every pause that long. `0` retries at once, which only an endpoint that
    /// does not mind (the emulator) should get.
    pub(super) fn api_retry(&self, base_ms: Option<u64>) -> anyhow::Result<crate::retry::RetryPolicy> {
        let policy = crate::retry::RetryPolicy::default();
        let (default, max) = (policy.backoff.first.as_millis(), policy.backoff.max.as_millis());
        let base = base_ms.map_or(default, u128::from);
        if base > max {
            let why = format!("is out of range; set 0 to {max} (default {default})");
            return Err(self.err(Origin::File("aliyun.retry_base_delay_ms"), base, &why));
        }
        let base = Duration::from_millis(base as u64);
        Ok(crate::retry::RetryPolicy {
            backoff: crate::retry::Backoff { first: base, ..policy.backoff },
            ..policy
        })
    }

    pub(super) fn safety(&self, raw: RawSafety, instance: &InstanceConfig) -> anyhow::Result<Safety> {
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

    pub(super) fn paths(&self, raw: RawPaths) -> Paths {
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

    pub(super) fn runner(&self, raw: RawRunner) -> anyhow::Result<RunnerConfig> {
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

    pub(super) fn timeouts(&self, raw: RawTimeouts, ssh: &SshConfig) -> anyhow::Result<Timeouts> {
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
pub(super) fn check_tag_key(k: &str) -> Result<(), String> {
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
}
