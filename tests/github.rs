//! `aliyun-spot github start|stop|sweep` against the emulator and its GitHub fake: what reached
//! GitHub, what the instance received (user data, tags), what was printed, what is left.
//!
//! The end-to-end run boots the instance's cloud-config inside it (`--boot-user-data`) with a
//! fake runner (`tests/data/fake-github-runner/run.sh`) as the preinstalled one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use aliyun_spot_executor::config::Config;
use aliyun_spot_executor::ecs::EcsClient;
use aliyun_spot_executor::emulator::{Emulator, EmulatorOptions, Faults};
use aliyun_spot_executor::env::Env;
use aliyun_spot_executor::github::{self, api::GithubClient, ScopeArgs, StartArgs, StopArgs, SweepArgs};
use aliyun_spot_executor::secret::Secret;
use base64::Engine;
use serde_json::{json, Value};

const TOKEN: &str = "ghs_0123456789abcdefSECRETtoken";
const REPO: &str = "octo-org/hello-world";

struct World {
    emulator: Emulator,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    client: EcsClient,
    gh: GithubClient,
}

impl World {
    fn new(faults: Faults) -> World {
        World::with(faults, false)
    }

    /// `boot_user_data`: instances run their cloud-config (`--boot-user-data`).
    fn with(faults: Faults, boot_user_data: bool) -> World {
        let emulator = Emulator::start(EmulatorOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            boot_delay: Duration::from_millis(200),
            ssh_delay: Duration::from_millis(100),
            faults,
            boot_user_data,
            ..EmulatorOptions::default()
        })
        .expect("emulator starts");
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, crate::executor::config_text(&emulator.endpoint(), dir.path())).unwrap();
        let config = aliyun_spot_executor::config::load(
            Some(&config_path),
            &Env::from_map(Vec::<(String, String)>::new()),
        )
        .expect("configuration loads");
        let client = aliyun_spot_executor::offers::client(&config).unwrap();
        let gh =
            GithubClient::new(&format!("{}/github", emulator.endpoint()), Secret::new(TOKEN.into())).unwrap();
        World { emulator, dir, config_path, config, client, gh }
    }

    fn cli(&self, args: &[&str], output_file: Option<&Path>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            // Every log level on: the token must not reach any of them.
            .env("RUST_LOG", "trace")
            .env("GITHUB_TOKEN", TOKEN)
            .env("GITHUB_API_URL", format!("{}/github", self.emulator.endpoint()))
            .arg("--config")
            .arg(&self.config_path)
            .args(args);
        if let Some(f) = output_file {
            cmd.env("GITHUB_OUTPUT", f);
        }
        cmd.output().unwrap()
    }

    fn start_args(&self) -> StartArgs {
        StartArgs {
            scope: ScopeArgs { repo: Some(REPO.into()), org: None },
            labels: vec!["docker".into()],
            shape: aliyun_spot_executor::admin::ShapeArgs {
                arch: Some("amd64".into()),
                ..Default::default()
            },
            runner_group_id: 1,
            runner_dir: "/opt/actions-runner".into(),
            runner_url: None,
            runner_sha256: None,
            runner_user: "runner".into(),
            job_wait: Duration::from_secs(900),
            self_delete: false,
        }
    }

    fn start(&self, output: Option<&Path>) -> anyhow::Result<github::Started> {
        github::start(
            &self.config,
            &self.client,
            &self.gh,
            &self.start_args(),
            output,
            &AtomicBool::new(false),
        )
    }

    fn live(&self) -> usize {
        self.emulator.live_instances()
    }

    fn runners(&self) -> Vec<Value> {
        self.emulator.github()["runners"].as_array().cloned().unwrap_or_default()
    }

    fn runner(&self, name: &str) -> Value {
        self.runners().into_iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no runner {name}"))
    }

    fn user_data(&self, id: &str) -> String {
        let v = self.client.call("DescribeUserData", &[("InstanceId".to_string(), id.to_string())]).unwrap();
        let b64 = v["UserData"].as_str().unwrap().to_string();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    }

    /// The user data's cloud-config document (`#cloud-config` and JSON, as the driver renders it).
    fn cloud_config(&self, id: &str) -> Value {
        let ud = self.user_data(id);
        let body = ud.strip_prefix("#cloud-config\n").unwrap_or_else(|| panic!("not a cloud-config: {ud}"));
        serde_json::from_str(body).unwrap_or_else(|e| panic!("user data is not JSON ({e}): {ud}"))
    }

    /// The `write_files` entry for `path`, if any.
    fn written(&self, id: &str, path: &str) -> Option<Value> {
        let cc = self.cloud_config(id);
        cc["write_files"].as_array().unwrap().iter().find(|f| f["path"] == path).cloned()
    }

    fn tags(&self, id: &str) -> BTreeMap<String, String> {
        self.emulator.instances().into_iter().find(|i| i.id == id).unwrap().tags
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn start_then_stop_through_the_cli_leaves_nothing_and_the_token_goes_nowhere() {
    let w = World::new(Faults::default());
    let out_file = w.dir.path().join("github_output");
    std::fs::write(&out_file, "earlier=kept\n").unwrap();
    let out = w.cli(
        &["github", "start", "--repo", REPO, "--arch", "amd64", "--labels", "docker,build"],
        Some(&out_file),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // stdout is exactly the three outputs; GITHUB_OUTPUT got them appended.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let label = lines[0].strip_prefix("label=").expect("label line").to_string();
    let id = lines[1].strip_prefix("instance-id=").expect("instance-id line").to_string();
    assert_eq!(lines[2], format!("runner-name={label}"));
    assert!(label.starts_with("ci-runner-amd64-spot-"), "{label}");
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), format!("earlier=kept\n{stdout}"));
    assert!(stderr.contains(&format!("Created spot instance {id}")), "{stderr}");

    // GitHub: one runner with the unique label and the extra ones.
    let runner = w.runner(&label);
    assert_eq!(runner["labels"], json!([label, "docker", "build"]));
    assert_eq!(runner["deleted"], false);
    let jit = runner["encoded_jit_config"].as_str().unwrap().to_string();

    // ECS: one instance, tagged as managed and with the runner, its user data carries the JIT
    // configuration in a 0600 file and starts the runner with it.
    assert_eq!(w.live(), 1);
    let tags = w.tags(&id);
    let safety = &w.config.safety;
    assert_eq!(tags.get(&safety.managed_tag_key), Some(&safety.managed_tag_value));
    assert_eq!(tags.get(&safety.tag_key("github-runner")), Some(&label));
    assert_eq!(tags.get(&safety.tag_key("project")).map(String::as_str), Some("repos/octo-org/hello-world"));
    assert_eq!(tags.get(&safety.tag_key("runner")), Some(&runner["id"].to_string()));
    let ud = w.user_data(&id);
    assert!(ud.starts_with("#cloud-config\n"), "{ud}");
    assert!(ud.contains(&jit), "the JIT configuration is in the user data");
    let jit_file =
        w.written(&id, "/etc/aliyun-spot-executor/github-jitconfig").expect("the JIT file is written");
    assert_eq!(jit_file["permissions"], "0600");
    let launcher =
        w.written(&id, "/usr/local/lib/aliyun-spot-executor/github-runner.sh").expect("the launcher");
    assert!(
        launcher["content"].as_str().unwrap().contains("run.sh --jitconfig \"$(cat \"$2\")\""),
        "{launcher}"
    );
    // No --self-delete: no instance role, so nothing on the instance can delete instances.
    let rec = w.emulator.instances().into_iter().find(|i| i.id == id).unwrap();
    assert_eq!(rec.ram_role, None);
    assert_eq!(w.written(&id, "/etc/aliyun-spot-executor/github-release.json"), None);
    assert!(
        stderr.contains("The instance gets no RAM role and cannot delete itself (see --self-delete)"),
        "{stderr}"
    );

    // The token: nowhere but the Authorization header GitHub received (redacted in its log).
    let everywhere = format!(
        "{stdout}{stderr}{ud}{:?}{}{}{}",
        tags,
        serde_json::to_string(&w.emulator.requests()).unwrap(),
        w.emulator.github(),
        std::fs::read_to_string(&out_file).unwrap()
    );
    assert!(!everywhere.contains(TOKEN), "the GitHub token leaked");
    let gh_requests = w.emulator.github()["requests"].as_array().unwrap().clone();
    assert!(gh_requests.iter().all(|r| r["authorization"] == "REDACTED"), "{gh_requests:?}");

    // stop: instance gone, runner deregistered; a second stop is a quiet success.
    let out = w.cli(&["github", "stop", "--repo", REPO, "--label", &label], None);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("Deleted instance {id}")), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("Deregistered runner {label}")), "{}", text(&out.stderr));
    assert_eq!(w.live(), 0);
    assert_eq!(w.runner(&label)["deleted"], true);
    let out = w.cli(&["github", "stop", "--repo", REPO, "--instance-id", &id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("No runner instance is left to delete"), "{}", text(&out.stderr));
    assert!(!format!("{}{}", text(&out.stdout), text(&out.stderr)).contains(TOKEN));
}

