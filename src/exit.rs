//! The one place where a stage's outcome becomes a process exit code.
//!
//! gitlab-runner knows only two failures (CUSTOM_EXECUTOR.md §4): `BUILD_FAILURE_EXIT_CODE`
//! (the job's own script failed) and `SYSTEM_FAILURE_EXIT_CODE` (everything else: configuration,
//! API, capacity, SSH, reclaim, timeouts, signals). Only the script's own failure may be a build
//! failure; its status also goes to `BUILD_EXIT_CODE_FILE` so `allow_failure: exit_codes` works.

use std::path::PathBuf;

/// How a stage ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The job's script ran and exited non-zero with this status.
    #[error("the job script exited with status {0}")]
    Build(i32),
    /// Anything the runner, the cloud or the network got wrong.
    #[error(transparent)]
    System(#[from] anyhow::Error),
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
            Err(StageError::System(e)) => {
                crate::logging::stderr_line(&format!("ERROR: {}", one_line(e)));
                self.system_failure
            }
        }
    }
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
}
