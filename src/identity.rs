//! Who a job is, taken only from what the job cannot change.
//!
//! Every `CUSTOM_ENV_*` variable, the predefined `CI_*` ones included, is written by whoever
//! edits `.gitlab-ci.yml` (a job's `variables:` may override `CI_JOB_ID`). Keying state, tags or
//! the release of "an earlier attempt" on them would let one project's job take over another's
//! instance. So a job's identity has three trusted sources:
//!
//! - **The job payload** (`JOB_RESPONSE_FILE`): gitlab-runner writes the job as GitLab sent it
//!   to `<tmp>/response.json`, mode 0600, before it runs `config_exec`, and passes the path to
//!   every stage (gitlab-runner `executors/custom/custom.go` `createJobResponseFile`,
//!   `executors/custom/command/command.go` `New`, v18.3.0 and main at v18.3.0-1857). Its schema
//!   is `common.JobResponse` (`common/network.go`, v18.3.0; `spec.Job` in `common/spec/spec.go`
//!   on main): top-level integer `id`, the job's secret `token`, and `job_info.project_id`
//!   (newer versions add `job_info.pipeline_id` and `job_info.project_full_path`).
//! - **The administrator**: the runner id is `runner.id` / `ALIYUN_SPOT_RUNNER_ID`, else this
//!   host's name.
//! - **A per-attempt secret** minted by `config` ([`JobSecret`]) and returned in `job_env`:
//!   gitlab-runner passes `job_env` unprefixed to `prepare`, every `run` and `cleanup` of the
//!   same preparation attempt (`executors/custom/custom.go` `prepareCommand`, which prefixes
//!   only the job's variables with `CUSTOM_ENV_`), so no job can set or read it. The state
//!   directory, the `ClientToken` and a tag are bound to a hash of it.
//!
//! docs/security.md ("Job identity") explains the model.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::env::Env;
use crate::secret::Secret;

/// The variable gitlab-runner names the job payload in (`executors/custom/api/const.go`).
pub const JOB_RESPONSE_FILE_VAR: &str = "JOB_RESPONSE_FILE";
/// The `job_env` variable carrying the per-attempt secret from `config` to the later stages.
/// It does not start with `CUSTOM_ENV_`, so no job variable can set it.
pub const JOB_SECRET_VAR: &str = "ALIYUN_SPOT_JOB_SECRET";
/// The administrator's runner id, overriding `runner.id` (never a job variable).
pub const RUNNER_ID_VAR: &str = "ALIYUN_SPOT_RUNNER_ID";

/// Random bytes in a [`JobSecret`].
const SECRET_BYTES: usize = 32;
/// Hex characters of a [`JobSecret::binding`] (128 bits).
const BINDING_HEX: usize = 32;
/// The largest job payload read (GitLab's payload with many variables is well below this).
const MAX_PAYLOAD: u64 = 64 * 1024 * 1024;

/// The one line a stage prints when it runs without the secret `config` minted.
pub fn missing_secret_line() -> String {
    format!(
        "`{JOB_SECRET_VAR}` is not set: this stage only acts for a job whose `config` stage ran in the same \
         preparation attempt; configure `config_exec` in gitlab-runner's [runners.custom] (nothing was touched)"
    )
}

/// A per-attempt secret: 32 random bytes from the OS, hex. Never printed (see [`Secret`]).
#[derive(Clone)]
pub struct JobSecret(Secret<String>);

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecret(REDACTED)")
    }
}

impl JobSecret {
    /// A fresh secret from the operating system's random number generator.
    pub fn mint() -> JobSecret {
        use rand::RngCore;
        let mut bytes = [0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        JobSecret(Secret::new(hex(&bytes)))
    }

    /// The secret gitlab-runner handed over from `config`'s `job_env`, or the one line saying
    /// it is missing or malformed.
    pub fn from_env(env: &Env) -> Result<JobSecret> {
        let Some(v) = env.get(JOB_SECRET_VAR).filter(|v| !v.is_empty()) else {
            bail!("{}", missing_secret_line());
        };
        if v.len() != SECRET_BYTES * 2 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            // The value is not printed: it may be a real secret with a typo.
            bail!(
                "`{JOB_SECRET_VAR}` is malformed (expected {} hex digits from the `config` stage); \
                 nothing was touched",
                SECRET_BYTES * 2
            );
        }
        Ok(JobSecret(Secret::new(v.to_ascii_lowercase())))
    }

