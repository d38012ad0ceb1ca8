//! The ECS actions: parameter validation as Aliyun does it, the answers in Aliyun's exact JSON
//! shapes (docs/aliyun.md), DryRun, ClientToken idempotency and the stock-out faults.
//!
//! Why so strict: the executor's fallbacks (next offer on stock-out, retry on throttling, stop
//! on parameter errors) are only tested if the emulator answers each case with the code and
//! HTTP status Aliyun uses.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use time::OffsetDateTime;

use super::auth::Principal;
use super::catalogue::{Catalogue, InstanceType};
use super::cloudconfig;
use super::instances::{
    ecs_minutes, lock, now, random_alnum, rfc3339, Core, Instance, KeyPair, State, Status,
};
use crate::secret::Secret;

/// Request parameters (query and form merged).
pub(crate) type Params = BTreeMap<String, String>;

/// An API error answered as `{"RequestId","HostId","Code","Message","Recommend"}`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: &str) -> ApiError {
        ApiError { status, code: code.to_string(), message: message.to_string() }
    }

    fn missing(name: &str) -> ApiError {
        ApiError::new(
            400,
            "MissingParameter",
            &format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
        )
    }

    fn invalid(code: &str, message: &str) -> ApiError {
        ApiError::new(400, code, message)
    }

    fn dry_run() -> ApiError {
        ApiError::new(400, "DryRunOperation", "Request validation has been passed with DryRun flag set.")
    }
}

type ApiResult = Result<Value, ApiError>;

fn get<'a>(p: &'a Params, name: &str) -> Option<&'a str> {
    p.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn req<'a>(p: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    get(p, name).ok_or_else(|| ApiError::missing(name))
}

fn bool_param(p: &Params, name: &str) -> Result<bool, ApiError> {
    match get(p, name) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(ApiError::invalid(
            "InvalidParameter",
            &format!("The specified parameter \"{name}\" is not valid: `{v}`."),
        )),
    }
}

fn num_param<T: std::str::FromStr>(p: &Params, name: &str) -> Result<Option<T>, ApiError> {
    match get(p, name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
            ApiError::invalid(
                "InvalidParameter",
                &format!("The specified parameter \"{name}\" is not valid: `{v}`."),
            )
        }),
    }
}

fn check_dry_run(p: &Params) -> Result<(), ApiError> {
    if bool_param(p, "DryRun")? {
        Err(ApiError::dry_run())
    } else {
        Ok(())
    }
}

/// `Prefix.1`, `Prefix.2`, … in numeric order.
fn list_param(p: &Params, prefix: &str) -> Vec<String> {
    let mut v: Vec<(u32, String)> = p
        .iter()
        .filter_map(|(k, val)| {
            let n = k.strip_prefix(prefix)?.strip_prefix('.')?.parse::<u32>().ok()?;
            Some((n, val.clone()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, s)| s).filter(|s| !s.is_empty()).collect()
}

/// `Tag.N.Key` / `Tag.N.Value` pairs.
fn tag_params(p: &Params) -> Result<Vec<(String, String)>, ApiError> {
    let mut idx: Vec<u32> = p
        .keys()
        .filter_map(|k| {
            let rest = k.strip_prefix("Tag.")?;
            let (n, field) = rest.split_once('.')?;
            (field == "Key" || field == "Value").then(|| n.parse::<u32>().ok()).flatten()
        })
        .collect();
    idx.sort();
    idx.dedup();
    let mut out = Vec::new();
    for n in idx {
        let key = p.get(&format!("Tag.{n}.Key")).cloned().unwrap_or_default();
        let value = p.get(&format!("Tag.{n}.Value")).cloned().unwrap_or_default();
        if key.is_empty() {
            return Err(ApiError::invalid(
                "InvalidTagKey.Malformed",
                "The specified Tag.n.Key is not valid.",
            ));
        }
        if key.len() > 128 || value.len() > 128 {
            return Err(ApiError::invalid(
                "InvalidTagKey.Malformed",
                "The specified tag key or value is too long.",
            ));
        }
        out.push((key, value));
    }
    Ok(out)
}

/// A JSON array of strings given as a parameter (`InstanceIds`, `KeyPairNames`).
fn json_list(p: &Params, name: &str) -> Result<Option<Vec<String>>, ApiError> {
    match get(p, name) {
        None => Ok(None),
        Some(v) => serde_json::from_str::<Vec<String>>(v).map(Some).map_err(|_| {
            ApiError::invalid(
                &format!("Invalid{name}.Malformed"),
                &format!("The specified parameter \"{name}\" is not valid."),
            )
        }),
    }
}

fn region_check<'a>(core: &Core, p: &'a Params) -> Result<&'a str, ApiError> {
    let r = get(p, "RegionId")
        .ok_or_else(|| ApiError::new(400, "MissingRegionId", "RegionId is mandatory for this action."))?;
    if !core.catalogue.regions.iter().any(|x| x.region_id == r) {
        return Err(ApiError::new(404, "InvalidRegionId.NotFound", "The specified RegionId does not exist."));
    }
    Ok(r)
}

/// Whether a region has resources.
fn has_resources(core: &Core, region: &str) -> bool {
    region == core.catalogue.region
}

/// `PageNumber`/`PageSize` with Aliyun's bounds.
fn page(p: &Params, default_size: usize, max_size: usize) -> Result<(usize, usize), ApiError> {
    let number = num_param::<usize>(p, "PageNumber")?.unwrap_or(1);
    let size = num_param::<usize>(p, "PageSize")?.unwrap_or(default_size);
    if number == 0 {
        return Err(ApiError::invalid(
            "InvalidPageNumber.Malformed",
            "The specified parameter PageNumber is not valid.",
        ));
    }
    if size == 0 || size > max_size {
        return Err(ApiError::invalid(
            "InvalidPageSize.Malformed",
            "The specified parameter PageSize is not valid.",
        ));
    }
    Ok((number, size))
}

fn next_token(offset: usize) -> String {
    format!("ntk{offset:08x}")
}

