//! The driver against a strict gitlab-runner stand-in: real-shaped scripts over 100 KB,
//! gitlab-runner's exit rules, cancel and the guarded helper calls (gitlab-runner
//! v18.3.0-1857-gd79f3e7b8, `shells/abstract.go`, `common/build.go`,
//! `executors/custom/command/command.go`). The last tests drive the stand-in with a fake
//! driver, to prove its own rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aliyun_spot_executor::demo::gitlab::{Attempt, Executables, Exit, Failure, Job, Timeouts};
use aliyun_spot_executor::emulator::Faults;
use sha2::{Digest, Sha256};
use toml::Value;

use crate::executor::World;

fn fake_helper() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake-gitlab-runner").display().to_string()
}

/// A world whose instances get the fake `gitlab-runner` uploaded.
fn helper_world() -> World {
    World::with(
        Faults::default(),
        &[
            ("helper", "install", Value::String("upload".into())),
            ("helper", "upload_amd64", Value::String(fake_helper())),
        ],
    )
}

fn show(out: &aliyun_spot_executor::demo::gitlab::JobOutcome) -> String {
    format!(
        "STAGES: {:?}\nFAILURE: {:?}\nJOB LOG:\n{}\nRUNNER LOG:\n{}\n",
        out.stages, out.failure, out.job_log, out.runner_log
    )
}

/// gitlab-runner's `Noticef` and `Warningf` lines (`shells/bash.go`, `helpers/ansi_colors.go`).
fn notice(text: &str) -> String {
    format!("\x1b[32;1m{text}\x1b[0;m")
}
fn warning(text: &str) -> String {
    format!("\x1b[0;33m{text}\x1b[0;m")
}

const GREETING: &str = "héllo 中文 ✓ 'single' \"double\" $HOME `tick` \\ end";

