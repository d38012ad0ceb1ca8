//! `aliyun-spot` with a stdout nobody reads (`aliyun-spot prices | head -1`): the command ends
//! quietly with exit status 141 (`aliyun_spot_executor::exit::STDOUT_CLOSED_EXIT_CODE`), never
//! with Rust's "failed printing to stdout" panic (exit status 101).

use std::process::{Command, Stdio};

use aliyun_spot_executor::exit::STDOUT_CLOSED_EXIT_CODE;

use crate::executor::World;

#[test]
fn admin_commands_end_quietly_when_the_reader_of_stdout_is_gone() {
    assert_eq!(STDOUT_CLOSED_EXIT_CODE, 141, "the status README.md documents");
    let w = World::new();
    let config = w.config.display().to_string();
    for args in [
        &["prices"][..],
        &["prices", "--json"],
        &["instances"],
        &["instances", "--json"],
        &["sweep", "--dry-run"],
        &["sweep"],
        &["doctor"],
    ] {
        // The reader end is closed before the command starts, so its first line already meets
        // a closed pipe (as the second line meets one after `head -1` has exited).
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
            .args(["--config", &config])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", w.dir.path())
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("aliyun-spot runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(STDOUT_CLOSED_EXIT_CODE),
            "aliyun-spot {args:?}: stderr: {stderr}"
        );
        assert_eq!(stderr, "", "aliyun-spot {args:?} ends quietly");
    }
}
