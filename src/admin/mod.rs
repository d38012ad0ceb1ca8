//! The administrator's `aliyun-spot` commands: `prices`, `instances`, `doctor`.
//!
//! They need only a region and credentials, so they work from the environment alone; output
//! is a table for people or JSON for scripts (`--json`).

pub mod live;
pub mod sweep;

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::{AskedBy, Config, Override, ShapeRequest};
use crate::ecs::{DescribeInstancesFilter, EcsClient, Instance};
use crate::env::Env;
use crate::logging::{stdout_line, stdout_text};
use crate::selection::{Arch, Offer, Shape};
use crate::tags;

/// Bounds from the command line, written as a job writes its `ALIYUN_SPOT_*` variables and
/// decided by the same rule ([`Config::shape_for`]).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ShapeArgs {
    /// Architecture: amd64 (x86_64) or arm64 (aarch64).
    #[arg(long)]
    pub arch: Option<String>,
    /// Minimum vCPUs.
    #[arg(long)]
    pub min_cpu: Option<String>,
    /// Maximum vCPUs.
    #[arg(long)]
    pub max_cpu: Option<String>,
    /// Minimum memory, GiB (`16`, `16G`).
    #[arg(long)]
    pub min_mem: Option<String>,
    /// Maximum memory, GiB.
    #[arg(long)]
    pub max_mem: Option<String>,
}

/// The shape `prices` lists offers for: what a job asking the same bounds gets, within the
/// `[job_overrides]` ceilings (the allow-list is the job's, not the administrator's).
pub fn shape_of(config: &Config, args: &ShapeArgs) -> Result<Shape> {
    let arch: Arch = match &args.arch {
        Some(a) => a.parse().map_err(|e: String| anyhow::anyhow!("--arch: {e}"))?,
        None => config.instance.default_arch,
    };
    let bounds = [
        (Override::MinCpu, &args.min_cpu),
        (Override::MaxCpu, &args.max_cpu),
        (Override::MinMem, &args.min_mem),
        (Override::MaxMem, &args.max_mem),
    ]
    .into_iter()
    .filter_map(|(o, v)| Some((o, v.clone()?)))
    .collect();
    config.shape_for(arch, &ShapeRequest { by: AskedBy::CommandLine, bounds })
}

fn load(config: Option<&Path>) -> Result<(Config, EcsClient)> {
    let env = Env::from_process();
    let config = crate::config::load(config, &env)?;
    let client = crate::selection::offers::client(&config)?;
    Ok((config, client))
}

/// `aliyun-spot prices`: the ranked offers, in every zone (zones without a vswitch included).
/// The runner host's price cache is shared with `prepare`, so the listing is what the next job
/// would see; `fresh` asks ECS directly and leaves the cache alone.
pub fn prices(config_path: Option<&Path>, args: &ShapeArgs, json: bool, fresh: bool) -> Result<()> {
    let (mut config, client) = load(config_path)?;
    if fresh {
        // A zero TTL bypasses the cache without touching its files.
        config.spot.price_cache_ttl = std::time::Duration::ZERO;
    }
    let shape = shape_of(&config, args)?;
    let offers = crate::selection::offers::ranked(&client, &config, &shape, true)?;
    if json {
        stdout_line(&serde_json::to_string_pretty(&offers)?)?;
        return Ok(());
    }
    print_offers(&shape, &offers)
}

fn print_offers(shape: &Shape, offers: &[Offer]) -> Result<()> {
    stdout_line(&format!(
        "{} offers for {} with {}-{} vCPU and {}-{} GiB (cheapest first):",
        offers.len(),
        shape.arch,
        shape.min_cpu,
        shape.max_cpu,
        shape.min_mem_gib,
        shape.max_mem_gib
    ))?;
    // Prices are in the account's currency (`Currency` of DescribeSpotPriceHistory: CNY on the
    // China site, USD on the international one), named in each price column's heading.
    let currency =
        offers.first().map(|o| o.currency.as_str()).unwrap_or(crate::selection::pricing::DEFAULT_CURRENCY);
    stdout_line(&format!(
        "{:<22} {:<16} {:>5} {:>8} {:>11} {:>10} {:>15} {:>9}  VSWITCH",
        "TYPE",
        "ZONE",
        "vCPU",
        "MEM GiB",
        format!("SPOT/h {currency}"),
        format!("PER CORE {currency}"),
        format!("ON-DEMAND/h {currency}"),
        "SAVING"
    ))?;
    for o in offers {
        stdout_line(&format!(
            "{:<22} {:<16} {:>5} {:>8} {:>11.4} {:>10.5} {:>15} {:>9}  {}",
            o.instance_type,
            o.zone,
            o.cores,
            o.memory_gib,
            o.spot_price,
            o.price_per_core,
            o.on_demand_price.map(|p| format!("{p:.4}")).unwrap_or_else(|| "-".into()),
            o.discount.map(crate::selection::pricing::percent_off).unwrap_or_else(|| "-".into()),
            o.vswitch_id.as_deref().unwrap_or("(none: not used)")
        ))?;
    }
    Ok(())
}

