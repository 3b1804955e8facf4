//! A shard: the tenants it owns and its write-ahead log, on one executor, no locks.
//!
//! A mutation is validated against the current state, placed in the log, and applied
//! only once durable, strictly in LSN order, by the shard's applier task. The applier
//! does not depend on the caller's future: a caller that gives up (a dropped HTTP
//! request) cannot stall the queue, and its command is still applied in its turn.
//! Applying ([`apply`]) is deterministic and never fails the shard, so replaying the
//! log after a crash rebuilds exactly the state the live shard had. Reads therefore
//! only ever see durable data.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::{Poll, Waker};

use glommio::Task;
use oc_io::{Epoch, Lsn, Pending, RecoveryReport, Storage, TimestampMicros, Wal, WalConfig};

use crate::apply::{apply_logged, remembered};
pub use crate::apply::{Applied, ShardState};

mod applier;
mod changes;
mod checkpoints;
mod migrations;
mod replica;
pub use migrations::{spawn_backfill, BackfillProgress, BackfillRateLimiter, MigrationMetrics};

use crate::checkpoint::{self, CheckpointInfo};
use crate::command::Command;
use crate::error::{EngineError, FileProblem, UnreadableFile};
use crate::feed::{self, ChangeBatch, Feed};
use crate::idempotency;
use crate::query::{
    self, AskAnswer, AskLimits, Execution, PlanCache, PlanCacheStats, QueryError, QueryErrorKind,
};
use crate::quota::{TenantQueryMemory, TenantQuotas};
use crate::record;
use crate::schema::TableSchema;
use crate::stages::{Laps, Side, Stage};
use crate::table::{BatchOutcome, Table, WriteOp};
use crate::tenant::Tenant;
use crate::tenant_id::TenantId;
use crate::value::Value;
use applier::{run_applier, ApplyQueue, Queued, Slot};
pub use changes::ChangesRead;

type Outcome = Result<(Lsn, Applied), EngineError>;

/// What opening a shard found and did.
#[derive(Debug, Clone)]
pub struct ShardOpenReport {
    /// The checkpoint the state was loaded from, if any.
    pub checkpoint: Option<Lsn>,
    /// Newer checkpoints that could not be used, with the reason (recovery fell back).
    pub unusable_checkpoints: Vec<(Lsn, crate::error::UnreadableFile)>,
    pub wal: RecoveryReport,
}

/// The tenant, command and request hash a log frame holds.
fn logged_command(frame: &oc_io::Frame<'_>) -> Result<(TenantId, Command, Option<u64>), String> {
    let tenant = std::str::from_utf8(frame.tenant)
        .ok()
        .and_then(|t| TenantId::parse(t).ok())
        .ok_or_else(|| format!("bad tenant tag {:?}", String::from_utf8_lossy(frame.tenant)))?;
    let command = record::decode(frame.kind, frame.payload).map_err(|e| e.to_string())?;
    let request_hash = record::write_request_hash(frame.kind, frame.payload);
    Ok((tenant, command, request_hash))
}

/// What a command waits for once it is durable and applied, before its caller is told
/// (the server's gate: its lease still held; with synchronous replication, followers
/// holding the command durable). A refusal leaves the command applied here: the caller
/// hears it was not acknowledged, and may retry it with its idempotency key.
pub trait AckGate {
    fn admit(
        &self,
        lsn: Lsn,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), EngineError>> + '_>>;
}

