//! What ECS accepts as an instance's `HostName` and `InstanceName` (`RunInstances`): the one
//! definition the configuration validator and the emulator both use.
//!
//! Sources:
//! - the `host_name` and `instance_name` docstrings of `RunInstancesRequest` in Aliyun's
//!   current Python SDK, `alibabacloud-ecs20140526` 7.11.8
//!   (`alibabacloud_ecs20140526/models/_run_instances_request.py`);
//! - the RunInstances API reference as published in github.com/AlibabaCloudDocs/ecs at
//!   322eaab82e866a494eeaddb0de02bab1978692d1 (`intl.en-US/API Reference/Instances/RunInstances.md`):
//!   the same `HostName` rules; for `InstanceName` also "It must start with a letter and cannot
//!   start with `http://` or `https://`" (which the SDK docstring no longer says; the stricter
//!   reading is kept); and the error codes `InvalidHostName.Malformed` and
//!   `InvalidInstanceName.Malformed` (HTTP 400), rows of `tests/data/runinstances-errors.tsv`.
//!
//! `HostName` (Linux and other non-Windows images, the only ones this executor boots): 2 to 64
//! characters; segments separated by periods, each of letters, digits and hyphens; it "cannot
//! start or end with a period (.) or a hyphen (-), and cannot contain consecutive periods (.)
//! or hyphens (-)". Two of those characters side by side (`--`, `..`, `.-`, `-.`) are read as
//! consecutive: what ECS might accept of them is not worth a failed job. Not modelled: the
//! Windows limits (15 characters, no periods), the `${instance_id}` placeholder and the batch
//! syntax `name[begin,bits]` for several instances at once, which this executor never sends.
//!
//! `InstanceName`: 2 to 128 characters; letters and digits (Unicode), `:`, `_`, `.` and `-`;
//! starting with a letter (so never with `http://` or `https://`).

/// Why ECS refuses `name` as a `HostName`, if it does.
pub fn host_name_problem(name: &str) -> Option<&'static str> {
    let dot_or_hyphen = |c: char| c == '.' || c == '-';
    if !(2..=64).contains(&name.chars().count()) {
        Some("a host name has 2 to 64 characters")
    } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || dot_or_hyphen(c)) {
        Some("a host name has only letters, digits, `.` and `-`")
    } else if name.starts_with(dot_or_hyphen) || name.ends_with(dot_or_hyphen) {
        Some("a host name cannot start or end with `.` or `-`")
    } else if name.as_bytes().windows(2).any(|w| dot_or_hyphen(w[0] as char) && dot_or_hyphen(w[1] as char)) {
        Some("a host name cannot hold consecutive `.` or `-`")
    } else {
        None
    }
}

/// Why ECS refuses `name` as an `InstanceName`, if it does.
pub fn instance_name_problem(name: &str) -> Option<&'static str> {
    if !(2..=128).contains(&name.chars().count()) {
        Some("an instance name has 2 to 128 characters")
    } else if !name.starts_with(char::is_alphabetic) {
        Some("an instance name starts with a letter")
    } else if !name.chars().all(|c| c.is_alphanumeric() || matches!(c, ':' | '_' | '.' | '-')) {
        Some("an instance name has only letters, digits, `:`, `_`, `.` and `-`")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["ci-runner-amd64-spot-20260101000000", "ab", "a.b-c.d", "web01", &"a".repeat(64)] {
            assert_eq!(host_name_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("a", "2 to 64"),
            (&"a".repeat(65), "2 to 64"),
            ("ci--runner", "consecutive"),
            ("ci..runner", "consecutive"),
            ("ci.-runner", "consecutive"),
            ("-ci", "start or end"),
            ("ci.", "start or end"),
            ("ci_runner", "only letters"),
            ("ci runner", "only letters"),
            ("k8s-${instance_id}", "only letters"),
        ] {
            let got = host_name_problem(bad).unwrap_or_else(|| panic!("{bad} passed"));
            assert!(got.contains(why), "{bad}: {got}");
        }
    }

    #[test]
    fn instance_names() {
        for ok in ["ci-runner-amd64-spot-20260101000000", "a:b_c.d-e", "ci--runner", "实例a", "ab"] {
            assert_eq!(instance_name_problem(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("a", "2 to 128"),
            (&"a".repeat(129), "2 to 128"),
            ("1ci", "starts with a letter"),
            ("-ci", "starts with a letter"),
            ("http://x", "only letters"),
            ("ci runner", "only letters"),
            ("ci/runner", "only letters"),
        ] {
            let got = instance_name_problem(bad).unwrap_or_else(|| panic!("{bad} passed"));
            assert!(got.contains(why), "{bad}: {got}");
        }
    }
}