#[test]
fn a_start_that_fails_after_creating_the_instance_leaves_nothing() {
    let w = World::new(Faults::default());
    // GITHUB_OUTPUT is a directory: appending fails after the instance is running.
    let err = w.start(Some(w.dir.path())).unwrap_err();
    assert!(format!("{err:#}").contains("failed to append to GITHUB_OUTPUT"), "{err:#}");
    assert_eq!(w.emulator.instances().len(), 1, "an instance was created");
    assert_eq!(w.live(), 0, "and deleted again");
    let runners = w.runners();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0]["deleted"], true, "the runner was deregistered");
}

#[test]
fn stock_out_falls_back_to_the_next_offer_as_prepare_does() {
    let w = World::new(Faults::default());
    let shape = w.config.shape(aliyun_spot_executor::selection::Arch::Amd64).clone();
    let offers = aliyun_spot_executor::offers::ranked(&w.client, &w.config, &shape, false).unwrap();
    assert!(offers.len() >= 2);
    let first = &offers[0];
    w.emulator.set_faults(Faults {
        no_stock: vec![format!("{}@{}", first.instance_type, first.zone)],
        ..Faults::default()
    });
    let started = w.start(None).unwrap();
    let inst = w.emulator.instances().into_iter().find(|i| i.id == started.instance_id).unwrap();
    assert_ne!(
        (inst.instance_type.as_str(), inst.zone.as_str()),
        (first.instance_type.as_str(), first.zone.as_str())
    );
    let runs: Vec<_> = w
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .map(|r| r.code)
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[0].as_deref().is_some_and(|c| c.contains("NoStock")), "{runs:?}");
    // Prepare's price limit (the factor, rounded up at the third decimal) and AutoReleaseTime
    // (whole minutes, at least the lifetime ahead): the walk is the same.
    let chosen =
        offers.iter().find(|o| o.instance_type == inst.instance_type && o.zone == inst.zone).unwrap();
    assert_eq!(
        inst.spot_price_limit,
        aliyun_spot_executor::pricing::price_limit(
            chosen.spot_price,
            w.config.spot.price_limit_factor,
            w.config.spot.max_price_per_hour
        )
    );
    let release = inst.auto_release_time.clone().expect("AutoReleaseTime is set");
    let release =
        time::OffsetDateTime::parse(&release, &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(release.second(), 0, "{release}");
    assert!(
        release >= time::OffsetDateTime::now_utc() + w.config.safety.max_lifetime - Duration::from_secs(60)
    );
    // Its ClientTokens differ per offer, in prepare's format.
    let tokens: Vec<String> = w
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .map(|r| r.params.get("ClientToken").cloned().unwrap_or_default())
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_ne!(tokens[0], tokens[1]);
    assert!(tokens.iter().all(|t| t.starts_with("ase-") && t.len() <= 64), "{tokens:?}");
    github::stop(
        &w.config,
        &w.client,
        &w.gh,
        &StopArgs {
            scope: ScopeArgs { repo: Some(REPO.into()), org: None },
            instance_id: Some(started.instance_id),
            label: None,
        },
    )
    .unwrap();
    assert_eq!(w.live(), 0);
}