fn parse_next_token(p: &Params) -> Result<usize, ApiError> {
    match get(p, "NextToken") {
        None => Ok(0),
        Some(t) => t.strip_prefix("ntk").and_then(|h| usize::from_str_radix(h, 16).ok()).ok_or_else(|| {
            ApiError::invalid("InvalidNextToken.Malformed", "The specified parameter NextToken is not valid.")
        }),
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Dispatches an authenticated request.
pub(crate) fn dispatch(core: &Core, action: &str, p: &Params, who: &Principal) -> ApiResult {
    if p.get("Version").map(String::as_str) == Some(super::sts::VERSION) {
        return super::sts::dispatch(core, action, p, who);
    }
    super::ram::authorize(&core.catalogue.region, action, p, who)?;
    match action {
        "DescribeRegions" => describe_regions(core, p),
        "DescribeZones" => describe_zones(core, p),
        "DescribeInstanceTypes" => describe_instance_types(core, p),
        "DescribeAvailableResource" => describe_available_resource(core, p),
        "DescribeSpotPriceHistory" => describe_spot_price_history(core, p),
        "RunInstances" => run_instances(core, p),
        "DescribeInstances" => describe_instances(core, p),
        "DescribeInstanceStatus" => describe_instance_status(core, p),
        "DeleteInstance" => delete_instance(core, p),
        "DeleteInstances" => delete_instances(core, p),
        "ImportKeyPair" => import_key_pair(core, p),
        "CreateKeyPair" => create_key_pair(core, p),
        "DescribeKeyPairs" => describe_key_pairs(core, p),
        "DeleteKeyPairs" => delete_key_pairs(core, p),
        "DescribeImages" => describe_images(core, p),
        "DescribeSecurityGroups" => describe_security_groups(core, p),
        "DescribeUserData" => describe_user_data(core, p),
        _ => Err(ApiError::new(
            404,
            "InvalidAction.NotFound",
            &format!("Specified api \"{action}\" is not found, please check your url and method."),
        )),
    }
}

fn describe_regions(core: &Core, p: &Params) -> ApiResult {
    check_dry_run(p)?;
    let regions: Vec<Value> = core
        .catalogue
        .regions
        .iter()
        .map(|r| {
            json!({
                "RegionId": r.region_id,
                "LocalName": r.local_name,
                "RegionEndpoint": format!("ecs.{}.aliyuncs.com", r.region_id),
                "Status": "available",
            })
        })
        .collect();
    Ok(json!({ "Regions": { "Region": regions } }))
}

fn describe_zones(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    check_dry_run(p)?;
    let zones: Vec<Value> = if has_resources(core, region) {
        core.catalogue
            .zones
            .iter()
            .map(|z| {
                let types: Vec<&str> = core.catalogue.offers_in_zone(&z.id).map(|o| o.instance_type.as_str()).collect();
                json!({
                    "ZoneId": z.id,
                    "LocalName": z.local_name,
                    "ZoneType": "AvailabilityZone",
                    "AvailableResourceCreation": { "ResourceTypes": ["Instance", "Disk", "VSwitch", "IoOptimized"] },
                    "AvailableInstanceTypes": { "InstanceTypes": types },
                    "AvailableDiskCategories": { "DiskCategories": ["cloud_essd", "cloud_auto", "cloud_efficiency"] },
                    "AvailableVolumeCategories": { "VolumeCategories": ["cloud_essd", "cloud_auto"] },
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(json!({ "Zones": { "Zone": zones } }))
}

fn type_json(t: &InstanceType) -> Value {
    let category = if t.gpu_amount > 0 {
        "GPU-accelerated"
    } else if t.family_level != "EnterpriseLevel" {
        "Shared"
    } else if t.family.starts_with("ecs.g") {
        "General-purpose"
    } else {
        "Compute-optimized"
    };
    json!({
        "InstanceTypeId": t.id,
        "InstanceTypeFamily": t.family,
        "InstanceCategory": category,
        "CpuCoreCount": t.cores,
        "MemorySize": t.memory_gib,
        "CpuArchitecture": t.arch,
        "GPUAmount": t.gpu_amount,
        "GPUSpec": t.gpu_spec,
        "GPUMemorySize": if t.gpu_amount > 0 { 16.0 * f64::from(t.gpu_amount) } else { 0.0 },
        "InstanceFamilyLevel": t.family_level,
        "LocalStorageCategory": "",
        "EniQuantity": (t.cores / 2).clamp(2, 8),
        "EniPrivateIpAddressQuantity": 10,
        "InstanceBandwidthRx": t.cores * 128_000,
        "InstanceBandwidthTx": t.cores * 128_000,
        "InstancePpsRx": t.cores * 100_000,
        "InstancePpsTx": t.cores * 100_000,
        "PhysicalProcessorModel": if t.arch == "ARM" { "Yitian 710" } else { "Intel Xeon (Sapphire Rapids) Platinum 8475B" },
        "CpuSpeedFrequency": if t.arch == "ARM" { 2.75 } else { 2.7 },
        "CpuTurboFrequency": if t.arch == "ARM" { 2.75 } else { 3.2 },
    })
}

fn describe_instance_types(core: &Core, p: &Params) -> ApiResult {
    check_dry_run(p)?;
    let family = get(p, "InstanceTypeFamily");
    let arch = get(p, "CpuArchitecture");
    let min_cores = num_param::<u32>(p, "MinimumCpuCoreCount")?;
    let max_cores = num_param::<u32>(p, "MaximumCpuCoreCount")?;
    let min_mem = num_param::<f64>(p, "MinimumMemorySize")?;
    let max_mem = num_param::<f64>(p, "MaximumMemorySize")?;
    let wanted = list_param(p, "InstanceTypes");
    let max_results = num_param::<usize>(p, "MaxResults")?.unwrap_or(100);
    if max_results == 0 || max_results > 1600 {
        return Err(ApiError::invalid(
            "InvalidMaxResults.Malformed",
            "The specified parameter MaxResults is not valid.",
        ));
    }
    let offset = parse_next_token(p)?;
    let all: Vec<&InstanceType> = core
        .catalogue
        .types
        .iter()
        .filter(|t| family.is_none_or(|f| t.family == f))
        .filter(|t| arch.is_none_or(|a| t.arch.eq_ignore_ascii_case(a)))
        .filter(|t| min_cores.is_none_or(|m| t.cores >= m) && max_cores.is_none_or(|m| t.cores <= m))
        .filter(|t| min_mem.is_none_or(|m| t.memory_gib >= m) && max_mem.is_none_or(|m| t.memory_gib <= m))
        .filter(|t| wanted.is_empty() || wanted.contains(&t.id))
        .collect();
    let page: Vec<Value> = all.iter().skip(offset).take(max_results).map(|t| type_json(t)).collect();
    let next =
        if offset + max_results < all.len() { next_token(offset + max_results) } else { String::new() };
    Ok(json!({ "InstanceTypes": { "InstanceType": page }, "NextToken": next }))
}

fn describe_available_resource(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    let dest = req(p, "DestinationResource")?;
    check_dry_run(p)?;
    if !["InstanceType", "Zone"].contains(&dest) {
        return Err(ApiError::invalid(
            "InvalidParameter.DestinationResource",
            &format!("The specified DestinationResource \"{dest}\" is not supported by the emulator."),
        ));
    }
    if let Some(s) = get(p, "SpotStrategy") {
        validate_spot_strategy(s)?;
    }
    // Validated like the other two actions; stock does not depend on it here.
    spot_duration(p)?;
    let zone_filter = get(p, "ZoneId");
    let type_filter = get(p, "InstanceType");
    let cores = num_param::<u32>(p, "Cores")?;
    let memory = num_param::<f64>(p, "Memory")?;
    let faults = core.faults();
    let mut zones = Vec::new();
    if has_resources(core, region) {
        for z in &core.catalogue.zones {
            if zone_filter.is_some_and(|f| f != z.id) {
                continue;
            }
            let mut supported = Vec::new();
            let mut any = false;
            for o in core.catalogue.offers_in_zone(&z.id) {
                let Some(t) = core.catalogue.instance_type(&o.instance_type) else { continue };
                if type_filter.is_some_and(|f| f != t.id)
                    || cores.is_some_and(|c| c != t.cores)
                    || memory.is_some_and(|m| (m - t.memory_gib).abs() > 1e-9)
                {
                    continue;
                }
                let sold_out = faults.no_stock(&t.id, &z.id);
                any |= !sold_out;
                supported.push(json!({
                    "Value": t.id,
                    "Status": if sold_out { "SoldOut" } else { "Available" },
                    "StatusCategory": if sold_out { "WithoutStock" } else { "WithStock" },
                }));
            }
            if supported.is_empty() {
                continue;
            }
            let resource = if dest == "Zone" {
                json!({ "Type": "Zone", "SupportedResources": { "SupportedResource": [{
                    "Value": z.id,
                    "Status": if any { "Available" } else { "SoldOut" },
                    "StatusCategory": if any { "WithStock" } else { "WithoutStock" },
                }]}})
            } else {
                json!({ "Type": "InstanceType", "SupportedResources": { "SupportedResource": supported } })
            };
            zones.push(json!({
                "RegionId": region,
                "ZoneId": z.id,
                "Status": if any { "Available" } else { "SoldOut" },
                "StatusCategory": if any { "WithStock" } else { "WithoutStock" },
                "AvailableResources": { "AvailableResource": [resource] },
            }));
        }
    }
    Ok(json!({ "AvailableZones": { "AvailableZone": zones } }))
}

fn parse_time(p: &Params, name: &str) -> Result<Option<OffsetDateTime>, ApiError> {
    match get(p, name) {
        None => Ok(None),
        Some(v) => {
            OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).map(Some).map_err(|_| {
                ApiError::invalid(
                    &format!("Invalid{name}.Malformed"),
                    &format!("The specified parameter \"{name}\" is not valid (yyyy-MM-ddTHH:mm:ssZ)."),
                )
            })
        }
    }
}

/// FNV-1a, for deterministic price wiggles.
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

const SPOT_PAGE: usize = 100;

fn describe_spot_price_history(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    let network = req(p, "NetworkType")?;
    let itype = req(p, "InstanceType")?;
    check_dry_run(p)?;
    if network != "vpc" && network != "classic" {
        return Err(ApiError::invalid(
            "InvalidNetworkType.ValueNotSupported",
            "The specified NetworkType is not valid.",
        ));
    }
    if core.catalogue.instance_type(itype).is_none() {
        return Err(ApiError::invalid(
            "InvalidInstanceType.ValueNotSupported",
            &format!("The specified InstanceType \"{itype}\" does not exist."),
        ));
    }
    let t_now = now();
    let end = parse_time(p, "EndTime")?.unwrap_or(t_now).min(t_now);
    let start = parse_time(p, "StartTime")?.unwrap_or(end - time::Duration::hours(3));
    if start > end {
        return Err(ApiError::invalid(
            "InvalidStartTime.Malformed",
            "StartTime must be earlier than EndTime.",
        ));
    }
    if t_now - start > time::Duration::days(30) {
        return Err(ApiError::invalid(
            "InvalidStartTime.ValueNotSupported",
            "StartTime can be at most 30 days ago.",
        ));
    }
    let offset = num_param::<usize>(p, "Offset")?.unwrap_or(0);
    let protection = spot_duration(p)?;
    let zone_filter = get(p, "ZoneId");
    let latest_hour = t_now.unix_timestamp() / 3600 * 3600;
    let mut points = Vec::new();
    if has_resources(core, region) && network == "vpc" {
        for z in &core.catalogue.zones {
            if zone_filter.is_some_and(|f| f != z.id) {
                continue;
            }
            let Some(offer) = core.catalogue.offer(itype, &z.id) else { continue };
            // Hourly points; the one in effect at StartTime is included, the newest is current.
            let mut hours = Vec::new();
            let mut h = latest_hour;
            while h > end.unix_timestamp() {
                h -= 3600;
            }
            loop {
                hours.push(h);
                if h <= start.unix_timestamp() {
                    break;
                }
                h -= 3600;
            }
            hours.reverse();
            for h in hours {
                let current = offer.spot_for(protection);
                let price = if h == latest_hour {
                    current
                } else {
                    let wiggle = (fnv(&[itype, &z.id, &h.to_string()]) % 17) as f64 - 8.0;
                    round4(current * (1.0 + wiggle / 100.0))
                };
                let ts = OffsetDateTime::from_unix_timestamp(h).unwrap_or(t_now);
                points.push(json!({
                    "ZoneId": z.id,
                    "InstanceType": itype,
                    "IoOptimized": "optimized",
                    "NetworkType": "vpc",
                    "Timestamp": rfc3339(ts),
                    "SpotPrice": price,
                    "OriginPrice": offer.on_demand,
                }));
            }
        }
    }
    let total = points.len();
    let page: Vec<Value> = points.into_iter().skip(offset).take(SPOT_PAGE).collect();
    let next = if offset + SPOT_PAGE < total { offset + SPOT_PAGE } else { 0 };
    Ok(
        json!({ "Currency": core.faults().currency(), "NextOffset": next, "SpotPrices": { "SpotPriceType": page } }),
    )
}

/// `SpotDuration`, the protection period in hours, of `RunInstances`,
/// `DescribeSpotPriceHistory` and `DescribeAvailableResource`: "Default value: 1", and
/// `RunInstances` "can only be set to 0 or 1" (the current SDK's request models; see
/// `crate::pricing`).
fn spot_duration(p: &Params) -> Result<u32, ApiError> {
    let hours = num_param::<u32>(p, "SpotDuration")?.unwrap_or(crate::pricing::DEFAULT_PROTECTION_HOURS);
    if !crate::pricing::PROTECTION_HOURS.contains(&hours) {
        return Err(ApiError::invalid("InvalidSpotDuration", "The specified SpotDuration is not valid."));
    }
    Ok(hours)
}

fn validate_spot_strategy(s: &str) -> Result<(), ApiError> {
    if ["NoSpot", "SpotWithPriceLimit", "SpotAsPriceGo"].contains(&s) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "InvalidSpotStrategy",
            &format!("The specified SpotStrategy \"{s}\" is not valid."),
        ))
    }
}

/// Parameters that do not take part in ClientToken idempotency.
const NON_IDEMPOTENT_PARAMS: &[&str] = &[
    "Signature",
    "SignatureNonce",
    "SignatureMethod",
    "SignatureVersion",
    "SignatureType",
    "Timestamp",
    "AccessKeyId",
    "SecurityToken",
    "Format",
    "Version",
    "DryRun",
    "ClientToken",
];

fn fingerprint(p: &Params) -> String {
    let mut h = sha2::Sha256::new();
    for (k, v) in p.iter().filter(|(k, _)| !NON_IDEMPOTENT_PARAMS.contains(&k.as_str())) {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    format!("{:x}", h.finalize())
}

const MAX_USER_DATA: usize = 32 * 1024;

fn run_instances(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    let client_token = get(p, "ClientToken");
    if let Some(tok) = client_token {
        if tok.len() > 64 || !tok.is_ascii() {
            return Err(ApiError::invalid(
                "InvalidClientToken.Malformed",
                "The specified ClientToken is not valid.",
            ));
        }
        let st = lock(&core.state);
        if let Some((fp, ids)) = st.client_tokens.get(tok) {
            if *fp != fingerprint(p) {
                return Err(ApiError::invalid(
                    "IdempotentParameterMismatch",
                    "The specified parameters are different from before with the same ClientToken.",
                ));
            }
            if !bool_param(p, "DryRun")? {
                return Ok(run_answer(core, &st, ids));
            }
        }
    }
    let itype_id = req(p, "InstanceType")?;
    let image_id = req(p, "ImageId")?;
    let sg = req(p, "SecurityGroupId")?;
    let vswitch = req(p, "VSwitchId")?;
    let itype = core.catalogue.instance_type(itype_id).ok_or_else(|| {
        ApiError::invalid(
            "InvalidInstanceType.ValueNotSupported",
            &format!("The specified InstanceType \"{itype_id}\" does not exist or is not supported."),
        )
    })?;
    let vsw_zone = if has_resources(core, region) { core.catalogue.zone_of_vswitch(vswitch) } else { None };
    let Some(vsw_zone) = vsw_zone else {
        return Err(ApiError::new(
            404,
            "InvalidVSwitchId.NotFound",
            "The specified VSwitchId does not exist.",
        ));
    };
    let zone = match get(p, "ZoneId") {
        Some(z) => {
            if core.catalogue.zone(z).is_none() || !has_resources(core, region) {
                return Err(ApiError::new(
                    404,
                    "InvalidZoneId.NotFound",
                    &format!("The specified zone \"{z}\" does not exist."),
                ));
            }
            if z != vsw_zone.id {
                return Err(ApiError::invalid(
                    "InvalidVSwitchId.Mismatch",
                    &format!("The specified VSwitch \"{vswitch}\" does not belong to zone \"{z}\"."),
                ));
            }
            z.to_string()
        }
        None => vsw_zone.id.clone(),
    };
    let Some(offer) = core.catalogue.offer(itype_id, &zone) else {
        return Err(ApiError::new(
            403,
            "InvalidResourceType.NotSupported",
            &format!("The instance type \"{itype_id}\" is not sold in zone \"{zone}\"; please try other instance types or zones."),
        ));
    };
    let image = core.catalogue.image(image_id).ok_or_else(|| {
        ApiError::new(
            404,
            "InvalidImageId.NotFound",
            &format!("The specified ImageId \"{image_id}\" does not exist."),
        )
    })?;
    if image.architecture != itype.image_arch() {
        return Err(ApiError::new(
            403,
            "ImageNotSupportInstanceType",
            &format!(
                "The image \"{image_id}\" ({}) does not support the instance type \"{itype_id}\".",
                image.architecture
            ),
        ));
    }
    if sg != core.catalogue.security_group_id {
        return Err(ApiError::new(
            404,
            "InvalidSecurityGroupId.NotFound",
            &format!("The specified SecurityGroupId \"{sg}\" does not exist."),
        ));
    }
    let spot_strategy = get(p, "SpotStrategy").unwrap_or("NoSpot");
    validate_spot_strategy(spot_strategy)?;
    let spot_limit = num_param::<f64>(p, "SpotPriceLimit").map_err(|_| {
        ApiError::invalid("InvalidSpotPriceLimit.Malformed", "The specified SpotPriceLimit is not valid.")
    })?;
    // At most three decimals (`RunInstances` request model, see `crate::pricing`). Aliyun's
    // RunInstances error table names no code of its own for this, so the emulator answers the
    // common `InvalidParameter` (HTTP 400) naming the parameter.
    if get(p, "SpotPriceLimit").is_some_and(|v| !crate::pricing::has_at_most_limit_decimals(v)) {
        return Err(ApiError::invalid(
            "InvalidParameter",
            "The specified parameter SpotPriceLimit is not valid: it can have up to three decimal places.",
        ));
    }
    let spot_duration = if spot_strategy == "NoSpot" { None } else { Some(spot_duration(p)?) };
    if spot_strategy == "SpotWithPriceLimit" {
        let Some(limit) = spot_limit else {
            return Err(ApiError::invalid(
                "InvalidSpotPriceLimit.Missing",
                "SpotPriceLimit is mandatory when SpotStrategy is SpotWithPriceLimit.",
            ));
        };
        let price = offer.spot_for(spot_duration.unwrap_or(crate::pricing::DEFAULT_PROTECTION_HOURS));
        if limit < price {
            return Err(ApiError::invalid(
                "InvalidSpotPriceLimit.LowerThanPublicPrice",
                &format!("The specified SpotPriceLimit {limit} is lower than the current spot price {price} of \"{itype_id}\" in \"{zone}\"."),
            ));
        }
    }
    let amount = num_param::<i64>(p, "Amount")?.unwrap_or(1);
    if !(1..=100).contains(&amount) {
        return Err(ApiError::invalid(
            "InvalidAmount.ValueNotSupported",
            "The specified Amount must be between 1 and 100.",
        ));
    }
    let min_amount = num_param::<i64>(p, "MinAmount")?.unwrap_or(amount);
    if min_amount < 1 || min_amount > amount {
        return Err(ApiError::invalid(
            "InvalidMinAmount.ValueNotSupported",
            "MinAmount must be between 1 and Amount.",
        ));
    }
    let bandwidth = num_param::<u32>(p, "InternetMaxBandwidthOut")?.unwrap_or(0);
    if bandwidth > 100 {
        return Err(ApiError::invalid(
            "InvalidInternetMaxBandwidthOut.Malformed",
            "InternetMaxBandwidthOut must be between 0 and 100.",
        ));
    }
    if let Some(c) = get(p, "SystemDisk.Category") {
        if !["cloud_efficiency", "cloud_ssd", "cloud_essd", "cloud_auto", "cloud_essd_entry"].contains(&c) {
            return Err(ApiError::invalid(
                "InvalidSystemDiskCategory.ValueNotSupported",
                "The specified SystemDisk.Category is not valid.",
            ));
        }
    }
    if let Some(size) = num_param::<u32>(p, "SystemDisk.Size")? {
        if size < image.size || size > 2048 {
            return Err(ApiError::invalid(
                "InvalidSystemDiskSize.ValueNotSupported",
                "The specified SystemDisk.Size is not valid.",
            ));
        }
    }
    let user_data = match get(p, "UserData") {
        None => None,
        Some(b64) => {
            if b64.len() > MAX_USER_DATA {
                return Err(ApiError::invalid(
                    "InvalidUserData.SizeExceeded",
                    "The specified UserData exceeds 32 KB.",
                ));
            }
            let raw = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| {
                ApiError::invalid(
                    "InvalidUserData.Base64FormatInvalid",
                    "The specified UserData is not base64-encoded.",
                )
            })?;
            Some(String::from_utf8_lossy(&raw).into_owned())
        }
    };
    let tags = tag_params(p)?;
    if tags.len() > 20 {
        return Err(ApiError::invalid("InvalidTagCount", "The number of tags cannot exceed 20."));
    }
    let auto_release = match get(p, "AutoReleaseTime") {
        None => None,
        Some(v) => {
            // RunInstances documents `AutoReleaseTime` as UTC `yyyy-MM-ddTHH:mm:ssZ` (or without
            // seconds), at least 30 minutes and at most 3 years ahead, and rounds a time with
            // seconds down to the minute (API reference, RunInstances, `AutoReleaseTime`): the
            // rounded time is the one checked and kept.
            let t = parse_auto_release(v)?;
            let t = t.replace_second(0).and_then(|x| x.replace_nanosecond(0)).unwrap_or(t);
            let ahead = t - now();
            if ahead < time::Duration::minutes(30) || ahead > time::Duration::days(3 * 365) {
                return Err(ApiError::invalid(
                    "InvalidAutoReleaseTime.ValueNotSupported",
                    "AutoReleaseTime must be at least 30 minutes and at most 3 years ahead.",
                ));
            }
            Some(t)
        }
    };
    let key_pair = get(p, "KeyPairName");
    let mut authorized = Vec::new();
    let mut host_key = None;
    if let Some(ud) = &user_data {
        if let Some(cc) = cloudconfig::parse(ud) {
            authorized.extend(cc.authorized_keys.iter().cloned());
            host_key = cc.ed25519_private().cloned();
        }
    }
    {
        let st = lock(&core.state);
        if let Some(name) = key_pair {
            let Some(kp) = st.key_pairs.get(name) else {
                return Err(ApiError::new(
                    404,
                    "InvalidKeyPairName.NotFound",
                    &format!("The specified KeyPairName \"{name}\" does not exist."),
                ));
            };
            authorized.push(kp.public_key.clone());
        }
    }
    let faults = core.faults();
    if let Some(e) = super::faults::run_error(&faults, itype_id, &zone) {
        return Err(e);
    }
    if faults.no_stock(itype_id, &zone) {
        return Err(ApiError::new(
            403,
            "OperationDenied.NoStock",
            "Sales of this resource are temporarily suspended in the specified region; please try again later.",
        ));
    }
    check_dry_run(p)?;

    let (boot_delay, ssh_delay) = core.delays();
    let mut st = lock(&core.state);
    // A concurrent request with the same token may have won the race.
    if let Some(tok) = client_token {
        if let Some((fp, ids)) = st.client_tokens.get(tok) {
            if *fp != fingerprint(p) {
                return Err(ApiError::invalid(
                    "IdempotentParameterMismatch",
                    "The specified parameters are different from before with the same ClientToken.",
                ));
            }
            return Ok(run_answer(core, &st, ids));
        }
    }
    let mut ids = Vec::new();
    for n in 0..amount {
        let (ip, port) = core.allocate_ip().map_err(|e| {
            ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
        })?;
        let id = format!("i-bp1{}", random_alnum(15));
        let t = now();
        let mut inst = Instance {
            id: id.clone(),
            name: match get(p, "InstanceName") {
                Some(name) if amount > 1 => format!("{name}{:03}", n + 1),
                Some(name) => name.to_string(),
                None => format!("launch-advisor-{}", &rfc3339(t)[..10].replace('-', "")),
            },
            host_name: get(p, "HostName").map(str::to_string).unwrap_or_else(|| format!("iZ{}Z", &id[2..])),
            instance_type: itype_id.to_string(),
            zone: zone.clone(),
            image_id: image_id.to_string(),
            vswitch_id: vswitch.to_string(),
            security_group_id: sg.to_string(),
            spot_strategy: spot_strategy.to_string(),
            spot_price_limit: if spot_strategy == "SpotWithPriceLimit" { spot_limit } else { None },
            spot_duration,
            bandwidth_out: bandwidth,
            key_pair_name: key_pair.map(str::to_string),
            ram_role: get(p, "RamRoleName").map(str::to_string),
            user_data: get(p, "UserData").map(|s| Secret::new(s.to_string())),
            tags: tags.clone(),
            auto_release,
            client_token: client_token.map(str::to_string),
            cpu: itype.cores,
            memory_mib: (itype.memory_gib * 1024.0) as u64,
            status: Status::Pending,
            locks: Vec::new(),
            ip,
            ssh_port: port,
            created: t,
            running: None,
            deleted: None,
            stopped: None,
            boot_delay,
            ssh_delay,
            never_boot: faults.never_boots(itype_id, &zone),
            initializing: faults.initializing,
            termination_time: None,
            authorized_keys: authorized.clone(),
            host_key: host_key.clone(),
            sshd_pid: None,
            sshd_started: false,
            events: Vec::new(),
            live: true,
        };
        inst.event("created", format!("{itype_id} in {zone}, {spot_strategy}, ip {ip}"));
        st.instances.insert(id.clone(), inst);
        st.order.push(id.clone());
        st.created += 1;
        ids.push(id);
    }
    if let Some(tok) = client_token {
        st.client_tokens.insert(tok.to_string(), (fingerprint(p), ids.clone()));
    }
    Ok(run_answer(core, &st, &ids))
}

fn parse_auto_release(v: &str) -> Result<OffsetDateTime, ApiError> {
    let err = || {
        ApiError::invalid(
            "InvalidAutoReleaseTime.Malformed",
            "The specified AutoReleaseTime is not valid (yyyy-MM-ddTHH:mm:ssZ).",
        )
    };
    if !v.ends_with('Z') {
        return Err(err());
    }
    let full = if v.len() == 17 { format!("{}:00Z", &v[..16]) } else { v.to_string() };
    OffsetDateTime::parse(&full, &time::format_description::well_known::Rfc3339).map_err(|_| err())
}

fn run_answer(core: &Core, st: &State, ids: &[String]) -> Value {
    let price: f64 = ids
        .iter()
        .filter_map(|id| st.instances.get(id))
        .filter_map(|i| {
            let o = core.catalogue.offer(&i.instance_type, &i.zone)?;
            Some(if i.spot_strategy == "NoSpot" {
                o.on_demand
            } else {
                o.spot_for(i.spot_duration.unwrap_or(crate::pricing::DEFAULT_PROTECTION_HOURS))
            })
        })
        .sum();
    json!({
        "InstanceIdSets": { "InstanceIdSet": ids },
        "TradePrice": round4(price),
        "OrderId": format!("2{:014}", fnv(&[ids.first().map(String::as_str).unwrap_or("")]) % 100_000_000_000_000),
    })
}

fn instance_json(core: &Core, i: &Instance) -> Value {
    let os_name = core.catalogue.image(&i.image_id).map(|im| im.os_name.clone()).unwrap_or_default();
    let family = core.catalogue.instance_type(&i.instance_type).map(|t| t.family.clone()).unwrap_or_default();
    let public: Vec<String> = if i.bandwidth_out > 0 { vec![i.ip.to_string()] } else { Vec::new() };
    let tags: Vec<Value> = i.tags.iter().map(|(k, v)| json!({ "TagKey": k, "TagValue": v })).collect();
    let locks: Vec<Value> = i.locks.iter().map(|l| json!({ "LockReason": l, "LockMsg": "" })).collect();
    let mut v = json!({
        "InstanceId": i.id,
        "InstanceName": i.name,
        "HostName": i.host_name,
        "Description": "",
        "InstanceType": i.instance_type,
        "InstanceTypeFamily": family,
        "ZoneId": i.zone,
        "RegionId": core.catalogue.region,
        "Status": i.status.as_str(),
        "Cpu": i.cpu,
        "Memory": i.memory_mib,
        "OSType": "linux",
        "OSName": os_name,
        "ImageId": i.image_id,
        "CreationTime": ecs_minutes(i.created),
        "StartTime": i.running.map(ecs_minutes).unwrap_or_default(),
        "ExpiredTime": "2099-12-31T15:59Z",
        "AutoReleaseTime": i.auto_release.map(rfc3339).unwrap_or_default(),
        "InstanceChargeType": "PostPaid",
        "InternetChargeType": "PayByTraffic",
        "InternetMaxBandwidthOut": i.bandwidth_out,
        "InternetMaxBandwidthIn": if i.bandwidth_out > 0 { 100 } else { -1 },
        "SpotStrategy": i.spot_strategy,
        "SpotPriceLimit": i.spot_price_limit.unwrap_or(0.0),
        "SpotDuration": i.spot_duration.unwrap_or(0),
        "SpotInterruptionBehavior": "Terminate",
        "KeyPairName": i.key_pair_name.clone().unwrap_or_default(),
        "InstanceNetworkType": "vpc",
        "IoOptimized": true,
        "DeletionProtection": false,
        "StoppedMode": "Not-applicable",
        "SerialNumber": format!("{:08x}-emul-ator0-0000-{}", fnv(&[&i.id]) as u32, &i.id[i.id.len() - 12..]),
    });
    // Split in two: one `json!` this large exceeds the macro recursion limit.
    let network = json!({
        "PublicIpAddress": { "IpAddress": public },
        "InnerIpAddress": { "IpAddress": [] },
        "EipAddress": { "IpAddress": "", "AllocationId": "", "InternetChargeType": "" },
        "VpcAttributes": {
            "VpcId": core.catalogue.vpc_id,
            "VSwitchId": i.vswitch_id,
            "PrivateIpAddress": { "IpAddress": [i.ip.to_string()] },
            "NatIpAddress": "",
        },
        "SecurityGroupIds": { "SecurityGroupId": [i.security_group_id] },
        "NetworkInterfaces": { "NetworkInterface": [{
            "NetworkInterfaceId": format!("eni-bp1{}", &i.id[5..]),
            "PrimaryIpAddress": i.ip.to_string(),
            "Type": "Primary",
        }]},
        "Tags": { "Tag": tags },
        "OperationLocks": { "LockReason": locks },
        "MetadataOptions": { "HttpEndpoint": "enabled", "HttpTokens": "optional" },
        "ResourceGroupId": "",
    });
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), network) {
        a.extend(b);
    }
    v
}

/// Live instances in the emulated region, newest first.
fn live_instances<'a>(st: &'a State) -> impl Iterator<Item = &'a Instance> + 'a {
    st.order.iter().rev().filter_map(|id| st.instances.get(id)).filter(|i| i.live)
}

