//! The fixed-rate schedule of the open-loop load generators (`http`, `ask`).
//!
//! Request `i` is due at `start + i / rate`, whatever the server's speed. A connection
//! takes the next slot, waits until it is due if it is early, and its latency counts
//! from the due time, not the send time: a stalled server makes every request that
//! should have gone out meanwhile count as waiting (coordinated-omission correction,
//! as in wrk2).

use std::cell::Cell;
use std::time::{Duration, Instant};

pub(crate) struct Pacer {
    start: Instant,
    interval_ns: f64,
    next: Cell<u64>,
    total: u64,
    warmup: u64,
}

/// One request's place in the schedule.
pub(crate) struct Slot {
    pub index: u64,
    pub due: Instant,
    /// False during the warm-up: send it, do not record it.
    pub measured: bool,
}

impl Pacer {
    /// `rate` requests per second: `warmup` of them unrecorded, then `measured`.
    /// The first is due 200 ms from now, so every connection is open by then.
    pub(crate) fn new(rate: u64, warmup: Duration, measured: Duration) -> Pacer {
        let per_s = rate as f64;
        let warmup = (warmup.as_secs_f64() * per_s) as u64;
        Pacer {
            start: Instant::now() + Duration::from_millis(200),
            interval_ns: 1e9 / per_s,
            next: Cell::new(0),
            total: warmup + (measured.as_secs_f64() * per_s) as u64,
            warmup,
        }
    }

    /// The next slot once it is due; `None` when the schedule is done.
    pub(crate) async fn next(&self) -> Option<Slot> {
        let index = self.next.get();
        if index >= self.total {
            return None;
        }
        self.next.set(index + 1);
        let due = self.start + Duration::from_nanos((index as f64 * self.interval_ns) as u64);
        let now = Instant::now();
        if due > now {
            glommio::timer::sleep(due - now).await;
        }
        Some(Slot {
            index,
            due,
            measured: index >= self.warmup,
        })
    }

    /// Slots handed out so far.
    pub(crate) fn sent(&self) -> u64 {
        self.next.get()
    }

    /// Whether every slot has been handed out.
    pub(crate) fn done(&self) -> bool {
        self.next.get() >= self.total
    }

    /// Time since the first slot was due.
    pub(crate) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}
