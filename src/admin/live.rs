//! `aliyun-spot doctor --live`: one real spot instance, end to end, before the runner is
//! registered.
//!
//! Why: the dry-run checks of `doctor` cannot prove that an instance boots from the configured
//! image, that cloud-init takes the per-job keys, that SSH reaches it through the security
//! group, and that the image has what jobs need. This does, for the price of a few minutes of
//! the cheapest fitting spot instance — and it does it *as prepare would*: it runs the prepare
//! stage itself ([`crate::stages::prepare::run`]) and the cleanup stage
//! ([`crate::stages::cleanup::run`]) with a synthetic job identity, so the offers, the walk,
//! the tags, the `ClientToken`, the keys and the release are the ones every job gets.
//!
//! It prints what it will spend before anything is created and asks for nothing (it is opt-in
//! through the flag). Whatever happens — an error, SSH never coming up, SIGINT (Ctrl-C) or
//! SIGTERM — the cleanup stage runs before it returns; it finds the instance by its state and
//! by its tags, and deletes it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use time::OffsetDateTime;

use crate::config::JobSpec;
use crate::env::Env;
use crate::identity::{JobIdentity, JobSecret};
use crate::logging::stdout_line;
use crate::ssh::{self, SshTarget};
use crate::stages::{cleanup, prepare, Context};

/// The runner id the instance is tagged with.
pub const LIVE_RUNNER_ID: &str = "doctor-live";

/// The commands run on the instance: the kernel, then where `git` and `gitlab-runner` are.
const PROBE: &str = "uname -a\n\
                     printf 'git: %s\\n' \"$(command -v git || echo MISSING)\"\n\
                     printf 'gitlab-runner: %s\\n' \"$(command -v gitlab-runner || echo MISSING)\"\n";

/// Runs the live check; `Err` when any step failed (the instance is released either way).
pub fn doctor_live(config_path: Option<&Path>) -> Result<()> {
    let env = Env::from_process();
    let mut config = crate::config::load(config_path, &env)?;
    let arch = config.instance.default_arch;
    config.require_for_prepare(arch)?;
    // The job state and the cost ledger of this check live in a private temporary directory:
    // nothing of it is left on the runner host, and the runner's ledger holds jobs only.
    let scratch = tempfile::Builder::new().prefix("aliyun-spot-doctor-").tempdir()?;
    config.paths.state_dir = scratch.path().join("state");
    config.paths.ledger = scratch.path().join("ledger.jsonl");
    let shape = config.default_job_shape(arch);
    let spec = JobSpec { arch, shape: shape.clone(), overrides: Vec::new() };
    let started_at = OffsetDateTime::now_utc();
    // A made-up job of its own: a fresh secret, and a token digest no gitlab-runner job has, so
    // nothing of a real job can match it.
    let secret = JobSecret::mint();
    let identity = JobIdentity {
        runner_id: LIVE_RUNNER_ID.to_string(),
        project_id: LIVE_RUNNER_ID.to_string(),
        job_id: format!("live-{}", started_at.unix_timestamp()),
        pipeline_id: None,
        project_path: None,
        token_digest: JobSecret::mint().binding(),
    };
    let boot_timeout = config.ssh.boot_timeout;
    let ctx = Context::from_parts(env, config, spec, identity, secret).map_err(stage_error)?;

    // What it will spend, before anything is created.
    let offers = crate::stages::ranked_offers(&ctx, &shape).map_err(stage_error)?;
    let Some(best) = offers.first() else {
        bail!("no spot offer fits the default shape ({arch}); `aliyun-spot prices` shows what is sold");
    };
    let budget = boot_timeout + Duration::from_secs(10 * 60);
    stdout_line(&format!(
        "doctor --live creates ONE real spot instance and deletes it: the cheapest fitting offer is {} in {} at {:.4} {cur}/hour; \
         a run takes a few minutes and costs about {:.4} {cur} (at most {:.4} {cur} if it took {} minutes)",
        best.instance_type,
        best.zone,
        best.spot_price,
        best.spot_price * 5.0 / 60.0,
        best.spot_price * budget.as_secs_f64() / 3600.0,
        budget.as_secs() / 60,
        cur = best.currency
    ))?;

    // A panic in the probe must not skip the release below.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| create_probe(&ctx)))
        .unwrap_or_else(|_| {
            Err(anyhow!("the live check failed unexpectedly (a bug); releasing what it created"))
        });
    // Always: release by state and by tags, whatever happened above (signals included).
    let t = Instant::now();
    let released = cleanup::run(&ctx);
    let delete_id = ctx.client.last_request_id("DeleteInstance");
    let shown = match &released {
        Ok(()) => stdout_line(&format!(
            "step  delete: {:.1}s{}",
            t.elapsed().as_secs_f64(),
            delete_id.map(|id| format!(" (RequestId {id})")).unwrap_or_default()
        )),
        Err(e) => stdout_line(&format!("FAIL  delete: {e:#}")),
    };
    // A failed release comes first, on stderr: even when stdout is gone (which may be why the
    // probe stopped), an instance left behind must not end in a quiet exit.
    released
        .map_err(stage_error)
        .context("the instance could not be released; run `aliyun-spot instances` and `aliyun-spot sweep`")?;
    let probe = result?;
    shown?;
    let seconds = (OffsetDateTime::now_utc() - probe.created_at).as_seconds_f64().max(0.0);
    stdout_line(&format!(
        "cost  {} ({} in {}) for {:.0}s at {:.4} {cur}/hour: about {:.4} {cur}",
        probe.instance_id,
        probe.instance_type,
        probe.zone,
        seconds,
        probe.price,
        probe.price * seconds / 3600.0,
        cur = probe.currency
    ))?;
    if probe.missing_git {
        bail!("the image has no `git`: jobs cannot fetch their sources; install it in the image");
    }
    stdout_line("live check passed")?;
    Ok(())
}

