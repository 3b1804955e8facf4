//! A shard's checkpoints and what they let go: writing one of the applied state,
//! counting failures, and releasing the log segments a checkpoint covers (held back
//! by the archive shipper's barrier).

use super::*;
use oc_io::StorageFile;

impl<S: Storage> Shard<S> {
    /// Writes a checkpoint of the applied state without stopping writes. When the state
    /// is exactly the newest checkpoint's (nothing applied since), nothing is written and
    /// that checkpoint is returned: rewriting one at the same LSN would gain nothing and
    /// replace a good file with a new one under the same name.
    pub async fn checkpoint(&self) -> Result<CheckpointInfo, EngineError> {
        if let Some(info) = self.checkpoint_if_unchanged() {
            return Ok(info);
        }
        let config = self.wal.config();
        let log_bytes = || self.wal.bytes_written();
        let info = checkpoint::write_checkpoint(
            &self.storage,
            &self.state,
            config.shard,
            self.wal.epoch(),
            checkpoint::PaceBy {
                log_bytes: &log_bytes,
                log_budget: self.checkpoint_log_budget.get(),
            },
        )
        .await?;
        *self.last_checkpoint.borrow_mut() = Some(info.clone());
        *self.newest_checkpoint.borrow_mut() = Some(info.clone());
        // Writes applied while the copy ran are not all in it: the state may differ from
        // the checkpoint since the moment it started.
        self.differs_since.set(info.created);
        let (done, failed) = self.checkpoint_counts.get();
        self.checkpoint_counts.set((done + 1, failed));
        Ok(info)
    }

    /// The newest checkpoint, if the state is still exactly what it holds.
    fn checkpoint_if_unchanged(&self) -> Option<CheckpointInfo> {
        let newest = self.newest_checkpoint.borrow();
        newest
            .as_ref()
            .filter(|info| info.lsn == self.applied_lsn())
            .cloned()
    }

    /// Whether the state is exactly the newest checkpoint's (an empty shard without one
    /// counts as unchanged too: there is nothing a checkpoint would cover). While it
    /// is, the moment the state may start to differ moves with the clock, so the
    /// checkpoint age of the first write after a long idle counts from about then
    /// (the scheduler asks every second; a scrape asks too), not from the old
    /// checkpoint.
    pub fn unchanged_since_checkpoint(&self) -> bool {
        let covered = self
            .newest_checkpoint
            .borrow()
            .as_ref()
            .map_or(Lsn::ZERO, |info| info.lsn);
        let unchanged = covered == self.applied_lsn();
        if unchanged {
            self.differs_since.set(TimestampMicros::now());
        }
        unchanged
    }

    /// Log bytes between two checkpoints: a checkpoint is paced to end before the log
    /// has grown by this much again (`checkpoint::pace`).
    pub fn set_checkpoint_log_budget(&self, bytes: u64) {
        self.checkpoint_log_budget.set(bytes);
    }

    pub(crate) fn count_checkpoint_failure(&self) {
        let (done, failed) = self.checkpoint_counts.get();
        self.checkpoint_counts.set((done, failed + 1));
    }

    /// Checkpoint age, duration, size and counters (`oc_checkpoint_age_s` and friends).
    /// The age is 0 while the state equals the newest checkpoint (an idle shard is
    /// never overdue), else the time since it may have started to differ.
    pub fn checkpoint_metrics(&self) -> crate::scheduler::CheckpointMetrics {
        let age_s = if self.unchanged_since_checkpoint() {
            0.0
        } else {
            TimestampMicros::now()
                .0
                .saturating_sub(self.differs_since.get().0) as f64
                / 1e6
        };
        let last = self.last_checkpoint.borrow();
        let (checkpoints_total, failures_total) = self.checkpoint_counts.get();
        crate::scheduler::CheckpointMetrics {
            age_s,
            last_duration_s: last.as_ref().map_or(0.0, |i| i.duration.as_secs_f64()),
            last_bytes: last.as_ref().map_or(0, |i| i.data_bytes),
            checkpoints_total,
            failures_total,
        }
    }

