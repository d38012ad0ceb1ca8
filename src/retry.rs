//! The one retry loop: how often, how long between, and when to give up — for any operation,
//! any error type and any "retry this?" rule.
//!
//! Modelled on cargo's `src/cargo/util/network/retry.rs` (`Retry::try` answers "retry after N
//! ms" or "give up" and the caller sleeps; `with_retry` is the loop around it; a test switch
//! makes the sleeps fixed):
//!
//! - The **caller** says what is worth another attempt: a predicate over the whole outcome, so
//!   "not visible yet" answers can be retried as well as errors. Which ECS errors are
//!   retriable is written down in [`crate::ecs::retry`].
//! - The **policy** ([`RetryPolicy`]) says whether and when: at most
//!   [`RetryPolicy::max_attempts`] attempts in all, and no sleep that would end past
//!   [`RetryPolicy::max_elapsed`] since the first attempt (or, with
//!   [`RetryPolicy::finish_at_cap`], a last sleep shortened to end there). Between attempts a
//!   [`Backoff`]: fixed, growing, capped, with random jitter so concurrent jobs on one host do
//!   not retry in lockstep (<https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/>).
//! - [`RetryPolicy::start`] gives the bare verdicts ([`Verdict`]) to a caller that sleeps
//!   its own way; [`RetryPolicy::retry`] is the loop, sleeping on the policy's [`Clock`].
//!   When the policy gives up, the last outcome is returned as it was.
//!
//! Tests inject a [`FakeClock`] (sleeps advance virtual time and are recorded) and use
//! [`RetryPolicy::fixed`] for predictable sleeps, like cargo's fixed-sleep test switch.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;

/// Time as the retry loop sees it; injectable so tests neither sleep nor depend on timing.
pub trait Clock: Send + Sync + fmt::Debug {
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

/// The real clock whose sleeps end early once the flag is set (a SIGTERM or SIGINT arrived),
/// so a stage asked to stop does not sit out a pause.
#[derive(Debug, Clone)]
pub struct CancellableClock(pub Arc<AtomicBool>);

impl Clock for CancellableClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.0.load(Ordering::SeqCst) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
        }
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

/// How long to wait before each retry: `first × factor^(retry-1)`, at most `max`, then scaled
/// by a uniformly random factor in `jitter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The pause before the first retry (before jitter).
    pub first: Duration,
    /// Each pause is this many times the one before (1: always the same).
    pub factor: u32,
    /// The longest pause (before jitter).
    pub max: Duration,
    /// The random scale of each pause, `(low, high)`: `(1.0, 1.0)` none, `(0.0, 1.0)` full
    /// jitter, `(0.75, 1.25)` ±25 %.
    pub jitter: (f64, f64),
}

impl Backoff {
    /// Always `d`.
    pub const fn fixed(d: Duration) -> Self {
        Backoff { first: d, factor: 1, max: d, jitter: (1.0, 1.0) }
    }

    /// `first`, then `factor` times the pause before, at most `max`; no jitter.
    pub const fn exponential(first: Duration, factor: u32, max: Duration) -> Self {
        Backoff { first, factor, max, jitter: (1.0, 1.0) }
    }

    /// Full jitter: uniformly random in `[0, min(max, base × 2^(retry-1))]`.
    pub const fn full_jitter(base: Duration, max: Duration) -> Self {
        Backoff { first: base, factor: 2, max, jitter: (0.0, 1.0) }
    }

    /// The pause before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, &mut rand::thread_rng())
    }

    /// [`Backoff::delay`] drawing the jitter from `rng` (tests pass a seeded one).
    pub fn delay_with(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let grown = self.first.saturating_mul(self.factor.saturating_pow(retry.saturating_sub(1)));
        let upper = grown.min(self.max);
        let (low, high) = (self.jitter.0.max(0.0), self.jitter.1);
        let scale = if low < high { rng.gen_range(low..=high) } else { low };
        // Exact when there is no jitter (a float round trip could lose a nanosecond).
        if scale == 1.0 {
            upper
        } else {
            upper.mul_f64(scale)
        }
    }
}

