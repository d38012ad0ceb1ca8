//! The instances' actions: RunInstances (validate, then create), DescribeInstances,
//! DescribeInstanceStatus, DescribeUserData and the deletes.

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;
use time::OffsetDateTime;

use super::{
    bool_param, check_dry_run, fnv, get, has_resources, json_list, list_param, next_token, num_param, page,
    parse_next_token, region_check, req, round4, spot_duration, tag_params, validate_spot_strategy,
};
use crate::emulator::api::{ApiError, ApiResult, Params};
use crate::emulator::catalogue::InstanceType;
use crate::emulator::cloudconfig;
use crate::emulator::instances::{
    ecs_minutes, lock, now, random_alnum, rfc3339, Core, Instance, State, Status,
};
use crate::secret::Secret;

/// Parameters that do not take part in ClientToken idempotency.
pub(super) const NON_IDEMPOTENT_PARAMS: &[&str] = &[
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

pub(super) fn fingerprint(p: &Params) -> String {
    let mut h = sha2::Sha256::new();
    for (k, v) in p.iter().filter(|(k, _)| !NON_IDEMPOTENT_PARAMS.contains(&k.as_str())) {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    format!("{:x}", h.finalize())
}

pub(super) const MAX_USER_DATA: usize = 32 * 1024;

/// The request of a `RunInstances` that passed every check: what [`create`] needs.
struct Launch<'a> {
    client_token: Option<&'a str>,
    itype: &'a InstanceType,
    zone: String,
    image_id: &'a str,
    security_group_id: &'a str,
    vswitch_id: &'a str,
    spot_strategy: &'a str,
    spot_price_limit: Option<f64>,
    spot_duration: Option<u32>,
    amount: i64,
    bandwidth_out: u32,
    tags: Vec<(String, String)>,
    auto_release: Option<OffsetDateTime>,
    key_pair: Option<&'a str>,
    authorized_keys: Vec<String>,
    host_key: Option<Secret<String>>,
    never_boot: bool,
    initializing: std::time::Duration,
}

pub(super) fn run_instances(core: &Core, p: &Params) -> ApiResult {
    region_check(core, p)?;
    let client_token = client_token(p)?;
    if let Some(tok) = client_token {
        let st = lock(&core.state);
        if let Some(ids) = earlier_run(&st, tok, p)? {
            if !bool_param(p, "DryRun")? {
                return Ok(run_answer(core, &st, ids));
            }
        }
    }
    let launch = validate_run(core, p, client_token)?;
    create(core, p, &launch)
}

/// `ClientToken`: at most 64 ASCII characters.
fn client_token(p: &Params) -> Result<Option<&str>, ApiError> {
    match get(p, "ClientToken") {
        Some(tok) if tok.len() > 64 || !tok.is_ascii() => {
            Err(ApiError::invalid("InvalidClientToken.Malformed", "The specified ClientToken is not valid."))
        }
        tok => Ok(tok),
    }
}

/// The instances an earlier request with the same `ClientToken` created; the same token with
/// other parameters answers `IdempotentParameterMismatch`.
fn earlier_run<'s>(st: &'s State, tok: &str, p: &Params) -> Result<Option<&'s [String]>, ApiError> {
    match st.client_tokens.get(tok) {
        None => Ok(None),
        Some((fp, _)) if *fp != fingerprint(p) => Err(ApiError::invalid(
            "IdempotentParameterMismatch",
            "The specified parameters are different from before with the same ClientToken.",
        )),
        Some((_, ids)) => Ok(Some(ids)),
    }
}

/// Every check of `RunInstances`, in Aliyun's order, ending with the faults and `DryRun`.
fn validate_run<'a>(
    core: &'a Core,
    p: &'a Params,
    client_token: Option<&'a str>,
) -> Result<Launch<'a>, ApiError> {
    let region = region_check(core, p)?;
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
    // Codes and messages as Aliyun's RunInstances error table gives them
    // (tests/data/runinstances-errors.tsv, shared with the driver's classifier).
    let published = |code: &str| {
        let row = crate::ecs::published_error(code).expect("a code of the published table");
        ApiError::new(row.http_status, row.code, row.message)
    };
    // `HostName` and `InstanceName` by the rules the configuration validator also applies
    // (`crate::ecs::names`, which cites the RunInstances reference and request model).
    if get(p, "HostName").is_some_and(|h| crate::ecs::names::host_name_problem(h).is_some()) {
        return Err(published("InvalidHostName.Malformed"));
    }
    if get(p, "InstanceName").is_some_and(|n| crate::ecs::names::instance_name_problem(n).is_some()) {
        return Err(published("InvalidInstanceName.Malformed"));
    }
    let spot_limit = num_param::<f64>(p, "SpotPriceLimit").map_err(|_| published("InvalidSpotPriceLimit"))?;
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
            return Err(published("InvalidSpotPriceLimit.LowerThanPublicPrice"));
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
    if let Some(e) = crate::emulator::faults::run_error(&faults, itype_id, &zone) {
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
    Ok(Launch {
        client_token,
        itype,
        image_id,
        security_group_id: sg,
        vswitch_id: vswitch,
        spot_strategy,
        spot_price_limit: if spot_strategy == "SpotWithPriceLimit" { spot_limit } else { None },
        spot_duration,
        amount,
        bandwidth_out: bandwidth,
        tags,
        auto_release,
        key_pair,
        authorized_keys: authorized,
        host_key,
        never_boot: faults.never_boots(itype_id, &zone),
        initializing: faults.initializing,
        zone,
    })
}

