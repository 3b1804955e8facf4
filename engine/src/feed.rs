//! The change feed: what each applied command changed (table, key, operation, LSN), for
//! `/watch`. It costs the applier one hash lookup per command when no one listens.
//!
//! A listener is a *tap*: a bounded channel from this shard's applier to one consumer
//! (in the server, one per tenant and connection shard, which fans out to its streams).
//! The applier never waits on a tap: a full one is closed with [`TapEnd::Overflow`] and
//! its consumer starts over from the log. Batches are shared (`Arc`), never copied per
//! listener.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oc_io::{Epoch, Lsn};

use crate::apply::{Applied, ShardState};
use crate::command::Command;
use crate::schema::TableSchema;
use crate::table::RowWrite;
use crate::tenant_id::TenantId;
use crate::value::decode_key;

/// What kind of event a change is (its SSE `event:` name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A row was upserted or deleted.
    Change,
    /// A table was created or dropped.
    Schema,
    /// The tenant was dropped: nothing follows.
    TenantDropped,
    /// An API key of the tenant was revoked (`data` is its id): streams opened with it
    /// end. Never sent to a client.
    KeyRevoked,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Change => "change",
            EventKind::Schema => "schema",
            EventKind::TenantDropped => "tenant_dropped",
            EventKind::KeyRevoked => "key_revoked",
        }
    }
}

/// One event: its kind, the table it concerns (empty for the tenant) and its JSON data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub kind: EventKind,
    pub table: Box<str>,
    pub data: Box<str>,
}

/// The events of one command, at its LSN.
#[derive(Debug)]
pub struct ChangeBatch {
    pub lsn: Lsn,
    pub epoch: Epoch,
    /// When the applier published it (`None` when read back from the log).
    pub applied_at: Option<Instant>,
    pub events: Vec<ChangeEvent>,
    /// The one table all events concern (a command touches one table), or `None` for
    /// a tenant event (a drop, a key revoked): consumers route by it without looking at
    /// each event.
    pub table: Option<Box<str>>,
    /// Bytes of event data, for consumers' buffer accounting.
    pub bytes: usize,
}

impl ChangeBatch {
    pub fn new(
        lsn: Lsn,
        epoch: Epoch,
        applied_at: Option<Instant>,
        events: Vec<ChangeEvent>,
    ) -> Self {
        let table = match events.first() {
            Some(first) if first.kind == EventKind::Change || first.kind == EventKind::Schema => {
                Some(first.table.clone())
            }
            _ => None,
        };
        debug_assert!(events
            .iter()
            .all(|e| Some(&e.table) == table.as_ref() || table.is_none()));
        let bytes = events
            .iter()
            .map(|e| e.data.len() + e.table.len() + 32)
            .sum();
        ChangeBatch {
            lsn,
            epoch,
            applied_at,
            events,
            table,
            bytes,
        }
    }
}

/// Why a tap was closed by the applier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapEnd {
    /// Still open, or its shard stopped.
    Open = 0,
    /// The consumer fell behind by the tap's capacity.
    Overflow = 1,
    /// The tenant was dropped (its last batch says so).
    TenantDropped = 2,
}

/// Which tables a tap's consumer wants: the applier sends a batch only when someone
/// does, so streams that filter a table away cost the writer nothing. Counted per
/// stream; kept by the consumer (see [`TapReceiver::interest`]).
#[derive(Debug, Default)]
pub struct Interest {
    all: usize,
    tables: HashMap<Box<str>, usize>,
}

impl Interest {
    /// One more stream, watching `tables` (`None`: every table).
    pub fn add(&mut self, tables: Option<&[String]>) {
        match tables {
            None => self.all += 1,
            Some(tables) => {
                for t in tables {
                    *self.tables.entry(t.as_str().into()).or_default() += 1;
                }
            }
        }
    }

    /// One stream fewer.
    pub fn remove(&mut self, tables: Option<&[String]>) {
        match tables {
            None => self.all = self.all.saturating_sub(1),
            Some(tables) => {
                for t in tables {
                    if let Some(n) = self.tables.get_mut(t.as_str()) {
                        *n -= 1;
                        if *n == 0 {
                            self.tables.remove(t.as_str());
                        }
                    }
                }
            }
        }
    }

    /// Whether a batch of `table` (`None`: a tenant event, always wanted) is.
    pub fn wants(&self, table: Option<&str>) -> bool {
        match table {
            None => true,
            Some(table) => self.all > 0 || self.tables.contains_key(table),
        }
    }
}

/// A tap's interest, shared by its consumer and the applier.
pub type SharedInterest = Arc<Mutex<Interest>>;

