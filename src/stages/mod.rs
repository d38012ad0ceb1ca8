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
use crate::identity::{JobIdentity, JobSecret};
use crate::retry::{Backoff, CancellableClock, Clock as _, RetryPolicy, SystemClock};
use crate::secret::Secret;
use crate::selection::{Offer, Shape};
use crate::state::{JobKey, StateStore};
use crate::{keys, offers, userdata, watchdog};

pub use crate::tags;
pub use crate::tags::is_reclaimed;

/// Progress lines for people, on stderr (which gitlab-runner puts into the job log), without
/// timestamps because GitLab adds its own.
pub struct Progress;

impl Progress {
    /// Prints one line; a closed stderr is ignored ([`crate::logging::stderr_line`]).
    pub fn line(&self, s: impl AsRef<str>) {
        crate::logging::stderr_line(s.as_ref());
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
    /// What the job's variables say (checked; never identity). Its project path is the
    /// payload's when gitlab-runner sends one.
    pub job: JobInfo,
    /// The job's trusted identity (payload and administrator).
    pub identity: JobIdentity,
    /// The preparation attempt's secret, from `config`'s `job_env`.
    pub secret: JobSecret,
    /// The job-state key: trusted ids and the attempt's binding.
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
                let spec = JobSpec { arch, shape: config.default_job_shape(arch), overrides: Vec::new() };
                (config, spec)
            }
            Err(e) => return Err(e.into()),
        };
        // Identity before anything else: without the attempt's secret and the job payload a
        // stage touches nothing.
        let secret = JobSecret::from_env(&env)?;
        let payload = crate::identity::read_payload(&env)?;
        let runner_id = crate::identity::runner_id(config.runner.id.as_deref(), &env);
        let identity = JobIdentity::new(payload, runner_id, &env);
        Context::assemble(env, config, spec, identity, secret, terminated)
    }

    /// A context from parts, for a caller that is not a gitlab-runner stage (`aliyun-spot
    /// doctor --live`): the job's identity and secret are the caller's, the rest as in
    /// [`Context::load`].
    pub fn from_parts(
        env: Env,
        config: Config,
        spec: JobSpec,
        identity: JobIdentity,
        secret: JobSecret,
    ) -> Result<Context, StageError> {
        let terminated = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, terminated.clone())
                .context("failed to install signal handlers")?;
        }
        Context::assemble(env, config, spec, identity, secret, terminated)
    }

    /// The state key, store and client of a job with this identity and secret.
    fn assemble(
        env: Env,
        config: Config,
        spec: JobSpec,
        identity: JobIdentity,
        secret: JobSecret,
        terminated: Arc<AtomicBool>,
    ) -> Result<Context, StageError> {
        let job = JobInfo { project_path: identity.project_path.clone(), ..env.job() };
        let key = JobKey {
            runner_id: identity.runner_id.clone(),
            project_id: identity.project_id.clone(),
            job_id: identity.job_id.clone(),
            binding: secret.binding(),
        };
        let region = config.region()?.to_string();
        let store = StateStore::new(config.paths.state_dir.clone());
        let client = offers::client(&config)?;
        Ok(Context { env, config, spec, job, identity, secret, key, store, client, region, terminated })
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
        self.clock().sleep(d)
    }

    /// The real clock, its sleeps cut short by a signal.
    pub fn clock(&self) -> CancellableClock {
        CancellableClock(self.cancel_flag())
    }

    /// The rounds a busy API (throttling, 5xx) gets on top of the client's own retries while
    /// `deadline` allows, [`PERSIST_PAUSE`] apart; a signal cuts the pause short.
    pub fn persist_until(&self, deadline: Instant) -> RetryPolicy {
        persist_policy(deadline, Arc::new(self.clock()))
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

    /// What the in-instance watchdog needs; `None` when it is off or could never get
    /// credentials (see [`crate::sts`]).
    pub fn watchdog_spec(&self, created_at: OffsetDateTime) -> Option<watchdog::WatchdogSpec> {
        if !self.config.safety.watchdog {
            return None;
        }
        let sd = &self.config.self_destruct;
        let credentials = match sd.credentials {
            crate::sts::CredentialMode::Sts if sd.hands_over() => {
                watchdog::WatchdogCredentials::HandedOver(watchdog::CREDENTIALS_DIR.to_string())
            }
            crate::sts::CredentialMode::Sts => return None,
            crate::sts::CredentialMode::InstanceRole => {
                watchdog::WatchdogCredentials::InstanceRole(self.config.instance.ram_role_name.clone()?)
            }
        };
        Some(watchdog::WatchdogSpec {
            region_id: self.region.clone(),
            endpoint: sd
                .watchdog_endpoint(&self.config)
                .unwrap_or_else(|_| self.client.endpoint().to_string()),
            metadata: self.config.credentials.metadata_endpoint.clone(),
            credentials,
            idle_timeout: self.config.safety.idle_timeout,
            created_at,
            max_lifetime: self.config.safety.max_lifetime,
        })
    }

    /// The file in the job's private state directory that records when the instance's
    /// handed-over credentials expire.
    pub fn credentials_stamp(&self) -> std::path::PathBuf {
        self.store.job_dir(&self.key).join("instance-credentials-expiry")
    }

    /// The job's instance name ([`crate::config::InstanceConfig::instance_name`]).
    pub fn instance_name(&self, at: OffsetDateTime) -> String {
        self.config.instance.instance_name(self.spec.shape.arch, at)
    }

    /// Tags for a new instance: the managed marker, runner, project, job, attempt binding,
    /// pipeline, host, and the administrator's extra tags.
    pub fn tags(&self) -> Vec<(String, String)> {
        let mut t = self.job_tags(&self.key);
        if let Some(p) = self.identity.pipeline_id.as_ref().filter(|p| !p.is_empty()) {
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

    /// The tags naming one preparation attempt of a job: the managed marker, runner, project,
    /// job and binding. Every instance is created with them and only searched for by all of
    /// them, so no search finds an instance of another job or attempt.
    fn job_tags(&self, key: &JobKey) -> Vec<(String, String)> {
        vec![
            (self.config.safety.managed_tag_key.clone(), self.config.safety.managed_tag_value.clone()),
            (self.tag_key(tags::RUNNER), key.runner_id.clone()),
            (self.tag_key(tags::PROJECT), key.project_id.clone()),
            (self.tag_key(tags::JOB), key.job_id.clone()),
            (self.tag_key(tags::BINDING), key.binding.clone()),
        ]
    }

    /// Instances of this attempt found by tag (the truth when local state is missing).
    pub fn find_job_instances(&self) -> Result<Vec<Instance>, StageError> {
        self.find_instances_of(&self.key)
    }

    /// Instances of the attempt `key` found by its tags, their ids checked
    /// ([`crate::identity::checked_instance_id`]). A busy API (throttling, 5xx) gets
    /// [`PERSIST_ROUNDS`] rounds of the client's retries.
    pub fn find_instances_of(&self, key: &JobKey) -> Result<Vec<Instance>, StageError> {
        let filter = DescribeInstancesFilter { tags: self.job_tags(key), ..Default::default() };
        let found = RetryPolicy::rounds(PERSIST_ROUNDS, Backoff::fixed(PERSIST_PAUSE))
            .retry(|_| self.client.describe_instances(&filter), |r| matches!(r, Err(e) if e.is_retriable()))
            .map_err(|e| StageError::System(e.into()))?;
        for i in &found {
            crate::identity::checked_instance_id(&i.id)?;
        }
        Ok(found)
    }
}

/// Rounds of the client's whole retry policy that releasing an instance (and finding it by
/// tags) gets while the API stays busy: the client gives up after a few seconds of throttling,
/// but giving up here leaves a paid instance running.
pub const PERSIST_ROUNDS: u32 = 10;
/// The pause between those rounds.
pub const PERSIST_PAUSE: Duration = Duration::from_secs(2);

/// The rounds a busy API (throttling, 5xx) gets on top of the client's own retries while
/// `deadline` allows, [`PERSIST_PAUSE`] apart, timed on `clock`: the one rule for every front
/// end ([`Context::persist_until`], [`crate::launch`]).
pub fn persist_policy(deadline: Instant, clock: Arc<dyn crate::retry::Clock>) -> RetryPolicy {
    let budget = deadline.saturating_duration_since(clock.now());
    RetryPolicy::within(budget, Backoff::fixed(PERSIST_PAUSE), clock)
}

/// How long releasing one instance keeps trying while ECS refuses for a transient reason (an
/// instance still `Initializing`, throttling, 5xx). gitlab-runner gives the cleanup stage an
/// hour by default (`defaultCleanupExecTimeout` in gitlab-runner's
/// `executors/custom/consts.go`), and a booting instance refuses DeleteInstance for a while, so
/// minutes, not seconds: giving up leaves a paid instance running.
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(5 * 60);
/// Right after `RunInstances`, ECS may not know the new instance yet (its API is eventually
/// consistent): an `InvalidInstanceId.NotFound` this soon after creation means "not visible
/// yet", not "gone".
pub const VISIBILITY_GRACE: Duration = Duration::from_secs(30);

/// Deletes an instance created at `created_at` (when known), retrying until it is deleted or
/// [`RELEASE_DEADLINE`] has passed:
/// - `IncorrectInstanceStatus*` (e.g. `IncorrectInstanceStatus.Initializing`, HTTP 403: ECS
///   refuses to delete a booting instance, "The specified instance is being created. Please try
///   again later." in the DeleteInstance error table,
///   <https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-deleteinstance>;
///   terraform-provider-alicloud retries the same codes in
///   `alicloud/resource_alicloud_instance.go`, delete) and retriable errors (throttling, 5xx,
///   `LastTokenProcessing`) are tried again;
/// - `InvalidInstanceId.NotFound` is success ("already gone"), except within
///   [`VISIBILITY_GRACE`] of `created_at`, when it is tried again.
///
/// Signals do not cut it short: a stage that was asked to stop must still release.
pub fn release_instance(
    client: &EcsClient,
    id: &str,
    created_at: Option<OffsetDateTime>,
) -> Result<(), crate::ecs::EcsError> {
    let policy = RetryPolicy::within(
        RELEASE_DEADLINE,
        Backoff::exponential(Duration::from_millis(500), 2, Duration::from_secs(5)),
        Arc::new(SystemClock),
    );
    // Given up while still invisible: taken as gone, like a `NotFound` after the grace.
    policy
        .retry_noting(
            |_| client.delete_instance(id, true),
            |r| match r {
                Ok(DeleteOutcome::Deleted) => false,
                Ok(DeleteOutcome::AlreadyGone) => just_created(created_at),
                Err(e) => e.kind() == ErrorKind::IncorrectStatus || e.is_retriable(),
            },
            |r, _| match r {
                Err(e) => log::info!("instance {id} cannot be deleted yet ({e}); trying again"),
                Ok(_) => log::info!("instance {id} is not visible yet; trying to delete it again"),
            },
        )
        .map(drop)
}

/// Whether an instance created at `created_at` may still be invisible to the API
/// ([`VISIBILITY_GRACE`]).
pub fn just_created(created_at: Option<OffsetDateTime>) -> bool {
    created_at.is_some_and(|t| (OffsetDateTime::now_utc() - t).unsigned_abs() < VISIBILITY_GRACE)
}

/// [`release_instance`] for a stage, its failure as a [`StageError`].
pub fn delete_instance(
    ctx: &Context,
    id: &str,
    created_at: Option<OffsetDateTime>,
) -> Result<(), StageError> {
    release_instance(&ctx.client, id, created_at).map_err(|e| {
        StageError::System(anyhow::Error::new(e).context(format!("failed to release instance {id}")))
    })
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
            // A stage that was asked to stop must not look successful (docs/gitlab-runner.md,
            // "Timeouts and signals").
            return Err(StageError::system("terminated by a signal"));
        }
        r
    });
    std::process::exit(codes.code_for(&result));
}
