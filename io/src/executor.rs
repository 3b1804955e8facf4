//! Building glommio executors that work under a small memlock limit. glommio's default
//! I/O memory (10 MiB of registered buffers) exceeds the 8 MiB `RLIMIT_MEMLOCK` of many
//! machines, so every executor of oc is built here with an explicit size.

use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};

/// Registered I/O memory per executor: room for two full group commits.
pub const DEFAULT_IO_MEMORY_BYTES: usize = 4 << 20;
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
