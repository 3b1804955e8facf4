//! A follower's write path: frames the writer stamped, placed in this shard's log with
//! their LSNs, epochs and commit times kept (`Wal::submit_stamped`), then applied by
//! the same applier, in the same order, as the writer applied them.

use super::*;
use oc_io::OwnedFrame;

impl<S: Storage> Shard<S> {
    /// Places `frames` (consecutive, continuing this shard's log) in the log, queues
    /// each for the applier, and returns once the last is durable: the LSN up to which
    /// this shard now holds the writer's log. A frame this build cannot decode, or one
    /// that does not continue the log, is refused with nothing after it placed; the
    /// frames before it stay (they are the writer's log too).
    pub async fn replicate(&self, frames: &[OwnedFrame]) -> Result<Lsn, EngineError> {
        let mut last = None;
        for frame in frames {
            let (tenant, command, request_hash) =
                logged_command(&frame.as_frame()).map_err(|why| EngineError::Replay {
                    lsn: frame.lsn.0,
                    why,
                })?;
            let pending = self.wal.submit_stamped(frame).await?;
            last = Some(pending.clone());
            // No await between the submit and the push: the queue stays in LSN order.
            // Nobody waits on the slot: the outcome was the writer's too.
            let mut queue = self.queue.borrow_mut();
            queue.queued.push_back(Queued {
                tenant,
                command,
                request_hash,
                pending,
                slot: Rc::new(RefCell::new(Slot::default())),
            });
            if let Some(w) = queue.applier.take() {
                w.wake();
            }
        }
        match last {
            Some(pending) => Ok(pending.durable().await?),
            None => Ok(self.wal.durable_lsn()),
        }
    }

    /// A writer's shard stops taking writes (a switchover): from now on every write is
    /// refused with [`EngineError::HandingOver`] before it is logged, and this returns,
    /// once what was logged before is applied, the LSN where this shard's log ends.
    /// Gives up after `within`, or at once if the log has failed (writes stay stopped:
    /// [`Shard::resume_writes`]).
    pub async fn stop_writes(&self, within: std::time::Duration) -> Result<Lsn, EngineError> {
        self.wal.stop_own_writes();
        let deadline = std::time::Instant::now() + within;
        loop {
            // A failed log's end is not known: frames of a failed write may be on disk
            // past its durable LSN, so it cannot hand over where a new epoch would start.
            if let Some(failed) = self.wal.failure() {
                return Err(failed.into());
            }
            if self.wal.settled() && self.applied_lsn() >= self.wal.durable_lsn() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(EngineError::NotLeader(format!(
                    "writes taken before the handover were still being applied after {} ms",
                    within.as_millis()
                )));
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        Ok(self.applied_lsn())
    }

    /// Takes writes again after [`Shard::stop_writes`] (the handover was called off).
    pub fn resume_writes(&self) {
        self.wal.resume_own_writes();
    }

    /// This follower's shard becomes a writer's (promotion): once every frame placed
    /// is durable and applied, its log stamps its own frames with `epoch` from the
    /// next LSN on. Refused while frames are still on their way (try again).
    pub async fn take_writes(&self, epoch: oc_io::Epoch) -> Result<Lsn, EngineError> {
        // A replicate call still running may place more while this waits: wait until
        // what is placed is applied and nothing more came.
        let placed = loop {
            let (placed, _) = self.wal.last_placed();
            if placed > Lsn(0) {
                self.feed.published_after(Lsn(placed.0 - 1)).await;
            }
            if self.wal.last_placed().0 == placed {
                break placed;
            }
        };
        self.wal.take_writes(epoch)?;
        self.feed_epoch.set(epoch);
        Ok(placed.next())
    }
}
