//! The in-instance self-destruct watchdog: the safety net for a runner host that dies.
//!
//! `cleanup` deletes each instance, and `AutoReleaseTime` bounds its life at creation; but a
//! runner host that crashes mid-job would leave an idle machine billing until that time. So
//! prepare installs this small program through cloud-config: it deletes its own instance when
//! no stage has run for the idle timeout, or past the maximum lifetime, with STS credentials
//! scoped to that one instance that the runner host writes over SSH ([`crate::sts`]), or, as an
//! explicit opt-in, the instance RAM role's credentials from the metadata service
//! (docs/safety.md has both policies). It is python3 with the standard library only, because
//! every mainstream image has python3 and nothing else can be assumed on a fresh instance; its
//! user data holds no credentials.
//!
//! Stages mark activity under `/run/aliyun-spot-executor/<instance-id>/`: `busy.<pid>` while a
//! stage runs and `activity` touched at its start and end (see [`stage_markers`]). The idle
//! clock starts at creation and, once a stage has run, at the last touch of `activity` (both
//! read on the instance's own clock); the watchdog keeps that directory's parent sticky and
//! world-writable, so stages that log in as another user than root can leave their markers.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use crate::userdata::{CloudConfig, RunCmd, WriteFile};

/// The watchdog program, exactly as installed.
pub const SCRIPT: &str = include_str!("watchdog.py");
/// Where cloud-config writes the program.
pub const SCRIPT_PATH: &str = "/usr/local/lib/aliyun-spot-executor/watchdog.py";
/// Where cloud-config writes its settings.
pub const CONFIG_PATH: &str = "/etc/aliyun-spot-executor/watchdog.json";
/// Where stages leave their markers (one directory per instance id).
pub const STATE_ROOT: &str = "/run/aliyun-spot-executor";
/// Where the runner host writes the instance's scoped STS credentials (root only, mode 0700;
/// under `/run`, so never on disk). One file per instance id, `<id>.json`, mode 0600.
pub const CREDENTIALS_DIR: &str = "/run/aliyun-spot-executor-credentials";

/// The credentials file of `instance_id` on the instance.
pub fn credentials_path(instance_id: &str) -> String {
    format!("{CREDENTIALS_DIR}/{instance_id}.json")
}

/// What the watchdog needs to know; no secret.
#[derive(Debug, Clone)]
pub struct WatchdogSpec {
    /// Region of the instance.
    pub region_id: String,
    /// ECS API endpoint it calls (`https://ecs-vpc.<region>.aliyuncs.com` or the configured one).
    pub endpoint: String,
    /// Metadata service base URL (`http://100.100.100.200`).
    pub metadata: String,
    /// Where its credentials come from.
    pub credentials: WatchdogCredentials,
    /// Delete after this long without a running stage.
    pub idle_timeout: Duration,
    /// When the instance was created (the lifetime and the idle clock start here).
    pub created_at: OffsetDateTime,
    /// Maximum lifetime.
    pub max_lifetime: Duration,
}

/// Where the watchdog finds credentials when it must delete its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogCredentials {
    /// `<dir>/<instance id>.json`, written by the runner host over SSH ([`crate::sts`]).
    HandedOver(String),
    /// The instance RAM role, from the metadata service (the opt-in shared-role mode).
    InstanceRole(String),
}

/// The watchdog's settings file (`watchdog.json`).
pub fn config_json(spec: &WatchdogSpec) -> String {
    let started = spec.created_at.unix_timestamp();
    let v = json!({
        "region_id": spec.region_id,
        "endpoint": spec.endpoint,
        "metadata": spec.metadata,
        "ram_role": match &spec.credentials { WatchdogCredentials::InstanceRole(r) => json!(r), _ => json!(null) },
        "credentials_dir": match &spec.credentials { WatchdogCredentials::HandedOver(d) => json!(d), _ => json!(null) },
        "idle_timeout_seconds": spec.idle_timeout.as_secs(),
        "started_epoch": started,
        "deadline_epoch": started + spec.max_lifetime.as_secs() as i64,
        "state_root": STATE_ROOT,
        "poll_seconds": 30,
    });
    serde_json::to_string_pretty(&v).expect("JSON of plain values")
}

const UNIT: &str = "[Unit]
Description=aliyun-spot-executor self-destruct watchdog
After=network-online.target

[Service]
ExecStart=/usr/bin/env python3 /usr/local/lib/aliyun-spot-executor/watchdog.py /etc/aliyun-spot-executor/watchdog.json
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
";

