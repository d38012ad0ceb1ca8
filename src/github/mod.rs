//! The GitHub Actions front end: ephemeral self-hosted runners on spot instances.
//!
//! `aliyun-spot github start` registers a just-in-time runner with GitHub, creates its spot
//! instance with prepare's rules (offers, fallback, price limit, tags, `AutoReleaseTime`) and a
//! cloud-config that runs the runner once ([`boot`]), and prints `label=`, `instance-id=` and
//! `runner-name=` (also appended to `$GITHUB_OUTPUT`). `stop` deletes the instance and
//! deregisters the runner; `sweep` deletes runner instances whose runner is gone, idle past its
//! wait, or past the maximum lifetime. docs/github-actions.md is the user's guide.
//!
//! Tags: the managed-by marker and the usual `{prefix}:runner/project/job/created-by-host`
//! keys (so `aliyun-spot instances` and `aliyun-spot sweep --all --older-than` see these
//! instances), holding GitHub's runner id, the scope (`repos/OWNER/REPO` or `orgs/ORG`), the
//! runner name and `github:{scope}` (never a host name, so a runner host's plain `sweep` leaves
//! them alone), plus `{prefix}:github-runner` with the runner name.

pub mod api;
pub mod boot;
mod launch;

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use time::OffsetDateTime;

use crate::config::Config;
use crate::ecs::{DescribeInstancesFilter, EcsClient, Instance};
use crate::env::Env;
use crate::stages::{tags, Progress};
use api::{GithubClient, Runner, Scope};
use boot::{RunnerBoot, RunnerSource};

/// The tag naming the GitHub runner (`{prefix}:github-runner`).
pub const TAG_RUNNER_NAME: &str = "github-runner";
/// GitHub's default runner group.
pub const DEFAULT_RUNNER_GROUP: u64 = 1;

/// Where the runner's repository or organization is.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ScopeArgs {
    /// The repository the runner serves, OWNER/REPO.
    #[arg(long, value_name = "OWNER/REPO")]
    pub repo: Option<String>,
    /// Register an organization runner instead (the token needs the organization's
    /// self-hosted runners permission).
    #[arg(long, value_name = "ORG")]
    pub org: Option<String>,
}

/// Options of `aliyun-spot github start`.
#[derive(Debug, Clone, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// Extra runner labels, comma-separated (the unique label is always added).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    #[command(flatten)]
    pub shape: crate::admin::ShapeArgs,
    /// The runner group to register in.
    #[arg(long, default_value_t = DEFAULT_RUNNER_GROUP)]
    pub runner_group_id: u64,
    /// Where the image has the runner (the directory with `run.sh`), or where a download goes.
    #[arg(long, default_value = "/opt/actions-runner")]
    pub runner_dir: String,
    /// Download the runner tarball from here at boot (needs --runner-sha256).
    #[arg(long, requires = "runner_sha256")]
    pub runner_url: Option<String>,
    /// SHA-256 of the --runner-url tarball (from the runner's release notes).
    #[arg(long, requires = "runner_url")]
    pub runner_sha256: Option<String>,
    /// The user that runs the runner (created when missing); `root` is an explicit choice.
    #[arg(long, default_value = "runner")]
    pub runner_user: String,
    /// Delete the instance when no job has started on it this long after boot.
    #[arg(long, default_value = "15m", value_parser = crate::config::parse_duration)]
    pub job_wait: Duration,
    /// Opt in to self-deletion with the instance RAM role `instance.ram_role_name`. Risk: every
    /// job on the instance can read that role's credentials and delete any managed instance
    /// (docs/github-actions.md). Without it the instance gets no role at all.
    #[arg(long)]
    pub self_delete: bool,
}

/// Options of `aliyun-spot github stop`.
#[derive(Debug, Clone, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// The instance `start` printed.
    #[arg(long, conflicts_with = "label", required_unless_present = "label")]
    pub instance_id: Option<String>,
    /// The label (= runner name) `start` printed.
    #[arg(long)]
    pub label: Option<String>,
}

/// Options of `aliyun-spot github sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub scope: ScopeArgs,
    /// A runner that is registered but not busy is deleted once its instance is this old.
    #[arg(long, default_value = "15m", value_parser = crate::config::parse_duration)]
    pub job_wait: Duration,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// What `start` created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The label to put into `runs-on` (the runner name).
    pub label: String,
    /// The instance.
    pub instance_id: String,
    /// The runner's name.
    pub runner_name: String,
    /// GitHub's runner id.
    pub runner_id: u64,
}

