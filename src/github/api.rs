//! The GitHub REST calls the runner front end makes, and nothing else.
//!
//! Endpoints and bodies follow GitHub's reference "REST API endpoints for self-hosted runners"
//! (<https://docs.github.com/en/rest/actions/self-hosted-runners>, API version 2022-11-28):
//! - `POST {scope}/actions/runners/generate-jitconfig` with `{name, runner_group_id, labels,
//!   work_folder}` answers `201 {runner, encoded_jit_config}`; `runner_group_id` is required
//!   (the default group of a repository or organization is `1`);
//! - `GET {scope}/actions/runners?name=…&per_page=100&page=N` answers `{total_count, runners:
//!   [{id, name, os, status, busy, labels: [{id, name, type}]}]}`;
//! - `DELETE {scope}/actions/runners/{runner_id}` answers `204`.
//!
//! `{scope}` is `repos/{owner}/{repo}` or `orgs/{org}`. The token is sent as `Authorization:
//! Bearer`, with the `Accept` and `X-GitHub-Api-Version` headers the reference recommends; it
//! stays wrapped in [`Secret`] and never appears in an error (errors quote GitHub's `message`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::secret::Secret;

/// The public GitHub API, used when `GITHUB_API_URL` is not set.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// The REST API version this client was written against.
pub const API_VERSION: &str = "2022-11-28";

/// Whose runners: a repository's or an organization's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `OWNER/REPO`.
    Repo {
        /// Owner (user or organization).
        owner: String,
        /// Repository name.
        repo: String,
    },
    /// An organization's runners (`--org`).
    Org(String),
}

impl Scope {
    /// `--repo OWNER/REPO`, or `--org ORG` when given (an organization runner serves the
    /// repository too).
    pub fn parse(repo: Option<&str>, org: Option<&str>) -> anyhow::Result<Scope> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 100
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && s != "."
                && s != ".."
        };
        if let Some(org) = org {
            if !name_ok(org) {
                anyhow::bail!("--org `{org}` is not an organization name; use letters, digits and `-`");
            }
            return Ok(Scope::Org(org.to_string()));
        }
        let Some(repo) = repo else {
            anyhow::bail!("name the repository with --repo OWNER/REPO (or the organization with --org ORG)");
        };
        match repo.split_once('/') {
            Some((o, r)) if name_ok(o) && name_ok(r) => {
                Ok(Scope::Repo { owner: o.to_string(), repo: r.to_string() })
            }
            _ => anyhow::bail!("--repo `{repo}` is not OWNER/REPO; write it as in `octo-org/hello-world`"),
        }
    }

    /// The API path prefix: `repos/OWNER/REPO` or `orgs/ORG` (also the value of the scope tag).
    pub fn path(&self) -> String {
        match self {
            Scope::Repo { owner, repo } => format!("repos/{owner}/{repo}"),
            Scope::Org(org) => format!("orgs/{org}"),
        }
    }

    /// The inverse of [`Scope::path`] (reading the scope tag back).
    pub fn from_path(p: &str) -> Option<Scope> {
        let parts: Vec<&str> = p.split('/').collect();
        match parts.as_slice() {
            ["repos", o, r] => Some(Scope::Repo { owner: o.to_string(), repo: r.to_string() }),
            ["orgs", o] => Some(Scope::Org(o.to_string())),
            _ => None,
        }
    }
}

/// One label of a runner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Label {
    /// Label name.
    pub name: String,
}

/// A self-hosted runner as GitHub lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Runner {
    /// GitHub's runner id.
    pub id: u64,
    /// Runner name.
    pub name: String,
    /// `online` or `offline`.
    #[serde(default)]
    pub status: String,
    /// True while it runs a job.
    #[serde(default)]
    pub busy: bool,
    /// Its labels.
    #[serde(default)]
    pub labels: Vec<Label>,
}

/// What `generate-jitconfig` answers.
pub struct JitConfig {
    /// The registered runner.
    pub runner: Runner,
    /// The single-use configuration handed to `run.sh --jitconfig`.
    pub encoded_jit_config: Secret<String>,
}

/// A GitHub API failure: the HTTP status (0 for a transport failure) and GitHub's message.
#[derive(Debug, thiserror::Error)]
#[error("GitHub API {method} {path} failed: {detail}")]
pub struct GithubError {
    /// HTTP method.
    pub method: String,
    /// Path below the API base (no token, no query).
    pub path: String,
    /// HTTP status, 0 when no answer arrived.
    pub status: u16,
    /// What went wrong, with a hint.
    pub detail: String,
}

/// The client: API base and token.
pub struct GithubClient {
    base: String,
    token: Secret<String>,
    agent: ureq::Agent,
}

