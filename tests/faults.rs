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
    let base = include_str!("../config/emulator.toml");
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

/// Command lines (NULs as spaces) of live processes for which `pred` holds. Zombies have an
/// empty command line and so never match.
fn processes_matching(pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if pred(&cmd) {
            out.push(format!("{name}: {}", cmd.trim_end()));
        }
    }
    out
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

/// A job whose stage `index` ends with `tail` (so it is still running when the fault hits).
fn job_with_long_stage(bed: &Bed, job_id: &str, index: usize, tail: &str) -> Job {
    let mut job = bed.job(job_id, "echo BUILD");
    job.stages[index].1.push('\n');
    job.stages[index].1.push_str(tail);
    job
}

/// Runs config, prepare and the stages before `index`, asserting each succeeds.
fn run_up_to(attempt: &mut Attempt, job: &Job, index: usize) {
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    for (stage, body) in &job.stages[..index] {
        assert!(attempt.run_stage(stage, body).unwrap().success(), "{stage}: {}", attempt.log.text());
    }
}

#[test]
fn reclaim_in_the_middle_of_a_random_stage_is_a_system_failure_that_says_so() {
    let seed = Seed::new("reclaim");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..2 {
        let index = rng.gen_range(0..4);
        let delay = Duration::from_millis(rng.gen_range(0..1500));
        let marker = format!("faultmark-reclaim-{}-{round}", std::process::id());
        let job = job_with_long_stage(
            &bed,
            &format!("370{round}"),
            index,
            &format!("echo RECLAIM-POINT\nbash -c 'exec -a {marker} sleep 300'"),
        );
        let (stage, body) = job.stages[index].clone();
        let mut attempt = bed.attempt(&job);
        run_up_to(&mut attempt, &job, index);
        let running = attempt.start_stage(&stage, &body).unwrap();
        assert!(attempt.log.wait_for("RECLAIM-POINT", Duration::from_secs(60)), "{}", attempt.log.text());
        std::thread::sleep(delay);
        let id = bed.emu().instances().last().unwrap().id.clone();
        assert!(bed.emu().reclaim(&id));
        let exit = running.wait().unwrap();
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "stage {stage} after {delay:?}:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{log}");
        assert!(
            errors[0].starts_with(&format!(
                "ERROR: spot instance {id} was reclaimed by Aliyun during stage `{stage}`"
            )),
            "{log}"
        );
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(
            processes_matching(|c| c.contains(&marker)).is_empty(),
            "the job's process survived the reclaim"
        );
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Signals at seeded random points
// ---------------------------------------------------------------------------------------------

/// A bed where prepare takes at least 3 s (boot 2 s, sshd 1 s later), so a kill within the first
/// 2.8 s always lands inside prepare.
fn slow_boot_bed() -> Bed {
    Bed::start(BedOptions {
        boot_delay: Duration::from_secs(2),
        ssh_delay: Duration::from_secs(1),
        ..BedOptions::default()
    })
}

const PREPARE_FLOOR_MS: u64 = 2800;

#[test]
fn sigterm_at_random_points_of_prepare_is_a_system_failure_and_leaves_nothing() {
    let seed = Seed::new("sigterm-prepare");
    let mut rng = seed.rng();
    let bed = slow_boot_bed();
    for round in 0..3 {
        let delay = Duration::from_millis(rng.gen_range(0..PREPARE_FLOOR_MS));
        let job = bed.job(&format!("410{round}"), "true");
        let mut attempt = bed.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
        wait_for_sigterm_handler(prepare.pid());
        std::thread::sleep(delay);
        let exit = prepare.terminate(Duration::from_secs(60)).unwrap();
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "SIGTERM {delay:?} into prepare:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{log}");
        assert!(errors[0].contains("terminated"), "the line says why: {log}");
        assert_eq!(bed.http_live(), 0, "a prepare that gives up releases what it created:\n{log}");
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_prepare_then_cleanup_leaves_nothing() {
    let seed = Seed::new("sigkill-prepare");
    let mut rng = seed.rng();
    let bed = slow_boot_bed();
    for round in 0..4 {
        let delay = Duration::from_millis(rng.gen_range(0..PREPARE_FLOOR_MS));
        let job = bed.job(&format!("420{round}"), "true");
        let mut attempt = bed.attempt(&job);
        assert!(attempt.config().unwrap().0.success());
        let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
        std::thread::sleep(delay);
        prepare.signal_group(libc::SIGKILL);
        assert_eq!(prepare.wait().unwrap(), Exit::Signal(libc::SIGKILL), "{}", attempt.log.text());
        let cleanup = attempt.cleanup().unwrap();
        assert!(
            cleanup.success(),
            "cleanup after SIGKILL {delay:?} into prepare: {}",
            attempt.runner_log.text()
        );
        assert_eq!(
            bed.http_live(),
            0,
            "after SIGKILL {delay:?} into prepare and cleanup: {}",
            attempt.runner_log.text()
        );
    }
    bed.finish();
}

/// Starts the job, runs it up to a random stage that is kept running, and signals that stage's
/// `run` at a random moment; returns the job's attempt and how `run` ended.
fn signal_random_run_stage(
    bed: &Bed,
    rng: &mut StdRng,
    job_id: &str,
    marker: &str,
    sig: i32,
) -> (Attempt, String, Exit) {
    let index = rng.gen_range(0..4);
    let delay = Duration::from_millis(rng.gen_range(0..3000));
    let job = job_with_long_stage(bed, job_id, index, &format!("bash -c 'exec -a {marker} sleep 300'"));
    let (stage, body) = job.stages[index].clone();
    let mut attempt = bed.attempt(&job);
    run_up_to(&mut attempt, &job, index);
    let running: Running = attempt.start_stage(&stage, &body).unwrap();
    if sig == libc::SIGTERM {
        wait_for_sigterm_handler(running.pid());
    }
    std::thread::sleep(delay);
    let exit = if sig == libc::SIGTERM {
        running.terminate(Duration::from_secs(60)).unwrap()
    } else {
        running.signal_group(sig);
        running.wait().unwrap()
    };
    let what = format!("signal {sig} {delay:?} into stage `{stage}` of job {job_id}");
    (attempt, what, exit)
}

#[test]
fn sigterm_at_random_points_of_random_run_stages_is_a_system_failure_and_leaves_nothing() {
    let seed = Seed::new("sigterm-run");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        let marker = format!("faultmark-term-{}-{round}", std::process::id());
        let (attempt, what, exit) =
            signal_random_run_stage(&bed, &mut rng, &format!("430{round}"), &marker, libc::SIGTERM);
        let log = attempt.log.text();
        assert_eq!(exit, Exit::Code(2), "{what}:\n{log}");
        let errors = error_lines(&log);
        assert_eq!(errors.len(), 1, "{what}:\n{log}");
        assert!(
            errors[0].contains("cancelled") || errors[0].contains("terminated"),
            "{what}: the line says why:\n{log}"
        );
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(processes_matching(|c| c.contains(&marker)).is_empty(), "{what}: the job's process survived");
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_random_run_stages_then_cleanup_leaves_nothing() {
    let seed = Seed::new("sigkill-run");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..2 {
        let marker = format!("faultmark-kill-{}-{round}", std::process::id());
        let (attempt, what, exit) =
            signal_random_run_stage(&bed, &mut rng, &format!("440{round}"), &marker, libc::SIGKILL);
        assert_eq!(exit, Exit::Signal(libc::SIGKILL), "{what}");
        assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
        assert!(processes_matching(|c| c.contains(&marker)).is_empty(), "{what}: the job's process survived");
    }
    bed.finish();
}

/// Added to every API answer while cleanup is signalled: its two calls (find by tags, delete)
/// then take at least 1.2 s, and the signal comes within the first second.
const CLEANUP_LATENCY_MS: u64 = 600;

/// Prepares a job, slows the API down so cleanup takes a while, signals cleanup at a random
/// moment, then runs cleanup again (gitlab-runner's next attempt, or the administrator).
fn interrupted_cleanup(bed: &Bed, rng: &mut StdRng, job_id: &str, sig: i32) {
    let job = bed.job(job_id, "true");
    let mut attempt = bed.attempt(&job);
    run_up_to(&mut attempt, &job, 0);
    assert_eq!(bed.http_live(), 1);
    let delay = Duration::from_millis(rng.gen_range(0..1000));
    bed.emu().set_faults(Faults { latency_ms: CLEANUP_LATENCY_MS, ..bed.emu().faults() });
    let cleanup = attempt.spawn(&bed.exes().cleanup, &[], &attempt.runner_log.clone()).unwrap();
    if sig == libc::SIGTERM {
        wait_for_sigterm_handler(cleanup.pid());
    }
    std::thread::sleep(delay);
    let exit = if sig == libc::SIGTERM {
        cleanup.terminate(Duration::from_secs(60)).unwrap()
    } else {
        cleanup.signal_group(sig);
        cleanup.wait().unwrap()
    };
    let what = format!("signal {sig} {delay:?} into cleanup of job {job_id}");
    assert_ne!(
        exit,
        Exit::Code(0),
        "{what}: an interrupted cleanup does not claim success: {}",
        attempt.runner_log.text()
    );
    if sig == libc::SIGTERM {
        assert_eq!(exit, Exit::Code(2), "{what}: {}", attempt.runner_log.text());
        assert_eq!(error_lines(&attempt.runner_log.text()).len(), 1, "{what}: {}", attempt.runner_log.text());
    }
    bed.emu().set_faults(Faults { latency_ms: 0, ..bed.emu().faults() });
    let again = attempt.cleanup().unwrap();
    assert!(again.success(), "{what}: the next cleanup finishes: {}", attempt.runner_log.text());
    assert_eq!(bed.http_live(), 0, "{what}: {}", attempt.runner_log.text());
}

#[test]
fn sigterm_at_random_points_of_cleanup_then_cleanup_again_leaves_nothing() {
    let seed = Seed::new("sigterm-cleanup");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        interrupted_cleanup(&bed, &mut rng, &format!("450{round}"), libc::SIGTERM);
    }
    bed.finish();
}

#[test]
fn sigkill_at_random_points_of_cleanup_then_cleanup_again_leaves_nothing() {
    let seed = Seed::new("sigkill-cleanup");
    let mut rng = seed.rng();
    let bed = Bed::start(BedOptions::default());
    for round in 0..3 {
        interrupted_cleanup(&bed, &mut rng, &format!("460{round}"), libc::SIGKILL);
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn twenty_concurrent_jobs_under_throttling_all_pass_without_duplicates() {
    let _seed = Seed::new("concurrency");
    const JOBS: usize = 20;
    let bed = Bed::start(BedOptions {
        faults: Faults { throttle_every: Some(3), ..Faults::default() },
        overrides: SHORT_BACKOFF.to_vec(),
        ..BedOptions::default()
    });
    let ids: Vec<String> = (0..JOBS).map(|i| format!("{}", 5000 + i)).collect();
    let outcomes: Vec<(String, JobOutcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let bed = &bed;
                s.spawn(move || {
                    // Each job in a project of its own: the emulated instances share this
                    // machine's disk, where real ones each have their own.
                    let builds = bed.dir.path().join("builds").display().to_string();
                    let job = Job::in_project(
                        42,
                        &format!("group/p{id}"),
                        id.parse().unwrap(),
                        &builds,
                        &format!("echo CONCURRENT-{id}"),
                    );
                    (id.clone(), bed.attempt(&job).run_job(&job).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a job thread panicked")).collect()
    });
    for (id, out) in &outcomes {
        assert_passed(out, &format!("CONCURRENT-{id}"));
    }
    assert_eq!(bed.http_live(), 0);

    let requests = bed.http_requests();
    let throttled = requests.iter().filter(|r| r["code"] == "Throttling.User").count();
    assert!(throttled >= JOBS, "throttling really happened: {throttled} of {}", requests.len());

    // One instance per job tag.
    let job_tag = bed.loaded_config().safety.tag_key("job");
    let instances = bed.emu().instances();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for i in &instances {
        *per_job.entry(i.tags.get(&job_tag).cloned().unwrap_or_default()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(per_job, expected, "instances per `{job_tag}` tag");

    // One instance per ClientToken; a token sent more than once only because of a retry.
    let mut per_token: BTreeMap<String, usize> = BTreeMap::new();
    for i in &instances {
        *per_token.entry(i.client_token.clone().expect("every instance has a ClientToken")).or_default() += 1;
    }
    assert_eq!(per_token.len(), JOBS, "{per_token:?}");
    assert!(per_token.values().all(|n| *n == 1), "{per_token:?}");
    let by_token = run_instances_by_token(&requests);
    assert_eq!(by_token.keys().collect::<BTreeSet<_>>(), per_token.keys().collect::<BTreeSet<_>>());
    for (token, (sent, ok)) in &by_token {
        assert!(*ok >= 1, "ClientToken {token}: RunInstances never succeeded");
        if *sent > 1 {
            assert!(ok < sent, "ClientToken {token}: sent {sent} times without a failed attempt to retry");
        }
    }
    bed.finish();
}

// ---------------------------------------------------------------------------------------------
// Aliyun's published RunInstances errors (tests/data/runinstances-errors.tsv), one per class
// ---------------------------------------------------------------------------------------------

/// The offers prepare will walk, cheapest first (same configuration, same catalogue).
fn ranked_offers(bed: &Bed) -> Vec<aliyun_spot_executor::selection::Offer> {
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let shape = cfg.shape(cfg.instance.default_arch).clone();
    aliyun_spot_executor::offers::ranked(&client, &cfg, &shape, false).unwrap()
}

fn run_instances_requests(bed: &Bed) -> Vec<Value> {
    bed.http_requests().into_iter().filter(|r| r["action"] == "RunInstances").collect()
}

#[test]
fn a_type_or_zone_condition_moves_to_the_next_offer() {
    let _seed = Seed::new("run-error-next-offer");
    let bed = Bed::start(BedOptions::default());
    let offers = ranked_offers(&bed);
    let (a, b) = (&offers[0], &offers[1]);
    let mut faults = bed.emu().faults();
    faults.run_error = vec![format!("{}@{}=InvalidInstanceType.ZoneNotSupported", a.instance_type, a.zone)];
    bed.emu().set_faults(faults);

    let job = bed.job("3801", "echo ON-THE-SECOND-OFFER");
    let out = bed.attempt(&job).run_job(&job).unwrap();
    assert_passed(&out, "ON-THE-SECOND-OFFER");
    let line = format!(
        "{} in {}: type not offered in this zone (InvalidInstanceType.ZoneNotSupported), trying the next offer",
        a.instance_type, a.zone
    );
    assert!(out.job_log.lines().any(|l| l == line), "no line `{line}`:\n{}", show(&out));
    let runs = run_instances_requests(&bed);
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(
        (runs[0]["status"].as_u64(), runs[0]["code"].as_str()),
        (Some(403), Some("InvalidInstanceType.ZoneNotSupported"))
    );
    assert_eq!(runs[1]["status"], 200);
    // AutoReleaseTime is computed for each offer: whole minutes, at least 35 minutes ahead.
    for r in &runs {
        let sent = r["params"]["AutoReleaseTime"].as_str().expect("AutoReleaseTime sent");
        assert!(sent.ends_with(":00Z"), "{sent}");
        let at = time::OffsetDateTime::parse(sent, &time::format_description::well_known::Rfc3339).unwrap();
        let asked = time::OffsetDateTime::parse(
            r["time"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(at - asked >= time::Duration::minutes(34), "{sent} for a request at {asked}");
    }
    let created = bed.emu().instances();
    assert_eq!(created.len(), 1);
    assert_eq!(
        (created[0].instance_type.as_str(), created[0].zone.as_str()),
        (b.instance_type.as_str(), b.zone.as_str())
    );
    bed.finish();
}

#[test]
fn an_account_problem_stops_at_the_first_offer_with_one_line() {
    let _seed = Seed::new("run-error-stop");
    let bed = Bed::start(BedOptions {
        faults: Faults {
            run_error: vec!["*@*=InvalidAccountStatus.NotEnoughBalance".into()],
            ..Faults::default()
        },
        ..BedOptions::default()
    });
    let job = bed.job("3802", "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    let prepare = attempt.prepare().unwrap();
    let log = attempt.log.text();
    assert_eq!(prepare, Exit::Code(2), "a system failure:\n{log}");
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    let runs = run_instances_requests(&bed);
    assert_eq!(runs.len(), 1, "no walk through every offer: {runs:#?}");
    let request_id = runs[0]["request_id"].as_str().unwrap_or_default().to_string();
    assert!(
        errors[0].ends_with(&format!(
            "creating the instance failed: ECS `RunInstances` failed: InvalidAccountStatus.NotEnoughBalance: Your account does not have enough balance. (RequestId: {request_id}); top up the Aliyun account (it has too little balance or an outstanding payment)"
        )),
        "{log}"
    );
    assert!(!log.contains("trying the next offer"), "{log}");
    assert!(bed.emu().instances().is_empty());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    bed.finish();
}

#[test]
fn a_public_ip_stock_out_stops_with_the_published_answer() {
    // Documented for instance creation in the ECS API reference (CreateInstance's error table;
    // provenance and class in tests/data/runinstances-errors.tsv): the public IP stock of the
    // region or billing method, which no other offer changes.
    let code = "InvalidOperation.PublicIpAddressNoStock";
    let spec = format!("*@*={code}");
    // The check of `--run-error` and `POST /_emulator/faults`.
    assert_eq!(Faults { run_error: vec![spec.clone()], ..Faults::default() }.validate(), Ok(()));
    let _seed = Seed::new("run-error-public-ip");
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec![spec], ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job("3805", "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    let prepare = attempt.prepare().unwrap();
    let log = attempt.log.text();
    assert_eq!(prepare, Exit::Code(2), "a system failure:\n{log}");
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    let runs = run_instances_requests(&bed);
    assert_eq!(runs.len(), 1, "no walk through every offer: {runs:#?}");
    assert_eq!((runs[0]["status"].as_u64(), runs[0]["code"].as_str()), (Some(403), Some(code)));
    let request_id = runs[0]["request_id"].as_str().unwrap_or_default();
    assert!(
        errors[0].contains(&format!(
            "creating the instance failed: ECS `RunInstances` failed: {code}: The public IP address for the \
             specified Region or ChargeType of the instance is out of stock. Please try another Region or ChargeType. \
             (RequestId: {request_id}); "
        )),
        "{log}"
    );
    assert!(!log.contains("trying the next offer"), "{log}");
    assert!(bed.emu().instances().is_empty());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    bed.finish();
}

#[test]
fn a_request_still_in_progress_is_sent_again_with_the_same_client_token() {
    let _seed = Seed::new("run-error-retry");
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec!["*@*=LastTokenProcessing".into()], ..Faults::default() },
        ..BedOptions::default()
    });
    let job = bed.job("3803", "echo AFTER-THE-TOKEN");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    let prepare = attempt.spawn(&bed.exes().prepare, &[], &attempt.log.clone()).unwrap();
    // More answers than one round of the client's retry policy, then the request completes.
    let in_progress = || {
        bed.emu()
            .requests()
            .iter()
            .filter(|r| {
                r.action.as_deref() == Some("RunInstances")
                    && r.code.as_deref() == Some("LastTokenProcessing")
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while in_progress() < 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(in_progress() >= 8, "{}", attempt.log.text());
    bed.emu().set_faults(Faults::default());
    assert_eq!(prepare.wait().unwrap(), Exit::Code(0), "{}", attempt.log.text());
    assert!(!attempt.log.text().contains("trying the next offer"), "{}", attempt.log.text());
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    let tokens = run_instances_by_token(&bed.http_requests());
    assert_eq!(tokens.len(), 1, "one ClientToken, the same call: {tokens:?}");
    assert!(tokens.values().all(|(n, ok)| *n >= 9 && *ok == 1), "{tokens:?}");
    assert_eq!(bed.emu().instances().len(), 1);
    bed.finish();
}

#[test]
fn ecs_busy_until_the_prepare_deadline_ends_prepare_with_one_line_and_no_other_offer() {
    let _seed = Seed::new("run-error-busy");
    let bed = Bed::start(BedOptions {
        faults: Faults { run_error: vec!["*@*=ServiceUnavailable".into()], ..Faults::default() },
        // Rounds of the client's retries (10 ms backoff) 2 s apart until a 5 s prepare deadline.
        overrides: vec![
            ("aliyun", "retry_base_delay_ms", "10"),
            ("ssh", "boot_timeout", "1s"),
            ("timeouts", "prepare", "5s"),
        ],
        ..BedOptions::default()
    });
    let job = bed.job("3804", "echo NEVER-RUNS");
    let mut attempt = bed.attempt(&job);
    assert!(attempt.config().unwrap().0.success());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    let errors = error_lines(&log);
    assert_eq!(errors.len(), 1, "one clear line:\n{log}");
    assert!(errors[0].starts_with("ERROR: creating the instance failed: "), "{log}");
    assert!(errors[0].ends_with("; ECS stayed busy until prepare had to stop, retry the job later"), "{log}");
    assert!(!log.contains("trying the next offer"), "a busy API is not a capacity error:\n{log}");
    // The same request, in whole rounds of the client's policy, more than one round.
    let tokens = run_instances_by_token(&bed.http_requests());
    assert_eq!(tokens.len(), 1, "one offer, one ClientToken: {tokens:?}");
    let per_round = RetryPolicy::default().max_attempts as usize;
    let (sent, ok) = tokens.values().next().copied().unwrap_or_default();
    assert!(
        sent >= 2 * per_round && sent % per_round == 0 && ok == 0,
        "{sent} RunInstances, {ok} answered 200"
    );
    assert!(bed.emu().instances().is_empty());
    bed.finish();
}

#[test]
fn a_booting_instance_is_deleted_once_ecs_allows_it() {
    let _seed = Seed::new("initializing");
    let bed = Bed::start(BedOptions {
        faults: Faults { initializing: Duration::from_secs(3), ..Faults::default() },
        ..BedOptions::default()
    });
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let ids = client
        .run_instances(&crate::emulator_run_request(
            "ci-runner-amd64-spot-initializing",
            "faults-initializing-1",
        ))
        .unwrap();
    let created = time::OffsetDateTime::now_utc();
    // Right after RunInstances: ECS refuses while the instance initializes; the release waits.
    aliyun_spot_executor::stages::release_instance(&client, &ids[0], Some(created)).unwrap();
    let deletes: Vec<Value> =
        bed.http_requests().into_iter().filter(|r| r["action"] == "DeleteInstance").collect();
    assert!(deletes.len() >= 2, "{deletes:#?}");
    let (last, refused) = deletes.split_last().unwrap();
    assert!(
        refused.iter().all(|r| r["status"] == 403 && r["code"] == "IncorrectInstanceStatus.Initializing"),
        "{deletes:#?}"
    );
    assert_eq!(last["status"], 200, "{deletes:#?}");
    bed.finish();
}

#[test]
fn not_found_right_after_creation_means_not_visible_yet() {
    let _seed = Seed::new("not-visible-yet");
    let bed = Bed::start(BedOptions::default());
    let cfg = bed.loaded_config();
    let client = aliyun_spot_executor::offers::client(&cfg).unwrap();
    let not_found = |bed: &Bed| {
        bed.http_requests()
            .into_iter()
            .filter(|r| r["action"] == "DeleteInstance" && r["code"] == "InvalidInstanceId.NotFound")
            .count()
    };
    // Long after creation (or unknown): NotFound is "already gone", at once.
    aliyun_spot_executor::stages::release_instance(&client, "i-bp1notvisibleyet0", None).unwrap();
    assert_eq!(not_found(&bed), 1);
    // Within the grace period after RunInstances: asked again until the grace period is over.
    let grace = aliyun_spot_executor::stages::VISIBILITY_GRACE;
    let created = time::OffsetDateTime::now_utc() - (grace - Duration::from_secs(5));
    aliyun_spot_executor::stages::release_instance(&client, "i-bp1notvisibleyet0", Some(created)).unwrap();
    assert!(not_found(&bed) >= 3, "{:#?}", bed.http_requests());
    bed.finish();
}

#[test]
fn the_emulator_rounds_auto_release_time_down_to_the_minute_before_checking_it() {
    use aliyun_spot_executor::ecs::RunInstancesRequest;
    let bed = Bed::start(BedOptions::default());
    let client = aliyun_spot_executor::offers::client(&bed.loaded_config()).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let minute = now.replace_second(0).unwrap().replace_nanosecond(0).unwrap();
    let request = |at: time::OffsetDateTime, token: &str| RunInstancesRequest {
        auto_release_time: Some(at),
        ..crate::emulator_run_request("ci-runner-amd64-spot-autorelease", token)
    };
    // 30 min 59 s ahead of the current minute is more than 30 minutes ahead of now, but ECS
    // reads it as 30 minutes ahead of the current minute: less than 30 minutes from now.
    let e =
        client.run_instances(&request(minute + time::Duration::seconds(30 * 60 + 59), "ar-1")).unwrap_err();
    assert_eq!(e.code(), Some("InvalidAutoReleaseTime.ValueNotSupported"), "{e}");
    assert!(bed.emu().instances().is_empty());
    bed.finish();
}

#[test]
fn run_error_and_initializing_are_set_through_the_faults_endpoint() {
    let bed = Bed::start(BedOptions::default());
    let url = format!("{}/_emulator/faults", bed.endpoint);
    let post = |body: &str| match ureq::post(&url).send_string(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("POST {url}: {e}"),
    };
    let (status, body) = post(r#"{"run-error": ["*@*=Made.Up"]}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("`Made.Up` is not in the published RunInstances error table"), "{body}");
    let (status, body) = post(r#"{"run-error": ["ecs.c7.*@b=Zone.NotOnSale"], "initializing": 0}"#);
    assert_eq!(status, 200, "{body}");
    let faults = bed.http("/_emulator/faults");
    assert_eq!(faults["run-error"], serde_json::json!(["ecs.c7.*@b=Zone.NotOnSale"]));
    assert_eq!(faults["initializing"], serde_json::json!(0.0));
    assert_eq!(bed.emu().faults().initializing, Duration::ZERO);
    bed.finish();
}
