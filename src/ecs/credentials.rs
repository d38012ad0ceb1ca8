//! Where the ECS client's AccessKey comes from: an explicit pair, an aliyun-CLI profile file, or
//! the runner host's ECS instance RAM role.
//!
//! Why a chain: administrators set the executor up in different ways — a RAM user's AccessKey in
//! the configuration or environment (the reference GitHub setup), the `aliyun` CLI's
//! `~/.aliyun/config.json` they already have, or no key at all on a runner host that is itself
//! an ECS instance with a RAM role (the safest: short-lived STS credentials, nothing on disk).
//! The order is fixed: explicit pair > profile file > instance RAM role.
//!
//! The instance role is read from the metadata service in hardened mode (a session token from
//! `PUT /latest/api/token` sent with every `GET`), cached, and refreshed 5 minutes before its
//! `Expiration`. When the token request fails, the plain request (no token) follows, as Aliyun's
//! credentials provider does (`alibabacloud-credentials` 1.0.12,
//! `alibabacloud_credentials/provider/ecs_ram_role.py`: `_get_metadata_token` returns `None` on
//! any failure unless IMDSv1 is disabled, and `_should_fallback_to_imds_v1` repeats a failed
//! `GET` without the token); `credentials.hardened_only` (its `disable_imds_v1`) refuses that.
//! Every secret is a [`Secret`]; no error or log line here ever contains one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use time::OffsetDateTime;

use super::transport::{HttpRequest, Transport, UreqTransport};
use crate::retry::{Backoff, RetryPolicy};
use crate::secret::Secret;

/// The default metadata service of ECS instances.
pub const DEFAULT_METADATA_ENDPOINT: &str = "http://100.100.100.200";

/// How long before `Expiration` cached role credentials are refreshed.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Lifetime asked for the metadata session token (seconds).
const METADATA_TOKEN_TTL_SECONDS: u32 = 21600;

/// One set of credentials to sign requests with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `AccessKeyId` (not a secret: it is sent in every request and logged by Aliyun).
    pub access_key_id: String,
    /// `AccessKeySecret`.
    pub access_key_secret: Secret<String>,
    /// `SecurityToken`, for STS credentials.
    pub security_token: Option<Secret<String>>,
    /// When STS credentials expire.
    pub expiration: Option<OffsetDateTime>,
}

/// Something that hands out current credentials.
pub trait CredentialsProvider: Send + Sync {
    /// Current credentials (maybe cached, maybe refreshed now).
    fn credentials(&self) -> anyhow::Result<Credentials>;
    /// Where they come from, for people (`AccessKey LTAI…`, `profile \`default\``, ...); never
    /// a secret.
    fn describe(&self) -> String;
}

/// What the configuration says about credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialSpec {
    /// An explicit AccessKey id (with `access_key_secret`).
    pub access_key_id: Option<String>,
    /// An explicit AccessKey secret (with `access_key_id`).
    pub access_key_secret: Option<Secret<String>>,
    /// An STS token going with the explicit pair.
    pub security_token: Option<Secret<String>>,
    /// An aliyun-CLI profile file; it must exist when given (pass the default
    /// `~/.aliyun/config.json` only when it exists).
    pub profile_file: Option<PathBuf>,
    /// The profile to use; the file's `current` when `None`.
    pub profile_name: Option<String>,
    /// The runner host's RAM role name; discovered from the metadata service when `None`.
    pub instance_ram_role: Option<String>,
    /// Whether to fall back to the instance RAM role.
    pub use_instance_role: bool,
    /// Base URL of the metadata service (default [`DEFAULT_METADATA_ENDPOINT`]).
    pub metadata_endpoint: String,
    /// Hardened mode only: when the metadata token request fails, fail instead of falling back
    /// to the plain request.
    pub hardened_only: bool,
}

impl CredentialSpec {
    /// Whether any source of credentials is configured.
    pub fn is_configured(&self) -> bool {
        self.access_key_id.is_some() || self.profile_file.is_some() || self.use_instance_role
    }
}

