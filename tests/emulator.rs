//! The ECS emulator, driven over HTTP like a real client: Aliyun's own Python SDK against it,
//! signature/timestamp/nonce/STS rejections with Aliyun's codes, real sshd per instance with
//! the host key and authorized keys from cloud-config, and the injected faults.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aliyun_spot_executor::ecs::sign;
use aliyun_spot_executor::emulator::{
    Emulator, EmulatorOptions, Faults, InstanceRecord, DEFAULT_ACCESS_KEY_ID, DEFAULT_ACCESS_KEY_SECRET,
};
use base64::Engine;
use serde_json::Value;

const X86_IMAGE: &str = "ubuntu_24_04_x64_20G_alibase_20250101.vhd";
const ARM_IMAGE: &str = "ubuntu_24_04_arm64_20G_alibase_20250101.vhd";
const SG: &str = "sg-bp1emulator0000000001";

fn start(faults: Faults) -> Emulator {
    Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        // These tests delete instances right after creating them to check answer shapes; the
        // refusal while an instance initializes is tested in `faults::`.
        faults: Faults { initializing: Duration::ZERO, ..faults },
        boot_delay: Duration::from_millis(200),
        ssh_delay: Duration::from_millis(100),
        ..EmulatorOptions::default()
    })
    .expect("emulator starts")
}

/// A minimal signed RPC client (GET or POST form), independent of the crate's ECS client.
pub(crate) struct Api {
    endpoint: String,
    id: String,
    secret: String,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(emu: &Emulator) -> Api {
        Api {
            endpoint: emu.endpoint(),
            id: DEFAULT_ACCESS_KEY_ID.into(),
            secret: DEFAULT_ACCESS_KEY_SECRET.into(),
            token: None,
        }
    }

    fn params(&self, action: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        for (k, v) in [
            ("Action", action),
            ("Version", "2014-05-26"),
            ("Format", "JSON"),
            ("AccessKeyId", self.id.as_str()),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("RegionId", "cn-hangzhou"),
        ] {
            p.insert(k.to_string(), v.to_string());
        }
        p.insert("SignatureNonce".into(), uuid::Uuid::new_v4().to_string());
        p.insert("Timestamp".into(), timestamp(time::OffsetDateTime::now_utc()));
        if let Some(t) = &self.token {
            p.insert("SecurityToken".into(), t.clone());
        }
        for (k, v) in extra {
            p.insert(k.to_string(), v.to_string());
        }
        p
    }

    /// Signs `p` (after `tamper`) and sends it; returns (status, JSON body).
    fn send(&self, method: &str, mut p: BTreeMap<String, String>) -> (u16, Value) {
        let sig = sign::sign(method, &p, &self.secret);
        p.insert("Signature".into(), sig);
        let pairs: Vec<(&str, &str)> = p.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let res = if method == "GET" {
            let q: Vec<String> = p
                .iter()
                .map(|(k, v)| format!("{}={}", sign::percent_encode(k), sign::percent_encode(v)))
                .collect();
            ureq::get(&format!("{}/?{}", self.endpoint, q.join("&"))).call()
        } else {
            ureq::post(&format!("{}/", self.endpoint)).send_form(&pairs)
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        let status = resp.status();
        let body = resp.into_string().unwrap();
        (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("non-JSON answer: {body}")))
    }

    fn call(&self, action: &str, extra: &[(&str, &str)]) -> (u16, Value) {
        self.send("GET", self.params(action, extra))
    }

    pub(crate) fn ok(&self, action: &str, extra: &[(&str, &str)]) -> Value {
        let (s, v) = self.call(action, extra);
        assert_eq!(s, 200, "{action} failed: {v}");
        v
    }

    /// Asserts an error answer and returns its message.
    fn err(&self, action: &str, extra: &[(&str, &str)], status: u16, code: &str) -> String {
        let (s, v) = self.call(action, extra);
        assert_eq!((s, v["Code"].as_str().unwrap_or("")), (status, code), "{action}: {v}");
        for k in ["RequestId", "HostId", "Code", "Message", "Recommend"] {
            assert!(v.get(k).is_some(), "error shape lacks {k}: {v}");
        }
        v["Message"].as_str().unwrap().to_string()
    }
}

fn timestamp(t: time::OffsetDateTime) -> String {
    aliyun_spot_executor::ecs::types::format_utc(t)
}

/// Polls `f` until it returns `Some` (safety deadline only; never a timing assertion).
pub(crate) fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(crate) fn record(emu: &Emulator, id: &str) -> InstanceRecord {
    emu.instances().into_iter().find(|r| r.id == id).expect("instance is recorded")
}

