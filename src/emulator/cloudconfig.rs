//! The part of cloud-init's `#cloud-config` that decides who can log in to an instance:
//! `ssh_authorized_keys` (a list) and `ssh_keys` (host keys by name).
//!
//! The driver writes cloud-config as JSON after the `#cloud-config` line (JSON is YAML, which
//! cloud-init reads), so the emulator reads it with `serde_json`. A document that is not JSON
//! (YAML written by another client) is treated as giving no keys, as are unknown shapes;
//! malformed input never panics. `write_files` and `runcmd` are kept as given for
//! [`super::boot`] (read only when instances boot their user data); everything else is ignored.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::secret::Secret;

/// What the emulator reads from the user data.
#[derive(Debug, Default)]
pub(crate) struct CloudConfig {
    /// Public keys allowed to log in.
    pub authorized_keys: Vec<String>,
    /// `ssh_keys` entries (`ed25519_private`, `ed25519_public`, …).
    pub ssh_keys: BTreeMap<String, Secret<String>>,
    /// `write_files` entries, as given (interpreted by [`super::boot`]).
    pub write_files: Vec<serde_json::Value>,
    /// `runcmd` items, as given (interpreted by [`super::boot`]).
    pub runcmd: Vec<serde_json::Value>,
}

impl CloudConfig {
    /// The ed25519 private host key, if given.
    pub fn ed25519_private(&self) -> Option<&Secret<String>> {
        self.ssh_keys.get("ed25519_private")
    }
}

/// The keys cloud-init's `cc_ssh`, `cc_write_files` and `cc_runcmd` modules read; other keys are
/// ignored.
#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    ssh_authorized_keys: Vec<String>,
    #[serde(default)]
    ssh_keys: BTreeMap<String, String>,
    #[serde(default)]
    write_files: Vec<serde_json::Value>,
    #[serde(default)]
    runcmd: Vec<serde_json::Value>,
}

/// Parses user data; `None` when it is not a `#cloud-config` document.
pub(crate) fn parse(user_data: &str) -> Option<CloudConfig> {
    let (first, body) = user_data.split_once('\n').unwrap_or((user_data, ""));
    if first.trim_end_matches('\r').trim_start_matches('\u{feff}') != "#cloud-config" {
        return None;
    }
    let Ok(doc) = serde_json::from_str::<Document>(body) else {
        return Some(CloudConfig::default());
    };
    Some(CloudConfig {
        authorized_keys: doc.ssh_authorized_keys.into_iter().filter(|k| !k.trim().is_empty()).collect(),
        ssh_keys: doc.ssh_keys.into_iter().map(|(k, v)| (k, Secret::new(v))).collect(),
        write_files: doc.write_files,
        runcmd: doc.runcmd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_and_ignores_the_rest() {
        let doc = "#cloud-config\n{\"ssh_authorized_keys\":[\"ssh-ed25519 AAAAC3Nza client@job\",\"ssh-ed25519 BBBB other\"],\
\"ssh_keys\":{\"ed25519_private\":\"-----BEGIN OPENSSH PRIVATE KEY-----\\nabc\\ndef\\n-----END OPENSSH PRIVATE KEY-----\\n\",\
\"ed25519_public\":\"ssh-ed25519 CCCC host\"},\"write_files\":[{\"path\":\"/x\",\"content\":\"ssh_keys: nope\"}],\"runcmd\":[\"a\",[\"b\"]]}\n";
        let c = parse(doc).unwrap();
        assert_eq!(c.authorized_keys, ["ssh-ed25519 AAAAC3Nza client@job", "ssh-ed25519 BBBB other"]);
        assert_eq!(
            c.ed25519_private().unwrap().expose(),
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\ndef\n-----END OPENSSH PRIVATE KEY-----\n"
        );
        assert_eq!(c.ssh_keys["ed25519_public"].expose(), "ssh-ed25519 CCCC host");
        assert_eq!(c.ssh_keys.len(), 2);
    }

    #[test]
    fn not_cloud_config_and_garbage() {
        assert!(parse("#!/bin/sh\necho hi\n").is_none());
        assert!(parse("").is_none());
        assert!(parse("#cloud-configx\n{}").is_none());
        for garbage in ["ssh_authorized_keys: [k1]\n", "{\"ssh_keys\": [1]}", "[]", "{", ""] {
            let c = parse(&format!("#cloud-config\n{garbage}")).unwrap();
            assert!(c.authorized_keys.is_empty() && c.ssh_keys.is_empty(), "{garbage}");
        }
        let c = parse("#cloud-config\r\n{\"ssh_authorized_keys\":[\"k1\",\" \"]}").unwrap();
        assert_eq!(c.authorized_keys, ["k1"]);
    }
}
