//! The catalogue's actions: regions, zones, instance types, stock and spot price history.

use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{
    check_dry_run, fnv, get, has_resources, list_param, next_token, num_param, parse_next_token,
    region_check, req, round4, spot_duration, validate_spot_strategy,
};
use crate::emulator::api::{ApiError, ApiResult, Params};
use crate::emulator::catalogue::InstanceType;
use crate::emulator::instances::{now, rfc3339, Core};

pub(super) fn describe_regions(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn describe_zones(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn type_json(t: &InstanceType) -> Value {
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

pub(super) fn describe_instance_types(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn describe_available_resource(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn parse_time(p: &Params, name: &str) -> Result<Option<OffsetDateTime>, ApiError> {
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

const SPOT_PAGE: usize = 100;

pub(super) fn describe_spot_price_history(core: &Core, p: &Params) -> ApiResult {
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
