//! The cloud-config given to each instance as ECS `UserData`.
//!
//! It carries the job's client public key (`ssh_authorized_keys`) and the host key pair the
//! driver generated (`ssh_keys`), so the instance's sshd presents a key the driver can pin, plus
//! any extra files and boot commands (the self-destruct watchdog) given as plain data. ECS takes
//! at most 32 KB of base64 user data, so the rendered size is reported and checked here rather
//! than discovered as an `InvalidUserData` error after an instance was already chosen.
//!
//! The document is `#cloud-config` followed by JSON from `serde_json`: cloud-init reads
//! cloud-config with a YAML loader (PyYAML's `safe_load`) and a JSON document is a YAML flow
//! document, so no YAML writer is needed. The one gap between the two is characters that
//! JSON allows raw in a string but YAML 1.1 does not (C1 controls, DEL, U+FEFF, U+FFFE/U+FFFF)
//! or reads as line breaks inside a quoted scalar (U+0085, U+2028, U+2029, folded to spaces):
//! `YamlSafe` writes those as `\uXXXX`, an escape both languages read the same way (PyYAML's
//! reader: `NON_PRINTABLE` and the line-break set in `yaml/reader.py` and `yaml/scanner.py`).
//! A test runs real cloud-init's schema check and PyYAML on the output. Because the text
//! contains the host private key it is returned wrapped in [`Secret`].

use std::io;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::keys::KeyPair;
use crate::secret::Secret;

/// ECS's limit on `UserData`, measured after base64 encoding.
pub const USER_DATA_MAX_BASE64: usize = 32 * 1024;

/// A file cloud-init writes at boot (`write_files`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteFile {
    /// Absolute path on the instance.
    pub path: String,
    /// Octal permission string, e.g. `"0700"`.
    pub permissions: String,
    /// `user:group`, when not root's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The file's text, written as is.
    pub content: String,
}

/// A command cloud-init runs once at the end of the first boot (`runcmd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RunCmd {
    /// A line given to `sh -c`.
    Shell(String),
    /// An argument vector executed directly.
    Argv(Vec<String>),
}

/// Everything that goes into the cloud-config.
#[derive(Debug, Clone, Default)]
pub struct CloudConfig {
    /// Public key lines accepted for login (`ssh-ed25519 AAAA... comment`).
    pub authorized_keys: Vec<String>,
    /// The host key pair the instance's sshd must use; `None` lets the image generate one.
    pub host_key: Option<KeyPair>,
    /// Extra files (the watchdog script, its unit).
    pub write_files: Vec<WriteFile>,
    /// Extra boot commands.
    pub runcmd: Vec<RunCmd>,
}

/// The document as cloud-init's modules name its keys (`cc_ssh`, `cc_write_files`,
/// `cc_runcmd` in cloud-init's schema, `cloudinit/config/schemas/schema-cloud-config-v1.json`).
#[derive(Serialize)]
struct Document<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    ssh_authorized_keys: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ssh_keys: Option<SshKeys<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    write_files: &'a [WriteFile],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    runcmd: &'a [RunCmd],
}

#[derive(Serialize)]
struct SshKeys<'a> {
    ed25519_private: &'a str,
    ed25519_public: &'a str,
}

/// Rendered user data: the text (it holds a private key) and its sizes.
#[derive(Debug, Clone)]
pub struct UserData {
    /// The `#cloud-config` document.
    pub text: Secret<String>,
}

impl UserData {
    /// Size of the plain text in bytes.
    pub fn len(&self) -> usize {
        self.text.expose().len()
    }

    /// Whether the text is empty (never, for a rendered document).
    pub fn is_empty(&self) -> bool {
        self.text.expose().is_empty()
    }

    /// Size after base64 encoding, which is what ECS limits.
    pub fn base64_len(&self) -> usize {
        base64_len(self.len())
    }
}

fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