/// A shard over `S` storage.
pub struct Shard<S: Storage> {
    storage: S,
    wal: Rc<Wal<S>>,
    /// The last checkpoint this process wrote.
    last_checkpoint: RefCell<Option<CheckpointInfo>>,
    /// The newest usable checkpoint on disk: loaded at open or written since.
    newest_checkpoint: RefCell<Option<CheckpointInfo>>,
    /// Since when the state has (possibly) differed from the newest checkpoint: that
    /// checkpoint's start, or the last time the two were seen equal, or the open when
    /// there is no checkpoint. `oc_checkpoint_age_s` counts from here.
    differs_since: std::cell::Cell<TimestampMicros>,
    checkpoint_counts: std::cell::Cell<(u64, u64)>,
    /// Log bytes between two checkpoints, which a checkpoint's pace keeps to (the
    /// scheduler's `wal_bytes`).
    checkpoint_log_budget: std::cell::Cell<u64>,
    release_barrier: std::cell::Cell<Option<Lsn>>,
    /// A new follower's copy of the newest checkpoint: its snapshot, open.
    checkpoint_copy: RefCell<Option<Rc<S::File>>>,
    /// The log from this LSN on is kept for a new follower until then.
    follower_hold: std::cell::Cell<Option<(Lsn, std::time::Instant)>>,
    state: Rc<RefCell<ShardState>>,
    queue: Rc<RefCell<ApplyQueue>>,
    feed: Rc<Feed>,
    replays: glommio::sync::Semaphore,
    /// Per tenant with resumes waiting or reading: its one turn at `replays`, so that one
    /// tenant's many resumes queue behind each other, not in front of other tenants'.
    replay_turns: RefCell<HashMap<TenantId, Rc<glommio::sync::Semaphore>>>,
    /// Per tenant, the turns its running queries take at once ([`ASK_TURNS_PER_TENANT`]).
    ask_turns: RefCell<HashMap<TenantId, Rc<glommio::sync::Semaphore>>>,
    /// Queries that found their tenant's turns all taken, since start.
    ask_turn_waits: std::cell::Cell<u64>,
    /// Keyed writes on their way (from their checks to their answer): a repeat of one
    /// waits for it instead of logging the batch again.
    keyed_in_flight: KeyedWrites,
    plan_cache: RefCell<PlanCache>,
    quotas: std::cell::Cell<TenantQuotas>,
    ack_gate: RefCell<Option<Rc<dyn AckGate>>>,
    /// The epoch the applier gives change batches (the log's).
    feed_epoch: Rc<std::cell::Cell<oc_io::Epoch>>,
    /// Bytes of write records this shard logged for its clients (the backfill
    /// limiter's input).
    foreground_bytes: std::cell::Cell<u64>,
    /// The backfill driver's account of each migration it advanced.
    backfill: RefCell<HashMap<(TenantId, u64), migrations::BackfillAccount>>,
    backfill_rows: std::cell::Cell<u64>,
    backfill_share: std::cell::Cell<f64>,
    _applier: Task<()>,
    /// Checks the log segments the open did not read (`Wal::check_unread_segments`).
    _unread_log_check: Task<()>,
}

/// The keyed writes on their way, by tenant and key: each one's semaphore is closed
/// when it is done.
type KeyedWrites = Rc<RefCell<HashMap<(TenantId, String), Rc<glommio::sync::Semaphore>>>>;

/// A keyed write on its way; repeats of its key wait until it is dropped.
struct KeyedWrite {
    map: KeyedWrites,
    id: (TenantId, String),
    done: Rc<glommio::sync::Semaphore>,
}

impl KeyedWrite {
    /// Waits while another write of `key` is on its way, then stands for this one.
    async fn wait_and_enter(map: &KeyedWrites, tenant: &TenantId, key: &str) -> KeyedWrite {
        let id = (tenant.clone(), key.to_string());
        loop {
            let first = map.borrow().get(&id).cloned();
            match first {
                // Its acquire fails when the first is done (the semaphore is closed).
                Some(done) => {
                    let _ = done.acquire(1).await;
                }
                None => break,
            }
        }
        let done = Rc::new(glommio::sync::Semaphore::new(0));
        map.borrow_mut().insert(id.clone(), done.clone());
        KeyedWrite {
            map: map.clone(),
            id,
            done,
        }
    }
}

impl Drop for KeyedWrite {
    fn drop(&mut self) {
        self.map.borrow_mut().remove(&self.id);
        // Wakes every waiting repeat (their acquire fails).
        self.done.close();
    }
}

/// Queries of one tenant that run their slices at once on a shard; its others wait
/// for a turn (within their deadline). The slices of every running query take turns
/// on the shard's thread, so 200 running scans of one tenant held another tenant's
/// point read behind 200 slices (0.4 s); now behind at most this many of each tenant.
pub const ASK_TURNS_PER_TENANT: u64 = 4;

/// A tenant's turns at something on this shard (running queries, reading the log for
/// resumes), shared by those of its requests running or waiting; the last one done
/// forgets them.
struct TenantTurns<'m> {
    map: &'m RefCell<HashMap<TenantId, Rc<glommio::sync::Semaphore>>>,
    tenant: TenantId,
    turns: Rc<glommio::sync::Semaphore>,
}

