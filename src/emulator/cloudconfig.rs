//! The part of cloud-init's `#cloud-config` that decides who can log in to an instance:
//! `ssh_authorized_keys` (a list) and `ssh_keys` (host keys, often as `|` block scalars).
//!
//! Why our own parser: the emulator only needs this small, well-defined subset, and a YAML
//! dependency would be heavier than the 100 lines below. Everything else (`write_files`,
//! `runcmd`, …) is skipped. Malformed input never panics; unknown shapes are ignored.

use std::collections::BTreeMap;

use crate::secret::Secret;

/// What the emulator reads from the user data.
#[derive(Debug, Default)]
pub(crate) struct CloudConfig {
    /// Public keys allowed to log in.
    pub authorized_keys: Vec<String>,
    /// `ssh_keys` entries (`ed25519_private`, `ed25519_public`, …).
    pub ssh_keys: BTreeMap<String, Secret<String>>,
}

impl CloudConfig {
    /// The ed25519 private host key, if given.
    pub fn ed25519_private(&self) -> Option<&Secret<String>> {
        self.ssh_keys.get("ed25519_private")
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2
        && ((s.starts_with('"') && s.ends_with('"')) || (s.starts_with('\'') && s.ends_with('\'')))
    {
        s[1..s.len() - 1].to_string()
    } else {
        s.to_string()
    }
}

/// Splits `key: value` (value may be empty).
fn key_value(s: &str) -> Option<(&str, &str)> {
    let (k, v) = s.split_once(':')?;
    if k.is_empty() || k.contains(' ') {
        return None;
    }
    Some((k, v.trim()))
}

/// Parses a flow sequence `[a, "b"]` (no nesting, no commas inside items).
fn flow_list(v: &str) -> Vec<String> {
    v.trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(unquote)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Parses user data; `None` when it is not a `#cloud-config` document.
pub(crate) fn parse(user_data: &str) -> Option<CloudConfig> {
    let mut lines = user_data.lines().map(|l| l.trim_end_matches('\r')).peekable();
    let first = lines.peek()?;
    if !first.trim_start_matches('\u{feff}').starts_with("#cloud-config") {
        return None;
    }
    let lines: Vec<&str> = lines.collect();
    let mut cfg = CloudConfig::default();
    let mut i = 1;
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() || line.trim_start().starts_with('#') || indent_of(line) > 0 {
            i += 1;
            continue;
        }
        let Some((key, value)) = key_value(line) else {
            i += 1;
            continue;
        };
        // The block of this key: following lines that are indented, or list items at column 0.
        let mut end = i + 1;
        while end < lines.len() {
            let l = lines[end];
            if l.trim().is_empty() || indent_of(l) > 0 || l.starts_with("- ") || l == "-" {
                end += 1;
            } else {
                break;
            }
        }
        let block = &lines[i + 1..end];
        match key {
            "ssh_authorized_keys" => {
                if value.starts_with('[') {
                    cfg.authorized_keys.extend(flow_list(value));
                } else {
                    for l in block {
                        if let Some(item) = l.trim_start().strip_prefix('-') {
                            let item = unquote(item);
                            if !item.is_empty() {
                                cfg.authorized_keys.push(item);
                            }
                        }
                    }
                }
            }
            "ssh_keys" => parse_map_of_scalars(block, &mut cfg.ssh_keys),
            _ => {}
        }
        i = end;
    }
    Some(cfg)
}

/// Parses a map whose values are plain scalars or `|` / `|-` block scalars.
fn parse_map_of_scalars(block: &[&str], out: &mut BTreeMap<String, Secret<String>>) {
    let Some(map_indent) = block.iter().find(|l| !l.trim().is_empty()).map(|l| indent_of(l)) else {
        return;
    };
    let mut j = 0;
    while j < block.len() {
        let l = block[j];
        if l.trim().is_empty() || indent_of(l) != map_indent {
            j += 1;
            continue;
        }
        let Some((k, v)) = key_value(l.trim_start()) else {
            j += 1;
            continue;
        };
        j += 1;
        if v.starts_with('|') || v.starts_with('>') {
            let keep_final_newline = !v.ends_with('-');
            let start = j;
            while j < block.len() && (block[j].trim().is_empty() || indent_of(block[j]) > map_indent) {
                j += 1;
            }
            let body = &block[start..j];
            let content_indent =
                body.iter().find(|l| !l.trim().is_empty()).map(|l| indent_of(l)).unwrap_or(0);
            let mut text = String::new();
            for b in body {
                text.push_str(b.get(content_indent..).unwrap_or(""));
                text.push('\n');
            }
            let mut text = text.trim_end_matches('\n').to_string();
            if keep_final_newline {
                text.push('\n');
            }
            out.insert(k.to_string(), Secret::new(text));
        } else {
            out.insert(k.to_string(), Secret::new(unquote(v)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "#cloud-config\n\
ssh_authorized_keys:\n  - ssh-ed25519 AAAAC3Nza client@job\n  - \"ssh-ed25519 BBBB other\"\n\
ssh_keys:\n  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n    abc\n    def\n    -----END OPENSSH PRIVATE KEY-----\n  ed25519_public: ssh-ed25519 CCCC host\n\
write_files:\n- path: /x\n  content: |\n    ssh_keys: nope\nruncmd: [a, b]\n";

    #[test]
    fn reads_keys_and_block_scalars() {
        let c = parse(DOC).unwrap();
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
        let c = parse("#cloud-config\n:\n  - \nssh_keys: |\nssh_authorized_keys: [\"k1\", k2]\n").unwrap();
        assert_eq!(c.authorized_keys, ["k1", "k2"]);
    }
}