pub(crate) fn run(api: &Api, itype: &str, zone: &str, extra: &[(&str, &str)]) -> String {
    let vsw = format!("vsw-bp1emulatorzone{}", zone.rsplit('-').next().unwrap());
    let image = if itype.contains("8y") || itype.contains("8r") { ARM_IMAGE } else { X86_IMAGE };
    let mut p = vec![
        ("ZoneId", zone),
        ("InstanceType", itype),
        ("ImageId", image),
        ("SecurityGroupId", SG),
        ("VSwitchId", vsw.as_str()),
        ("SpotStrategy", "SpotAsPriceGo"),
        ("InternetMaxBandwidthOut", "1"),
    ];
    p.extend_from_slice(extra);
    let v = api.ok("RunInstances", &p);
    v["InstanceIdSets"]["InstanceIdSet"][0].as_str().unwrap().to_string()
}

pub(crate) fn wait_sshd(emu: &Emulator, id: &str) -> (SocketAddr, i32) {
    wait_for("sshd listening", || {
        let r = record(emu, id);
        let pid = r.sshd_pid?;
        let addr: SocketAddr = format!("{}:{}", r.ip, r.ssh_port).parse().unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        Some((addr, pid as i32))
    })
}

struct Keys {
    client_private: String,
    client_public: String,
    host_private: String,
    host_blob: Vec<u8>,
}

fn keys() -> Keys {
    let gen = || ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
    let (c, h) = (gen(), gen());
    Keys {
        client_private: c.to_openssh(ssh_key::LineEnding::LF).unwrap().to_string(),
        client_public: c.public_key().to_openssh().unwrap(),
        host_private: h.to_openssh(ssh_key::LineEnding::LF).unwrap().to_string(),
        host_blob: h.public_key().to_bytes().unwrap(),
    }
}

fn cloud_config(k: &Keys) -> String {
    let doc = serde_json::json!({
        "ssh_authorized_keys": [k.client_public],
        "ssh_keys": { "ed25519_private": k.host_private },
        "runcmd": ["echo ignored"],
    });
    base64::engine::general_purpose::STANDARD.encode(format!("#cloud-config\n{doc}\n"))
}

fn ssh(addr: SocketAddr, k: &Keys) -> ssh2::Session {
    let tcp = TcpStream::connect(addr).unwrap();
    let mut s = ssh2::Session::new().unwrap();
    s.set_tcp_stream(tcp);
    s.set_timeout(30_000);
    s.handshake().unwrap();
    let (blob, _) = s.host_key().unwrap();
    assert_eq!(blob, k.host_blob.as_slice(), "sshd presents the host key given in cloud-config");
    s.userauth_pubkey_memory("root", None, &k.client_private, None).unwrap();
    assert!(s.authenticated());
    s
}

fn exec(s: &ssh2::Session, cmd: &str) -> String {
    let mut ch = s.channel_session().unwrap();
    ch.exec(cmd).unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).unwrap();
    ch.wait_close().unwrap();
    out
}

/// Opens a channel running `sleep` and returns it with the remote pid.
fn remote_sleeper(s: &ssh2::Session) -> (ssh2::Channel, i32) {
    let mut ch = s.channel_session().unwrap();
    ch.exec("echo $$; exec sleep 600").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while ch.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    (ch, String::from_utf8(line).unwrap().trim().parse().unwrap())
}

/// `GET path` from a socket bound to `source` (as a process on that instance would connect).
fn get_from(source: std::net::Ipv4Addr, server: SocketAddr, path: &str) -> String {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let std::net::IpAddr::V4(server_ip) = server.ip() else { panic!("IPv4 emulator expected") };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a fresh descriptor owned by the TcpStream afterwards.
    let mut stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let local = sockaddr(source, 0);
        assert_eq!(libc::bind(fd, &local as *const _ as *const libc::sockaddr, len), 0);
        let remote = sockaddr(server_ip, server.port());
        assert_eq!(libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len), 0);
        TcpStream::from_raw_fd(fd)
    };
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string()
}

pub(crate) fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(&needle) && process_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Both SDK generations must import: the legacy one (signature v1) and the current one (V3).
const SDK_IMPORTS: &str =
    "import aliyunsdkcore, aliyunsdkecs, alibabacloud_ecs20140526.client, alibabacloud_tea_openapi";

