//! A stand-in for gitlab-runner's custom executor, driving the real stage binaries.
//!
//! Why it exists: `aliyun-spot demo` and the integration tests must call `config`, `prepare`,
//! `run` and `cleanup` exactly as gitlab-runner 18.x does (docs/gitlab-runner.md), not
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
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

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
/// The pause between them (`PreparationRetryInterval`, same files).
pub const PREPARATION_RETRY_INTERVAL: Duration = Duration::from_secs(3);

/// A job as GitLab hands it to the runner: its ids and token (the payload), variables and the
/// stage bodies to run.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// The job id (the payload's `id`).
    pub id: u64,
    /// The project id (the payload's `job_info.project_id`).
    pub project_id: u64,
    /// The job token (the payload's `token`, also `CI_JOB_TOKEN`).
    pub token: String,
    /// Job variables; each reaches the driver as `CUSTOM_ENV_<key>`. A job may override the
    /// predefined ones (push a forged `CI_JOB_ID` after them): the payload keeps the truth.
    pub variables: Vec<(String, String)>,
    /// `(stage name, bash body)` in execution order, as gitlab-runner would generate them;
    /// see [`Job::standard_stages`].
    pub stages: Vec<(String, String)>,
    /// The `after_script` body: run after the user steps, whether they passed or failed.
    pub after_script: Option<String>,
}

impl Job {
    /// Job `job_id` of project `project_id` running `script`, with the CI variables
    /// gitlab-runner sets, the standard stages and a token unique to the job.
    pub fn new(project_id: u64, job_id: u64, builds_dir: &str, script: &str) -> Job {
        let token = format!("glcbt-64_job{job_id}tokenNEVERPRINTED");
        let mut variables = Job::ci_variables("7", &project_id.to_string(), &job_id.to_string(), builds_dir);
        for (k, v) in &mut variables {
            if k == "CI_JOB_TOKEN" {
                v.clone_from(&token);
            }
        }
        Job {
            id: job_id,
            project_id,
            token,
            variables,
            stages: Job::standard_stages(&format!("{builds_dir}/group/project"), script),
            after_script: None,
        }
    }