impl CloudConfig {
    /// Renders the document; fails when a field is malformed or the result exceeds
    /// [`USER_DATA_MAX_BASE64`].
    pub fn render(&self) -> Result<UserData> {
        for key in &self.authorized_keys {
            check_one_line("an authorized key", key)?;
        }
        if let Some(host) = &self.host_key {
            check_one_line("the host public key", &host.public_openssh)?;
        }
        for f in &self.write_files {
            if !f.path.starts_with('/') {
                bail!("write_files path `{}` is not absolute", f.path);
            }
            check_one_line("a write_files path", &f.path)?;
            let p = f.permissions.as_str();
            if !(3..=4).contains(&p.len()) || !p.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                bail!("write_files permissions `{p}` for `{}` are not an octal mode like 0700", f.path);
            }
            if let Some(owner) = &f.owner {
                check_one_line("a write_files owner", owner)?;
            }
        }
        if self.runcmd.iter().any(|c| matches!(c, RunCmd::Argv(a) if a.is_empty())) {
            bail!("a runcmd argument vector is empty");
        }
        let doc = Document {
            ssh_authorized_keys: self.authorized_keys.iter().map(|k| k.trim()).collect(),
            ssh_keys: self.host_key.as_ref().map(|h| SshKeys {
                ed25519_private: h.private_openssh.expose(),
                ed25519_public: h.public_openssh.trim(),
            }),
            write_files: &self.write_files,
            runcmd: &self.runcmd,
        };
        let mut out = b"#cloud-config\n".to_vec();
        doc.serialize(&mut serde_json::Serializer::with_formatter(&mut out, YamlSafe))?;
        out.push(b'\n');
        let text = String::from_utf8(out).expect("serde_json writes UTF-8");
        let data = UserData { text: Secret::new(text) };
        if data.base64_len() > USER_DATA_MAX_BASE64 {
            bail!(
                "user data is {} bytes after base64, over the ECS limit of {USER_DATA_MAX_BASE64}",
                data.base64_len()
            );
        }
        Ok(data)
    }
}

fn check_one_line(what: &str, s: &str) -> Result<()> {
    if s.trim().is_empty() || s.trim().contains(['\n', '\r']) {
        bail!("{what} must be one non-empty line");
    }
    Ok(())
}

/// Compact JSON that a YAML 1.1 reader reads back unchanged (see the module comment).
struct YamlSafe;

/// Characters JSON allows raw in a string that PyYAML rejects or folds.
fn yaml_unsafe(c: char) -> bool {
    matches!(c, '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}')
}

