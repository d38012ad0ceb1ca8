//! [`EcsClient`]: signed, retried ECS RPC calls and the typed actions built on them.
//!
//! Why hand-written rather than an SDK: there is no maintained blocking Rust SDK for ECS, and
//! the executor needs a dozen actions, a documented retry policy, typed errors and the
//! guarantee that no secret ever reaches an error or a log line — easier to prove on a few
//! hundred lines of our own.
//!
//! Each call is a `POST /?<common parameters>` with the action's parameters in an
//! `application/x-www-form-urlencoded` body, as Aliyun's legacy SDK lays out an RPC POST: the
//! common parameters (`Action`, `Version=2014-05-26`, `Format=JSON`, `AccessKeyId`,
//! `SignatureMethod=HMAC-SHA1`, `SignatureVersion=1.0`, `SignatureNonce`, `Timestamp`,
//! `RegionId`, `SecurityToken` with STS credentials) and the `Signature` in the query, one
//! signature over query and body together ([`super::sign::sign_split`], which cites the SDK).
//! Every attempt is signed afresh, with a new nonce and timestamp.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use time::OffsetDateTime;

use super::endpoint::{resolve_endpoint, validate_region_id};
use super::error::{decode_error, EcsError, ErrorKind};
use super::paging::{each_page, Paging};
use super::retry::RetryPolicy;
use super::sign;
use super::transport::{HttpRequest, Transport, UreqTransport};
use super::types::*;
use crate::credentials::CredentialsProvider;

/// The ECS API version.
pub const API_VERSION: &str = "2014-05-26";

/// `DescribeInstances` page size and ids per request (the API's maximum: "Maximum value: 100",
/// `MaxResults` in `_describe_instances_request.py`).
const PAGE_SIZE: usize = 100;

/// `DescribeInstanceTypes` page size: the API's maximum ("Maximum value: 1600. Default value:
/// 1600", `MaxResults` in `_describe_instance_types_request.py`).
const INSTANCE_TYPES_PAGE: usize = 1600;

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

