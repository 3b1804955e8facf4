//! Building glommio executors with oc's I/O memory and ring depth.
//!
//! Each executor keeps a pool of I/O memory for its DMA buffers and registers it with
//! each of its three rings; the pages are pinned and count against `RLIMIT_MEMLOCK` three
//! times ([`registered_bytes`]), summed over all the processes of the user, unless the
//! process has `CAP_IPC_LOCK`. Under a smaller limit glommio skips the registration
//! (a warning in the log) and keeps using the pool unregistered: every write then pins
//! its pages itself, a little slower. A buffer the pool cannot place comes from the heap,
//! fresh pages every time, which is much slower for a 1 MiB group (below).

use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

/// I/O memory per executor: room for three group buffers (the filling group, the one
/// being written, and the part of a group split off at a rotation). The pool is a buddy
/// allocator, so a group's buffer (1 MiB and its end-marker block) takes a 2 MiB block,
/// and the allocator keeps its own bookkeeping inside the pool: 4 MiB held one such
/// block, and the second group in flight came from the heap. 8 MiB holds both; it took
/// the log's 256 KiB-record bandwidth from 1085–1188 to 1413–2100 MB/s (steady state,
/// three alternated pairs of `oc-bench wal`, BENCHMARKS.md).
pub const DEFAULT_IO_MEMORY_BYTES: usize = 8 << 20;
/// The rings per executor that each register the I/O memory.
const RINGS_PER_EXECUTOR: u64 = 3;

/// glommio refuses to build an executor under a smaller `RLIMIT_MEMLOCK` (whatever the
/// process's capabilities), and the thread it was to run on dies without a useful error.
pub const GLOMMIO_MIN_MEMLOCK_BYTES: u64 = 512 << 10;

/// The soft `RLIMIT_MEMLOCK` in bytes; `None` when unlimited or unreadable.
pub fn memlock_limit() -> Option<u64> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut l) } == 0;
    (read && l.rlim_cur != libc::RLIM_INFINITY).then_some(l.rlim_cur)
}

/// Refuses, with the fix, a memlock limit under which no executor can start.
pub fn check_memlock_floor() -> Result<(), String> {
    match memlock_limit() {
        Some(limit) if limit < GLOMMIO_MIN_MEMLOCK_BYTES => Err(format!(
            "the memlock limit (RLIMIT_MEMLOCK) is {} KiB and glommio needs at least {} KiB \
             to start an executor: raise it (systemd LimitMEMLOCK=infinity, or ulimit -l \
             unlimited)",
            limit >> 10,
            GLOMMIO_MIN_MEMLOCK_BYTES >> 10
        )),
        _ => Ok(()),
    }
}

/// Locked memory the registration of `executors` executors' I/O memory needs.
pub fn registered_bytes(executors: u64) -> u64 {
    executors * RINGS_PER_EXECUTOR * DEFAULT_IO_MEMORY_BYTES as u64
}
/// io_uring submission queue depth per executor.
pub const DEFAULT_RING_DEPTH: usize = 256;

/// A builder with oc's memory and ring settings.
pub fn executor_builder(placement: Placement) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(placement)
        .io_memory(DEFAULT_IO_MEMORY_BYTES)
        .ring_depth(DEFAULT_RING_DEPTH)
}

/// Runs `fut` to completion on a fresh unpinned executor on this thread (tests, tools).
#[expect(
    clippy::expect_used,
    reason = "tests and tools only; an executor that cannot be built is a broken machine"
)]
pub fn run_local<T>(fut: impl std::future::Future<Output = T>) -> T {
    let ex: LocalExecutor = executor_builder(Placement::Unbound)
        .make()
        .expect("an executor can be built with oc's memory settings");
    ex.run(fut)
}

/// Turns given back to the executor by a long computation on a shard (a scan, a
/// digest) between its slices.
///
/// `glommio::yield_if_needed` yields only once the preempt timer (100 ms) fires, and a
/// plain yield keeps the task runnable, so the executor runs it again before it next
/// polls its rings: either way the other connections' reads and completions on the
/// shard waited up to 100 ms behind one query. A turn here sleeps on a timer instead,
/// so the executor runs every other ready task, polls its rings, and only then comes
/// back (a sleeping task also makes the latency ring preempt a busy executor).
pub struct Turns {
    every: std::time::Duration,
    since: std::time::Instant,
}

impl Turns {
    /// Gives a turn after every `every` of computation.
    pub fn new(every: std::time::Duration) -> Turns {
        Turns {
            every,
            since: std::time::Instant::now(),
        }
    }

    /// Called between slices: gives a turn when one is due, else yields only if the
    /// executor asks.
    pub async fn between_slices(&mut self) {
        if self.since.elapsed() >= self.every {
            glommio::timer::sleep(std::time::Duration::from_micros(1)).await;
            self.since = std::time::Instant::now();
        } else {
            glommio::yield_if_needed().await;
        }
    }
}
