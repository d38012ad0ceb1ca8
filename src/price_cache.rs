//! A small on-disk cache of spot [`Catalogue`]s, shared by the concurrent jobs of one runner
//! host.
//!
//! Why: every `prepare` needs the same three API calls (types, stock, prices), and a runner
//! with `concurrent = 8` would make them eight times within seconds, spending API quota and
//! risking throttling exactly when jobs start together. Prices move slowly compared with that,
//! so a catalogue is kept for a few minutes (the configured TTL) in one JSON file per key.
//!
//! How it stays correct under concurrency (threads and processes):
//! - readers first look at the file without a lock; files are only ever replaced atomically
//!   (temporary file + `rename`, mode 0600), so a reader sees a whole old file or a whole new
//!   one;
//! - when the entry is missing, stale, corrupt or of another format version, the caller takes an
//!   exclusive `flock` on a per-key lock file, **re-checks** the file (another process may have
//!   just refreshed it), and only then fetches and writes — so N racing callers fetch once;
//! - an entry is fresh when its `fetched_at` is not in the future and younger than the TTL; a
//!   TTL of zero disables the cache entirely (no files are touched);
//! - the cache is an optimisation only: when its directory cannot be used, the catalogue is
//!   fetched directly and a warning is logged, rather than failing the job.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::selection::{Catalogue, Shape};

/// Version of the cache file format; files of another version are rebuilt.
pub const CACHE_FORMAT_VERSION: u32 = 1;

/// The catalogue cache: one JSON file per key under `dir`, fresh for `ttl`.
#[derive(Debug, Clone)]
pub struct PriceCache {
    dir: PathBuf,
    ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    key: String,
    catalogue: Catalogue,
}

/// What reading a cache file found.
enum Entry {
    Fresh(Catalogue),
    Missing,
    Stale,
    Unusable(String),
}

/// The cache key of a catalogue: region, architecture and a hash of everything else that changes
/// its content (the endpoint, so the emulator and the real API never share entries, and the
/// whole shape), e.g. `cn-hangzhou-arm64-3f2a9c0d1e4b5a6c`.
pub fn cache_key(region: &str, endpoint: &str, shape: &Shape) -> String {
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    // Serializing a plain struct of numbers, strings and lists cannot fail.
    h.update(serde_json::to_vec(shape).unwrap_or_default());
    let digest = h.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{region}-{}-{hex}", shape.arch)
}

/// A file-name-safe form of `key`: ASCII letters, digits, `-`, `_` and `.` (not leading) are
/// kept, everything else becomes `_`; at most 120 characters.
fn sanitize(key: &str) -> String {
    let mut s: String = key
        .chars()
        .enumerate()
        .map(|(i, c)| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            '.' if i > 0 => c,
            _ => '_',
        })
        .take(120)
        .collect();
    if s.is_empty() {
        s.push('_');
    }
    s
}

impl PriceCache {
    /// A cache in `dir` (created 0700 on first use) whose entries are fresh for `ttl`;
    /// `Duration::ZERO` disables caching.
    pub fn new(dir: impl Into<PathBuf>, ttl: Duration) -> PriceCache {
        PriceCache { dir: dir.into(), ttl }
    }

    /// The directory holding the cache files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The time-to-live of an entry.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The path of the JSON file of `key`.
    pub fn path_for(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", sanitize(key)))
    }

    /// Returns the fresh cached catalogue of `key`, or calls `fetch` once (across threads and
    /// processes sharing the directory), stores its result and returns it. Errors of `fetch`
    /// are returned as they are and nothing is stored.
    pub fn get_or_fetch(
        &self,
        key: &str,
        fetch: impl FnOnce() -> anyhow::Result<Catalogue>,
    ) -> anyhow::Result<Catalogue> {
        if self.ttl.is_zero() {
            return fetch();
        }
        let path = self.path_for(key);
        if let Entry::Fresh(cat) = self.read(&path, key) {
            return Ok(cat);
        }
        let _lock = match self.lock(key) {
            Ok(lock) => lock,
            Err(e) => {
                log::warn!("price cache unusable, fetching without it: {e:#}");
                return fetch();
            }
        };
        // Someone else may have refreshed the entry while we waited for the lock.
        match self.read(&path, key) {
            Entry::Fresh(cat) => return Ok(cat),
            Entry::Unusable(why) => {
                log::warn!("price cache file `{}` is unusable ({why}); rebuilding it", path.display())
            }
            Entry::Missing | Entry::Stale => {}
        }
        let cat = fetch()?;
        let file = CacheFile { version: CACHE_FORMAT_VERSION, key: key.to_string(), catalogue: cat };
        if let Err(e) = write_file(&path, &file) {
            log::warn!("could not store the price cache: {e:#}");
        }
        Ok(file.catalogue)
    }

    fn read(&self, path: &Path, key: &str) -> Entry {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Entry::Missing,
            Err(e) => return Entry::Unusable(format!("cannot read it: {e}")),
        };
        // Check the version first, so a newer or older format is rebuilt quietly.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        match serde_json::from_slice::<Version>(&bytes) {
            Ok(v) if v.version != CACHE_FORMAT_VERSION => {
                log::debug!("price cache file `{}` has format version {}", path.display(), v.version);
                return Entry::Stale;
            }
            Ok(_) => {}
            Err(e) => return Entry::Unusable(format!("not a cache file: {e}")),
        }
        let file: CacheFile = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => return Entry::Unusable(format!("not a cache file: {e}")),
        };
        if file.key != key {
            return Entry::Stale;
        }
        let age = OffsetDateTime::now_utc() - file.catalogue.fetched_at;
        if age.is_negative() || age >= self.ttl {
            return Entry::Stale;
        }
        Entry::Fresh(file.catalogue)
    }

    fn lock(&self, key: &str) -> anyhow::Result<FlockGuard> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the price cache directory `{}`", self.dir.display()))?;
        let path = self.dir.join(format!("{}.lock", sanitize(key)));
        FlockGuard::exclusive(&path)
    }
}

fn write_file(path: &Path, file: &CacheFile) -> anyhow::Result<()> {
    let dir = path.parent().context("cache file path has no directory")?;
    let data = serde_json::to_vec(file).context("cannot serialize the price cache")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in `{}`", dir.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of `{}`", tmp.path().display()))?;
    tmp.write_all(&data).with_context(|| format!("cannot write `{}`", tmp.path().display()))?;
    tmp.as_file().sync_all().with_context(|| format!("cannot sync `{}`", tmp.path().display()))?;
    tmp.persist(path).with_context(|| format!("cannot rename the price cache into `{}`", path.display()))?;
    Ok(())
}

/// An exclusive `flock` held until drop. Kept private and tiny on purpose; it duplicates what
/// `fsutil::FileLock` provides and can be replaced by it.
struct FlockGuard {
    _file: File,
}

impl FlockGuard {
    fn exclusive(path: &Path) -> anyhow::Result<FlockGuard> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open the lock file `{}`", path.display()))?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(err).with_context(|| format!("cannot lock `{}`", path.display()));
            }
        }
        // Closing the descriptor on drop releases the lock.
        Ok(FlockGuard { _file: file })
    }
}
