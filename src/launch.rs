//! Creating one spot instance on the ranked offers: the walk both front ends use (the GitLab
//! `prepare` stage and `aliyun-spot github start`), so they share every rule about it.
//!
//! For each offer, cheapest first ([`crate::selection::walk_offers`]), and once more over the
//! offers ECS gives afresh when every offer failed ([`crate::offers::walk_with_fresh_look`]):
//! - the price limit (`spot.price_limit_factor` × the offer's price, rounded up at the third
//!   decimal, capped by `spot.max_price_per_hour`; an offer above the cap is skipped), none with
//!   `SpotAsPriceGo` ([`crate::selection::price_limit`]);
//! - `AutoReleaseTime` computed when the request is built
//!   ([`crate::stages::prepare::auto_release_time`]), so a slow walk never sends one below ECS's
//!   minimum;
//! - `SpotDuration` from `spot.protection_hours`, the front end's `ClientToken` for the offer, and
//!   more rounds of the client's retries while ECS is busy (the same token makes every repeat
//!   safe) and the front end allows;
//! - the answer classified once, by [`crate::ecs::EcsError::create_action`]: capacity-like errors
//!   go to the next offer (and, unless it was the price limit, put the offer on the stock-out
//!   cooldown), the rest end the walk with one line saying what to fix;
//! - the instance id checked before it reaches paths and shell commands
//!   ([`crate::identity::checked_instance_id`]).
//!
//! Progress lines go to the job log / the action's log through [`Progress`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use time::OffsetDateTime;

use crate::config::Config;
use crate::cooldown::Cooldown;
use crate::ecs::{CreateAction, EcsClient, EcsError, ErrorKind, RunInstancesRequest, SpotStrategy};
use crate::pricing::PerHour;
use crate::retry::{SystemClock, Verdict};
use crate::secret::Secret;
use crate::selection::{self, Attempt, Offer, Shape, WalkResult};
use crate::stages::Progress;

/// What every `RunInstances` of one walk carries besides the offer.
pub struct Template {
    /// `InstanceName`.
    pub instance_name: String,
    /// `HostName`: ECS sets the OS hostname from it (RunInstances request model of the current
    /// SDK); `None` leaves ECS's default.
    pub host_name: Option<String>,
    /// `RamRoleName`: the instance RAM role, if any.
    pub ram_role_name: Option<String>,
    /// `UserData` (the rendered cloud-config).
    pub user_data: Secret<String>,
    /// Tags.
    pub tags: Vec<(String, String)>,
}

/// What the walk asks of the front end that runs it.
pub trait Hooks {
    /// The front end's error type.
    type Error;
    /// Checked before each offer: an error (a signal, a deadline) ends the walk at once.
    fn stop(&mut self) -> Option<Self::Error>;
    /// The front end's deadline: ECS, still busy after the client's own retries, gets more
    /// rounds [`crate::stages::PERSIST_PAUSE`] apart while it allows ([`crate::stages::persist_policy`]).
    fn deadline(&self) -> Instant;
    /// Whether a signal asked the front end to stop: no more rounds then.
    fn cancelled(&self) -> bool;
    /// Waits between those rounds (cut short by a signal).
    fn pause(&self, d: Duration);
    /// The `ClientToken` of the request for this offer.
    fn client_token(&self, offer: &Offer) -> String;
    /// Called just before each `RunInstances` with what is about to be sent (prepare records
    /// it in the job state, so a crash leaves enough to find the instance); an error ends the
    /// walk.
    fn sending(&mut self, sending: &Sending) -> Result<(), Self::Error>;
    /// The walk ended with this error (its text is the one line the user sees).
    fn fail(&self, error: anyhow::Error) -> Self::Error;
    /// Every offer was refused for capacity, each `RunInstances` by an answer of ECS: no
    /// instance can come of this walk, and nothing needs looking for later. A repeated
    /// `ClientToken` is answered with the instance it created ("Ensure idempotence",
    /// <https://help.aliyun.com/document_detail/25693.html>, cited by the `ClientToken` field
    /// of the current SDK's `RunInstancesRequest`), so the refusal of a token's last attempt
    /// holds for its earlier attempts whose answers were lost.
    fn none_created(&mut self);
    /// The end of the "creating the instance failed: …; ECS stayed busy until …" line, for when
    /// the retries stopped while ECS was still busy (e.g. "prepare had to stop, retry the job
    /// later").
    fn busy_hint(&self) -> String;
}

