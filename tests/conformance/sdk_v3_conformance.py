#!/usr/bin/env python3
"""Drives the emulator with Aliyun's current official Python SDK (alibabacloud-ecs20140526 over
alibabacloud-tea-openapi: ACS3-HMAC-SHA256 "V3" signatures, the action in `x-acs-action`),
unchanged, and checks that it gets the same answers as the legacy SDK (aliyun-python-sdk-ecs,
signature v1) asking the same questions.

Usage: sdk_v3_conformance.py HOST PORT ACCESS_KEY_ID ACCESS_KEY_SECRET

Prints one `OK <check>` line per passed check and exits non-zero (with `FAIL <check>: <why>`)
on the first mismatch; a missing SDK is a failure, never a skip. Only the given loopback
endpoint is contacted.
"""

import base64
import json
import sys
import uuid

try:
    from alibabacloud_ecs20140526 import models as ecs
    from alibabacloud_ecs20140526.client import Client as EcsV3
    from alibabacloud_tea_openapi import utils_models as openapi
    from darabonba.runtime import RuntimeOptions

    from aliyunsdkcore.client import AcsClient
    from aliyunsdkecs.request.v20140526.DescribeAvailableResourceRequest import DescribeAvailableResourceRequest
    from aliyunsdkecs.request.v20140526.DescribeInstanceTypesRequest import DescribeInstanceTypesRequest
    from aliyunsdkecs.request.v20140526.DescribeRegionsRequest import DescribeRegionsRequest
    from aliyunsdkecs.request.v20140526.DescribeSpotPriceHistoryRequest import DescribeSpotPriceHistoryRequest
except ImportError as e:
    print(f"FAIL import: {e} (install alibabacloud-ecs20140526 and aliyun-python-sdk-ecs)", flush=True)
    sys.exit(2)

HOST, PORT, AK, SECRET = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
REGION = "cn-hangzhou"


def fail(check, why):
    print(f"FAIL {check}: {why}", flush=True)
    sys.exit(1)


def ok(check, detail=""):
    print(f"OK {check} {detail}".rstrip(), flush=True)


def expect(check, cond, why):
    if not cond:
        fail(check, why)


def v3(secret=SECRET):
    config = openapi.Config(
        access_key_id=AK,
        access_key_secret=secret,
        region_id=REGION,
        endpoint=f"{HOST}:{PORT}",
        protocol="http",
        read_timeout=10000,
        connect_timeout=5000,
    )
    return EcsV3(config)


RUNTIME = RuntimeOptions()


def body(resp):
    """The answer as the legacy SDK would see it: the JSON body, without the RequestId."""
    m = resp.body.to_map()
    m.pop("RequestId", None)
    return m


def legacy(req):
    c = AcsClient(AK, SECRET, REGION, port=PORT, timeout=10, connect_timeout=5, max_retry_time=0, auto_retry=False)
    req.set_endpoint(HOST)
    req.set_protocol_type("http")
    m = json.loads(c.do_action_with_exception(req))
    m.pop("RequestId", None)
    return m


def same(check, new, old):
    expect(check, new == old, f"V3 answer differs from the legacy SDK's:\nV3:     {json.dumps(new, sort_keys=True)[:2000]}\nlegacy: {json.dumps(old, sort_keys=True)[:2000]}")


def server_error(call):
    """Runs `call`, which must fail; returns the SDK's exception carrying `code` and `statusCode`."""
    try:
        call()
    except Exception as e:  # the SDK wraps the server's error; unwrap to what callers read
        inner = getattr(e, "inner_exception", None) or e
        return inner
    return None


