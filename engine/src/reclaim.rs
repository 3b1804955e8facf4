//! Freeing large structures off the shard threads. Dropping a table of a million rows
//! frees millions of allocations: tens of milliseconds during which a shard would
//! answer nothing. A dropped table, the indexes a migration built and then discarded,
//! what a cutover drops or replaces, a dropped tenant, and the rows a query's cuts drop
//! go to one background thread (`oc-reclaim`) instead, so the shard pays a channel
//! send. Nothing observable depends on when the memory comes back, except the resident
//! size, which lags by that thread's work. That thread runs only when a core is idle;
//! on a machine kept busy it may not run at all, so at most [`MAX_BACKLOG`] values wait
//! for it and the next ones are dropped where they are given up, as before the thread:
//! memory the accounting already gave back is never held without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, OnceLock};

type Garbage = Box<dyn Send>;

/// The most values waiting for the reclaim thread.
pub const MAX_BACKLOG: usize = 16;

struct Reclaimer {
    tx: Mutex<Sender<Garbage>>,
    /// Values sent and not dropped yet.
    backlog: Arc<AtomicUsize>,
    max_backlog: usize,
}

impl Reclaimer {
    fn start(max_backlog: usize) -> Option<Reclaimer> {
        let (tx, rx) = channel::<Garbage>();
        let backlog = Arc::new(AtomicUsize::new(0));
        let waiting = backlog.clone();
        std::thread::Builder::new()
            .name("oc-reclaim".into())
            .spawn(move || {
                // Below every shard: it frees when a core has nothing better to do.
                // SAFETY: sched_setscheduler on this thread with a valid parameter.
                unsafe {
                    let param = libc::sched_param { sched_priority: 0 };
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                }
                for garbage in rx {
                    drop(garbage);
                    waiting.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .ok()?;
        Some(Reclaimer {
            tx: Mutex::new(tx),
            backlog,
            max_backlog,
        })
    }

    fn later(&self, garbage: Garbage) {
        if self.backlog.fetch_add(1, Ordering::Relaxed) >= self.max_backlog {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            return drop(garbage);
        }
        // A poisoned lock or a gone thread: drop it here.
        let unsent = match self.tx.lock() {
            Ok(tx) => tx.send(garbage).err().map(|e| e.0),
            Err(_) => Some(garbage),
        };
        if let Some(garbage) = unsent {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
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

/// Drops `value` on the reclaim thread (here, if that thread could not be started or
/// [`MAX_BACKLOG`] values already wait for it).
pub fn later<T: Send + 'static>(value: T) {
    let garbage: Garbage = Box::new(value);
    match reclaimer() {
        Some(reclaimer) => reclaimer.later(garbage),
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

    /// A reclaim thread that does not get to run holds at most its backlog: the next
    /// value is dropped by the caller, and the thread frees the rest once it runs.
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
            reclaimer.later(value());
        }
        assert!(dropped_on.lock().expect("lock").is_empty());
        // The thread is stuck in the first drop: the fourth is over the backlog.
        let over = std::thread::spawn({
            let value = value();
            move || reclaimer.later(value)
        });
        std::thread::sleep(Duration::from_millis(50));
        gate.store(true, Ordering::SeqCst);
        let caller = over.thread().id();
        over.join().expect("caller");
        let on = wait_for(4, &dropped_on);
        assert_eq!(on.iter().filter(|&&t| t == caller).count(), 1, "{on:?}");
        assert_eq!(on.iter().filter(|&&t| t != caller).count(), 3, "{on:?}");
    }
}
