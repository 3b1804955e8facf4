//! How fast a checkpoint writes its snapshot.
//!
//! On a disk without FUA every durable log write ends in a cache flush, and the flush
//! carries whatever the checkpoint wrote since the previous one. While the log writes,
//! a checkpoint therefore writes at half the full pace: 64 writers' p99 with
//! checkpoints back to back ÷ without was 1.20–1.25 at 32 MB/s and 1.04–1.07 at
//! 16 MB/s, by the medians of 8 alternated runs each (BENCHMARKS.md "Checkpoints at
//! half pace while the log writes"). A pace that followed the log's own rate (a fifth
//! of it, 8–21 MB/s here) did worse than either fixed pace below 32 MB/s (1.13–1.19):
//! it sped up exactly when the log's writes came thickest. With the log quiet a
//! checkpoint writes at the full pace.
//!
//! Two bounds keep a slow checkpoint from costing more than it saves: it ends before
//! the log grows by the scheduler's `wal_bytes` again (so the log kept for recovery
//! stays near twice that), and within [`FINISH_WITHIN`] (the hourly checkpoint's age
//! alert allows it 5 minutes). Either may ask for more than the full pace; the full
//! pace is all it gets, as before the pace depended on the log.

use std::time::{Duration, Instant};

/// The full pace: with the log quiet, and the most any bound gets. Written flat out, a
/// 40 MB checkpoint raised the log's p99 from 1.4 ms to 35 ms (`oc-bench engine`).
pub const FULL_BYTES_PER_S: f64 = 32e6;
/// The pace while the log writes, unless a bound asks for more.
pub const BUSY_BYTES_PER_S: f64 = 16e6;
/// A checkpoint asks for the pace that ends it within this long.
pub const FINISH_WITHIN: Duration = Duration::from_secs(240);
/// The log's rate is measured over windows of this length; until the first one ends,
/// the log counts as writing.
const WINDOW: Duration = Duration::from_millis(100);
/// Time a checkpoint lost behind its pace (a slow write, a late timer) that it may
/// make up: without it, a late timer on every 1 ms wait cost 18 % of the pace.
const CATCH_UP: Duration = Duration::from_millis(50);

/// Bytes per second a checkpoint of `state_bytes` may write while the log writes
/// `log_bytes_per_s`, with the scheduler checkpointing every `log_budget` bytes of log.
pub fn bytes_per_s(log_bytes_per_s: f64, state_bytes: u64, log_budget: u64) -> f64 {
    if log_bytes_per_s <= 0.0 {
        return FULL_BYTES_PER_S;
    }
    let before_next_checkpoint = state_bytes as f64 * log_bytes_per_s / log_budget.max(1) as f64;
    let in_time = state_bytes as f64 / FINISH_WITHIN.as_secs_f64();
    BUSY_BYTES_PER_S
        .max(before_next_checkpoint)
        .max(in_time)
        .min(FULL_BYTES_PER_S)
}

/// Paces one checkpoint's writes by the log's rate, measured as it goes.
pub(crate) struct Pacer<'a> {
    /// The log's bytes written so far (a counter that only grows).
    log_bytes: &'a dyn Fn() -> u64,
    state_bytes: u64,
    log_budget: u64,
    /// The current window's start and the log's bytes then.
    window: (Instant, u64),
    /// The log's rate over the last whole window (None before the first).
    log_bytes_per_s: Option<f64>,
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
        Pacer {
            log_bytes,
            state_bytes,
            log_budget,
            window: (now, log_bytes()),
            log_bytes_per_s: None,
            next_at: now,
        }
    }

    /// The pace now, in bytes per second.
    fn bytes_per_s(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.window.0);
        if elapsed >= WINDOW {
            let bytes = (self.log_bytes)();
            let grown = bytes.saturating_sub(self.window.1);
            self.log_bytes_per_s = Some(grown as f64 / elapsed.as_secs_f64());
            self.window = (now, bytes);
        }
        let log_bytes_per_s = self.log_bytes_per_s.unwrap_or(f64::MIN_POSITIVE);
        bytes_per_s(log_bytes_per_s, self.state_bytes, self.log_budget)
    }

    /// After a write of `len` bytes that started at `started`: how long to wait before
    /// the next one. Time the disk took counts toward the wait, and up to [`CATCH_UP`]
    /// of time lost behind the pace is made up.
    pub(crate) fn wait_after(&mut self, len: usize, started: Instant, now: Instant) -> Duration {
        let rate = self.bytes_per_s(now);
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
    const GIB: u64 = 1 << 30;

    #[test]
    fn a_quiet_log_gets_the_full_pace_and_a_busy_one_half() {
        assert_eq!(bytes_per_s(0.0, 40_000_000, GIB), FULL_BYTES_PER_S);
        assert_eq!(bytes_per_s(0.0, 100 * GIB, GIB), FULL_BYTES_PER_S);
        for log in [0.1 * MB, 50.0 * MB, 200.0 * MB] {
            assert_eq!(bytes_per_s(log, 40_000_000, GIB), BUSY_BYTES_PER_S, "{log}");
        }
    }

    #[test]
    fn a_large_state_still_ends_before_the_next_checkpoint_and_in_time() {
        // 512 MB of state under a 50 MB/s log and a 1 GiB budget: ending before the log
        // grows by the budget needs 25 MB/s.
        let rate = bytes_per_s(50.0 * MB, GIB / 2, GIB);
        assert!((rate - 25.0 * MB).abs() < 1.0, "{rate}");
        // 4.8 GB under a slow log: ending within 240 s needs 20 MB/s.
        let rate = bytes_per_s(1.0 * MB, 4_800_000_000, GIB);
        assert!((rate - 20.0 * MB).abs() < 1.0, "{rate}");
        // Beyond the full pace, the full pace.
        assert_eq!(bytes_per_s(50.0 * MB, 10 * GIB, GIB), FULL_BYTES_PER_S);
        // A budget of 0 (a policy that checkpoints on every byte) divides by nothing.
        assert_eq!(bytes_per_s(50.0 * MB, 1, 0), FULL_BYTES_PER_S);
    }

    #[test]
    fn the_pacer_measures_the_log_and_waits_accordingly() {
        let log = Cell::new(0u64);
        let log_bytes = || log.get();
        let t0 = Instant::now() + CATCH_UP;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pacer = Pacer::new(&log_bytes, 40_000_000, GIB, t0);
        // Before a whole window the log counts as writing: 16 KiB at 16 MB/s is 1.024 ms.
        assert_eq!(
            pacer.wait_after(16 << 10, t0, at(0)),
            Duration::from_micros(1024)
        );
        // The first window was busy (50 MB/s); this write, started when it was let,
        // ended 100 ms later: far behind the pace, so no wait.
        log.set(5_000_000);
        let next = t0 + Duration::from_micros(1024);
        assert_eq!(pacer.wait_after(32_000, next, at(100)), Duration::ZERO);
        assert_eq!(pacer.log_bytes_per_s, Some(50.0 * MB));
        // Then the log is quiet for a window: the full pace. The checkpoint fell behind
        // meanwhile; it makes up at most CATCH_UP of it.
        let mut waited = Duration::ZERO;
        let mut written = 0;
        while waited.is_zero() {
            waited = pacer.wait_after(32_000, at(300), at(300));
            written += 32_000;
        }
        assert_eq!(pacer.log_bytes_per_s, Some(0.0));
        // 50 ms at 32 MB/s is 1.6 MB, then one more write's 1 ms.
        assert_eq!(written, 1_632_000);
        assert_eq!(waited, Duration::from_millis(1));
    }
}
