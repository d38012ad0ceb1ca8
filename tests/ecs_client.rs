//! The ECS client and the credentials chain over real HTTP, against small servers on
//! 127.0.0.1:0 that verify signatures the way ECS does (the full emulator is tested elsewhere).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aliyun_spot_executor::credentials::{provider_from_spec, CredentialSpec, Credentials, StaticProvider};
use aliyun_spot_executor::ecs::{sign, ClientConfig, EcsClient, ErrorKind, FakeClock, RetryPolicy};
use aliyun_spot_executor::secret::Secret;
use serde_json::json;

const KEY_ID: &str = "LTAIloopbackKey01";
const SECRET: &str = "loopback+secret/value=";
const ROLE_SECRET: &str = "role-secret-from-metadata";
const ROLE_TOKEN: &str = "CAIS/role+token==";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    url: String,
    headers: BTreeMap<String, String>,
    /// The URL query's parameters.
    query: BTreeMap<String, String>,
    /// The form body's parameters.
    body: BTreeMap<String, String>,
    /// Both, the body's over the query's: what the signature covers.
    form: BTreeMap<String, String>,
}

type Handler = dyn Fn(&Seen, usize) -> (u16, String) + Send + Sync;

/// A tiny HTTP server on 127.0.0.1:0 answering with `handler(request, index)`.
struct Server {
    server: Arc<tiny_http::Server>,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(handler: impl Fn(&Seen, usize) -> (u16, String) + Send + Sync + 'static) -> Server {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, log) = (server.clone(), seen.clone());
        let handler: Box<Handler> = Box::new(handler);
        let thread = std::thread::spawn(move || {
            for mut rq in s.incoming_requests() {
                let mut body = String::new();
                let _ = rq.as_reader().read_to_string(&mut body);
                let seen = Seen {
                    method: rq.method().to_string(),
                    url: rq.url().to_string(),
                    headers: rq
                        .headers()
                        .iter()
                        .map(|h| (h.field.to_string().to_ascii_lowercase(), h.value.to_string()))
                        .collect(),
                    query: parse_form(rq.url().split_once('?').map_or("", |(_, q)| q)),
                    body: parse_form(&body),
                    form: BTreeMap::new(),
                };
                let mut seen = seen;
                seen.form = seen.query.clone();
                seen.form.extend(seen.body.clone());
                let index = {
                    let mut l = log.lock().unwrap();
                    l.push(seen.clone());
                    l.len() - 1
                };
                let (status, text) = handler(&seen, index);
                let _ = rq.respond(tiny_http::Response::from_string(text).with_status_code(status));
            }
        });
        Server { server, seen, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.server_addr().to_ip().unwrap().port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn parse_form(s: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}

/// What ECS checks: a known key, and the signature over everything received, query and body
/// together.
fn verify(seen: &Seen, keys: &[(&str, &str)]) -> Result<(), (u16, String)> {
    let f = &seen.form;
    let Some(secret) =
        keys.iter().find(|(id, _)| f.get("AccessKeyId").map(String::as_str) == Some(id)).map(|k| k.1)
    else {
        return Err((404, json!({"RequestId": "RQ-key", "HostId": "h", "Code": "InvalidAccessKeyId.NotFound", "Message": "Specified access key is not found.", "Recommend": "r"}).to_string()));
    };
    let mut unsigned = f.clone();
    let sig = unsigned.remove("Signature").unwrap_or_default();
    if sig != sign::sign(&seen.method, &unsigned, secret) {
        let sts = sign::string_to_sign(&seen.method, &unsigned);
        return Err((400, json!({"RequestId": "RQ-sig", "Code": "SignatureDoesNotMatch", "Message": format!("Specified signature is not matched with our calculation. server string to sign is:{sts}")}).to_string()));
    }
    Ok(())
}

fn static_creds(id: &str, secret: &str) -> Arc<StaticProvider> {
    Arc::new(StaticProvider::new(Credentials {
        access_key_id: id.into(),
        access_key_secret: Secret::new(secret.into()),
        security_token: None,
        expiration: None,
    }))
}

fn config(endpoint: &str, attempts: u32) -> ClientConfig {
    let mut cfg = ClientConfig::new("cn-hangzhou");
    cfg.endpoint = Some(endpoint.to_string());
    cfg.timeout = Duration::from_secs(10);
    cfg.retry = RetryPolicy::fixed(attempts, Duration::ZERO, Arc::new(FakeClock::new()));
    cfg
}

fn regions() -> String {
    json!({"RequestId": "RQ-ok", "Regions": {"Region": [{"RegionId": "cn-hangzhou", "LocalName": "华东1（杭州）", "RegionEndpoint": "ecs.aliyuncs.com"}]}}).to_string()
}

#[test]
fn signed_form_post_over_http_is_accepted_and_throttling_is_retried() {
    let server = Server::start(|seen, i| {
        if let Err(e) = verify(seen, &[(KEY_ID, SECRET)]) {
            return e;
        }
        if i == 0 {
            return (400, json!({"RequestId": "RQ-throttle", "Code": "Throttling.User", "Message": "Request was denied due to user flow control."}).to_string());
        }
        (200, regions())
    });
    let client = EcsClient::new(config(&server.endpoint(), 3), static_creds(KEY_ID, SECRET)).unwrap();
    let r = client.describe_regions().unwrap();
    assert_eq!(r[0].region_id, "cn-hangzhou");
    assert_eq!(r[0].local_name, "华东1（杭州）");
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert!(seen[0].url.starts_with("/?"), "{}", seen[0].url);
    // The common parameters and the signature travel in the query, as the legacy SDK sends them.
    for k in
        ["AccessKeyId", "Action", "Format", "RegionId", "Signature", "SignatureNonce", "Timestamp", "Version"]
    {
        assert!(seen[0].query.contains_key(k) && !seen[0].body.contains_key(k), "{k}: {seen:?}");
    }
    assert_eq!(
        seen[0].headers.get("content-type").map(String::as_str),
        Some("application/x-www-form-urlencoded")
    );
    assert_ne!(seen[0].form["SignatureNonce"], seen[1].form["SignatureNonce"]);
}

#[test]
fn aliyun_errors_are_decoded_from_real_answers() {
    let server = Server::start(|seen, _| match verify(seen, &[(KEY_ID, SECRET)]) {
        Err(e) => e,
        Ok(()) => (502, "<html><body>Bad Gateway</body></html>".to_string()),
    });
    let client =
        EcsClient::new(config(&server.endpoint(), 5), static_creds("LTAIunknownKey", SECRET)).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert_eq!(
        e.to_string(),
        "ECS `DescribeRegions` failed: InvalidAccessKeyId.NotFound: Specified access key is not found. (RequestId: RQ-key)"
    );
    assert_eq!(server.seen().len(), 1, "authentication errors are not retried");

    let client =
        EcsClient::new(config(&server.endpoint(), 1), static_creds(KEY_ID, "wrong-secret-value")).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert_eq!(
        e.to_string(),
        "ECS `DescribeRegions` failed: SignatureDoesNotMatch: Specified signature is not matched with our calculation. server string to sign is: (omitted) (RequestId: RQ-sig)"
    );

    let client = EcsClient::new(config(&server.endpoint(), 2), static_creds(KEY_ID, SECRET)).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert_eq!(
        e.to_string(),
        "ECS `DescribeRegions` failed: HTTP 502: non-JSON answer: <html><body>Bad Gateway</body></html> (HTTP 502, no RequestId)"
    );
    assert_eq!(server.seen().len(), 4, "the 502 was retried once");
}

#[test]
fn refused_connections_are_retriable_transport_errors() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = EcsClient::new(config(&endpoint, 2), static_creds(KEY_ID, SECRET)).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.is_retriable());
    assert_eq!(
        e.to_string(),
        format!("ECS `DescribeRegions` failed: POST `{endpoint}/`: connection refused")
    );
}

#[test]
fn slow_answers_time_out_as_retriable_transport_errors() {
    let server = Server::start(|_, _| {
        std::thread::sleep(Duration::from_secs(2));
        (200, regions())
    });
    let mut cfg = config(&server.endpoint(), 1);
    cfg.timeout = Duration::from_millis(200);
    let client = EcsClient::new(cfg, static_creds(KEY_ID, SECRET)).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert!(e.is_retriable(), "{e}");
    assert_eq!(
        e.to_string(),
        format!("ECS `DescribeRegions` failed: POST `{}/`: timed out", server.endpoint())
    );
}

#[test]
fn plain_http_to_a_remote_host_is_refused() {
    let e = EcsClient::new(config("http://ecs.cn-hangzhou.aliyuncs.com", 1), static_creds(KEY_ID, SECRET))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "endpoint `http://ecs.cn-hangzhou.aliyuncs.com` uses plain http to `ecs.cn-hangzhou.aliyuncs.com`, which \
         would send signed requests unencrypted; use `https://` (plain `http://` is accepted only for loopback \
         addresses such as the emulator's `http://127.0.0.1:9470`)"
    );
}

