//! `GET /v1/tenants/:t/watch`: committed changes as server-sent events (docs/API.md).
//!
//! How a change reaches a stream: the owner shard's applier publishes each command's
//! events once to a *tap* per (tenant, connection shard) — a bounded channel, never
//! waited on (`oc_engine::feed`). On the connection shard a *hub* receives the tap and
//! fans batches out to its streams' queues (shared `Arc`s, no copies); each stream's
//! body formats its queue when hyper asks for more. So the applier's cost does not grow
//! with the number of streams, and a slow reader only fills its own bounded queue: when
//! the queue is over its byte limit the stream gets `overflow` and ends. A client that
//! resumes (`Last-Event-ID` or `?from_lsn=`) is replayed from the owner's log; when the
//! log no longer reaches back it gets `reset`, never a silent gap.
//!
//! Streams live outside the request deadline and the per-tenant in-flight limit; they
//! have their own limits (per tenant and per server), and end with `shutdown` when the
//! server drains.
//!
//! One file, about 1,030 lines of code: the hub, the subscriber and the streaming body
//! share the stream's end states; the next split, if it grows, is the body (from
//! `WatchBody`) into its own module.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::timer::Timer;
use glommio::Task;
use hyper::body::Frame;
use hyper::StatusCode;
use oc_engine::feed::{self, ChangeBatch, EventKind, TapEnd, TapReceiver};
use oc_engine::{owner_of, ChangesRead, ShardNode, ShardRouter, TenantId};
use oc_io::{History, Lsn};
use oc_ship::archive::Archive;
use oc_ship::replay::{self, ArchiveRead};

use super::error::ApiError;
use crate::metrics;

/// Limits of `/watch` streams.
#[derive(Debug, Clone, Copy)]
pub struct WatchLimits {
    /// Open streams per tenant, across the server.
    pub per_tenant: usize,
    /// Open streams per server.
    pub per_server: usize,
    /// Open streams one shard serves: its connections are its own, and a shard whose
    /// connections were all streams would refuse every request the kernel hands it.
    pub per_shard: usize,
    /// Bytes of events a stream may have queued and not yet written before it
    /// overflows.
    pub buffer_bytes: usize,
    /// A comment line is written after this long without anything else.
    pub heartbeat: Duration,
}

/// Batches a tap holds for its hub before the applier closes it as overflowed (its
/// ring is allocated up front: 16 bytes a slot).
const TAP_BATCHES: usize = 4096;
/// The current LSN is sent at least this often while it moves.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Tables a stream may filter on.
const MAX_FILTER_TABLES: usize = 64;
/// A replay page that fails is tried again this many times (with backoff) before the
/// stream ends with a retryable `error`.
const REPLAY_TRIES: u32 = 3;

/// Open streams per tenant and in all, across every shard.
static OPEN: Mutex<BTreeMap<TenantId, usize>> = Mutex::new(BTreeMap::new());
static OPEN_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// Streams of `tenant` open now (for `/usage`).
pub fn open_streams(tenant: &TenantId) -> usize {
    OPEN.lock()
        .map(|open| open.get(tenant).copied().unwrap_or(0))
        .unwrap_or(0)
}

/// Streams open now on the whole server.
pub fn open_streams_total() -> usize {
    OPEN_TOTAL.load(Ordering::Relaxed)
}

/// One stream's place under the limits; given back on drop.
struct Registration(TenantId);

impl Registration {
    fn take(tenant: &TenantId, limits: &WatchLimits) -> Result<Self, ApiError> {
        let mut open = OPEN.lock().map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the watch registry is poisoned",
            )
        })?;
        if OPEN_TOTAL.load(Ordering::Relaxed) >= limits.per_server {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "watch_server_limit",
                format!(
                    "the server already serves {} watch streams, its limit (--watch-max-streams, \
                     at most three quarters of --max-connections so that requests find room); retry \
                     later",
                    limits.per_server
                ),
            ));
        }
        if SHARD_OPEN.get() >= limits.per_shard {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "watch_server_limit",
                format!(
                    "this shard already serves {} watch streams, three quarters of its share of \
                     --max-connections (so that requests find room); retry later, or raise \
                     --max-connections",
                    limits.per_shard
                ),
            ));
        }
        let n = open.entry(tenant.clone()).or_default();
        if *n >= limits.per_tenant {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "watch_tenant_limit",
                format!(
                    "tenant {tenant} already has {} watch streams open, its limit \
                     (--watch-max-streams-per-tenant); close one first",
                    limits.per_tenant
                ),
            ));
        }
        *n += 1;
        OPEN_TOTAL.fetch_add(1, Ordering::Relaxed);
        SHARD_OPEN.set(SHARD_OPEN.get() + 1);
        Ok(Registration(tenant.clone()))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        OPEN_TOTAL.fetch_sub(1, Ordering::Relaxed);
        SHARD_OPEN.set(SHARD_OPEN.get().saturating_sub(1));
        if let Ok(mut open) = OPEN.lock() {
            if let Some(n) = open.get_mut(&self.0) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.0);
                }
            }
        }
    }
}

