//! Request authentication as ECS does it: common parameters present, timestamp within 15
//! minutes, AccessKey known (configured, or STS credentials issued by our metadata service with
//! a matching, unexpired `SecurityToken`), signature v1 correct, nonce never seen before.
//!
//! Why it matters: the executor's signing and the SDK's are verified by a server that really
//! checks, so a signing bug fails the tests instead of the first real deployment.

use std::collections::BTreeMap;

use super::instances::{lock, now, Core};
use super::rpc::ApiError;
use crate::ecs::sign;

/// Who signed a request.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// The RAM role, for STS credentials.
    pub role: Option<String>,
    /// The session policy of `AssumeRole` credentials, enforced on every call.
    pub policy: Option<super::ram::Policy>,
}

const MAX_SKEW_SECONDS: i64 = 15 * 60;

pub(crate) fn authenticate(
    core: &Core,
    method: &str,
    params: &BTreeMap<String, String>,
) -> Result<Principal, ApiError> {
    for name in ["AccessKeyId", "Signature", "SignatureNonce", "Timestamp"] {
        if params.get(name).is_none_or(|v| v.is_empty()) {
            return Err(ApiError::new(
                400,
                &format!("Missing{name}"),
                &format!("{name} is mandatory for this action."),
            ));
        }
    }
    if let Some(m) = params.get("SignatureMethod") {
        if m != "HMAC-SHA1" {
            return Err(ApiError::new(
                400,
                "InvalidSignatureMethod.Malformed",
                &format!("Specified signature method \"{m}\" is not valid."),
            ));
        }
    }
    if let Some(v) = params.get("SignatureVersion") {
        if v != "1.0" {
            return Err(ApiError::new(
                400,
                "InvalidSignatureVersion.Malformed",
                &format!("Specified signature version \"{v}\" is not valid."),
            ));
        }
    }
    let ts = &params["Timestamp"];
    let parsed = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).map_err(|_| {
        ApiError::new(
            400,
            "InvalidTimeStamp.Format",
            &format!("Specified time stamp \"{ts}\" or date is not in the expected format (yyyy-MM-ddTHH:mm:ssZ)."),
        )
    })?;
    if (now() - parsed).whole_seconds().abs() > MAX_SKEW_SECONDS {
        return Err(ApiError::new(
            400,
            "InvalidTimeStamp.Expired",
            &format!("Specified time stamp \"{ts}\" or date header is expired."),
        ));
    }
    let id = &params["AccessKeyId"];
    let (secret, role, policy) = if let Some((_, secret)) = core.access_keys.iter().find(|(k, _)| k == id) {
        (secret.expose().clone(), None, None)
    } else {
        let st = lock(&core.state);
        let Some(c) = st.sts.iter().find(|c| &c.access_key_id == id) else {
            return Err(ApiError::new(
                404,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            ));
        };
        match params.get("SecurityToken") {
            Some(t) if t == c.token.expose() => {}
            _ => {
                return Err(ApiError::new(
                    400,
                    "InvalidSecurityToken.Malformed",
                    "Specified SecurityToken is malformed.",
                ))
            }
        }
        if now() >= c.expiration {
            return Err(ApiError::new(
                400,
                "InvalidSecurityToken.Expired",
                "Specified SecurityToken is expired.",
            ));
        }
        (c.secret.expose().clone(), Some(c.role.clone()), c.policy.clone())
    };
    let string_to_sign = sign::string_to_sign(method, params);
    if sign::signature(&secret, &string_to_sign) != params["Signature"] {
        // The Python SDK splits this message on ':' and compares the second part with its own
        // string to sign, so it must end exactly like Aliyun's.
        return Err(ApiError::new(
            400,
            "SignatureDoesNotMatch",
            &format!(
                "Specified signature is not matched with our calculation. server string to sign is:{string_to_sign}"
            ),
        ));
    }
    if !lock(&core.nonces).insert(&params["SignatureNonce"]) {
        return Err(ApiError::new(400, "SignatureNonceUsed", "Specified signature nonce was used already."));
    }
    Ok(Principal { role, policy })
}
