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

/// Applies queued commands in order as each becomes durable, and publishes what each
/// changed to the feed's listeners.
pub(super) async fn run_applier(
    state: Rc<RefCell<ShardState>>,
    queue: Rc<RefCell<ApplyQueue>>,
    feed: Rc<Feed>,
    epoch: Rc<std::cell::Cell<oc_io::Epoch>>,
) {
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
        let mut slot = front.slot.borrow_mut();
        if timed {
            slot.applied_at = Some(std::time::Instant::now());
        }
        slot.outcome = Some(outcome);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
    }
}
