//! The per-job state file: what `prepare` learned, for `run` and `cleanup` to use.
//!
//! Each stage is a separate process, so `prepare` records the instance it created (id, address,
//! pinned host key, price) in `<root>/<runner>/<project>-<job>-<binding>/state.json` and the
//! client private key beside it in `id_ed25519`. Runner, project and job are the trusted ids and
//! `<binding>` the hash of the preparation attempt's secret ([`crate::identity`]), so a stage
//! finds only its own attempt's state, and a job can neither name nor overwrite another's. The state is a cache, the instance's tags are the truth:
//! `cleanup` and `sweep` can find an instance without it, so a missing file is `Ok(None)`, not an
//! error. But a file that exists and cannot be read is an error naming the path — silently
//! ignoring it could leak an instance.
//!
//! The JSON is versioned and holds no secret; files are 0600 in 0700 directories, written
//! atomically (see [`crate::fsutil`]) so a stage killed mid-write never leaves a torn file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::fsutil::{create_private_dir, read_nofollow, write_atomic};
use crate::secret::Secret;
use crate::selection::Arch;

/// The version of [`JobState`] this build writes and reads.
pub const STATE_VERSION: u32 = 2;
/// File name of the JSON state inside a job directory.
pub const STATE_FILE: &str = "state.json";
/// File name of the client private key inside a job directory.
pub const PRIVATE_KEY_FILE: &str = "id_ed25519";

/// Which job, and which preparation attempt of it, a state belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobKey {
    /// The administrator's runner id (`runner.id`, else the host name).
    pub runner_id: String,
    /// The project id from the job payload.
    pub project_id: String,
    /// The job id from the job payload.
    pub job_id: String,
    /// The hash of the attempt's secret ([`crate::identity::JobSecret::binding`]).
    pub binding: String,
}

/// How far a job's instance got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// `RunInstances` is about to be (or was) sent with the recorded client token; the instance
    /// id may not be known yet.
    Creating,
    /// The instance exists (its id is recorded) but SSH has not answered yet.
    Created,
    /// SSH answered with the pinned host key; scripts may run.
    Ready,
    /// `cleanup` deleted the instance.
    Released,
}

/// Everything the later stages need about a job's instance. Holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// The job this state belongs to.
    pub runner_id: String,
    /// See [`JobKey::project_id`].
    pub project_id: String,
    /// See [`JobKey::job_id`].
    pub job_id: String,
    /// See [`JobKey::binding`].
    pub binding: String,
    /// The digest of the job's token ([`crate::identity::JobPayload::token_digest`]): a later
    /// preparation attempt releases this attempt's instance only when its own digest is equal,
    /// i.e. when it is provably the same job.
    pub token_digest: String,
    /// The pipeline id, for tags and the ledger.
    pub pipeline_id: Option<String>,
    /// The `ClientToken` sent with `RunInstances`, so a retry never creates a second instance.
    pub client_token: String,
    /// ECS region.
    pub region: String,
    /// How far the job got.
    pub phase: Phase,
    /// The ECS instance id, once known.
    pub instance_id: Option<String>,
    /// The instance type chosen.
    pub instance_type: String,
    /// The zone chosen.
    pub zone: String,
    /// The spot price per hour seen when the offer was chosen, in `currency`.
    pub spot_price: Option<f64>,
    /// The currency of `spot_price` and `price_limit` (`CNY`, `USD`; `crate::selection::pricing`); states
    /// written before it was recorded read as CNY.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// The `SpotPriceLimit` sent, if any.
    pub price_limit: Option<f64>,
    /// CPU architecture.
    pub arch: Arch,
    /// The address to SSH to, once known.
    pub ip: Option<String>,
    /// SSH port.
    pub ssh_port: u16,
    /// SSH user.
    pub ssh_user: String,
    /// The pinned host public key (OpenSSH format) the instance's sshd must present.
    pub host_public_key: String,
    /// When the state was first written.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When SSH first answered.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub ready_at: Option<OffsetDateTime>,
    /// When cleanup released the instance.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub released_at: Option<OffsetDateTime>,
    /// When `RunInstances` answered with the instance id (the start of billing).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub instance_created_at: Option<OffsetDateTime>,
    /// The preparation attempt that wrote this state (part of the `ClientToken`).
    #[serde(default)]
    pub attempt_id: String,
}

fn default_currency() -> String {
    crate::selection::pricing::DEFAULT_CURRENCY.to_string()
}

