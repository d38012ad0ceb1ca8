//! The stage binaries driven exactly as gitlab-runner drives them, against the emulator and a
//! real sshd per instance. Every scenario ends by proving that no instance is left alive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aliyun_spot_executor::demo::gitlab::{Attempt, Executables, Exit, Job, Running};
use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions, Faults};

/// The runner id of every [`World`]'s configuration (`runner.id`).
pub const RUNNER_ID: &str = "7";

/// One test's world: an emulator, a configuration pointing at it, and private directories.
pub struct World {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl World {
    pub fn new() -> World {
        World::with_faults(Faults::default())
    }

    pub fn with_faults(faults: Faults) -> World {
        World::with(faults, &[])
    }

    /// An emulator with `faults`, and the configuration with `(table, key, value)` overrides.
    pub fn with(faults: Faults, overrides: &[(&str, &str, toml::Value)]) -> World {
        let emulator = Emulator::start(EmulatorOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            boot_delay: Duration::from_millis(300),
            ssh_delay: Duration::from_millis(100),
            faults,
            ..EmulatorOptions::default()
        })
        .expect("emulator starts");
        let dir = crate::private_tempdir();
        let config = dir.path().join("config.toml");
        let mut doc: toml::Table = config_text(&emulator.endpoint(), dir.path()).parse().unwrap();
        // The administrator's runner id, so that nothing depends on this machine's host name.
        let runner = doc.entry("runner").or_insert_with(|| toml::Value::Table(Default::default()));
        runner.as_table_mut().expect("a table").insert("id".into(), toml::Value::String(RUNNER_ID.into()));
        for (table, key, value) in overrides {
            let t = doc.entry(table.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
            t.as_table_mut().expect("a table").insert(key.to_string(), value.clone());
        }
        std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
        World { emulator, dir, config }
    }

    pub fn exes(&self) -> Executables {
        let mut e = Executables {
            config: PathBuf::from(env!("CARGO_BIN_EXE_config")),
            prepare: PathBuf::from(env!("CARGO_BIN_EXE_prepare")),
            run: PathBuf::from(env!("CARGO_BIN_EXE_run")),
            cleanup: PathBuf::from(env!("CARGO_BIN_EXE_cleanup")),
            args: Vec::new(),
        };
        e.args = vec!["--config".into(), self.config.display().to_string()];
        e
    }

    /// The runner process's own environment: minimal, without the developer's ALIYUN_* values.
    pub fn base_env(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
        m.insert("HOME".to_string(), self.dir.path().display().to_string());
        m
    }

    pub fn builds_dir(&self) -> String {
        self.dir.path().join("builds").display().to_string()
    }

    pub fn job(&self, job_id: &str, script: &str) -> Job {
        let builds = self.builds_dir();
        Job::new(42, job_id.parse().expect("a numeric job id"), &builds, script)
    }

    pub fn attempt(&self, job: &Job) -> Attempt {
        Attempt::new(self.exes(), self.base_env(), job).unwrap().with_retry_interval(crate::RETRY_INTERVAL)
    }

    pub fn live(&self) -> usize {
        self.emulator.live_instances()
    }

    /// Waits until the emulator has no live instance (deletion is synchronous, but a reclaim
    /// takes the emulator a moment), then asserts it.
    pub fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.live() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.live(), 0, "instances left alive: {:#?}", self.emulator.instances());
    }
}

/// A configuration for the emulator with everything in `dir`.
pub fn config_text(endpoint: &str, dir: &Path) -> String {
    let base = include_str!("../config/emulator.toml");
    crate::emulator_config(base, endpoint, dir)
}

/// The line every stage but `config` prints when it runs without `config`'s secret.
pub const SECRET_MISSING: &str =
    "ERROR: `ALIYUN_SPOT_JOB_SECRET` is not set: this stage only acts for a job whose \
     `config` stage ran in the same preparation attempt; configure `config_exec` in gitlab-runner's \
     [runners.custom] (nothing was touched)";

fn show(outcome: &aliyun_spot_executor::demo::gitlab::JobOutcome) -> String {
    format!("JOB LOG:\n{}\nRUNNER LOG:\n{}\n", outcome.job_log, outcome.runner_log)
}