fn describe_instances(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    check_dry_run(p)?;
    let ids = json_list(p, "InstanceIds")?;
    if ids.as_ref().is_some_and(|v| v.len() > 100) {
        return Err(ApiError::invalid(
            "InvalidInstanceIds.Malformed",
            "At most 100 InstanceIds are allowed.",
        ));
    }
    let tags = tag_params(p)?;
    let status = get(p, "Status");
    let zone = get(p, "ZoneId");
    let vpc = get(p, "VpcId");
    let vsw = get(p, "VSwitchId");
    let itype = get(p, "InstanceType");
    let name = get(p, "InstanceName");
    let st = lock(&core.state);
    let matching: Vec<&Instance> = if has_resources(core, region) {
        live_instances(&st)
            .filter(|i| ids.as_ref().is_none_or(|ids| ids.contains(&i.id)))
            .filter(|i| {
                tags.iter().all(|(k, v)| i.tags.iter().any(|(ik, iv)| ik == k && (v.is_empty() || iv == v)))
            })
            .filter(|i| status.is_none_or(|s| i.status.as_str() == s))
            .filter(|i| zone.is_none_or(|z| i.zone == z))
            .filter(|_| vpc.is_none_or(|v| v == core.catalogue.vpc_id))
            .filter(|i| vsw.is_none_or(|v| i.vswitch_id == v))
            .filter(|i| itype.is_none_or(|t| i.instance_type == t))
            .filter(|i| name.is_none_or(|n| super::glob(n, &i.name)))
            .collect()
    } else {
        Vec::new()
    };
    let total = matching.len();
    if get(p, "NextToken").is_some() || get(p, "MaxResults").is_some() {
        // "If you do not set this parameter or set it to a value less than 10, the default value
        // is 10. If you set this parameter to a value greater than 100, the default value is 100."
        // (`MaxResults`, `_describe_instances_request.py` of the current SDK.)
        let max = num_param::<usize>(p, "MaxResults")?.unwrap_or(10).clamp(10, 100);
        let offset = parse_next_token(p)?;
        let page: Vec<Value> =
            matching.iter().skip(offset).take(max).map(|i| instance_json(core, i)).collect();
        let next = if offset + max < total { next_token(offset + max) } else { String::new() };
        return Ok(json!({ "Instances": { "Instance": page }, "TotalCount": total, "NextToken": next }));
    }
    let (number, size) = page(p, 10, 100)?;
    let page: Vec<Value> =
        matching.iter().skip((number - 1) * size).take(size).map(|i| instance_json(core, i)).collect();
    Ok(json!({
        "Instances": { "Instance": page },
        "TotalCount": total,
        "PageNumber": number,
        "PageSize": size,
        "NextToken": "",
    }))
}