impl Started {
    /// The `key=value` lines printed and appended to `$GITHUB_OUTPUT`.
    pub fn output_lines(&self) -> String {
        format!("label={}\ninstance-id={}\nrunner-name={}\n", self.label, self.instance_id, self.runner_name)
    }
}

/// Labels given on the command line: letters, digits, `-`, `_`, `.`; at most 100 in all.
fn check_labels(labels: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for l in labels.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        if l.len() > 100 || !l.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
            anyhow::bail!("--labels: `{l}` is not a runner label; use letters, digits, `-`, `_` and `.`");
        }
        if !out.iter().any(|o: &String| o == l) {
            out.push(l.to_string());
        }
    }
    if out.len() > 99 {
        anyhow::bail!("--labels: at most 99 labels (GitHub takes 100 including the unique one)");
    }
    Ok(out)
}

fn tags_for(config: &Config, scope: &Scope, runner: &Runner) -> Vec<(String, String)> {
    let s = &config.safety;
    let mut t = vec![
        (s.managed_tag_key.clone(), s.managed_tag_value.clone()),
        (s.tag_key(tags::RUNNER), runner.id.to_string()),
        (s.tag_key(tags::PROJECT), scope.path()),
        (s.tag_key(tags::JOB), runner.name.clone()),
        (s.tag_key(tags::HOST), format!("github:{}", scope.path())),
        (s.tag_key(TAG_RUNNER_NAME), runner.name.clone()),
    ];
    t.extend(config.instance.extra_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    t
}

/// `aliyun-spot github start` from the process environment.
pub fn start_cli(config_path: Option<&Path>, args: &StartArgs) -> Result<()> {
    let env = Env::from_process();
    let config = crate::config::load(config_path, &env)?;
    let client = crate::offers::client(&config)?;
    let gh = GithubClient::from_env(&env)?;
    let cancel = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, cancel.clone()).context("failed to install signal handlers")?;
    }
    let output = env.value("GITHUB_OUTPUT").map(std::path::PathBuf::from);
    let started = start(&config, &client, &gh, args, output.as_deref(), &cancel)?;
    crate::logging::stdout_text(&started.output_lines())?;
    Ok(())
}

