//! gitlab-runner's control flow after `prepare`: the stage order, retries, deadlines, the
//! cancel sequence and the exit rules.
//!
//! Followed: gitlab-runner v18.3.0-1857-gd79f3e7b8, `common/build.go` (`executeScript`,
//! `executePrepareScripts`, `executeUserScripts`, `executeAfterScript`, `attemptExecuteStage`,
//! `runtimeStateAndError`, `pickPriorityError`, `removeFileBasedVariables`),
//! `common/build_settings.go` (the `*_ATTEMPTS` clamping), `helpers/retry/retry.go` (the pause
//! between attempts), `executors/custom/command/command.go` (exit codes) and
//! `executors/custom/config.go`, `executors/custom/consts.go`, `common/consts.go`,
//! `helpers/process/killer.go` (timeouts).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{Attempt, Exit, Job, JobOutcome};
use crate::demo::shell::BashWriter;

/// The timeouts gitlab-runner applies to the executables.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// `config_exec_timeout` (default one hour, `defaultConfigExecTimeout`).
    pub config_exec: Duration,
    /// `prepare_exec_timeout` (default one hour, `defaultPrepareExecTimeout`).
    pub prepare_exec: Duration,
    /// `cleanup_exec_timeout` (default one hour, `defaultCleanupExecTimeout`).
    pub cleanup_exec: Duration,
    /// `graceful_kill_timeout`: SIGTERM to SIGKILL (default ten minutes, `GracefulTimeout`).
    pub graceful_kill: Duration,
    /// `force_kill_timeout`: how long SIGKILL is waited for (default ten seconds, `KillTimeout`).
    pub force_kill: Duration,
    /// The job timeout (`Build.GetBuildTimeout`), for every stage after `prepare`.
    pub job: Duration,
    /// `RUNNER_AFTER_SCRIPT_TIMEOUT` (default five minutes, `AfterScriptTimeout`).
    pub after_script: Duration,
    /// `RUNNER_SCRIPT_TIMEOUT` for the user steps together (none by default: the job's).
    pub script: Option<Duration>,
    /// How long a stopped build is waited for before `cleanup_exec` runs anyway (five
    /// minutes, `WaitForBuildFinishTimeout`).
    pub wait_for_build_finish: Duration,
}

impl Timeouts {
    /// gitlab-runner's defaults, with the job's timeout and its `RUNNER_AFTER_SCRIPT_TIMEOUT`.
    pub fn for_job(job: &Job) -> Timeouts {
        // `getStageTimeoutContexts`: a positive Go duration replaces the default.
        let stage_timeout = |name: &str| {
            let value = job.variables.iter().rev().find(|(k, _)| k == name);
            value.and_then(|(_, v)| go_duration(v)).filter(|d| !d.is_zero())
        };
        let after_script = stage_timeout("RUNNER_AFTER_SCRIPT_TIMEOUT").unwrap_or(Duration::from_secs(300));
        let hour = Duration::from_secs(3600);
        Timeouts {
            config_exec: hour,
            prepare_exec: hour,
            cleanup_exec: hour,
            graceful_kill: Duration::from_secs(600),
            force_kill: Duration::from_secs(10),
            job: if job.timeout.is_zero() { Duration::from_secs(7200) } else { job.timeout },
            after_script,
            script: stage_timeout("RUNNER_SCRIPT_TIMEOUT"),
            wait_for_build_finish: Duration::from_secs(300),
        }
    }
}

/// Go's `time.ParseDuration` for the forms people write (`90s`, `5m`, `1h30m`).
fn go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next()?);
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        total += n * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
    }
    num.is_empty().then(|| Duration::from_secs_f64(total))
}

/// Why an executable was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its deadline passed.
    Deadline,
    /// The job was cancelled.
    Canceled,
}

/// How a job failed, as gitlab-runner reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `run` exited with `BUILD_FAILURE_EXIT_CODE` (1): a `common.BuildError` whose exit code
    /// is the first line of `BUILD_EXIT_CODE_FILE` (1 when there is no file).
    Build {
        /// The stage.
        stage: String,
        /// The script's exit code.
        code: i32,
    },
    /// `run` exited with `SYSTEM_FAILURE_EXIT_CODE` (2).
    System {
        /// The stage.
        stage: String,
    },
    /// Any other exit (a signal counts as -1), or exit 1 with a file that is not a number
    /// (code 2): `UnknownFailureError`.
    Unknown {
        /// The stage.
        stage: String,
        /// The code gitlab-runner reports.
        code: i32,
    },
    /// Cancelled (`BuildRunRuntimeCanceled`).
    Canceled,
    /// The job timeout passed (`BuildRunRuntimeTimedout`).
    Timedout,
}

