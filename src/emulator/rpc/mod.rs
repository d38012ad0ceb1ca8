//! The ECS actions: parameter validation as Aliyun does it, the answers in Aliyun's exact JSON
//! shapes (docs/aliyun.md), DryRun, ClientToken idempotency and the stock-out faults.
//!
//! Why so strict: the executor's fallbacks (next offer on stock-out, retry on throttling, stop
//! on parameter errors) are only tested if the emulator answers each case with the code and
//! HTTP status Aliyun uses.

mod catalogue;
mod instances;
mod key_pairs;
mod misc;

use super::api::{ApiError, ApiResult, Params};
use super::instances::Core;
use super::ram::Principal;

pub(super) fn get<'a>(p: &'a Params, name: &str) -> Option<&'a str> {
    p.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

pub(super) fn req<'a>(p: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    get(p, name).ok_or_else(|| ApiError::missing(name))
}

pub(super) fn bool_param(p: &Params, name: &str) -> Result<bool, ApiError> {
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

pub(super) fn num_param<T: std::str::FromStr>(p: &Params, name: &str) -> Result<Option<T>, ApiError> {
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

pub(super) fn check_dry_run(p: &Params) -> Result<(), ApiError> {
    if bool_param(p, "DryRun")? {
        Err(ApiError::dry_run())
    } else {
        Ok(())
    }
}

/// `Prefix.1`, `Prefix.2`, … in numeric order.
pub(super) fn list_param(p: &Params, prefix: &str) -> Vec<String> {
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
pub(super) fn tag_params(p: &Params) -> Result<Vec<(String, String)>, ApiError> {
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
pub(super) fn json_list(p: &Params, name: &str) -> Result<Option<Vec<String>>, ApiError> {
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

pub(super) fn region_check<'a>(core: &Core, p: &'a Params) -> Result<&'a str, ApiError> {
    let r = get(p, "RegionId")
        .ok_or_else(|| ApiError::new(400, "MissingRegionId", "RegionId is mandatory for this action."))?;
    if !core.catalogue.regions.iter().any(|x| x.region_id == r) {
        return Err(ApiError::new(404, "InvalidRegionId.NotFound", "The specified RegionId does not exist."));
    }
    Ok(r)
}

/// Whether a region has resources.
pub(super) fn has_resources(core: &Core, region: &str) -> bool {
    region == core.catalogue.region
}

/// `PageNumber`/`PageSize` with Aliyun's bounds.
pub(super) fn page(p: &Params, default_size: usize, max_size: usize) -> Result<(usize, usize), ApiError> {
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

pub(super) fn next_token(offset: usize) -> String {
    format!("ntk{offset:08x}")
}

pub(super) fn parse_next_token(p: &Params) -> Result<usize, ApiError> {
    match get(p, "NextToken") {
        None => Ok(0),
        Some(t) => t.strip_prefix("ntk").and_then(|h| usize::from_str_radix(h, 16).ok()).ok_or_else(|| {
            ApiError::invalid("InvalidNextToken.Malformed", "The specified parameter NextToken is not valid.")
        }),
    }
}

pub(super) fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// FNV-1a, for deterministic price wiggles.
pub(super) fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// `SpotDuration`, the protection period in hours, of `RunInstances`,
/// `DescribeSpotPriceHistory` and `DescribeAvailableResource`: "Default value: 1", and
/// `RunInstances` "can only be set to 0 or 1" (the current SDK's request models; see
/// `crate::pricing`).
pub(super) fn spot_duration(p: &Params) -> Result<u32, ApiError> {
    let hours = num_param::<u32>(p, "SpotDuration")?.unwrap_or(crate::pricing::DEFAULT_PROTECTION_HOURS);
    if !crate::pricing::PROTECTION_HOURS.contains(&hours) {
        return Err(ApiError::invalid("InvalidSpotDuration", "The specified SpotDuration is not valid."));
    }
    Ok(hours)
}

pub(super) fn validate_spot_strategy(s: &str) -> Result<(), ApiError> {
    if ["NoSpot", "SpotWithPriceLimit", "SpotAsPriceGo"].contains(&s) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "InvalidSpotStrategy",
            &format!("The specified SpotStrategy \"{s}\" is not valid."),
        ))
    }
}

/// Dispatches an authenticated request.
pub(crate) fn dispatch(core: &Core, action: &str, p: &Params, who: &Principal) -> ApiResult {
    if p.get("Version").map(String::as_str) == Some(super::sts::VERSION) {
        return super::sts::dispatch(core, action, p, who);
    }
    super::ram::authorize(&core.catalogue.region, action, p, who)?;
    match action {
        "DescribeRegions" => catalogue::describe_regions(core, p),
        "DescribeZones" => catalogue::describe_zones(core, p),
        "DescribeInstanceTypes" => catalogue::describe_instance_types(core, p),
        "DescribeAvailableResource" => catalogue::describe_available_resource(core, p),
        "DescribeSpotPriceHistory" => catalogue::describe_spot_price_history(core, p),
        "RunInstances" => instances::run_instances(core, p),
        "DescribeInstances" => instances::describe_instances(core, p),
        "DescribeInstanceStatus" => instances::describe_instance_status(core, p),
        "DeleteInstance" => instances::delete_instance(core, p),
        "DeleteInstances" => instances::delete_instances(core, p),
        "ImportKeyPair" => key_pairs::import_key_pair(core, p),
        "CreateKeyPair" => key_pairs::create_key_pair(core, p),
        "DescribeKeyPairs" => key_pairs::describe_key_pairs(core, p),
        "DeleteKeyPairs" => key_pairs::delete_key_pairs(core, p),
        "DescribeImages" => misc::describe_images(core, p),
        "DescribeSecurityGroups" => misc::describe_security_groups(core, p),
        "DescribeUserData" => instances::describe_user_data(core, p),
        _ => Err(ApiError::new(
            404,
            "InvalidAction.NotFound",
            &format!("Specified api \"{action}\" is not found, please check your url and method."),
        )),
    }
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
}
