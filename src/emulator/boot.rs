//! Booting an emulated instance's `#cloud-config` as cloud-init would (`--boot-user-data`), so
//! that what a driver puts in user data really runs in tests.
//!
//! What cloud-init does, and so what this does (cloud-init 22.4, the version the test beds
//! install; module order from its stock `/etc/cloud/cloud.cfg`, semantics from
//! `cloudinit/config/cc_write_files.py`, `cc_runcmd.py` and `util.shellify`; documented at
//! <https://cloudinit.readthedocs.io/en/22.4/reference/modules.html>):
//! - `write_files` runs in the init stage, before everything else: each entry writes `content`
//!   (decoded per `encoding`: `b64`/`base64`, else text; gzip encodings are not supported here
//!   and are logged as skipped) to `path`, creating parent directories, owned by `owner`
//!   (default `root:root`) with `permissions` (default `0644`), appending when `append` is
//!   true. Entries with `defer: true` are written in the final stage (`write-files-deferred`),
//!   which still comes before `scripts-user`.
//! - `runcmd` (config stage) only writes `/var/lib/cloud/instance/scripts/runcmd`: `#!/bin/sh`,
//!   then each item on its own line, a string as is, a list as single-quoted words; the final
//!   stage's `scripts-user` runs that script as root.
//!
//! Here both run inside the instance — in the mount and UTS namespaces of its sshd
//! ([`super::sshd`]), entered with `setns(2)` on `/proc/<sshd pid>/ns/{mnt,uts}` — as root,
//! once sshd is up, with their output appended to the instance's boot log
//! ([`crate::emulator::Emulator::boot_log`]). Booting instances also get copy-on-write views of
//! `/etc`, `/var`, `/run`, `/opt`, `/home`, `/srv` and `/usr` ([`super::sshd::BOOT_OVERLAYS`]), so files
//! the user data writes there (and users it adds) stay on the instance, and no init system:
//! `systemctl` answers as it does in a container without systemd, so a unit the user data
//! enables can never start on the runner host; user data that falls back to starting its
//! service directly keeps working.
//!
//! Deleting the instance kills everything the boot started: the boot process is a child
//! subreaper (orphans of its commands are re-parented to it, not to init) that stays alive
//! until the instance goes, in its own process group, and deletion kills its tree as it kills
//! sshd's ([`super::instances::kill_tree`]).

use std::ffi::CString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use base64::Engine;
use serde_json::Value;

use super::sshd::{BOOT_OVERLAYS, PRIVATE_DIRS};

/// Where cloud-init writes the `runcmd` script (`cloud.get_ipath("scripts")`).
const RUNCMD_PATH: &str = "/var/lib/cloud/instance/scripts/runcmd";

/// What `systemctl` prints on a machine whose PID 1 is not systemd (systemd's
/// `src/systemctl/systemctl-util.c`, `running_in_chroot_or_offline` / `sd_booted`), with its
/// exit status 1.
const SYSTEMCTL_STUB: &str = "#!/bin/sh\n\
# aliyun-spot emulator: an emulated instance has no init system.\n\
echo 'System has not been booted with systemd as init system (PID 1). Can'\\''t operate.' >&2\n\
echo 'Failed to connect to bus: Host is down' >&2\n\
exit 1\n";

/// The boot log's name in the instance's work directory.
pub(crate) const LOG_NAME: &str = "boot.log";

/// Quotes a value for a POSIX shell (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `runcmd` as cloud-init's `util.shellify` writes it; `Err` names an item it would refuse.
pub(crate) fn shellify(items: &[Value]) -> Result<String, String> {
    let mut out = String::from("#!/bin/sh\n");
    for item in items {
        match item {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(words) => {
                let words: Vec<String> = words
                    .iter()
                    .map(|w| match w {
                        Value::String(s) => sh_quote(s),
                        other => sh_quote(&other.to_string()),
                    })
                    .collect();
                out.push_str(&words.join(" "));
                out.push('\n');
            }
            Value::Null => {}
            other => return Err(format!("runcmd: unable to shellify {other}")),
        }
    }
    Ok(out)
}