thread_local! {
    /// Streams this shard serves (a stream ends on the shard it started on).
    static SHARD_OPEN: Cell<usize> = const { Cell::new(0) };
    /// This shard's hubs, one per watched tenant.
    static HUBS: RefCell<HashMap<TenantId, Rc<Hub>>> = RefCell::new(HashMap::new());
    /// Set when this shard drains: every stream ends with `shutdown`.
    static CLOSING: Cell<bool> = const { Cell::new(false) };
}

/// Ends every stream on this shard with a final `shutdown` event (the drain calls it so
/// that streams do not hold the shutdown for its grace period).
pub fn close_local() {
    CLOSING.with(|c| c.set(true));
    let hubs: Vec<Rc<Hub>> = HUBS.with(|h| h.borrow().values().cloned().collect());
    for hub in hubs {
        for sub in hub.subscribers() {
            sub.wake();
        }
    }
}

fn closing() -> bool {
    CLOSING.with(Cell::get)
}

/// Why a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// This stream's queue outgrew its byte limit.
    Overflow,
    /// The hub's tap overflowed (this shard fell behind the owner).
    TapOverflow,
    TenantDropped,
    /// The API key the stream was opened with was revoked.
    Revoked,
    /// The owner shard stopped.
    Stopped,
}

/// A tenant's tap on this shard, fanned out to this shard's streams of that tenant.
struct Hub {
    tenant: TenantId,
    tap: TapReceiver,
    /// Every batch at or below this LSN has been handed to the streams.
    position: Cell<Lsn>,
    /// Every stream, and the same streams routed by what they watch: a batch reaches
    /// only the streams that want its table, so streams filtering it away cost nothing.
    subscribers: RefCell<Vec<Weak<Subscriber>>>,
    unfiltered: RefCell<Vec<Weak<Subscriber>>>,
    by_table: RefCell<HashMap<Box<str>, Vec<Weak<Subscriber>>>>,
    ended: Cell<bool>,
    task: RefCell<Option<Task<()>>>,
}

impl Hub {
    /// This shard's hub of `tenant`, attaching a tap on the owner when there is none.
    async fn get_or_attach(router: &ShardRouter, tenant: &TenantId) -> Result<Rc<Hub>, ApiError> {
        let live = |tenant: &TenantId| {
            HUBS.with(|h| {
                h.borrow()
                    .get(tenant)
                    .filter(|hub| !hub.ended.get())
                    .cloned()
            })
        };
        if let Some(hub) = live(tenant) {
            return Ok(hub);
        }
        let owner = owner_of(router, tenant);
        let t = tenant.clone();
        let tap = router
            .call(owner, move |node: Rc<ShardNode>| async move {
                node.shard().read(&t, |_| ())?;
                Ok::<_, oc_engine::EngineError>(node.shard().feed().attach(&t, TAP_BATCHES))
            })
            .await??;
        // Another stream may have attached while this one waited: use its hub (this
        // tap's receiver is dropped, and the owner forgets it at its next publish).
        if let Some(hub) = live(tenant) {
            return Ok(hub);
        }
        let hub = Rc::new(Hub {
            tenant: tenant.clone(),
            position: Cell::new(tap.start),
            tap,
            subscribers: RefCell::new(Vec::new()),
            unfiltered: RefCell::new(Vec::new()),
            by_table: RefCell::new(HashMap::new()),
            ended: Cell::new(false),
            task: RefCell::new(None),
        });
        let batches = hub.tap.batches.clone();
        let weak = Rc::downgrade(&hub);
        let task = glommio::spawn_local(async move {
            while let Ok(batch) = batches.recv().await {
                match weak.upgrade() {
                    Some(hub) => hub.distribute(batch),
                    None => return,
                }
            }
            if let Some(hub) = weak.upgrade() {
                hub.finish();
            }
        });
        *hub.task.borrow_mut() = Some(task);
        HUBS.with(|h| h.borrow_mut().insert(tenant.clone(), hub.clone()));
        Ok(hub)
    }

