//! The remaining read-only actions: DescribeImages and DescribeSecurityGroups.

use serde_json::{json, Value};

use super::{check_dry_run, get, has_resources, json_list, page, region_check};
use crate::emulator::api::{ApiResult, Params};
use crate::emulator::catalogue::Catalogue;
use crate::emulator::instances::Core;

pub(super) fn describe_images(core: &Core, p: &Params) -> ApiResult {
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
            .filter(|i| name.is_none_or(|n| crate::pattern::glob_match(n, &i.image_id)))
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

pub(super) fn describe_security_groups(core: &Core, p: &Params) -> ApiResult {
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