/// The Python with Aliyun's SDKs. `ALIYUN_SPOT_TEST_PYTHON` (set by `.ci/run`) is used alone and
/// must import both SDKs: a missing SDK fails the test with the import error, it never skips it.
/// Without it, `.venv` of the repository or `/opt/aliyun-sdk-venv`, else the test fails too.
fn python_with_sdks() -> PathBuf {
    let check = |p: &Path| Command::new(p).args(["-c", SDK_IMPORTS]).output();
    if let Some(p) = aliyun_spot_executor::env::Env::from_process().value("ALIYUN_SPOT_TEST_PYTHON") {
        let p = PathBuf::from(p);
        match check(&p) {
            Ok(o) if o.status.success() => return p,
            Ok(o) => panic!(
                "ALIYUN_SPOT_TEST_PYTHON=`{}` cannot import Aliyun's SDKs (aliyun-python-sdk-core, \
                 aliyun-python-sdk-ecs, alibabacloud-ecs20140526): {}",
                p.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("ALIYUN_SPOT_TEST_PYTHON=`{}` does not run: {e}", p.display()),
        }
    }
    [Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"), "/opt/aliyun-sdk-venv/bin/python".into()]
        .into_iter()
        .find(|p| check(p).is_ok_and(|o| o.status.success()))
        .expect(
            "no Python with Aliyun's SDKs (aliyun-python-sdk-core, aliyun-python-sdk-ecs, alibabacloud-ecs20140526) \
             found: set ALIYUN_SPOT_TEST_PYTHON, or create .venv in the repository, or /opt/aliyun-sdk-venv",
        )
}

/// Runs `tests/conformance/<script>` against `emu`; returns its stdout after asserting success.
fn conformance(emu: &Emulator, script: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance").join(script);
    let out = Command::new(python_with_sdks())
        .arg(&script)
        .arg(emu.addr().ip().to_string())
        .arg(emu.addr().port().to_string())
        .arg(DEFAULT_ACCESS_KEY_ID)
        .arg(DEFAULT_ACCESS_KEY_SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{} failed\nstdout:\n{stdout}\nstderr:\n{stderr}", script.display());
    stdout
}

#[test]
fn aliyun_python_sdk_works_against_the_emulator() {
    let emu = start(Faults::default());
    let stdout = conformance(&emu, "sdk_conformance.py");
    for check in [
        "OK DescribeRegions",
        "OK DescribeInstanceTypes",
        "OK DescribeAvailableResource",
        "OK DescribeSpotPriceHistory",
        "OK RunInstances",
        "OK DescribeInstances",
        "OK DeleteInstance",
        "OK WrongSecret 400 InvalidAccessKeySecret",
        "CONFORMANCE OK",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with(check)), "missing `{check}` in:\n{stdout}");
    }
    // The SDK turned our SignatureDoesNotMatch into InvalidAccessKeySecret only because our
    // string to sign equals its own; the log shows what the server answered.
    let log = emu.requests();
    assert!(log.iter().any(|r| r.status == 400 && r.code.as_deref() == Some("SignatureDoesNotMatch")));
    assert!(log
        .iter()
        .any(|r| r.method == "POST" && r.action.as_deref() == Some("RunInstances") && r.status == 200));
    let dump = serde_json::to_string(&log).unwrap();
    assert!(!dump.contains(DEFAULT_ACCESS_KEY_SECRET), "the request log leaks the secret");
    assert!(!dump.contains("I2Nsb3Vk"), "the request log leaks UserData");
    assert_eq!(emu.live_instances(), 0);
}

/// The current SDK (ACS3-HMAC-SHA256, action in `x-acs-action`) gets the legacy SDK's answers
/// to the same calls, and a wrong secret is refused with the V3 error it expects.
#[test]
fn aliyun_v3_python_sdk_works_against_the_emulator_like_the_legacy_one() {
    let emu = start(Faults::default());
    let stdout = conformance(&emu, "sdk_v3_conformance.py");
    for check in [
        "OK DescribeRegions",
        "OK DescribeInstanceTypes",
        "OK DescribeAvailableResource",
        "OK DescribeSpotPriceHistory",
        "OK RunInstances",
        "OK DescribeInstances",
        "OK DeleteInstance then InvalidInstanceId.NotFound",
        "OK WrongSecret 400 SignatureDoesNotMatch",
        "CONFORMANCE V3 OK",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with(check)), "missing `{check}` in:\n{stdout}");
    }
    let log = emu.requests();
    // The V3 calls reached the actions through `x-acs-action` (the script asked the legacy SDK
    // the read-only questions too, which leaves the two RunInstances to V3 alone).
    let runs: Vec<_> = log.iter().filter(|r| r.action.as_deref() == Some("RunInstances")).collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().all(|r| r.status == 200 && !r.params.contains_key("Action")), "{runs:?}");
    assert!(log.iter().any(|r| r.status == 400 && r.code.as_deref() == Some("SignatureDoesNotMatch")));
    let dump = serde_json::to_string(&log).unwrap();
    assert!(!dump.contains(DEFAULT_ACCESS_KEY_SECRET), "the request log leaks the secret");
    assert!(!dump.contains("I2Nsb3Vk"), "the request log leaks UserData");
    assert_eq!(emu.live_instances(), 0);
}