/// How often an operation is tried and how long apart (see the module documentation).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub max_attempts: u32,
    /// No sleep may end later than this since the first attempt.
    pub max_elapsed: Duration,
    /// Sleeps between attempts.
    pub backoff: Backoff,
    /// When the next sleep would end past [`RetryPolicy::max_elapsed`]: give up (`false`), or
    /// shorten it to end there and make a last attempt then (`true`: "wait up to a timeout").
    pub finish_at_cap: bool,
    /// The clock that measures elapsed time and sleeps.
    pub clock: Arc<dyn Clock>,
}

impl Default for RetryPolicy {
    /// ECS calls: 6 attempts within 60 s, full jitter from 200 ms, at most 5 s per sleep.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            max_elapsed: Duration::from_secs(60),
            backoff: Backoff::full_jitter(Duration::from_millis(200), Duration::from_secs(5)),
            finish_at_cap: false,
            clock: Arc::new(SystemClock),
        }
    }
}

/// What the policy says after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Sleep this long, then try again.
    RetryAfter(Duration),
    /// The attempt or time budget is spent.
    GiveUp,
}

/// One operation's retries under a policy: counts attempts and measures time from its start.
#[derive(Debug)]
pub struct Retry<'p> {
    policy: &'p RetryPolicy,
    start: Instant,
    attempt: u32,
}

impl Retry<'_> {
    /// The 1-based number of the attempt being made.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The verdict after [`Retry::attempt`] failed in a way worth retrying; a `RetryAfter`
    /// moves on to the next attempt.
    pub fn after_failure(&mut self) -> Verdict {
        let p = self.policy;
        if self.attempt >= p.max_attempts.max(1) {
            return Verdict::GiveUp;
        }
        let mut delay = p.backoff.delay(self.attempt);
        let elapsed = p.clock.now().saturating_duration_since(self.start);
        if elapsed.saturating_add(delay) > p.max_elapsed {
            if !p.finish_at_cap || elapsed >= p.max_elapsed {
                return Verdict::GiveUp;
            }
            delay = p.max_elapsed - elapsed;
        }
        self.attempt += 1;
        Verdict::RetryAfter(delay)
    }
}