/// The shell lines that write one `write_files` entry (or a line that logs why not).
fn write_file_lines(entry: &Value) -> String {
    let Some(path) = entry.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()) else {
        return "echo 'boot: write_files: an entry without a path is skipped'\n".to_string();
    };
    let q = sh_quote(path);
    let content = match entry.get("content") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    };
    let encoding = entry.get("encoding").and_then(Value::as_str).unwrap_or("text").to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "b64" | "base64" => match base64::engine::general_purpose::STANDARD.decode(content.trim()) {
            Ok(b) => b,
            Err(_) => {
                return format!("echo {}\n", sh_quote(&format!("boot: write_files: {path}: bad base64")))
            }
        },
        "gz" | "gzip" | "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64" => {
            return format!(
                "echo {}\n",
                sh_quote(&format!(
                    "boot: write_files: {path}: encoding `{encoding}` is not supported by the emulator"
                ))
            )
        }
        _ => content.into_bytes(),
    };
    // cloud-init's `decode_perms`: an octal string or an integer; default 0644.
    let perms = match entry.get("permissions") {
        Some(Value::String(s)) => u32::from_str_radix(s.trim().trim_start_matches("0o"), 8).ok(),
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => Some(0o644),
    }
    .filter(|p| *p <= 0o7777)
    .unwrap_or(0o644);
    let owner = entry.get("owner").and_then(Value::as_str).unwrap_or("root:root");
    let append = entry.get("append").and_then(Value::as_bool).unwrap_or(false);
    let data = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!(
        "echo {log}\n\
         mkdir -p -- \"$(dirname -- {q})\" && printf '%s' '{data}' | base64 -d {redir} {q} && chmod {perms:o} {q} && chown {owner} {q} || echo {fail}\n",
        log = sh_quote(&format!("boot: write_files: {path}")),
        redir = if append { ">>" } else { ">" },
        owner = sh_quote(owner),
        fail = sh_quote(&format!("boot: write_files: {path}: failed")),
    )
}

/// The whole boot, as one shell script run as root inside the instance: `write_files`, the
/// deferred ones, the `runcmd` script, then wait (as the instance's subreaper) until deleted.
pub(crate) fn script(user_data: &str) -> String {
    let mut s = String::from("exec </dev/null\necho 'boot: cloud-config'\n");
    let Some(cc) = super::cloudconfig::parse(user_data) else {
        s.push_str(
            "echo 'boot: the user data is not #cloud-config; nothing to run'\nexec sleep 2147483647\n",
        );
        return s;
    };
    let deferred = |e: &Value| e.get("defer").and_then(Value::as_bool).unwrap_or(false);
    for e in cc.write_files.iter().filter(|e| !deferred(e)) {
        s.push_str(&write_file_lines(e));
    }
    for e in cc.write_files.iter().filter(|e| deferred(e)) {
        s.push_str(&write_file_lines(e));
    }
    if !cc.runcmd.is_empty() {
        match shellify(&cc.runcmd) {
            Ok(text) => {
                let data = base64::engine::general_purpose::STANDARD.encode(text);
                let q = sh_quote(RUNCMD_PATH);
                s.push_str(&format!(
                    "mkdir -p \"$(dirname {q})\" && printf '%s' '{data}' | base64 -d > {q} && chmod 0700 {q}\n\
                     echo 'boot: runcmd'\n\
                     {q}\n\
                     echo \"boot: runcmd exited with status $?\"\n"
                ));
            }
            Err(e) => s.push_str(&format!("echo {}\n", sh_quote(&format!("boot: {e}")))),
        }
    }
    s.push_str("echo 'boot: done'\nexec sleep 2147483647\n");
    s
}

/// Starts the boot of `user_data` (the decoded text) inside the namespaces of the sshd `pid`,
/// logging to `dir`/[`LOG_NAME`]; `dir` is the instance's work directory. Called by the
/// supervisor thread only (see [`super::instances`]).
pub(crate) fn spawn(user_data: &str, sshd_pid: u32, dir: &Path) -> anyhow::Result<Child> {
    // The instance's /usr/local/bin is its own directory (see `sshd::PRIVATE_DIRS`).
    let stub = dir.join("fs").join("usr-local-bin").join("systemctl");
    std::fs::write(&stub, SYSTEMCTL_STUB).with_context(|| format!("failed to write `{}`", stub.display()))?;
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755))?;
    let ns = |name: &str| {
        let p = format!("/proc/{sshd_pid}/ns/{name}");
        File::open(&p).with_context(|| format!("failed to open `{p}`"))
    };
    let (mnt, uts) = (ns("mnt")?, ns("uts")?);
    let log_path = dir.join(LOG_NAME);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open `{}`", log_path.display()))?;
    let log2 = log.try_clone().context("failed to duplicate the boot log handle")?;
    let root = CString::new("/").expect("no NUL");
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script(user_data)).arg("cloud-init");
    cmd.env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("LANG", "C.UTF-8");
    cmd.stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log2));
    let (mnt_fd, uts_fd) = (mnt.as_raw_fd(), uts.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid, setns, chdir, _exit) run
    // between fork and exec; the namespace files stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            libc::setpgid(0, 0);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            // Orphans of the boot's commands (a `nohup … &` service) stay in this tree, so
            // deleting the instance finds and kills them (see the module documentation).
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            check(libc::setns(mnt_fd, libc::CLONE_NEWNS))?;
            check(libc::setns(uts_fd, libc::CLONE_NEWUTS))?;
            check(libc::chdir(root.as_ptr()))?;
            Ok(())
        });
    }
    let child = cmd.spawn().context("failed to start the boot shell `/bin/sh`")?;
    drop((mnt, uts));
    Ok(child)
}