/// What the probe found.
struct Probe {
    instance_id: String,
    instance_type: String,
    zone: String,
    price: f64,
    currency: String,
    created_at: OffsetDateTime,
    missing_git: bool,
}

/// Prepare (create and wait for SSH) then the probe commands, each step timed.
fn create_probe(ctx: &Context) -> Result<Probe> {
    let t = Instant::now();
    prepare::run(ctx).map_err(stage_error).context("creating the instance as prepare would failed")?;
    let state = ctx.store.load(&ctx.key)?.ok_or_else(|| anyhow!("prepare finished without a job state"))?;
    let id = state.instance_id.clone().unwrap_or_default();
    stdout_line(&format!(
        "step  create and boot: {:.1}s, {} ({} in {}, {:.4} {}/hour){}",
        t.elapsed().as_secs_f64(),
        id,
        state.instance_type,
        state.zone,
        state.spot_price.unwrap_or_default(),
        state.currency,
        ctx.client.last_request_id("RunInstances").map(|r| format!(" (RequestId {r})")).unwrap_or_default()
    ))?;

    let t = Instant::now();
    let target = SshTarget {
        host: state.ip.clone().ok_or_else(|| anyhow!("instance {id} has no address"))?,
        port: state.ssh_port,
        user: state.ssh_user.clone(),
        private_key: ctx.client_private_key().map_err(stage_error)?,
        host_key: state.host_public_key.clone(),
        connect_timeout: ctx.config.ssh.connect_timeout,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let outcome = ssh::run_script(&target, PROBE.as_bytes(), "sh", &mut out, &mut err, &ctx.cancel_flag())
        .with_context(|| format!("running `uname -a` on {id} failed"))?;
    if outcome.cancelled || ctx.terminated() {
        bail!("interrupted by a signal while running commands on {id}");
    }
    if outcome.exit_status != Some(0) {
        bail!(
            "`uname -a` on {id} exited with {:?}: {}",
            outcome.exit_status,
            String::from_utf8_lossy(&err).trim()
        );
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    stdout_line(&format!("step  ssh commands: {:.1}s", t.elapsed().as_secs_f64()))?;
    let mut missing_git = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if line == "git: MISSING" {
            missing_git = true;
            stdout_line(&format!("FAIL  {line} (jobs cannot fetch their sources)"))?;
        } else if line == "gitlab-runner: MISSING" {
            stdout_line(&format!("warn  {line} (caches and artifacts are skipped without it)"))?;
        } else {
            stdout_line(&format!("ok    {line}"))?;
        }
    }
    Ok(Probe {
        instance_id: id,
        instance_type: state.instance_type.clone(),
        zone: state.zone.clone(),
        price: state.spot_price.unwrap_or_default(),
        currency: state.currency.clone(),
        created_at: state.instance_created_at.unwrap_or_else(OffsetDateTime::now_utc),
        missing_git,
    })
}

fn stage_error(e: crate::exit::StageError) -> anyhow::Error {
    match e {
        crate::exit::StageError::System(e) => e,
        other => anyhow!("{other}"),
    }
}
