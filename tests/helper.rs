//! gitlab-runner's helper binary on the instance (`[helper]`): checked in `image` mode,
//! uploaded from the runner host, or downloaded by the instance and verified — seen through a
//! job's stages on the emulated instance (its own `/usr/local/bin` and `/tmp`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aliyun_spot_executor::demo::gitlab::{Attempt, Exit};
use aliyun_spot_executor::emulator::Faults;
use sha2::{Digest, Sha256};
use toml::Value;

use super::executor::World;

/// The fake helper (tests/data/fake-gitlab-runner).
fn fake() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake-gitlab-runner")
}

fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

/// The runner host's environment for the stages, plus `extra`.
fn attempt_with(w: &World, job: &aliyun_spot_executor::demo::gitlab::Job, extra: &[(&str, &str)]) -> Attempt {
    let mut env: BTreeMap<String, String> = w.base_env();
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    Attempt::new(w.exes(), env, job).unwrap().with_retry_interval(crate::RETRY_INTERVAL)
}

#[test]
fn image_mode_warns_in_one_line_when_the_image_lacks_gitlab_runner() {
    let w = World::new();
    let job = w.job("7001", "echo BUILD-RAN");
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", out.job_log);
    let warnings: Vec<&str> = out.job_log.lines().filter(|l| l.starts_with("WARNING:")).collect();
    assert_eq!(
        warnings,
        vec![
            "WARNING: the instance image has no `gitlab-runner` (cache and artifact stages print \"Missing \
             gitlab-runner\" and pass without them); add it to the image or set `helper.install` to \"upload\" or \
             \"download\""
        ],
        "{}",
        out.job_log
    );
    w.assert_nothing_left();
}

#[test]
fn upload_mode_installs_the_hosts_binary_on_the_instance_and_checks_it() {
    let w = World::with(
        Faults::default(),
        &[
            ("helper", "install", s("upload")),
            ("helper", "upload_amd64", s(fake().display().to_string())),
            ("helper", "upload_arm64", s(fake().display().to_string())),
        ],
    );
    let job = w.job(
        "7002",
        "stat -c 'MODE=%a' /usr/local/bin/gitlab-runner\n\
         echo \"WHICH=$(command -v gitlab-runner)\"\n\
         echo \"CALLS=$(tr '\\n' ';' < /tmp/fake-gitlab-runner.calls)\"\n\
         gitlab-runner cache-archiver --file cache.zip --path vendor --timeout 10 && echo ARCHIVER=ok\n\
         gitlab-runner cache-archiver --no-such-flag || echo UNKNOWN-FLAG=rejected",
    );
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", out.job_log);
    let log = &out.job_log;
    let installed =
        format!("Installed gitlab-runner 18.3.0 (amd64) on the instance from `{}`", fake().display());
    assert!(log.lines().any(|l| l == installed), "{log}");
    assert!(!log.contains("WARNING:"), "{log}");
    for line in [
        "MODE=755",
        "WHICH=/usr/local/bin/gitlab-runner",
        "CALLS=--version;",
        "ARCHIVER=ok",
        "UNKNOWN-FLAG=rejected",
    ] {
        assert!(log.lines().any(|l| l == line), "missing `{line}`:\n{log}");
    }
    assert!(log.contains("fake gitlab-runner: cache-archiver: unknown flag '--no-such-flag'"), "{log}");
    assert!(
        !std::path::Path::new("/usr/local/bin/gitlab-runner").exists(),
        "nothing installed on the runner host"
    );
    w.assert_nothing_left();
}

/// A loopback HTTP server for the test: `path → body`; records every requested path.
struct Server {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

fn serve(files: BTreeMap<String, Vec<u8>>) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req);
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            log.lock().unwrap().push(path.clone());
            let (status, body) = match files.get(&path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", b"not found\n".to_vec()),
            };
            let head =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&body));
        }
    });
    Server { url, seen }
}

