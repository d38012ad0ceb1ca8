//! The safety nets for when cleanup never runs: the self-destruct watchdog that prepare puts
//! into every instance's user data, and `aliyun-spot sweep`.
//!
//! The watchdog is taken from a real prepare's user data (as the instance's metadata service
//! serves it) and run with python3, exactly as cloud-config installs it; the only change is
//! where it finds the API and its instance's metadata (the emulator, attributed by path rather
//! than by source address). Its credentials are the scoped STS credentials prepare wrote over
//! SSH (an emulated instance shares this machine's filesystem, so the file is where the
//! watchdog looks). User data holds the instance's private host key: it is never printed
//! here, only the two files taken out of it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use aliyun_spot_executor::ecs::{RunInstancesRequest, SpotStrategy};
use aliyun_spot_executor::emulator::{Emulator, RequestRecord};
use aliyun_spot_executor::env::Env;
use aliyun_spot_executor::stages::tags;
use aliyun_spot_executor::watchdog;
use serde_json::{json, Value};

use crate::executor::World;

/// The role config/emulator.toml has the runner assume for each instance (`self_destruct.role_arn`).
const ROLE: &str = "ci-spot-self-destruct";
/// Above any Linux PID (PID_MAX_LIMIT is 2^22): a marker of a process that cannot be alive.
const DEAD_PID: u32 = 4_194_305;

/// GET a metadata path of instance `id` in hardened mode (token first), as the instance would.
fn instance_metadata(emulator: &Emulator, id: &str, path: &str) -> String {
    let base = format!("{}/instances/{id}/latest", emulator.endpoint());
    let token = ureq::put(&format!("{base}/api/token"))
        .set("X-aliyun-ecs-metadata-token-ttl-seconds", "60")
        .call()
        .expect("metadata token")
        .into_string()
        .unwrap();
    ureq::get(&format!("{base}/{path}"))
        .set("X-aliyun-ecs-metadata-token", &token)
        .call()
        .unwrap_or_else(|e| panic!("metadata `{path}` of {id}: {e}"))
        .into_string()
        .unwrap()
}

/// The content of the `write_files` entry for `path` in a cloud-config document (JSON after
/// the `#cloud-config` line, which cloud-init reads as YAML). Panics without showing the
/// document (it holds a private key).
fn write_file_content(doc: &str, path: &str) -> String {
    let body = doc.strip_prefix("#cloud-config\n").expect("user data starts with #cloud-config");
    let doc: Value = serde_json::from_str(body).map_err(|e| e.to_string()).expect("user data is JSON");
    let files = doc["write_files"].as_array().expect("user data has write_files");
    let file = files
        .iter()
        .find(|f| f["path"] == path)
        .unwrap_or_else(|| panic!("user data has no write_files entry for {path}"));
    file["content"]
        .as_str()
        .unwrap_or_else(|| panic!("the write_files entry for {path} has no content"))
        .to_string()
}

/// Runs `watchdog.py CONFIG --once` with the system python3.
fn run_watchdog(script: &Path, config: &Path) -> Output {
    Command::new("python3").arg(script).arg(config).arg("--once").output().expect("python3 runs")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn deletes_of<'a>(requests: &'a [RequestRecord], id: &str) -> Vec<&'a RequestRecord> {
    requests
        .iter()
        .filter(|r| r.action.as_deref() == Some("DeleteInstance"))
        .filter(|r| r.params.get("InstanceId").map(String::as_str) == Some(id))
        .collect()
}

/// Whether the emulator still runs instance `id`.
pub(crate) fn is_live(emulator: &Emulator, id: &str) -> bool {
    emulator.instances().iter().any(|i| i.id == id && i.live)
}

/// `/run/aliyun-spot-executor/<id>`, where stages leave their markers; removed at the end.
struct MarkerDir(PathBuf);

impl MarkerDir {
    fn new(id: &str) -> MarkerDir {
        let dir = Path::new(watchdog::STATE_ROOT).join(id);
        std::fs::create_dir_all(&dir).unwrap();
        MarkerDir(dir)
    }

    /// `activity` last touched `ago` before now.
    fn activity(&self, ago: Duration) {
        let f = std::fs::File::create(self.0.join("activity")).unwrap();
        f.set_modified(SystemTime::now() - ago).unwrap();
    }

