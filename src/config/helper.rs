//! `[helper]`: how gitlab-runner's own binary reaches the instance, and whether a distributed
//! cache is configured (what [`crate::helper`] does with it is explained there and in
//! docs/gitlab-runner.md, "The helper on the instance").

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{check_url, Origin, Validator};
use crate::selection::Arch;

/// GitLab's official download location of a release's Linux binaries (gitlab-runner
/// v18.3.0-1857-gd79f3e7b8, `docs/install/bleeding-edge.md`, "Download any other tagged
/// release": `…/gitlab-runner-downloads/v<version>/binaries/gitlab-runner-linux-<arch>`).
pub const DEFAULT_DOWNLOAD_URL: &str =
    "https://gitlab-runner-downloads.s3.amazonaws.com/v{version}/binaries/gitlab-runner-linux-{arch}";

/// The checksum list published beside every release's binaries (`release.sha256`, signed by
/// `release.sha256.asc`; gitlab-runner `docs/install/linux-repository.md`,
/// `.gitlab/ci/postrelease.gitlab-ci.yml`).
pub const DEFAULT_CHECKSUM_URL: &str =
    "https://gitlab-runner-downloads.s3.amazonaws.com/v{version}/release.sha256";

/// How the `gitlab-runner` binary gets onto the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HelperInstall {
    /// The image has it; prepare only checks and warns.
    #[default]
    Image,
    /// Prepare copies the runner host's binary for the instance's architecture over SSH.
    Upload,
    /// The instance downloads the runner's version from [`HelperConfig::download_url`].
    Download,
}

impl HelperInstall {
    /// The name in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            HelperInstall::Image => "image",
            HelperInstall::Upload => "upload",
            HelperInstall::Download => "download",
        }
    }
}

/// The validated `[helper]` table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HelperConfig {
    /// `install`: `image` (default), `upload` or `download`.
    pub install: HelperInstall,
    /// `upload_amd64`, `upload_arm64`: the runner host's binaries per architecture.
    pub upload: BTreeMap<Arch, PathBuf>,
    /// `download_url`: template with `{version}` and `{arch}`.
    pub download_url: String,
    /// `checksum_url`: template of a `sha256sum`-style list (`release.sha256`), used when no
    /// `sha256_<arch>` is set.
    pub checksum_url: String,
    /// `sha256_amd64`, `sha256_arm64`: expected checksums (lowercase hex).
    pub sha256: BTreeMap<Arch, String>,
    /// `version`: the gitlab-runner version to download; default: what the runner host's
    /// [`HelperConfig::runner_command`] reports.
    pub version: Option<String>,
    /// `runner_command`: the runner host's `gitlab-runner` (default `gitlab-runner` on PATH).
    pub runner_command: PathBuf,
    /// `distributed_cache`: gitlab-runner's `[runners.cache]` points at a shared store (S3,
    /// OSS…), so caches outlive the instance.
    pub distributed_cache: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHelper {
    install: Option<String>,
    upload_amd64: Option<PathBuf>,
    upload_arm64: Option<PathBuf>,
    download_url: Option<String>,
    checksum_url: Option<String>,
    sha256_amd64: Option<String>,
    sha256_arm64: Option<String>,
    version: Option<String>,
    runner_command: Option<PathBuf>,
    distributed_cache: Option<bool>,
}

/// A gitlab-runner version as it may appear in a URL and a shell word: `18.3.0`,
/// `18.3.0~pre.1`, `v18.3.0` is written without the `v`.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '~' | '_'))
}

impl Validator<'_> {
    pub(super) fn helper(&self, raw: RawHelper) -> anyhow::Result<HelperConfig> {
        let install = match raw.install.as_deref().map(str::trim) {
            None | Some("image") => HelperInstall::Image,
            Some("upload") => HelperInstall::Upload,
            Some("download") => HelperInstall::Download,
            Some(other) => return Err(self.err(
                Origin::File("helper.install"),
                other,
                "is not a way to install gitlab-runner on the instance; use `image`, `upload` or `download`",
            )),
        };
        let mut upload = BTreeMap::new();
        for (arch, key, path) in [
            (Arch::Amd64, "helper.upload_amd64", raw.upload_amd64),
            (Arch::Arm64, "helper.upload_arm64", raw.upload_arm64),
        ] {
            if let Some(p) = path.filter(|p| !p.as_os_str().is_empty()) {
                let p = self.resolve(p);
                if install == HelperInstall::Upload && !p.is_file() {
                    return Err(self.err(
                        Origin::File(key),
                        p.display(),
                        "is not a file on the runner host; point it at gitlab-runner's Linux binary for that \
                         architecture",
                    ));
                }
                upload.insert(arch, p);
            }
        }
        if install == HelperInstall::Upload && upload.is_empty() {
            return Err(self.err(
                Origin::File("helper.install"),
                "upload",
                "needs `helper.upload_amd64` or `helper.upload_arm64` (gitlab-runner's Linux binary on the runner \
                 host)",
            ));
        }
        let template = |key: &'static str, value: Option<String>, default: &str| -> anyhow::Result<String> {
            let (v, origin) = match value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
                Some(v) => (v, Origin::File(key)),
                None => (default.to_string(), Origin::Default(key)),
            };
            // Plain http only on loopback (a local mirror, the tests).
            if let Err(why) = check_url(&v, true) {
                // check_url's own words are about signed API requests; say what matters here.
                let plain_http = v.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("http://"))
                    && check_url(&format!("https://{}", &v[7..]), true).is_ok();
                let why = if plain_http {
                    "uses plain http to a host that is not loopback; use `https://` (the binary runs as root on \
                     every instance)"
                        .to_string()
                } else {
                    why
                };
                return Err(self.err(origin, &v, &why));
            }
            if v.chars().any(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '\\' | '`' | '$')) {
                return Err(self.err(
                    origin,
                    &v,
                    "contains a space, quote, `\\`, `` ` `` or `$`; write a plain URL",
                ));
            }
            Ok(v)
        };
        let download_url = template("helper.download_url", raw.download_url, DEFAULT_DOWNLOAD_URL)?;
        let checksum_url = template("helper.checksum_url", raw.checksum_url, DEFAULT_CHECKSUM_URL)?;
        let mut sha256 = BTreeMap::new();
        for (arch, key, sum) in [
            (Arch::Amd64, "helper.sha256_amd64", raw.sha256_amd64),
            (Arch::Arm64, "helper.sha256_arm64", raw.sha256_arm64),
        ] {
            if let Some(s) = sum.map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()) {
                if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.err(Origin::File(key), &s, "is not a SHA-256 checksum (64 hex digits)"));
                }
                sha256.insert(arch, s);
            }
        }
        let version = match raw.version.map(|v| v.trim().trim_start_matches('v').to_string()) {
            Some(v) if v.is_empty() => None,
            Some(v) if !valid_version(&v) => {
                return Err(self.err(
                    Origin::File("helper.version"),
                    &v,
                    "is not a gitlab-runner version; write e.g. `18.3.0`",
                ))
            }
            v => v,
        };
        let runner_command = raw
            .runner_command
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("gitlab-runner"));
        Ok(HelperConfig {
            install,
            upload,
            download_url,
            checksum_url,
            sha256,
            version,
            runner_command,
            distributed_cache: raw.distributed_cache.unwrap_or(false),
        })
    }
}
