//! A GitHub REST fake for the runner front end, served under `/github` on the emulator's
//! listener (`GITHUB_API_URL=http://127.0.0.1:9470/github`).
//!
//! It knows the three self-hosted runner endpoints `aliyun-spot github` uses, with GitHub's
//! shapes (<https://docs.github.com/en/rest/actions/self-hosted-runners>): generate-jitconfig
//! (`201 {runner, encoded_jit_config}`), list runners (`{total_count, runners}`, `name`,
//! `per_page` and `page` queries), delete a runner (`204`). Every call needs a token (`401`
//! otherwise); a second runner of the same name in a scope is refused with `422`, as is a
//! generate-jitconfig body without `name`, `runner_group_id` or `labels`.
//!
//! Inspection and control: `GET /_emulator/github` returns the runners and the request log
//! (the `Authorization` header redacted); `POST /_emulator/github/runners/{name}` with
//! `{"status": "online"|"offline", "busy": bool, "deleted": bool}` plays the runner's side (a
//! test, or a fake runner, marks it busy, then gone as GitHub does after an ephemeral job).

use std::sync::Mutex;

use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use super::instances::{lock, now, rfc3339};

/// One runner the fake knows (deleted ones stay, marked).
#[derive(Debug, Clone, Serialize)]
pub struct FakeRunner {
    /// Runner id.
    pub id: u64,
    /// `repos/OWNER/REPO` or `orgs/ORG`.
    pub scope: String,
    /// Name.
    pub name: String,
    /// Label names.
    pub labels: Vec<String>,
    /// The configuration handed out (the fake's own, worthless elsewhere).
    pub encoded_jit_config: String,
    /// `online` or `offline`.
    pub status: String,
    /// Running a job.
    pub busy: bool,
    /// Deregistered (by the API or, for an ephemeral runner, after its job).
    pub deleted: bool,
}

/// One API request as logged.
#[derive(Debug, Clone, Serialize)]
pub struct FakeRequest {
    /// UTC time.
    pub time: String,
    /// Method.
    pub method: String,
    /// Path below `/github`.
    pub path: String,
    /// `REDACTED` when a token was sent, else absent.
    pub authorization: Option<String>,
    /// The JSON body, if any (it holds no secret).
    pub body: Option<Value>,
    /// Status answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    next_id: u64,
    runners: Vec<FakeRunner>,
    requests: Vec<FakeRequest>,
}

/// The fake's state.
#[derive(Default)]
pub(crate) struct GithubFake {
    state: Mutex<State>,
}

fn error(status: u16, message: &str) -> (u16, Value) {
    (
        status,
        json!({ "message": message, "documentation_url": "https://docs.github.com/rest/actions/self-hosted-runners" }),
    )
}

fn runner_json(r: &FakeRunner) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "os": "linux",
        "status": r.status,
        "busy": r.busy,
        "labels": r.labels.iter().enumerate().map(|(i, l)| json!({"id": i + 1, "name": l, "type": "custom"})).collect::<Vec<_>>(),
    })
}

/// Splits `repos/O/R/actions/runners[/rest]` or `orgs/O/actions/runners[/rest]`.
fn split_scope(path: &str) -> Option<(String, &str)> {
    let parts: Vec<&str> = path.splitn(6, '/').collect();
    match parts.as_slice() {
        ["repos", o, r, "actions", "runners", rest @ ..] => {
            Some((format!("repos/{o}/{r}"), rest.first().copied().unwrap_or("")))
        }
        ["orgs", o, "actions", "runners", rest @ ..] => Some((
            format!("orgs/{o}"),
            if rest.is_empty() { "" } else { path.splitn(5, '/').nth(4).unwrap_or("") },
        )),
        _ => None,
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v))
}

