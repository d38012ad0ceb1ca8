//! Configuration options that change what prepare asks ECS for, checked in the emulator's
//! request log and through a real job.

use aliyun_spot_executor::emulator::{Faults, DEFAULT_ACCESS_KEY_SECRET};
use toml::Value;

use super::executor::World;

fn run_instances_params(w: &World) -> Vec<serde_json::Value> {
    w.emulator
        .requests()
        .into_iter()
        .filter(|r| r.action.as_deref() == Some("RunInstances"))
        .map(|r| serde_json::to_value(&r.params).unwrap())
        .collect()
}

#[test]
fn spot_as_price_go_sends_no_price_limit() {
    let w = World::with(Faults::default(), &[("spot", "strategy", Value::String("SpotAsPriceGo".into()))]);
    let job = w.job("5001", "echo PRICE-GO");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}\n{}", out.job_log, out.runner_log);
    let params = run_instances_params(&w);
    assert_eq!(params.len(), 1);
    assert_eq!(params[0]["SpotStrategy"], "SpotAsPriceGo");
    assert!(params[0].get("SpotPriceLimit").is_none(), "{}", params[0]);
    w.assert_nothing_left();
}

#[test]
fn the_default_price_limit_is_the_factor_times_the_offer_price() {
    let w = World::new();
    let job = w.job("5002", "true");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", out.job_log);
    let params = run_instances_params(&w);
    assert_eq!(params[0]["SpotStrategy"], "SpotWithPriceLimit");
    let limit: f64 = params[0]["SpotPriceLimit"].as_str().unwrap().parse().unwrap();
    let created = &w.emulator.instances()[0];
    let line = out.job_log.lines().find(|l| l.starts_with("Trying ")).unwrap().to_string();
    let price: f64 = line
        .split(", ")
        .nth(2)
        .unwrap()
        .trim_end_matches(" CNY/hour")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Rounded up at the third decimal, the most ECS accepts (see src/pricing.rs).
    assert!(
        limit >= price * 1.2 - 1e-9 && limit < price * 1.2 + 0.001,
        "limit {limit} for price {price}: {line}"
    );
    assert_eq!(limit, (limit * 1000.0).round() / 1000.0, "three decimals: {limit}");
    assert_eq!(created.spot_price_limit, Some(limit));
    w.assert_nothing_left();
}

#[test]
fn a_price_cap_below_every_offer_skips_them_all_and_fails_cleanly() {
    // A cap below every offer: each is passed over with the reason, and nothing is created.
    let w = World::with(Faults::default(), &[("spot", "max_price_per_hour", Value::Float(0.0001))]);
    let job = w.job("5003", "true");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert_eq!(out.prepare, Some(aliyun_spot_executor::demo::gitlab::Exit::Code(2)), "{}", out.job_log);
    assert!(out.job_log.contains("spot price above the cap of 0.0001 CNY/hour"), "{}", out.job_log);
    assert!(out.job_log.lines().any(|l| l.starts_with("ERROR: no spot capacity: all ")), "{}", out.job_log);
    assert!(run_instances_params(&w).is_empty(), "nothing above the cap is even tried");
    assert!(w.emulator.instances().is_empty());
}

#[test]
fn a_registered_key_pair_and_its_private_key_log_in_instead_of_per_job_keys() {
    use std::os::unix::fs::PermissionsExt;
    let keys = aliyun_spot_executor::keys::generate_ed25519("team-key").unwrap();
    let dir = crate::private_tempdir();
    let key_file = dir.path().join("id_ed25519");
    std::fs::write(&key_file, keys.private_openssh.expose()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let w = World::with(
        Faults::default(),
        &[
            ("ssh", "key_pair_name", Value::String("ci-team-key".into())),
            ("ssh", "private_key_file", Value::String(key_file.display().to_string())),
        ],
    );
    let api = super::client_emulator::client(&w.emulator, DEFAULT_ACCESS_KEY_SECRET);
    api.import_key_pair("ci-team-key", &keys.public_openssh).unwrap();
    let job = w.job("5004", "echo KEY-PAIR-LOGIN");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}\n{}", out.job_log, out.runner_log);
    assert!(out.job_log.lines().any(|l| l == "KEY-PAIR-LOGIN"), "{}", out.job_log);
    assert_eq!(run_instances_params(&w)[0]["KeyPairName"], "ci-team-key");
    assert_eq!(w.emulator.instances()[0].key_pair_name.as_deref(), Some("ci-team-key"));
    w.assert_nothing_left();
}