impl Default for CredentialSpec {
    fn default() -> Self {
        CredentialSpec {
            access_key_id: None,
            access_key_secret: None,
            security_token: None,
            profile_file: None,
            profile_name: None,
            instance_ram_role: None,
            use_instance_role: false,
            metadata_endpoint: DEFAULT_METADATA_ENDPOINT.to_string(),
            hardened_only: false,
        }
    }
}

/// Builds the provider the spec asks for: explicit pair > profile file > instance RAM role.
pub fn provider_from_spec(spec: &CredentialSpec) -> anyhow::Result<Arc<dyn CredentialsProvider>> {
    match (&spec.access_key_id, &spec.access_key_secret) {
        (Some(id), Some(secret)) if !id.trim().is_empty() && !secret.expose().is_empty() => {
            return Ok(Arc::new(StaticProvider::new(Credentials {
                access_key_id: id.trim().to_string(),
                access_key_secret: secret.clone(),
                security_token: spec.security_token.clone().filter(|t| !t.expose().is_empty()),
                expiration: None,
            })));
        }
        (Some(id), _) if !id.trim().is_empty() => {
            bail!(
                "the AccessKey id `{}` is given without its AccessKey secret: give both, or neither",
                id.trim()
            )
        }
        (_, Some(secret)) if !secret.expose().is_empty() => {
            bail!("an AccessKey secret is given without its AccessKey id: give both, or neither")
        }
        _ => {}
    }
    if let Some(path) = &spec.profile_file {
        return provider_from_profile_file(
            path,
            spec.profile_name.as_deref(),
            &spec.metadata_endpoint,
            spec.hardened_only,
        );
    }
    if spec.use_instance_role || spec.instance_ram_role.is_some() {
        return Ok(Arc::new(
            InstanceRoleProvider::new(&spec.metadata_endpoint, spec.instance_ram_role.clone())?
                .hardened_only(spec.hardened_only),
        ));
    }
    bail!(
        "no Aliyun credentials configured: give an AccessKey pair, an aliyun CLI profile file \
         (`~/.aliyun/config.json`), or enable the runner host's instance RAM role"
    )
}

/// Fixed credentials (an explicit pair, or an `AK`/`StsToken` profile).
#[derive(Debug, Clone)]
pub struct StaticProvider {
    creds: Credentials,
    source: String,
}

impl StaticProvider {
    /// Wraps fixed credentials.
    pub fn new(creds: Credentials) -> Self {
        let kind = if creds.security_token.is_some() { "STS AccessKey" } else { "AccessKey" };
        let source = format!("{kind} `{}`", mask_key_id(&creds.access_key_id));
        StaticProvider { creds, source }
    }

    fn with_source(creds: Credentials, source: String) -> Self {
        StaticProvider { creds, source }
    }
}

impl CredentialsProvider for StaticProvider {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        Ok(self.creds.clone())
    }
    fn describe(&self) -> String {
        self.source.clone()
    }
}

/// `LTAI5tAbCdEfGh` → `LTAI5t…EfGh`: enough to recognise, not the whole id.
pub fn mask_key_id(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 10 {
        return id.to_string();
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Reads an aliyun-CLI profile file (`{"current": ..., "profiles": [{"name", "mode", ...}]}`)
/// and builds the provider of the selected profile (`profile_name`, else `current`, else
/// `default`). Modes `AK`, `StsToken` and `EcsRamRole` are supported; `EcsRamRole` reads
/// `metadata_endpoint`, in hardened mode only when `hardened_only`.
pub fn provider_from_profile_file(
    path: &Path,
    profile_name: Option<&str>,
    metadata_endpoint: &str,
    hardened_only: bool,
) -> anyhow::Result<Arc<dyn CredentialsProvider>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the aliyun profile file `{}`", path.display()))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "the aliyun profile file `{}` is not valid JSON (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let wanted = profile_name
        .map(str::to_string)
        .or_else(|| doc.get("current").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string))
        .unwrap_or_else(|| "default".to_string());
    let profiles = doc.get("profiles").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let profile = profiles
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(wanted.as_str()))
        .ok_or_else(|| {
            let names: Vec<&str> =
                profiles.iter().filter_map(|p| p.get("name").and_then(Value::as_str)).collect();
            anyhow!(
                "the aliyun profile file `{}` has no profile `{wanted}` (it has: {})",
                path.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                }
            )
        })?;
    let field = |k: &str| profile.get(k).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
    let mode = field("mode").unwrap_or("AK");
    let source = format!("profile `{wanted}` of `{}`", path.display());
    let need = |k: &str| {
        field(k)
            .ok_or_else(|| anyhow!("profile `{wanted}` in `{}` (mode `{mode}`) has no `{k}`", path.display()))
    };
    match mode {
        "AK" | "StsToken" => {
            let security_token =
                if mode == "StsToken" { Some(Secret::new(need("sts_token")?.to_string())) } else { None };
            let creds = Credentials {
                access_key_id: need("access_key_id")?.to_string(),
                access_key_secret: Secret::new(need("access_key_secret")?.to_string()),
                security_token,
                expiration: None,
            };
            Ok(Arc::new(StaticProvider::with_source(creds, source)))
        }
        "EcsRamRole" => {
            let role = field("ram_role_name").map(str::to_string);
            Ok(Arc::new(InstanceRoleProvider::new(metadata_endpoint, role)?.hardened_only(hardened_only)))
        }
        other => bail!(
            "profile `{wanted}` in `{}` uses mode `{other}`, which is not supported: use a profile with mode \
             `AK`, `StsToken` or `EcsRamRole`, or give an AccessKey pair",
            path.display()
        ),
    }
}