fn download_world(server: &Server, extra: &[(&str, &str, Value)]) -> World {
    let mut overrides = vec![
        ("helper", "install", s("download")),
        (
            "helper",
            "download_url",
            s(format!("{}/v{{version}}/binaries/gitlab-runner-linux-{{arch}}", server.url)),
        ),
        ("helper", "checksum_url", s(format!("{}/v{{version}}/release.sha256", server.url))),
        ("helper", "runner_command", s(fake().display().to_string())),
    ];
    overrides.extend(extra.iter().cloned());
    World::with(Faults::default(), &overrides)
}

fn release(version: &str, sums: &str) -> BTreeMap<String, Vec<u8>> {
    let binary = std::fs::read(fake()).unwrap();
    BTreeMap::from([
        (format!("/v{version}/binaries/gitlab-runner-linux-amd64"), binary),
        (format!("/v{version}/release.sha256"), sums.as_bytes().to_vec()),
    ])
}

#[test]
fn download_mode_fetches_the_runners_version_and_verifies_release_sha256() {
    let binary = std::fs::read(fake()).unwrap();
    let sum = hex(&Sha256::digest(&binary));
    // release.sha256 as `sha256sum` writes it, other architectures around ours.
    let sums = format!(
        "{zero}  binaries/gitlab-runner-linux-386\n{sum} *binaries/gitlab-runner-linux-amd64\n{zero}  \
         binaries/gitlab-runner-linux-arm64\n",
        zero = "0".repeat(64)
    );
    let server = serve(release("17.11.4", &sums));
    let w = download_world(&server, &[]);
    let job =
        w.job("7003", "stat -c 'MODE=%a' /usr/local/bin/gitlab-runner\ngitlab-runner --version | sed -n 1p");
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("host-calls");
    // The runner host's gitlab-runner says 17.11.4: that is the version the instance fetches.
    let attempt = attempt_with(
        &w,
        &job,
        &[
            ("FAKE_GITLAB_RUNNER_VERSION", "17.11.4"),
            ("FAKE_GITLAB_RUNNER_CALLS", &calls.display().to_string()),
        ],
    );
    let out = attempt.run_job(&job).unwrap();
    assert!(
        out.passed(),
        "{:?} {:?} {:?} {:?}\n{}\n{}",
        out.config,
        out.prepare,
        out.stages,
        out.cleanup,
        out.job_log,
        out.runner_log
    );
    assert_eq!(
        *server.seen.lock().unwrap(),
        vec![
            "/v17.11.4/binaries/gitlab-runner-linux-amd64".to_string(),
            "/v17.11.4/release.sha256".to_string()
        ]
    );
    let url = format!("{}/v17.11.4/binaries/gitlab-runner-linux-amd64", server.url);
    let line =
        format!("Installed gitlab-runner 18.3.0 (amd64) on the instance from {url} (SHA-256 verified)");
    assert!(out.job_log.lines().any(|l| l == line), "{}", out.job_log);
    assert!(out.job_log.lines().any(|l| l == "MODE=755"), "{}", out.job_log);
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "--version\n",
        "the host's binary was asked its version"
    );
    w.assert_nothing_left();
}

