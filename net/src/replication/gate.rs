//! The acknowledgement gate of a writer's shard (`oc_engine::AckGate`): what a
//! command that is durable and applied here still waits for before its caller is told.
//! With `--sync-replication`, `--sync-replicas` followers must hold it durable; the
//! control executor reads their acknowledgements and moves the gate forward through
//! the mesh. When they do not confirm within `--sync-timeout-ms`, the policy decides:
//! `refuse` answers `503 replication_unavailable` (the write stays applied here, so a
//! retry with its idempotency key is answered at once once a follower has it) and opens
//! a circuit: until the followers hold the write that timed out, later writes are
//! refused at once instead of each waiting out the timeout (which would hold every
//! in-flight slot for seconds while no follower is there); and
//! `degrade` acknowledges it anyway, says so in a log line and
//! `oc_replication_degraded`, and returns to synchronous once the followers hold the
//! write that timed out (if they are still slow, the next write's timeout degrades
//! again: each flip costs one write one timeout).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use oc_engine::wait_list::WaitList;
use oc_engine::{AckGate, EngineError};
use oc_io::Lsn;
use oc_ship::lease::LeaseHold;

/// What a follower that does not confirm in time costs a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// `503 replication_unavailable`: no write is acknowledged that a follower lacks.
    Refuse,
    /// Acknowledge without the followers, until they catch up.
    Degrade,
}

/// Synchronous replication's settings.
#[derive(Debug, Clone, Copy)]
pub struct SyncPolicy {
    pub replicas: usize,
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
}

/// Counters of one shard's gate, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GateCounters {
    /// Commands that had to wait for the followers.
    pub waits: u64,
    /// Waits that ran out (refused, or acknowledged degraded).
    pub timeouts: u64,
    pub degraded: bool,
    /// Refusing at once (`refuse`, after a timeout, until the followers catch up).
    pub circuit_open: bool,
    pub circuit_opened_total: u64,
}

/// One shard's gate (lives on the shard's executor).
pub struct Gate {
    /// `None`: asynchronous replication (only the lease is checked).
    policy: Option<SyncPolicy>,
    /// A replicating writer's hold on the lease: checked after everything else, so a
    /// writer whose lease may have lapsed (on this host's monotonic clock) acknowledges
    /// nothing.
    hold: Option<Arc<LeaseHold>>,
    /// Every LSN up to this is durable on `replicas` followers.
    replicated: Cell<Lsn>,
    /// While degraded or the circuit is open: the write that timed out, which the
    /// followers must hold before writes wait for them again.
    timed_out_at: Cell<Lsn>,
    waiters: WaitList,
    counters: Cell<GateCounters>,
}

thread_local! {
    /// This shard's gate, for the metrics snapshot.
    static GATE: RefCell<Option<Rc<Gate>>> = const { RefCell::new(None) };
}

impl Gate {
    /// A gate for this shard's thread, registered for [`local_counters`].
    pub fn install(policy: Option<SyncPolicy>, hold: Option<Arc<LeaseHold>>) -> Rc<Gate> {
        let gate = Rc::new(Gate {
            policy,
            hold,
            replicated: Cell::new(Lsn(0)),
            timed_out_at: Cell::new(Lsn(0)),
            waiters: WaitList::default(),
            counters: Cell::new(GateCounters::default()),
        });
        GATE.with(|g| *g.borrow_mut() = Some(gate.clone()));
        gate
    }

    /// The followers now hold every LSN up to `replicated` durable.
    pub fn advance(&self, replicated: Lsn) {
        if replicated <= self.replicated.get() {
            return;
        }
        self.replicated.set(replicated);
        self.waiters.wake_all();
        let counters = self.counters.get();
        if (counters.degraded || counters.circuit_open) && replicated >= self.timed_out_at.get() {
            self.count(|c| (c.degraded, c.circuit_open) = (false, false));
            tracing::warn!(
                lsn = replicated.0,
                "the followers caught up: writes are acknowledged synchronously again"
            );
        }
    }