def main():
    c = v3()

    r = c.describe_regions_with_options(ecs.DescribeRegionsRequest(), RUNTIME)
    ids = [x["RegionId"] for x in body(r)["Regions"]["Region"]]
    expect("DescribeRegions", REGION in ids and len(ids) > 1 and r.body.request_id, f"regions {ids}")
    expect("DescribeRegions", r.status_code == 200, str(r.status_code))
    same("DescribeRegions", body(r), legacy(DescribeRegionsRequest()))
    ok("DescribeRegions", f"{len(ids)} regions, same as legacy")

    seen, token, pages = [], None, 0
    while True:
        req = ecs.DescribeInstanceTypesRequest(
            cpu_architecture="ARM", minimum_cpu_core_count=8, maximum_cpu_core_count=16, max_results=3, next_token=token
        )
        r = body(c.describe_instance_types_with_options(req, RUNTIME))
        old = DescribeInstanceTypesRequest()
        old.set_CpuArchitecture("ARM")
        old.set_MinimumCpuCoreCount(8)
        old.set_MaximumCpuCoreCount(16)
        old.set_MaxResults(3)
        if token:
            old.set_NextToken(token)
        same("DescribeInstanceTypes", r, legacy(old))
        for t in r["InstanceTypes"]["InstanceType"]:
            expect("DescribeInstanceTypes", t["CpuArchitecture"] == "ARM" and 8 <= t["CpuCoreCount"] <= 16, str(t))
            seen.append(t["InstanceTypeId"])
        pages += 1
        token = r.get("NextToken")
        if not token:
            break
    expect("DescribeInstanceTypes", "ecs.c8y.2xlarge" in seen and len(seen) > 3 and pages > 1, f"types {seen}")
    ok("DescribeInstanceTypes", f"{len(seen)} ARM types over {pages} pages, same as legacy")

    req = ecs.DescribeAvailableResourceRequest(
        region_id=REGION,
        destination_resource="InstanceType",
        instance_charge_type="PostPaid",
        spot_strategy="SpotAsPriceGo",
        instance_type="ecs.c8y.2xlarge",
    )
    r = body(c.describe_available_resource_with_options(req, RUNTIME))
    zones = [z["ZoneId"] for z in r["AvailableZones"]["AvailableZone"]]
    expect("DescribeAvailableResource", zones and set(zones) <= {"cn-hangzhou-b", "cn-hangzhou-j", "cn-hangzhou-k"}, f"zones {zones}")
    old = DescribeAvailableResourceRequest()
    old.set_DestinationResource("InstanceType")
    old.set_InstanceChargeType("PostPaid")
    old.set_SpotStrategy("SpotAsPriceGo")
    old.set_InstanceType("ecs.c8y.2xlarge")
    same("DescribeAvailableResource", r, legacy(old))
    ok("DescribeAvailableResource", ",".join(zones) + ", same as legacy")

    req = ecs.DescribeSpotPriceHistoryRequest(
        region_id=REGION,
        network_type="vpc",
        instance_type="ecs.c7.large",
        io_optimized="optimized",
        ostype="linux",
    )
    r = body(c.describe_spot_price_history_with_options(req, RUNTIME))
    pts = r["SpotPrices"]["SpotPriceType"]
    expect("DescribeSpotPriceHistory", len(pts) >= 6 and all(p["SpotPrice"] < p["OriginPrice"] for p in pts), str(pts[:2]))
    old = DescribeSpotPriceHistoryRequest()
    old.set_NetworkType("vpc")
    old.set_InstanceType("ecs.c7.large")
    old.set_IoOptimized("optimized")
    old.set_OSType("linux")
    same("DescribeSpotPriceHistory", r, legacy(old))
    ok("DescribeSpotPriceHistory", f"{len(pts)} points, currency {r['Currency']}, same as legacy")

    token = str(uuid.uuid4())
    req = ecs.RunInstancesRequest(
        region_id=REGION,
        zone_id="cn-hangzhou-j",
        instance_type="ecs.c7.large",
        image_id="ubuntu_24_04_x64_20G_alibase_20250101.vhd",
        security_group_id="sg-bp1emulator0000000001",
        v_switch_id="vsw-bp1emulatorzonej",
        # UTF-8 in the name, and a space too in a tag value: ECS refuses a space in an InstanceName.
        instance_name="conformance-v3-构建",
        spot_strategy="SpotAsPriceGo",
        internet_max_bandwidth_out=1,
        amount=1,
        user_data=base64.b64encode(b"#cloud-config\nssh_authorized_keys: []\n").decode(),
        tag=[ecs.RunInstancesRequestTag(key="managed-by", value="conformance 构建"), ecs.RunInstancesRequestTag(key="job", value="43")],
        client_token=token,
    )
    r = body(c.run_instances_with_options(req, RUNTIME))
    ids = r["InstanceIdSets"]["InstanceIdSet"]
    expect("RunInstances", len(ids) == 1 and ids[0].startswith("i-bp1") and len(ids[0]) == 20, str(r))
    r2 = body(c.run_instances_with_options(req, RUNTIME))
    expect("RunInstances", r2["InstanceIdSets"]["InstanceIdSet"] == ids, f"idempotency: {r2}")
    ok("RunInstances", ids[0])

    req = ecs.DescribeInstancesRequest(
        region_id=REGION, instance_ids=json.dumps(ids), tag=[ecs.DescribeInstancesRequestTag(key="job", value="43")]
    )
    r = body(c.describe_instances_with_options(req, RUNTIME))
    insts = r["Instances"]["Instance"]
    expect("DescribeInstances", len(insts) == 1 and r["TotalCount"] == 1, str(r))
    i = insts[0]
    tags = {t["TagKey"]: t["TagValue"] for t in i["Tags"]["Tag"]}
    expect("DescribeInstances", tags == {"managed-by": "conformance 构建", "job": "43"}, str(tags))
    expect("DescribeInstances", i["InstanceName"] == "conformance-v3-构建" and i["ZoneId"] == "cn-hangzhou-j", str(i))
    ok("DescribeInstances", f"{i['InstanceId']} {i['Status']}")

    req = ecs.DeleteInstanceRequest(instance_id=ids[0], force=True)
    c.delete_instance_with_options(req, RUNTIME)
    e = server_error(lambda: c.delete_instance_with_options(req, RUNTIME))
    expect("DeleteInstance", e is not None, "second delete succeeded")
    expect(
        "DeleteInstance",
        getattr(e, "code", None) == "InvalidInstanceId.NotFound" and getattr(e, "status_code", None) == 404,
        f"{type(e).__name__} {getattr(e, 'status_code', None)} {getattr(e, 'code', None)} {e}",
    )
    ok("DeleteInstance", "then InvalidInstanceId.NotFound")

    # A wrong secret: HTTP 400 SignatureDoesNotMatch with Aliyun's JSON error body, which the SDK
    # turns into a ClientException carrying the code, the status and the request id.
    e = server_error(lambda: v3("wrong-secret").describe_regions_with_options(ecs.DescribeRegionsRequest(), RUNTIME))
    expect("WrongSecret", e is not None, "request with a wrong secret succeeded")
    expect(
        "WrongSecret",
        type(e).__name__ == "ClientException"
        and e.status_code == 400
        and e.code == "SignatureDoesNotMatch"
        and "Specified signature does not match our calculation." in str(e.message)
        and e.request_id not in (None, "", "None"),
        f"{type(e).__name__} {getattr(e, 'status_code', None)} {getattr(e, 'code', None)} {getattr(e, 'message', e)}",
    )
    ok("WrongSecret", f"{e.status_code} {e.code}")
    print("CONFORMANCE V3 OK", flush=True)


if __name__ == "__main__":
    main()