#[test]
fn a_job_whose_scripts_are_over_100_kb_passes_with_its_non_ascii_variables_intact() {
    let w = helper_world();
    // The fake helper runs on the instance, whose /tmp, /root, /builds and /cache are its own:
    // its record goes where both sides see the same directory, whatever the checkout's path.
    let shared = tempfile::Builder::new().prefix("aliyun-spot-test-").tempdir_in("/var/tmp").unwrap();
    let calls = shared.path().join("helper-calls");
    let mut job = Job::realistic(
        42,
        8001,
        &w.builds_dir(),
        &[
            "printf 'GREETING=%s\\n' \"$GREETING\"",
            "printf 'CA=%s\\n' \"$(sha256sum < \"$CI_SERVER_TLS_CA_FILE\" | cut -c1-64)\"",
            "echo \"DIRS=$CI_BUILDS_DIR|$CI_PROJECT_DIR|$PWD\"",
            "mkdir -p dist && echo built > dist/out.txt",
        ],
    )
    .with_cache_and_artifacts(&["dist"]);
    job.variables.push(("GREETING".into(), GREETING.into()));
    job.variables.push(("FAKE_GITLAB_RUNNER_CALLS".into(), calls.display().to_string()));
    job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".into());
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", show(&out));
    let biggest = out.scripts.iter().map(|(_, n)| *n).max().unwrap_or(0);
    assert!(biggest > 100 * 1024, "the scripts are as big as a real runner's: {:?}", out.scripts);
    let ca = &job.files.iter().find(|(k, _)| k == "CI_SERVER_TLS_CA_FILE").unwrap().1;
    let ca_sum: String = Sha256::digest(ca.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let project = format!("{}/group/project", w.builds_dir());
    for line in [
        format!("GREETING={GREETING}"),
        format!("CA={ca_sum}"),
        format!("DIRS={}|{project}|{project}", w.builds_dir()),
        "after_script: job status success".to_string(),
        "Running on ci-runner-amd64-spot-".to_string(),
        notice("$ mkdir -p dist && echo built > dist/out.txt"),
        notice("Successfully extracted cache"),
        notice("Created cache"),
        "fake gitlab-runner: artifacts-uploader done".to_string(),
    ] {
        assert!(out.job_log.lines().any(|l| l.starts_with(&line)), "missing `{line}`:\n{}", show(&out));
    }
    // config's `hostname` names the executor in the prepare message (`shells/bash.go`).
    assert!(out.job_log.contains(" via aliyun-spot-executor-amd64..."), "{}", show(&out));
    let calls = std::fs::read_to_string(&calls).unwrap();
    let calls: Vec<&str> = calls.lines().filter(|l| *l != "--version").collect();
    let archive = "../../../cache/group/project/default-protected/cache.zip";
    assert_eq!(
        calls,
        [
            format!("cache-extractor --file {archive} --timeout 10"),
            format!("cache-archiver --file {archive} --alternate-file {archive} --timeout 10 --path dist"),
            format!(
                "artifacts-uploader --url https://gitlab.example.com/ --token {} --id 8001 --timeout 1h0m0s \
                 --response-header-timeout 10m0s --path dist",
                job.token
            ),
        ],
        "{}",
        show(&out)
    );
    assert!(!out.job_log.contains("NEVERPRINTED"), "the job token never reaches the log");
    w.assert_nothing_left();
}

#[test]
fn the_helper_missing_on_the_instance_prints_missing_gitlab_runner_and_the_job_passes() {
    let w = helper_world();
    let mut job = Job::new(42, 8002, &w.builds_dir(), "echo BUILD").with_cache_and_artifacts(&["dist"]);
    job.variables.push(("FAKE_GITLAB_RUNNER_MISSING".into(), "1".into()));
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", show(&out));
    for action in ["Extracting cache", "Creating cache", "Uploading artifacts"] {
        let line = warning(&format!("Missing gitlab-runner. {action} is disabled."));
        assert!(out.job_log.lines().any(|l| l == line), "missing `{line:?}`:\n{}", show(&out));
    }
    w.assert_nothing_left();
}

#[test]
fn a_failing_scripts_exit_code_is_what_gitlab_runner_reports() {
    let w = World::new();
    let mut job = Job::realistic(42, 8003, &w.builds_dir(), &["echo before", "exit 42", "echo never"]);
    job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".into());
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert_eq!(
        out.failure,
        Some(Failure::Build { stage: "build_script".into(), code: 42 }),
        "{}",
        show(&out)
    );
    assert!(out.job_log.lines().any(|l| l == "after_script: job status failed"), "{}", show(&out));
    assert!(!out.job_log.lines().any(|l| l == "never"), "{}", show(&out));
    assert_eq!(out.cleanup, Some(Exit::Code(0)), "{}", show(&out));
    w.assert_nothing_left();
}

#[test]
fn cancel_stops_the_script_then_after_script_runs_as_canceled_and_cleanup_releases() {
    let w = World::new();
    let marker = format!("standin-cancel-{}", std::process::id());
    let mut job =
        Job::new(42, 8004, &w.builds_dir(), &format!("echo STARTED\nbash -c 'exec -a {marker} sleep 300'"))
            .with_cache_and_artifacts(&["dist"])
            .when_always();
    job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".into());
    let mut attempt = w.attempt(&job);
    // A short grace period, so that a driver that ignored SIGTERM would show as a kill.
    attempt.timeouts.graceful_kill = Duration::from_secs(30);
    let log = attempt.log.clone();
    let cancel = attempt.canceller();
    let runner = {
        let job = job.clone();
        std::thread::spawn(move || attempt.run_job(&job).unwrap())
    };
    assert!(log.wait_for("STARTED\n", Duration::from_secs(120)), "{}", log.text());
    cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    let out = runner.join().unwrap();
    assert_eq!(out.failure, Some(Failure::Canceled), "{}", show(&out));
    let names: Vec<&str> = out.stages.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        names,
        [
            "prepare_script",
            "get_sources",
            "restore_cache",
            "build_script",
            "after_script",
            "archive_cache_on_failure",
            "upload_artifacts_on_failure",
            "cleanup_file_variables"
        ],
        "{}",
        show(&out)
    );
    let build = &out.stages[3].1;
    assert_eq!(
        *build,
        Exit::Code(2),
        "the driver ends a terminated stage as a system failure: {}",
        show(&out)
    );
    assert!(out.job_log.lines().any(|l| l == "after_script: job status canceled"), "{}", show(&out));
    let alive = std::process::Command::new("pgrep").args(["-f", &marker]).status().unwrap().success();
    assert!(!alive, "the remote script survived the cancel");
    assert_eq!(out.cleanup, Some(Exit::Code(0)), "{}", show(&out));
    w.assert_nothing_left();
}

