//! One stage script on an open session: store it, run it, stream its output, stop it on cancel.
//!
//! The loop here runs the same way for `run`'s own connection ([`run_script_with`]) and for the
//! per-job session keeper ([`crate::keeper`]), which holds the session across the stage
//! processes and relays the stage to `run` over a Unix socket. What differs is only who asks
//! for a cancel and who receives the output ([`StageControl`], the two writers), so the rules
//! (what counts as lost, how a cancel stops the remote processes, when the exit status is read)
//! have one owner.

use std::io::{self, Read, Write};
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::script::{script_dir, wrapper_command, STORED};
use super::{
    connect, drive, is_eagain, kill_remote, msg, silent_for, start_canceller, wait_socket_or, write_all_by,
    Connection, Keepalive, RunOutcome, SshError, SshTarget, CANCEL_GRACE_TENTHS, MAX_QUIET_WAIT,
};

/// How [`run_script_with`] runs a stage script.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Commands around the script.
    pub hooks: StageHooks,
    /// When a silent server counts as gone.
    pub keepalive: Keepalive,
}

/// Shell commands run on the instance around a stage script (by the wrapper shell, whose pid
/// is `$$`), e.g. the markers the self-destruct watchdog reads. They must not fail the stage.
#[derive(Debug, Clone, Default)]
pub struct StageHooks {
    /// Runs before the script starts.
    pub before: String,
    /// Runs after it ends, before the wrapper exits with the script's status.
    pub after: String,
}

/// Who may cancel a running stage, and what should wake the loop's waits to ask again.
pub trait StageControl {
    /// Whether the stage is to be cancelled; asked on every turn of the loop.
    fn cancelled(&mut self) -> bool;
    /// Descriptors whose readability should end a wait at once (e.g. a socket a cancel
    /// request arrives on). A signal interrupts the wait anyway.
    fn wake_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// The script is stored whole and starts now.
    fn started(&mut self) {}
    /// Called on every turn of the loop (at least every half second while the script runs).
    fn tick(&mut self) {}
}

impl StageControl for &AtomicBool {
    fn cancelled(&mut self) -> bool {
        self.load(Ordering::SeqCst)
    }
}

/// How the loop ended, and whether the script's processes still need stopping over a new
/// connection (the session was lost, or the canceller could not be started on it). Only a
/// holder of the private key can do that, so the loop leaves it to the caller
/// ([`finish_over_new_connection`]).
#[derive(Debug)]
pub struct StageEnd {
    /// The outcome, or why there is none.
    pub result: Result<RunOutcome, SshError>,
    /// Stop the script's process group over a new connection.
    pub stop_remote: bool,
    /// Nothing of the stage reached the instance but a command with no script to run: the
    /// channel could not be opened, or its command not started. Running the stage again over
    /// another connection is safe.
    pub not_started: bool,
}

/// A new random name for one stage's script directory on the instance.
pub fn new_script_token() -> u128 {
    rand::random::<u128>()
}

/// Runs one stage script on the instance and streams its output.
///
/// The script is stored in a private temporary directory (never fed to the job's stdin), run
/// as `<interpreter> <file> </dev/null` in its own process group, and its stdout and stderr are
/// copied to `stdout` / `stderr` as they arrive, flushing after every chunk. When `cancel`
/// becomes true the remote process group is sent TERM and, after a short grace, KILL; the
/// outcome then has `cancelled: true`. A connection that breaks before the exit status arrives
/// is [`SshError::Lost`].
pub fn run_script(
    t: &SshTarget,
    script: &[u8],
    interpreter: &str,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    cancel: &AtomicBool,
) -> Result<RunOutcome, SshError> {
    run_script_with(t, script, interpreter, &RunOptions::default(), stdout, stderr, cancel)
}

/// [`run_script`] with [`StageHooks`] around the script and the given [`Keepalive`], over a
/// connection of its own.
///
/// When the server stays silent past [`Keepalive::silence_limit`], the connection is
/// [`SshError::Lost`] and stopping the script's processes is attempted over a new connection
/// (bounded by the connect timeout); the error says whether that worked.
pub fn run_script_with(
    t: &SshTarget,
    script: &[u8],
    interpreter: &str,
    options: &RunOptions,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    cancel: &AtomicBool,
) -> Result<RunOutcome, SshError> {
    let c = connect(t, t.connect_timeout)?;
    if cancel.load(Ordering::SeqCst) {
        return Ok(RunOutcome { exit_status: None, signal: None, cancelled: true });
    }
    let token = new_script_token();
    let mut control = cancel;
    let end = run_on(&c, token, script, interpreter, options, stdout, stderr, &mut control);
    if end.result.is_ok() && !end.stop_remote {
        c.session.set_blocking(true);
        c.session.set_timeout(2000);
        let _ = c.session.disconnect(None, "done", None);
    }
    finish_over_new_connection(t, token, end)
}