/// Credentials of the ECS instance RAM role of this host, from the metadata service (hardened
/// mode), cached and refreshed [`REFRESH_MARGIN`] before they expire. Thread-safe: concurrent
/// callers wait for one refresh.
pub struct InstanceRoleProvider {
    base: String,
    role: Option<String>,
    hardened_only: bool,
    transport: Box<dyn Transport>,
    now: Box<dyn Fn() -> OffsetDateTime + Send + Sync>,
    cache: Mutex<Option<Credentials>>,
}

impl fmt::Debug for InstanceRoleProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceRoleProvider")
            .field("base", &self.base)
            .field("role", &self.role)
            .field("hardened_only", &self.hardened_only)
            .finish_non_exhaustive()
    }
}

impl InstanceRoleProvider {
    /// A provider asking the metadata service at `base` (e.g. `http://100.100.100.200`) for the
    /// credentials of `role` (discovered when `None`), over HTTP with short timeouts.
    pub fn new(base: &str, role: Option<String>) -> anyhow::Result<Self> {
        let transport = UreqTransport::new(Duration::from_secs(2), Duration::from_secs(5));
        Self::with_transport(base, role, Box::new(transport))
    }

    /// The same over any transport (tests).
    pub fn with_transport(
        base: &str,
        role: Option<String>,
        transport: Box<dyn Transport>,
    ) -> anyhow::Result<Self> {
        let base = base.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("metadata endpoint `{base}` is not an http:// URL: use e.g. `{DEFAULT_METADATA_ENDPOINT}`");
        }
        Ok(InstanceRoleProvider {
            base,
            role: role.filter(|r| !r.trim().is_empty()),
            hardened_only: false,
            transport,
            now: Box::new(OffsetDateTime::now_utc),
            cache: Mutex::new(None),
        })
    }

    /// Replaces the clock used to decide when to refresh (tests).
    pub fn with_clock(mut self, now: impl Fn() -> OffsetDateTime + Send + Sync + 'static) -> Self {
        self.now = Box::new(now);
        self
    }

    /// Refuses the plain request when the hardened-mode token request fails (default: fall
    /// back to it, as Aliyun's credentials provider does).
    pub fn hardened_only(mut self, yes: bool) -> Self {
        self.hardened_only = yes;
        self
    }

    /// `GET /latest/meta-data/<path>`, with the session token when there is one.
    fn get_once(&self, path: &str, token: Option<&Secret<String>>) -> anyhow::Result<String> {
        let url = format!("{}/latest/meta-data/{path}", self.base);
        let mut req = HttpRequest::new("GET", url.clone());
        if let Some(t) = token {
            req = req.header("X-aliyun-ecs-metadata-token", t.expose().as_str());
        }
        let resp = self.transport.send(&req).map_err(|e| {
            anyhow!("the metadata service did not answer: {e} (is this runner host an ECS instance?)")
        })?;
        if !(200..300).contains(&resp.status) {
            bail!("the metadata service answered HTTP {} to GET `{url}`", resp.status);
        }
        Ok(resp.body)
    }

    /// [`Self::get_once`]; a failed `GET` with a token is repeated without one unless
    /// `hardened_only` (`ecs_ram_role.py`, `_should_fallback_to_imds_v1`). When the plain try
    /// fails too, the first error is the one that says what is wrong.
    fn get(&self, path: &str, token: Option<&Secret<String>>) -> anyhow::Result<String> {
        match self.get_once(path, token) {
            Err(e) if token.is_some() && !self.hardened_only => self.get_once(path, None).map_err(|_| e),
            r => r,
        }
    }

    /// The hardened-mode session token; `None` (plain requests) when the service gives none and
    /// `hardened_only` is off.
    fn token(&self) -> anyhow::Result<Option<Secret<String>>> {
        let token_url = format!("{}/latest/api/token", self.base);
        let req = HttpRequest::new("PUT", token_url.clone())
            .header("X-aliyun-ecs-metadata-token-ttl-seconds", METADATA_TOKEN_TTL_SECONDS.to_string());
        let why = match self.transport.send(&req) {
            Ok(resp) if (200..300).contains(&resp.status) => {
                return Ok(Some(Secret::new(resp.body.trim().to_string())));
            }
            Ok(resp) if self.hardened_only => bail!(
                "the metadata service answered HTTP {} to PUT `{token_url}` (hardened mode token), and \
                 `credentials.hardened_only` forbids the plain request: unset it to fall back to the plain \
                 request as Aliyun's credentials provider does",
                resp.status
            ),
            Err(e) if self.hardened_only => {
                bail!("the metadata service did not answer: {e} (is this runner host an ECS instance?)")
            }
            Ok(resp) => format!("HTTP {} to PUT `{token_url}`", resp.status),
            Err(e) => e.message,
        };
        log::info!("no hardened mode metadata token ({why}); reading the instance RAM role in plain mode");
        Ok(None)
    }

    fn fetch(&self) -> anyhow::Result<Credentials> {
        let token = self.token()?;
        let token = token.as_ref();
        let role = match &self.role {
            Some(r) => r.clone(),
            None => {
                let list = self.get("ram/security-credentials/", token)?;
                list.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string).ok_or_else(|| {
                    anyhow!("this ECS instance has no RAM role attached (the metadata service lists none)")
                })?
            }
        };
        let body = self.get(&format!("ram/security-credentials/{role}"), token)?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|_| anyhow!("the metadata service's credentials for RAM role `{role}` are not JSON"))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string).filter(|s| !s.is_empty());
        if let Some(code) = s("Code") {
            if code != "Success" {
                bail!("the metadata service refused credentials for RAM role `{role}`: `Code` is `{code}`");
            }
        }
        let missing =
            |k: &str| anyhow!("the metadata service's credentials for RAM role `{role}` have no `{k}`");
        let expiration = match s("Expiration") {
            Some(e) => Some(super::types::parse_time(&e).ok_or_else(|| {
                anyhow!("RAM role `{role}` credentials have an unreadable `Expiration` `{e}`")
            })?),
            None => None,
        };
        // Names and times only: the token, secret and session token never reach a log.
        log::debug!(
            "RAM role `{role}`: credentials from the metadata service `{}`, expiring {}",
            self.base,
            s("Expiration").as_deref().unwrap_or("never")
        );
        Ok(Credentials {
            access_key_id: s("AccessKeyId").ok_or_else(|| missing("AccessKeyId"))?,
            access_key_secret: Secret::new(s("AccessKeySecret").ok_or_else(|| missing("AccessKeySecret"))?),
            security_token: Some(Secret::new(s("SecurityToken").ok_or_else(|| missing("SecurityToken"))?)),
            expiration,
        })
    }

    fn fresh_enough(&self, c: &Credentials) -> bool {
        match c.expiration {
            None => true,
            Some(exp) => (self.now)() + REFRESH_MARGIN < exp,
        }
    }
}

