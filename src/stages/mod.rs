//! The four gitlab-runner stages, and what they share.
//!
//! Each stage binary calls [`main`] with its stage function; everything a stage needs (the
//! validated configuration, the job's identity, the state store, the ECS client, the signal
//! flag) is gathered once into a [`Context`]. [`main`] hands the result to
//! [`crate::exit::ExitCodes`], the one place that turns outcomes into exit codes.

pub mod cleanup;
pub mod config;
pub mod cost;
pub mod prepare;
pub mod run;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use time::OffsetDateTime;

use crate::config::{Config, JobSpec};
use crate::ecs::{DeleteOutcome, DescribeInstancesFilter, EcsClient, ErrorKind, Instance};
use crate::env::{Env, JobInfo};
use crate::exit::StageError;
use crate::fsutil::FileLock;
use crate::secret::Secret;
use crate::selection::{Offer, Shape};
use crate::state::{JobKey, StateStore};
use crate::{keys, offers, userdata, watchdog};

/// Names of the tags every managed instance carries, besides the managed-by marker; the key
/// is `{safety.tag_prefix}:{name}` ([`crate::config::Safety::tag_key`]).
pub mod tags {
    /// The runner id (`CI_RUNNER_ID`).
    pub const RUNNER: &str = "runner";
    /// The project id.
    pub const PROJECT: &str = "project";
    /// The job id.
    pub const JOB: &str = "job";
    /// The pipeline id.
    pub const PIPELINE: &str = "pipeline";
    /// The runner host's name.
    pub const HOST: &str = "created-by-host";
}

/// Progress lines for people, on stderr (which gitlab-runner puts into the job log), without
/// timestamps because GitLab adds its own.
pub struct Progress;

impl Progress {
    /// Prints one line.
    pub fn line(&self, s: impl AsRef<str>) {
        eprintln!("{}", s.as_ref());
    }
}

/// Everything a stage needs, gathered once.
pub struct Context {
    /// The process environment, read once.
    pub env: Env,
    /// The validated configuration.
    pub config: Config,
    /// What this job asked for (shape within the administrator's bounds).
    pub spec: JobSpec,
    /// The job's identity from `CUSTOM_ENV_CI_*`.
    pub job: JobInfo,
    /// The job-state key.
    pub key: JobKey,
    /// Where job states live.
    pub store: StateStore,
    /// The ECS client.
    pub client: EcsClient,
    /// The region (validated).
    pub region: String,
    terminated: Arc<AtomicBool>,
}

/// Per-job SSH keys: the client key the stage logs in with and the instance's host key.
pub struct JobKeys {
    /// Private key the driver authenticates with.
    pub client_private: Secret<String>,
    /// Its public half, put into `ssh_authorized_keys` (ephemeral keys only; a registered key
    /// pair reaches the instance through `KeyPairName`).
    pub client_public: Option<String>,
    /// The host key pair given to the instance through cloud-config and pinned by the driver.
    pub host: keys::KeyPair,
    /// The client key to store in the job directory (ephemeral keys only).
    pub client_private_to_store: Option<Secret<String>>,
}