impl serde_json::ser::Formatter for YamlSafe {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(at) = rest.find(yaml_unsafe) {
            w.write_all(&rest.as_bytes()[..at])?;
            let c = rest[at..].chars().next().expect("a char at a found index");
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[at + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use serde_json::{json, Value};

    use super::*;
    use crate::keys::generate_ed25519;

    /// The JSON after the `#cloud-config` line.
    fn json_of(ud: &UserData) -> Value {
        let text = ud.text.expose();
        let body = text.strip_prefix("#cloud-config\n").expect("starts with #cloud-config");
        assert!(body.ends_with('\n') && !body.trim_end().contains('\n'), "one JSON line and a newline");
        serde_json::from_str(body).expect("valid JSON")
    }

    fn fixed_keys() -> (KeyPair, KeyPair) {
        let host = KeyPair {
            private_openssh: Secret::new(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQUJD\n-----END OPENSSH PRIVATE KEY-----\n"
                    .to_string(),
            ),
            public_openssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost host@job-1".to_string(),
        };
        let client = KeyPair {
            private_openssh: Secret::new(String::new()),
            public_openssh: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient aliyun-spot-executor job 1"
                .to_string(),
        };
        (host, client)
    }

    #[test]
    fn exact_output_for_keys_only() {
        let (host, client) = fixed_keys();
        let cfg = CloudConfig {
            authorized_keys: vec![client.public_openssh],
            host_key: Some(host),
            ..Default::default()
        };
        let ud = cfg.render().unwrap();
        assert_eq!(
            ud.text.expose(),
            "#cloud-config\n\
             {\"ssh_authorized_keys\":[\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient aliyun-spot-executor job 1\"],\
             \"ssh_keys\":{\"ed25519_private\":\"-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAA\\nQUJD\\n-----END OPENSSH PRIVATE KEY-----\\n\",\
             \"ed25519_public\":\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost host@job-1\"}}\n"
        );
        assert_eq!(format!("{:?}", ud.text), "REDACTED");
    }

    #[test]
    fn exact_output_for_files_and_commands() {
        let cfg = CloudConfig {
            write_files: vec![WriteFile {
                path: "/usr/local/sbin/w".into(),
                permissions: "0700".into(),
                owner: Some("root:root".into()),
                content: "#!/bin/sh\necho hi\n".into(),
            }],
            runcmd: vec![
                RunCmd::Shell("systemctl start w".into()),
                RunCmd::Argv(vec!["a".into(), "b c".into()]),
            ],
            ..Default::default()
        };
        assert_eq!(
            cfg.render().unwrap().text.expose(),
            "#cloud-config\n\
             {\"write_files\":[{\"path\":\"/usr/local/sbin/w\",\"permissions\":\"0700\",\"owner\":\"root:root\",\
             \"content\":\"#!/bin/sh\\necho hi\\n\"}],\"runcmd\":[\"systemctl start w\",[\"a\",\"b c\"]]}\n"
        );
    }

    /// Contents that a hand-written YAML writer gets wrong, and characters JSON and YAML 1.1
    /// disagree on.
    const TRICKY: [&str; 12] = [
        "#!/bin/bash\nset -eu\n\n  indented: 'x' # not a comment\n\tTab\n",
        "no trailing newline\nsecond",
        "two trailing\n\n\n",
        "  leading blank\nx\n",
        "\nstarts empty\n",
        "one line with \"quotes\" and \\ back\\slash: and # hash",
        "control \u{7} bell, \u{85} next line, \u{2028} separator\u{2029}, \u{7f}\u{9f}\nline\n",
        "\u{feff}bom, \u{fffe} and astral \u{1f600} and \u{4e2d}\u{6587}",
        "",
        "0700",
        "true",
        "- [a, {b: c}] &x *y !tag %d @e `f`",
    ];

    fn tricky_config(host: KeyPair, client: KeyPair) -> CloudConfig {
        CloudConfig {
            authorized_keys: vec![client.public_openssh, "ssh-ed25519 AAAA x: y #z".into()],
            host_key: Some(host),
            write_files: TRICKY
                .iter()
                .enumerate()
                .map(|(n, c)| WriteFile {
                    path: format!("/etc/x-{n}"),
                    permissions: "644".into(),
                    owner: (n == 0).then(|| "root:root".into()),
                    content: c.to_string(),
                })
                .collect(),
            runcmd: vec![
                RunCmd::Shell("echo \"$(date)\" > /tmp/x # c".into()),
                RunCmd::Argv(vec!["- a".into(), "yes".into()]),
            ],
        }
    }

    #[test]
    fn real_keys_and_tricky_content_parse_back() {
        let host = generate_ed25519("host key: job #7").unwrap();
        let client = generate_ed25519("yes").unwrap();
        let ud = tricky_config(host.clone(), client.clone()).render().unwrap();
        let doc = json_of(&ud);
        assert_eq!(doc["ssh_authorized_keys"], json!([client.public_openssh, "ssh-ed25519 AAAA x: y #z"]));
        assert_eq!(doc["ssh_keys"]["ed25519_private"], host.private_openssh.expose().as_str());
        assert_eq!(doc["ssh_keys"]["ed25519_public"], host.public_openssh.as_str());
        let files = doc["write_files"].as_array().unwrap();
        assert_eq!(files.len(), TRICKY.len());
        for (n, (f, want)) in files.iter().zip(TRICKY).enumerate() {
            assert_eq!(f["path"], format!("/etc/x-{n}"));
            assert_eq!(f["permissions"], "644");
            assert_eq!(f["content"], want, "file {n}");
        }
        assert_eq!(doc["runcmd"], json!(["echo \"$(date)\" > /tmp/x # c", ["- a", "yes"]]));
        // What YAML 1.1 cannot hold raw is escaped; the rest is written as is.
        let text = ud.text.expose();
        for c in ['\u{85}', '\u{2028}', '\u{2029}', '\u{7f}', '\u{9f}', '\u{feff}', '\u{fffe}'] {
            assert!(!text.contains(c), "{:04x} is escaped", c as u32);
        }
        assert!(text.contains("\\u2028"));
        assert!(text.contains("astral \u{1f600} and \u{4e2d}\u{6587}"));
        assert!(ud.base64_len() < USER_DATA_MAX_BASE64);
        assert_eq!(ud.base64_len(), ud.len().div_ceil(3) * 4);
    }

    /// The interpreter cloud-init runs under (its `#!` line), which has PyYAML.
    fn cloud_init_python(cloud_init: &Path) -> String {
        let text = std::fs::read_to_string(cloud_init).expect("cloud-init is readable");
        let shebang = text.lines().next().and_then(|l| l.strip_prefix("#!")).expect("a #! line");
        shebang.split_whitespace().next().expect("an interpreter").to_string()
    }

    /// Real cloud-init validates the document against its schema, and PyYAML (the loader
    /// cloud-init uses) reads back exactly what JSON reads.
    #[test]
    fn cloud_init_accepts_the_document_and_reads_it_as_json_does() {
        let cloud_init = Path::new("/usr/bin/cloud-init");
        if !cloud_init.exists() {
            // `.ci/run` installs it, so CI never skips this check.
            assert!(
                crate::env::Env::from_process().value("CI").is_none(),
                "{} is missing in CI: `.ci/run` installs the Debian package `cloud-init`",
                cloud_init.display()
            );
            println!("skipped: {} is not installed (Debian package `cloud-init`)", cloud_init.display());
            return;
        }
        let host = generate_ed25519("h").unwrap();
        let client = generate_ed25519("c").unwrap();
        let mut cc = tricky_config(host, client);
        crate::watchdog::add_to(&mut cc, &crate::watchdog::example_spec());
        let ud = cc.render().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("user-data");
        std::fs::write(&file, ud.text.expose()).unwrap();

        let out = Command::new(cloud_init).arg("schema").arg("--config-file").arg(&file).output().unwrap();
        let said = format!(
            "exit {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "cloud-init schema rejected the user data: {said}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("Valid cloud-config: {}\n", file.display()));

        let read = "import json, sys, yaml\n\
                    doc = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\n\
                    sys.stdout.write(json.dumps(doc))\n";
        let out =
            Command::new(cloud_init_python(cloud_init)).arg("-c").arg(read).arg(&file).output().unwrap();
        assert!(out.status.success(), "PyYAML: {}", String::from_utf8_lossy(&out.stderr));
        let by_yaml: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(by_yaml == json_of(&ud), "PyYAML reads the document differently from JSON");
    }

    #[test]
    fn oversized_and_malformed_input_are_errors() {
        let big = CloudConfig {
            write_files: vec![WriteFile {
                path: "/big".into(),
                permissions: "0600".into(),
                owner: None,
                content: "x".repeat(25_000),
            }],
            ..Default::default()
        };
        let err = big.render().unwrap_err().to_string();
        let text_len =
            "#cloud-config\n{\"write_files\":[{\"path\":\"/big\",\"permissions\":\"0600\",\"content\":\"\"}]}\n".len()
                + 25_000;
        assert_eq!(
            err,
            format!(
                "user data is {} bytes after base64, over the ECS limit of 32768",
                text_len.div_ceil(3) * 4
            )
        );
        let bad_mode = CloudConfig {
            write_files: vec![WriteFile {
                path: "/f".into(),
                permissions: "rwx".into(),
                owner: None,
                content: String::new(),
            }],
            ..Default::default()
        };
        assert_eq!(
            bad_mode.render().unwrap_err().to_string(),
            "write_files permissions `rwx` for `/f` are not an octal mode like 0700"
        );
        let two_lines = CloudConfig { authorized_keys: vec!["a\nb".into()], ..Default::default() };
        assert_eq!(
            two_lines.render().unwrap_err().to_string(),
            "an authorized key must be one non-empty line"
        );
        let empty_argv = CloudConfig { runcmd: vec![RunCmd::Argv(vec![])], ..Default::default() };
        assert_eq!(empty_argv.render().unwrap_err().to_string(), "a runcmd argument vector is empty");
    }

    #[test]
    fn typical_document_is_small() {
        let host = generate_ed25519("h").unwrap();
        let client = generate_ed25519("c").unwrap();
        let cfg = CloudConfig {
            authorized_keys: vec![client.public_openssh],
            host_key: Some(host),
            ..Default::default()
        };
        let ud = cfg.render().unwrap();
        assert!(ud.base64_len() < 2048, "{}", ud.base64_len());
    }
}