/// The signed request of one attempt (common parameters over `params`), split into query and
/// body. Pure: the time, nonce and credentials are arguments.
pub fn signed_params(
    version: &str,
    action: &str,
    params: &[(String, String)],
    region_id: &str,
    creds: &crate::credentials::Credentials,
    timestamp: OffsetDateTime,
    nonce: &str,
) -> sign::SignedRpc {
    let mut p: BTreeMap<String, String> = params.iter().cloned().collect();
    let common = [
        ("Action", action.to_string()),
        ("Version", version.to_string()),
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
    p.remove("SecurityToken");
    if let Some(token) = &creds.security_token {
        p.insert("SecurityToken".to_string(), token.expose().clone());
    }
    sign::sign_split("POST", &p, creds.access_key_secret.expose())
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
        self.call_api(API_VERSION, action, params)
    }

    /// [`EcsClient::call`] for another RPC product's API `version` at this client's endpoint
    /// (STS `2015-04-01` signs and answers the same way: [`crate::sts`]).
    pub fn call_api(
        &self,
        version: &str,
        action: &str,
        params: &[(String, String)],
    ) -> Result<Value, EcsError> {
        let answer = self.retry.run(action, |_attempt| self.call_once(version, action, params))?;
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
    fn call_once(&self, version: &str, action: &str, params: &[(String, String)]) -> Result<Value, EcsError> {
        let creds = self
            .creds
            .credentials()
            .map_err(|e| EcsError::Credentials { action: action.to_string(), message: format!("{e:#}") })?;
        let signed = signed_params(
            version,
            action,
            params,
            &self.region_id,
            &creds,
            self.stamp.timestamp(),
            &self.stamp.nonce(),
        );
        let mut req = HttpRequest::new("POST", format!("{}/?{}", self.endpoint, signed.query_string()))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json");
        req.body = Some(signed.form_body());
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
            .opt("MaximumMemorySize", f.max_memory_gib.map(format_number));
        for (i, t) in f.instance_types.iter().enumerate() {
            base.set(&format!("InstanceTypes.{}", i + 1), t.clone());
        }
        let mut out = Vec::new();
        each_page(
            Paging::Token { max_results: INSTANCE_TYPES_PAGE },
            &base.0,
            |p| self.call("DescribeInstanceTypes", p),
            |v| {
                let items = list(v, &["InstanceTypes", "InstanceType"]);
                out.extend(items.iter().filter_map(parse_instance_type));
                Ok(items.len())
            },
        )?;
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
            .opt("Memory", r.memory_gib.map(format_number))
            .opt("SpotDuration", r.spot_duration.map(|d| d.to_string()));
        let v = self.call("DescribeAvailableResource", &p.0)?;
        Ok(flatten_available_resource(&v))
    }

    /// `DescribeSpotPriceHistory` (VPC, I/O optimised, Linux), following `NextOffset`, with the
    /// answer's `Currency`.
    pub fn describe_spot_price_history(
        &self,
        r: &SpotPriceHistoryRequest,
    ) -> Result<SpotPriceHistory, EcsError> {
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
        let mut out = SpotPriceHistory { points: Vec::new(), currency: None };
        each_page(
            Paging::Offset,
            &base.0,
            |p| self.call("DescribeSpotPriceHistory", p),
            |v| {
                let page = list(v, &["SpotPrices", "SpotPriceType"]);
                out.points.extend(page.iter().filter_map(parse_spot_price));
                out.currency = out.currency.take().or_else(|| opt_str(v, "Currency"));
                Ok(page.len())
            },
        )?;
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

    /// One instance by id; `None` when ECS no longer knows it.
    pub fn describe_instance(&self, id: &str) -> Result<Option<Instance>, EcsError> {
        let f = DescribeInstancesFilter { instance_ids: vec![id.to_string()], ..Default::default() };
        Ok(self.describe_instances(&f)?.into_iter().find(|i| i.id == id))
    }

    /// `DescribeInstances`, every page, with `NextToken` (more than 100 `instance_ids` are split
    /// into several requests; an empty `instance_ids` means no id filter).
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
                .opt("VpcId", f.vpc_id.clone());
            each_page(
                Paging::Token { max_results: PAGE_SIZE },
                &base.0,
                |p| self.call("DescribeInstances", p),
                |v| {
                    let items = list(v, &["Instances", "Instance"]);
                    for item in items {
                        out.push(parse_instance(item).ok_or_else(|| EcsError::Decode {
                            action: "DescribeInstances".to_string(),
                            message: "an instance without `InstanceId`".to_string(),
                        })?);
                    }
                    Ok(items.len())
                },
            )?;
        }
        Ok(out)
    }

    /// `DescribeInstanceStatus` of `ids` (all instances of the region when empty), every page.
    pub fn describe_instance_status(&self, ids: &[String]) -> Result<Vec<InstanceStatus>, EcsError> {
        let chunks: Vec<&[String]> = if ids.is_empty() { vec![&[]] } else { ids.chunks(PAGE_SIZE).collect() };
        let mut out = Vec::new();
        for chunk in chunks {
            let mut base = Params::default();
            for (i, id) in chunk.iter().enumerate() {
                base.set(&format!("InstanceId.{}", i + 1), id.clone());
            }
            each_page(
                Paging::Number { page_size: 50 },
                &base.0,
                |p| self.call("DescribeInstanceStatus", p),
                |v| {
                    let items = list(v, &["InstanceStatuses", "InstanceStatus"]);
                    out.extend(items.iter().filter_map(parse_instance_status));
                    Ok(items.len())
                },
            )?;
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
        let mut base = Params::default();
        if !image_ids.is_empty() {
            base.set("ImageId", image_ids.join(","));
        }
        let mut out = Vec::new();
        each_page(
            Paging::Number { page_size: 100 },
            &base.0,
            |p| self.call("DescribeImages", p),
            |v| {
                let items = list(v, &["Images", "Image"]);
                out.extend(items.iter().filter_map(parse_image));
                Ok(items.len())
            },
        )?;
        Ok(out)
    }

    /// `DescribeSecurityGroups` of the given ids (JSON array `SecurityGroupIds`) and/or VPC,
    /// every page.
    pub fn describe_security_groups(
        &self,
        ids: &[String],
        vpc_id: Option<&str>,
    ) -> Result<Vec<SecurityGroupInfo>, EcsError> {
        let mut base = Params::default();
        if !ids.is_empty() {
            base.set("SecurityGroupIds", json_array(ids));
        }
        base.opt("VpcId", vpc_id);
        let mut out = Vec::new();
        each_page(
            Paging::Number { page_size: 50 },
            &base.0,
            |p| self.call("DescribeSecurityGroups", p),
            |v| {
                let items = list(v, &["SecurityGroups", "SecurityGroup"]);
                out.extend(items.iter().filter_map(parse_security_group));
                Ok(items.len())
            },
        )?;
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
                let text = format_price(limit);
                if !crate::pricing::has_at_most_limit_decimals(&text) {
                    return Err(EcsError::Config(format!(
                        "`RunInstances` `SpotPriceLimit` {text} has more than {} decimals, which Aliyun refuses",
                        crate::pricing::LIMIT_DECIMALS
                    )));
                }
                p.set("SpotPriceLimit", text);
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
#[path = "client_tests.rs"]
mod tests;
