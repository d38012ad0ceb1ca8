//! The retry policy of ECS calls, written down.
//!
//! Why a policy and not ad-hoc loops: Aliyun throttles bursts (`Throttling*`) and has the odd
//! 5xx, and a CI job should not fail for that; but retrying an authentication or parameter
//! error only delays the one clear error line the administrator needs. So:
//!
//! - **Retried**: throttling (any code containing `Throttling`, e.g. `Rejected.Throttling`, and
//!   HTTP 429), server errors (`ServiceUnavailable`, `InternalError`, `UnknownError`, any 5xx),
//!   a request with the same `ClientToken` still being processed (`LastTokenProcessing`,
//!   `IdempotentProcessing`), and failures to get an answer that may pass (connection refused
//!   or reset, timeouts). The codes come from Aliyun's error tables, checked row by row against
//!   `tests/data/runinstances-errors.tsv`. See [`super::EcsError::is_retriable`].
//! - **Fatal at once**: everything else — authentication, permission, quota, parameters,
//!   capacity (the caller moves to the next offer instead), not found, DNS and TLS failures.
//! - **How often**: at most [`RetryPolicy::max_attempts`] attempts in all, and no new attempt
//!   once [`RetryPolicy::max_elapsed`] has passed since the first (a sleep that would end past
//!   it is not started). The last error is returned. The loop itself is the crate's one
//!   ([`crate::retry`]); this module says which ECS errors it retries and what it logs.
//! - **How long between**: exponential backoff with full jitter — before retry *n* (1-based)
//!   sleep a uniformly random time in `[0, min(max_delay, base × 2^(n-1))]` (base 200 ms, cap
//!   5 s by default, [`RetryPolicy::default`]), so concurrent runners on one host do not
//!   retry in lockstep.
//! - **Creating instances**: `RunInstances` is retried like any other call only because its
//!   `ClientToken` is mandatory (the request type refuses an empty one): Aliyun answers a
//!   repeated token with the instance it already created, so a retry after a timeout never
//!   creates a second one.
//! - Every retry logs one `warn` line with the action, the attempt, the error code and the
//!   `RequestId` — never parameters or credentials. Each attempt is signed afresh (new nonce
//!   and timestamp), which the caller's closure does.
//!
//! Tests inject a [`FakeClock`] and use [`RetryPolicy::fixed`] for predictable sleeps.

pub use crate::retry::{Backoff, Clock, FakeClock, RetryPolicy, SystemClock};

use super::error::EcsError;

impl RetryPolicy {
    /// Runs the ECS call `op` (given the 1-based attempt number) until it succeeds, fails
    /// fatally ([`EcsError::is_retriable`]), or the policy's attempt or time budget is spent;
    /// returns the last error then.
    pub fn run<T>(&self, action: &str, op: impl FnMut(u32) -> Result<T, EcsError>) -> Result<T, EcsError> {
        self.retry_noting(
            op,
            |r| matches!(r, Err(e) if e.is_retriable()),
            |r, at| {
                if let Err(err) = r {
                    log::warn!(
                        "ECS `{action}` attempt {}/{} failed ({}); retrying in {} ms",
                        at.attempt,
                        at.max_attempts,
                        describe_for_log(err),
                        at.delay.as_millis()
                    );
                }
            },
        )
    }
}

/// The code and `RequestId` (or the transport message) of a retriable error, for the log.
fn describe_for_log(err: &EcsError) -> String {
    match err {
        EcsError::Api { code, request_id, http_status, .. } => {
            format!("{code}, HTTP {http_status}, RequestId: {}", request_id.as_deref().unwrap_or("none"))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn api(code: &str, status: u16) -> EcsError {
        EcsError::Api {
            action: "DescribeRegions".into(),
            code: code.into(),
            message: "m".into(),
            request_id: Some("R".into()),
            http_status: status,
        }
    }

    #[test]
    fn the_default_policy_is_the_documented_one() {
        let p = RetryPolicy::default();
        let ms = Duration::from_millis;
        assert_eq!((p.max_attempts, p.max_elapsed), (6, Duration::from_secs(60)));
        assert_eq!(p.backoff, Backoff { first: ms(200), factor: 2, max: ms(5000), jitter: (0.0, 1.0) });
    }

    #[test]
    fn retries_retriable_errors_then_succeeds() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy::fixed(5, Duration::from_millis(10), clock.clone());
        let mut calls = 0;
        let r = p.run("DescribeRegions", |n| {
            calls += 1;
            assert_eq!(n, calls);
            if n < 3 {
                Err(api("Throttling.User", 400))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r, Ok(3));
        assert_eq!(clock.sleeps(), vec![Duration::from_millis(10); 2]);
    }

    #[test]
    fn fatal_errors_are_not_retried() {
        let p = RetryPolicy::fixed(5, Duration::ZERO, Arc::new(FakeClock::new()));
        let mut calls = 0;
        let r: Result<(), _> = p.run("X", |_| {
            calls += 1;
            Err(api("Forbidden.RAM", 403))
        });
        assert_eq!(r.unwrap_err().code(), Some("Forbidden.RAM"));
        assert_eq!(calls, 1);
    }

    #[test]
    fn gives_up_after_max_attempts_with_the_last_error() {
        let p = RetryPolicy::fixed(4, Duration::ZERO, Arc::new(FakeClock::new()));
        let mut calls = 0;
        let r: Result<(), _> = p.run("X", |n| {
            calls += 1;
            Err(api(&format!("InternalError{}", if n == 4 { "" } else { ".Early" }), 500))
        });
        assert_eq!(calls, 4);
        assert_eq!(r.unwrap_err().code(), Some("InternalError"));
    }

    #[test]
    fn non_retriable_transport_errors_stop_at_once() {
        let p = RetryPolicy::fixed(5, Duration::ZERO, Arc::new(FakeClock::new()));
        let mut calls = 0;
        let r: Result<(), _> = p.run("X", |_| {
            calls += 1;
            Err(EcsError::Transport { action: "X".into(), message: "dns".into(), retriable: calls > 10 })
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
