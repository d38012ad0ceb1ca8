//! STS `AssumeRole` (API version `2015-04-01`) on the emulator's RPC listener: requests are
//! routed here by their `Version`, signed and authenticated exactly like ECS calls.
//!
//! Rules, from the sources the driver cites in `src/sts.rs`: `RoleArn` is
//! `acs:ram::<account>:role/<name>`; `RoleSessionName` is 2 to 32 of `[A-Za-z0-9.@_-]`;
//! `DurationSeconds` (default 3600) runs from 900 to the role's maximum session duration (one
//! hour unless raised; the emulated roles keep the default); `Policy` must pass the grammar
//! check. Errors: `InvalidParameter.RoleArn`, `InvalidParameter.RoleSessionName`,
//! `InvalidParameter.DurationSeconds`, `InvalidParameter.PolicyGrammar` (HTTP 400). The minted
//! credentials remember their session policy, which [`super::ram`] enforces on ECS calls.

use std::time::Duration;

use serde_json::{json, Value};

use super::api::{ApiError, Params};
use super::instances::{lock, now, random_alnum, rfc3339, Core, StsRecord};
use super::ram::Policy;
use super::ram::Principal;
use crate::secret::Secret;

/// STS's API version: requests with it are STS requests.
pub(crate) const VERSION: &str = "2015-04-01";
/// The emulated roles' maximum session duration (RAM's default).
const MAX_SESSION: u64 = 3600;

/// Answers an STS request.
pub(crate) fn dispatch(core: &Core, action: &str, p: &Params, who: &Principal) -> Result<Value, ApiError> {
    match action {
        "AssumeRole" => assume_role(core, p, who),
        _ => Err(ApiError::new(
            404,
            "InvalidAction.NotFound",
            &format!("Specified api \"{action}\" is not found, please check your url and method."),
        )),
    }
}

fn param<'a>(p: &'a Params, name: &str) -> Result<&'a str, ApiError> {
    p.get(name).map(String::as_str).filter(|v| !v.is_empty()).ok_or_else(|| {
        ApiError::new(
            400,
            "MissingParameter",
            &format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
        )
    })
}

fn assume_role(core: &Core, p: &Params, who: &Principal) -> Result<Value, ApiError> {
    let _ = who;
    let arn = param(p, "RoleArn")?;
    let role = arn
        .strip_prefix("acs:ram::")
        .and_then(|r| r.split_once(":role/"))
        .filter(|(account, role)| {
            !account.is_empty() && account.bytes().all(|b| b.is_ascii_digit()) && !role.is_empty()
        })
        .map(|(_, role)| role.to_string())
        .ok_or_else(|| {
            ApiError::new(400, "InvalidParameter.RoleArn", "The parameter RoleArn is wrongly formed.")
        })?;
    let session = param(p, "RoleSessionName")?;
    if !(2..=32).contains(&session.len())
        || !session.bytes().all(|b| b.is_ascii_alphanumeric() || b".@_-".contains(&b))
    {
        return Err(ApiError::new(
            400,
            "InvalidParameter.RoleSessionName",
            "The parameter RoleSessionName is wrongly formed.",
        ));
    }
    let duration = match p.get("DurationSeconds").filter(|v| !v.is_empty()) {
        None => MAX_SESSION,
        Some(v) => v.parse::<u64>().ok().filter(|d| (900..=MAX_SESSION).contains(d)).ok_or_else(|| {
            ApiError::new(
                400,
                "InvalidParameter.DurationSeconds",
                "The Min/Max value of DurationSeconds is 15min/1hr.",
            )
        })?,
    };
    let policy = match p.get("Policy").filter(|v| !v.is_empty()) {
        None => None,
        Some(text) => Some(Policy::parse(text).map_err(|_| {
            ApiError::new(
                400,
                "InvalidParameter.PolicyGrammar",
                "The parameter Policy has not passed grammar check.",
            )
        })?),
    };
    let t = now();
    let rec = StsRecord {
        subject: format!("assume-role:{session}"),
        role: role.clone(),
        access_key_id: format!("STS.NU{}", random_alnum(24).to_uppercase()),
        secret: Secret::new(random_alnum(40)),
        token: Secret::new(format!("CAIS{}", random_alnum(160))),
        issued: t,
        expiration: t + Duration::from_secs(duration),
        policy,
    };
    let answer = json!({
        "AssumedRoleUser": {
            "Arn": format!("{arn}/{session}"),
            "AssumedRoleId": format!("3{}:{session}", random_alnum(17)),
        },
        "Credentials": {
            "AccessKeyId": rec.access_key_id,
            "AccessKeySecret": rec.secret.expose(),
            "SecurityToken": rec.token.expose(),
            "Expiration": rfc3339(rec.expiration),
        },
    });
    let mut st = lock(&core.state);
    st.sts.retain(|c| c.expiration > t - time::Duration::hours(1));
    st.sts.push(rec);
    Ok(answer)
}
