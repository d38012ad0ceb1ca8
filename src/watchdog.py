#!/usr/bin/env python3
# aliyun-spot-executor self-destruct watchdog.
#
# Installed into every instance through cloud-config. It is the last safety net after cleanup
# and AutoReleaseTime: when no stage has run for the idle timeout, or the instance has outlived
# its maximum lifetime, it deletes its own instance with a signed DeleteInstance call. Its
# credentials: by default the STS credentials the runner host writes over SSH to
# <credentials_dir>/<instance id>.json (root only; their session policy allows deleting this
# instance and nothing else); with the opt-in shared-role mode, the instance RAM role's
# (metadata service, hardened mode). Standard library only, so any image with python3 runs it.
#
# Usage: watchdog.py [CONFIG_JSON] [--once]
#   CONFIG_JSON  default /etc/aliyun-spot-executor/watchdog.json
#   --once       check once and exit (0: kept, 3: deleted, 1: error)
import base64
import datetime
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


def log(msg):
    sys.stderr.write("aliyun-spot-watchdog: %s\n" % msg)
    sys.stderr.flush()


def metadata(conf, path, token):
    req = urllib.request.Request(conf["metadata"].rstrip("/") + "/latest/meta-data/" + path)
    req.add_header("X-aliyun-ecs-metadata-token", token)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def metadata_token(conf):
    # Hardened mode: a session token first. A failure here fails the check, which is retried
    # at the next poll.
    req = urllib.request.Request(conf["metadata"].rstrip("/") + "/latest/api/token", method="PUT")
    req.add_header("X-aliyun-ecs-metadata-token-ttl-seconds", "300")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def encode(s):
    return urllib.parse.quote(s, safe="~")


def call_ecs(conf, creds, action, params):
    p = dict(params)
    p.update({
        "Action": action,
        "Version": "2014-05-26",
        "Format": "JSON",
        "AccessKeyId": creds["AccessKeyId"],
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "SignatureNonce": str(uuid.uuid4()),
        "Timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "RegionId": conf["region_id"],
    })
    if creds.get("SecurityToken"):
        p["SecurityToken"] = creds["SecurityToken"]
    canonical = "&".join("%s=%s" % (encode(k), encode(v)) for k, v in sorted(p.items()))
    to_sign = "POST&%2F&" + encode(canonical)
    key = (creds["AccessKeySecret"] + "&").encode()
    p["Signature"] = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha1).digest()).decode()
    # Common parameters and the signature in the query, the action's own in the form body, one
    # signature over both: the layout of the runner's client (`src/ecs/sign.rs`, `sign_split`,
    # after aliyun-python-sdk-core's `rpc_signature_composer.get_signed_url`).
    query = dict((k, v) for k, v in p.items() if k not in params)
    form = dict((k, v) for k, v in p.items() if k in params)
    url = conf["endpoint"].rstrip("/") + "/?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    body = urllib.parse.urlencode(form, quote_via=urllib.parse.quote).encode()
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read().decode() or "{}")
    except urllib.error.HTTPError as e:
        # Only the error code and request id are shown: an error message may quote the
        # string to sign, which holds the AccessKeyId and the security token.
        try:
            answer = json.loads(e.read().decode() or "{}")
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        code = answer.get("Code") or "HTTP %d" % e.code
        if code == "InvalidInstanceId.NotFound":
            return answer
        raise ApiError(action, code, answer.get("RequestId", "?"), e.code)


class ApiError(RuntimeError):
    def __init__(self, action, code, request_id, status):
        RuntimeError.__init__(self, "%s failed: %s (RequestId: %s)" % (action, code, request_id))
        self.code = code
        self.status = status

    def transient(self):
        # ECS refuses to delete an instance in a passing status (`IncorrectInstanceStatus.*`,
        # e.g. `.Initializing` while it boots) and throttles or fails with 5xx for a while; the
        # runner's own release retries the same (`src/stages/mod.rs`, `release_instance`, after
        # terraform-provider-alicloud's `resource_alicloud_instance.go` delete).
        return (self.code.startswith("IncorrectInstanceStatus") or "Throttling" in self.code
                or self.code == "ServiceUnavailable" or self.status >= 500)


