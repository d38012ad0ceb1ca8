//! `run`'s side of the keeper: one stage over the kept session.

use std::io::{self, Write};
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
    wire::write_frame(&mut s, wire::RUN, &json).ok()?;
    wire::write_frame(&mut s, wire::SCRIPT, script).ok()?;
    // Until the keeper accepts, nothing has run, and a keeper that is gone (or busy) means
    // "connect directly".
    match read_within(&mut s, cancel, None) {
        Read::Frame(wire::ACCEPTED, _) => {}
        Read::Cancelled => return Some(Ok(RunOutcome { exit_status: None, signal: None, cancelled: true })),
        _ => return None,
    }
    log::debug!("stage over the kept session to {}", t.addr());
    let end = relay(&mut s, t, stdout, stderr, cancel);
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

/// Waits for the next frame, waking for `cancel` (a signal interrupts the wait); with
/// `cancel` already sent, pass `until` to bound the wait instead.
fn read_within(s: &mut UnixStream, cancel: &AtomicBool, until: Option<Instant>) -> Read {
    loop {
        if until.is_none() && cancel.load(Ordering::SeqCst) {
            return Read::Cancelled;
        }
        let wait = match until {
            Some(u) => {
                let left = u.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Read::TimedOut;
                }
                left.min(Duration::from_millis(500))
            }
            None => Duration::from_millis(500),
        };
        let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; poll only writes its `revents`.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        return match wire::read_frame(s) {
            Ok(Some((kind, payload))) => Read::Frame(kind, payload),
            Ok(None) | Err(_) => Read::Gone,
        };
    }
}

/// Relays the stage's output until the keeper's report, sending a cancel when `cancel` is set.
fn relay(
    s: &mut UnixStream,
    t: &SshTarget,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    cancel: &AtomicBool,
) -> StageEnd {
    let mut give_up_at: Option<Instant> = None;
    let mut local_error: Option<SshError> = None;
    loop {
        let frame = match read_within(s, cancel, give_up_at) {
            Read::Cancelled => {
                let _ = wire::write_frame(s, wire::CANCEL, b"");
                give_up_at = Some(Instant::now() + t.connect_timeout + CANCEL_REPORT_MARGIN);
                continue;
            }
            Read::TimedOut => {
                return StageEnd {
                    result: Ok(RunOutcome { exit_status: None, signal: None, cancelled: true }),
                    stop_remote: true,
                    not_started: false,
                }
            }
            Read::Gone => {
                return StageEnd {
                    result: Err(SshError::Lost {
                        addr: t.addr(),
                        message: "the session keeper stopped during the stage".into(),
                    }),
                    stop_remote: true,
                    not_started: false,
                }
            }
            Read::Frame(kind, payload) => (kind, payload),
        };
        match frame {
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
    match sink.write_all(data).and_then(|()| sink.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            *error = Some(SshError::Io { addr: t.addr(), message: format!("writing output: {e}") });
            let _ = wire::write_frame(s, wire::CANCEL, b"");
        }
    }
}
