//! A stand-in for gitlab-runner's custom executor, driving the real stage binaries.
//!
//! Why it exists: `aliyun-spot demo` and the integration tests must call `config`, `prepare`,
//! `run` and `cleanup` exactly as gitlab-runner 18.x does (docs/gitlab-runner.md; the source
//! files cited are gitlab-runner v18.3.0-1857-gd79f3e7b8), not
//! through shortcuts: a per-attempt temporary directory as working directory, stdin from
//! `/dev/null`, each executable leading its own process group, the fixed variables
//! (`BUILD_FAILURE_EXIT_CODE`, `SYSTEM_FAILURE_EXIT_CODE`, `BUILD_EXIT_CODE_FILE`,
//! `JOB_RESPONSE_FILE`, `TMPDIR`), the job payload as `response.json` (0600, the schema of
//! gitlab-runner's `common.JobResponse`), `job_env` from `config`'s JSON, every job variable as
//! `CUSTOM_ENV_*`, one fresh `script<random>/script` (0700) per `run` with the stage name as the
//! last argument, bash scripts shaped like gitlab-runner's, the preparation retry (up to three
//! attempts, each with its own temporary directory, `config` and `prepare`, with `cleanup`
//! after each failed one), the stage order and failure branches, and cleanup output kept out of
//! the job log. Output is collected as it arrives, so a caller can watch the job log while a
//! stage is still running.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::demo::shell::{BashWriter, Variable};

mod flow;
mod job;

pub use flow::{Failure, Stop, Timeouts};
pub use job::Job;

/// The four executables gitlab-runner is configured with (`config_exec` … `cleanup_exec`).
#[derive(Debug, Clone)]
pub struct Executables {
    /// `config_exec`.
    pub config: PathBuf,
    /// `prepare_exec`.
    pub prepare: PathBuf,
    /// `run_exec`.
    pub run: PathBuf,
    /// `cleanup_exec`.
    pub cleanup: PathBuf,
    /// Arguments placed before everything else on every command line (`*_args`).
    pub args: Vec<String>,
}

impl Executables {
    /// The stage binaries installed beside `dir` (as `cargo install` lays them out).
    pub fn in_dir(dir: &Path) -> Executables {
        Executables {
            config: dir.join("config"),
            prepare: dir.join("prepare"),
            run: dir.join("run"),
            cleanup: dir.join("cleanup"),
            args: Vec::new(),
        }
    }
}

/// A job log that can be read while it is being written.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<String>, Condvar)>,
}

