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
//!   a non-zero exit fails the job (`docs/adrs/1751-runner-job-hooks.md`). So the completed
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

/// Quotes a value for a POSIX shell (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

const LAUNCHER_SCRIPT: &str = r#"#!/bin/sh
# aliyun-spot-executor: run the ephemeral GitHub Actions runner once, then delete this instance.
set -u
. /etc/aliyun-spot-executor/github-runner.conf
LIB=/usr/local/lib/aliyun-spot-executor
STATE=/run/aliyun-spot-github
release() {
    echo "aliyun-spot-github: deleting this instance: $1" >&2
    if [ -f /etc/aliyun-spot-executor/github-release.json ]; then
        python3 "$LIB/watchdog.py" /etc/aliyun-spot-executor/github-release.json --once
    fi
}
mkdir -p "$STATE" && chmod 1777 "$STATE"
if [ -n "$RUNNER_URL" ] && [ ! -x "$RUNNER_DIR/run.sh" ]; then
    mkdir -p "$RUNNER_DIR" && cd "$RUNNER_DIR" || { release "cannot create $RUNNER_DIR"; exit 1; }
    { curl -fsSL -o runner.tar.gz "$RUNNER_URL" || wget -q -O runner.tar.gz "$RUNNER_URL"; } &&
        echo "$RUNNER_SHA256  runner.tar.gz" | sha256sum -c - &&
        tar xzf runner.tar.gz && rm -f runner.tar.gz ||
        { release "the runner download failed or its SHA-256 did not match"; exit 1; }
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

fn hook_completed_script(grace: Duration) -> String {
    format!(
        "#!/bin/sh\n\
# ACTIONS_RUNNER_HOOK_JOB_COMPLETED: the job is over. The runner reports its result after this\n\
# hook, so the deletion waits {secs}s in the background (outside the job's RUNNER_TRACKING_ID, or\n\
# the runner would kill it) and the hook exits 0 (any other status fails the job).\n\
touch /run/aliyun-spot-github/job-completed 2>/dev/null || true\n\
RUNNER_TRACKING_ID= setsid nohup sh -c 'sleep {secs}; python3 {script} {release} --once' >/dev/null 2>&1 </dev/null &\n\
exit 0\n",
        secs = grace.as_secs(),
        script = watchdog::SCRIPT_PATH,
        release = RELEASE_FILE,
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
        let conf = format!(
            "RUNNER_DIR={}\nRUNNER_USER={}\nRUNNER_URL={}\nRUNNER_SHA256={}\nJIT_FILE={}\nJOB_WAIT_SECONDS={}\n",
            sh_quote(&dir),
            sh_quote(&self.user),
            sh_quote(&url),
            sh_quote(&sha),
            sh_quote(JIT_FILE),
            self.job_wait.as_secs()
        );
        let files = [
            (CONF_FILE, "0644", conf),
            (LAUNCHER, "0755", LAUNCHER_SCRIPT.to_string()),
            (HOOK_STARTED, "0755", HOOK_STARTED_SCRIPT.to_string()),
            (HOOK_COMPLETED, "0755", hook_completed_script(self.completed_grace)),
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
                ram_role: "ci-spot-self-destruct".into(),
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
}
