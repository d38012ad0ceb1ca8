//! [`EcsClient`]: signed, retried ECS RPC calls and the typed actions built on them.
//!
//! Why hand-written rather than an SDK: there is no maintained blocking Rust SDK for ECS, and
//! the executor needs a dozen actions, a documented retry policy, typed errors and the
//! guarantee that no secret ever reaches an error or a log line — easier to prove on a few
//! hundred lines of our own.
//!
//! Each call is a `POST /` with an `application/x-www-form-urlencoded` body (what Aliyun's SDKs
//! send), holding the action's parameters and the common ones (`Action`, `Version=2014-05-26`,
//! `Format=JSON`, `AccessKeyId`, `SignatureMethod=HMAC-SHA1`, `SignatureVersion=1.0`,
//! `SignatureNonce`, `Timestamp`, `RegionId`, `SecurityToken` with STS credentials), signed with
//! [`super::sign`]. Every attempt is signed afresh, with a new nonce and timestamp.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use base64::Engine;
use serde_json::Value;
use time::OffsetDateTime;

use super::error::{decode_error, EcsError, ErrorKind};
use super::retry::RetryPolicy;
use super::sign;
use super::transport::{HttpRequest, Transport, UreqTransport};
use super::types::*;
use crate::credentials::CredentialsProvider;

/// The ECS API version.
pub const API_VERSION: &str = "2014-05-26";

/// `DescribeInstances` page size (the API's maximum).
const PAGE_SIZE: usize = 100;

/// Safety bound on pages followed in one paginated call.
const MAX_PAGES: usize = 1000;

/// At most this many bytes of base64 user data (Aliyun's limit).
const MAX_USER_DATA_BASE64: usize = 32 * 1024;

