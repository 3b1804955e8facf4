//! When a shard checkpoints: once its state has differed from its newest checkpoint for
//! `interval` (default hourly), or sooner once the log has grown by `wal_bytes` since the
//! last checkpoint, whichever comes first. After each checkpoint, log segments every kept
//! checkpoint covers are released (recycled).
//!
//! Rules that must stay true:
//! - An idle shard (state equal to its newest checkpoint) writes nothing: its age is 0,
//!   so neither trigger fires, and `Shard::checkpoint` would not rewrite one anyway.
//! - A failed checkpoint never stops the shard (the log keeps every frame until one
//!   succeeds), is counted, and is retried only after a back-off that doubles with each
//!   failure in a row ([`retry_delay`]): a disk that refuses checkpoints is not hammered
//!   with full copies of the state every second.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::Task;
use oc_io::Storage;

use crate::shard::Shard;

/// How often the scheduler looks at the log's growth.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Wait before the first retry of a failed checkpoint...
pub const FIRST_RETRY_DELAY: Duration = Duration::from_secs(5);
/// ...doubling with each failure in a row, up to this.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// When to checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// How long the state may differ from the newest checkpoint.
    pub interval: Duration,
    /// Log bytes written since the last checkpoint that trigger the next one.
    pub wal_bytes: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            interval: Duration::from_secs(3600),
            wal_bytes: 1 << 30,
        }
    }
}

/// Checkpoint counters of a shard, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointMetrics {
    /// Seconds the state has differed from the newest checkpoint; 0 while it equals it
    /// (`oc_checkpoint_age_s`).
    pub age_s: f64,
    pub last_duration_s: f64,
    pub last_bytes: u64,
    pub checkpoints_total: u64,
    pub failures_total: u64,
}

/// The wait before the next attempt after `failures_in_row` failed checkpoints (≥ 1).
pub fn retry_delay(failures_in_row: u32) -> Duration {
    let doublings = failures_in_row.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// The scheduler's decisions, apart from the clock and the shard so they can be tested
/// on their own.
#[derive(Debug, Clone)]
pub struct Schedule {
    policy: CheckpointPolicy,
    /// The log's `bytes_written` when the last checkpoint succeeded (or at start).
    bytes_at_last: u64,
    failures_in_row: u32,
    /// No attempt before this instant (after a failure).
    retry_at: Option<Instant>,
}

impl Schedule {
    pub fn new(policy: CheckpointPolicy, bytes_written: u64) -> Self {
        Schedule {
            policy,
            bytes_at_last: bytes_written,
            failures_in_row: 0,
            retry_at: None,
        }
    }

    /// Whether to checkpoint now, given the checkpoint's age and the log's counter.
    pub fn due(&self, now: Instant, age: Duration, bytes_written: u64) -> bool {
        if self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        let grown = bytes_written.saturating_sub(self.bytes_at_last);
        age >= self.policy.interval || grown >= self.policy.wal_bytes
    }

    /// The state equals the newest checkpoint: the log's growth counts from here.
    pub fn unchanged(&mut self, bytes_written: u64) {
        self.bytes_at_last = bytes_written;
    }

    pub fn succeeded(&mut self, bytes_written: u64) {
        self.bytes_at_last = bytes_written;
        self.failures_in_row = 0;
        self.retry_at = None;
    }

    /// Records a failure at `now`; returns how long until the next attempt.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        let delay = retry_delay(self.failures_in_row);
        self.retry_at = Some(now + delay);
        delay
    }
}

/// A running checkpoint scheduler. Stop it with [`Checkpointer::stop`] before the
/// shard closes: a task dropped in the middle of a checkpoint's blocking-pool call (a
/// listing, a rename) makes glommio's pool thread panic once its executor is gone.
pub struct Checkpointer {
    task: Task<()>,
    stopped: Rc<Cell<bool>>,
}

impl Checkpointer {
    /// Lets a checkpoint in progress finish, then ends the scheduler (at its next tick,
    /// at most [`CHECK_EVERY`] later).
    pub async fn stop(self) {
        self.stopped.set(true);
        self.task.await;
    }
}