#[test]
fn download_mode_with_a_wrong_checksum_fails_prepare_and_releases_the_instance() {
    let server = serve(release("18.3.0", ""));
    let wrong = "ab".repeat(32);
    let w = download_world(&server, &[("helper", "sha256_amd64", s(wrong.clone()))]);
    let job = w.job("7004", "true");
    let out = attempt_with(&w, &job, &[("FAKE_GITLAB_RUNNER_CALLS", "/dev/null")]).run_job(&job).unwrap();
    assert_eq!(out.prepare, Some(Exit::Code(2)), "{}", out.job_log);
    let binary = std::fs::read(fake()).unwrap();
    let url = format!("{}/v18.3.0/binaries/gitlab-runner-linux-amd64", server.url);
    let line = format!(
        "ERROR: installing gitlab-runner 18.3.0 (amd64) on the instance failed: checksum mismatch for {url}: expected \
         {wrong}, got {}; check `helper.download_url` (and `helper.sha256_amd64` or `helper.checksum_url`), or use \
         `helper.install = \"upload\"`",
        hex(&Sha256::digest(&binary))
    );
    assert!(out.job_log.lines().any(|l| l == line), "{}", out.job_log);
    // A system failure: gitlab-runner tries the preparation three times, and each attempt uses
    // the configured checksum (release.sha256 is not even fetched).
    assert_eq!(out.preparations, 3, "{}", out.job_log);
    assert_eq!(
        *server.seen.lock().unwrap(),
        vec!["/v18.3.0/binaries/gitlab-runner-linux-amd64".to_string(); 3]
    );
    w.assert_nothing_left();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache and artifact stages as gitlab-runner writes them: each helper call guarded by
/// `gitlab-runner --version`, "Missing gitlab-runner. … is disabled." otherwise
/// (gitlab-runner v18.3.0-1857-gd79f3e7b8, `shells/abstract.go`, `guardRunnerCommand`,
/// `cacheArchiver`, `uploadArtifacts`).
fn with_cache_and_artifact_stages(
    mut job: aliyun_spot_executor::demo::gitlab::Job,
) -> aliyun_spot_executor::demo::gitlab::Job {
    let guarded = |action: &str, call: &str| {
        format!(
            "if gitlab-runner --version >/dev/null 2>&1; then\n{call}\nelse\necho 'WARNING: Missing gitlab-runner. \
             {action} is disabled.'\nfi"
        )
    };
    let last = job.stages.pop().expect("cleanup_file_variables");
    job.stages.push((
        "archive_cache".into(),
        guarded(
            "Creating cache",
            "gitlab-runner cache-archiver --file ../../cache/default.zip --timeout 10 --path vendor --url \
             'https://cache.example.com/default.zip?sig=x'",
        ),
    ));
    job.stages.push((
        "upload_artifacts_on_success".into(),
        guarded(
            "Uploading artifacts",
            "gitlab-runner artifacts-uploader --url https://gitlab.example.com --token t --id 7 --path dist \
             --artifact-format zip --artifact-type archive",
        ),
    ));
    job.stages.push(last);
    job
}

#[test]
fn cache_and_artifact_stages_call_the_helper_or_say_it_is_missing() {
    // Missing (image mode, an image without gitlab-runner): the stages pass without it.
    let w = World::new();
    let job = with_cache_and_artifact_stages(w.job("7005", "true"));
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", out.job_log);
    for line in [
        "WARNING: Missing gitlab-runner. Creating cache is disabled.",
        "WARNING: Missing gitlab-runner. Uploading artifacts is disabled.",
    ] {
        assert!(out.job_log.lines().any(|l| l == line), "missing `{line}`:\n{}", out.job_log);
    }
    w.assert_nothing_left();

    // Uploaded: the helper runs, with flags the real one accepts.
    let w = World::with(
        Faults::default(),
        &[("helper", "install", s("upload")), ("helper", "upload_amd64", s(fake().display().to_string()))],
    );
    let mut job = with_cache_and_artifact_stages(w.job("7006", "true"));
    let last = job.stages.len() - 1;
    job.stages[last].1 = format!("cat /tmp/fake-gitlab-runner.calls\n{}", job.stages[last].1);
    let out = w.attempt(&job).run_job(&job).unwrap();
    assert!(out.passed(), "{}", out.job_log);
    for line in [
        "fake gitlab-runner: cache-archiver done",
        "fake gitlab-runner: artifacts-uploader done",
        "cache-archiver --file ../../cache/default.zip --timeout 10 --path vendor --url \
         https://cache.example.com/default.zip?sig=x",
    ] {
        assert!(out.job_log.lines().any(|l| l == line), "missing `{line}`:\n{}", out.job_log);
    }
    assert!(!out.job_log.contains("Missing gitlab-runner"), "{}", out.job_log);
    w.assert_nothing_left();
}