/// Completes a [`StageEnd`]: when the script's processes still need stopping, stops them over
/// a new connection and says so in the error (a lost session) or in the log (a cancel).
pub fn finish_over_new_connection(t: &SshTarget, token: u128, end: StageEnd) -> Result<RunOutcome, SshError> {
    if !end.stop_remote {
        return end.result;
    }
    let stopped = kill_remote(t, &script_dir(token));
    match end.result {
        Err(SshError::Lost { addr, message }) => {
            let stopped = match stopped {
                Ok(()) => "stopped the script's processes over a new connection".to_string(),
                Err(e) => format!("stopping the script's processes failed too ({e})"),
            };
            Err(SshError::Lost { addr, message: format!("{message}; {stopped}") })
        }
        other => {
            if let Err(e) = stopped {
                log::warn!("stopping the remote script failed: {e}");
            }
            other
        }
    }
}

/// Reads what one stream has ready into `buf`; 0 when nothing is.
fn read_some(stream: &mut ssh2::Stream, buf: &mut [u8], addr: &str) -> Result<usize, SshError> {
    match stream.read(buf) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(SshError::Lost { addr: addr.to_string(), message: format!("reading output: {e}") }),
    }
}

/// Writes `data` to `sink` and flushes it, so the job log shows it at once.
pub(crate) fn deliver(sink: &mut dyn Write, data: &[u8], addr: &str) -> Result<(), SshError> {
    if data.is_empty() {
        return Ok(());
    }
    match sink.write_all(data).and_then(|()| sink.flush()) {
        Ok(()) => Ok(()),
        // Nobody reads the job log any more (a closed pipe): the script still runs to its end,
        // so its status decides the stage and nothing is left behind.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(SshError::Io { addr: addr.to_string(), message: format!("writing output: {e}") }),
    }
}

