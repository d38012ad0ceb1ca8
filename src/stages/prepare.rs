//! `prepare_exec`: choose the cheapest suitable spot offer, create the instance, wait until
//! SSH answers, and record the job state.
//!
//! The order of events is what makes a crash at any point recoverable by `cleanup`:
//! 1. the job state is written (phase `Creating`, with the per-job keys) before any API call
//!    that could create something;
//! 2. every instance is created with tags naming runner, project, job and the attempt's
//!    binding, and a `ClientToken` derived from those, the attempt and the offer, so a retried
//!    `RunInstances` cannot create a second instance and `cleanup` can find it without local
//!    state;
//! 3. the instance id is written to the state the moment `RunInstances` answers;
//! 4. a prepare that gives up (timeout, signal, SSH never ready) deletes what it created before
//!    it exits, and `AutoReleaseTime` plus the in-instance watchdog cover a `SIGKILL`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use time::OffsetDateTime;

use super::{cost, Context, Progress};
use crate::cooldown::Cooldown;
use crate::ecs::{CreateAction, EcsError, ErrorKind, Instance, RunInstancesRequest, SpotStrategy};
use crate::exit::StageError;
use crate::pricing::PerHour;
use crate::selection::{self, Attempt as WalkAttempt, Offer, WalkResult};
use crate::ssh::{self, SshError, SshTarget};
use crate::state::{JobKey, JobState, Phase, STATE_VERSION};

