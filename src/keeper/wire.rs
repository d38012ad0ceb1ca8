//! The keeper's socket protocol: frames of one kind byte, a big-endian `u32` length and that
//! many bytes. Requests and the final report are JSON; script and output are raw bytes.
//!
//! A stage, as `run` asks for it: `RUN` (a [`StageRequest`]), `SCRIPT` (the script), then the
//! keeper answers `ACCEPTED` just before it opens the channel, relays `STDOUT` / `STDERR` as the
//! script writes, and ends with `DONE` (a [`StageReport`]). Anything `run` sends after the
//! request means "cancel" (it sends `CANCEL`), and so does `run` going away. `cleanup` sends
//! `STOP`. A keeper already running a stage answers a second `RUN` with `BUSY`. Once the
//! script runs (`STARTED`), the keeper sends a `HEARTBEAT` every [`HEARTBEAT_INTERVAL`], so that
//! `run` can tell a hung keeper from a quiet script.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

use crate::ssh::{RunOutcome, SshError, StageEnd};

/// `run` → keeper: run a stage ([`StageRequest`] JSON).
pub const RUN: u8 = b'R';
/// `run` → keeper: the stage script, right after [`RUN`].
pub const SCRIPT: u8 = b'S';
/// `run` → keeper: cancel the running stage.
pub const CANCEL: u8 = b'C';
/// `cleanup` → keeper: exit now.
pub const STOP: u8 = b'Q';
/// keeper → `run`: the stage is about to start; from here on it may have run.
pub const ACCEPTED: u8 = b'A';
/// keeper → `run`: script output.
pub const STDOUT: u8 = b'O';
/// keeper → `run`: script error output.
pub const STDERR: u8 = b'E';
/// keeper → `run`: the stage is over ([`StageReport`] JSON).
pub const DONE: u8 = b'D';
/// keeper → `run`: another stage is running; connect directly.
pub const BUSY: u8 = b'B';
/// keeper → `run`: the script is stored whole and runs.
pub const STARTED: u8 = b'T';
/// keeper → `run`: still here ([`HEARTBEAT_INTERVAL`] apart while a script runs).
pub const HEARTBEAT: u8 = b'H';

/// How often the keeper says it is still there while a script runs.
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Silence from the keeper after which `run` takes it for hung, once the script has started.
pub const HEARTBEAT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest frame accepted: a stage script of gitlab-runner's can be megabytes (every job
/// variable is in it), never this much.
pub const MAX_FRAME: usize = 64 << 20;

/// What `run` asks the keeper to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRequest {
    /// The script directory's token ([`crate::ssh::new_script_token`]), hex, so that `run` can
    /// stop the script itself should the keeper die.
    pub token: String,
    /// The shell the script runs with.
    pub interpreter: String,
    /// Shell run before the script (the watchdog's markers).
    pub before: String,
    /// Shell run after it.
    pub after: String,
    /// `ssh.keepalive_interval`, seconds.
    pub keepalive_interval_secs: u64,
    /// `ssh.keepalive_count_max`.
    pub keepalive_count_max: u32,
}

/// How a stage ended, as the keeper reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageReport {
    /// The outcome, when there is one.
    pub outcome: Option<Outcome>,
    /// Why there is none: `lost` or `io`, the address and the message.
    pub error: Option<(String, String, String)>,
    /// The script's processes still need stopping over a new connection.
    pub stop_remote: bool,
    /// Nothing ran ([`crate::ssh::StageEnd::not_started`]): `run` may connect on its own.
    #[serde(default)]
    pub not_started: bool,
}

/// [`RunOutcome`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// See [`RunOutcome::exit_status`].
    pub exit_status: Option<i32>,
    /// See [`RunOutcome::signal`].
    pub signal: Option<String>,
    /// See [`RunOutcome::cancelled`].
    pub cancelled: bool,
}

impl StageReport {
    /// The report of a stage's end.
    pub fn new(end: &StageEnd) -> StageReport {
        let (result, stop_remote, not_started) = (&end.result, end.stop_remote, end.not_started);
        match result {
            Ok(o) => StageReport {
                outcome: Some(Outcome {
                    exit_status: o.exit_status,
                    signal: o.signal.clone(),
                    cancelled: o.cancelled,
                }),
                error: None,
                stop_remote,
                not_started,
            },
            Err(e) => {
                let (kind, addr, message) = match e {
                    SshError::Io { addr, message } => ("io", addr.clone(), message.clone()),
                    SshError::Lost { addr, message } => ("lost", addr.clone(), message.clone()),
                    other => ("lost", String::new(), other.to_string()),
                };
                StageReport {
                    outcome: None,
                    error: Some((kind.into(), addr, message)),
                    stop_remote,
                    not_started,
                }
            }
        }
    }

    /// The stage's result again.
    pub fn result(self) -> Result<RunOutcome, SshError> {
        match (self.outcome, self.error) {
            (Some(o), _) => {
                Ok(RunOutcome { exit_status: o.exit_status, signal: o.signal, cancelled: o.cancelled })
            }
            (None, Some((kind, addr, message))) if kind == "io" => Err(SshError::Io { addr, message }),
            (None, Some((_, addr, message))) => Err(SshError::Lost { addr, message }),
            (None, None) => {
                Err(SshError::Lost { addr: String::new(), message: "the keeper reported nothing".into() })
            }
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is too long"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

/// A writer that sends everything written to it as frames of one kind (a stage's output).
pub struct FrameWriter<W: Write> {
    /// Where the frames go.
    pub inner: W,
    /// [`STDOUT`] or [`STDERR`].
    pub kind: u8,
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_frame(&mut self.inner, self.kind, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_short_one_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"hello\n").unwrap();
        write_frame(&mut buf, DONE, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((STDOUT, b"hello\n".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((DONE, Vec::new())));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let mut cut = &buf[..8];
        assert_eq!(read_frame(&mut cut).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let mut huge = &[RUN, 0xff, 0xff, 0xff, 0xff][..];
        assert_eq!(read_frame(&mut huge).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn reports_carry_outcomes_and_errors() {
        let ok = RunOutcome { exit_status: Some(3), signal: None, cancelled: false };
        let end = StageEnd { result: Ok(ok.clone()), stop_remote: false, not_started: false };
        assert_eq!(StageReport::new(&end).result().unwrap(), ok);
        let lost =
            Err(SshError::Lost { addr: "10.0.0.1:22".into(), message: "reading output: reset".into() });
        let back = StageReport::new(&StageEnd { result: lost, stop_remote: true, not_started: false });
        assert!(back.stop_remote && !back.not_started);
        assert_eq!(
            back.result().unwrap_err().to_string(),
            "SSH connection to 10.0.0.1:22 was lost: reading output: reset"
        );
    }
}