/// Passed to [`RetryPolicy::retry_noting`]'s hook before each sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retrying {
    /// The 1-based number of the attempt that failed.
    pub attempt: u32,
    /// The policy's attempts in all.
    pub max_attempts: u32,
    /// The sleep before the next attempt.
    pub delay: Duration,
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
            backoff: Backoff::fixed(delay),
            finish_at_cap: false,
            clock,
        }
    }

    /// `rounds` attempts on the real clock, however long they take.
    pub fn rounds(rounds: u32, backoff: Backoff) -> Self {
        RetryPolicy {
            max_attempts: rounds,
            max_elapsed: Duration::MAX,
            backoff,
            finish_at_cap: false,
            clock: Arc::new(SystemClock),
        }
    }

    /// As many attempts as `max_elapsed` allows, sleeping on `clock`.
    pub fn within(max_elapsed: Duration, backoff: Backoff, clock: Arc<dyn Clock>) -> Self {
        RetryPolicy { max_attempts: u32::MAX, max_elapsed, backoff, finish_at_cap: false, clock }
    }

    /// The sleep before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        self.backoff.delay(retry)
    }

    /// Starts one operation's retries; its time budget runs from now.
    pub fn start(&self) -> Retry<'_> {
        Retry { policy: self, start: self.clock.now(), attempt: 1 }
    }

    /// Runs `op` (given the 1-based attempt number) until `retry_this` refuses its outcome or
    /// the policy gives up; returns that last outcome.
    pub fn retry<T, E>(
        &self,
        op: impl FnMut(u32) -> Result<T, E>,
        retry_this: impl FnMut(&Result<T, E>) -> bool,
    ) -> Result<T, E> {
        self.retry_noting(op, retry_this, |_, _| {})
    }

    /// [`RetryPolicy::retry`], calling `before_retry` with the outcome before each sleep (the
    /// caller's log line).
    pub fn retry_noting<T, E>(
        &self,
        mut op: impl FnMut(u32) -> Result<T, E>,
        mut retry_this: impl FnMut(&Result<T, E>) -> bool,
        mut before_retry: impl FnMut(&Result<T, E>, Retrying),
    ) -> Result<T, E> {
        let mut retry = self.start();
        loop {
            let attempt = retry.attempt();
            let outcome = op(attempt);
            if !retry_this(&outcome) {
                return outcome;
            }
            match retry.after_failure() {
                Verdict::GiveUp => return outcome,
                Verdict::RetryAfter(delay) => {
                    before_retry(
                        &outcome,
                        Retrying { attempt, max_attempts: self.max_attempts.max(1), delay },
                    );
                    self.clock.sleep(delay);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Unlimited attempts within 10 s, `pause_secs` apart, on a fake clock.
    fn capped_at_ten_seconds(pause_secs: u64) -> (Arc<FakeClock>, RetryPolicy) {
        let clock = Arc::new(FakeClock::new());
        let pause = Backoff::fixed(Duration::from_secs(pause_secs));
        (clock.clone(), RetryPolicy::within(Duration::from_secs(10), pause, clock))
    }

    fn retriable(r: &Result<u32, &'static str>) -> bool {
        matches!(r, Err("busy"))
    }

    #[test]
    fn retries_what_the_predicate_accepts_then_succeeds() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy::fixed(5, Duration::from_millis(10), clock.clone());
        let mut noted = Vec::new();
        let r = p.retry_noting(
            |n| if n < 3 { Err("busy") } else { Ok(n) },
            retriable,
            |o, r| noted.push((*o, r)),
        );
        assert_eq!(r, Ok(3));
        assert_eq!(clock.sleeps(), vec![Duration::from_millis(10); 2]);
        let ten = Duration::from_millis(10);
        assert_eq!(
            noted,
            vec![
                (Err("busy"), Retrying { attempt: 1, max_attempts: 5, delay: ten }),
                (Err("busy"), Retrying { attempt: 2, max_attempts: 5, delay: ten }),
            ]
        );
    }

    #[test]
    fn what_the_predicate_refuses_is_returned_at_once() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy::fixed(5, Duration::from_secs(1), clock.clone());
        let mut calls = 0;
        let r = p.retry(
            |_| {
                calls += 1;
                Err("forbidden")
            },
            retriable,
        );
        assert_eq!((r, calls), (Err("forbidden"), 1));
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn a_successful_outcome_can_be_retried_too() {
        // "Not there yet" answers: retried while the predicate says so, the last one returned.
        let p = RetryPolicy::fixed(4, Duration::ZERO, Arc::new(FakeClock::new()));
        let mut calls = 0;
        let r: Result<Vec<u32>, ()> = p.retry(
            |_| {
                calls += 1;
                Ok(Vec::new())
            },
            |r| matches!(r, Ok(v) if v.is_empty()),
        );
        assert_eq!((r, calls), (Ok(Vec::new()), 4));
    }

    #[test]
    fn gives_up_after_max_attempts_with_the_last_outcome() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy::fixed(4, Duration::from_millis(1), clock.clone());
        let r = p.retry(Err, |r: &Result<(), u32>| r.is_err());
        assert_eq!(r, Err(4));
        assert_eq!(clock.sleeps().len(), 3);
        // Zero or one attempt in all means a single attempt.
        for max_attempts in [0, 1] {
            let p = RetryPolicy { max_attempts, ..p.clone() };
            assert_eq!(p.retry(Err, |r: &Result<(), u32>| r.is_err()), Err(1));
        }
    }

    #[test]
    fn gives_up_before_a_sleep_that_would_end_past_the_time_cap() {
        let (clock, p) = capped_at_ten_seconds(3);
        let r = p.retry(Err, |r: &Result<(), u32>| r.is_err());
        // Sleeps 0→3, 3→6, 6→9; a fourth (9→12) would pass the 10 s cap.
        assert_eq!(r, Err(4));
        assert_eq!(clock.sleeps(), vec![Duration::from_secs(3); 3]);
    }

    #[test]
    fn time_spent_in_attempts_counts_against_the_cap() {
        let (clock, p) = capped_at_ten_seconds(1);
        let r = p.retry(
            |n| {
                clock.advance(Duration::from_secs(4));
                Err(n)
            },
            |r: &Result<(), u32>| r.is_err(),
        );
        // Attempt 0→4, sleep →5, attempt →9, sleep →10 (ends at the cap: allowed), attempt
        // →14, whose sleep would end at 15, past the cap.
        assert_eq!(r, Err(3));
    }

    #[test]
    fn finish_at_cap_shortens_the_last_sleep_and_tries_once_more() {
        let (clock, p) = capped_at_ten_seconds(3);
        let p = RetryPolicy { finish_at_cap: true, ..p };
        assert_eq!(p.retry(Err, |r: &Result<(), u32>| r.is_err()), Err(5));
        let s = Duration::from_secs;
        assert_eq!(clock.sleeps(), vec![s(3), s(3), s(3), s(1)]);
    }

    #[test]
    fn the_stepper_leaves_the_sleeping_to_the_caller() {
        let clock = Arc::new(FakeClock::new());
        let p = RetryPolicy::fixed(3, Duration::from_millis(7), clock.clone());
        let mut retry = p.start();
        assert_eq!(retry.attempt(), 1);
        assert_eq!(retry.after_failure(), Verdict::RetryAfter(Duration::from_millis(7)));
        assert_eq!(retry.attempt(), 2);
        assert_eq!(retry.after_failure(), Verdict::RetryAfter(Duration::from_millis(7)));
        assert_eq!(retry.after_failure(), Verdict::GiveUp);
        assert!(clock.sleeps().is_empty());
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_its_cap() {
        let ms = Duration::from_millis;
        let b = Backoff::exponential(ms(500), 2, ms(5000));
        let got: Vec<_> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(got, [ms(500), ms(1000), ms(2000), ms(4000), ms(5000), ms(5000)]);
        let b = Backoff::exponential(ms(200), 4, ms(800));
        assert_eq!([b.delay(1), b.delay(2), b.delay(3)], [ms(200), ms(800), ms(800)]);
        assert_eq!(Backoff::fixed(ms(7)).delay(40), ms(7));
        // No overflow however many retries.
        assert_eq!(Backoff::exponential(ms(500), 2, ms(5000)).delay(u32::MAX), ms(5000));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut rng = StdRng::seed_from_u64(12);
        let ms = Duration::from_millis;
        let full = Backoff::full_jitter(ms(200), ms(1000));
        for retry in 1..=12 {
            let bound = ms(200 * (1u64 << (retry - 1))).min(ms(1000));
            for _ in 0..50 {
                assert!(full.delay_with(retry, &mut rng) <= bound, "retry {retry}");
            }
        }
        let spread = Backoff { jitter: (0.75, 1.25), ..Backoff::exponential(ms(500), 2, ms(5000)) };
        let draws: Vec<_> = (0..200).map(|_| spread.delay_with(3, &mut rng)).collect();
        assert!(draws.iter().all(|d| (ms(1500)..=ms(2500)).contains(d)), "{draws:?}");
        // Jitter really varies: concurrent jobs do not retry in lockstep.
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 100);
        // The same seed gives the same sleeps.
        let seeded = |seed| -> Vec<_> {
            let mut rng = StdRng::seed_from_u64(seed);
            (1..5).map(|n| full.delay_with(n, &mut rng)).collect()
        };
        assert_eq!(seeded(3), seeded(3));
    }
}