#[test]
fn instance_runs_real_sshd_with_cloud_config_keys_and_dies_with_delete() {
    let emu = start(Faults::default());
    let api = Api::new(&emu);
    let k = keys();
    let ud = cloud_config(&k);
    let id = run(&api, "ecs.c7.large", "cn-hangzhou-j", &[("UserData", ud.as_str())]);
    let status = wait_for("Running", || {
        let v = api.ok("DescribeInstances", &[("InstanceIds", &format!("[\"{id}\"]"))]);
        let s = v["Instances"]["Instance"][0]["Status"].as_str()?.to_string();
        (s == "Running").then_some(s)
    });
    assert_eq!(status, "Running");
    let (addr, sshd_pid) = wait_sshd(&emu, &id);
    assert!(addr.ip().to_string().starts_with("127.0.") && addr.ip().to_string() != "127.0.0.1");
    // Metadata is attributed by source address: the instance sees itself, the host does not.
    let std::net::IpAddr::V4(ip) = addr.ip() else { unreachable!() };
    assert_eq!(get_from(ip, emu.addr(), "/latest/meta-data/instance-id"), id);
    assert_eq!(get_from(ip, emu.addr(), "/latest/meta-data/zone-id"), "cn-hangzhou-j");
    assert_eq!(get_from(ip, emu.addr(), "/latest/meta-data/instance/instance-type"), "ecs.c7.large");
    assert_ne!(get_from("127.0.0.1".parse().unwrap(), emu.addr(), "/latest/meta-data/instance-id"), id);
    let s = ssh(addr, &k);
    let uname = exec(&s, "uname -a");
    assert!(uname.starts_with("Linux "), "{uname}");
    let (mut ch, remote_pid) = remote_sleeper(&s);
    assert!(process_alive(remote_pid));

    api.err("DeleteInstance", &[("InstanceId", &id)], 403, "IncorrectInstanceStatus");
    api.ok("DeleteInstance", &[("InstanceId", &id), ("Force", "true")]);
    // The client sees the connection drop; the sshd and the remote process are gone.
    let mut rest = Vec::new();
    let _ = ch.read_to_end(&mut rest);
    wait_for("sshd gone", || (!process_alive(sshd_pid)).then_some(()));
    assert!(!process_alive(remote_pid), "the remote process survived deletion");
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    api.err("DeleteInstance", &[("InstanceId", &id), ("Force", "true")], 404, "InvalidInstanceId.NotFound");
    let r = wait_for("sshd reaped", || {
        let r = record(&emu, &id);
        r.sshd_pid.is_none().then_some(r)
    });
    let events: Vec<String> = r.events.into_iter().map(|e| e.event).collect();
    assert_eq!(events, ["created", "starting", "running", "sshd-started", "deleted", "sshd-exited"]);
    assert_eq!((r.status.as_str(), r.live), ("Deleted", false));
}

#[test]
fn no_sshd_outlives_the_emulator() {
    let dir = crate::private_tempdir();
    let emu = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        boot_delay: Duration::from_millis(100),
        ssh_delay: Duration::ZERO,
        work_dir: Some(dir.path().to_path_buf()),
        ..EmulatorOptions::default()
    })
    .unwrap();
    let api = Api::new(&emu);
    let a = run(&api, "ecs.c7.large", "cn-hangzhou-b", &[]);
    let b = run(&api, "ecs.c8y.2xlarge", "cn-hangzhou-k", &[]);
    let (_, pa) = wait_sshd(&emu, &a);
    let (_, pb) = wait_sshd(&emu, &b);
    let before = processes_mentioning(dir.path());
    assert!(before.contains(&pa) && before.contains(&pb), "{before:?}");
    drop(emu);
    assert!(!process_alive(pa) && !process_alive(pb));
    assert_eq!(processes_mentioning(dir.path()), Vec::<i32>::new());
}

#[test]
fn rejects_bad_signatures_timestamps_nonces_and_tokens() {
    let emu = start(Faults::default());
    let api = Api::new(&emu);
    api.ok("DescribeRegions", &[]);

    // Wrong secret: 400 with the server's string to sign after the last ':'.
    let bad = Api { secret: "nope".into(), ..Api::new(&emu) };
    let p = bad.params("DescribeRegions", &[]);
    let expected = sign::string_to_sign("GET", &p);
    let (s, v) = bad.send("GET", p);
    assert_eq!((s, v["Code"].as_str().unwrap()), (400, "SignatureDoesNotMatch"));
    let msg = v["Message"].as_str().unwrap();
    assert_eq!(msg.split(':').nth(1), Some(expected.as_str()), "{msg}");
    assert!(msg.ends_with(&format!("server string to sign is:{expected}")));

    let unknown = Api { id: "LTAInobody".into(), ..Api::new(&emu) };
    unknown.err("DescribeRegions", &[], 404, "InvalidAccessKeyId.NotFound");

    let old = timestamp(time::OffsetDateTime::now_utc() - time::Duration::minutes(20));
    api.err("DescribeRegions", &[("Timestamp", &old)], 400, "InvalidTimeStamp.Expired");

    let p = api.params("DescribeRegions", &[]);
    assert_eq!(api.send("POST", p.clone()).0, 200);
    let (s, v) = api.send("POST", p);
    assert_eq!((s, v["Code"].as_str().unwrap()), (400, "SignatureNonceUsed"));

    api.err("NoSuchAction", &[], 404, "InvalidAction.NotFound");
    api.err("DescribeSpotPriceHistory", &[("NetworkType", "vpc")], 400, "MissingParameter");
    let mut p = api.params("DescribeRegions", &[]);
    p.remove("Timestamp");
    let (s, v) = api.send("GET", p);
    assert_eq!((s, v["Code"].as_str().unwrap()), (400, "MissingTimestamp"));

    // STS credentials from emulator metadata: accepted with their token, rejected without it
    // or after expiry.
    let host = Emulator::start(EmulatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        host_ram_role: Some("runner-role".into()),
        ..EmulatorOptions::default()
    })
    .unwrap();
    let base = host.endpoint();
    let tok = ureq::put(&format!("{base}/latest/api/token"))
        .set("X-aliyun-ecs-metadata-token-ttl-seconds", "300")
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    match ureq::get(&format!("{base}/latest/meta-data/ram/security-credentials/")).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("hardened metadata without a token answered {other:?}"),
    }
    let md = |path: &str| {
        ureq::get(&format!("{base}/latest/meta-data/{path}"))
            .set("X-aliyun-ecs-metadata-token", &tok)
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    assert_eq!(md("ram/security-credentials/"), "runner-role");
    let creds: Value = serde_json::from_str(&md("ram/security-credentials/runner-role")).unwrap();
    assert_eq!(creds["Code"], "Success");
    let id = creds["AccessKeyId"].as_str().unwrap();
    assert!(id.starts_with("STS."));
    let sts = Api {
        endpoint: base.clone(),
        id: id.into(),
        secret: creds["AccessKeySecret"].as_str().unwrap().into(),
        token: Some(creds["SecurityToken"].as_str().unwrap().into()),
    };
    sts.ok("DescribeRegions", &[]);
    assert_eq!(host.requests().last().unwrap().role.as_deref(), Some("runner-role"));
    let no_token = Api { token: Some("forged".into()), ..sts };
    no_token.err("DescribeRegions", &[], 400, "InvalidSecurityToken.Malformed");
    let expired = host.issue_sts_credentials("runner-role", Duration::ZERO);
    let expired = Api {
        endpoint: base,
        id: expired.access_key_id,
        secret: expired.access_key_secret.expose().clone(),
        token: Some(expired.security_token.expose().clone()),
    };
    expired.err("DescribeRegions", &[], 400, "InvalidSecurityToken.Expired");
}