impl<'m> TenantTurns<'m> {
    fn of(
        map: &'m RefCell<HashMap<TenantId, Rc<glommio::sync::Semaphore>>>,
        tenant: &TenantId,
        per_tenant: u64,
    ) -> Self {
        let turns = map
            .borrow_mut()
            .entry(tenant.clone())
            .or_insert_with(|| Rc::new(glommio::sync::Semaphore::new(per_tenant)))
            .clone();
        TenantTurns {
            map,
            tenant: tenant.clone(),
            turns,
        }
    }
}

impl Drop for TenantTurns<'_> {
    fn drop(&mut self) {
        // Held by the map and this request alone: no other runs or waits.
        if Rc::strong_count(&self.turns) == 2 {
            self.map.borrow_mut().remove(&self.tenant);
        }
    }
}

/// How fast the log the open did not read is checked afterwards. At 64 MB/s the writes
/// beside it had 2.4 times the p99, at 16 MB/s 1.6 times; at 4 MB/s the same p99
/// (BENCHMARKS.md, "Recovery reads only the log it replays"). The up to 3 GiB a shard
/// keeps at the defaults then take 13 minutes, soon enough for an alert.
const UNREAD_LOG_CHECK_BYTES_PER_S: u64 = 4_000_000;

/// What to do with a follower's directory whose checkpoints all hold writes off its
/// writer's history.
const REJOIN_NEEDS_A_COPY: &str = "this directory cannot rejoin its writer without a \
    re-copy; move it aside and start the follower on an empty one (RUNBOOK.md, \
    re-adding the old writer)";

/// Whether a checkpoint at `lsn`, taken while the log wrote `epoch`, is past where its
/// epoch ended on the history a follower's log keeps to (never, when there is none).
fn off_history(config: &WalConfig, lsn: Lsn, epoch: Epoch) -> bool {
    config
        .history
        .as_ref()
        .is_some_and(|history| history.position(epoch, lsn) == oc_io::Position::Off)
}

