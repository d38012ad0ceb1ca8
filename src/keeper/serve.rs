//! The keeper process itself (`aliyun-spot keep-session`).

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::wire::{self, FrameWriter, StageReport, StageRequest};
use super::{euid, peer_is_us, StartRequest, SOCKET};
use crate::logging::stderr_line;
use crate::secret::Secret;
use crate::ssh::{Health, Keepalive, KeptSession, RunOptions, SshError, SshTarget, StageControl, StageHooks};

/// Longest wait between two looks at the state directory, the socket and the session.
const TICK: Duration = Duration::from_secs(1);

/// Runs the keeper: reads its settings (`StartRequest`) on stdin, opens the session, says `ready` on
/// stdout, and serves stages until one of the reasons to exit (see [`super`]). Returns why it
/// exited; it also writes that to stderr (the keeper's log).
pub fn serve() -> anyhow::Result<()> {
    let terminated = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, terminated.clone()).context("cannot handle signals")?;
    }
    let mut input = Vec::new();
    io::stdin().take(1 << 20).read_to_end(&mut input).context("cannot read the keeper's settings")?;
    let parsed = serde_json::from_slice::<StartRequest>(&input);
    input.fill(0);
    // Not serde's message: it may quote a value, and the settings hold the private key.
    let Ok(request) = parsed else {
        bail!("the keeper's settings on stdin are not valid (install all binaries together)")
    };
    let why = match Keeper::open(request, terminated) {
        Ok(mut k) => {
            let why = k.serve();
            k.close();
            why
        }
        Err(e) => format!("{e:#}"),
    };
    stderr_line(&format!("session keeper: exiting: {why}"));
    Ok(())
}

struct Keeper {
    session: KeptSession,
    listener: UnixListener,
    job_dir: std::path::PathBuf,
    dir_id: (u64, u64),
    socket_id: (u64, u64),
    idle_timeout: Duration,
    terminated: Arc<AtomicBool>,
}

/// What to do after a client.
enum Next {
    Serve,
    Exit(String),
}

fn identity(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

impl Keeper {
    fn open(r: StartRequest, terminated: Arc<AtomicBool>) -> anyhow::Result<Keeper> {
        let dir_meta = fs::symlink_metadata(&r.job_dir)
            .with_context(|| format!("cannot inspect `{}`", r.job_dir.display()))?;
        if !dir_meta.is_dir() || dir_meta.uid() != euid() || dir_meta.mode() & 0o077 != 0 {
            bail!("`{}` is not a private directory of this user", r.job_dir.display());
        }
        std::env::set_current_dir(&r.job_dir)
            .with_context(|| format!("cannot enter `{}`", r.job_dir.display()))?;
        let keepalive = Keepalive {
            interval: Duration::from_secs(r.keepalive_interval_secs),
            count_max: r.keepalive_count_max,
        };
        let target = SshTarget {
            host: r.host,
            port: r.port,
            user: r.user,
            private_key: Secret::new(r.private_key),
            host_key: r.host_key,
            connect_timeout: Duration::from_millis(r.connect_timeout_ms),
        };
        // The key authenticates this one session and is dropped with `target`.
        let session = KeptSession::open(&target, keepalive)?;
        drop(target);

        // A socket left by an earlier keeper of this directory is replaced (that keeper sees
        // the replacement and exits).
        if let Ok(m) = fs::symlink_metadata(SOCKET) {
            if m.file_type().is_socket() && m.uid() == euid() {
                let _ = fs::remove_file(SOCKET);
            }
        }
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(SOCKET);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.context("cannot listen on the keeper socket")?;
        fs::set_permissions(SOCKET, fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let socket_id = identity(&fs::symlink_metadata(SOCKET)?);

        let mut out = io::stdout();
        out.write_all(b"ready\n")?;
        out.flush()?;
        // Let go of `prepare`'s pipe: it must see its end.
        let null = fs::OpenOptions::new().write(true).open("/dev/null")?;
        // SAFETY: dup2 onto our own stdout descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
        Ok(Keeper {
            session,
            listener,
            job_dir: r.job_dir,
            dir_id: identity(&dir_meta),
            socket_id,
            idle_timeout: Duration::from_secs(r.idle_timeout_secs),
            terminated,
        })
    }

    /// Why the keeper should exit now, if it should.
    fn reason_to_exit(&self, last_used: Instant) -> Option<String> {
        if self.terminated.load(Ordering::SeqCst) {
            return Some("stopped by a signal".into());
        }
        let same = |p: &Path, id| fs::symlink_metadata(p).is_ok_and(|m| identity(&m) == id);
        if !same(&self.job_dir, self.dir_id) {
            return Some("the job's state directory is gone".into());
        }
        if !same(Path::new(SOCKET), self.socket_id) {
            return Some("the socket was removed or replaced".into());
        }
        if last_used.elapsed() >= self.idle_timeout {
            return Some(format!("no stage for {}s", self.idle_timeout.as_secs()));
        }
        None
    }

    fn serve(&mut self) -> String {
        let mut last_used = Instant::now();
        loop {
            if let Some(why) = self.reason_to_exit(last_used) {
                return why;
            }
            let wait = match self.session.check() {
                Health::Up(d) => d.min(TICK),
                Health::Gone(why) => return format!("the session to {} is gone: {why}", self.session.addr()),
            };
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.session.fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 },
            ];
            // SAFETY: two valid pollfds; poll only writes their `revents`.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, wait.as_millis().max(1) as libc::c_int) };
            if fds[1].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
                if let Health::Gone(why) = self.session.check() {
                    return format!("the session to {} is gone: {why}", self.session.addr());
                }
                return format!("the connection to {} was closed", self.session.addr());
            }
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            let client = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(_) => continue,
            };
            match self.client(client) {
                Next::Serve => last_used = Instant::now(),
                Next::Exit(why) => return why,
            }
        }
    }

    /// Serves one connection: a stage, or a request to stop.
    fn client(&mut self, mut s: UnixStream) -> Next {
        if !peer_is_us(&s) || s.set_nonblocking(false).is_err() {
            return Next::Serve;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let (req, script) = match read_request(&mut s) {
            Ok(Some(r)) => r,
            Ok(None) => return Next::Exit("cleanup asked".into()),
            Err(_) => return Next::Serve,
        };
        let _ = s.set_read_timeout(None);
        let Ok(token) = u128::from_str_radix(&req.token, 16) else { return Next::Serve };
        // From here on the stage may have run: `run` must not go direct any more.
        if wire::write_frame(&mut s, wire::ACCEPTED, b"").is_err() {
            return Next::Serve;
        }
        let options = RunOptions {
            hooks: StageHooks { before: req.before, after: req.after },
            keepalive: Keepalive {
                interval: Duration::from_secs(req.keepalive_interval_secs),
                count_max: req.keepalive_count_max,
            },
        };
        let mut control = Relay {
            client: &s,
            listener: &self.listener,
            terminated: &self.terminated,
            cancel: false,
            stop: false,
            beat: None,
        };
        let mut out = FrameWriter { inner: &s, kind: wire::STDOUT };
        let mut err = FrameWriter { inner: &s, kind: wire::STDERR };
        let end =
            self.session.run(token, &script, &req.interpreter, &options, &mut out, &mut err, &mut control);
        let stop = control.stop;
        let report = StageReport::new(&end);
        if let Ok(json) = serde_json::to_vec(&report) {
            let _ = wire::write_frame(&mut &s, wire::DONE, &json);
        }
        if stop {
            return Next::Exit("cleanup asked during a stage".into());
        }
        if let Err(e @ SshError::Lost { .. }) = &end.result {
            return Next::Exit(format!("{e}"));
        }
        Next::Serve
    }

    fn close(self) {
        if fs::symlink_metadata(SOCKET).is_ok_and(|m| identity(&m) == self.socket_id) {
            let _ = fs::remove_file(SOCKET);
        }
        self.session.close();
    }
}

