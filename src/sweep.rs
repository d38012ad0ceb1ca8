//! `aliyun-spot sweep`: find and delete managed instances whose job is over.
//!
//! Cleanup deletes every instance it can; sweep is the net for what it could not (runner host
//! crash, SIGKILL, an API outage during cleanup). Tags are the truth: an instance is ours when it
//! carries the managed-by tag, and this host's when its host tag names this host. It is deleted
//! when its job is over: this host holds no job state for it any more (prepare writes the state
//! before it creates anything, so a live job always has one), or it is older than
//! `--older-than`, or Aliyun is already reclaiming it. A job that is still running is left
//! alone, which is the mistake other autoscalers' sweepers are known for.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use time::OffsetDateTime;

use crate::config::Config;
use crate::ecs::{DeleteOutcome, EcsClient, Instance};
use crate::env::Env;
use crate::stages::{cost::format_duration, tags};
use crate::state::{JobKey, StateStore};

/// Options of `aliyun-spot sweep`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SweepArgs {
    /// Also delete managed instances older than this, whatever their job's state ("90m", "3h").
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub older_than: Option<Duration>,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Consider instances created by every runner host, not only this one.
    #[arg(long)]
    pub all: bool,
}

/// Why an instance is swept, or `None` to keep it.
pub fn verdict(
    inst: &Instance,
    safety: &crate::config::Safety,
    this_host: &str,
    store: &StateStore,
    args: &SweepArgs,
    now: OffsetDateTime,
) -> Option<String> {
    let tag = |name: &str| inst.tags.get(&safety.tag_key(name)).cloned().unwrap_or_default();
    let host = tag(tags::HOST);
    let ours = host == this_host;
    if !ours && !args.all {
        return None;
    }
    let age = inst.creation_time.map(|c| (now - c).whole_seconds().max(0) as u64);
    if crate::stages::is_reclaimed(inst) {
        return Some("Aliyun is reclaiming it".to_string());
    }
    if let (Some(limit), Some(age)) = (args.older_than, age) {
        if age > limit.as_secs() {
            return Some(format!("older than {}", format_duration(limit.as_secs())));
        }
    }
    if ours {
        let key =
            JobKey { runner_id: tag(tags::RUNNER), project_id: tag(tags::PROJECT), job_id: tag(tags::JOB) };
        match store.load(&key) {
            Ok(None) => return Some("its job has ended on this host (no job state)".to_string()),
            Ok(Some(s)) if s.instance_id.as_deref().is_some_and(|id| id != inst.id) => {
                return Some("its job now runs on another instance".to_string())
            }
            _ => {}
        }
    }
    None
}

/// Runs the sweep.
pub fn run(config_path: Option<&Path>, args: &SweepArgs) -> Result<()> {
    let env = Env::from_process();
    let config = crate::config::load(config_path, &env)?;
    let client = crate::offers::client(&config)?;
    sweep(&config, &client, &env.hostname(), args)
}

/// The sweep over an explicit client (tests use the emulator).
pub fn sweep(config: &Config, client: &EcsClient, this_host: &str, args: &SweepArgs) -> Result<()> {
    let store = StateStore::new(config.paths.state_dir.clone());
    let now = OffsetDateTime::now_utc();
    let managed = crate::admin::managed_instances(config, client)?;
    let mut deleted = 0;
    let mut kept = 0;
    for inst in &managed {
        let Some(reason) = verdict(inst, &config.safety, this_host, &store, args, now) else {
            kept += 1;
            continue;
        };
        let what = format!(
            "{} (job {}, project {}, age {})",
            inst.id,
            inst.tags.get(&config.safety.tag_key(tags::JOB)).map(String::as_str).unwrap_or("?"),
            inst.tags.get(&config.safety.tag_key(tags::PROJECT)).map(String::as_str).unwrap_or("?"),
            inst.creation_time
                .map(|c| format_duration((now - c).whole_seconds().max(0) as u64))
                .unwrap_or_default()
        );
        if args.dry_run {
            println!("would delete {what}: {reason}");
            continue;
        }
        match client.delete_instance(&inst.id, true) {
            Ok(DeleteOutcome::Deleted) | Ok(DeleteOutcome::AlreadyGone) => {
                deleted += 1;
                println!("deleted {what}: {reason}");
            }
            Err(e) => println!("FAILED to delete {what}: {e}"),
        }
    }
    println!("{deleted} deleted, {kept} kept of {} managed instance(s)", managed.len());
    Ok(())
}
