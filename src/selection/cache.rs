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

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::fsutil::FileLock;
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
/// its content (the endpoint, so the emulator and the real API never share entries, the
/// protection period `SpotDuration`, which changes prices and stock, and the whole shape), e.g.
/// `cn-hangzhou-arm64-3f2a9c0d1e4b5a6c`.
pub fn cache_key(region: &str, endpoint: &str, spot_duration: u32, shape: &Shape) -> String {
    let mut h = Sha256::new();
    h.update(endpoint.as_bytes());
    h.update([0]);
    h.update(spot_duration.to_le_bytes());
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

    /// Forgets the entry of `key`, so the next [`PriceCache::get_or_fetch`] asks ECS afresh (a
    /// catalogue that just proved wrong, e.g. every offer out of stock).
    pub fn invalidate(&self, key: &str) {
        match fs::remove_file(self.path_for(key)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => log::warn!("could not drop the price cache entry `{key}`: {e}"),
        }
    }

    fn read(&self, path: &Path, key: &str) -> Entry {
        let bytes = match crate::fsutil::read_nofollow(path) {
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

    fn lock(&self, key: &str) -> anyhow::Result<FileLock> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create the price cache directory `{}`", self.dir.display()))?;
        let path = self.dir.join(format!("{}.lock", sanitize(key)));
        FileLock::exclusive(&path)
    }
}

fn write_file(path: &Path, file: &CacheFile) -> anyhow::Result<()> {
    let data = serde_json::to_vec(file).context("cannot serialize the price cache")?;
    crate::fsutil::write_atomic(path, &data, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::{Arch, PricePoint, TypeInfo, ZoneStock};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    fn cat(fetched_at: OffsetDateTime, spot: f64) -> Catalogue {
        Catalogue {
            region: "cn-hangzhou".into(),
            arch: Arch::Amd64,
            types: vec![TypeInfo {
                id: "ecs.c7.2xlarge".into(),
                family: "ecs.c7".into(),
                cores: 8,
                memory_gib: 16.0,
                arch: Arch::Amd64,
                family_level: "EnterpriseLevel".into(),
                gpu_amount: 0,
                gpu_spec: String::new(),
            }],
            stock: vec![ZoneStock {
                instance_type: "ecs.c7.2xlarge".into(),
                zone: "cn-hangzhou-h".into(),
                available: true,
            }],
            prices: vec![PricePoint {
                instance_type: "ecs.c7.2xlarge".into(),
                zone: "cn-hangzhou-h".into(),
                spot,
                on_demand: Some(5.0),
                timestamp: fetched_at,
            }],
            currency: "CNY".into(),
            fetched_at,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    const KEY: &str = "cn-hangzhou-amd64-0123456789abcdef";

    #[test]
    fn miss_then_hit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PriceCache::new(dir.path().join("prices"), Duration::from_secs(300));
        let first = cache.get_or_fetch(KEY, || Ok(cat(now(), 0.5))).unwrap();
        let second = cache.get_or_fetch(KEY, || panic!("fresh entry must not be fetched again")).unwrap();
        assert_eq!(first, second);

        let path = cache.path_for(KEY);
        assert_eq!(path, dir.path().join("prices").join(format!("{KEY}.json")));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(cache.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        let stored: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(stored["version"], 1);
        assert_eq!(stored["key"], KEY);
        // Other keys are other entries.
        let other = cache.get_or_fetch("cn-hangzhou-arm64-x", || Ok(cat(now(), 0.7))).unwrap();
        assert_eq!(other.prices[0].spot, 0.7);
    }

    #[test]
    fn stale_and_future_entries_are_refetched() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PriceCache::new(dir.path(), Duration::from_secs(300));
        let old = now() - time::Duration::minutes(6);
        cache.get_or_fetch(KEY, || Ok(cat(old, 0.5))).unwrap();
        let fetched = AtomicUsize::new(0);
        let got = cache
            .get_or_fetch(KEY, || {
                fetched.fetch_add(1, Ordering::SeqCst);
                Ok(cat(now() + time::Duration::hours(1), 0.6))
            })
            .unwrap();
        assert_eq!((fetched.load(Ordering::SeqCst), got.prices[0].spot), (1, 0.6));
        // That entry claims to come from the future: not trusted either.
        let got = cache.get_or_fetch(KEY, || Ok(cat(now(), 0.7))).unwrap();
        assert_eq!(got.prices[0].spot, 0.7);
        let got = cache.get_or_fetch(KEY, || panic!("fresh")).unwrap();
        assert_eq!(got.prices[0].spot, 0.7);
    }

    #[test]
    fn corrupt_wrong_version_and_foreign_key_files_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PriceCache::new(dir.path(), Duration::from_secs(300));
        let path = cache.path_for(KEY);
        for junk in [
            "{not json".to_string(),
            String::new(),
            r#"{"version": 1, "key": "cn-hangzhou-amd64-0123456789abcdef"}"#.to_string(),
            serde_json::json!({"version": 2, "key": KEY, "catalogue": cat(now(), 0.1)}).to_string(),
            serde_json::json!({"version": 1, "key": "other", "catalogue": cat(now(), 0.1)}).to_string(),
        ] {
            fs::write(&path, &junk).unwrap();
            let got = cache.get_or_fetch(KEY, || Ok(cat(now(), 0.9))).unwrap();
            assert_eq!(got.prices[0].spot, 0.9, "after {junk}");
            let stored: CacheFile = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!((stored.version, stored.key.as_str()), (CACHE_FORMAT_VERSION, KEY));
        }
    }

    #[test]
    fn fetch_errors_are_returned_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PriceCache::new(dir.path(), Duration::from_secs(300));
        let err = cache
            .get_or_fetch(KEY, || Err(anyhow::anyhow!("ECS `DescribeSpotPriceHistory` failed")))
            .unwrap_err();
        assert_eq!(err.to_string(), "ECS `DescribeSpotPriceHistory` failed");
        assert!(!cache.path_for(KEY).exists());
    }

    #[test]
    fn zero_ttl_disables_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PriceCache::new(dir.path().join("never"), Duration::ZERO);
        let n = AtomicUsize::new(0);
        for _ in 0..3 {
            cache
                .get_or_fetch(KEY, || {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok(cat(now(), 0.5))
                })
                .unwrap();
        }
        assert_eq!(n.load(Ordering::SeqCst), 3);
        assert!(!dir.path().join("never").exists());
    }

    #[test]
    fn unusable_directory_falls_back_to_fetching() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, "").unwrap();
        let cache = PriceCache::new(file.join("sub"), Duration::from_secs(300));
        let got = cache.get_or_fetch(KEY, || Ok(cat(now(), 0.5))).unwrap();
        assert_eq!(got.prices[0].spot, 0.5);
    }

    #[test]
    fn racing_threads_fetch_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(PriceCache::new(dir.path(), Duration::from_secs(300)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fetches, barrier) = (cache.clone(), fetches.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_fetch(KEY, || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            // Hold the lock long enough for every other thread to queue on it.
                            std::thread::sleep(Duration::from_millis(100));
                            Ok(cat(now(), 0.5))
                        })
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<Catalogue> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|c| *c == results[0]));
    }

    #[test]
    fn keys_are_sanitised_and_shape_sensitive() {
        assert_eq!(sanitize("../etc/passwd"), "_._etc_passwd");
        assert_eq!(sanitize(""), "_");
        assert_eq!(sanitize(&"x".repeat(500)).len(), 120);
        let shape = Shape::defaults(Arch::Arm64);
        let k = cache_key("cn-hangzhou", "", 1, &shape);
        assert_ne!(k, cache_key("cn-hangzhou", "", 0, &shape), "the protection period is part of the key");
        assert!(k.starts_with("cn-hangzhou-arm64-") && k.len() == "cn-hangzhou-arm64-".len() + 16, "{k}");
        assert_eq!(k, cache_key("cn-hangzhou", "", 1, &shape));
        assert_ne!(k, cache_key("cn-hangzhou", "http://127.0.0.1:9470", 1, &shape));
        assert_ne!(k, cache_key("cn-hangzhou", "", 1, &Shape { min_cpu: 16, ..shape }));
        assert_eq!(sanitize(&k), k);
    }
}