/// One managed instance, as `instances --json` prints it.
#[derive(Debug, Serialize)]
pub struct InstanceRow {
    /// Instance id.
    pub id: String,
    /// Instance name.
    pub name: String,
    /// Instance type.
    pub instance_type: String,
    /// Zone.
    pub zone: String,
    /// ECS status.
    pub status: String,
    /// Seconds since creation.
    pub age_seconds: Option<i64>,
    /// Runner id tag.
    pub runner: Option<String>,
    /// Project id tag.
    pub project: Option<String>,
    /// Job id tag.
    pub job: Option<String>,
    /// Spot price limit.
    pub spot_price_limit: Option<f64>,
    /// Public IPs.
    pub public_ips: Vec<String>,
    /// Private IPs.
    pub private_ips: Vec<String>,
    /// Operation locks (`Recycling` when reclaimed).
    pub locks: Vec<String>,
}

impl InstanceRow {
    fn from(i: Instance, now: OffsetDateTime, safety: &crate::config::Safety) -> InstanceRow {
        InstanceRow {
            age_seconds: i.creation_time.map(|c| (now - c).whole_seconds()),
            runner: i.tags.get(&safety.tag_key(tags::RUNNER)).cloned(),
            project: i.tags.get(&safety.tag_key(tags::PROJECT)).cloned(),
            job: i.tags.get(&safety.tag_key(tags::JOB)).cloned(),
            id: i.id,
            name: i.name,
            instance_type: i.instance_type,
            zone: i.zone_id,
            status: i.status,
            spot_price_limit: i.spot_price_limit,
            public_ips: i.public_ips,
            private_ips: i.private_ips,
            locks: i.operation_locks,
        }
    }
}

/// The managed instances of the configured region.
pub fn managed_instances(config: &Config, client: &EcsClient) -> Result<Vec<Instance>> {
    let filter = DescribeInstancesFilter {
        tags: vec![(config.safety.managed_tag_key.clone(), config.safety.managed_tag_value.clone())],
        ..Default::default()
    };
    client.describe_instances(&filter).context("failed to list managed instances")
}