    /// Opens the newest checkpoint for a new follower to copy: its LSN, its manifest
    /// file's bytes and how many bytes of its snapshot to send (its data, to the end of
    /// its last block). The snapshot stays open until [`Shard::close_checkpoint_copy`],
    /// so a newer checkpoint pruning it cannot cut the copy short, and the log after it
    /// is held (below the shipper's barrier and the checkpoints' own) until a stream
    /// reaches it or `hold` has passed, so the follower can stream from it.
    pub async fn open_checkpoint_copy(
        &self,
        hold: std::time::Duration,
    ) -> Result<Option<(Lsn, Vec<u8>, u64)>, EngineError> {
        let Some(&lsn) = checkpoint::list_checkpoints(&self.storage).await?.first() else {
            return Ok(None);
        };
        let manifest_bytes =
            checkpoint::read_file(&self.storage, &checkpoint::manifest_name(lsn)).await?;
        let manifest = checkpoint::CheckpointManifest::decode_for(&manifest_bytes, lsn).map_err(
            |problem| crate::error::UnreadableFile {
                file: checkpoint::manifest_name(lsn),
                problem,
            },
        )?;
        let snapshot = self.storage.open(&checkpoint::snapshot_name(lsn)).await?;
        let send = oc_io::align_up(manifest.data_bytes).min(snapshot.len().await?);
        *self.checkpoint_copy.borrow_mut() = Some(Rc::new(snapshot));
        let until = std::time::Instant::now() + hold;
        let held = match self.follower_hold.get() {
            Some((older, expires)) if expires > std::time::Instant::now() => older.min(lsn.next()),
            _ => lsn.next(),
        };
        self.follower_hold.set(Some((held, until)));
        Ok(Some((lsn, manifest_bytes, send)))
    }

    /// `len` bytes from `offset` of the snapshot [`Shard::open_checkpoint_copy`] opened.
    pub async fn read_checkpoint_copy(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let file = self
            .checkpoint_copy
            .borrow()
            .clone()
            .ok_or_else(|| EngineError::NotFound {
                what: "checkpoint copy",
                name: "open".into(),
            })?;
        let mut bytes = vec![0u8; len];
        file.read_at(offset, &mut bytes).await?;
        Ok(bytes)
    }

    /// Ends a copy (the log stays held as [`Shard::open_checkpoint_copy`] said).
    pub fn close_checkpoint_copy(&self) {
        self.checkpoint_copy.borrow_mut().take();
    }

    /// A follower streams from `after`: a hold at or below it is no longer needed.
    pub fn follower_streams_from(&self, after: Lsn) {
        if self
            .follower_hold
            .get()
            .is_some_and(|(held, _)| after.next() >= held)
        {
            self.follower_hold.set(None);
        }
    }

    /// The epoch of the newest checkpoint loaded or written (a follower whose log
    /// holds no frame after it names its position with this epoch).
    pub fn newest_checkpoint_epoch(&self) -> Option<Epoch> {
        self.newest_checkpoint
            .borrow()
            .as_ref()
            .map(|info| info.epoch)
    }

    /// The last checkpoint this process wrote (for `oc_checkpoint_age_s` and friends).
    pub fn last_checkpoint(&self) -> Option<CheckpointInfo> {
        self.last_checkpoint.borrow().clone()
    }

    /// Releases log segments that every kept checkpoint covers and that lie below the
    /// release barrier and a new follower's hold, if they are set.
    pub async fn release_covered_wal(&self) -> Result<Vec<String>, EngineError> {
        let kept = checkpoint::list_checkpoints(&self.storage).await?;
        let Some(oldest) = kept.last() else {
            return Ok(Vec::new());
        };
        let covered = oldest.next();
        let mut limit = self
            .release_barrier
            .get()
            .map_or(covered, |barrier| barrier.min(covered));
        if let Some((held, until)) = self.follower_hold.get() {
            if until > std::time::Instant::now() {
                limit = limit.min(held);
            } else {
                self.follower_hold.set(None);
            }
        }
        Ok(self.wal.release_before(limit).await?)
    }

    /// Holds back the release of log segments from `first_kept` on: the hook for the
    /// archive shipper, which sets it to the first LSN not yet durably archived, so no
    /// segment leaves the disk before the archive has it. `None` lifts the barrier.
    pub fn set_release_barrier(&self, first_kept: Option<Lsn>) {
        self.release_barrier.set(first_kept);
    }
}
