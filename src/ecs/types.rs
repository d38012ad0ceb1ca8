//! Typed requests and answers of the ECS actions the executor uses.
//!
//! Why typed: the rest of the program should not spell `Tag.3.Key` or dig through
//! `AvailableZones.AvailableZone[].AvailableResources...`; those details live here, next to
//! the parameter names copied from Aliyun's SDK request classes
//! (`aliyunsdkecs/request/v20140526/*.py`) and the answer shapes of the current SDK's response
//! models (`alibabacloud_ecs20140526/models/_<action>_response_body.py`); docs/aliyun.md.
//!
//! Answers are parsed leniently — a missing optional field is `None` or empty, numbers may come
//! as JSON numbers or strings — but a missing identifier (an instance without `InstanceId`) is
//! a decoding error, because acting on half an answer is worse than failing.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

use crate::arch::Arch;
use crate::secret::Secret;

/// `SpotStrategy` of `RunInstances` and `DescribeAvailableResource`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SpotStrategy {
    /// An ordinary pay-as-you-go instance; never read from the configuration (`spot.strategy`),
    /// which chooses between the two spot strategies.
    #[serde(skip_deserializing)]
    NoSpot,
    /// A spot instance with a maximum hourly price (`SpotPriceLimit`).
    SpotWithPriceLimit,
    /// A spot instance that pays the market price, up to the on-demand price.
    SpotAsPriceGo,
}

impl SpotStrategy {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SpotStrategy::NoSpot => "NoSpot",
            SpotStrategy::SpotWithPriceLimit => "SpotWithPriceLimit",
            SpotStrategy::SpotAsPriceGo => "SpotAsPriceGo",
        }
    }
}

impl fmt::Display for SpotStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SpotStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "NoSpot" => Ok(SpotStrategy::NoSpot),
            "SpotWithPriceLimit" => Ok(SpotStrategy::SpotWithPriceLimit),
            "SpotAsPriceGo" => Ok(SpotStrategy::SpotAsPriceGo),
            other => Err(format!(
                "unknown spot strategy `{other}`: use `SpotWithPriceLimit`, `SpotAsPriceGo` or `NoSpot`"
            )),
        }
    }
}

/// A region (`DescribeRegions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionInfo {
    /// `cn-hangzhou`.
    pub region_id: String,
    /// Display name.
    pub local_name: String,
    /// The region's API endpoint host, when given.
    pub endpoint: Option<String>,
}

/// A zone (`DescribeZones`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneInfo {
    /// `cn-hangzhou-b`.
    pub zone_id: String,
    /// Display name.
    pub local_name: String,
    /// `AvailableResourceCreation.ResourceTypes[]` (`Instance`, `Disk`, ...).
    pub available_resource_creation: Vec<String>,
    /// `AvailableInstanceTypes.InstanceTypes[]`.
    pub available_instance_types: Vec<String>,
}

/// Filters of `DescribeInstanceTypes` (memory in GiB).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceTypeFilter {
    /// `CpuArchitecture`.
    pub arch: Option<Arch>,
    /// `InstanceTypeFamily` (one family).
    pub family: Option<String>,
    /// `MinimumCpuCoreCount`.
    pub min_cores: Option<u32>,
    /// `MaximumCpuCoreCount`.
    pub max_cores: Option<u32>,
    /// `MinimumMemorySize` (GiB).
    pub min_memory_gib: Option<f64>,
    /// `MaximumMemorySize` (GiB).
    pub max_memory_gib: Option<f64>,
    /// `InstanceTypes.N` (at most 10 per request on Aliyun's side).
    pub instance_types: Vec<String>,
}

/// An instance type (`DescribeInstanceTypes`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceTypeInfo {
    /// `ecs.c7.2xlarge`.
    pub id: String,
    /// `ecs.c7`.
    pub family: String,
    /// vCPUs.
    pub cores: u32,
    /// GiB.
    pub memory_gib: f64,
    /// `X86` or `ARM`, as the API spells `CpuArchitecture`.
    pub arch: String,
    /// `GPUAmount`.
    pub gpu_amount: u32,
    /// `GPUSpec` (empty for types without a GPU).
    pub gpu_spec: String,
    /// `InstanceFamilyLevel`: `EntryLevel` (shared), `EnterpriseLevel` or `CreditEntryLevel`
    /// (burstable), per the `DescribeInstanceTypes` request model of the current SDK
    /// (`_describe_instance_types_request.py`, `instance_family_level`); empty when not given.
    pub family_level: String,
}

