//! The per-job session keeper: one SSH session per job, kept across the stage processes.
//!
//! gitlab-runner starts a new `run` process for each of a job's 8–10 stages, and each would pay
//! a TCP connection, a key exchange and an authentication. So `prepare`, once SSH answers,
//! starts `aliyun-spot keep-session` ([`serve`]): a small detached process that opens the
//! session (pinned host key, the job's key) and then listens on `keeper.sock` in the job's
//! state directory. `run` connects to it ([`run_stage`]) and gets a new channel on the open
//! session; `cleanup` stops it ([`stop`]).
//!
//! It is a speed-up, never a point of failure:
//! - `run` that finds no keeper (not started, killed, exited, state of an older version, or
//!   `ssh.keep_session = false`) connects directly, with the same semantics.
//! - The keeper says "accepted" before it opens the stage's channel; a keeper that is gone
//!   before that has run nothing, so `run` goes direct. One that dies after it has been told
//!   the script's directory by `run`, which stops the script over a connection of its own and
//!   fails the stage as a lost connection (a system failure, which gitlab-runner may retry).
//!   A keeper that hangs instead (no heartbeat, [`wire::HEARTBEAT_LIMIT`]) is killed by `run`
//!   and counts as dead.
//! - It never outlives its job: it exits when `cleanup` asks, when the session is closed or the
//!   server stops answering keepalives (the instance is gone), after [`IDLE_TIMEOUT`] without a
//!   stage, when the state directory or its socket is removed or replaced, and on SIGTERM,
//!   SIGINT or SIGHUP. A `run` that goes away mid-stage (killed) counts as a cancel: the
//!   script's process group is stopped.
//!
//! Trust: the socket is created 0600 in the job's 0700 state directory. Both ends check the
//! other's user with `SO_PEERCRED` (only this user may ask for stages), and `run` checks the
//! socket file's type, owner and mode before it connects. The keeper gets its settings and the
//! private key on stdin, never in its arguments or environment (it starts with an empty
//! environment, so no job variable reaches it), uses the key to authenticate and drops it: it
//! holds the open session and nothing else. It logs only why it exited, to `keeper.log` beside
//! the socket.

mod client;
mod serve;
pub mod wire;

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};

pub use client::run_stage;
pub use serve::serve;

use crate::ssh::{Keepalive, SshTarget};

/// The keeper's socket, in the job's state directory.
pub const SOCKET: &str = "keeper.sock";
/// Where the keeper writes why it exited, beside the socket.
pub const LOG: &str = "keeper.log";
/// The keeper exits after this long without a stage. gitlab-runner runs a job's stages one
/// after the other with nothing in between, so a gap this long means the job is over.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The subcommand of `aliyun-spot` that runs the keeper.
pub const SUBCOMMAND: &str = "keep-session";

/// What `prepare` sends the keeper on its stdin.
#[derive(Serialize, Deserialize)]
struct StartRequest {
    job_dir: PathBuf,
    host: String,
    port: u16,
    user: String,
    private_key: String,
    host_key: String,
    connect_timeout_ms: u64,
    keepalive_interval_secs: u64,
    keepalive_count_max: u32,
    idle_timeout_secs: u64,
}

