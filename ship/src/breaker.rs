//! Retries with backoff, and a circuit breaker, for one downstream (the archive).
//!
//! After a failure the next attempt waits `base × 2^(failures-1)`, capped, with full
//! jitter (a random point in the upper half of the delay) so a fleet recovering from
//! the same outage does not retry in step. After `open_after` failures in a row the
//! breaker opens: no attempt for `open_for`, then one trial attempt (half-open) whose
//! outcome closes it or opens it again. Each opening is counted
//! (`oc_circuit_open_total{downstream}`).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub open_after: u32,
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            open_after: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    failures: u32,
    next_attempt: Option<Instant>,
    opened_total: u64,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            failures: 0,
            next_attempt: None,
            opened_total: 0,
        }
    }

    /// Whether an attempt may be made now.
    pub fn allows(&self, now: Instant) -> bool {
        self.next_attempt.is_none_or(|at| now >= at)
    }

    pub fn is_open(&self) -> bool {
        self.failures >= self.policy.open_after
    }

    pub fn opened_total(&self) -> u64 {
        self.opened_total
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next_attempt = None;
    }

    pub fn failed(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let wait = if self.failures >= self.policy.open_after {
            // A failed trial re-opens it too; every opening counts.
            self.opened_total += 1;
            self.policy.open_for
        } else {
            let exp = self
                .policy
                .base_delay
                .saturating_mul(1 << (self.failures - 1).min(20));
            let capped = exp.min(self.policy.max_delay);
            capped.mul_f64(0.5 + fastrand::f64() * 0.5)
        };
        self.next_attempt = Some(now + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_then_opens_then_closes_on_success() {
        let policy = BreakerPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
            open_after: 4,
            open_for: Duration::from_secs(10),
        };
        let mut b = Breaker::new(policy);
        let t0 = Instant::now();
        assert!(b.allows(t0));
        b.failed(t0);
        assert!(!b.allows(t0));
        assert!(b.allows(t0 + Duration::from_millis(100)));
        b.failed(t0);
        b.failed(t0);
        // Third failure: 400 ms capped at 300, jittered into [150, 300].
        assert!(!b.allows(t0 + Duration::from_millis(149)));
        assert!(b.allows(t0 + Duration::from_millis(300)));
        assert!(!b.is_open());
        b.failed(t0);
        assert!(b.is_open());
        assert_eq!(b.opened_total(), 1);
        assert!(!b.allows(t0 + Duration::from_secs(9)));
        assert!(b.allows(t0 + Duration::from_secs(10)));
        // The trial fails: open again, counted again.
        b.failed(t0 + Duration::from_secs(10));
        assert_eq!(b.opened_total(), 2);
        assert!(!b.allows(t0 + Duration::from_secs(19)));
        b.succeeded();
        assert!(!b.is_open());
        assert!(b.allows(t0));
    }
}
