//! When a shard checkpoints: every `interval` (default hourly), or sooner once the log
//! has grown by `wal_bytes` since the last checkpoint, whichever comes first. After each
//! checkpoint, log segments every kept checkpoint covers are released (recycled).
//! A failed checkpoint is counted and retried at the next check; it never stops the
//! shard (the log keeps every frame until a checkpoint succeeds).

use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::Task;
use oc_io::Storage;

use crate::shard::Shard;

/// How often the scheduler looks at the log's growth.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// When to checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
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
    /// Seconds since the last successful checkpoint (or since the shard opened, if none):
    /// `oc_checkpoint_age_s`.
    pub age_s: f64,
    pub last_duration_s: f64,
    pub last_bytes: u64,
    pub checkpoints_total: u64,
    pub failures_total: u64,
}

/// Runs the policy for `shard` until the returned task is dropped.
pub fn spawn_checkpointer<S: Storage>(shard: Rc<Shard<S>>, policy: CheckpointPolicy) -> Task<()> {
    glommio::spawn_local(async move {
        let mut last = Instant::now();
        let mut bytes_at_last = shard.wal().stats().bytes_written;
        loop {
            glommio::timer::sleep(CHECK_EVERY.min(policy.interval)).await;
            let grown = shard.wal().stats().bytes_written - bytes_at_last;
            if last.elapsed() < policy.interval && grown < policy.wal_bytes {
                continue;
            }
            if shard.wal().failure().is_some() {
                return; // the shard needs a restart; nothing more will be applied
            }
            let outcome = async {
                shard.checkpoint().await?;
                shard.release_covered_wal().await
            };
            match outcome.await {
                Ok(released) => {
                    last = Instant::now();
                    bytes_at_last = shard.wal().stats().bytes_written;
                    tracing::info!(released = released.len(), "checkpoint written");
                }
                Err(e) => {
                    shard.count_checkpoint_failure();
                    tracing::warn!(error = %e, "checkpoint failed; retrying at the next check");
                }
            }
        }
    })
}
