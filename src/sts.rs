//! Credentials that can delete one instance only: the self-destruct watchdog's.
//!
//! Job code runs as root on the instance, so whatever credentials the watchdog holds, the job
//! holds too. With a shared instance RAM role those could delete every managed instance (job
//! logs print instance ids). So by default no role is given to the instance: once SSH works,
//! the runner host calls STS `AssumeRole` for `self_destruct.role_arn` with an inline session
//! `Policy` that allows `ecs:DeleteInstance` on `acs:ecs:*:*:instance/<this id>` and nothing
//! else, and writes the result over the pinned SSH session to a root-only file the watchdog
//! reads ([`crate::watchdog::credentials_path`]). Each `run` stage renews them when they would
//! expire before the watchdog's idle timeout.
//!
//! Sources (Alibaba Cloud):
//! - STS `AssumeRole` (API version `2015-04-01`, `RoleArn` `acs:ram::$accountID:role/$roleName`,
//!   `RoleSessionName` 2 to 32 of `[A-Za-z0-9.@_-]`, `DurationSeconds` from 900 s up to the role's
//!   `MaxSessionDuration` (default 3600, at most 43200), `Policy`: the session's permissions are
//!   those of this policy that the role also has): <https://www.alibabacloud.com/help/doc-detail/28763.htm>,
//!   <https://www.alibabacloud.com/help/en/ram/developer-reference/api-sts-2015-04-01-assumerole>,
//!   the legacy SDK's request model `aliyun-python-sdk-sts/aliyunsdksts/request/v20150401/AssumeRoleRequest.py`
//!   and the credentials SDK's `alibabacloud_credentials/provider/ram_role_arn.py` (the same
//!   RPC signature v1 as ECS; `DurationSeconds` below 900 refused; endpoint
//!   `sts.<region>.aliyuncs.com`).
//! - Error codes `InvalidParameter.RoleSessionName`, `InvalidParameter.DurationSeconds`,
//!   `InvalidParameter.PolicyGrammar`: <https://www.alibabacloud.com/help/doc-detail/42775.htm>.
//! - Resource ARNs in RAM policies, `acs:ecs:{region}:{account}:instance/{id}` with `*`
//!   wildcards: <https://www.alibabacloud.com/help/en/ram/user-guide/policy-elements> and ECS's
//!   RAM authorization table <https://www.alibabacloud.com/help/en/ecs/developer-reference/ram-authorization>.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use crate::config::Config;
use crate::credentials::{Credentials, StaticProvider};
use crate::ecs::{ClientConfig, EcsClient};
use crate::secret::Secret;
use crate::ssh::SshTarget;
use crate::stages::{Context, Progress};

/// STS's RPC API version.
pub const STS_API_VERSION: &str = "2015-04-01";
/// `DurationSeconds` bounds: 15 minutes, and the longest maximum session a role can have.
pub const MIN_DURATION: Duration = Duration::from_secs(900);
/// See [`MIN_DURATION`].
pub const MAX_DURATION: Duration = Duration::from_secs(43_200);
/// Renew when the credentials would expire within the idle timeout plus this margin.
const RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Where the watchdog's credentials come from (`self_destruct.credentials`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialMode {
    /// Default: per-instance STS credentials handed over by SSH, scoped to that instance.
    Sts,
    /// Opt-in, the old way: the instance RAM role `instance.ram_role_name` from the metadata
    /// service. Anything on any instance (every job runs as root) can then do whatever the role
    /// allows to every instance the role's policy covers.
    InstanceRole,
}

/// `[self_destruct]`: how the watchdog gets its credentials and which endpoint it calls.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfDestruct {
    /// STS (default) or the shared instance role.
    pub credentials: CredentialMode,
    /// The RAM role the runner host assumes for each instance (`acs:ram::<account>:role/<name>`).
    pub role_arn: Option<String>,
    /// STS endpoint override; default `https://sts.<region>.aliyuncs.com`.
    pub sts_endpoint: Option<String>,
    /// `DurationSeconds` of each AssumeRole (default 1 hour).
    pub duration: Duration,
    /// The ECS endpoint the watchdog calls; default see [`SelfDestruct::watchdog_endpoint`].
    pub ecs_endpoint: Option<String>,
}

