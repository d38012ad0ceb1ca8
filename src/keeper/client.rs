//! `run`'s side of the keeper: one stage over the kept session.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::connect;
use super::wire::{self, StageReport, StageRequest};
use crate::ssh::{
    finish_over_new_connection, new_script_token, RunOptions, RunOutcome, SshError, SshTarget, StageEnd,
};

/// How long after a cancel `run` waits for the keeper's report before it gives up on it: the
/// canceller's grace and the keeper's own bound (connect timeout + grace + 10 s), with room.
const CANCEL_REPORT_MARGIN: Duration = Duration::from_secs(20);

/// Runs one stage through the keeper of `job_dir`, with the same semantics as
/// [`crate::ssh::run_script_with`] (`t` is used only to stop the script over a connection of
/// its own, should the session or the keeper be lost mid-stage).
///
/// `None` when there is no keeper to run it, or it did not accept the stage: nothing ran, and
/// the caller connects directly.
#[allow(clippy::too_many_arguments)]
pub fn run_stage(
    job_dir: &Path,
    t: &SshTarget,
    script: &[u8],
    interpreter: &str,
    options: &RunOptions,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    cancel: &AtomicBool,
) -> Option<Result<RunOutcome, SshError>> {
    if script.len() > wire::MAX_FRAME {
        return None;
    }
    let mut s = match connect(job_dir) {
        Ok(Some(s)) => s,
        Ok(None) => return None,
        Err(e) => {
            log::warn!("{e:#}");
            return None;
        }
    };
    let token = new_script_token();
    let request = StageRequest {
        token: format!("{token:032x}"),
        interpreter: interpreter.to_string(),
        before: options.hooks.before.clone(),
        after: options.hooks.after.clone(),
        keepalive_interval_secs: options.keepalive.interval.as_secs(),
        keepalive_count_max: options.keepalive.count_max,
    };
    let json = serde_json::to_vec(&request).ok()?;
    // Until the keeper accepts, nothing has run, and a keeper that is gone (or busy) means
    // "connect directly". One that does not read the request in time hangs: it has accepted
    // nothing, and once killed it never will.
    let keeper = super::peer_cred(&s).map(|c| c.pid).unwrap_or(0);
    let accept_by = Instant::now() + t.connect_timeout + Duration::from_secs(10);
    let _ = s.set_write_timeout(Some(accept_by.saturating_duration_since(Instant::now())));
    let sent = wire::write_frame(&mut s, wire::RUN, &json)
        .and_then(|()| wire::write_frame(&mut s, wire::SCRIPT, script));
    if let Err(e) = sent {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            log::warn!("the session keeper of this job does not answer; stopping it");
            stop_hung(keeper);
        }
        return None;
    }
    let _ = s.set_write_timeout(None);
    match read_within(&mut s, Some(cancel), accept_by) {
        Read::Frame(wire::ACCEPTED, _) => {}
        Read::Cancelled => return Some(Ok(RunOutcome { exit_status: None, signal: None, cancelled: true })),
        Read::TimedOut => {
            // A hung keeper: once it is dead, what it said before tells whether it started.
            log::warn!("the session keeper of this job does not answer; stopping it");
            stop_hung(keeper);
            match read_within(&mut s, None, Instant::now() + Duration::from_secs(5)) {
                Read::Frame(wire::ACCEPTED, _) => {}
                _ => return None,
            }
        }
        _ => return None,
    }
    log::debug!("stage over the kept session to {}", t.addr());
    let end = relay(&mut s, keeper, t, stdout, stderr, cancel);
    if end.not_started {
        // The kept session had died unnoticed: nothing ran, so a connection of our own may.
        log::debug!("the kept session could not start the stage: {:?}", end.result);
        return None;
    }
    Some(finish_over_new_connection(t, token, end))
}

/// What came from the keeper.
enum Read {
    Frame(u8, Vec<u8>),
    /// The keeper's end: it exited or was killed.
    Gone,
    Cancelled,
    TimedOut,
}

/// Waits for the next frame until `until`, waking for `cancel` when given (a signal interrupts
/// the wait).
fn read_within(s: &mut UnixStream, cancel: Option<&AtomicBool>, until: Instant) -> Read {
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Read::Cancelled;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Read::TimedOut;
        }
        let wait = left.min(Duration::from_millis(500));
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; poll only writes its `revents`.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().max(1) as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        return match wire::read_frame(s) {
            Ok(Some((kind, payload))) => Read::Frame(kind, payload),
            Ok(None) | Err(_) => Read::Gone,
        };
    }
}