/// Adds the watchdog (program, settings, systemd unit, start command) to a cloud-config.
pub fn add_to(cc: &mut CloudConfig, spec: &WatchdogSpec) {
    cc.write_files.push(WriteFile {
        path: SCRIPT_PATH.to_string(),
        permissions: "0755".to_string(),
        owner: None,
        content: SCRIPT.to_string(),
    });
    cc.write_files.push(WriteFile {
        path: CONFIG_PATH.to_string(),
        permissions: "0644".to_string(),
        owner: None,
        content: config_json(spec),
    });
    cc.write_files.push(WriteFile {
        path: "/etc/systemd/system/aliyun-spot-watchdog.service".to_string(),
        permissions: "0644".to_string(),
        owner: None,
        content: UNIT.to_string(),
    });
    // systemd keeps it running; without systemd, a detached loop does.
    cc.runcmd.push(RunCmd::Shell(format!(
        "systemctl daemon-reload && systemctl enable --now aliyun-spot-watchdog.service || (nohup python3 {SCRIPT_PATH} {CONFIG_PATH} >/var/log/aliyun-spot-watchdog.log 2>&1 &)"
    )));
}

/// A spec with realistic values, for tests that need a full document.
#[cfg(test)]
pub(crate) fn example_spec() -> WatchdogSpec {
    WatchdogSpec {
        region_id: "cn-hangzhou".into(),
        endpoint: "https://ecs-vpc.cn-hangzhou.aliyuncs.com".into(),
        metadata: "http://100.100.100.200".into(),
        credentials: WatchdogCredentials::HandedOver(CREDENTIALS_DIR.into()),
        idle_timeout: Duration::from_secs(600),
        created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        max_lifetime: Duration::from_secs(3 * 3600),
    }
}

/// Shell lines a stage wraps around the job's script so the watchdog sees it: a `busy.<pid>`
/// marker while it runs and `activity` touched at both ends. Returns (before, after).
pub fn stage_markers(instance_id: &str) -> (String, String) {
    let dir = format!("{STATE_ROOT}/{instance_id}");
    (
        format!("mkdir -p '{dir}' 2>/dev/null && touch '{dir}/activity' '{dir}/busy.'$$ 2>/dev/null || true"),
        format!("rm -f '{dir}/busy.'$$ 2>/dev/null; touch '{dir}/activity' 2>/dev/null || true"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_carry_the_deadline_and_no_secret() {
        let spec = example_spec();
        let v: serde_json::Value = serde_json::from_str(&config_json(&spec)).unwrap();
        assert_eq!(v["deadline_epoch"], 1_700_000_000 + 3 * 3600);
        assert_eq!(v["idle_timeout_seconds"], 600);
        let mut cc = CloudConfig::default();
        add_to(&mut cc, &spec);
        assert_eq!(cc.write_files.len(), 3);
        assert!(cc.write_files[0].content.contains("def check(conf, started)"));
    }

    #[test]
    fn user_data_with_the_watchdog_stays_under_the_ecs_limit() {
        // A full document as prepare renders it: client key, host key pair, the watchdog, with
        // endpoints and a role name longer than any real one.
        let host = crate::keys::generate_ed25519("host-123456789").unwrap();
        let client = crate::keys::generate_ed25519("job-123456789").unwrap();
        let mut cc = CloudConfig {
            authorized_keys: vec![client.public_openssh],
            host_key: Some(host),
            ..Default::default()
        };
        let spec = WatchdogSpec {
            region_id: "ap-southeast-1".into(),
            endpoint: format!("https://{}.aliyuncs.com", "e".repeat(200)),
            metadata: format!("http://{}", "m".repeat(200)),
            credentials: WatchdogCredentials::InstanceRole("r".repeat(64)),
            idle_timeout: Duration::from_secs(600),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            max_lifetime: Duration::from_secs(7 * 86_400),
        };
        add_to(&mut cc, &spec);
        let ud = cc.render().expect("renders within the limit");
        assert!(
            ud.base64_len() <= crate::userdata::USER_DATA_MAX_BASE64 / 2,
            "user data is {} bytes after base64; keep a wide margin under {}",
            ud.base64_len(),
            crate::userdata::USER_DATA_MAX_BASE64
        );
        // The program goes in byte for byte (the integration test reads it back from a real
        // instance's user data and runs it).
        let body = ud.text.expose().strip_prefix("#cloud-config\n").unwrap();
        let doc: serde_json::Value = serde_json::from_str(body).unwrap();
        let script =
            doc["write_files"].as_array().unwrap().iter().find(|f| f["path"] == SCRIPT_PATH).unwrap();
        assert_eq!(script["permissions"], "0755");
        assert_eq!(script["content"], SCRIPT);
    }
}
