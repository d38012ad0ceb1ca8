//! The emulator's HTTP front: the RPC API at `/` (GET query or POST form, merged), the
//! metadata service (`/latest/...`, `/instances/<id>/latest/...`), the GitHub fake under
//! `/github/` ([`super::github`]), and the inspection and control endpoints under `/_emulator/`.
//!
//! Why one listener: clients need a single endpoint to point at (docs/emulator.md), and tests read
//! what happened (request log, instance lifecycles) from the same place the driver talks to.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rand::Rng;
use serde_json::{json, Value};

use super::api::{ApiError, Params};
use super::auth;
use super::github::GithubFake;
use super::instances::{lock, now, random_alnum, rfc3339, Core, RequestRecord};
use super::rpc;
use super::Faults;

const MAX_BODY: u64 = 1024 * 1024;

/// A worker loop: serves requests until the emulator shuts down.
pub(crate) fn serve(core: Arc<Core>, github: Arc<GithubFake>, server: Arc<tiny_http::Server>) {
    while !core.shutdown.load(Ordering::SeqCst) {
        match server.recv() {
            Ok(req) => handle(&core, &github, req),
            Err(_) => break,
        }
    }
}

struct Reply {
    status: u16,
    body: String,
    content_type: &'static str,
    request_id: Option<String>,
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply {
            status,
            body: v.to_string(),
            content_type: "application/json;charset=utf-8",
            request_id: None,
        }
    }
    fn text(status: u16, s: impl Into<String>) -> Reply {
        Reply { status, body: s.into(), content_type: "text/plain;charset=utf-8", request_id: None }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn handle(core: &Core, github: &GithubFake, mut req: tiny_http::Request) {
    let method = req.method().as_str().to_ascii_uppercase();
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let source = req.remote_addr().copied();
    // In arrival order, names in lower case: V3 signatures cover repeated headers too.
    let header_list: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|h| (h.field.as_str().as_str().to_ascii_lowercase(), h.value.as_str().to_string()))
        .collect();
    let headers: BTreeMap<String, String> = header_list.iter().cloned().collect();
    let mut body = Vec::new();
    let too_big =
        req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body).is_ok() && body.len() as u64 > MAX_BODY;
    let reply = if too_big {
        Reply::text(413, "request body too large")
    } else if path == "/" {
        rpc_request(core, &method, path, query, &body, &header_list, source)
    } else if let Some(rest) = path.strip_prefix("/github/") {
        let (status, v) =
            github.api(&method, rest, query, headers.get("authorization").map(String::as_str), &body);
        if v.is_null() {
            Reply::text(status, "")
        } else {
            Reply::json(status, &v)
        }
    } else if let Some(rest) = path.strip_prefix("/_emulator/github") {
        let (status, v) = github.control(&method, rest, &body);
        Reply::json(status, &v)
    } else if let Some(rest) = path.strip_prefix("/_emulator/") {
        control(core, &method, rest, query, &body)
    } else if let Some(rest) = path.strip_prefix("/latest/") {
        metadata(core, &method, Subject::from_source(core, source), rest, &headers)
    } else if let Some(rest) = path.strip_prefix("/instances/") {
        match rest.split_once("/latest/") {
            Some((id, sub)) => {
                let live = lock(&core.state).instances.get(id).is_some_and(|i| i.live);
                if live {
                    metadata(core, &method, Subject::Instance(id.to_string()), sub, &headers)
                } else {
                    Reply::text(404, "no such instance")
                }
            }
            None => Reply::text(404, "not found"),
        }
    } else {
        Reply::text(404, "not found")
    };
    let mut resp = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
    if let Some(h) = header("Content-Type", reply.content_type) {
        resp.add_header(h);
    }
    if let Some(id) = &reply.request_id {
        if let Some(h) = header("x-acs-request-id", id) {
            resp.add_header(h);
        }
    }
    let _ = req.respond(resp);
}

/// Adds the pairs of an `application/x-www-form-urlencoded` string (`+` is a space) to `into`.
fn parse_form(s: &str, into: &mut Params) {
    into.extend(form_urlencoded::parse(s.as_bytes()).into_owned());
}

fn redact(params: &Params) -> BTreeMap<String, String> {
    params
        .iter()
        .map(|(k, v)| {
            let secret = ["Signature", "SecurityToken", "UserData", "PrivateKeyBody"].contains(&k.as_str())
                || k.contains("Secret")
                || k.contains("Password");
            (k.clone(), if secret { "REDACTED".to_string() } else { v.clone() })
        })
        .collect()
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string().to_ascii_uppercase()
}

