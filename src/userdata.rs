//! The cloud-config given to each instance as ECS `UserData`.
//!
//! It carries the job's client public key (`ssh_authorized_keys`) and the host key pair the
//! driver generated (`ssh_keys`), so the instance's sshd presents a key the driver can pin, plus
//! any extra files and boot commands (the self-destruct watchdog) given as plain data. ECS takes
//! at most 32 KB of base64 user data, so the rendered size is reported and checked here rather
//! than discovered as an `InvalidUserData` error after an instance was already chosen.
//!
//! The renderer writes YAML by hand (no YAML library in the dependency tree): keys are fixed,
//! multi-line values become literal block scalars (`|`, `|-` or `|+` to keep their exact
//! trailing newlines), and any value that is not obviously safe as a plain scalar is written
//! double-quoted with escapes. Because the text contains the host private key it is returned
//! wrapped in [`Secret`].

use anyhow::{bail, Result};

use crate::keys::KeyPair;
use crate::secret::Secret;

/// ECS's limit on `UserData`, measured after base64 encoding.
pub const USER_DATA_MAX_BASE64: usize = 32 * 1024;

/// A file cloud-init writes at boot (`write_files`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    /// Absolute path on the instance.
    pub path: String,
    /// Octal permission string, e.g. `"0700"`.
    pub permissions: String,
    /// `user:group`, when not root's default.
    pub owner: Option<String>,
    /// The file's text, written as is.
    pub content: String,
}

/// A command cloud-init runs once at the end of the first boot (`runcmd`).
#[derive(Debug, Clone, PartialEq, Eq)]
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
        let mut out = String::from("#cloud-config\n");
        if !self.authorized_keys.is_empty() {
            out.push_str("ssh_authorized_keys:\n");
            for key in &self.authorized_keys {
                check_one_line("an authorized key", key)?;
                out.push_str("  - ");
                out.push_str(&scalar(key.trim()));
                out.push('\n');
            }
        }
        if let Some(host) = &self.host_key {
            check_one_line("the host public key", &host.public_openssh)?;
            out.push_str("ssh_keys:\n");
            push_entry(&mut out, 2, "ed25519_private", host.private_openssh.expose());
            push_entry(&mut out, 2, "ed25519_public", host.public_openssh.trim());
        }
        if !self.write_files.is_empty() {
            out.push_str("write_files:\n");
            for f in &self.write_files {
                if !f.path.starts_with('/') {
                    bail!("write_files path `{}` is not absolute", f.path);
                }
                check_one_line("a write_files path", &f.path)?;
                let p = f.permissions.as_str();
                if !(3..=4).contains(&p.len()) || !p.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                    bail!("write_files permissions `{p}` for `{}` are not an octal mode like 0700", f.path);
                }
                out.push_str("  - path: ");
                out.push_str(&scalar(&f.path));
                out.push('\n');
                out.push_str(&format!("    permissions: \"{p}\"\n"));
                if let Some(owner) = &f.owner {
                    check_one_line("a write_files owner", owner)?;
                    push_entry(&mut out, 4, "owner", owner);
                }
                push_entry(&mut out, 4, "content", &f.content);
            }
        }
        if !self.runcmd.is_empty() {
            out.push_str("runcmd:\n");
            for cmd in &self.runcmd {
                match cmd {
                    RunCmd::Shell(line) => {
                        out.push_str("  - ");
                        out.push_str(&quoted(line));
                        out.push('\n');
                    }
                    RunCmd::Argv(argv) => {
                        if argv.is_empty() {
                            bail!("a runcmd argument vector is empty");
                        }
                        for (i, arg) in argv.iter().enumerate() {
                            out.push_str(if i == 0 { "  - - " } else { "    - " });
                            out.push_str(&quoted(arg));
                            out.push('\n');
                        }
                    }
                }
            }
        }
        let data = UserData { text: Secret::new(out) };
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

/// `key: value` at `indent`, choosing a block literal for multi-line text.
fn push_entry(out: &mut String, indent: usize, key: &str, value: &str) {
    let pad = " ".repeat(indent);
    out.push_str(&pad);
    out.push_str(key);
    out.push(':');
    match block_literal_header(value) {
        Some(header) => {
            out.push(' ');
            out.push_str(header);
            out.push('\n');
            let body = value.trim_end_matches('\n');
            for line in body.split('\n') {
                if !line.is_empty() {
                    out.push_str(&pad);
                    out.push_str("  ");
                    out.push_str(line);
                }
                out.push('\n');
            }
            // `|+` keeps the extra trailing newlines as empty lines.
            let extra = value.len() - body.len();
            for _ in 1..extra {
                out.push('\n');
            }
        }
        None => {
            out.push(' ');
            out.push_str(&scalar(value));
            out.push('\n');
        }
    }
}

