//! `cleanup_exec`: release the job's instance, whatever happened before.
//!
//! gitlab-runner calls cleanup after every failed preparation attempt, after the job, possibly
//! while a `run` is still dying, and never if the runner itself dies (docs/gitlab-runner.md,
//! "Lifecycle" and "Timeouts and signals"). So cleanup trusts nothing it does not check: it deletes the instance named in the
//! job state *and* every instance tagged with this runner, project, job and preparation
//! attempt's binding (the state may be missing or written before the id was known), treats
//! "already gone" as success, records the cost once, and removes the job's state and keys last.
//! It acts only with the attempt's secret ([`crate::identity`]), so it can reach no instance
//! of another job or attempt, whatever the job's variables say.

use std::time::Duration;

use anyhow::Context as _;
use time::OffsetDateTime;

use super::{cost, delete_instance, Context, Progress};
use crate::exit::StageError;
use crate::retry::{Backoff, RetryPolicy};
use crate::state::Phase;

/// Runs the cleanup stage.
pub fn run(ctx: &Context) -> Result<(), StageError> {
    let p = Progress;
    let _lock = ctx.lock_job()?;
    // The session keeper first, while its instance is still there to say goodbye to.
    crate::keeper::stop(&ctx.store.job_dir(&ctx.key));
    let state = match ctx.store.load(&ctx.key) {
        Ok(s) => s,
        Err(e) => {
            p.line(format!(
                "WARNING: ignoring an unreadable job state ({}); searching by tags",
                crate::exit::one_line(&e)
            ));
            None
        }
    };
    let mut ids: Vec<String> = state.as_ref().and_then(|s| s.instance_id.clone()).into_iter().collect();

    // A prepare killed while RunInstances was in flight leaves phase `Creating` and no id; the
    // instance may take a moment to show up in DescribeInstances, so look a few times.
    let in_flight = state.as_ref().is_some_and(|s| s.phase == Phase::Creating && !s.client_token.is_empty());
    let searches = RetryPolicy::rounds(if in_flight { 5 } else { 1 }, Backoff::fixed(Duration::from_secs(2)));
    let found = searches
        .retry(|_| ctx.find_job_instances(), |r| ids.is_empty() && matches!(r, Ok(f) if f.is_empty()))?;
    for inst in found {
        if !ids.contains(&inst.id) {
            ids.push(inst.id);
        }
    }

    let mut failures = Vec::new();
    for id in &ids {
        // "Not found" is "not visible yet" only for an instance ECS may not show yet: one whose
        // creation this job recorded but never saw running. Once prepare saw it ready (ECS
        // listed it as Running), "not found" means gone, and cleanup need not wait the grace out.
        let created = state
            .as_ref()
            .filter(|s| s.instance_id.as_deref() == Some(id.as_str()) && s.phase != Phase::Ready)
            .and_then(|s| s.instance_created_at);
        match delete_instance(ctx, id, created) {
            Ok(()) => p.line(format!("Released instance {id}")),
            Err(e) => failures.push(e),
        }
    }
    if let Some(e) = failures.into_iter().next() {
        // Keep the state so a later cleanup or `aliyun-spot sweep` can finish the job.
        return Err(e);
    }

    if let Some(s) = &state {
        if s.instance_id.is_some() {
            let now = OffsetDateTime::now_utc();
            if let Some(entry) = cost::ledger_entry(s, &ctx.job, now) {
                p.line(cost::summary(&entry));
                cost::append_ledger(&ctx.config.paths.ledger, &entry).with_context(|| {
                    format!("failed to append to the cost ledger `{}`", ctx.config.paths.ledger.display())
                })?;
            }
        }
    }
    ctx.store.remove(&ctx.key)?;
    if ids.is_empty() {
        p.line(format!("Nothing to release for job {}", ctx.key.job_id));
    }
    Ok(())
}