/// `aliyun-spot instances`.
pub fn instances(config_path: Option<&Path>, json: bool) -> Result<()> {
    let (config, client) = load(config_path)?;
    let now = OffsetDateTime::now_utc();
    let rows: Vec<InstanceRow> = managed_instances(&config, &client)?
        .into_iter()
        .map(|i| InstanceRow::from(i, now, &config.safety))
        .collect();
    if json {
        stdout_line(&serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    stdout_line(&format!("{} managed instance(s) in {}", rows.len(), config.region()?))?;
    if rows.is_empty() {
        return Ok(());
    }
    stdout_line(&format!(
        "{:<24} {:<36} {:<20} {:<16} {:<9} {:>8} {:<8} {:<8} IP",
        "ID", "NAME", "TYPE", "ZONE", "STATUS", "AGE", "PROJECT", "JOB"
    ))?;
    for r in rows {
        stdout_line(&format!(
            "{:<24} {:<36} {:<20} {:<16} {:<9} {:>8} {:<8} {:<8} {}",
            r.id,
            r.name,
            r.instance_type,
            r.zone,
            if r.locks.is_empty() {
                r.status.clone()
            } else {
                format!("{}({})", r.status, r.locks.join(","))
            },
            r.age_seconds
                .map(|s| crate::config::format_duration(std::time::Duration::from_secs(s.max(0) as u64)))
                .unwrap_or_default(),
            r.project.unwrap_or_default(),
            r.job.unwrap_or_default(),
            r.public_ips.first().or(r.private_ips.first()).cloned().unwrap_or_default()
        ))?;
    }
    Ok(())
}

/// `aliyun-spot doctor`: checks what prepare will need, creating nothing.
pub fn doctor(config_path: Option<&Path>) -> Result<()> {
    let (config, client) = load(config_path)?;
    let mut failures = 0;
    let mut check = |what: &str, r: Result<String>| match r {
        Ok(detail) => stdout_line(&format!("ok    {what}: {detail}")),
        Err(e) => {
            failures += 1;
            stdout_line(&format!("FAIL  {what}: {}", crate::exit::one_line(&e)))
        }
    };
    check(
        "configuration",
        config.require_for_api().map(|_| format!("region {}", config.region().unwrap_or("?"))),
    )?;
    check(
        "credentials and region",
        client
            .describe_zones()
            .map(|z| format!("{} zones visible ({})", z.len(), client.credentials_source()))
            .map_err(Into::into),
    )?;
    for (arch, image) in &config.images {
        check(
            &format!("{arch} image"),
            client.describe_images(std::slice::from_ref(image)).map_err(anyhow::Error::from).and_then(
                |imgs| match imgs.first() {
                    Some(i) => Ok(format!("{} ({})", image, i.architecture.clone().unwrap_or_default())),
                    None => anyhow::bail!("image `{image}` not found in {}", client.region_id()),
                },
            ),
        )?;
    }
    if let Some(sg) = &config.network.security_group_id {
        check(
            "security group",
            client
                .describe_security_groups(std::slice::from_ref(sg), None)
                .map_err(anyhow::Error::from)
                .and_then(|g| match g.first() {
                    Some(g) => {
                        Ok(format!("{} in {}", g.security_group_id, g.vpc_id.clone().unwrap_or_default()))
                    }
                    None => anyhow::bail!("security group `{sg}` not found"),
                }),
        )?;
    }
    let arch = config.instance.default_arch;
    check(
        "prepare settings",
        config.require_for_prepare(arch).map(|_| format!("{arch} jobs can be prepared")),
    )?;
    let offers = crate::selection::offers::ranked(&client, &config, &config.default_job_shape(arch), false);
    let first = offers.as_ref().ok().and_then(|o| o.first().cloned());
    check(
        "spot offers",
        offers.map(|o| match o.first() {
            Some(b) => format!(
                "{} offers; cheapest {} in {} at {}",
                o.len(),
                b.instance_type,
                b.zone,
                crate::selection::pricing::PerHour(b.spot_price, &b.currency)
            ),
            None => "none fit the default shape".to_string(),
        }),
    )?;
    if let Some(offer) = first {
        // RunInstances with DryRun proves permissions, image, group and vswitch fit together.
        let req = crate::ecs::RunInstancesRequest {
            zone_id: offer.zone.clone(),
            instance_type: offer.instance_type.clone(),
            image_id: config.images.get(&arch).cloned().unwrap_or_default(),
            security_group_id: config.network.security_group_id.clone().unwrap_or_default(),
            vswitch_id: offer.vswitch_id.clone().unwrap_or_default(),
            instance_name: "aliyun-spot-doctor".to_string(),
            host_name: None,
            spot_strategy: config.spot.strategy,
            spot_price_limit: crate::selection::price_limit(
                offer.spot_price,
                config.spot.price_limit_factor,
                None,
            ),
            spot_duration: Some(config.spot.protection_hours),
            internet_max_bandwidth_out: config.network.internet_max_bandwidth_out,
            system_disk_category: Some(config.instance.system_disk_category.clone()),
            system_disk_size: Some(config.instance.system_disk_size_gib),
            key_pair_name: config.ssh.key_pair_name.clone(),
            ram_role_name: config.self_destruct.instance_role(&config.instance),
            user_data: None,
            tags: vec![(config.safety.managed_tag_key.clone(), config.safety.managed_tag_value.clone())],
            auto_release_time: Some(crate::stages::prepare::auto_release_time(
                OffsetDateTime::now_utc(),
                config.safety.max_lifetime,
            )),
            client_token: format!("doctor-{}", uuid::Uuid::new_v4()),
            dry_run: true,
        };
        check(
            "RunInstances (DryRun)",
            client.run_instances(&req).map(|_| "allowed".to_string()).map_err(Into::into),
        )?;
    }
    if config.safety.watchdog && config.self_destruct.hands_over() {
        // A real AssumeRole, with a session policy naming an instance that cannot exist.
        check(
            "watchdog role (STS AssumeRole)",
            crate::sts::assume_role(&config, "i-doctor", "doctor")
                .map(|c| format!("assumed ({})", crate::credentials::mask_key_id(&c.access_key_id))),
        )?;
    }
    stdout_text(&crate::ram_policy::render(&config))?;
    if failures > 0 {
        anyhow::bail!("{failures} check(s) failed");
    }
    stdout_line("all checks passed")?;
    Ok(())
}