/// Runs the policy for `shard` until stopped (or dropped, which is a crash as far as
/// the disk can tell).
pub fn spawn_checkpointer<S: Storage>(
    shard: Rc<Shard<S>>,
    policy: CheckpointPolicy,
) -> Checkpointer {
    let stopped = Rc::new(Cell::new(false));
    let stop = stopped.clone();
    shard.set_checkpoint_log_budget(policy.wal_bytes);
    let task = glommio::spawn_local(async move {
        let mut schedule = Schedule::new(policy, shard.wal().bytes_written());
        loop {
            glommio::timer::sleep(CHECK_EVERY.min(policy.interval)).await;
            if stop.get() {
                return;
            }
            if shard.wal().failure().is_some() {
                return; // the shard needs a restart; nothing more will be applied
            }
            let bytes_written = shard.wal().bytes_written();
            if shard.unchanged_since_checkpoint() {
                schedule.unchanged(bytes_written);
                continue;
            }
            let age = Duration::from_secs_f64(shard.checkpoint_metrics().age_s);
            if !schedule.due(Instant::now(), age, bytes_written) {
                continue;
            }
            let outcome = async {
                shard.checkpoint().await?;
                shard.release_covered_wal().await
            };
            match outcome.await {
                Ok(released) => {
                    schedule.succeeded(bytes_written);
                    tracing::info!(released = released.len(), "checkpoint written");
                }
                Err(e) => {
                    shard.count_checkpoint_failure();
                    let delay = schedule.failed(Instant::now());
                    tracing::warn!(
                        error = %e,
                        retry_in_s = delay.as_secs(),
                        "checkpoint failed; the log keeps everything until one succeeds"
                    );
                }
            }
        }
    });
    Checkpointer { task, stopped }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn policy() -> CheckpointPolicy {
        CheckpointPolicy {
            interval: HOUR,
            wal_bytes: 1000,
        }
    }

    #[test]
    fn either_trigger_makes_a_checkpoint_due_and_neither_does_not() {
        let now = Instant::now();
        let s = Schedule::new(policy(), 500);
        assert!(!s.due(now, HOUR - Duration::from_secs(1), 1499));
        assert!(s.due(now, HOUR, 500), "the age reached the interval");
        assert!(
            s.due(now, Duration::ZERO, 1500),
            "the log grew by wal_bytes"
        );
    }

    #[test]
    fn an_unchanged_state_restarts_the_growth_count() {
        let now = Instant::now();
        let mut s = Schedule::new(policy(), 0);
        s.unchanged(5000);
        assert!(!s.due(now, Duration::ZERO, 5999));
        assert!(s.due(now, Duration::ZERO, 6000));
    }

    #[test]
    fn failures_back_off_doubling_to_a_cap_and_a_success_resets_it() {
        let t0 = Instant::now();
        let mut s = Schedule::new(policy(), 0);
        let overdue = (HOUR * 2, 10_000);
        assert!(s.due(t0, overdue.0, overdue.1));
        let first = s.failed(t0);
        assert_eq!(first, FIRST_RETRY_DELAY);
        assert!(
            !s.due(t0 + first - Duration::from_millis(1), overdue.0, overdue.1),
            "no retry inside the back-off, however overdue"
        );
        assert!(s.due(t0 + first, overdue.0, overdue.1));
        let second = s.failed(t0 + first);
        assert_eq!(second, FIRST_RETRY_DELAY * 2);
        let mut delay = second;
        for _ in 0..20 {
            delay = s.failed(t0);
        }
        assert_eq!(delay, MAX_RETRY_DELAY, "the back-off is capped");
        s.succeeded(10_000);
        assert!(s.due(t0, overdue.0, 0), "a success clears the back-off");
        assert_eq!(s.failed(t0), FIRST_RETRY_DELAY, "and the count of failures");
    }

    #[test]
    fn retry_delays_grow_monotonically_and_never_overflow() {
        let delays: Vec<Duration> = (1..=100).map(retry_delay).collect();
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }
}