#[test]
fn sweep_deletes_an_instance_whose_runner_is_gone_and_keeps_a_busy_one() {
    let w = World::new(Faults::default());
    let busy = w.start(None).unwrap();
    let gone = w.start(None).unwrap();
    assert!(w.emulator.github_set_runner(&busy.runner_name, &json!({"status": "online", "busy": true})));
    // An ephemeral runner that ran its job is removed by GitHub.
    assert!(w.emulator.github_set_runner(&gone.runner_name, &json!({"deleted": true})));
    let args = SweepArgs {
        scope: ScopeArgs { repo: Some(REPO.into()), org: None },
        job_wait: Duration::from_secs(900),
        dry_run: false,
    };
    github::sweep(&w.config, &w.client, &w.gh, &args).unwrap();
    let live: Vec<String> = w.emulator.instances().into_iter().filter(|i| i.live).map(|i| i.id).collect();
    assert_eq!(live, vec![busy.instance_id.clone()]);
    // Another repository's sweep sees neither.
    let other =
        SweepArgs { scope: ScopeArgs { repo: Some("octo-org/other".into()), org: None }, ..args.clone() };
    github::sweep(&w.config, &w.client, &w.gh, &other).unwrap();
    assert_eq!(w.live(), 1);
    // The runner is done: the next sweep deletes it.
    assert!(w.emulator.github_set_runner(&busy.runner_name, &json!({"busy": false, "deleted": true})));
    github::sweep(&w.config, &w.client, &w.gh, &args).unwrap();
    assert_eq!(w.live(), 0);
}

