//! Fault injection and concurrency: the real stage binaries, driven as gitlab-runner drives
//! them, against the emulator with faults (throttling, 5xx bursts, slow answers, stock-out,
//! instances that never boot, a late sshd, spot reclaim) and with SIGTERM / SIGKILL at seeded
//! random points of each stage.
//!
//! After every scenario ([`Bed::finish`]): the emulator's HTTP inspection endpoint shows zero
//! live instances, every job passed or failed with the right exit code and a clear line, and no
//! sshd of the emulator is left, before and after the emulator shuts down.
//!
//! Randomness is seeded: every scenario derives its own generator from a base seed
//! (`ALIYUN_SPOT_FAULT_SEED`, else [`DEFAULT_SEED`]) and its name, and prints the base seed when
//! it fails, so `ALIYUN_SPOT_FAULT_SEED=<seed> cargo test --test tests faults::` replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aliyun_spot_executor::demo::gitlab::{Attempt, Executables, Exit, Job, JobOutcome, Running};
use aliyun_spot_executor::ecs::RetryPolicy;
use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions, Faults};
use aliyun_spot_executor::env::Env;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::processes_matching;

/// The base seed when `ALIYUN_SPOT_FAULT_SEED` is not set.
const DEFAULT_SEED: u64 = 20_250_917;

/// A scenario's seed; prints how to replay the scenario when the test fails.
struct Seed {
    name: &'static str,
    base: u64,
}

impl Seed {
    fn new(name: &'static str) -> Seed {
        let env = Env::from_process();
        let base = match env.get("ALIYUN_SPOT_FAULT_SEED") {
            Some(s) => s.trim().parse().expect("ALIYUN_SPOT_FAULT_SEED is an unsigned integer"),
            None => DEFAULT_SEED,
        };
        Seed { name, base }
    }

    /// This scenario's own seed: the base mixed with the name (FNV-1a), so scenarios running
    /// in any order or in parallel draw the same numbers for the same base.
    fn value(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.base;
        for b in self.name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.value())
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "fault scenario `{}` failed with ALIYUN_SPOT_FAULT_SEED={} (replay: ALIYUN_SPOT_FAULT_SEED={} cargo test --test tests faults::)",
                self.name, self.base, self.base
            );
        }
    }
}

/// How to set up a scenario.
struct BedOptions {
    faults: Faults,
    boot_delay: Duration,
    ssh_delay: Duration,
    /// `(table, key, value)` set in the configuration on top of `config/emulator.toml`.
    overrides: Vec<(&'static str, &'static str, &'static str)>,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions {
            faults: Faults::default(),
            boot_delay: Duration::from_millis(300),
            ssh_delay: Duration::from_millis(100),
            overrides: Vec::new(),
        }
    }
}

/// One scenario's world: an emulator, a configuration for it, private directories.
struct Bed {
    emulator: Option<Emulator>,
    dir: tempfile::TempDir,
    config: PathBuf,
    endpoint: String,
    work_dir: PathBuf,
}

