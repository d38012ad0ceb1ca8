//! Faults that follow Aliyun's published error tables: `--run-error TYPE@ZONE=CODE` makes
//! `RunInstances` answer CODE with the HTTP status and message of Aliyun's table (the same
//! table the driver's classifier is tested against, [`crate::ecs::published_errors`]), and
//! `--initializing SECONDS` makes a new instance refuse `DeleteInstance` with
//! `IncorrectInstanceStatus.Initializing` for that long, as ECS does for an instance that is
//! still being created (DeleteInstance error table,
//! <https://www.alibabacloud.com/help/en/ecs/developer-reference/api-ecs-2014-05-26-deleteinstance>;
//! terraform-provider-alicloud retries the code in `alicloud/resource_alicloud_instance.go`).

use std::time::Duration;

use super::api::ApiError;
use super::instances::{now, Instance};
use super::Faults;

/// How long a new instance refuses deletion unless configured: a few seconds, like a real
/// instance that is still being set up, so every test that deletes a new instance meets it.
pub const DEFAULT_INITIALIZING: Duration = Duration::from_secs(2);

/// Splits and checks one `TYPE@ZONE=CODE`; the code must be in Aliyun's published table.
pub fn parse_run_error(s: &str) -> Result<(String, String), String> {
    let Some((pattern, code)) = s.rsplit_once('=') else {
        return Err(format!("`{s}` is not `TYPE@ZONE=CODE`"));
    };
    let (pattern, code) = (pattern.trim(), code.trim());
    if pattern.is_empty() {
        return Err(format!("`{s}` has no `TYPE@ZONE` before `=`"));
    }
    if crate::ecs::published_error(code).is_none() {
        return Err(format!(
            "`{code}` is not in the published RunInstances error table (tests/data/runinstances-errors.tsv)"
        ));
    }
    Ok((pattern.to_string(), code.to_string()))
}

/// Checks every `run-error` entry (the CLI and `POST /_emulator/faults`).
pub fn validate(f: &Faults) -> Result<(), String> {
    for e in &f.run_error {
        parse_run_error(e).map_err(|m| format!("`run-error`: {m}"))?;
    }
    Ok(())
}

/// The injected answer of `RunInstances` for `instance_type` in `zone`, if any.
pub(crate) fn run_error(f: &Faults, instance_type: &str, zone: &str) -> Option<ApiError> {
    f.run_error.iter().find_map(|e| {
        let (pattern, code) = parse_run_error(e).ok()?;
        if !Faults::pattern_matches(&pattern, instance_type, zone) {
            return None;
        }
        let row = crate::ecs::published_error(&code)?;
        Some(ApiError::new(row.http_status, row.code, row.message))
    })
}

/// `IncorrectInstanceStatus.Initializing` while `inst` is younger than its initializing time:
/// HTTP 403 with the message of the DeleteInstance error table (linked above), whose
/// description reads "The specified instance is being created. Please try again later."
pub(crate) fn check_initialized(inst: &Instance) -> Result<(), ApiError> {
    let age = (now() - inst.created).unsigned_abs();
    if age < inst.initializing {
        return Err(ApiError::new(
            403,
            "IncorrectInstanceStatus.Initializing",
            "The specified instance status does not support this operation.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_error_entries_are_checked_against_the_table() {
        assert_eq!(
            parse_run_error("ecs.c7.*@b=Zone.NotOnSale"),
            Ok(("ecs.c7.*@b".to_string(), "Zone.NotOnSale".to_string()))
        );
        assert!(parse_run_error("ecs.c7.large").unwrap_err().contains("TYPE@ZONE=CODE"));
        assert!(parse_run_error("*@*=Made.Up").unwrap_err().contains("`Made.Up` is not in the published"));
        let f = Faults {
            run_error: vec!["*@j=InvalidAccountStatus.NotEnoughBalance".into()],
            ..Faults::default()
        };
        let e = run_error(&f, "ecs.c7.large", "cn-hangzhou-j").unwrap();
        assert_eq!((e.status, e.code.as_str()), (403, "InvalidAccountStatus.NotEnoughBalance"));
        assert!(run_error(&f, "ecs.c7.large", "cn-hangzhou-k").is_none());
    }
}