fn describe_instance_status(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    check_dry_run(p)?;
    let ids = list_param(p, "InstanceId");
    let zone = get(p, "ZoneId");
    let (number, size) = page(p, 10, 50)?;
    let st = lock(&core.state);
    let matching: Vec<Value> = if has_resources(core, region) {
        live_instances(&st)
            .filter(|i| ids.is_empty() || ids.contains(&i.id))
            .filter(|i| zone.is_none_or(|z| i.zone == z))
            .map(|i| json!({ "InstanceId": i.id, "Status": i.status.as_str() }))
            .collect()
    } else {
        Vec::new()
    };
    let total = matching.len();
    let page: Vec<Value> = matching.into_iter().skip((number - 1) * size).take(size).collect();
    Ok(json!({
        "InstanceStatuses": { "InstanceStatus": page },
        "TotalCount": total,
        "PageNumber": number,
        "PageSize": size,
    }))
}

fn check_deletable(st: &State, id: &str, force: bool) -> Result<(), ApiError> {
    let Some(i) = st.instances.get(id).filter(|i| i.live) else {
        return Err(ApiError::new(
            404,
            "InvalidInstanceId.NotFound",
            &format!("The specified InstanceId \"{id}\" does not exist."),
        ));
    };
    super::faults::check_initialized(i)?;
    if !force && i.status != Status::Stopped {
        return Err(ApiError::new(
            403,
            "IncorrectInstanceStatus",
            &format!("The current status of the resource does not support this operation (instance is {}; use Force).", i.status.as_str()),
        ));
    }
    Ok(())
}

