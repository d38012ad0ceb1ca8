//! The cloud-config of a GitHub runner instance: start the ephemeral runner once with its
//! just-in-time configuration, then make the instance delete itself.
//!
//! What the instance receives (and nothing else from GitHub): the single-use, runner-bound
//! `encoded_jit_config`, written to a root-owned 0600 file, handed to the runner's user just
//! before `run.sh --jitconfig "$(cat FILE)"` and removed once the runner has started. The
//! GitHub token never reaches the instance.
//!
//! Runner side (github.com/actions/runner at 2.336.0):
//! - `run.sh --jitconfig <base64>` configures and runs the runner in one go
//!   (`src/Runner.Listener/Runner.cs`, `GetJitConfig`); a JIT runner takes one job and exits.
//! - `ACTIONS_RUNNER_HOOK_JOB_STARTED` / `ACTIONS_RUNNER_HOOK_JOB_COMPLETED` name scripts the
//!   runner runs synchronously (as the runner user, `bash -e FILE`) before and after each job;
//!   a non-zero exit fails the job (actions/runner `docs/adrs/1751-runner-job-hooks.md`). So the completed
//!   hook only schedules the deletion in the background and exits 0.
//! - After the job the worker kills the processes that carry its `RUNNER_TRACKING_ID`
//!   (`src/Runner.Worker/JobExtension.cs`, orphan process cleanup): the hook's background
//!   deletion clears that variable.
//! - `config.sh` refuses root unless `RUNNER_ALLOW_RUNASROOT` is set
//!   (`src/Misc/layoutroot/config.sh`): root is an explicit opt-in here too.
//!
//! Deletion reuses the self-destruct watchdog ([`crate::watchdog`]): the same program, with a
//! second settings file whose idle timeout is zero, deletes the instance at once with the
//! instance RAM role (docs/safety.md); the long-running watchdog keeps the maximum lifetime.
//! Without an instance RAM role there is no self-deletion: the workflow's `stop` step,
//! `AutoReleaseTime` and `aliyun-spot github sweep` remain.

use std::time::Duration;

use crate::secret::Secret;
use crate::userdata::{CloudConfig, RunCmd, WriteFile};
use crate::watchdog::{self, WatchdogSpec};

/// Where the just-in-time configuration is written (root, 0600, removed after start).
pub const JIT_FILE: &str = "/etc/aliyun-spot-executor/github-jitconfig";
/// The launcher's settings (shell assignments, no secret).
pub const CONF_FILE: &str = "/etc/aliyun-spot-executor/github-runner.conf";
/// The watchdog settings that delete the instance at once.
pub const RELEASE_FILE: &str = "/etc/aliyun-spot-executor/github-release.json";
/// The launcher.
pub const LAUNCHER: &str = "/usr/local/lib/aliyun-spot-executor/github-runner.sh";
/// `ACTIONS_RUNNER_HOOK_JOB_STARTED`.
pub const HOOK_STARTED: &str = "/usr/local/lib/aliyun-spot-executor/github-job-started.sh";
/// `ACTIONS_RUNNER_HOOK_JOB_COMPLETED`.
pub const HOOK_COMPLETED: &str = "/usr/local/lib/aliyun-spot-executor/github-job-completed.sh";
/// The directory of the launcher, the hooks and the watchdog.
pub const LIB_DIR: &str = "/usr/local/lib/aliyun-spot-executor";
/// Where the hooks leave `job-started` and `job-completed` (sticky, world-writable).
pub const STATE_DIR: &str = "/run/aliyun-spot-github";
/// The service that runs the launcher.
pub const UNIT_PATH: &str = "/etc/systemd/system/aliyun-spot-github-runner.service";

/// Where the runner comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerSource {
    /// Preinstalled in the image at this directory (holding `run.sh`).
    Preinstalled(String),
    /// Downloaded into `dir` from `url` and checked against `sha256` before it is unpacked.
    Download {
        /// Install directory.
        dir: String,
        /// The runner tarball (`actions-runner-linux-{x64,arm64}-VERSION.tar.gz`).
        url: String,
        /// Its SHA-256, as published in the runner's release notes.
        sha256: String,
    },
}