/// `DescribeAvailableResource` with `DestinationResource=InstanceType`,
/// `InstanceChargeType=PostPaid`, `ResourceType=instance`.
#[derive(Debug, Clone, PartialEq)]
pub struct AvailableResourceRequest {
    /// `SpotStrategy`.
    pub spot_strategy: SpotStrategy,
    /// `ZoneId` (all zones when `None`).
    pub zone_id: Option<String>,
    /// `InstanceType`.
    pub instance_type: Option<String>,
    /// `Cores`.
    pub cores: Option<u32>,
    /// `Memory` (GiB).
    pub memory_gib: Option<f64>,
    /// `SpotDuration` (protection hours; ECS's default is 1).
    pub spot_duration: Option<u32>,
}

impl Default for AvailableResourceRequest {
    fn default() -> Self {
        AvailableResourceRequest {
            spot_strategy: SpotStrategy::SpotAsPriceGo,
            zone_id: None,
            instance_type: None,
            cores: None,
            memory_gib: None,
            spot_duration: None,
        }
    }
}

/// One (zone, instance type) of `DescribeAvailableResource`, read at the inner level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZoneResource {
    /// Zone.
    pub zone_id: String,
    /// The instance type (`SupportedResource.Value`).
    pub instance_type: String,
    /// The type's `Status` in that zone: `Available` or `SoldOut`.
    pub status: String,
    /// The type's `StatusCategory`: `WithStock`, `ClosedWithStock`, `WithoutStock`, ...
    /// `None` when the answer leaves it out: the current SDK's response model
    /// (`_describe_available_resource_response_body.py`, `SupportedResource.status_category`)
    /// declares it an optional string, so its absence says nothing and `Status` decides (see
    /// [`crate::selection::ZoneStock::from_ecs`]).
    pub status_category: Option<String>,
}

/// `DescribeSpotPriceHistory` (`NetworkType=vpc`, `IoOptimized=optimized`, `OSType=linux`).
#[derive(Debug, Clone, PartialEq)]
pub struct SpotPriceHistoryRequest {
    /// `InstanceType` (required by the API).
    pub instance_type: String,
    /// `ZoneId` (all zones when `None`).
    pub zone_id: Option<String>,
    /// `StartTime` (the API's default is three hours back).
    pub start_time: Option<OffsetDateTime>,
    /// `EndTime`.
    pub end_time: Option<OffsetDateTime>,
    /// `SpotDuration` (protection hours).
    pub spot_duration: Option<u32>,
}

/// One spot price observation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpotPricePoint {
    /// Zone.
    pub zone_id: String,
    /// Instance type.
    pub instance_type: String,
    /// Per hour, in the answer's currency.
    pub spot_price: f64,
    /// The on-demand price per hour, when given.
    pub origin_price: Option<f64>,
    /// When this price took effect.
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
}

/// A `DescribeSpotPriceHistory` answer, every page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpotPriceHistory {
    /// The observations.
    pub points: Vec<SpotPricePoint>,
    /// `Currency` (`CNY` on the China site, `USD` on the international one), when given.
    pub currency: Option<String>,
}

