//! gitlab-runner's bash script writer, so that the stand-in hands `run` the scripts the real
//! runner writes.
//!
//! Followed: gitlab-runner v18.3.0-1857-gd79f3e7b8, `shells/bash.go` (`BashWriter`: `Variable`,
//! `SourceEnv`, `Command`, `IfCmd`, `Noticef`, `Warningf`, `Finish`), `shells/abstract.go`
//! (`exportVariables`, `writeCommands`, `guardRunnerCommand`, `writeCleanupScript`) and
//! `helpers/shell_escape.go` (`ShellEscape`), `helpers/ansi_colors.go` (the colours).

/// `helpers.ANSI_BOLD_GREEN`.
const ANSI_BOLD_GREEN: &str = "\x1b[32;1m";
/// `helpers.ANSI_YELLOW`.
const ANSI_YELLOW: &str = "\x1b[0;33m";
/// `helpers.ANSI_RESET`.
const ANSI_RESET: &str = "\x1b[0;m";

/// `gitlabEnvFileName` in `shells/abstract.go`: the file behind `GITLAB_ENV`.
pub const GITLAB_ENV_FILE: &str = "gitlab_runner_env";

/// `helpers.ShellEscape`: the input as is when every byte is a literal, otherwise `$'…'` with
/// control characters as ANSI-C escapes and every other byte outside the table (non-ASCII
/// included, byte by byte) as `\xNN`.
pub fn shell_escape(input: &str) -> String {
    if input.is_empty() {
        return "''".to_string();
    }
    let mut out = String::with_capacity(input.len() * 2);
    let mut escape = false;
    for &c in input.as_bytes() {
        let special = match c {
            0x07 => Some("\\a"),
            0x08 => Some("\\b"),
            b'\t' => Some("\\t"),
            b'\n' => Some("\\n"),
            0x0b => Some("\\v"),
            0x0c => Some("\\f"),
            b'\r' => Some("\\r"),
            b'\'' => Some("\\'"),
            b'\\' => Some("\\\\"),
            _ => None,
        };
        if let Some(s) = special {
            out.push_str(s);
            escape = true;
        } else if c.is_ascii_alphanumeric() || b",-./@_".contains(&c) {
            out.push(c as char);
        } else if b" !\"#$%&()*+:;<=>?[]^`{|}~".contains(&c) {
            out.push(c as char);
            escape = true;
        } else {
            out.push_str(&format!("\\x{c:02x}"));
            escape = true;
        }
    }
    if escape {
        format!("$'{out}'")
    } else {
        out
    }
}

/// Go's `%q` for the paths gitlab-runner formats with it (`strconv.Quote`).
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A job variable as the script writer sees it.
#[derive(Debug, Clone)]
pub struct Variable {
    /// The name.
    pub key: String,
    /// The value (a file variable's content).
    pub value: String,
    /// A file-type variable: written to a file under the temporary project directory and
    /// exported as that file's path.
    pub file: bool,
}

/// `BashWriter`: the body of one stage script.
pub struct BashWriter {
    buf: String,
    indent: usize,
    /// `TemporaryPath`: `<CI_PROJECT_DIR>.tmp` (`Build.TmpProjectDir`).
    tmp_dir: String,
}

impl BashWriter {
    /// A writer for a build whose project directory is `project_dir`.
    pub fn new(project_dir: &str) -> BashWriter {
        BashWriter { buf: String::new(), indent: 0, tmp_dir: format!("{project_dir}.tmp") }
    }

    /// `Line`.
    pub fn line(&mut self, text: &str) {
        self.buf.push_str(&"  ".repeat(self.indent));
        self.buf.push_str(text);
        self.buf.push('\n');
    }

    /// `TmpFile`: a path under the temporary project directory.
    pub fn tmp_file(&self, name: &str) -> String {
        let p = format!("{}/{name}", self.tmp_dir);
        if p.starts_with('/') {
            p
        } else {
            format!("$PWD/{p}")
        }
    }

    /// `Command`: a command line with every word escaped.
    pub fn command(&mut self, words: &[&str]) {
        let line = words.iter().map(|w| shell_escape(w)).collect::<Vec<_>>().join(" ");
        self.line(&line);
    }

    /// `RmFile` (`CommandArgExpand("rm", "-f", path)`: the path double-quoted).
    pub fn rm_file(&mut self, path: &str) {
        self.line(&format!("rm \"-f\" \"{path}\""));
    }

    /// `Cd`.
    pub fn cd(&mut self, dir: &str) {
        self.command(&["cd", dir]);
    }

    /// `Noticef`.
    pub fn notice(&mut self, text: &str) {
        self.line(&format!("echo {}", shell_escape(&format!("{ANSI_BOLD_GREEN}{text}{ANSI_RESET}"))));
    }

    /// `Warningf`.
    pub fn warning(&mut self, text: &str) {
        self.line(&format!("echo {}", shell_escape(&format!("{ANSI_YELLOW}{text}{ANSI_RESET}"))));
    }

    /// `Variable`.
    pub fn variable(&mut self, v: &Variable) {
        if v.file {
            let path = self.tmp_file(&v.key);
            self.line(&format!("mkdir -p {}", go_quote(&self.tmp_dir)));
            self.line(&format!("printf '%s' {} > {}", shell_escape(&v.value), go_quote(&path)));
            self.line(&format!("export {}={}", shell_escape(&v.key), go_quote(&path)));
        } else {
            self.line(&format!("export {}={}", shell_escape(&v.key), shell_escape(&v.value)));
        }
    }