/// How the client is set up.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `cn-hangzhou`, ...
    pub region_id: String,
    /// `https://...`, or `http://` on a loopback address (the emulator); default
    /// `https://ecs.<region>.aliyuncs.com`.
    pub endpoint: Option<String>,
    /// Overall time limit of one HTTP request (the connect limit is the smaller of this and
    /// 10 s).
    pub timeout: Duration,
    /// The retry policy.
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// Defaults for `region_id`: Aliyun's endpoint, 30 s per request, the default retry policy.
    pub fn new(region_id: &str) -> Self {
        ClientConfig {
            region_id: region_id.to_string(),
            endpoint: None,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

/// Where `Timestamp` and `SignatureNonce` come from; injectable for tests.
pub trait RequestStamp: Send + Sync {
    /// The request time (UTC).
    fn timestamp(&self) -> OffsetDateTime;
    /// A value never used before.
    fn nonce(&self) -> String;
}

/// The real clock and UUID v4 nonces.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemStamp;

impl RequestStamp for SystemStamp {
    fn timestamp(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
    fn nonce(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// The ECS RPC client. `Send + Sync`; share it behind an `Arc` if needed.
pub struct EcsClient {
    region_id: String,
    endpoint: String,
    creds: Arc<dyn CredentialsProvider>,
    transport: Box<dyn Transport>,
    retry: RetryPolicy,
    stamp: Arc<dyn RequestStamp>,
    /// The `RequestId` of the last successful answer per action (`doctor --live` prints them).
    request_ids: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl fmt::Debug for EcsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcsClient")
            .field("region_id", &self.region_id)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.creds.describe())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Checks a region id's shape (`cn-hangzhou`, `ap-southeast-1`, `cn-shanghai-finance-1`).
pub fn validate_region_id(region: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = region.len() <= 64
        && parts.len() >= 2
        && parts[0].len() >= 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    if !ok {
        bail!("invalid region id `{region}`: expected a region id such as `cn-hangzhou` or `ap-southeast-1`");
    }
    Ok(())
}

/// The endpoint to use: `endpoint` without a trailing `/`, or Aliyun's for the region. Plain
/// `http://` is accepted only for loopback hosts (127.0.0.0/8, `::1`, `localhost`).
pub fn resolve_endpoint(region_id: &str, endpoint: Option<&str>) -> anyhow::Result<String> {
    let Some(raw) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
        return Ok(format!("https://ecs.{region_id}.aliyuncs.com"));
    };
    let ep = raw.trim_end_matches('/');
    let (scheme, rest) = match ep.split_once("://") {
        Some((s, r)) => (s.to_ascii_lowercase(), r),
        None => bail!("endpoint `{raw}` has no scheme: use e.g. `https://ecs.{region_id}.aliyuncs.com`"),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        bail!("endpoint `{raw}` has no valid host: use e.g. `https://ecs.{region_id}.aliyuncs.com`");
    }
    if rest.contains(['?', '#']) {
        bail!("endpoint `{raw}` must not have a query or fragment");
    }
    match scheme.as_str() {
        "https" => Ok(ep.to_string()),
        "http" if is_loopback_authority(authority) => Ok(ep.to_string()),
        "http" => bail!(
            "endpoint `{raw}` uses plain http: use https://, plain http is only allowed for loopback addresses such as the emulator"
        ),
        _ => bail!("endpoint `{raw}` has scheme `{scheme}`: use https://"),
    }
}

/// Whether `host[:port]` names a loopback host.
fn is_loopback_authority(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, _)) => h,
            None => return false,
        }
    } else {
        authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped().is_some_and(|v4: Ipv4Addr| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// The full, signed parameter set of one attempt (common parameters over `params`), with the
/// `Signature`. Pure: the time, nonce and credentials are arguments.
pub fn signed_params(
    action: &str,
    params: &[(String, String)],
    region_id: &str,
    creds: &crate::credentials::Credentials,
    timestamp: OffsetDateTime,
    nonce: &str,
) -> BTreeMap<String, String> {
    let mut p: BTreeMap<String, String> = params.iter().cloned().collect();
    let common = [
        ("Action", action.to_string()),
        ("Version", API_VERSION.to_string()),
        ("Format", "JSON".to_string()),
        ("AccessKeyId", creds.access_key_id.clone()),
        ("SignatureMethod", "HMAC-SHA1".to_string()),
        ("SignatureVersion", "1.0".to_string()),
        ("SignatureNonce", nonce.to_string()),
        ("Timestamp", format_utc(timestamp)),
        ("RegionId", region_id.to_string()),
    ];
    for (k, v) in common {
        p.insert(k.to_string(), v);
    }
    p.remove("Signature");
    p.remove("SecurityToken");
    if let Some(token) = &creds.security_token {
        p.insert("SecurityToken".to_string(), token.expose().clone());
    }
    let signature = sign::sign("POST", &p, creds.access_key_secret.expose());
    p.insert("Signature".to_string(), signature);
    p
}

/// `k=v&...`, RFC 3986 percent-encoded (a valid `application/x-www-form-urlencoded` body).
fn form_body(p: &BTreeMap<String, String>) -> String {
    p.iter()
        .map(|(k, v)| format!("{}={}", sign::percent_encode(k), sign::percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A parameter list under construction.
#[derive(Default)]
struct Params(Vec<(String, String)>);

impl Params {
    fn set(&mut self, k: &str, v: impl Into<String>) -> &mut Self {
        self.0.push((k.to_string(), v.into()));
        self
    }
    fn opt(&mut self, k: &str, v: Option<impl Into<String>>) -> &mut Self {
        if let Some(v) = v {
            self.set(k, v);
        }
        self
    }
    fn tags(&mut self, tags: &[(String, String)]) -> &mut Self {
        for (i, (k, v)) in tags.iter().enumerate() {
            self.set(&format!("Tag.{}.Key", i + 1), k.clone());
            self.set(&format!("Tag.{}.Value", i + 1), v.clone());
        }
        self
    }
}

fn json_array(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_string())
}

impl EcsClient {
    /// A client over HTTPS (`ureq`); validates the region id and the endpoint.
    pub fn new(cfg: ClientConfig, creds: Arc<dyn CredentialsProvider>) -> anyhow::Result<Self> {
        let connect = cfg.timeout.min(Duration::from_secs(10));
        let transport = UreqTransport::new(connect, cfg.timeout);
        Self::with_transport(cfg, creds, Box::new(transport))
    }

    /// A client over any transport (tests); validates the region id and the endpoint.
    pub fn with_transport(
        cfg: ClientConfig,
        creds: Arc<dyn CredentialsProvider>,
        transport: Box<dyn Transport>,
    ) -> anyhow::Result<Self> {
        validate_region_id(&cfg.region_id)?;
        let endpoint = resolve_endpoint(&cfg.region_id, cfg.endpoint.as_deref())?;
        Ok(EcsClient {
            region_id: cfg.region_id,
            endpoint,
            creds,
            transport,
            retry: cfg.retry,
            stamp: Arc::new(SystemStamp),
            request_ids: Default::default(),
        })
    }

    /// Replaces where `Timestamp` and `SignatureNonce` come from (tests).
    pub fn with_stamp(mut self, stamp: Arc<dyn RequestStamp>) -> Self {
        self.stamp = stamp;
        self
    }

    /// The region.
    pub fn region_id(&self) -> &str {
        &self.region_id
    }

    /// The endpoint, without a trailing `/`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Where the credentials come from (no secret).
    pub fn credentials_source(&self) -> String {
        self.creds.describe()
    }

    /// Calls `action` with `params` (plus the common ones), signed, retried per the policy;
    /// returns the JSON answer.
    pub fn call(&self, action: &str, params: &[(String, String)]) -> Result<Value, EcsError> {
        let answer = self.retry.run(action, |_attempt| self.call_once(action, params))?;
        if let (Some(id), Ok(mut ids)) =
            (answer.get("RequestId").and_then(Value::as_str), self.request_ids.lock())
        {
            ids.insert(action.to_string(), id.to_string());
        }
        Ok(answer)
    }

    /// The `RequestId` of the last successful `action` (failures carry theirs in the error).
    pub fn last_request_id(&self, action: &str) -> Option<String> {
        self.request_ids.lock().ok()?.get(action).cloned()
    }

    /// One signed attempt.
    fn call_once(&self, action: &str, params: &[(String, String)]) -> Result<Value, EcsError> {
        let creds = self
            .creds
            .credentials()
            .map_err(|e| EcsError::Credentials { action: action.to_string(), message: format!("{e:#}") })?;
        let signed = signed_params(
            action,
            params,
            &self.region_id,
            &creds,
            self.stamp.timestamp(),
            &self.stamp.nonce(),
        );
        let mut req = HttpRequest::new("POST", format!("{}/", self.endpoint))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json");
        req.body = Some(form_body(&signed));
        let secrets: Vec<&str> = std::iter::once(creds.access_key_secret.expose().as_str())
            .chain(creds.security_token.as_ref().map(|t| t.expose().as_str()))
            .collect();
        let resp = self.transport.send(&req).map_err(|e| EcsError::Transport {
            action: action.to_string(),
            message: super::error::one_line(&e.message, &secrets),
            retriable: e.retriable,
        })?;
        if !(200..300).contains(&resp.status) {
            return Err(decode_error(action, resp.status, &resp.body, &secrets));
        }
        serde_json::from_str(&resp.body).map_err(|e| EcsError::Decode {
            action: action.to_string(),
            message: format!("not JSON (line {}, column {})", e.line(), e.column()),
        })
    }

    /// `DescribeRegions`.
    pub fn describe_regions(&self) -> Result<Vec<RegionInfo>, EcsError> {
        let v = self.call("DescribeRegions", &[])?;
        Ok(list(&v, &["Regions", "Region"]).iter().filter_map(parse_region).collect())
    }

    /// `DescribeZones` of the client's region.
    pub fn describe_zones(&self) -> Result<Vec<ZoneInfo>, EcsError> {
        let v = self.call("DescribeZones", &[])?;
        Ok(list(&v, &["Zones", "Zone"]).iter().filter_map(parse_zone).collect())
    }

    /// `DescribeInstanceTypes`, following `NextToken` to the end.
    pub fn describe_instance_types(&self, f: &InstanceTypeFilter) -> Result<Vec<InstanceTypeInfo>, EcsError> {
        let mut base = Params::default();
        base.opt("CpuArchitecture", f.arch.map(|a| a.ecs_name()))
            .opt("InstanceTypeFamily", f.family.clone())
            .opt("MinimumCpuCoreCount", f.min_cores.map(|x| x.to_string()))
            .opt("MaximumCpuCoreCount", f.max_cores.map(|x| x.to_string()))
            .opt("MinimumMemorySize", f.min_memory_gib.map(format_number))
            .opt("MaximumMemorySize", f.max_memory_gib.map(format_number))
            // At most 100 since November 2023 (Aliyun's `DescribeInstanceTypes` usage notes).
            .set("MaxResults", "100");
        for (i, t) in f.instance_types.iter().enumerate() {
            base.set(&format!("InstanceTypes.{}", i + 1), t.clone());
        }
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut p = Params(base.0.clone());
            p.opt("NextToken", token.clone());
            let v = self.call("DescribeInstanceTypes", &p.0)?;
            out.extend(list(&v, &["InstanceTypes", "InstanceType"]).iter().filter_map(parse_instance_type));
            match opt_str(&v, "NextToken") {
                Some(next) if Some(&next) != token.as_ref() => token = Some(next),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// `DescribeAvailableResource` for instance types (post-paid, with the spot strategy),
    /// flattened to one row per (zone, type), with the type's own status.
    pub fn describe_available_resource(
        &self,
        r: &AvailableResourceRequest,
    ) -> Result<Vec<ZoneResource>, EcsError> {
        let mut p = Params::default();
        p.set("DestinationResource", "InstanceType")
            .set("InstanceChargeType", "PostPaid")
            .set("SpotStrategy", r.spot_strategy.as_str())
            .set("ResourceType", "instance")
            .set("IoOptimized", "optimized")
            .opt("ZoneId", r.zone_id.clone())
            .opt("InstanceType", r.instance_type.clone())
            .opt("Cores", r.cores.map(|c| c.to_string()))
            .opt("Memory", r.memory_gib.map(format_number));
        let v = self.call("DescribeAvailableResource", &p.0)?;
        Ok(flatten_available_resource(&v))
    }

    /// `DescribeSpotPriceHistory` (VPC, I/O optimised, Linux), following `NextOffset`.
    pub fn describe_spot_price_history(
        &self,
        r: &SpotPriceHistoryRequest,
    ) -> Result<Vec<SpotPricePoint>, EcsError> {
        if r.instance_type.trim().is_empty() {
            return Err(EcsError::Config("`DescribeSpotPriceHistory` needs an instance type".to_string()));
        }
        let mut base = Params::default();
        base.set("NetworkType", "vpc")
            .set("IoOptimized", "optimized")
            .set("OSType", "linux")
            .set("InstanceType", r.instance_type.clone())
            .opt("ZoneId", r.zone_id.clone())
            .opt("StartTime", r.start_time.map(format_utc))
            .opt("EndTime", r.end_time.map(format_utc))
            .opt("SpotDuration", r.spot_duration.map(|d| d.to_string()));
        let mut out = Vec::new();
        let mut offset: Option<u64> = None;
        for _ in 0..MAX_PAGES {
            let mut p = Params(base.0.clone());
            p.opt("Offset", offset.map(|o| o.to_string()));
            let v = self.call("DescribeSpotPriceHistory", &p.0)?;
            let page = list(&v, &["SpotPrices", "SpotPriceType"]);
            out.extend(page.iter().filter_map(parse_spot_price));
            match opt_u64(&v, "NextOffset") {
                Some(next) if !page.is_empty() && next > offset.unwrap_or(0) => offset = Some(next),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    /// `RunInstances` of one instance; returns its id. With `dry_run`, `Ok(vec![])` when Aliyun
    /// answers `DryRunOperation` (the request would succeed). Retried per the policy, which is
    /// safe only because `client_token` is mandatory.
    pub fn run_instances(&self, r: &RunInstancesRequest) -> Result<Vec<String>, EcsError> {
        let params = run_instances_params(r)?;
        match self.call("RunInstances", &params) {
            Ok(v) => Ok(strings(&v, &["InstanceIdSets", "InstanceIdSet"], "")),
            Err(e) if r.dry_run && e.kind() == ErrorKind::DryRunOk => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// `DescribeInstances`, every page (more than 100 `instance_ids` are split into several
    /// requests). An empty `instance_ids` means no id filter.
    /// One instance by id; `None` when ECS no longer knows it.
    pub fn describe_instance(&self, id: &str) -> Result<Option<Instance>, EcsError> {
        let f = DescribeInstancesFilter { instance_ids: vec![id.to_string()], ..Default::default() };
        Ok(self.describe_instances(&f)?.into_iter().find(|i| i.id == id))
    }

    /// `DescribeInstances`, every page.
    pub fn describe_instances(&self, f: &DescribeInstancesFilter) -> Result<Vec<Instance>, EcsError> {
        if f.tags.len() > 20 {
            return Err(EcsError::Config(format!(
                "`DescribeInstances` takes at most 20 tags, got {}",
                f.tags.len()
            )));
        }
        let id_chunks: Vec<Option<&[String]>> = if f.instance_ids.is_empty() {
            vec![None]
        } else {
            f.instance_ids.chunks(PAGE_SIZE).map(Some).collect()
        };
        let mut out = Vec::new();
        for ids in id_chunks {
            let mut base = Params::default();
            base.opt("InstanceIds", ids.map(json_array))
                .tags(&f.tags)
                .opt("Status", f.status.clone())
                .opt("ZoneId", f.zone_id.clone())
                .opt("VpcId", f.vpc_id.clone())
                .set("PageSize", PAGE_SIZE.to_string());
            let mut seen = 0usize;
            for page in 1..=MAX_PAGES {
                let mut p = Params(base.0.clone());
                p.set("PageNumber", page.to_string());
                let v = self.call("DescribeInstances", &p.0)?;
                let items = list(&v, &["Instances", "Instance"]);
                for item in items {
                    out.push(parse_instance(item).ok_or_else(|| EcsError::Decode {
                        action: "DescribeInstances".to_string(),
                        message: "an instance without `InstanceId`".to_string(),
                    })?);
                }
                seen += items.len();
                let total = opt_u64(&v, "TotalCount").map(|t| t as usize);
                if items.is_empty()
                    || total.is_some_and(|t| seen >= t)
                    || (total.is_none() && items.len() < PAGE_SIZE)
                {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// `DescribeInstanceStatus` of `ids` (all instances of the region when empty), every page.
    pub fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<InstanceStatus>, EcsError> {
        let chunks: Vec<&[String]> = if ids.is_empty() { vec![&[]] } else { ids.chunks(PAGE_SIZE).collect() };
        let mut out = Vec::new();
        for chunk in chunks {
            let mut seen = 0usize;
            for page in 1..=MAX_PAGES {
                let mut p = Params::default();
                for (i, id) in chunk.iter().enumerate() {
                    p.set(&format!("InstanceId.{}", i + 1), id.clone());
                }
                p.set("PageSize", "50").set("PageNumber", page.to_string());
                let v = self.call("DescribeInstanceStatus", &p.0)?;
                let items = list(&v, &["InstanceStatuses", "InstanceStatus"]);
                out.extend(items.iter().filter_map(parse_instance_status));
                seen += items.len();
                let total = opt_u64(&v, "TotalCount").map(|t| t as usize);
                if items.is_empty() || total.is_none_or(|t| seen >= t) {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// `DeleteInstance`; an instance that does not exist (`InvalidInstanceId.NotFound`) is
    /// [`DeleteOutcome::AlreadyGone`], which is success for cleanup.
    pub fn delete_instance(&self, id: &str, force: bool) -> Result<DeleteOutcome, EcsError> {
        if id.trim().is_empty() {
            return Err(EcsError::Config("`DeleteInstance` needs an instance id".to_string()));
        }
        let mut p = Params::default();
        p.set("InstanceId", id).set("Force", force.to_string());
        match self.call("DeleteInstance", &p.0) {
            Ok(_) => Ok(DeleteOutcome::Deleted),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(DeleteOutcome::AlreadyGone),
            Err(e) => Err(e),
        }
    }

    /// `DeleteInstances` (100 per request). `Ok` means every listed instance is deleted or
    /// was already gone: when Aliyun answers `InvalidInstanceId.NotFound` for a batch, its
    /// instances are deleted one by one with [`EcsClient::delete_instance`].
    pub fn delete_instances(&self, ids: &[String], force: bool) -> Result<(), EcsError> {
        for chunk in ids.chunks(PAGE_SIZE) {
            let mut p = Params::default();
            for (i, id) in chunk.iter().enumerate() {
                p.set(&format!("InstanceId.{}", i + 1), id.clone());
            }
            p.set("Force", force.to_string());
            match self.call("DeleteInstances", &p.0) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    for id in chunk {
                        self.delete_instance(id, force)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `ImportKeyPair`.
    pub fn import_key_pair(&self, name: &str, public_key: &str) -> Result<KeyPairInfo, EcsError> {
        let mut p = Params::default();
        p.set("KeyPairName", name).set("PublicKeyBody", public_key.trim());
        let v = self.call("ImportKeyPair", &p.0)?;
        Ok(KeyPairInfo {
            name: opt_str(&v, "KeyPairName").unwrap_or_else(|| name.to_string()),
            fingerprint: opt_str(&v, "KeyPairFingerPrint"),
        })
    }

    /// `DeleteKeyPairs` (names sent as a JSON array).
    pub fn delete_key_pairs(&self, names: &[String]) -> Result<(), EcsError> {
        if names.is_empty() {
            return Ok(());
        }
        self.call("DeleteKeyPairs", &[("KeyPairNames".to_string(), json_array(names))])?;
        Ok(())
    }

    /// `DescribeImages` of the given ids (comma-separated `ImageId`), every page.
    pub fn describe_images(&self, image_ids: &[String]) -> Result<Vec<ImageInfo>, EcsError> {
        let mut out = Vec::new();
        let mut seen = 0usize;
        for page in 1..=MAX_PAGES {
            let mut p = Params::default();
            if !image_ids.is_empty() {
                p.set("ImageId", image_ids.join(","));
            }
            p.set("PageSize", "100").set("PageNumber", page.to_string());
            let v = self.call("DescribeImages", &p.0)?;
            let items = list(&v, &["Images", "Image"]);
            out.extend(items.iter().filter_map(parse_image));
            seen += items.len();
            let total = opt_u64(&v, "TotalCount").map(|t| t as usize);
            if items.is_empty() || total.is_none_or(|t| seen >= t) {
                break;
            }
        }
        Ok(out)
    }

    /// `DescribeSecurityGroups` of the given ids (JSON array `SecurityGroupIds`) and/or VPC,
    /// every page.
    pub fn describe_security_groups(
        &self,
        ids: &[String],
        vpc_id: Option<&str>,
    ) -> Result<Vec<SecurityGroupInfo>, EcsError> {
        let mut out = Vec::new();
        let mut seen = 0usize;
        for page in 1..=MAX_PAGES {
            let mut p = Params::default();
            if !ids.is_empty() {
                p.set("SecurityGroupIds", json_array(ids));
            }
            p.opt("VpcId", vpc_id).set("PageSize", "50").set("PageNumber", page.to_string());
            let v = self.call("DescribeSecurityGroups", &p.0)?;
            let items = list(&v, &["SecurityGroups", "SecurityGroup"]);
            out.extend(items.iter().filter_map(parse_security_group));
            seen += items.len();
            let total = opt_u64(&v, "TotalCount").map(|t| t as usize);
            if items.is_empty() || total.is_none_or(|t| seen >= t) {
                break;
            }
        }
        Ok(out)
    }
}

/// The parameters of `RunInstances`, checked (client token, tags, user data size).
pub fn run_instances_params(r: &RunInstancesRequest) -> Result<Vec<(String, String)>, EcsError> {
    let token = r.client_token.trim();
    if token.is_empty() {
        return Err(EcsError::Config(
            "`RunInstances` needs a `ClientToken`: without one a retried request could create a second instance"
                .to_string(),
        ));
    }
    if token.len() > 64 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(EcsError::Config(format!(
            "`RunInstances` `ClientToken` `{token}` must be at most 64 printable ASCII characters"
        )));
    }
    if r.tags.len() > 20 {
        return Err(EcsError::Config(format!("`RunInstances` takes at most 20 tags, got {}", r.tags.len())));
    }
    let mut p = Params::default();
    p.set("ZoneId", r.zone_id.clone())
        .set("InstanceType", r.instance_type.clone())
        .set("ImageId", r.image_id.clone())
        .set("SecurityGroupId", r.security_group_id.clone())
        .set("VSwitchId", r.vswitch_id.clone())
        .set("InstanceName", r.instance_name.clone())
        .opt("HostName", r.host_name.clone())
        .set("InstanceChargeType", "PostPaid")
        .set("SpotStrategy", r.spot_strategy.as_str());
    if r.spot_strategy == SpotStrategy::SpotWithPriceLimit {
        match r.spot_price_limit {
            Some(limit) if limit.is_finite() && limit > 0.0 => {
                p.set("SpotPriceLimit", format_price(limit));
            }
            other => {
                return Err(EcsError::Config(format!(
                "`RunInstances` with `SpotWithPriceLimit` needs a positive `SpotPriceLimit`, got {other:?}"
            )))
            }
        }
    }
    if r.spot_strategy != SpotStrategy::NoSpot {
        p.opt("SpotDuration", r.spot_duration.map(|d| d.to_string()))
            .set("SpotInterruptionBehavior", "Terminate");
    }
    p.set("InternetMaxBandwidthOut", r.internet_max_bandwidth_out.to_string());
    if r.internet_max_bandwidth_out > 0 {
        p.set("InternetChargeType", "PayByTraffic");
    }
    p.opt("SystemDisk.Category", r.system_disk_category.clone())
        .opt("SystemDisk.Size", r.system_disk_size.map(|s| s.to_string()))
        .opt("KeyPairName", r.key_pair_name.clone())
        .opt("RamRoleName", r.ram_role_name.clone());
    if let Some(ud) = &r.user_data {
        let encoded = base64::engine::general_purpose::STANDARD.encode(ud.expose().as_bytes());
        if encoded.len() > MAX_USER_DATA_BASE64 {
            return Err(EcsError::Config(format!(
                "`RunInstances` user data is {} bytes in base64, more than Aliyun's limit of {MAX_USER_DATA_BASE64}",
                encoded.len()
            )));
        }
        p.set("UserData", encoded);
    }
    p.tags(&r.tags)
        .opt("AutoReleaseTime", r.auto_release_time.map(format_utc))
        .set("Amount", "1")
        .set("ClientToken", token);
    if r.dry_run {
        p.set("DryRun", "true");
    }
    Ok(p.0)
}

#[cfg(test)]
mod tests {
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

    /// Percent-decodes a form value.
    pub(crate) fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else if b[i] == b'+' {
                out.push(b' ');
                i += 1;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    pub(crate) fn parse_form(body: &str) -> BTreeMap<String, String> {
        body.split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (decode(k), decode(v))
            })
            .collect()
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
                return Ok(h(&parse_form(req.body.as_deref().unwrap_or(""))));
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
        seen.lock().unwrap().iter().map(|r| parse_form(r.body.as_deref().unwrap_or(""))).collect()
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
        assert_eq!(req.url, "http://127.0.0.1:9470/");
        assert_eq!(req.header_value("content-type"), Some("application/x-www-form-urlencoded"));
        let p = parse_form(req.body.as_deref().unwrap());
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
    fn endpoint_rules() {
        let r = |e: Option<&str>| resolve_endpoint("cn-hangzhou", e).map_err(|e| e.to_string());
        assert_eq!(r(None).unwrap(), "https://ecs.cn-hangzhou.aliyuncs.com");
        assert_eq!(
            r(Some("https://ecs-vpc.cn-hangzhou.aliyuncs.com/")).unwrap(),
            "https://ecs-vpc.cn-hangzhou.aliyuncs.com"
        );
        for ok in [
            "http://127.0.0.1:9470",
            "http://127.3.4.5:1/",
            "http://localhost:9470",
            "http://[::1]:9470",
            "http://LOCALHOST",
        ] {
            assert!(r(Some(ok)).is_ok(), "{ok}");
        }
        assert_eq!(
            r(Some("http://ecs.cn-hangzhou.aliyuncs.com")).unwrap_err(),
            "endpoint `http://ecs.cn-hangzhou.aliyuncs.com` uses plain http: use https://, plain http is only allowed for loopback addresses such as the emulator"
        );
        for bad in [
            "http://10.0.0.1:9470",
            "http://127.0.0.1.evil.com",
            "http://localhost.evil.com",
            "http://[::2]:1",
        ] {
            assert!(r(Some(bad)).unwrap_err().contains("uses plain http"), "{bad}");
        }
        assert_eq!(
            r(Some("ecs.example.com")).unwrap_err(),
            "endpoint `ecs.example.com` has no scheme: use e.g. `https://ecs.cn-hangzhou.aliyuncs.com`"
        );
        assert!(r(Some("ftp://x")).unwrap_err().contains("has scheme `ftp`"));
        assert!(r(Some("https://user@host")).unwrap_err().contains("no valid host"));
    }

    #[test]
    fn region_ids_are_checked() {
        for ok in ["cn-hangzhou", "ap-southeast-1", "cn-shanghai-finance-1", "us-east-1"] {
            validate_region_id(ok).unwrap();
        }
        for bad in ["", "hangzhou", "cn_hangzhou", "CN-hangzhou", "cn-", "cn-hangzhou/../x", "c-x"] {
            let e = validate_region_id(bad).unwrap_err().to_string();
            assert_eq!(e, format!("invalid region id `{bad}`: expected a region id such as `cn-hangzhou` or `ap-southeast-1`"));
        }
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
        assert_eq!(
            c.run_instances(&r).unwrap_err().to_string(),
            "`RunInstances` takes at most 20 tags, got 21"
        );
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
            let page: usize = p["PageNumber"].parse().unwrap();
            let total = 230;
            let items: Vec<Value> = ((page - 1) * 100..(page * 100).min(total))
                .map(|i| json!({"InstanceId": format!("i-{i}"), "Status": "Running", "Cpu": 8, "Memory": 8192}))
                .collect();
            ok(
                json!({"Instances": {"Instance": items}, "TotalCount": total, "PageNumber": page, "PageSize": 100}),
            )
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
        assert_eq!(fs.iter().map(|p| p["PageNumber"].as_str()).collect::<Vec<_>>(), vec!["1", "2", "3"]);
        assert_eq!(fs[0]["PageSize"], "100");
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
        assert_eq!(fs[0]["MaxResults"], "100");
        assert_eq!(fs[1]["NextToken"], "t2");
    }

    #[test]
    fn spot_price_history_follows_next_offset() {
        let (c, seen) = handler_client(|p| {
            let offset: u64 = p.get("Offset").map(|o| o.parse().unwrap()).unwrap_or(0);
            let item = json!({"ZoneId": "cn-hangzhou-b", "InstanceType": "ecs.c7.large", "SpotPrice": 0.05 + offset as f64 / 100.0,
                              "OriginPrice": 0.4, "Timestamp": "2025-01-01T00:00:00Z", "NetworkType": "vpc", "IoOptimized": "optimized"});
            if offset < 2 {
                ok(
                    json!({"SpotPrices": {"SpotPriceType": [item]}, "NextOffset": offset + 1, "Currency": "CNY"}),
                )
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
        assert_eq!(c.describe_spot_price_history(&r).unwrap().len(), 3);
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
        let ours: Vec<&String> =
            lines.iter().filter(|l| l.contains("ECS `DescribeRegions` attempt")).collect();
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
}
