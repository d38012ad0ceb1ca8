//! The per-job session keeper, driven through the real stage binaries: stages share one SSH
//! session, a keeper that is gone (killed between stages, killed mid-stage, never started) costs
//! no job its output or its result, and it never outlives its job.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aliyun_spot_executor::demo::gitlab::{Attempt, Exit};
use aliyun_spot_executor::emulator::Faults;

use crate::executor::World;

/// A world whose configuration keeps sessions (or not), whatever the suite's default.
fn world(keep: bool) -> World {
    World::with(Faults::default(), &[("ssh", "keep_session", toml::Value::Boolean(keep))])
}

/// Live keeper processes started for `world` (their working directory is a job's state
/// directory under the world's), by pid.
fn keepers(world: &World) -> Vec<i32> {
    keepers_under(world.dir.path())
}

/// Keeper processes whose working directory is under `root`.
fn keepers_under(root: &Path) -> Vec<i32> {
    let root = root.display().to_string();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = fs::read(entry.path().join("cmdline")) else { continue };
        if !cmd.ends_with(b"\0keep-session\0") {
            continue;
        }
        let cwd = fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cwd.display().to_string().starts_with(&root) {
            out.push(pid);
        }
    }
    out
}

/// Waits (bounded) until `world` has no keeper left, then asserts it.
fn assert_no_keeper(world: &World) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !keepers(world).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(keepers(world), Vec::<i32>::new(), "keeper processes left");
}

/// Runs `cleanup`, which must pass, and checks that neither a keeper nor an instance is left.
fn cleaned_up(w: &World, attempt: &Attempt) {
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    assert_no_keeper(w);
    w.assert_nothing_left();
}

/// Live processes whose command line contains `needle` (a job's `sleep` with a unique length).
fn processes_with(needle: &str) -> Vec<String> {
    crate::processes_matching(|cmd| cmd.contains(needle))
}

