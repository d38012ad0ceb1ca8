//! Unit tests of [`super`] (the ECS client), against a scripted transport.

use super::*;
use crate::credentials::{Credentials, StaticProvider};
use crate::ecs::retry::FakeClock;
use crate::ecs::transport::{HttpResponse, TransportError};
use crate::secret::Secret;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::Mutex;
use time::macros::datetime;

const SECRET: &str = "testSecret/with+special=chars";
const TOKEN: &str = "CAIS.sts/token+value==";

/// Every parameter of a request: its URL query and its form body (the body's win).
pub(crate) fn params_of(req: &HttpRequest) -> BTreeMap<String, String> {
    let query = req.url.split_once('?').map_or("", |(_, q)| q);
    let mut p: BTreeMap<String, String> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    p.extend(form_urlencoded::parse(req.body.as_deref().unwrap_or("").as_bytes()).into_owned());
    p
}

type Handler = Box<dyn Fn(&BTreeMap<String, String>) -> HttpResponse + Send + Sync>;

/// Answers from a script (or a function of the parameters), records every request.
#[derive(Default)]
struct Fake {
    script: Mutex<VecDeque<Result<HttpResponse, TransportError>>>,
    handler: Option<Handler>,
    seen: Arc<Mutex<Vec<HttpRequest>>>,
}

impl Transport for Fake {
    fn send(&self, req: &HttpRequest) -> Result<HttpResponse, TransportError> {
        self.seen.lock().unwrap().push(req.clone());
        if let Some(h) = &self.handler {
            return Ok(h(&params_of(req)));
        }
        self.script.lock().unwrap().pop_front().unwrap_or_else(|| Ok(ok(json!({"RequestId": "end"}))))
    }
}

fn ok(v: Value) -> HttpResponse {
    HttpResponse { status: 200, body: v.to_string() }
}

fn err(status: u16, code: &str, rid: &str) -> HttpResponse {
    HttpResponse {
        status,
        body: json!({"RequestId": rid, "HostId": "ecs.test", "Code": code, "Message": format!("{code} happened."), "Recommend": "r"})
            .to_string(),
    }
}

fn creds(sts: bool) -> Arc<StaticProvider> {
    Arc::new(StaticProvider::new(Credentials {
        access_key_id: "LTAItestKeyId".into(),
        access_key_secret: Secret::new(SECRET.into()),
        security_token: sts.then(|| Secret::new(TOKEN.into())),
        expiration: None,
    }))
}

fn client_with(
    script: Vec<Result<HttpResponse, TransportError>>,
    attempts: u32,
    sts: bool,
) -> (EcsClient, Arc<Mutex<Vec<HttpRequest>>>) {
    let fake = Fake { script: Mutex::new(script.into()), ..Default::default() };
    let seen = fake.seen.clone();
    let mut cfg = ClientConfig::new("cn-hangzhou");
    cfg.endpoint = Some("http://127.0.0.1:9470/".into());
    cfg.retry = RetryPolicy::fixed(attempts, Duration::from_millis(5), Arc::new(FakeClock::new()));
    (EcsClient::with_transport(cfg, creds(sts), Box::new(fake)).unwrap(), seen)
}

fn handler_client(
    h: impl Fn(&BTreeMap<String, String>) -> HttpResponse + Send + Sync + 'static,
) -> (EcsClient, Arc<Mutex<Vec<HttpRequest>>>) {
    let fake = Fake { handler: Some(Box::new(h)), ..Default::default() };
    let seen = fake.seen.clone();
    let mut cfg = ClientConfig::new("cn-hangzhou");
    cfg.retry = RetryPolicy::none();
    (EcsClient::with_transport(cfg, creds(false), Box::new(fake)).unwrap(), seen)
}

fn forms(seen: &Arc<Mutex<Vec<HttpRequest>>>) -> Vec<BTreeMap<String, String>> {
    seen.lock().unwrap().iter().map(params_of).collect()
}

struct FixedStamp;
impl RequestStamp for FixedStamp {
    fn timestamp(&self) -> OffsetDateTime {
        datetime!(2025-06-01 08:09:10 UTC)
    }
    fn nonce(&self) -> String {
        "nonce-1".into()
    }
}

#[test]
fn client_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<EcsClient>();
}