#[test]
fn bad_input_is_one_line_and_creates_nothing() {
    let w = World::new(Faults::default());
    let out = w.cli(&["github", "start", "--repo", "no-slash"], None);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).trim(),
        "aliyun-spot: --repo `no-slash` is not OWNER/REPO; write it as in `octo-org/hello-world`"
    );
    let out = w.cli(&["github", "start", "--repo", REPO, "--labels", "ok,$(id)"], None);
    assert_eq!(
        text(&out.stderr).trim(),
        "aliyun-spot: --labels: `$(id)` is not a runner label; use letters, digits, `-`, `_` and `.`"
    );
    assert!(w.emulator.instances().is_empty());
    assert!(w.runners().is_empty());
}

#[test]
fn stop_leaves_an_instance_that_is_not_this_repositorys_runner_alone() {
    let w = World::new(Faults::default());
    let started = w.start(None).unwrap();
    let out =
        w.cli(&["github", "stop", "--repo", "octo-org/other", "--instance-id", &started.instance_id], None);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr).lines().last().unwrap_or_default(),
        format!(
            "aliyun-spot: --instance-id {} is not a runner instance of repos/octo-org/other; it was left alone",
            started.instance_id
        )
    );
    assert_eq!(w.live(), 1);
    assert_eq!(w.runner(&started.runner_name)["deleted"], false);
    let out = w.cli(&["github", "stop", "--repo", REPO, "--instance-id", &started.instance_id], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(w.live(), 0);
    assert_eq!(w.runner(&started.runner_name)["deleted"], true);
}

#[test]
fn the_github_fake_wants_a_token_and_unique_names() {
    let w = World::new(Faults::default());
    let url = format!("{}/github/repos/{REPO}/actions/runners/generate-jitconfig", w.emulator.endpoint());
    let body = r#"{"name":"r1","runner_group_id":1,"labels":["r1"]}"#;
    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(ureq::post(&url).send_string(body)), 401);
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(status(ureq::post(&url).set("Authorization", &auth).send_string(body)), 201);
    assert_eq!(status(ureq::post(&url).set("Authorization", &auth).send_string(body)), 422);
    // Through our client, the duplicate is one line naming the call and the cause.
    let e = w
        .gh
        .generate_jitconfig(&github::api::Scope::parse(Some(REPO), None).unwrap(), "r1", &["r1".into()], 1)
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "GitHub API POST repos/octo-org/hello-world/actions/runners/generate-jitconfig failed: HTTP 422: Already exists - A runner with the name r1 already exists.; GitHub rejected the request (a runner of that name may already exist)"
    );
    let snap = w.emulator.github();
    assert_eq!(snap["requests"].as_array().unwrap().len(), 4);
    assert!(!snap.to_string().contains(TOKEN));
}

#[test]
fn self_delete_is_an_opt_in_that_gives_the_instance_its_role() {
    let w = World::new(Faults::default());
    let mut args = w.start_args();
    args.self_delete = true;
    let mut with_role = w.config.clone();
    with_role.instance.ram_role_name = Some("ci-spot-self-destruct".into());
    let started = github::start(&with_role, &w.client, &w.gh, &args, None, &AtomicBool::new(false)).unwrap();
    let rec = w.emulator.instances().into_iter().find(|i| i.id == started.instance_id).unwrap();
    assert_eq!(rec.ram_role.as_deref(), Some("ci-spot-self-destruct"));
    let ud = w.user_data(&started.instance_id);
    let release = w
        .written(&started.instance_id, "/etc/aliyun-spot-executor/github-release.json")
        .expect("the release settings are written");
    let release: Value = serde_json::from_str(release["content"].as_str().unwrap()).unwrap();
    assert_eq!(release["idle_timeout_seconds"], 0, "{release}");
    assert!(!ud.contains(TOKEN));
    let stop = StopArgs {
        scope: ScopeArgs { repo: Some(REPO.into()), org: None },
        instance_id: None,
        label: Some(started.label),
    };
    github::stop(&w.config, &w.client, &w.gh, &stop).unwrap();
    assert_eq!(w.live(), 0);

    // Without a role to give, --self-delete is refused before anything is created, and the
    // runner registration is undone.
    let mut config = w.config.clone();
    config.instance.ram_role_name = None;
    let e = github::start(&config, &w.client, &w.gh, &args, None, &AtomicBool::new(false)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--self-delete needs an instance RAM role; set `instance.ram_role_name` (docs/safety.md has its policy) or drop --self-delete"
    );
    assert_eq!(w.emulator.instances().len(), 1);
    assert!(w.runners().iter().all(|r| r["deleted"] == true));
}