/// `RunInstances` (one pay-as-you-go instance, `Amount=1`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunInstancesRequest {
    /// `ZoneId`.
    pub zone_id: String,
    /// `InstanceType`.
    pub instance_type: String,
    /// `ImageId`.
    pub image_id: String,
    /// `SecurityGroupId`.
    pub security_group_id: String,
    /// `VSwitchId`.
    pub vswitch_id: String,
    /// `InstanceName`.
    pub instance_name: String,
    /// `HostName`.
    pub host_name: Option<String>,
    /// `SpotStrategy`.
    pub spot_strategy: SpotStrategy,
    /// `SpotPriceLimit` (per hour, in the account's currency, at most three decimals), for
    /// `SpotWithPriceLimit`.
    pub spot_price_limit: Option<f64>,
    /// `SpotDuration` (0 = no protection period, 1 = one hour).
    pub spot_duration: Option<u32>,
    /// `InternetMaxBandwidthOut` (Mbit/s; > 0 gives a public IP, billed `PayByTraffic`).
    pub internet_max_bandwidth_out: u32,
    /// `SystemDisk.Category`.
    pub system_disk_category: Option<String>,
    /// `SystemDisk.Size` (GiB).
    pub system_disk_size: Option<u32>,
    /// `KeyPairName`.
    pub key_pair_name: Option<String>,
    /// `RamRoleName`.
    pub ram_role_name: Option<String>,
    /// The user data in plain text (it holds the host's private key, hence a secret); the
    /// client base64-encodes it. At most 32 KiB encoded.
    pub user_data: Option<Secret<String>>,
    /// `Tag.N.Key`/`Tag.N.Value`, at most 20.
    pub tags: Vec<(String, String)>,
    /// `AutoReleaseTime` (UTC, whole seconds).
    pub auto_release_time: Option<OffsetDateTime>,
    /// `ClientToken`: mandatory (it is what makes retrying safe), at most 64 ASCII characters.
    pub client_token: String,
    /// `DryRun`.
    pub dry_run: bool,
}

/// `DescribeInstances` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribeInstancesFilter {
    /// `InstanceIds` (sent as a JSON array; more than 100 are split into several requests).
    pub instance_ids: Vec<String>,
    /// `Tag.N.Key`/`Tag.N.Value` (at most 20).
    pub tags: Vec<(String, String)>,
    /// `Status`.
    pub status: Option<String>,
    /// `ZoneId`.
    pub zone_id: Option<String>,
    /// `VpcId`.
    pub vpc_id: Option<String>,
}

/// An instance (`DescribeInstances`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    /// `i-...`.
    pub id: String,
    /// `InstanceName`.
    pub name: String,
    /// `InstanceType`.
    pub instance_type: String,
    /// `ZoneId`.
    pub zone_id: String,
    /// `RegionId`.
    pub region_id: String,
    /// `Pending`, `Starting`, `Running`, `Stopping`, `Stopped`.
    pub status: String,
    /// vCPUs.
    pub cpu: u32,
    /// MiB.
    pub memory_mib: u64,
    /// `CreationTime`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub creation_time: Option<OffsetDateTime>,
    /// `StartTime`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub start_time: Option<OffsetDateTime>,
    /// `AutoReleaseTime`.
    #[serde(with = "time::serde::rfc3339::option")]
    pub auto_release_time: Option<OffsetDateTime>,
    /// `SpotStrategy` as the API spells it.
    pub spot_strategy: Option<String>,
    /// `SpotPriceLimit`.
    pub spot_price_limit: Option<f64>,
    /// `PublicIpAddress.IpAddress[]`.
    pub public_ips: Vec<String>,
    /// `VpcAttributes.PrivateIpAddress.IpAddress[]` (and `InnerIpAddress` for classic).
    pub private_ips: Vec<String>,
    /// `EipAddress.IpAddress`.
    pub eip: Option<String>,
    /// `Tags.Tag[]`.
    pub tags: BTreeMap<String, String>,
    /// `OperationLocks.LockReason[].LockReason` (`Recycling` for a reclaimed spot instance).
    pub operation_locks: Vec<String>,
    /// `KeyPairName`.
    pub key_pair_name: Option<String>,
    /// `ImageId`.
    pub image_id: String,
    /// `VpcAttributes.VSwitchId`.
    pub vswitch_id: Option<String>,
}

/// `DescribeInstanceStatus` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceStatus {
    /// Instance id.
    pub instance_id: String,
    /// Status.
    pub status: String,
}

/// What `DeleteInstance` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The instance was deleted by this call.
    Deleted,
    /// It did not exist (any more): `InvalidInstanceId.NotFound`.
    AlreadyGone,
}