    fn busy(&self, pid: u32) -> PathBuf {
        let p = self.0.join(format!("busy.{pid}"));
        std::fs::write(&p, "").unwrap();
        p
    }
}

impl Drop for MarkerDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes an instance's handed-over credentials file at the end of a test.
struct CredentialsFile(PathBuf);

impl Drop for CredentialsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn watchdog_from_user_data_spares_a_busy_instance_and_deletes_an_idle_one_with_handed_over_credentials() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let w = World::new();
    let job = w.job("3001", "true");
    let mut attempt = w.attempt(&job);
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    let record = w.emulator.instances().into_iter().next().expect("one instance");
    let id = record.id.clone();
    assert_eq!(record.ram_role, None, "no shared RAM role is given to the instance");
    let log = attempt.log.text();
    assert!(
        log.contains(&format!(
            "Gave {id} credentials that can delete only {id}, for its self-destruct watchdog"
        )),
        "{log}"
    );
    let creds = CredentialsFile(PathBuf::from(watchdog::credentials_path(&id)));
    let meta = std::fs::metadata(&creds.0).expect("prepare wrote the credentials file over SSH");
    assert_eq!((meta.permissions().mode() & 0o777, meta.uid()), (0o600, 0), "root-only file");
    let dir = std::fs::metadata(watchdog::CREDENTIALS_DIR).unwrap();
    assert_eq!((dir.permissions().mode() & 0o777, dir.uid()), (0o700, 0), "root-only directory");
    let assumed: Vec<RequestRecord> =
        w.emulator.requests().into_iter().filter(|r| r.action.as_deref() == Some("AssumeRole")).collect();
    assert_eq!(assumed.len(), 1, "{assumed:#?}");
    assert_eq!(
        assumed[0].params.get("Policy").map(String::as_str),
        Some(aliyun_spot_executor::sts::session_policy(&id).to_string().as_str()),
        "the session policy names this instance only"
    );

    // The exact files prepare sent, from the instance's own user data.
    let user_data = instance_metadata(&w.emulator, &id, "user-data");
    let script = write_file_content(&user_data, watchdog::SCRIPT_PATH);
    assert_eq!(script, watchdog::SCRIPT, "the program in user data is the shipped one, byte for byte");
    let settings = write_file_content(&user_data, watchdog::CONFIG_PATH);
    let mut conf: Value = serde_json::from_str(&settings).expect("watchdog.json is JSON");
    assert_eq!(conf["region_id"], "cn-hangzhou");
    assert_eq!(conf["ram_role"], Value::Null);
    assert_eq!(conf["credentials_dir"], watchdog::CREDENTIALS_DIR);
    assert_eq!(conf["idle_timeout_seconds"], 1800, "safety.idle_timeout defaults to 30m");
    assert_eq!(conf["state_root"], watchdog::STATE_ROOT);
    assert_eq!(conf["endpoint"], w.emulator.endpoint());
    let deadline = conf["deadline_epoch"].as_i64().unwrap();
    assert_eq!(deadline - conf["started_epoch"].as_i64().unwrap(), 3 * 3600, "max_lifetime 3h");
    // The only change: where the API and this instance's metadata are.
    conf["endpoint"] = json!(w.emulator.endpoint());
    conf["metadata"] = json!(format!("{}/instances/{id}", w.emulator.endpoint()));
    let files = crate::private_tempdir();
    let script_path = files.path().join("watchdog.py");
    let conf_path = files.path().join("watchdog.json");
    std::fs::write(&script_path, &script).unwrap();
    std::fs::write(&conf_path, conf.to_string()).unwrap();

    // Busy: a stage is running (its marker names a live process), the last activity is old.
    let markers = MarkerDir::new(&id);
    markers.activity(Duration::from_secs(2 * 3600));
    let busy = markers.busy(std::process::id());
    let out = run_watchdog(&script_path, &conf_path);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{}", describe(&out));
    assert!(is_live(&w.emulator, &id), "a busy instance is kept");
    assert!(deletes_of(&w.emulator.requests(), &id).is_empty());

    // Idle: the stage ended two hours ago; a marker left by a dead process does not count.
    std::fs::remove_file(&busy).unwrap();
    markers.busy(DEAD_PID);
    let out = run_watchdog(&script_path, &conf_path);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("aliyun-spot-watchdog: deleting instance {id}: no stage ran for 1800s\n"),
        "one line, no credentials"
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out));
    assert!(!is_live(&w.emulator, &id), "the idle instance deleted itself");
    let requests = w.emulator.requests();
    let deletes = deletes_of(&requests, &id);
    // ECS refuses to delete an instance still initializing; the watchdog waits that out.
    let (d, refused) = deletes.split_last().expect("the watchdog asked to delete");
    assert!(
        refused.iter().all(|r| r.code.as_deref() == Some("IncorrectInstanceStatus.Initializing")),
        "{deletes:#?}"
    );
    assert_eq!(d.status, 200, "{d:#?}");
    assert_eq!(d.code, None, "{d:#?}");
    assert!(d.access_key_id.as_deref().is_some_and(|k| k.starts_with("STS.")), "STS credentials: {d:#?}");
    assert_eq!(d.role.as_deref(), Some(ROLE), "signed with the assumed role's scoped credentials: {d:#?}");
    assert_eq!(d.params.get("Force").map(String::as_str), Some("true"), "{d:#?}");
    assert_eq!(d.params.get("SecurityToken").map(String::as_str), Some("REDACTED"), "{d:#?}");

    // Its instance gone, the watchdog reports the failed check in one line and keeps going.
    let out = run_watchdog(&script_path, &conf_path);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{}", describe(&out));
    assert!(err.starts_with("aliyun-spot-watchdog: check failed: HTTP Error 404"), "{}", describe(&out));

    // Cleanup after the watchdog: "already gone" is success.
    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