fn rpc_request(
    core: &Core,
    method: &str,
    path: &str,
    query_string: &str,
    body: &[u8],
    headers: &[(String, String)],
    source: Option<SocketAddr>,
) -> Reply {
    let latency = core.faults().latency_ms;
    if latency > 0 {
        std::thread::sleep(Duration::from_millis(latency));
    }
    let mut query = Params::new();
    parse_form(query_string, &mut query);
    let mut params = query.clone();
    let is_form = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .is_none_or(|(_, c)| c.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
    if method == "POST" && is_form {
        // Form fields over query fields, as the legacy SDK's signer merges them.
        parse_form(&String::from_utf8_lossy(body), &mut params);
    }
    let incoming = auth::Incoming { method, path, query: &query, params: &params, headers, body };
    let rid = request_id();
    let mut principal = None;
    let outcome: Result<Value, ApiError> = (|| {
        if method != "GET" && method != "POST" {
            return Err(ApiError::new(
                405,
                "UnsupportedHTTPMethod",
                &format!("Specified HTTP method \"{method}\" is not supported."),
            ));
        }
        let action = incoming.action().ok_or_else(|| {
            ApiError::new(400, "MissingParameter", "The input parameter \"Action\" that is mandatory for processing this request is not supplied.")
        })?;
        let who = auth::authenticate(core, &incoming)?;
        principal = Some(who.clone());
        {
            let mut st = lock(&core.state);
            *st.action_counts.entry(action.to_string()).or_default() += 1;
        }
        {
            let mut fs = lock(&core.fault_state);
            fs.rpc_count += 1;
            if let Some(n) = fs.faults.throttle_every.filter(|n| *n > 0) {
                if fs.rpc_count % n == 0 {
                    return Err(ApiError::new(
                        400,
                        "Throttling.User",
                        "Request was denied due to user flow control.",
                    ));
                }
            }
            let rate = fs.faults.error_rate;
            if rate > 0.0 && fs.rng.gen::<f64>() < rate {
                return Err(ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "The request has failed due to a temporary failure of the server.",
                ));
            }
        }
        rpc::dispatch(core, action, &params, &who)
    })();
    let (status, code, mut value) = match outcome {
        Ok(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("RequestId".into(), json!(rid));
            }
            (200, None, v)
        }
        Err(e) => (
            e.status,
            Some(e.code.clone()),
            json!({
                "RequestId": rid,
                "HostId": "ecs.aliyuncs.com",
                "Code": e.code,
                "Message": e.message,
                "Recommend": format!("https://api.aliyun.com/troubleshoot?q={}&product=Ecs", e.code),
            }),
        ),
    };
    if value.get("RequestId").is_none() {
        value = json!({ "RequestId": rid, "Result": value });
    }
    let record = RequestRecord {
        time: rfc3339(now()),
        method: method.to_string(),
        action: incoming.action().map(str::to_string),
        access_key_id: incoming.access_key_id(),
        role: principal.and_then(|p| p.role),
        params: redact(&params),
        status,
        code,
        request_id: rid.clone(),
        source: source.map(|s| s.to_string()).unwrap_or_default(),
    };
    lock(&core.log).push(record);
    let mut reply = Reply::json(status, &value);
    reply.request_id = Some(rid);
    reply
}

/// Whose metadata a request reads.
enum Subject {
    Instance(String),
    Host,
}

impl Subject {
    fn from_source(core: &Core, source: Option<SocketAddr>) -> Subject {
        let Some(IpAddr::V4(ip)) = source.map(|s| s.ip()) else { return Subject::Host };
        {
            let st = lock(&core.state);
            if let Some(i) = st.instances.values().find(|i| i.live && i.ip == ip) {
                return Subject::Instance(i.id.clone());
            }
        }
        // A process inside a booting instance connects from 127.0.0.1: known by its namespace.
        if core.boots() {
            if let Some(ns) = source.and_then(|s| super::boot::peer_mount_namespace(s, core.listen)) {
                let st = lock(&core.state);
                let own = |i: &&super::instances::Instance| {
                    i.live
                        && i.sshd_pid.and_then(|p| super::boot::mount_namespace(&p.to_string())).as_ref()
                            == Some(&ns)
                };
                if let Some(i) = st.instances.values().find(own) {
                    return Subject::Instance(i.id.clone());
                }
            }
        }
        Subject::Host
    }
}

