#!/usr/bin/env python3
"""Drives the emulator with Aliyun's official Python SDK (aliyun-python-sdk-core/-ecs), unchanged.

Usage: sdk_conformance.py HOST PORT ACCESS_KEY_ID ACCESS_KEY_SECRET

Why: the emulator claims to speak ECS closely enough that Aliyun's own SDK works against it.
This script uses the SDK's own request classes and signer; it prints one `OK <check>` line per
passed check and exits non-zero (with `FAIL <check>: <why>`) on the first mismatch. Only the
given loopback endpoint is contacted.
"""

import base64
import json
import sys
import uuid

from aliyunsdkcore.acs_exception.exceptions import ServerException
from aliyunsdkcore.client import AcsClient
from aliyunsdkecs.request.v20140526.DeleteInstanceRequest import DeleteInstanceRequest
from aliyunsdkecs.request.v20140526.DescribeAvailableResourceRequest import DescribeAvailableResourceRequest
from aliyunsdkecs.request.v20140526.DescribeInstancesRequest import DescribeInstancesRequest
from aliyunsdkecs.request.v20140526.DescribeInstanceTypesRequest import DescribeInstanceTypesRequest
from aliyunsdkecs.request.v20140526.DescribeRegionsRequest import DescribeRegionsRequest
from aliyunsdkecs.request.v20140526.DescribeSpotPriceHistoryRequest import DescribeSpotPriceHistoryRequest
from aliyunsdkecs.request.v20140526.RunInstancesRequest import RunInstancesRequest

HOST, PORT, AK, SECRET = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
REGION = "cn-hangzhou"


def fail(check, why):
    print(f"FAIL {check}: {why}", flush=True)
    sys.exit(1)


def ok(check, detail=""):
    print(f"OK {check} {detail}".rstrip(), flush=True)


def client(secret=SECRET):
    return AcsClient(AK, secret, REGION, port=PORT, timeout=10, connect_timeout=5, max_retry_time=0, auto_retry=False)


def call(c, req):
    req.set_endpoint(HOST)
    req.set_protocol_type("http")
    return json.loads(c.do_action_with_exception(req))


def expect(check, cond, why):
    if not cond:
        fail(check, why)


