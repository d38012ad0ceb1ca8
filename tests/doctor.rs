//! `aliyun-spot doctor` against the emulator: every check, and a clear FAIL line per mistake.

use std::process::Command;
use std::time::Duration;

use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions};

fn doctor(config_text: &str) -> (Option<i32>, String, Emulator, tempfile::TempDir) {
    let emu = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        boot_delay: Duration::from_millis(200),
        ..EmulatorOptions::default()
    })
    .unwrap();
    let dir = crate::private_tempdir();
    let text = aliyun_spot_executor::demo::config_for(config_text, &emu.endpoint(), dir.path()).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .args(["--config", config.to_str().unwrap(), "doctor"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), all, emu, dir)
}

#[test]
fn doctor_passes_on_a_good_configuration_and_creates_nothing() {
    let (code, out, emu, _dir) = doctor(aliyun_spot_executor::demo::EMULATOR_TOML);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "ok    credentials and region: ",
        "ok    amd64 image: ubuntu_24_04_x64_20G_alibase_20250101.vhd",
        "ok    security group: sg-bp1emulator0000000001",
        "ok    RunInstances (DryRun): allowed",
        "ok    watchdog role (STS AssumeRole): assumed (STS.",
        "RAM policy for the runner's identity:\n{\n",
        "\"Resource\": \"acs:ram::1234567890123456:role/ci-spot-self-destruct\"",
        "Trust policy of the watchdog role (self_destruct.role_arn):\n",
        "all checks passed",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    assert!(emu.instances().is_empty(), "doctor created an instance");
    let dry = emu
        .requests()
        .into_iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .collect::<Vec<_>>();
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].code.as_deref(), Some("DryRunOperation"));
}

#[test]
fn doctor_names_a_wrong_image_and_security_group() {
    let text = aliyun_spot_executor::demo::EMULATOR_TOML
        .replace("ubuntu_24_04_x64_20G_alibase_20250101.vhd", "m-doesnotexist")
        .replace("sg-bp1emulator0000000001", "sg-doesnotexist");
    let (code, out, emu, _dir) = doctor(&text);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("FAIL  amd64 image: image `m-doesnotexist` not found in cn-hangzhou"), "{out}");
    assert!(out.contains("FAIL  security group: security group `sg-doesnotexist` not found"), "{out}");
    assert!(out.contains("check(s) failed"), "{out}");
    assert!(emu.instances().is_empty());
}