def delete_instance(conf, creds, instance_id):
    give_up = time.time() + conf.get("delete_retry_seconds", 300)
    while True:
        try:
            return call_ecs(conf, creds, "DeleteInstance", {"InstanceId": instance_id, "Force": "true"})
        except ApiError as e:
            if not e.transient() or time.time() >= give_up:
                raise
            time.sleep(2)


def state_dir(conf, instance_id):
    return os.path.join(conf.get("state_root", "/run/aliyun-spot-executor"), instance_id)


def busy(sdir):
    # A stage leaves busy.<pid> while it runs; a marker whose process is gone does not count.
    try:
        names = os.listdir(sdir)
    except FileNotFoundError:
        return False
    for name in names:
        if name.startswith("busy."):
            try:
                os.kill(int(name.split(".", 1)[1]), 0)
                return True
            except (ValueError, ProcessLookupError):
                continue
            except PermissionError:
                return True
    return False


def last_activity(sdir, started):
    # Once a stage has run, its `activity` file is the clock (stamped by this machine's clock,
    # like `now`); before that, the instance's creation time.
    try:
        return os.stat(os.path.join(sdir, "activity")).st_mtime
    except OSError:
        return started


def open_state_root(conf):
    # Stages may log in as a user other than root: let them create their marker directory
    # (sticky, like /tmp). /run is emptied at boot, so this is redone at every check.
    root = conf.get("state_root", "/run/aliyun-spot-executor")
    try:
        os.makedirs(root, exist_ok=True)
        if os.stat(root).st_mode & 0o7777 != 0o1777:
            os.chmod(root, 0o1777)
    except OSError as e:
        log("cannot prepare %s: %s" % (root, e))


def credentials(conf, token, instance_id):
    cdir = conf.get("credentials_dir")
    if cdir:
        path = os.path.join(cdir, instance_id + ".json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            # Not yet handed over (prepare writes them once SSH works) or unreadable.
            raise RuntimeError("no usable credentials in %s: %s" % (path, type(e).__name__))
    role = conf.get("ram_role") or metadata(conf, "ram/security-credentials/", token).strip().splitlines()[0]
    return json.loads(metadata(conf, "ram/security-credentials/" + role, token))


def check(conf, started):
    open_state_root(conf)
    token = metadata_token(conf)
    instance_id = metadata(conf, "instance-id", token).strip()
    sdir = state_dir(conf, instance_id)
    now = time.time()
    reason = None
    if now >= conf["deadline_epoch"]:
        reason = "it outlived its maximum lifetime"
    elif not busy(sdir) and now - last_activity(sdir, started) >= conf["idle_timeout_seconds"]:
        reason = "no stage ran for %ds" % conf["idle_timeout_seconds"]
    if reason is None:
        return False
    creds = credentials(conf, token, instance_id)
    log("deleting instance %s: %s" % (instance_id, reason))
    delete_instance(conf, creds, instance_id)
    return True


def main(argv):
    once = "--once" in argv
    args = [a for a in argv[1:] if a != "--once"]
    path = args[0] if args else "/etc/aliyun-spot-executor/watchdog.json"
    try:
        with open(path) as f:
            conf = json.load(f)
        for key in ("metadata", "endpoint", "region_id", "deadline_epoch", "idle_timeout_seconds"):
            if key not in conf:
                raise ValueError("`%s` is missing" % key)
    except (OSError, ValueError) as e:
        log("cannot read %s: %s" % (path, e))
        return 1
    started = conf.get("started_epoch", time.time())
    while True:
        try:
            if check(conf, started):
                return 3
        except Exception as e:  # keep watching: a transient metadata or API error is not fatal
            log("check failed: %s" % e)
            if once:
                return 1
        if once:
            return 0
        time.sleep(conf.get("poll_seconds", 30))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