/// Registers the runner, creates its instance, waits for `Running` and writes the outputs.
/// Whatever fails after the registration undoes it, and after the creation deletes the
/// instance: a failed start leaves nothing behind.
pub fn start(
    config: &Config,
    client: &EcsClient,
    gh: &GithubClient,
    args: &StartArgs,
    github_output: Option<&Path>,
    cancel: &AtomicBool,
) -> Result<Started> {
    let p = Progress;
    let scope = Scope::parse(args.scope.repo.as_deref(), args.scope.org.as_deref())?;
    let extra_labels = check_labels(&args.labels)?;
    // The same rule as a job's shape and `aliyun-spot prices` (`Config::shape_for`).
    let shape = crate::admin::shape_of(config, &args.shape)?;
    let arch = shape.arch;
    config.require_for_prepare(arch)?;
    let source = match (&args.runner_url, &args.runner_sha256) {
        (Some(url), Some(sha)) => {
            if !url.starts_with("https://") {
                anyhow::bail!("--runner-url `{url}` is not an https URL");
            }
            if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                anyhow::bail!("--runner-sha256 `{sha}` is not a SHA-256 (64 hex digits)");
            }
            RunnerSource::Download {
                dir: args.runner_dir.clone(),
                url: url.clone(),
                sha256: sha.to_lowercase(),
            }
        }
        _ => RunnerSource::Preinstalled(args.runner_dir.clone()),
    };
    for (what, v) in [("--runner-dir", &args.runner_dir), ("--runner-user", &args.runner_user)] {
        if v.is_empty() || v.chars().any(|c| c.is_control()) {
            anyhow::bail!("{what} `{}` is empty or holds control characters", v.escape_debug());
        }
    }

    let created_at = OffsetDateTime::now_utc();
    let runner_name = config.instance.runner_name(arch, created_at, rand::random::<u16>());
    let mut labels = vec![runner_name.clone()];
    labels.extend(extra_labels);

    p.line(format!("Registering just-in-time runner {runner_name} with GitHub ({})", scope.path()));
    let jit = gh.generate_jitconfig(&scope, &runner_name, &labels, args.runner_group_id)?;
    let runner = jit.runner.clone();
    let undo_runner = |why: &str| {
        p.line(format!("Deregistering runner {} because {why}", runner.name));
        if let Err(e) = gh.delete_runner(&scope, runner.id) {
            p.line(format!("WARNING: could not deregister runner {}: {e}", runner.name));
        }
    };

    let region = match config.region() {
        Ok(r) => r.to_string(),
        Err(e) => {
            undo_runner("the configuration has no region");
            return Err(e);
        }
    };
    // The instance role is what lets the instance delete itself, and also what any job on it
    // could use against other managed instances: it is given only on request.
    let ram_role = if args.self_delete {
        match &config.instance.ram_role_name {
            Some(r) => Some(r.clone()),
            None => {
                undo_runner("--self-delete has no role");
                anyhow::bail!(
                    "--self-delete needs an instance RAM role; set `instance.ram_role_name` (docs/safety.md has its policy) or drop --self-delete"
                );
            }
        }
    } else {
        None
    };
    let watchdog = ram_role.clone().map(|role| crate::watchdog::WatchdogSpec {
        region_id: region.clone(),
        endpoint: config
            .self_destruct
            .watchdog_endpoint(config)
            .unwrap_or_else(|_| client.endpoint().to_string()),
        metadata: config.credentials.metadata_endpoint.clone(),
        credentials: crate::watchdog::WatchdogCredentials::InstanceRole(role),
        idle_timeout: config.safety.idle_timeout,
        created_at,
        max_lifetime: config.safety.max_lifetime,
    });
    if watchdog.is_none() {
        p.line("The instance gets no RAM role and cannot delete itself (see --self-delete); the stop step, AutoReleaseTime and `aliyun-spot github sweep` delete it");
    }
    let boot = RunnerBoot {
        jit_config: jit.encoded_jit_config,
        source,
        user: args.runner_user.clone(),
        job_wait: args.job_wait,
        completed_grace: Duration::from_secs(60),
        watchdog,
    };
    let user_data = match boot.cloud_config().render() {
        Ok(u) => u.text,
        Err(e) => {
            undo_runner("its user data could not be built");
            return Err(e);
        }
    };
    let launch = launch::Launch {
        config,
        client,
        shape: &shape,
        template: crate::launch::Template {
            instance_name: runner_name.clone(),
            host_name: Some(config.instance.host_name(&runner_name)),
            ram_role_name: ram_role,
            user_data,
            tags: tags_for(config, &scope, &runner),
        },
        scope: scope.path(),
        runner_name: runner_name.clone(),
        cancel,
    };
    let created = match launch::create(&launch) {
        Ok(v) => v,
        Err(e) => {
            // A RunInstances whose answer was lost may still have created one: look by tag.
            release_by_runner_name(config, client, &runner_name);
            undo_runner("no instance was created");
            return Err(e);
        }
    };
    let (offer, id) = (&created.offer, created.instance_id.clone());
    p.line(format!(
        "Created spot instance {id} ({} in {}, {}, auto-release at {}) for runner {runner_name}",
        offer.instance_type,
        offer.zone,
        crate::pricing::PerHour(offer.spot_price, &offer.currency),
        crate::stages::cost::format_time(created.auto_release)
    ));
    let started =
        Started { label: runner_name.clone(), instance_id: id.clone(), runner_name, runner_id: runner.id };
    let finish = || -> Result<()> {
        wait_running(config, client, &id, cancel)?;
        if let Some(path) = github_output {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .with_context(|| format!("failed to append to GITHUB_OUTPUT `{}`", path.display()))?;
            f.write_all(started.output_lines().as_bytes())
                .with_context(|| format!("failed to append to GITHUB_OUTPUT `{}`", path.display()))?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        p.line(format!("Releasing instance {id} because start failed"));
        if let Err(del) = crate::stages::release_instance(client, &id, Some(created_at)) {
            p.line(format!("WARNING: could not release {id}: {del}; `aliyun-spot github sweep` will"));
        }
        undo_runner("start failed");
        return Err(e);
    }
    p.line(format!("Instance {id} is running; the runner registers when it has booted"));
    Ok(started)
}