/// Polls `f` until it returns `Some`; the bound is a safety net, never a timing assertion.
fn wait_for<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_runner_runs_its_job_on_the_booted_instance_which_then_deletes_itself() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: booting instances needs root (namespaces)");
        return;
    }
    // No refusal while initializing: the instance may delete itself within seconds.
    let w = World::with(Faults { initializing: Duration::ZERO, ..Faults::default() }, true);
    // The "image"'s preinstalled runner: the fake runner, its job body and where the fake is.
    // The instance's /tmp, /root, /builds and /cache are its own, so the directory goes where
    // the instance sees the host's files whatever the checkout's path.
    let runner = tempfile::Builder::new().prefix("aliyun-spot-test-").tempdir_in("/var/tmp").unwrap();
    // The launcher hands the runner's directory to the unprivileged runner user.
    std::fs::set_permissions(runner.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake-github-runner/run.sh");
    std::fs::copy(&fake, runner.path().join("run.sh")).unwrap();
    std::fs::write(runner.path().join("emulator-url"), w.emulator.endpoint()).unwrap();
    // The job waits for the test's go (a file in the instance's own /tmp) so the runner is seen
    // busy while it runs; bounded, so a broken test cannot leave it waiting forever.
    std::fs::write(
        runner.path().join("job.sh"),
        "echo \"JOB-MARKER on $(hostname) as $(id -un)\"\n\
         i=0; while [ ! -e /tmp/go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo JOB-DONE > /tmp/job-done\n",
    )
    .unwrap();
    let mut config = w.config.clone();
    config.instance.ram_role_name = Some("ci-spot-self-destruct".into());
    // The instance's watchdog asks the emulator's metadata service for the role's credentials.
    config.credentials.metadata_endpoint = w.emulator.endpoint();
    let mut args = w.start_args();
    args.self_delete = true;
    args.runner_dir = runner.path().display().to_string();
    let started = github::start(&config, &w.client, &w.gh, &args, None, &AtomicBool::new(false)).unwrap();
    let id = started.instance_id.clone();
    let bound = Duration::from_secs(120);

    let busy = wait_for("the runner to be busy", bound, || {
        let r = w.runner(&started.runner_name);
        (r["busy"] == true).then_some(r)
    });
    assert_eq!(busy["status"], "online", "{busy}");
    let tmp = w.emulator.work_dir().join(&id).join("fs/tmp");
    std::fs::write(tmp.join("go"), "").unwrap();

    let rec = wait_for("the instance to delete itself", bound, || {
        w.emulator.instances().into_iter().find(|r| r.id == id && !r.live)
    });
    let log = String::from_utf8(
        w.emulator.instance_file(&id, "/var/log/aliyun-spot-github-runner.log").expect("the launcher's log"),
    )
    .unwrap();
    let host_name = &rec.host_name;
    assert!(log.lines().any(|l| l == format!("JOB-MARKER on {host_name} as runner")), "{log}");
    assert!(log.contains("fake-runner: job succeeded\n"), "{log}");
    assert!(
        log.contains("aliyun-spot-github: deleting this instance: the runner exited (status 0)"),
        "{log}"
    );
    assert_eq!(w.emulator.instance_file(&id, "/tmp/job-done").as_deref(), Some(&b"JOB-DONE\n"[..]));
    let boot = w.emulator.boot_log(&id);
    assert!(boot.contains("boot: runcmd exited with status 0"), "{boot}");
    assert!(!boot.contains(TOKEN) && !log.contains(TOKEN));

    // The instance deleted itself, with its role's credentials, through the watchdog (the
    // request log gets its entry once the answer is made, just after the deletion).
    let deletes = wait_for("the DeleteInstance request in the log", bound, || {
        let d: Vec<_> = w
            .emulator
            .requests()
            .into_iter()
            .filter(|r| r.action.as_deref() == Some("DeleteInstance") && r.status == 200)
            .collect();
        (!d.is_empty()).then_some(d)
    });
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].role.as_deref(), Some("ci-spot-self-destruct"));
    assert_eq!(deletes[0].params.get("InstanceId"), Some(&id));
    assert_eq!(w.live(), 0);
    let r = w.runner(&started.runner_name);
    assert_eq!((r["busy"].clone(), r["deleted"].clone()), (json!(false), json!(true)), "{r}");
}