#[test]
fn instance_role_credentials_from_loopback_metadata_sign_requests() {
    // One listener for metadata (hardened mode) and RPC, like the emulator.
    let server = Server::start(|seen, _| {
        let token_ok =
            seen.headers.get("x-aliyun-ecs-metadata-token").map(String::as_str) == Some("meta-session");
        match (seen.method.as_str(), seen.url.as_str()) {
            ("PUT", "/latest/api/token") => {
                assert_eq!(seen.headers.get("x-aliyun-ecs-metadata-token-ttl-seconds").map(String::as_str), Some("21600"));
                (200, "meta-session".into())
            }
            ("GET", _) if !token_ok => (401, "token required".into()),
            ("GET", "/latest/meta-data/ram/security-credentials/") => (200, "ci-runner-role".into()),
            ("GET", "/latest/meta-data/ram/security-credentials/ci-runner-role") => (
                200,
                json!({"AccessKeyId": "STS.loopbackRole01", "AccessKeySecret": ROLE_SECRET, "SecurityToken": ROLE_TOKEN,
                       "Expiration": "2099-01-01T00:00:00Z", "LastUpdated": "2025-01-01T00:00:00Z", "Code": "Success"})
                .to_string(),
            ),
            ("POST", url) if url.starts_with("/?") => {
                if let Err(e) = verify(seen, &[("STS.loopbackRole01", ROLE_SECRET)]) {
                    return e;
                }
                assert_eq!(seen.query.get("SecurityToken").map(String::as_str), Some(ROLE_TOKEN));
                (200, regions())
            }
            _ => (404, "not found".into()),
        }
    });
    let spec = CredentialSpec {
        use_instance_role: true,
        metadata_endpoint: server.endpoint(),
        ..Default::default()
    };
    let creds = provider_from_spec(&spec).unwrap();
    assert_eq!(creds.describe(), format!("instance RAM role (metadata service `{}`)", server.endpoint()));
    let client = EcsClient::new(config(&server.endpoint(), 1), creds).unwrap();
    client.describe_regions().unwrap();
    client.describe_regions().unwrap();
    let paths: Vec<String> =
        server.seen().iter().map(|s| format!("{} {}", s.method, s.url.split('?').next().unwrap())).collect();
    assert_eq!(
        paths,
        vec![
            "PUT /latest/api/token",
            "GET /latest/meta-data/ram/security-credentials/",
            "GET /latest/meta-data/ram/security-credentials/ci-runner-role",
            "POST /",
            "POST /",
        ],
        "credentials are fetched once and cached"
    );
}