/// The block-literal header for `value`, or `None` when it must be written quoted.
///
/// A literal is used only for multi-line text whose first line does not start with a blank
/// (that would need an indentation indicator) and that has no characters a block scalar cannot
/// hold (control characters other than tab, carriage returns, BOM).
fn block_literal_header(value: &str) -> Option<&'static str> {
    if !value.contains('\n') {
        return None;
    }
    let first = value.split('\n').next().unwrap_or("");
    if first.is_empty() || first.starts_with([' ', '\t']) {
        return None;
    }
    if value.chars().any(|c| (c.is_control() && c != '\n' && c != '\t') || needs_escape(c)) {
        return None;
    }
    let trailing = value.len() - value.trim_end_matches('\n').len();
    Some(match trailing {
        0 => "|-",
        1 => "|",
        _ => "|+",
    })
}

/// Characters YAML does not allow raw in a document or that readers treat as line breaks.
fn needs_escape(c: char) -> bool {
    matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// A plain scalar when obviously safe, else a double-quoted one.
fn scalar(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || " +/=@._-".contains(c))
        && !s.starts_with(['-', ' ', '.'])
        && !s.ends_with(' ')
        && !looks_typed(s);
    if safe {
        s.to_string()
    } else {
        quoted(s)
    }
}

/// Plain scalars that a YAML reader would turn into something other than a string.
fn looks_typed(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    matches!(lower.as_str(), "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n")
        || s.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '+')
}