#[test]
fn requests_are_signed_posts_with_the_common_parameters() {
    let (c, seen) = client_with(
        vec![Ok(ok(json!({"Regions": {"Region": [{"RegionId": "cn-hangzhou", "LocalName": "华东1"}]}})))],
        1,
        true,
    );
    let c = c.with_stamp(Arc::new(FixedStamp));
    let regions = c.describe_regions().unwrap();
    assert_eq!(regions[0].region_id, "cn-hangzhou");
    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(req.method, "POST");
    assert!(req.url.starts_with("http://127.0.0.1:9470/?"), "{}", req.url);
    assert_eq!(req.header_value("content-type"), Some("application/x-www-form-urlencoded"));
    let p = params_of(&req);
    // Common parameters and the signature in the query, the action's in the body
    // (`sign::sign_split`).
    let query: BTreeMap<String, String> =
        form_urlencoded::parse(req.url.split_once('?').unwrap().1.as_bytes()).into_owned().collect();
    assert!(query.contains_key("Signature") && query.contains_key("SecurityToken"), "{query:?}");
    assert!(query.keys().all(|k| sign::COMMON_PARAMETERS.contains(&k.as_str())), "{query:?}");
    let get = |k: &str| p.get(k).map(String::as_str);
    assert_eq!(get("Action"), Some("DescribeRegions"));
    assert_eq!(get("Version"), Some("2014-05-26"));
    assert_eq!(get("Format"), Some("JSON"));
    assert_eq!(get("AccessKeyId"), Some("LTAItestKeyId"));
    assert_eq!(get("SignatureMethod"), Some("HMAC-SHA1"));
    assert_eq!(get("SignatureVersion"), Some("1.0"));
    assert_eq!(get("SignatureNonce"), Some("nonce-1"));
    assert_eq!(get("Timestamp"), Some("2025-06-01T08:09:10Z"));
    assert_eq!(get("RegionId"), Some("cn-hangzhou"));
    assert_eq!(get("SecurityToken"), Some(TOKEN));
    // The server's check: recompute over everything received.
    let mut unsigned = p.clone();
    let sig = unsigned.remove("Signature").unwrap();
    assert_eq!(sig, sign::sign("POST", &unsigned, SECRET));
}

#[test]
fn throttling_then_success_retries_with_a_new_nonce_each_time() {
    let (c, seen) = client_with(
        vec![
            Ok(err(400, "Throttling.User", "R1")),
            Ok(err(503, "ServiceUnavailable", "R2")),
            Err(TransportError { message: "POST `x`: connection reset".into(), retriable: true }),
            Ok(ok(json!({"Zones": {"Zone": [{"ZoneId": "cn-hangzhou-b"}]}}))),
        ],
        5,
        false,
    );
    let zones = c.describe_zones().unwrap();
    assert_eq!(zones.len(), 1);
    let f = forms(&seen);
    assert_eq!(f.len(), 4);
    let nonces: std::collections::BTreeSet<&String> = f.iter().map(|p| &p["SignatureNonce"]).collect();
    assert_eq!(nonces.len(), 4, "every attempt is signed afresh");
    for p in &f {
        let mut u = p.clone();
        let s = u.remove("Signature").unwrap();
        assert_eq!(s, sign::sign("POST", &u, SECRET));
    }
}

#[test]
fn server_error_burst_beyond_the_cap_fails_with_the_last_error() {
    let script = (1..=6).map(|i| Ok(err(500, "InternalError", &format!("R{i}")))).collect();
    let (c, seen) = client_with(script, 4, false);
    let e = c.describe_regions().unwrap_err();
    assert_eq!(
        e.to_string(),
        "ECS `DescribeRegions` failed: InternalError: InternalError happened. (RequestId: R4)"
    );
    assert_eq!(seen.lock().unwrap().len(), 4);
}

