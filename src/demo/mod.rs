//! `aliyun-spot demo`: a sample CI job, end to end, against the emulator.
//!
//! It starts the emulator in-process, writes a configuration for it (`config/emulator.toml`
//! with the emulator's address and private directories), and runs a job through the real stage
//! binaries exactly as gitlab-runner calls them ([`gitlab`]), printing the job log. It fails when
//! anything failed or any instance was left running, so it doubles as a smoke test.

pub mod gitlab;
pub mod shell;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::emulator::{Emulator, EmulatorOptions};
use gitlab::{Attempt, Executables, Job};

/// The emulator configuration shipped in the repository.
pub const EMULATOR_TOML: &str = include_str!("../../config/emulator.toml");

/// Options of `aliyun-spot demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Architecture of the sample job (`amd64` or `arm64`).
    #[arg(long, default_value = "amd64")]
    pub arch: String,
    /// The job's script (bash), instead of the sample.
    #[arg(long)]
    pub script: Option<String>,
}

/// Adapts `config/emulator.toml` to an emulator at `endpoint`, with every path under `dir`.
pub fn config_for(base: &str, endpoint: &str, dir: &Path) -> Result<String> {
    let mut doc: toml::Table = base.parse().context("`config/emulator.toml` is not valid TOML")?;
    let mut set = |table: &str, key: &str, value: String| {
        let t = doc
            .entry(table.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table");
        t.insert(key.to_string(), toml::Value::String(value));
    };
    let d = |p: &str| dir.join(p).display().to_string();
    set("aliyun", "endpoint", endpoint.to_string());
    set("credentials", "metadata_endpoint", endpoint.to_string());
    set("self_destruct", "sts_endpoint", endpoint.to_string());
    set("paths", "state_dir", d("state"));
    set("paths", "cache_dir", d("cache"));
    set("paths", "ledger", d("ledger.jsonl"));
    set("runner", "builds_dir", d("builds"));
    set("runner", "cache_dir", d("cache-dir"));
    Ok(toml::to_string(&doc)?)
}

const SAMPLE: &str = r#"echo "Hello from $(hostname): $(nproc) vCPU, $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo) GiB"
uname -srm
for i in 1 2 3; do echo "building step $i"; sleep 0.2; done
echo "done""#;

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root: every emulated instance runs sshd on port 22 of its own loopback address; run `sudo aliyun-spot demo` (or `bash scripts/demo.sh`)");
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let bin_dir = exe.parent().context("the executable has no directory")?;
    let exes = Executables { args: Vec::new(), ..Executables::in_dir(bin_dir) };
    for p in [&exes.config, &exes.prepare, &exes.run, &exes.cleanup] {
        if !p.exists() {
            bail!("`{}` is missing: install all binaries together (`cargo install --locked --path .` or `cargo build --bins`)", p.display());
        }
    }
    let emulator = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        boot_delay: Duration::from_secs(1),
        ..EmulatorOptions::default()
    })?;
    let dir = tempfile::Builder::new().prefix("aliyun-spot-demo").tempdir()?;
    let config = dir.path().join("config.toml");
    crate::fsutil::write_atomic(
        &config,
        config_for(EMULATOR_TOML, &emulator.endpoint(), dir.path())?.as_bytes(),
        0o600,
    )?;
    crate::logging::stdout_line(&format!(
        "Emulator at {} (instances are real sshd processes on loopback addresses)",
        emulator.endpoint()
    ))?;
    crate::logging::stdout_line(&format!("Configuration: {}", config.display()))?;

    let builds = dir.path().join("builds").display().to_string();
    // The sample runs as a job GitLab would send, a hundred predefined variables and all, so
    // its stage scripts are as big as a real runner's; a `--script` is one command.
    let mut job = match args.script.as_deref() {
        Some(script) => Job::new(100, 4242, &builds, script),
        None => Job::realistic(100, 4242, &builds, &SAMPLE.lines().collect::<Vec<_>>()),
    };
    job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".to_string());
    job.variables.push(("ALIYUN_SPOT_ARCH".to_string(), args.arch.clone()));
    let exes = Executables { args: vec!["--config".into(), config.display().to_string()], ..exes };
    let mut base_env = BTreeMap::new();
    base_env.insert(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    );
    base_env.insert("HOME".to_string(), dir.path().display().to_string());

    crate::logging::stdout_line("\n======== job log ========")?;
    let attempt = Attempt::new(exes, base_env, &job)?;
    let log = attempt.log.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let printer = {
        let done = done.clone();
        // Print the log as it grows, like GitLab's job page.
        std::thread::spawn(move || {
            let mut shown = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let text = log.text();
                if text.len() > shown {
                    if crate::logging::stdout_text(&text[shown..]).is_err() {
                        break; // the reader went away; `run` notices at its next line
                    }
                    shown = text.len();
                }
                if finished {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let outcome = attempt.run_job(&job);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = printer.join();
    let outcome = outcome?;
    crate::logging::stdout_line(&format!("======== runner log (cleanup) ========\n{}", outcome.runner_log))?;
    let live = emulator.live_instances();
    let created = emulator.instances().len();
    emulator.shutdown();
    for (stage, exit) in &outcome.stages {
        crate::logging::stdout_line(&format!("stage {stage:<24} {exit:?}"))?;
    }
    crate::logging::stdout_line(&format!("instances created: {created}, still running: {live}"))?;
    if !outcome.passed() {
        bail!("the demo job failed (see the log above)");
    }
    if live != 0 {
        bail!("{live} instance(s) were left running");
    }
    crate::logging::stdout_line("demo passed: the job ran on a spot instance that no longer exists")?;
    Ok(())
}
