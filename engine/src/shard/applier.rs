//! The applier: commands placed in the log wait here in LSN order and are applied,
//! each once its log group is durable, by one task that does not depend on the
//! callers' futures; each caller's slot then gets its outcome.

use super::*;
use crate::table::PREFETCH_CHUNK;

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

/// The fewest commands queued behind the front for [`ask_ahead`] to ask: two asks'
/// worth. With fewer, the shard keeps up with its writers, a commit waits on the disk
/// rather than on the applier, and what the ask saves did not show: at 64 single-row
/// writers (at most 63 queued behind the front), asking always gave 0.89–1.08× the
/// commits/s of not asking in 10 alternated pairs (BENCHMARKS "Single-row commands'
/// paths asked for ahead").
const BACKLOG_TO_ASK: usize = 2 * PREFETCH_CHUNK;

/// Asks for the row-tree paths of `front`, a single-row write, and of the single-row
/// writes to the same table queued behind it among the next commands
/// ([`PREFETCH_CHUNK`] in all), so that their cache misses overlap instead of following
/// one another command after command. A batch asks for its own rows
/// ([`Table::apply`]). Returns how many commands, `front` included, the ask covered.
fn ask_ahead(state: &ShardState, front: &Queued, queue: &ApplyQueue) -> usize {
    let Command::Write { table, writes, .. } = &front.command else {
        return 1;
    };
    if writes.len() != 1 || queue.queued.len() < BACKLOG_TO_ASK {
        return 1;
    }
    let Some(target) = state
        .tenants
        .get(&front.tenant)
        .and_then(|t| t.table(table).ok())
    else {
        return 1;
    };
    let behind = queue.queued.iter().take(PREFETCH_CHUNK - 1);
    let covered = 1 + behind.len();
    let commands = std::iter::once(front)
        .chain(behind)
        .map(|q| (&q.tenant, &q.command));
    target.prefetch_writes(single_row_writes(&front.tenant, table, commands));
    covered
}

/// The single-row writes among `commands` to `table` of `tenant`, as `(table_version,
/// writes)`.
fn single_row_writes<'a>(
    tenant: &'a TenantId,
    table: &'a str,
    commands: impl Iterator<Item = (&'a TenantId, &'a Command)>,
) -> impl Iterator<Item = (u64, &'a [crate::table::RowWrite])> {
    commands.filter_map(move |(of, command)| match command {
        Command::Write {
            table: to,
            table_version,
            writes,
            ..
        } if of == tenant && to == table && writes.len() == 1 => {
            Some((*table_version, writes.as_slice()))
        }
        _ => None,
    })
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
    // Commands, from the front, that the last ask covered (other tables' among them,
    // passed over): the next ask is at the first command after them.
    let mut covered = 0usize;
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
                if covered == 0 {
                    covered = ask_ahead(&state, &front, &queue.borrow());
                }
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
        covered = covered.saturating_sub(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::RowWrite;

    fn write(table: &str, table_version: u64, rows: &[i64]) -> Command {
        Command::Write {
            table: table.into(),
            table_version,
            writes: rows
                .iter()
                .map(|&id| RowWrite::upsert(&[Value::Int(id)]))
                .collect(),
            idempotency_key: None,
        }
    }

    /// The ask passes over other tenants, other tables, batches and other commands,
    /// and keeps each single-row write's table version for the table to check.
    #[test]
    fn the_ask_takes_the_single_row_writes_of_one_table_of_one_tenant() {
        let (acme, globex) = (
            TenantId::parse("acme").expect("valid"),
            TenantId::parse("globex").expect("valid"),
        );
        let commands = [
            (&acme, write("t", 3, &[1])),
            (&globex, write("t", 3, &[2])),
            (&acme, write("u", 3, &[3])),
            (&acme, write("t", 3, &[4, 5])),
            (&acme, Command::DropTable { table: "t".into() }),
            (&acme, write("t", 2, &[6])),
            (&acme, write("t", 3, &[7])),
        ];
        let taken: Vec<(u64, Vec<RowWrite>)> = single_row_writes(
            &acme,
            "t",
            commands.iter().map(|(tenant, command)| (*tenant, command)),
        )
        .map(|(version, writes)| (version, writes.to_vec()))
        .collect();
        assert_eq!(
            taken,
            vec![
                (3, vec![RowWrite::upsert(&[Value::Int(1)])]),
                (2, vec![RowWrite::upsert(&[Value::Int(6)])]),
                (3, vec![RowWrite::upsert(&[Value::Int(7)])]),
            ]
        );
    }
}