/// A YAML double-quoted scalar.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || needs_escape(c) => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate_ed25519;

    /// Just enough YAML to read back what [`CloudConfig::render`] writes: block mappings,
    /// block sequences, literal block scalars with chomping, double-quoted and plain scalars.
    #[derive(Debug, Clone, PartialEq)]
    enum Yaml {
        Str(String),
        Seq(Vec<Yaml>),
        Map(Vec<(String, Yaml)>),
    }

    impl Yaml {
        fn get(&self, key: &str) -> &Yaml {
            match self {
                Yaml::Map(m) => &m.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no {key}")).1,
                other => panic!("not a map: {other:?}"),
            }
        }
        fn str(&self) -> &str {
            match self {
                Yaml::Str(s) => s,
                other => panic!("not a string: {other:?}"),
            }
        }
        fn seq(&self) -> &[Yaml] {
            match self {
                Yaml::Seq(s) => s,
                other => panic!("not a sequence: {other:?}"),
            }
        }
    }

    fn indent_of(line: &str) -> usize {
        line.len() - line.trim_start_matches(' ').len()
    }

    fn parse(doc: &str) -> Yaml {
        let mut lines: Vec<String> = doc.split('\n').map(str::to_string).collect();
        assert_eq!(lines.pop().as_deref(), Some(""), "document must end with a newline");
        assert_eq!(lines[0], "#cloud-config");
        lines.remove(0);
        let mut i = 0;
        let v = parse_node(&mut lines, &mut i, 0);
        assert_eq!(i, lines.len(), "unparsed line {:?}", lines.get(i));
        v
    }

    fn parse_node(lines: &mut [String], i: &mut usize, indent: usize) -> Yaml {
        let line = &lines[*i];
        assert_eq!(indent_of(line), indent, "bad indentation: {line:?}");
        if line[indent..].starts_with("- ") {
            let mut items = Vec::new();
            while *i < lines.len() && indent_of(&lines[*i]) == indent && lines[*i][indent..].starts_with("- ")
            {
                // Turn "- x" into "  x" and parse x as a node at indent + 2.
                lines[*i].replace_range(indent..indent + 2, "  ");
                let rest = lines[*i][indent + 2..].to_string();
                if rest.starts_with("- ") || split_key(&rest).is_some() {
                    items.push(parse_node(lines, i, indent + 2));
                } else {
                    items.push(Yaml::Str(parse_scalar(&rest)));
                    *i += 1;
                }
            }
            Yaml::Seq(items)
        } else {
            let mut entries = Vec::new();
            while *i < lines.len()
                && indent_of(&lines[*i]) == indent
                && !lines[*i][indent..].starts_with("- ")
            {
                let (key, rest) =
                    split_key(&lines[*i][indent..]).unwrap_or_else(|| panic!("{:?}", lines[*i]));
                *i += 1;
                let value = if rest.is_empty() {
                    let child = indent_of(&lines[*i]);
                    assert!(child > indent || lines[*i][child..].starts_with("- "));
                    parse_node(lines, i, child)
                } else if let Some(chomp) = rest.strip_prefix('|') {
                    parse_literal(lines, i, indent, chomp)
                } else {
                    Yaml::Str(parse_scalar(&rest))
                };
                entries.push((key, value));
            }
            Yaml::Map(entries)
        }
    }

    fn split_key(s: &str) -> Option<(String, String)> {
        let (k, rest) = s.split_once(':')?;
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        if !(rest.is_empty() || rest.starts_with(' ')) {
            return None;
        }
        Some((k.to_string(), rest.trim_start().to_string()))
    }

    fn parse_literal(lines: &[String], i: &mut usize, parent: usize, chomp: &str) -> Yaml {
        let mut body: Vec<&str> = Vec::new();
        let mut ind = None;
        while *i < lines.len() {
            let l = &lines[*i];
            if l.is_empty() {
                body.push("");
            } else if indent_of(l) > parent {
                let n = *ind.get_or_insert(indent_of(l));
                assert!(indent_of(l) >= n, "under-indented literal line {l:?}");
                body.push(&l[n..]);
            } else {
                break;
            }
            *i += 1;
        }
        let mut text = body.join("\n");
        let content = text.trim_end_matches('\n').len();
        match chomp {
            "" => {
                text.truncate(content);
                text.push('\n');
            }
            "-" => text.truncate(content),
            "+" => text.push('\n'),
            other => panic!("unknown chomping {other:?}"),
        }
        Yaml::Str(text)
    }

    fn parse_scalar(s: &str) -> String {
        if let Some(inner) = s.strip_prefix('"') {
            let inner = inner.strip_suffix('"').expect("closing quote");
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '"' {
                    panic!("unescaped quote in {s:?}");
                }
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next().unwrap() {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '"' => out.push('"'),
                    '\\' => out.push('\\'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                    }
                    other => panic!("unknown escape {other:?}"),
                }
            }
            out
        } else {
            assert!(!s.contains(": ") && !s.contains(" #") && !s.starts_with(['\'', '[', '{', '&', '*']));
            s.to_string()
        }
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
             ssh_authorized_keys:\n\
             \x20 - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient aliyun-spot-executor job 1\n\
             ssh_keys:\n\
             \x20 ed25519_private: |\n\
             \x20   -----BEGIN OPENSSH PRIVATE KEY-----\n\
             \x20   b3BlbnNzaC1rZXktdjEAAAAA\n\
             \x20   QUJD\n\
             \x20   -----END OPENSSH PRIVATE KEY-----\n\
             \x20 ed25519_public: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost host@job-1\n"
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
             write_files:\n\
             \x20 - path: /usr/local/sbin/w\n\
             \x20   permissions: \"0700\"\n\
             \x20   owner: \"root:root\"\n\
             \x20   content: |\n\
             \x20     #!/bin/sh\n\
             \x20     echo hi\n\
             runcmd:\n\
             \x20 - \"systemctl start w\"\n\
             \x20 - - \"a\"\n\
             \x20   - \"b c\"\n"
        );
    }

    #[test]
    fn real_keys_and_tricky_content_parse_back() {
        let host = generate_ed25519("host key: job #7").unwrap();
        let client = generate_ed25519("yes").unwrap();
        let tricky = [
            "#!/bin/bash\nset -eu\n\n  indented: 'x' # not a comment\n\tTab\n",
            "no trailing newline\nsecond",
            "two trailing\n\n\n",
            "  leading blank\nx\n",
            "\nstarts empty\n",
            "one line with \"quotes\" and \\ back\\slash: and # hash",
            "control \u{7} bell and \u{2028} separator\nline\n",
            "",
            "0700",
            "true",
        ];
        let cfg = CloudConfig {
            authorized_keys: vec![client.public_openssh.clone(), "ssh-ed25519 AAAA x: y #z".into()],
            host_key: Some(host.clone()),
            write_files: tricky
                .iter()
                .enumerate()
                .map(|(n, c)| WriteFile {
                    path: format!("/etc/x-{n}"),
                    permissions: "644".into(),
                    owner: None,
                    content: c.to_string(),
                })
                .collect(),
            runcmd: vec![
                RunCmd::Shell("echo \"$(date)\" > /tmp/x # c".into()),
                RunCmd::Argv(vec!["- a".into()]),
            ],
        };
        let ud = cfg.render().unwrap();
        let doc = parse(ud.text.expose());
        let keys = doc.get("ssh_authorized_keys").seq();
        assert_eq!(keys[0].str(), client.public_openssh);
        assert_eq!(keys[1].str(), "ssh-ed25519 AAAA x: y #z");
        assert_eq!(doc.get("ssh_keys").get("ed25519_private").str(), host.private_openssh.expose());
        assert_eq!(doc.get("ssh_keys").get("ed25519_public").str(), host.public_openssh);
        let files = doc.get("write_files").seq();
        assert_eq!(files.len(), tricky.len());
        for (n, (f, want)) in files.iter().zip(tricky).enumerate() {
            assert_eq!(f.get("path").str(), format!("/etc/x-{n}"));
            assert_eq!(f.get("permissions").str(), "644");
            assert_eq!(f.get("content").str(), want, "file {n}");
        }
        let cmds = doc.get("runcmd").seq();
        assert_eq!(cmds[0].str(), "echo \"$(date)\" > /tmp/x # c");
        assert_eq!(cmds[1].seq()[0].str(), "- a");
        assert!(ud.base64_len() < USER_DATA_MAX_BASE64);
        assert_eq!(ud.base64_len(), ud.len().div_ceil(3) * 4);
    }

    #[test]
    fn oversized_and_malformed_input_are_errors() {
        let big = CloudConfig {
            write_files: vec![WriteFile {
                path: "/big".into(),
                permissions: "0600".into(),
                owner: None,
                content: "x\n".repeat(13_000),
            }],
            ..Default::default()
        };
        let err = big.render().unwrap_err().to_string();
        let text_len =
            "#cloud-config\nwrite_files:\n  - path: /big\n    permissions: \"0600\"\n    content: |\n".len()
                + 13_000 * "      x\n".len();
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