    fn subscribers(&self) -> Vec<Rc<Subscriber>> {
        self.subscribers
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    fn join(&self, sub: &Rc<Subscriber>) {
        let weak = Rc::downgrade(sub);
        self.subscribers.borrow_mut().push(weak.clone());
        match &sub.tables {
            None => self.unfiltered.borrow_mut().push(weak),
            Some(tables) => {
                let mut by_table = self.by_table.borrow_mut();
                for table in tables {
                    by_table
                        .entry(table.as_str().into())
                        .or_default()
                        .push(weak.clone());
                }
            }
        }
    }

    fn distribute(&self, batch: Arc<ChangeBatch>) {
        self.position.set(self.position.get().max(batch.lsn));
        let push = |list: &[Weak<Subscriber>]| {
            for sub in list.iter().filter_map(Weak::upgrade) {
                sub.push(&batch);
            }
        };
        match &batch.table {
            Some(table) => {
                push(&self.unfiltered.borrow());
                if let Some(list) = self.by_table.borrow().get(table) {
                    push(list);
                }
            }
            // A tenant event reaches every stream.
            None => push(&self.subscribers.borrow()),
        }
    }

    /// Takes in everything the owner has published so far; `position` then stands for
    /// the owner's applied LSN even when none of it concerned this tenant.
    fn catch_up(&self) {
        let published = self.tap.published();
        while let Ok(batch) = self.tap.batches.try_recv() {
            self.distribute(batch);
        }
        if !self.tap.batches.is_closed() {
            self.position.set(self.position.get().max(published));
        }
    }

    /// The tap closed: every stream ends, and the next stream attaches afresh.
    fn finish(&self) {
        self.ended.set(true);
        let why = match self.tap.end() {
            TapEnd::Overflow => StreamEnd::TapOverflow,
            TapEnd::TenantDropped => StreamEnd::TenantDropped,
            TapEnd::Open => StreamEnd::Stopped,
        };
        for sub in self.subscribers() {
            sub.end(why);
        }
        self.forget();
    }

    fn forget(&self) {
        HUBS.with(|h| {
            let mut hubs = h.borrow_mut();
            if hubs
                .get(&self.tenant)
                .is_some_and(|hub| std::ptr::eq(Rc::as_ptr(hub), self))
            {
                hubs.remove(&self.tenant);
            }
        });
    }

    /// `sub` is gone (its stream ended; `counted`: its tables were added to the tap's
    /// interest); the hub closes its tap after the last one.
    fn leave(&self, sub: &Rc<Subscriber>, counted: bool) {
        let alive = |w: &Weak<Subscriber>| {
            w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Rc::as_ptr(sub))
        };
        if counted {
            feed::lock(&self.tap.interest).remove(sub.tables.as_deref());
        }
        self.subscribers.borrow_mut().retain(alive);
        self.unfiltered.borrow_mut().retain(alive);
        self.by_table.borrow_mut().retain(|_, list| {
            list.retain(alive);
            !list.is_empty()
        });
        if self.subscribers.borrow().is_empty() {
            self.ended.set(true);
            self.task.borrow_mut().take();
            self.forget();
        }
    }
}

/// One stream's queue of batches, filled by its hub.
struct Subscriber {
    tables: Option<Vec<String>>,
    /// Batches at or below this LSN are not for this stream (it starts after them).
    after: Cell<Lsn>,
    queue: RefCell<VecDeque<Arc<ChangeBatch>>>,
    queued_bytes: Cell<usize>,
    limit_bytes: usize,
    end: Cell<Option<StreamEnd>>,
    waker: RefCell<Option<Waker>>,
    /// A resume is being replayed: a full queue extends the replay instead of ending
    /// the stream (a busy tenant would otherwise overflow every long resume).
    replaying: Cell<bool>,
    extend_to: Cell<Option<Lsn>>,
    /// The API key the stream was opened with: its revocation ends the stream.
    key_id: Option<String>,
}

impl Subscriber {
    fn push(&self, batch: &Arc<ChangeBatch>) {
        if self.end.get().is_some() || batch.lsn <= self.after.get() {
            return;
        }
        let revoked = batch
            .events
            .iter()
            .find(|e| e.kind == EventKind::KeyRevoked);
        if let Some(revoked) = revoked {
            if self.key_id.as_deref() == Some(&*revoked.data) {
                self.end(StreamEnd::Revoked);
            }
            return;
        }
        let bytes = batch.bytes;
        // An empty queue takes any batch (one batch may be larger than the limit).
        let queued = self.queued_bytes.get();
        if queued > 0 && queued + bytes > self.limit_bytes {
            // What was queued is dropped at once...
            self.queue.borrow_mut().clear();
            self.queued_bytes.set(0);
            if self.replaying.get() {
                // ...and replayed from the log after the resume.
                self.after.set(batch.lsn);
                self.extend_to.set(Some(batch.lsn));
            } else {
                // ...and the reader resumes from the last event it received.
                self.end(StreamEnd::Overflow);
            }
            return;
        }
        self.queued_bytes.set(self.queued_bytes.get() + bytes);
        self.queue.borrow_mut().push_back(batch.clone());
        self.wake();
    }

    /// Sets where the stream starts and drops what it took before that was known.
    fn start_after(&self, after: Lsn) {
        self.after.set(after);
        let mut queue = self.queue.borrow_mut();
        queue.retain(|batch| batch.lsn > after);
        self.queued_bytes.set(queue.iter().map(|b| b.bytes).sum());
    }

