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
    let text = crate::emulator_config(config_text, &emu.endpoint(), dir.path());
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

// ---------------------------------------------------------------------------------------------
// doctor --live: one real (here: emulated) instance, end to end, and nothing left behind
// ---------------------------------------------------------------------------------------------

/// An emulator whose sshd starts `ssh_delay` after Running, and a configuration for it with
/// `ssh.boot_timeout` set to `boot_timeout`.
fn live_world(ssh_delay: Duration, boot_timeout: &str) -> (Emulator, tempfile::TempDir, std::path::PathBuf) {
    let emu = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        boot_delay: Duration::from_millis(200),
        ssh_delay,
        ..EmulatorOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = aliyun_spot_executor::demo::config_for(
        aliyun_spot_executor::demo::EMULATOR_TOML,
        &emu.endpoint(),
        dir.path(),
    )
    .unwrap();
    let mut doc: toml::Table = text.parse().unwrap();
    doc["ssh"]
        .as_table_mut()
        .unwrap()
        .insert("boot_timeout".into(), toml::Value::String(boot_timeout.into()));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    (emu, dir, config)
}

fn live_command(config: &std::path::Path, home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"));
    c.args(["--config", config.to_str().unwrap(), "doctor", "--live"])
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home);
    c
}

fn successes(emu: &Emulator, action: &str) -> usize {
    emu.requests().iter().filter(|r| r.action.as_deref() == Some(action) && r.status == 200).count()
}

#[test]
fn doctor_live_creates_logs_in_and_deletes_one_instance() {
    let (emu, dir, config) = live_world(Duration::from_millis(100), "2m");
    let out = live_command(&config, dir.path()).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    // The price comes first, before anything is created.
    assert!(
        lines[0].starts_with(
            "doctor --live creates ONE real spot instance and deletes it: the cheapest fitting offer is "
        ),
        "{all}"
    );
    let records = emu.instances();
    assert_eq!(records.len(), 1, "exactly one instance: {all}");
    let id = &records[0].id;
    let create =
        lines.iter().find(|l| l.starts_with("step  create and boot: ")).unwrap_or_else(|| panic!("{all}"));
    assert!(
        create.contains(&format!("s, {id} ({} in {}, ", records[0].instance_type, records[0].zone)),
        "{all}"
    );
    assert!(create.contains("(RequestId "), "{all}");
    assert!(lines.iter().any(|l| l.starts_with("step  ssh commands: ")), "{all}");
    assert!(lines.iter().any(|l| l.starts_with("ok    Linux ")), "uname -a ran: {all}");
    assert!(lines.iter().any(|l| l.starts_with("ok    git: /")), "{all}");
    assert!(
        lines.iter().any(|l| l.starts_with("ok    gitlab-runner: /")
            || *l == "warn  gitlab-runner: MISSING (caches and artifacts are skipped without it)"),
        "{all}"
    );
    let delete = lines.iter().find(|l| l.starts_with("step  delete: ")).unwrap_or_else(|| panic!("{all}"));
    assert!(delete.contains("(RequestId "), "{all}");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("cost  {id} ")) && l.contains(" CNY/hour: about ")),
        "{all}"
    );
    assert_eq!(lines.last(), Some(&"live check passed"), "{all}");
    assert_eq!(emu.live_instances(), 0, "the instance was deleted: {all}");
    assert_eq!(successes(&emu, "RunInstances"), 1);
    assert_eq!(successes(&emu, "DeleteInstance"), 1);
    // Nothing of the check is left on the host either: no job state, no ledger entry.
    assert_eq!(files_named(dir.path(), &["ledger.jsonl", "state.json"]), Vec::<String>::new());
}

fn files_named(dir: &std::path::Path, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_named(&p, names));
        } else if names.iter().any(|n| p.file_name().is_some_and(|f| f == *n)) {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn doctor_live_deletes_the_instance_when_ssh_never_comes_up() {
    // Long enough to see the instance Running (it boots in 200 ms), and SSH never answers.
    let (emu, dir, config) = live_world(Duration::from_secs(3600), "5s");
    let out = live_command(&config, dir.path()).output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{all}");
    let records = emu.instances();
    assert_eq!(records.len(), 1, "{all}");
    let id = &records[0].id;
    let last = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with(&format!(
            "aliyun-spot: creating the instance as prepare would failed: SSH on {id} did not become ready within "
        )),
        "{all}"
    );
    assert!(
        last.contains(
            "; check that the security group allows port 22 from this host, or raise `ssh.boot_timeout`"
        ),
        "{all}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("step  delete: ")), "{all}");
    assert_eq!(emu.live_instances(), 0, "the instance was deleted: {all}");
}

#[test]
fn doctor_live_interrupted_with_ctrl_c_leaves_nothing() {
    let (emu, dir, config) = live_world(Duration::from_secs(3600), "2m");
    let child = live_command(&config, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while emu.instances().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(emu.instances().len(), 1, "doctor --live created its instance");
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("prepare was terminated"), "{all}");
    assert_eq!(emu.live_instances(), 0, "the instance was deleted: {all}");
    assert_eq!(emu.instances().len(), 1, "{all}");
}
