//! `config_exec`: validate everything, then print the runner JSON.
//!
//! This is the first thing gitlab-runner runs for a job, before anything is billed, so every
//! configuration or job-variable mistake must surface here as one clear line. stdout carries
//! only the JSON (gitlab-runner parses all of it); messages go to stderr, i.e. the job log.
//!
//! It also mints the preparation attempt's secret ([`crate::identity::JobSecret`]) and returns
//! it in `job_env`, which gitlab-runner hands unprefixed to `prepare`, every `run` and `cleanup`
//! of this attempt (gitlab-runner `executors/custom/custom.go`: `ConfigExecOutput.InjectInto`
//! keeps `job_env`, `prepareCommand` adds it to every later command's environment). A retried
//! preparation runs `config` again and gets a new secret.

use std::path::PathBuf;

use serde_json::json;

use crate::env::Env;
use crate::exit::StageError;

/// Builds the JSON gitlab-runner reads from `config_exec` (docs/gitlab-runner.md, "config";
/// gitlab-runner v18.3.0-1857-gd79f3e7b8, `executors/custom/api/config.go`, `ConfigExecOutput`).
pub fn runner_json(env: &Env, config_path: Option<PathBuf>) -> Result<serde_json::Value, StageError> {
    let (config, spec) = crate::config::load_for_job(config_path.as_deref(), env)?;
    for w in &config.warnings {
        crate::logging::stderr_line(&format!("WARNING: {w}"));
    }
    config.require_for_prepare(spec.shape.arch)?;
    crate::selection::offers::validate_endpoint(&config)?;
    if !config.helper.distributed_cache {
        // The config stage cannot see gitlab-runner's `[runners.cache]`: it reaches only the
        // cache stages' scripts (docs/gitlab-runner.md, "Cache that survives the instance"),
        // so the administrator states it in `helper.distributed_cache`.
        crate::logging::stderr_line(&no_distributed_cache_line(&config.runner.cache_dir));
    }
    // The job payload is checked here too, so a runner set up without it fails before
    // anything is billed.
    crate::identity::read_payload(env)?;
    let secret = crate::identity::JobSecret::mint();
    Ok(json!({
        "builds_dir": config.runner.builds_dir,
        "cache_dir": config.runner.cache_dir,
        "builds_dir_is_shared": false,
        "hostname": format!("{}-{}", crate::DRIVER_NAME, spec.shape.arch),
        "driver": { "name": crate::DRIVER_NAME, "version": crate::DRIVER_VERSION },
        "job_env": { crate::identity::JOB_SECRET_VAR: secret.expose() },
        "shell": config.runner.shell,
    }))
}

/// The job-log line saying that caches die with the instance.
pub fn no_distributed_cache_line(cache_dir: &str) -> String {
    format!(
        "Caches do not persist: without a distributed cache they stay in `{cache_dir}` on the instance, which is \
         deleted after the job; configure `[runners.cache]` in gitlab-runner (e.g. on Aliyun OSS) and set \
         `helper.distributed_cache = true` (see docs/gitlab-runner.md)"
    )
}

/// The `config` binary's main.
pub fn main(config_path: Option<PathBuf>) -> ! {
    let env = Env::from_process();
    let codes = env.exit_codes();
    let result = runner_json(&env, config_path).and_then(|json| {
        // A failed write is an error, not a panic: gitlab-runner needs the whole JSON.
        crate::logging::stdout_line(&json.to_string())
            .map_err(|e| StageError::system(format!("failed to write the runner JSON: {e}")))
    });
    std::process::exit(codes.code_for(&result));
}