/// What the runner instance needs.
#[derive(Debug, Clone)]
pub struct RunnerBoot {
    /// The single-use configuration from `generate-jitconfig`.
    pub jit_config: Secret<String>,
    /// Where the runner comes from.
    pub source: RunnerSource,
    /// The unprivileged user that runs it (`root` only as an explicit choice).
    pub user: String,
    /// Delete the instance when no job has started this long after boot.
    pub job_wait: Duration,
    /// How long after the job-completed hook the instance is deleted if the runner has not
    /// exited by then (it reports the job's result first).
    pub completed_grace: Duration,
    /// The watchdog (instance RAM role); `None` leaves self-deletion out.
    pub watchdog: Option<WatchdogSpec>,
}

/// The settings file the launcher sources: `NAME='value'` lines.
fn launcher_settings(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}\n", sh_quote(v))).collect()
}

/// Quotes a value for a POSIX shell (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

const LAUNCHER_SCRIPT: &str = r#"#!/bin/sh
# aliyun-spot-executor: run the ephemeral GitHub Actions runner once, then delete this instance.
# Usage: github-runner.sh [SETTINGS] (default /etc/aliyun-spot-executor/github-runner.conf)
set -u
. "${1:-/etc/aliyun-spot-executor/github-runner.conf}"
release() {
    echo "aliyun-spot-github: deleting this instance: $1" >&2
    if [ -f "$RELEASE_FILE" ]; then
        python3 "$LIB/watchdog.py" "$RELEASE_FILE" --once
    fi
}
mkdir -p "$STATE" && chmod 1777 "$STATE"
if [ -n "$RUNNER_URL" ] && [ ! -x "$RUNNER_DIR/run.sh" ]; then
    mkdir -p "$RUNNER_DIR" && cd "$RUNNER_DIR" || { release "cannot create $RUNNER_DIR"; exit 1; }
    { curl -fsSL -o runner.tar.gz "$RUNNER_URL" || wget -q -O runner.tar.gz "$RUNNER_URL"; } &&
        echo "$RUNNER_SHA256  runner.tar.gz" | sha256sum -c - &&
        tar xzf runner.tar.gz && rm -f runner.tar.gz ||
        { rm -f runner.tar.gz; release "the runner download failed or its SHA-256 did not match"; exit 1; }
fi
[ -x "$RUNNER_DIR/run.sh" ] || { release "no runner at $RUNNER_DIR/run.sh"; exit 1; }
if [ "$RUNNER_USER" = root ]; then
    export RUNNER_ALLOW_RUNASROOT=1
elif ! id -u "$RUNNER_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$RUNNER_USER" || { release "cannot create user $RUNNER_USER"; exit 1; }
fi
chown -R "$RUNNER_USER" "$RUNNER_DIR" && chown "$RUNNER_USER" "$JIT_FILE" && chmod 0600 "$JIT_FILE" ||
    { release "cannot hand the runner to $RUNNER_USER"; exit 1; }
export ACTIONS_RUNNER_HOOK_JOB_STARTED="$LIB/github-job-started.sh"
export ACTIONS_RUNNER_HOOK_JOB_COMPLETED="$LIB/github-job-completed.sh"
runuser -u "$RUNNER_USER" -- sh -c 'cd "$1" && exec ./run.sh --jitconfig "$(cat "$2")"' sh "$RUNNER_DIR" "$JIT_FILE" &
PID=$!
waited=0
while kill -0 "$PID" 2>/dev/null; do
    # The configuration is single-use and the runner has read it: do not keep it on disk.
    [ "$waited" -ge 30 ] && rm -f "$JIT_FILE"
    if [ ! -e "$STATE/job-started" ] && [ "$waited" -ge "$JOB_WAIT_SECONDS" ]; then
        kill "$PID" 2>/dev/null
        release "no job started within ${JOB_WAIT_SECONDS}s"
        exit 0
    fi
    sleep 5
    waited=$((waited + 5))
done
wait "$PID"
rc=$?
rm -f "$JIT_FILE"
release "the runner exited (status $rc)"
"#;

const HOOK_STARTED_SCRIPT: &str = "#!/bin/sh\n\
# ACTIONS_RUNNER_HOOK_JOB_STARTED: tells the launcher a job arrived (its wait for one ends).\n\
touch /run/aliyun-spot-github/job-started 2>/dev/null || true\n\
exit 0\n";

