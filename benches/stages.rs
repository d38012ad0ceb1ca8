//! Stage overhead benchmark: what one `run` of an empty stage costs next to OpenSSH talking to
//! the same sshd, the peak memory of each stage process, prepare's time once the instance is
//! running, and the API calls of a job with a cold and a warm price cache. Plain `fn main` (no
//! harness); numbers are printed, not asserted.
//!
//! Run it with `cargo bench --bench stages` (under a minute after compiling), or
//! `cargo bench --bench stages -- 50` for 50 rounds instead of the default 15. It starts the
//! in-process emulator, whose instances run a real `sshd` on port 22 of a loopback address, so
//! it needs root and `/usr/sbin/sshd` (and `/usr/bin/ssh` for the comparison); without them it
//! says so and stops.
//!
//! One job is prepared with the real stage binaries, then each round runs, one after the other:
//! 1. `run <script> step_script` of an empty stage, as gitlab-runner calls it (a bash script
//!    shaped like gitlab-runner's, exporting the job's variables), over the job's kept session
//!    (`ssh.keep_session = true`, the default);
//! 2. the same with `ssh.keep_session = false`: `run` connects on its own (the configuration
//!    file is switched before and after, outside the measured time);
//! 3. `ssh -i <job key> -o UserKnownHostsFile=<pinned key> root@<ip> true`, a fresh OpenSSH
//!    connection;
//! 4. the same command over an OpenSSH master connection (`ControlMaster`), i.e. one more
//!    channel on a session that is already open.
//!
//! Interleaving the four keeps a shared machine's load from favouring one of them. Wall time
//! is what a job waits for; the CPU time and the voluntary context switches (each a wait for
//! the network or a timer) come from `wait4(2)` and depend much less on the machine's load.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aliyun_spot_executor::demo::gitlab::{Attempt, Executables, Exit, Job, Log, Running};
use aliyun_spot_executor::state::{JobState, StateStore};
use common::{can_run_sshd, diff, stage, Bed};

const DEFAULT_ROUNDS: usize = 15;

/// One measured process: wall time and what `wait4` said about it.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    max_rss_kib: i64,
    waits: i64,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Waits for `running` (started at `start`); panics with the log when it did not exit 0.