impl Bed {
    fn start(opts: BedOptions) -> Bed {
        let emulator = Emulator::start(EmulatorOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            boot_delay: opts.boot_delay,
            ssh_delay: opts.ssh_delay,
            faults: opts.faults,
            ..EmulatorOptions::default()
        })
        .expect("emulator starts");
        let dir = crate::private_tempdir();
        let config = dir.path().join("config.toml");
        let text = config_with(&emulator.endpoint(), dir.path(), &opts.overrides);
        std::fs::write(&config, text).unwrap();
        let endpoint = emulator.endpoint();
        let work_dir = emulator.work_dir().to_path_buf();
        Bed { emulator: Some(emulator), dir, config, endpoint, work_dir }
    }

    fn emu(&self) -> &Emulator {
        self.emulator.as_ref().expect("the emulator is running")
    }

    fn exes(&self) -> Executables {
        Executables {
            config: PathBuf::from(env!("CARGO_BIN_EXE_config")),
            prepare: PathBuf::from(env!("CARGO_BIN_EXE_prepare")),
            run: PathBuf::from(env!("CARGO_BIN_EXE_run")),
            cleanup: PathBuf::from(env!("CARGO_BIN_EXE_cleanup")),
            args: vec!["--config".into(), self.config.display().to_string()],
        }
    }

    fn base_env(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
        m.insert("HOME".to_string(), self.dir.path().display().to_string());
        m
    }

    fn job(&self, job_id: &str, script: &str) -> Job {
        let builds = self.dir.path().join("builds").display().to_string();
        Job::new(42, job_id.parse().expect("a numeric job id"), &builds, script)
    }

    fn attempt(&self, job: &Job) -> Attempt {
        Attempt::new(self.exes(), self.base_env(), job).unwrap().with_retry_interval(crate::RETRY_INTERVAL)
    }

    /// The validated configuration the stages read.
    fn loaded_config(&self) -> aliyun_spot_executor::config::Config {
        let text = std::fs::read_to_string(&self.config).unwrap();
        aliyun_spot_executor::config::from_toml(
            &text,
            Some(&self.config),
            &Env::from_map(Vec::<(String, String)>::new()),
        )
        .expect("the test configuration is valid")
    }

    /// `GET <endpoint><path>` as JSON.
    fn http(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.endpoint);
        let resp = ureq::get(&url)
            .timeout(Duration::from_secs(60))
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let text = resp.into_string().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
    }

    /// Live instances as the inspection endpoint reports them (summary and list must agree).
    fn http_live(&self) -> usize {
        let summary = self.http("/_emulator/summary");
        let by_summary = summary["live_instances"].as_u64().expect("summary has live_instances") as usize;
        let list = self.http("/_emulator/instances");
        let by_list =
            list.as_array().expect("a list").iter().filter(|i| i["live"] == Value::Bool(true)).count();
        assert_eq!(by_summary, by_list, "summary and instance list disagree: {summary} vs {list}");
        by_list
    }

    /// The request log from the inspection endpoint.
    fn http_requests(&self) -> Vec<Value> {
        self.http("/_emulator/requests").as_array().expect("a list").clone()
    }

    /// Asserts that nothing is left: zero live instances (inspection endpoint), no sshd of this
    /// emulator, then shuts the emulator down and checks for sshd processes again.
    fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.http_live() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.http_live(), 0, "instances left alive: {:#}", self.http("/_emulator/instances"));
        assert_eq!(
            sshds_under(&self.work_dir),
            Vec::<String>::new(),
            "sshd processes left after the scenario"
        );
        self.emulator.take().expect("running").shutdown();
        assert_eq!(sshds_under(&self.work_dir), Vec::<String>::new(), "sshd processes left after shutdown");
    }
}

/// `config/emulator.toml` for an emulator at `endpoint`, paths under `dir`, plus overrides (an
/// integer where the value is one, else a string).
fn config_with(endpoint: &str, dir: &Path, overrides: &[(&str, &str, &str)]) -> String {
    let base = include_str!("../../config/emulator.toml");
    let text = crate::emulator_config(base, endpoint, dir);
    let mut doc: toml::Table = text.parse().unwrap();
    for (table, key, value) in overrides {
        let t = doc
            .entry(table.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table");
        let value =
            value.parse().map_or_else(|_| toml::Value::String(value.to_string()), toml::Value::Integer);
        t.insert(key.to_string(), value);
    }
    toml::to_string(&doc).unwrap()
}

/// Command lines of live sshd processes started from files under `work_dir`.
fn sshds_under(work_dir: &Path) -> Vec<String> {
    let needle = work_dir.display().to_string();
    processes_matching(|cmd| cmd.contains("sshd") && cmd.contains(&needle))
}

/// Waits until the process has a SIGTERM handler installed, i.e. the stage's own code runs.
/// A signal before that point kills the process the default way, outside the driver's reach.
fn wait_for_sigterm_handler(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .unwrap_or(0);
        if caught & (1 << (libc::SIGTERM - 1)) != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} never installed its SIGTERM handler");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn show(out: &JobOutcome) -> String {
    format!("JOB LOG:\n{}\nRUNNER LOG:\n{}\nSTAGES: {:?}\n", out.job_log, out.runner_log, out.stages)
}

/// Every whole line of `log` starting with `ERROR: `.
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("ERROR: ")).collect()
}

fn assert_passed(out: &JobOutcome, marker: &str) {
    assert!(out.passed(), "the job failed:\n{}", show(out));
    assert!(
        out.job_log.lines().any(|l| l == marker),
        "the script's output `{marker}` is missing:\n{}",
        show(out)
    );
    assert!(out.runner_log.lines().any(|l| l.starts_with("Released instance i-")), "{}", show(out));
    assert!(error_lines(&out.job_log).is_empty(), "a passing job has no error line:\n{}", show(out));
}

/// RunInstances requests per ClientToken, with how many of them were answered 200.
fn run_instances_by_token(requests: &[Value]) -> BTreeMap<String, (usize, usize)> {
    let mut m: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in requests.iter().filter(|r| r["action"] == "RunInstances") {
        let token = r["params"]["ClientToken"].as_str().unwrap_or_default().to_string();
        let e = m.entry(token).or_default();
        e.0 += 1;
        if r["status"] == 200 {
            e.1 += 1;
        }
    }
    m
}