/// Settings written by hand (not prepare's): a lifetime already over, markers in a private
/// directory. Proves that the maximum lifetime wins over a running stage. Runs in the opt-in
/// shared-role mode, so the watchdog's metadata path (the role's credentials) stays covered.
#[test]
fn watchdog_deletes_a_busy_instance_past_its_maximum_lifetime() {
    let w = World::with(
        Default::default(),
        &[
            ("self_destruct", "credentials", "instance_role".into()),
            ("instance", "ram_role_name", ROLE.into()),
        ],
    );
    let job = w.job("3002", "true");
    let mut attempt = w.attempt(&job);
    assert!(attempt.prepare().unwrap().success(), "{}", attempt.log.text());
    let id = w.emulator.instances()[0].id.clone();
    assert_eq!(w.emulator.instances()[0].ram_role.as_deref(), Some(ROLE), "the opt-in mode passes the role");
    assert!(!Path::new(&watchdog::credentials_path(&id)).exists(), "nothing is handed over in this mode");

    let files = crate::private_tempdir();
    let root = files.path().join("markers");
    std::fs::create_dir_all(root.join(&id)).unwrap();
    std::fs::write(root.join(&id).join(format!("busy.{}", std::process::id())), "").unwrap();
    std::fs::write(root.join(&id).join("activity"), "").unwrap();
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let script = files.path().join("watchdog.py");
    std::fs::write(&script, watchdog::SCRIPT).unwrap();
    let settings = |v: Value| {
        let p = files.path().join("watchdog.json");
        std::fs::write(&p, v.to_string()).unwrap();
        p
    };
    let conf = json!({
        "region_id": "cn-hangzhou",
        "endpoint": w.emulator.endpoint(),
        "metadata": format!("{}/instances/{id}", w.emulator.endpoint()),
        "ram_role": ROLE,
        "idle_timeout_seconds": 1800,
        "started_epoch": now - 3 * 3600,
        "deadline_epoch": now - 60,
        "state_root": root.display().to_string(),
        "poll_seconds": 30,
    });

    // Unusable settings and an unreachable metadata service: one line, exit 1, nothing deleted.
    let incomplete = settings(json!({ "region_id": "cn-hangzhou" }));
    let out = run_watchdog(&script, &incomplete);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("aliyun-spot-watchdog: cannot read {}: `metadata` is missing\n", incomplete.display())
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut unreachable = conf.clone();
    unreachable["metadata"] = json!(format!("http://{closed}"));
    let out = run_watchdog(&script, &settings(unreachable));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{}", describe(&out));
    assert!(err.starts_with("aliyun-spot-watchdog: check failed: "), "{}", describe(&out));
    assert!(is_live(&w.emulator, &id));

    // An API that answers errors that are not JSON: one line with the HTTP status, exit 1.
    let mut broken_api = conf.clone();
    broken_api["endpoint"] = json!(format!("{}/no-such-api", w.emulator.endpoint()));
    let out = run_watchdog(&script, &settings(broken_api));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "aliyun-spot-watchdog: deleting instance {id}: it outlived its maximum lifetime\n\
             aliyun-spot-watchdog: check failed: DeleteInstance failed: HTTP 404 (RequestId: ?)\n"
        )
    );
    assert!(is_live(&w.emulator, &id));

    // Past the deadline, a running stage does not save it.
    let out = run_watchdog(&script, &settings(conf));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("aliyun-spot-watchdog: deleting instance {id}: it outlived its maximum lifetime\n")
    );
    assert!(!is_live(&w.emulator, &id));
    let requests = w.emulator.requests();
    let deletes = deletes_of(&requests, &id);
    // ECS refuses to delete an instance still initializing; the watchdog waits that out.
    let (d, refused) = deletes.split_last().expect("the watchdog asked to delete");
    assert!(
        refused.iter().all(|r| r.code.as_deref() == Some("IncorrectInstanceStatus.Initializing")),
        "{deletes:#?}"
    );
    assert_eq!(d.status, 200, "{d:#?}");
    assert_eq!(d.role.as_deref(), Some(ROLE), "{d:#?}");

    assert!(attempt.cleanup().unwrap().success(), "{}", attempt.runner_log.text());
    w.assert_nothing_left();
}