impl GithubClient {
    /// A client for `base` (no trailing slash needed) with `token`.
    pub fn new(base: &str, token: Secret<String>) -> anyhow::Result<GithubClient> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("https://")
            || base.starts_with("http://127.")
            || base.starts_with("http://localhost"))
        {
            anyhow::bail!(
                "GITHUB_API_URL `{base}` is not an https URL; use https://api.github.com or your GitHub Enterprise Server's https://HOST/api/v3"
            );
        }
        if token.expose().trim().is_empty() {
            anyhow::bail!(
                "GITHUB_TOKEN is not set; give a token with the self-hosted runners administration permission (docs/github-actions.md)"
            );
        }
        // No redirects: a redirect would carry the token's request elsewhere; GitHub answers
        // these endpoints directly.
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).redirects(0).build();
        Ok(GithubClient { base, token, agent })
    }

    /// From `GITHUB_API_URL` (default [`DEFAULT_API_URL`]) and `GITHUB_TOKEN`.
    pub fn from_env(env: &crate::env::Env) -> anyhow::Result<GithubClient> {
        let base = env.value("GITHUB_API_URL").unwrap_or(DEFAULT_API_URL);
        let token = Secret::new(env.value("GITHUB_TOKEN").unwrap_or_default().to_string());
        GithubClient::new(base, token)
    }

    /// The API base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(u16, Value), GithubError> {
        let mut req = self
            .agent
            .request(method, &format!("{}/{}", self.base, path))
            .set("Accept", "application/vnd.github+json")
            .set("X-GitHub-Api-Version", API_VERSION)
            .set("User-Agent", concat!("aliyun-spot-executor/", env!("CARGO_PKG_VERSION")))
            .set("Authorization", &format!("Bearer {}", self.token.expose()));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let err = |status: u16, detail: String| GithubError {
            method: method.to_string(),
            path: path.to_string(),
            status,
            detail,
        };
        let answer = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match answer {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(err(0, format!("no answer ({})", t.kind()))),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok((status, json));
        }
        let message = json.get("message").and_then(Value::as_str).unwrap_or("no message").to_string();
        let hint = match status {
            401 => "; GITHUB_TOKEN is missing, expired or invalid",
            403 | 404 => "; the token needs the self-hosted runners administration permission (read and write) on this repository or organization",
            422 => "; GitHub rejected the request (a runner of that name may already exist)",
            _ => "",
        };
        Err(err(status, format!("HTTP {status}: {message}{hint}")))
    }

    /// Registers a just-in-time runner and returns its single-use configuration.
    pub fn generate_jitconfig(
        &self,
        scope: &Scope,
        name: &str,
        labels: &[String],
        runner_group_id: u64,
    ) -> Result<JitConfig, GithubError> {
        let path = format!("{}/actions/runners/generate-jitconfig", scope.path());
        let body = serde_json::json!({
            "name": name,
            "runner_group_id": runner_group_id,
            "labels": labels,
            "work_folder": "_work",
        });
        let (_, v) = self.send("POST", &path, &[], Some(&body))?;
        let bad = |what: &str| GithubError {
            method: "POST".into(),
            path: path.clone(),
            status: 201,
            detail: format!("the answer has no {what}"),
        };
        let runner: Runner = serde_json::from_value(v.get("runner").cloned().unwrap_or(Value::Null))
            .map_err(|_| bad("runner"))?;
        let jit =
            v.get("encoded_jit_config").and_then(Value::as_str).ok_or_else(|| bad("encoded_jit_config"))?;
        Ok(JitConfig { runner, encoded_jit_config: Secret::new(jit.to_string()) })
    }

    /// Every runner of the scope (all pages), or only those named `name`.
    pub fn list_runners(&self, scope: &Scope, name: Option<&str>) -> Result<Vec<Runner>, GithubError> {
        let path = format!("{}/actions/runners", scope.path());
        let mut out = Vec::new();
        for page in 1..=100u32 {
            let page_s = page.to_string();
            let mut q = vec![("per_page", "100"), ("page", page_s.as_str())];
            if let Some(n) = name {
                q.push(("name", n));
            }
            let (_, v) = self.send("GET", &path, &q, None)?;
            let runners: Vec<Runner> =
                serde_json::from_value(v.get("runners").cloned().unwrap_or(Value::Null)).map_err(|e| {
                    GithubError {
                        method: "GET".into(),
                        path: path.clone(),
                        status: 200,
                        detail: format!("unexpected answer: {e}"),
                    }
                })?;
            let n = runners.len();
            out.extend(runners);
            let total = v.get("total_count").and_then(Value::as_u64).unwrap_or(0) as usize;
            if n < 100 || out.len() >= total {
                break;
            }
        }
        Ok(out)
    }

    /// Deregisters a runner; `Ok(false)` when GitHub no longer knows it.
    pub fn delete_runner(&self, scope: &Scope, id: u64) -> Result<bool, GithubError> {
        let path = format!("{}/actions/runners/{id}", scope.path());
        match self.send("DELETE", &path, &[], None) {
            Ok(_) => Ok(true),
            Err(e) if e.status == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let r = Scope::parse(Some("octo-org/hello.world"), None).unwrap();
        assert_eq!(r.path(), "repos/octo-org/hello.world");
        assert_eq!(Scope::from_path(&r.path()), Some(r));
        let o = Scope::parse(Some("a/b"), Some("octo-org")).unwrap();
        assert_eq!(o.path(), "orgs/octo-org");
        assert_eq!(Scope::from_path("orgs/octo-org"), Some(o));
        for bad in ["a", "a/b/c", "/b", "a/..", "a b/c", "a/$(x)"] {
            let e = Scope::parse(Some(bad), None).unwrap_err().to_string();
            assert!(e.contains(&format!("--repo `{bad}` is not OWNER/REPO")), "{e}");
        }
        assert!(Scope::parse(None, None).unwrap_err().to_string().contains("--repo OWNER/REPO"));
    }

    #[test]
    fn refuses_plain_http_and_missing_token() {
        let e = GithubClient::new("http://github.example", Secret::new("t".into())).err().unwrap();
        assert!(e.to_string().contains("is not an https URL"), "{e}");
        let e = GithubClient::new(DEFAULT_API_URL, Secret::new(" ".into())).err().unwrap();
        assert!(e.to_string().contains("GITHUB_TOKEN is not set"), "{e}");
    }
}