    /// The value, for `config`'s `job_env` only.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// What state, tags and `ClientToken` carry instead of the secret: a domain-separated
    /// SHA-256, 32 hex digits. It names the attempt without revealing the secret.
    pub fn binding(&self) -> String {
        let mut d = digest("aliyun-spot-executor job binding", self.0.expose());
        d.truncate(BINDING_HEX);
        d
    }
}

/// True for a binding as [`JobSecret::binding`] makes them (for values read back from tags
/// and directory names).
pub fn is_binding(s: &str) -> bool {
    s.len() == BINDING_HEX && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What the job payload says about the job; the token only as a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPayload {
    /// `id`.
    pub job_id: u64,
    /// `job_info.project_id`.
    pub project_id: u64,
    /// `job_info.pipeline_id`, when this gitlab-runner sends it and it is positive.
    pub pipeline_id: Option<u64>,
    /// `job_info.project_full_path`, when sent and well-formed ([`is_project_path`]).
    pub project_path: Option<String>,
    /// A domain-separated SHA-256 of `token` (hex): the same for every preparation attempt of
    /// the job, different for every job, and unknowable to anyone without the token.
    pub token_digest: String,
}

#[derive(Deserialize)]
struct RawPayload {
    id: i64,
    #[serde(default)]
    token: String,
    job_info: RawJobInfo,
}

#[derive(Deserialize)]
struct RawJobInfo {
    project_id: i64,
    #[serde(default)]
    pipeline_id: Option<i64>,
    #[serde(default)]
    project_full_path: Option<String>,
}

/// Reads and checks `JOB_RESPONSE_FILE`: present, a regular file owned by this process's
/// user and writable by no one else, gitlab-runner's JSON with a positive `id`, a positive
/// `job_info.project_id` and a `token`. Each failure is one line naming the path.
pub fn read_payload(env: &Env) -> Result<JobPayload> {
    let Some(path) = env.value(JOB_RESPONSE_FILE_VAR) else {
        bail!(
            "gitlab-runner did not provide `{JOB_RESPONSE_FILE_VAR}` (the job payload this driver takes the job's \
             identity from); the stage programs must be started by gitlab-runner's custom executor (or `aliyun-spot demo`)"
        );
    };
    let path = Path::new(path);
    let bytes = read_private_file(path)?;
    let raw: RawPayload = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "the job payload `{}` is not gitlab-runner's job JSON ({e}); expected an integer `id`, \
             `job_info.project_id` and `token`",
            path.display()
        )
    })?;
    let positive = |v: i64, what: &str| -> Result<u64> {
        u64::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .with_context(|| format!("the job payload `{}` has no usable {what} ({v})", path.display()))
    };
    let job_id = positive(raw.id, "job id `id`")?;
    let project_id = positive(raw.job_info.project_id, "project id `job_info.project_id`")?;
    if raw.token.is_empty() {
        bail!("the job payload `{}` has no job `token`", path.display());
    }
    Ok(JobPayload {
        job_id,
        project_id,
        pipeline_id: raw.job_info.pipeline_id.and_then(|p| u64::try_from(p).ok()).filter(|p| *p > 0),
        project_path: raw.job_info.project_full_path.filter(|p| is_project_path(p)),
        token_digest: digest("aliyun-spot-executor job token", &raw.token),
    })
}