def main():
    c = client()

    r = call(c, DescribeRegionsRequest())
    ids = [x["RegionId"] for x in r["Regions"]["Region"]]
    expect("DescribeRegions", REGION in ids and len(ids) > 1 and r.get("RequestId"), f"regions {ids}")
    ok("DescribeRegions", f"{len(ids)} regions")

    req = DescribeInstanceTypesRequest()
    req.set_CpuArchitecture("ARM")
    req.set_MinimumCpuCoreCount(8)
    req.set_MaximumCpuCoreCount(16)
    req.set_MaxResults(3)
    seen, token = [], None
    while True:
        if token:
            req.set_NextToken(token)
        r = call(c, req)
        for t in r["InstanceTypes"]["InstanceType"]:
            expect("DescribeInstanceTypes", t["CpuArchitecture"] == "ARM" and 8 <= t["CpuCoreCount"] <= 16, str(t))
            seen.append(t["InstanceTypeId"])
        token = r.get("NextToken")
        if not token:
            break
    expect("DescribeInstanceTypes", "ecs.c8y.2xlarge" in seen and len(seen) > 3, f"types {seen}")
    ok("DescribeInstanceTypes", f"{len(seen)} ARM types over pages")

    req = DescribeAvailableResourceRequest()
    req.set_DestinationResource("InstanceType")
    req.set_InstanceChargeType("PostPaid")
    req.set_SpotStrategy("SpotAsPriceGo")
    req.set_InstanceType("ecs.c8y.2xlarge")
    r = call(c, req)
    zones = [z["ZoneId"] for z in r["AvailableZones"]["AvailableZone"]]
    expect("DescribeAvailableResource", set(zones) <= {"cn-hangzhou-b", "cn-hangzhou-j", "cn-hangzhou-k"} and zones, f"zones {zones}")
    ok("DescribeAvailableResource", ",".join(zones))

    req = DescribeSpotPriceHistoryRequest()
    req.set_NetworkType("vpc")
    req.set_InstanceType("ecs.c7.large")
    req.set_IoOptimized("optimized")
    req.set_OSType("linux")
    r = call(c, req)
    pts = r["SpotPrices"]["SpotPriceType"]
    expect("DescribeSpotPriceHistory", len(pts) >= 6 and all(p["SpotPrice"] < p["OriginPrice"] for p in pts), str(pts[:2]))
    ok("DescribeSpotPriceHistory", f"{len(pts)} points, currency {r['Currency']}")

    token = str(uuid.uuid4())
    req = RunInstancesRequest()
    req.set_ZoneId("cn-hangzhou-j")
    req.set_InstanceType("ecs.c7.large")
    req.set_ImageId("ubuntu_24_04_x64_20G_alibase_20250101.vhd")
    req.set_SecurityGroupId("sg-bp1emulator0000000001")
    req.set_VSwitchId("vsw-bp1emulatorzonej")
    # UTF-8 in the name, and a space too in a tag value: ECS refuses a space in an InstanceName.
    req.set_InstanceName("conformance-构建")
    req.set_SpotStrategy("SpotAsPriceGo")
    req.set_InternetMaxBandwidthOut(1)
    req.set_Amount(1)
    req.set_UserData(base64.b64encode(b"#cloud-config\nssh_authorized_keys: []\n").decode())
    req.set_Tags([{"Key": "managed-by", "Value": "conformance 构建"}, {"Key": "job", "Value": "42"}])
    req.set_ClientToken(token)
    r = call(c, req)
    ids = r["InstanceIdSets"]["InstanceIdSet"]
    expect("RunInstances", len(ids) == 1 and ids[0].startswith("i-bp1") and len(ids[0]) == 20, str(r))
    # Same ClientToken, same parameters: same instance.
    r2 = call(c, req)
    expect("RunInstances", r2["InstanceIdSets"]["InstanceIdSet"] == ids, f"idempotency: {r2}")
    ok("RunInstances", ids[0])

    req = DescribeInstancesRequest()
    req.set_InstanceIds(json.dumps(ids))
    req.set_Tags([{"Key": "job", "Value": "42"}])
    r = call(c, req)
    insts = r["Instances"]["Instance"]
    expect("DescribeInstances", len(insts) == 1 and r["TotalCount"] == 1, str(r))
    i = insts[0]
    tags = {t["TagKey"]: t["TagValue"] for t in i["Tags"]["Tag"]}
    expect("DescribeInstances", tags == {"managed-by": "conformance 构建", "job": "42"}, str(tags))
    expect("DescribeInstances", i["InstanceName"] == "conformance-构建" and i["ZoneId"] == "cn-hangzhou-j", str(i))
    ip = i["VpcAttributes"]["PrivateIpAddress"]["IpAddress"]
    expect("DescribeInstances", len(ip) == 1 and i["PublicIpAddress"]["IpAddress"] == ip, str(i))
    ok("DescribeInstances", f"{i['InstanceId']} {i['Status']} {ip[0]}")

    req = DeleteInstanceRequest()
    req.set_InstanceId(ids[0])
    req.set_Force(True)
    call(c, req)
    try:
        call(c, req)
        fail("DeleteInstance", "second delete succeeded")
    except ServerException as e:
        expect("DeleteInstance", e.get_error_code() == "InvalidInstanceId.NotFound" and e.get_http_status() == 404, str(e))
    ok("DeleteInstance", "then InvalidInstanceId.NotFound")

    # A wrong secret: the server answers 400 SignatureDoesNotMatch with its string to sign; the
    # SDK compares that with its own and, when they agree, reports InvalidAccessKeySecret.
    try:
        call(client("wrong-secret"), DescribeRegionsRequest())
        fail("WrongSecret", "request with a wrong secret succeeded")
    except ServerException as e:
        expect(
            "WrongSecret",
            e.get_http_status() == 400 and e.get_error_code() in ("SignatureDoesNotMatch", "InvalidAccessKeySecret"),
            f"{e.get_http_status()} {e.get_error_code()} {e.get_error_msg()}",
        )
        ok("WrongSecret", f"{e.get_http_status()} {e.get_error_code()}")
    print("CONFORMANCE OK", flush=True)


if __name__ == "__main__":
    main()