#[test]
fn passing_job_runs_on_a_spot_instance_and_releases_it() {
    let w = World::new();
    let job = w.job("1001", "echo hello from $(hostname)\nuname -s");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", show(&out));
    // Output lines, not the `$ command` line that echoes the command; ECS names the host after
    // the instance (`HostName`).
    assert!(out.job_log.lines().any(|l| l.starts_with("hello from ci-runner-amd64-spot-")), "{}", show(&out));
    assert!(out.job_log.contains("Linux"), "{}", show(&out));
    assert!(out.job_log.contains("Created spot instance i-"), "{}", show(&out));
    assert!(out.job_log.contains("CNY so far"), "the cost reaches the job log: {}", show(&out));
    assert!(out.runner_log.contains("Released instance i-"), "{}", show(&out));
    let json = out.config_json.as_ref().unwrap();
    assert_eq!(json["builds_dir_is_shared"], false);
    assert_eq!(json["driver"]["name"], "aliyun-spot-executor");
    assert!(!out.job_log.contains("NEVERPRINTED"), "the job token never reaches the log");
    w.assert_nothing_left();
    let created = w.emulator.instances();
    assert_eq!(created.len(), 1);
}

#[test]
fn failing_script_is_a_build_failure_with_its_status() {
    let w = World::new();
    let mut job = w.job("1002", "echo before\nexit 42");
    job.after_script = Some("echo \"AFTER: $CI_JOB_STATUS\"".into());
    let out = w.attempt(&job).run_job(&job).unwrap();
    let names: Vec<&str> = out.stages.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        names,
        ["prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"]
    );
    assert!(
        out.job_log.lines().any(|l| l == "AFTER: failed"),
        "after_script ran after the failed step: {}",
        show(&out)
    );
    let build = out.stages.iter().find(|(s, _)| s == "build_script").unwrap();
    assert_eq!(build.1, Exit::Code(1), "{}", show(&out));
    assert_eq!(out.build_exit_code.as_deref(), Some("42\n"));
    assert_eq!(out.cleanup, Some(Exit::Code(0)), "{}", show(&out));
    w.assert_nothing_left();
}

#[test]
fn a_script_that_reads_stdin_sees_eof_not_its_script() {
    let w = World::new();
    let job = w.job(
        "1003",
        "if read -r line; then echo \"STDIN GAVE: $line\"; else echo STDIN-EOF; fi\ncat | wc -c",
    );
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", show(&out));
    assert!(out.job_log.lines().any(|l| l == "STDIN-EOF"), "{}", show(&out));
    // The `$ command` line echoes the command itself; its output never comes.
    assert!(!out.job_log.lines().any(|l| l.starts_with("STDIN GAVE")), "{}", show(&out));
    w.assert_nothing_left();
}