#[test]
fn auth_error_is_tried_exactly_once() {
    let (c, seen) = client_with(vec![Ok(err(404, "InvalidAccessKeyId.NotFound", "RA"))], 5, false);
    let e = c.describe_regions().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn a_bad_region_id_is_refused() {
    let mut cfg = ClientConfig::new("cn hangzhou");
    cfg.retry = RetryPolicy::none();
    assert!(EcsClient::with_transport(cfg, creds(false), Box::new(Fake::default())).is_err());
}

fn run_req() -> RunInstancesRequest {
    RunInstancesRequest {
        zone_id: "cn-hangzhou-b".into(),
        instance_type: "ecs.c7.2xlarge".into(),
        image_id: "ubuntu_24_04_x64_20G_alibase_20250101.vhd".into(),
        security_group_id: "sg-1".into(),
        vswitch_id: "vsw-1".into(),
        instance_name: "ci-runner-amd64-spot-1".into(),
        host_name: None,
        spot_strategy: SpotStrategy::SpotWithPriceLimit,
        spot_price_limit: Some(0.1 * 1.2),
        spot_duration: Some(0),
        internet_max_bandwidth_out: 10,
        system_disk_category: Some("cloud_essd".into()),
        system_disk_size: Some(40),
        key_pair_name: None,
        ram_role_name: Some("self-destruct".into()),
        user_data: Some(Secret::new("#cloud-config\nssh_authorized_keys: []\n".into())),
        tags: vec![
            ("aliyun-spot-executor:managed-by".into(), "aliyun-spot-executor".into()),
            ("aliyun-spot-executor:job".into(), "42".into()),
        ],
        auto_release_time: Some(datetime!(2025-06-01 10:00:00.5 +08:00)),
        client_token: "runner1-job42-attempt1".into(),
        dry_run: false,
    }
}

#[test]
fn run_instances_sends_every_field() {
    let (c, seen) = client_with(
        vec![Ok(ok(json!({"RequestId": "R", "InstanceIdSets": {"InstanceIdSet": ["i-bp1abc"]}})))],
        1,
        false,
    );
    assert_eq!(c.run_instances(&run_req()).unwrap(), vec!["i-bp1abc"]);
    let p = &forms(&seen)[0];
    let want = [
        ("Action", "RunInstances"),
        ("ZoneId", "cn-hangzhou-b"),
        ("InstanceType", "ecs.c7.2xlarge"),
        ("ImageId", "ubuntu_24_04_x64_20G_alibase_20250101.vhd"),
        ("SecurityGroupId", "sg-1"),
        ("VSwitchId", "vsw-1"),
        ("InstanceName", "ci-runner-amd64-spot-1"),
        ("InstanceChargeType", "PostPaid"),
        ("SpotStrategy", "SpotWithPriceLimit"),
        ("SpotPriceLimit", "0.12"),
        ("SpotDuration", "0"),
        ("SpotInterruptionBehavior", "Terminate"),
        ("InternetMaxBandwidthOut", "10"),
        ("InternetChargeType", "PayByTraffic"),
        ("SystemDisk.Category", "cloud_essd"),
        ("SystemDisk.Size", "40"),
        ("RamRoleName", "self-destruct"),
        ("UserData", "I2Nsb3VkLWNvbmZpZwpzc2hfYXV0aG9yaXplZF9rZXlzOiBbXQo="),
        ("Tag.1.Key", "aliyun-spot-executor:managed-by"),
        ("Tag.1.Value", "aliyun-spot-executor"),
        ("Tag.2.Key", "aliyun-spot-executor:job"),
        ("Tag.2.Value", "42"),
        ("AutoReleaseTime", "2025-06-01T02:00:00Z"),
        ("Amount", "1"),
        ("ClientToken", "runner1-job42-attempt1"),
    ];
    for (k, v) in want {
        assert_eq!(p.get(k).map(String::as_str), Some(v), "parameter `{k}`");
    }
    assert!(!p.contains_key("DryRun") && !p.contains_key("KeyPairName") && !p.contains_key("HostName"));
}

#[test]
fn run_instances_needs_a_client_token_and_checks_limits() {
    let (c, seen) = client_with(vec![], 3, false);
    let mut r = run_req();
    r.client_token = " ".into();
    assert_eq!(
        c.run_instances(&r).unwrap_err().to_string(),
        "`RunInstances` needs a `ClientToken`: without one a retried request could create a second instance"
    );
    r.client_token = "x".repeat(65);
    assert!(c.run_instances(&r).unwrap_err().to_string().contains("at most 64 printable ASCII"));
    r.client_token = "t".into();
    r.tags = (0..21).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(c.run_instances(&r).unwrap_err().to_string(), "`RunInstances` takes at most 20 tags, got 21");
    r.tags.clear();
    r.spot_price_limit = None;
    assert!(c.run_instances(&r).unwrap_err().to_string().contains("needs a positive `SpotPriceLimit`"));
    r.spot_price_limit = Some(1.0);
    r.user_data = Some(Secret::new("x".repeat(40_000)));
    assert!(c.run_instances(&r).unwrap_err().to_string().contains("more than Aliyun's limit of 32768"));
    assert_eq!(seen.lock().unwrap().len(), 0, "nothing was sent");
}

#[test]
fn run_instances_is_retried_with_the_same_client_token() {
    let (c, seen) = client_with(
        vec![
            Err(TransportError { message: "POST `x`: timed out".into(), retriable: true }),
            Ok(ok(json!({"InstanceIdSets": {"InstanceIdSet": ["i-1"]}}))),
        ],
        3,
        false,
    );
    assert_eq!(c.run_instances(&run_req()).unwrap(), vec!["i-1"]);
    let f = forms(&seen);
    assert_eq!(f.len(), 2);
    assert_eq!(f[0]["ClientToken"], f[1]["ClientToken"]);
    assert_ne!(f[0]["SignatureNonce"], f[1]["SignatureNonce"]);
}

#[test]
fn dry_run_operation_is_success() {
    let (c, seen) = client_with(
        vec![Ok(err(400, "DryRunOperation", "RD")), Ok(err(400, "DryRunOperation", "RD2"))],
        1,
        false,
    );
    let mut r = run_req();
    r.dry_run = true;
    r.spot_strategy = SpotStrategy::SpotAsPriceGo;
    r.internet_max_bandwidth_out = 0;
    assert_eq!(c.run_instances(&r).unwrap(), Vec::<String>::new());
    let p = &forms(&seen)[0];
    assert_eq!(p["DryRun"], "true");
    assert!(!p.contains_key("SpotPriceLimit") && !p.contains_key("InternetChargeType"));
    // Without DryRun the same answer is an error of kind DryRunOk.
    r.dry_run = false;
    assert_eq!(c.run_instances(&r).unwrap_err().kind(), ErrorKind::DryRunOk);
}

#[test]
fn describe_instances_pages_through_everything() {
    let (c, seen) = handler_client(|p| {
        let start: usize =
            p.get("NextToken").map(|t| t.trim_start_matches("tk").parse().unwrap()).unwrap_or(0);
        let total = 230;
        let end = (start + 100).min(total);
        let items: Vec<Value> = (start..end)
            .map(|i| json!({"InstanceId": format!("i-{i}"), "Status": "Running", "Cpu": 8, "Memory": 8192}))
            .collect();
        let next = if end < total { format!("tk{end}") } else { String::new() };
        ok(json!({"Instances": {"Instance": items}, "TotalCount": total, "NextToken": next}))
    });
    let f = DescribeInstancesFilter {
        tags: vec![("aliyun-spot-executor:managed-by".into(), "aliyun-spot-executor".into())],
        status: Some("Running".into()),
        ..Default::default()
    };
    let all = c.describe_instances(&f).unwrap();
    assert_eq!(all.len(), 230);
    assert_eq!(all[229].id, "i-229");
    let fs = forms(&seen);
    assert_eq!(
        fs.iter().map(|p| p.get("NextToken").map(String::as_str)).collect::<Vec<_>>(),
        vec![None, Some("tk100"), Some("tk200")]
    );
    assert!(fs.iter().all(|p| p["MaxResults"] == "100" && !p.contains_key("PageNumber")));
    assert_eq!(fs[0]["Tag.1.Key"], "aliyun-spot-executor:managed-by");
    assert_eq!(fs[0]["Tag.1.Value"], "aliyun-spot-executor");
    assert_eq!(fs[0]["Status"], "Running");
    assert!(!fs[0].contains_key("InstanceIds"));
}

#[test]
fn describe_instances_sends_ids_as_a_json_array() {
    let (c, seen) = handler_client(|p| {
        let ids: Vec<String> = serde_json::from_str(&p["InstanceIds"]).unwrap();
        let items: Vec<Value> = ids.iter().map(|i| json!({"InstanceId": i})).collect();
        ok(json!({"Instances": {"Instance": items}, "TotalCount": ids.len()}))
    });
    let ids: Vec<String> = (0..150).map(|i| format!("i-{i}")).collect();
    let got = c
        .describe_instances(&DescribeInstancesFilter { instance_ids: ids.clone(), ..Default::default() })
        .unwrap();
    assert_eq!(got.iter().map(|i| i.id.clone()).collect::<Vec<_>>(), ids);
    let fs = forms(&seen);
    assert_eq!(fs.len(), 2);
    assert_eq!(fs[1]["InstanceIds"], json_array(&ids[100..]));
}

#[test]
fn describe_instance_types_follows_next_token() {
    let (c, seen) = handler_client(|p| {
        let (items, next) = match p.get("NextToken").map(String::as_str) {
            None => (
                vec![
                    json!({"InstanceTypeId": "ecs.c8y.2xlarge", "CpuCoreCount": 8, "MemorySize": 16, "CpuArchitecture": "ARM"}),
                ],
                "t2",
            ),
            Some("t2") => (
                vec![
                    json!({"InstanceTypeId": "ecs.c8y.4xlarge", "CpuCoreCount": 16, "MemorySize": 32, "CpuArchitecture": "ARM"}),
                ],
                "",
            ),
            Some(other) => panic!("unexpected token {other}"),
        };
        ok(json!({"InstanceTypes": {"InstanceType": items}, "NextToken": next}))
    });
    let f = InstanceTypeFilter {
        arch: Some(crate::selection::Arch::Arm64),
        min_cores: Some(8),
        max_memory_gib: Some(64.0),
        ..Default::default()
    };
    let types = c.describe_instance_types(&f).unwrap();
    assert_eq!(
        types.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec!["ecs.c8y.2xlarge", "ecs.c8y.4xlarge"]
    );
    let fs = forms(&seen);
    assert_eq!(fs[0]["CpuArchitecture"], "ARM");
    assert_eq!(fs[0]["MinimumCpuCoreCount"], "8");
    assert_eq!(fs[0]["MaximumMemorySize"], "64");
    assert_eq!(fs[0]["MaxResults"], "1600", "the API's maximum page");
    assert_eq!(fs[1]["NextToken"], "t2");
}

#[test]
fn spot_price_history_follows_next_offset() {
    let (c, seen) = handler_client(|p| {
        let offset: u64 = p.get("Offset").map(|o| o.parse().unwrap()).unwrap_or(0);
        let item = json!({"ZoneId": "cn-hangzhou-b", "InstanceType": "ecs.c7.large", "SpotPrice": 0.05 + offset as f64 / 100.0,
                          "OriginPrice": 0.4, "Timestamp": "2025-01-01T00:00:00Z", "NetworkType": "vpc", "IoOptimized": "optimized"});
        if offset < 2 {
            ok(json!({"SpotPrices": {"SpotPriceType": [item]}, "NextOffset": offset + 1, "Currency": "CNY"}))
        } else {
            ok(json!({"SpotPrices": {"SpotPriceType": [item]}, "NextOffset": 0, "Currency": "CNY"}))
        }
    });
    let r = SpotPriceHistoryRequest {
        instance_type: "ecs.c7.large".into(),
        zone_id: None,
        start_time: Some(datetime!(2025-01-01 00:00 UTC)),
        end_time: None,
        spot_duration: None,
    };
    let history = c.describe_spot_price_history(&r).unwrap();
    assert_eq!((history.points.len(), history.currency.as_deref()), (3, Some("CNY")));
    let fs = forms(&seen);
    assert_eq!(fs.len(), 3);
    assert_eq!(fs[0]["NetworkType"], "vpc");
    assert_eq!(fs[0]["IoOptimized"], "optimized");
    assert_eq!(fs[0]["OSType"], "linux");
    assert_eq!(fs[0]["StartTime"], "2025-01-01T00:00:00Z");
    assert_eq!(fs[2]["Offset"], "2");
}

#[test]
fn available_resource_request_parameters() {
    let (c, seen) = handler_client(|_| ok(json!({"AvailableZones": {"AvailableZone": []}})));
    let r = AvailableResourceRequest {
        spot_strategy: SpotStrategy::SpotWithPriceLimit,
        cores: Some(8),
        ..Default::default()
    };
    assert!(c.describe_available_resource(&r).unwrap().is_empty());
    let p = &forms(&seen)[0];
    for (k, v) in [
        ("DestinationResource", "InstanceType"),
        ("InstanceChargeType", "PostPaid"),
        ("SpotStrategy", "SpotWithPriceLimit"),
        ("ResourceType", "instance"),
        ("Cores", "8"),
    ] {
        assert_eq!(p[k], v, "{k}");
    }
}

#[test]
fn delete_of_a_missing_instance_is_already_gone() {
    let (c, seen) =
        client_with(vec![Ok(err(404, "InvalidInstanceId.NotFound", "R")), Ok(ok(json!({})))], 3, false);
    assert_eq!(c.delete_instance("i-gone", true).unwrap(), DeleteOutcome::AlreadyGone);
    assert_eq!(c.delete_instance("i-here", false).unwrap(), DeleteOutcome::Deleted);
    let fs = forms(&seen);
    assert_eq!((fs[0]["InstanceId"].as_str(), fs[0]["Force"].as_str()), ("i-gone", "true"));
    assert_eq!(fs[1]["Force"], "false");
    let (c, _) = client_with(vec![Ok(err(403, "IncorrectInstanceStatus", "R"))], 3, false);
    assert_eq!(c.delete_instance("i-x", true).unwrap_err().kind(), ErrorKind::IncorrectStatus);
}

#[test]
fn delete_instances_falls_back_to_one_by_one_when_some_are_gone() {
    let (c, seen) = client_with(
        vec![
            Ok(err(404, "InvalidInstanceId.NotFound", "R")),
            Ok(ok(json!({}))),
            Ok(err(404, "InvalidInstanceId.NotFound", "R2")),
        ],
        1,
        false,
    );
    c.delete_instances(&["i-a".to_string(), "i-b".to_string()], true).unwrap();
    let fs = forms(&seen);
    assert_eq!(
        fs.iter().map(|p| p["Action"].as_str()).collect::<Vec<_>>(),
        vec!["DeleteInstances", "DeleteInstance", "DeleteInstance"]
    );
    assert_eq!((fs[0]["InstanceId.1"].as_str(), fs[0]["InstanceId.2"].as_str()), ("i-a", "i-b"));
}

#[test]
fn key_pairs_images_and_security_groups() {
    let (c, seen) = handler_client(|p| match p["Action"].as_str() {
        "ImportKeyPair" => ok(json!({"KeyPairName": p["KeyPairName"], "KeyPairFingerPrint": "ab:cd"})),
        "DeleteKeyPairs" => ok(json!({})),
        "DescribeImages" => ok(
            json!({"Images": {"Image": [{"ImageId": "m-1", "Architecture": "x86_64", "OSType": "linux", "Status": "Available"}]}, "TotalCount": 1}),
        ),
        "DescribeSecurityGroups" => ok(
            json!({"SecurityGroups": {"SecurityGroup": [{"SecurityGroupId": "sg-1", "VpcId": "vpc-1"}]}, "TotalCount": 1}),
        ),
        other => panic!("{other}"),
    });
    assert_eq!(
        c.import_key_pair("k1", "ssh-ed25519 AAAA c\n").unwrap().fingerprint.as_deref(),
        Some("ab:cd")
    );
    c.delete_key_pairs(&["k1".into(), "k2".into()]).unwrap();
    assert_eq!(c.describe_images(&["m-1".into()]).unwrap()[0].architecture.as_deref(), Some("x86_64"));
    assert_eq!(
        c.describe_security_groups(&["sg-1".into()], Some("vpc-1")).unwrap()[0].vpc_id.as_deref(),
        Some("vpc-1")
    );
    let fs = forms(&seen);
    assert_eq!(fs[0]["PublicKeyBody"], "ssh-ed25519 AAAA c");
    assert_eq!(fs[1]["KeyPairNames"], r#"["k1","k2"]"#);
    assert_eq!(fs[2]["ImageId"], "m-1");
    assert_eq!(fs[3]["SecurityGroupIds"], r#"["sg-1"]"#);
}

#[test]
fn undecodable_answers_are_typed_errors() {
    let (c, _) = client_with(vec![Ok(HttpResponse { status: 200, body: "<html>".into() })], 3, false);
    let e = c.describe_regions().unwrap_err();
    assert_eq!(
        e.to_string(),
        "ECS `DescribeRegions` answer could not be decoded: not JSON (line 1, column 1)"
    );
    assert!(!e.is_retriable());
}

/// Captures every log record of the test binary.
struct CaptureLogger;
static CAPTURED: Mutex<Vec<String>> = Mutex::new(Vec::new());
impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        CAPTURED.lock().unwrap().push(format!("{} {}", r.level(), r.args()));
    }
    fn flush(&self) {}
}

#[test]
fn no_secret_in_logs_errors_or_debug_output() {
    static LOGGER: CaptureLogger = CaptureLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Trace);
    let echo = |status: u16, code: &str| {
        HttpResponse {
        status,
        // A hostile or buggy server that echoes secrets back.
        body: json!({"RequestId": "RS", "Code": code, "Message": format!("echo {SECRET} {TOKEN} {} server string to sign is:POST&%2F&x", sign::percent_encode(TOKEN))}).to_string(),
    }
    };
    let (c, _) = client_with(
        vec![
            Ok(echo(400, "Throttling")),
            Err(TransportError { message: format!("POST `x`: timed out {SECRET}"), retriable: true }),
            Ok(echo(500, "InternalError")),
            Ok(echo(400, "SignatureDoesNotMatch")),
        ],
        5,
        true,
    );
    let e = c.describe_regions().unwrap_err();
    assert_eq!(e.code(), Some("SignatureDoesNotMatch"));
    let mut texts = vec![e.to_string(), format!("{e:?}"), format!("{c:?}"), format!("{:?}", run_req())];
    let lines = CAPTURED.lock().unwrap().clone();
    let ours: Vec<&String> = lines.iter().filter(|l| l.contains("ECS `DescribeRegions` attempt")).collect();
    assert!(
        ours.len() >= 3,
        "three retries were logged (if nothing was captured, another test installed a different logger): {lines:?}"
    );
    assert!(
        ours.iter().any(|l| l.starts_with(
            "WARN ECS `DescribeRegions` attempt 1/5 failed (Throttling, HTTP 400, RequestId: RS)"
        )),
        "{ours:?}"
    );
    texts.extend(lines);
    for t in &texts {
        assert!(
            !t.contains(SECRET) && !t.contains(TOKEN) && !t.contains(&sign::percent_encode(TOKEN)),
            "leak in: {t}"
        );
    }
}

