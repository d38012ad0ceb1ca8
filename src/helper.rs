//! gitlab-runner's own binary on the instance (`[helper]`), checked or installed once by
//! `prepare` after SSH is ready.
//!
//! Why it matters: the custom executor's cache and artifact stages call `gitlab-runner` from
//! the instance's PATH (gitlab-runner v18.3.0-1857-gd79f3e7b8, `main.go`:
//! `custom.NewProvider("gitlab-runner")`), guarded by `gitlab-runner --version`; when that
//! fails the stage prints `Missing gitlab-runner. Uploading artifacts is disabled.` and passes
//! (`shells/abstract.go`, `guardRunnerCommand`), so a job goes green without its cache or
//! artifacts. `git` is what `get_sources` runs (`shells/abstract.go`, `writeRefspecFetchCmd`
//! and friends). A helper baked into an image also goes stale as gitlab-runner adds flags, so
//! the helper can instead be uploaded from the runner host or downloaded for the runner's own
//! version. docs/gitlab-runner.md, "The helper on the instance", is the user's view.

use std::path::Path;

use anyhow::anyhow;

use crate::config::{valid_version, HelperInstall};
use crate::exit::StageError;
use crate::selection::Arch;
use crate::ssh::{self, sh_quote, SshTarget};
use crate::stages::{Context, Progress};

/// Where the helper is installed on the instance: on root's PATH, where gitlab-runner's own
/// install instructions put it (its repository's `docs/install/linux-manually.md`).
pub const INSTALL_PATH: &str = "/usr/local/bin/gitlab-runner";

/// Checks or installs the helper on a ready instance, as `helper.install` says.
pub fn prepare_instance(ctx: &Context, target: &SshTarget) -> Result<(), StageError> {
    let arch = ctx.spec.shape.arch;
    match ctx.config.helper.install {
        HelperInstall::Image => check_image(target),
        HelperInstall::Upload => {
            let Some(path) = ctx.config.helper.upload.get(&arch) else {
                return Err(StageError::system(format!(
                    "`helper.upload_{arch}` is not set, but `helper.install = \"upload\"` and this job runs on \
                     {arch}; set it to gitlab-runner's linux-{arch} binary on the runner host"
                )));
            };
            upload(target, path, arch)
        }
        HelperInstall::Download => {
            let version = match &ctx.config.helper.version {
                Some(v) => v.clone(),
                None => host_version(&ctx.config.helper.runner_command)?,
            };
            download(ctx, target, &version, arch)
        }
    }
}

/// `image`: one warning line when the image lacks `gitlab-runner` or `git`.
fn check_image(target: &SshTarget) -> Result<(), StageError> {
    let script = "for c in gitlab-runner git; do if \"$c\" --version >/dev/null 2>&1; then echo \"$c=ok\"; \
                  else echo \"$c=missing\"; fi; done";
    let (status, out, err) = ssh::exec(target, script, b"").map_err(|e| {
        StageError::System(anyhow!(e).context("checking gitlab-runner and git on the instance"))
    })?;
    if status != 0 {
        return Err(StageError::system(format!(
            "checking gitlab-runner and git on the instance failed with status {status}: {}",
            err.trim()
        )));
    }
    let missing = |name: &str| out.lines().any(|l| l.trim() == format!("{name}=missing"));
    let mut parts = Vec::new();
    if missing("gitlab-runner") {
        parts.push(
            "no `gitlab-runner` (cache and artifact stages print \"Missing gitlab-runner\" and pass without them)",
        );
    }
    if missing("git") {
        parts.push("no `git` (fetching the sources fails unless GIT_STRATEGY is `none` or `empty`)");
    }
    if !parts.is_empty() {
        Progress.line(format!(
            "WARNING: the instance image has {}; add {} to the image or set `helper.install` to \"upload\" or \
             \"download\"",
            parts.join(" and "),
            if parts.len() == 1 { "it" } else { "them" }
        ));
    }
    Ok(())
}

/// The version line of `gitlab-runner --version` (`common/version.go`, `Extended`:
/// `Version:      18.3.0`).
pub fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .filter(|v| valid_version(v))
}