    fn end(&self, why: StreamEnd) {
        if self.end.get().is_none() {
            self.end.set(Some(why));
            // Counted when it happens: a reader that never reads never gets the event.
            if matches!(why, StreamEnd::Overflow | StreamEnd::TapOverflow) {
                metrics::with_http(|m| m.watch_overflows += 1);
            }
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// What a client asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchRequest {
    pub tables: Option<Vec<String>>,
    /// Resume after this position: `(epoch, lsn)`.
    pub resume: Option<(u64, Lsn)>,
    /// A watch token from the query string (checked by the caller).
    pub token: Option<String>,
}

/// Parses `?tables=a,b&from_lsn=N&token=...` and the `Last-Event-ID` header (which wins
/// over `from_lsn`).
pub fn parse_request(
    query: Option<&str>,
    last_event_id: Option<&str>,
    epoch: u64,
) -> Result<WatchRequest, ApiError> {
    let bad = |code: &'static str, message: String| ApiError::bad_request(code, message);
    let mut request = WatchRequest::default();
    for (name, value) in super::query_pairs(query)? {
        let value = &super::percent_decode(value)
            .map_err(|e| bad("invalid_query_string", format!("{name}=: {}", e.message)))?;
        match name {
            "tables" => {
                let tables: Vec<String> = value
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                if tables.is_empty() || tables.len() > MAX_FILTER_TABLES {
                    return Err(bad(
                        "invalid_query_string",
                        format!(
                            "tables= takes 1 to {MAX_FILTER_TABLES} comma-separated table names"
                        ),
                    ));
                }
                for t in &tables {
                    oc_engine::schema::check_name("table", t).map_err(ApiError::from)?;
                }
                request.tables = Some(tables);
            }
            "from_lsn" => {
                let lsn = value.parse::<u64>().map_err(|_| {
                    bad(
                        "invalid_query_string",
                        format!(
                            "from_lsn={} is not an LSN (a non-negative integer)",
                            super::error::quoted_short(value)
                        ),
                    )
                })?;
                request.resume.get_or_insert((epoch, Lsn(lsn)));
            }
            "token" => request.token = Some(value.to_string()),
            _ => {
                return Err(bad(
                    "invalid_query_string",
                    format!(
                        "unknown query parameter {}; /watch takes tables=, from_lsn= and token=",
                        super::error::quoted_short(name)
                    ),
                ))
            }
        }
    }
    if let Some(id) = last_event_id.filter(|id| !id.trim().is_empty()) {
        request.resume = Some(parse_event_id(id).ok_or_else(|| {
            bad(
                "invalid_last_event_id",
                format!("Last-Event-ID {id:?} is not an event id of this server (<epoch>-<lsn>)"),
            )
        })?);
    }
    Ok(request)
}

/// `<epoch>-<lsn>`.
fn parse_event_id(id: &str) -> Option<(u64, Lsn)> {
    let (epoch, lsn) = id.trim().split_once('-')?;
    Some((epoch.parse().ok()?, Lsn(lsn.parse().ok()?)))
}

/// The layout that names the epoch the owner's log stamps (`stamping`, for a writer's
/// log). A promotion starts its logs' new epoch a moment before it records the epoch in
/// the layout: a stream opened in between would give its ids, and judge a resume
/// point, by the old epoch, so it waits for the record.
async fn layout_as_of(
    ctx: &super::ApiContext,
    stamping: Option<u64>,
) -> Result<Arc<oc_engine::placement::Layout>, ApiError> {
    let waited = Instant::now();
    loop {
        let layout = ctx.layout.current();
        if stamping.is_none_or(|epoch| epoch <= layout.epoch()) {
            return Ok(layout);
        }
        if waited.elapsed() > EPOCH_RECORD_WAIT {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shard_unavailable",
                format!(
                    "this server's log writes epoch {} and its layout does not record it yet \
                     (a promotion that has not finished); retry shortly",
                    stamping.unwrap_or_default()
                ),
            ));
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// How long a stream's opening waits for a promotion to record its epoch.
const EPOCH_RECORD_WAIT: Duration = Duration::from_secs(2);

/// Opens a stream for `tenant` (the caller is authorized already; `key_id` is the API
/// key it used, directly or through a watch token).
pub async fn open(
    ctx: &super::ApiContext,
    tenant: TenantId,
    request: WatchRequest,
    key_id: Option<String>,
) -> Result<WatchBody, ApiError> {
    let (router, archive) = (ctx.router.clone(), ctx.archive.clone());
    let (limits, rate_limit) = (ctx.limits.watch, ctx.limits.rate_limit);
    if closing() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; reconnect to another node or retry shortly",
        ));
    }
    // A stream holds up to its buffer: none opens while the process is over its
    // memory budget.
    let (budget, resident) = oc_engine::quota::memory_for_data();
    if budget > 0 && resident > budget {
        return Err(ApiError::from(oc_engine::EngineError::MemoryFull {
            resident_bytes: resident,
            budget_bytes: budget,
        }));
    }
    let registration = Registration::take(&tenant, &limits)?;
    let hub = Hub::get_or_attach(&router, &tenant).await?;
    // The stream joins its hub first, taking every batch, so none that follows its
    // start can pass the hub before it is there; what precedes the start is dropped
    // once the start is known.
    let sub = Rc::new(Subscriber {
        tables: request.tables.clone(),
        after: Cell::new(Lsn(0)),
        queue: RefCell::new(VecDeque::new()),
        queued_bytes: Cell::new(0),
        limit_bytes: limits.buffer_bytes,
        end: Cell::new(None),
        waker: RefCell::new(None),
        replaying: Cell::new(false),
        extend_to: Cell::new(None),
        key_id: key_id.clone(),
    });
    hub.join(&sub);
    // The tap starts carrying this stream's tables on the owner, between two applied
    // commands: `position` is exactly where the stream's live changes begin. A key's
    // opens count against its rate limit there too (a reconnect storm is a storm of
    // requests).
    let (interest, tables, t, key) = (
        hub.tap.interest.clone(),
        request.tables.clone(),
        tenant.clone(),
        key_id,
    );
    let position = router
        .call(
            owner_of(&router, &tenant),
            move |node: Rc<ShardNode>| async move {
                if let Some(key_id) = &key {
                    // Still a key of the tenant (a token outlives a revoked key)...
                    let exists = node
                        .shard()
                        .read(&t, |t| t.api_keys().get(key_id).is_some())?;
                    if !exists {
                        return Err(crate::auth::unknown_key());
                    }
                    // ...and within its rate.
                    crate::rate_limit::admit(rate_limit, &t, key_id)?;
                }
                feed::lock(&interest).add(tables.as_deref());
                let wal = node.shard().wal();
                let stamping = wal.takes_own_writes().then(|| wal.epoch().0);
                Ok::<_, ApiError>((node.shard().feed().published(), stamping))
            },
        )
        .await
        .map_err(ApiError::from)
        .and_then(|admitted| admitted);
    let (position, layout) = match position {
        Ok((position, stamping)) => match layout_as_of(ctx, stamping).await {
            Ok(layout) => (position, layout),
            Err(e) => {
                hub.leave(&sub, false);
                return Err(e);
            }
        },
        Err(e) => {
            hub.leave(&sub, false);
            return Err(e);
        }
    };
    let epoch = layout.epoch();
    // A follower a few milliseconds behind its writer (a client that moved to it from
    // a writer shutting down) waits for the resume point, as reads with min_lsn do,
    // rather than answer `reset` for a position it is about to have.
    let position = match request.resume {
        Some((e, lsn)) if e == epoch && lsn > position && ctx.is_follower() => {
            published_reaching(&router, &tenant, lsn, ctx.limits.min_lsn_wait)
                .await
                .unwrap_or(position)
                .max(position)
        }
        _ => position,
    };
    hub.catch_up();
    let mut out = VecDeque::new();
    // Where this stream starts: after `start`; the log is replayed up to `position`.
    let (start, replay) = match request.resume {
        None => (position, None),
        Some((e, lsn))
            if !layout.on_history(owner_of(&router, &tenant), e, lsn.0)
                || (e == epoch && lsn > position) =>
        {
            out.push_back(hello(position, request.resume, epoch));
            out.push_back(reset(
                position,
                "the resume point is not on this server's history (ahead of its log, or on \
                 a branch it does not have: before a restore, say)",
                epoch,
            ));
            (position, None)
        }
        Some((_, lsn)) if lsn >= position => (lsn, None),
        Some((_, lsn)) => (lsn, Some(lsn)),
    };
    if out.is_empty() {
        out.push_back(hello(start, request.resume, epoch));
    }
    sub.start_after(start.max(position));
    sub.replaying.set(replay.is_some());
    metrics::with_http(|m| m.watch_streams_opened += 1);
    let history = layout.history(owner_of(&router, &tenant));
    let mut body = WatchBody {
        epoch,
        sub,
        hub,
        router,
        archive: archive.map(|archive| (archive, history)),
        tenant,
        out,
        replay: None,
        replay_from: start,
        replay_upto: position,
        last_id: start,
        progress: Timer::new(PROGRESS_EVERY),
        heartbeat_every: limits.heartbeat,
        heartbeat: Timer::new(limits.heartbeat),
        done: false,
        _registration: registration,
    };
    if let Some(after) = replay {
        body.start_replay(after);
    }
    Ok(body)
}

