//! `aliyun-spot demo` end to end, as the README's first command runs it.

use std::process::Command;

#[test]
fn demo_runs_a_job_on_an_emulated_spot_instance_and_leaves_nothing() {
    let home = crate::private_tempdir();
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .arg("demo")
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in [
        "======== job log ========",
        "Hello from ",
        "building step 3",
        "after_script: job status success",
        "Released instance i-",
        "instances created: 1, still running: 0",
        "demo passed: the job ran on a spot instance that no longer exists",
    ] {
        assert!(stdout.contains(line), "missing `{line}` in:\n{stdout}\nstderr:\n{stderr}");
    }
    assert!(stdout.contains("Created spot instance i-"), "{stdout}");
}