/// Runs `aliyun-spot --config … sweep ARGS` and returns its stdout lines.
fn sweep(w: &World, args: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .env_clear()
        .envs(w.base_env())
        .arg("--config")
        .arg(&w.config)
        .arg("sweep")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "sweep {args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// The id of the instance tagged with job `job`.
pub(crate) fn job_instance(emulator: &Emulator, job: &str) -> String {
    emulator
        .instances()
        .into_iter()
        .find(|i| i.tags.get("ci-spot-executor:job").map(String::as_str) == Some(job))
        .unwrap_or_else(|| panic!("no instance for job {job}"))
        .id
}

/// One line of `lines` starting with `prefix`, which must end with `suffix`.
fn line_for(lines: &[String], prefix: &str, suffix: &str) {
    let matching: Vec<&String> = lines.iter().filter(|l| l.starts_with(prefix)).collect();
    assert_eq!(matching.len(), 1, "one line starting with `{prefix}`: {lines:#?}");
    assert!(matching[0].ends_with(suffix), "`{}` should end with `{suffix}`", matching[0]);
}

#[test]
fn sweep_deletes_a_leaked_instance_and_leaves_a_running_job_alone() {
    let w = World::new();
    let job_a = w.job("4001", "true");
    let job_b = w.job("4002", "true");
    let mut running = w.attempt(&job_a);
    let mut leaking = w.attempt(&job_b);
    assert!(running.prepare().unwrap().success(), "{}", running.log.text());
    assert!(leaking.prepare().unwrap().success(), "{}", leaking.log.text());
    let a = job_instance(&w.emulator, "4001");
    let b = job_instance(&w.emulator, "4002");

    // Job B's runner host lost track of it: its job state is gone, cleanup never ran.
    let state_root = w.dir.path().join("state");
    let b_dir = std::fs::read_dir(state_root.join(super::executor::RUNNER_ID))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("42-4002-")))
        .expect("job 4002 has a state directory");
    std::fs::remove_dir_all(&b_dir).unwrap();

    // An instance of another runner host, with no job state here either.
    let foreign = create_foreign_instance(&w, &a);

    let lines = sweep(&w, &["--dry-run"]);
    line_for(
        &lines,
        &format!("would delete {b} (job 4002, project 42, age "),
        "): its job has ended on this host (no job state)",
    );
    assert!(!lines.iter().any(|l| l.contains(&a) || l.contains(&foreign)), "{lines:#?}");
    assert_eq!(lines.last().map(String::as_str), Some("0 deleted, 2 kept of 3 managed instance(s)"));
    assert!(w.emulator.requests().iter().all(|r| r.action.as_deref() != Some("DeleteInstance")));
    assert_eq!(w.live(), 3);

    let lines = sweep(&w, &[]);
    line_for(
        &lines,
        &format!("deleted {b} (job 4002, project 42, age "),
        "): its job has ended on this host (no job state)",
    );
    assert_eq!(lines.last().map(String::as_str), Some("1 deleted, 2 kept of 3 managed instance(s)"));
    assert!(!is_live(&w.emulator, &b), "the leaked instance is deleted");
    assert!(is_live(&w.emulator, &a), "the running job's instance is kept");
    assert!(is_live(&w.emulator, &foreign), "another host's instance is kept");
    let requests = w.emulator.requests();
    // A new instance refuses deletion while it initializes; sweep waits that out.
    let deletes: Vec<_> = requests
        .iter()
        .filter(|r| r.action.as_deref() == Some("DeleteInstance"))
        .filter(|r| r.code.as_deref() != Some("IncorrectInstanceStatus.Initializing"))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:#?}");
    assert_eq!(deletes[0].params.get("InstanceId"), Some(&b));
    assert_eq!(deletes[0].status, 200);

    // By age: this host's running job goes too, another host's instance only with --all.
    // (CreationTime has minute precision, rounded down, so both are older than 1s already
    // once a second has passed.)
    std::thread::sleep(Duration::from_secs(2));
    let lines = sweep(&w, &["--dry-run", "--older-than", "1s"]);
    line_for(&lines, &format!("would delete {a} (job 4001, project 42, age "), "): older than 1s");
    assert!(!lines.iter().any(|l| l.contains(&foreign)), "{lines:#?}");
    assert_eq!(lines.last().map(String::as_str), Some("0 deleted, 1 kept of 2 managed instance(s)"));
    let lines = sweep(&w, &["--dry-run", "--all", "--older-than", "1s"]);
    line_for(&lines, &format!("would delete {a} (job 4001, "), "): older than 1s");
    line_for(&lines, &format!("would delete {foreign} (job 4003, "), "): older than 1s");
    assert_eq!(lines.last().map(String::as_str), Some("0 deleted, 0 kept of 2 managed instance(s)"));
    assert_eq!(w.live(), 2, "dry runs delete nothing");

    assert!(running.cleanup().unwrap().success(), "{}", running.runner_log.text());
    assert!(leaking.cleanup().unwrap().success(), "{}", leaking.runner_log.text());
    let config = aliyun_spot_executor::config::load(Some(&w.config), &Env::default()).unwrap();
    let client = aliyun_spot_executor::offers::client(&config).unwrap();
    client.delete_instance(&foreign, true).unwrap();
    w.assert_nothing_left();
}