/// The ERROR lines of a log.
fn error_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.starts_with("ERROR: ")).collect()
}

#[test]
fn a_bad_job_variable_is_the_jobs_mistake_in_config_and_prepare() {
    use aliyun_spot_executor::demo::gitlab::Exit;
    let w = World::new();
    let mut job = w.job("5010", "true");
    job.variables.push(("ALIYUN_SPOT_MAX_CPU".into(), "512".into()));
    let line =
        "ERROR: job variable `ALIYUN_SPOT_MAX_CPU`=`512` is above the administrator's ceiling of 64 vCPU; \
                set a value between 1 and 64";
    // config: BUILD_FAILURE_EXIT_CODE, so gitlab-runner fails the job as a script failure and
    // does not retry it.
    let mut attempt = w.attempt(&job);
    let (exit, json) = attempt.config().unwrap();
    assert_eq!(exit, Exit::Code(1), "{}", attempt.log.text());
    assert!(json.is_none());
    assert_eq!(error_lines(&attempt.log.text()), vec![line], "{}", attempt.log.text());
    // prepare (config_exec is optional, so prepare evaluates the variables too): the same.
    let mut attempt = w.attempt(&job);
    std::fs::write(attempt.build_exit_code_file(), "7\n").unwrap();
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(1), "{}", attempt.log.text());
    assert_eq!(error_lines(&attempt.log.text()), vec![line], "{}", attempt.log.text());
    assert!(!attempt.build_exit_code_file().exists(), "no stale status is left for gitlab-runner to read");
    assert!(w.emulator.instances().is_empty());
    // A value that does not parse: the same class.
    let mut job = w.job("5011", "true");
    job.variables.push(("ALIYUN_SPOT_ARCH".into(), "sparc".into()));
    let mut attempt = w.attempt(&job);
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(1), "{}", attempt.log.text());
    assert_eq!(
        error_lines(&attempt.log.text()),
        vec!["ERROR: job variable `ALIYUN_SPOT_ARCH`=`sparc` is not an architecture; set `amd64` (or `x86_64`) \
              or `arm64` (or `aarch64`)"]
    );
    assert!(w.emulator.instances().is_empty());
}

#[test]
fn a_bad_configuration_file_stays_a_system_failure() {
    use aliyun_spot_executor::demo::gitlab::Exit;
    let w = World::with(Faults::default(), &[("ssh", "port", Value::String("twenty-two".into()))]);
    let job = w.job("5012", "true");
    let mut attempt = w.attempt(&job);
    assert_eq!(attempt.config().unwrap().0, Exit::Code(2), "{}", attempt.log.text());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    let lines = error_lines(&log);
    assert_eq!(lines.len(), 2, "{log}");
    assert!(lines[0].contains("`ssh.port`: invalid type: string \"twenty-two\""), "{log}");
    assert!(w.emulator.instances().is_empty());
}

#[test]
fn sh_is_refused_with_the_key_and_the_fix() {
    use aliyun_spot_executor::demo::gitlab::Exit;
    let w = World::with(Faults::default(), &[("runner", "shell", Value::String("sh".into()))]);
    let job = w.job("5013", "true");
    let mut attempt = w.attempt(&job);
    assert_eq!(attempt.config().unwrap().0, Exit::Code(2), "{}", attempt.log.text());
    let config = w.config.display();
    assert_eq!(
        error_lines(&attempt.log.text()),
        vec![format!(
            "ERROR: `runner.shell` = `sh` in `{config}` is not supported: gitlab-runner's scripts need bash (they \
             quote with `$'…'`); remove the key or set `bash`"
        )]
    );
}