/// Common parameters in the query, the action's in the form body, as the legacy SDK sends a
/// POST (`rpc_signature_composer.get_signed_url`): the signature covers both parts together,
/// and one over either part alone is refused.
#[test]
fn signature_v1_covers_query_and_form_body_together() {
    let emu = start(Faults::default());
    let api = Api::new(&emu);
    let common = api.params("DescribeZones", &[]);
    let body: BTreeMap<String, String> = [("AcceptLanguage".to_string(), "en-US".to_string())].into();
    let post = |sign_over: &BTreeMap<String, String>,
                body: &BTreeMap<String, String>,
                query: &BTreeMap<String, String>| {
        let mut query = query.clone();
        query.insert("Signature".into(), sign::sign("POST", sign_over, &api.secret));
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{}={}", sign::percent_encode(k), sign::percent_encode(v)))
            .collect();
        let pairs: Vec<(&str, &str)> = body.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match ureq::post(&format!("{}/?{}", api.endpoint, qs.join("&"))).send_form(&pairs) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let mut both = common.clone();
    both.extend(body.clone());
    let (s, text) = post(&both, &body, &common);
    assert_eq!(s, 200, "{text}");
    // Signed over the query alone, then over the body alone (fresh nonces each time).
    for query_only in [true, false] {
        let fresh = api.params("DescribeZones", &[]);
        let sign_over = if query_only { fresh.clone() } else { body.clone() };
        let (s, text) = post(&sign_over, &body, &fresh);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((s, v["Code"].as_str()), (400, Some("SignatureDoesNotMatch")), "{v}");
        // The server's string to sign has the body's parameter and the query's nonce: it
        // signed both parts.
        let msg = v["Message"].as_str().unwrap();
        assert!(msg.contains("AcceptLanguage%3Den-US"), "{msg}");
        assert!(msg.contains(&format!("SignatureNonce%3D{}", fresh["SignatureNonce"])), "{msg}");
    }
}

#[test]
fn run_instances_validates_like_aliyun() {
    let emu = start(Faults::default());
    let api = Api::new(&emu);
    let base = |it: &'static str, zone: &'static str, vsw: &'static str, image: &'static str| {
        vec![
            ("ZoneId", zone),
            ("InstanceType", it),
            ("ImageId", image),
            ("SecurityGroupId", SG),
            ("VSwitchId", vsw),
            ("SpotStrategy", "SpotWithPriceLimit"),
            ("SpotPriceLimit", "5"),
        ]
    };
    let good = base("ecs.c7.large", "cn-hangzhou-j", "vsw-bp1emulatorzonej", X86_IMAGE);
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut p = good.clone();
        for (k, v) in extra {
            p.retain(|(pk, _)| pk != k);
            p.push((k, v));
        }
        p
    };
    api.err("RunInstances", &with(&[("DryRun", "true")]), 400, "DryRunOperation");
    api.err(
        "RunInstances",
        &with(&[("SpotPriceLimit", "0.001")]),
        400,
        "InvalidSpotPriceLimit.LowerThanPublicPrice",
    );
    api.err(
        "RunInstances",
        &with(&[("InstanceType", "ecs.nope")]),
        400,
        "InvalidInstanceType.ValueNotSupported",
    );
    api.err(
        "RunInstances",
        &with(&[("VSwitchId", "vsw-bp1emulatorzoneb")]),
        400,
        "InvalidVSwitchId.Mismatch",
    );
    api.err("RunInstances", &with(&[("ImageId", ARM_IMAGE)]), 403, "ImageNotSupportInstanceType");
    api.err("RunInstances", &with(&[("ImageId", "m-unknown")]), 404, "InvalidImageId.NotFound");
    api.err("RunInstances", &with(&[("SecurityGroupId", "sg-x")]), 404, "InvalidSecurityGroupId.NotFound");
    api.err("RunInstances", &with(&[("Amount", "0")]), 400, "InvalidAmount.ValueNotSupported");
    api.err(
        "RunInstances",
        &with(&[("UserData", "not base64!")]),
        400,
        "InvalidUserData.Base64FormatInvalid",
    );
    api.err(
        "RunInstances",
        &with(&[("AutoReleaseTime", "2020-01-01T00:00:00Z")]),
        400,
        "InvalidAutoReleaseTime.ValueNotSupported",
    );
    api.err("RunInstances", &with(&[("KeyPairName", "missing")]), 404, "InvalidKeyPairName.NotFound");
    api.err("RunInstances", &with(&[("SpotStrategy", "Cheap")]), 400, "InvalidSpotStrategy");
    // ARM types are not sold in zone g.
    api.err(
        "RunInstances",
        &base("ecs.c8y.2xlarge", "cn-hangzhou-g", "vsw-bp1emulatorzoneg", ARM_IMAGE),
        403,
        "InvalidResourceType.NotSupported",
    );
    let tags: Vec<(String, String)> = (1..=21)
        .flat_map(|n| [(format!("Tag.{n}.Key"), format!("k{n}")), (format!("Tag.{n}.Value"), "v".into())])
        .collect();
    let mut p: Vec<(&str, &str)> = good.clone();
    p.extend(tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    api.err("RunInstances", &p, 400, "InvalidTagCount");
    api.err("RunInstances", &[("InstanceType", "ecs.c7.large")], 400, "MissingParameter");
    assert_eq!(emu.instances().len(), 0, "no failed request created an instance");

    // ClientToken idempotency.
    let first = api.ok("RunInstances", &with(&[("ClientToken", "tok-1")]));
    let again = api.ok("RunInstances", &with(&[("ClientToken", "tok-1")]));
    assert_eq!(first["InstanceIdSets"], again["InstanceIdSets"]);
    api.err(
        "RunInstances",
        &with(&[("ClientToken", "tok-1"), ("InstanceName", "other")]),
        400,
        "IdempotentParameterMismatch",
    );
    assert_eq!(emu.instances().len(), 1);
    let id = first["InstanceIdSets"]["InstanceIdSet"][0].as_str().unwrap();
    assert!(id.starts_with("i-bp1") && id.len() == 20, "{id}");

    // Key pairs feed authorized keys.
    let k = keys();
    api.ok("ImportKeyPair", &[("KeyPairName", "ci-key"), ("PublicKeyBody", &k.client_public)]);
    api.err(
        "ImportKeyPair",
        &[("KeyPairName", "ci-key"), ("PublicKeyBody", &k.client_public)],
        400,
        "KeyPair.AlreadyExist",
    );
    let v = api.ok("DescribeKeyPairs", &[("KeyPairName", "ci-*")]);
    assert_eq!(v["KeyPairs"]["KeyPair"][0]["KeyPairName"], "ci-key");
    api.ok("DeleteKeyPairs", &[("KeyPairNames", "[\"ci-key\"]")]);
    assert_eq!(api.ok("DescribeKeyPairs", &[])["TotalCount"], 0);
    api.err("DescribeInstances", &[("DryRun", "true")], 400, "DryRunOperation");
}

#[test]
fn run_instances_refuses_host_and_instance_names_as_ecs_does() {
    // The rules of `aliyun_spot_executor::ecs::names` (RunInstances reference and request model).
    let emu = start(Faults::default());
    let api = Api::new(&emu);
    let good = vec![
        ("ZoneId", "cn-hangzhou-j"),
        ("InstanceType", "ecs.c7.large"),
        ("ImageId", X86_IMAGE),
        ("SecurityGroupId", SG),
        ("VSwitchId", "vsw-bp1emulatorzonej"),
        ("SpotStrategy", "SpotAsPriceGo"),
        ("DryRun", "true"),
    ];
    let with = |k: &'static str, v: &'static str| {
        let mut p = good.clone();
        p.push((k, v));
        p
    };
    let too_long = "a".repeat(65);
    for host in ["ci--runner-amd64-spot-20260101000000", "-ci", "ci.", "a..b", "a", "ci_runner", &too_long] {
        let mut p = good.clone();
        p.push(("HostName", host));
        let msg = api.err("RunInstances", &p, 400, "InvalidHostName.Malformed");
        assert_eq!(msg, "The specified parameter \"HostName\" is not valid.", "{host}");
    }
    for name in ["1ci", "a", "ci runner", "http://ci"] {
        let msg = api.err("RunInstances", &with("InstanceName", name), 400, "InvalidInstanceName.Malformed");
        assert_eq!(msg, "The specified parameter \"InstanceName\" is not valid.", "{name}");
    }
    // What the executor sends passes (the dry run answers DryRunOperation only after every check).
    api.err("RunInstances", &with("HostName", "ci-runner-amd64-spot-20260101000000"), 400, "DryRunOperation");
    api.err("RunInstances", &with("InstanceName", "ci--runner-amd64-spot-1"), 400, "DryRunOperation");
    assert!(emu.instances().is_empty());
}

#[test]
fn catalogue_answers_have_aliyun_shapes() {
    let emu = start(Faults { no_stock: vec!["ecs.c8y.2xlarge@cn-hangzhou-k".into()], ..Faults::default() });
    let api = Api::new(&emu);
    let v = api.ok(
        "DescribeAvailableResource",
        &[
            ("DestinationResource", "InstanceType"),
            ("ZoneId", "cn-hangzhou-k"),
            ("SpotStrategy", "SpotAsPriceGo"),
        ],
    );
    let zone = &v["AvailableZones"]["AvailableZone"][0];
    assert_eq!(
        (zone["Status"].as_str(), zone["StatusCategory"].as_str()),
        (Some("Available"), Some("WithStock"))
    );
    let res = zone["AvailableResources"]["AvailableResource"][0]["SupportedResources"]["SupportedResource"]
        .as_array()
        .unwrap();
    let c8y = res.iter().find(|r| r["Value"] == "ecs.c8y.2xlarge").unwrap();
    assert_eq!(
        (c8y["Status"].as_str(), c8y["StatusCategory"].as_str()),
        (Some("SoldOut"), Some("WithoutStock"))
    );
    assert!(res.iter().any(|r| r["Status"] == "Available"));
    api.err(
        "RunInstances",
        &[
            ("ZoneId", "cn-hangzhou-k"),
            ("InstanceType", "ecs.c8y.2xlarge"),
            ("ImageId", ARM_IMAGE),
            ("SecurityGroupId", SG),
            ("VSwitchId", "vsw-bp1emulatorzonek"),
            ("SpotStrategy", "SpotAsPriceGo"),
        ],
        403,
        "OperationDenied.NoStock",
    );
    run(&api, "ecs.c8y.2xlarge", "cn-hangzhou-j", &[]);

    // Price history: several points per zone, the latest one the current price; paging.
    let start = timestamp(time::OffsetDateTime::now_utc() - time::Duration::days(2));
    let mut pts = Vec::new();
    let mut offset = 0u64;
    loop {
        let v = api.ok(
            "DescribeSpotPriceHistory",
            &[
                ("NetworkType", "vpc"),
                ("InstanceType", "ecs.c7.large"),
                ("StartTime", &start),
                ("Offset", &offset.to_string()),
            ],
        );
        pts.extend(v["SpotPrices"]["SpotPriceType"].as_array().unwrap().clone());
        offset = v["NextOffset"].as_u64().unwrap();
        if offset == 0 {
            break;
        }
    }
    let j: Vec<&Value> = pts.iter().filter(|p| p["ZoneId"] == "cn-hangzhou-j").collect();
    assert!(j.len() >= 48, "{}", j.len());
    assert_eq!(j.last().unwrap()["SpotPrice"].as_f64(), Some(0.0562), "latest point is the current price");
    let zones: std::collections::BTreeSet<&str> = pts.iter().map(|p| p["ZoneId"].as_str().unwrap()).collect();
    assert!(zones.len() > 3);

    let v =
        api.ok("DescribeInstanceTypes", &[("InstanceTypeFamily", "ecs.c8y"), ("MinimumMemorySize", "32")]);
    let ids: Vec<&str> = v["InstanceTypes"]["InstanceType"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["InstanceTypeId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ecs.c8y.4xlarge", "ecs.c8y.8xlarge", "ecs.c8y.16xlarge"]);
}

#[test]
fn throttling_and_error_rate_faults() {
    let emu = start(Faults { throttle_every: Some(3), ..Faults::default() });
    let api = Api::new(&emu);
    api.ok("DescribeRegions", &[]);
    api.ok("DescribeRegions", &[]);
    api.err("DescribeRegions", &[], 400, "Throttling.User");
    api.ok("DescribeRegions", &[]);

    let outcomes = |seed: u64| {
        let emu = start(Faults { error_rate: 0.5, seed, ..Faults::default() });
        let api = Api::new(&emu);
        (0..30)
            .map(|_| {
                let (s, v) = api.call("DescribeRegions", &[]);
                if s == 503 {
                    assert_eq!(v["Code"], "ServiceUnavailable");
                }
                s
            })
            .collect::<Vec<u16>>()
    };
    let a = outcomes(7);
    assert!(a.contains(&503) && a.contains(&200), "{a:?}");
    assert_eq!(a, outcomes(7), "the error dice are deterministic per seed");

    // Faults change at run time through the control endpoint.
    let r = ureq::post(&format!("{}/_emulator/faults", emu.endpoint()))
        .send_string(r#"{"throttle-every": null, "no-stock": ["*@cn-hangzhou-b"]}"#)
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(emu.faults().throttle_every, None);
    assert_eq!(emu.faults().no_stock, ["*@cn-hangzhou-b"]);
    let summary: Value = serde_json::from_str(
        &ureq::get(&format!("{}/_emulator/summary", emu.endpoint())).call().unwrap().into_string().unwrap(),
    )
    .unwrap();
    assert_eq!(summary["actions"]["DescribeRegions"], 4);
}

#[test]
fn never_boot_instances_stay_starting() {
    let emu = start(Faults { never_boot: vec!["ecs.c7.large@*".into()], ..Faults::default() });
    let api = Api::new(&emu);
    let stuck = run(&api, "ecs.c7.large", "cn-hangzhou-j", &[]);
    let fine = run(&api, "ecs.c7.2xlarge", "cn-hangzhou-j", &[]);
    wait_for("the other instance Running", || (record(&emu, &fine).status == "Running").then_some(()));
    let v = api.ok("DescribeInstanceStatus", &[("InstanceId.1", &stuck), ("InstanceId.2", &fine)]);
    let mut st: Vec<(String, String)> = v["InstanceStatuses"]["InstanceStatus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["InstanceId"].as_str().unwrap().into(), s["Status"].as_str().unwrap().into()))
        .collect();
    st.sort_by_key(|(id, _)| id != &stuck);
    assert_eq!(st, [(stuck.clone(), "Starting".to_string()), (fine.clone(), "Running".to_string())]);
    // NextToken paging, newest first; a MaxResults below 10 means 10 (the SDK's
    // `_describe_instances_request.py`), so both fit one page.
    let p1 = api.ok("DescribeInstances", &[("MaxResults", "1")]);
    let ids: Vec<&str> = p1["Instances"]["Instance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["InstanceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [fine.as_str(), stuck.as_str()]);
    assert_eq!(p1["NextToken"], "");
    api.ok("DeleteInstances", &[("InstanceId.1", &stuck), ("InstanceId.2", &fine), ("Force", "true")]);
    assert_eq!(emu.live_instances(), 0);
}

#[test]
fn spot_reclaim_drops_ssh_and_recycles() {
    let emu = start(Faults { reclaim_after: Some(Duration::from_secs(3)), ..Faults::default() });
    let api = Api::new(&emu);
    let k = keys();
    let ud = cloud_config(&k);
    let id = run(&api, "ecs.c7.large", "cn-hangzhou-i", &[("UserData", ud.as_str())]);
    let on_demand = run(&api, "ecs.c7.large", "cn-hangzhou-i", &[("SpotStrategy", "NoSpot")]);
    let (addr, sshd_pid) = wait_sshd(&emu, &id);
    // The notice is visible at once.
    let tt = ureq::get(&format!(
        "{}/instances/{id}/latest/meta-data/instance/spot/termination-time",
        emu.endpoint()
    ))
    .call()
    .unwrap()
    .into_string()
    .unwrap();
    assert_eq!(Some(tt.clone()), record(&emu, &id).termination_time);
    let s = ssh(addr, &k);
    let (mut ch, remote_pid) = remote_sleeper(&s);
    let mut rest = Vec::new();
    let _ = ch.read_to_end(&mut rest); // returns when the connection drops at reclaim
    let r = wait_for("reclaimed", || {
        let r = record(&emu, &id);
        r.events.iter().any(|e| e.event == "reclaimed").then_some(r)
    });
    assert!(!process_alive(remote_pid));
    wait_for("sshd reaped", || (!process_alive(sshd_pid)).then_some(()));
    if r.live {
        let v = api.ok("DescribeInstances", &[("InstanceIds", &format!("[\"{id}\"]"))]);
        let i = &v["Instances"]["Instance"][0];
        assert_eq!(i["Status"], "Stopped");
        assert_eq!(i["OperationLocks"]["LockReason"][0]["LockReason"], "Recycling");
    }
    wait_for("released", || (!record(&emu, &id).live).then_some(()));
    api.err("DeleteInstance", &[("InstanceId", &id)], 404, "InvalidInstanceId.NotFound");
    match ureq::get(&format!(
        "{}/instances/{on_demand}/latest/meta-data/instance/spot/termination-time",
        emu.endpoint()
    ))
    .call()
    {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("termination-time of an instance without notice answered {other:?}"),
    }
    let other = record(&emu, &on_demand);
    assert!(other.live && other.termination_time.is_none(), "on-demand instances are not reclaimed");
    let events: Vec<String> = record(&emu, &id).events.into_iter().map(|e| e.event).collect();
    assert!(events.ends_with(&["reclaimed".into(), "sshd-exited".into(), "released".into()]), "{events:?}");
}