/// `[self_destruct]` as written in the file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawSelfDestruct {
    credentials: Option<CredentialMode>,
    role_arn: Option<String>,
    sts_endpoint: Option<String>,
    duration: Option<String>,
    ecs_endpoint: Option<String>,
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `acs:ram::<account id>:role/<role name>` (role names: letters, digits, `.` and `-`, at most
/// 64 characters).
fn valid_role_arn(arn: &str) -> bool {
    let Some(rest) = arn.strip_prefix("acs:ram::") else { return false };
    let Some((account, role)) = rest.split_once(":role/") else { return false };
    !account.is_empty()
        && account.bytes().all(|b| b.is_ascii_digit())
        && (1..=64).contains(&role.len())
        && role.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

impl SelfDestruct {
    /// Validates the section. `region` checks endpoints when it is known already.
    pub(crate) fn from_raw(raw: RawSelfDestruct, region: Option<&str>) -> Result<SelfDestruct> {
        let role_arn = nonempty(raw.role_arn);
        if let Some(arn) = &role_arn {
            if !valid_role_arn(arn) {
                bail!(
                    "self_destruct.role_arn `{arn}` is not a RAM role ARN: use `acs:ram::<account id>:role/<role name>` \
                     (the role's page in the RAM console shows it)"
                );
            }
        }
        let duration = match nonempty(raw.duration) {
            None => Duration::from_secs(3600),
            Some(s) => crate::config::parse_duration(&s)
                .map_err(|why| anyhow!("self_destruct.duration `{s}` {why}"))?,
        };
        if !(MIN_DURATION..=MAX_DURATION).contains(&duration) {
            bail!(
                "self_destruct.duration `{}` is outside what STS AssumeRole accepts: use 15m to 12h (default 1h)",
                crate::config::format_duration(duration)
            );
        }
        let check = |key: &str, ep: Option<String>| -> Result<Option<String>> {
            match (ep, region) {
                (Some(e), Some(r)) => crate::ecs::resolve_endpoint(r, Some(&e))
                    .map(Some)
                    .map_err(|why| anyhow!("self_destruct.{key}: {why}")),
                (e, _) => Ok(e),
            }
        };
        Ok(SelfDestruct {
            credentials: raw.credentials.unwrap_or(CredentialMode::Sts),
            role_arn,
            sts_endpoint: check("sts_endpoint", nonempty(raw.sts_endpoint))?,
            duration,
            ecs_endpoint: check("ecs_endpoint", nonempty(raw.ecs_endpoint))?,
        })
    }

    /// The STS endpoint the runner host calls.
    pub fn sts_endpoint(&self, region: &str) -> String {
        self.sts_endpoint.clone().unwrap_or_else(|| format!("https://sts.{region}.aliyuncs.com"))
    }

    /// The ECS endpoint the watchdog calls from inside the instance: `self_destruct.ecs_endpoint`;
    /// else, for instances without a public IP, the VPC endpoint `ecs-vpc.<region>.aliyuncs.com`
    /// (reachable from inside a VPC without internet access:
    /// <https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-endpoint>);
    /// else the runner's own endpoint (`aliyun.endpoint` or the region's public one).
    pub fn watchdog_endpoint(&self, config: &Config) -> Result<String> {
        let region = config.region()?;
        if let Some(e) = &self.ecs_endpoint {
            return crate::ecs::resolve_endpoint(region, Some(e));
        }
        if config.network.private_ip {
            return Ok(format!("https://ecs-vpc.{region}.aliyuncs.com"));
        }
        config.endpoint_url()
    }

    /// The RAM role given to instances at creation: only in the opt-in shared-role mode.
    pub fn instance_role(&self, instance: &crate::config::InstanceConfig) -> Option<String> {
        match self.credentials {
            CredentialMode::InstanceRole => instance.ram_role_name.clone(),
            CredentialMode::Sts => None,
        }
    }

    /// Whether instances get scoped STS credentials from the runner host.
    pub fn hands_over(&self) -> bool {
        self.credentials == CredentialMode::Sts && self.role_arn.is_some()
    }
}

/// The one warning the configuration deserves about the watchdog's credentials, if any.
pub(crate) fn config_warning(
    safety: &crate::config::Safety,
    instance: &crate::config::InstanceConfig,
    sd: &SelfDestruct,
) -> Option<String> {
    if !safety.watchdog {
        return None;
    }
    match sd.credentials {
        CredentialMode::Sts if instance.ram_role_name.is_some() => Some(
            "`instance.ram_role_name` is not given to instances unless `self_destruct.credentials = \"instance_role\"`: \
             every job could read that role's credentials (docs/safety.md)"
                .into(),
        ),
        CredentialMode::Sts if sd.role_arn.is_none() => Some(
            "`safety.watchdog` is on but `self_destruct.role_arn` is empty: instances get no credentials, so the \
             watchdog cannot delete them; `AutoReleaseTime` still releases them (docs/safety.md)"
                .into(),
        ),
        CredentialMode::Sts if sd.duration < safety.idle_timeout + RENEW_MARGIN => Some(format!(
            "`self_destruct.duration` ({}) is shorter than `safety.idle_timeout` plus 5 minutes: an idle \
             instance's watchdog may hold expired credentials; `AutoReleaseTime` still releases it",
            crate::config::format_duration(sd.duration)
        )),
        CredentialMode::InstanceRole if instance.ram_role_name.is_none() => Some(
            "`self_destruct.credentials = \"instance_role\"` but `instance.ram_role_name` is empty: the watchdog \
             cannot delete the instance; `AutoReleaseTime` still releases it"
                .into(),
        ),
        CredentialMode::InstanceRole => Some(
            "`self_destruct.credentials = \"instance_role\"`: every job can read the instance role's credentials \
             and delete any instance the role's policy covers; the default `sts` mode limits them to the job's \
             own instance (docs/safety.md)"
                .into(),
        ),
        CredentialMode::Sts => None,
    }
}

/// The inline session policy: delete this one instance, nothing else (deny by default).
pub fn session_policy(instance_id: &str) -> Value {
    json!({
        "Version": "1",
        "Statement": [{
            "Effect": "Allow",
            "Action": ["ecs:DeleteInstance"],
            "Resource": [format!("acs:ecs:*:*:instance/{instance_id}")],
        }],
    })
}

/// `RoleSessionName`: 2 to 32 of `[A-Za-z0-9.@_-]` (AssumeRole reference,
/// <https://www.alibabacloud.com/help/doc-detail/28763.htm>). It names the instance, which
/// ActionTrail then shows; the instance's tags name the job (`_job_id` is kept for callers).
pub fn session_name(_job_id: &str, instance_id: &str) -> String {
    let raw = format!("ci-spot-{instance_id}");
    let mut s: String =
        raw.chars().filter(|c| c.is_ascii_alphanumeric() || ".@_-".contains(*c)).take(32).collect();
    while s.len() < 2 {
        s.push('x');
    }
    s
}

/// Calls STS `AssumeRole` with the runner's own credentials; returns the scoped credentials.
pub fn assume_role(config: &Config, instance_id: &str, job_id: &str) -> Result<Credentials> {
    let sd = &config.self_destruct;
    let role_arn = sd.role_arn.as_deref().context("self_destruct.role_arn is not set")?;
    let region = config.region()?;
    let creds = crate::credentials::provider_from_spec(&config.credentials)?;
    let client = EcsClient::new(
        ClientConfig {
            region_id: region.to_string(),
            endpoint: Some(sd.sts_endpoint(region)),
            timeout: config.timeouts.api_call,
            retry: config.api_retry.clone(),
        },
        creds,
    )?;
    let params = vec![
        ("RoleArn".to_string(), role_arn.to_string()),
        ("RoleSessionName".to_string(), session_name(job_id, instance_id)),
        ("DurationSeconds".to_string(), sd.duration.as_secs().to_string()),
        ("Policy".to_string(), session_policy(instance_id).to_string()),
    ];
    let answer = client.call_api(STS_API_VERSION, "AssumeRole", &params)?;
    parse_credentials(&answer["Credentials"]).context("STS AssumeRole answered without usable credentials")
}

/// `{AccessKeyId, AccessKeySecret, SecurityToken, Expiration}` (AssumeRole's `Credentials`,
/// and the file the watchdog reads).
fn parse_credentials(v: &Value) -> Result<Credentials> {
    let field = |k: &str| v[k].as_str().filter(|s| !s.is_empty()).with_context(|| format!("no `{k}`"));
    let expiration =
        crate::ecs::types::parse_time(field("Expiration")?).context("unreadable `Expiration`")?;
    Ok(Credentials {
        access_key_id: field("AccessKeyId")?.to_string(),
        access_key_secret: Secret::new(field("AccessKeySecret")?.to_string()),
        security_token: Some(Secret::new(field("SecurityToken")?.to_string())),
        expiration: Some(expiration),
    })
}

/// The credentials file's text, in the metadata service's shape so the watchdog reads both alike.
fn credentials_file(c: &Credentials) -> Secret<String> {
    let v = json!({
        "AccessKeyId": c.access_key_id,
        "AccessKeySecret": c.access_key_secret.expose(),
        "SecurityToken": c.security_token.as_ref().map(|t| t.expose().as_str()).unwrap_or(""),
        "Expiration": c.expiration.map(crate::ecs::types::format_utc).unwrap_or_default(),
    });
    Secret::new(v.to_string())
}

/// A provider of fixed credentials (tests and tools that act with handed-over credentials).
pub fn provider(c: Credentials) -> Arc<StaticProvider> {
    Arc::new(StaticProvider::new(c))
}

/// Obtains credentials for `instance_id` and writes them to the instance over SSH; records
/// their expiry in `stamp` (a file in the job's private state directory).
pub fn hand_over(
    config: &Config,
    target: &SshTarget,
    instance_id: &str,
    job_id: &str,
    stamp: &Path,
) -> Result<()> {
    let creds = assume_role(config, instance_id, job_id)?;
    let text = credentials_file(&creds);
    crate::ssh::install_private_file(
        target,
        &crate::watchdog::credentials_path(instance_id),
        text.expose().as_bytes(),
    )?;
    let expires = creds.expiration.map(|t| t.unix_timestamp()).unwrap_or(0);
    crate::fsutil::write_atomic(stamp, expires.to_string().as_bytes(), 0o600)
        .with_context(|| format!("failed to record the credentials' expiry in `{}`", stamp.display()))?;
    Ok(())
}

/// Renews the handed-over credentials when they would expire before the watchdog may need
/// them (within the idle timeout plus a margin). Nothing to do when none were handed over.
pub fn renew_if_due(
    config: &Config,
    target: &SshTarget,
    instance_id: &str,
    job_id: &str,
    stamp: &Path,
) -> Result<bool> {
    if !(config.safety.watchdog && config.self_destruct.hands_over()) {
        return Ok(false);
    }
    let expires = std::fs::read_to_string(stamp).ok().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(0);
    let need = (config.safety.idle_timeout + RENEW_MARGIN).as_secs() as i64;
    if expires - OffsetDateTime::now_utc().unix_timestamp() > need {
        return Ok(false);
    }
    hand_over(config, target, instance_id, job_id, stamp)?;
    Ok(true)
}

/// `prepare`, once SSH works: hands the new instance its scoped credentials. A failure leaves
/// the job running without the watchdog's net (one warning line; `AutoReleaseTime` still holds).
pub fn hand_over_at_prepare(ctx: &Context, target: &SshTarget, id: &str) {
    if !(ctx.config.safety.watchdog && ctx.config.self_destruct.hands_over()) {
        return;
    }
    match hand_over(&ctx.config, target, id, &ctx.key.job_id, &ctx.credentials_stamp()) {
        Ok(()) => Progress
            .line(format!("Gave {id} credentials that can delete only {id}, for its self-destruct watchdog")),
        Err(e) => Progress.line(warning(id, &e)),
    }
}

/// Each `run` stage: renews the credentials when they are close to expiry.
pub fn renew_at_run(ctx: &Context, target: &SshTarget, id: &str) {
    if let Err(e) = renew_if_due(&ctx.config, target, id, &ctx.key.job_id, &ctx.credentials_stamp()) {
        Progress.line(warning(id, &e));
    }
}

fn warning(id: &str, e: &anyhow::Error) -> String {
    format!(
        "WARNING: could not give {id} credentials for its self-destruct watchdog ({}); AutoReleaseTime still releases it",
        crate::exit::one_line(e)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml_text: &str) -> RawSelfDestruct {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn section_defaults_and_errors() {
        let sd = SelfDestruct::from_raw(RawSelfDestruct::default(), Some("cn-hangzhou")).unwrap();
        assert_eq!(sd.credentials, CredentialMode::Sts);
        assert_eq!(sd.duration, Duration::from_secs(3600));
        assert!(!sd.hands_over(), "no role ARN, nothing to assume");
        assert_eq!(sd.sts_endpoint("cn-hangzhou"), "https://sts.cn-hangzhou.aliyuncs.com");

        let sd = SelfDestruct::from_raw(
            raw("role_arn = \"acs:ram::1234567890123456:role/ci-spot-self-destruct\"\nduration = \"15m\""),
            Some("cn-hangzhou"),
        )
        .unwrap();
        assert!(sd.hands_over());
        assert_eq!(sd.duration, MIN_DURATION);

        let err = |t: &str| SelfDestruct::from_raw(raw(t), Some("cn-hangzhou")).unwrap_err().to_string();
        assert_eq!(
            err("role_arn = \"ci-spot-self-destruct\""),
            "self_destruct.role_arn `ci-spot-self-destruct` is not a RAM role ARN: use \
             `acs:ram::<account id>:role/<role name>` (the role's page in the RAM console shows it)"
        );
        assert_eq!(
            err("duration = \"10m\""),
            "self_destruct.duration `10m` is outside what STS AssumeRole accepts: use 15m to 12h (default 1h)"
        );
        assert!(err("sts_endpoint = \"http://sts.example.com\"").starts_with("self_destruct.sts_endpoint: "));
        assert!(toml::from_str::<RawSelfDestruct>("credentials = \"shared\"").is_err());
        let legacy = SelfDestruct::from_raw(
            raw("credentials = \"instance_role\"\nrole_arn = \"acs:ram::1:role/r\""),
            None,
        )
        .unwrap();
        assert!(!legacy.hands_over());
    }

    #[test]
    fn watchdog_uses_the_vpc_endpoint_without_a_public_ip() {
        let load = |extra: &str| {
            let text = format!("[aliyun]\nregion_id = \"cn-shanghai\"\n{extra}");
            crate::config::from_toml(&text, None, &crate::env::Env::default()).unwrap()
        };
        let c = load("[network]\nprivate_ip = true\n");
        assert_eq!(
            c.self_destruct.watchdog_endpoint(&c).unwrap(),
            "https://ecs-vpc.cn-shanghai.aliyuncs.com"
        );
        let c = load("");
        assert_eq!(c.self_destruct.watchdog_endpoint(&c).unwrap(), "https://ecs.cn-shanghai.aliyuncs.com");
        let c = load("[network]\nprivate_ip = true\n[self_destruct]\necs_endpoint = \"https://ecs.example.internal/\"\n");
        assert_eq!(c.self_destruct.watchdog_endpoint(&c).unwrap(), "https://ecs.example.internal");
    }

    #[test]
    fn session_policy_names_one_instance_and_one_action() {
        assert_eq!(
            session_policy("i-bp1abc").to_string(),
            "{\"Statement\":[{\"Action\":[\"ecs:DeleteInstance\"],\"Effect\":\"Allow\",\
             \"Resource\":[\"acs:ecs:*:*:instance/i-bp1abc\"]}],\"Version\":\"1\"}"
        );
        assert_eq!(session_name("2001", "i-bp1g61cb5vxk03s7ff"), "ci-spot-i-bp1g61cb5vxk03s7ff");
        assert_eq!(session_name("1", "i-x; rm -rf /"), "ci-spot-i-xrm-rf");
        assert_eq!(session_name("1", &"i".repeat(100)).len(), 32);
    }
}