/// Runs one stage on the open connection `c`, in the script directory named by `token`.
///
/// A cancel starts the canceller ([`super::script::kill_command`]) in a second channel of the
/// same session, so it needs no key and no new handshake; the script's channel is read on
/// meanwhile, so a script flooding output cannot hold the cancel up.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_on(
    c: &Connection,
    token: u128,
    script: &[u8],
    interpreter: &str,
    options: &RunOptions,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    control: &mut dyn StageControl,
) -> StageEnd {
    let addr = c.addr.clone();
    let lost = |what: &str, e: &ssh2::Error| SshError::Lost {
        addr: addr.clone(),
        message: format!("{what}: {}", msg(e)),
    };
    let failed = |error| StageEnd { result: Err(error), stop_remote: false, not_started: false };
    let not_started = |error| StageEnd { result: Err(error), stop_remote: false, not_started: true };
    let dir = script_dir(token);
    let connect_timeout = Duration::from_millis(u64::from(c.session.timeout().max(100)));
    // The steps before the script runs may take longer than a connect (a large script).
    let setup_deadline = Instant::now() + connect_timeout.max(Duration::from_secs(30));
    c.session.set_blocking(false);
    let step = |f: &mut dyn FnMut() -> Result<(), ssh2::Error>| drive(&c.session, c.fd, setup_deadline, f);
    // One channel both stores the script (on its stdin) and runs it (`wrapper_command`).
    let command = wrapper_command(&dir, script.len(), interpreter, &options.hooks);
    let mut ch = match drive(&c.session, c.fd, setup_deadline, || c.session.channel_session()) {
        Ok(ch) => ch,
        Err(e) => return not_started(lost("opening a channel", &e)),
    };
    // A wrapper started here without its script never runs one: it gets fewer bytes than it
    // was told (none).
    if let Err(e) = step(&mut || ch.exec(&command)) {
        return not_started(lost("starting the script", &e));
    }
    if let Err(e) = write_all_by(c, &mut ch, script, setup_deadline) {
        return failed(SshError::Lost { addr: addr.clone(), message: format!("uploading the script: {e}") });
    }
    if let Err(e) = step(&mut || ch.send_eof()) {
        return failed(lost("closing stdin", &e));
    }

    // Keepalives only from here on, while the script runs: the steps above have their own
    // deadline. `want_reply`: a live sshd answers every keepalive, so its silence means it is
    // gone.
    c.session.set_keepalive(true, options.keepalive.interval_secs());
    let silence_limit = options.keepalive.silence_limit();
    let mut out_stream = ch.stream(0);
    let mut err_stream = ch.stderr();
    let mut buf = vec![0u8; 32 * 1024];
    let mut canceller: Option<ssh2::Channel> = None;
    let mut cancel_requested = false;
    let mut give_up_at: Option<Instant> = None;
    let mut stored = false;
    let mut held_err = Vec::new();
    let mut stop_remote = false;

    let result = loop {
        // Checked first on every turn, so a script that floods output can still be cancelled.
        if !cancel_requested && control.cancelled() {
            log::debug!("cancelling the script on {addr}");
            cancel_requested = true;
            give_up_at = Some(
                Instant::now()
                    + connect_timeout
                    + Duration::from_millis(u64::from(CANCEL_GRACE_TENTHS) * 100)
                    + Duration::from_secs(10),
            );
            match start_canceller(c, &dir) {
                Ok(k) => canceller = Some(k),
                Err(e) => {
                    log::debug!("cannot start the canceller on {addr}: {}", msg(&e));
                    stop_remote = true;
                    break Ok(RunOutcome { exit_status: None, signal: None, cancelled: true });
                }
            }
        }
        if give_up_at.is_some_and(|g| Instant::now() >= g) {
            break Ok(RunOutcome { exit_status: None, signal: None, cancelled: true });
        }
        if let Some(k) = canceller.as_mut() {
            // Its output is of no interest; reading it keeps its window open.
            let _ = k.read(&mut buf);
        }
        let n_out = match read_some(&mut out_stream, &mut buf, &addr) {
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if n_out > 0 {
            let mut data = &buf[..n_out];
            if !stored {
                // The first output is the wrapper's [`STORED`]: the script runs from here on,
                // and what came on stderr before it is the script's too.
                stored = true;
                control.started();
                data = data.strip_prefix(&[STORED]).unwrap_or(data);
                if let Err(e) = deliver(stderr, &held_err, &addr) {
                    break Err(e);
                }
                held_err = Vec::new();
            }
            if let Err(e) = deliver(stdout, data, &addr) {
                break Err(e);
            }
        }
        let n_err = match read_some(&mut err_stream, &mut buf, &addr) {
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        if n_err > 0 {
            if stored {
                if let Err(e) = deliver(stderr, &buf[..n_err], &addr) {
                    break Err(e);
                }
            } else if held_err.len() < 64 * 1024 {
                held_err.extend_from_slice(&buf[..n_err]);
            }
        }
        if n_out + n_err > 0 {
            continue;
        }
        if ch.eof() {
            match ch.wait_close() {
                Ok(()) if !stored && cancel_requested => {
                    break Ok(RunOutcome { exit_status: None, signal: None, cancelled: true });
                }
                Ok(()) if !stored => {
                    break Err(SshError::Io {
                        addr: addr.clone(),
                        message: format!(
                            "storing the script on the instance failed (status {}): {}",
                            ch.exit_status().unwrap_or(-1),
                            String::from_utf8_lossy(&held_err).trim()
                        ),
                    });
                }
                Ok(()) => {
                    let signal = ch.exit_signal().ok().and_then(|s| s.exit_signal);
                    let exit_status = match &signal {
                        Some(_) => None,
                        None => ch.exit_status().ok(),
                    };
                    break Ok(RunOutcome { exit_status, signal, cancelled: cancel_requested });
                }
                Err(e) if is_eagain(&e) => {}
                Err(e) => break Err(lost("waiting for the exit status", &e)),
            }
        }
        // Nothing to read: wait on the socket until data comes (output, the exit status) or
        // the next thing falls due: a keepalive, the silence limit, the cancel deadline.
        let mut wait = MAX_QUIET_WAIT;
        match c.session.keepalive_send() {
            Ok(secs) => wait = wait.min(Duration::from_secs(u64::from(secs.max(1)))),
            Err(e) if is_eagain(&e) => {}
            Err(e) => break Err(lost("sending a keepalive", &e)),
        }
        let silent = silent_for(c.fd);
        if !cancel_requested && silent.is_some_and(|s| s >= silence_limit) {
            let k = options.keepalive;
            stop_remote = true;
            break Err(SshError::Lost {
                addr: addr.clone(),
                message: format!(
                    "the server answered none of {} keepalives in {}s (`ssh.keepalive_interval` = {}s, \
                     `ssh.keepalive_count_max` = {})",
                    k.count_max,
                    silence_limit.as_secs(),
                    k.interval_secs(),
                    k.count_max
                ),
            });
        }
        if let Some(s) = silent.filter(|_| !cancel_requested) {
            wait = wait.min(silence_limit - s);
        }
        if let Some(g) = give_up_at {
            wait = wait.min(g.saturating_duration_since(Instant::now()));
        }
        control.tick();
        wait_socket_or(&c.session, c.fd, &control.wake_fds(), wait.max(Duration::from_millis(1)));
    };
    if stored && matches!(result, Err(SshError::Io { .. })) {
        // The output had nowhere to go: the script may still run.
        stop_remote = true;
    }
    if let Some(mut k) = canceller {
        // Its own grace loop ends by itself on the instance; closing our end is all we owe.
        let _ = k.close();
    }
    StageEnd { result, stop_remote, not_started: false }
}
