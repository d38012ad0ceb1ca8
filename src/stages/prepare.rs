//! `prepare_exec`: choose the cheapest suitable spot offer, create the instance, wait until
//! SSH answers, and record the job state.
//!
//! The order of events is what makes a crash at any point recoverable by `cleanup`:
//! 1. the job state is written (phase `Creating`, with the per-job keys) before any API call
//!    that could create something;
//! 2. every instance is created with tags naming runner, project and job, and a `ClientToken`
//!    derived from runner, job, preparation attempt and offer, so a retried `RunInstances`
//!    cannot create a second instance and `cleanup` can find it without local state;
//! 3. the instance id is written to the state the moment `RunInstances` answers;
//! 4. a prepare that gives up (timeout, signal, SSH never ready) deletes what it created before
//!    it exits, and `AutoReleaseTime` plus the in-instance watchdog cover a `SIGKILL`.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use time::OffsetDateTime;

use super::{cost, Context, Progress};
use crate::cooldown::Cooldown;
use crate::ecs::{EcsError, ErrorKind, Instance, RunInstancesRequest, SpotStrategy};
use crate::exit::StageError;
use crate::selection::{self, Attempt as WalkAttempt, Offer, WalkResult};
use crate::ssh::{self, SshError, SshTarget};
use crate::state::{JobState, Phase, STATE_VERSION};

/// Runs the prepare stage.
pub fn run(ctx: &Context) -> Result<(), StageError> {
    let p = Progress;
    let started = Instant::now();
    let deadline = started + ctx.config.timeouts.prepare;
    let _lock = ctx.lock_job()?;

    // A state left by an earlier attempt of this job means its cleanup did not finish: release
    // that instance first, so a retried prepare never adds a second paid machine.
    // (`config_exec` is optional in gitlab-runner, so the settings are checked here too.)
    ctx.config.require_for_prepare(ctx.spec.shape.arch)?;
    if let Some(old) = ctx.store.load(&ctx.key).unwrap_or(None) {
        let mut ids: Vec<String> = old.instance_id.into_iter().collect();
        // Its RunInstances may have been in flight: the tags find what the state could not.
        ids.extend(ctx.find_job_instances()?.into_iter().map(|i| i.id));
        ids.sort();
        ids.dedup();
        for id in &ids {
            p.line(format!("Releasing instance {id} left by an earlier attempt of this job"));
            super::delete_instance(ctx, id)?;
        }
        ctx.store.remove(&ctx.key)?;
    }

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
        pipeline_id: ctx.job.pipeline_id.clone(),
        client_token: String::new(),
        region: ctx.region.clone(),
        phase: Phase::Creating,
        instance_id: None,
        instance_type: String::new(),
        zone: String::new(),
        spot_price: None,
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
        "Found {} offers; cheapest: {} in {} ({} vCPU, {} GiB) at {:.4} CNY/hour",
        offers.len(),
        best.instance_type,
        best.zone,
        best.cores,
        fmt_num(best.memory_gib),
        best.spot_price
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
    let auto_release = created_at + ctx.config.safety.max_lifetime;
    let walk = selection::walk_offers(
        &offers,
        |offer: &Offer| -> WalkAttempt<String, StageError> {
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
            let strategy: SpotStrategy = ctx.config.spot.strategy.into();
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
                        ))
                    }
                },
            };
            let token = client_token(&ctx.key.runner_id, &ctx.key.job_id, &state.attempt_id, offer);
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
                spot_duration: Some(0),
                internet_max_bandwidth_out: ctx.config.network.internet_max_bandwidth_out,
                system_disk_category: Some(ctx.config.instance.system_disk_category.clone()),
                system_disk_size: Some(ctx.config.instance.system_disk_size_gib),
                key_pair_name: ctx.config.ssh.key_pair_name.clone(),
                ram_role_name: ctx.config.instance.ram_role_name.clone(),
                user_data: Some(user_data.clone()),
                tags: ctx.tags(),
                auto_release_time: Some(auto_release),
                client_token: token.clone(),
                dry_run: false,
            };
            p.line(format!(
                "Trying {} in {}: {} vCPU, {} GiB, {:.4} CNY/hour{}",
                offer.instance_type,
                offer.zone,
                offer.cores,
                fmt_num(offer.memory_gib),
                offer.spot_price,
                limit.map(|l| format!(" (limit {l:.4})")).unwrap_or_default()
            ));
            state.client_token = token;
            state.instance_type = offer.instance_type.clone();
            state.zone = offer.zone.clone();
            state.spot_price = Some(offer.spot_price);
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
            match answer {
                Ok(ids) => match ids.into_iter().next() {
                    Some(id) => WalkAttempt::Created(id),
                    None => {
                        WalkAttempt::Fatal(StageError::system("RunInstances answered without an instance id"))
                    }
                },
                Err(e) if e.kind() == ErrorKind::NoCapacity => {
                    if !e.code().unwrap_or_default().contains("PriceLimit") {
                        if let Err(err) = cooldown.record(&ctx.region, &offer.instance_type, &offer.zone) {
                            log::warn!("could not remember the stock-out: {err:#}");
                        }
                    }
                    WalkAttempt::NextOffer(describe_capacity_error(&e))
                }
                Err(e) => WalkAttempt::Fatal(StageError::system(fatal_create_error(&e))),
            }
        },
        |line: &str| p.line(line),
    );

    let (created, id) = match walk {
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
        "Created spot instance {id} ({} in {}, {:.4} CNY/hour, auto-release at {})",
        created.instance_type,
        created.zone,
        created.spot_price,
        cost::format_time(auto_release)
    ));

    match wait_until_ready(ctx, &mut state, &id, &ssh_keys, started, deadline) {
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
            match super::delete_instance(ctx, &id) {
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

/// Waits for `Running`, an address, and an SSH login that sees the pinned host key.
fn wait_until_ready(
    ctx: &Context,
    state: &mut JobState,
    id: &str,
    keys: &super::JobKeys,
    started: Instant,
    deadline: Instant,
) -> Result<(), StageError> {
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
    state.phase = Phase::Ready;
    state.ready_at = Some(OffsetDateTime::now_utc());
    ctx.store.save(&ctx.key, state).context("failed to record the ready instance")?;
    Ok(())
}

/// `ClientToken`: the same for a retry of the same request, different for every runner, job,
/// preparation attempt and offer (ASCII, at most 64 characters).
pub fn client_token(runner: &str, job: &str, attempt: &str, offer: &Offer) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [runner, job, attempt, &offer.instance_type, &offer.zone] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().take(24).map(|b| format!("{b:02x}")).collect();
    format!("ase-{hex}")
}

/// How a capacity error reads in the walk's summary (`out of stock (Code)`).
pub fn describe_capacity_error(e: &EcsError) -> String {
    let code = e.code().unwrap_or("capacity");
    let what = if code.contains("Stock") {
        "out of stock"
    } else if code.contains("PriceLimit") {
        "price limit rejected"
    } else if code.contains("Zone") {
        "zone not on sale"
    } else {
        "not available"
    };
    format!("{what} ({code})")
}

/// A `RunInstances` error that ends the walk, with what to do about it.
pub fn fatal_create_error(e: &EcsError) -> String {
    let hint = match e.kind() {
        ErrorKind::Auth => "check the AccessKey pair or STS token",
        ErrorKind::Permission => "grant the RAM permissions listed in the README",
        ErrorKind::Quota => "raise the quota or top up the account",
        ErrorKind::Parameter => "check the image, security group and vswitch settings (`aliyun-spot doctor`)",
        _ => "see the error code in Aliyun's API documentation",
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