impl JobState {
    /// The key of the job this state belongs to.
    pub fn key(&self) -> JobKey {
        JobKey {
            runner_id: self.runner_id.clone(),
            project_id: self.project_id.clone(),
            job_id: self.job_id.clone(),
            binding: self.binding.clone(),
        }
    }
}

/// One job directory found by [`StateStore::list`].
#[derive(Debug)]
pub struct ListedJob {
    /// The job directory.
    pub dir: PathBuf,
    /// Its state, or why it could not be read (a sweep reports it and goes on).
    pub state: Result<JobState>,
}

/// The directory tree holding every job's state on this runner host.
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// A store rooted at `root` (created on first save).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<runner>/<project>-<job>-<binding>`, each component sanitised so that no value
    /// can escape the root or collide with another job or attempt.
    pub fn job_dir(&self, key: &JobKey) -> PathBuf {
        self.root.join(sanitize(&key.runner_id)).join(format!(
            "{}{}",
            job_prefix(&key.project_id, &key.job_id),
            sanitize(&key.binding)
        ))
    }

    /// The other preparation attempts of `key`'s job (same runner, project and job, another
    /// binding) that left a state, sorted by path; an unreadable state is listed with its error.
    pub fn other_attempts(&self, key: &JobKey) -> Result<Vec<ListedJob>> {
        let prefix = job_prefix(&key.project_id, &key.job_id);
        let own = self.job_dir(key);
        let mut out = Vec::new();
        for dir in read_dir_sorted(&self.root.join(sanitize(&key.runner_id)))? {
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if dir == own || !name.starts_with(&prefix) || !dir.is_dir() {
                continue;
            }
            if let Some(job) = listed(dir)? {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// The state file path of a job.
    pub fn state_path(&self, key: &JobKey) -> PathBuf {
        self.job_dir(key).join(STATE_FILE)
    }

    /// The private key path of a job.
    pub fn private_key_path(&self, key: &JobKey) -> PathBuf {
        self.job_dir(key).join(PRIVATE_KEY_FILE)
    }

    /// Loads a job's state; `Ok(None)` when there is none.
    pub fn load(&self, key: &JobKey) -> Result<Option<JobState>> {
        let path = self.state_path(key);
        match read_nofollow(&path) {
            Ok(bytes) => read_state(&path, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read job state `{}`", path.display())),
        }
    }

    /// Saves a job's state atomically (0600, directories 0700).
    pub fn save(&self, key: &JobKey, state: &JobState) -> Result<()> {
        if state.key() != *key {
            bail!(
                "job state for runner `{}` job `{}` cannot be saved as job `{}`",
                state.runner_id,
                state.job_id,
                key.job_id
            );
        }
        let dir = self.prepare_dir(key)?;
        let mut json = serde_json::to_vec_pretty(state).context("failed to encode job state")?;
        json.push(b'\n');
        write_atomic(&dir.join(STATE_FILE), &json, 0o600)
    }

    /// Stores the job's client private key in `id_ed25519` (0600).
    pub fn save_private_key(&self, key: &JobKey, private_openssh: &Secret<String>) -> Result<()> {
        let dir = self.prepare_dir(key)?;
        write_atomic(&dir.join(PRIVATE_KEY_FILE), private_openssh.expose().as_bytes(), 0o600)
    }

    /// Loads the job's client private key; `Ok(None)` when there is none.
    pub fn load_private_key(&self, key: &JobKey) -> Result<Option<Secret<String>>> {
        let path = self.private_key_path(key);
        match read_nofollow(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(s) => Ok(Some(Secret::new(s))),
                Err(_) => bail!("private key `{}` is not text", path.display()),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to read private key `{}`", path.display())),
        }
    }

    /// Removes a job's directory; removing a job that has none is not an error.
    pub fn remove(&self, key: &JobKey) -> Result<()> {
        let dir = self.job_dir(key);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove job state `{}`", dir.display())),
        }
    }

    /// Every job directory under the root that holds a state file, sorted by path.
    ///
    /// A missing root is an empty list; an unreadable state is listed with its error.
    pub fn list(&self) -> Result<Vec<ListedJob>> {
        let mut out = Vec::new();
        for runner_dir in read_dir_sorted(&self.root)? {
            if !runner_dir.is_dir() {
                continue;
            }
            for job_dir in read_dir_sorted(&runner_dir)? {
                if let Some(job) = listed(job_dir)? {
                    out.push(job);
                }
            }
        }
        Ok(out)
    }

    fn prepare_dir(&self, key: &JobKey) -> Result<PathBuf> {
        let dir = self.job_dir(key);
        create_private_dir(&dir)?;
        Ok(dir)
    }
}

/// The job directory `dir` with its state; `None` when it holds no state file.
fn listed(dir: PathBuf) -> Result<Option<ListedJob>> {
    let path = dir.join(STATE_FILE);
    let state = match read_nofollow(&path) {
        Ok(bytes) => read_state(&path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => Err(e).with_context(|| format!("failed to read job state `{}`", path.display())),
    };
    Ok(Some(ListedJob { dir, state }))
}

/// `<project>-<job>-`, the start of every attempt directory of one job.
fn job_prefix(project_id: &str, job_id: &str) -> String {
    format!("{}-{}-", sanitize(project_id), sanitize(job_id))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to list `{}`", dir.display())),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to list `{}`", dir.display()))?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}

fn read_state(path: &Path, bytes: &[u8]) -> Result<JobState> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(bytes)
        .with_context(|| format!("job state `{}` is corrupt", path.display()))?;
    if v.version != STATE_VERSION {
        bail!(
            "job state `{}` has version {}, this build reads version {STATE_VERSION}",
            path.display(),
            v.version
        );
    }
    serde_json::from_slice(bytes).with_context(|| format!("job state `{}` is corrupt", path.display()))
}

