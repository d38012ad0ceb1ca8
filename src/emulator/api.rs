//! The RPC API's request parameters and error answers, shared by every emulated service
//! (ECS, STS, RAM authorization) and the HTTP front.

use std::collections::BTreeMap;

use serde_json::Value;

/// Request parameters (query and form merged).
pub(crate) type Params = BTreeMap<String, String>;

/// An API error answered as `{"RequestId","HostId","Code","Message","Recommend"}`.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: &str) -> ApiError {
        ApiError { status, code: code.to_string(), message: message.to_string() }
    }

    pub(crate) fn missing(name: &str) -> ApiError {
        ApiError::new(
            400,
            "MissingParameter",
            &format!("The input parameter \"{name}\" that is mandatory for processing this request is not supplied."),
        )
    }

    pub(crate) fn invalid(code: &str, message: &str) -> ApiError {
        ApiError::new(400, code, message)
    }

    pub(crate) fn dry_run() -> ApiError {
        ApiError::new(400, "DryRunOperation", "Request validation has been passed with DryRun flag set.")
    }
}

/// An action's answer: the JSON body, or the error to answer.
pub(crate) type ApiResult = Result<Value, ApiError>;