/// The file's bytes, refusing a symlink, a non-regular file, another user's file or one that
/// group or others may write (gitlab-runner creates it 0600).
fn read_private_file(path: &Path) -> Result<Vec<u8>> {
    let show = path.display();
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot read the job payload `{show}` (`{JOB_RESPONSE_FILE_VAR}`)"))?;
    let meta = file.metadata().with_context(|| format!("cannot read the job payload `{show}`"))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() {
        bail!("the job payload `{show}` is not a regular file");
    }
    if meta.uid() != me {
        bail!(
            "the job payload `{show}` is owned by uid {}, not by this driver's user (uid {me}); refusing to take \
             the job's identity from it",
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "the job payload `{show}` may be written by group or others (mode {:04o}); gitlab-runner writes it 0600",
            meta.mode() & 0o7777
        );
    }
    let mut bytes = Vec::new();
    file.take(MAX_PAYLOAD)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the job payload `{show}`"))?;
    Ok(bytes)
}

/// The trusted identity of the job a stage acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    /// The administrator's runner id ([`runner_id`]).
    pub runner_id: String,
    /// The project id from the payload.
    pub project_id: String,
    /// The job id from the payload.
    pub job_id: String,
    /// The pipeline id: the payload's, else a `CUSTOM_ENV_CI_PIPELINE_ID` made of digits.
    pub pipeline_id: Option<String>,
    /// The project path: the payload's, else a well-formed `CUSTOM_ENV_CI_PROJECT_PATH`.
    pub project_path: Option<String>,
    /// See [`JobPayload::token_digest`].
    pub token_digest: String,
}

impl JobIdentity {
    /// The identity from the payload, the configuration's runner id and (for the pipeline id
    /// and project path that older gitlab-runners leave out of the payload) checked job
    /// variables.
    pub fn new(payload: JobPayload, runner_id: String, env: &Env) -> JobIdentity {
        let job = env.job();
        JobIdentity {
            runner_id,
            project_id: payload.project_id.to_string(),
            job_id: payload.job_id.to_string(),
            pipeline_id: payload.pipeline_id.map(|p| p.to_string()).or(job.pipeline_id),
            project_path: payload.project_path.or(job.project_path),
            token_digest: payload.token_digest,
        }
    }

    /// One line for the job log when the job's `CI_JOB_ID` / `CI_PROJECT_ID` variables differ
    /// from the payload; `None` when they agree or are unset.
    pub fn disagreement(&self, env: &Env) -> Option<String> {
        let claims: Vec<String> = [("CI_JOB_ID", &self.job_id), ("CI_PROJECT_ID", &self.project_id)]
            .into_iter()
            .filter_map(|(name, trusted)| {
                let claimed = env.custom(name)?;
                (claimed != trusted.as_str()).then(|| format!("{name}={}", escape_for_log(claimed, 64)))
            })
            .collect();
        if claims.is_empty() {
            return None;
        }
        Some(format!(
            "WARNING: the job's variables say {} but gitlab-runner's job payload says job {} of project {}; \
             using the payload's ids",
            claims.join(" and "),
            self.job_id,
            self.project_id
        ))
    }
}

/// The runner id: `runner.id` (or `ALIYUN_SPOT_RUNNER_ID`) from the configuration, else this
/// host's name made safe for paths and tags.
pub fn runner_id(configured: Option<&str>, env: &Env) -> String {
    match configured {
        Some(id) => id.to_string(),
        None => default_runner_id(&env.hostname()),
    }
}

/// A host name as a runner id: characters outside `[A-Za-z0-9._-]` become `-`, at most 64.
pub fn default_runner_id(hostname: &str) -> String {
    let id: String = hostname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(64)
        .collect();
    if is_id(&id) {
        id
    } else {
        "unknown-host".to_string()
    }
}

/// True for an id usable in paths and tag values: 1–64 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn is_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v != "."
        && v != ".."
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// True for a GitLab project path (`group/sub/project`): 1–255 of `[A-Za-z0-9._/-]`, no empty,
/// `.` or `..` segment.
pub fn is_project_path(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 255
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
        && v.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// True for digits only, 1–20 of them (GitLab's pipeline and job ids).
pub fn is_numeric_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit())
}

