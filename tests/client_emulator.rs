//! Our ECS client and SSH session against the emulator: the foundation's acceptance checks.

use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aliyun_spot_executor::credentials::{provider_from_spec, CredentialSpec, Credentials, StaticProvider};
use aliyun_spot_executor::ecs::{
    ClientConfig, DeleteOutcome, DescribeInstancesFilter, EcsClient, ErrorKind, RetryPolicy,
    RunInstancesRequest,
};
use aliyun_spot_executor::emulator::{
    Emulator, EmulatorOptions, Faults, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET,
};
use aliyun_spot_executor::secret::Secret;
use aliyun_spot_executor::ssh::{self, SshTarget};
use aliyun_spot_executor::{keys, userdata};

fn emulator(faults: Faults) -> Emulator {
    Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        boot_delay: Duration::from_millis(200),
        ssh_delay: Duration::from_millis(100),
        faults,
        host_ram_role: Some("runner-host-role".to_string()),
        ..EmulatorOptions::default()
    })
    .unwrap()
}

/// The client configuration for an emulator.
pub fn client_config(emu: &Emulator) -> ClientConfig {
    ClientConfig {
        region_id: "cn-hangzhou".into(),
        endpoint: Some(emu.endpoint()),
        timeout: Duration::from_secs(20),
        retry: RetryPolicy::default(),
    }
}

