//! A session kept open across stages: what the per-job session keeper ([`crate::keeper`])
//! holds instead of a private key.

use std::io::{self, Read};
use std::os::unix::io::RawFd;
use std::time::Duration;

use super::stage::{run_on, RunOptions, StageControl, StageEnd};
use super::{connect, drive, is_eagain, silent_for, Connection, Keepalive, SshError, SshTarget};
use std::io::Write;
use std::time::Instant;

/// An authenticated session with the pinned host key, open until dropped.
pub struct KeptSession {
    c: Connection,
    /// A channel that never runs anything: reading it makes libssh2 process what the server
    /// sends while no stage runs (keepalive replies, the server's own keepalives, a close).
    idle: ssh2::Channel,
    keepalive: Keepalive,
}

/// What [`KeptSession::check`] found while no stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The session is up; look again within this long.
    Up(Duration),
    /// The session is gone (closed, reset, or the server silent past the keepalive limit).
    Gone(String),
}

impl KeptSession {
    /// Connects, checks the pinned host key and authenticates, as a stage would. The private
    /// key is used for this and not kept.
    pub fn open(t: &SshTarget, keepalive: Keepalive) -> Result<KeptSession, SshError> {
        let c = connect(t, t.connect_timeout)?;
        let deadline = Instant::now() + t.connect_timeout;
        c.session.set_blocking(false);
        let idle = drive(&c.session, c.fd, deadline, || c.session.channel_session()).map_err(|e| {
            SshError::Lost { addr: c.addr.clone(), message: format!("opening a channel: {e}") }
        })?;
        c.session.set_keepalive(true, keepalive.interval_secs());
        Ok(KeptSession { c, idle, keepalive })
    }

    /// `host:port` of the instance.
    pub fn addr(&self) -> &str {
        &self.c.addr
    }

    /// The session's TCP socket, to wait on.
    pub fn fd(&self) -> RawFd {
        self.c.fd
    }

    /// Runs one stage script in the directory named by `token` (see [`super::run_script_with`];
    /// stopping the script over a new connection, when [`StageEnd::stop_remote`] asks, is the
    /// caller's, who holds the key).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        token: u128,
        script: &[u8],
        interpreter: &str,
        options: &RunOptions,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
        control: &mut dyn StageControl,
    ) -> StageEnd {
        let end = run_on(&self.c, token, script, interpreter, options, stdout, stderr, control);
        self.c.session.set_keepalive(true, self.keepalive.interval_secs());
        end
    }

    /// Processes what the server sent, sends a keepalive when one is due, and says whether the
    /// session is still up. For the time between stages.
    pub fn check(&mut self) -> Health {
        let mut buf = [0u8; 1024];
        match self.idle.read(&mut buf) {
            Ok(0) if self.idle.eof() => return Health::Gone("the server closed the session".into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Health::Gone(format!("reading from the server: {e}")),
        }
        let next = match self.c.session.keepalive_send() {
            Ok(secs) => Duration::from_secs(u64::from(secs.max(1))),
            Err(e) if is_eagain(&e) => Duration::from_secs(1),
            Err(e) => return Health::Gone(format!("sending a keepalive: {e}")),
        };
        let limit = self.keepalive.silence_limit();
        match silent_for(self.c.fd) {
            Some(s) if s >= limit => {
                Health::Gone(format!("the server answered no keepalive in {}s", limit.as_secs()))
            }
            Some(s) => Health::Up(next.min(limit - s)),
            None => Health::Up(next),
        }
    }

    /// Ends the session politely (best effort, bounded by a second).
    pub fn close(self) {
        self.c.session.set_blocking(true);
        self.c.session.set_timeout(1000);
        let _ = self.c.session.disconnect(None, "done", None);
    }
}
