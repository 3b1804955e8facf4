//! Freeing large structures off the shard threads. Dropping a table of a million rows
//! frees millions of allocations: tens of milliseconds during which a shard would
//! answer nothing. A dropped table, the indexes a migration built and then discarded,
//! what a cutover drops or replaces, a dropped tenant, and the rows a query's cuts drop
//! go to one background thread (`oc-reclaim`) instead, so the shard pays a channel
//! send. Nothing observable depends on when the memory comes back, except the resident
//! size, which lags by that thread's work. The thread runs at nice 19, below the shards
//! but never stopped by them (under `SCHED_IDLE` a machine kept busy froze it, and the
//! memory the budgets counted as given back piled up: 2.4 GB in 30 s of deep `OFFSET`
//! pages). Queries can make garbage faster than that share frees it, so at most
//! [`MAX_BACKLOG`] of their values wait ([`later_or_now`]); the next ones are dropped
//! where they are given up. What operator actions drop ([`later`]) always waits for the
//! thread: it comes at their pace, and freeing it inline is the stall this avoids.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

type Garbage = Box<dyn Send>;

/// The most values of queries waiting for the reclaim thread.
pub const MAX_BACKLOG: usize = 16;

/// What the thread drops, and whether it counts toward the bounded backlog.
type Job = (Garbage, bool);

struct Reclaimer {
    tx: Mutex<Sender<Job>>,
    /// Bounded values sent and not dropped yet.
    backlog: Arc<AtomicUsize>,
    max_backlog: usize,
}

impl Reclaimer {
    fn start(max_backlog: usize) -> Option<Reclaimer> {
        let (tx, rx) = channel::<Job>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let waiting = backlog.clone();
        std::thread::Builder::new()
            .name("oc-reclaim".into())
            .spawn(move || {
                // Below every shard, and never stopped by them (not SCHED_IDLE). A
                // failure leaves it an equal of the shards: still correct.
                // SAFETY: setpriority on this thread's own id with a valid value.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
                for (garbage, bounded) in rx {
                    drop(garbage);
                    if bounded {
                        waiting.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            })
            .ok()?;
        Some(Reclaimer {
            tx: Mutex::new(tx),
            backlog,
            max_backlog,
        })
    }

    fn later(&self, garbage: Garbage, bounded: bool) {
        if bounded && self.backlog.fetch_add(1, Ordering::Relaxed) >= self.max_backlog {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            return drop(garbage);
        }
        // A poisoned lock or a gone thread: drop it here.
        let unsent = match self.tx.lock() {
            Ok(tx) => tx.send((garbage, bounded)).err().map(|e| e.0),
            Err(_) => Some((garbage, bounded)),
        };
        if let Some((garbage, bounded)) = unsent {
            if bounded {
                self.backlog.fetch_sub(1, Ordering::Relaxed);
            }
            drop(garbage);
        }
    }
}

fn reclaimer() -> Option<&'static Reclaimer> {
    static RECLAIMER: OnceLock<Option<Reclaimer>> = OnceLock::new();
    RECLAIMER
        .get_or_init(|| Reclaimer::start(MAX_BACKLOG))
        .as_ref()
}

/// Drops `value` on the reclaim thread (here, if that thread could not be started).
pub fn later<T: Send + 'static>(value: T) {
    send(Box::new(value), false);
}

/// Drops a query's `value` on the reclaim thread, or here when [`MAX_BACKLOG`] such
/// values already wait for it.
pub fn later_or_now<T: Send + 'static>(value: T) {
    send(Box::new(value), true);
}

fn send(garbage: Garbage, bounded: bool) {
    match reclaimer() {
        Some(reclaimer) => reclaimer.later(garbage, bounded),
        None => drop(garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    /// Records the thread that drops it, after waiting for `gate` to open.
    struct Tracked {
        dropped_on: Arc<Mutex<Vec<ThreadId>>>,
        gate: Arc<AtomicBool>,
    }

    impl Drop for Tracked {
        fn drop(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.gate.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Ok(mut on) = self.dropped_on.lock() {
                on.push(std::thread::current().id());
            }
        }
    }

    fn wait_for(count: usize, dropped_on: &Mutex<Vec<ThreadId>>) -> Vec<ThreadId> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let on = dropped_on.lock().expect("lock").clone();
            if on.len() >= count {
                return on;
            }
            assert!(Instant::now() < deadline, "{} of {count} dropped", on.len());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_value_is_dropped_on_the_reclaim_thread() {
        let dropped_on = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicBool::new(true));
        later(Tracked {
            dropped_on: dropped_on.clone(),
            gate: open,
        });
        let on = wait_for(1, &dropped_on);
        assert_ne!(on[0], std::thread::current().id(), "dropped on the caller");
    }

    /// A reclaim thread that does not get to run holds at most its backlog of query
    /// values: the next is dropped by the caller, while an operator action's value
    /// still waits for the thread, which frees them all once it runs.
    #[test]
    fn a_stalled_reclaim_thread_holds_no_more_than_its_backlog() {
        let reclaimer = Reclaimer::start(3).expect("thread");
        let dropped_on = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(AtomicBool::new(false));
        let value = || -> Garbage {
            Box::new(Tracked {
                dropped_on: dropped_on.clone(),
                gate: gate.clone(),
            })
        };
        for _ in 0..3 {
            reclaimer.later(value(), true);
        }
        // An operator action's value waits whatever the backlog.
        reclaimer.later(value(), false);
        assert!(dropped_on.lock().expect("lock").is_empty());
        // The thread is stuck in the first drop: the fourth is over the backlog.
        let over = std::thread::spawn({
            let value = value();
            move || reclaimer.later(value, true)
        });
        std::thread::sleep(Duration::from_millis(50));
        gate.store(true, Ordering::SeqCst);
        let caller = over.thread().id();
        over.join().expect("caller");
        let on = wait_for(5, &dropped_on);
        assert_eq!(on.iter().filter(|&&t| t == caller).count(), 1, "{on:?}");
        assert_eq!(on.iter().filter(|&&t| t != caller).count(), 4, "{on:?}");
    }
}