/// Our client for an emulator, with the emulator's key id and `secret`.
pub fn client(emu: &Emulator, secret: &str) -> EcsClient {
    let creds = Arc::new(StaticProvider::new(Credentials {
        access_key_id: DEFAULT_ACCESS_KEY_ID.to_string(),
        access_key_secret: Secret::new(secret.to_string()),
        security_token: None,
        expiration: None,
    }));
    EcsClient::new(client_config(emu), creds).unwrap()
}

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn our_client_creates_an_instance_we_log_into_with_ssh2_and_delete() {
    let emu = emulator(Faults::default());
    let api = client(&emu, DEFAULT_ACCESS_KEY_SECRET);
    let login = keys::generate_ed25519("test-client").unwrap();
    let host = keys::generate_ed25519("test-host").unwrap();
    let ud = userdata::CloudConfig {
        authorized_keys: vec![login.public_openssh.clone()],
        host_key: Some(host.clone()),
        ..Default::default()
    }
    .render()
    .unwrap();
    let ids = api
        .run_instances(&RunInstancesRequest {
            user_data: Some(ud.text.clone()),
            tags: vec![("ci-spot-executor:job".into(), "77".into())],
            auto_release_time: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
            ..crate::emulator_run_request("ci-runner-amd64-spot-test", "client-emulator-test-1")
        })
        .unwrap();
    assert_eq!(ids.len(), 1);
    let id = ids[0].clone();
    let inst = wait_for("Running", || api.describe_instance(&id).unwrap().filter(|i| i.status == "Running"));
    assert_eq!(inst.tags.get("ci-spot-executor:job").map(String::as_str), Some("77"));
    let ip = inst.public_ips.first().cloned().expect("a public address");
    let tagged = api
        .describe_instances(&DescribeInstancesFilter {
            tags: vec![("ci-spot-executor:job".into(), "77".into())],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(tagged.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);

    let target = SshTarget {
        host: ip.clone(),
        port: 22,
        user: "root".into(),
        private_key: login.private_openssh.clone(),
        host_key: host.public_openssh.clone(),
        connect_timeout: Duration::from_secs(10),
    };
    ssh::wait_until_ready(&target, Instant::now() + Duration::from_secs(60), &mut |_| {}).unwrap();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let outcome =
        ssh::run_script(&target, b"uname -a\n", "bash", &mut out, &mut err, &AtomicBool::new(false)).unwrap();
    assert_eq!(outcome.exit_status, Some(0), "{}", String::from_utf8_lossy(&err));
    assert!(String::from_utf8_lossy(&out).starts_with("Linux "), "{}", String::from_utf8_lossy(&out));

    let sshd_pid =
        emu.instances().iter().find(|r| r.id == id).and_then(|r| r.sshd_pid).expect("sshd running");
    assert!(process_alive(sshd_pid as i32));
    // A new instance refuses deletion while it initializes (`IncorrectInstanceStatus.Initializing`).
    let deleted = wait_for("deletable", || api.delete_instance(&id, true).ok());
    assert_eq!(deleted, DeleteOutcome::Deleted);
    wait_for("sshd gone", || (!process_alive(sshd_pid as i32)).then_some(()));
    let refused = TcpStream::connect_timeout(&format!("{ip}:22").parse().unwrap(), Duration::from_secs(2));
    assert!(refused.is_err(), "the instance's port still answers");
    assert_eq!(api.delete_instance(&id, true).unwrap(), DeleteOutcome::AlreadyGone);
    assert!(api.describe_instance(&id).unwrap().is_none());
    assert_eq!(emu.live_instances(), 0);
}

#[test]
fn throttling_and_5xx_from_the_emulator_are_retried_until_success() {
    let emu = emulator(Faults { throttle_every: Some(3), error_rate: 0.2, seed: 7, ..Faults::default() });
    let api = client(&emu, DEFAULT_ACCESS_KEY_SECRET);
    for _ in 0..6 {
        let regions = api.describe_regions().unwrap();
        assert!(regions.iter().any(|r| r.region_id == "cn-hangzhou"));
    }
    let log = emu.requests();
    let throttled = log.iter().filter(|r| r.code.as_deref() == Some("Throttling.User")).count();
    let unavailable = log.iter().filter(|r| r.code.as_deref() == Some("ServiceUnavailable")).count();
    assert!(throttled > 0, "the emulator throttled nothing: {log:?}");
    assert!(unavailable > 0, "the emulator answered no 5xx: {log:?}");
    assert_eq!(log.iter().filter(|r| r.status == 200).count(), 6, "six calls succeeded in the end");
}

#[test]
fn an_auth_error_fails_at_once_with_one_line_carrying_the_request_id() {
    let emu = emulator(Faults::default());
    let api = client(&emu, "not-the-secret");
    let err = api.describe_regions().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth);
    let line = err.to_string();
    let request_id = err.request_id().expect("a RequestId").to_string();
    assert!(line.contains("SignatureDoesNotMatch"), "{line}");
    assert!(line.contains(&format!("RequestId: {request_id}")), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
    assert!(!line.contains("not-the-secret"));
    assert_eq!(emu.requests().len(), 1, "an auth error is not retried");

    // The same through the administrator's tool: one line on stderr, non-zero exit.
    let dir = crate::private_tempdir();
    // An empty file of the test's own: never the machine's configuration.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aliyun-spot"))
        .arg("instances")
        .env_clear()
        .env("ALIYUN_SPOT_CONFIG", &empty)
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("ALIYUN_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY_ID)
        .env("ALIYUN_ACCESS_KEY_SECRET", "wrong-secret-value")
        .env("ALIYUN_REGION_ID", "cn-hangzhou")
        .env("ALIYUN_ECS_ENDPOINT", emu.endpoint())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("aliyun-spot: "), "{stderr}");
    assert!(lines[0].contains("SignatureDoesNotMatch") && lines[0].contains("RequestId: "), "{stderr}");
    assert!(!stderr.contains("wrong-secret-value"));
}

#[test]
fn the_runner_hosts_ram_role_signs_requests_through_metadata() {
    let emu = emulator(Faults::default());
    let spec = CredentialSpec {
        use_instance_role: true,
        metadata_endpoint: emu.endpoint(),
        ..CredentialSpec::default()
    };
    let creds = provider_from_spec(&spec).unwrap();
    let c = creds.credentials().unwrap();
    assert!(c.access_key_id.starts_with("STS."), "{}", c.access_key_id);
    let api = EcsClient::new(client_config(&emu), creds).unwrap();
    assert!(!api.describe_zones().unwrap().is_empty());
    let last =
        emu.requests().into_iter().rev().find(|r| r.action.as_deref() == Some("DescribeZones")).unwrap();
    assert_eq!(last.status, 200);
    assert!(last.access_key_id.as_deref().unwrap_or("").starts_with("STS."));
}

/// A metadata service that gives no hardened-mode token (`--metadata-token-error`): the role's
/// credentials are read in plain mode, as Aliyun's credentials provider does, unless
/// `credentials.hardened_only`, which fails with one line and sends no plain request.
#[test]
fn without_a_metadata_token_the_role_is_read_in_plain_mode_unless_hardened_only() {
    let emu = emulator(Faults { metadata_token_error: true, ..Faults::default() });
    let spec = CredentialSpec {
        use_instance_role: true,
        metadata_endpoint: emu.endpoint(),
        ..CredentialSpec::default()
    };
    let api = EcsClient::new(client_config(&emu), provider_from_spec(&spec).unwrap()).unwrap();
    assert!(!api.describe_zones().unwrap().is_empty());
    let last = emu.requests().into_iter().last().unwrap();
    assert_eq!((last.action.as_deref(), last.status), (Some("DescribeZones"), 200));
    assert_eq!(last.role.as_deref(), Some("runner-host-role"));

    let strict = CredentialSpec { hardened_only: true, ..spec.clone() };
    let api = EcsClient::new(client_config(&emu), provider_from_spec(&strict).unwrap()).unwrap();
    let e = api.describe_zones().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert_eq!(
        e.to_string(),
        format!(
            "ECS `DescribeZones` not sent: no credentials: failed to get the instance RAM role credentials from the \
             metadata service: the metadata service answered HTTP 404 to PUT `{}/latest/api/token` (hardened mode \
             token), and `credentials.hardened_only` forbids the plain request: unset it to fall back to the plain \
             request as Aliyun's credentials provider does",
            emu.endpoint()
        )
    );

    // With tokens back (switched through the faults endpoint), hardened mode works again.
    let r = ureq::post(&format!("{}/_emulator/faults", emu.endpoint()))
        .send_string(r#"{"metadata-token-error": false}"#)
        .unwrap();
    assert_eq!(r.status(), 200);
    let api = EcsClient::new(client_config(&emu), provider_from_spec(&strict).unwrap()).unwrap();
    assert!(!api.describe_zones().unwrap().is_empty());
}
