//! Request authentication as ECS does it, for both signature generations Aliyun's SDKs use:
//!
//! - signature v1 (HMAC-SHA1, the legacy `aliyun-python-sdk-core`): common parameters in the
//!   query or the form, signed over the query and the form body together (below);
//! - ACS3-HMAC-SHA256 ("V3", the current `alibabacloud-*` SDKs): the action and the signature
//!   in `x-acs-*` headers and `Authorization` ([`v3`]).
//!
//! Both then pass the same checks: timestamp within 15 minutes, AccessKey known (configured, or
//! STS credentials issued by our metadata service with a matching, unexpired security token),
//! signature correct, nonce never seen before. [`authenticate`] is the one dispatcher.
//!
//! Why it matters: the executor's signing and the SDKs' are verified by a server that really
//! checks, so a signing bug fails the tests instead of the first real deployment.

mod v3;

use std::collections::BTreeMap;

use crate::ecs::sign;
use crate::emulator::api::ApiError;
use crate::emulator::instances::{lock, now, Core};
use crate::emulator::ram::{Policy, Principal};

/// One RPC request as received: method, decoded query and form parameters (the form's win on
/// a clash, as in the legacy SDK's `sign_params.update(body_params)`), headers with lower-case
/// names in arrival order, and the raw body.
pub(crate) struct Incoming<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The query alone (V3 signs it apart from the body).
    pub query: &'a BTreeMap<String, String>,
    /// Query and form together (what the action reads; v1 signs them together).
    pub params: &'a BTreeMap<String, String>,
    pub headers: &'a [(String, String)],
    pub body: &'a [u8],
}

impl Incoming<'_> {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Whether this is a V3 request (`Authorization: ACS3-...`).
    pub fn is_v3(&self) -> bool {
        self.header("authorization").is_some_and(|a| a.trim_start().starts_with("ACS3-"))
    }

    /// The action: the `x-acs-action` header for V3, the `Action` parameter for v1.
    pub fn action(&self) -> Option<&str> {
        if self.is_v3() { self.header("x-acs-action") } else { self.params.get("Action").map(String::as_str) }
            .filter(|a| !a.is_empty())
    }

    /// The AccessKey id the request claims (for the request log).
    pub fn access_key_id(&self) -> Option<String> {
        if self.is_v3() {
            self.header("authorization").and_then(|a| v3::parse_authorization(a).ok()).map(|a| a.credential)
        } else {
            self.params.get("AccessKeyId").cloned()
        }
    }
}

/// Verifies `req` with the scheme it uses.
pub(crate) fn authenticate(core: &Core, req: &Incoming) -> Result<Principal, ApiError> {
    if req.is_v3() {
        v3::authenticate(core, req)
    } else {
        authenticate_v1(core, req.method, req.params)
    }
}

const MAX_SKEW_SECONDS: i64 = 15 * 60;

/// `ts` is an ISO 8601 UTC time within 15 minutes of now (both schemes; V3 sends it as
/// `x-acs-date`).
pub(crate) fn check_timestamp(ts: &str) -> Result<(), ApiError> {
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
    Ok(())
}

/// The secret of AccessKey `id` and, for emulator-issued STS credentials, their role and session
/// policy; `token` is
/// the security token sent with the request.
pub(crate) fn secret_of(
    core: &Core,
    id: &str,
    token: Option<&str>,
) -> Result<(String, Option<String>, Option<Policy>), ApiError> {
    if let Some((_, secret)) = core.access_keys.iter().find(|(k, _)| k == id) {
        return Ok((secret.expose().clone(), None, None));
    }
    let st = lock(&core.state);
    let Some(c) = st.sts.iter().find(|c| c.access_key_id == id) else {
        return Err(ApiError::new(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."));
    };
    if token != Some(c.token.expose().as_str()) {
        return Err(ApiError::new(
            400,
            "InvalidSecurityToken.Malformed",
            "Specified SecurityToken is malformed.",
        ));
    }
    if now() >= c.expiration {
        return Err(ApiError::new(
            400,
            "InvalidSecurityToken.Expired",
            "Specified SecurityToken is expired.",
        ));
    }
    Ok((c.secret.expose().clone(), Some(c.role.clone()), c.policy.clone()))
}

/// Records `nonce`; a nonce seen before is a replay.
pub(crate) fn use_nonce(core: &Core, nonce: &str) -> Result<(), ApiError> {
    if lock(&core.nonces).insert(nonce) {
        Ok(())
    } else {
        Err(ApiError::new(400, "SignatureNonceUsed", "Specified signature nonce was used already."))
    }
}

/// Signature v1: `params` are the query and the form body together, so a signature over only
/// one of them does not match (`aliyunsdkcore/auth/composer/rpc_signature_composer.py`,
/// `get_signed_url`: the string to sign covers the URL parameters updated with the body ones).
fn authenticate_v1(
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
    check_timestamp(&params["Timestamp"])?;
    let (secret, role, policy) =
        secret_of(core, &params["AccessKeyId"], params.get("SecurityToken").map(String::as_str))?;
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
    use_nonce(core, &params["SignatureNonce"])?;
    Ok(Principal { role, policy })
}