fn hook_completed_script(grace: Duration, watchdog_script: &str, release: &str) -> String {
    format!(
        "#!/bin/sh\n\
# ACTIONS_RUNNER_HOOK_JOB_COMPLETED: the job is over. The runner reports its result after this\n\
# hook, so the deletion waits {secs}s in the background (outside the job's RUNNER_TRACKING_ID, or\n\
# the runner would kill it) and the hook exits 0 (any other status fails the job).\n\
touch /run/aliyun-spot-github/job-completed 2>/dev/null || true\n\
RUNNER_TRACKING_ID= setsid nohup sh -c \"sleep {secs}; python3 {script} {release} --once\" >/dev/null 2>&1 </dev/null &\n\
exit 0\n",
        secs = grace.as_secs(),
        script = sh_quote(watchdog_script),
        release = sh_quote(release),
    )
}

const UNIT: &str = "[Unit]
Description=aliyun-spot-executor ephemeral GitHub Actions runner
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/bin/sh /usr/local/lib/aliyun-spot-executor/github-runner.sh
# Whatever ends the service (the runner, a crash, a stop), the instance goes with it.
ExecStopPost=/bin/sh -c 'python3 /usr/local/lib/aliyun-spot-executor/watchdog.py /etc/aliyun-spot-executor/github-release.json --once || true'
Restart=no

[Install]
WantedBy=multi-user.target
";

