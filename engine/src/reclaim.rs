//! Freeing large structures off the shard threads. Dropping a table of a million rows
//! frees millions of allocations: tens of milliseconds during which a shard would
//! answer nothing. A dropped table, the indexes a migration built and then discarded,
//! what a cutover drops or replaces, and a dropped tenant go to one background thread
//! (`oc-reclaim`) instead, so the shard pays a channel send. Nothing observable depends on when the memory
//! comes back, except the resident size, which lags by that thread's work.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

type Garbage = Box<dyn Send>;

fn reclaimer() -> Option<&'static Mutex<Sender<Garbage>>> {
    static SENDER: OnceLock<Option<Mutex<Sender<Garbage>>>> = OnceLock::new();
    SENDER
        .get_or_init(|| {
            let (tx, rx) = channel::<Garbage>();
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
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Drops `value` on the reclaim thread (here, if that thread could not be started).
pub fn later<T: Send + 'static>(value: T) {
    let garbage: Garbage = Box::new(value);
    let Some(sender) = reclaimer() else {
        return drop(garbage);
    };
    // A poisoned lock or a gone thread: drop it here.
    let unsent = match sender.lock() {
        Ok(tx) => tx.send(garbage).err().map(|e| e.0),
        Err(_) => Some(garbage),
    };
    drop(unsent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    struct Flag(Arc<AtomicBool>, std::thread::ThreadId);

    impl Drop for Flag {
        fn drop(&mut self) {
            assert_ne!(std::thread::current().id(), self.1, "dropped on the caller");
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_value_is_dropped_on_the_reclaim_thread() {
        let dropped = Arc::new(AtomicBool::new(false));
        later(Flag(dropped.clone(), std::thread::current().id()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never dropped");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