type ReplayPage = Pin<Box<dyn Future<Output = Result<ChangesRead, String>>>>;

/// Archive reads for resumes running at once: process-wide (each holds a segment in
/// memory and a thread), and per tenant, so that one tenant's many resumes leave the
/// others their turns (32 streams of one tenant resuming from the start delayed
/// another tenant's resume from 1.3 s to a minute).
static ARCHIVE_READS: Mutex<(usize, BTreeMap<TenantId, usize>)> = Mutex::new((0, BTreeMap::new()));
const MAX_ARCHIVE_READS: usize = 4;
const MAX_ARCHIVE_READS_PER_TENANT: usize = 1;

/// A turn at an archive read, given back when dropped.
struct ArchiveTurn(TenantId);

impl ArchiveTurn {
    fn take(tenant: &TenantId) -> Option<ArchiveTurn> {
        let mut reads = ARCHIVE_READS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_tenant) = &mut *reads;
        let mine = by_tenant.get(tenant).copied().unwrap_or(0);
        if *total >= MAX_ARCHIVE_READS || mine >= MAX_ARCHIVE_READS_PER_TENANT {
            return None;
        }
        *total += 1;
        by_tenant.insert(tenant.clone(), mine + 1);
        Some(ArchiveTurn(tenant.clone()))
    }
}