/// Maps an identifier to a safe single path component: `[A-Za-z0-9_.-]` kept, anything else
/// (including `/`) as `%XX`; `.`/`..`/empty are escaped too. Distinct inputs stay distinct.
fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // `-` is escaped above so `<project>-<job>` splits unambiguously.
    match out.as_str() {
        "" => "%".to_string(),
        "." => "%2E".to_string(),
        ".." => "%2E%2E".to_string(),
        _ => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    const B1: &str = "0123456789abcdef0123456789abcdef";
    const B2: &str = "fedcba9876543210fedcba9876543210";

    fn key() -> JobKey {
        JobKey { runner_id: "r1".into(), project_id: "42".into(), job_id: "1001".into(), binding: B1.into() }
    }

    fn state(k: &JobKey) -> JobState {
        JobState {
            version: STATE_VERSION,
            runner_id: k.runner_id.clone(),
            project_id: k.project_id.clone(),
            job_id: k.job_id.clone(),
            binding: k.binding.clone(),
            token_digest: "d".repeat(64),
            pipeline_id: Some("77".into()),
            client_token: "aliyun-spot-r1-1001-1".into(),
            region: "cn-hangzhou".into(),
            phase: Phase::Ready,
            instance_id: Some("i-bp1abc".into()),
            instance_type: "ecs.c7.large".into(),
            zone: "cn-hangzhou-b".into(),
            spot_price: Some(0.123),
            currency: "CNY".into(),
            price_limit: Some(0.1476),
            arch: Arch::Amd64,
            ip: Some("127.0.3.4".into()),
            ssh_port: 22,
            ssh_user: "root".into(),
            host_public_key:
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOpKOENaBPHgx95EGK6IKMUf3e5bRLygfN5TbJx2rGjj h".into(),
            created_at: time::macros::datetime!(2025-01-02 03:04:05 UTC),
            ready_at: Some(time::macros::datetime!(2025-01-02 03:05:00 UTC)),
            released_at: None,
            instance_created_at: None,
            attempt_id: "custom-executor1".to_string(),
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("state"));
        let k = key();
        assert!(store.load(&k).unwrap().is_none());
        assert!(store.load_private_key(&k).unwrap().is_none());
        let s = state(&k);
        store.save(&k, &s).unwrap();
        store.save_private_key(&k, &Secret::new("-----BEGIN OPENSSH PRIVATE KEY-----\n".into())).unwrap();
        assert_eq!(store.load(&k).unwrap().unwrap(), s);
        assert_eq!(
            store.load_private_key(&k).unwrap().unwrap().expose(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        );
        let dir = store.job_dir(&k);
        assert_eq!(dir, tmp.path().join(format!("state/r1/42-1001-{B1}")));
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(mode_of(dir.parent().unwrap()), 0o700);
        assert_eq!(mode_of(&dir.join(STATE_FILE)), 0o600);
        assert_eq!(mode_of(&dir.join(PRIVATE_KEY_FILE)), 0o600);
        let json = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(json.contains("\"version\": 2"), "{json}");
        assert!(json.contains("\"created_at\": \"2025-01-02T03:04:05Z\""), "{json}");
        assert!(!json.contains("PRIVATE"));
    }

    #[test]
    fn remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let k = key();
        store.remove(&k).unwrap();
        store.save(&k, &state(&k)).unwrap();
        store.remove(&k).unwrap();
        assert!(store.load(&k).unwrap().is_none());
        assert!(!store.job_dir(&k).exists());
        store.remove(&k).unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let k = key();
        store.save(&k, &state(&k)).unwrap();
        let path = store.state_path(&k);
        fs::write(&path, b"{\"version\": 1, \"runner_id\": ").unwrap();
        let err = store.load(&k).unwrap_err();
        assert_eq!(err.to_string(), format!("job state `{}` is corrupt", path.display()));
        fs::write(&path, b"{\"version\": 9}").unwrap();
        assert_eq!(
            store.load(&k).unwrap_err().to_string(),
            format!("job state `{}` has version 9, this build reads version 2", path.display())
        );
    }

    #[test]
    fn key_components_cannot_escape_the_root() {
        let store = StateStore::new("/var/lib/x");
        let k = |r: &str, p: &str, j: &str, b: &str| JobKey {
            runner_id: r.into(),
            project_id: p.into(),
            job_id: j.into(),
            binding: b.into(),
        };
        assert_eq!(
            store.job_dir(&k("..", "a/b", "-1", "/")),
            PathBuf::from("/var/lib/x/%2E%2E/a%2Fb-%2D1-%2F")
        );
        assert_ne!(store.job_dir(&k("r", "1-2", "3", "b")), store.job_dir(&k("r", "1", "2-3", "b")));
        assert_ne!(store.job_dir(&k("r", "1", "2", "3-b")), store.job_dir(&k("r", "1", "2-3", "b")));
        assert_eq!(store.job_dir(&k("", "1", "2", "")), PathBuf::from("/var/lib/x/%/1-2-%"));
    }

    #[test]
    fn save_under_another_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let other = JobKey { job_id: "9".into(), ..key() };
        let err = store.save(&other, &state(&key())).unwrap_err().to_string();
        assert_eq!(err, "job state for runner `r1` job `1001` cannot be saved as job `9`");
    }

    #[test]
    fn list_finds_every_job_and_reports_bad_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("root"));
        assert!(store.list().unwrap().is_empty());
        let a = key();
        let b =
            JobKey { runner_id: "r2".into(), project_id: "7".into(), job_id: "8".into(), binding: B1.into() };
        let c = JobKey { job_id: "1002".into(), ..key() };
        for k in [&a, &b, &c] {
            store.save(k, &state(k)).unwrap();
        }
        fs::write(store.state_path(&c), b"garbage").unwrap();
        // A directory without a state file (e.g. only a key) is not a job yet.
        store.save_private_key(&JobKey { job_id: "5".into(), ..key() }, &Secret::new("k".into())).unwrap();
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].state.as_ref().unwrap().key(), a);
        assert_eq!(
            listed[1].state.as_ref().unwrap_err().to_string(),
            format!("job state `{}` is corrupt", store.state_path(&c).display())
        );
        assert_eq!(listed[2].state.as_ref().unwrap().key(), b);
    }

    #[test]
    fn other_attempts_are_the_same_jobs_other_bindings_only() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let mine = key();
        assert!(store.other_attempts(&mine).unwrap().is_empty(), "no runner directory yet");
        let earlier = JobKey { binding: B2.into(), ..key() };
        // Same job id in another project, another job whose id starts alike, another runner.
        let others = [
            JobKey { project_id: "43".into(), binding: B2.into(), ..key() },
            JobKey { job_id: "10011".into(), binding: B2.into(), ..key() },
            JobKey { runner_id: "r2".into(), binding: B2.into(), ..key() },
        ];
        for k in [&mine, &earlier].into_iter().chain(others.iter()) {
            store.save(k, &state(k)).unwrap();
        }
        let found = store.other_attempts(&mine).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].state.as_ref().unwrap().key(), earlier);
        assert_eq!(found[0].dir, store.job_dir(&earlier));
    }

    #[test]
    fn concurrent_saves_never_tear() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::new(tmp.path()));
        let k = key();
        store.save(&k, &state(&k)).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                let k = k.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let mut s = state(&k);
                        // Different lengths make a torn write detectable.
                        s.instance_type = format!("ecs.t{t}.{}", "x".repeat(i * 7 % 300));
                        store.save(&k, &s).unwrap();
                    }
                })
            })
            .collect();
        let mut reads = 0;
        while writers.iter().any(|w| !w.is_finished()) || reads < 50 {
            let s = store.load(&k).unwrap().expect("state present at all times");
            assert!(s.instance_type.starts_with("ecs."), "{}", s.instance_type);
            reads += 1;
        }
        for w in writers {
            w.join().unwrap();
        }
        let left: Vec<_> = fs::read_dir(store.job_dir(&k)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from(STATE_FILE)]);
    }
}
