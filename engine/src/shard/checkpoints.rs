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
        let info = checkpoint::write_checkpoint(
            &self.storage,
            &self.state,
            config.shard,
            self.wal.epoch(),
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

    /// The newest checkpoint on disk, as a new follower copies it: its LSN, its
    /// manifest file's bytes and its snapshot file's length. Kept checkpoints hold the
    /// log after them (segments go only once every kept checkpoint covers them), so
    /// the log after the newest stays long enough for the follower to stream it.
    pub async fn newest_checkpoint_files(
        &self,
    ) -> Result<Option<(Lsn, Vec<u8>, u64)>, EngineError> {
        let Some(&lsn) = checkpoint::list_checkpoints(&self.storage).await?.first() else {
            return Ok(None);
        };
        let manifest =
            checkpoint::read_file(&self.storage, &checkpoint::manifest_name(lsn)).await?;
        let snapshot = self.storage.open(&checkpoint::snapshot_name(lsn)).await?;
        Ok(Some((lsn, manifest, snapshot.len().await?)))
    }

    /// `len` bytes of the snapshot of the checkpoint at `lsn`, from `offset`.
    pub async fn read_checkpoint_snapshot(
        &self,
        lsn: Lsn,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let file = self.storage.open(&checkpoint::snapshot_name(lsn)).await?;
        let mut bytes = vec![0u8; len];
        file.read_at(offset, &mut bytes).await?;
        Ok(bytes)
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
    /// release barrier, if one is set.
    pub async fn release_covered_wal(&self) -> Result<Vec<String>, EngineError> {
        let kept = checkpoint::list_checkpoints(&self.storage).await?;
        let Some(oldest) = kept.last() else {
            return Ok(Vec::new());
        };
        let covered = oldest.next();
        let limit = self
            .release_barrier
            .get()
            .map_or(covered, |barrier| barrier.min(covered));
        Ok(self.wal.release_before(limit).await?)
    }

    /// Holds back the release of log segments from `first_kept` on: the hook for the
    /// archive shipper, which sets it to the first LSN not yet durably archived, so no
    /// segment leaves the disk before the archive has it. `None` lifts the barrier.
    pub fn set_release_barrier(&self, first_kept: Option<Lsn>) {
        self.release_barrier.set(first_kept);
    }
}
