//! Typed ECS errors and their classification.
//!
//! Why: callers branch on what went wrong — a stock-out moves to the next spot offer, throttling
//! and 5xx answers are retried, an authentication error stops at once with a clear line — so the
//! client decodes Aliyun's JSON error shape (`RequestId`, `HostId`, `Code`, `Message`,
//! `Recommend`) into [`EcsError::Api`] and sorts codes into [`ErrorKind`]s following Aliyun's
//! published error tables (see [`classify`] and [`create_action`]). Every error displays as one
//! line that carries the `RequestId`, so support can trace it, and never the request itself
//! (which holds the signature and perhaps an STS token).

use std::fmt;

/// A failed ECS call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EcsError {
    /// ECS answered with an error (any non-2xx answer; a non-JSON body still lands here, with a
    /// code of the form `HTTP 502`).
    #[error("ECS `{action}` failed: {code}: {message} ({})", request_id_part(request_id, *http_status))]
    Api {
        /// The action, e.g. `RunInstances`.
        action: String,
        /// Aliyun's error code, e.g. `OperationDenied.NoStock`.
        code: String,
        /// Aliyun's message, on one line, with anything secret removed.
        message: String,
        /// The request id, when the answer had one.
        request_id: Option<String>,
        /// The HTTP status of the answer.
        http_status: u16,
    },
    /// No answer: refused, reset, timed out, DNS, TLS.
    #[error("ECS `{action}` failed: {message}")]
    Transport {
        /// The action.
        action: String,
        /// What went wrong, one line.
        message: String,
        /// Whether trying again may help.
        retriable: bool,
    },
    /// A 2xx answer that could not be understood.
    #[error("ECS `{action}` answer could not be decoded: {message}")]
    Decode {
        /// The action.
        action: String,
        /// What was wrong with it.
        message: String,
    },
    /// The credentials could not be obtained (profile file, metadata service).
    #[error("ECS `{action}` not sent: no credentials: {message}")]
    Credentials {
        /// The action.
        action: String,
        /// Why, one line.
        message: String,
    },
    /// The request was refused before sending it (a bug or a bad configuration).
    #[error("{0}")]
    Config(String),
}

fn request_id_part(request_id: &Option<String>, http_status: u16) -> String {
    match request_id {
        Some(id) => format!("RequestId: {id}"),
        None => format!("HTTP {http_status}, no RequestId"),
    }
}

/// What kind of failure an [`EcsError`] is; callers branch on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `Throttling*`, `OperationDenied.ResourceControl` (or HTTP 429): retry with backoff.
    Throttled,
    /// `ServiceUnavailable`, `InternalError`, `UnknownError`, any 5xx: retry with backoff.
    ServerError,
    /// No answer (refused, reset, timed out, DNS, TLS).
    Transport,
    /// A condition of the instance type or zone (no stock, not on sale, not supported there,
    /// its vCPU quota, disk category, spot price limit below the price): move to the next offer.
    NoCapacity,
    /// The account: a quota, arrears, not enough balance, real-name verification not passed, a
    /// zone not opened to it: stop and say so.
    Quota,
    /// Bad AccessKey, signature, STS token or timestamp (or no credentials at all).
    Auth,
    /// RAM denies the action (`Forbidden*`, `NoPermission`).
    Permission,
    /// `InvalidParameter*`, `MissingParameter*`, or refused before sending.
    Parameter,
    /// `InvalidInstanceId.NotFound`.
    NotFound,
    /// `IdempotentParameterMismatch`: same `ClientToken`, different parameters.
    IdempotentMismatch,
    /// `IncorrectInstanceStatus`: the instance is not in a state that allows this, yet.
    IncorrectStatus,
    /// `DryRunOperation`: the dry run says the real request would succeed.
    DryRunOk,
    /// `LastTokenProcessing`, `IdempotentProcessing`: a request with this `ClientToken` is still
    /// being processed; the same request is sent again.
    InProgress,
    /// Anything else (decoding errors, unknown codes).
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The error codes that mean "this instance type or zone, not you" when creating an instance:
/// the next offer may well succeed. Taken from Aliyun's RunInstances error table
/// (<https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-runinstances>,
/// section "Error codes"; the rows of `tests/data/runinstances-errors.tsv` classed `next-offer`,
/// provenance there), by each code's description on that page: a disk category the zone or the
/// type does not offer, a type not authorized for the account ("You are not authorized to use
/// the specified instance type": another type may be), are conditions of the offer too.
const TYPE_OR_ZONE_CONDITIONS: &[&str] = &[
    "OperationDenied.NoStock",
    "Zone.NotOnSale",
    "InvalidResourceType.NotSupported",
    "InvalidInstanceType.ValueNotSupported",
    "InvalidInstanceType.ValueUnauthorized",
    "InvalidInstanceType.ZoneNotSupported",
    "InvalidInstanceType.NotSupportDiskCategory",
    "InvalidDiskCategory.NotSupported",
    "CategoryNotSupported",
    "InstanceType.Offline",
    "QuotaExceed.ElasticQuota",
    "QuotaExceed.DiskCapacity",
    "InvalidSpotPriceLimit.LowerThanPublicPrice",
    "OperationDenied.ZoneSystemCategoryNotMatch",
    "OperationDenied.CloudSSDNotSupported",
    "InvalidSystemDiskCategory.ValueNotSupported",
    "OperationDenied.ZoneNotAllowed",
    "InvalidVpcZone.NotSupported",
    "ResourceNotAvailable",
];

