//! Starting one emulated instance's `sshd`, and making that instance a machine of its own.
//!
//! A real ECS instance shares nothing with the runner host: its `/tmp`, `/root`, build and
//! cache directories and `/usr/local/bin` are its own, and so is its hostname. A driver that
//! ran a runner-side path remotely, wrote `BUILD_EXIT_CODE_FILE` on the instance or relied on a
//! binary of the runner host would pass against an sshd that shares the runner's filesystem,
//! so (when the emulator runs as root) each instance's sshd — and so everything started
//! through it — runs in its own mount and UTS namespaces (`unshare(2)`,
//! `mount_namespaces(7)`, `uts_namespaces(7)`):
//! - every mount is made private first, so nothing done inside leaks to the host;
//! - [`PRIVATE_DIRS`] are bind-mounted from per-instance directories under the emulator's work
//!   directory (empty at boot, as on a fresh image);
//! - the instance's sshd files stay at the same path inside as outside (so the sshd command
//!   line names the work directory, and tests find every sshd by it): when the work directory
//!   lies under a private directory (usually `/tmp`), the files are bind-mounted into the
//!   instance's own copy of that directory at the same relative path;
//! - the hostname is the instance's `HostName` (what ECS sets as the OS hostname);
//! - the rest of the host's root stays visible, so the "image" has bash, git and coreutils.
//!
//! The process tree is unchanged (same PID namespace), so deleting an instance still finds and
//! kills everything it started ([`super::instances`]). Without root there are no namespaces;
//! the instance then shares the host's filesystem (docs/emulator.md says so).

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::secret::Secret;

/// What an instance's sshd is made of: plain values copied from the instance record, so that
/// this module needs nothing of [`super::instances`] (which calls it).
pub(crate) struct Machine<'a> {
    /// Instance id (named in the `sshd_config` header).
    pub id: &'a str,
    /// `HostName`: the OS hostname inside the instance's namespaces.
    pub host_name: &'a str,
    /// The instance's loopback address and sshd port.
    pub listen: SocketAddr,
    /// Lines of `authorized_keys`.
    pub authorized_keys: &'a [String],
    /// The host key from the user data's `ssh_keys`; `None`: a fresh one.
    pub host_key: Option<&'a Secret<String>>,
}

/// The directories each instance has to itself: (path on the instance, name of the backing
/// directory under the instance's work directory).
pub(crate) const PRIVATE_DIRS: &[(&str, &str)] = &[
    ("/tmp", "tmp"),
    ("/root", "root"),
    ("/builds", "builds"),
    ("/cache", "cache"),
    ("/usr/local/bin", "usr-local-bin"),
];

/// Host directories a booting instance sees copy-on-write (overlayfs, `overlayfs(5)` of the
/// kernel's `Documentation/filesystems/overlayfs.rst`): the host's files show through, the
/// instance's writes stay in its work directory ([`super::boot`] runs the boot in them).
pub(crate) const BOOT_OVERLAYS: &[&str] = &["/etc", "/var", "/run", "/opt", "/home", "/srv", "/usr"];

/// Writes the instance's sshd files under `dir` and starts sshd; `isolate` puts it into its
/// own namespaces (needs root), `boot` adds the copy-on-write views of a booting instance
/// ([`BOOT_OVERLAYS`]). Called by the supervisor thread only (see
/// [`super::instances`] for why).
pub(crate) fn spawn(inst: &Machine<'_>, dir: &Path, isolate: bool, boot: bool) -> anyhow::Result<Child> {
    let etc = dir.join("etc-ssh");
    std::fs::create_dir_all(&etc).with_context(|| format!("failed to create `{}`", etc.display()))?;
    // The same paths inside the namespace as outside (see `Mounts::prepare`).
    let seen = etc.clone();
    let host_key = match inst.host_key {
        Some(k) => k.clone(),
        None => generate_host_key()?,
    };
    let mut key_text = host_key.expose().clone();
    if !key_text.ends_with('\n') {
        key_text.push('\n');
    }
    write_private(&etc.join("ssh_host_ed25519_key"), key_text.as_bytes())?;
    let mut auth = inst.authorized_keys.join("\n");
    auth.push('\n');
    write_private(&etc.join("authorized_keys"), auth.as_bytes())?;
    let cfg_path = etc.join("sshd_config");
    let cfg = format!(
        "# sshd of emulated instance {}\n{}",
        inst.id,
        sshd_config(inst.listen, &seen.join("ssh_host_ed25519_key"), &seen.join("authorized_keys"), "ERROR",)
    );
    write_private(&cfg_path, cfg.as_bytes())?;
    let cfg_seen = seen.join("sshd_config");

    let mounts = if isolate { Some(Mounts::prepare(inst, dir, &etc, boot)?) } else { None };
    if isolate {
        let run = Path::new("/run/sshd");
        if !run.exists() {
            std::fs::create_dir_all(run).context("failed to create `/run/sshd`")?;
            let _ = std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755));
        }
    }

    let log_path = dir.join("sshd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open `{}`", log_path.display()))?;
    let log2 = log.try_clone().context("failed to duplicate the sshd log handle")?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.arg("-D").arg("-e").arg("-f").arg(&cfg_seen);
    cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log2));
    // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid, unshare, mount,
    // sethostname, _exit) run between fork and exec; every string was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            // Orphans of the instance's sessions (a job's `setsid` process group whose SSH
            // connection died) are re-parented to this sshd instead of init, so deleting the
            // instance still finds and kills them, as deleting a VM would.
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if let Some(m) = &mounts {
                m.enter()?;
            }
            Ok(())
        });
    }
    cmd.spawn().context("failed to start `/usr/sbin/sshd`")
}

