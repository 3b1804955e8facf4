//! Where a row write's time goes, stage by stage (`oc_write_stage_seconds{stage}` in
//! `/metrics`): a tail seen in a benchmark or in production can be attributed to the
//! HTTP side, the hop between shards, the log, the apply or the acknowledgement.
//!
//! One write in [`SAMPLE_EVERY`] per thread is timed, on whichever thread runs the
//! stage (the HTTP stages on the shard that took the connection, the rest on the
//! tenant's owner shard), so the histograms are distributions per stage, not one
//! request's breakdown. Counting is a thread-local array: no atomics or locks.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// Stages in the order a write passes them (the discriminant is the index in
/// [`StageHistograms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The request's body read and decoded (on the shard that took the connection).
    Parse,
    /// Handed to the tenant's owner shard until it runs there, with the API key's
    /// check, the rate limit and the in-flight slot taken on the owner (no hop when
    /// the connection's shard owns the tenant).
    Forward,
    /// Validation, quota and memory admission, encoding the log record.
    Admit,
    /// Placing the record in the log (waits while the log's buffers are full).
    LogSubmit,
    /// From placed to durable and reached by the applier (the group's durable write,
    /// and the commands queued ahead of it).
    Durable,
    /// Applying it to the tables, and publishing it to the tenant's change streams.
    Apply,
    /// From applied to the writer's task running again.
    Wake,
    /// The acknowledgement gate: synchronous replication and the lease check (timed
    /// whether the write passes it or not).
    Ack,
    /// From the owner's answer to the JSON answer built on the connection's shard
    /// (the hop back).
    Respond,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Parse,
        Stage::Forward,
        Stage::Admit,
        Stage::LogSubmit,
        Stage::Durable,
        Stage::Apply,
        Stage::Wake,
        Stage::Ack,
        Stage::Respond,
    ];

    /// The `stage` label.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Forward => "forward",
            Stage::Admit => "admit",
            Stage::LogSubmit => "log_submit",
            Stage::Durable => "durable",
            Stage::Apply => "apply",
            Stage::Wake => "wake",
            Stage::Ack => "ack",
            Stage::Respond => "respond",
        }
    }
}

/// One write in this many is timed (per thread).
pub const SAMPLE_EVERY: u64 = 8;

/// Upper bounds of the buckets, in microseconds: finer than the request histograms',
/// because most stages take tens of microseconds.
pub const BUCKETS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000, 10_000_000,
];

/// One stage's counts (non-cumulative per bucket; above the last bound counts only in
/// `count` and `sum_us`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageHistogram {
    pub buckets: [u64; BUCKETS_US.len()],
    pub count: u64,
    pub sum_us: u64,
}

impl StageHistogram {
    fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = BUCKETS_US.iter().position(|&le| us <= le) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn merge(&mut self, other: &StageHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }
}

/// Every stage's histogram, in [`Stage::ALL`] order.
pub type StageHistograms = [StageHistogram; Stage::ALL.len()];

thread_local! {
    static HISTOGRAMS: RefCell<StageHistograms> = RefCell::new(Default::default());
    static SEEN: [Cell<u64>; 2] = const { [Cell::new(0), Cell::new(0)] };
}

/// Which side decides a sample: the HTTP side and the owner shard count their own
/// writes, so a write forwarded between shards is sampled on each side on its own.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Http = 0,
    Owner = 1,
}

/// Whether this write is one of the timed ones.
pub fn sample(side: Side) -> bool {
    SEEN.with(|seen| {
        let n = seen[side as usize].get();
        seen[side as usize].set(n.wrapping_add(1));
        n % SAMPLE_EVERY == 0
    })
}

/// Counts `elapsed` for `stage` on this thread.
pub fn record(stage: Stage, elapsed: Duration) {
    HISTOGRAMS.with(|h| h.borrow_mut()[stage as usize].record(elapsed))
}

/// The clock of one write's consecutive stages: each [`Laps::lap`] counts the time
/// since the previous one. A write that was not sampled carries a stopped clock that
/// counts nothing. `Copy` and `Send`, so it travels with the write to its owner shard
/// and back.
#[derive(Debug, Clone, Copy)]
pub struct Laps(Option<Instant>);

impl Laps {
    /// A running clock for one write in [`SAMPLE_EVERY`] on this side, else a stopped one.
    pub fn start(side: Side) -> Laps {
        Laps(sample(side).then(Instant::now))
    }

    /// A clock that counts nothing (commands that are not row writes).
    pub fn stopped() -> Laps {
        Laps(None)
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// Starts the next lap now without counting the time since the previous one
    /// (a part timed elsewhere).
    pub fn restart(&mut self) {
        if self.0.is_some() {
            self.0 = Some(Instant::now());
        }
    }

    /// Counts the time since the previous lap for `stage`.
    pub fn lap(&mut self, stage: Stage) {
        // A stopped clock reads no time: unsampled writes pay nothing.
        if self.0.is_some() {
            self.lap_at(stage, Instant::now());
        }
    }

    /// As [`Laps::lap`], for a stage that ended at `at` (stamped by another task).
    pub fn lap_at(&mut self, stage: Stage, at: Instant) {
        if let Some(last) = self.0 {
            record(stage, at.saturating_duration_since(last));
            self.0 = Some(at);
        }
    }
}

/// This thread's histograms since it started.
pub fn snapshot() -> StageHistograms {
    HISTOGRAMS.with(|h| *h.borrow())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_write_in_sample_every_is_timed_per_side() {
        let timed = (0..SAMPLE_EVERY * 3).filter(|_| sample(Side::Http)).count();
        assert_eq!(timed, 3);
        // The other side keeps its own count.
        assert!(sample(Side::Owner));
        assert!(!sample(Side::Owner));
    }

    #[test]
    fn a_running_clock_counts_each_stage_since_the_previous_one_and_a_stopped_one_nothing() {
        let before = snapshot();
        let mut stopped = Laps::stopped();
        stopped.lap(Stage::Wake);
        assert_eq!(
            snapshot()[Stage::Wake as usize].count,
            before[Stage::Wake as usize].count
        );
        let started = Instant::now();
        let mut laps = Laps(Some(started));
        laps.lap_at(Stage::Durable, started + Duration::from_micros(40));
        laps.lap_at(Stage::Ack, started + Duration::from_micros(3_040));
        let after = snapshot();
        let durable = after[Stage::Durable as usize];
        assert_eq!(durable.count, before[Stage::Durable as usize].count + 1);
        assert_eq!(durable.sum_us - before[Stage::Durable as usize].sum_us, 40);
        let ack = after[Stage::Ack as usize];
        assert_eq!(ack.sum_us - before[Stage::Ack as usize].sum_us, 3_000);
    }

    #[test]
    fn durations_land_in_their_buckets_and_the_overflow_only_in_the_count() {
        record(Stage::Apply, Duration::from_micros(7));
        record(Stage::Apply, Duration::from_micros(300));
        record(Stage::Apply, Duration::from_secs(60));
        let apply = snapshot()[Stage::Apply as usize];
        assert_eq!(apply.count, 3);
        assert_eq!(apply.buckets[0], 1, "7 µs ≤ 10 µs");
        assert_eq!(apply.buckets[5], 1, "300 µs ≤ 500 µs");
        assert_eq!(apply.buckets.iter().sum::<u64>(), 2);
        assert_eq!(apply.sum_us, 7 + 300 + 60_000_000);
    }
}