fn wait_running(config: &Config, client: &EcsClient, id: &str, cancel: &AtomicBool) -> Result<()> {
    let deadline = Instant::now() + config.ssh.boot_timeout;
    let mut delay = Duration::from_millis(500);
    loop {
        if cancel.load(Ordering::SeqCst) {
            anyhow::bail!("terminated by a signal while {id} was booting");
        }
        match client.describe_instance(id) {
            Ok(Some(i)) if i.status == "Running" => return Ok(()),
            Ok(Some(i)) if crate::stages::is_reclaimed(&i) => {
                anyhow::bail!("spot instance {id} was reclaimed by Aliyun while booting; start again")
            }
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("instance {id} disappeared while booting"),
            Err(e) => log::warn!("could not poll {id}: {e}"),
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "instance {id} did not reach Running within {}; raise `ssh.boot_timeout` or try another type",
                crate::config::format_duration(config.ssh.boot_timeout)
            );
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

fn managed_with(config: &Config, client: &EcsClient, extra: Vec<(String, String)>) -> Result<Vec<Instance>> {
    let mut tags = vec![(config.safety.managed_tag_key.clone(), config.safety.managed_tag_value.clone())];
    tags.extend(extra);
    let filter = DescribeInstancesFilter { tags, ..Default::default() };
    client.describe_instances(&filter).context("failed to list the runner instances")
}

fn release_by_runner_name(config: &Config, client: &EcsClient, name: &str) {
    let tag = (config.safety.tag_key(TAG_RUNNER_NAME), name.to_string());
    match managed_with(config, client, vec![tag]) {
        Ok(found) => {
            for i in found {
                if let Err(e) = crate::stages::release_instance(client, &i.id, None) {
                    Progress.line(format!("WARNING: could not release {}: {e}", i.id));
                }
            }
        }
        Err(e) => Progress.line(format!("WARNING: could not look for instances of runner {name}: {e:#}")),
    }
}

/// `aliyun-spot github stop` from the process environment.
pub fn stop_cli(config_path: Option<&Path>, args: &StopArgs) -> Result<()> {
    let env = Env::from_process();
    let config = crate::config::load(config_path, &env)?;
    let client = crate::offers::client(&config)?;
    let gh = GithubClient::from_env(&env)?;
    stop(&config, &client, &gh, args)
}

/// Deletes the runner's instance (already gone is success) and deregisters the runner if
/// GitHub still lists it. Only instances with this front end's tags for this scope are touched.
pub fn stop(config: &Config, client: &EcsClient, gh: &GithubClient, args: &StopArgs) -> Result<()> {
    let p = Progress;
    let scope = Scope::parse(args.scope.repo.as_deref(), args.scope.org.as_deref())?;
    let scope_tag = (config.safety.tag_key(tags::PROJECT), scope.path());
    let instances = match (&args.instance_id, &args.label) {
        (Some(id), _) if id.trim().is_empty() => {
            anyhow::bail!("--instance-id is empty; pass the `instance-id` output of `github start`")
        }
        (Some(id), _) => {
            let found = client.describe_instance(id).context("failed to look up the instance")?;
            match found {
                Some(i)
                    if i.tags.get(&scope_tag.0) == Some(&scope_tag.1)
                        && i.tags.contains_key(&config.safety.tag_key(TAG_RUNNER_NAME)) =>
                {
                    vec![i]
                }
                Some(_) => anyhow::bail!(
                    "--instance-id {id} is not a runner instance of {}; it was left alone",
                    scope.path()
                ),
                None => Vec::new(),
            }
        }
        (None, Some(label)) => managed_with(
            config,
            client,
            vec![scope_tag.clone(), (config.safety.tag_key(TAG_RUNNER_NAME), label.clone())],
        )?,
        (None, None) => anyhow::bail!("name the runner with --instance-id ID or --label LABEL"),
    };
    let mut names: Vec<String> = instances
        .iter()
        .filter_map(|i| i.tags.get(&config.safety.tag_key(TAG_RUNNER_NAME)).cloned())
        .collect();
    if let Some(l) = &args.label {
        names.push(l.clone());
    }
    names.sort();
    names.dedup();
    if instances.is_empty() {
        p.line("No runner instance is left to delete");
    }
    let mut failed = Vec::new();
    for i in &instances {
        match crate::stages::release_instance(client, &i.id, None) {
            Ok(()) => p.line(format!("Deleted instance {}", i.id)),
            Err(e) => failed.push(format!("{}: {e}", i.id)),
        }
    }
    for name in &names {
        match gh.list_runners(&scope, Some(name)) {
            Ok(runners) => {
                for r in runners.iter().filter(|r| &r.name == name) {
                    match gh.delete_runner(&scope, r.id) {
                        Ok(_) => p.line(format!("Deregistered runner {name}")),
                        Err(e) => p.line(format!("WARNING: could not deregister runner {name}: {e}")),
                    }
                }
            }
            Err(e) => p.line(format!("WARNING: could not list runners: {e}")),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("could not delete {}; run stop again or `aliyun-spot github sweep`", failed.join("; "));
    }
    Ok(())
}

/// Why a runner instance is swept, or `None` to keep it.
pub fn sweep_verdict(
    age: Option<Duration>,
    runner: Option<&Runner>,
    job_wait: Duration,
    max_lifetime: Duration,
) -> Option<String> {
    if age.is_some_and(|a| a > max_lifetime) {
        return Some("it outlived the maximum lifetime".to_string());
    }
    match runner {
        None => Some("GitHub no longer lists its runner".to_string()),
        Some(r) if r.busy => None,
        Some(_) if age.is_some_and(|a| a > job_wait) => {
            Some(format!("its runner has not been busy for {}", crate::config::format_duration(job_wait)))
        }
        Some(_) => None,
    }
}

/// `aliyun-spot github sweep` from the process environment.
pub fn sweep_cli(config_path: Option<&Path>, args: &SweepArgs) -> Result<()> {
    let env = Env::from_process();
    let config = crate::config::load(config_path, &env)?;
    let client = crate::offers::client(&config)?;
    let gh = GithubClient::from_env(&env)?;
    sweep(&config, &client, &gh, args)
}

/// Deletes the runner instances of one scope that [`sweep_verdict`] condemns; prints one line
/// per instance on stdout.
pub fn sweep(config: &Config, client: &EcsClient, gh: &GithubClient, args: &SweepArgs) -> Result<()> {
    let scope = Scope::parse(args.scope.repo.as_deref(), args.scope.org.as_deref())?;
    let instances = managed_with(config, client, vec![(config.safety.tag_key(tags::PROJECT), scope.path())])?;
    let name_key = config.safety.tag_key(TAG_RUNNER_NAME);
    let instances: Vec<Instance> = instances.into_iter().filter(|i| i.tags.contains_key(&name_key)).collect();
    let runners = gh.list_runners(&scope, None)?;
    let now = OffsetDateTime::now_utc();
    let (mut deleted, mut kept) = (0, 0);
    for i in &instances {
        let name = &i.tags[&name_key];
        let runner = runners.iter().find(|r| &r.name == name);
        let age = i.creation_time.map(|c| Duration::from_secs((now - c).whole_seconds().max(0) as u64));
        let Some(reason) = sweep_verdict(age, runner, args.job_wait, config.safety.max_lifetime) else {
            kept += 1;
            crate::logging::stdout_line(&format!(
                "kept {} (runner {name}{})",
                i.id,
                if runner.is_some_and(|r| r.busy) { ", busy" } else { "" }
            ))?;
            continue;
        };
        if args.dry_run {
            crate::logging::stdout_line(&format!("would delete {} (runner {name}): {reason}", i.id))?;
            continue;
        }
        match crate::stages::release_instance(client, &i.id, None) {
            Ok(()) => {
                deleted += 1;
                crate::logging::stdout_line(&format!("deleted {} (runner {name}): {reason}", i.id))?;
                if let Some(r) = runner {
                    if let Err(e) = gh.delete_runner(&scope, r.id) {
                        crate::logging::stdout_line(&format!(
                            "WARNING: could not deregister runner {name}: {e}"
                        ))?;
                    }
                }
            }
            Err(e) => {
                crate::logging::stdout_line(&format!("FAILED to delete {} (runner {name}): {e}", i.id))?
            }
        }
    }
    crate::logging::stdout_line(&format!(
        "{deleted} deleted, {kept} kept of {} runner instance(s) of {}",
        instances.len(),
        scope.path()
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(busy: bool) -> Runner {
        Runner { id: 1, name: "r".into(), status: "online".into(), busy, labels: Vec::new() }
    }

    #[test]
    fn verdicts() {
        let m = Duration::from_secs;
        let (wait, life) = (m(900), m(3 * 3600));
        assert_eq!(sweep_verdict(Some(m(60)), Some(&runner(true)), wait, life), None);
        assert_eq!(sweep_verdict(Some(m(60)), Some(&runner(false)), wait, life), None);
        assert_eq!(
            sweep_verdict(Some(m(1000)), Some(&runner(false)), wait, life).as_deref(),
            Some("its runner has not been busy for 15m")
        );
        assert_eq!(sweep_verdict(Some(m(1000)), Some(&runner(true)), wait, life), None);
        assert_eq!(
            sweep_verdict(Some(m(5)), None, wait, life).as_deref(),
            Some("GitHub no longer lists its runner")
        );
        assert_eq!(
            sweep_verdict(Some(m(4 * 3600)), Some(&runner(true)), wait, life).as_deref(),
            Some("it outlived the maximum lifetime")
        );
    }

    #[test]
    fn labels_are_checked() {
        assert_eq!(check_labels(&["a".into(), " b ".into(), "a".into(), "".into()]).unwrap(), ["a", "b"]);
        let e = check_labels(&["x;rm -rf".into()]).unwrap_err().to_string();
        assert_eq!(e, "--labels: `x;rm -rf` is not a runner label; use letters, digits, `-`, `_` and `.`");
    }
}