    fn count(&self, update: impl FnOnce(&mut GateCounters)) {
        let mut counters = self.counters.get();
        update(&mut counters);
        self.counters.set(counters);
    }

    async fn admit_lsn(&self, lsn: Lsn) -> Result<(), EngineError> {
        if let Some(policy) = self.policy {
            self.wait_for(lsn, policy).await?;
        }
        if let Some(hold) = &self.hold {
            hold.check().map_err(|why| {
                EngineError::NotLeader(format!(
                    "this writer cannot confirm it still holds the lease, so it acknowledges \
                     nothing (the write at LSN {lsn} is durable here but not acknowledged): {why}"
                ))
            })?;
        }
        Ok(())
    }

    async fn wait_for(&self, lsn: Lsn, policy: SyncPolicy) -> Result<(), EngineError> {
        if self.replicated.get() >= lsn || self.counters.get().degraded {
            return Ok(());
        }
        if self.counters.get().circuit_open {
            return Err(EngineError::ReplicationUnavailable(format!(
                "the followers have not confirmed LSN {} yet, which timed out (--sync-timeout-ms \
                 {} ms): until they hold it, writes are refused at once (they are durable on \
                 the writer but not acknowledged); retry with the same idempotency_key once a \
                 follower is back",
                self.timed_out_at.get(),
                policy.timeout.as_millis()
            )));
        }
        self.count(|c| c.waits += 1);
        let replicated = async {
            self.waiters
                .wait_until(|| self.replicated.get() >= lsn)
                .await;
            true
        };
        let timeout = async {
            glommio::timer::sleep(policy.timeout).await;
            false
        };
        if futures_lite::future::or(replicated, timeout).await {
            return Ok(());
        }
        self.count(|c| c.timeouts += 1);
        match policy.on_timeout {
            OnTimeout::Degrade => {
                if !self.counters.get().degraded {
                    tracing::warn!(
                        lsn = lsn.0,
                        timeout_ms = policy.timeout.as_millis() as u64,
                        "the followers did not confirm in time: acknowledging writes without \
                         them (--sync-on-timeout degrade) until they catch up"
                    );
                }
                self.count(|c| c.degraded = true);
                self.timed_out_at.set(lsn);
                Ok(())
            }
            OnTimeout::Refuse => {
                if !self.counters.get().circuit_open {
                    tracing::error!(
                        lsn = lsn.0,
                        timeout_ms = policy.timeout.as_millis() as u64,
                        "the followers did not confirm in time: writes are refused at once \
                         (circuit open) until they hold this one"
                    );
                    self.count(|c| {
                        c.circuit_open = true;
                        c.circuit_opened_total += 1;
                    });
                    self.timed_out_at.set(lsn);
                }
                Err(EngineError::ReplicationUnavailable(format!(
                    "{} follower(s) did not confirm LSN {lsn} within {} ms (--sync-replication, \
                 --sync-timeout-ms): the write is durable on the writer but not acknowledged; \
                 retry it with the same idempotency_key once the follower is back",
                    policy.replicas,
                    policy.timeout.as_millis()
                )))
            }
        }
    }
}

impl AckGate for Gate {
    fn admit(&self, lsn: Lsn) -> Pin<Box<dyn Future<Output = Result<(), EngineError>> + '_>> {
        Box::pin(self.admit_lsn(lsn))
    }
}

/// This shard's gate counters, if it has a gate.
pub fn local_counters() -> Option<GateCounters> {
    GATE.with(|g| g.borrow().as_ref().map(|g| g.counters.get()))
}

/// Moves this shard's gate (called through the mesh by the control executor).
pub fn advance_local(replicated: Lsn) {
    GATE.with(|g| {
        if let Some(gate) = g.borrow().as_ref() {
            gate.advance(replicated);
        }
    });
}
