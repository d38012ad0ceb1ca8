//! The SSH session to a job's instance: readiness for `prepare`, one stage script for `run`.
//!
//! Why this is more than "ssh host script":
//! - **The host key is pinned.** The driver generated the instance's host key itself (see
//!   [`crate::keys`]), so the key the server presents must be exactly that one; anything else is
//!   [`SshError::HostKeyMismatch`] with both fingerprints. There is no "accept anything" mode
//!   (the reference custom executor's biggest weakness).
//! - **The script never travels on the job's stdin.** One channel stores it (arriving on the
//!   channel's stdin) in a private directory, checks its size and only then runs it as
//!   `<interpreter> <file> </dev/null`, so a job step that reads stdin sees EOF instead of the
//!   rest of its own script, and a cut connection never runs half a script.
//! - **Output streams live.** The session is non-blocking; stdout and stderr are polled together
//!   and every chunk is written and flushed to the job log as it arrives.
//! - **Cancel stops the remote work.** The script runs under `setsid` in its own process group
//!   whose id is recorded next to it; on cancel (SIGTERM from gitlab-runner sets a flag) a
//!   second connection sends TERM to the whole group, then KILL after a short grace.
//! - **A dead peer is noticed.** SSH keepalives plus TCP keepalive and `TCP_USER_TIMEOUT` turn a
//!   vanished instance (e.g. a reclaimed spot instance) into [`SshError::Lost`] rather than a
//!   hang. A server that still holds the TCP connection but no longer speaks (a stopped or
//!   wedged sshd: the kernel keeps acknowledging) is caught by [`Keepalive`]: keepalives ask for
//!   a reply, and when nothing at all has come from the server for the configured time the
//!   connection is lost, like OpenSSH's `ServerAliveInterval` / `ServerAliveCountMax`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ssh2::{BlockDirections, ErrorCode, MethodType, Session};

use crate::keys::{fingerprint_sha256, fingerprint_sha256_of_blob, public_key_blob};
use crate::retry::{Backoff, RetryPolicy, SystemClock, Verdict};
use crate::secret::Secret;

mod kept;
mod script;
mod stage;
pub use kept::{Health, KeptSession};
use script::kill_command;
pub(crate) use stage::deliver;
pub use stage::{
    finish_over_new_connection, new_script_token, run_script, run_script_with, RunOptions, StageControl,
    StageEnd, StageHooks,
};

/// Unacknowledged data older than this kills the TCP connection (`TCP_USER_TIMEOUT`).
const TCP_USER_TIMEOUT_MS: u32 = 30_000;
/// How long the remote process group gets between TERM and KILL on cancel.
const CANCEL_GRACE_TENTHS: u32 = 50;
/// Longest wait on a quiet connection while a script runs. Output and the exit status wake the
/// wait at once, and so does SIGTERM (it interrupts `poll`); this bounds how late a cancel flag
/// set by another thread is seen.
const MAX_QUIET_WAIT: Duration = Duration::from_millis(500);
/// Consecutive host-key or authentication failures tolerated while sshd may still be starting.
const STRICT_FAILURES_TOLERATED: u32 = 3;
/// Longest pause between readiness attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

// libssh2 error codes (libssh2.h); ssh2 does not re-export its `-sys` crate.
const LIBSSH2_ERROR_FILE: i32 = -16;
const LIBSSH2_ERROR_AUTHENTICATION_FAILED: i32 = -18;
const LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED: i32 = -19;
const LIBSSH2_ERROR_METHOD_NOT_SUPPORTED: i32 = -33;
const LIBSSH2_ERROR_EAGAIN: i32 = -37;
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;

/// Where and how to reach a job's instance.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// IP address or host name.
    pub host: String,
    /// TCP port, normally 22.
    pub port: u16,
    /// Login user, normally `root`.
    pub user: String,
    /// The client private key (OpenSSH or PEM).
    pub private_key: Secret<String>,
    /// The pinned host public key, OpenSSH format (`ssh-ed25519 AAAA... comment`).
    pub host_key: String,
    /// Bound on one TCP connect, and on each blocking step of the handshake.
    pub connect_timeout: Duration,
}