/// A fake driver honouring the custom executor's contract, for the stand-in's own rules:
/// `run` runs the script locally and reports its code through `BUILD_EXIT_CODE_FILE`.
fn fake_driver(dir: &Path, config_json: &str) -> Executables {
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        p
    };
    Executables {
        config: write(
            "config",
            &format!(
                "echo \"CONFIG SAW [$CUSTOM_ENV_CI_BUILDS_DIR][$CUSTOM_ENV_CI_PROJECT_DIR]\" >&2\necho '{config_json}'"
            ),
        ),
        prepare: write("prepare", "exit 0"),
        run: write(
            "run",
            "[ -n \"$FAKE_RUN_IGNORES_TERM\" ] && trap '' TERM\n\
             case \"$2\" in get_sources) n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count;; esac\n\
             [ \"$2\" = get_sources ] && [ \"$(cat count)\" -le \"${FAKE_SOURCES_FAILURES:-0}\" ] && { echo 'fetch failed'; exit 1; }\n\
             [ \"$2\" = build_script ] && [ -n \"$FAKE_EXIT\" ] && exit \"$FAKE_EXIT\"\n\
             bash \"$1\"; code=$?\n[ $code = 0 ] && exit 0\necho $code > \"$BUILD_EXIT_CODE_FILE\"; exit 1",
        ),
        cleanup: write(
            "cleanup",
            "[ -n \"$FAKE_MARKER\" ] && pgrep -f \"$FAKE_MARKER\" >/dev/null && echo 'RUN STILL ALIVE'\necho CLEANUP",
        ),
        args: Vec::new(),
    }
}

fn base_env(extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    env
}

#[test]
fn the_stand_in_retries_get_sources_and_takes_its_directories_from_config() {
    let dir = crate::private_tempdir();
    let builds = dir.path().join("from-config").display().to_string();
    let exes = fake_driver(dir.path(), &format!("{{\"builds_dir\":\"{builds}\",\"hostname\":\"box-1\"}}"));
    let mut job = Job::new(42, 8005, "/runner/builds", "echo \"DIRS=$CI_BUILDS_DIR|$CI_PROJECT_DIR\"");
    job.variables.push(("GET_SOURCES_ATTEMPTS".into(), "3".into()));
    let attempt = Attempt::new(exes, base_env(&[("FAKE_SOURCES_FAILURES", "2")]), &job).unwrap();
    let out = attempt.run_job(&job).unwrap();
    let names: Vec<&str> = out.stages.iter().map(|(s, _)| s.as_str()).collect();
    // `attemptExecuteStage`: clear_worktree before the second attempt only.
    assert_eq!(
        names,
        [
            "prepare_script",
            "get_sources",
            "clear_worktree",
            "get_sources",
            "get_sources",
            "build_script",
            "cleanup_file_variables"
        ],
        "{}",
        show(&out)
    );
    assert_eq!(out.failure, None, "{}", show(&out));
    assert!(out.job_log.lines().any(|l| l == "CONFIG SAW [][]"), "empty during config: {}", show(&out));
    let line = format!("DIRS={builds}|{builds}/group/project");
    assert!(out.job_log.lines().any(|l| l == line), "missing `{line}`: {}", show(&out));
    assert!(out.job_log.lines().any(|l| l.starts_with("Running on ") && l.ends_with(" via box-1...")));
}

#[test]
fn an_exit_code_other_than_1_or_2_is_an_unknown_failure() {
    let dir = crate::private_tempdir();
    let exes = fake_driver(dir.path(), "{}");
    let job = Job::new(42, 8006, &dir.path().join("b").display().to_string(), "true");
    let attempt = Attempt::new(exes, base_env(&[("FAKE_EXIT", "3")]), &job).unwrap();
    let out = attempt.run_job(&job).unwrap();
    assert_eq!(
        out.failure,
        Some(Failure::Unknown { stage: "build_script".into(), code: 3 }),
        "{}",
        show(&out)
    );
}

