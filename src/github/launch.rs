//! Creating the runner's instance with prepare's rules: the ranked offers, stock-out cooldown,
//! the 1.2× price limit (or the configured cap), `selection::walk_offers` with its fallback on
//! capacity errors, a `ClientToken` per attempt and offer, `AutoReleaseTime`.
//!
//! Prepare's walk callback is written against the GitLab stage `Context` (job state, SSH keys),
//! so this adapter repeats its request-building part without them; both should move to one
//! shared `create_on_offers` in `crate::stages::prepare` (docs/github-actions.md, "Design
//! notes").

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, Result};
use time::OffsetDateTime;

use crate::config::Config;
use crate::cooldown::Cooldown;
use crate::ecs::{EcsClient, ErrorKind, RunInstancesRequest, SpotStrategy};
use crate::secret::Secret;
use crate::selection::{self, Attempt, Offer, Shape, WalkResult};
use crate::stages::prepare::{client_token, describe_capacity_error, fatal_create_error};
use crate::stages::Progress;

/// One instance to create.
pub struct Launch<'a> {
    /// Configuration.
    pub config: &'a Config,
    /// ECS client.
    pub client: &'a EcsClient,
    /// The shape (arch and bounds).
    pub shape: &'a Shape,
    /// Instance name.
    pub name: String,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// The instance RAM role, if any.
    pub ram_role: Option<String>,
    /// Rendered user data.
    pub user_data: Secret<String>,
    /// What makes the `ClientToken`s of this start unique (runner name).
    pub token_seed: String,
    /// Set by SIGTERM/SIGINT.
    pub cancel: &'a AtomicBool,
}

/// Walks the offers; returns the offer and the new instance's id.
pub fn create(l: &Launch) -> Result<(Offer, String)> {
    let p = Progress;
    let config = l.config;
    let region = config.region()?.to_string();
    let offers = crate::offers::ranked(l.client, config, l.shape, false)?;
    if offers.is_empty() {
        anyhow::bail!(
            "no spot offer fits: no {} instance type with {}-{} vCPU and {}-{} GiB is sold as spot in a zone with a configured vswitch; widen the shape or add vswitches",
            l.shape.arch,
            l.shape.min_cpu,
            l.shape.max_cpu,
            l.shape.min_mem_gib,
            l.shape.max_mem_gib
        );
    }
    let cooldown = Cooldown::new(&config.paths.cache_dir, config.spot.stock_cooldown);
    let (offers, _cold) = crate::cooldown::demote(offers, &cooldown.active(&region));
    let auto_release = OffsetDateTime::now_utc() + config.safety.max_lifetime;
    let strategy: SpotStrategy = config.spot.strategy.into();
    let token_key = crate::state::JobKey {
        runner_id: "github".into(),
        project_id: l.token_seed.clone(),
        job_id: "start".into(),
        binding: String::new(),
    };
    let walk = selection::walk_offers(
        &offers,
        |offer: &Offer| -> Attempt<String, anyhow::Error> {
            if l.cancel.load(Ordering::SeqCst) {
                return Attempt::Fatal(anyhow!("terminated by a signal before an instance was created"));
            }
            let limit = match strategy {
                SpotStrategy::SpotAsPriceGo => None,
                _ => match selection::price_limit(
                    offer.spot_price,
                    config.spot.price_limit_factor,
                    config.spot.max_price_per_hour,
                ) {
                    Some(l) => Some(l),
                    None => {
                        return Attempt::NextOffer(selection::above_cap_reason(
                            config.spot.max_price_per_hour.unwrap_or_default(),
                            &offer.currency,
                        ))
                    }
                },
            };
            let req = RunInstancesRequest {
                zone_id: offer.zone.clone(),
                instance_type: offer.instance_type.clone(),
                image_id: config.images.get(&l.shape.arch).cloned().unwrap_or_default(),
                security_group_id: config.network.security_group_id.clone().unwrap_or_default(),
                vswitch_id: offer.vswitch_id.clone().unwrap_or_default(),
                instance_name: l.name.clone(),
                host_name: None,
                spot_strategy: strategy,
                spot_price_limit: limit,
                spot_duration: Some(0),
                internet_max_bandwidth_out: config.network.internet_max_bandwidth_out,
                system_disk_category: Some(config.instance.system_disk_category.clone()),
                system_disk_size: Some(config.instance.system_disk_size_gib),
                key_pair_name: config.ssh.key_pair_name.clone(),
                ram_role_name: l.ram_role.clone(),
                user_data: Some(l.user_data.clone()),
                tags: l.tags.clone(),
                auto_release_time: Some(auto_release),
                client_token: client_token(&token_key, "start", offer),
                dry_run: false,
            };
            p.line(format!(
                "Trying {} in {}: {} vCPU, {} GiB, {:.4} CNY/hour{}",
                offer.instance_type,
                offer.zone,
                offer.cores,
                offer.memory_gib,
                offer.spot_price,
                limit.map(|l| format!(" (limit {l:.4})")).unwrap_or_default()
            ));
            match l.client.run_instances(&req) {
                Ok(ids) => match ids.into_iter().next() {
                    Some(id) => Attempt::Created(id),
                    None => Attempt::Fatal(anyhow!("RunInstances answered without an instance id")),
                },
                Err(e) if e.kind() == ErrorKind::NoCapacity => {
                    if !e.code().unwrap_or_default().contains("PriceLimit") {
                        if let Err(err) = cooldown.record(&region, &offer.instance_type, &offer.zone) {
                            log::warn!("could not remember the stock-out: {err:#}");
                        }
                    }
                    Attempt::NextOffer(describe_capacity_error(&e))
                }
                Err(e) => Attempt::Fatal(anyhow!(fatal_create_error(&e))),
            }
        },
        |line: &str| p.line(line),
    );
    match walk {
        WalkResult::Created { offer, value, .. } => Ok((offer, value)),
        WalkResult::Fatal { error, .. } => Err(error),
        WalkResult::Exhausted { summary, .. } => {
            anyhow::bail!("no spot capacity: {summary}; retry later, widen the shape, or add zones")
        }
    }
}