/// The job's state directory (the one directory under the runner's).
fn job_dir(world: &World) -> PathBuf {
    let runner = world.dir.path().join("state").join(crate::executor::RUNNER_ID);
    let dirs: Vec<PathBuf> = fs::read_dir(&runner).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// `config` and `prepare` of a job, which must pass.
fn prepared(world: &World, job_id: &str) -> Attempt {
    let job = world.job(job_id, "true");
    let mut attempt = world.attempt(&job);
    let (exit, _) = attempt.config().unwrap();
    assert!(exit.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    attempt
}

/// The `SSH_CONNECTION` each stage saw (client address and port, server address and port), in
/// stage order.
fn connections(log: &str) -> Vec<String> {
    log.lines().filter_map(|l| l.strip_prefix("conn=")).map(str::to_string).collect()
}

const SHOW_CONNECTION: &str = "echo \"conn=$SSH_CONNECTION\"";

#[test]
fn stages_share_one_kept_session_and_the_keeper_ends_with_the_job() {
    let w = world(true);
    let attempt = prepared(&w, "3101");
    let socket = job_dir(&w).join("keeper.sock");
    let meta = fs::symlink_metadata(&socket).expect("the keeper listens in the job's state directory");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let pids = keepers(&w);
    assert_eq!(pids.len(), 1);
    // It holds the session and nothing else: no job variable, no key in its environment or
    // arguments.
    assert_eq!(fs::read(format!("/proc/{}/environ", pids[0])).unwrap(), b"", "an empty environment");
    let cmdline = fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    assert!(cmdline.ends_with(b"aliyun-spot\0keep-session\0"), "{cmdline:?}");
    for stage in ["get_sources", "build_script", "after_script"] {
        assert!(attempt.run_stage(stage, SHOW_CONNECTION).unwrap().success(), "{}", attempt.log.text());
    }
    let conns = connections(&attempt.log.text());
    assert_eq!(conns.len(), 3, "{}", attempt.log.text());
    assert!(conns.iter().all(|c| *c == conns[0]), "one session for every stage: {conns:?}");
    assert!(!attempt.log.text().contains("could not keep an SSH session"), "{}", attempt.log.text());

    cleaned_up(&w, &attempt);
}

#[test]
fn with_keep_session_off_every_stage_connects_on_its_own() {
    let w = world(false);
    let attempt = prepared(&w, "3102");
    assert!(!job_dir(&w).join("keeper.sock").exists());
    assert_eq!(keepers(&w), Vec::<i32>::new());
    for stage in ["build_script", "after_script"] {
        assert!(attempt.run_stage(stage, SHOW_CONNECTION).unwrap().success(), "{}", attempt.log.text());
    }
    let conns = connections(&attempt.log.text());
    assert_eq!(conns.len(), 2, "{}", attempt.log.text());
    assert_ne!(conns[0], conns[1], "a connection per stage");
    assert!(attempt.cleanup().unwrap().success());
    w.assert_nothing_left();
}

#[test]
fn a_keeper_killed_between_stages_is_replaced_by_direct_connections() {
    let w = world(true);
    let attempt = prepared(&w, "3103");
    assert!(attempt.run_stage("get_sources", SHOW_CONNECTION).unwrap().success());
    assert!(kill_keepers_under(w.dir.path()));
    assert_no_keeper(&w);
    assert!(job_dir(&w).join("keeper.sock").exists(), "a killed keeper leaves its socket behind");
    for stage in ["build_script", "after_script"] {
        assert!(attempt.run_stage(stage, SHOW_CONNECTION).unwrap().success(), "{}", attempt.log.text());
    }
    let conns = connections(&attempt.log.text());
    assert_eq!(conns.len(), 3, "{}", attempt.log.text());
    assert!(conns[1] != conns[0] && conns[2] != conns[1], "direct connections after the keeper: {conns:?}");
    assert!(!attempt.log.text().contains("keeper"), "no noise for a missing keeper: {}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success());
    w.assert_nothing_left();
}

#[test]
fn a_keeper_killed_mid_stage_loses_no_output_and_leaves_nothing_running() {
    let w = world(true);
    let attempt = prepared(&w, "3104");
    let script =
        "for i in $(seq 1 300); do echo \"line-$i\"; done\necho all-written\nsleep 3104.5\necho NEVER";
    let running = attempt.start_stage("build_script", script).unwrap();
    assert!(attempt.log.wait_for("all-written", Duration::from_secs(30)), "{}", attempt.log.text());
    assert!(kill_keepers_under(w.dir.path()));
    let exit = running.wait().unwrap();
    let log = attempt.log.text();
    assert_eq!(exit, Exit::Code(2), "a system failure, as for any lost connection: {log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("line-")).collect();
    let expected: Vec<String> = (1..=300).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected, "every line the keeper relayed reached the job log, in order");
    assert!(!log.contains("NEVER"), "{log}");
    assert!(
        log.contains(
            "the session keeper stopped during the stage; stopped the script's processes over a new connection"
        ),
        "{log}"
    );
    assert_eq!(processes_with("sleep 3104.5"), Vec::<String>::new(), "the stage's processes were stopped");
    cleaned_up(&w, &attempt);
}

#[test]
fn a_stage_quiet_for_longer_than_the_heartbeat_limit_is_not_taken_for_a_hung_keeper() {
    let w = world(true);
    let attempt = prepared(&w, "3113");
    assert!(attempt.run_stage("get_sources", SHOW_CONNECTION).unwrap().success(), "{}", attempt.log.text());
    // Nothing on stdout or stderr for longer than `HEARTBEAT_LIMIT` (10 s): the keeper's
    // heartbeats keep `run` waiting.
    let body = format!("sleep 11\n{SHOW_CONNECTION}");
    assert!(attempt.run_stage("build_script", &body).unwrap().success(), "{}", attempt.log.text());
    let conns = connections(&attempt.log.text());
    assert_eq!(conns.len(), 2, "{}", attempt.log.text());
    assert_eq!(conns[0], conns[1], "both over the kept session");
    cleaned_up(&w, &attempt);
}

#[test]
fn a_keeper_that_hangs_mid_stage_is_killed_and_the_stage_ends_as_a_lost_connection() {
    let w = world(true);
    let attempt = prepared(&w, "3112");
    let running = attempt.start_stage("build_script", "echo started\nsleep 3112.5\necho NEVER").unwrap();
    assert!(attempt.log.wait_for("started", Duration::from_secs(30)), "{}", attempt.log.text());
    let pids = keepers(&w);
    assert_eq!(pids.len(), 1);
    // SAFETY: plain syscall on this test's keeper.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let exit = running.wait().unwrap();
    let log = attempt.log.text();
    assert_eq!(exit, Exit::Code(2), "{log}");
    assert!(
        log.contains(
            "the session keeper stopped answering during the stage; stopped the script's processes over a new connection"
        ),
        "{log}"
    );
    assert!(!log.contains("NEVER"), "{log}");
    assert_eq!(processes_with("sleep 3112.5"), Vec::<String>::new());
    assert_eq!(keepers(&w), Vec::<i32>::new(), "run killed the hung keeper");
    cleaned_up(&w, &attempt);
}

#[test]
fn a_cancelled_stage_over_the_keeper_stops_its_processes_and_the_keeper_serves_on() {
    let w = world(true);
    let attempt = prepared(&w, "3105");
    let running = attempt.start_stage("build_script", "echo started\nsleep 3105.5\necho NEVER").unwrap();
    assert!(attempt.log.wait_for("started", Duration::from_secs(30)), "{}", attempt.log.text());
    // gitlab-runner's cancel: SIGTERM to the group, then SIGKILL after the grace.
    let exit = running.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(exit, Exit::Code(2), "{}", attempt.log.text());
    assert!(attempt.log.text().contains("was cancelled"), "{}", attempt.log.text());
    assert_eq!(processes_with("sleep 3105.5"), Vec::<String>::new());
    assert_eq!(keepers(&w).len(), 1, "the keeper still serves the job");
    assert!(attempt.run_stage("after_script", SHOW_CONNECTION).unwrap().success(), "{}", attempt.log.text());
    cleaned_up(&w, &attempt);
}

#[test]
fn a_run_killed_mid_stage_counts_as_a_cancel_for_the_keeper() {
    let w = world(true);
    let attempt = prepared(&w, "3106");
    let running = attempt.start_stage("build_script", "echo started\nsleep 3106.5").unwrap();
    assert!(attempt.log.wait_for("started", Duration::from_secs(30)), "{}", attempt.log.text());
    running.signal_group(libc::SIGKILL);
    let _ = running.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_with("sleep 3106.5").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(processes_with("sleep 3106.5"), Vec::<String>::new(), "the keeper stopped the orphaned stage");
    assert!(attempt.run_stage("after_script", "echo after").unwrap().success(), "{}", attempt.log.text());
    cleaned_up(&w, &attempt);
}

#[test]
fn the_keeper_exits_when_the_state_directory_is_removed() {
    let w = world(true);
    let attempt = prepared(&w, "3107");
    assert_eq!(keepers(&w).len(), 1);
    fs::remove_dir_all(job_dir(&w)).unwrap();
    assert_no_keeper(&w);
    // Cleanup still finds the instance by its tags.
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn the_keeper_exits_when_its_instance_is_gone() {
    let w = world(true);
    let attempt = prepared(&w, "3109");
    assert_eq!(keepers(&w).len(), 1);
    let id = w.emulator.instances()[0].id.clone();
    assert!(w.emulator.reclaim(&id));
    assert_no_keeper(&w);
    let log = fs::read_to_string(job_dir(&w).join("keeper.log")).unwrap();
    assert!(log.starts_with("session keeper: exiting: the "), "{log}");
    assert!(log.contains("is gone") || log.contains("was closed"), "{log}");
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

#[test]
fn an_idle_keeper_exits_on_its_own() {
    use aliyun_spot_executor::ssh::{Keepalive, SshTarget};
    use aliyun_spot_executor::state::StateStore;
    let w = world(false);
    let attempt = prepared(&w, "3110");
    // A keeper for the prepared instance, as prepare starts it, with a one-second idle timeout.
    let store = StateStore::new(w.dir.path().join("state"));
    let state = store.list().unwrap().remove(0).state.unwrap();
    let target = SshTarget {
        host: state.ip.clone().unwrap(),
        port: state.ssh_port,
        user: state.ssh_user.clone(),
        private_key: store.load_private_key(&state.key()).unwrap().unwrap(),
        host_key: state.host_public_key.clone(),
        connect_timeout: Duration::from_secs(10),
    };
    let dir = job_dir(&w);
    let exe = Path::new(env!("CARGO_BIN_EXE_aliyun-spot"));
    aliyun_spot_executor::keeper::start(exe, &dir, &target, Keepalive::default(), Duration::from_secs(1))
        .unwrap();
    assert!(dir.join("keeper.sock").exists());
    assert_no_keeper(&w);
    assert_eq!(
        fs::read_to_string(dir.join("keeper.log")).unwrap(),
        "session keeper: exiting: no stage for 1s\n"
    );
    assert!(!dir.join("keeper.sock").exists(), "it removes its socket");
    assert!(attempt.run_stage("build_script", "echo direct").unwrap().success(), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success());
    w.assert_nothing_left();
}

#[test]
fn a_kept_session_that_stalled_unnoticed_starts_nothing_and_the_stage_connects_on_its_own() {
    let w = World::with(
        Faults::default(),
        &[
            ("ssh", "keep_session", toml::Value::Boolean(true)),
            ("ssh", "connect_timeout", toml::Value::String("2s".into())),
        ],
    );
    let attempt = prepared(&w, "3111");
    // The instance's listening sshd; between stages its only connection is the keeper's.
    let work = w.emulator.work_dir().display().to_string();
    let listener: Vec<i32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = String::from_utf8_lossy(&fs::read(e.path().join("cmdline")).ok()?).into_owned();
            (cmd.contains("sshd") && cmd.contains(&work)).then_some(pid)
        })
        .collect();
    assert_eq!(listener.len(), 1, "one instance, one sshd");
    let session: Vec<i32> = crate::process_tree(listener[0] as u32)[1..].iter().map(|&p| p as i32).collect();
    assert!(!session.is_empty(), "the keeper's session is served by sshd's per-connection processes");
    // The server side of the kept session stops answering, the TCP connection stays up.
    for &p in &session {
        // SAFETY: plain syscall on sshd processes of this test's instance.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    let exit = attempt.run_stage("build_script", "echo ran-once").unwrap();
    for &p in &session {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    let log = attempt.log.text();
    assert!(exit.success(), "{log}");
    assert_eq!(log.lines().filter(|l| *l == "ran-once").count(), 1, "{log}");
    cleaned_up(&w, &attempt);
}

/// A keeper stopped (SIGSTOP) between stages, then a stage with a script of `size` bytes: `run`
/// must kill the keeper and run the stage once over its own connection.
fn hung_keeper_between_stages(job_id: &str, size: usize) {
    let w = World::with(
        Faults::default(),
        &[
            ("ssh", "keep_session", toml::Value::Boolean(true)),
            ("ssh", "connect_timeout", toml::Value::String("1s".into())),
        ],
    );
    let attempt = prepared(&w, job_id);
    let pids = keepers(&w);
    assert_eq!(pids.len(), 1);
    // SAFETY: plain syscall on this test's keeper.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let body = format!(": '{}'\necho ran-once", "x".repeat(size));
    assert!(attempt.run_stage("build_script", &body).unwrap().success(), "{}", attempt.log.text());
    let log = attempt.log.text();
    assert_eq!(log.lines().filter(|l| *l == "ran-once").count(), 1, "{log}");
    assert!(log.contains("the session keeper of this job does not answer; stopping it"), "{log}");
    assert_eq!(keepers(&w), Vec::<i32>::new(), "run killed the hung keeper");
    cleaned_up(&w, &attempt);
}

#[test]
fn a_keeper_that_hangs_between_stages_is_killed_and_the_stage_connects_on_its_own() {
    // The request fits in the socket's buffer: `run` waits for the keeper to accept it.
    hung_keeper_between_stages("3114", 10);
}

#[test]
fn a_keeper_that_hangs_while_a_large_script_is_sent_is_killed_and_the_stage_connects_on_its_own() {
    // Larger than the socket's buffer: sending it waits for the keeper too.
    hung_keeper_between_stages("3115", 1 << 20);
}

#[test]
fn a_socket_others_could_use_is_not_trusted_and_stages_go_direct() {
    let w = world(true);
    let attempt = prepared(&w, "3108");
    let socket = job_dir(&w).join("keeper.sock");
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(attempt.run_stage("build_script", "echo ran").unwrap().success(), "{}", attempt.log.text());
    let log = attempt.log.text();
    assert!(log.lines().any(|l| l == "ran"), "{log}");
    assert!(
        log.contains(&format!(
            "`{}` is not a socket of this user with mode 0600; remove it (stages connect directly meanwhile)",
            socket.display()
        )),
        "{log}"
    );
    cleaned_up(&w, &attempt);
}

/// Kills the keeper at a random moment of a job's stages, job after job: every job either
/// passes or fails its stage as a system failure naming the keeper, no output comes twice or
/// out of order, and nothing is left running.
#[test]
fn chaos_keepers_killed_at_random_moments() {
    let w = world(true);
    let mut killed_mid_stage = 0;
    for round in 0..6u32 {
        let job_id = format!("{}", 3200 + round);
        let body = "for i in 1 2 3 4 5; do echo \"tick-$i\"; sleep 0.$((RANDOM % 3)); done\nsleep 0.3200";
        let job = w.job(&job_id, body);
        let attempt = w.attempt(&job);
        let log = attempt.log.clone();
        let delay = Duration::from_millis(200 + u64::from(rand::random::<u16>() % 2500));
        let world_dir = w.dir.path().to_path_buf();
        let killer = std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < delay {
                std::thread::sleep(Duration::from_millis(10));
            }
            kill_keepers_under(&world_dir)
        });
        let out = attempt.run_job(&job).unwrap();
        let killed = killer.join().unwrap();
        let ticks: Vec<&str> = out.job_log.lines().filter(|l| l.starts_with("tick-")).collect();
        for pair in ticks.windows(2) {
            assert!(pair[0] < pair[1], "output out of order or twice: {ticks:?}\n{}", out.job_log);
        }
        if !out.passed() {
            assert!(killed, "only a killed keeper may fail the job:\n{}", out.job_log);
            assert!(
                out.job_log.contains("the session keeper stopped during the stage"),
                "round {round}: {}\n{}",
                log.text(),
                out.runner_log
            );
            killed_mid_stage += 1;
        }
        assert_eq!(out.cleanup, Some(Exit::Code(0)), "{}", out.runner_log);
        assert_no_keeper(&w);
        assert_eq!(processes_with("sleep 0.3200"), Vec::<String>::new());
        w.assert_nothing_left();
    }
    eprintln!("{killed_mid_stage} of 6 jobs lost their keeper mid-stage");
}

/// SIGKILLs every keeper whose working directory is under `root`; whether there was one.
fn kill_keepers_under(root: &Path) -> bool {
    let pids = keepers_under(root);
    for &pid in &pids {
        // SAFETY: plain syscall on a keeper of this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    !pids.is_empty()
}

#[test]
fn settings_the_keeper_cannot_read_are_refused_without_quoting_them() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    // A mistyped value where serde would quote it back ("invalid type: string …").
    let secret = "-----BEGIN OPENSSH PRIVATE KEY----- not-to-be-printed";
    let settings = serde_json::json!({ "job_dir": "/nonexistent", "port": secret, "private_key": secret });
    let mut child = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .arg("keep-session")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(settings.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "never `ready`");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "aliyun-spot: the keeper's settings on stdin are not valid (install all binaries together)\n"
    );
}