fn measure(running: Running, start: Instant, what: &str, log: &Log) -> Sample {
    let (exit, usage) = running.wait_with_usage().expect("wait4");
    let wall = start.elapsed();
    assert_eq!(exit, Exit::Code(0), "{what} failed:\n{}", log.text());
    Sample {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss,
        waits: usage.ru_nvcsw,
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn percentile(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    v[(v.len() - 1) * p / 100]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The prepared job's instance: its state and where its client key lives.
fn prepared(bed: &Bed) -> (JobState, PathBuf) {
    let store = StateStore::new(bed.dir.path().join("state"));
    let job = store.list().expect("state listed").into_iter().next().expect("a prepared job");
    let state = job.state.expect("a readable state");
    let key = store.private_key_path(&state.key());
    (state, key)
}

/// The OpenSSH options every comparison command shares: no configuration file, the job's key,
/// the pinned host key and nothing interactive.
fn ssh_options(state: &JobState, key: &Path, known_hosts: &Path) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-i",
        &key.display().to_string(),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        &format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-p",
        &state.ssh_port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The peak RSS (`VmHWM`) of the session keeper working in a job directory under `root`.
fn keeper_peak_rss_kib(root: &Path) -> Option<u64> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        if cmd.ends_with(b"\0keep-session\0") && cwd.starts_with(root) {
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let hwm = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
            return hwm.trim().trim_end_matches("kB").trim().parse().ok();
        }
    }
    None
}

fn main() {
    let rounds =
        std::env::args().skip(1).find_map(|a| a.parse::<usize>().ok()).unwrap_or(DEFAULT_ROUNDS).max(1);
    println!("== stage overhead against the emulator's sshd ({rounds} rounds) ==");
    if !can_run_sshd() {
        return;
    }
    let ssh = Path::new("/usr/bin/ssh");
    if !ssh.exists() {
        println!("skipped: needs /usr/bin/ssh for the comparison");
        return;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));

    let bed = Bed::start();
    // prepare's debug line "SSH answered on …" marks the moment SSH was ready.
    let mut a: Attempt =
        bed.attempt_with("6001", &[("RUST_LOG", "aliyun_spot_executor::stages::prepare=debug")]);
    assert!(a.config().expect("config runs").0.success(), "config failed: {}", a.log.text());
    // Prepare, with the moment it starts on SSH (instance Running) noted from its output.
    let calls_before = bed.calls();
    let start = Instant::now();
    let running = a.spawn(&bed.executables().prepare, &[], &a.log).expect("prepare starts");
    let waiting_for_ssh = a.log.wait_for("waiting for SSH", Duration::from_secs(120)).then(Instant::now);
    let ssh_ready = a.log.wait_for("SSH answered on", Duration::from_secs(120)).then(Instant::now);
    let prepare = measure(running, start, "prepare", &a.log);
    let prepare_calls = diff(&bed.calls(), &calls_before);
    let after_running = waiting_for_ssh.map(|t| start + prepare.wall - t);
    let after_ssh = ssh_ready.map(|t| start + prepare.wall - t);

    let (state, key) = prepared(&bed);
    let ip = state.ip.clone().expect("a ready instance has an address");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let known_hosts = tmp.path().join("known_hosts");
    let host = if state.ssh_port == 22 { ip.clone() } else { format!("[{ip}]:{}", state.ssh_port) };
    std::fs::write(&known_hosts, format!("{host} {}\n", state.host_public_key)).expect("known_hosts");
    let opts = ssh_options(&state, &key, &known_hosts);
    let login = format!("{}@{ip}", state.ssh_user);
    let control = tmp.path().join("cm").display().to_string();
    // OpenSSH runs through an attempt of its own: the same process handling, none of the stage
    // binaries' arguments.
    let exes = Executables { args: Vec::new(), ..bed.executables() };
    let plain = Attempt::new(exes, BTreeMap::new(), &Job::default()).expect("a directory for ssh");

    // The master connection: `-N`, no command, until `-O exit`.
    let log = Log::default();
    let mut master_args = opts.clone();
    master_args.extend(["-o".into(), "ControlMaster=yes".into(), "-S".into(), control.clone(), "-N".into()]);
    master_args.push(login.clone());
    let master = plain.spawn(ssh, &master_args, &log).expect("ssh master starts");
    let control_args = |op: &[&str]| {
        let mut v = opts.clone();
        v.extend(["-S".to_string(), control.clone()]);
        v.extend(op.iter().map(|s| s.to_string()));
        v.push(login.clone());
        v
    };
    let up = Instant::now();
    while plain.spawn(ssh, &control_args(&["-O", "check"]), &Log::default()).and_then(|r| r.wait()).ok()
        != Some(Exit::Code(0))
    {
        assert!(up.elapsed() < Duration::from_secs(30), "the ssh master did not come up: {}", log.text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut fresh_args = opts.clone();
    fresh_args.extend([login.clone(), "true".into()]);
    let mux_args = {
        let mut v = control_args(&["-o", "ControlMaster=no"]);
        v.push("true".into());
        v
    };

    // The configuration as prepared (keeping sessions), and the same with each stage on its own.
    let kept_config = std::fs::read_to_string(&bed.config).expect("configuration");
    let mut doc: toml::Table = kept_config.parse().expect("TOML");
    let ssh_table = doc.entry("ssh").or_insert_with(|| toml::Value::Table(Default::default()));
    ssh_table.as_table_mut().expect("a table").insert("keep_session".into(), toml::Value::Boolean(false));
    let direct_config = toml::to_string(&doc).expect("TOML");
    type Method<'a> = (&'a str, Box<dyn Fn() -> Sample + 'a>);
    let methods: Vec<Method> = vec![
        (
            "run, kept session",
            Box::new(|| {
                let start = Instant::now();
                let r = a.start_stage("step_script", ":").expect("run starts");
                measure(r, start, "run", &a.log)
            }),
        ),
        (
            "run, own connection",
            Box::new(|| {
                std::fs::write(&bed.config, &direct_config).expect("configuration");
                let start = Instant::now();
                let r = a.start_stage("step_script", ":").expect("run starts");
                let sample = measure(r, start, "run", &a.log);
                std::fs::write(&bed.config, &kept_config).expect("configuration");
                sample
            }),
        ),
        (
            "ssh, fresh connection",
            Box::new(|| {
                let log = Log::default();
                let start = Instant::now();
                measure(plain.spawn(ssh, &fresh_args, &log).expect("ssh starts"), start, "ssh", &log)
            }),
        ),
        (
            "ssh, ControlMaster channel",
            Box::new(|| {
                let log = Log::default();
                let start = Instant::now();
                measure(plain.spawn(ssh, &mux_args, &log).expect("ssh starts"), start, "ssh -S", &log)
            }),
        ),
    ];
    // One unmeasured round warms caches (binaries, sshd's own files).
    for (_, m) in &methods {
        m();
    }
    let calls_before = bed.calls();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); methods.len()];
    for _ in 0..rounds {
        for (i, (_, m)) in methods.iter().enumerate() {
            samples[i].push(m());
        }
    }
    let run_calls = diff(&bed.calls(), &calls_before);
    let names: Vec<&str> = methods.iter().map(|(n, _)| *n).collect();
    drop(methods);
    let _ = plain.spawn(ssh, &control_args(&["-O", "exit"]), &Log::default()).and_then(|r| r.wait());
    let _ = master.terminate(Duration::from_secs(2));

    let fresh_median = median(samples[2].iter().map(|s| s.wall).collect());
    println!(
        "{:<28} {:>9} {:>8} {:>8} {:>10} {:>8} {:>7} {:>10}",
        "per stage", "median ms", "p10 ms", "p90 ms", "vs fresh", "CPU ms", "waits", "RSS KiB"
    );
    for (name, s) in names.iter().zip(&samples) {
        let walls: Vec<Duration> = s.iter().map(|x| x.wall).collect();
        let wall = median(walls.clone());
        println!(
            "{:<28} {:>9.1} {:>8.1} {:>8.1} {:>9.2}× {:>8.1} {:>7} {:>10}",
            name,
            ms(wall),
            ms(percentile(walls.clone(), 10)),
            ms(percentile(walls, 90)),
            wall.as_secs_f64() / fresh_median.as_secs_f64(),
            ms(median(s.iter().map(|x| x.cpu).collect())),
            median(s.iter().map(|x| x.waits).collect()),
            s.iter().map(|x| x.max_rss_kib).max().unwrap_or(0),
        );
    }
    println!("(CPU ms and waits: medians of the client process's user+system time and voluntary context switches; RSS: the largest peak)");
    println!(
        "prepare: {:.0} ms in all, {} ms from `Running` to done, {} ms of it after SSH answered \
         (watchdog hand-over, helper check, session keeper); peak RSS {} KiB",
        ms(prepare.wall),
        after_running.map_or("?".to_string(), |d| format!("{:.0}", ms(d))),
        after_ssh.map_or("?".to_string(), |d| format!("{:.0}", ms(d))),
        prepare.max_rss_kib
    );

    match keeper_peak_rss_kib(bed.dir.path()) {
        Some(kib) => println!("session keeper: peak RSS {kib} KiB after {} stages", rounds * 2 + 2),
        None => println!("session keeper: not found"),
    }

    let cleanup = stage(&bed, || a.cleanup().expect("cleanup runs").success());
    assert!(cleanup.2, "cleanup failed: {}", a.runner_log.text());
    // The next job finds the price cache warm.
    let mut warm = bed.attempt("6002");
    assert!(warm.config().expect("config runs").0.success(), "config failed: {}", warm.log.text());
    let warm_prepare = stage(&bed, || warm.prepare_exec().expect("prepare runs").success());
    assert!(warm_prepare.2, "prepare failed: {}", warm.log.text());
    let warm_cleanup = stage(&bed, || warm.cleanup().expect("cleanup runs").success());
    assert!(warm_cleanup.2, "cleanup failed: {}", warm.runner_log.text());

    let total = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
    let list = |m: &BTreeMap<String, usize>| {
        m.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    };
    println!("API calls per job:");
    println!(
        "  cold cache: prepare {} ({}), cleanup {} ({})",
        total(&prepare_calls),
        list(&prepare_calls),
        total(&cleanup.0),
        list(&cleanup.0)
    );
    println!(
        "  warm cache: prepare {} ({}), cleanup {} ({})",
        total(&warm_prepare.0),
        list(&warm_prepare.0),
        total(&warm_cleanup.0),
        list(&warm_cleanup.0)
    );
    println!("  run: {} calls in {rounds} stages", total(&run_calls));
    println!(
        "instances created: {}, still live: {}",
        bed.emulator.instances().len(),
        bed.emulator.live_instances()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at end: {}", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
}