#[test]
fn one_failing_price_call_drops_that_type_not_the_catalogue() {
    use crate::selection::{Arch, CatalogueSource, TypeInfo};
    let (c, seen) = handler_client(|p| match p["InstanceType"].as_str() {
        "ecs.bad.2xlarge" => err(400, "InvalidInstanceType.ValueNotSupported", "R"),
        t => ok(json!({"Currency": "USD", "NextOffset": 0, "SpotPrices": {"SpotPriceType": [
            {"ZoneId": "cn-hangzhou-h", "InstanceType": t, "SpotPrice": 0.2, "OriginPrice": 1.0, "Timestamp": "2025-01-01T00:00:00Z"}
        ]}})),
    });
    let ty = |id: &str| TypeInfo {
        id: id.into(),
        family: String::new(),
        cores: 8,
        memory_gib: 16.0,
        arch: Arch::Amd64,
        family_level: String::new(),
        gpu_amount: 0,
        gpu_spec: String::new(),
    };
    let source = crate::offers::EcsSource { client: &c, spot_duration: 0 };
    let zones = ["cn-hangzhou-h".to_string()];
    let got = source.latest_prices(&[ty("ecs.c7.2xlarge"), ty("ecs.bad.2xlarge")], &zones).unwrap();
    assert_eq!(got.points.iter().map(|p| p.instance_type.as_str()).collect::<Vec<_>>(), ["ecs.c7.2xlarge"]);
    assert_eq!(got.currency.as_deref(), Some("USD"));
    assert!(forms(&seen).iter().all(|f| f["SpotDuration"] == "0"));
    // Every type failing is not a catalogue: the error comes back.
    let e = source.latest_prices(&[ty("ecs.bad.2xlarge")], &zones).unwrap_err();
    assert!(format!("{e:#}").contains("InvalidInstanceType.ValueNotSupported"), "{e:#}");
}