/// An imported key pair (`ImportKeyPair`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyPairInfo {
    /// `KeyPairName`.
    pub name: String,
    /// `KeyPairFingerPrint`.
    pub fingerprint: Option<String>,
}

/// An image (`DescribeImages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// `ImageId`.
    pub image_id: String,
    /// `ImageName`.
    pub image_name: Option<String>,
    /// `Architecture`: `x86_64` or `arm64`.
    pub architecture: Option<String>,
    /// `OSType`: `linux` or `windows`.
    pub os_type: Option<String>,
    /// `Status`: `Available`, ...
    pub status: Option<String>,
}

/// A security group (`DescribeSecurityGroups`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityGroupInfo {
    /// `SecurityGroupId`.
    pub security_group_id: String,
    /// `SecurityGroupName`.
    pub name: Option<String>,
    /// `VpcId`.
    pub vpc_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Formatting of request values.

/// `yyyy-MM-ddTHH:mm:ssZ` in UTC (subseconds dropped), as `Timestamp`, `AutoReleaseTime`,
/// `StartTime` and `EndTime` want it.
pub fn format_utc(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A price without float noise: rounded to 6 decimals, trailing zeros dropped
/// (`0.1 * 1.2` → `0.12`, `1.0` → `1`).
pub fn format_price(p: f64) -> String {
    let s = format!("{:.6}", p);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// A GiB amount for `MinimumMemorySize` and friends (`8` rather than `8.000000`).
pub(crate) fn format_number(x: f64) -> String {
    format_price(x)
}

// ---------------------------------------------------------------------------------------------
// Lenient reading of answers.

/// `v[a][b]...` or `Value::Null`.
pub(crate) fn path<'a>(v: &'a Value, keys: &[&str]) -> &'a Value {
    let mut cur = v;
    for k in keys {
        cur = cur.get(k).unwrap_or(&Value::Null);
    }
    cur
}

/// The array at `keys` (empty when missing or not an array).
pub(crate) fn list<'a>(v: &'a Value, keys: &[&str]) -> &'a [Value] {
    path(v, keys).as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A string field; numbers are turned into strings; empty strings are `None`.
