//! What the benchmarks share: an emulator with a configuration for it, a job attempt driving
//! the real stage binaries, and API calls counted per action from the emulator's request log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use aliyun_spot_executor::demo::gitlab::{Attempt, Executables, Job};
use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions};

/// An emulator with a configuration for it (from `config/emulator.toml`) in a private directory.
pub struct Bed {
    pub emulator: Emulator,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Bed {
    pub fn start() -> Bed {
        let emulator = Emulator::start(EmulatorOptions {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            boot_delay: Duration::from_millis(300),
            ssh_delay: Duration::from_millis(100),
            ..EmulatorOptions::default()
        })
        .expect("the emulator starts");
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = dir.path().join("config.toml");
        let text = aliyun_spot_executor::demo::config_for(
            aliyun_spot_executor::demo::EMULATOR_TOML,
            &emulator.endpoint(),
            dir.path(),
        )
        .expect("emulator.toml adapts");
        std::fs::write(&config, text).expect("configuration written");
        Bed { emulator, dir, config }
    }

    /// Requests per action so far.
    pub fn calls(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for r in self.emulator.requests() {
            *m.entry(r.action.unwrap_or_else(|| "(none)".into())).or_insert(0) += 1;
        }
        m
    }

    /// The stage binaries as gitlab-runner is configured with them, with this bed's configuration.
    pub fn executables(&self) -> Executables {
        Executables {
            config: PathBuf::from(env!("CARGO_BIN_EXE_config")),
            prepare: PathBuf::from(env!("CARGO_BIN_EXE_prepare")),
            run: PathBuf::from(env!("CARGO_BIN_EXE_run")),
            cleanup: PathBuf::from(env!("CARGO_BIN_EXE_cleanup")),
            args: vec!["--config".into(), self.config.display().to_string()],
        }
    }

    /// A preparation attempt of job `job_id` whose script is `true`.
    pub fn attempt(&self, job_id: &str) -> Attempt {
        self.attempt_with(job_id, &[])
    }

    /// [`Bed::attempt`] with more variables in gitlab-runner's own environment (e.g. `RUST_LOG`).
    pub fn attempt_with(&self, job_id: &str, vars: &[(&str, &str)]) -> Attempt {
        let builds = self.dir.path().join("builds").display().to_string();
        let job = Job::new(100, job_id.parse().expect("a numeric job id"), &builds, "true");
        let mut env = BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        );
        env.insert("HOME".to_string(), self.dir.path().display().to_string());
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Attempt::new(self.executables(), env, &job).expect("job directory")
    }
}

/// `after - before`, per action.
pub fn diff(after: &BTreeMap<String, usize>, before: &BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    after.iter().map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0))).collect()
}

/// One stage of one job: its calls per action, how long it took, and whether it passed.
pub fn stage(bed: &Bed, what: impl FnOnce() -> bool) -> (BTreeMap<String, usize>, Duration, bool) {
    let before = bed.calls();
    let start = Instant::now();
    let ok = what();
    (diff(&bed.calls(), &before), start.elapsed(), ok)
}

/// True when this process may start the emulator's sshds (root, `/usr/sbin/sshd` present);
/// otherwise prints why the section is skipped.
pub fn can_run_sshd() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/usr/sbin/sshd").exists() {
        println!("skipped: needs root and /usr/sbin/sshd (each emulated instance runs sshd on port 22)");
        return false;
    }
    true
}