impl SshTarget {
    /// `host:port`, with brackets around an IPv6 address.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What went wrong talking to an instance; callers branch on the variant.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The TCP connection could not be made (refused, timed out, unreachable).
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// The SSH protocol handshake failed (often: sshd still starting).
    #[error("SSH handshake with {addr} failed: {message}")]
    Handshake {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// The server presented a different host key than the pinned one.
    #[error("host key of {addr} does not match the pinned key: expected {expected}, got {got}")]
    HostKeyMismatch {
        /// `host:port`.
        addr: String,
        /// SHA256 fingerprint of the pinned key.
        expected: String,
        /// SHA256 fingerprint of the key the server presented.
        got: String,
    },
    /// The server refused the client key.
    #[error("SSH authentication as `{user}` on {addr} failed: {message}")]
    Auth {
        /// `host:port`.
        addr: String,
        /// Login user.
        user: String,
        /// Why.
        message: String,
    },
    /// The connection broke after it was established (no exit status was received).
    #[error("SSH connection to {addr} was lost: {message}")]
    Lost {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// Anything else: a local writer failed, the remote helper commands failed.
    #[error("SSH session with {addr} failed: {message}")]
    Io {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// The target itself is unusable (the pinned host key does not parse).
    #[error("invalid SSH target {addr}: {message}")]
    Config {
        /// `host:port`.
        addr: String,
        /// Why.
        message: String,
    },
    /// [`wait_until_ready`] ran out of time; `last` is the last attempt's error.
    #[error("SSH on {addr} was not ready after {}s: {last}", waited.as_secs())]
    NotReady {
        /// `host:port`.
        addr: String,
        /// How long it waited.
        waited: Duration,
        /// The last attempt's error.
        last: Box<SshError>,
    },
}

impl SshError {
    /// True for failures that may go away when sshd finishes starting.
    fn is_transient(&self) -> bool {
        matches!(self, SshError::Connect { .. } | SshError::Handshake { .. } | SshError::Lost { .. })
    }
}

/// How a script run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// The script's exit status (for a script killed by signal N the shell reports 128+N).
    pub exit_status: Option<i32>,
    /// The signal that killed the remote command itself, if the server reported one.
    pub signal: Option<String>,
    /// The run was cancelled through the `cancel` flag and the remote process group killed.
    pub cancelled: bool,
}

/// An authenticated session plus the descriptor needed to poll it.
struct Connection {
    session: Session,
    fd: RawFd,
    addr: String,
}

fn msg(e: &ssh2::Error) -> String {
    let m = e.message().trim();
    if m.is_empty() {
        format!("libssh2 error {}", e.code())
    } else {
        m.to_string()
    }
}

fn is_eagain(e: &ssh2::Error) -> bool {
    e.code() == ErrorCode::Session(LIBSSH2_ERROR_EAGAIN)
}

fn is_auth_error(e: &ssh2::Error) -> bool {
    matches!(
        e.code(),
        ErrorCode::Session(
            LIBSSH2_ERROR_AUTHENTICATION_FAILED
                | LIBSSH2_ERROR_PUBLICKEY_UNVERIFIED
                | LIBSSH2_ERROR_FILE
                | LIBSSH2_ERROR_METHOD_NOT_SUPPORTED
        )
    )
}

/// Sets an integer socket option, best effort.
fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid pointer to `value`.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Acknowledges what arrives at once instead of up to 40 ms later. SSH is a conversation of
/// small packets, and a server that holds its next small packet until the last one is
/// acknowledged (Nagle) would wait out every delayed ACK. Linux leaves quick-ACK mode again
/// by itself, so this is re-armed before every wait.
fn quick_ack(fd: RawFd) {
    #[cfg(target_os = "linux")]
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

/// Best-effort TCP keepalive and user timeout, so a silent peer fails the socket; no Nagle
/// delay on our small writes, and quick ACKs.
fn tune_socket(fd: RawFd) {
    let set = setsockopt_int;
    set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 15);
    set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS as libc::c_int);
    set(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    quick_ack(fd);
}

/// Connects, checks the pinned host key and authenticates (blocking, bounded by `timeout`).
fn connect(t: &SshTarget, timeout: Duration) -> Result<Connection, SshError> {
    let addr = t.addr();
    let pinned = public_key_blob(&t.host_key)
        .map_err(|e| SshError::Config { addr: addr.clone(), message: format!("pinned host key: {e}") })?;
    let algorithm = t.host_key.split_whitespace().next().unwrap_or("ssh-ed25519").to_string();
    let timeout = timeout.max(Duration::from_millis(100));

    let sockaddrs: Vec<SocketAddr> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|e| SshError::Connect { addr: addr.clone(), message: e.to_string() })?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut tcp = None;
    for sa in &sockaddrs {
        match TcpStream::connect_timeout(sa, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or_else(|| SshError::Connect { addr: addr.clone(), message: last.to_string() })?;
    let fd = tcp.as_raw_fd();
    tune_socket(fd);

    let handshake_err = |e: ssh2::Error| SshError::Handshake { addr: addr.clone(), message: msg(&e) };
    let mut session = Session::new().map_err(handshake_err)?;
    session.set_timeout(timeout.as_millis().min(u32::MAX as u128) as u32);
    session.set_tcp_stream(tcp);
    session.method_pref(MethodType::HostKey, &algorithm).map_err(handshake_err)?;
    // Handshake and authentication step by step, so every wait re-arms the quick ACKs.
    session.set_blocking(false);
    let deadline = Instant::now() + timeout;
    let waiter = session.clone();
    drive(&waiter, fd, deadline, || session.handshake()).map_err(handshake_err)?;

    let got = match session.host_key() {
        Some((blob, _)) => blob.to_vec(),
        None => {
            return Err(SshError::Handshake { addr, message: "the server presented no host key".into() });
        }
    };
    if got != pinned {
        return Err(SshError::HostKeyMismatch {
            expected: fingerprint_sha256(&t.host_key).unwrap_or_else(|_| fingerprint_sha256_of_blob(&pinned)),
            got: fingerprint_sha256_of_blob(&got),
            addr,
        });
    }

    let auth = drive(&session, fd, deadline, || {
        session.userauth_pubkey_memory(&t.user, None, t.private_key.expose(), None)
    });
    session.set_blocking(true);
    if let Err(e) = auth {
        let message = msg(&e);
        return Err(if is_auth_error(&e) {
            SshError::Auth { addr, user: t.user.clone(), message }
        } else {
            SshError::Handshake { addr, message }
        });
    }
    if !session.authenticated() {
        return Err(SshError::Auth { addr, user: t.user.clone(), message: "not authenticated".into() });
    }
    log::debug!("SSH to {addr} as `{}`: the host key matches the pinned one", t.user);
    Ok(Connection { session, fd, addr })
}

/// Runs `command` to completion; returns (exit status, stdout, stderr). Each step is bounded
/// by the session's timeout, as libssh2's blocking calls are, but the waits are ours, so quick
/// ACKs are re-armed before each (see [`quick_ack`]).
fn exec_blocking(c: &Connection, command: &str, stdin: &[u8]) -> Result<(i32, String, String), String> {
    let timeout = Duration::from_millis(u64::from(c.session.timeout().max(100)));
    c.session.set_blocking(false);
    let result = exec_steps(c, command, stdin, timeout);
    c.session.set_blocking(true);
    result
}

fn exec_steps(
    c: &Connection,
    command: &str,
    stdin: &[u8],
    timeout: Duration,
) -> Result<(i32, String, String), String> {
    let ssh = |e: ssh2::Error| msg(&e);
    let by = || Instant::now() + timeout;
    let mut ch = drive(&c.session, c.fd, by(), || c.session.channel_session()).map_err(ssh)?;
    drive(&c.session, c.fd, by(), || ch.exec(command)).map_err(ssh)?;
    write_all_by(c, &mut ch, stdin, by()).map_err(|e| e.to_string())?;
    drive(&c.session, c.fd, by(), || ch.send_eof()).map_err(ssh)?;
    // Small outputs only: stdout to its end, then stderr.
    let out = read_to_end_by(c, &mut ch.stream(0), timeout)?;
    let err = read_to_end_by(c, &mut ch.stderr(), timeout)?;
    drive(&c.session, c.fd, by(), || ch.wait_close()).map_err(ssh)?;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok((ch.exit_status().map_err(ssh)?, text(out), text(err)))
}

/// Reads a non-blocking stream to its end; fails when nothing comes for `timeout`.
fn read_to_end_by(c: &Connection, stream: &mut ssh2::Stream, timeout: Duration) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let mut deadline = Instant::now() + timeout;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                deadline = Instant::now() + timeout;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err("Timed out waiting on socket".to_string());
                }
                wait_socket(&c.session, c.fd, left);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Runs one command on the instance over a fresh pinned session, feeding it `stdin`, and
/// returns its exit status, stdout and stderr (small outputs only: stdout is read to its end
/// before stderr). For prepare's own checks and installs, not for job scripts.
pub fn exec(t: &SshTarget, command: &str, stdin: &[u8]) -> Result<(i32, String, String), SshError> {
    let c = connect(t, t.connect_timeout)?;
    let out = exec_blocking(&c, command, stdin)
        .map_err(|message| SshError::Lost { addr: c.addr.clone(), message })?;
    let _ = c.session.disconnect(None, "done", None);
    Ok(out)
}

fn attempt_ready(t: &SshTarget, timeout: Duration) -> Result<(), SshError> {
    let c = connect(t, timeout)?;
    let lost = |message: String| SshError::Lost { addr: c.addr.clone(), message };
    let (status, _, stderr) = exec_blocking(&c, "true", b"").map_err(lost)?;
    if status != 0 {
        return Err(SshError::Io {
            addr: c.addr.clone(),
            message: format!("`true` exited with status {status}: {}", stderr.trim()),
        });
    }
    let _ = c.session.disconnect(None, "ready", None);
    Ok(())
}

/// Retries connect + host-key check + authentication + `true` until it works or `deadline`.
///
/// Connection refused, timeouts and handshake resets are retried with backoff (250 ms doubling
/// to 5 s). A host-key mismatch or an authentication failure is retried only a few times in a
/// row (sshd may still be installing the keys from cloud-config), then returned as is. When
/// the deadline passes, [`SshError::NotReady`] carries the last attempt's error.
/// `on_attempt(elapsed)` is called before every attempt, so `prepare` can print progress.
pub fn wait_until_ready(
    t: &SshTarget,
    deadline: Instant,
    on_attempt: &mut dyn FnMut(Duration),
) -> Result<(), SshError> {
    let start = Instant::now();
    // 250 ms doubling up to MAX_BACKOFF, plus up to 20% jitter so many jobs started together
    // do not knock in step, until the deadline (the crate's one retry policy).
    let policy = RetryPolicy::within(
        deadline.saturating_duration_since(start),
        Backoff { first: Duration::from_millis(250), factor: 2, max: MAX_BACKOFF, jitter: (1.0, 1.2) },
        Arc::new(SystemClock),
    );
    let mut retry = policy.start();
    let mut strict_failures = 0;
    loop {
        on_attempt(start.elapsed());
        let remaining = deadline.saturating_duration_since(Instant::now());
        let err = match attempt_ready(t, t.connect_timeout.min(remaining)) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        log::debug!("ssh readiness attempt on {} failed: {err}", t.addr());
        if matches!(err, SshError::Config { .. }) {
            return Err(err);
        }
        if err.is_transient() {
            strict_failures = 0;
        } else {
            strict_failures += 1;
            if strict_failures >= STRICT_FAILURES_TOLERATED {
                return Err(err);
            }
        }
        match retry.after_failure() {
            Verdict::RetryAfter(pause) => thread::sleep(pause),
            Verdict::GiveUp => {
                return Err(SshError::NotReady {
                    addr: t.addr(),
                    waited: start.elapsed(),
                    last: Box::new(err),
                })
            }
        }
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `content` to `path` on the instance, root-owned, mode 0600 in a 0700 directory,
/// replaced atomically (a reader never sees half a file). Through `sudo -n` when the login user
/// is not root. The content goes over the channel's stdin, never on a command line.
pub fn install_private_file(t: &SshTarget, path: &str, content: &[u8]) -> Result<(), SshError> {
    let c = connect(t, t.connect_timeout)?;
    let (dir, _) = path.rsplit_once('/').unwrap_or(("", path));
    let script = format!(
        "umask 077 && mkdir -p {d} && chown root:root {d} && chmod 700 {d} && cat > {p}.new && mv -f {p}.new {p}",
        d = sh_quote(if dir.is_empty() { "/" } else { dir }),
        p = sh_quote(path)
    );
    let command = if t.user == "root" {
        format!("sh -c {}", sh_quote(&script))
    } else {
        format!("sudo -n sh -c {}", sh_quote(&script))
    };
    let (status, _, err) = exec_blocking(&c, &command, content).map_err(|message| SshError::Lost {
        addr: c.addr.clone(),
        message: format!("writing {path}: {message}"),
    })?;
    let _ = c.session.disconnect(None, "done", None);
    if status != 0 {
        return Err(SshError::Io {
            addr: c.addr.clone(),
            message: format!("writing {path} failed (status {status}): {}", err.trim()),
        });
    }
    Ok(())
}

/// How a silent server is noticed while a script runs (`ssh.keepalive_interval` and
/// `ssh.keepalive_count_max`), the same rule as OpenSSH's `ServerAliveInterval` and
/// `ServerAliveCountMax` (ssh_config(5)): a keepalive that wants a reply goes out every
/// `interval`, and a server that sent nothing for `count_max` intervals is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between keepalives (whole seconds: libssh2 counts in seconds).
    pub interval: Duration,
    /// Unanswered keepalives that make the connection lost.
    pub count_max: u32,
}

impl Default for Keepalive {
    /// 10 s × 3, so a stalled server is given up after about 30 s.
    fn default() -> Self {
        Keepalive { interval: Duration::from_secs(10), count_max: 3 }
    }
}

impl Keepalive {
    fn interval_secs(&self) -> u32 {
        self.interval.as_secs().clamp(1, u64::from(u32::MAX)) as u32
    }

    /// Silence after which the server is gone: `count_max` intervals, plus one second because
    /// libssh2 schedules keepalives on a one-second clock.
    pub fn silence_limit(&self) -> Duration {
        Duration::from_secs(u64::from(self.interval_secs()) * u64::from(self.count_max.max(1)) + 1)
    }
}

/// Milliseconds since the socket last received data (`TCP_INFO`'s `tcpi_last_data_recv`), or
/// `None` when the kernel does not tell. Counts what libssh2 has not read yet too, so it is
/// the server's silence, not ours.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn silent_for(fd: RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        );
        (rc == 0).then(|| Duration::from_millis(u64::from(info.tcpi_last_data_recv)))
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn silent_for(_: RawFd) -> Option<Duration> {
    None
}

/// Stops the script in `dir` over a new connection (the session it ran on is gone).
fn kill_remote(t: &SshTarget, dir: &str) -> Result<(), SshError> {
    let c = connect(t, t.connect_timeout)?;
    exec_blocking(&c, &kill_command(dir), b"")
        .map_err(|message| SshError::Lost { addr: c.addr.clone(), message })?;
    let _ = c.session.disconnect(None, "cancelled", None);
    Ok(())
}

/// Waits until the socket is ready in the direction libssh2 needs, for at most `timeout`.
fn wait_socket(session: &Session, fd: RawFd, timeout: Duration) {
    wait_socket_or(session, fd, &[], timeout)
}

/// [`wait_socket`], also ending when one of `also` becomes readable (or hangs up).
fn wait_socket_or(session: &Session, fd: RawFd, also: &[RawFd], timeout: Duration) {
    let events = match session.block_directions() {
        BlockDirections::Outbound => libc::POLLOUT,
        BlockDirections::Both => libc::POLLIN | libc::POLLOUT,
        BlockDirections::Inbound | BlockDirections::None => libc::POLLIN,
    };
    quick_ack(fd);
    let mut fds = vec![libc::pollfd { fd, events, revents: 0 }];
    fds.extend(also.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
    // SAFETY: valid pollfds, as many as we pass; poll only writes their `revents`.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis().min(i32::MAX as u128) as libc::c_int,
        );
    }
}

/// Starts the canceller ([`kill_command`]) for the script in `dir` in a new channel of the
/// session `c`, without waiting for it to finish.
fn start_canceller(c: &Connection, dir: &str) -> Result<ssh2::Channel, ssh2::Error> {
    let by = || Instant::now() + Duration::from_millis(u64::from(c.session.timeout().max(100)));
    let mut ch = drive(&c.session, c.fd, by(), || c.session.channel_session())?;
    drive(&c.session, c.fd, by(), || ch.exec(&kill_command(dir)))?;
    drive(&c.session, c.fd, by(), || ch.send_eof())?;
    Ok(ch)
}

/// Runs one step of a non-blocking session to its end, waiting on the socket whenever libssh2
/// would block, until `deadline` (then libssh2's own timeout error). libssh2's blocking mode
/// waits inside the library, where the quick ACKs cannot be re-armed.
fn drive<T>(
    session: &Session,
    fd: RawFd,
    deadline: Instant,
    mut step: impl FnMut() -> Result<T, ssh2::Error>,
) -> Result<T, ssh2::Error> {
    loop {
        match step() {
            Err(e) if is_eagain(&e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ssh2::Error::new(
                        ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT),
                        "Timed out waiting on socket",
                    ));
                }
                wait_socket(session, fd, left);
            }
            other => return other,
        }
    }
}