#[test]
fn the_job_timeout_terminates_then_kills_the_stage_and_skips_the_rest() {
    let dir = crate::private_tempdir();
    let exes = fake_driver(dir.path(), "{}");
    // A `run` that ignores SIGTERM: only SIGKILL, after the grace period, ends it.
    let mut job = Job::new(
        42,
        8007,
        &dir.path().join("b").display().to_string(),
        "trap '' TERM; sleep 30; echo SURVIVED",
    );
    job.after_script = Some("echo AFTER".into());
    let mut attempt = Attempt::new(exes, base_env(&[]), &job).unwrap();
    attempt.timeouts = Timeouts {
        job: Duration::from_secs(8),
        graceful_kill: Duration::from_millis(500),
        // Long enough that, without SIGKILL, the script would outlive it and print SURVIVED.
        force_kill: Duration::from_secs(120),
        ..attempt.timeouts.clone()
    };
    let out = attempt.run_job(&job).unwrap();
    assert_eq!(out.failure, Some(Failure::Timedout), "{}", show(&out));
    let last = out.stages.last().unwrap();
    assert_eq!(last.0, "build_script", "nothing runs after the job timeout: {}", show(&out));
    assert!(!out.job_log.contains("AFTER"), "{}", show(&out));
    assert!(
        !out.job_log.lines().any(|l| l == "SURVIVED"),
        "SIGKILL ended what ignored SIGTERM: {}",
        show(&out)
    );
    assert_eq!(out.cleanup, Some(Exit::Code(0)), "cleanup still runs: {}", show(&out));
}

#[test]
fn after_the_job_timeout_cleanup_overlaps_a_run_that_is_still_dying() {
    let dir = crate::private_tempdir();
    let exes = fake_driver(dir.path(), "{}");
    let marker = format!("standin-dying-{}", std::process::id());
    let job = Job::new(
        42,
        8008,
        &dir.path().join("b").display().to_string(),
        &format!("exec -a {marker} sleep 60"),
    );
    let env = base_env(&[("FAKE_RUN_IGNORES_TERM", "1"), ("FAKE_MARKER", &marker)]);
    let mut attempt = Attempt::new(exes, env, &job).unwrap();
    attempt.timeouts = Timeouts {
        job: Duration::from_secs(3),
        graceful_kill: Duration::from_secs(6),
        wait_for_build_finish: Duration::from_secs(1),
        ..attempt.timeouts.clone()
    };
    let out = attempt.run_job(&job).unwrap();
    assert_eq!(out.failure, Some(Failure::Timedout), "{}", show(&out));
    assert!(
        out.job_log.lines().any(|l| l == "WARNING: Timed out waiting for the build to finish"),
        "{}",
        show(&out)
    );
    assert!(
        out.runner_log.lines().any(|l| l == "RUN STILL ALIVE"),
        "cleanup overlapped the dying run: {}",
        show(&out)
    );
    // The kill sequence goes on: SIGKILL after the grace period ends the stage.
    let gone = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !std::process::Command::new("pgrep").args(["-f", &marker]).status().unwrap().success()
    });
    assert!(gone, "the stage outlived SIGKILL");
}

#[test]
fn runner_script_timeout_stops_the_script_and_after_script_sees_timedout() {
    let dir = crate::private_tempdir();
    let exes = fake_driver(dir.path(), "{}");
    let mut job = Job::new(42, 8009, &dir.path().join("b").display().to_string(), "sleep 60; echo SURVIVED");
    job.variables.push(("RUNNER_SCRIPT_TIMEOUT".into(), "2s".into()));
    job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".into());
    let out = Attempt::new(exes, base_env(&[]), &job).unwrap().run_job(&job).unwrap();
    assert_eq!(out.failure, Some(Failure::Timedout), "{}", show(&out));
    assert!(out.job_log.lines().any(|l| l == "after_script: job status timedout"), "{}", show(&out));
    assert!(!out.job_log.lines().any(|l| l == "SURVIVED"), "{}", show(&out));
    let names: Vec<&str> = out.stages.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        names,
        ["prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"]
    );
}