/// Locks an interest (a poisoned lock still holds valid counts).
pub fn lock(interest: &SharedInterest) -> std::sync::MutexGuard<'_, Interest> {
    interest
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A consumer's end of a tap.
pub struct TapReceiver {
    pub batches: async_channel::Receiver<Arc<ChangeBatch>>,
    /// Every batch at or below this LSN was sent before it was published.
    pub start: Lsn,
    /// The shard's published LSN: every batch at or below it is already in `batches`.
    pub published: Arc<AtomicU64>,
    /// What the consumer's streams watch. Change it *on the owner shard* (a mesh call
    /// to [`Feed::published`] after the change): between two applied commands, so the
    /// LSN it returns splits batches filtered by the old interest from those by the
    /// new one exactly.
    pub interest: SharedInterest,
    end: Arc<AtomicU8>,
}

impl TapReceiver {
    /// Why the channel closed (meaningful once it has).
    pub fn end(&self) -> TapEnd {
        match self.end.load(Ordering::Acquire) {
            1 => TapEnd::Overflow,
            2 => TapEnd::TenantDropped,
            _ => TapEnd::Open,
        }
    }

    /// The LSN up to which this tap has seen everything: read it *before* draining the
    /// channel, and after the drain every batch at or below it has been received.
    pub fn published(&self) -> Lsn {
        Lsn(self.published.load(Ordering::Acquire))
    }
}

struct Tap {
    sender: async_channel::Sender<Arc<ChangeBatch>>,
    interest: SharedInterest,
    end: Arc<AtomicU8>,
}

/// A shard's change feed (lives on the shard's executor).
pub struct Feed {
    taps: RefCell<HashMap<TenantId, Vec<Tap>>>,
    published: Arc<AtomicU64>,
    /// Tasks of this shard waiting for the published LSN to move (replication senders).
    waiters: crate::wait_list::WaitList,
}

impl Feed {
    pub fn new(applied: Lsn) -> Self {
        Feed {
            taps: RefCell::new(HashMap::new()),
            published: Arc::new(AtomicU64::new(applied.0)),
            waiters: crate::wait_list::WaitList::default(),
        }
    }

    /// Whether anyone listens to `tenant` (the applier's only cost otherwise).
    pub fn listening(&self, tenant: &TenantId) -> bool {
        let taps = self.taps.borrow();
        !taps.is_empty() && taps.contains_key(tenant)
    }

    /// A new tap on `tenant`'s changes after the current applied LSN, holding at most
    /// `capacity` batches.
    pub fn attach(&self, tenant: &TenantId, capacity: usize) -> TapReceiver {
        let (sender, batches) = async_channel::bounded(capacity.max(1));
        let end = Arc::new(AtomicU8::new(TapEnd::Open as u8));
        let interest = SharedInterest::default();
        let mut taps = self.taps.borrow_mut();
        // Taps whose consumer left are otherwise only noticed at a publish: a quiet
        // tenant's would stay (each holds its ring).
        taps.retain(|_, list| {
            list.retain(|tap| !tap.sender.is_closed());
            !list.is_empty()
        });
        let list = taps.entry(tenant.clone()).or_default();
        list.push(Tap {
            sender,
            interest: interest.clone(),
            end: end.clone(),
        });
        TapReceiver {
            batches,
            start: Lsn(self.published.load(Ordering::Acquire)),
            published: self.published.clone(),
            interest,
            end,
        }
    }

    /// Hands a batch to every tap of `tenant`; a full tap is closed as overflowed, a
    /// tap whose consumer left is dropped.
    pub fn publish(&self, tenant: &TenantId, batch: ChangeBatch) {
        let dropped = batch
            .events
            .iter()
            .any(|e| e.kind == EventKind::TenantDropped);
        let batch = Arc::new(batch);
        let mut taps = self.taps.borrow_mut();
        let Some(list) = taps.get_mut(tenant) else {
            return;
        };
        let table = batch.table.as_deref();
        list.retain(|tap| {
            if !lock(&tap.interest).wants(table) {
                return !tap.sender.is_closed();
            }
            match tap.sender.try_send(batch.clone()) {
                Ok(()) if !dropped => true,
                Ok(()) => {
                    tap.end
                        .store(TapEnd::TenantDropped as u8, Ordering::Release);
                    false
                }
                Err(async_channel::TrySendError::Full(_)) => {
                    tap.end.store(TapEnd::Overflow as u8, Ordering::Release);
                    false
                }
                Err(async_channel::TrySendError::Closed(_)) => false,
            }
        });
        // Dropping a tap's sender closes its channel; the consumer reads `end`.
        if list.is_empty() {
            taps.remove(tenant);
        }
    }

    /// Every command up to this LSN is applied and its batch handed to the taps.
    pub fn published(&self) -> Lsn {
        Lsn(self.published.load(Ordering::Acquire))
    }

    /// Marks every command up to `lsn` as published (after its batch, if any, was sent).
    pub fn advance(&self, lsn: Lsn) {
        self.published.store(lsn.0, Ordering::Release);
        self.waiters.wake_all();
    }