/// Creates a managed instance tagged as created by another runner host, like `like`.
fn create_foreign_instance(w: &World, like: &str) -> String {
    let config = aliyun_spot_executor::config::load(Some(&w.config), &Env::default()).unwrap();
    let client = aliyun_spot_executor::offers::client(&config).unwrap();
    let model = w.emulator.instances().into_iter().find(|i| i.id == like).unwrap();
    let safety = &config.safety;
    let req = RunInstancesRequest {
        zone_id: model.zone.clone(),
        instance_type: model.instance_type.clone(),
        image_id: model.image_id.clone(),
        security_group_id: config.network.security_group_id.clone().unwrap(),
        vswitch_id: config.network.vswitches[&model.zone].clone(),
        instance_name: "ci-runner-amd64-spot-elsewhere".into(),
        host_name: None,
        spot_strategy: SpotStrategy::SpotAsPriceGo,
        spot_price_limit: None,
        spot_duration: Some(0),
        internet_max_bandwidth_out: 0,
        system_disk_category: None,
        system_disk_size: None,
        key_pair_name: None,
        ram_role_name: None,
        user_data: None,
        tags: vec![
            (safety.managed_tag_key.clone(), safety.managed_tag_value.clone()),
            (safety.tag_key(tags::RUNNER), "7".into()),
            (safety.tag_key(tags::PROJECT), "42".into()),
            (safety.tag_key(tags::JOB), "4003".into()),
            (safety.tag_key(tags::HOST), "another-runner-host".into()),
        ],
        auto_release_time: None,
        client_token: "sweep-test-foreign-instance".into(),
        dry_run: false,
    };
    client.run_instances(&req).unwrap().into_iter().next().expect("an instance id")
}