/// Sorts an Aliyun error code (and the HTTP status it came with) into an [`ErrorKind`].
///
/// Sources: Aliyun's RunInstances and common error tables (copied, with provenance, into
/// `tests/data/runinstances-errors.tsv`, which a unit test checks row by row), and
/// terraform-provider-alicloud's `alicloud/errors.go` `NeedRetry`, which retries
/// `ServiceUnavailable`, `Rejected.Throttling` and any code containing `Throttling`.
pub fn classify(code: &str, http_status: u16) -> ErrorKind {
    let starts = |p: &str| code.starts_with(p);
    let is = |c: &str| code == c;
    // `OperationDenied.ResourceControl`: "The specified region is in resource control, please
    // try later." (RunInstances error table, whose description says "Try again later").
    if code.contains("Throttling") || is("OperationDenied.ResourceControl") {
        ErrorKind::Throttled
    } else if is("ServiceUnavailable")
        || is("InternalError")
        || is("UnknownError")
        || starts("InternalError.")
    {
        ErrorKind::ServerError
    } else if is("LastTokenProcessing") || is("IdempotentProcessing") {
        ErrorKind::InProgress
    } else if TYPE_OR_ZONE_CONDITIONS.contains(&code)
        || code.ends_with(".NoStock")
        || code.ends_with(".NoSpotStock")
        || code.ends_with(".ZoneNotAvailable")
    {
        ErrorKind::NoCapacity
    } else if starts("InvalidAccessKeyId")
        || is("SignatureDoesNotMatch")
        || is("IncompleteSignature")
        || starts("InvalidSecurityToken")
        || starts("InvalidTimeStamp")
        || is("SignatureNonceUsed")
    {
        ErrorKind::Auth
    } else if starts("Forbidden")
        || is("Forbbiden") // sic: the RunInstances error table spells this 403 so
        || is("NoPermission")
        || starts("NoPermission.")
    {
        ErrorKind::Permission
    } else if starts("QuotaExceed")
        || is("Account.Arrearage")
        || starts("InvalidAccountStatus")
        || starts("InsufficientBalance")
        || is("RealNameAuthenticationError")
        || is("Zone.NotOpen")
    {
        ErrorKind::Quota
    } else if is("InvalidInstanceId.NotFound") {
        ErrorKind::NotFound
    } else if is("IdempotentParameterMismatch") {
        ErrorKind::IdempotentMismatch
    } else if is("IncorrectInstanceStatus") || starts("IncorrectInstanceStatus.") {
        ErrorKind::IncorrectStatus
    } else if is("DryRunOperation") {
        ErrorKind::DryRunOk
    } else if starts("InvalidParameter") || starts("MissingParameter") {
        ErrorKind::Parameter
    } else if http_status == 429 {
        ErrorKind::Throttled
    } else if http_status >= 500 {
        ErrorKind::ServerError
    } else {
        ErrorKind::Other
    }
}

