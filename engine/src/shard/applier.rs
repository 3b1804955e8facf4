//! The applier: commands placed in the log wait here in LSN order and are applied,
//! each once its log group is durable, by one task that does not depend on the
//! callers' futures; each caller's slot then gets its outcome.

use super::*;

/// A caller's slot for the result of its command.
#[derive(Default)]
pub(super) struct Slot {
    pub(super) outcome: Option<Outcome>,
    pub(super) waker: Option<Waker>,
    /// Set by a timed write (`stages`): the applier stamps when it found the command
    /// durable and when it had applied it.
    pub(super) timed: bool,
    pub(super) durable_at: Option<std::time::Instant>,
    pub(super) applied_at: Option<std::time::Instant>,
}

pub(super) struct Queued {
    pub(super) tenant: TenantId,
    pub(super) command: Command,
    /// `record::write_request_hash` of the logged bytes, for `apply_logged`.
    pub(super) request_hash: Option<u64>,
    pub(super) pending: Pending,
    pub(super) slot: Rc<RefCell<Slot>>,
}

/// Commands placed in the log, in LSN order, waiting to be applied.
#[derive(Default)]
pub(super) struct ApplyQueue {
    pub(super) queued: VecDeque<Queued>,
    pub(super) applier: Option<Waker>,
}

/// The fewest commands worth splitting into two groups of the log (see below).
const COHORT_TO_SPLIT: usize = 4;

/// Applies queued commands in order as each becomes durable, and publishes what each
/// changed to the feed's listeners.
///
/// When the commands durable now are all the log has (nothing else being written or
/// waiting to be), their callers are one cohort: each writes again once applied, and
/// the log would write their next group only after all were applied and written
/// again, its disk idle meanwhile. So the applier yields once halfway through: the
/// first half's next writes go to the log as one group while the second half is
/// applied, and the log writes the second half's next group while the first is still
/// on its way (`oc_io`'s group commit keeps two writes in flight). The two cohorts
/// then stay apart on their own.
pub(super) async fn run_applier<S: Storage>(
    state: Rc<RefCell<ShardState>>,
    queue: Rc<RefCell<ApplyQueue>>,
    feed: Rc<Feed>,
    epoch: Rc<std::cell::Cell<oc_io::Epoch>>,
    wal: Rc<Wal<S>>,
) {
    // Commands left to apply before the applier yields to split a cohort.
    let mut split_in: Option<usize> = None;
    loop {
        let front = poll_fn(|cx| {
            let mut q = queue.borrow_mut();
            match q.queued.pop_front() {
                Some(item) => Poll::Ready(item),
                None => {
                    q.applier = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await;
        let timed = front.slot.borrow().timed;
        let outcome = match front.pending.durable_at().await {
            Ok((lsn, committed)) => {
                if split_in.is_none() && wal.settled() {
                    let cohort = queue.borrow().queued.len() + 1;
                    split_in = (cohort >= COHORT_TO_SPLIT).then_some(cohort / 2);
                }
                if timed {
                    front.slot.borrow_mut().durable_at = Some(std::time::Instant::now());
                }
                let mut state = state.borrow_mut();
                // Only a listened-to tenant pays for describing its command; the events
                // are described before the apply consumes it, and dropped if it refuses.
                let events = feed.listening(&front.tenant).then(|| {
                    feed::describe(
                        lsn,
                        &front.command,
                        feed::current_schema(&state, &front.tenant),
                    )
                });
                let applied = apply_logged(
                    &mut state,
                    &front.tenant,
                    lsn,
                    committed,
                    front.command,
                    front.request_hash,
                );
                let changed = applied.as_ref().is_ok_and(|a| feed::changed(lsn, a));
                if let (Some(events), true) = (events, changed) {
                    if !events.is_empty() {
                        let batch = ChangeBatch::new(
                            lsn,
                            epoch.get(),
                            Some(std::time::Instant::now()),
                            events,
                        );
                        feed.publish(&front.tenant, batch);
                    }
                }
                feed.advance(lsn);
                applied.map(|a| (lsn, a))
            }
            Err(e) => Err(EngineError::from(e)),
        };
        {
            let mut slot = front.slot.borrow_mut();
            if timed {
                slot.applied_at = Some(std::time::Instant::now());
            }
            slot.outcome = Some(outcome);
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
        if let Some(left) = split_in {
            if left <= 1 {
                futures_lite::future::yield_now().await;
                split_in = None;
            } else {
                split_in = Some(left - 1);
            }
        }
    }
}