/// The runner host's gitlab-runner version (never a job variable: the job does not choose
/// what runs as root on the instance).
fn host_version(command: &Path) -> Result<String, StageError> {
    let fix = "set `helper.version` or `helper.runner_command`";
    let out = std::process::Command::new(command)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            StageError::system(format!(
                "cannot run `{} --version` on the runner host ({e}); {fix}",
                command.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_version(&text) {
        Some(v) if out.status.success() => Ok(v),
        _ => Err(StageError::system(format!(
            "`{} --version` on the runner host did not report a version ({}); {fix}",
            command.display(),
            out.status
        ))),
    }
}

/// Runs `gitlab-runner --version` on the instance; the version it reports.
fn check_installed(target: &SshTarget, what: &str) -> Result<String, StageError> {
    let (status, out, err) = ssh::exec(target, &format!("{INSTALL_PATH} --version"), b"")
        .map_err(|e| StageError::System(anyhow!(e).context(format!("checking {what}"))))?;
    match parse_version(&out) {
        Some(v) if status == 0 => Ok(v),
        _ => Err(StageError::system(format!(
            "{what} does not run on the instance (`gitlab-runner --version` exited with status {status}: {}); \
             check that it is gitlab-runner's Linux build for the instance's architecture",
            err.lines().chain(out.lines()).next().unwrap_or("no output").trim()
        ))),
    }
}

/// `upload`: copies the runner host's binary over the pinned SSH session, then checks it.
fn upload(target: &SshTarget, path: &Path, arch: Arch) -> Result<(), StageError> {
    let data = std::fs::read(path).map_err(|e| {
        StageError::system(format!("cannot read `helper.upload_{arch}` = `{}`: {e}", path.display()))
    })?;
    // A temporary name beside the target, then a rename: a half-written binary is never on
    // the PATH.
    let command = format!(
        "set -e; umask 022; mkdir -p {dir}; t=$(mktemp {dir}/.gitlab-runner.XXXXXX); cat > \"$t\"; \
         chmod 0755 \"$t\"; mv -f \"$t\" {dst}",
        dir = sh_quote(Path::new(INSTALL_PATH).parent().and_then(Path::to_str).unwrap_or("/usr/local/bin")),
        dst = sh_quote(INSTALL_PATH)
    );
    let (status, _, err) = ssh::exec(target, &command, &data)
        .map_err(|e| StageError::System(anyhow!(e).context("uploading gitlab-runner to the instance")))?;
    if status != 0 {
        return Err(StageError::system(format!(
            "uploading gitlab-runner to {INSTALL_PATH} on the instance failed with status {status}: {}",
            err.trim()
        )));
    }
    let what = format!("the uploaded `{}`", path.display());
    let version = check_installed(target, &what)?;
    Progress.line(format!(
        "Installed gitlab-runner {version} ({arch}) on the instance from `{}`",
        path.display()
    ));
    Ok(())
}

/// Fills `{version}` and `{arch}` into a URL template.
pub fn fill(template: &str, version: &str, arch: Arch) -> String {
    template.replace("{version}", version).replace("{arch}", &arch.to_string())
}

/// `download`: the instance fetches the runner's version for its architecture and verifies
/// its SHA-256 (the configured `helper.sha256_<arch>`, else the line for
/// `binaries/gitlab-runner-linux-<arch>` in the release's `release.sha256`).
fn download(ctx: &Context, target: &SshTarget, version: &str, arch: Arch) -> Result<(), StageError> {
    let h = &ctx.config.helper;
    let url = fill(&h.download_url, version, arch);
    let sums = fill(&h.checksum_url, version, arch);
    let want = h.sha256.get(&arch).cloned().unwrap_or_default();
    let script = format!(
        "set -eu\n\
         url={url}; sums={sums}; want={want}; name={name}; dst={dst}\n\
         fetch() {{\n\
           if command -v curl >/dev/null 2>&1; then curl -fsSL --retry 3 -o \"$2\" \"$1\"\n\
           elif command -v wget >/dev/null 2>&1; then wget -q -O \"$2\" \"$1\"\n\
           else echo \"neither curl nor wget is installed\" >&2; return 1; fi\n\
         }}\n\
         d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT\n\
         fetch \"$url\" \"$d/bin\" || {{ echo \"downloading $url failed\" >&2; exit 1; }}\n\
         if [ -z \"$want\" ]; then\n\
           fetch \"$sums\" \"$d/sums\" || {{ echo \"downloading $sums failed\" >&2; exit 1; }}\n\
           want=$(awk -v n=\"$name\" '{{f=$2; sub(/^\\*/, \"\", f)}} f==n {{print $1; exit}}' \"$d/sums\")\n\
           [ -n \"$want\" ] || {{ echo \"$sums lists no checksum for $name\" >&2; exit 1; }}\n\
         fi\n\
         got=$(sha256sum \"$d/bin\" | cut -d' ' -f1)\n\
         [ \"$got\" = \"$want\" ] || {{ echo \"checksum mismatch for $url: expected $want, got $got\" >&2; exit 1; }}\n\
         mkdir -p \"$(dirname \"$dst\")\"\n\
         install -m 0755 \"$d/bin\" \"$dst\"\n",
        url = sh_quote(&url),
        sums = sh_quote(&sums),
        want = sh_quote(&want),
        name = sh_quote(&format!("binaries/gitlab-runner-linux-{arch}")),
        dst = sh_quote(INSTALL_PATH),
    );
    let (status, _, err) = ssh::exec(target, "bash -s", script.as_bytes())
        .map_err(|e| StageError::System(anyhow!(e).context("downloading gitlab-runner on the instance")))?;
    if status != 0 {
        let why = err.lines().last().unwrap_or("no output").trim().to_string();
        return Err(StageError::system(format!(
            "installing gitlab-runner {version} ({arch}) on the instance failed: {why}; check `helper.download_url` \
             (and `helper.sha256_{arch}` or `helper.checksum_url`), or use `helper.install = \"upload\"`"
        )));
    }
    let reported = check_installed(target, &format!("gitlab-runner {version} from {url}"))?;
    Progress.line(format!(
        "Installed gitlab-runner {reported} ({arch}) on the instance from {url} (SHA-256 verified)"
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_line() {
        let out = "Version:      18.3.0\nGit revision: d79f3e7b\nOS/Arch:      linux/amd64\n";
        assert_eq!(parse_version(out).as_deref(), Some("18.3.0"));
        assert_eq!(parse_version("Version: v17.9.1\n").as_deref(), Some("17.9.1"));
        assert_eq!(parse_version("Version: $(reboot)\n"), None);
        assert_eq!(parse_version("gitlab-runner: command not found\n"), None);
    }

    #[test]
    fn fills_the_official_template() {
        assert_eq!(
            fill(crate::config::DEFAULT_DOWNLOAD_URL, "18.3.0", Arch::Arm64),
            "https://gitlab-runner-downloads.s3.amazonaws.com/v18.3.0/binaries/gitlab-runner-linux-arm64"
        );
    }
}
