//! The one place where a stage's outcome becomes a process exit code.
//!
//! gitlab-runner knows two failures (docs/gitlab-runner.md, "Exit codes"; gitlab-runner
//! v18.3.0-1857-gd79f3e7b8, `executors/custom/command/command.go`, `waitForCommand`):
//! `BUILD_FAILURE_EXIT_CODE` becomes a `BuildError` with reason `script_failure`, which
//! `common/build.go` (`retryCreateExecutor`) never retries and `retry: when:
//! runner_system_failure` does not match; `SYSTEM_FAILURE_EXIT_CODE` is a system failure, and a
//! failed `config`/`prepare` is retried up to `PreparationRetries` (3) times, 3 s apart.
//!
//! So a build failure is reserved for what the job itself got wrong: its script's status
//! ([`StageError::Build`], also written to `BUILD_EXIT_CODE_FILE` so `allow_failure:
//! exit_codes` works) and a job variable this runner cannot accept ([`StageError::Job`]: a
//! retry would fail the same way). Everything else — configuration, API, capacity, SSH,
//! reclaim, timeouts, signals — is a system failure.

use std::path::PathBuf;

/// The job's own mistake outside its script: a job variable (`CUSTOM_ENV_*`) that does not
/// parse, is out of bounds or is not allowed on this runner. The message is the one line the
/// user needs (the variable, its value and the fix).
///
/// Code that finds such a mistake returns this type (inside an `anyhow::Error` where the
/// surrounding code uses `anyhow`); [`StageError`]'s `From<anyhow::Error>` finds it by type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JobError(pub String);

/// How a stage ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The job's script ran and exited non-zero with this status.
    #[error("the job script exited with status {0}")]
    Build(i32),
    /// The job asked for something this runner does not accept (a build failure: retrying
    /// cannot help).
    #[error(transparent)]
    Job(JobError),
    /// Anything the runner, the cloud or the network got wrong.
    #[error(transparent)]
    System(anyhow::Error),
}

impl From<anyhow::Error> for StageError {
    /// A [`JobError`] anywhere in the chain makes a [`StageError::Job`]; anything else is a
    /// system failure.
    fn from(e: anyhow::Error) -> Self {
        match e.downcast_ref::<JobError>() {
            Some(job) => StageError::Job(job.clone()),
            None => StageError::System(e),
        }
    }
}

impl From<JobError> for StageError {
    fn from(e: JobError) -> Self {
        StageError::Job(e)
    }
}

impl StageError {
    /// A system failure from a one-line message.
    pub fn system(msg: impl std::fmt::Display) -> Self {
        StageError::System(anyhow::anyhow!("{msg}"))
    }
}

/// The exit codes and file gitlab-runner handed to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitCodes {
    /// `BUILD_FAILURE_EXIT_CODE` (1 when unset, as gitlab-runner hard-codes it).
    pub build_failure: i32,
    /// `SYSTEM_FAILURE_EXIT_CODE` (2 when unset).
    pub system_failure: i32,
    /// `BUILD_EXIT_CODE_FILE`, when gitlab-runner (17.9+) provides it.
    pub build_exit_code_file: Option<PathBuf>,
}

impl Default for ExitCodes {
    fn default() -> Self {
        ExitCodes { build_failure: 1, system_failure: 2, build_exit_code_file: None }
    }
}