pub(crate) fn opt_str(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A string field, empty when missing.
pub(crate) fn str_or_empty(v: &Value, key: &str) -> String {
    opt_str(v, key).unwrap_or_default()
}

/// A number field given as a number or a numeric string.
pub(crate) fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A non-negative integer field given as a number or a numeric string.
pub(crate) fn opt_u64(v: &Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A time field: RFC 3339 (`2024-01-02T03:04:05Z`) or Aliyun's minute form (`2024-01-02T03:04Z`).
pub(crate) fn opt_time(v: &Value, key: &str) -> Option<OffsetDateTime> {
    opt_str(v, key).and_then(|s| parse_time(&s))
}

/// Parses RFC 3339 or `yyyy-MM-ddTHH:mmZ`.
pub fn parse_time(s: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    PrimitiveDateTime::parse(s, format_description!("[year]-[month]-[day]T[hour]:[minute]Z"))
        .ok()
        .map(PrimitiveDateTime::assume_utc)
}

/// Strings at `keys`, whether given as an array of strings or of `{ field: "..." }` objects.
pub(crate) fn strings(v: &Value, keys: &[&str], field: &str) -> Vec<String> {
    list(v, keys)
        .iter()
        .filter_map(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Object(_) => opt_str(x, field),
            _ => None,
        })
        .collect()
}

pub(crate) fn parse_region(v: &Value) -> Option<RegionInfo> {
    Some(RegionInfo {
        region_id: opt_str(v, "RegionId")?,
        local_name: str_or_empty(v, "LocalName"),
        endpoint: opt_str(v, "RegionEndpoint"),
    })
}

pub(crate) fn parse_zone(v: &Value) -> Option<ZoneInfo> {
    Some(ZoneInfo {
        zone_id: opt_str(v, "ZoneId")?,
        local_name: str_or_empty(v, "LocalName"),
        available_resource_creation: strings(v, &["AvailableResourceCreation", "ResourceTypes"], ""),
        available_instance_types: strings(v, &["AvailableInstanceTypes", "InstanceTypes"], ""),
    })
}

pub(crate) fn parse_instance_type(v: &Value) -> Option<InstanceTypeInfo> {
    let id = opt_str(v, "InstanceTypeId")?;
    let family = opt_str(v, "InstanceTypeFamily").unwrap_or_else(|| {
        // `ecs.c7.2xlarge` → `ecs.c7`
        id.rsplit_once('.').map(|(f, _)| f.to_string()).unwrap_or_default()
    });
    Some(InstanceTypeInfo {
        family,
        cores: opt_u64(v, "CpuCoreCount").unwrap_or(0) as u32,
        memory_gib: opt_f64(v, "MemorySize").unwrap_or(0.0),
        arch: str_or_empty(v, "CpuArchitecture"),
        gpu_amount: opt_u64(v, "GPUAmount").unwrap_or(0) as u32,
        gpu_spec: str_or_empty(v, "GPUSpec"),
        family_level: str_or_empty(v, "InstanceFamilyLevel"),
        id,
    })
}

/// Flattens `AvailableZones.AvailableZone[].AvailableResources.AvailableResource[]
/// .SupportedResources.SupportedResource[]`, keeping the inner `Status`/`StatusCategory`.
pub(crate) fn flatten_available_resource(v: &Value) -> Vec<ZoneResource> {
    let mut out = Vec::new();
    for zone in list(v, &["AvailableZones", "AvailableZone"]) {
        let Some(zone_id) = opt_str(zone, "ZoneId") else { continue };
        for res in list(zone, &["AvailableResources", "AvailableResource"]) {
            if let Some(t) = opt_str(res, "Type") {
                if t != "InstanceType" {
                    continue;
                }
            }
            for sup in list(res, &["SupportedResources", "SupportedResource"]) {
                let Some(instance_type) = opt_str(sup, "Value") else { continue };
                out.push(ZoneResource {
                    zone_id: zone_id.clone(),
                    instance_type,
                    status: str_or_empty(sup, "Status"),
                    status_category: opt_str(sup, "StatusCategory"),
                });
            }
        }
    }
    out
}

pub(crate) fn parse_spot_price(v: &Value) -> Option<SpotPricePoint> {
    Some(SpotPricePoint {
        zone_id: opt_str(v, "ZoneId")?,
        instance_type: opt_str(v, "InstanceType")?,
        spot_price: opt_f64(v, "SpotPrice")?,
        origin_price: opt_f64(v, "OriginPrice"),
        timestamp: opt_time(v, "Timestamp")?,
    })
}

pub(crate) fn parse_instance(v: &Value) -> Option<Instance> {
    let mut private_ips = strings(v, &["VpcAttributes", "PrivateIpAddress", "IpAddress"], "");
    for ip in strings(v, &["InnerIpAddress", "IpAddress"], "") {
        if !private_ips.contains(&ip) {
            private_ips.push(ip);
        }
    }
    let tags = list(v, &["Tags", "Tag"])
        .iter()
        .filter_map(|t| {
            let k = opt_str(t, "TagKey").or_else(|| opt_str(t, "Key"))?;
            let val = opt_str(t, "TagValue").or_else(|| opt_str(t, "Value")).unwrap_or_default();
            Some((k, val))
        })
        .collect();
    Some(Instance {
        id: opt_str(v, "InstanceId")?,
        name: str_or_empty(v, "InstanceName"),
        instance_type: str_or_empty(v, "InstanceType"),
        zone_id: str_or_empty(v, "ZoneId"),
        region_id: str_or_empty(v, "RegionId"),
        status: str_or_empty(v, "Status"),
        cpu: opt_u64(v, "Cpu").unwrap_or(0) as u32,
        memory_mib: opt_u64(v, "Memory").unwrap_or(0),
        creation_time: opt_time(v, "CreationTime"),
        start_time: opt_time(v, "StartTime"),
        auto_release_time: opt_time(v, "AutoReleaseTime"),
        spot_strategy: opt_str(v, "SpotStrategy"),
        spot_price_limit: opt_f64(v, "SpotPriceLimit"),
        public_ips: strings(v, &["PublicIpAddress", "IpAddress"], ""),
        private_ips,
        eip: opt_str(path(v, &["EipAddress"]), "IpAddress"),
        tags,
        operation_locks: strings(v, &["OperationLocks", "LockReason"], "LockReason"),
        key_pair_name: opt_str(v, "KeyPairName"),
        image_id: str_or_empty(v, "ImageId"),
        vswitch_id: opt_str(path(v, &["VpcAttributes"]), "VSwitchId"),
    })
}

pub(crate) fn parse_instance_status(v: &Value) -> Option<InstanceStatus> {
    Some(InstanceStatus { instance_id: opt_str(v, "InstanceId")?, status: str_or_empty(v, "Status") })
}

pub(crate) fn parse_image(v: &Value) -> Option<ImageInfo> {
    Some(ImageInfo {
        image_id: opt_str(v, "ImageId")?,
        image_name: opt_str(v, "ImageName"),
        architecture: opt_str(v, "Architecture"),
        os_type: opt_str(v, "OSType"),
        status: opt_str(v, "Status"),
    })
}

pub(crate) fn parse_security_group(v: &Value) -> Option<SecurityGroupInfo> {
    Some(SecurityGroupInfo {
        security_group_id: opt_str(v, "SecurityGroupId")?,
        name: opt_str(v, "SecurityGroupName"),
        vpc_id: opt_str(v, "VpcId"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn prices_are_formatted_without_float_noise() {
        assert_eq!(format_price(0.1 * 1.2), "0.12");
        assert_eq!(format_price(0.0512 * 1.2), "0.06144");
        assert_eq!(format_price(1.0), "1");
        assert_eq!(format_price(0.0), "0");
        assert_eq!(format_price(12.5), "12.5");
        assert_eq!(format_number(8.0), "8");
    }

    #[test]
    fn times_are_utc_whole_seconds() {
        assert_eq!(format_utc(datetime!(2025-03-04 05:06:07.89 +08:00)), "2025-03-03T21:06:07Z");
        assert_eq!(parse_time("2025-03-04T05:06Z"), Some(datetime!(2025-03-04 05:06 UTC)));
        assert_eq!(parse_time("2025-03-04T05:06:07Z"), Some(datetime!(2025-03-04 05:06:07 UTC)));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn instance_is_parsed_leniently_but_typed() {
        let v = json!({
            "InstanceId": "i-1", "InstanceName": "ci", "InstanceType": "ecs.c7.large", "ZoneId": "cn-hangzhou-b",
            "RegionId": "cn-hangzhou", "Status": "Running", "Cpu": 2, "Memory": "4096",
            "CreationTime": "2025-01-01T10:00Z", "AutoReleaseTime": "2025-01-01T12:00:00Z",
            "SpotStrategy": "SpotWithPriceLimit", "SpotPriceLimit": 0.12,
            "PublicIpAddress": {"IpAddress": ["127.0.1.2"]},
            "VpcAttributes": {"PrivateIpAddress": {"IpAddress": ["172.16.0.5"]}, "VSwitchId": "vsw-1"},
            "EipAddress": {"IpAddress": ""},
            "Tags": {"Tag": [{"TagKey": "a", "TagValue": "1"}, {"TagKey": "b"}]},
            "OperationLocks": {"LockReason": [{"LockReason": "Recycling"}]},
            "ImageId": "img"
        });
        let i = parse_instance(&v).unwrap();
        assert_eq!(i.id, "i-1");
        assert_eq!(i.cpu, 2);
        assert_eq!(i.memory_mib, 4096);
        assert_eq!(i.creation_time, Some(datetime!(2025-01-01 10:00 UTC)));
        assert_eq!(i.auto_release_time, Some(datetime!(2025-01-01 12:00 UTC)));
        assert_eq!(i.start_time, None);
        assert_eq!(i.spot_price_limit, Some(0.12));
        assert_eq!(i.public_ips, vec!["127.0.1.2"]);
        assert_eq!(i.private_ips, vec!["172.16.0.5"]);
        assert_eq!(i.eip, None);
        assert_eq!(i.tags.get("a").map(String::as_str), Some("1"));
        assert_eq!(i.tags.get("b").map(String::as_str), Some(""));
        assert_eq!(i.operation_locks, vec!["Recycling"]);
        assert_eq!(i.vswitch_id.as_deref(), Some("vsw-1"));
        assert_eq!(i.key_pair_name, None);
        assert!(parse_instance(&json!({"InstanceName": "no id"})).is_none());
    }

    #[test]
    fn available_resource_reads_the_inner_status() {
        let v = json!({"AvailableZones": {"AvailableZone": [
            {"ZoneId": "cn-hangzhou-b", "Status": "Available", "StatusCategory": "WithStock",
             "AvailableResources": {"AvailableResource": [{"Type": "InstanceType", "SupportedResources": {"SupportedResource": [
                {"Value": "ecs.c7.large", "Status": "Available", "StatusCategory": "WithStock"},
                {"Value": "ecs.c7.xlarge", "Status": "SoldOut", "StatusCategory": "WithoutStock"}
             ]}}]}},
            {"ZoneId": "cn-hangzhou-g", "Status": "Available", "StatusCategory": "WithStock",
             "AvailableResources": {"AvailableResource": [{"Type": "InstanceType", "SupportedResources": {"SupportedResource": [
                {"Value": "ecs.c7.large", "Status": "Available", "StatusCategory": "ClosedWithStock"}
             ]}}]}}
        ]}});
        let r = flatten_available_resource(&v);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter()
                .map(|z| {
                    let stock = crate::selection::ZoneStock::from_ecs(
                        &z.instance_type,
                        &z.zone_id,
                        &z.status,
                        z.status_category.as_deref(),
                    );
                    (z.zone_id.as_str(), z.instance_type.as_str(), stock.available)
                })
                .collect::<Vec<_>>(),
            vec![
                ("cn-hangzhou-b", "ecs.c7.large", true),
                ("cn-hangzhou-b", "ecs.c7.xlarge", false),
                ("cn-hangzhou-g", "ecs.c7.large", true)
            ]
        );
        assert_eq!(r[1].status, "SoldOut");
        assert_eq!(r[1].status_category.as_deref(), Some("WithoutStock"));
        // Without `StatusCategory` (optional in the SDK's model) the `Status` decides.
        let v = json!({"AvailableZones": {"AvailableZone": [{"ZoneId": "z", "AvailableResources": {"AvailableResource": [
            {"Type": "InstanceType", "SupportedResources": {"SupportedResource": [
                {"Value": "a", "Status": "Available"}, {"Value": "b", "Status": "SoldOut"}]}}]}}]}});
        let r = flatten_available_resource(&v);
        assert_eq!(r[0].status_category, None);
        let avail: Vec<bool> = r
            .iter()
            .map(|z| crate::selection::ZoneStock::from_ecs(&z.instance_type, "z", &z.status, None).available)
            .collect();
        assert_eq!(avail, vec![true, false]);
    }

    #[test]
    fn spot_prices_and_types_parse() {
        let p = parse_spot_price(&json!({"ZoneId": "z", "InstanceType": "t", "SpotPrice": 0.05, "OriginPrice": "0.4", "Timestamp": "2025-01-01T00:00:00Z"})).unwrap();
        assert_eq!(p.spot_price, 0.05);
        assert_eq!(p.origin_price, Some(0.4));
        let t = parse_instance_type(&json!({"InstanceTypeId": "ecs.c8y.2xlarge", "CpuCoreCount": 8, "MemorySize": 16.0, "CpuArchitecture": "ARM"})).unwrap();
        assert_eq!(
            (t.family.as_str(), t.cores, t.memory_gib, t.arch.as_str(), t.gpu_amount),
            ("ecs.c8y", 8, 16.0, "ARM", 0)
        );
    }

    #[test]
    fn spot_strategy_round_trips() {
        for s in [SpotStrategy::NoSpot, SpotStrategy::SpotWithPriceLimit, SpotStrategy::SpotAsPriceGo] {
            assert_eq!(s.as_str().parse::<SpotStrategy>(), Ok(s));
        }
        assert!("cheap".parse::<SpotStrategy>().unwrap_err().contains("`cheap`"));
    }
}
