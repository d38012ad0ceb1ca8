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

use crate::config::format_duration;
use crate::config::Config;
use crate::ecs::{EcsClient, Instance};
use crate::env::Env;
use crate::logging::stdout_line;
use crate::state::{JobKey, StateStore};
use crate::tags;

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
    if crate::tags::is_reclaimed(inst) {
        return Some("Aliyun is reclaiming it".to_string());
    }
    if let (Some(limit), Some(age)) = (args.older_than, age) {
        if age > limit.as_secs() {
            return Some(format!("older than {}", format_duration(limit)));
        }
    }
    if ours {
        // The tags name the job's preparation attempt, whose state directory is keyed the same.
        let key = JobKey {
            runner_id: tag(tags::RUNNER),
            project_id: tag(tags::PROJECT),
            job_id: tag(tags::JOB),
            binding: tag(tags::BINDING),
        };
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
    let client = crate::selection::offers::client(&config)?;
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
                .map(|c| format_duration(std::time::Duration::from_secs(
                    (now - c).whole_seconds().max(0) as u64
                )))
                .unwrap_or_default()
        );
        if args.dry_run {
            stdout_line(&format!("would delete {what}: {reason}"))?;
            continue;
        }
        // The one release loop: waits out `IncorrectInstanceStatus.Initializing` and throttling.
        match crate::stages::release_instance(client, &inst.id, None) {
            Ok(()) => {
                deleted += 1;
                stdout_line(&format!("deleted {what}: {reason}"))?;
            }
            Err(e) => stdout_line(&format!("FAILED to delete {what}: {e}"))?,
        }
    }
    stdout_line(&format!("{deleted} deleted, {kept} kept of {} managed instance(s)", managed.len()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::selection::Arch;
    use crate::state::{JobState, Phase, STATE_VERSION};

    const HOST: &str = "runner-host-1";

    /// A binding per job, as the job's attempt would have.
    fn binding(job: &str) -> String {
        format!("{job:0>32}")
    }

    fn instance(id: &str, job: &str, host: &str, age_secs: i64, now: OffsetDateTime) -> Instance {
        let safety = Config::defaults().safety;
        let mut tags = BTreeMap::new();
        tags.insert(safety.managed_tag_key.clone(), safety.managed_tag_value.clone());
        tags.insert(safety.tag_key(tags::RUNNER), "7".to_string());
        tags.insert(safety.tag_key(tags::PROJECT), "42".to_string());
        tags.insert(safety.tag_key(tags::JOB), job.to_string());
        tags.insert(safety.tag_key(tags::BINDING), binding(job));
        tags.insert(safety.tag_key(tags::HOST), host.to_string());
        Instance {
            id: id.to_string(),
            name: "ci-runner-amd64-spot".to_string(),
            instance_type: "ecs.c7.large".to_string(),
            zone_id: "cn-hangzhou-b".to_string(),
            region_id: "cn-hangzhou".to_string(),
            status: "Running".to_string(),
            cpu: 2,
            memory_mib: 4096,
            creation_time: Some(now - time::Duration::seconds(age_secs)),
            start_time: None,
            auto_release_time: None,
            spot_strategy: Some("SpotAsPriceGo".to_string()),
            spot_price_limit: None,
            public_ips: Vec::new(),
            private_ips: vec!["10.0.0.2".to_string()],
            eip: None,
            tags,
            operation_locks: Vec::new(),
            key_pair_name: None,
            image_id: "ubuntu".to_string(),
            vswitch_id: None,
        }
    }

    fn save_state(store: &StateStore, job: &str, instance_id: &str, now: OffsetDateTime) {
        let state = JobState {
            version: STATE_VERSION,
            runner_id: "7".into(),
            project_id: "42".into(),
            job_id: job.into(),
            binding: binding(job),
            token_digest: String::new(),
            pipeline_id: None,
            client_token: "token".into(),
            region: "cn-hangzhou".into(),
            phase: Phase::Ready,
            instance_id: Some(instance_id.into()),
            instance_type: "ecs.c7.large".into(),
            zone: "cn-hangzhou-b".into(),
            spot_price: None,
            currency: "CNY".into(),
            price_limit: None,
            arch: Arch::Amd64,
            ip: Some("10.0.0.2".into()),
            ssh_port: 22,
            ssh_user: "root".into(),
            host_public_key: "ssh-ed25519 AAAA host".into(),
            created_at: now,
            ready_at: None,
            released_at: None,
            instance_created_at: None,
            attempt_id: String::new(),
        };
        store.save(&state.key(), &state).unwrap();
    }

    #[test]
    fn verdicts() {
        let now = OffsetDateTime::now_utc();
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        let safety = Config::defaults().safety;
        let plain = SweepArgs::default();
        let all = SweepArgs { all: true, ..SweepArgs::default() };
        let old = SweepArgs { older_than: Some(Duration::from_secs(3600)), ..SweepArgs::default() };
        let v = |i: &Instance, a: &SweepArgs| verdict(i, &safety, HOST, &store, a, now);

        // A running job (state names this instance) is kept, even by --all.
        save_state(&store, "1", "i-running", now);
        let running = instance("i-running", "1", HOST, 600, now);
        assert_eq!(v(&running, &plain), None);
        assert_eq!(v(&running, &all), None);
        // ... unless it is older than --older-than.
        let running_old = instance("i-running", "1", HOST, 2 * 3600, now);
        assert_eq!(v(&running_old, &old).as_deref(), Some("older than 1h"));
        assert_eq!(v(&running, &old), None, "10 minutes old is not older than 1h");

        // The same job's tags with another attempt's binding: that attempt's state is gone.
        let mut other_attempt = instance("i-other-attempt", "1", HOST, 60, now);
        other_attempt.tags.insert(safety.tag_key(tags::BINDING), binding("9"));
        assert_eq!(
            v(&other_attempt, &plain).as_deref(),
            Some("its job has ended on this host (no job state)")
        );

        // No job state on this host: its job has ended.
        let leaked = instance("i-leaked", "2", HOST, 60, now);
        assert_eq!(v(&leaked, &plain).as_deref(), Some("its job has ended on this host (no job state)"));

        // The job's state names another instance (a retried prepare): this one is over.
        save_state(&store, "3", "i-new", now);
        let replaced = instance("i-old", "3", HOST, 60, now);
        assert_eq!(v(&replaced, &plain).as_deref(), Some("its job now runs on another instance"));

        // Being reclaimed: swept whatever its job's state.
        let mut reclaimed = instance("i-running", "1", HOST, 60, now);
        reclaimed.operation_locks.push("Recycling".into());
        assert_eq!(v(&reclaimed, &plain).as_deref(), Some("Aliyun is reclaiming it"));

        // Another host's instance: never touched without --all, and with --all only by age or
        // reclaim (this host cannot know that host's job states).
        let foreign = instance("i-foreign", "4", "runner-host-2", 2 * 3600, now);
        assert_eq!(v(&foreign, &plain), None);
        assert_eq!(v(&foreign, &old), None);
        assert_eq!(v(&foreign, &all), None);
        let all_old = SweepArgs { all: true, ..old.clone() };
        assert_eq!(v(&foreign, &all_old).as_deref(), Some("older than 1h"));
        let mut foreign_reclaimed = foreign.clone();
        foreign_reclaimed.operation_locks.push("Recycling".into());
        assert_eq!(v(&foreign_reclaimed, &plain), None);
        assert_eq!(v(&foreign_reclaimed, &all).as_deref(), Some("Aliyun is reclaiming it"));
    }
}