#[test]
fn unreachable_metadata_service_is_a_credentials_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = CredentialSpec {
        use_instance_role: true,
        metadata_endpoint: format!("http://127.0.0.1:{port}"),
        ..Default::default()
    };
    let client = EcsClient::new(config("http://127.0.0.1:1", 3), provider_from_spec(&spec).unwrap()).unwrap();
    let e = client.describe_regions().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert_eq!(
        e.to_string(),
        format!(
            "ECS `DescribeRegions` not sent: no credentials: failed to get the instance RAM role credentials from the metadata \
             service: the metadata service did not answer: GET `http://127.0.0.1:{port}/latest/meta-data/ram/security-credentials/`: \
             connection refused (is this runner host an ECS instance?)"
        )
    );
}

#[test]
fn a_metadata_service_blip_is_retried() {
    let server = Server::start(|seen, i| {
        match (seen.method.as_str(), seen.url.as_str()) {
        // The very first request meets a restarting metadata service.
        _ if i == 0 => (503, "restarting".into()),
        ("PUT", "/latest/api/token") => (200, "meta-session".into()),
        ("GET", "/latest/meta-data/ram/security-credentials/ci-runner-role") => (
            200,
            json!({"AccessKeyId": "STS.loopbackRole02", "AccessKeySecret": ROLE_SECRET, "SecurityToken": ROLE_TOKEN,
                   "Expiration": "2099-01-01T00:00:00Z", "Code": "Success"})
            .to_string(),
        ),
        _ => (404, "not found".into()),
    }
    });
    let spec = CredentialSpec {
        use_instance_role: true,
        instance_ram_role: Some("ci-runner-role".into()),
        metadata_endpoint: server.endpoint(),
        // Without the fallback to plain requests, the token request itself is tried again.
        hardened_only: true,
        ..Default::default()
    };
    let c = provider_from_spec(&spec).unwrap().credentials().unwrap();
    assert_eq!(c.access_key_id, "STS.loopbackRole02");
    let paths: Vec<String> = server.seen().iter().map(|s| format!("{} {}", s.method, s.url)).collect();
    assert_eq!(
        paths,
        [
            "PUT /latest/api/token",
            "PUT /latest/api/token",
            "GET /latest/meta-data/ram/security-credentials/ci-runner-role"
        ]
    );
}