impl Context {
    /// Loads configuration, job identity and the client; installs the SIGTERM/SIGINT flag.
    /// With `lenient_job`, a job variable outside the bounds does not stop the stage (cleanup
    /// must work whatever the job asked for).
    pub fn load(config_path: Option<PathBuf>, lenient_job: bool) -> Result<Context, StageError> {
        let terminated = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, terminated.clone())
                .context("failed to install signal handlers")?;
        }
        let env = Env::from_process();
        let (config, spec) = match crate::config::load_for_job(config_path.as_deref(), &env) {
            Ok(pair) => pair,
            Err(_) if lenient_job => {
                let config = crate::config::load(config_path.as_deref(), &env)?;
                let arch = config.instance.default_arch;
                let spec = JobSpec { arch, shape: config.shape(arch).clone(), overrides: Vec::new() };
                (config, spec)
            }
            Err(e) => return Err(e.into()),
        };
        let job = env.job();
        let ids = job.ids()?;
        let key = JobKey { runner_id: ids.runner_id, project_id: ids.project_id, job_id: ids.job_id };
        let region = config.region()?.to_string();
        let store = StateStore::new(config.paths.state_dir.clone());
        let client = offers::client(&config)?;
        Ok(Context { env, config, spec, job, key, store, client, region, terminated })
    }

    /// The tag key for one of the [`tags`] names.
    pub fn tag_key(&self, name: &str) -> String {
        self.config.safety.tag_key(name)
    }

    /// True once SIGTERM or SIGINT arrived.
    pub fn terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }

    /// The flag a signal sets, for loops in other modules.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.terminated.clone()
    }

    /// Sleeps up to `d`, waking early when a signal arrives.
    pub fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.terminated() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
    }

    /// Serialises the stages of one job that must not overlap (prepare, cleanup).
    pub fn lock_job(&self) -> Result<FileLock, StageError> {
        let dir = self.store.job_dir(&self.key);
        crate::fsutil::create_private_dir(&dir)?;
        Ok(FileLock::exclusive(&dir.join(".lock"))?)
    }

    /// Identifies this preparation attempt: gitlab-runner gives every attempt its own
    /// temporary directory (`TMPDIR`), so its name tells attempts of one job apart.
    pub fn attempt_id(&self) -> String {
        self.env
            .get("TMPDIR")
            .and_then(|t| std::path::Path::new(t).file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| format!("pid{}", std::process::id()))
    }

    /// Fresh per-job keys (or the configured key pair's private key) and a fresh host key.
    pub fn job_keys(&self) -> Result<JobKeys, StageError> {
        let host = keys::generate_ed25519(&format!("host-{}", self.key.job_id))?;
        match &self.config.ssh.private_key_file {
            Some(path) => Ok(JobKeys {
                client_private: keys::load_private_key_file(path)?,
                client_public: None,
                host,
                client_private_to_store: None,
            }),
            None => {
                let client = keys::generate_ed25519(&format!("job-{}", self.key.job_id))?;
                Ok(JobKeys {
                    client_private: client.private_openssh.clone(),
                    client_public: Some(client.public_openssh),
                    host,
                    client_private_to_store: Some(client.private_openssh),
                })
            }
        }
    }

    /// The private key `run` logs in with.
    pub fn client_private_key(&self) -> Result<Secret<String>, StageError> {
        match &self.config.ssh.private_key_file {
            Some(path) => Ok(keys::load_private_key_file(path)?),
            None => self.store.load_private_key(&self.key)?.ok_or_else(|| {
                StageError::system(format!(
                    "the SSH key of job {} is missing from `{}`: `prepare` did not finish",
                    self.key.job_id,
                    self.store.job_dir(&self.key).display()
                ))
            }),
        }
    }

    /// The cloud-config user data for this job's instance created at `created_at`.
    pub fn cloud_config(&self, k: &JobKeys, created_at: OffsetDateTime) -> userdata::CloudConfig {
        let mut cc = userdata::CloudConfig {
            authorized_keys: k.client_public.iter().cloned().collect(),
            host_key: Some(k.host.clone()),
            ..Default::default()
        };
        if let Some(spec) = self.watchdog_spec(created_at) {
            watchdog::add_to(&mut cc, &spec);
        }
        cc
    }

    /// What the in-instance watchdog needs; `None` when it is off (no instance RAM role).
    pub fn watchdog_spec(&self, created_at: OffsetDateTime) -> Option<watchdog::WatchdogSpec> {
        if !self.config.safety.watchdog {
            return None;
        }
        let role = self.config.instance.ram_role_name.clone()?;
        Some(watchdog::WatchdogSpec {
            region_id: self.region.clone(),
            endpoint: self.client.endpoint().to_string(),
            metadata: self.config.credentials.metadata_endpoint.clone(),
            ram_role: role,
            idle_timeout: self.config.safety.idle_timeout,
            created_at,
            max_lifetime: self.config.safety.max_lifetime,
        })
    }

    /// `ci-runner-{arch}-spot-{timestamp}` (prefix configurable).
    pub fn instance_name(&self, at: OffsetDateTime) -> String {
        let ts = at
            .format(time::macros::format_description!("[year][month][day]-[hour][minute][second]"))
            .unwrap_or_default();
        format!("{}-{}-spot-{}", self.config.instance.name_prefix, self.spec.shape.arch, ts)
    }

    /// Tags for a new instance: the managed marker, runner, project, job, pipeline, host, and
    /// the administrator's extra tags.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut t = vec![
            (self.config.safety.managed_tag_key.clone(), self.config.safety.managed_tag_value.clone()),
            (self.tag_key(tags::RUNNER), self.key.runner_id.clone()),
            (self.tag_key(tags::PROJECT), self.key.project_id.clone()),
            (self.tag_key(tags::JOB), self.key.job_id.clone()),
        ];
        if let Some(p) = self.job.pipeline_id.as_ref().filter(|p| !p.is_empty()) {
            t.push((self.tag_key(tags::PIPELINE), p.clone()));
        }
        t.push((self.tag_key(tags::HOST), self.env.hostname()));
        t.extend(self.config.instance.extra_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        t
    }

    /// The address to SSH to: the private IP in private mode, else the public one.
    pub fn address_of(&self, i: &Instance) -> Option<String> {
        let public = i.public_ips.first().or(i.eip.as_ref());
        let private = i.private_ips.first();
        if self.config.network.private_ip {
            private.or(public).cloned()
        } else {
            public.or(private).cloned()
        }
    }

    /// Instances of this job found by tag (the truth when local state is missing). A busy API
    /// (throttling, 5xx) gets [`PERSIST_ROUNDS`] rounds of the client's retries.
    pub fn find_job_instances(&self) -> Result<Vec<Instance>, StageError> {
        let filter = DescribeInstancesFilter {
            tags: vec![
                (self.config.safety.managed_tag_key.clone(), self.config.safety.managed_tag_value.clone()),
                (self.tag_key(tags::RUNNER), self.key.runner_id.clone()),
                (self.tag_key(tags::JOB), self.key.job_id.clone()),
            ],
            ..Default::default()
        };
        let mut rounds = 0;
        loop {
            rounds += 1;
            match self.client.describe_instances(&filter) {
                Ok(found) => return Ok(found),
                Err(e) if e.is_retriable() && rounds < PERSIST_ROUNDS => std::thread::sleep(PERSIST_PAUSE),
                Err(e) => return Err(StageError::System(e.into())),
            }
        }
    }
}

