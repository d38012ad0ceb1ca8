//! The shell commands a stage runs through on the instance: the wrapper that stores the script
//! arriving on its channel's stdin and runs it in its own process group, and the canceller that
//! stops that group. Kept apart from the SSH session code so each can be read (and tested with
//! a local `sh`) on its own.

use super::{sh_quote, StageHooks, CANCEL_GRACE_TENTHS};

/// The byte the wrapper writes on stdout once the script is stored whole, before anything of
/// the script runs; it is not part of the job's output.
pub(super) const STORED: u8 = b'+';

/// The private directory of one stage's script, as a shell expression: a name made of a
/// random `token` in the instance's temporary directory, so that a canceller given the token
/// finds it (a token, not a path, is what crosses the session keeper's socket).
pub(super) fn script_dir(token: u128) -> String {
    format!("\"${{TMPDIR:-/tmp}}/aliyun-spot.{token:032x}\"")
}

/// The command that stores the script arriving on its stdin in `dir` and runs it in its own
/// session and process group, all in one channel.
///
/// The directory is made with `mkdir` (which fails rather than reuse anything already there)
/// under umask 077, the script is read from the channel's stdin with `cat`, and its size is
/// checked against `len`, so a connection cut during the upload never runs half a script.
/// Only then does the wrapper write [`STORED`] and start the script with stdin from
/// `/dev/null`: the job never reads its own script. `setsid -w` makes the script a session
/// (and process group) leader; it writes its own pid — the group id — to `pgid` before
/// `exec`ing the interpreter, so a canceller can signal the whole group. A canceller that came
/// before the script started leaves `cancel`, and the script does not start. The wrapper
/// waits, removes the directory and exits with the script's status.
pub(super) fn wrapper_command(dir: &str, len: usize, interpreter: &str, hooks: &StageHooks) -> String {
    let before = if hooks.before.is_empty() { String::new() } else { format!("{}; ", hooks.before) };
    let after = if hooks.after.is_empty() { String::new() } else { format!("{}; ", hooks.after) };
    format!(
        "d={dir}; (umask 077 && mkdir \"$d\") || exit 1; \
         (umask 077 && cat > \"$d/script\" && chmod 700 \"$d/script\") && [ \"$(wc -c < \"$d/script\")\" -eq {len} ] \
         || {{ rm -rf \"$d\"; echo 'the stage script did not arrive whole' >&2; exit 1; }}; \
         [ -e \"$d/cancel\" ] && {{ rm -rf \"$d\"; exit 1; }}; printf '{stored}'; \
         {before}setsid -w sh -c 'echo $$ > \"$1/pgid\"; exec \"$2\" \"$1/script\"' sh \"$d\" {i} </dev/null & \
         wait $!; rc=$?; rm -rf \"$d\"; {after}exit $rc",
        stored = STORED as char,
        i = sh_quote(interpreter)
    )
}

/// The command that terminates the script's process group: TERM, then KILL after the grace.
///
/// It waits a few seconds for the group id to be written; while it waits it leaves `cancel` in
/// the directory, so a script that has not started yet never starts. A directory that does not
/// appear within two seconds means the script is over (or never came).
pub(super) fn kill_command(dir: &str) -> String {
    format!(
        "d={dir}; i=0; while [ ! -s \"$d/pgid\" ]; do \
         if [ -d \"$d\" ]; then : > \"$d/cancel\" 2>/dev/null; elif [ $i -ge 20 ]; then exit 0; fi; \
         [ $i -ge 50 ] && exit 0; sleep 0.1; i=$((i+1)); done; p=$(cat \"$d/pgid\") || exit 0; \
         kill -TERM -- -\"$p\" 2>/dev/null || exit 0; i=0; \
         while [ $i -lt {grace} ]; do kill -0 -- -\"$p\" 2>/dev/null || exit 0; sleep 0.1; i=$((i+1)); done; \
         kill -KILL -- -\"$p\" 2>/dev/null; exit 0",
        grace = CANCEL_GRACE_TENTHS
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};
    use std::thread;
    use std::time::Duration;

    /// Runs a wrapper with `sh` here, its temporary directory in `tmp`, feeding it `stdin`.
    fn wrapper_here(tmp: &std::path::Path, len: usize, stdin: &[u8]) -> (i32, String, String, String) {
        let dir = script_dir(rand::random());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(wrapper_command(&dir, len, "sh", &StageHooks::default()))
            .env("TMPDIR", tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), s(&out.stdout), s(&out.stderr), dir)
    }

    #[test]
    fn the_wrapper_runs_a_whole_script_without_its_stdin_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let script =
            b"read line && echo \"read: $line\"; echo \"mode $(stat -c %a \"$(dirname \"$0\")\")\"; exit 7\n";
        let (status, out, err, _) = wrapper_here(tmp.path(), script.len(), script);
        assert_eq!((status, err.as_str()), (7, ""));
        assert_eq!(out, "+mode 700\n", "the stored marker, then the script's output; stdin is /dev/null");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "the directory is removed");
    }

    #[test]
    fn the_wrapper_never_runs_half_a_script() {
        let tmp = tempfile::tempdir().unwrap();
        let script = b"echo first half\n";
        // The connection was cut after these bytes: the rest never came.
        let (status, out, err, _) = wrapper_here(tmp.path(), script.len() + 20, script);
        assert_eq!(status, 1);
        assert_eq!(out, "", "no marker, nothing ran");
        assert_eq!(err, "the stage script did not arrive whole\n");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "the directory is removed");
    }

    #[test]
    fn a_cancel_before_the_script_starts_keeps_it_from_starting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = script_dir(rand::random());
        let script = b"echo ran\n";
        let mut wrapper = Command::new("sh")
            .arg("-c")
            .arg(wrapper_command(&dir, script.len(), "sh", &StageHooks::default()))
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The wrapper made its directory and waits for the script; the canceller comes now.
        while std::fs::read_dir(tmp.path()).unwrap().count() == 0 {
            thread::sleep(Duration::from_millis(10));
        }
        let mut killer =
            Command::new("sh").arg("-c").arg(kill_command(&dir)).env("TMPDIR", tmp.path()).spawn().unwrap();
        let made = std::fs::read_dir(tmp.path()).unwrap().next().unwrap().unwrap().path();
        while !made.join("cancel").exists() {
            thread::sleep(Duration::from_millis(10));
        }
        wrapper.stdin.take().unwrap().write_all(script).unwrap();
        let out = wrapper.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "the script never started");
        assert!(killer.wait().unwrap().success());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "the directory is removed");
    }
}