impl Drop for ArchiveTurn {
    fn drop(&mut self) {
        let mut reads = ARCHIVE_READS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_tenant) = &mut *reads;
        *total -= 1;
        if let Some(mine) = by_tenant.get_mut(&self.0) {
            *mine -= 1;
            if *mine == 0 {
                by_tenant.remove(&self.0);
            }
        }
    }
}

/// One page of archived frames, read on a thread of its own (archive calls block; a
/// shard's executor and its blocking pool, which the log uses, must never wait on
/// one).
async fn read_archive(
    (archive, history): (Arc<dyn Archive>, History),
    (tenant, shard): (&TenantId, usize),
    (after, upto): (Lsn, Lsn),
) -> Result<ArchiveRead, String> {
    let turn = loop {
        match ArchiveTurn::take(tenant) {
            Some(turn) => break turn,
            None => glommio::timer::sleep(Duration::from_millis(20)).await,
        }
    };
    let (tx, rx) = async_channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name("oc-watch-archive".into())
        .spawn(move || {
            let read = replay::frames_on_history(&archive, shard, (after, upto), &history);
            drop(turn);
            let _ = tx.send_blocking(read);
        });
    if let Err(e) = spawned {
        return Err(format!("no thread for an archive read: {e}"));
    }
    rx.recv()
        .await
        .map_err(|_| "the archive read ended without an answer".to_string())?
        .map_err(|e| e.to_string())
}

/// The body of one `/watch` response.
pub struct WatchBody {
    /// The epoch this server writes (in ids it makes itself: hello, progress, reset).
    epoch: u64,
    sub: Rc<Subscriber>,
    hub: Rc<Hub>,
    router: Rc<ShardRouter>,
    /// The archive, with the owner shard's history its frames must be on.
    archive: Option<(Arc<dyn Archive>, History)>,
    tenant: TenantId,
    /// Formatted events waiting for hyper.
    out: VecDeque<Bytes>,
    /// The log page being read for a resume, and where the replay ends.
    replay: Option<ReplayPage>,
    replay_from: Lsn,
    replay_upto: Lsn,
    /// The last position sent as an event id.
    last_id: Lsn,
    progress: Timer,
    heartbeat_every: Duration,
    heartbeat: Timer,
    done: bool,
    _registration: Registration,
}

impl WatchBody {
    /// Reads the next page of the resume: from the owner's log, and from the archive's
    /// sealed segments for what the log no longer holds.
    fn start_replay(&mut self, after: Lsn) {
        self.replay_from = after;
        let (router, archive, tenant, upto) = (
            self.router.clone(),
            self.archive.clone(),
            self.tenant.clone(),
            self.replay_upto,
        );
        self.replay = Some(Box::pin(async move {
            let mut tries = 0;
            loop {
                match replay_page(&router, archive.clone(), &tenant, after, upto).await {
                    Err(why) if tries < REPLAY_TRIES => {
                        tries += 1;
                        tracing::debug!(%tenant, error = %why, "retrying a watch replay page");
                        glommio::timer::sleep(Duration::from_millis(100 << tries)).await;
                    }
                    read => return read,
                }
            }
        }));
    }
}