/// Rounds of the client's whole retry policy that releasing an instance (and finding it by
/// tags) gets while the API stays busy: the client gives up after a few seconds of throttling,
/// but giving up here leaves a paid instance running.
pub const PERSIST_ROUNDS: u32 = 10;
/// The pause between those rounds.
pub const PERSIST_PAUSE: Duration = Duration::from_secs(2);

/// Deletes an instance, treating "already gone" as success and retrying transient errors
/// ([`PERSIST_ROUNDS`] rounds of the client's retry policy) plus `IncorrectInstanceStatus`
/// (the instance is mid-transition).
pub fn delete_instance(ctx: &Context, id: &str) -> Result<(), StageError> {
    release_instance(&ctx.client, id)
}

/// [`delete_instance`] for callers without a stage [`Context`] (the GitHub front end).
pub fn release_instance(client: &EcsClient, id: &str) -> Result<(), StageError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client.delete_instance(id, true) {
            Ok(DeleteOutcome::Deleted) | Ok(DeleteOutcome::AlreadyGone) => return Ok(()),
            Err(e)
                if (e.kind() == ErrorKind::IncorrectStatus || e.is_retriable())
                    && attempts < PERSIST_ROUNDS =>
            {
                std::thread::sleep(PERSIST_PAUSE);
            }
            Err(e) => {
                return Err(StageError::System(
                    anyhow::Error::new(e).context(format!("failed to release instance {id}")),
                ))
            }
        }
    }
}

/// True when Aliyun is taking the spot instance back (`Recycling` operation lock).
pub fn is_reclaimed(i: &Instance) -> bool {
    i.operation_locks.iter().any(|l| l.eq_ignore_ascii_case("Recycling"))
}

/// The ranked offers for a shape, through the price cache.
pub fn ranked_offers(ctx: &Context, shape: &Shape) -> Result<Vec<Offer>, StageError> {
    Ok(offers::ranked(&ctx.client, &ctx.config, shape, false)?)
}

/// Runs a stage: parses nothing but what it is given, maps the result to the exit code.
pub fn main(
    stage: impl FnOnce(&Context) -> Result<(), StageError>,
    config_path: Option<PathBuf>,
    lenient_job: bool,
) -> ! {
    let env = Env::from_process();
    let codes = env.exit_codes();
    let result = Context::load(config_path, lenient_job).and_then(|ctx| {
        let r = stage(&ctx);
        if r.is_ok() && ctx.terminated() {
            // A stage that was asked to stop must not look successful (CUSTOM_EXECUTOR.md §5.2).
            return Err(StageError::system("terminated by a signal"));
        }
        r
    });
    std::process::exit(codes.code_for(&result));
}
