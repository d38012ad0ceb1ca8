//! Per-job SSH keys.
//!
//! Every job gets two fresh ed25519 key pairs: a client key that the instance accepts (its public
//! half goes into `ssh_authorized_keys`) and a host key that the instance's sshd presents (both
//! halves go into cloud-config `ssh_keys`). Because the driver made the host key itself, it can
//! pin it exactly instead of trusting whatever answers on the IP — a freshly created cloud
//! instance's address may have belonged to someone else a minute ago. Private halves travel in
//! [`Secret`] and only ever land in 0600 files or in the encrypted user data.
//!
//! Administrators may instead use a key pair registered in ECS; its private key file is loaded
//! with [`load_private_key_file`], which refuses a file others can read (as `ssh` itself does).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::secret::Secret;

/// A private key (OpenSSH PEM) and its public key line (`ssh-ed25519 AAAA... comment`).
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` ... , newline-terminated.
    pub private_openssh: Secret<String>,
    /// The `authorized_keys` line, without a trailing newline.
    pub public_openssh: String,
}

/// Generates a new ed25519 key pair with `comment` on its public line.
pub fn generate_ed25519(comment: &str) -> Result<KeyPair> {
    let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
        .map_err(|e| anyhow!("failed to generate an ed25519 key: {e}"))?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| anyhow!("failed to encode an ed25519 private key: {e}"))?;
    let public =
        key.public_key().to_openssh().map_err(|e| anyhow!("failed to encode an ed25519 public key: {e}"))?;
    Ok(KeyPair { private_openssh: Secret::new(private.to_string()), public_openssh: public })
}

fn parse_public(public_openssh: &str) -> Result<PublicKey> {
    PublicKey::from_openssh(public_openssh.trim())
        .map_err(|e| anyhow!("invalid OpenSSH public key `{}`: {e}", abbreviate(public_openssh)))
}

/// The SSH wire-format blob of a public key line: what libssh2's `host_key()` returns.
pub fn public_key_blob(public_openssh: &str) -> Result<Vec<u8>> {
    parse_public(public_openssh)?.to_bytes().map_err(|e| anyhow!("failed to encode a public key blob: {e}"))
}

/// The `SHA256:...` fingerprint of a public key line, as `ssh-keygen -l` prints it.
pub fn fingerprint_sha256(public_openssh: &str) -> Result<String> {
    Ok(parse_public(public_openssh)?.fingerprint(HashAlg::Sha256).to_string())
}

/// The `SHA256:...` fingerprint of a wire-format public key blob (e.g. a server's host key).
pub fn fingerprint_sha256_of_blob(blob: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(blob);
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// The public key line of an OpenSSH-format private key (`ssh-ed25519 AAAA... comment`).
pub fn public_from_private(private_openssh: &Secret<String>) -> Result<String> {
    let key = PrivateKey::from_openssh(private_openssh.expose().as_bytes())
        .map_err(|_| anyhow!("the private key is not a valid OpenSSH private key"))?;
    key.public_key().to_openssh().map_err(|e| anyhow!("failed to encode a public key: {e}"))
}

/// The setting [`load_private_key_file`] reads, named in its refusals.
pub const PRIVATE_KEY_FILE_KEY: &str = "ssh.private_key_file";

/// Loads a private key file for the configured key-pair mode (`ssh.private_key_file`).
///
/// Refuses what the runner host's path rule refuses ([`crate::fsutil::check_host_private_file`]:
/// a symbolic link, a file of another user, one group or others can read or write, a
/// directory others can write to), a passphrase-protected OpenSSH key (nobody can type a
/// passphrase in a CI stage) and anything that is not a PEM private key. The file is opened
/// with `O_NOFOLLOW`, so a link swapped in after the check is not read either. The error never
/// contains key material.
pub fn load_private_key_file(path: &Path) -> Result<Secret<String>> {
    crate::fsutil::check_host_private_file(path, PRIVATE_KEY_FILE_KEY)?;
    let bytes = crate::fsutil::read_nofollow(path)
        .with_context(|| format!("failed to read private key `{}`", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow!("private key `{}` is not a PEM text file", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let key = PrivateKey::from_openssh(trimmed.as_bytes())
            .map_err(|_| anyhow!("private key `{}` is not a valid OpenSSH private key", path.display()))?;
        if key.is_encrypted() {
            bail!("private key `{}` is protected by a passphrase; use a key without one", path.display());
        }
    } else if !(trimmed.starts_with("-----BEGIN ") && trimmed.contains("PRIVATE KEY-----")) {
        bail!("`{}` does not hold a PEM or OpenSSH private key", path.display());
    } else if trimmed.contains("ENCRYPTED") {
        bail!("private key `{}` is protected by a passphrase; use a key without one", path.display());
    }
    Ok(Secret::new(text))
}

/// At most the first 40 characters of a public key line, for error messages.
fn abbreviate(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generated_pair_round_trips() {
        let kp = generate_ed25519("job-42").unwrap();
        assert!(kp.private_openssh.expose().starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(kp.private_openssh.expose().ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        assert!(kp.public_openssh.starts_with("ssh-ed25519 AAAA"), "{}", kp.public_openssh);
        assert!(kp.public_openssh.ends_with(" job-42"));
        assert_eq!(public_from_private(&kp.private_openssh).unwrap(), kp.public_openssh);
        // Debug output never shows the private key.
        assert!(!format!("{kp:?}").contains("PRIVATE"));
        let other = generate_ed25519("job-42").unwrap();
        assert_ne!(other.public_openssh, kp.public_openssh);
    }

    #[test]
    fn blob_and_fingerprint_agree() {
        let kp = generate_ed25519("c").unwrap();
        let blob = public_key_blob(&kp.public_openssh).unwrap();
        // string "ssh-ed25519" then string of the 32-byte key.
        assert_eq!(blob.len(), 4 + 11 + 4 + 32);
        assert_eq!(&blob[4..15], b"ssh-ed25519");
        let fp = fingerprint_sha256(&kp.public_openssh).unwrap();
        assert!(fp.starts_with("SHA256:"));
        assert_eq!(fp, fingerprint_sha256_of_blob(&blob));
    }

    #[test]
    fn known_fingerprint() {
        // Public key and fingerprint as printed by `ssh-keygen -l -f`.
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOpKOENaBPHgx95EGK6IKMUf3e5bRLygfN5TbJx2rGjj t";
        let expected = "SHA256:mwgRdQS47ZMzmFs/EMD/rKfm2b26h6EdkebMpdWLqss";
        assert_eq!(fingerprint_sha256(line).unwrap(), expected);
        assert_eq!(fingerprint_sha256_of_blob(&public_key_blob(line).unwrap()), expected);
    }

    #[test]
    fn bad_public_key_is_an_error() {
        let err = public_key_blob("ssh-ed25519 notbase64").unwrap_err().to_string();
        assert!(err.starts_with("invalid OpenSSH public key `ssh-ed25519 notbase64`: "), "{err}");
    }

    #[test]
    fn private_key_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        let kp = generate_ed25519("x").unwrap();
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(kp.private_openssh.expose().as_bytes()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_private_key_file(&p).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "refusing `ssh.private_key_file` = `{0}`: group or other users can read or write it (mode 0644); \
                 run `chmod 600 {0}`",
                p.display()
            )
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let loaded = load_private_key_file(&p).unwrap();
        assert_eq!(loaded.expose(), kp.private_openssh.expose());
        // A link to the private file is not followed, even though the target would do.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let err = load_private_key_file(&link).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "refusing `ssh.private_key_file` = `{}`: it is a symbolic link; remove the link or set the real path",
                link.display()
            )
        );
    }

    #[test]
    fn private_key_file_must_be_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id");
        fs::write(&p, "hello\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_private_key_file(&p).unwrap_err().to_string();
        assert_eq!(err, format!("`{}` does not hold a PEM or OpenSSH private key", p.display()));
        let missing = dir.path().join("nope");
        let err = format!("{:#}", load_private_key_file(&missing).unwrap_err());
        assert!(err.starts_with(&format!("failed to read private key `{}`: ", missing.display())), "{err}");
    }
}
