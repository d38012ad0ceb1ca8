//! The HTTP transport under the ECS client and the metadata-service credentials, behind a
//! small trait.
//!
//! Why a trait: the retry policy, the error decoding and the credential cache are tested with
//! a fake transport that scripts answers and records requests, with no sockets at all; the real
//! implementation ([`UreqTransport`]) is a thin adapter over `ureq` 2.
//!
//! The contract is deliberately narrow: a non-2xx answer is *not* a transport error — it comes
//! back as an [`HttpResponse`] with its status and body, so the caller can decode Aliyun's JSON
//! error shape. Only a failure to get an answer at all (refused, reset, timed out, DNS, TLS) is a
//! [`TransportError`], and it says whether trying again may help. Its message names the URL
//! without its query: the RPC query carries the `SecurityToken` of STS credentials.

use std::io;
use std::time::Duration;

/// One HTTP request: method, absolute URL, headers and an optional body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `POST`, `PUT`, ...
    pub method: String,
    /// Absolute URL, e.g. `https://ecs.cn-hangzhou.aliyuncs.com/`.
    pub url: String,
    /// Header name/value pairs.
    pub headers: Vec<(String, String)>,
    /// The body (for the RPC API: the signed `application/x-www-form-urlencoded` form).
    pub body: Option<String>,
}

impl HttpRequest {
    /// A request without headers or body.
    pub fn new(method: &str, url: impl Into<String>) -> Self {
        HttpRequest { method: method.to_string(), url: url.into(), headers: Vec::new(), body: None }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// An answer with any status: 2xx or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

/// No answer was received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    /// One line saying what went wrong (never contains the request body).
    pub message: String,
    /// Whether trying again may help (refused, reset, timed out).
    pub retriable: bool,
}

/// Sends one request and returns the answer, whatever its status.
pub trait Transport: Send + Sync {
    /// Sends `req`; `Err` only when no HTTP answer was received.
    fn send(&self, req: &HttpRequest) -> Result<HttpResponse, TransportError>;
}

/// The real transport: `ureq` 2 with a connect timeout and an overall timeout, no redirects
/// and no proxy (the metadata service must never be reached through a proxy).
pub struct UreqTransport {
    agent: ureq::Agent,
}

impl UreqTransport {
    /// A transport whose connections give up after `connect_timeout` and whose requests give
    /// up after `timeout` in total.
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            .timeout(timeout)
            .redirects(0)
            .user_agent(concat!("aliyun-spot-executor/", env!("CARGO_PKG_VERSION")))
            .build();
        UreqTransport { agent }
    }
}

impl std::fmt::Debug for UreqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UreqTransport")
    }
}

impl Transport for UreqTransport {
    fn send(&self, req: &HttpRequest) -> Result<HttpResponse, TransportError> {
        let mut r = self.agent.request(&req.method, &req.url);
        for (k, v) in &req.headers {
            r = r.set(k, v);
        }
        let result = match &req.body {
            Some(body) => r.send_string(body),
            None => r.call(),
        };
        let response = match result {
            Ok(resp) => resp,
            Err(ureq::Error::Status(_, resp)) => resp,
            Err(ureq::Error::Transport(t)) => {
                return Err(map_transport_error(&req.method, without_query(&req.url), &t))
            }
        };
        let status = response.status();
        match response.into_string() {
            Ok(body) => Ok(HttpResponse { status, body }),
            Err(e) => Err(TransportError {
                message: format!(
                    "{} `{}`: reading the answer failed: {e}",
                    req.method,
                    without_query(&req.url)
                ),
                retriable: is_retriable_io(e.kind()),
            }),
        }
    }
}

/// `url` up to its query: what error messages may show.
fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

/// Connection refused/reset and timeouts may pass; bad URLs, DNS failures (usually a wrong
/// endpoint) and TLS errors will not.
fn map_transport_error(method: &str, url: &str, t: &ureq::Transport) -> TransportError {
    use ureq::ErrorKind as K;
    let io_kind = std::error::Error::source(t).and_then(|s| s.downcast_ref::<io::Error>()).map(|e| e.kind());
    let retriable = match t.kind() {
        K::ConnectionFailed => true,
        K::Io => io_kind.is_none_or(is_retriable_io),
        K::ProxyConnect => true,
        _ => false,
    };
    let what = match (t.kind(), io_kind) {
        (_, Some(io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)) => "timed out".to_string(),
        (_, Some(io::ErrorKind::ConnectionRefused)) => "connection refused".to_string(),
        (_, Some(io::ErrorKind::ConnectionReset)) => "connection reset".to_string(),
        (kind, _) => {
            let detail = t.message().map(|m| format!(": {m}")).unwrap_or_default();
            format!("{kind}{detail}")
        }
    };
    TransportError { message: format!("{method} `{url}`: {what}"), retriable }
}

fn is_retriable_io(kind: io::ErrorKind) -> bool {
    !matches!(
        kind,
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData | io::ErrorKind::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused connection names the endpoint, never the query with its token and signature.
    #[test]
    fn errors_name_the_url_without_its_query() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let t = UreqTransport::new(Duration::from_secs(2), Duration::from_secs(2));
        let url = format!("http://127.0.0.1:{port}/?SecurityToken=CAIS-secret-token&Signature=abc");
        let e = t.send(&HttpRequest::new("POST", url)).unwrap_err();
        assert_eq!(e.message, format!("POST `http://127.0.0.1:{port}/`: connection refused"));
        assert!(e.retriable);
        assert_eq!(without_query("http://h/"), "http://h/");
    }
}
