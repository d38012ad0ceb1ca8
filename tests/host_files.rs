//! The runner host's own files: another local user cannot plant a job state, redirect the
//! ledger, or make a stage act on their behalf; the driver refuses such a location in one line
//! before it creates anything or calls the API.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aliyun_spot_executor::demo::gitlab::{Attempt, Exit};

use crate::executor::World;

/// Sets `[paths] key = value` in the world's configuration file.
fn set_path(w: &World, key: &str, value: &Path) {
    let mut doc: toml::Table = std::fs::read_to_string(&w.config).unwrap().parse().unwrap();
    doc["paths"].as_table_mut().unwrap().insert(key.into(), toml::Value::String(value.display().to_string()));
    std::fs::write(&w.config, toml::to_string(&doc).unwrap()).unwrap();
}

/// Runs `sh -c script` as the unprivileged user `nobody`.
fn as_nobody(script: &str) {
    let status = Command::new("runuser").args(["-u", "nobody", "--", "sh", "-c", script]).status().unwrap();
    assert!(status.success(), "`{script}` as nobody failed");
}

/// Every file under `dir`, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs config, prepare, one `run` stage and cleanup; each must fail as a system failure with
/// `line` as its error, without a single API call.
fn every_stage_refuses(w: &World, line: &str) {
    let job = w.job("1001", "echo the job ran");
    let mut a: Attempt = w.attempt(&job);
    let (exit, _) = a.config().unwrap();
    assert_ne!(exit, Exit::Code(0), "config: {}", a.log.text());
    assert!(a.log.text().contains(&format!("ERROR: {line}\n")), "config:\n{}", a.log.text());
    let exit = a.prepare().unwrap();
    assert_ne!(exit, Exit::Code(0), "prepare: {}", a.log.text());
    assert_eq!(a.log.text().matches(&format!("ERROR: {line}\n")).count(), 2, "{}", a.log.text());
    let exit = a.run_stage("build_script", "echo the job ran").unwrap();
    assert_ne!(exit, Exit::Code(0), "run: {}", a.log.text());
    assert_eq!(a.log.text().matches(&format!("ERROR: {line}\n")).count(), 3, "{}", a.log.text());
    assert_ne!(a.cleanup().unwrap(), Exit::Code(0));
    assert_eq!(a.runner_log.text(), format!("ERROR: {line}\n"));
    assert!(!a.log.text().contains("the job ran"), "{}", a.log.text());
    assert!(w.emulator.requests().is_empty(), "no API call: {:?}", w.emulator.requests());
    assert_eq!(w.live(), 0);
}

#[test]
fn a_state_planted_by_another_user_is_refused_by_every_stage() {
    let w = World::new();
    // A shared sticky directory like /tmp, where `nobody` pre-created the state directory
    // world-writable and planted a job state pointing at their own sshd.
    let shared = w.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let state = shared.join("state");
    as_nobody(&format!(
        "umask 0 && mkdir -m 777 {s} {s}/7 {s}/7/42-1001 && printf '%s' '{{\"version\":1,\"runner_id\":\"7\",\
         \"project_id\":\"42\",\"job_id\":\"1001\",\"phase\":\"Ready\",\"ip\":\"127.0.0.1\",\"ssh_port\":2222}}' \
         > {s}/7/42-1001/state.json",
        s = state.display()
    ));
    set_path(&w, "state_dir", &state);
    let planted = tree(&state);
    every_stage_refuses(
        &w,
        &format!(
            "refusing `paths.state_dir` = `{}`: it is owned by uid 65534, not by this user (uid 0) or root; remove \
             it or choose a directory only root can write to",
            state.display()
        ),
    );
    assert_eq!(tree(&state), planted, "nothing was created in the planted directory");

    // The same directory made root's but left world-writable is refused for its mode.
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `paths.state_dir` = `{s}`: it is writable by other users without the sticky bit (mode 0777); \
             run `chmod go-w {s}` or choose a directory only root can write to",
            s = state.display()
        ),
    );
    // And a private state directory below a directory others can write to.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `paths.state_dir` = `{}`: its ancestor `{s}` is writable by other users without the sticky \
             bit (mode 0777); run `chmod go-w {s}` or choose a directory only root can write to",
            state.display(),
            s = shared.display()
        ),
    );
}

#[test]
fn a_symlinked_ledger_is_refused_and_its_target_is_untouched() {
    let w = World::new();
    let victim = w.dir.path().join("victim.conf");
    std::fs::write(&victim, "precious\n").unwrap();
    let ledger = w.dir.path().join("ledger.jsonl");
    std::os::unix::fs::symlink(&victim, &ledger).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `paths.ledger` = `{}`: it is a symbolic link; remove the link or set the real path",
            ledger.display()
        ),
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(&ledger).unwrap().file_type().is_symlink());
    assert!(!w.dir.path().join("state").exists(), "nothing created");
}

#[test]
fn a_cache_directory_of_another_user_is_refused() {
    let w = World::new();
    let cache = w.dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `paths.cache_dir` = `{}`: it is owned by uid 65534, not by this user (uid 0) or root; remove \
             it or choose a directory only root can write to",
            cache.display()
        ),
    );
}