/// Writes all of `data` to a non-blocking channel by `deadline`.
fn write_all_by(
    c: &Connection,
    ch: &mut ssh2::Channel,
    mut data: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !data.is_empty() {
        match ch.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out writing"));
                }
                wait_socket(&c.session, c.fd, left);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote("/tmp/x y"), "'/tmp/x y'");
    }

    #[test]
    fn addr_brackets_ipv6() {
        let t = SshTarget {
            host: "::1".into(),
            port: 2222,
            user: "root".into(),
            private_key: Secret::new(String::new()),
            host_key: String::new(),
            connect_timeout: Duration::from_secs(1),
        };
        assert_eq!(t.addr(), "[::1]:2222");
        assert_eq!(SshTarget { host: "127.0.0.9".into(), ..t }.addr(), "127.0.0.9:2222");
    }

    #[test]
    fn errors_are_one_line_and_name_the_address() {
        let e = SshError::HostKeyMismatch {
            addr: "127.0.0.9:22".into(),
            expected: "SHA256:aaa".into(),
            got: "SHA256:bbb".into(),
        };
        assert_eq!(
            e.to_string(),
            "host key of 127.0.0.9:22 does not match the pinned key: expected SHA256:aaa, got SHA256:bbb"
        );
        let n = SshError::NotReady {
            addr: "127.0.0.9:22".into(),
            waited: Duration::from_millis(120_400),
            last: Box::new(SshError::Connect {
                addr: "127.0.0.9:22".into(),
                message: "Connection refused".into(),
            }),
        };
        assert_eq!(
            n.to_string(),
            "SSH on 127.0.0.9:22 was not ready after 120s: cannot connect to 127.0.0.9:22: Connection refused"
        );
    }

    #[test]
    fn invalid_pinned_key_is_a_config_error() {
        let t = SshTarget {
            host: "127.0.0.1".into(),
            port: 1,
            user: "root".into(),
            private_key: Secret::new(String::new()),
            host_key: "not a key".into(),
            connect_timeout: Duration::from_secs(1),
        };
        let err = wait_until_ready(&t, Instant::now() + Duration::from_secs(5), &mut |_| {}).unwrap_err();
        assert!(matches!(err, SshError::Config { .. }), "{err}");
        assert!(err.to_string().starts_with("invalid SSH target 127.0.0.1:1: pinned host key: "), "{err}");
    }
}
