//! How fast a checkpoint writes its snapshot.
//!
//! On a disk without FUA every durable log write ends in a cache flush, and the flush
//! carries whatever the checkpoint wrote since the previous one. While the log writes,
//! a checkpoint therefore writes at half the full pace: 64 writers' p99 with
//! checkpoints back to back ÷ without was 1.20 with a flat 32 MB/s and 1.09 with this
//! pace, by the medians of 16 alternated rounds, in a run-to-run spread of about ±0.15
//! (BENCHMARKS.md "Checkpoints at half pace while the log writes"). A pace that
//! followed the log's rate of the moment (a fifth of it) did worse than fixed paces of
//! 8 or 16 MB/s there: this log's rate swings from one 100 ms window to the next, and
//! that pace sped up exactly when the log's writes came thickest. With the log quiet a
//! checkpoint writes at the full pace.
//!
//! Two bounds keep a slow checkpoint from costing more than it saves: it aims to end
//! before the log grows by the scheduler's `wal_bytes` since it started, and within
//! [`FINISH_WITHIN`] (the hourly checkpoint's age alert allows it 5 minutes). Both look
//! at what is left to write and the log's average rate since the start, not at one
//! window's, for the reason above. Either may ask for more than the full pace; the full
//! pace is all it gets, as before the pace depended on the log.

use std::time::{Duration, Instant};

/// The full pace: with the log quiet, and the most either bound gets. Written flat out,
/// a 40 MB checkpoint raised the log's p99 from 1.4 ms to 35 ms (`oc-bench engine`).
const FULL_BYTES_PER_S: f64 = 32e6;
/// The pace while the log writes, unless a bound asks for more.
const BUSY_BYTES_PER_S: f64 = 16e6;
/// A checkpoint asks for the pace that ends it within this long.
const FINISH_WITHIN: Duration = Duration::from_secs(240);
/// Whether the log writes is decided over windows of this length; until the first one
/// ends, it counts as writing.
const WINDOW: Duration = Duration::from_millis(100);
/// Time a checkpoint lost behind its pace that it may make up: without it, a late timer
/// on every 1 ms wait cost 18 % of the pace. A write the disk held up (a slow sync) is
/// made up too, at most this much of it: 0.8 MB at 16 MB/s.
const CATCH_UP: Duration = Duration::from_millis(50);

/// Where a checkpoint stands, as its pace sees it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// The log wrote during the last whole window.
    log_writing: bool,
    /// Bytes of the snapshot still to write. An estimate: the rows' stored bytes, not
    /// the frames' headers, keys and idempotency entries.
    remaining_bytes: u64,
    /// The log's bytes/s since the checkpoint started.
    log_bytes_per_s: f64,
    /// Log bytes until the log has grown by the budget since the checkpoint started.
    log_bytes_left: u64,
    /// Time left until [`FINISH_WITHIN`].
    time_left: Duration,
}

/// Bytes per second a checkpoint standing at `p` may write.
fn bytes_per_s(p: Progress) -> f64 {
    if !p.log_writing || p.log_bytes_left == 0 || p.time_left.is_zero() {
        return FULL_BYTES_PER_S;
    }
    let remaining = p.remaining_bytes as f64;
    let before_next_checkpoint = remaining * p.log_bytes_per_s / p.log_bytes_left as f64;
    let in_time = remaining / p.time_left.as_secs_f64();
    BUSY_BYTES_PER_S
        .max(before_next_checkpoint)
        .max(in_time)
        .min(FULL_BYTES_PER_S)
}

/// Paces one checkpoint's writes by its shard's log, measured as it goes.
pub(crate) struct Pacer<'a> {
    /// The log's bytes written so far (a counter that only grows).
    log_bytes: &'a dyn Fn() -> u64,
    state_bytes: u64,
    log_budget: u64,
    /// When the checkpoint started, and the log's bytes then.
    started: (Instant, u64),
    /// The current window's start, and the log's bytes then.
    window: (Instant, u64),
    log_writing: bool,
    written: u64,
    /// When the next write may start.
    next_at: Instant,
}

impl<'a> Pacer<'a> {
    pub(crate) fn new(
        log_bytes: &'a dyn Fn() -> u64,
        state_bytes: u64,
        log_budget: u64,
        now: Instant,
    ) -> Self {
        let at_start = (now, log_bytes());
        Pacer {
            log_bytes,
            state_bytes,
            log_budget,
            started: at_start,
            window: at_start,
            log_writing: true,
            written: 0,
            next_at: now,
        }
    }

    /// The pace at `now`, in bytes per second.
    fn pace(&mut self, now: Instant) -> f64 {
        let bytes = (self.log_bytes)();
        if now.saturating_duration_since(self.window.0) >= WINDOW {
            self.log_writing = bytes > self.window.1;
            self.window = (now, bytes);
        }
        let elapsed = now.saturating_duration_since(self.started.0);
        let grown = bytes.saturating_sub(self.started.1);
        bytes_per_s(Progress {
            log_writing: self.log_writing,
            remaining_bytes: self.state_bytes.saturating_sub(self.written),
            // Too early to tell before a window: the other bound and the busy pace.
            log_bytes_per_s: if elapsed >= WINDOW {
                grown as f64 / elapsed.as_secs_f64()
            } else {
                0.0
            },
            log_bytes_left: self.log_budget.saturating_sub(grown),
            time_left: FINISH_WITHIN.saturating_sub(elapsed),
        })
    }