fn delete_instance(core: &Core, p: &Params) -> ApiResult {
    let id = req(p, "InstanceId")?;
    let force = bool_param(p, "Force")?;
    let mut st = lock(&core.state);
    check_deletable(&st, id, force)?;
    check_dry_run(p)?;
    Core::delete_locked(&mut st, id, "deleted", "DeleteInstance");
    Ok(json!({}))
}

fn delete_instances(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let ids = list_param(p, "InstanceId");
    if ids.is_empty() {
        return Err(ApiError::missing("InstanceId.1"));
    }
    if ids.len() > 100 {
        return Err(ApiError::invalid(
            "InvalidInstanceIds.Malformed",
            "At most 100 InstanceId.N are allowed.",
        ));
    }
    let force = bool_param(p, "Force")?;
    let mut st = lock(&core.state);
    for id in &ids {
        check_deletable(&st, id, force)?;
    }
    check_dry_run(p)?;
    for id in &ids {
        Core::delete_locked(&mut st, id, "deleted", "DeleteInstances");
    }
    Ok(json!({}))
}

fn key_fingerprint(public: &ssh_key::PublicKey) -> String {
    let blob = public.to_bytes().unwrap_or_default();
    let digest = sha2::Sha256::digest(&blob);
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn validate_key_pair_name(name: &str) -> Result<(), ApiError> {
    let ok = (2..=128).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("InvalidKeyPairName.Malformed", "The specified KeyPairName is not valid."))
    }
}

