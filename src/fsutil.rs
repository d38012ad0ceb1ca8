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
//!
//! Files the driver reads back (job state, keys, cache, ledger) may be used by root while other
//! users share the runner host, so they must not be plantable or redirectable by those users:
//! [`check_host_dir`] and [`check_host_file`] refuse a location another user could write to,
//! and every open here uses `O_NOFOLLOW` so a symbolic link in place of a file is an error,
//! never followed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::retry::{Backoff, RetryPolicy, SystemClock};

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
        let backoff = Backoff::exponential(Duration::from_millis(5), 2, Duration::from_millis(100));
        // The last try comes at the timeout, not a pause before it.
        let policy = RetryPolicy {
            finish_at_cap: true,
            ..RetryPolicy::within(timeout, backoff, Arc::new(SystemClock))
        };
        match policy.retry(
            |_| flock(&file, libc::LOCK_EX | libc::LOCK_NB),
            |r| matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        ) {
            Ok(()) => Ok(Some(FileLock { file, path: path.to_path_buf() })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e).with_context(|| format!("failed to lock `{}`", path.display())),
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
        .custom_flags(libc::O_NOFOLLOW)
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

/// Reads a whole file without following a symbolic link in its last component (`O_NOFOLLOW`):
/// a link planted in place of a state or cache file is an error (`ELOOP`), never read.
pub fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?;
    // O_NONBLOCK only keeps a planted FIFO from blocking the open; a regular file ignores it.
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
    }
    let mut out = Vec::new();
    io::Read::read_to_end(&mut f, &mut out)?;
    Ok(out)
}

/// Opens `path` for appending, creating it with `mode`, without following a symbolic link
/// (`O_NOFOLLOW`); an existing file must be a regular file owned by this user or root.
pub fn open_append_nofollow(path: &Path, mode: u32) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                anyhow!("refusing `{}`: it is a symbolic link; remove the link", path.display())
            } else {
                anyhow::Error::new(e).context(format!("failed to open `{}`", path.display()))
            }
        })?;
    let meta = f.metadata().with_context(|| format!("failed to stat `{}`", path.display()))?;
    if !meta.is_file() {
        return Err(anyhow!("refusing `{}`: it is not a regular file; remove it", path.display()));
    }
    if let Some(problem) = ownership_problem(&meta) {
        return Err(anyhow!("refusing `{}`: {problem}; remove it", path.display()));
    }
    Ok(f)
}

/// Refuses a directory the driver keeps files in (`key` names its setting, e.g.
/// `paths.state_dir`) when another user could plant or redirect what is in it.
///
/// The directory itself, when it exists, must be a directory owned by this user or root and
/// writable by nobody else. Every existing ancestor up to `/` — as written and with symbolic
/// links resolved — must be owned by this user or root and not writable by group or others,
/// unless it has the sticky bit (like `/tmp`, where others cannot rename or remove our
/// entries). A missing directory is fine: it is created 0700 on first use. Checks only, so a
/// refusal creates nothing. The error is one line naming the path and the fix.
pub fn check_host_dir(dir: &Path, key: &str) -> Result<()> {
    check_location(dir, dir, key, true)
}

/// [`check_host_dir`] for a file's directory, plus the file itself when it exists: a regular
/// file (not a symbolic link), owned by this user or root, writable by nobody else.
pub fn check_host_file(file: &Path, key: &str) -> Result<()> {
    check_file(file, key, false)
}

/// [`check_host_file`] for a file that holds a secret (`ssh.private_key_file`): group and
/// others may not read it either, as `ssh` itself refuses a readable identity file.
pub fn check_host_private_file(file: &Path, key: &str) -> Result<()> {
    check_file(file, key, true)
}