/// An ECS instance id as the API returns it, checked against `^i-[a-z0-9]+$` (at most 64)
/// before it reaches a shell command, a path or a log line; the error names the value escaped.
pub fn checked_instance_id(id: &str) -> Result<&str> {
    let ok = id.len() > 2
        && id.len() <= 64
        && id.starts_with("i-")
        && id[2..].bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        bail!("the ECS API returned an instance id `{}` that is not `i-` and lower-case letters or digits; refusing to use it", escape_for_log(id, 64));
    }
    Ok(id)
}

/// A hostile value made safe for one log line: control characters and non-ASCII escaped
/// (`\n`, `\u{1b}`), at most `max` characters before escaping, `…` when cut.
pub fn escape_for_log(v: &str, max: usize) -> String {
    let mut out: String = v
        .chars()
        .take(max)
        .flat_map(|c| if c.is_ascii_graphic() || c == ' ' { vec![c] } else { c.escape_default().collect() })
        .collect();
    if v.chars().count() > max {
        out.push('…');
    }
    out
}

fn digest(domain: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    h.update([0u8]);
    h.update(value.as_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn payload_file(dir: &Path, json: &str, mode: u32) -> Env {
        let p = dir.join("response.json");
        std::fs::write(&p, json).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        Env::from_map([(JOB_RESPONSE_FILE_VAR, p.display().to_string())])
    }

    const PAYLOAD: &str = r#"{"id": 2001, "token": "glcbt-64_abc", "allow_git_fetch": true,
        "job_info": {"name": "build", "stage": "test", "project_id": 42, "project_name": "app",
        "pipeline_id": 900, "project_full_path": "group/app", "extra": 1},
        "variables": [{"key": "CI_JOB_ID", "value": "2001", "public": true}], "unknown": {}}"#;

    #[test]
    fn payload_gives_ids_and_a_token_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let env = payload_file(dir.path(), PAYLOAD, 0o600);
        let p = read_payload(&env).unwrap();
        assert_eq!((p.job_id, p.project_id, p.pipeline_id), (2001, 42, Some(900)));
        assert_eq!(p.project_path.as_deref(), Some("group/app"));
        assert_eq!(p.token_digest.len(), 64);
        assert!(!format!("{p:?}").contains("glcbt"));
        // The digest is stable and depends on the token.
        let dir2 = tempfile::tempdir().unwrap();
        let other = payload_file(dir2.path(), &PAYLOAD.replace("glcbt-64_abc", "glcbt-64_abd"), 0o600);
        assert_ne!(read_payload(&other).unwrap().token_digest, p.token_digest);
        assert_eq!(read_payload(&env).unwrap().token_digest, p.token_digest);
    }

    #[test]
    fn an_older_payload_without_pipeline_or_path_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let env =
            payload_file(dir.path(), r#"{"id": 5, "token": "t", "job_info": {"project_id": 6}}"#, 0o600);
        let p = read_payload(&env).unwrap();
        assert_eq!((p.job_id, p.project_id, p.pipeline_id, p.project_path), (5, 6, None, None));
    }

    #[test]
    fn a_bad_payload_is_one_line_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("response.json").display().to_string();
        let err = |env: &Env| format!("{:#}", read_payload(env).unwrap_err());
        assert_eq!(
            err(&Env::default()),
            "gitlab-runner did not provide `JOB_RESPONSE_FILE` (the job payload this driver takes the job's \
             identity from); the stage programs must be started by gitlab-runner's custom executor (or `aliyun-spot demo`)"
        );
        let env = Env::from_map([(JOB_RESPONSE_FILE_VAR, path.clone())]);
        assert!(
            err(&env).starts_with(&format!("cannot read the job payload `{path}` (`JOB_RESPONSE_FILE`): "))
        );
        let env =
            payload_file(dir.path(), r#"{"id": "2001", "token": "t", "job_info": {"project_id": 1}}"#, 0o600);
        assert!(
            err(&env).starts_with(&format!("the job payload `{path}` is not gitlab-runner's job JSON (")),
            "{}",
            err(&env)
        );
        let env =
            payload_file(dir.path(), r#"{"id": 0, "token": "t", "job_info": {"project_id": 1}}"#, 0o600);
        assert_eq!(err(&env), format!("the job payload `{path}` has no usable job id `id` (0)"));
        let env = payload_file(dir.path(), r#"{"id": 3, "job_info": {"project_id": 1}}"#, 0o600);
        assert_eq!(err(&env), format!("the job payload `{path}` has no job `token`"));
        let env = payload_file(dir.path(), PAYLOAD, 0o622);
        assert_eq!(
            err(&env),
            format!("the job payload `{path}` may be written by group or others (mode 0622); gitlab-runner writes it 0600")
        );
        // A symlink is refused even when it points at a good file.
        let good = dir.path().join("good.json");
        std::fs::write(&good, PAYLOAD).unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let env = Env::from_map([(JOB_RESPONSE_FILE_VAR, link.display().to_string())]);
        assert!(err(&env).starts_with("cannot read the job payload"), "{}", err(&env));
    }

    #[test]
    fn secret_round_trips_and_only_its_binding_is_shown() {
        let s = JobSecret::mint();
        assert_eq!(s.expose().len(), 64);
        assert_ne!(JobSecret::mint().expose(), s.expose(), "fresh randomness");
        let env = Env::from_map([(JOB_SECRET_VAR, s.expose())]);
        let back = JobSecret::from_env(&env).unwrap();
        assert_eq!(back.binding(), s.binding());
        assert!(is_binding(&s.binding()));
        assert!(!s.binding().contains(s.expose()) && !s.expose().starts_with(&s.binding()));
        assert_eq!(format!("{s:?}"), "JobSecret(REDACTED)");
        assert_eq!(format!("{:#}", JobSecret::from_env(&Env::default()).unwrap_err()), missing_secret_line());
        // A job variable of the same name does not count.
        let job = Env::from_map([(format!("CUSTOM_ENV_{JOB_SECRET_VAR}"), s.expose().to_string())]);
        assert_eq!(format!("{:#}", JobSecret::from_env(&job).unwrap_err()), missing_secret_line());
        let bad = Env::from_map([(JOB_SECRET_VAR, "zz")]);
        assert_eq!(
            format!("{:#}", JobSecret::from_env(&bad).unwrap_err()),
            "`ALIYUN_SPOT_JOB_SECRET` is malformed (expected 64 hex digits from the `config` stage); nothing was touched"
        );
    }

    #[test]
    fn disagreement_is_one_escaped_line() {
        let id = JobIdentity {
            runner_id: "host".into(),
            project_id: "42".into(),
            job_id: "3001".into(),
            pipeline_id: None,
            project_path: None,
            token_digest: String::new(),
        };
        assert_eq!(id.disagreement(&Env::default()), None);
        let agree = Env::from_map([("CUSTOM_ENV_CI_JOB_ID", "3001"), ("CUSTOM_ENV_CI_PROJECT_ID", "42")]);
        assert_eq!(id.disagreement(&agree), None);
        let forged =
            Env::from_map([("CUSTOM_ENV_CI_JOB_ID", "2001\nERROR: x"), ("CUSTOM_ENV_CI_PROJECT_ID", "42")]);
        assert_eq!(
            id.disagreement(&forged).unwrap(),
            "WARNING: the job's variables say CI_JOB_ID=2001\\nERROR: x but gitlab-runner's job payload says job 3001 \
             of project 42; using the payload's ids"
        );
        let both = Env::from_map([("CUSTOM_ENV_CI_JOB_ID", "2001"), ("CUSTOM_ENV_CI_PROJECT_ID", "7")]);
        assert_eq!(
            id.disagreement(&both).unwrap(),
            "WARNING: the job's variables say CI_JOB_ID=2001 and CI_PROJECT_ID=7 but gitlab-runner's job payload \
             says job 3001 of project 42; using the payload's ids"
        );
    }

    #[test]
    fn runner_id_comes_from_the_administrator_only() {
        let load = |toml: &str, env: &Env| crate::config::from_toml(toml, None, env).map(|c| c.runner.id);
        let none = Env::default();
        assert_eq!(load("[runner]\nid = \"ci-7\"\n", &none).unwrap().as_deref(), Some("ci-7"));
        let admin = Env::from_map([(RUNNER_ID_VAR, "fleet-a")]);
        assert_eq!(load("[runner]\nid = \"ci-7\"\n", &admin).unwrap().as_deref(), Some("fleet-a"));
        let job = Env::from_map([(format!("CUSTOM_ENV_{RUNNER_ID_VAR}"), "evil")]);
        assert_eq!(load("", &job).unwrap(), None, "a job variable is never the runner id");
        assert_eq!(runner_id(None, &job), default_runner_id(&job.hostname()));
        assert_eq!(
            format!("{:#}", load("[runner]\nid = \"a b\"\n", &none).unwrap_err()),
            "`runner.id` = `a b` is not a usable runner id; use at most 64 letters, digits, `.`, `_` or `-`"
        );
        let bad = Env::from_map([(RUNNER_ID_VAR, "../x")]);
        assert_eq!(
            format!("{:#}", load("", &bad).unwrap_err()),
            "environment variable `ALIYUN_SPOT_RUNNER_ID`=`../x` is not a usable runner id; use at most 64 \
             letters, digits, `.`, `_` or `-`"
        );
    }

    #[test]
    fn extra_tags_leave_room_for_the_executors_seven() {
        let tags = |n: usize| {
            let mut t = String::from("[instance.tags]\n");
            for i in 0..n {
                t.push_str(&format!("team{i} = \"x\"\n"));
            }
            crate::config::from_toml(&t, None, &Env::default())
        };
        assert!(tags(13).is_ok());
        let err = format!("{:#}", tags(14).unwrap_err());
        assert!(err.contains("the executor uses 7; keep at most 13"), "{err}");
    }

    #[test]
    fn a_job_variables_control_characters_are_escaped_in_errors() {
        let cfg = crate::config::from_toml("", None, &Env::default()).unwrap();
        let env = Env::from_map([("CUSTOM_ENV_ALIYUN_SPOT_ARCH", "arm\u{1b}[2K\rx")]);
        let err = format!("{:#}", cfg.job_spec(&env).unwrap_err());
        assert!(err.contains("`arm\\u{1b}[2K\\rx`"), "{err}");
        assert!(!err.contains('\u{1b}') && !err.contains('\r'), "{err}");
    }

    #[test]
    fn value_checks() {
        assert_eq!(default_runner_id("build-01.example.com"), "build-01.example.com");
        assert_eq!(default_runner_id("weird host/../x"), "weird-host-..-x");
        assert_eq!(default_runner_id(""), "unknown-host");
        assert_eq!(default_runner_id(".."), "unknown-host");
        assert!(is_project_path("group/sub/app.x") && !is_project_path("a/../b") && !is_project_path("a b"));
        assert!(is_numeric_id("900") && !is_numeric_id("9 0") && !is_numeric_id(""));
        assert_eq!(checked_instance_id("i-bp1abc0").unwrap(), "i-bp1abc0");
        for bad in ["i-", "i-ABC", "i-a;rm -rf /", "x-abc", "i-a/../b", "i-a'b"] {
            let err = format!("{:#}", checked_instance_id(bad).unwrap_err());
            assert!(err.starts_with("the ECS API returned an instance id `"), "{err}");
        }
        assert_eq!(escape_for_log("a\u{1b}[31mb\r", 64), "a\\u{1b}[31mb\\r");
        assert_eq!(escape_for_log("abcdef", 3), "abc…");
    }
}