/// What creating an instance does after a failed `RunInstances`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateAction {
    /// A condition of this instance type or zone: try the next offer.
    NextOffer,
    /// Transient (throttling, 5xx, a request with this `ClientToken` still in progress): send
    /// the same request again, same `ClientToken`.
    Retry,
    /// The account or the request is wrong: fail at once, one line saying what to fix.
    Stop,
}

impl CreateAction {
    /// The class name used in `tests/data/runinstances-errors.tsv`.
    pub fn name(self) -> &'static str {
        match self {
            CreateAction::NextOffer => "next-offer",
            CreateAction::Retry => "retry",
            CreateAction::Stop => "stop",
        }
    }
}

/// The one classifier of `RunInstances` failures: what to do after `code` (with its HTTP
/// status).
pub fn create_action(code: &str, http_status: u16) -> CreateAction {
    match classify(code, http_status) {
        ErrorKind::NoCapacity => CreateAction::NextOffer,
        ErrorKind::Throttled | ErrorKind::ServerError | ErrorKind::InProgress => CreateAction::Retry,
        _ => CreateAction::Stop,
    }
}

/// Aliyun's published RunInstances and common error table, as shipped in
/// `tests/data/runinstances-errors.tsv` (provenance in its header). The emulator answers
/// injected errors from it, and a unit test checks every row against [`create_action`].
pub const RUN_INSTANCES_ERRORS_TSV: &str = include_str!("../../tests/data/runinstances-errors.tsv");

/// One row of [`RUN_INSTANCES_ERRORS_TSV`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedError {
    /// The error code.
    pub code: &'static str,
    /// The HTTP status Aliyun answers it with.
    pub http_status: u16,
    /// `next-offer`, `retry` or `stop`.
    pub class: &'static str,
    /// Aliyun's message.
    pub message: &'static str,
}

/// Every row of the published table.
pub fn published_errors() -> Vec<PublishedError> {
    RUN_INSTANCES_ERRORS_TSV
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(PublishedError {
                code: f.next()?,
                http_status: f.next()?.parse().ok()?,
                class: f.next()?,
                message: f.next()?,
            })
        })
        .collect()
}

/// The published row of `code`, if the table has it.
pub fn published_error(code: &str) -> Option<PublishedError> {
    published_errors().into_iter().find(|e| e.code == code)
}

impl EcsError {
    /// Aliyun's error code, for [`EcsError::Api`].
    pub fn code(&self) -> Option<&str> {
        match self {
            EcsError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The request id, for [`EcsError::Api`] answers that had one.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            EcsError::Api { request_id, .. } => request_id.as_deref(),
            _ => None,
        }
    }

    /// What creating an instance does after this error ([`create_action`]); transport
    /// failures that may pass are retried, anything else not understood stops.
    pub fn create_action(&self) -> CreateAction {
        match self {
            EcsError::Api { code, http_status, .. } => create_action(code, *http_status),
            other if other.is_retriable() => CreateAction::Retry,
            _ => CreateAction::Stop,
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EcsError::Api { code, http_status, .. } => classify(code, *http_status),
            EcsError::Transport { .. } => ErrorKind::Transport,
            EcsError::Decode { .. } => ErrorKind::Other,
            EcsError::Credentials { .. } => ErrorKind::Auth,
            EcsError::Config(_) => ErrorKind::Parameter,
        }
    }