/// Creates the instances of a validated request (or answers the ones a concurrent request with
/// the same `ClientToken` created first).
fn create(core: &Core, p: &Params, l: &Launch) -> ApiResult {
    let (boot_delay, ssh_delay) = core.delays();
    let mut st = lock(&core.state);
    // A concurrent request with the same token may have won the race.
    if let Some(tok) = l.client_token {
        if let Some(ids) = earlier_run(&st, tok, p)? {
            return Ok(run_answer(core, &st, ids));
        }
    }
    let mut ids = Vec::new();
    for n in 0..l.amount {
        let (ip, port) = core.allocate_ip().map_err(|e| {
            ApiError::new(500, "InternalError", &format!("The request processing has failed: {e}"))
        })?;
        let id = format!("i-bp1{}", random_alnum(15));
        let t = now();
        let mut inst = Instance {
            id: id.clone(),
            name: match get(p, "InstanceName") {
                Some(name) if l.amount > 1 => format!("{name}{:03}", n + 1),
                Some(name) => name.to_string(),
                None => format!("launch-advisor-{}", &rfc3339(t)[..10].replace('-', "")),
            },
            host_name: get(p, "HostName").map(str::to_string).unwrap_or_else(|| format!("iZ{}Z", &id[2..])),
            instance_type: l.itype.id.clone(),
            zone: l.zone.clone(),
            image_id: l.image_id.to_string(),
            vswitch_id: l.vswitch_id.to_string(),
            security_group_id: l.security_group_id.to_string(),
            spot_strategy: l.spot_strategy.to_string(),
            spot_price_limit: l.spot_price_limit,
            spot_duration: l.spot_duration,
            bandwidth_out: l.bandwidth_out,
            key_pair_name: l.key_pair.map(str::to_string),
            ram_role: get(p, "RamRoleName").map(str::to_string),
            user_data: get(p, "UserData").map(|s| Secret::new(s.to_string())),
            tags: l.tags.clone(),
            auto_release: l.auto_release,
            client_token: l.client_token.map(str::to_string),
            cpu: l.itype.cores,
            memory_mib: (l.itype.memory_gib * 1024.0) as u64,
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
            never_boot: l.never_boot,
            initializing: l.initializing,
            termination_time: None,
            authorized_keys: l.authorized_keys.clone(),
            host_key: l.host_key.clone(),
            sshd_pid: None,
            boot_pid: None,
            sshd_started: false,
            events: Vec::new(),
            live: true,
        };
        inst.event("created", format!("{} in {}, {}, ip {ip}", l.itype.id, l.zone, l.spot_strategy));
        st.instances.insert(id.clone(), inst);
        st.order.push(id.clone());
        st.created += 1;
        ids.push(id);
    }
    if let Some(tok) = l.client_token {
        st.client_tokens.insert(tok.to_string(), (fingerprint(p), ids.clone()));
    }
    Ok(run_answer(core, &st, &ids))
}

pub(super) fn parse_auto_release(v: &str) -> Result<OffsetDateTime, ApiError> {
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

pub(super) fn run_answer(core: &Core, st: &State, ids: &[String]) -> Value {
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

pub(super) fn instance_json(core: &Core, i: &Instance) -> Value {
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
pub(super) fn live_instances<'a>(st: &'a State) -> impl Iterator<Item = &'a Instance> + 'a {
    st.order.iter().rev().filter_map(|id| st.instances.get(id)).filter(|i| i.live)
}

pub(super) fn describe_instances(core: &Core, p: &Params) -> ApiResult {
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
            .filter(|i| name.is_none_or(|n| crate::pattern::glob_match(n, &i.name)))
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

pub(super) fn describe_instance_status(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn check_deletable(st: &State, id: &str, force: bool) -> Result<(), ApiError> {
    let Some(i) = st.instances.get(id).filter(|i| i.live) else {
        return Err(ApiError::new(
            404,
            "InvalidInstanceId.NotFound",
            &format!("The specified InstanceId \"{id}\" does not exist."),
        ));
    };
    crate::emulator::faults::check_initialized(i)?;
    if !force && i.status != Status::Stopped {
        return Err(ApiError::new(
            403,
            "IncorrectInstanceStatus",
            &format!("The current status of the resource does not support this operation (instance is {}; use Force).", i.status.as_str()),
        ));
    }
    Ok(())
}

pub(super) fn delete_instance(core: &Core, p: &Params) -> ApiResult {
    let id = req(p, "InstanceId")?;
    let force = bool_param(p, "Force")?;
    let mut st = lock(&core.state);
    check_deletable(&st, id, force)?;
    check_dry_run(p)?;
    Core::delete_locked(&mut st, id, "deleted", "DeleteInstance");
    Ok(json!({}))
}

pub(super) fn delete_instances(core: &Core, p: &Params) -> ApiResult {
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

pub(super) fn describe_user_data(core: &Core, p: &Params) -> ApiResult {
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
    fn auto_release_formats() {
        assert!(parse_auto_release("2030-01-01T00:00:00Z").is_ok());
        assert!(parse_auto_release("2030-01-01T00:00Z").is_ok());
        assert_eq!(
            parse_auto_release("2030-01-01 00:00:00").unwrap_err().code,
            "InvalidAutoReleaseTime.Malformed"
        );
    }
}