impl Log {
    /// Appends text.
    pub fn push(&self, text: &str) {
        let (m, c) = &*self.inner;
        m.lock().unwrap_or_else(|e| e.into_inner()).push_str(text);
        c.notify_all();
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the log contains `needle`; false when `timeout` passes first.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let (m, c) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = c.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// How one executable ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

/// gitlab-runner's preparation attempts (`PreparationRetries` in `common/consts.go`, used by
/// `Build.retryCreateExecutor` in `common/build.go`, gitlab-runner v18.3.0 and main).
pub const PREPARATION_RETRIES: usize = 3;
/// The pause between them (`PreparationRetryInterval`, same files; a `var` there, which
/// gitlab-runner's own tests set to 0 in `common/build_test.go`: see
/// [`Attempt::with_retry_interval`]).
pub const PREPARATION_RETRY_INTERVAL: Duration = Duration::from_secs(3);

/// The result of a whole job.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// How `config` ended.
    pub config: Exit,
    /// How `prepare` ended (None when config failed).
    pub prepare: Option<Exit>,
    /// Each `run` invocation: stage name and how it ended.
    pub stages: Vec<(String, Exit)>,
    /// How `cleanup` ended.
    pub cleanup: Option<Exit>,
    /// The job log (config's stderr, prepare's and run's output).
    pub job_log: String,
    /// The runner's own log (cleanup's output).
    pub runner_log: String,
    /// What `BUILD_EXIT_CODE_FILE` held right after the first stage that exited 1.
    pub build_exit_code: Option<String>,
    /// The JSON config printed (parsed), when config succeeded.
    pub config_json: Option<serde_json::Value>,
    /// How many preparation attempts (config + prepare) ran.
    pub preparations: usize,
    /// Why the job failed, as gitlab-runner would report it (None when it passed).
    pub failure: Option<Failure>,
    /// Each stage script handed to `run`: stage name and size in bytes.
    pub scripts: Vec<(String, usize)>,
}

impl JobOutcome {
    /// True when every stage and cleanup exited 0.
    pub fn passed(&self) -> bool {
        self.config.success()
            && self.prepare.as_ref().is_some_and(Exit::success)
            && self.stages.iter().all(|(_, e)| e.success())
            && self.cleanup.as_ref().is_some_and(Exit::success)
            && self.failure.is_none()
    }
}

/// One preparation attempt's world: the temporary directory and the environment.
pub struct Attempt {
    exes: Executables,
    tmp: tempfile::TempDir,
    base_env: BTreeMap<String, String>,
    configured: bool,
    job_env: BTreeMap<String, String>,
    custom_env: Vec<(String, String)>,
    /// File-type variables of the job.
    files: Vec<(String, String)>,
    /// `CI_BUILDS_DIR` as the runner's own configuration has it (the job's value), used when
    /// `config` names no `builds_dir`.
    default_builds_dir: String,
    /// The project directory of the stage scripts (`Build.FullProjectDir`).
    project_dir: String,
    /// The project's path under the builds directory.
    project_path: String,
    /// `hostname` from config's JSON (`Build.Hostname`).
    hostname: String,
    /// `shell` from config's JSON, `bash` otherwise (the custom executor's default shell).
    shell: String,
    /// Each script written: stage name and size.
    scripts: Mutex<Vec<(String, usize)>>,
    /// gitlab-runner's timeouts for this attempt's executables.
    pub timeouts: Timeouts,
    /// Set to cancel the job (as from GitLab's UI); see [`Attempt::canceller`].
    cancel: Arc<AtomicBool>,
    /// When the job timeout ends: it counts from the attempt's creation, before `config`
    /// (`Build.Run` in `common/build.go` sets it before preparing the executor).
    job_deadline: Instant,
    /// The job log of this attempt.
    pub log: Log,
    /// The runner's own log (cleanup output).
    pub runner_log: Log,
    /// The pause between preparation attempts.
    retry_interval: Duration,
}

impl Attempt {
    /// A new attempt: `mkdtemp("custom-executor")`, `response.json`, the fixed variables.
    /// `base_env` stands for the runner process's own environment.
    pub fn new(exes: Executables, base_env: BTreeMap<String, String>, job: &Job) -> Result<Attempt> {
        let tmp = tempfile::Builder::new()
            .prefix("custom-executor")
            .tempdir()
            .context("failed to create the job's temporary directory")?;
        let response = job.payload();
        let path = tmp.path().join("response.json");
        // Created 0600, as `os.OpenFile(…, 0o600)` does.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .context("failed to create `response.json`")?;
        std::io::Write::write_all(&mut file, format!("{response}\n").as_bytes())
            .context("failed to write `response.json`")?;
        let var = |name: &str| {
            job.variables.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default()
        };
        let mut custom_env: Vec<(String, String)> =
            job.variables.iter().map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.clone())).collect();
        // gitlab-runner passes file variables with their content (`prepareCommand` in
        // `executors/custom/custom.go`).
        custom_env.extend(job.files.iter().map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.clone())));
        Ok(Attempt {
            exes,
            tmp,
            base_env,
            configured: false,
            job_env: BTreeMap::new(),
            custom_env,
            files: job.files.clone(),
            default_builds_dir: var("CI_BUILDS_DIR"),
            project_dir: var("CI_PROJECT_DIR"),
            project_path: if job.project_path.is_empty() {
                "group/project".into()
            } else {
                job.project_path.clone()
            },
            hostname: String::new(),
            shell: "bash".into(),
            scripts: Mutex::new(Vec::new()),
            timeouts: Timeouts::for_job(job),
            cancel: Arc::new(AtomicBool::new(false)),
            job_deadline: Instant::now() + Timeouts::for_job(job).job,
            log: Log::default(),
            runner_log: Log::default(),
            retry_interval: PREPARATION_RETRY_INTERVAL,
        })
    }

    /// Pauses `interval` instead of gitlab-runner's [`PREPARATION_RETRY_INTERVAL`] between
    /// preparation attempts, as gitlab-runner's own tests do, so that tests do not wait.
    pub fn with_retry_interval(mut self, interval: Duration) -> Attempt {
        self.retry_interval = interval;
        self
    }

    /// The attempt's temporary directory (the executables' working directory).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A handle that cancels the job as GitLab's "Cancel" button does; it takes effect in
    /// [`Attempt::run_job`].
    pub fn canceller(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The project directory the stage scripts use.
    pub fn project_dir(&self) -> &str {
        &self.project_dir
    }

    /// `BUILD_EXIT_CODE_FILE`'s path.
    pub fn build_exit_code_file(&self) -> PathBuf {
        self.tmp.path().join("build_exit_code")
    }

    /// The environment gitlab-runner gives an executable: inherited, fixed, job_env, CUSTOM_ENV_*.
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = self.base_env.clone();
        let dir = self.tmp.path().display().to_string();
        env.insert("TMPDIR".into(), dir.clone());
        env.insert("BUILD_FAILURE_EXIT_CODE".into(), "1".into());
        env.insert("SYSTEM_FAILURE_EXIT_CODE".into(), "2".into());
        env.insert("BUILD_EXIT_CODE_FILE".into(), self.build_exit_code_file().display().to_string());
        env.insert("JOB_RESPONSE_FILE".into(), format!("{dir}/response.json"));
        env.extend(self.job_env.clone());
        env.extend(self.custom_env.iter().cloned());
        env
    }

    fn command(&self, exe: &Path, extra: &[String]) -> Command {
        let mut cmd = Command::new(exe);
        cmd.args(&self.exes.args)
            .args(extra)
            .env_clear()
            .envs(self.env())
            .current_dir(self.tmp.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        cmd
    }

    /// Starts an executable whose stdout and stderr both go to `log` as they arrive.
    pub fn spawn(&self, exe: &Path, extra: &[String], log: &Log) -> Result<Running> {
        let mut child = self
            .command(exe, extra)
            .spawn()
            .with_context(|| format!("failed to start `{}`", exe.display()))?;
        let readers = [
            pump(child.stdout.take().expect("piped stdout"), log.clone()),
            pump(child.stderr.take().expect("piped stderr"), log.clone()),
        ];
        Ok(Running { child, readers: readers.into_iter().collect() })
    }

    /// `config_exec` under `config_exec_timeout`: stdout is parsed as JSON, stderr goes to the
    /// job log. `CI_BUILDS_DIR` and `CI_PROJECT_DIR` are empty while it runs (the build has no
    /// directory yet: `dynamicConfig` runs before `PrepareBuildAndShell`, `custom.go`); its
    /// `builds_dir` then sets them (`StartBuild`, `ProjectUniqueDir` in `common/build.go`:
    /// `<builds_dir>/<project path>` for a builds directory that is not shared), its
    /// `hostname` the prepare message and its `shell` the scripts' shebang
    /// (`ConfigExecOutput.InjectInto`); `job_env` is kept for every later executable.
    pub fn config(&mut self) -> Result<(Exit, Option<serde_json::Value>)> {
        self.configured = true;
        self.set_job_variable("CI_BUILDS_DIR", "");
        self.set_job_variable("CI_PROJECT_DIR", "");
        let stdout = Log::default();
        let running = self.spawn_split(&self.exes.config, &[], &stdout, &self.log)?;
        let deadline = self.job_deadline.min(Instant::now() + self.timeouts.config_exec);
        let (exit, _) = running.wait_until(Some(deadline), None, &self.timeouts)?;
        let stdout = stdout.text();
        let json = if exit.success() && !stdout.is_empty() {
            match serde_json::from_str::<serde_json::Value>(&stdout) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.log.push(&format!("error while parsing JSON output: {e}\n"));
                    return Ok((Exit::Code(-1), None));
                }
            }
        } else {
            None
        };
        let field =
            |k: &str| json.as_ref().and_then(|j| j.get(k)).and_then(|v| v.as_str()).map(str::to_string);
        let builds_dir = field("builds_dir").unwrap_or_else(|| self.default_builds_dir.clone());
        self.project_dir = format!("{}/{}", builds_dir.trim_end_matches('/'), self.project_path);
        self.set_job_variable("CI_BUILDS_DIR", &builds_dir);
        let project_dir = self.project_dir.clone();
        self.set_job_variable("CI_PROJECT_DIR", &project_dir);
        if let Some(h) = field("hostname") {
            self.hostname = h;
        }
        if let Some(sh) = field("shell") {
            self.shell = sh;
        }
        if let Some(obj) = json.as_ref().and_then(|j| j.get("job_env")).and_then(|v| v.as_object()) {
            for (k, v) in obj {
                self.job_env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
        }
        Ok((exit, json))
    }

    /// gitlab-runner's `executor.Prepare` for this attempt: `config_exec` (unless this attempt
    /// already ran it), then, when it passed, `prepare_exec`, to completion.
    pub fn prepare(&mut self) -> Result<Exit> {
        if !self.configured {
            let (exit, _) = self.config()?;
            if !exit.success() {
                return Ok(exit);
            }
        }
        self.prepare_exec()
    }

    /// `prepare_exec` alone (whatever `config` did), under `prepare_exec_timeout`.
    pub fn prepare_exec(&self) -> Result<Exit> {
        let deadline = self.job_deadline.min(Instant::now() + self.timeouts.prepare_exec);
        Ok(self
            .spawn(&self.exes.prepare, &[], &self.log)?
            .wait_until(Some(deadline), None, &self.timeouts)?
            .0)
    }

    /// Writes a stage script as gitlab-runner's bash shell does and starts
    /// `run <script> <stage>` (`executor.Run` in `executors/custom/custom.go`). Before `body`,
    /// the script has what gitlab-runner writes for that stage (`shells/abstract.go`,
    /// `writeScript`): the hostname message and the removal of `GITLAB_ENV`'s file for
    /// `prepare_script`, nothing for `clear_worktree`, every variable exported as paths only
    /// for `cleanup_file_variables` followed by the removal of the variable files, and every
    /// variable exported (file variables written to their files) for the others, with
    /// `GIT_TERMINAL_PROMPT` and `GCM_INTERACTIVE` added for `get_sources`.
    pub fn start_stage(&self, stage: &str, body: &str) -> Result<Running> {
        let dir = tempfile::Builder::new().prefix("script").tempdir_in(self.tmp.path())?.keep();
        let script = dir.join("script");
        let mut w = BashWriter::new(&self.project_dir);
        let mut variables: Vec<Variable> = self
            .custom_env
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("CUSTOM_ENV_").map(|k| (k, v)))
            .filter(|(k, _)| !self.files.iter().any(|(f, _)| f == k))
            .map(|(k, v)| Variable { key: k.to_string(), value: v.clone(), file: false })
            .collect();
        variables.extend(self.files.iter().map(|(k, v)| Variable {
            key: k.clone(),
            value: v.clone(),
            file: true,
        }));
        match stage {
            "prepare_script" => {
                // `ensurePrepareStageHostnameMessage` in `shells/bash.go` (Go's `strconv.Quote`).
                let message = if self.hostname.is_empty() {
                    "Running on $(hostname)...".to_string()
                } else {
                    format!("Running on $(hostname) via {}...", self.hostname)
                };
                w.line(&format!("echo {}", serde_json::Value::String(message)));
                w.rm_file(&w.tmp_file(crate::demo::shell::GITLAB_ENV_FILE));
                w.rm_file(&w.tmp_file("masking.db"));
            }
            "clear_worktree" => {}
            "cleanup_file_variables" => {
                w.export_variables(&variables, true);
                w.rm_file(&w.tmp_file(crate::demo::shell::GITLAB_ENV_FILE));
                w.rm_file(&w.tmp_file("masking.db"));
                for (key, _) in &self.files {
                    w.rm_file(&w.tmp_file(key));
                }
            }
            _ => {
                w.export_variables(&variables, false);
                if stage == "get_sources" {
                    for (k, v) in [("GIT_TERMINAL_PROMPT", "0"), ("GCM_INTERACTIVE", "Never")] {
                        w.variable(&Variable { key: k.into(), value: v.into(), file: false });
                    }
                }
            }
        }
        for line in body.lines() {
            w.line(line);
        }
        let text = w.finish(&self.shell);
        self.scripts.lock().unwrap_or_else(|e| e.into_inner()).push((stage.to_string(), text.len()));
        std::fs::write(&script, text)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
        self.spawn(&self.exes.run, &[script.display().to_string(), stage.to_string()], &self.log)
    }

    /// `run` for one stage, to completion.
    pub fn run_stage(&self, stage: &str, body: &str) -> Result<Exit> {
        self.start_stage(stage, body)?.wait()
    }

    /// `cleanup_exec` under `cleanup_exec_timeout`, output to the runner log.
    pub fn cleanup(&self) -> Result<Exit> {
        let deadline = Instant::now() + self.timeouts.cleanup_exec;
        Ok(self
            .spawn(&self.exes.cleanup, &[], &self.runner_log)?
            .wait_until(Some(deadline), None, &self.timeouts)?
            .0)
    }

    /// Starts an executable with stdout to `out` and stderr to `err`.
    fn spawn_split(&self, exe: &Path, extra: &[String], out: &Log, err: &Log) -> Result<Running> {
        let mut child = self
            .command(exe, extra)
            .spawn()
            .with_context(|| format!("failed to start `{}`", exe.display()))?;
        let readers = vec![
            pump(child.stdout.take().expect("piped stdout"), out.clone()),
            pump(child.stderr.take().expect("piped stderr"), err.clone()),
        ];
        Ok(Running { child, readers })
    }

    /// Sets a job variable (`CUSTOM_ENV_<name>`) for the stages that follow.
    fn set_job_variable(&mut self, name: &str, value: &str) {
        let key = format!("CUSTOM_ENV_{name}");
        self.custom_env.retain(|(k, _)| *k != key);
        self.custom_env.push((key, value.to_string()));
    }

    /// Runs the whole job the way gitlab-runner's `Build.Run` does, starting with this
    /// preparation attempt: `config` and `prepare`; when either fails with anything but a build
    /// failure (exit 1), `cleanup` for this attempt, a pause, and a new attempt (a new temporary
    /// directory, payload and `job_env`), up to [`PREPARATION_RETRIES`] in all
    /// (`retryCreateExecutor` in `common/build.go`). Then the stages and the last `cleanup`.
    pub fn run_job(self, job: &Job) -> Result<JobOutcome> {
        let mut attempt = self;
        let log = attempt.log.clone();
        let runner_log = attempt.runner_log.clone();
        let mut outcome = JobOutcome {
            config: Exit::Code(-1),
            prepare: None,
            stages: Vec::new(),
            cleanup: None,
            job_log: String::new(),
            runner_log: String::new(),
            build_exit_code: None,
            config_json: None,
            preparations: 0,
            failure: None,
            scripts: Vec::new(),
        };
        loop {
            outcome.preparations += 1;
            let (config, config_json) = attempt.config()?;
            outcome.config = config.clone();
            outcome.config_json = config_json;
            outcome.prepare = None;
            if config.success() {
                outcome.prepare = Some(attempt.prepare_exec()?);
            }
            let failed = outcome.prepare.as_ref().unwrap_or(&config).clone();
            if failed.success() {
                attempt.run_stages(job, &mut outcome)?;
                outcome.cleanup = Some(attempt.cleanup()?);
                break;
            }
            outcome.cleanup = Some(attempt.cleanup()?);
            // A build failure (exit 1 → `common.BuildError`) is not retried, nor the last attempt.
            if failed == Exit::Code(1) || outcome.preparations == PREPARATION_RETRIES {
                break;
            }
            // gitlab-runner's `SoftErrorln` and `Infoln` lines, without their colours and the
            // `ERROR: ` prefix, so that tests count only the driver's error lines.
            log.push(&format!("Preparation failed: {}\n", describe(&failed)));
            log.push(&format!("Will be retried in {} ...\n", go_duration(attempt.retry_interval)));
            thread::sleep(attempt.retry_interval);
            let mut next = Attempt::new(attempt.exes.clone(), attempt.base_env.clone(), job)?
                .with_retry_interval(attempt.retry_interval);
            // One job log and one runner log across attempts, as in GitLab.
            next.log = log.clone();
            next.runner_log = runner_log.clone();
            attempt = next;
        }
        outcome.job_log = log.text();
        outcome.runner_log = runner_log.text();
        outcome.scripts = attempt.scripts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(outcome)
    }
}