/// One page of a resume: from the owner's log, and from the archive's sealed segments
/// for what the log no longer holds.
async fn replay_page(
    router: &Rc<ShardRouter>,
    archive: Option<(Arc<dyn Archive>, History)>,
    tenant: &TenantId,
    after: Lsn,
    upto: Lsn,
) -> Result<ChangesRead, String> {
    let owner = owner_of(router, tenant);
    let t = tenant.clone();
    let local = router
        .call(owner, move |node: Rc<ShardNode>| async move {
            node.shard()
                .changes_after(&t, after, upto)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
    let (
        ChangesRead::NotHeld {
            oldest: local_oldest,
        },
        Some(archive),
    ) = (&local, archive)
    else {
        return Ok(local);
    };
    let frames = match read_archive(archive, (tenant, owner), (after, upto)).await? {
        ArchiveRead::NotHeld { oldest } => {
            return Ok(ChangesRead::NotHeld {
                oldest: oldest.or(*local_oldest),
            })
        }
        ArchiveRead::Frames(frames) => frames,
    };
    let through = frames.last().map_or(after, |f| f.lsn);
    let t = tenant.clone();
    let batches = router
        .call(owner, move |node: Rc<ShardNode>| async move {
            node.shard()
                .describe_frames(&t, &frames)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
    Ok(ChangesRead::Batches { batches, through })
}

impl WatchBody {
    /// Formats `batch` (filtered by table) into `out`; the last event written carries
    /// the batch's id, so a client that reconnects mid-batch gets the batch again.
    fn send_batch(&mut self, batch: &ChangeBatch) {
        let wanted = |kind: EventKind, table: &str| match kind {
            // Internal: ends the streams of the key (see `Subscriber::push`).
            EventKind::KeyRevoked => false,
            EventKind::TenantDropped => true,
            EventKind::Change | EventKind::Schema => self
                .sub
                .tables
                .as_ref()
                .is_none_or(|tables| tables.iter().any(|t| t == table)),
        };
        let events: Vec<_> = batch
            .events
            .iter()
            .filter(|e| wanted(e.kind, &e.table))
            .collect();
        if events.is_empty() {
            return;
        }
        let mut text = Vec::with_capacity(events.iter().map(|e| e.data.len() + 40).sum());
        for (i, event) in events.iter().enumerate() {
            text.extend_from_slice(b"event: ");
            text.extend_from_slice(event.kind.name().as_bytes());
            text.extend_from_slice(b"\ndata: ");
            text.extend_from_slice(event.data.as_bytes());
            if i + 1 == events.len() {
                text.extend_from_slice(
                    format!("\nid: {}-{}", batch.epoch.0, batch.lsn.0).as_bytes(),
                );
            }
            text.extend_from_slice(b"\n\n");
        }
        self.last_id = batch.lsn;
        // A tenant's drop is the last thing a stream says.
        self.done |= events.iter().any(|e| e.kind == EventKind::TenantDropped);
        let count = events.len() as u64;
        metrics::with_http(|m| {
            m.watch_events_sent += count;
            if let Some(at) = batch.applied_at {
                m.watch_delivery_latency.record(at.elapsed());
            }
        });
        self.out.push_back(Bytes::from(text));
    }

    /// Moves the live queue into `out`.
    fn drain_queue(&mut self) {
        while !self.done {
            let Some(batch) = self.sub.queue.borrow_mut().pop_front() else {
                return;
            };
            self.sub
                .queued_bytes
                .set(self.sub.queued_bytes.get().saturating_sub(batch.bytes));
            self.send_batch(&batch);
        }
    }

    fn finish_with(&mut self, event: &str, data: String) {
        self.out
            .push_back(Bytes::from(format!("event: {event}\ndata: {data}\n\n")));
        self.done = true;
    }

    fn poll_replay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(page) = self.replay.as_mut() else {
            return Poll::Ready(());
        };
        let read = match page.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(read) => read,
        };
        self.replay = None;
        // Live batches the queue could not hold while the replay ran: the replay covers
        // them too.
        if let Some(to) = self.sub.extend_to.take() {
            self.replay_upto = self.replay_upto.max(to);
        }
        match read {
            Ok(ChangesRead::Batches { batches, through }) => {
                for batch in &batches {
                    if !self.done {
                        self.send_batch(batch);
                    }
                }
                // A page that read nothing new ends the replay (nothing is left below
                // the live queue's start).
                if !self.done && through > self.replay_from && through < self.replay_upto {
                    self.start_replay(through);
                    return Poll::Ready(());
                }
            }
            Ok(ChangesRead::NotHeld { oldest }) => {
                let why = match oldest {
                    Some(lsn) => format!(
                        "neither the log nor the archive holds the resume point any more \
                         (they start at LSN {}); drop cached state and read it again",
                        lsn.0
                    ),
                    None => "neither the log nor the archive holds the resume point any more"
                        .to_string(),
                };
                self.out
                    .push_back(reset(self.replay_upto, &why, self.epoch));
                self.last_id = self.replay_upto;
            }
            Err(why) => {
                // Not a reset: nothing says the changes are gone. The client reconnects
                // with its last id and the replay is tried again.
                tracing::warn!(tenant = %self.tenant, error = %why, "watch replay failed");
                let why = serde_json::to_string(&why).unwrap_or_else(|_| "\"\"".into());
                self.finish_with("error", format!(r#"{{"reason":{why},"retry":true}}"#));
            }
        }
        self.sub.replaying.set(false);
        Poll::Ready(())
    }
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.out.pop_front() {
                this.heartbeat = Timer::new(this.heartbeat_every);
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if closing() {
                this.finish_with(
                    "shutdown",
                    r#"{"reason":"the server is shutting down; resume with the last event id"}"#
                        .into(),
                );
                continue;
            }
            // A revoked key or a dropped tenant ends a resume too.
            if matches!(
                this.sub.end.get(),
                Some(StreamEnd::Revoked | StreamEnd::TenantDropped)
            ) {
                this.replay = None;
                this.sub.replaying.set(false);
            }
            if this.replay.is_some() {
                if this.poll_replay(cx).is_pending() {
                    // A long replay must not look idle to the connection's timeout.
                    if Pin::new(&mut this.heartbeat).poll(cx).is_ready() {
                        this.out.push_back(Bytes::from_static(b": heartbeat\n\n"));
                        continue;
                    }
                    *this.sub.waker.borrow_mut() = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                continue;
            }
            this.drain_queue();
            if !this.out.is_empty() {
                continue;
            }
            if let Some(why) = this.sub.end.get() {
                let (event, data) = match why {
                    StreamEnd::Overflow => ("overflow", format!(
                        r#"{{"reason":"this stream fell more than {} bytes behind; resume with the last event id","limit_bytes":{}}}"#,
                        this.sub.limit_bytes, this.sub.limit_bytes
                    )),
                    StreamEnd::TapOverflow => ("overflow", r#"{"reason":"this server fell behind the tenant's changes; resume with the last event id"}"#.to_string()),
                    StreamEnd::TenantDropped => (
                        "tenant_dropped",
                        format!(r#"{{"lsn":{}}}"#, this.hub.position.get().0),
                    ),
                    StreamEnd::Revoked => ("revoked", r#"{"reason":"the API key this stream was opened with was revoked"}"#.to_string()),
                    StreamEnd::Stopped => ("shutdown", r#"{"reason":"the tenant's shard stopped"}"#.to_string()),
                };
                if event == "overflow" {
                    tracing::info!(tenant = %this.tenant, key_id = this.sub.key_id.as_deref().unwrap_or("-"), reason = %data, "watch stream overflowed");
                }
                this.finish_with(event, data);
                continue;
            }
            if Pin::new(&mut this.progress).poll(cx).is_ready() {
                this.progress = Timer::new(PROGRESS_EVERY);
                this.hub.catch_up();
                this.drain_queue();
                let position = this.hub.position.get();
                if position > this.last_id && this.sub.end.get().is_none() {
                    this.sub.after.set(this.sub.after.get().max(position));
                    this.last_id = position;
                    this.out.push_back(Bytes::from(format!(
                        "event: progress\ndata: {{\"lsn\":{lsn}}}\nid: {epoch}-{lsn}\n\n",
                        lsn = position.0,
                        epoch = this.epoch,
                    )));
                }
                continue;
            }
            if Pin::new(&mut this.heartbeat).poll(cx).is_ready() {
                this.out.push_back(Bytes::from_static(b": heartbeat\n\n"));
                continue;
            }
            *this.sub.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

impl Drop for WatchBody {
    fn drop(&mut self) {
        self.hub.leave(&self.sub, true);
    }
}

fn hello(start: Lsn, resume: Option<(u64, Lsn)>, epoch: u64) -> Bytes {
    let resumed = match resume {
        Some((epoch, lsn)) => format!("\"{epoch}-{}\"", lsn.0),
        None => "null".into(),
    };
    Bytes::from(format!(
        "event: hello\ndata: {{\"lsn\":{},\"epoch\":{epoch},\"resumed_from\":{resumed}}}\nid: {epoch}-{}\nretry: 1000\n\n",
        start.0, start.0
    ))
}

fn reset(lsn: Lsn, why: &str, epoch: u64) -> Bytes {
    let why = serde_json::to_string(why).unwrap_or_else(|_| "\"\"".into());
    Bytes::from(format!(
        "event: reset\ndata: {{\"lsn\":{},\"reason\":{why}}}\nid: {epoch}-{}\n\n",
        lsn.0, lsn.0
    ))
}

/// The owner's published position once it reaches `lsn`, waiting at most `wait`.
async fn published_reaching(
    router: &Rc<ShardRouter>,
    tenant: &TenantId,
    lsn: Lsn,
    wait: Duration,
) -> Option<Lsn> {
    let deadline = Instant::now() + wait;
    loop {
        let published = router
            .call(owner_of(router, tenant), |node: Rc<ShardNode>| async move {
                node.shard().feed().published()
            })
            .await
            .ok()?;
        if published >= lsn || Instant::now() >= deadline {
            return Some(published);
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_name_what_to_fix() {
        let r = parse_request(Some("tables=a,b&from_lsn=7"), None, 1).expect("valid");
        let encoded = parse_request(Some("tables=a%2Cb&from_lsn=7"), None, 1).expect("valid");
        assert_eq!(encoded, r, "a percent-encoded comma is a comma");
        assert_eq!(r.tables, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(r.resume, Some((1, Lsn(7))));
        let r = parse_request(Some("from_lsn=7"), Some("1-9"), 1).expect("valid");
        assert_eq!(r.resume, Some((1, Lsn(9))), "Last-Event-ID wins");
        for (query, id, code) in [
            (Some("tables="), None, "invalid_query_string"),
            (Some("tables=A"), None, "invalid_name"),
            (Some("from_lsn=-1"), None, "invalid_query_string"),
            (Some("nope=1"), None, "invalid_query_string"),
            (Some("from_lsn=1&from_lsn=2"), None, "invalid_query_string"),
            (None, Some("abc"), "invalid_last_event_id"),
        ] {
            let err = parse_request(query, id, 1).expect_err("refused");
            assert_eq!(err.code, code, "{query:?} {id:?}: {}", err.message);
        }
    }
}