#[test]
fn helper_settings_are_checked_with_one_line_each() {
    use aliyun_spot_executor::demo::gitlab::Exit;
    let missing = "/nonexistent/gitlab-runner-linux-amd64";
    for (overrides, problem) in [
        (
            vec![("helper", "install", Value::String("docker".into()))],
            "`helper.install` = `docker` in `{config}` is not a way to install gitlab-runner on the instance; use \
             `image`, `upload` or `download`"
                .to_string(),
        ),
        (
            vec![("helper", "install", Value::String("upload".into()))],
            "`helper.install` = `upload` in `{config}` needs `helper.upload_amd64` or `helper.upload_arm64` \
             (gitlab-runner's Linux binary on the runner host)"
                .to_string(),
        ),
        (
            vec![
                ("helper", "install", Value::String("upload".into())),
                ("helper", "upload_amd64", Value::String(missing.into())),
            ],
            format!(
                "`helper.upload_amd64` = `{missing}` in `{{config}}` is not a file on the runner host; point it at \
                 gitlab-runner's Linux binary for that architecture"
            ),
        ),
        (
            vec![("helper", "download_url", Value::String("http://mirror.example.com/{version}".into()))],
            "`helper.download_url` = `http://mirror.example.com/{version}` in `{config}` uses plain http to a host \
             that is not loopback; use `https://` (the binary runs as root on every instance)"
                .to_string(),
        ),
        (
            vec![("helper", "sha256_arm64", Value::String("abc".into()))],
            "`helper.sha256_arm64` = `abc` in `{config}` is not a SHA-256 checksum (64 hex digits)".to_string(),
        ),
    ] {
        let w = World::with(Faults::default(), &overrides);
        let job = w.job("5020", "true");
        let mut attempt = w.attempt(&job);
        assert_eq!(attempt.config().unwrap().0, Exit::Code(2), "{}", attempt.log.text());
        let want = format!("ERROR: {}", problem.replace("{config}", &w.config.display().to_string()));
        assert_eq!(error_lines(&attempt.log.text()), vec![want.as_str()]);
    }
}

#[test]
fn config_says_when_caches_do_not_persist() {
    let line = aliyun_spot_executor::stages::config::no_distributed_cache_line("/cache");
    assert_eq!(
        line,
        "Caches do not persist: without a distributed cache they stay in `/cache` on the instance, which is deleted \
         after the job; configure `[runners.cache]` in gitlab-runner (e.g. on Aliyun OSS) and set \
         `helper.distributed_cache = true` (see docs/gitlab-runner.md)"
    );
    let w = World::new();
    let job = w.job("5030", "true");
    let mut attempt = w.attempt(&job);
    let (exit, json) = attempt.config().unwrap();
    assert!(exit.success(), "{}", attempt.log.text());
    let cache_dir = json.unwrap()["cache_dir"].as_str().unwrap().to_string();
    let want = aliyun_spot_executor::stages::config::no_distributed_cache_line(&cache_dir);
    assert_eq!(attempt.log.text().lines().filter(|l| *l == want).count(), 1, "{}", attempt.log.text());

    let w = World::with(Faults::default(), &[("helper", "distributed_cache", Value::Boolean(true))]);
    let mut attempt = w.attempt(&job);
    assert!(attempt.config().unwrap().0.success(), "{}", attempt.log.text());
    assert!(!attempt.log.text().contains("Caches do not persist"), "{}", attempt.log.text());
}

#[test]
fn after_script_sees_the_jobs_status_as_gitlab_runner_rewrites_it() {
    let w = World::new();
    for (job_id, script, status) in [("5040", "true", "success"), ("5041", "exit 3", "failed")] {
        let mut job = w.job(job_id, script);
        job.after_script = Some("echo \"after_script: job status $CI_JOB_STATUS\"".into());
        let out = w.attempt(&job).run_job(&job).unwrap();
        let line = format!("after_script: job status {status}");
        assert!(out.job_log.lines().any(|l| l == line), "missing `{line}`:\n{}", out.job_log);
    }
    w.assert_nothing_left();
}

#[test]
fn upload_mode_without_a_binary_for_the_jobs_arch_fails_before_anything_is_created() {
    use aliyun_spot_executor::demo::gitlab::Exit;
    let fake = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake-gitlab-runner");
    let w = World::with(
        Faults::default(),
        &[
            ("helper", "install", Value::String("upload".into())),
            ("helper", "upload_arm64", Value::String(fake.display().to_string())),
        ],
    );
    let job = w.job("5050", "true");
    let mut attempt = w.attempt(&job);
    assert_eq!(attempt.config().unwrap().0, Exit::Code(2), "{}", attempt.log.text());
    assert_eq!(attempt.prepare().unwrap(), Exit::Code(2), "{}", attempt.log.text());
    let log = attempt.log.text();
    let want =
        "ERROR: the configuration is incomplete for creating instances: missing gitlab-runner's linux-amd64 \
                binary (`helper.upload_amd64`)";
    // prepare, run without config's secret (as gitlab-runner never would), refuses first.
    let refused = format!("ERROR: {}", aliyun_spot_executor::identity::missing_secret_line());
    assert_eq!(error_lines(&log), vec![want, refused.as_str()], "{log}");
    assert!(w.emulator.instances().is_empty());
}