fn import_key_pair(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let name = req(p, "KeyPairName")?;
    let body = req(p, "PublicKeyBody")?;
    validate_key_pair_name(name)?;
    let public = ssh_key::PublicKey::from_openssh(body.trim()).map_err(|_| {
        ApiError::invalid(
            "InvalidPublicKeyBody.Malformed",
            "The specified PublicKeyBody is not a valid public key.",
        )
    })?;
    let fp = key_fingerprint(&public);
    add_key_pair(core, name, body.trim().to_string(), fp.clone())?;
    Ok(json!({ "KeyPairName": name, "KeyPairFingerPrint": fp }))
}

/// Registers a key pair; a name already taken answers `KeyPair.AlreadyExist`.
fn add_key_pair(core: &Core, name: &str, public_key: String, fingerprint: String) -> Result<(), ApiError> {
    let mut st = lock(&core.state);
    if st.key_pairs.contains_key(name) {
        return Err(ApiError::invalid(
            "KeyPair.AlreadyExist",
            &format!("The key pair \"{name}\" already exists."),
        ));
    }
    st.key_pairs.insert(
        name.to_string(),
        KeyPair { name: name.to_string(), public_key, fingerprint, created: now() },
    );
    Ok(())
}

fn create_key_pair(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let name = req(p, "KeyPairName")?;
    validate_key_pair_name(name)?;
    let key =
        ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).map_err(|e| {
            ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
        })?;
    let private = key.to_openssh(ssh_key::LineEnding::LF).map_err(|e| {
        ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
    })?;
    let public = key.public_key().to_openssh().unwrap_or_default();
    let fp = key_fingerprint(key.public_key());
    add_key_pair(core, name, public, fp.clone())?;
    Ok(json!({
        "KeyPairName": name,
        "KeyPairFingerPrint": fp,
        "KeyPairId": format!("kp-bp1{}", random_alnum(15)),
        "PrivateKeyBody": private.as_str(),
    }))
}