    /// `exportVariables`: every variable, then `GITLAB_ENV` and the sourcing of its file.
    /// With `env_only` (the cleanup stage), file variables are exported as their path only.
    pub fn export_variables(&mut self, variables: &[Variable], env_only: bool) {
        for v in variables {
            if env_only && v.file {
                let path = self.tmp_file(&v.key);
                self.variable(&Variable { key: v.key.clone(), value: path, file: false });
            } else {
                self.variable(v);
            }
        }
        let env_file = self.tmp_file(GITLAB_ENV_FILE);
        self.variable(&Variable { key: "GITLAB_ENV".into(), value: env_file.clone(), file: false });
        // `SourceEnv`.
        self.line(&format!("mkdir -p {}", go_quote(&self.tmp_dir)));
        self.line(&format!("touch {}", go_quote(&env_file)));
        self.line(&format!("while read -r line; do export \"$line\"; done < {}", go_quote(&env_file)));
    }

    /// `writeCommands`: each command after its `$ command` echo line; a multi-line command is
    /// announced by its first line (`# collapsed multi-line command`).
    pub fn commands(&mut self, commands: &[String]) {
        for command in commands {
            let command = command.trim();
            if command.is_empty() {
                self.line("echo");
            } else if let Some((first, _)) = command.split_once('\n') {
                self.notice(&format!("$ {first} # collapsed multi-line command"));
            } else {
                self.notice(&format!("$ {command}"));
            }
            self.line(command);
        }
    }

    /// `guardRunnerCommand`: `body` runs only when `runner --version` works; otherwise the
    /// stage says "Missing `<runner>`. `<action>` is disabled." and passes.
    pub fn guard_runner_command(&mut self, runner: &str, action: &str, body: impl FnOnce(&mut BashWriter)) {
        // `IfCmd`.
        self.line(&format!(
            "if {} >/dev/null 2>&1 ; then",
            [runner, "--version"].map(shell_escape).join(" ")
        ));
        self.indent += 1;
        body(self);
        self.indent -= 1;
        self.line("else");
        self.indent += 1;
        self.warning(&format!("Missing {runner}. {action} is disabled."));
        self.indent -= 1;
        self.line("fi");
    }

    /// `IfCmdWithOutput` … `Else` … `EndIf` with a notice for each branch, as the cache
    /// helper calls are written (`addExtractCacheCommand`, `addCacheUploadCommand`).
    pub fn if_cmd_with_output(&mut self, words: &[&str], ok: &str, failed: &str) {
        let cmd = words.iter().map(|w| shell_escape(w)).collect::<Vec<_>>().join(" ");
        self.line(&format!("if {cmd} ; then"));
        self.indent += 1;
        self.notice(ok);
        self.indent -= 1;
        self.line("else");
        self.indent += 1;
        self.warning(failed);
        self.indent -= 1;
        self.line("fi");
    }

    /// The body written so far.
    pub fn body(&self) -> &str {
        &self.buf
    }

    /// `Finish(trace=false)`: the shebang for `shell`, the TERM trap, errexit and pipefail,
    /// and the body evaluated in a subshell with stdin from `/dev/null`.
    pub fn finish(&self, shell: &str) -> String {
        let mut out = String::new();
        if !shell.is_empty() {
            out.push_str(&format!("#!/usr/bin/env {shell}\n\n"));
        }
        out.push_str("trap 'exit 1' TERM\n\n");
        out.push_str("case \"$(set -o)\" in *\"pipefail\"*) set -o pipefail;; esac; set -o errexit\n");
        out.push_str("set +o noclobber\n");
        out.push_str(&format!("(trap 'exit 1' TERM; eval {}) < /dev/null\n", shell_escape(&self.buf)));
        out.push_str("exit 0\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_escape_matches_gitlab_runners_table() {
        // Literals pass as they are; anything else is `$'…'` quoted, non-ASCII byte by byte.
        assert_eq!(shell_escape(""), "''");
        assert_eq!(shell_escape("abc-1.2/x_y@z,"), "abc-1.2/x_y@z,");
        assert_eq!(shell_escape("a b"), "$'a b'");
        assert_eq!(shell_escape("it's"), "$'it\\'s'");
        assert_eq!(shell_escape("\x1b[0;m"), "$'\\x1b[0;m'");
        assert_eq!(shell_escape("中"), "$'\\xe4\\xb8\\xad'");
        assert_eq!(shell_escape("a\nb\\"), "$'a\\nb\\\\'");
    }

    #[test]
    fn a_written_script_runs_in_bash_with_its_values_intact() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("p").display().to_string();
        let mut w = BashWriter::new(&project);
        let vars = [
            Variable { key: "PLAIN".into(), value: "naïve 中文 $HOME `x` 'q' \\".into(), file: false },
            Variable { key: "CERT".into(), value: "line1\nline2 ✓\n".into(), file: true },
        ];
        w.export_variables(&vars, false);
        w.commands(&["printf '%s|' \"$PLAIN\"; cat \"$CERT\"; echo \"$GITLAB_ENV\"".to_string()]);
        let p = dir.path().join("s");
        std::fs::write(&p, w.finish("bash")).unwrap();
        let out = std::process::Command::new("bash").arg(&p).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            stdout.ends_with(&format!(
                "naïve 中文 $HOME `x` 'q' \\|line1\nline2 ✓\n{project}.tmp/{GITLAB_ENV_FILE}\n"
            )),
            "{stdout}"
        );
        assert!(stdout.starts_with("\x1b[32;1m$ printf"), "{stdout}");
        assert_eq!(std::fs::read_to_string(format!("{project}.tmp/CERT")).unwrap(), "line1\nline2 ✓\n");
    }
}