/// `command.waitForCommand` and `parseBuildFailure`.
fn classify(stage: &str, exit: &Exit, exit_code_file: &std::path::Path) -> Option<Failure> {
    let stage = stage.to_string();
    match exit {
        Exit::Code(0) => None,
        Exit::Code(1) => Some(match std::fs::read_to_string(exit_code_file) {
            Err(_) => Failure::Build { stage, code: 1 },
            Ok(text) => match text.lines().next().unwrap_or_default().parse::<i32>() {
                Ok(code) => Failure::Build { stage, code },
                Err(_) => Failure::Unknown { stage, code: 2 },
            },
        }),
        Exit::Code(2) => Some(Failure::System { stage }),
        Exit::Code(code) => Some(Failure::Unknown { stage, code: *code }),
        Exit::Signal(_) => Some(Failure::Unknown { stage, code: -1 }),
    }
}

/// Whether a cancel reaches a stage, and what it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    /// Not at all (after the user steps the cancel function is the script's, already done).
    Ignored,
    /// The user steps: the script context, after which after_script and the rest run.
    Script,
    /// The stages before them: the whole build.
    Job,
}

/// The `*_ATTEMPTS` variable `name`, clamped to 1..=10 (default 1).
fn attempts(attempt: &Attempt, name: &str) -> usize {
    let key = format!("CUSTOM_ENV_{name}");
    let value = attempt.custom_env.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.trim().to_string());
    value.and_then(|v| v.parse::<i64>().ok()).unwrap_or(1).clamp(1, 10) as usize
}

