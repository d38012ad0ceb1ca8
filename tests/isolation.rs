//! An emulated instance is a machine of its own (its own mount and UTS namespaces): runner-side
//! files, other instances' files and the runner's hostname are not visible from a job's stage.
//! These need root (namespaces); the emulator shares the host's filesystem otherwise.

use aliyun_spot_executor::demo::gitlab::{Attempt, Job};

use super::executor::World;

/// config and prepare for `job`, asserting both pass.
fn prepared(w: &World, job: &Job) -> Attempt {
    let mut attempt = w.attempt(job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    attempt
}

/// The value after `KEY=` on the first line of `log` that starts with it.
fn value<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no `{key}=` line in:\n{log}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn the_runners_tmpdir_and_hostname_are_not_the_instances() {
    if !is_root() {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let w = World::new();
    let job = w.job("6001", "true");
    let attempt = prepared(&w, &job);
    // gitlab-runner's TMPDIR for this job (where BUILD_EXIT_CODE_FILE and the scripts live).
    let marker = attempt.dir().join("runner-side-marker");
    std::fs::write(&marker, "runner only\n").unwrap();
    let body = format!(
        "if test -e '{m}'; then echo MARKER=visible; else echo MARKER=invisible; fi\n\
         if test -e '{d}'; then echo TMPDIR_SEEN=yes; else echo TMPDIR_SEEN=no; fi\n\
         echo HOSTNAME=$(hostname)\n",
        m = marker.display(),
        d = attempt.dir().display()
    );
    assert!(attempt.run_stage("build_script", &body).unwrap().success(), "{}", attempt.log.text());
    let log = attempt.log.text();
    assert_eq!(value(&log, "MARKER"), "invisible", "{log}");
    assert_eq!(value(&log, "TMPDIR_SEEN"), "no", "{log}");
    let instance = &w.emulator.instances()[0];
    let runner_host = aliyun_spot_executor::env::Env::default().hostname();
    assert_eq!(value(&log, "HOSTNAME"), instance.host_name, "{log}");
    assert_eq!(instance.host_name, instance.name, "`HostName` is the instance name by default");
    assert_ne!(value(&log, "HOSTNAME"), runner_host, "{log}");
    // The host's hostname is untouched.
    assert_eq!(aliyun_spot_executor::env::Env::default().hostname(), runner_host);
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn tmp_and_usr_local_bin_are_private_to_each_instance() {
    if !is_root() {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let w = World::new();
    let (job_a, job_b) = (w.job("6002", "true"), w.job("6003", "true"));
    let a = prepared(&w, &job_a);
    let b = prepared(&w, &job_b);
    let name = format!("isolation-probe-{}", std::process::id());
    let write = format!(
        "echo a > /tmp/{name} && printf '#!/bin/sh\\necho tool\\n' > /usr/local/bin/{name} && \
         chmod +x /usr/local/bin/{name}\n\
         if test -e /tmp/{name}; then echo OWN=yes; else echo OWN=no; fi\n\
         echo TOOL=$({name})\n"
    );
    assert!(a.run_stage("build_script", &write).unwrap().success(), "{}", a.log.text());
    let log_a = a.log.text();
    assert_eq!(value(&log_a, "OWN"), "yes", "an instance sees its own files: {log_a}");
    assert_eq!(value(&log_a, "TOOL"), "tool", "{log_a}");
    let check = format!(
        "if test -e /tmp/{name}; then echo OTHER=visible; else echo OTHER=invisible; fi\n\
         if command -v {name} >/dev/null; then echo TOOL=visible; else echo TOOL=invisible; fi\n"
    );
    assert!(b.run_stage("build_script", &check).unwrap().success(), "{}", b.log.text());
    let log_b = b.log.text();
    assert_eq!(value(&log_b, "OTHER"), "invisible", "{log_b}");
    assert_eq!(value(&log_b, "TOOL"), "invisible", "{log_b}");
    // Nor did anything reach the runner host.
    assert!(!std::path::Path::new(&format!("/tmp/{name}")).exists());
    assert!(!std::path::Path::new(&format!("/usr/local/bin/{name}")).exists());
    assert!(a.cleanup().unwrap().success(), "{}", a.runner_log.text());
    assert!(b.cleanup().unwrap().success(), "{}", b.runner_log.text());
    w.assert_nothing_left();
}

/// An emulator whose instances boot their user data (`--boot-user-data`).
pub(crate) fn booting_emulator() -> aliyun_spot_executor::emulator::Emulator {
    use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions, Faults};
    Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        faults: Faults { initializing: std::time::Duration::ZERO, ..Faults::default() },
        boot_delay: std::time::Duration::from_millis(200),
        ssh_delay: std::time::Duration::from_millis(100),
        boot_user_data: true,
        ..EmulatorOptions::default()
    })
    .expect("emulator starts")
}

#[test]
fn user_data_boots_inside_the_instance_write_files_then_runcmd() {
    use super::emulator::{process_alive, record, run, wait_for, Api};
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: namespaces need root");
        return;
    }
    let emu = booting_emulator();
    let api = Api::new(&emu);
    let name = format!("boot-probe-{}", std::process::id());
    let doc = serde_json::json!({
        "write_files": [
            // Deferred: written after the others, still before runcmd.
            { "path": format!("/tmp/{name}/late"), "content": "late\n", "defer": true },
            { "path": format!("/tmp/{name}/hello"), "content": "hello from user data\n", "permissions": "0600" },
            { "path": format!("/etc/{name}.conf"), "content": "a=1\n" },
            { "path": format!("/tmp/{name}/b64"), "content": "aXQncyBiYXNlNjQK", "encoding": "b64" },
        ],
        "runcmd": [
            format!("cat /tmp/{name}/hello /tmp/{name}/late /tmp/{name}/b64 /etc/{name}.conf > /tmp/{name}/seen"),
            format!("hostname > /tmp/{name}/hostname; echo RUNCMD-MARKER; id -un"),
            ["sh", "-c", "echo \"quoted: $1\"", "sh", "it's one word"],
            "systemctl daemon-reload || echo SYSTEMCTL-REFUSED",
            format!("nohup sleep 600 >/dev/null 2>&1 & echo $! > /tmp/{name}/sleeper"),
        ],
    });
    let ud = base64::engine::general_purpose::STANDARD.encode(format!("#cloud-config\n{doc}\n"));
    let id = run(&api, "ecs.c7.large", "cn-hangzhou-j", &[("UserData", ud.as_str())]);
    let log = wait_for("the boot to finish", || {
        let log = emu.boot_log(&id);
        log.contains("boot: done").then_some(log)
    });
    let lines: Vec<&str> = log.lines().collect();
    for expected in [
        format!("boot: write_files: /tmp/{name}/hello"),
        "RUNCMD-MARKER".to_string(),
        "root".to_string(),
        "quoted: it's one word".to_string(),
        "SYSTEMCTL-REFUSED".to_string(),
        "boot: runcmd exited with status 0".to_string(),
    ] {
        assert!(lines.contains(&expected.as_str()), "no line `{expected}` in:\n{log}");
    }
    let pos = |s: &str| log.find(s).unwrap_or_else(|| panic!("no `{s}` in:\n{log}"));
    assert!(pos(&format!("write_files: /tmp/{name}/late")) < pos("boot: runcmd\n"), "{log}");

    // The files are the instance's: in its own /tmp and its copy of /etc, not the host's.
    assert!(
        !std::path::Path::new(&format!("/tmp/{name}")).exists(),
        "the instance's /tmp leaked to the host"
    );
    assert!(
        !std::path::Path::new(&format!("/etc/{name}.conf")).exists(),
        "the instance's /etc leaked to the host"
    );
    let inst_dir = emu.work_dir().join(&id);
    let tmp = inst_dir.join("fs/tmp").join(&name);
    let read = |f: &str| std::fs::read_to_string(tmp.join(f)).unwrap();
    assert_eq!(read("seen"), "hello from user data\nlate\nit's base64\na=1\n");
    assert_eq!(std::fs::metadata(tmp.join("hello")).unwrap().permissions().mode() & 0o7777, 0o600);
    assert_eq!(std::fs::metadata(tmp.join("late")).unwrap().permissions().mode() & 0o7777, 0o644);
    assert_eq!(read("hostname").trim(), record(&emu, &id).host_name);
    assert!(inst_dir.join(format!("fs/overlay/etc/upper/{name}.conf")).exists());

    // Deleting the instance kills what its boot started, detached or not.
    let sleeper: i32 = read("sleeper").trim().parse().unwrap();
    let boot_pid =
        record(&emu, &id).events.iter().find(|e| e.event == "boot-started").map(|e| e.detail.clone());
    let boot_pid: i32 = boot_pid.expect("a boot-started event").trim_start_matches("pid ").parse().unwrap();
    assert!(process_alive(sleeper) && process_alive(boot_pid));
    api.ok("DeleteInstance", &[("InstanceId", &id), ("Force", "true")]);
    wait_for("the boot's processes gone", || {
        (!process_alive(sleeper) && !process_alive(boot_pid)).then_some(())
    });
    emu.shutdown();
}