    /// The job payload gitlab-runner writes to `JOB_RESPONSE_FILE`: its `common.JobResponse`
    /// (`common/network.go`, v18.3.0; `spec.Job` in `common/spec/spec.go` on main), JSON-encoded
    /// by `createJobResponseFile` in `executors/custom/custom.go`. The fields a driver may read.
    pub fn payload(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "token": self.token,
            "allow_git_fetch": true,
            "job_info": {
                "name": self.variables.iter().find(|(n, _)| n == "CI_JOB_NAME").map(|(_, v)| v.clone()).unwrap_or_default(),
                "stage": "test",
                "project_id": self.project_id,
                "project_name": "project",
                "project_full_path": "group/project",
                // `CI_PIPELINE_ID` as [`Job::ci_variables`] sets it.
                "pipeline_id": format!("9{}", self.id).parse::<u64>().unwrap_or_default(),
            },
            "git_info": { "repo_url": "https://gitlab.example.com/group/project.git", "ref": "main" },
            "runner_info": { "timeout": 3600 },
            "variables": self.variables.iter().map(|(k, v)| serde_json::json!({
                "key": k, "value": v, "public": k != "CI_JOB_TOKEN", "masked": k == "CI_JOB_TOKEN",
                "file": false, "raw": false,
            })).collect::<Vec<_>>(),
        })
    }

    /// The CI variables gitlab-runner always sets, for a job with these ids.
    pub fn ci_variables(
        runner_id: &str,
        project_id: &str,
        job_id: &str,
        builds_dir: &str,
    ) -> Vec<(String, String)> {
        let project_dir = format!("{builds_dir}/group/project");
        [
            ("CI_RUNNER_ID", runner_id.to_string()),
            ("CI_RUNNER_SHORT_TOKEN", format!("t{runner_id}short")),
            ("CI_PROJECT_ID", project_id.to_string()),
            ("CI_PROJECT_PATH", "group/project".to_string()),
            ("CI_PROJECT_NAME", "project".to_string()),
            ("CI_JOB_ID", job_id.to_string()),
            ("CI_JOB_NAME", "build".to_string()),
            ("CI_PIPELINE_ID", format!("9{job_id}")),
            ("CI_CONCURRENT_ID", "0".to_string()),
            ("CI_CONCURRENT_PROJECT_ID", "0".to_string()),
            ("CI_BUILDS_DIR", builds_dir.to_string()),
            ("CI_PROJECT_DIR", project_dir),
            ("CI_SERVER", "yes".to_string()),
            ("CI_JOB_STATUS", "running".to_string()),
            ("CI_JOB_TIMEOUT", "3600".to_string()),
            ("CI_JOB_TOKEN", "glcbt-64_jobtokenNEVERPRINTED".to_string()),
            ("CI_SHARED_ENVIRONMENT", "true".to_string()),
            ("CI_JOB_SERVICES", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The stages gitlab-runner runs for a plain job with this `script` body.
    pub fn standard_stages(project_dir: &str, script: &str) -> Vec<(String, String)> {
        vec![
            ("prepare_script".into(), "echo \"Running on $(hostname) via aliyun-spot-executor...\"".into()),
            (
                "get_sources".into(),
                format!("mkdir -p '{project_dir}' && cd '{project_dir}' && echo 'Fetching changes...'"),
            ),
            ("build_script".into(), format!("cd '{project_dir}'\n{script}")),
            ("cleanup_file_variables".into(), format!("rm -rf '{project_dir}.tmp'")),
        ]
    }
}

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
}

impl JobOutcome {
    /// True when every stage and cleanup exited 0.
    pub fn passed(&self) -> bool {
        self.config.success()
            && self.prepare.as_ref().is_some_and(Exit::success)
            && self.stages.iter().all(|(_, e)| e.success())
            && self.cleanup.as_ref().is_some_and(Exit::success)
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
    /// The job log of this attempt.
    pub log: Log,
    /// The runner's own log (cleanup output).
    pub runner_log: Log,
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
        Ok(Attempt {
            exes,
            tmp,
            base_env,
            configured: false,
            job_env: BTreeMap::new(),
            custom_env: job.variables.iter().map(|(k, v)| (format!("CUSTOM_ENV_{k}"), v.clone())).collect(),
            log: Log::default(),
            runner_log: Log::default(),
        })
    }

    /// The attempt's temporary directory (the executables' working directory).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
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

    /// `config_exec`: stdout is parsed as JSON, stderr goes to the job log; `job_env` is kept.
    pub fn config(&mut self) -> Result<(Exit, Option<serde_json::Value>)> {
        self.configured = true;
        let mut child = self.command(&self.exes.config, &[]).spawn().context("failed to start `config`")?;
        let mut stdout_pipe = child.stdout.take().expect("piped stdout");
        let err_reader = pump(child.stderr.take().expect("piped stderr"), self.log.clone());
        let mut stdout = String::new();
        stdout_pipe.read_to_string(&mut stdout).context("failed to read `config` stdout")?;
        let status = child.wait()?;
        let _ = err_reader.join();
        let exit = exit_of(status);
        if !exit.success() || stdout.is_empty() {
            return Ok((exit, None));
        }
        let json: serde_json::Value = match serde_json::from_str(&stdout) {
            Ok(v) => v,
            Err(e) => {
                self.log.push(&format!("error while parsing JSON output: {e}\n"));
                return Ok((Exit::Code(-1), None));
            }
        };
        if let Some(obj) = json.get("job_env").and_then(|v| v.as_object()) {
            for (k, v) in obj {
                self.job_env.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
        }
        Ok((exit, Some(json)))
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

    /// `prepare_exec` alone, to completion (whatever `config` did).
    pub fn prepare_exec(&self) -> Result<Exit> {
        self.spawn(&self.exes.prepare, &[], &self.log)?.wait()
    }

    /// Writes a stage script as gitlab-runner does and starts `run <script> <stage>`.
    pub fn start_stage(&self, stage: &str, body: &str) -> Result<Running> {
        let dir = tempfile::Builder::new().prefix("script").tempdir_in(self.tmp.path())?.keep();
        let script = dir.join("script");
        // gitlab-runner's scripts export every job variable first (`shells/bash.go`, `Variable`),
        // so the remote script sees them even though `run` forwards no environment.
        let mut exports = String::new();
        for (key, value) in &self.custom_env {
            let name = key.strip_prefix("CUSTOM_ENV_").unwrap_or(key);
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid {
                exports.push_str(&format!("export {name}={}\n", ansi_c_quote(value)));
            }
        }
        std::fs::write(&script, bash_script(&format!("{exports}{body}")))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
        self.spawn(&self.exes.run, &[script.display().to_string(), stage.to_string()], &self.log)
    }

    /// `run` for one stage, to completion.
    pub fn run_stage(&self, stage: &str, body: &str) -> Result<Exit> {
        self.start_stage(stage, body)?.wait()
    }

    /// `cleanup_exec`, output to the runner log.
    pub fn cleanup(&self) -> Result<Exit> {
        self.spawn(&self.exes.cleanup, &[], &self.runner_log)?.wait()
    }

    /// The stages after prepare, with gitlab-runner's branches (docs/gitlab-runner.md, "Stages"):
    /// a failed `prepare_script` ends the job; a failed source, cache or artifact stage skips
    /// the user steps and `after_script`; a failed user step skips the remaining steps;
    /// `after_script` runs after the user steps whether they passed or not; cache and artifact
    /// stages switch to their `_on_failure` variants after a failure; `cleanup_file_variables`
    /// always runs last.
    fn run_stages(&mut self, job: &Job, outcome: &mut JobOutcome) -> Result<()> {
        let is_user = |s: &str| s == "build_script" || s.starts_with("step_");
        let is_post = |s: &str| s.starts_with("archive_cache") || s.starts_with("upload_artifacts");
        let mut pre_failed = false;
        let mut failed = false;
        let mut after_done = job.after_script.is_none();
        for (stage, body) in &job.stages {
            let mut stage = stage.clone();
            if (is_post(&stage) || stage == "cleanup_file_variables") && !after_done {
                after_done = true;
                // gitlab-runner rewrites CI_JOB_STATUS for after_script and keeps it for the
                // stages after it (`common/build.go`, `executeAfterScript`).
                self.set_job_variable("CI_JOB_STATUS", if failed { "failed" } else { "success" });
                if !pre_failed {
                    let after = job.after_script.as_deref().unwrap_or_default();
                    let exit = self.run_stage("after_script", after)?;
                    // after_script errors are ignored (AFTER_SCRIPT_IGNORE_ERRORS defaults to true).
                    outcome.stages.push(("after_script".into(), exit));
                }
            }
            if failed && (is_user(&stage) || !(is_post(&stage) || stage == "cleanup_file_variables")) {
                continue;
            }
            if failed && is_post(&stage) {
                stage = match stage.as_str() {
                    "archive_cache" => "archive_cache_on_failure".into(),
                    "upload_artifacts_on_success" => "upload_artifacts_on_failure".into(),
                    other => other.into(),
                };
            }
            let exit = self.run_stage(&stage, body)?;
            if exit == Exit::Code(1) && outcome.build_exit_code.is_none() {
                // gitlab-runner reads the file right after the stage that failed.
                outcome.build_exit_code = std::fs::read_to_string(self.build_exit_code_file()).ok();
            }
            let ok = exit.success();
            outcome.stages.push((stage.clone(), exit));
            if !ok && stage != "cleanup_file_variables" {
                if stage == "prepare_script" {
                    break;
                }
                failed = true;
                pre_failed |= !is_user(&stage) && !is_post(&stage);
            }
        }
        Ok(())
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
            log.push(&format!("Will be retried in {}s ...\n", PREPARATION_RETRY_INTERVAL.as_secs()));
            thread::sleep(PREPARATION_RETRY_INTERVAL);
            let mut next = Attempt::new(attempt.exes.clone(), attempt.base_env.clone(), job)?;
            // One job log and one runner log across attempts, as in GitLab.
            next.log = log.clone();
            next.runner_log = runner_log.clone();
            attempt = next;
        }
        outcome.job_log = log.text();
        outcome.runner_log = runner_log.text();
        Ok(outcome)
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

/// A stage script shaped like gitlab-runner's bash output (`shells/bash.go`, `BashWriter.Finish`;
/// docs/gitlab-runner.md, "Stage scripts").
pub fn bash_script(body: &str) -> String {
    format!(
        "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\nif set -o | grep pipefail > /dev/null; then set -o pipefail; fi; set -o errexit\nset +o noclobber\n(trap 'exit 1' TERM; eval {}) < /dev/null\nexit 0\n",
        ansi_c_quote(&format!("{body}\n"))
    )
}

/// Bash `$'…'` quoting, as gitlab-runner's shell writer does.
fn ansi_c_quote(s: &str) -> String {
    let mut out = String::from("$'");
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_script_round_trips_quotes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, bash_script("echo 'a \\ b' \"$((1+2))\"\necho done")).unwrap();
        let out = Command::new("bash").arg(&p).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a \\ b 3\ndone\n");
        std::fs::write(&p, bash_script("false\necho unreachable")).unwrap();
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
    fn log_wait_for_sees_text() {
        let log = Log::default();
        let l2 = log.clone();
        let t = thread::spawn(move || l2.push("hello marker\n"));
        assert!(log.wait_for("marker", Duration::from_secs(10)));
        t.join().unwrap();
        assert!(!log.wait_for("absent", Duration::from_millis(10)));
    }
}
