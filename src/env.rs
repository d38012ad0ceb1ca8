//! The one place where the process environment is read.
//!
//! A stage process gets three kinds of variables mixed in one environment (docs/gitlab-runner.md,
//! "Environment"): the runner host's own (the administrator's `ALIYUN_*` settings, `HOME`, `PATH`), the
//! fixed ones gitlab-runner adds (`BUILD_FAILURE_EXIT_CODE`, …), and every job variable prefixed
//! with `CUSTOM_ENV_`, which anyone who can edit `.gitlab-ci.yml` controls. Taking one snapshot
//! here — from the process in the binaries, from a map in tests — keeps the rest of the crate
//! free of hidden inputs, and keeps the line between trusted and job-controlled values visible:
//! [`Env::get`] is the administrator's world, [`Env::custom`] the job's. Internal variables of
//! this driver never start with `CUSTOM_ENV_`, so a job cannot set them.
//!
//! `clippy.toml` bans `std::env::var` and friends everywhere else.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;

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

    /// The job's identity as gitlab-runner describes it in `CUSTOM_ENV_CI_*`.
    pub fn job(&self) -> JobInfo {
        let c = |name: &str| self.custom(name).map(str::to_string);
        let runner_short_token = c("CI_RUNNER_SHORT_TOKEN");
        JobInfo {
            runner_id: c("CI_RUNNER_ID").or_else(|| runner_short_token.clone()),
            runner_short_token,
            project_id: c("CI_PROJECT_ID"),
            project_path: c("CI_PROJECT_PATH"),
            job_id: c("CI_JOB_ID"),
            job_name: c("CI_JOB_NAME"),
            pipeline_id: c("CI_PIPELINE_ID"),
            concurrent_id: c("CI_CONCURRENT_ID"),
            job_timeout: self
                .custom("CI_JOB_TIMEOUT")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            builds_dir: c("CI_BUILDS_DIR"),
            project_dir: c("CI_PROJECT_DIR"),
        }
    }

    /// The exit codes and build-exit-code file gitlab-runner handed to this process.
    pub fn exit_codes(&self) -> ExitCodes {
        ExitCodes::from_vars(|k| self.get(k).map(str::to_string))
    }
}

/// What gitlab-runner tells a stage about its job (`CUSTOM_ENV_CI_*`). Every field is `None`
/// when the variable is missing or empty; [`JobInfo::ids`] checks the ones that name files and
/// tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobInfo {
    /// `CI_RUNNER_ID`, else `CI_RUNNER_SHORT_TOKEN`.
    pub runner_id: Option<String>,
    /// `CI_RUNNER_SHORT_TOKEN` (the first characters of the runner's token; not a secret).
    pub runner_short_token: Option<String>,
    /// `CI_PROJECT_ID`.
    pub project_id: Option<String>,
    /// `CI_PROJECT_PATH` (`group/project`).
    pub project_path: Option<String>,
    /// `CI_JOB_ID`.
    pub job_id: Option<String>,
    /// `CI_JOB_NAME`.
    pub job_name: Option<String>,
    /// `CI_PIPELINE_ID`.
    pub pipeline_id: Option<String>,
    /// `CI_CONCURRENT_ID` (the runner-local slot).
    pub concurrent_id: Option<String>,
    /// `CI_JOB_TIMEOUT` (seconds), when positive.
    pub job_timeout: Option<Duration>,
    /// `CI_BUILDS_DIR` (empty in the `config` stage).
    pub builds_dir: Option<String>,
    /// `CI_PROJECT_DIR` (empty in the `config` stage).
    pub project_dir: Option<String>,
}

/// The three identifiers that key a job's state directory, tags and `ClientToken`; checked to
/// be short and made only of `[A-Za-z0-9._-]`, so they are safe in paths and tag values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIds {
    /// The runner (`CI_RUNNER_ID`, else `CI_RUNNER_SHORT_TOKEN`).
    pub runner_id: String,
    /// The project (`CI_PROJECT_ID`).
    pub project_id: String,
    /// The job (`CI_JOB_ID`).
    pub job_id: String,
}

impl JobInfo {
    /// The runner, project and job ids, or one line naming the variable that is missing or
    /// unusable. A stage run outside gitlab-runner fails here, before touching anything.
    pub fn ids(&self) -> anyhow::Result<JobIds> {
        fn check(name: &str, value: &Option<String>) -> anyhow::Result<String> {
            let Some(v) = value else {
                bail!(
                    "gitlab-runner did not provide `{CUSTOM_PREFIX}{name}`; the stage programs must be \
                     started by gitlab-runner's custom executor (or `aliyun-spot demo`)"
                );
            };
            let safe = v.len() <= 64
                && v != "."
                && v != ".."
                && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !safe {
                // The job overrode a predefined variable: its mistake, not the runner's.
                return Err(crate::exit::JobError(format!(
                    "`{CUSTOM_PREFIX}{name}`=`{v}` is not a usable id: expected at most 64 letters, digits, \
                     `.`, `_` or `-`; do not override `{name}` in the job's variables"
                ))
                .into());
            }
            Ok(v.clone())
        }
        let runner_name = if self.runner_id.is_some()
            && self.runner_id == self.runner_short_token
            && self.runner_short_token.is_some()
        {
            "CI_RUNNER_SHORT_TOKEN"
        } else {
            "CI_RUNNER_ID"
        };
        Ok(JobIds {
            runner_id: check(runner_name, &self.runner_id)?,
            project_id: check("CI_PROJECT_ID", &self.project_id)?,
            job_id: check("CI_JOB_ID", &self.job_id)?,
        })
    }
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
        assert_eq!(j.runner_id.as_deref(), Some("42"));
        assert_eq!(j.project_path.as_deref(), Some("group/app"));
        assert_eq!(j.job_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(j.builds_dir, None, "empty means unset");
        assert_eq!(j.project_dir.as_deref(), Some("/builds/group/app"));
        let ids = j.ids().unwrap();
        assert_eq!(
            (ids.runner_id.as_str(), ids.project_id.as_str(), ids.job_id.as_str()),
            ("42", "7", "1001")
        );
    }

    #[test]
    fn runner_id_falls_back_to_the_short_token() {
        let mut m: BTreeMap<String, String> = job_env().iter().map(|(k, v)| (k.into(), v.into())).collect();
        m.remove("CUSTOM_ENV_CI_RUNNER_ID");
        let j = Env::from_map(m).job();
        assert_eq!(j.runner_id.as_deref(), Some("t1abcdefg"));
        assert_eq!(j.ids().unwrap().runner_id, "t1abcdefg");
    }

    #[test]
    fn ids_name_the_missing_or_unsafe_variable() {
        let err = Env::default().job().ids().unwrap_err().to_string();
        assert_eq!(
            err,
            "gitlab-runner did not provide `CUSTOM_ENV_CI_RUNNER_ID`; the stage programs must be started by \
             gitlab-runner's custom executor (or `aliyun-spot demo`)"
        );
        let err = job_env().with("CUSTOM_ENV_CI_JOB_ID", "../../etc").job().ids().unwrap_err().to_string();
        assert_eq!(
            err,
            "`CUSTOM_ENV_CI_JOB_ID`=`../../etc` is not a usable id: expected at most 64 letters, digits, `.`, \
             `_` or `-`; do not override `CI_JOB_ID` in the job's variables"
        );
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