/// Starts the keeper of the job whose state directory is `job_dir`, from the `aliyun-spot`
/// executable `exe`, and waits until its session is open and its socket listens (bounded by
/// the connect timeout). The keeper is detached (a session of its own, so the runner's signals
/// to `prepare`'s process group do not reach it) and keeps no descriptor of ours. It exits
/// after `idle_timeout` without a stage ([`IDLE_TIMEOUT`] for a job).
pub fn start(
    exe: &Path,
    job_dir: &Path,
    target: &SshTarget,
    keepalive: Keepalive,
    idle_timeout: Duration,
) -> anyhow::Result<()> {
    if !exe.is_file() {
        bail!("`{}` is missing: install all binaries together", exe.display());
    }
    let log = crate::fsutil::open_append_nofollow(&job_dir.join(LOG), 0o600)?;
    let mut cmd = Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{}`", exe.display()))?;
    let request = StartRequest {
        job_dir: job_dir.to_path_buf(),
        host: target.host.clone(),
        port: target.port,
        user: target.user.clone(),
        private_key: target.private_key.expose().clone(),
        host_key: target.host_key.clone(),
        connect_timeout_ms: target.connect_timeout.as_millis() as u64,
        keepalive_interval_secs: keepalive.interval.as_secs(),
        keepalive_count_max: keepalive.count_max,
        idle_timeout_secs: idle_timeout.as_secs().max(1),
    };
    let sent = serde_json::to_vec(&request)
        .map_err(io::Error::from)
        .and_then(|json| child.stdin.take().expect("piped").write_all(&json));
    drop(request);
    let ready = sent.map_err(anyhow::Error::from).and_then(|()| {
        let stdout = child.stdout.take().expect("piped");
        wait_ready(stdout, target.connect_timeout + Duration::from_secs(5))
    });
    if let Err(e) = ready {
        let _ = child.kill();
        let _ = child.wait();
        let why = fs::read_to_string(job_dir.join(LOG)).unwrap_or_default();
        let why = why.lines().last().unwrap_or("").trim().to_string();
        return Err(if why.is_empty() { e } else { e.context(why) });
    }
    Ok(())
}

/// Waits for the keeper's `ready` line on its stdout.
fn wait_ready(mut stdout: std::process::ChildStdout, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    // SAFETY: fcntl on a descriptor we own; O_NONBLOCK so a read after a timed-out poll
    // cannot block.
    unsafe {
        let fd = stdout.as_raw_fd();
        libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK);
    }
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the session keeper did not start within {}s", within.as_secs());
        }
        let mut pfd = libc::pollfd { fd: stdout.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; poll only writes its `revents`.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as libc::c_int) };
        let mut buf = [0u8; 64];
        match stdout.read(&mut buf) {
            Ok(0) => bail!("the session keeper exited before its session was open"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if got != b"ready\n" {
        bail!("the session keeper said `{}`", String::from_utf8_lossy(&got).trim());
    }
    Ok(())
}

/// Asks the keeper of `job_dir`, if there is one, to exit, and waits a moment for it to do so.
/// Best effort: a keeper that is not told exits anyway once the state directory is removed.
pub fn stop(job_dir: &Path) {
    match connect(job_dir) {
        Ok(Some(mut s)) => {
            if wire::write_frame(&mut s, wire::STOP, b"").is_ok() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.read(&mut [0u8; 16]);
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!("not stopping the session keeper: {e:#}"),
    }
}

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The process and user ids at the other end of `s` (`SO_PEERCRED`).
fn peer_cred(s: &impl AsRawFd) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Whether the process at the other end of `s` runs as this user.
fn peer_is_us(s: &impl AsRawFd) -> bool {
    peer_cred(s).is_ok_and(|c| c.uid == euid())
}

/// Connects to the keeper of `job_dir`. `Ok(None)` when there is none to connect to (no
/// socket, or nobody listening on it); an error when the socket or its listener is not ours.
fn connect(job_dir: &Path) -> anyhow::Result<Option<UnixStream>> {
    let path = job_dir.join(SOCKET);
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect `{}`", path.display())),
    };
    if !meta.file_type().is_socket() || meta.uid() != euid() || meta.mode() & 0o077 != 0 {
        bail!(
            "`{}` is not a socket of this user with mode 0600; remove it (stages connect directly meanwhile)",
            path.display()
        );
    }
    // A socket address holds at most 107 bytes; a longer path goes through the directory's
    // descriptor.
    let dir;
    let address = if path.as_os_str().len() < 100 {
        path.clone()
    } else {
        dir = fs::File::open(job_dir).with_context(|| format!("cannot open `{}`", job_dir.display()))?;
        PathBuf::from(format!("/proc/self/fd/{}/{SOCKET}", dir.as_raw_fd()))
    };
    let stream = match UnixStream::connect(&address) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to `{}`", path.display())),
    };
    if !peer_is_us(&stream) {
        return Err(anyhow!("the process listening on `{}` is not running as this user", path.display()));
    }
    Ok(Some(stream))
}