    /// Whether the retry policy tries again: throttling, 5xx, a request with the same
    /// `ClientToken` still in progress, and transport failures that may pass (refused, reset,
    /// timed out).
    pub fn is_retriable(&self) -> bool {
        match self {
            EcsError::Transport { retriable, .. } => *retriable,
            other => {
                matches!(other.kind(), ErrorKind::Throttled | ErrorKind::ServerError | ErrorKind::InProgress)
            }
        }
    }
}

/// The part of Aliyun's `SignatureDoesNotMatch` message that quotes the server's string to
/// sign; it holds every parameter, including an STS token, so it is cut off.
const STRING_TO_SIGN_MARKER: &str = "server string to sign is:";

/// At most this many characters of a message are kept.
const MAX_MESSAGE_CHARS: usize = 400;

/// Decodes a non-2xx answer into [`EcsError::Api`]. `secrets` are values that must not appear
/// in the message (the AccessKey secret, the STS token); they are replaced, raw and
/// percent-encoded (once and twice), by `REDACTED`.
pub fn decode_error(action: &str, status: u16, body: &str, secrets: &[&str]) -> EcsError {
    #[derive(serde::Deserialize, Default)]
    #[serde(default, rename_all = "PascalCase")]
    struct Body {
        request_id: Option<String>,
        code: Option<String>,
        message: Option<String>,
    }
    let parsed: Option<Body> = serde_json::from_str(body).ok();
    match parsed {
        Some(Body { code: Some(code), request_id, message }) => EcsError::Api {
            action: action.to_string(),
            code: one_line(&code, secrets),
            message: one_line(message.as_deref().unwrap_or(""), secrets),
            request_id: request_id.map(|r| one_line(&r, secrets)),
            http_status: status,
        },
        Some(Body { code: None, request_id, .. }) => EcsError::Api {
            action: action.to_string(),
            code: format!("HTTP {status}"),
            message: "the error answer has no `Code`".to_string(),
            request_id: request_id.map(|r| one_line(&r, secrets)),
            http_status: status,
        },
        None => {
            let first = body.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
            let message = if first.is_empty() {
                "empty answer".to_string()
            } else {
                format!("non-JSON answer: {}", one_line(first, secrets))
            };
            EcsError::Api {
                action: action.to_string(),
                code: format!("HTTP {status}"),
                message,
                request_id: None,
                http_status: status,
            }
        }
    }
}