/// The runner host's pseudo identity.
const HOST_INSTANCE_ID: &str = "i-bp1emulatorhost000";
const TOKEN_HEADER: &str = "x-aliyun-ecs-metadata-token";
const TTL_HEADER: &str = "x-aliyun-ecs-metadata-token-ttl-seconds";
const STS_TTL: Duration = Duration::from_secs(3600);

fn metadata(
    core: &Core,
    method: &str,
    subject: Subject,
    sub: &str,
    headers: &BTreeMap<String, String>,
) -> Reply {
    if sub == "api/token" {
        if method != "PUT" {
            return Reply::text(405, "method not allowed");
        }
        if core.faults().metadata_token_error {
            return Reply::text(404, "Not Found");
        }
        let ttl = headers.get(TTL_HEADER).and_then(|v| v.trim().parse::<i64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=21600).contains(t)) else {
            return Reply::text(400, "X-aliyun-ecs-metadata-token-ttl-seconds must be between 1 and 21600");
        };
        let token = random_alnum(48);
        let mut st = lock(&core.state);
        let t = now();
        st.metadata_tokens.retain(|_, exp| *exp > t);
        st.metadata_tokens.insert(token.clone(), t + time::Duration::seconds(ttl));
        st.hardened = true;
        return Reply::text(200, token);
    }
    if method != "GET" {
        return Reply::text(405, "method not allowed");
    }
    {
        let st = lock(&core.state);
        match headers.get(TOKEN_HEADER) {
            Some(tok) if st.metadata_tokens.get(tok).is_none_or(|exp| *exp <= now()) => {
                return Reply::text(401, "invalid or expired metadata token")
            }
            Some(_) => {}
            None if st.hardened => return Reply::text(401, "metadata token required"),
            None => {}
        }
    }
    let (id, itype, zone, role, termination, user_data, ip) = match &subject {
        Subject::Host => (
            HOST_INSTANCE_ID.to_string(),
            "ecs.g7.large".to_string(),
            "cn-hangzhou-b".to_string(),
            core.host_ram_role.clone(),
            None,
            None,
            core.listen.ip().to_string(),
        ),
        Subject::Instance(id) => {
            let st = lock(&core.state);
            let Some(i) = st.instances.get(id).filter(|i| i.live) else {
                return Reply::text(404, "no such instance");
            };
            (
                i.id.clone(),
                i.instance_type.clone(),
                i.zone.clone(),
                i.ram_role.clone(),
                i.termination_time,
                i.user_data.as_ref().map(|u| u.expose().clone()),
                i.ip.to_string(),
            )
        }
    };
    let sub = sub.trim_end_matches('/').to_string();
    match sub.as_str() {
        "meta-data" => {
            Reply::text(200, "instance-id\nregion-id\nzone-id\nhostname\nprivate-ipv4\ninstance/\nram/\n")
        }
        "meta-data/instance-id" => Reply::text(200, id),
        "meta-data/region-id" => Reply::text(200, core.catalogue.region.clone()),
        "meta-data/zone-id" => Reply::text(200, zone),
        "meta-data/hostname" => Reply::text(200, id),
        "meta-data/private-ipv4" => Reply::text(200, ip),
        "meta-data/instance/instance-type" => Reply::text(200, itype),
        "meta-data/instance/spot/termination-time" => match termination {
            Some(t) => Reply::text(200, rfc3339(t)),
            None => Reply::text(404, "Not Found"),
        },
        "user-data" => match user_data.and_then(|u| base64::engine::general_purpose::STANDARD.decode(u).ok())
        {
            Some(raw) => Reply::text(200, String::from_utf8_lossy(&raw).into_owned()),
            None => Reply::text(404, "Not Found"),
        },
        "meta-data/ram/security-credentials" => match role {
            Some(r) => Reply::text(200, r),
            None => Reply::text(404, "Not Found"),
        },
        other => {
            if let Some(asked) = other.strip_prefix("meta-data/ram/security-credentials/") {
                if role.as_deref() == Some(asked) {
                    let subject_key = match &subject {
                        Subject::Host => "runner-host".to_string(),
                        Subject::Instance(id) => id.clone(),
                    };
                    let c = core.issue_sts(&subject_key, asked, STS_TTL, true);
                    return Reply::json(
                        200,
                        &json!({
                            "AccessKeyId": c.access_key_id,
                            "AccessKeySecret": c.access_key_secret.expose(),
                            "SecurityToken": c.security_token.expose(),
                            "Expiration": rfc3339(c.expiration),
                            "LastUpdated": rfc3339(now()),
                            "Code": "Success",
                        }),
                    );
                }
            }
            Reply::text(404, "Not Found")
        }
    }
}

