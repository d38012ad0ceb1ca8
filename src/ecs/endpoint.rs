//! The one check of endpoint URLs and region ids, used by the configuration (with the key that
//! was wrong) and by the client (which takes values from anywhere, tests included).
//!
//! Endpoints are `https://host[:port][/path]`; plain `http://` only to a loopback host
//! (127.0.0.0/8, `::1`, `::ffff:127.x.y.z`, `localhost`: the emulator), because requests carry
//! a signature and credentials would travel unencrypted. No user info (credentials belong in
//! `[credentials]`), no query or fragment (the client appends its own query to the endpoint).
//! Region ids look like Aliyun's (`cn-hangzhou`, `ap-southeast-1`, `cn-shanghai-finance-1`,
//! the `RegionId` values of `DescribeRegions`), since they become part of a host name.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::anyhow;

/// Checks an endpoint URL (the rules of the module doc); `loopback_http_only = false` accepts
/// `http://` to any host (the metadata service is plain http at `100.100.100.200`). Returns the
/// URL without a trailing `/`; the error is the reason, to follow the value in a message.
pub fn check_url(url: &str, loopback_http_only: bool) -> Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or(
        "is not a URL; write it as `https://host` (e.g. `https://ecs-vpc.cn-hangzhou.aliyuncs.com`)",
    )?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "https" && scheme != "http" {
        return Err(format!("uses the scheme `{scheme}`; use `https://`"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("contains user information; put credentials in `[credentials]`, not in the URL".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) =
            v6.split_once(']').ok_or("has an unterminated `[` in its host; write `http://[::1]:9470`")?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host; write it as `https://host`".into());
    }
    if let Some(p) = port {
        if p.parse::<u16>().map(|n| n == 0).unwrap_or(true) {
            return Err(format!("has an invalid port `{p}`; use 1 to 65535"));
        }
    }
    if scheme == "http" && loopback_http_only && !is_loopback_host(host) {
        return Err(format!(
            "uses plain http to `{host}`, which would send signed requests unencrypted; use `https://` (plain \
             `http://` is accepted only for loopback addresses such as the emulator's `http://127.0.0.1:9470`)"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// [`check_url`] for an API endpoint, to which the client appends its own path and query: no
/// query or fragment either.
pub fn check_endpoint(url: &str, loopback_http_only: bool) -> Result<String, String> {
    let checked = check_url(url, loopback_http_only)?;
    if url.split_once("://").is_some_and(|(_, rest)| rest.contains(['?', '#'])) {
        return Err("has a query or fragment; write the endpoint without `?…` or `#…`".into());
    }
    Ok(checked)
}

/// Whether `host` (without port or brackets) is a loopback host.
fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => v4.is_loopback(),
            Ok(IpAddr::V6(v6)) => {
                v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            Err(_) => false,
        }
}

/// Checks a region id's shape: lowercase words joined by `-`, the first of two or more letters,
/// at most 64 characters. The error is the reason, to follow the value in a message.
pub fn check_region_id(region: &str) -> Result<(), String> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = region.len() <= 64
        && parts.len() >= 2
        && parts[0].len() >= 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err("is not a region id; use one such as `cn-hangzhou` or `ap-southeast-1`".into())
    }
}

/// [`check_region_id`] for the client: an error naming the value.
pub fn validate_region_id(region: &str) -> anyhow::Result<()> {
    check_region_id(region).map_err(|why| anyhow!("`{region}` {why}"))
}

/// The endpoint to use: `endpoint` checked by [`check_endpoint`] (loopback-only `http://`) without a
/// trailing `/`, or Aliyun's public endpoint of the region.
pub fn resolve_endpoint(region_id: &str, endpoint: Option<&str>) -> anyhow::Result<String> {
    match endpoint.map(str::trim).filter(|e| !e.is_empty()) {
        None => Ok(format!("https://ecs.{region_id}.aliyuncs.com")),
        Some(raw) => check_endpoint(raw, true).map_err(|why| anyhow!("endpoint `{raw}` {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            check_url("https://ecs.cn-hangzhou.aliyuncs.com/", true).unwrap(),
            "https://ecs.cn-hangzhou.aliyuncs.com"
        );
        for ok in [
            "http://127.0.0.1:9470",
            "http://127.3.4.5:1/",
            "http://[::1]:9470/",
            "http://localhost:9470",
            "http://LOCALHOST",
            "http://[::ffff:127.0.0.1]:9470",
        ] {
            assert!(check_url(ok, true).is_ok(), "{ok}");
        }
        for bad in [
            "http://ecs.cn-hangzhou.aliyuncs.com",
            "http://10.0.0.1:9470",
            "http://127.0.0.1.evil.com",
            "http://localhost.evil.com",
            "http://[::2]:1",
            "http://[::ffff:10.0.0.1]:1",
        ] {
            assert!(check_url(bad, true).unwrap_err().contains("plain http"), "{bad}");
        }
        assert!(check_url("http://100.100.100.200", false).is_ok());
        assert!(check_url("https://user:pw@host", true).unwrap_err().contains("user information"));
        assert!(check_endpoint("https://host/?a=1", true).unwrap_err().contains("query or fragment"));
        assert!(check_endpoint("https://host#x", false).unwrap_err().contains("query or fragment"));
        assert!(resolve_endpoint("cn-hangzhou", Some("https://host?x")).is_err());
        // A download URL may carry a query (a mirror's token); an endpoint may not.
        assert!(check_url("https://mirror.example.com/x?token=1", true).is_ok());
        assert!(check_url("ftp://host", true).unwrap_err().contains("scheme `ftp`"));
        assert!(check_url("ecs.aliyuncs.com", true).is_err());
        assert!(check_url("https://host:0", true).is_err());
        assert!(check_url("https://:443", true).is_err());
    }

    #[test]
    fn resolved_endpoints_name_the_value() {
        let r = |e: Option<&str>| resolve_endpoint("cn-hangzhou", e).map_err(|e| e.to_string());
        assert_eq!(r(None).unwrap(), "https://ecs.cn-hangzhou.aliyuncs.com");
        assert_eq!(r(Some(" ")).unwrap(), "https://ecs.cn-hangzhou.aliyuncs.com");
        assert_eq!(
            r(Some("https://ecs-vpc.cn-hangzhou.aliyuncs.com/")).unwrap(),
            "https://ecs-vpc.cn-hangzhou.aliyuncs.com"
        );
        assert_eq!(
            r(Some("ecs.example.com")).unwrap_err(),
            "endpoint `ecs.example.com` is not a URL; write it as `https://host` (e.g. \
             `https://ecs-vpc.cn-hangzhou.aliyuncs.com`)"
        );
    }

    #[test]
    fn region_ids_are_checked() {
        for ok in ["cn-hangzhou", "ap-southeast-1", "cn-shanghai-finance-1", "us-east-1"] {
            validate_region_id(ok).unwrap();
        }
        for bad in ["", "hangzhou", "cn_hangzhou", "CN-hangzhou", "cn-", "cn-hangzhou/../x", "c-x"] {
            assert_eq!(
                validate_region_id(bad).unwrap_err().to_string(),
                format!("`{bad}` is not a region id; use one such as `cn-hangzhou` or `ap-southeast-1`")
            );
        }
    }
}