/// Runs the prepare stage.
pub fn run(ctx: &Context) -> Result<(), StageError> {
    let p = Progress;
    let started = Instant::now();
    let deadline = started + ctx.config.timeouts.prepare;
    let _lock = ctx.lock_job()?;

    // (`config_exec` is optional in gitlab-runner, so the settings are checked here too.)
    ctx.config.require_for_prepare(ctx.spec.shape.arch)?;
    if let Some(line) = ctx.identity.disagreement(&ctx.env) {
        p.line(line);
    }
    release_earlier_attempts(ctx)?;

    let shape = &ctx.spec.shape;
    p.line(format!(
        "Looking for an {} spot instance with {}-{} vCPU and {}-{} GiB in {}",
        shape.arch,
        shape.min_cpu,
        shape.max_cpu,
        fmt_num(shape.min_mem_gib),
        fmt_num(shape.max_mem_gib),
        ctx.region
    ));

    // 1. Keys and the state, before anything can be created.
    let ssh_keys = ctx.job_keys()?;
    let mut state = JobState {
        version: STATE_VERSION,
        runner_id: ctx.key.runner_id.clone(),
        project_id: ctx.key.project_id.clone(),
        job_id: ctx.key.job_id.clone(),
        binding: ctx.key.binding.clone(),
        token_digest: ctx.identity.token_digest.clone(),
        pipeline_id: ctx.identity.pipeline_id.clone(),
        client_token: String::new(),
        region: ctx.region.clone(),
        phase: Phase::Creating,
        instance_id: None,
        instance_type: String::new(),
        zone: String::new(),
        spot_price: None,
        currency: crate::pricing::DEFAULT_CURRENCY.to_string(),
        price_limit: None,
        arch: shape.arch,
        ip: None,
        ssh_port: ctx.config.ssh.port,
        ssh_user: ctx.config.ssh.user.clone(),
        host_public_key: ssh_keys.host.public_openssh.clone(),
        created_at: OffsetDateTime::now_utc(),
        ready_at: None,
        released_at: None,
        instance_created_at: None,
        attempt_id: ctx.attempt_id(),
    };
    ctx.store.save(&ctx.key, &state)?;
    if let Some(private) = &ssh_keys.client_private_to_store {
        ctx.store.save_private_key(&ctx.key, private)?;
    }

    // 2. Offers, cheapest first.
    let offers = super::ranked_offers(ctx, shape)?;
    if offers.is_empty() {
        return Err(StageError::system(format!(
            "no spot offer fits this job: no {} instance type with {}-{} vCPU and {}-{} GiB is sold as spot in a zone with a configured vswitch ({}); widen the shape or add vswitches",
            shape.arch,
            shape.min_cpu,
            shape.max_cpu,
            fmt_num(shape.min_mem_gib),
            fmt_num(shape.max_mem_gib),
            ctx.config.network.vswitches.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let best = &offers[0];
    p.line(format!(
        "Found {} offers; cheapest: {} in {} ({} vCPU, {} GiB) at {}",
        offers.len(),
        best.instance_type,
        best.zone,
        best.cores,
        fmt_num(best.memory_gib),
        PerHour(best.spot_price, &best.currency)
    ));

    // Offers that just ran out of stock for an earlier job on this host go last.
    let cooldown = Cooldown::new(&ctx.config.paths.cache_dir, ctx.config.spot.stock_cooldown);
    let (offers, cold) = crate::cooldown::demote(offers, &cooldown.active(&ctx.region));
    if !cold.is_empty() {
        p.line(format!(
            "Trying last what ran out of stock on this host in the last {}: {}",
            crate::config::format_duration(ctx.config.spot.stock_cooldown),
            cold.iter().map(|o| format!("{} in {}", o.instance_type, o.zone)).collect::<Vec<_>>().join(", ")
        ));
    }

    // 3. Create, walking the offers.
    let created_at = OffsetDateTime::now_utc();
    let user_data = ctx.cloud_config(&ssh_keys, created_at).render()?.text;
    // When every offer fails, ECS is asked afresh once: the cached catalogue may be stale.
    let walk = crate::offers::walk_with_fresh_look(
        &offers,
        || crate::offers::ranked_afresh(&ctx.client, &ctx.config, shape),
        |offer: &Offer| -> WalkAttempt<(String, OffsetDateTime), StageError> {
            if ctx.terminated() {
                return WalkAttempt::Fatal(StageError::system(
                    "prepare was terminated (SIGTERM) before an instance was created",
                ));
            }
            if Instant::now() >= deadline {
                return WalkAttempt::Fatal(StageError::system(format!(
                    "prepare timed out after {}s while creating an instance; raise `timeouts.prepare`",
                    started.elapsed().as_secs()
                )));
            }
            let strategy: SpotStrategy = ctx.config.spot.strategy;
            let limit = match strategy {
                SpotStrategy::SpotAsPriceGo => None,
                _ => match selection::price_limit(
                    offer.spot_price,
                    ctx.config.spot.price_limit_factor,
                    ctx.config.spot.max_price_per_hour,
                ) {
                    Some(l) => Some(l),
                    None => {
                        return WalkAttempt::NextOffer(selection::above_cap_reason(
                            ctx.config.spot.max_price_per_hour.unwrap_or_default(),
                            &offer.currency,
                        ))
                    }
                },
            };
            let token = client_token(&ctx.key, &state.attempt_id, offer);
            let req = RunInstancesRequest {
                zone_id: offer.zone.clone(),
                instance_type: offer.instance_type.clone(),
                image_id: ctx.config.images.get(&shape.arch).cloned().unwrap_or_default(),
                security_group_id: ctx.config.network.security_group_id.clone().unwrap_or_default(),
                vswitch_id: offer.vswitch_id.clone().unwrap_or_default(),
                instance_name: ctx.instance_name(created_at),
                host_name: None,
                spot_strategy: strategy,
                spot_price_limit: limit,
                spot_duration: Some(ctx.config.spot.protection_hours),
                internet_max_bandwidth_out: ctx.config.network.internet_max_bandwidth_out,
                system_disk_category: Some(ctx.config.instance.system_disk_category.clone()),
                system_disk_size: Some(ctx.config.instance.system_disk_size_gib),
                key_pair_name: ctx.config.ssh.key_pair_name.clone(),
                ram_role_name: ctx.config.self_destruct.instance_role(&ctx.config.instance),
                user_data: Some(user_data.clone()),
                tags: ctx.tags(),
                // Computed for each offer: a slow walk must not bring it under the minimum.
                auto_release_time: Some(auto_release_time(
                    OffsetDateTime::now_utc(),
                    ctx.config.safety.max_lifetime,
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
            state.client_token = token;
            state.instance_type = offer.instance_type.clone();
            state.zone = offer.zone.clone();
            state.spot_price = Some(offer.spot_price);
            state.currency = offer.currency.clone();
            state.price_limit = limit;
            if let Err(e) = ctx.store.save(&ctx.key, &state) {
                return WalkAttempt::Fatal(StageError::System(e));
            }
            // A busy API (throttling, 5xx) gets more rounds of the client's retries while the
            // prepare deadline allows: the same ClientToken makes every repeat safe.
            let mut answer = ctx.client.run_instances(&req);
            while matches!(&answer, Err(e) if e.is_retriable())
                && Instant::now() + super::PERSIST_PAUSE < deadline
                && !ctx.terminated()
            {
                ctx.sleep(super::PERSIST_PAUSE);
                answer = ctx.client.run_instances(&req);
            }
            let auto_release = req.auto_release_time.unwrap_or(created_at);
            match answer {
                Ok(ids) => match ids.into_iter().next() {
                    // The id reaches shell commands (the watchdog's markers) and paths.
                    Some(id) => match crate::identity::checked_instance_id(&id) {
                        Ok(_) => WalkAttempt::Created((id, auto_release)),
                        Err(e) => WalkAttempt::Fatal(StageError::System(e)),
                    },
                    None => {
                        WalkAttempt::Fatal(StageError::system("RunInstances answered without an instance id"))
                    }
                },
                Err(e) => match e.create_action() {
                    CreateAction::NextOffer => {
                        if !e.code().unwrap_or_default().contains("PriceLimit") {
                            if let Err(err) = cooldown.record(&ctx.region, &offer.instance_type, &offer.zone) {
                                log::warn!("could not remember the stock-out: {err:#}");
                            }
                        }
                        WalkAttempt::NextOffer(describe_capacity_error(&e))
                    }
                    // Still busy when the deadline (or a signal) ended the retries.
                    CreateAction::Retry => WalkAttempt::Fatal(StageError::system(format!(
                        "creating the instance failed: {e}; ECS stayed busy until prepare had to stop, retry the job later"
                    ))),
                    CreateAction::Stop => WalkAttempt::Fatal(StageError::system(fatal_create_error(&e))),
                },
            }
        },
        |line: &str| p.line(line),
    );

    let (created, (id, auto_release)) = match walk {
        WalkResult::Created { offer, value, .. } => (offer, value),
        // The state stays: a RunInstances whose answer was lost may still have created an
        // instance, and cleanup looks for it by tag.
        WalkResult::Fatal { error, .. } => return Err(error),
        WalkResult::Exhausted { summary, .. } => {
            return Err(StageError::system(format!(
                "no spot capacity: {summary}; retry later, widen the shape, or add zones"
            )));
        }
    };
    state.instance_id = Some(id.clone());
    state.phase = Phase::Created;
    state.instance_created_at = Some(OffsetDateTime::now_utc());
    // 4. Record the id at once: from here on a crash is cleaned up from the state.
    ctx.store.save(&ctx.key, &state)?;
    p.line(format!(
        "Created spot instance {id} ({} in {}, {}, auto-release at {})",
        created.instance_type,
        created.zone,
        PerHour(created.spot_price, &created.currency),
        cost::format_time(auto_release)
    ));

    // gitlab-runner's helper is checked or installed once, over the pinned session
    // (`crate::helper`); failing that releases the instance like any failed prepare.
    let ready = wait_until_ready(ctx, &mut state, &id, &ssh_keys, started, deadline)
        .and_then(|target| crate::helper::prepare_instance(ctx, &target));
    match ready {
        Ok(()) => {
            p.line(format!(
                "Instance {id} is ready after {}s: {}@{}:{}",
                started.elapsed().as_secs(),
                state.ssh_user,
                state.ip.clone().unwrap_or_default(),
                state.ssh_port
            ));
            Ok(())
        }
        Err(e) => {
            // Give up cleanly: a prepare that fails deletes what it created.
            p.line(format!("Releasing instance {id} because prepare failed"));
            match super::delete_instance(ctx, &id, state.instance_created_at) {
                Ok(()) => {
                    let _ = ctx.store.remove(&ctx.key);
                }
                Err(del) => p.line(format!(
                    "WARNING: could not release {id} now ({}); cleanup will retry",
                    crate::exit::one_line(&anyhow!("{del}"))
                )),
            }
            Err(e)
        }
    }
}

/// Releases what earlier preparation attempts of this job left (their cleanup did not finish),
/// so a retried prepare never adds a second paid machine: this attempt's own state (a prepare
/// run twice) and every other attempt's state of the same runner, project and job whose job
/// token digest equals this one's, i.e. that is provably the same job. An instance is found by
/// the state and by the attempt's tags (its `RunInstances` may have been in flight). Anything
/// else is left alone: another job's instance is never released here.
fn release_earlier_attempts(ctx: &Context) -> Result<(), StageError> {
    let p = Progress;
    let mut earlier: Vec<(JobKey, Option<JobState>)> = Vec::new();
    if let Some(own) = ctx.store.load(&ctx.key).unwrap_or(None) {
        earlier.push((ctx.key.clone(), Some(own)));
    }
    for listed in ctx.store.other_attempts(&ctx.key)? {
        match listed.state {
            Ok(s)
                if s.token_digest == ctx.identity.token_digest
                    && crate::identity::is_binding(&s.binding)
                    && ctx.store.job_dir(&s.key()) == listed.dir =>
            {
                earlier.push((s.key(), Some(s)))
            }
            Ok(_) => log::info!("leaving `{}` alone: not an attempt of this job", listed.dir.display()),
            Err(e) => log::warn!("leaving `{}` alone: {e:#}", listed.dir.display()),
        }
    }
    for (key, state) in earlier {
        // That attempt's cleanup may still be running; wait for it.
        let _lock = if key == ctx.key {
            None
        } else {
            Some(crate::fsutil::FileLock::exclusive(&ctx.store.job_dir(&key).join(".lock"))?)
        };
        let (old_id, old_created) = state.map_or((None, None), |s| (s.instance_id, s.instance_created_at));
        let mut ids: Vec<String> = old_id.iter().cloned().collect();
        ids.extend(ctx.find_instances_of(&key)?.into_iter().map(|i| i.id));
        ids.sort();
        ids.dedup();
        for id in &ids {
            p.line(format!("Releasing instance {id} left by an earlier attempt of this job"));
            // A NotFound just after creation is "not visible yet" only for the recorded instance.
            let created = old_created.filter(|_| old_id.as_deref() == Some(id.as_str()));
            super::delete_instance(ctx, id, created)?;
        }
        ctx.store.remove(&key)?;
    }
    Ok(())
}

/// Waits for `Running`, an address, and an SSH login that sees the pinned host key; returns
/// the pinned target.
fn wait_until_ready(
    ctx: &Context,
    state: &mut JobState,
    id: &str,
    keys: &super::JobKeys,
    started: Instant,
    deadline: Instant,
) -> Result<SshTarget, StageError> {
    let p = Progress;
    let boot_deadline = deadline.min(Instant::now() + ctx.config.ssh.boot_timeout);
    let mut delay = Duration::from_millis(500);
    let mut last_report = Instant::now();
    let instance: Instance = loop {
        if ctx.terminated() {
            return Err(StageError::system(format!(
                "prepare was terminated (SIGTERM) while {id} was booting"
            )));
        }
        match ctx.client.describe_instance(id) {
            Ok(Some(inst)) if inst.status == "Running" => break inst,
            Ok(Some(inst)) if super::is_reclaimed(&inst) => {
                return Err(StageError::system(format!(
                    "spot instance {id} was reclaimed by Aliyun while booting; the job can be retried"
                )))
            }
            Ok(Some(_)) => {}
            // Not visible yet right after RunInstances (eventual consistency).
            Ok(None) if super::just_created(state.instance_created_at) => {}
            Ok(None) => {
                return Err(StageError::system(format!(
                    "instance {id} disappeared while booting (released or reclaimed by Aliyun)"
                )))
            }
            Err(e) => log::warn!("could not poll {id}: {e}"),
        }
        if Instant::now() >= boot_deadline {
            return Err(StageError::system(format!(
                "instance {id} did not reach Running within {}s; raise `ssh.boot_timeout` or try another type",
                started.elapsed().as_secs()
            )));
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            p.line(format!("Waiting for instance {id} to boot ({}s)", started.elapsed().as_secs()));
            last_report = Instant::now();
        }
        // Jittered, so many jobs starting together do not poll ECS in lockstep.
        ctx.sleep(delay.mul_f64(0.75 + rand::random::<f64>() * 0.5));
        delay = (delay * 2).min(Duration::from_secs(5));
    };
    let ip = ctx.address_of(&instance).ok_or_else(|| {
        StageError::system(format!("instance {id} is Running but has no usable IP address"))
    })?;
    state.ip = Some(ip.clone());
    ctx.store.save(&ctx.key, state)?;
    p.line(format!("Instance {id} is running at {ip}; waiting for SSH"));

    let target = SshTarget {
        host: ip,
        port: ctx.config.ssh.port,
        user: ctx.config.ssh.user.clone(),
        private_key: keys.client_private.clone(),
        host_key: keys.host.public_openssh.clone(),
        connect_timeout: ctx.config.ssh.connect_timeout,
    };
    // Short rounds, so a SIGTERM is noticed within seconds.
    let mut last = Instant::now();
    loop {
        let round = boot_deadline.min(Instant::now() + Duration::from_secs(5));
        let res = ssh::wait_until_ready(&target, round, &mut |_elapsed| {
            if last.elapsed() >= Duration::from_secs(10) {
                Progress.line(format!("Waiting for SSH on {id} ({}s)", started.elapsed().as_secs()));
                last = Instant::now();
            }
        });
        match res {
            Ok(()) => break,
            Err(e @ (SshError::HostKeyMismatch { .. } | SshError::Config { .. })) => {
                return Err(StageError::System(anyhow!(e).context(format!("SSH on {id} cannot be trusted"))))
            }
            Err(e) if Instant::now() >= boot_deadline => {
                return Err(StageError::System(anyhow!(e).context(format!(
                    "SSH on {id} did not become ready within {}s; check that the security group allows port {} from this host",
                    started.elapsed().as_secs(),
                    ctx.config.ssh.port
                ))))
            }
            Err(_) if ctx.terminated() => break,
            Err(_) => {}
        }
    }
    if ctx.terminated() {
        return Err(StageError::system(format!(
            "prepare was terminated (SIGTERM) while waiting for SSH on {id}"
        )));
    }
    crate::sts::hand_over_at_prepare(ctx, &target, id);
    state.phase = Phase::Ready;
    state.ready_at = Some(OffsetDateTime::now_utc());
    ctx.store.save(&ctx.key, state).context("failed to record the ready instance")?;
    Ok(target)
}

/// `ClientToken`: the same for a retry of the same request, different for every runner,
/// project, job, preparation attempt (its secret's binding and temporary directory) and offer
/// (ASCII, at most 64 characters).
pub fn client_token(key: &JobKey, attempt: &str, offer: &Offer) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        &key.runner_id,
        &key.project_id,
        &key.job_id,
        &key.binding,
        attempt,
        &offer.instance_type,
        &offer.zone,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(24).map(|b| format!("{b:02x}")).collect();
    format!("ase-{hex}")
}

/// How far ahead `AutoReleaseTime` must be at least. RunInstances documents the parameter as
/// UTC `yyyy-MM-ddTHH:mm:ssZ`, "at least 30 minutes later than the current time and at most
/// three years", and rounds a time with seconds down to the minute
/// (<https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-runinstances>,
/// parameter `AutoReleaseTime`; the legacy SDK's `RunInstancesRequest.set_AutoReleaseTime`
/// sends it as given).
pub const AUTO_RELEASE_MINIMUM: Duration = Duration::from_secs(30 * 60);
/// Added to [`AUTO_RELEASE_MINIMUM`]: clock skew and the time the request takes to arrive.
pub const AUTO_RELEASE_MARGIN: Duration = Duration::from_secs(5 * 60);

/// `AutoReleaseTime` for a `RunInstances` sent at `now`: `now + max_lifetime`, at least
/// [`AUTO_RELEASE_MINIMUM`] plus [`AUTO_RELEASE_MARGIN`] ahead, rounded up to the whole minute
/// (ECS would round seconds down, shortening the lifetime below what was checked).
pub fn auto_release_time(now: OffsetDateTime, max_lifetime: Duration) -> OffsetDateTime {
    let ahead = max_lifetime.max(AUTO_RELEASE_MINIMUM + AUTO_RELEASE_MARGIN);
    let t = now + ahead;
    let floor = t.replace_second(0).and_then(|x| x.replace_nanosecond(0)).unwrap_or(t);
    if floor == t {
        t
    } else {
        floor + time::Duration::minutes(1)
    }
}

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

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn auto_release_is_rounded_up_and_far_enough_ahead() {
        let now = datetime!(2025-06-01 10:00:20.5 UTC);
        assert_eq!(auto_release_time(now, Duration::from_secs(3 * 3600)), datetime!(2025-06-01 13:01 UTC));
        // A lifetime at the minimum gets the margin.
        assert_eq!(auto_release_time(now, AUTO_RELEASE_MINIMUM), datetime!(2025-06-01 10:36 UTC));
        let whole = datetime!(2025-06-01 10:00 UTC);
        assert_eq!(auto_release_time(whole, Duration::from_secs(3600)), datetime!(2025-06-01 11:00 UTC));
    }
}