/// A fresh ed25519 host key in OpenSSH format.
fn generate_host_key() -> anyhow::Result<Secret<String>> {
    let k = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519)
        .map_err(|e| anyhow::anyhow!("failed to generate a host key: {e}"))?;
    let pem = k
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("failed to encode a host key: {e}"))?;
    Ok(Secret::new(pem.to_string()))
}

/// The `sshd_config` of an instance's sshd (and of the SSH tests' own sshd): key-only root
/// login on `listen` with one host key and one `authorized_keys` file, no PAM and no pid file
/// (the process is supervised, not daemonized). `log_level` is sshd's `LogLevel`.
pub fn sshd_config(listen: SocketAddr, host_key: &Path, authorized_keys: &Path, log_level: &str) -> String {
    format!(
        "ListenAddress {listen}\n\
         HostKey {hk}\n\
         AuthorizedKeysFile {ak}\n\
         PidFile none\n\
         UsePAM no\n\
         StrictModes no\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\n\
         UseDNS no\n\
         PrintMotd no\n\
         LogLevel {log_level}\n\
         Subsystem sftp internal-sftp\n",
        hk = host_key.display(),
        ak = authorized_keys.display(),
    )
}

/// Everything the child needs to become its own machine, as C strings made before the fork.
struct Mounts {
    /// (target, options) overlay mounts, applied before the bind mounts.
    overlays: Vec<(CString, CString)>,
    /// (source, target) bind mounts, in the order to apply them.
    binds: Vec<(CString, CString)>,
    hostname: Vec<u8>,
}

impl Mounts {
    fn prepare(inst: &Machine<'_>, dir: &Path, etc: &Path, boot: bool) -> anyhow::Result<Mounts> {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
        let overlays = if boot { overlays(dir)? } else { Vec::new() };
        let mut binds = Vec::new();
        // A target that contains the work directory hides every later source: apply it last,
        // recursively, carrying the sshd files mounted into it at their own path.
        let mut last = Vec::new();
        for (target, name) in PRIVATE_DIRS {
            let target = Path::new(target);
            let source = dir.join("fs").join(name);
            std::fs::create_dir_all(&source)
                .with_context(|| format!("failed to create `{}`", source.display()))?;
            let mode = if *name == "tmp" { 0o1777 } else { 0o755 };
            std::fs::set_permissions(&source, std::fs::Permissions::from_mode(mode))?;
            if !target.exists() {
                // The mount point on the host: an empty directory, so that a job writing there
                // writes into the instance's own directory and never into the host's root.
                std::fs::create_dir_all(target)
                    .with_context(|| format!("failed to create the mount point `{}`", target.display()))?;
            }
            let pair = (c(&source)?, c(target)?);
            if let Ok(rel) = etc.strip_prefix(target) {
                let inside = source.join(rel);
                std::fs::create_dir_all(&inside)
                    .with_context(|| format!("failed to create `{}`", inside.display()))?;
                binds.insert(0, (c(etc)?, c(&inside)?));
                last.push(pair);
            } else {
                binds.push(pair);
            }
        }
        binds.extend(last);
        // HOST_NAME_MAX is 64.
        let hostname = inst.host_name.as_bytes().iter().copied().take(64).collect();
        Ok(Mounts { overlays, binds, hostname })
    }

    /// Runs in the child between fork and exec: async-signal-safe system calls only.
    fn enter(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
        // SAFETY: plain system calls on C strings that outlive the call.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for (target, options) in &self.overlays {
                check(libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    0,
                    options.as_ptr().cast(),
                ))?;
            }
            for (source, target) in &self.binds {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
            }
            check(libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()))?;
        }
        Ok(())
    }
}

/// The overlay mounts of a booting instance: (target, mount options). A directory that holds
/// the work directory is left shared (the instance's files must stay the host's), as is one
/// that does not exist. Files the host bind-mounts over files in an overlaid directory (a
/// container's `/etc/hosts` and `/etc/resolv.conf`) are hidden by the overlay, so their
/// current contents are copied into its upper layer.
fn overlays(dir: &Path) -> anyhow::Result<Vec<(CString, CString)>> {
    let mut out = Vec::new();
    for target in BOOT_OVERLAYS {
        let target = Path::new(target);
        if !target.is_dir() || dir.starts_with(target) {
            continue;
        }
        let name = target.to_string_lossy().trim_start_matches('/').replace('/', "-");
        let base = dir.join("fs").join("overlay").join(name);
        let (upper, work) = (base.join("upper"), base.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("failed to create `{}`", d.display()))?;
        }
        if target == Path::new("/etc") {
            for f in ["hosts", "resolv.conf", "hostname"] {
                if let Ok(text) = std::fs::read(target.join(f)) {
                    let _ = std::fs::write(upper.join(f), text);
                }
            }
        }
        if base.to_string_lossy().contains([',', ':']) {
            anyhow::bail!(
                "the work directory `{}` has a `,` or `:`, which overlayfs options cannot carry",
                dir.display()
            );
        }
        let options =
            format!("lowerdir={},upperdir={},workdir={}", target.display(), upper.display(), work.display());
        out.push((
            CString::new(target.as_os_str().as_bytes()).context("a path with a NUL byte")?,
            CString::new(options).context("a path with a NUL byte")?,
        ));
    }
    Ok(out)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to write `{}`", path.display()))?;
    f.write_all(data).with_context(|| format!("failed to write `{}`", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to set the mode of `{}`", path.display()))
}