fn codes(requests: &[Value]) -> Vec<String> {
    requests.iter().map(|r| r["code"].as_str().unwrap_or("").to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// API faults
// ---------------------------------------------------------------------------------------------

/// The ECS client's backoff starting at 10 ms instead of 200 ms: the emulator's throttling
/// needs no real pause, and the retries are the same.
const SHORT_BACKOFF: [(&str, &str, &str); 1] = [("aliyun", "retry_base_delay_ms", "10")];

#[test]
fn throttling_on_every_third_call_is_retried_and_jobs_pass() {
    let _seed = Seed::new("throttling");
    let bed = Bed::start(BedOptions {
        faults: Faults { throttle_every: Some(3), ..Faults::default() },
        overrides: SHORT_BACKOFF.to_vec(),
        ..BedOptions::default()
    });
    for id in ["3101", "3102"] {
        let job = bed.job(id, &format!("echo THROTTLED-JOB-{id}"));
        let out = bed.attempt(&job).run_job(&job).unwrap();
        assert_passed(&out, &format!("THROTTLED-JOB-{id}"));
    }
    let requests = bed.http_requests();
    let throttled = requests.iter().filter(|r| r["code"] == "Throttling.User").count();
    // Every request is signed correctly, so exactly every third one is throttled.
    assert_eq!(throttled, requests.len() / 3, "{:?}", codes(&requests));
    assert!(throttled >= 5, "the throttling really happened: {:?}", codes(&requests));
    assert!(requests.iter().filter(|r| r["code"] == "Throttling.User").all(|r| r["status"] == 400));
    for (token, (sent, ok)) in run_instances_by_token(&requests) {
        assert_eq!(ok, 1, "ClientToken {token}: one successful RunInstances");
        assert!(sent >= 1);
    }
    assert_eq!(bed.emu().instances().len(), 2, "one instance per job");
    bed.finish();
}

/// A seed (from `from` on) for which the emulator's 5xx dice, `draws` requests long, show
/// bursts (two or more failures in a row) but never as many failures in a row as the client
/// has attempts: the emulator draws `StdRng::seed_from_u64(seed).gen::<f64>() < rate` once per
/// authenticated request, and one job's requests are sequential, so with such a seed every call
/// is retried through its bursts, deterministically.
fn burst_seed(from: u64, rate: f64, draws: usize, attempts: usize) -> u64 {
    (from..)
        .find(|s| {
            let mut rng = StdRng::seed_from_u64(*s);
            let (mut run, mut longest) = (0, 0);
            for _ in 0..draws {
                run = if rng.gen::<f64>() < rate { run + 1 } else { 0 };
                longest = longest.max(run);
            }
            (2..attempts).contains(&longest)
        })
        .expect("a seed exists")
}

#[test]
fn server_error_bursts_are_retried_and_the_job_passes() {
    let seed = Seed::new("5xx-bursts");
    let rate = 0.3;
    let draws = 600;
    let attempts = RetryPolicy::default().max_attempts as usize;
    let dice = burst_seed(seed.value(), rate, draws, attempts);
    let bed = Bed::start(BedOptions {
        faults: Faults { error_rate: rate, seed: dice, ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job("3201", "echo SURVIVED-5XX");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "SURVIVED-5XX");
    let requests = bed.http_requests();
    assert!(
        requests.len() <= draws,
        "the job made {} requests, more than the {draws} the seed was checked for",
        requests.len()
    );
    let failed: Vec<&Value> = requests.iter().filter(|r| r["status"] == 503).collect();
    assert!(failed.iter().all(|r| r["code"] == "ServiceUnavailable"));
    assert!(failed.len() >= 3, "5xx answers really happened: {:?}", codes(&requests));
    // A burst: two 503 answers in a row, each retried.
    let burst = requests.windows(2).any(|w| w[0]["status"] == 503 && w[1]["status"] == 503);
    assert!(burst, "no burst of 5xx answers: {:?}", codes(&requests));
    assert_eq!(bed.emu().instances().len(), 1);
    bed.finish();
}

#[test]
fn an_outage_longer_than_the_clients_retries_during_creation_is_outlasted_with_one_instance() {
    let _seed = Seed::new("outage");
    let bed = Bed::start(BedOptions::default());
    // A first job fills the price cache, so the second prepare goes straight to RunInstances.
    let warm = bed.job("3201", "echo WARM");
    assert_passed(&bed.attempt(&warm).run_job(&warm).unwrap(), "WARM");
    let job = bed.job("3202", "echo AFTER-THE-OUTAGE");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    bed.emu().set_faults(Faults { error_rate: 1.0, ..Faults::default() });
    let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
    // More failed RunInstances than one round of the client's retry policy allows…
    let failed_creates = || {
        bed.emu()
            .requests()
            .iter()
            .filter(|r| r.action.as_deref() == Some("RunInstances") && r.status == 503)
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while failed_creates() < 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(failed_creates() >= 8, "the outage did not reach RunInstances: {}", attempt.log.text());
    // …then the API recovers, and the same ClientToken creates exactly one instance.
    bed.emu().set_faults(Faults::default());
    assert_eq!(prepare.wait().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    for (stage, body) in &job.stages {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{}", attempt.log.text());
    }
    assert!(attempt.log.text().lines().any(|l| l == "AFTER-THE-OUTAGE"), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    let tokens = run_instances_by_token(&bed.http_requests());
    assert_eq!(tokens.len(), 2, "one ClientToken per job: {tokens:?}");
    assert!(tokens.values().all(|(_, ok)| *ok == 1), "{tokens:?}");
    assert_eq!(bed.emu().instances().len(), 2);
    bed.finish();
}

#[test]
fn slow_answers_do_not_fail_the_job() {
    let _seed = Seed::new("latency");
    let bed = Bed::start(BedOptions {
        faults: Faults { latency_ms: 250, ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job("3301", "echo SLOW-BUT-FINE");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "SLOW-BUT-FINE");
    assert!(bed.http_requests().iter().all(|r| r["status"] == 200), "latency alone fails nothing");
    bed.finish();
}

#[test]
fn stock_out_on_the_two_best_offers_falls_back_to_the_third() {
    let _seed = Seed::new("stock-out");
    let bed = Bed::start(BedOptions::default());
    // The ranking prepare will see: the same configuration, the same (now cached) catalogue.
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let shape = cfg.shape(cfg.instance.default_arch).clone();
    let offers = aliyun_spot_executor::offers::ranked(&client, &cfg, &shape, false).unwrap();
    assert!(offers.len() >= 3, "the emulator sells at least three fitting offers: {offers:?}");
    let (a, b, c) = (&offers[0], &offers[1], &offers[2]);
    let mut faults = bed.emu().faults();
    faults.no_stock =
        vec![format!("{}@{}", a.instance_type, a.zone), format!("{}@{}", b.instance_type, b.zone)];
    bed.emu().set_faults(faults);

    let job = bed.job("3401", "echo ON-THE-THIRD-OFFER");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "ON-THE-THIRD-OFFER");
    for skipped in [a, b] {
        let prefix = format!("{} in {}: out of stock (", skipped.instance_type, skipped.zone);
        assert!(
            out.job_log.lines().any(|l| l.starts_with(&prefix) && l.ends_with("), trying the next offer")),
            "no line for the skipped offer `{prefix}…`:\n{}",
            show(&out)
        );
    }
    let created = bed.emu().instances();
    assert_eq!(created.len(), 1, "only the third offer was created");
    assert_eq!(
        (created[0].instance_type.as_str(), created[0].zone.as_str()),
        (c.instance_type.as_str(), c.zone.as_str())
    );
    let runs: Vec<Value> =
        bed.http_requests().into_iter().filter(|r| r["action"] == "RunInstances").collect();
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert!(runs[..2].iter().all(|r| r["code"] == "OperationDenied.NoStock"), "{runs:#?}");
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Instance faults
// ---------------------------------------------------------------------------------------------

#[test]
fn an_instance_that_never_boots_fails_prepare_which_releases_it() {
    let _seed = Seed::new("never-boot");
    let bed = Bed::start(BedOptions {
        faults: Faults { never_boot: vec!["*@*".into()], ..Faults::default() },
        // The shortest boot timeout the configuration accepts: the instance never boots anyway.
        overrides: vec![("ssh", "boot_timeout", "1s")],
        ..BedOptions::default()
    });
    let job = bed.job("3501", "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    let prepare = attempt.prepare().unwrap();
    let log = attempt.log.text();
    assert_eq!(prepare, Exit::Code(2), "a boot that never ends is a system failure:\n{log}");
    let id = bed.emu().instances().first().map(|i| i.id.clone()).expect("an instance was created");
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    assert!(errors[0].contains(&format!("instance {id} did not reach Running within")), "{log}");
    assert!(log.lines().any(|l| l == format!("Releasing instance {id} because prepare failed")), "{log}");
    assert_eq!(bed.http_live(), 0, "prepare released the instance itself");
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    assert!(!log.contains("NEVER-RUNS"));
    bed.finish();
}

#[test]
fn sshd_that_comes_up_late_is_waited_for() {
    let _seed = Seed::new("late-sshd");
    let bed = Bed::start(BedOptions { ssh_delay: Duration::from_secs(4), ..BedOptions::default() });
    let job = bed.job("3601", "echo SSH-CAME-LATE");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "SSH-CAME-LATE");
    assert!(out.job_log.lines().any(|l| l.contains("waiting for SSH")), "{}", show(&out));
    bed.finish();
}

mod run_errors;
mod signals;