    /// Waits until the published LSN is above `lsn` and returns it. A wait that is
    /// dropped (a timeout) leaves nothing registered.
    pub async fn published_after(&self, lsn: Lsn) -> Lsn {
        self.waiters.wait_until(|| self.published() > lsn).await;
        self.published()
    }

    /// Taps open now (metrics).
    pub fn taps(&self) -> usize {
        self.taps.borrow().values().map(Vec::len).sum()
    }
}

/// Whether a command that applied as `applied` at `lsn` changed anything (a repeat of an
/// idempotency key answers with the first request's LSN and changes nothing).
pub fn changed(lsn: Lsn, applied: &Applied) -> bool {
    !matches!(applied, Applied::Written { lsn: first, .. } if *first != lsn)
}

/// The events of `command`, applied at `lsn`. `schema_of(table, version)` finds the
/// schema a write was validated against (`None` when it is no longer known).
pub fn describe(
    lsn: Lsn,
    command: &Command,
    schema_of: impl Fn(&str, u64) -> Option<TableSchema>,
) -> Vec<ChangeEvent> {
    let schema_event = |op: &str, table: &str| ChangeEvent {
        kind: EventKind::Schema,
        table: table.into(),
        data: format!(r#"{{"op":"{op}","table":"{table}","lsn":{}}}"#, lsn.0).into(),
    };
    match command {
        Command::CreateTable(schema) => vec![schema_event("create_table", &schema.name)],
        Command::DropTable { table } => vec![schema_event("drop_table", table)],
        Command::DropTenant => vec![ChangeEvent {
            kind: EventKind::TenantDropped,
            table: "".into(),
            data: format!(r#"{{"lsn":{}}}"#, lsn.0).into(),
        }],
        Command::Write {
            table,
            table_version,
            writes,
            ..
        } => {
            let schema = schema_of(table, *table_version);
            writes
                .iter()
                .map(|write| change_event(table, lsn, write, schema.as_ref()))
                .collect()
        }
        Command::RevokeApiKey { key_id } => vec![ChangeEvent {
            kind: EventKind::KeyRevoked,
            table: "".into(),
            data: key_id.as_str().into(),
        }],
        // The table takes its new shape at the cutover; the other migration records
        // change no row anyone reads.
        Command::Cutover { table, .. } => vec![schema_event("migrate_table", table)],
        Command::CreateTenant
        | Command::CreateApiKey { .. }
        | Command::StartMigration { .. }
        | Command::Backfill { .. }
        | Command::AbortMigration { .. } => Vec::new(),
    }
}

/// `{"table","op","key":{...},"lsn"}`; the key is `null` when the write's schema is no
/// longer known (its table was dropped since, or cut over by more than its last
/// migration, or by one before this process started: replaced shapes are memory only).
fn change_event(
    table: &str,
    lsn: Lsn,
    write: &RowWrite,
    schema: Option<&TableSchema>,
) -> ChangeEvent {
    let (op, key) = match write {
        RowWrite::Upsert(row) => (
            "upsert",
            schema.map(|s| {
                s.primary_key
                    .iter()
                    .map(|&c| row.get(c).to_value())
                    .collect::<Vec<_>>()
            }),
        ),
        RowWrite::Delete(bytes) => (
            "delete",
            schema.and_then(|s| {
                let types: Vec<_> = s.primary_key.iter().map(|&c| s.columns[c].ty).collect();
                decode_key(bytes, &types)
            }),
        ),
    };
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(br#"{"table":""#);
    out.extend_from_slice(table.as_bytes());
    out.extend_from_slice(br#"","op":""#);
    out.extend_from_slice(op.as_bytes());
    out.extend_from_slice(br#"","key":"#);
    match (schema, key) {
        (Some(schema), Some(values)) => {
            out.push(b'{');
            for (i, (&column, value)) in schema.primary_key.iter().zip(&values).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'"');
                out.extend_from_slice(schema.columns[column].name.as_bytes());
                out.extend_from_slice(b"\":");
                value.write_json(&mut out);
            }
            out.push(b'}');
        }
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(format!(r#","lsn":{}}}"#, lsn.0).as_bytes());
    ChangeEvent {
        kind: EventKind::Change,
        table: table.into(),
        // Table and column names are [a-z0-9_] and values are written as JSON.
        data: String::from_utf8_lossy(&out).into_owned().into(),
    }
}

/// The schema a write of `table` validated against `version` had, from the current
/// state (the live applier: the table it just applied to), or the shape the table's
/// last cutover replaced (a replay of writes from before a migration).
pub fn current_schema<'a>(
    state: &'a ShardState,
    tenant: &TenantId,
) -> impl Fn(&str, u64) -> Option<TableSchema> + 'a {
    let t = state.tenants.get(tenant);
    move |name, version| {
        let t = t?;
        let table = t.table(name).ok()?;
        if table.version() == version {
            return Some(table.schema().clone());
        }
        t.migrations().replaced_schema(name, version).cloned()
    }
}