impl GithubFake {
    /// Serves one API call (`path` below `/github/`).
    pub(crate) fn api(
        &self,
        method: &str,
        path: &str,
        query: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> (u16, Value) {
        let body_json: Option<Value> = serde_json::from_slice(body).ok();
        let answer = self.answer(method, path, query, authorization, body_json.as_ref());
        let mut st = lock(&self.state);
        st.requests.push(FakeRequest {
            time: rfc3339(now()),
            method: method.to_string(),
            path: path.to_string(),
            authorization: authorization.map(|_| "REDACTED".to_string()),
            body: body_json,
            status: answer.0,
        });
        answer
    }

    fn answer(
        &self,
        method: &str,
        path: &str,
        query: &str,
        authorization: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("token ")))
            .map(str::trim)
            .unwrap_or("");
        if token.is_empty() {
            return error(401, "Requires authentication");
        }
        let Some((scope, rest)) = split_scope(path) else { return error(404, "Not Found") };
        let mut st = lock(&self.state);
        match (method, rest) {
            ("POST", "generate-jitconfig") => {
                let b = body.cloned().unwrap_or(Value::Null);
                let Some(name) = b.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
                    return error(422, "Invalid request. \"name\" wasn't supplied.");
                };
                if b.get("runner_group_id").and_then(Value::as_u64).is_none() {
                    return error(422, "Invalid input: object is missing required key: runner_group_id.");
                }
                let labels: Vec<String> = b
                    .get("labels")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
                    .unwrap_or_default();
                if labels.is_empty() {
                    return error(422, "Invalid request. \"labels\" must have at least 1 item.");
                }
                if st.runners.iter().any(|r| r.scope == scope && r.name == name && !r.deleted) {
                    return error(
                        422,
                        &format!("Already exists - A runner with the name {name} already exists."),
                    );
                }
                st.next_id += 1;
                let id = st.next_id;
                let jit = base64::engine::general_purpose::STANDARD.encode(
                    json!({ "runner_id": id, "name": name, "scope": scope, "nonce": super::instances::random_alnum(16) })
                        .to_string(),
                );
                let r = FakeRunner {
                    id,
                    scope,
                    name: name.to_string(),
                    labels,
                    encoded_jit_config: jit.clone(),
                    status: "offline".to_string(),
                    busy: false,
                    deleted: false,
                };
                let v = json!({ "runner": runner_json(&r), "encoded_jit_config": jit });
                st.runners.push(r);
                (201, v)
            }
            ("GET", "") => {
                let name = query_param(query, "name");
                let per_page = query_param(query, "per_page")
                    .and_then(|p| p.parse::<usize>().ok())
                    .unwrap_or(30)
                    .clamp(1, 100);
                let page =
                    query_param(query, "page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
                let all: Vec<&FakeRunner> = st
                    .runners
                    .iter()
                    .filter(|r| r.scope == scope && !r.deleted && name.is_none_or(|n| n == r.name))
                    .collect();
                let runners: Vec<Value> =
                    all.iter().skip((page - 1) * per_page).take(per_page).map(|r| runner_json(r)).collect();
                (200, json!({ "total_count": all.len(), "runners": runners }))
            }
            ("DELETE", id) => {
                let Ok(id) = id.parse::<u64>() else { return error(404, "Not Found") };
                match st.runners.iter_mut().find(|r| r.id == id && r.scope == scope && !r.deleted) {
                    None => error(404, "Not Found"),
                    Some(r) if r.busy => {
                        error(422, &format!("Bad request - Runner \"{}\" is still running a job\"", r.name))
                    }
                    Some(r) => {
                        r.deleted = true;
                        r.status = "offline".to_string();
                        (204, Value::Null)
                    }
                }
            }
            _ => error(404, "Not Found"),
        }
    }

    /// `GET /_emulator/github`.
    pub(crate) fn snapshot(&self) -> Value {
        let st = lock(&self.state);
        json!({ "runners": st.runners, "requests": st.requests })
    }

    /// Plays the runner's side: status, busy, deleted. False when no runner has that name.
    pub(crate) fn set_runner(&self, name: &str, patch: &Value) -> bool {
        let mut st = lock(&self.state);
        let Some(r) = st.runners.iter_mut().rev().find(|r| r.name == name) else { return false };
        if let Some(s) = patch.get("status").and_then(Value::as_str) {
            r.status = s.to_string();
        }
        if let Some(b) = patch.get("busy").and_then(Value::as_bool) {
            r.busy = b;
        }
        if let Some(d) = patch.get("deleted").and_then(Value::as_bool) {
            r.deleted = d;
        }
        true
    }

    /// `/_emulator/github…` (`rest` after `github`).
    pub(crate) fn control(&self, method: &str, rest: &str, body: &[u8]) -> (u16, Value) {
        match (method, rest.trim_start_matches('/')) {
            ("GET", "") => (200, self.snapshot()),
            ("POST", r) if r.starts_with("runners/") => {
                let name = &r["runners/".len()..];
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return (400, json!({ "error": "expected a JSON object such as {\"busy\": true}" }));
                };
                if self.set_runner(name, &patch) {
                    (200, json!({ "name": name }))
                } else {
                    (404, json!({ "error": format!("no runner `{name}`") }))
                }
            }
            _ => (404, json!({ "error": "not found" })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_split() {
        assert_eq!(split_scope("repos/o/r/actions/runners"), Some(("repos/o/r".into(), "")));
        assert_eq!(split_scope("repos/o/r/actions/runners/12"), Some(("repos/o/r".into(), "12")));
        assert_eq!(
            split_scope("orgs/o/actions/runners/generate-jitconfig"),
            Some(("orgs/o".into(), "generate-jitconfig"))
        );
        assert_eq!(split_scope("orgs/o/actions/runners"), Some(("orgs/o".into(), "")));
        assert_eq!(split_scope("users/o"), None);
    }

    #[test]
    fn token_duplicates_and_deletion() {
        let f = GithubFake::default();
        let body = br#"{"name":"r1","runner_group_id":1,"labels":["r1"]}"#;
        let p = "repos/o/r/actions/runners/generate-jitconfig";
        assert_eq!(f.api("POST", p, "", None, body).0, 401);
        assert_eq!(f.api("POST", p, "", Some("Bearer ghs_x"), body).0, 201);
        assert_eq!(f.api("POST", p, "", Some("Bearer ghs_x"), body).0, 422);
        let (s, v) = f.api("GET", "repos/o/r/actions/runners", "name=r1", Some("Bearer ghs_x"), b"");
        assert_eq!((s, v["total_count"].as_u64()), (200, Some(1)));
        assert!(f.set_runner("r1", &json!({"busy": true})));
        assert_eq!(f.api("DELETE", "repos/o/r/actions/runners/1", "", Some("Bearer ghs_x"), b"").0, 422);
        assert!(f.set_runner("r1", &json!({"busy": false})));
        assert_eq!(f.api("DELETE", "repos/o/r/actions/runners/1", "", Some("Bearer ghs_x"), b"").0, 204);
        assert_eq!(f.api("DELETE", "repos/o/r/actions/runners/1", "", Some("Bearer ghs_x"), b"").0, 404);
        let snap = f.snapshot().to_string();
        assert!(!snap.contains("ghs_x"), "{snap}");
        assert!(snap.contains("REDACTED"));
    }
}