fn describe_key_pairs(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    check_dry_run(p)?;
    let name = get(p, "KeyPairName");
    let fp = get(p, "KeyPairFingerPrint");
    let (number, size) = page(p, 10, 50)?;
    let st = lock(&core.state);
    let all: Vec<Value> = st
        .key_pairs
        .values()
        .filter(|k| name.is_none_or(|n| super::glob(n, &k.name)))
        .filter(|k| fp.is_none_or(|f| k.fingerprint == f))
        .map(|k| {
            json!({
                "KeyPairName": k.name,
                "KeyPairFingerPrint": k.fingerprint,
                "CreationTime": rfc3339(k.created),
                "ResourceGroupId": "",
                "Tags": { "Tag": [] },
            })
        })
        .collect();
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip((number - 1) * size).take(size).collect();
    Ok(
        json!({ "KeyPairs": { "KeyPair": page }, "TotalCount": total, "PageNumber": number, "PageSize": size }),
    )
}

fn delete_key_pairs(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let names = json_list(p, "KeyPairNames")?.ok_or_else(|| ApiError::missing("KeyPairNames"))?;
    check_dry_run(p)?;
    let mut st = lock(&core.state);
    for n in names {
        st.key_pairs.remove(&n);
    }
    Ok(json!({}))
}

