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
//!   it is not started). The last error is returned.
//! - **How long between**: exponential backoff with full jitter — before retry *n* (1-based)
//!   sleep a uniformly random time in `[0, min(max_delay, base × 2^(n-1))]` (base 200 ms, cap
//!   5 s by default), so concurrent runners on one host do not retry in lockstep.
//! - **Creating instances**: `RunInstances` is retried like any other call only because its
//!   `ClientToken` is mandatory (the request type refuses an empty one): Aliyun answers a
//!   repeated token with the instance it already created, so a retry after a timeout never
//!   creates a second one.
//! - Every retry logs one `warn` line with the action, the attempt, the error code and the
//!   `RequestId` — never parameters or credentials. Each attempt is signed afresh (new nonce
//!   and timestamp), which the caller's closure does.
//!
//! Tests inject a [`Clock`] ([`FakeClock`]: sleeps advance virtual time and are recorded) and
//! can use [`Backoff::Fixed`] for predictable sleeps, like cargo's test switch for fixed sleeps.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

use super::error::EcsError;

/// Time as the retry loop sees it; injectable so tests neither sleep nor depend on timing.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
    /// Waits `d`.
    fn sleep(&self, d: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// A clock for tests: `sleep` returns at once, advances `now` by the duration and records it.
#[derive(Debug)]
pub struct FakeClock {
    start: Instant,
    state: Mutex<(Duration, Vec<Duration>)>,
}

impl FakeClock {
    /// A fake clock starting now.
    pub fn new() -> Self {
        FakeClock { start: Instant::now(), state: Mutex::new((Duration::ZERO, Vec::new())) }
    }

    /// Every sleep asked for so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.state.lock().map(|s| s.1.clone()).unwrap_or_default()
    }

    /// Moves virtual time forward without recording a sleep (e.g. a slow request).
    pub fn advance(&self, d: Duration) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += d;
        }
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.start + self.state.lock().map(|s| s.0).unwrap_or_default()
    }
    fn sleep(&self, d: Duration) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += d;
            s.1.push(d);
        }
    }
}

/// How long to wait before each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Backoff {
    /// Full jitter: uniformly random in `[0, min(max, base × 2^(retry-1))]`.
    ExponentialJitter {
        /// The first retry's upper bound.
        base: Duration,
        /// The upper bound of any single sleep.
        max: Duration,
    },
    /// Always the same (tests; `Duration::ZERO` for no sleeps at all).
    Fixed(Duration),
}

/// When and how ECS calls are retried (see the module documentation).
#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// No retry starts after this much time since the first attempt.
    pub max_elapsed: Duration,
    /// Sleeps between attempts.
    pub backoff: Backoff,
    /// The clock that measures elapsed time and sleeps.
    pub clock: Arc<dyn Clock>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("max_elapsed", &self.max_elapsed)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    /// 6 attempts within 60 s, backoff base 200 ms, at most 5 s per sleep.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            max_elapsed: Duration::from_secs(60),
            backoff: Backoff::ExponentialJitter {
                base: Duration::from_millis(200),
                max: Duration::from_secs(5),
            },
            clock: Arc::new(SystemClock),
        }
    }
}

impl RetryPolicy {
    /// Never retries.
    pub fn none() -> Self {
        RetryPolicy { max_attempts: 1, ..Self::default() }
    }

    /// For tests: `max_attempts` attempts, fixed sleeps of `delay` on `clock`.
    pub fn fixed(max_attempts: u32, delay: Duration, clock: Arc<dyn Clock>) -> Self {
        RetryPolicy {
            max_attempts,
            max_elapsed: Duration::from_secs(3600),
            backoff: Backoff::Fixed(delay),
            clock,
        }
    }

    /// The sleep before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        match self.backoff {
            Backoff::Fixed(d) => d,
            Backoff::ExponentialJitter { base, max } => {
                let exp = retry.saturating_sub(1).min(20);
                let upper = base.saturating_mul(1u32 << exp).min(max);
                if upper.is_zero() {
                    return Duration::ZERO;
                }
                let nanos = rand::thread_rng().gen_range(0..=upper.as_nanos().min(u64::MAX as u128) as u64);
                Duration::from_nanos(nanos)
            }
        }
    }

    /// Runs `op` (given the 1-based attempt number) until it succeeds, fails fatally, or the
    /// policy's attempt or time budget is spent; returns the last error then.
    pub fn run<T>(
        &self,
        action: &str,
        mut op: impl FnMut(u32) -> Result<T, EcsError>,
    ) -> Result<T, EcsError> {
        let start = self.clock.now();
        let max_attempts = self.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let err = match op(attempt) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if !err.is_retriable() || attempt >= max_attempts {
                return Err(err);
            }
            let delay = self.delay(attempt);
            let elapsed = self.clock.now().saturating_duration_since(start);
            if elapsed + delay > self.max_elapsed {
                return Err(err);
            }
            log::warn!(
                "ECS `{action}` attempt {attempt}/{max_attempts} failed ({}); retrying in {} ms",
                describe_for_log(&err),
                delay.as_millis()
            );
            self.clock.sleep(delay);
            attempt += 1;
        }
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
    fn gives_up_when_the_time_budget_is_spent() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy {
            max_attempts: 100,
            max_elapsed: Duration::from_secs(10),
            backoff: Backoff::Fixed(Duration::from_secs(3)),
            clock: clock.clone(),
        };
        let mut calls = 0;
        let r: Result<(), _> = p.run("X", |_| {
            calls += 1;
            Err(api("ServiceUnavailable", 503))
        });
        assert!(r.is_err());
        // Sleeps at 0→3, 3→6, 6→9; a fourth (9→12) would pass the 10 s budget.
        assert_eq!(calls, 4);
        assert_eq!(clock.sleeps().len(), 3);
    }

    #[test]
    fn jittered_sleeps_stay_under_the_exponential_bound_and_the_cap() {
        let p = RetryPolicy {
            backoff: Backoff::ExponentialJitter {
                base: Duration::from_millis(200),
                max: Duration::from_secs(1),
            },
            ..RetryPolicy::default()
        };
        for retry in 1..=12 {
            let bound = Duration::from_millis(200 * (1u64 << (retry - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(p.delay(retry) <= bound, "retry {retry}");
            }
        }
        // Full jitter really varies (the chance of 50 equal draws is nil).
        let draws: std::collections::BTreeSet<_> = (0..50).map(|_| p.delay(3)).collect();
        assert!(draws.len() > 1);
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