impl ExitCodes {
    /// Reads the three variables from an environment map (see [`crate::env`]).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let code = |name: &str, default: i32| {
            get(name).and_then(|v| v.trim().parse::<i32>().ok()).filter(|c| *c != 0).unwrap_or(default)
        };
        ExitCodes {
            build_failure: code("BUILD_FAILURE_EXIT_CODE", 1),
            system_failure: code("SYSTEM_FAILURE_EXIT_CODE", 2),
            build_exit_code_file: get("BUILD_EXIT_CODE_FILE").filter(|v| !v.is_empty()).map(PathBuf::from),
        }
    }

    /// Removes a status left by an earlier stage: gitlab-runner reuses the same path for every
    /// stage and re-reads it whenever a stage exits with the build-failure code.
    pub fn clear_build_exit_code_file(&self) {
        if let Some(path) = &self.build_exit_code_file {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Maps a stage result to the exit code, printing the one error line on stderr (which
    /// gitlab-runner puts into the job log, or the runner log for cleanup).
    pub fn code_for(&self, result: &Result<(), StageError>) -> i32 {
        match result {
            Ok(()) => 0,
            Err(StageError::Build(status)) => {
                if let Some(path) = &self.build_exit_code_file {
                    // Only the bare integer: anything else turns into a system failure.
                    if let Err(e) = std::fs::write(path, format!("{status}\n")) {
                        crate::logging::stderr_line(&format!(
                            "WARNING: could not write `{}`: {e}",
                            path.display()
                        ));
                    }
                }
                self.build_failure
            }
            Err(StageError::Job(e)) => {
                // No status file: a stale one from an earlier stage would be read as this
                // failure's status; without one gitlab-runner reports `exit status 1`.
                self.clear_build_exit_code_file();
                eprintln!("ERROR: {e}");
                self.build_failure
            }
            Err(StageError::System(e)) => {
                crate::logging::stderr_line(&format!("ERROR: {}", one_line(e)));
                self.system_failure
            }
        }
    }
}

/// The exit status of an `aliyun-spot` command whose stdout was closed by its reader
/// (`aliyun-spot prices | head -1`): 141, the status a shell reports for a process a closed
/// pipe ended (128 + SIGPIPE, as `seq 100000 | head -1` under `set -o pipefail` shows), so
/// scripts treat it as they treat any other tool in a pipeline. Nothing is printed: there is
/// nobody left to read it.
pub const STDOUT_CLOSED_EXIT_CODE: i32 = 141;

/// The exit code of an `aliyun-spot` command: 0, [`STDOUT_CLOSED_EXIT_CODE`] quietly when
/// stdout was closed, else 1 after the one error line on stderr.
pub fn admin_code(result: &anyhow::Result<()>) -> i32 {
    let Err(e) = result else { return 0 };
    let closed =
        e.chain().any(|c| c.downcast_ref::<crate::logging::StdoutError>().is_some_and(|s| s.closed()));
    if closed {
        return STDOUT_CLOSED_EXIT_CODE;
    }
    crate::logging::stderr_line(&format!("aliyun-spot: {}", one_line(e)));
    1
}

/// Formats an error with its causes on one line: `what failed: why: root cause`.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn reads_codes_with_defaults() {
        let m: HashMap<&str, &str> =
            [("BUILD_FAILURE_EXIT_CODE", "11"), ("SYSTEM_FAILURE_EXIT_CODE", "12")].into();
        let c = ExitCodes::from_vars(|k| m.get(k).map(|v| v.to_string()));
        assert_eq!((c.build_failure, c.system_failure, c.build_exit_code_file), (11, 12, None));
        let d = ExitCodes::from_vars(|_| None);
        assert_eq!((d.build_failure, d.system_failure), (1, 2));
    }

    #[test]
    fn build_failure_writes_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build_exit_code");
        let c = ExitCodes { build_exit_code_file: Some(file.clone()), ..ExitCodes::default() };
        assert_eq!(c.code_for(&Err(StageError::Build(42))), 1);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "42\n");
        c.clear_build_exit_code_file();
        assert!(!file.exists());
        assert_eq!(c.code_for(&Err(StageError::system("boom"))), 2);
        assert!(!file.exists(), "a system failure writes no status");
        assert_eq!(c.code_for(&Ok(())), 0);
    }

    #[test]
    fn a_job_error_is_a_build_failure_without_a_status_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("build_exit_code");
        std::fs::write(&file, "42\n").unwrap();
        let c = ExitCodes { build_exit_code_file: Some(file.clone()), ..ExitCodes::default() };
        let wrapped = anyhow::Error::new(JobError("job variable `X`=`y` is bad".into())).context("loading");
        let err = StageError::from(wrapped);
        assert!(matches!(&err, StageError::Job(j) if j.0 == "job variable `X`=`y` is bad"), "{err:?}");
        assert_eq!(c.code_for(&Err(err)), 1);
        assert!(!file.exists(), "a stale status must not be read as this failure's");
        assert!(matches!(StageError::from(anyhow::anyhow!("boom")), StageError::System(_)));
    }

    #[test]
    fn a_closed_stdout_ends_an_admin_command_quietly() {
        use crate::logging::StdoutError;
        use std::io::{Error, ErrorKind};
        let closed = anyhow::Error::new(StdoutError(Error::from(ErrorKind::BrokenPipe))).context("listing");
        assert_eq!(admin_code(&Err(closed)), STDOUT_CLOSED_EXIT_CODE);
        let full = anyhow::Error::new(StdoutError(Error::from(ErrorKind::StorageFull)));
        assert_eq!(admin_code(&Err(full)), 1, "another write failure is an error");
        assert_eq!(admin_code(&Ok(())), 0);
    }
}