impl CredentialsProvider for InstanceRoleProvider {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let mut cache = self.cache.lock().map_err(|_| anyhow!("the credentials cache is poisoned"))?;
        if let Some(c) = cache.as_ref() {
            if self.fresh_enough(c) {
                return Ok(c.clone());
            }
        }
        // The metadata service is local and fast; a failure is usually a blip (the service
        // restarting, a dropped connection), so two more tries, 200 and 800 ms later, come first.
        let blips = Backoff::exponential(Duration::from_millis(200), 4, Duration::from_millis(800));
        match RetryPolicy::rounds(3, blips).retry(|_| self.fetch(), Result::is_err) {
            Ok(c) => {
                *cache = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                // Within the refresh margin the old credentials still work: use them, but say so.
                if let Some(c) = cache.as_ref() {
                    if c.expiration.is_some_and(|exp| (self.now)() < exp) {
                        log::warn!("refreshing the instance RAM role credentials failed ({e:#}); using the cached ones until they expire");
                        return Ok(c.clone());
                    }
                }
                Err(e.context("failed to get the instance RAM role credentials from the metadata service"))
            }
        }
    }

    fn describe(&self) -> String {
        match &self.role {
            Some(r) => format!("instance RAM role `{r}` (metadata service `{}`)", self.base),
            None => format!("instance RAM role (metadata service `{}`)", self.base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ecs::transport::{HttpResponse, TransportError};
    use std::sync::atomic::{AtomicI64, Ordering};
    use time::macros::datetime;

    const SECRET: &str = "profile-Secret-value-123";
    const TOKEN: &str = "CAIS-sts-token-value-456";

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let p = dir.path().join("config.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn profiles() -> String {
        serde_json::json!({
            "current": "work",
            "profiles": [
                {"name": "default", "mode": "AK", "access_key_id": "LTAIdefaultKey0001", "access_key_secret": SECRET, "region_id": "cn-hangzhou"},
                {"name": "work", "mode": "StsToken", "access_key_id": "STS.workKey0002", "access_key_secret": SECRET, "sts_token": TOKEN},
                {"name": "arn", "mode": "RamRoleArn", "access_key_id": "x", "access_key_secret": SECRET, "ram_role_arn": "acs:ram::1:role/r"},
                {"name": "ecs", "mode": "EcsRamRole", "ram_role_name": "runner-role"},
                {"name": "broken", "mode": "AK", "access_key_id": "LTAIbroken"}
            ]
        })
        .to_string()
    }

    #[test]
    fn explicit_pair_wins() {
        let dir = tempfile::tempdir().unwrap();
        let spec = CredentialSpec {
            access_key_id: Some("LTAIexplicit000001".into()),
            access_key_secret: Some(Secret::new(SECRET.into())),
            security_token: Some(Secret::new(TOKEN.into())),
            profile_file: Some(write(&dir, &profiles())),
            use_instance_role: true,
            ..Default::default()
        };
        let p = provider_from_spec(&spec).unwrap();
        let c = p.credentials().unwrap();
        assert_eq!(c.access_key_id, "LTAIexplicit000001");
        assert_eq!(c.security_token.as_ref().map(|t| t.expose().as_str()), Some(TOKEN));
        assert_eq!(p.describe(), "STS AccessKey `LTAIex…0001`");
    }

    #[test]
    fn half_a_pair_is_an_error() {
        let spec = CredentialSpec { access_key_id: Some("LTAIonly".into()), ..Default::default() };
        assert_eq!(
            provider_from_spec(&spec).err().unwrap().to_string(),
            "the AccessKey id `LTAIonly` is given without its AccessKey secret: give both, or neither"
        );
        let spec =
            CredentialSpec { access_key_secret: Some(Secret::new(SECRET.into())), ..Default::default() };
        let e = provider_from_spec(&spec).err().unwrap().to_string();
        assert!(!e.contains(SECRET));
        assert_eq!(e, "an AccessKey secret is given without its AccessKey id: give both, or neither");
    }

    #[test]
    fn nothing_configured_says_what_to_do() {
        let e = provider_from_spec(&CredentialSpec::default()).err().unwrap().to_string();
        assert!(e.starts_with("no Aliyun credentials configured: give an AccessKey pair"), "{e}");
    }

    #[test]
    fn profile_file_selects_current_or_named_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &profiles());
        let spec = CredentialSpec { profile_file: Some(path.clone()), ..Default::default() };
        let c = provider_from_spec(&spec).unwrap().credentials().unwrap();
        assert_eq!(c.access_key_id, "STS.workKey0002");
        assert_eq!(c.security_token.map(|t| t.expose().clone()), Some(TOKEN.to_string()));

        let spec = CredentialSpec {
            profile_file: Some(path.clone()),
            profile_name: Some("default".into()),
            ..Default::default()
        };
        let p = provider_from_spec(&spec).unwrap();
        let c = p.credentials().unwrap();
        assert_eq!(c.access_key_id, "LTAIdefaultKey0001");
        assert_eq!(c.security_token, None);
        assert_eq!(p.describe(), format!("profile `default` of `{}`", path.display()));

        let spec = CredentialSpec {
            profile_file: Some(path.clone()),
            profile_name: Some("ecs".into()),
            ..Default::default()
        };
        let p = provider_from_spec(&spec).unwrap();
        assert_eq!(
            p.describe(),
            "instance RAM role `runner-role` (metadata service `http://100.100.100.200`)"
        );
    }

    #[test]
    fn profile_file_errors_name_the_profile_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &profiles());
        let err = |name: &str| {
            let spec = CredentialSpec {
                profile_file: Some(path.clone()),
                profile_name: Some(name.into()),
                ..Default::default()
            };
            let e = provider_from_spec(&spec).err().unwrap();
            let s = format!("{e:#}");
            assert!(!s.contains(SECRET));
            s
        };
        let p = path.display();
        assert_eq!(
            err("arn"),
            format!("profile `arn` in `{p}` uses mode `RamRoleArn`, which is not supported: use a profile with mode `AK`, `StsToken` or `EcsRamRole`, or give an AccessKey pair")
        );
        assert_eq!(
            err("broken"),
            format!("profile `broken` in `{p}` (mode `AK`) has no `access_key_secret`")
        );
        assert_eq!(
            err("nope"),
            format!("the aliyun profile file `{p}` has no profile `nope` (it has: `default`, `work`, `arn`, `ecs`, `broken`)")
        );
        let missing = dir.path().join("missing.json");
        let spec = CredentialSpec { profile_file: Some(missing.clone()), ..Default::default() };
        let e = format!("{:#}", provider_from_spec(&spec).err().unwrap());
        assert!(
            e.starts_with(&format!("failed to read the aliyun profile file `{}`: ", missing.display())),
            "{e}"
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, format!("{{\"x\": \"{SECRET}\" oops")).unwrap();
        let spec = CredentialSpec { profile_file: Some(bad.clone()), ..Default::default() };
        let e = format!("{:#}", provider_from_spec(&spec).err().unwrap());
        assert!(!e.contains(SECRET));
        assert!(
            e.starts_with(&format!("the aliyun profile file `{}` is not valid JSON", bad.display())),
            "{e}"
        );
    }

    /// A scripted metadata service: records requests, answers by method and path.
    struct FakeMetadata {
        calls: Mutex<Vec<HttpRequest>>,
        expiration: Mutex<String>,
        fail: std::sync::atomic::AtomicBool,
        /// A service without hardened mode: the token request answers 404, plain GETs work.
        no_tokens: std::sync::atomic::AtomicBool,
    }

    impl Transport for Arc<FakeMetadata> {
        fn send(&self, req: &HttpRequest) -> Result<HttpResponse, TransportError> {
            self.calls.lock().unwrap().push(req.clone());
            if self.fail.load(Ordering::SeqCst) {
                return Err(TransportError {
                    message: format!("{} `{}`: connection refused", req.method, req.url),
                    retriable: true,
                });
            }
            let path = req.url.trim_start_matches("http://meta.test");
            let ok = |body: String| Ok(HttpResponse { status: 200, body });
            match (req.method.as_str(), path) {
                ("PUT", "/latest/api/token") if self.no_tokens.load(Ordering::SeqCst) => {
                    Ok(HttpResponse { status: 404, body: "Not Found".into() })
                }
                ("PUT", "/latest/api/token") => {
                    assert_eq!(req.header_value("X-aliyun-ecs-metadata-token-ttl-seconds"), Some("21600"));
                    ok("session-token".into())
                }
                (_, _)
                    if self.no_tokens.load(Ordering::SeqCst)
                        && req.header_value("X-aliyun-ecs-metadata-token").is_none() =>
                {
                    self.plain(path)
                }
                (_, _) if req.header_value("X-aliyun-ecs-metadata-token") != Some("session-token") => {
                    Ok(HttpResponse { status: 401, body: String::new() })
                }
                _ => self.plain(path),
            }
        }
    }

    impl FakeMetadata {
        fn plain(&self, path: &str) -> Result<HttpResponse, TransportError> {
            let ok = |body: String| Ok(HttpResponse { status: 200, body });
            match path {
                "/latest/meta-data/ram/security-credentials/" => ok("runner-role\n".into()),
                "/latest/meta-data/ram/security-credentials/runner-role" => ok(serde_json::json!({
                    "AccessKeyId": "STS.roleKey0003", "AccessKeySecret": SECRET, "SecurityToken": TOKEN,
                    "Expiration": *self.expiration.lock().unwrap(), "LastUpdated": "2025-01-01T00:00:00Z", "Code": "Success"
                })
                .to_string()),
                _ => Ok(HttpResponse { status: 404, body: "not found".into() }),
            }
        }
    }

    fn fake() -> Arc<FakeMetadata> {
        Arc::new(FakeMetadata {
            calls: Mutex::new(Vec::new()),
            expiration: Mutex::new("2025-01-01T06:00:00Z".into()),
            fail: Default::default(),
            no_tokens: Default::default(),
        })
    }

    #[test]
    fn instance_role_uses_hardened_mode_caches_and_refreshes() {
        let meta = fake();
        let now = Arc::new(AtomicI64::new(datetime!(2025-01-01 00:00 UTC).unix_timestamp()));
        let clock = now.clone();
        let p = InstanceRoleProvider::with_transport("http://meta.test/", None, Box::new(meta.clone()))
            .unwrap()
            .with_clock(move || OffsetDateTime::from_unix_timestamp(clock.load(Ordering::SeqCst)).unwrap());
        let c = p.credentials().unwrap();
        assert_eq!(c.access_key_id, "STS.roleKey0003");
        assert_eq!(c.security_token.as_ref().unwrap().expose(), TOKEN);
        assert_eq!(c.expiration, Some(datetime!(2025-01-01 06:00 UTC)));
        let seen: Vec<String> =
            meta.calls.lock().unwrap().iter().map(|r| format!("{} {}", r.method, r.url)).collect();
        assert_eq!(
            seen,
            vec![
                "PUT http://meta.test/latest/api/token",
                "GET http://meta.test/latest/meta-data/ram/security-credentials/",
                "GET http://meta.test/latest/meta-data/ram/security-credentials/runner-role",
            ]
        );
        // Cached: no new calls well before expiry.
        now.store(datetime!(2025-01-01 05:54 UTC).unix_timestamp(), Ordering::SeqCst);
        p.credentials().unwrap();
        assert_eq!(meta.calls.lock().unwrap().len(), 3);
        // Five minutes before expiry: refreshed.
        *meta.expiration.lock().unwrap() = "2025-01-01T12:00:00Z".into();
        now.store(datetime!(2025-01-01 05:56 UTC).unix_timestamp(), Ordering::SeqCst);
        let c = p.credentials().unwrap();
        assert_eq!(c.expiration, Some(datetime!(2025-01-01 12:00 UTC)));
        assert_eq!(meta.calls.lock().unwrap().len(), 6);
        // A failing refresh inside the margin keeps the still-valid credentials...
        meta.fail.store(true, Ordering::SeqCst);
        now.store(datetime!(2025-01-01 11:57 UTC).unix_timestamp(), Ordering::SeqCst);
        assert_eq!(p.credentials().unwrap().access_key_id, "STS.roleKey0003");
        // ...but not expired ones.
        now.store(datetime!(2025-01-01 12:01 UTC).unix_timestamp(), Ordering::SeqCst);
        let e = format!("{:#}", p.credentials().unwrap_err());
        assert_eq!(
            e,
            "failed to get the instance RAM role credentials from the metadata service: the metadata service did not answer: \
             GET `http://meta.test/latest/meta-data/ram/security-credentials/`: connection refused (is this runner host an \
             ECS instance?)"
        );
        assert!(!e.contains(SECRET) && !e.contains(TOKEN));
    }

    /// A metadata service that gives no token: the plain requests follow, as Aliyun's
    /// credentials provider does; `hardened_only` refuses them with one line.
    #[test]
    fn without_a_token_plain_requests_follow_unless_hardened_only() {
        let meta = fake();
        meta.no_tokens.store(true, Ordering::SeqCst);
        let p =
            InstanceRoleProvider::with_transport("http://meta.test", None, Box::new(meta.clone())).unwrap();
        assert_eq!(p.credentials().unwrap().access_key_id, "STS.roleKey0003");
        let seen: Vec<String> = meta
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|r| format!("{} {} {:?}", r.method, r.url, r.header_value("X-aliyun-ecs-metadata-token")))
            .collect();
        assert_eq!(
            seen,
            [
                "PUT http://meta.test/latest/api/token None",
                "GET http://meta.test/latest/meta-data/ram/security-credentials/ None",
                "GET http://meta.test/latest/meta-data/ram/security-credentials/runner-role None",
            ]
        );

        let meta = fake();
        meta.no_tokens.store(true, Ordering::SeqCst);
        let p = InstanceRoleProvider::with_transport("http://meta.test", None, Box::new(meta.clone()))
            .unwrap()
            .hardened_only(true);
        let e = format!("{:#}", p.credentials().unwrap_err());
        assert_eq!(
            e,
            "failed to get the instance RAM role credentials from the metadata service: the metadata service answered \
             HTTP 404 to PUT `http://meta.test/latest/api/token` (hardened mode token), and `credentials.hardened_only` \
             forbids the plain request: unset it to fall back to the plain request as Aliyun's credentials provider does"
        );
        assert!(meta.calls.lock().unwrap().iter().all(|r| r.method == "PUT"), "no plain request was sent");
    }

    #[test]
    fn configured_role_skips_discovery() {
        let meta = fake();
        let p = InstanceRoleProvider::with_transport(
            "http://meta.test",
            Some("runner-role".into()),
            Box::new(meta.clone()),
        )
        .unwrap();
        p.credentials().unwrap();
        let urls: Vec<String> = meta.calls.lock().unwrap().iter().map(|r| r.url.clone()).collect();
        assert!(!urls.iter().any(|u| u.ends_with("security-credentials/")), "{urls:?}");
        let p =
            InstanceRoleProvider::with_transport("http://meta.test", Some("other".into()), Box::new(meta))
                .unwrap();
        let e = format!("{:#}", p.credentials().unwrap_err());
        assert!(e.ends_with("the metadata service answered HTTP 404 to GET `http://meta.test/latest/meta-data/ram/security-credentials/other`"), "{e}");
    }

    #[test]
    fn debug_of_credential_types_shows_no_secret() {
        let creds = Credentials {
            access_key_id: "LTAIdebug".into(),
            access_key_secret: Secret::new(SECRET.into()),
            security_token: Some(Secret::new(TOKEN.into())),
            expiration: None,
        };
        let spec = CredentialSpec {
            access_key_id: Some("LTAIdebug".into()),
            access_key_secret: Some(Secret::new(SECRET.into())),
            security_token: Some(Secret::new(TOKEN.into())),
            ..Default::default()
        };
        let meta = fake();
        let role = InstanceRoleProvider::with_transport("http://meta.test", None, Box::new(meta)).unwrap();
        role.credentials().unwrap();
        let texts = [
            format!("{creds:?}"),
            format!("{spec:?}"),
            format!("{:?}", StaticProvider::new(creds.clone())),
            format!("{role:?}"),
            StaticProvider::new(creds.clone()).describe(),
            role.describe(),
        ];
        for t in texts {
            assert!(!t.contains(SECRET) && !t.contains(TOKEN), "{t}");
        }
    }
}