/// Kills a keeper that stopped answering (its pid from `SO_PEERCRED`, a process of this user),
/// so that it can neither go on with the stage nor outlive the job.
fn stop_hung(pid: libc::pid_t) {
    if pid > 0 {
        // SAFETY: plain syscall; the pid is the live peer of our connection.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Relays the stage's output until the keeper's report, sending a cancel when `cancel` is set.
///
/// The keeper says when the script starts and then sends a heartbeat every
/// [`wire::HEARTBEAT_INTERVAL`]; silence past [`wire::HEARTBEAT_LIMIT`] (or the connect timeout
/// and 5 s, when longer; before the start: past its own bound on storing the script) means it
/// hangs, and it is killed: the stage then ends as
/// with a keeper that died, after what it had sent is relayed.
fn relay(
    s: &mut UnixStream,
    keeper: libc::pid_t,
    t: &SshTarget,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    cancel: &AtomicBool,
) -> StageEnd {
    let setup_limit = t.connect_timeout.max(Duration::from_secs(30)) + Duration::from_secs(10);
    // Starting the canceller is the one step of a running stage that may keep the keeper from
    // its heartbeats, for up to a connect timeout.
    let beat_limit = wire::HEARTBEAT_LIMIT.max(t.connect_timeout + Duration::from_secs(5));
    let mut started = false;
    let mut last = Instant::now();
    let mut hung = false;
    let mut give_up_at: Option<Instant> = None;
    let mut local_error: Option<SshError> = None;
    let lost = |message: &str| StageEnd {
        result: Err(SshError::Lost { addr: t.addr(), message: message.into() }),
        stop_remote: true,
        not_started: false,
    };
    loop {
        let alive_until = last + if started || hung { beat_limit } else { setup_limit };
        let until = give_up_at.map_or(alive_until, |g| g.min(alive_until));
        let asking = if give_up_at.is_none() { Some(cancel) } else { None };
        let frame = match read_within(s, asking, until) {
            Read::Cancelled => {
                let _ = wire::write_frame(s, wire::CANCEL, b"");
                give_up_at = Some(Instant::now() + t.connect_timeout + CANCEL_REPORT_MARGIN);
                continue;
            }
            Read::TimedOut if give_up_at.is_some_and(|g| Instant::now() >= g) => {
                return StageEnd {
                    result: Ok(RunOutcome { exit_status: None, signal: None, cancelled: true }),
                    stop_remote: true,
                    not_started: false,
                }
            }
            Read::TimedOut if hung => return lost("the session keeper stopped answering during the stage"),
            Read::TimedOut => {
                log::warn!("the session keeper of this job does not answer; stopping it");
                stop_hung(keeper);
                hung = true;
                last = Instant::now();
                continue;
            }
            Read::Gone if hung => return lost("the session keeper stopped answering during the stage"),
            Read::Gone => return lost("the session keeper stopped during the stage"),
            Read::Frame(kind, payload) => {
                last = Instant::now();
                (kind, payload)
            }
        };
        match frame {
            (wire::STARTED, _) => started = true,
            (wire::STDOUT, data) => deliver(stdout, &data, t, &mut local_error, s),
            (wire::STDERR, data) => deliver(stderr, &data, t, &mut local_error, s),
            (wire::DONE, json) => {
                let report: Option<StageReport> = serde_json::from_slice(&json).ok();
                let (result, stop_remote, not_started) = match report {
                    Some(r) => {
                        let (stop, not_started) = (r.stop_remote, r.not_started);
                        (r.result(), stop, not_started)
                    }
                    None => (
                        Err(SshError::Lost {
                            addr: t.addr(),
                            message: "the session keeper's report is unreadable".into(),
                        }),
                        true,
                        false,
                    ),
                };
                return match local_error {
                    Some(e) => StageEnd { result: Err(e), stop_remote, not_started: false },
                    None => StageEnd { result, stop_remote, not_started },
                };
            }
            _ => {}
        }
    }
}

/// Writes output to the job log as it comes, flushing each chunk; a failed write (other than a
/// closed pipe: the script still runs to its end then) cancels the stage, as it does on a
/// direct connection.
fn deliver(
    sink: &mut dyn Write,
    data: &[u8],
    t: &SshTarget,
    error: &mut Option<SshError>,
    s: &mut UnixStream,
) {
    if error.is_some() {
        return;
    }
    if let Err(e) = crate::ssh::deliver(sink, data, &t.addr()) {
        *error = Some(e);
        let _ = wire::write_frame(s, wire::CANCEL, b"");
    }
}