/// One `RunInstances` about to be sent.
pub struct Sending<'a> {
    /// The offer.
    pub offer: &'a Offer,
    /// Its `ClientToken`.
    pub client_token: &'a str,
    /// Its `SpotPriceLimit`, if any.
    pub price_limit: Option<f64>,
}

/// The instance the walk created.
#[derive(Debug, Clone)]
pub struct Created {
    /// The offer it was created on.
    pub offer: Offer,
    /// Its instance id (checked).
    pub instance_id: String,
    /// The `AutoReleaseTime` it was created with.
    pub auto_release: OffsetDateTime,
}

/// Walks the ranked `offers` and creates one instance of `shape` with `template`; see the
/// module documentation for the rules. Offers that ran out of stock on this host within
/// `spot.stock_cooldown` are tried last ([`crate::cooldown`]).
pub fn create_on_offers<H: Hooks>(
    client: &EcsClient,
    config: &Config,
    shape: &Shape,
    offers: Vec<Offer>,
    template: &Template,
    hooks: &mut H,
) -> Result<Created, H::Error> {
    let p = Progress;
    let region = config.region().map_err(|e| hooks.fail(e))?;
    let cooldown = Cooldown::new(&config.paths.cache_dir, config.spot.stock_cooldown);
    let (offers, cold) = crate::cooldown::demote(offers, &cooldown.active(region));
    if !cold.is_empty() {
        p.line(format!(
            "Trying last what ran out of stock on this host in the last {}: {}",
            crate::config::format_duration(config.spot.stock_cooldown),
            cold.iter().map(|o| format!("{} in {}", o.instance_type, o.zone)).collect::<Vec<_>>().join(", ")
        ));
    }
    let strategy: SpotStrategy = config.spot.strategy;
    // When every offer fails, ECS is asked afresh once: the cached catalogue may be stale.
    let walk = crate::offers::walk_with_fresh_look(
        &offers,
        || crate::offers::ranked_afresh(client, config, shape),
        |offer: &Offer| -> Attempt<(String, OffsetDateTime), H::Error> {
            if let Some(e) = hooks.stop() {
                return Attempt::Fatal(e);
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
            let token = hooks.client_token(offer);
            let req = RunInstancesRequest {
                zone_id: offer.zone.clone(),
                instance_type: offer.instance_type.clone(),
                image_id: config.images.get(&shape.arch).cloned().unwrap_or_default(),
                security_group_id: config.network.security_group_id.clone().unwrap_or_default(),
                vswitch_id: offer.vswitch_id.clone().unwrap_or_default(),
                instance_name: template.instance_name.clone(),
                host_name: template.host_name.clone(),
                spot_strategy: strategy,
                spot_price_limit: limit,
                spot_duration: Some(config.spot.protection_hours),
                internet_max_bandwidth_out: config.network.internet_max_bandwidth_out,
                system_disk_category: Some(config.instance.system_disk_category.clone()),
                system_disk_size: Some(config.instance.system_disk_size_gib),
                key_pair_name: config.ssh.key_pair_name.clone(),
                ram_role_name: template.ram_role_name.clone(),
                user_data: Some(template.user_data.clone()),
                tags: template.tags.clone(),
                // Computed for each offer: a slow walk must not bring it under the minimum.
                auto_release_time: Some(crate::stages::prepare::auto_release_time(
                    OffsetDateTime::now_utc(),
                    config.safety.max_lifetime,
                )),
                client_token: token.clone(),
                dry_run: false,
            };
            p.line(format!(
                "Trying {} in {}: {} vCPU, {} GiB, {}{}",
                offer.instance_type,
                offer.zone,
                offer.cores,
                fmt_num(offer.memory_gib),
                PerHour(offer.spot_price, &offer.currency),
                limit.map(|l| format!(" (limit {l:.3})")).unwrap_or_default()
            ));
            if let Err(e) = hooks.sending(&Sending { offer, client_token: &token, price_limit: limit }) {
                return Attempt::Fatal(e);
            }
            // A busy API (throttling, 5xx) gets more rounds of the client's retries while the
            // front end allows: the same ClientToken makes every repeat safe. The policy says
            // when; the front end sleeps, so that its signal cuts the pause short.
            let rounds = crate::stages::persist_policy(hooks.deadline(), Arc::new(SystemClock));
            let mut retry = rounds.start();
            let answer = loop {
                let answer = client.run_instances(&req);
                if !matches!(&answer, Err(e) if e.is_retriable()) || hooks.cancelled() {
                    break answer;
                }
                match retry.after_failure() {
                    Verdict::RetryAfter(pause) => hooks.pause(pause),
                    Verdict::GiveUp => break answer,
                }
            };
            let auto_release = req.auto_release_time.unwrap_or_else(OffsetDateTime::now_utc);
            match answer {
                Ok(ids) => match ids.into_iter().next() {
                    // The id reaches shell commands (the watchdog's markers) and paths.
                    Some(id) => match crate::identity::checked_instance_id(&id) {
                        Ok(_) => Attempt::Created((id, auto_release)),
                        Err(e) => Attempt::Fatal(hooks.fail(e)),
                    },
                    None => {
                        Attempt::Fatal(hooks.fail(anyhow!("RunInstances answered without an instance id")))
                    }
                },
                Err(e) => match e.create_action() {
                    CreateAction::NextOffer => {
                        if !e.code().unwrap_or_default().contains("PriceLimit") {
                            if let Err(err) = cooldown.record(region, &offer.instance_type, &offer.zone) {
                                log::warn!("could not remember the stock-out: {err:#}");
                            }
                        }
                        Attempt::NextOffer(describe_capacity_error(&e))
                    }
                    // Still busy when the front end's deadline (or a signal) ended the retries.
                    CreateAction::Retry => Attempt::Fatal(hooks.fail(anyhow!(
                        "creating the instance failed: {e}; ECS stayed busy until {}",
                        hooks.busy_hint()
                    ))),
                    CreateAction::Stop => Attempt::Fatal(hooks.fail(anyhow!(fatal_create_error(&e)))),
                },
            }
        },
        |line: &str| p.line(line),
    );
    match walk {
        WalkResult::Created { offer, value: (instance_id, auto_release), .. } => {
            Ok(Created { offer, instance_id, auto_release })
        }
        WalkResult::Fatal { error, .. } => Err(error),
        WalkResult::Exhausted { summary, .. } => {
            hooks.none_created();
            Err(hooks
                .fail(anyhow!("no spot capacity: {summary}; retry later, widen the shape, or add zones")))
        }
    }
}

/// How a capacity error reads in the walk's summary (`out of stock (Code)`).
fn describe_capacity_error(e: &EcsError) -> String {
    let code = e.code().unwrap_or("capacity");
    let what = if code.contains("Stock") {
        "out of stock"
    } else if code.contains("PriceLimit") {
        "price limit rejected"
    } else if code.starts_with("QuotaExceed") {
        "quota of this type or zone reached"
    } else if code.contains("Disk") || code.contains("SSD") {
        "system disk category not offered"
    } else if code.contains("InstanceType") || code.contains("ResourceType") {
        "type not offered in this zone"
    } else if code.contains("Zone") {
        "zone not on sale"
    } else {
        "not available"
    };
    format!("{what} ({code})")
}

/// The one line a job log gets when creating stops at once, with what to fix.
fn fatal_create_error(e: &EcsError) -> String {
    let code = e.code().unwrap_or_default();
    let hint = if code == "Zone.NotOpen" {
        "the zone is not opened to this account: remove its vswitch from `network.vswitches` or ask Aliyun to open it"
    } else if code.contains("Balance") || code.contains("Arrearage") {
        "top up the Aliyun account (it has too little balance or an outstanding payment)"
    } else if code.contains("RiskControl") {
        "Aliyun's risk control refused the purchase; contact Aliyun support"
    } else if code == "IdempotentParameterMismatch" {
        "a request with this ClientToken had other parameters; retry the job"
    } else {
        match e.kind() {
            ErrorKind::Auth => "check the AccessKey pair or STS token",
            ErrorKind::Permission => "grant the RAM permissions listed in the README",
            ErrorKind::Quota => "raise the quota or complete the account's verification in the Aliyun console",
            ErrorKind::Parameter if code.contains("SpotPriceLimit") || e.to_string().contains("SpotPriceLimit") => {
                "ECS refused the `SpotPriceLimit` the driver computed (at most three decimals are accepted); report this, and set `spot.strategy = \"SpotAsPriceGo\"` meanwhile"
            }
            ErrorKind::Parameter | ErrorKind::NotFound => {
                "check the image, security group and vswitch settings (`aliyun-spot doctor`)"
            }
            _ => "check the settings named by the error code in Aliyun's RunInstances documentation (`aliyun-spot doctor`)",
        }
    };
    format!("creating the instance failed: {e}; {hint}")
}

/// A size as the progress lines print it: `8`, `0.5`.
pub(crate) fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}