#[test]
fn output_reaches_the_log_while_the_stage_runs() {
    let w = World::new();
    let gate = w.dir.path().join("gate");
    let script = format!(
        "echo FIRST-LINE\nfor i in $(seq 1 600); do [ -e '{}' ] && break; sleep 0.1; done\necho SECOND-LINE",
        gate.display()
    );
    let job = w.job("1004", &script);
    let mut attempt = w.attempt(&job);
    let running = start_build_script(&mut attempt, &job);
    // The script waits for the gate, which opens only once its first line is in the log.
    assert!(
        attempt.log.wait_for("FIRST-LINE\n", Duration::from_secs(60)),
        "first line not streamed: {}",
        attempt.log.text()
    );
    assert!(!attempt.log.text().contains("SECOND-LINE"));
    std::fs::write(&gate, "").unwrap();
    assert!(running.wait().unwrap().success(), "{}", attempt.log.text());
    assert!(attempt.log.text().contains("SECOND-LINE"));
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn sigterm_during_a_stage_stops_the_remote_script_and_cleanup_releases() {
    let w = World::new();
    let marker = format!("cancel-marker-{}", std::process::id());
    let script = format!("echo STARTED\nbash -c 'exec -a {marker} sleep 300'");
    let job = w.job("1005", &script);
    let mut attempt = w.attempt(&job);
    let running = start_build_script(&mut attempt, &job);
    assert!(attempt.log.wait_for("STARTED", Duration::from_secs(60)), "{}", attempt.log.text());
    // Wait for the remote process to exist, then cancel like gitlab-runner does.
    assert!(wait_until(Duration::from_secs(20), || pgrep(&marker)), "remote sleep never started");
    let exit = running.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(exit, Exit::Code(2), "a cancelled stage is a system failure: {}", attempt.log.text());
    assert!(
        wait_until(Duration::from_secs(20), || !pgrep(&marker)),
        "the remote process survived the cancel"
    );
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn spot_reclaim_mid_stage_is_a_system_failure_that_says_reclaimed() {
    let w = World::new();
    let job = w.job("1006", "echo RUNNING\nsleep 300");
    let mut attempt = w.attempt(&job);
    let running = start_build_script(&mut attempt, &job);
    assert!(attempt.log.wait_for("RUNNING\n", Duration::from_secs(60)), "{}", attempt.log.text());
    let id = w.emulator.instances()[0].id.clone();
    w.emulator.reclaim(&id);
    let exit = running.wait().unwrap();
    assert_eq!(exit, Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    assert!(log.contains(&format!("spot instance {id} was reclaimed by Aliyun")), "{log}");
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn prepare_killed_at_several_points_then_cleanup_leaves_nothing() {
    // SIGKILL after 0 ms (before anything), during creation, during boot, during SSH wait.
    for (i, delay_ms) in [0u64, 150, 400, 900].into_iter().enumerate() {
        let w = World::new();
        // Slow enough that every kill lands inside prepare, whatever the machine's speed: the
        // catalogue calls take 20 ms each, the boot 0.6 s and sshd another 1.5 s.
        w.emulator.set_faults(Faults { latency_ms: 20, ..Faults::default() });
        w.emulator.set_delays(Duration::from_millis(600), Duration::from_millis(1500));
        let job = w.job(&format!("20{i}"), "true");
        let mut attempt = w.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        let prepare = attempt.spawn(&attempt_exes(&w).prepare, &[], &attempt.log.clone()).unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        prepare.signal_group(libc::SIGKILL);
        let exit = prepare.wait().unwrap();
        assert_ne!(exit, Exit::Code(0));
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        w.assert_nothing_left();
    }
}

#[test]
fn invalid_job_variable_fails_config_before_anything_is_created() {
    let w = World::new();
    let mut job = w.job("1007", "true");
    job.variables.push(("ALIYUN_SPOT_MAX_CPU".into(), "512".into()));
    let out = w.attempt(&job).run_job(&job).unwrap();
    // The job's mistake: a build failure, which gitlab-runner does not retry.
    assert_eq!(out.config, Exit::Code(1), "{}", show(&out));
    assert_eq!(out.preparations, 1, "a build failure is not retried: {}", show(&out));
    assert!(out.job_log.contains("ALIYUN_SPOT_MAX_CPU"), "{}", show(&out));
    assert!(out.job_log.contains("512"), "{}", show(&out));
    // Without config's secret, cleanup refuses to act, in one line, and touches nothing.
    assert_eq!(out.cleanup, Some(Exit::Code(2)), "{}", show(&out));
    assert_eq!(out.runner_log.matches(SECRET_MISSING).count(), 1, "{}", show(&out));
    assert!(w.emulator.instances().is_empty());
    assert!(w.emulator.requests().is_empty(), "no API call at all");
}

#[test]
fn cleanup_twice_and_without_prepare_is_harmless() {
    let w = World::new();
    let job = w.job("1008", "true");
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    assert_eq!(w.live(), 1);
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

/// config, prepare and the stages before the job's script, each passing; then the script's
/// stage is started and left running.
fn start_build_script(attempt: &mut Attempt, job: &Job) -> Running {
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    for (stage, body) in &job.stages[..2] {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{}", attempt.log.text());
    }
    attempt.start_stage("build_script", &job.stages[2].1).unwrap()
}

fn attempt_exes(w: &World) -> Executables {
    w.exes()
}

fn pgrep(marker: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

#[test]
fn no_secret_reaches_any_log_even_at_trace_level_and_state_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let job = w.job("1009", "echo job output");
    let mut env = w.base_env();
    env.insert("RUST_LOG".into(), "trace".into());
    let mut attempt = Attempt::new(w.exes(), env, &job).unwrap();
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    // The job state and the per-job key are private to the runner's user.
    let state_root = w.dir.path().join("state");
    let mut files = Vec::new();
    let mut dirs = vec![state_root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            if e.file_type().unwrap().is_dir() {
                assert_eq!(mode, 0o700, "{}", e.path().display());
                dirs.push(e.path());
            } else {
                files.push((e.path(), mode));
            }
        }
    }
    assert!(files.iter().any(|(p, _)| p.ends_with("state.json")), "{files:?}");
    assert!(files.iter().any(|(p, _)| p.ends_with("id_ed25519")), "{files:?}");
    for (p, mode) in &files {
        if !p.ends_with(".lock") {
            assert_eq!(*mode, 0o600, "{}", p.display());
        }
    }
    let state =
        std::fs::read_to_string(files.iter().find(|(p, _)| p.ends_with("state.json")).unwrap().0.clone())
            .unwrap();
    assert!(!state.contains("PRIVATE KEY"), "the state file holds no key");
    for (stage, body) in &job.stages {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{}", attempt.log.text());
    }
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    let all = format!("{}{}", attempt.log.text(), attempt.runner_log.text());
    assert!(all.lines().any(|l| l == "job output"), "{all}");
    assert!(all.contains("TRACE") || all.contains("DEBUG"), "trace logging was on: {all}");
    for secret in [aliyun_spot_executor::emulator::DEFAULT_ACCESS_KEY_SECRET, "PRIVATE KEY", "NEVERPRINTED"] {
        assert!(!all.contains(secret), "`{secret}` leaked into the logs:\n{all}");
    }
    let ledger = std::fs::read_to_string(w.dir.path().join("ledger.jsonl")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(ledger.lines().next().unwrap()).unwrap();
    assert_eq!(entry["job"], "1009");
    assert_eq!(
        std::fs::metadata(w.dir.path().join("ledger.jsonl")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    w.assert_nothing_left();
}

#[test]
fn every_stage_name_gitlab_runner_may_pass_is_run() {
    let w = World::new();
    let builds = w.builds_dir();
    let mut job = w.job("1010", "echo BUILD");
    // A release step, the worktree clearing before a second get_sources attempt, after_script
    // and the artifact stages, in gitlab-runner's order.
    job.stages = vec![
        ("prepare_script".into(), "echo PREPARE".into()),
        ("get_sources".into(), "false".into()),
        ("clear_worktree".into(), "echo CLEAR".into()),
        ("get_sources".into(), format!("mkdir -p '{builds}/group/project' && echo SOURCES")),
        ("restore_cache".into(), "echo RESTORE".into()),
        ("download_artifacts".into(), "echo DOWNLOAD".into()),
        ("build_script".into(), "echo BUILD".into()),
        ("step_release".into(), "echo RELEASE".into()),
        ("after_script".into(), "echo AFTER".into()),
        ("archive_cache".into(), "echo ARCHIVE".into()),
        ("upload_artifacts_on_success".into(), "echo UPLOAD".into()),
        ("cleanup_file_variables".into(), "echo CLEANUP-FILES".into()),
    ];
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    for (stage, body) in &job.stages {
        let exit = attempt.run_stage(stage, body).unwrap();
        let expected = if body == "false" { Exit::Code(1) } else { Exit::Code(0) };
        assert_eq!(exit, expected, "stage `{stage}`: {}", attempt.log.text());
    }
    let log = attempt.log.text();
    for marker in ["PREPARE", "CLEAR", "SOURCES", "RELEASE", "AFTER", "UPLOAD", "CLEANUP-FILES"] {
        assert!(log.lines().any(|l| l == marker), "`{marker}` missing:\n{log}");
    }
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn a_prepare_retried_without_cleanup_releases_the_earlier_attempts_instance() {
    let w = World::new();
    let job = w.job("1011", "true");
    let mut first = w.attempt(&job);
    assert!(first.prepare().unwrap().success(), "{}", first.log.text());
    let old = w.emulator.instances()[0].id.clone();
    // A second preparation attempt of the same job (its own config and secret), whose cleanup
    // never ran in between.
    let mut second = w.attempt(&job);
    assert!(second.prepare().unwrap().success(), "{}", second.log.text());
    let log = second.log.text();
    assert!(
        log.contains(&format!("Releasing instance {old} left by an earlier attempt of this job")),
        "{log}"
    );
    assert_eq!(w.live(), 1, "only the new attempt's instance is alive");
    assert_eq!(w.emulator.instances().len(), 2);
    assert!(second.cleanup().unwrap().success(), "{}", second.runner_log.text());
    w.assert_nothing_left();
}