    /// After a write of `len` bytes that started at `started`: how long to wait before
    /// the next one. Time the disk took counts toward the wait, and up to [`CATCH_UP`]
    /// of time lost behind the pace is made up.
    pub(crate) fn wait_after(&mut self, len: usize, started: Instant, now: Instant) -> Duration {
        self.written += len as u64;
        let rate = self.pace(now);
        let earliest = started.checked_sub(CATCH_UP).unwrap_or(started);
        self.next_at = self.next_at.max(earliest) + Duration::from_secs_f64(len as f64 / rate);
        self.next_at.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const MB: f64 = 1e6;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A checkpoint with 40 MB left, far from both bounds.
    fn small(log_writing: bool) -> Progress {
        Progress {
            log_writing,
            remaining_bytes: 40_000_000,
            log_bytes_per_s: 50.0 * MB,
            log_bytes_left: GIB,
            time_left: FINISH_WITHIN,
        }
    }

    #[test]
    fn a_quiet_log_gets_the_full_pace_and_a_writing_one_half() {
        assert_eq!(bytes_per_s(small(false)), FULL_BYTES_PER_S);
        assert_eq!(bytes_per_s(small(true)), BUSY_BYTES_PER_S);
    }

    #[test]
    fn a_large_state_aims_to_end_before_the_next_checkpoint_and_in_time() {
        // 512 MiB left under a 50 MB/s log with 1 GiB of budget left: 25 MB/s.
        let p = Progress {
            remaining_bytes: 512 * MIB,
            ..small(true)
        };
        assert!((bytes_per_s(p) - 25.0 * MB).abs() < 1.0);
        // 2.4 GB left with 120 s to go: 20 MB/s.
        let p = Progress {
            remaining_bytes: 2_400_000_000,
            log_bytes_per_s: 0.0,
            time_left: Duration::from_secs(120),
            ..small(true)
        };
        assert!((bytes_per_s(p) - 20.0 * MB).abs() < 1.0);
        // Beyond the full pace, the full pace.
        let p = Progress {
            remaining_bytes: 10 * GIB,
            ..small(true)
        };
        assert_eq!(bytes_per_s(p), FULL_BYTES_PER_S);
        // A budget spent or the time up: the full pace (no division by zero).
        for p in [
            Progress {
                log_bytes_left: 0,
                ..small(true)
            },
            Progress {
                time_left: Duration::ZERO,
                ..small(true)
            },
        ] {
            assert_eq!(bytes_per_s(p), FULL_BYTES_PER_S, "{p:?}");
        }
    }

    #[test]
    fn the_bound_follows_the_logs_average_not_one_windows_rate() {
        let log = Cell::new(0u64);
        let log_bytes = || log.get();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pacer = Pacer::new(&log_bytes, 480_000_000, GIB, t0);
        assert_eq!(pacer.pace(at(0)), BUSY_BYTES_PER_S, "before a window");
        // 50 MB/s for a second: 480 MB × 50 MB/s ÷ (1 GiB − 50 MB) = 23.44 MB/s.
        log.set(50_000_000);
        let pace = pacer.pace(at(1000));
        assert!((pace - 23.44 * MB).abs() < 0.01 * MB, "{pace}");
        // A window at 90 MB/s moves the average to 53.6 MB/s, the pace to 25.37 MB/s
        // (that window's own rate would have asked for 42.6).
        log.set(59_000_000);
        let pace = pacer.pace(at(1100));
        assert!((pace - 25.37 * MB).abs() < 0.01 * MB, "{pace}");
        // Then a quiet window: the full pace.
        assert_eq!(pacer.pace(at(1200)), FULL_BYTES_PER_S);
    }

    #[test]
    fn the_pacer_waits_out_the_pace_and_makes_up_at_most_the_catch_up() {
        let log = Cell::new(0u64);
        let log_bytes = || log.get();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pacer = Pacer::new(&log_bytes, 40_000_000, GIB, t0);
        // Before a whole window the log counts as writing: 16 KiB at 16 MB/s is 1.024 ms.
        assert_eq!(
            pacer.wait_after(16 << 10, t0, at(0)),
            Duration::from_micros(1024)
        );
        // A write let start at 1.024 ms ended at 100 ms: far behind the pace, no wait.
        log.set(5_000_000);
        let let_start = t0 + Duration::from_micros(1024);
        assert_eq!(pacer.wait_after(32_000, let_start, at(100)), Duration::ZERO);
        // Then the log is quiet for a window: the full pace. Of the time lost, at most
        // CATCH_UP is made up: 50 ms at 32 MB/s is 1.6 MB, then one more write's 1 ms.
        let mut waited = Duration::ZERO;
        let mut written = 0;
        while waited.is_zero() {
            waited = pacer.wait_after(32_000, at(300), at(300));
            written += 32_000;
        }
        assert_eq!(written, 1_632_000);
        assert_eq!(waited, Duration::from_millis(1));
    }
}