impl<S: Storage> Shard<S> {
    /// Loads the newest usable checkpoint (falling back to older ones), replays the
    /// log after it, and starts the applier.
    pub async fn open(
        storage: S,
        config: WalConfig,
    ) -> Result<(Self, ShardOpenReport), EngineError> {
        let stale = checkpoint::remove_stale_files(&storage).await?;
        if !stale.is_empty() {
            tracing::info!(?stale, "removed files of interrupted checkpoints");
        }
        let mut unusable = Vec::new();
        let mut loaded = None;
        for lsn in checkpoint::list_checkpoints(&storage).await? {
            match checkpoint::load_checkpoint(&storage, lsn).await {
                Ok((_, info)) if off_history(&config, info.lsn, info.epoch) => {
                    let problem = FileProblem::OffHistory {
                        lsn: info.lsn.0,
                        epoch: info.epoch.0,
                    };
                    tracing::warn!(checkpoint = lsn.0, %problem, "checkpoint set aside as diverged-checkpoint-*; trying an older one");
                    checkpoint::set_aside(&storage, lsn).await?;
                    let file = checkpoint::manifest_name(lsn);
                    unusable.push((lsn, UnreadableFile { file, problem }));
                }
                Ok(loaded_state) => {
                    loaded = Some(loaded_state);
                    break;
                }
                Err(why) => {
                    tracing::warn!(checkpoint = lsn.0, %why, "checkpoint unusable; trying an older one");
                    unusable.push((lsn, why));
                }
            }
        }
        let (newest_checkpoint, mut state) = match loaded {
            Some((state, info)) => (Some(info), state),
            None => (None, ShardState::default()),
        };
        let checkpoint = newest_checkpoint.as_ref().map(|info| info.lsn);
        let replay_from = state.applied_lsn.next();
        let opened = Wal::open(storage.clone(), config, replay_from, |frame| {
            let (tenant, command, request_hash) = logged_command(frame)?;
            // A refused command was refused live too: it changes nothing either way.
            let _ = apply_logged(
                &mut state,
                &tenant,
                frame.lsn,
                frame.commit_ts,
                command,
                request_hash,
            );
            Ok(())
        })
        .await;
        let (wal, report) = match opened {
            Ok(opened) => opened,
            Err(oc_io::Error::MissingFrames {
                wanted,
                first_available,
            }) => {
                return Err(EngineError::Replay {
                    lsn: wanted.0,
                    why: format!(
                        "no usable checkpoint covers the log before LSN {first_available} \
                         ({}); {}",
                        if let Some(lsn) = checkpoint {
                            format!(
                                "the checkpoint at LSN {lsn} loaded, but the log after it is \
                                 missing: were segments deleted?"
                            )
                        } else if unusable.is_empty() {
                            "no checkpoint file is in the shard's directory: were they \
                             deleted?"
                                .to_string()
                        } else {
                            let unusable: Vec<_> =
                                unusable.iter().map(|(_, why)| why.to_string()).collect();
                            format!("unusable: {}", unusable.join("; "))
                        },
                        if unusable
                            .iter()
                            .any(|(_, why)| matches!(why.problem, FileProblem::OffHistory { .. }))
                        {
                            REJOIN_NEEDS_A_COPY
                        } else {
                            "restore from a replica or the archive"
                        }
                    ),
                })
            }
            Err(oc_io::Error::OffHistory { lsn, epoch }) => {
                return Err(EngineError::Replay {
                    lsn: lsn.0,
                    why: format!(
                        "the log's frame of epoch {} is not on the writer's history, and a \
                         checkpoint already holds it: {REJOIN_NEEDS_A_COPY}",
                        epoch.0
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let wal = Rc::new(wal);
        let state = Rc::new(RefCell::new(state));
        let queue = Rc::new(RefCell::new(ApplyQueue::default()));
        let feed = Rc::new(Feed::new(state.borrow().applied_lsn));
        let feed_epoch = Rc::new(std::cell::Cell::new(wal.epoch()));
        let applier = glommio::spawn_local(run_applier(
            state.clone(),
            queue.clone(),
            feed.clone(),
            feed_epoch.clone(),
            wal.clone(),
        ));
        let unread_log_check = glommio::spawn_local({
            let wal = wal.clone();
            async move {
                wal.check_unread_segments(UNREAD_LOG_CHECK_BYTES_PER_S)
                    .await;
            }
        });
        let report = ShardOpenReport {
            checkpoint,
            unusable_checkpoints: unusable,
            wal: report,
        };
        Ok((
            Shard {
                storage,
                wal,
                last_checkpoint: RefCell::new(None),
                differs_since: std::cell::Cell::new(
                    newest_checkpoint
                        .as_ref()
                        .map_or_else(TimestampMicros::now, |info| info.created),
                ),
                newest_checkpoint: RefCell::new(newest_checkpoint),
                checkpoint_counts: std::cell::Cell::new((0, 0)),
                checkpoint_log_budget: std::cell::Cell::new(
                    crate::scheduler::CheckpointPolicy::default().wal_bytes,
                ),
                release_barrier: std::cell::Cell::new(None),
                checkpoint_copy: RefCell::new(None),
                follower_hold: std::cell::Cell::new(None),
                quotas: std::cell::Cell::new(TenantQuotas::default()),
                ack_gate: RefCell::new(None),
                feed_epoch,
                state,
                queue,
                feed,
                replays: glommio::sync::Semaphore::new(1),
                replay_turns: RefCell::default(),
                ask_turns: RefCell::new(HashMap::new()),
                ask_turn_waits: std::cell::Cell::new(0),
                keyed_in_flight: Rc::default(),
                plan_cache: RefCell::new(PlanCache::new(
                    query::PLAN_CACHE_ENTRIES,
                    query::PLAN_CACHE_BYTES,
                )),
                foreground_bytes: std::cell::Cell::new(0),
                backfill: RefCell::new(HashMap::new()),
                backfill_rows: std::cell::Cell::new(0),
                backfill_share: std::cell::Cell::new(0.0),
                _applier: applier,
                _unread_log_check: unread_log_check,
            },
            report,
        ))
    }

    /// What each tenant of this shard may store (checked when a write is admitted).
    pub fn set_quotas(&self, quotas: TenantQuotas) {
        self.quotas.set(quotas);
    }

    pub fn quotas(&self) -> TenantQuotas {
        self.quotas.get()
    }

    /// What every command waits for before its caller is told (none: nothing).
    pub fn set_ack_gate(&self, gate: Option<Rc<dyn AckGate>>) {
        *self.ack_gate.borrow_mut() = gate;
    }

    /// Passes the gate for a command at `lsn`, if there is a gate.
    async fn acknowledge(&self, lsn: Lsn) -> Result<(), EngineError> {
        let gate = self.ack_gate.borrow().clone();
        match gate {
            Some(gate) => gate.admit(lsn).await,
            None => Ok(()),
        }
    }

    /// Logs a command and waits until it is durable and applied. A command too large
    /// for one log record is refused here, before anything is logged, as the request's
    /// fault (a limit), never as a failure of the log.
    async fn commit(&self, tenant: &TenantId, command: Command) -> Outcome {
        let (kind, payload) = record::encode(&command);
        let request_hash = record::write_request_hash(kind, &payload);
        self.commit_encoded(
            tenant,
            command,
            (kind, payload),
            request_hash,
            &mut Laps::stopped(),
        )
        .await
    }

    /// [`Shard::commit`] of a command already encoded, with its
    /// [`record::write_request_hash`]; `laps` times its stages from admission on.
    async fn commit_encoded(
        &self,
        tenant: &TenantId,
        command: Command,
        (kind, payload): (oc_io::RecordKind, Vec<u8>),
        request_hash: Option<u64>,
        laps: &mut Laps,
    ) -> Outcome {
        let bytes = oc_io::wal::frame::frame_len(tenant.as_str().len(), payload.len());
        let limit = self.wal.config().max_frame_bytes();
        if bytes > limit {
            return Err(match command {
                Command::Write { .. } => EngineError::BatchTooLarge { bytes, limit },
                // Unreachable while the record limit is at least MAX_ONE_ROW_RECORD_BYTES
                // (record.rs proves every other command fits under it).
                _ => EngineError::LimitExceeded {
                    what: "bytes of the command's log record",
                    actual: bytes,
                    limit,
                },
            });
        }
        laps.lap(Stage::Admit);
        let pending = self
            .wal
            .submit(kind, tenant.as_str().as_bytes(), &payload)
            .await
            .map_err(|e| match e {
                oc_io::Error::OwnWritesStopped => EngineError::HandingOver(
                    "this writer is not taking writes: it stepped down for a switchover \
                     (send the write to the follower once it is promoted; until one is, or \
                     the step-down is called off, writes are refused), or is finishing at \
                     its start the promotion that made it the writer (retry in a moment); \
                     nothing was written"
                        .into(),
                ),
                e => e.into(),
            })?;
        laps.lap(Stage::LogSubmit);
        // No await between the submit and the push: the queue stays in LSN order.
        let slot = Rc::new(RefCell::new(Slot {
            timed: laps.is_running(),
            ..Slot::default()
        }));
        {
            let mut queue = self.queue.borrow_mut();
            queue.queued.push_back(Queued {
                tenant: tenant.clone(),
                command,
                request_hash,
                pending,
                slot: slot.clone(),
            });
            if let Some(w) = queue.applier.take() {
                w.wake();
            }
        }
        let outcome = poll_fn(|cx| {
            let mut slot = slot.borrow_mut();
            match slot.outcome.take() {
                Some(outcome) => Poll::Ready(outcome),
                None => {
                    slot.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        if let (Some(durable), Some(applied)) = {
            let slot = slot.borrow();
            (slot.durable_at, slot.applied_at)
        } {
            laps.lap_at(Stage::Durable, durable);
            laps.lap_at(Stage::Apply, applied);
            laps.lap(Stage::Wake);
        }
        // Timed whether it passes or not: a synchronous write that timed out waiting
        // for its followers is among the slowest.
        let acknowledged = self.acknowledge(outcome.0).await;
        laps.lap(Stage::Ack);
        acknowledged?;
        Ok(outcome)
    }

    pub async fn create_tenant(&self, tenant: &TenantId) -> Result<Lsn, EngineError> {
        if self.state.borrow().tenants.contains_key(tenant) {
            return Err(EngineError::AlreadyExists {
                what: "tenant",
                name: tenant.to_string(),
            });
        }
        Ok(self.commit(tenant, Command::CreateTenant).await?.0)
    }

    pub async fn drop_tenant(&self, tenant: &TenantId) -> Result<Lsn, EngineError> {
        self.read(tenant, |_| ())?;
        Ok(self.commit(tenant, Command::DropTenant).await?.0)
    }

    pub async fn create_table(
        &self,
        tenant: &TenantId,
        schema: TableSchema,
    ) -> Result<Lsn, EngineError> {
        self.read(tenant, |t| match t.table(&schema.name) {
            Ok(_) => Err(EngineError::AlreadyExists {
                what: "table",
                name: schema.name.clone(),
            }),
            Err(_) => Ok(()),
        })??;
        Ok(self.commit(tenant, Command::CreateTable(schema)).await?.0)
    }

    pub async fn drop_table(&self, tenant: &TenantId, table: &str) -> Result<Lsn, EngineError> {
        self.read(tenant, |t| t.table(table).map(|_| ()))??;
        let command = Command::DropTable {
            table: table.to_string(),
        };
        Ok(self.commit(tenant, command).await?.0)
    }

    /// Logs a new API key of `tenant` (its secret's SHA-256; the secret is not stored).
    pub async fn create_api_key(
        &self,
        tenant: &TenantId,
        key_id: &str,
        name: &str,
        secret_sha256: [u8; 32],
    ) -> Result<Lsn, EngineError> {
        self.read(tenant, |t| t.api_keys().validate_new(key_id, name))??;
        let command = Command::CreateApiKey {
            key_id: key_id.to_string(),
            name: name.to_string(),
            secret_sha256,
        };
        Ok(self.commit(tenant, command).await?.0)
    }

    pub async fn revoke_api_key(
        &self,
        tenant: &TenantId,
        key_id: &str,
    ) -> Result<Lsn, EngineError> {
        self.read(tenant, |t| {
            t.api_keys()
                .get(key_id)
                .map(|_| ())
                .ok_or_else(|| EngineError::NotFound {
                    what: "API key",
                    name: key_id.to_string(),
                })
        })??;
        let command = Command::RevokeApiKey {
            key_id: key_id.to_string(),
        };
        Ok(self.commit(tenant, command).await?.0)
    }

    /// Validates a batch of row operations, logs it, and returns its LSN and what it
    /// changed once it is durable and applied.
    pub async fn write(
        &self,
        tenant: &TenantId,
        table: &str,
        ops: &[WriteOp],
        idempotency_key: Option<String>,
    ) -> Result<(Lsn, BatchOutcome), EngineError> {
        let mut laps = Laps::start(Side::Owner);
        if let Some(key) = &idempotency_key {
            // The API refuses an empty key; the log format bounds the length.
            if key.len() > idempotency::MAX_KEY_BYTES {
                return Err(EngineError::LimitExceeded {
                    what: "idempotency key bytes",
                    actual: key.len(),
                    limit: idempotency::MAX_KEY_BYTES,
                });
            }
        }
        // A repeat sent while its key's first attempt is on its way (a client retrying at
        // once, or many at once) waits for that attempt to end, carried across a
        // cutover included, and is then answered as any repeat below; should the first
        // fail unlogged, one of them takes its place.
        let _in_flight = match &idempotency_key {
            Some(key) => Some(KeyedWrite::wait_and_enter(&self.keyed_in_flight, tenant, key).await),
            None => None,
        };
        if let Some(key) = &idempotency_key {
            // A retry of a write first sent before a migration's cutover.
            let first = self.read(tenant, |t| first_answer_across_cutover(t, table, ops, key))?;
            if let Some(first) = first {
                self.acknowledge(first.lsn).await?;
                return Ok((first.lsn, first.outcome));
            }
        }
        let (writes, table_version, migrating) = self.read(tenant, |t| {
            let target = t.table(table)?;
            let writes = target.validate_batch(ops)?;
            self.admit_writes(tenant, t, table, &writes)?;
            let migrating = t.migrations().active(table).is_some();
            Ok::<_, EngineError>((writes, target.version(), migrating))
        })??;
        // Only a migrating table can be cut over under this write: keep its rows to
        // carry them into the new shape then.
        let v0 = migrating.then(|| writes.clone());
        let key = idempotency_key.clone();
        match self
            .log_write(tenant, table, table_version, writes, key, &mut laps)
            .await
        {
            Err(EngineError::TableChanged { table: changed }) => {
                // The cutover applied between this write's validation and its apply
                // (its record was logged and refused): the write is carried into the
                // new shape and logged again, so the cutover costs the writer a frame,
                // not an error.
                let carried = v0.map(|v0| {
                    self.read(tenant, |t| {
                        let target = t.table(table)?;
                        let Some(carried) =
                            t.migrations()
                                .carry_across_cutover(target, table_version, &v0)
                        else {
                            return Ok(None);
                        };
                        let writes = carried?;
                        self.admit_writes(tenant, t, table, &writes)?;
                        Ok::<_, EngineError>(Some((writes, target.version())))
                    })
                });
                match carried.transpose()?.transpose()?.flatten() {
                    Some((writes, version)) => {
                        self.log_write(tenant, table, version, writes, idempotency_key, &mut laps)
                            .await
                    }
                    None => Err(EngineError::TableChanged { table: changed }),
                }
            }
            other => other,
        }
    }

    /// The checks every write passes before it is logged: an active migration can carry
    /// it, the tenant's quota and the shard's memory budget admit its growth.
    fn admit_writes(
        &self,
        tenant: &TenantId,
        t: &Tenant,
        table: &str,
        writes: &[crate::table::RowWrite],
    ) -> Result<(), EngineError> {
        // A write an active migration cannot carry is refused before it is logged; one
        // it carries grows by the values the migration appends to its row.
        let carried = t.migrations().carry(table, writes)?;
        let quotas = self.quotas.get();
        let totals = t.totals();
        let admit = |growth| {
            let growth = crate::quota::Growth::carried(growth, writes, carried.as_deref());
            quotas.admit(tenant.as_str(), &totals, growth)?;
            crate::quota::admit_memory(growth)
        };
        // Most batches are far from every limit: the bound admits them without a
        // lookup; one it refuses is judged on its exact growth.
        admit(Table::growth_bound(writes)).or_else(|_| admit(t.table(table)?.growth(writes)))
    }

    /// Logs validated writes against incarnation `table_version` of `table`; returns
    /// their LSN and outcome once durable and applied.
    async fn log_write(
        &self,
        tenant: &TenantId,
        table: &str,
        table_version: u64,
        writes: Vec<crate::table::RowWrite>,
        idempotency_key: Option<String>,
        laps: &mut Laps,
    ) -> Result<(Lsn, BatchOutcome), EngineError> {
        // The limiter's input, in the unit a backfill chunk spends: row bytes.
        let row_bytes = writes
            .iter()
            .map(|w| match w {
                crate::table::RowWrite::Upsert(row) => record::row_entry_bytes(row),
                crate::table::RowWrite::Delete(key) => key.len(),
            })
            .sum();
        let key = idempotency_key.clone();
        let command = Command::Write {
            table: table.to_string(),
            table_version,
            writes,
            idempotency_key,
        };
        // The hash a key remembers is read off the record's bytes, here and in apply.
        let (kind, payload) = record::encode(&command);
        let request_hash = record::write_request_hash(kind, &payload);
        if let (Some(key), Some(hash)) = (&key, request_hash) {
            // A repeat of a key already applied is answered without writing anything.
            // (No await since the caller's checks: the same state.)
            if let Some(first) = self.read(tenant, |t| remembered(t, key, hash))?? {
                // The first attempt may have been refused its acknowledgement.
                self.acknowledge(first.lsn).await?;
                return Ok((first.lsn, first.outcome));
            }
        }
        self.count_foreground(row_bytes);
        match self
            .commit_encoded(tenant, command, (kind, payload), request_hash, laps)
            .await?
        {
            (_, Applied::Written { lsn, outcome }) => Ok((lsn, outcome)),
            (_, other) => unreachable!("a write applies as a write, not {other:?}"),
        }
    }

    /// Runs `f` on a tenant's applied (durable) state.
    pub fn read<R>(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(&Tenant) -> R,
    ) -> Result<R, EngineError> {
        let state = self.state.borrow();
        let t = state
            .tenants
            .get(tenant)
            .ok_or_else(|| EngineError::NotFound {
                what: "tenant",
                name: tenant.to_string(),
            })?;
        Ok(f(t))
    }

    /// Runs a read query on a tenant's applied (durable) state: the plan comes from
    /// this shard's cache when the normalized text was seen before against the same
    /// schema; the scan runs in slices and yields between them when the executor has
    /// other work. `explain` adds the plan tree with per-stage figures.
    pub async fn ask(
        &self,
        tenant: &TenantId,
        sql: &str,
        params: Vec<Value>,
        explain: bool,
        limits: AskLimits,
    ) -> Result<AskAnswer, QueryError> {
        let unknown = || {
            QueryError::new(
                QueryErrorKind::UnknownTenant,
                format!("tenant {tenant} does not exist"),
            )
        };
        let normalized = query::normalize(sql)?;
        let (plan, cached, memory) = {
            let state = self.state.borrow();
            let t = state.tenants.get(tenant).ok_or_else(unknown)?;
            let (plan, cached) = self.plan_cache.borrow_mut().get_or_prepare(
                tenant,
                (t.schema_version(), t.migrations().generation()),
                &normalized,
                || query::prepare(t, &normalized),
            )?;
            (plan, cached, t.query_memory().clone())
        };
        let params = query::bind_params(&plan, params, normalized.literals)?;
        let turns = TenantTurns::of(&self.ask_turns, tenant, ASK_TURNS_PER_TENANT);
        let asked = std::time::Instant::now();
        if turns.turns.available() == 0 {
            self.ask_turn_waits.set(self.ask_turn_waits.get() + 1);
        }
        let waited =
            futures_lite::future::or(async { turns.turns.acquire_permit(1).await.ok() }, async {
                glommio::timer::sleep(limits.deadline).await;
                None
            })
            .await;
        let Some(_turn) = waited else {
            return Err(QueryError::new(
                QueryErrorKind::TurnsBusy,
                format!(
                    "the query waited its whole deadline of {} ms for a turn: tenant {tenant} \
                     runs at most {ASK_TURNS_PER_TENANT} queries at once on a shard, and its \
                     others held them; send fewer at once, or narrow them",
                    limits.deadline.as_millis()
                ),
            ));
        };
        let mut run = Execution::new(plan, params, limits, &memory)?;
        // The deadline counts from the question, the wait for a turn included.
        run.started_at(asked);
        if explain {
            run.analyze();
        }
        let mut turns = oc_io::executor::Turns::new(query::SLICE_TARGET);
        loop {
            let done = {
                let state = self.state.borrow();
                let t = state.tenants.get(tenant).ok_or_else(unknown)?;
                run.step(t)?
            };
            if done {
                break;
            }
            turns.between_slices().await;
        }
        run.finish(cached)
    }

    /// The share of the queries' memory `tenant`'s answers count toward, while it exists.
    pub fn tenant_query_memory(&self, tenant: &TenantId) -> Option<TenantQueryMemory> {
        let state = self.state.borrow();
        state.tenants.get(tenant).map(|t| t.query_memory().clone())
    }

    /// `/ask` queries that waited for a turn ([`ASK_TURNS_PER_TENANT`]), since start.
    pub fn ask_turn_waits(&self) -> u64 {
        self.ask_turn_waits.get()
    }

    /// Hits, misses and size of this shard's plan cache.
    pub fn plan_cache_stats(&self) -> PlanCacheStats {
        self.plan_cache.borrow().stats()
    }

    /// Runs `f` on the whole shard state (inside the engine: other crates read it
    /// through the methods named for what they need).
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&ShardState) -> R) -> R {
        f(&self.state.borrow())
    }

    /// The ids of this shard's tenants, in order.
    pub fn tenant_ids(&self) -> Vec<TenantId> {
        self.state.borrow().tenants.keys().cloned().collect()
    }

    /// (tenants, rows, bytes as stored) over the whole shard.
    pub fn totals(&self) -> (usize, usize, usize) {
        let state = self.state.borrow();
        state.tenants.values().fold((0, 0, 0), |(t, r, b), tenant| {
            let usage = tenant.usage();
            (t + 1, r + usage.rows, b + usage.bytes)
        })
    }

    pub fn applied_lsn(&self) -> Lsn {
        self.state.borrow().applied_lsn
    }

    /// The shard's change feed (`/watch` attaches here).
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The shard's log (stats, release of covered segments).
    pub fn wal(&self) -> &Wal<S> {
        &self.wal
    }

    /// Stops taking writes and waits for what was logged to be written.
    pub async fn close(&self) -> Result<(), EngineError> {
        self.wal.close().await?;
        Ok(())
    }
}

/// What a keyed write's first attempt answered, when that attempt was sent before the
/// cutover of a migration of `table` and was applied (in the old shape, or carried
/// into the new one): its key remembers the hash of a record the retry, validated
/// against the new shape, cannot reproduce.
fn first_answer_across_cutover(
    t: &Tenant,
    table: &str,
    ops: &[WriteOp],
    key: &str,
) -> Option<crate::idempotency::Remembered> {
    let first = *t.idempotency().get(key)?;
    let target = t.table(table).ok()?;
    t.migrations()
        .first_attempts_across_cutover(target, ops, key)
        .iter()
        .any(|command| {
            let (kind, payload) = record::encode(command);
            record::write_request_hash(kind, &payload) == Some(first.request_hash)
        })
        .then_some(first)
}