impl RunnerBoot {
    /// The cloud-config document (not rendered: [`CloudConfig::render`] checks and sizes it).
    pub fn cloud_config(&self) -> CloudConfig {
        let mut cc = CloudConfig::default();
        let (dir, url, sha) = match &self.source {
            RunnerSource::Preinstalled(d) => (d.clone(), String::new(), String::new()),
            RunnerSource::Download { dir, url, sha256 } => (dir.clone(), url.clone(), sha256.clone()),
        };
        cc.write_files.push(WriteFile {
            path: JIT_FILE.to_string(),
            permissions: "0600".to_string(),
            owner: None,
            content: self.jit_config.expose().clone(),
        });
        let conf = launcher_settings(&[
            ("RUNNER_DIR", &dir),
            ("RUNNER_USER", &self.user),
            ("RUNNER_URL", &url),
            ("RUNNER_SHA256", &sha),
            ("JIT_FILE", JIT_FILE),
            ("JOB_WAIT_SECONDS", &self.job_wait.as_secs().to_string()),
            ("LIB", LIB_DIR),
            ("STATE", STATE_DIR),
            ("RELEASE_FILE", RELEASE_FILE),
        ]);
        let files = [
            (CONF_FILE, "0644", conf),
            (LAUNCHER, "0755", LAUNCHER_SCRIPT.to_string()),
            (HOOK_STARTED, "0755", HOOK_STARTED_SCRIPT.to_string()),
            (
                HOOK_COMPLETED,
                "0755",
                hook_completed_script(self.completed_grace, watchdog::SCRIPT_PATH, RELEASE_FILE),
            ),
            (UNIT_PATH, "0644", UNIT.to_string()),
        ];
        for (path, permissions, content) in files {
            cc.write_files.push(WriteFile {
                path: path.to_string(),
                permissions: permissions.to_string(),
                owner: None,
                content,
            });
        }
        if let Some(spec) = &self.watchdog {
            // The long-running watchdog only enforces the maximum lifetime: a runner may wait
            // for its job and then run it for as long as the lifetime allows.
            let mut long = spec.clone();
            long.idle_timeout = spec.max_lifetime;
            watchdog::add_to(&mut cc, &long);
            let mut now = spec.clone();
            now.idle_timeout = Duration::ZERO;
            cc.write_files.push(WriteFile {
                path: RELEASE_FILE.to_string(),
                permissions: "0644".to_string(),
                owner: None,
                content: watchdog::config_json(&now),
            });
        }
        // systemd runs the launcher (and deletes the instance when it ends); without systemd, a
        // detached shell does.
        cc.runcmd.push(RunCmd::Shell(format!(
            "systemctl daemon-reload && systemctl enable --now aliyun-spot-github-runner.service || (nohup /bin/sh {LAUNCHER} >/var/log/aliyun-spot-github-runner.log 2>&1 &)"
        )));
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(source: RunnerSource, watchdog: bool) -> RunnerBoot {
        RunnerBoot {
            jit_config: Secret::new("eyJqaXQiOiJ4In0=".into()),
            source,
            user: "runner".into(),
            job_wait: Duration::from_secs(600),
            completed_grace: Duration::from_secs(60),
            watchdog: watchdog.then(|| WatchdogSpec {
                region_id: "cn-hangzhou".into(),
                endpoint: "https://ecs-vpc.cn-hangzhou.aliyuncs.com".into(),
                metadata: "http://100.100.100.200".into(),
                credentials: crate::watchdog::WatchdogCredentials::InstanceRole(
                    "ci-spot-self-destruct".into(),
                ),
                idle_timeout: Duration::from_secs(300),
                created_at: time::OffsetDateTime::UNIX_EPOCH,
                max_lifetime: Duration::from_secs(3 * 3600),
            }),
        }
    }

    #[test]
    fn jit_file_is_private_and_the_runner_is_started_once() {
        let cc = boot(RunnerSource::Preinstalled("/opt/actions-runner".into()), true).cloud_config();
        let jit = cc.write_files.iter().find(|f| f.path == JIT_FILE).unwrap();
        assert_eq!(jit.permissions, "0600");
        assert_eq!(jit.content, "eyJqaXQiOiJ4In0=");
        let conf = cc.write_files.iter().find(|f| f.path == CONF_FILE).unwrap();
        assert!(conf.content.contains("RUNNER_DIR='/opt/actions-runner'\n"), "{}", conf.content);
        assert!(conf.content.contains("RUNNER_URL=''\n"));
        assert!(conf.content.contains("JOB_WAIT_SECONDS='600'\n"));
        let release = cc.write_files.iter().find(|f| f.path == RELEASE_FILE).unwrap();
        let v: serde_json::Value = serde_json::from_str(&release.content).unwrap();
        assert_eq!(v["idle_timeout_seconds"], 0);
        let long = cc.write_files.iter().find(|f| f.path == watchdog::CONFIG_PATH).unwrap();
        let v: serde_json::Value = serde_json::from_str(&long.content).unwrap();
        assert_eq!(v["idle_timeout_seconds"], 3 * 3600);
        let rendered = cc.render().unwrap();
        assert!(rendered.text.expose().contains("run.sh --jitconfig"));
        assert!(rendered.base64_len() < crate::userdata::USER_DATA_MAX_BASE64);
    }

    #[test]
    fn download_is_checksummed_and_values_are_quoted() {
        let mut b = boot(
            RunnerSource::Download {
                dir: "/opt/it's".into(),
                url: "https://github.com/actions/runner/releases/download/v2.336.0/actions-runner-linux-x64-2.336.0.tar.gz".into(),
                sha256: "ab".repeat(32),
            },
            false,
        );
        b.user = "ci$(id)".into();
        let cc = b.cloud_config();
        let conf = &cc.write_files.iter().find(|f| f.path == CONF_FILE).unwrap().content;
        assert!(conf.contains(r"RUNNER_DIR='/opt/it'\''s'"), "{conf}");
        assert!(conf.contains("RUNNER_USER='ci$(id)'"), "{conf}");
        assert!(conf.contains(&format!("RUNNER_SHA256='{}'", "ab".repeat(32))));
        assert!(LAUNCHER_SCRIPT.contains("sha256sum -c -"));
        // No watchdog: no deletion settings (the launcher then skips its release).
        assert!(!cc.write_files.iter().any(|f| f.path == RELEASE_FILE));
    }

    /// Runs the launcher for real with a fake runner and a fake watchdog in `d`; returns
    /// (exit success, stderr).
    fn run_launcher(d: &std::path::Path, wait: u64, url: &str, sha: &str) -> (bool, String) {
        let p = |s: &str| d.join(s).display().to_string();
        std::fs::create_dir_all(d.join("lib")).unwrap();
        std::fs::write(
            d.join("lib/watchdog.py"),
            format!("import sys\nopen({:?}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n", p("released")),
        )
        .unwrap();
        std::fs::write(d.join("release.json"), "{}").unwrap();
        std::fs::write(d.join("jit"), "JITCONFIG-abc").unwrap();
        let conf = launcher_settings(&[
            ("RUNNER_DIR", &p("runner")),
            ("RUNNER_USER", "root"),
            ("RUNNER_URL", url),
            ("RUNNER_SHA256", sha),
            ("JIT_FILE", &p("jit")),
            ("JOB_WAIT_SECONDS", &wait.to_string()),
            ("LIB", &p("lib")),
            ("STATE", &p("state")),
            ("RELEASE_FILE", &p("release.json")),
        ]);
        std::fs::write(d.join("conf"), conf).unwrap();
        let err = std::fs::File::create(d.join("stderr")).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(LAUNCHER_SCRIPT)
            .arg("github-runner.sh")
            .arg(d.join("conf"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .status()
            .unwrap();
        (status.success(), std::fs::read_to_string(d.join("stderr")).unwrap())
    }

    fn fake_runner(dir: &std::path::Path, out: &std::path::Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let o = out.display();
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {o}/args\necho \"$ACTIONS_RUNNER_HOOK_JOB_COMPLETED\" > {o}/hook\nid -un > {o}/user\n{body}\n"
        );
        std::fs::write(dir.join("run.sh"), script).unwrap();
        std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn is_root() -> bool {
        // runuser needs root; the test beds run as root.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn the_launcher_runs_the_runner_once_then_deletes_the_instance() {
        if !is_root() {
            eprintln!("skipped: runuser needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        fake_runner(&d.path().join("runner"), d.path(), "exit 0");
        let (ok, stderr) = run_launcher(d.path(), 600, "", "");
        assert!(ok, "{stderr}");
        let read = |f: &str| std::fs::read_to_string(d.path().join(f)).unwrap();
        assert_eq!(read("args"), "--jitconfig\nJITCONFIG-abc\n");
        assert_eq!(read("hook").trim(), d.path().join("lib/github-job-completed.sh").display().to_string());
        assert_eq!(read("user").trim(), "root");
        assert!(!d.path().join("jit").exists(), "the JIT configuration is removed");
        assert_eq!(read("released"), format!("{} --once\n", d.path().join("release.json").display()));
        assert!(
            stderr.contains("aliyun-spot-github: deleting this instance: the runner exited (status 0)"),
            "{stderr}"
        );
    }

    #[test]
    fn the_launcher_gives_up_when_no_job_starts_in_time() {
        if !is_root() {
            eprintln!("skipped: runuser needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        fake_runner(&d.path().join("runner"), d.path(), "exec sleep 10");
        let (ok, stderr) = run_launcher(d.path(), 0, "", "");
        assert!(ok, "{stderr}");
        assert!(stderr.contains("deleting this instance: no job started within 0s"), "{stderr}");
        assert_eq!(std::fs::read_to_string(d.path().join("released")).unwrap().lines().count(), 1);
    }

    #[test]
    fn the_launcher_checks_the_download_before_unpacking_it() {
        use sha2::{Digest, Sha256};
        if !is_root() {
            eprintln!("skipped: runuser needs root");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        fake_runner(src.path(), d.path(), "exit 0");
        let tarball = src.path().join("runner.tgz");
        let st = std::process::Command::new("tar")
            .args(["czf", &tarball.display().to_string(), "-C", &src.path().display().to_string(), "run.sh"])
            .status()
            .unwrap();
        assert!(st.success());
        let url = format!("file://{}", tarball.display());
        let good: String =
            Sha256::digest(std::fs::read(&tarball).unwrap()).iter().map(|b| format!("{b:02x}")).collect();

        let (ok, stderr) = run_launcher(d.path(), 600, &url, &"0".repeat(64));
        assert!(!ok);
        assert!(
            stderr
                .contains("deleting this instance: the runner download failed or its SHA-256 did not match"),
            "{stderr}"
        );
        assert!(!d.path().join("runner/run.sh").exists(), "nothing unpacked");
        assert!(!d.path().join("runner/runner.tar.gz").exists(), "the bad download is removed");
        assert!(!d.path().join("args").exists(), "the runner did not run");

        let (ok, stderr) = run_launcher(d.path(), 600, &url, &good);
        assert!(ok, "{stderr}");
        assert_eq!(std::fs::read_to_string(d.path().join("args")).unwrap(), "--jitconfig\nJITCONFIG-abc\n");
    }

    #[test]
    fn the_job_completed_hook_exits_at_once_and_deletes_outside_the_jobs_tracking() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("released");
        let fake = d.path().join("watchdog.py");
        std::fs::write(
            &fake,
            format!(
                "import os, sys\nopen({:?}, 'w').write(' '.join(sys.argv[1:]) + ' tracking=' + os.environ.get('RUNNER_TRACKING_ID', '-'))\n",
                out.display().to_string()
            ),
        )
        .unwrap();
        let hook = d.path().join("hook.sh");
        let release = d.path().join("it's release.json").display().to_string();
        std::fs::write(&hook, hook_completed_script(Duration::ZERO, &fake.display().to_string(), &release))
            .unwrap();
        // As the runner runs hooks: `bash -e FILE`, inside the job's tracking id.
        let st = std::process::Command::new("bash")
            .arg("-e")
            .arg(&hook)
            .env("RUNNER_TRACKING_ID", "github_job_1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !out.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("{release} --once tracking="));
    }
}