fn check_file(file: &Path, key: &str, private: bool) -> Result<()> {
    let refuse = |problem: String| anyhow!("refusing `{key}` = `{}`: {problem}", file.display());
    match fs::symlink_metadata(file) {
        Ok(meta) => {
            if meta.file_type().is_symlink() {
                return Err(refuse("it is a symbolic link; remove the link or set the real path".into()));
            }
            if !meta.is_file() {
                return Err(refuse("it is not a regular file; remove it or choose another path".into()));
            }
            if let Some(problem) = ownership_problem(&meta) {
                return Err(refuse(format!("{problem}; remove it or choose another path")));
            }
            let mode = meta.permissions().mode() & 0o7777;
            if private && mode & 0o077 != 0 {
                return Err(refuse(format!(
                    "group or other users can read or write it (mode {mode:04o}); run `chmod 600 {}`",
                    file.display()
                )));
            }
            if mode & 0o022 != 0 {
                return Err(refuse(format!(
                    "it is writable by other users (mode {mode:04o}); run `chmod go-w {}`",
                    file.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(refuse(format!("cannot inspect it: {e}"))),
    }
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => check_location(parent, file, key, false),
        _ => check_location(Path::new("."), file, key, false),
    }
}

/// Checks `dir` (no sticky exemption for it) and its ancestors; errors name `shown`, the
/// configured path, which is `dir` itself when `is_self`, else a file in `dir`.
fn check_location(dir: &Path, shown: &Path, key: &str, is_self: bool) -> Result<()> {
    let refuse = |problem: String| anyhow!("refusing `{key}` = `{}`: {problem}", shown.display());
    let absolute = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| refuse(format!("cannot resolve it: {e}")))?.join(dir)
    };
    // The path as written (symbolic links checked as links), then the same with links
    // resolved: the deepest existing ancestor canonicalised, the missing rest appended.
    let mut existing = absolute.as_path();
    let mut missing = Vec::new();
    while fs::symlink_metadata(existing).is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(p), Some(n)) => {
                missing.push(n.to_os_string());
                existing = p;
            }
            _ => break,
        }
    }
    let mut resolved = fs::canonicalize(existing)
        .map_err(|e| refuse(format!("cannot resolve `{}`: {e}", existing.display())))?;
    for n in missing.iter().rev() {
        resolved.push(n);
    }
    for chain in [absolute.as_path(), resolved.as_path()] {
        for (depth, p) in chain.ancestors().enumerate() {
            let meta = match fs::symlink_metadata(p) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(refuse(format!("cannot inspect `{}`: {e}", p.display()))),
            };
            let what = match depth {
                0 if is_self => "it".to_string(),
                0 => format!("its directory `{}`", p.display()),
                _ => format!("its ancestor `{}`", p.display()),
            };
            if let Some(problem) = ownership_problem(&meta) {
                return Err(refuse(format!(
                    "{what} is {problem}; remove it or choose a directory only root can write to"
                )));
            }
            if meta.file_type().is_symlink() {
                // A link's own mode means nothing; its target is checked in the resolved chain.
                continue;
            }
            if !meta.is_dir() {
                return Err(refuse(format!("{what} is not a directory")));
            }
            let mode = meta.permissions().mode() & 0o7777;
            let sticky = mode & 0o1000 != 0 && depth > 0;
            if mode & 0o022 != 0 && !sticky {
                let why = if depth == 0 && mode & 0o1000 != 0 {
                    "is writable by other users (a sticky bit is not enough for the directory itself)"
                } else {
                    "is writable by other users without the sticky bit"
                };
                return Err(refuse(format!(
                    "{what} {why} (mode {mode:04o}); run `chmod go-w {}` or choose a directory only root can write to",
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// Why a file or directory owned by neither this user nor root cannot be trusted, if so.
fn ownership_problem(meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = meta.uid();
    (owner != 0 && owner != me).then(|| format!("owned by uid {owner}, not by this user (uid {me}) or root"))
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

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refusal(r: Result<()>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn a_private_or_missing_directory_passes() {
        let dir = tempfile::tempdir().unwrap();
        check_host_dir(dir.path(), "paths.state_dir").unwrap();
        check_host_dir(&dir.path().join("a/b"), "paths.state_dir").unwrap();
        check_host_file(&dir.path().join("a/ledger.jsonl"), "paths.ledger").unwrap();
        // A sticky shared ancestor (like /tmp) is fine.
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o1777);
        check_host_dir(&shared.join("mine"), "paths.state_dir").unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        chmod(&state, 0o777);
        let s = state.display();
        assert_eq!(
            refusal(check_host_dir(&state, "paths.state_dir")),
            format!(
                "refusing `paths.state_dir` = `{s}`: it is writable by other users without the sticky bit (mode \
                 0777); run `chmod go-w {s}` or choose a directory only root can write to"
            )
        );
        // The directory itself may not rely on the sticky bit.
        chmod(&state, 0o1777);
        assert!(refusal(check_host_dir(&state, "paths.state_dir")).contains("a sticky bit is not enough"));
        // Nor any ancestor without it, even for a directory that does not exist yet.
        chmod(&state, 0o770);
        let deep = state.join("x/y");
        assert_eq!(
            refusal(check_host_dir(&deep, "paths.state_dir")),
            format!(
                "refusing `paths.state_dir` = `{}`: its ancestor `{s}` is writable by other users without the \
                 sticky bit (mode 0770); run `chmod go-w {s}` or choose a directory only root can write to",
                deep.display()
            )
        );
        assert!(!deep.exists(), "a check creates nothing");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        chmod(&state, 0o700);
        if unsafe { libc::geteuid() } != 0 {
            return; // Only root can give a directory away.
        }
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
        assert_eq!(
            refusal(check_host_dir(&state, "paths.cache_dir")),
            format!(
                "refusing `paths.cache_dir` = `{}`: it is owned by uid 65534, not by this user (uid 0) or root; \
                 remove it or choose a directory only root can write to",
                state.display()
            )
        );
    }

    #[test]
    fn symbolic_links_are_checked_through_and_never_followed_for_files() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = dir.path().join("state");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let err = refusal(check_host_dir(&link, "paths.state_dir"));
        assert!(err.contains(&format!("run `chmod go-w {}`", open.display())), "{err}");
        assert!(err.starts_with(&format!("refusing `paths.state_dir` = `{}`", link.display())), "{err}");

        let target = dir.path().join("victim");
        fs::write(&target, b"precious\n").unwrap();
        let ledger = dir.path().join("ledger.jsonl");
        std::os::unix::fs::symlink(&target, &ledger).unwrap();
        assert_eq!(
            refusal(check_host_file(&ledger, "paths.ledger")),
            format!(
                "refusing `paths.ledger` = `{}`: it is a symbolic link; remove the link or set the real path",
                ledger.display()
            )
        );
        assert!(open_append_nofollow(&ledger, 0o600).is_err());
        assert_eq!(read_nofollow(&ledger).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(fs::read(&target).unwrap(), b"precious\n");
        // A lock file is never opened through a link either.
        assert!(FileLock::exclusive(&ledger).is_err());

        let loose = dir.path().join("loose.jsonl");
        fs::write(&loose, b"").unwrap();
        chmod(&loose, 0o666);
        assert!(refusal(check_host_file(&loose, "paths.ledger"))
            .contains("is writable by other users (mode 0666)"));
    }
}
