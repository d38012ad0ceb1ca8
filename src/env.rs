//! The one place where the process environment is read.
//!
//! A stage process gets three kinds of variables mixed in one environment (docs/gitlab-runner.md,
//! "Environment"): the runner host's own (the administrator's `ALIYUN_*` settings, `HOME`, `PATH`), the
//! fixed ones gitlab-runner adds (`BUILD_FAILURE_EXIT_CODE`, …), and every job variable prefixed
//! with `CUSTOM_ENV_`, which anyone who can edit `.gitlab-ci.yml` controls. Taking one snapshot
//! here — from the process in the binaries, from a map in tests — keeps the rest of the crate
//! free of hidden inputs, and keeps the line between trusted and job-controlled values visible:
//! [`Env::get`] is the administrator's world, [`Env::custom`] the job's. Internal variables of
//! this driver never start with `CUSTOM_ENV_`, so a job cannot set them. The job's identity is
//! never read from `CUSTOM_ENV_*` (a job may override `CI_JOB_ID`): see [`crate::identity`].
//!
//! `clippy.toml` bans `std::env::var` and friends everywhere else.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::exit::ExitCodes;

/// The prefix gitlab-runner puts before every job variable.
pub const CUSTOM_PREFIX: &str = "CUSTOM_ENV_";

/// A snapshot of environment variables.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

// The environment holds job tokens and AccessKey secrets: never print values.
impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env").field("names", &self.vars.keys().collect::<Vec<_>>()).finish()
    }
}

impl Env {
    /// This host's name (for the tag that tells which runner host created an instance).
    pub fn hostname(&self) -> String {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
        let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return "unknown-host".to_string();
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    /// The environment of this process. Variables whose name or value is not UTF-8 are left
    /// out: none of the ones this driver reads can be like that.
    #[allow(clippy::disallowed_methods)]
    pub fn from_process() -> Env {
        let vars = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Env { vars }
    }

    /// An environment built from pairs (tests, the demo harness).
    pub fn from_map<I, K, V>(pairs: I) -> Env
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Env { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    /// This environment with one more variable (tests).
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Env {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// A variable of the driver's own environment, exactly as set (possibly empty).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// A variable of the driver's own environment, trimmed; unset when empty or blank.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.get(name).map(str::trim).filter(|v| !v.is_empty())
    }

    /// A job variable: `CUSTOM_ENV_<name>`, trimmed; unset when empty or blank. Whatever this
    /// returns is controlled by whoever edits the job, so treat it as untrusted input.
    pub fn custom(&self, name: &str) -> Option<&str> {
        self.value(&format!("{CUSTOM_PREFIX}{name}"))
    }

    /// Every variable, in name order (for building a child process's environment).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// What the job's `CUSTOM_ENV_CI_*` variables say about it. None of it is identity: the job
    /// may set every one of these (see [`crate::identity`] for the trusted ids). Values that
    /// reach tags, file names or logs are checked here and dropped when malformed.
    pub fn job(&self) -> JobInfo {
        let c = |name: &str| self.custom(name).map(str::to_string);
        JobInfo {
            project_path: c("CI_PROJECT_PATH").filter(|p| crate::identity::is_project_path(p)),
            pipeline_id: c("CI_PIPELINE_ID").filter(|p| crate::identity::is_numeric_id(p)),
            job_timeout: self
                .custom("CI_JOB_TIMEOUT")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
        }
    }

    /// The exit codes and build-exit-code file gitlab-runner handed to this process.
    pub fn exit_codes(&self) -> ExitCodes {
        ExitCodes::from_vars(|k| self.get(k).map(str::to_string))
    }
}

/// What the job's variables (`CUSTOM_ENV_CI_*`) say, checked; every field is `None` when the
/// variable is missing, empty or malformed. Untrusted: never identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    /// `CI_PROJECT_PATH` (`group/project`), when it looks like one.
    pub project_path: Option<String>,
    /// `CI_PIPELINE_ID`, when it is digits.
    pub pipeline_id: Option<String>,
    /// `CI_JOB_TIMEOUT` (seconds), when positive.
    pub job_timeout: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_env() -> Env {
        Env::from_map([
            ("CUSTOM_ENV_CI_RUNNER_ID", "42"),
            ("CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN", "t1abcdefg"),
            ("CUSTOM_ENV_CI_PROJECT_ID", "7"),
            ("CUSTOM_ENV_CI_PROJECT_PATH", "group/app"),
            ("CUSTOM_ENV_CI_JOB_ID", "1001"),
            ("CUSTOM_ENV_CI_JOB_NAME", "build"),
            ("CUSTOM_ENV_CI_PIPELINE_ID", "555"),
            ("CUSTOM_ENV_CI_CONCURRENT_ID", "3"),
            ("CUSTOM_ENV_CI_JOB_TIMEOUT", "3600"),
            ("CUSTOM_ENV_CI_BUILDS_DIR", ""),
            ("CUSTOM_ENV_CI_PROJECT_DIR", "/builds/group/app"),
            ("ALIYUN_REGION_ID", "cn-hangzhou"),
        ])
    }

    #[test]
    fn custom_reads_only_the_prefixed_name() {
        let env = job_env().with("ALIYUN_SPOT_ARCH", "arm64").with("CUSTOM_ENV_ALIYUN_REGION_ID", "x");
        assert_eq!(env.custom("ALIYUN_SPOT_ARCH"), None);
        assert_eq!(env.get("ALIYUN_SPOT_ARCH"), Some("arm64"));
        assert_eq!(env.custom("ALIYUN_REGION_ID"), Some("x"));
        assert_eq!(env.get("ALIYUN_REGION_ID"), Some("cn-hangzhou"));
    }

    #[test]
    fn job_info_from_custom_env() {
        let j = job_env().job();
        assert_eq!(j.project_path.as_deref(), Some("group/app"));
        assert_eq!(j.pipeline_id.as_deref(), Some("555"));
        assert_eq!(j.job_timeout, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn malformed_values_that_would_reach_tags_or_logs_are_dropped() {
        let j = job_env()
            .with("CUSTOM_ENV_CI_PIPELINE_ID", "555\nERROR: fake")
            .with("CUSTOM_ENV_CI_PROJECT_PATH", "../../etc")
            .job();
        assert_eq!((j.pipeline_id, j.project_path), (None, None));
    }

    #[test]
    fn exit_codes_come_from_the_driver_environment() {
        let env =
            Env::from_map([("BUILD_FAILURE_EXIT_CODE", "11"), ("CUSTOM_ENV_SYSTEM_FAILURE_EXIT_CODE", "99")]);
        let c = env.exit_codes();
        assert_eq!((c.build_failure, c.system_failure), (11, 2));
    }

    #[test]
    fn debug_never_prints_values() {
        let env = Env::from_map([("ALIYUN_ACCESS_KEY_SECRET", "very-secret-value")]);
        let dbg = format!("{env:?}");
        assert!(dbg.contains("ALIYUN_ACCESS_KEY_SECRET") && !dbg.contains("very-secret-value"), "{dbg}");
    }
}