/// The mount namespace (`mnt:[…]`) of the process holding the TCP connection from `peer` to
/// `local` (a connection accepted by this process), found through `/proc/net/tcp` (`proc(5)`)
/// and the owners' `/proc/<pid>/fd`. Every process of a booting instance connects from
/// `127.0.0.1` (Linux picks the loopback route's source address), so this is how the metadata
/// service tells which instance asks, as ECS's does by the network interface.
pub(crate) fn peer_mount_namespace(peer: SocketAddr, local: SocketAddr) -> Option<String> {
    let (SocketAddr::V4(peer), SocketAddr::V4(local)) = (peer, local) else { return None };
    let parse = |s: &str| -> Option<SocketAddrV4> {
        let (ip, port) = s.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        // The kernel prints the address as the in-memory (network order) word.
        Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), u16::from_str_radix(port, 16).ok()?))
    };
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && parse(f[1])? == peer && parse(f[2])? == local).then(|| f[9].to_string())
    })?;
    let wanted = format!("socket:[{inode}]");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        if !e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        let owns = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str().as_bytes() == wanted.as_bytes())
        });
        if owns {
            return mount_namespace(&e.file_name().to_string_lossy());
        }
    }
    None
}

/// Where the file the instance sees at `path` is kept on the host when the instance wrote it
/// (its private directories, the upper layers of its overlays), under the instance's work
/// directory `dir`; `None` for a path the instance never wrote.
pub(crate) fn written_file(dir: &Path, path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return None;
    }
    for (target, name) in PRIVATE_DIRS {
        if let Ok(rest) = path.strip_prefix(target) {
            return Some(dir.join("fs").join(name).join(rest)).filter(|p| p.exists());
        }
    }
    for target in BOOT_OVERLAYS {
        if let Ok(rest) = path.strip_prefix(target) {
            let name = target.trim_start_matches('/').replace('/', "-");
            return Some(dir.join("fs").join("overlay").join(name).join("upper").join(rest))
                .filter(|p| p.exists());
        }
    }
    None
}

/// `mnt:[…]` of process `pid`.
pub(crate) fn mount_namespace(pid: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runcmd_is_shellified_as_cloud_init_does() {
        let items: Vec<Value> =
            serde_json::from_str(r#"["echo a && echo b", ["printf", "%s\n", "it's"], null]"#).unwrap();
        assert_eq!(shellify(&items).unwrap(), "#!/bin/sh\necho a && echo b\n'printf' '%s\n' 'it'\\''s'\n");
        assert!(shellify(&[Value::Bool(true)]).unwrap_err().contains("unable to shellify true"));
    }

    #[test]
    fn write_files_follow_cloud_init_defaults() {
        let e: Value = serde_json::from_str(r#"{"path": "/etc/x y", "content": "hi"}"#).unwrap();
        let l = write_file_lines(&e);
        assert!(
            l.contains("base64 -d > '/etc/x y' && chmod 644 '/etc/x y' && chown 'root:root' '/etc/x y'"),
            "{l}"
        );
        assert!(l.contains("'aGk='"), "{l}");
        let e: Value = serde_json::from_str(
            r#"{"path": "/a", "content": "aGk=", "encoding": "b64", "permissions": "0600", "owner": "u:g", "append": true}"#,
        )
        .unwrap();
        let l = write_file_lines(&e);
        assert!(l.contains("'aGk=' | base64 -d >> '/a' && chmod 600 '/a' && chown 'u:g' '/a'"), "{l}");
        let e: Value = serde_json::from_str(r#"{"path": "/a", "content": "x", "encoding": "gzip"}"#).unwrap();
        assert!(write_file_lines(&e).contains("encoding `gzip` is not supported"));
    }

    #[test]
    fn deferred_files_come_after_the_others_and_before_runcmd() {
        let s = script(
            "#cloud-config\n{\"write_files\":[{\"path\":\"/late\",\"defer\":true},{\"path\":\"/early\"}],\"runcmd\":[\"true\"]}",
        );
        let (early, late, run) = (
            s.find("write_files: /early").unwrap(),
            s.find("write_files: /late").unwrap(),
            s.find("echo 'boot: runcmd'").unwrap(),
        );
        assert!(early < late && late < run, "{s}");
        assert!(script("#!/bin/sh\necho hi").contains("not #cloud-config"));
    }
}