fn describe_images(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    check_dry_run(p)?;
    let ids: Option<Vec<&str>> = get(p, "ImageId").map(|v| v.split(',').map(str::trim).collect());
    let arch = get(p, "Architecture");
    let name = get(p, "ImageName");
    let (number, size) = page(p, 10, 100)?;
    let all: Vec<Value> = if has_resources(core, region) {
        core.catalogue
            .images
            .iter()
            .filter(|i| ids.as_ref().is_none_or(|ids| ids.contains(&i.image_id.as_str())))
            .filter(|i| arch.is_none_or(|a| i.architecture == a))
            .filter(|i| name.is_none_or(|n| super::glob(n, &i.image_id)))
            .map(|i| {
                json!({
                    "ImageId": i.image_id,
                    "ImageName": i.image_id,
                    "Architecture": i.architecture,
                    "OSType": "linux",
                    "OSName": i.os_name,
                    "OSNameEn": i.os_name,
                    "Platform": i.platform,
                    "Size": i.size,
                    "Status": "Available",
                    "ImageOwnerAlias": if i.image_id.starts_with("m-") { "self" } else { "system" },
                    "IsSupportIoOptimized": true,
                    "CreationTime": "2025-01-01T00:00:00Z",
                    "BootMode": "BIOS",
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let total = all.len();
    let page: Vec<Value> = all.into_iter().skip((number - 1) * size).take(size).collect();
    Ok(
        json!({ "Images": { "Image": page }, "TotalCount": total, "PageNumber": number, "PageSize": size, "RegionId": region }),
    )
}

fn describe_security_groups(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    check_dry_run(p)?;
    let mut wanted: Vec<String> = json_list(p, "SecurityGroupIds")?.unwrap_or_default();
    if let Some(id) = get(p, "SecurityGroupId") {
        wanted.push(id.to_string());
    }
    let vpc = get(p, "VpcId");
    let c: &Catalogue = &core.catalogue;
    let groups: Vec<Value> = if has_resources(core, region)
        && (wanted.is_empty() || wanted.contains(&c.security_group_id))
        && vpc.is_none_or(|v| v == c.vpc_id)
    {
        vec![json!({
            "SecurityGroupId": c.security_group_id,
            "SecurityGroupName": "emulator-default",
            "Description": "Allows SSH from the runner host",
            "VpcId": c.vpc_id,
            "SecurityGroupType": "normal",
            "CreationTime": "2025-01-01T00:00:00Z",
            "ResourceGroupId": "",
            "Tags": { "Tag": [] },
        })]
    } else {
        Vec::new()
    };
    let total = groups.len();
    Ok(
        json!({ "SecurityGroups": { "SecurityGroup": groups }, "TotalCount": total, "PageNumber": 1, "PageSize": 10, "RegionId": region }),
    )
}

fn describe_user_data(core: &Core, p: &Params) -> ApiResult {
    let region = region_check(core, p)?;
    let id = req(p, "InstanceId")?;
    let st = lock(&core.state);
    let i = st.instances.get(id).filter(|i| i.live).ok_or_else(|| {
        ApiError::new(
            404,
            "InvalidInstanceId.NotFound",
            &format!("The specified InstanceId \"{id}\" does not exist."),
        )
    })?;
    Ok(json!({
        "InstanceId": id,
        "RegionId": region,
        "UserData": i.user_data.as_ref().map(|u| u.expose().clone()).unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_and_tag_params() {
        let mut p = Params::new();
        p.insert("InstanceId.2".into(), "b".into());
        p.insert("InstanceId.10".into(), "c".into());
        p.insert("InstanceId.1".into(), "a".into());
        assert_eq!(list_param(&p, "InstanceId"), ["a", "b", "c"]);
        p.insert("Tag.1.Key".into(), "k".into());
        p.insert("Tag.1.Value".into(), "v".into());
        p.insert("Tag.2.Key".into(), "k2".into());
        assert_eq!(tag_params(&p).unwrap(), [("k".into(), "v".into()), ("k2".into(), String::new())]);
        p.insert("Tag.3.Value".into(), "x".into());
        assert_eq!(tag_params(&p).unwrap_err().code, "InvalidTagKey.Malformed");
    }

    #[test]
    fn auto_release_formats() {
        assert!(parse_auto_release("2030-01-01T00:00:00Z").is_ok());
        assert!(parse_auto_release("2030-01-01T00:00Z").is_ok());
        assert_eq!(
            parse_auto_release("2030-01-01 00:00:00").unwrap_err().code,
            "InvalidAutoReleaseTime.Malformed"
        );
    }
}
