//! Small filesystem primitives the job state and key files rely on.
//!
//! Several stage processes for the same job (and `sweep`) may touch the same files, and any of
//! them may be killed at any moment by gitlab-runner. So a file is never written in place: it is
//! written to a temporary file in the same directory, created with its final mode (a private key
//! is never readable by others, not even for an instant), flushed to disk, renamed over the old
//! one and the directory is synced (the same recipe as cargo's `cargo-util/src/paths.rs`).
//! Readers either see the old file or the new one, never a torn one. Directories holding keys or
//! state are created 0700, and [`FileLock`] serialises read-modify-write cycles across processes
//! with `flock(2)`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// Writes `data` to `path` atomically with permission bits `mode` (e.g. `0o600`).
///
/// The temporary file is created in the same directory with `mode` already applied, fsynced,
/// renamed over `path`, and the directory is fsynced so the rename survives a crash.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("cannot write `{}`: the path has no file name", path.display()))?;
    let (tmp_path, mut file) = create_temp_beside(&dir, &file_name.to_string_lossy(), mode)?;
    let result = (|| -> Result<()> {
        file.write_all(data).with_context(|| format!("failed to write `{}`", tmp_path.display()))?;
        // The umask may have narrowed the mode given to open(2); set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("failed to set the mode of `{}`", tmp_path.display()))?;
        file.sync_all().with_context(|| format!("failed to sync `{}`", tmp_path.display()))?;
        drop(file);
        fs::rename(&tmp_path, path)
            .with_context(|| format!("failed to rename `{}` to `{}`", tmp_path.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp_path);
        return result;
    }
    sync_dir(&dir)
}

/// Creates a uniquely named file next to the target, mode `mode`, exclusive (`O_EXCL`).
fn create_temp_beside(dir: &Path, base: &str, mode: u32) -> Result<(PathBuf, File)> {
    for _ in 0..16 {
        let suffix: u64 = rand::random();
        let tmp = dir.join(format!(".{base}.tmp-{}-{suffix:016x}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("failed to create `{}`", tmp.display()));
            }
        }
    }
    Err(anyhow!("failed to create a temporary file in `{}`", dir.display()))
}

/// Fsyncs a directory so that a rename or a new entry in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("failed to open directory `{}`", dir.display()))?;
    d.sync_all().with_context(|| format!("failed to sync directory `{}`", dir.display()))
}

/// Creates `path` and any missing parents with mode 0700.
///
/// An existing directory is tightened to 0700 too, so a state directory created by hand with a
/// looser mode does not keep exposing keys.
pub fn create_private_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("failed to create directory `{}`", path.display()))?;
    let meta = fs::metadata(path).with_context(|| format!("failed to stat `{}`", path.display()))?;
    if !meta.is_dir() {
        return Err(anyhow!("`{}` exists and is not a directory", path.display()));
    }
    if meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("failed to set the mode of `{}` to 0700", path.display()))?;
    }
    Ok(())
}

/// An advisory `flock(2)` lock on a file, released when dropped.
///
/// The lock file is created (mode 0600) when missing and is never removed, so every process
/// locks the same inode.
#[derive(Debug)]
pub struct FileLock {
    file: File,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until an exclusive lock on `path` is held.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_EX)
    }

    /// Blocks until a shared lock on `path` is held.
    pub fn shared(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_SH)
    }

    /// Tries to take an exclusive lock on `path` for up to `timeout`.
    ///
    /// Returns `Ok(None)` when another holder kept it for the whole time.
    pub fn try_exclusive(path: &Path, timeout: Duration) -> Result<Option<FileLock>> {
        let file = open_lock_file(path)?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return Ok(Some(FileLock { file, path: path.to_path_buf() })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to lock `{}`", path.display()));
                }
            }
        }
    }

    /// The locked file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(path: &Path, op: libc::c_int) -> Result<FileLock> {
        let file = open_lock_file(path)?;
        loop {
            match flock(&file, op) {
                Ok(()) => return Ok(FileLock { file, path: path.to_path_buf() }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to lock `{}`", path.display()));
                }
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the lock as well; unlocking first makes it explicit.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to open lock file `{}`", path.display()))
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_atomic_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(mode_of(&p), 0o600);
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), 0o644);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn write_atomic_into_missing_dir_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("f");
        let err = format!("{:#}", write_atomic(&p, b"x", 0o600).unwrap_err());
        assert!(err.starts_with("failed to create `"), "{err}");
        assert!(err.contains("/missing/.f.tmp-"), "{err}");
    }

    #[test]
    fn private_dir_is_0700_even_if_it_existed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a").join("b");
        create_private_dir(&p).unwrap();
        assert_eq!(mode_of(&p), 0o700);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&p).unwrap();
        assert_eq!(mode_of(&p), 0o700);
    }

    #[test]
    fn exclusive_lock_excludes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = FileLock::exclusive(&p).unwrap();
        assert_eq!(mode_of(&p), 0o600);
        // flock locks belong to the open file description, so a second open conflicts even in
        // the same process.
        assert!(FileLock::try_exclusive(&p, Duration::from_millis(20)).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_exclusive(&p, Duration::from_millis(20)).unwrap().is_some());
    }

    #[test]
    fn shared_locks_coexist_and_block_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = FileLock::shared(&p).unwrap();
        let b = FileLock::shared(&p).unwrap();
        assert!(FileLock::try_exclusive(&p, Duration::ZERO).unwrap().is_none());
        drop(a);
        drop(b);
        let ex = FileLock::try_exclusive(&p, Duration::ZERO).unwrap().unwrap();
        assert_eq!(ex.path(), p.as_path());
    }
}
