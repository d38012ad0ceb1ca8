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
use crate::ecs::Instance;
use crate::exit::StageError;
use crate::launch::{fmt_num, Created, Hooks, Sending, Template};
use crate::pricing::PerHour;
use crate::retry::Backoff;
use crate::selection::Offer;
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

    // 3. Create, walking the offers (the walk both front ends share).
    let created_at = OffsetDateTime::now_utc();
    let user_data = ctx.cloud_config(&ssh_keys, created_at).render()?.text;
    let instance_name = ctx.instance_name(created_at);
    let template = Template {
        // ECS sets the OS hostname from `HostName` (`instance.hostname`, by default the
        // instance name).
        host_name: Some(ctx.config.instance.host_name(&instance_name)),
        instance_name,
        ram_role_name: ctx.config.self_destruct.instance_role(&ctx.config.instance),
        user_data,
        tags: ctx.tags(),
    };
    let mut hooks = PrepareHooks { ctx, state: &mut state, started, deadline };
    // (Offers that just ran out of stock for an earlier job on this host go last.)
    let Created { offer: created, instance_id: id, auto_release } =
        crate::launch::create_on_offers(&ctx.client, &ctx.config, shape, offers, &template, &mut hooks)?;
    // A Fatal walk returned above and left the state: a RunInstances whose answer was lost may
    // still have created an instance, and cleanup looks for it by tag (an Exhausted walk
    // recorded that nothing is on its way, `none_created`).
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
    let ready = wait_until_ready(ctx, &mut state, &id, &ssh_keys, started, deadline).and_then(|target| {
        crate::helper::prepare_instance(ctx, &target)?;
        Ok(target)
    });
    match ready {
        Ok(target) => {
            if ctx.config.ssh.keep_session {
                start_keeper(ctx, &target);
            }
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

/// Starts the job's session keeper ([`crate::keeper`]), the `aliyun-spot` next to this
/// executable. Without it every stage connects on its own, so a failure is a warning.
fn start_keeper(ctx: &Context, target: &SshTarget) {
    let exe = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("aliyun-spot")));
    let started = match exe {
        Some(exe) => {
            let dir = ctx.store.job_dir(&ctx.key);
            crate::keeper::start(&exe, &dir, target, ctx.config.ssh.keepalive, crate::keeper::IDLE_TIMEOUT)
        }
        None => Err(anyhow!("cannot find this executable's directory")),
    };
    if let Err(e) = started {
        Progress.line(format!(
            "WARNING: could not keep an SSH session for the stages ({}); each stage connects on its own",
            crate::exit::one_line(&e)
        ));
    }
}

/// Prepare's side of the shared walk: its signal and deadline, the job's `ClientToken`s, and
/// the job state written before every `RunInstances`.
struct PrepareHooks<'a> {
    ctx: &'a Context,
    state: &'a mut JobState,
    started: Instant,
    deadline: Instant,
}

impl Hooks for PrepareHooks<'_> {
    type Error = StageError;

    fn stop(&mut self) -> Option<StageError> {
        if self.ctx.terminated() {
            return Some(StageError::system(
                "prepare was terminated (SIGTERM) before an instance was created",
            ));
        }
        if Instant::now() >= self.deadline {
            return Some(StageError::system(format!(
                "prepare timed out after {}s while creating an instance; raise `timeouts.prepare`",
                self.started.elapsed().as_secs()
            )));
        }
        None
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn cancelled(&self) -> bool {
        self.ctx.terminated()
    }

    fn pause(&self, d: Duration) {
        self.ctx.sleep(d);
    }

    fn client_token(&self, offer: &Offer) -> String {
        client_token(&self.ctx.key, &self.state.attempt_id, offer)
    }

    fn sending(&mut self, s: &Sending) -> Result<(), StageError> {
        let state = &mut *self.state;
        state.client_token = s.client_token.to_string();
        state.instance_type = s.offer.instance_type.clone();
        state.zone = s.offer.zone.clone();
        state.spot_price = Some(s.offer.spot_price);
        state.currency = s.offer.currency.clone();
        state.price_limit = s.price_limit;
        self.ctx.store.save(&self.ctx.key, state).map_err(StageError::System)
    }

    fn fail(&self, error: anyhow::Error) -> StageError {
        StageError::System(error)
    }

    fn none_created(&mut self) {
        // As before the first `RunInstances`: cleanup then looks for an instance by tag once,
        // instead of waiting for one that may still be on its way.
        self.state.client_token.clear();
        if let Err(e) = self.ctx.store.save(&self.ctx.key, self.state) {
            log::warn!("could not record that no instance was created: {e:#}");
        }
    }

    fn busy_hint(&self) -> String {
        "prepare had to stop, retry the job later".into()
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
    // Jittered (±25 %), so many jobs starting together do not poll ECS in lockstep.
    let polls = Backoff {
        jitter: (0.75, 1.25),
        ..Backoff::exponential(Duration::from_millis(500), 2, Duration::from_secs(5))
    };
    let mut round = 0;
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
        round += 1;
        ctx.sleep(polls.delay(round));
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
                    "SSH on {id} did not become ready within {}s; check that the security group allows port {} from this host, or raise `ssh.boot_timeout`",
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
    log::debug!("SSH answered on {id}");
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