impl Attempt {
    /// Runs one stage until it ends, its deadline passes or (when `cancellable`) the job is
    /// cancelled; records it and returns its failure.
    fn stage(
        &mut self,
        name: &str,
        body: &str,
        deadline: Instant,
        cancel: Cancel,
        outcome: &mut JobOutcome,
    ) -> Result<Option<Failure>> {
        if Instant::now() >= deadline {
            // `executeStage` returns the context's error without running anything.
            return Ok(Some(Failure::Timedout));
        }
        let running = self.start_stage(name, body)?;
        let flag = (cancel != Cancel::Ignored).then(|| self.cancel.clone());
        let timeouts = self.timeouts.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(running.wait_until(Some(deadline), flag.as_deref(), &timeouts));
        });
        // When the whole build stops (the job timeout, or a cancel before the user steps),
        // `Build.run` waits `WaitForBuildFinishTimeout` for the stage and then goes on to
        // `cleanup_exec` while the stage may still be dying (`common/build.go`, `run`,
        // `waitForBuildFinish`); a cancel of the user steps or an after_script timeout waits
        // for the whole kill sequence (`command.Run`).
        let mut build_stopped: Option<Instant> = None;
        let (exit, stop) = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => break r?,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the waiter of stage `{name}` ended without a result")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            let canceled = cancel == Cancel::Job && self.cancel.load(std::sync::atomic::Ordering::SeqCst);
            if canceled || Instant::now() >= self.job_deadline {
                let since = *build_stopped.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.timeouts.wait_for_build_finish {
                    self.log.push("WARNING: Timed out waiting for the build to finish\n");
                    let stop = if canceled { Stop::Canceled } else { Stop::Deadline };
                    // Still dying: its exit is not known.
                    break (Exit::Signal(libc::SIGTERM), Some(stop));
                }
            }
        };
        if exit == Exit::Code(1) && outcome.build_exit_code.is_none() {
            // gitlab-runner reads the file right after the stage that failed.
            outcome.build_exit_code = std::fs::read_to_string(self.build_exit_code_file()).ok();
        }
        outcome.stages.push((name.to_string(), exit.clone()));
        Ok(match stop {
            Some(Stop::Canceled) => Some(Failure::Canceled),
            Some(Stop::Deadline) => Some(Failure::Timedout),
            None => classify(name, &exit, &self.build_exit_code_file()),
        })
    }

    /// A stage with gitlab-runner's retries (`attemptExecuteStage`): `before(attempt)` runs
    /// first, the pauses follow the retry helper's backoff (1 s doubling up to 5 s); a stop
    /// (cancel or deadline) is not retried.
    fn stage_with_attempts(
        &mut self,
        name: &str,
        body: &str,
        tries: usize,
        deadline: Instant,
        outcome: &mut JobOutcome,
        mut before: impl FnMut(&mut Attempt, usize, &mut JobOutcome) -> Result<Option<Failure>>,
    ) -> Result<Option<Failure>> {
        let mut pause = Duration::from_secs(1);
        let mut last = None;
        for attempt in 0..tries {
            if attempt > 0 {
                self.log.push("Retrying...\n");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            last = match before(self, attempt, outcome)? {
                Some(f) => Some(f),
                None => self.stage(name, body, deadline, Cancel::Job, outcome)?,
            };
            match &last {
                None => return Ok(None),
                Some(Failure::Canceled | Failure::Timedout) => break,
                Some(_) => {}
            }
        }
        Ok(last)
    }

    /// The stages after `prepare` as `Build.executeScript` runs them: `prepare_script` (a
    /// failure ends the job); `get_sources` up to `GET_SOURCES_ATTEMPTS` times with
    /// `clear_worktree` before the second attempt, `restore_cache` and `download_artifacts`
    /// with their `*_ATTEMPTS`; when those passed, the user steps (stopping at the first
    /// failure) and `after_script` with `CI_JOB_STATUS` rewritten to `success`, `failed` or
    /// `canceled` (its errors ignored, `AFTER_SCRIPT_IGNORE_ERRORS`); then the `_on_success`
    /// or `_on_failure` cache and artifact stages, and `cleanup_file_variables`.
    ///
    /// A cancel during the user steps stops the running step and lets the rest run (the
    /// script context only is cancelled); a cancel before them, or the job timeout anywhere,
    /// stops the running stage and skips every later one (the build context is done). The
    /// `_on_failure` stages run only when the job has them (cache and artifacts with `when:
    /// on_failure` or `always`); the default `on_success` ones are skipped after a failure
    /// (`ShouldCache`, `writeUploadArtifacts`).
    pub(super) fn run_stages(&mut self, job: &Job, outcome: &mut JobOutcome) -> Result<()> {
        // A test may shorten `timeouts.job` after creating the attempt.
        let deadline = self.job_deadline.min(Instant::now() + self.timeouts.job);
        self.job_deadline = deadline;
        let body = |name: &str| job.stages.iter().find(|(s, _)| s == name).map(|(_, b)| b.clone());
        let is_user = |s: &str| s == "build_script" || s.starts_with("step_");
        let end = |outcome: &mut JobOutcome, f: Option<Failure>| outcome.failure = f;

        if let Some(b) = body("prepare_script") {
            if let Some(f) = self.stage("prepare_script", &b, deadline, Cancel::Job, outcome)? {
                end(outcome, Some(f));
                return Ok(());
            }
        }
        let mut err = None;
        if let Some(b) = body("get_sources") {
            let clear = body("clear_worktree").unwrap_or_else(|| self.clear_worktree_body());
            let tries = attempts(self, "GET_SOURCES_ATTEMPTS");
            err =
                self.stage_with_attempts("get_sources", &b, tries, deadline, outcome, |a, attempt, o| {
                    if attempt == 1 {
                        return a.stage("clear_worktree", &clear, deadline, Cancel::Job, o);
                    }
                    Ok(None)
                })?;
        }
        for (name, var) in [
            ("restore_cache", "RESTORE_CACHE_ATTEMPTS"),
            ("download_artifacts", "ARTIFACT_DOWNLOAD_ATTEMPTS"),
        ] {
            if let (None, Some(b)) = (&err, body(name)) {
                let tries = attempts(self, var);
                err = self.stage_with_attempts(name, &b, tries, deadline, outcome, |_, _, _| Ok(None))?;
            }
        }
        if matches!(err, Some(Failure::Canceled | Failure::Timedout)) {
            end(outcome, err);
            return Ok(());
        }
        if err.is_none() {
            let script_deadline = self.timeouts.script.map_or(deadline, |t| deadline.min(Instant::now() + t));
            for (name, b) in job.stages.iter().filter(|(s, _)| is_user(s)) {
                err = self.stage(name, b, script_deadline, Cancel::Script, outcome)?;
                if err.is_some() {
                    break;
                }
            }
            if err == Some(Failure::Canceled) {
                // `executeUserScripts`: "script canceled externally (UI, API)".
                self.log.push("WARNING: script canceled externally (UI, API)\n");
            }
            // The job timeout ends the build; `RUNNER_SCRIPT_TIMEOUT` ends only the script, and
            // after_script sees `timedout` (`runtimeStateAndError` on `ErrJobScriptTimeout`).
            if err == Some(Failure::Timedout) && Instant::now() >= deadline {
                end(outcome, err);
                return Ok(());
            }
            let status = match err {
                None => "success",
                Some(Failure::Canceled) => "canceled",
                Some(Failure::Timedout) => "timedout",
                Some(_) => "failed",
            };
            self.set_job_variable("CI_JOB_STATUS", status);
            let after = match &job.after_script {
                Some(text) => Some(self.after_script_body(text)),
                None => body("after_script"),
            };
            if let Some(b) = after {
                let after_deadline = deadline.min(Instant::now() + self.timeouts.after_script);
                let after_err = self.stage("after_script", &b, after_deadline, Cancel::Ignored, outcome)?;
                if after_err == Some(Failure::Timedout) && Instant::now() >= deadline {
                    end(outcome, Some(Failure::Timedout));
                    return Ok(());
                }
            }
        }
        let (cache, upload) = if err.is_none() {
            ("archive_cache", "upload_artifacts_on_success")
        } else {
            ("archive_cache_on_failure", "upload_artifacts_on_failure")
        };
        let mut later = Vec::new();
        for name in [cache, upload] {
            if let Some(b) = body(name) {
                later.push(self.stage(name, &b, deadline, Cancel::Ignored, outcome)?);
            }
        }
        // `pickPriorityError`: the job's error, else the cache's, else the artifacts'.
        let err = err.or(later.into_iter().flatten().next());
        if err == Some(Failure::Timedout) && Instant::now() >= deadline {
            end(outcome, err);
            return Ok(());
        }
        if let Some(b) = body("cleanup_file_variables") {
            // `removeFileBasedVariables`: a failure is only logged.
            self.stage("cleanup_file_variables", &b, deadline, Cancel::Ignored, outcome)?;
        }
        end(outcome, err);
        Ok(())
    }

    /// `writeClearWorktreeScript` in `shells/abstract.go`.
    fn clear_worktree_body(&self) -> String {
        let mut w = BashWriter::new(&self.project_dir);
        w.notice("Deleting tracked and untracked files...");
        w.line(&format!("if [ -d \"{}\" ]; then", self.project_dir));
        w.cd(&self.project_dir);
        w.command(&["git", "rm", "-rf", "--ignore-unmatch", "--quiet", "."]);
        w.command(&["git", "clean", "-ffdx", "-q"]);
        w.line("fi");
        w.body().to_string()
    }

    /// `writeAfterScript` in `shells/abstract.go` for the job's `after_script` text.
    fn after_script_body(&self, text: &str) -> String {
        let mut w = BashWriter::new(&self.project_dir);
        w.cd(&self.project_dir);
        w.notice("Running after script...");
        w.commands(&[text.to_string()]);
        w.body().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_and_exit_rules() {
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(go_duration("5"), None);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build_exit_code");
        let build = |code| Some(Failure::Build { stage: "s".into(), code });
        assert_eq!(classify("s", &Exit::Code(0), &file), None);
        assert_eq!(classify("s", &Exit::Code(1), &file), build(1), "no file: exit 1 itself");
        std::fs::write(&file, "42\n7\n").unwrap();
        assert_eq!(classify("s", &Exit::Code(1), &file), build(42), "the first line");
        std::fs::write(&file, "forty-two\n").unwrap();
        assert_eq!(
            classify("s", &Exit::Code(1), &file),
            Some(Failure::Unknown { stage: "s".into(), code: 2 })
        );
        assert_eq!(classify("s", &Exit::Code(2), &file), Some(Failure::System { stage: "s".into() }));
        assert_eq!(
            classify("s", &Exit::Code(3), &file),
            Some(Failure::Unknown { stage: "s".into(), code: 3 })
        );
        assert_eq!(
            classify("s", &Exit::Signal(9), &file),
            Some(Failure::Unknown { stage: "s".into(), code: -1 })
        );
    }
}