/// A pause as Go's `time.Duration.String` writes whole seconds and milliseconds (`3s`, `0s`,
/// `250ms`), the form of gitlab-runner's "Will be retried in" line.
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 || d.as_secs() > 0 {
        format!("{}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// How gitlab-runner words a failed executable (`exec.ExitError`).
fn describe(exit: &Exit) -> String {
    match exit {
        Exit::Code(c) => format!("exit status {c}"),
        Exit::Signal(s) => format!("signal {s}"),
    }
}

/// A started executable.
pub struct Running {
    child: Child,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Running {
    /// The process id (also its process group id).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the whole process group, as gitlab-runner's killer does.
    pub fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory involved.
        unsafe {
            libc::kill(-self.pid(), sig);
        }
    }

    /// Waits for exit and for EOF on both pipes (gitlab-runner waits for both).
    pub fn wait(mut self) -> Result<Exit> {
        let status = self.child.wait()?;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(exit_of(status))
    }

    /// Waits for the executable as `command.Run` does (`executors/custom/command/command.go`):
    /// when `deadline` passes or `cancel` is set first, gitlab-runner's `KillAndWait`
    /// (`helpers/process/killer.go`, `killer_unix.go`): SIGTERM to the process group, up to
    /// `graceful_kill`, SIGKILL, up to `force_kill`; after that gitlab-runner stops waiting
    /// and goes on while the process may still be dying, and so does this (a thread reaps it).
    pub fn wait_until(
        mut self,
        deadline: Option<Instant>,
        cancel: Option<&AtomicBool>,
        timeouts: &Timeouts,
    ) -> Result<(Exit, Option<Stop>)> {
        // Done means exited with both pipes closed, as Go's `exec.Cmd.Wait` waits for both.
        let mut status = None;
        let mut done = |r: &mut Running| -> Result<Option<std::process::ExitStatus>> {
            if status.is_none() {
                status = r.child.try_wait()?;
            }
            Ok(status.filter(|_| r.readers.iter().all(|t| t.is_finished())))
        };
        let stop = loop {
            if let Some(status) = done(&mut self)? {
                return Ok((exit_of(status), None));
            }
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                break Stop::Canceled;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break Stop::Deadline;
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.signal_group(libc::SIGTERM);
        for (limit, next) in [(timeouts.graceful_kill, Some(libc::SIGKILL)), (timeouts.force_kill, None)] {
            let until = Instant::now() + limit;
            while Instant::now() < until {
                if let Some(status) = done(&mut self)? {
                    return Ok((exit_of(status), Some(stop)));
                }
                thread::sleep(Duration::from_millis(20));
            }
            if let Some(sig) = next {
                self.signal_group(sig);
            }
        }
        // `KillProcessError`: the process is left to die on its own.
        thread::spawn(move || {
            let _ = self.wait();
        });
        Ok((Exit::Signal(libc::SIGKILL), Some(stop)))
    }

    /// [`Running::wait`] that also returns the process's own resource usage from `wait4(2)`
    /// (peak RSS, CPU time), for the benchmarks.
    pub fn wait_with_usage(mut self) -> Result<(Exit, libc::rusage)> {
        let pid = self.pid();
        let mut status = 0;
        // SAFETY: rusage is plain old data; wait4 writes the status and the usage of `pid`,
        // which is our own unreaped child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: as above; both pointers are valid for the call.
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if rc == pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("wait4 failed");
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok((exit_of(std::process::ExitStatus::from_raw(status)), usage))
    }

    /// gitlab-runner's kill sequence: SIGTERM to the group, up to `grace`, then SIGKILL.
    pub fn terminate(mut self, grace: Duration) -> Result<Exit> {
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = self.child.try_wait()? {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Ok(exit_of(status));
            }
            if Instant::now() >= deadline {
                self.signal_group(libc::SIGKILL);
                return self.wait();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn pump(mut r: impl Read + Send + 'static, log: Log) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => log.push(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    })
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        _ => Exit::Code(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_scripts_round_trip_quotes_and_stop_at_the_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let script = |body: &str| {
            let mut w = BashWriter::new("/nonexistent");
            for l in body.lines() {
                w.line(l);
            }
            w.finish("bash")
        };
        std::fs::write(&p, script("echo 'a \\ b' \"$((1+2))\"\necho done")).unwrap();
        let out = Command::new("bash").arg(&p).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a \\ b 3\ndone\n");
        std::fs::write(&p, script("false\necho unreachable")).unwrap();
        let out = Command::new("bash").arg(&p).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
    }

    #[test]
    fn the_job_payload_is_gitlab_runners_schema_and_private() {
        let mut job = Job::new(43, 3001, "/builds", "true");
        job.variables.push(("CI_JOB_ID".into(), "2001".into()));
        let exes = Executables::in_dir(Path::new("/nonexistent"));
        let attempt = Attempt::new(exes, BTreeMap::new(), &job).unwrap();
        let path = attempt.dir().join("response.json");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["id"], 3001, "an integer, the job's own id whatever its variables say");
        assert_eq!(v["job_info"]["project_id"], 43);
        assert_eq!(v["job_info"]["pipeline_id"], 93001);
        assert_eq!(v["token"], job.token.as_str());
        let token_var =
            v["variables"].as_array().unwrap().iter().find(|x| x["key"] == "CI_JOB_TOKEN").unwrap();
        assert_eq!(
            (token_var["value"].as_str(), token_var["masked"].as_bool()),
            (Some(job.token.as_str()), Some(true))
        );
        assert_eq!(attempt.env()["JOB_RESPONSE_FILE"], path.display().to_string());
        assert_eq!(attempt.env()["CUSTOM_ENV_CI_JOB_ID"], "2001", "the job's override wins in its variables");
    }

    #[test]
    fn retry_pauses_are_written_as_go_writes_them() {
        assert_eq!(go_duration(PREPARATION_RETRY_INTERVAL), "3s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn log_wait_for_sees_text() {
        let log = Log::default();
        let l2 = log.clone();
        let t = thread::spawn(move || l2.push("hello marker\n"));
        assert!(log.wait_for("marker", Duration::from_secs(10)));
        t.join().unwrap();
        assert!(!log.wait_for("absent", Duration::from_millis(10)));
    }
}
