//! Who else on the runner host can read the configuration and touch the driver's files.
//!
//! Called once from [`crate::config::load`], the load path of every stage, `doctor`, `sweep`
//! and the admin commands, so a refusal here happens before any file is created and before any
//! API call:
//! - a configuration file that holds an AccessKey secret (or STS token) for a real endpoint
//!   and that group or others can read is refused: another local user would hold the runner's
//!   cloud account. For a loopback endpoint (the emulator, or a local proxy) it is a warning,
//!   and none at all for the emulator's public test key, which is no secret;
//! - the state directory, price cache directory and ledger must not be plantable or
//!   redirectable by other users ([`crate::fsutil::check_host_dir`]);
//! - the SSH private key file (`ssh.private_key_file`) must be the user's own regular file that
//!   nobody else can read or replace ([`crate::fsutil::check_host_private_file`]); it is read
//!   with `O_NOFOLLOW` ([`crate::keys::load_private_key_file`]).

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Result};

use super::Config;
use crate::fsutil::{check_host_dir, check_host_file, check_host_private_file};

/// Checks the configuration file at `path` (its text `text`) and the configured host paths;
/// pushes a warning onto `config.warnings` for a loopback endpoint's readable secret.
pub fn check(config: &mut Config, file: Option<(&Path, &str)>) -> Result<()> {
    if let Some((path, text)) = file {
        check_secret_file(config, path, text)?;
    }
    check_host_dir(&config.paths.state_dir, "paths.state_dir")?;
    check_host_dir(&config.paths.cache_dir, "paths.cache_dir")?;
    check_host_file(&config.paths.ledger, "paths.ledger")?;
    if let Some(key) = &config.ssh.private_key_file {
        check_host_private_file(key, crate::keys::PRIVATE_KEY_FILE_KEY)?;
    }
    Ok(())
}

fn check_secret_file(config: &mut Config, path: &Path, text: &str) -> Result<()> {
    let Some(secret) = file_secret(text) else { return Ok(()) };
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o044 == 0 {
        return Ok(());
    }
    let p = path.display();
    if !config.endpoint.as_deref().is_some_and(is_loopback_url) {
        bail!(
            "refusing the configuration file `{p}`: it holds an AccessKey secret and is readable by other users \
             (mode {mode:04o}); run `chmod 600 {p}`"
        );
    }
    if secret != crate::emulator::DEFAULT_ACCESS_KEY_SECRET {
        config.warnings.push(format!(
            "`{p}` holds credentials and is readable by other users (mode {mode:04o}); run `chmod 600 {p}`"
        ));
    }
    Ok(())
}

/// The secret the file itself holds (`credentials.access_key_secret` or `security_token`).
fn file_secret(text: &str) -> Option<String> {
    let doc: toml::Table = text.parse().ok()?;
    let creds = doc.get("credentials")?.as_table()?;
    ["access_key_secret", "security_token"]
        .iter()
        .find_map(|k| creds.get(*k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_string))
}

/// Whether an endpoint URL's host is a loopback name or address.
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls() {
        assert!(is_loopback_url("http://127.0.0.1:9470"));
        assert!(is_loopback_url("https://localhost/x"));
        assert!(is_loopback_url("http://[::1]:80"));
        assert!(!is_loopback_url("https://ecs.cn-hangzhou.aliyuncs.com"));
        assert!(!is_loopback_url("https://127.0.0.1.example.com"));
    }

    #[test]
    fn only_a_non_empty_credentials_secret_counts() {
        assert_eq!(file_secret("[credentials]\naccess_key_secret = \"s\"\n").as_deref(), Some("s"));
        assert_eq!(file_secret("# access_key_secret = \"s\"\n"), None);
        assert_eq!(file_secret("[credentials]\nsecurity_token = \"\"\n"), None);
    }
}