#[test]
fn an_ssh_private_key_file_others_can_read_replace_or_own_is_refused_by_every_stage() {
    let keys = aliyun_spot_executor::keys::generate_ed25519("team-key").unwrap();
    let dir = crate::private_tempdir();
    let key = dir.path().join("id_ed25519");
    std::fs::write(&key, keys.private_openssh.expose()).unwrap();
    let w = World::with(
        aliyun_spot_executor::emulator::Faults::default(),
        &[
            ("ssh", "key_pair_name", toml::Value::String("ci-team-key".into())),
            ("ssh", "private_key_file", toml::Value::String(key.display().to_string())),
        ],
    );
    let k = key.display();
    for mode in [0o644, 0o640, 0o660, 0o604] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        every_stage_refuses(
            &w,
            &format!(
                "refusing `ssh.private_key_file` = `{k}`: group or other users can read or write it (mode \
                 {mode:04o}); run `chmod 600 {k}`"
            ),
        );
    }
    // Private, but another user's: they could have put their own key there.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `ssh.private_key_file` = `{k}`: owned by uid 65534, not by this user (uid 0) or root; remove \
             it or choose another path"
        ),
    );
    // A link to a private key of this user's is not followed either.
    std::os::unix::fs::chown(&key, Some(0), Some(0)).unwrap();
    let link = dir.path().join("id_link");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let mut doc: toml::Table = std::fs::read_to_string(&w.config).unwrap().parse().unwrap();
    doc["ssh"]
        .as_table_mut()
        .unwrap()
        .insert("private_key_file".into(), toml::Value::String(link.display().to_string()));
    std::fs::write(&w.config, toml::to_string(&doc).unwrap()).unwrap();
    every_stage_refuses(
        &w,
        &format!(
            "refusing `ssh.private_key_file` = `{}`: it is a symbolic link; remove the link or set the real path",
            link.display()
        ),
    );
}

#[test]
fn trace_logging_never_shows_the_metadata_token_or_role_credentials() {
    use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions};
    let emu = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        host_ram_role: Some("runner-host-role".to_string()),
        ..EmulatorOptions::default()
    })
    .unwrap();
    let dir = crate::private_tempdir();
    let mut doc: toml::Table = crate::executor::config_text(&emu.endpoint(), dir.path()).parse().unwrap();
    let creds = doc["credentials"].as_table_mut().unwrap();
    creds.remove("access_key_id");
    creds.remove("access_key_secret");
    creds.insert("use_instance_role".into(), toml::Value::Boolean(true));
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .args(["--config", &config.display().to_string(), "prices", "--fresh"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("RUST_LOG", "trace,ureq=trace,rustls=trace")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The role chain was used: a session token, then the role's STS credentials signed the calls.
    let requests = emu.requests();
    assert!(requests.iter().any(|r| r.access_key_id.as_deref().is_some_and(|k| k.starts_with("STS."))));
    assert!(
        stderr.contains(
            "DEBUG aliyun_spot_executor::ecs::credentials] RAM role `runner-host-role`: credentials from"
        ),
        "debug logging was on:\n{stderr}"
    );
    let lower = stderr.to_lowercase();
    // The emulator's STS tokens start with `CAIS`; the session token travels only in its header.
    for leak in ["x-aliyun-ecs-metadata-token", "cais", "accesskeysecret", "securitytoken", "writing prelude"]
    {
        assert!(!lower.contains(leak), "`{leak}` reached the log:\n{stderr}");
    }
}

#[test]
fn prepare_whose_output_is_a_closed_pipe_still_records_its_instance() {
    let w = World::new();
    // `prepare 2>&1 | head -4`: after four lines every write to stderr fails with EPIPE.
    let wrapper = w.dir.path().join("prepare-head");
    std::fs::write(
        &wrapper,
        format!("#!/bin/bash\nset -o pipefail\n{} \"$@\" 2>&1 | head -4\n", env!("CARGO_BIN_EXE_prepare")),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let job = w.job("1003", "echo still here");
    let mut exes = w.exes();
    exes.prepare = wrapper;
    let mut a = Attempt::new(exes, w.base_env(), &job).unwrap();
    assert!(a.config().unwrap().0.success(), "{}", a.log.text());
    let before = a.log.text().lines().count();
    let exit = a.prepare().unwrap();
    assert_eq!(a.log.text().lines().count(), before + 4, "{}", a.log.text());
    assert_eq!(exit, Exit::Code(0), "no panic (101), a finished prepare:\n{}", a.log.text());
    assert_eq!(w.live(), 1);
    // The instance was recorded as ready: the job's stages run on it, cleanup releases it.
    for (stage, body) in &job.stages {
        assert!(a.run_stage(stage, body).unwrap().success(), "{stage}: {}", a.log.text());
    }
    assert!(a.log.text().lines().any(|l| l == "still here"), "{}", a.log.text());
    assert!(a.cleanup().unwrap().success(), "{}", a.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn the_emulator_refuses_to_listen_beyond_loopback() {
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:9470"] {
        let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
            .args(["emulator", "--listen", addr])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "aliyun-spot: refusing to listen on `{addr}`: the emulator serves every instance's credentials and \
                 user data to whoever can connect; use a loopback address such as `127.0.0.1:9470`\n"
            )
        );
    }
}

#[test]
fn doctor_and_every_stage_refuse_a_readable_secret_for_a_real_endpoint() {
    let w = World::new();
    let mut doc: toml::Table = std::fs::read_to_string(&w.config).unwrap().parse().unwrap();
    // Not a loopback address by the rule, yet Linux delivers a connection to it locally, so
    // nothing would leave the machine even if the refusal were gone.
    doc["aliyun"]
        .as_table_mut()
        .unwrap()
        .insert("endpoint".into(), toml::Value::String("https://0.0.0.0:1".into()));
    std::fs::write(&w.config, toml::to_string(&doc).unwrap()).unwrap();
    std::fs::set_permissions(&w.config, std::fs::Permissions::from_mode(0o640)).unwrap();
    let line = format!(
        "refusing the configuration file `{p}`: it holds an AccessKey secret and is readable by other users (mode \
         0640); run `chmod 600 {p}`",
        p = w.config.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .args(["--config", &w.config.display().to_string(), "doctor"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), format!("aliyun-spot: {line}\n"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    every_stage_refuses(&w, &line);
}