fn control(core: &Core, method: &str, rest: &str, query: &str, body: &[u8]) -> Reply {
    match (method, rest) {
        ("GET", "instances") => Reply::json(200, &json!(core.instance_records())),
        ("GET", "requests") => Reply::json(200, &json!(*lock(&core.log))),
        ("GET", "summary") => Reply::json(200, &core.summary()),
        ("GET", "faults") => Reply::json(200, &faults_json(core)),
        ("POST", "faults") => match apply_faults(core, body) {
            Ok(()) => Reply::json(200, &faults_json(core)),
            Err(e) => Reply::json(400, &json!({ "error": e })),
        },
        ("POST", r) if r.starts_with("instances/") && r.ends_with("/reclaim") => {
            let id = &r["instances/".len()..r.len() - "/reclaim".len()];
            let mut q = Params::new();
            parse_form(query, &mut q);
            let after = match q
                .get("after")
                .map(|a| a.parse::<f64>().ok().and_then(|x| Duration::try_from_secs_f64(x).ok()))
            {
                None => Duration::ZERO,
                Some(Some(d)) => d,
                Some(None) => {
                    return Reply::json(400, &json!({ "error": "`after` must be a number of seconds" }))
                }
            };
            if core.schedule_reclaim(id, after) {
                Reply::json(200, &json!({ "InstanceId": id, "reclaim_in_seconds": after.as_secs_f64() }))
            } else {
                Reply::json(404, &json!({ "error": format!("no live instance `{id}`") }))
            }
        }
        _ => Reply::text(404, "not found"),
    }
}

fn faults_json(core: &Core) -> Value {
    let mut v = serde_json::to_value(core.faults()).unwrap_or(Value::Null);
    let (boot, ssh) = core.delays();
    if let Some(o) = v.as_object_mut() {
        o.insert("boot-delay".into(), json!(boot.as_secs_f64()));
        o.insert("ssh-delay".into(), json!(ssh.as_secs_f64()));
    }
    v
}

/// Applies a partial fault update: keys present replace the current values.
fn apply_faults(core: &Core, body: &[u8]) -> Result<(), String> {
    let patch: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(mut patch) = patch else { return Err("expected a JSON object".into()) };
    let secs = |v: Option<Value>, name: &str| -> Result<Option<Duration>, String> {
        match v {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .and_then(|x| Duration::try_from_secs_f64(x).ok())
                .map(Some)
                .ok_or_else(|| format!("`{name}` must be a number of seconds")),
        }
    };
    let boot = secs(patch.remove("boot-delay"), "boot-delay")?;
    let ssh = secs(patch.remove("ssh-delay"), "ssh-delay")?;
    let mut current = serde_json::to_value(core.faults()).map_err(|e| e.to_string())?;
    if let Some(obj) = current.as_object_mut() {
        for (k, v) in patch {
            obj.insert(k, v);
        }
    }
    let faults: Faults = serde_json::from_value(current).map_err(|e| format!("invalid faults: {e}"))?;
    if !(0.0..=1.0).contains(&faults.error_rate) {
        return Err("`error-rate` must be between 0 and 1".into());
    }
    faults.validate()?;
    core.set_faults(faults);
    core.set_delays(boot, ssh);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let mut p = Params::new();
        parse_form("a=a+b%20c%2B%3D&b=%&c=%E6%9E%84&d", &mut p);
        assert_eq!(p["a"], "a b c+=");
        assert_eq!(p["b"], "%");
        assert_eq!(p["c"], "构");
        assert_eq!(p["d"], "");
    }

    #[test]
    fn secrets_are_redacted() {
        let mut p = Params::new();
        for k in ["Signature", "SecurityToken", "UserData", "AccessKeySecret", "Action"] {
            p.insert(k.into(), "x".into());
        }
        let r = redact(&p);
        assert_eq!(r["Action"], "x");
        for k in ["Signature", "SecurityToken", "UserData", "AccessKeySecret"] {
            assert_eq!(r[k], "REDACTED");
        }
    }
}