/// One line, secrets replaced, the quoted string to sign cut off, at most
/// [`MAX_MESSAGE_CHARS`] characters.
pub(crate) fn one_line(s: &str, secrets: &[&str]) -> String {
    let mut s = s.to_string();
    if let Some(pos) = s.find(STRING_TO_SIGN_MARKER) {
        s.truncate(pos + STRING_TO_SIGN_MARKER.len());
        s.push_str(" (omitted)");
    }
    for secret in secrets.iter().filter(|x| x.len() >= 4) {
        let once = super::sign::percent_encode(secret);
        let twice = super::sign::percent_encode(&once);
        for form in [secret.to_string(), twice, once] {
            if !form.is_empty() {
                s = s.replace(&form, "REDACTED");
            }
        }
    }
    let mut out: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > MAX_MESSAGE_CHARS {
        out = out.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_displays_on_one_line_with_request_id() {
        let body = r#"{"RequestId":"7A1B-22","HostId":"ecs.cn-hangzhou.aliyuncs.com","Code":"InvalidAccessKeyId.NotFound","Message":"Specified access key is not found.","Recommend":"https://api.aliyun.com/troubleshoot?q=x"}"#;
        let e = decode_error("DescribeRegions", 404, body, &[]);
        assert_eq!(
            e.to_string(),
            "ECS `DescribeRegions` failed: InvalidAccessKeyId.NotFound: Specified access key is not found. (RequestId: 7A1B-22)"
        );
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert_eq!(e.code(), Some("InvalidAccessKeyId.NotFound"));
        assert_eq!(e.request_id(), Some("7A1B-22"));
        assert!(!e.is_retriable());
    }

    #[test]
    fn non_json_error_keeps_the_status() {
        let e = decode_error("DescribeZones", 502, "<html>\n<h1>502 Bad Gateway</h1>\n</html>", &[]);
        assert_eq!(
            e.to_string(),
            "ECS `DescribeZones` failed: HTTP 502: non-JSON answer: <html> (HTTP 502, no RequestId)"
        );
        assert_eq!(e.kind(), ErrorKind::ServerError);
        assert!(e.is_retriable());
        let e = decode_error("DescribeZones", 429, "", &[]);
        assert_eq!(e.kind(), ErrorKind::Throttled);
        assert_eq!(
            e.to_string(),
            "ECS `DescribeZones` failed: HTTP 429: empty answer (HTTP 429, no RequestId)"
        );
    }

    #[test]
    fn signature_mismatch_does_not_quote_the_string_to_sign() {
        let token = "CAIS+token/with=special";
        let msg = format!(
            "Specified signature is not matched with our calculation. server string to sign is:POST&%2F&SecurityToken%3D{}",
            crate::ecs::sign::percent_encode(&crate::ecs::sign::percent_encode(token))
        );
        let body = serde_json::json!({"RequestId": "R1", "Code": "SignatureDoesNotMatch", "Message": msg})
            .to_string();
        let e = decode_error("DescribeRegions", 400, &body, &[token]);
        assert_eq!(
            e.to_string(),
            "ECS `DescribeRegions` failed: SignatureDoesNotMatch: Specified signature is not matched with our calculation. server string to sign is: (omitted) (RequestId: R1)"
        );
    }

    #[test]
    fn secrets_are_scrubbed_from_messages() {
        let secret = "s3cr3t/Value+x";
        let body = serde_json::json!({"RequestId": "R", "Code": "InvalidParameter", "Message": format!("bad {secret}\nand {}", crate::ecs::sign::percent_encode(secret))}).to_string();
        let e = decode_error("RunInstances", 400, &body, &[secret]);
        assert_eq!(
            e.to_string(),
            "ECS `RunInstances` failed: InvalidParameter: bad REDACTED and REDACTED (RequestId: R)"
        );
        assert_eq!(e.kind(), ErrorKind::Parameter);
    }

    #[test]
    fn classification_follows_the_aliyun_codes() {
        use ErrorKind::*;
        let cases = [
            ("Throttling", 400, Throttled),
            ("Throttling.User", 400, Throttled),
            ("Throttling.Api", 400, Throttled),
            ("ServiceUnavailable", 503, ServerError),
            ("InternalError", 500, ServerError),
            ("UnknownError", 500, ServerError),
            ("SomethingNew", 504, ServerError),
            ("OperationDenied.NoStock", 400, NoCapacity),
            ("OperationDenied.NoSpotStock", 400, NoCapacity),
            ("OperationDenied.ZoneNotAvailable", 400, NoCapacity),
            ("Zone.NotOnSale", 400, NoCapacity),
            ("InvalidResourceType.NotSupported", 400, NoCapacity),
            ("InvalidInstanceType.ValueNotSupported", 400, NoCapacity),
            ("InvalidSpotPriceLimit.LowerThanPublicPrice", 400, NoCapacity),
            ("InvalidSpotPriceLimit", 400, Other),
            ("InvalidSpotPriceLimit.Malformed", 400, Other),
            ("Rejected.Throttling", 400, Throttled),
            ("LastTokenProcessing", 403, InProgress),
            ("Zone.NotOpen", 403, Quota),
            ("QuotaExceed.ElasticQuota", 403, NoCapacity),
            ("InvalidAccessKeyId.NotFound", 404, Auth),
            ("InvalidAccessKeyId.Inactive", 400, Auth),
            ("SignatureDoesNotMatch", 400, Auth),
            ("InvalidSecurityToken.Expired", 400, Auth),
            ("InvalidSecurityToken.Malformed", 400, Auth),
            ("InvalidTimeStamp.Expired", 400, Auth),
            ("Forbidden.RAM", 403, Permission),
            ("Forbidden", 403, Permission),
            ("Forbbiden", 403, Permission),
            ("OperationDenied.ResourceControl", 403, Throttled),
            ("Throttling.Resource", 429, Throttled),
            ("CategoryNotSupported", 403, NoCapacity),
            ("InvalidInstanceType.ValueUnauthorized", 400, NoCapacity),
            ("RealNameAuthenticationError", 403, Quota),
            ("InsufficientBalance", 403, Quota),
            ("NoPermission", 403, Permission),
            ("QuotaExceed.PostPaidInstance", 400, Quota),
            ("Account.Arrearage", 400, Quota),
            ("InvalidAccountStatus.NotEnoughBalance", 400, Quota),
            ("InvalidInstanceId.NotFound", 404, NotFound),
            ("IdempotentParameterMismatch", 400, IdempotentMismatch),
            ("IncorrectInstanceStatus", 403, IncorrectStatus),
            ("DryRunOperation", 400, DryRunOk),
            ("InvalidParameter", 400, Parameter),
            ("InvalidParameter.Tags", 400, Parameter),
            ("MissingParameter", 400, Parameter),
            ("MissingParameter.RegionId", 400, Parameter),
            ("SomethingNew", 400, Other),
        ];
        for (code, status, want) in cases {
            assert_eq!(classify(code, status), want, "code `{code}` ({status})");
        }
    }

    #[test]
    fn every_row_of_the_published_table_is_classified_as_it_says() {
        let rows = published_errors();
        assert!(rows.len() >= 40, "the table lost rows: {}", rows.len());
        for class in ["next-offer", "retry", "stop"] {
            assert!(rows.iter().any(|r| r.class == class), "no `{class}` row");
        }
        for r in &rows {
            assert!(matches!(r.http_status, 400..=599), "{}: status {}", r.code, r.http_status);
            assert!(!r.message.trim().is_empty(), "{}: no message", r.code);
            assert_eq!(create_action(r.code, r.http_status).name(), r.class, "code `{}`", r.code);
            let e = decode_error(
                "RunInstances",
                r.http_status,
                &serde_json::json!({"RequestId": "R", "Code": r.code, "Message": r.message}).to_string(),
                &[],
            );
            assert_eq!(e.create_action().name(), r.class, "decoded `{}`", r.code);
            assert_eq!(e.is_retriable(), r.class == "retry", "retriable `{}`", r.code);
        }
        assert_eq!(published_error("Zone.NotOnSale").map(|e| e.http_status), Some(403));
        assert_eq!(published_error("NoSuchCode"), None);
    }

    #[test]
    fn the_unverified_rows_are_the_ones_the_header_names() {
        let header: String =
            RUN_INSTANCES_ERRORS_TSV.lines().filter(|l| l.starts_with('#')).collect::<Vec<_>>().join(" ");
        let named = header
            .split("Not verified:")
            .nth(1)
            .and_then(|s| s.split(" appear on none").next())
            .expect("the header names the rows it could not verify");
        for line in RUN_INSTANCES_ERRORS_TSV.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            assert_eq!(f.len(), 5, "five columns: {line}");
            let (code, source) = (f[0], f[4]);
            assert!(!source.trim().is_empty(), "{code}: no source");
            let listed = named.split([',', ' ']).any(|w| w == code);
            assert_eq!(source.contains("UNVERIFIED"), listed, "{code}: `{source}` vs the header");
        }
    }

    #[test]
    fn transport_errors_carry_their_retriability() {
        let e = EcsError::Transport {
            action: "DescribeRegions".into(),
            message: "timed out".into(),
            retriable: true,
        };
        assert!(e.is_retriable());
        assert_eq!(e.kind(), ErrorKind::Transport);
        assert_eq!(e.to_string(), "ECS `DescribeRegions` failed: timed out");
        let e = EcsError::Transport { action: "X".into(), message: "dns".into(), retriable: false };
        assert!(!e.is_retriable());
    }
}
