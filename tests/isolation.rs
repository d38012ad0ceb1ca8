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