/// Reads a stage request and its script; `Ok(None)` for [`wire::STOP`].
fn read_request(s: &mut UnixStream) -> io::Result<Option<(StageRequest, Vec<u8>)>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    match wire::read_frame(s)? {
        Some((wire::STOP, _)) => Ok(None),
        Some((wire::RUN, json)) => {
            let req: StageRequest = serde_json::from_slice(&json).map_err(|_| bad("not a stage request"))?;
            match wire::read_frame(s)? {
                Some((wire::SCRIPT, script)) => Ok(Some((req, script))),
                _ => Err(bad("no script")),
            }
        }
        _ => Err(bad("unknown request")),
    }
}

/// The stage's cancel source in the keeper: `run` (anything it sends after the request, or its
/// end), `cleanup` arriving meanwhile, or a signal to the keeper.
struct Relay<'a> {
    client: &'a UnixStream,
    listener: &'a UnixListener,
    terminated: &'a AtomicBool,
    cancel: bool,
    stop: bool,
    /// When the last heartbeat went out, once the script runs.
    beat: Option<Instant>,
}

impl Relay<'_> {
    /// Tells `run` something; a `run` that is gone is noticed by [`StageControl::cancelled`].
    fn say(&mut self, kind: u8) {
        let _ = wire::write_frame(&mut &*self.client, kind, b"");
        self.beat = Some(Instant::now());
    }
}

impl StageControl for Relay<'_> {
    fn cancelled(&mut self) -> bool {
        if self.cancel {
            return true;
        }
        let mut buf = [0u8; 64];
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                self.client.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let would_block = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if !would_block {
            // A cancel, `run` gone (0), or its socket broken.
            self.cancel = true;
        }
        if self.terminated.load(Ordering::SeqCst) {
            self.cancel = true;
            self.stop = true;
        }
        if let Ok((mut other, _)) = self.listener.accept() {
            if peer_is_us(&other) && other.set_nonblocking(false).is_ok() {
                let _ = other.set_read_timeout(Some(Duration::from_millis(500)));
                match wire::read_frame(&mut other) {
                    Ok(Some((wire::STOP, _))) => {
                        self.cancel = true;
                        self.stop = true;
                    }
                    Ok(Some((wire::RUN, _))) => {
                        let _ = wire::write_frame(&mut other, wire::BUSY, b"");
                    }
                    _ => {}
                }
            }
        }
        self.cancel
    }

    fn started(&mut self) {
        self.say(wire::STARTED);
    }

    fn tick(&mut self) {
        if self.beat.is_some_and(|b| b.elapsed() >= wire::HEARTBEAT_INTERVAL) {
            self.say(wire::HEARTBEAT);
        }
    }

    fn wake_fds(&self) -> Vec<std::os::fd::RawFd> {
        if self.cancel {
            Vec::new()
        } else {
            vec![self.client.as_raw_fd(), self.listener.as_raw_fd()]
        }
    }
}
