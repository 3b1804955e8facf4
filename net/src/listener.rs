//! The data listener on every shard: accept, serve HTTP/1.1 with hyper, enforce the
//! connection limit and the idle timeout, and drain on shutdown.
//!
//! Sockets are made before the shards start: one `SO_REUSEPORT` socket per shard on the
//! same address (port 0 is resolved by the first), so the kernel spreads connections
//! over shards and a test can bind port 0 and still get one port. `SO_REUSEPORT` would
//! as gladly let a second server of the same user join the group and take part of the
//! traffic, so the address is first bound alone ([`refuse_if_taken`]).
//!
//! A connection lands on whichever shard accepted it, and a request for a tenant
//! another shard owns is forwarded there and back. A plain (not TLS) connection whose
//! requests keep going to one other shard is moved there between two requests: its
//! socket is duplicated onto that shard, which serves it from then on with the bytes
//! already read put back in front ([`Affinity`]). The client sees one connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{future, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use oc_engine::{owner_of, ShardNode, ShardRouter, TenantId};
use socket2::{Domain, Protocol, Socket, Type};

use crate::api::{self, ApiContext, ApiLimits, BodyReadToEnd};
use crate::auth::AuthConfig;
use crate::hyper_glommio::{GlommioTimer, HyperStream, PlainStream, SecureStream, StreamWatch};
use crate::metrics;

/// hyper's per-connection buffer limit (its minimum is 8 KiB).
const HYPER_BUFFER_BYTES: usize = 64 << 10;
/// How often a connection checks for idleness: a quarter of the idle timeout, within
/// these bounds.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(100);
const MAX_IDLE_CHECK: Duration = Duration::from_secs(1);
/// A client whose socket stays full this long while it takes less than
/// `--min-send-bytes-per-s` is disconnected.
const SEND_RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long a connection must have been idle (no request being answered, nothing
/// moved) before a new connection at the limit may take its place.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);
/// Connections asked to make room at once, at most, before new ones are refused.
const MOST_EVICTIONS_UNDER_WAY: usize = 8;
/// Pending connections per socket.
const LISTEN_BACKLOG: i32 = 1024;
/// Requests in a row for one other shard's tenants before a connection moves there;
/// doubled after each attempt, up to [`MOST_MOVE_DOUBLINGS`] times (64 in a row), so the
/// connection of a client that switches between tenants of different shards settles
/// instead of moving back and forth.
const MOVE_AFTER: u32 = 4;
const MOST_MOVE_DOUBLINGS: u32 = 4;

/// Fails when another socket listens on `addr`: binding it without `SO_REUSEPORT`
/// fails then, whether or not that socket has the option. (A server started in the
/// same instant could still slip between this check and the group's bind.)
pub fn refuse_if_taken(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(()); // the kernel picks a free port
    }
    bound_alone(addr).map(drop)
}

/// Binds one listening socket on `addr` that no other socket may share (the ops
/// listener's).
pub fn bind_exclusive(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = bound_alone(addr)?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// A socket bound to `addr` without `SO_REUSEPORT`; an address still in use after
/// [`ADDR_IN_USE_WAIT`] is refused naming it.
fn bound_alone(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = wait_while_in_use(addr, || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // Not refused for a port whose old connections linger in TIME_WAIT after a restart.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    })?;
    Ok(socket)
}

/// How long a start waits for an address another socket listens on. A server killed
/// just before (kill -9) keeps its listening sockets for a few more milliseconds, until
/// the kernel has torn down its io_uring (13–34 ms seen), and a supervisor may restart
/// it at once: the data directory's lock is already free by then.
pub const ADDR_IN_USE_WAIT: Duration = Duration::from_secs(3);

/// Runs `bind` until it does not fail with "address in use", for at most
/// [`ADDR_IN_USE_WAIT`]; then the error names the address and the fix.
pub fn wait_while_in_use<T>(
    addr: SocketAddr,
    mut bind: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let deadline = std::time::Instant::now() + ADDR_IN_USE_WAIT;
    let mut said = false;
    loop {
        match bind() {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!(
                            "{addr} is in use by another process (another oc-server?), \
                             still after {} s: stop it or choose another address",
                            ADDR_IN_USE_WAIT.as_secs()
                        ),
                    ));
                }
                if !said {
                    said = true;
                    tracing::info!(%addr, "address in use; waiting for it (a process just stopped closes its sockets late)");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Binds `count` `SO_REUSEPORT` listening sockets on `addr`, refusing an address another
/// process listens on; returns their descriptors and the address they share.
pub fn bind_shared(addr: SocketAddr, count: usize) -> std::io::Result<(Vec<RawFd>, SocketAddr)> {
    refuse_if_taken(addr)?;
    let mut bound = addr;
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_port(true)?;
        socket.set_reuse_address(true)?;
        socket.bind(&bound.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| std::io::Error::other("the socket has no IP address"))?;
        }
        fds.push(socket.into_raw_fd());
    }
    Ok((fds, bound))
}

/// Per-connection settings.
#[derive(Clone)]
pub struct ConnectionSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// The least a client must take of what it is sent, in bytes a second, while the
    /// server waits on it (0: no minimum).
    pub min_send_bytes_per_s: u64,
    /// Open connections this shard serves: past it the idlest one makes room, and with
    /// none idle (or [`MOST_EVICTIONS_UNDER_WAY`] still closing) a new one is answered
    /// 503 and closed, or closed at once over TLS.
    pub max_connections: usize,
    pub limits: ApiLimits,
    pub auth: AuthConfig,
    /// Serve TLS (rustls) instead of plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// The archive, read by `/watch` resumes older than the local log.
    pub archive: Option<std::sync::Arc<dyn oc_ship::archive::Archive>>,
    /// The data directory's layout (its epochs).
    pub layout: oc_engine::placement::LiveLayout,
    /// The audit log of operator actions.
    pub auditor: oc_ship::audit::Auditor,
    /// A follower's role: writes are refused, naming its writer, until it is promoted.
    pub role: Option<std::sync::Arc<crate::replication::ApiRole>>,
}

thread_local! {
    /// This shard's listener state, for the drain call from the control executor.
    static DRAIN: RefCell<Option<Rc<DrainState>>> = const { RefCell::new(None) };
    /// What this shard serves connections with, for those other shards move here.
    static SERVER: RefCell<Option<Rc<ShardServer>>> = const { RefCell::new(None) };
}

/// What a shard serves its connections with.
struct ShardServer {
    ctx: Rc<ApiContext>,
    settings: Rc<ConnectionSettings>,
    state: Rc<DrainState>,
    /// Connections offered to other shards and not yet answered: still open here, but
    /// not counted when an owner compares its connections with this shard's.
    moving_out: Cell<usize>,
}

impl ShardServer {
    fn full(&self) -> bool {
        self.state.open.get() >= self.settings.max_connections
    }

    fn takes_moved(&self, sender_open: usize) -> bool {
        takes_moved(
            self.state.open.get(),
            sender_open,
            self.settings.max_connections,
        )
    }

    /// Serves `stream` on this shard until it closes or moves on.
    fn serve(self: &Rc<Self>, stream: TcpStream, arrival: Arrival) {
        self.state.open.set(self.state.open.get() + 1);
        metrics::with_http(|m| m.connections_open += 1);
        let server = self.clone();
        glommio::spawn_local(async move {
            serve_connection(stream, arrival, &server).await;
            server.state.open.set(server.state.open.get() - 1);
            metrics::with_http(|m| m.connections_open -= 1);
        })
        .detach();
    }
}

/// Whether a shard with `open` of its `max_connections` open takes a connection moved
/// from a shard with `sender_open` (the moving one included): only when it has no more
/// connections than the sender, so that the clients of one busy tenant mostly stay
/// spread over the cores (all of them on one core raised that tenant's write and
/// `/ask` p99s: BENCHMARKS.md, "Connections moved to their tenant's shard") while
/// tenants of different shards swap their connections home; and never past three
/// quarters of its limit, room kept for the connections the kernel hands it. Two
/// shards at par end two apart; a strict rule would never let them swap.
fn takes_moved(open: usize, sender_open: usize, max_connections: usize) -> bool {
    open <= sender_open && open < max_connections * 3 / 4
}

/// [`SERVER`] while this shard serves: cleared when it stops accepting, or when its
/// listener is dropped without a drain.
struct Registered;

impl Registered {
    fn new(server: Rc<ShardServer>) -> Registered {
        SERVER.with(|s| *s.borrow_mut() = Some(server));
        Registered
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        SERVER.with(|s| s.borrow_mut().take());
    }
}

/// How a connection came to a shard: accepted there, or moved from another.
#[derive(Default)]
struct Arrival {
    /// Bytes read from the socket on the shards before, not yet served.
    unread: Bytes,
    /// Times the connection was offered to another shard.
    moves: u32,
}

#[derive(Default)]
struct DrainState {
    draining: Cell<bool>,
    listener_closed: Cell<bool>,
    open: Cell<usize>,
    /// The accept loop's and every connection's waker, so the drain reaches them at
    /// once instead of at their next idle check.
    wakers: RefCell<HashMap<u64, Waker>>,
    next_waiter: Cell<u64>,
    /// Every connection this shard serves, by its waiter id: what the connection limit
    /// weighs when it makes room ([`DrainState::evict_idlest`]).
    connections: RefCell<HashMap<u64, Rc<Occupancy>>>,
    /// Connections asked to make room that have not closed yet.
    evicting: Cell<usize>,
}

/// What a connection is doing, as the connection limit sees it.
struct Occupancy {
    /// `None` while its TLS handshake runs.
    watch: Option<Rc<StreamWatch>>,
    /// When it was accepted.
    since: Instant,
    /// Requests handed to the service and not answered yet.
    in_flight: Rc<Cell<usize>>,
    /// Asked to close (to make room for a new one): it finishes what it is answering.
    evicted: Cell<bool>,
}

impl Occupancy {
    /// Nothing owed either way for a while: no request being answered, no answer or
    /// stream being sent, no byte sent for [`EVICTABLE_AFTER`]; or a TLS handshake
    /// still running after that long. Bytes received do not count: a request head
    /// trickled in a line a second is owed nothing until it is whole, and such
    /// connections would otherwise hold every place for the header timeout.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        let (idle, quiet) = match &self.watch {
            None => (now.saturating_duration_since(self.since), true),
            Some(watch) => (
                now.saturating_duration_since(watch.last_sent.get()),
                self.in_flight.get() == 0 && !watch.write_blocked.get() && watch.streams.get() == 0,
            ),
        };
        (quiet && !self.evicted.get() && idle >= EVICTABLE_AFTER).then_some(idle)
    }
}

impl DrainState {
    fn new_waiter(&self) -> u64 {
        let id = self.next_waiter.get();
        self.next_waiter.set(id + 1);
        id
    }

    /// Remembers `cx`'s waker for `id` (cloned only when it changed).
    fn watch(&self, id: u64, cx: &Context<'_>) {
        let mut wakers = self.wakers.borrow_mut();
        match wakers.get(&id) {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => {
                wakers.insert(id, cx.waker().clone());
            }
        }
    }

    /// Counts a connection for the connection limit, under a new waiter id (given back
    /// with [`DrainState::forget`]).
    fn occupy(
        &self,
        watch: Option<Rc<StreamWatch>>,
        in_flight: Rc<Cell<usize>>,
    ) -> (u64, Rc<Occupancy>) {
        let id = self.new_waiter();
        let occupancy = Rc::new(Occupancy {
            watch,
            since: Instant::now(),
            in_flight,
            evicted: Cell::new(false),
        });
        self.connections.borrow_mut().insert(id, occupancy.clone());
        (id, occupancy)
    }

    fn forget(&self, id: u64) {
        self.wakers.borrow_mut().remove(&id);
        let gone = self.connections.borrow_mut().remove(&id);
        if gone.is_some_and(|c| c.evicted.get()) {
            self.evicting.set(self.evicting.get() - 1);
        }
    }

    /// At the connection limit: asks the connection idle the longest (nothing owed
    /// either way for [`EVICTABLE_AFTER`] at least) to close, and says whether there
    /// was one. Held idle keep-alive connections would otherwise lock new clients out
    /// (nginx reuses its idle keep-alive connections likewise when it runs out).
    fn evict_idlest(&self) -> bool {
        // Each closes at its next poll; more on their way would mean they do not, and
        // the shard would run past its limit (and its descriptors) instead.
        if self.evicting.get() >= MOST_EVICTIONS_UNDER_WAY {
            return false;
        }
        let now = Instant::now();
        let connections = self.connections.borrow();
        let idlest = connections
            .iter()
            .filter_map(|(id, c)| c.idle_for(now).map(|idle| (idle, *id, c)))
            .max_by_key(|(idle, ..)| *idle);
        let Some((_, id, connection)) = idlest else {
            return false;
        };
        connection.evicted.set(true);
        self.evicting.set(self.evicting.get() + 1);
        if let Some(waker) = self.wakers.borrow().get(&id) {
            waker.wake_by_ref();
        }
        true
    }

    fn start_draining(&self) {
        self.draining.set(true);
        for (_, waker) in self.wakers.borrow_mut().drain() {
            waker.wake();
        }
    }
}

/// Runs on a shard: stops accepting, asks every connection to finish its request and
/// close, and waits up to `grace` for them. Returns the connections still open.
pub async fn drain_local(grace: Duration) -> usize {
    let Some(state) = DRAIN.with(|d| d.borrow().clone()) else {
        return 0;
    };
    state.start_draining();
    crate::api::watch::close_local();
    let deadline = Instant::now() + grace;
    while (state.open.get() > 0 || !state.listener_closed.get()) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    state.open.get()
}

/// A shard's data listener; returns after a drain.
pub async fn serve_shard(
    node: Rc<ShardNode>,
    router: Rc<ShardRouter>,
    fd: RawFd,
    settings: ConnectionSettings,
) {
    // SAFETY: `fd` is a listening socket made by `bind_shared` for this shard alone;
    // ownership passes to the listener here, once.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let state = Rc::new(DrainState::default());
    DRAIN.with(|d| *d.borrow_mut() = Some(state.clone()));
    let mut ctx = ApiContext::new(
        router,
        settings.limits,
        settings.auth.clone(),
        node.id(),
        settings.archive.clone(),
        settings.layout.clone(),
        settings.auditor.clone(),
    );
    ctx.role = settings.role.clone();
    let server = Rc::new(ShardServer {
        ctx: Rc::new(ctx),
        settings: Rc::new(settings),
        state: state.clone(),
        moving_out: Cell::new(0),
    });
    let _registered = Registered::new(server.clone());
    let accept_waiter = state.new_waiter();
    let mut accept_failures = AcceptFailures::new("api", Some(node.id()));
    loop {
        let drained = poll_fn(|cx| {
            if state.draining.get() {
                return Poll::Ready(None);
            }
            state.watch(accept_waiter, cx);
            Poll::Pending
        });
        let accepted = future::or(async { Some(listener.accept().await) }, drained).await;
        let stream = match accepted {
            None => break,
            Some(Ok(stream)) => {
                accept_failures.accepted();
                stream
            }
            Some(Err(e)) => {
                accept_failures.note(&e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if server.full() {
            if !server.state.evict_idlest() {
                metrics::with_http(|m| m.connections_refused += 1);
                if server.settings.tls.is_some() {
                    // A plaintext 503 would read as garbage to a TLS client: closed.
                    drop(stream);
                } else {
                    glommio::spawn_local(refuse(stream)).detach();
                }
                continue;
            }
            // The evicted one closes at its next poll, at once: until then the shard
            // holds one more than its limit.
            metrics::with_http(|m| m.connections_evicted += 1);
        }
        metrics::with_http(|m| m.connections_accepted += 1);
        server.serve(stream, Arrival::default());
    }
    drop(_registered);
    drop(listener);
    state.listener_closed.set(true);
    tracing::info!(shard = node.id(), "listener closed for shutdown");
}

/// Failed accepts (out of descriptors, mostly), logged at most once a second with how
/// many went unlogged: a loop retrying every 10 ms must not flood the log.
pub(crate) struct AcceptFailures {
    /// Which listener (`api`, `ops`), and the shard of an API one.
    listener: &'static str,
    shard: Option<usize>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    pub(crate) fn new(listener: &'static str, shard: Option<usize>) -> AcceptFailures {
        AcceptFailures {
            listener,
            shard,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// An accept succeeded: the failures left unlogged, if any, are logged now.
    pub(crate) fn accepted(&mut self) {
        if self.unlogged > 0 {
            let (listener, shard, unlogged) = (self.listener, self.shard, self.unlogged);
            tracing::warn!(
                listener,
                ?shard,
                more_since_last_line = unlogged,
                "accepts work again"
            );
            self.unlogged = 0;
        }
    }

    pub(crate) fn note(&mut self, error: &dyn std::fmt::Display) {
        if self
            .last_logged
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            self.unlogged += 1;
            return;
        }
        let (listener, shard, unlogged) = (self.listener, self.shard, self.unlogged);
        tracing::warn!(listener, ?shard, %error, more_since_last_line = unlogged, "accept failed");
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }
}

/// Answers a connection over the limit with a 503 and closes it.
pub(crate) async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit; retry shortly","request_id":""}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        api::error::RETRY_AFTER_S,
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}

async fn serve_connection(stream: TcpStream, arrival: Arrival, server: &ShardServer) {
    let _ = stream.set_nodelay(true);
    let shard = server.ctx.shard;
    let Some(tls) = &server.settings.tls else {
        return serve_plain(stream, arrival, server).await;
    };
    // The handshake gets the header-read budget: a client that stalls in it is cut off,
    // and after a second it may be made to give its place to a new connection.
    let state = &server.state;
    let (waiter, occupancy) = state.occupy(None, Rc::default());
    let evicted = poll_fn(|cx| {
        if occupancy.evicted.get() {
            return Poll::Ready(None);
        }
        state.watch(waiter, cx);
        Poll::Pending
    });
    let timed_out = async {
        glommio::timer::sleep(server.settings.header_read_timeout).await;
        None
    };
    let handshake = future::or(
        evicted,
        future::or(timed_out, async { Some(handshake(tls, stream).await) }),
    )
    .await;
    // A handshake that finished in the turn that asked it to make room still makes it:
    // served, it would keep the shard one past its limit.
    let handshake = handshake.filter(|_| !occupancy.evicted.get());
    state.forget(waiter);
    match handshake {
        Some(Ok(stream)) => {
            // A TLS session's state lives in this shard's memory: it stays here.
            let (io, watch) = SecureStream::new(stream);
            serve_http(io, watch, server, None).await;
        }
        Some(Err(e)) => tracing::debug!(shard, error = %e, "TLS handshake failed"),
        None => tracing::debug!(shard, "TLS handshake timed out or made room"),
    }
}

thread_local! {
    /// This shard's queue for TLS handshakes, made on its first one.
    static HANDSHAKES: Cell<Option<glommio::TaskQueueHandle>> = const { Cell::new(None) };
}

/// The default queue's shares over the handshake queue's: under load, requests of
/// connections already up get about 95 % of the shard's time.
const HANDSHAKE_SHARES: usize = 50;
/// How long the executor runs one queue while handshakes wait.
const HANDSHAKE_PREEMPT: Duration = Duration::from_millis(1);

/// A TLS handshake, run in a task queue of its own with a twentieth of the shares of
/// the one requests run in. Its key signature is one uninterrupted stretch of CPU (a
/// few milliseconds with RSA-4096): a flood of handshakes in the requests' queue held
/// every request of the shard behind all of them (a p99 of 0.6–1.1 s for other
/// tenants' reads); here a request waits for about the one running. Dropped (the
/// connection evicted, or out of time), the task is cancelled.
async fn handshake(
    tls: &TlsAcceptor,
    stream: TcpStream,
) -> std::io::Result<futures_rustls::server::TlsStream<TcpStream>> {
    let queue = HANDSHAKES.with(|queue| match queue.get() {
        Some(handle) => handle,
        None => {
            // While handshakes wait, the executor preempts every millisecond (the
            // least latency of its active queues), so it goes back to the requests'
            // queue after each handshake; with `NotImportant` it ran handshakes back
            // to back for up to its 100 ms timer before polling a request again.
            let handle = glommio::executor().create_task_queue(
                glommio::Shares::Static(HANDSHAKE_SHARES),
                glommio::Latency::Matters(HANDSHAKE_PREEMPT),
                "tls-handshakes",
            );
            queue.set(Some(handle));
            handle
        }
    });
    let accepting = tls.accept(stream);
    match glommio::spawn_local_into(accepting, queue) {
        Ok(task) => task.await,
        Err(e) => Err(std::io::Error::other(format!(
            "the handshake queue took no task: {e}"
        ))),
    }
}

/// Serves a plain connection, moving it to the shard its requests are for when they
/// keep going to one other shard ([`Affinity`]).
async fn serve_plain(stream: TcpStream, arrival: Arrival, server: &ShardServer) {
    let Arrival { unread, mut moves } = arrival;
    let (mut io, mut watch) = PlainStream::resume(stream, unread);
    loop {
        let affinity = Affinity::new(moves);
        let Some(leaving) = serve_http(io, watch, server, Some(affinity)).await else {
            return;
        };
        let mut plain = leaving.io;
        let (unread, open) = plain.take_unread(leaving.unread);
        // Attempts count, refused ones too: the streak the next one needs doubles.
        moves = moves.saturating_add(1);
        // A socket at its end stays: hyper answers what it holds, then closes.
        if open {
            if let Ok(duplicate) = plain.duplicate() {
                let arrival = Arrival {
                    unread: unread.clone(),
                    moves,
                };
                if move_to(server, leaving.owner, duplicate, arrival).await {
                    metrics::with_http(|m| m.connections_moved += 1);
                    return; // the owner serves its own descriptor of the socket
                }
            }
        }
        (io, watch) = plain.restart(unread);
    }
}

/// Asks shard `owner` to serve `socket`; whether it took it. Not bounded by a timeout:
/// once the call is sent the owner may yet take the socket, and two shards must never
/// read one connection. A call to a stopped shard fails at once.
async fn move_to(server: &ShardServer, owner: usize, socket: OwnedFd, arrival: Arrival) -> bool {
    // Moves already on their way are as good as gone from here.
    let sender_open = server.state.open.get() - server.moving_out.get();
    server.moving_out.set(server.moving_out.get() + 1);
    let taken = server
        .ctx
        .router
        .call(owner, move |_: Rc<ShardNode>| async move {
            adopt(socket, arrival, sender_open)
        })
        .await
        .unwrap_or(false);
    server.moving_out.set(server.moving_out.get() - 1);
    if !taken {
        metrics::with_http(|m| m.connection_moves_refused += 1);
    }
    taken
}

/// Runs on the owner shard: serves a connection another shard moved here, unless this
/// shard has more connections than the sender, is near its connection limit or is
/// shutting down ([`ShardServer::takes_moved`]).
fn adopt(socket: OwnedFd, arrival: Arrival, sender_open: usize) -> bool {
    let Some(server) = SERVER.with(|s| s.borrow().clone()) else {
        return false;
    };
    if server.state.draining.get() || !server.takes_moved(sender_open) {
        return false;
    }
    // SAFETY: `socket` is an open descriptor of a connected TCP socket, a duplicate
    // made for this shard alone; ownership passes to the stream.
    let stream = unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) };
    server.serve(stream, arrival);
    true
}

/// Which shard a connection's requests are for, to move the connection there when
/// they keep going to one other shard: after [`MOVE_AFTER`] answered requests in a row
/// for that shard's tenants (more after each attempt; requests that name no tenant
/// leave the streak as it is, and requests refused for their credentials do not
/// count), and only between two requests: when hyper has read all of the last one (it
/// had no body, or its handler read the body to the end: [`api::BodyReadToEnd`]) and
/// its answer had a known length (hyper has queued all of it). A connection that
/// carried an event stream stays.
struct Affinity {
    owner: Cell<Option<usize>>,
    streak: Cell<u32>,
    needed: u32,
    settled: Cell<bool>,
    stays: Cell<bool>,
}

/// How a request went, for [`Affinity::answered`].
struct Answered {
    /// The shard of the tenant it named.
    owner: Option<usize>,
    status: StatusCode,
    /// It had no body, or the handler read its body to the end.
    body_read: bool,
    /// The answer's length was known: a whole answer, not a stream.
    sized: bool,
}

impl Affinity {
    fn new(moves: u32) -> Rc<Self> {
        Rc::new(Affinity {
            owner: Cell::new(None),
            streak: Cell::new(0),
            needed: MOVE_AFTER << moves.min(MOST_MOVE_DOUBLINGS),
            settled: Cell::new(false),
            stays: Cell::new(false),
        })
    }

    fn arrived(&self) {
        self.settled.set(false);
    }

    fn answered(&self, answered: &Answered) {
        self.settled.set(answered.body_read && answered.sized);
        if !answered.sized {
            self.stays.set(true);
        }
        let refused = matches!(
            answered.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        );
        let Some(owner) = answered.owner.filter(|_| !refused) else {
            return;
        };
        if self.owner.get() == Some(owner) {
            self.streak.set(self.streak.get().saturating_add(1));
        } else {
            self.owner.set(Some(owner));
            self.streak.set(1);
        }
    }

    /// The shard to move to now, if any.
    fn destination(&self, here: usize) -> Option<usize> {
        let owner = self.owner.get()?;
        let ready = owner != here
            && self.settled.get()
            && !self.stays.get()
            && self.streak.get() >= self.needed;
        ready.then_some(owner)
    }
}

/// The shard that owns the tenant `path` names (`/v1/tenants/{tenant}/…`), when there
/// is more than one.
fn owner_of_path(router: &ShardRouter, path: &str) -> Option<usize> {
    if router.shards() < 2 {
        return None;
    }
    let tenant = path.strip_prefix("/v1/tenants/")?.split('/').next()?;
    let tenant = TenantId::parse(tenant).ok()?;
    Some(owner_of(router, &tenant))
}

/// Whether a client takes what it is sent fast enough. Measured over windows of
/// [`SEND_RATE_WINDOW`] in which every check found its socket full, so that only the
/// client, not the server, is what the bytes wait for: a client that reads an answer a
/// byte at a time would otherwise keep the answer (and its share of the queries'
/// memory) for as long as it likes, and the idle timeout never fires while bytes move.
#[derive(Debug, Default)]
struct SendPace {
    /// Since when every check found the socket full, and the bytes sent by then.
    blocked_since: Option<(Instant, u64)>,
}

impl SendPace {
    /// False once the client took less than `min_per_s` bytes a second over a whole
    /// window of a full socket.
    fn keeps_up(&mut self, blocked: bool, sent: u64, now: Instant, min_per_s: u64) -> bool {
        if !blocked || min_per_s == 0 {
            self.blocked_since = None;
            return true;
        }
        let (since, sent_then) = *self.blocked_since.get_or_insert((now, sent));
        let waited = now.saturating_duration_since(since);
        if waited < SEND_RATE_WINDOW {
            return true;
        }
        let owed =
            u64::try_from(u128::from(min_per_s) * waited.as_millis() / 1000).unwrap_or(u64::MAX);
        if sent - sent_then < owed {
            return false;
        }
        self.blocked_since = Some((now, sent));
        true
    }
}

/// An answer's body that counts, while it lives, as a stream its connection carries
/// when it has no known length (`StreamWatch::streams`): such a connection is never
/// idle. hyper drops the body once sent, or at once for HEAD.
struct Tracked {
    body: api::ApiBody,
    _stream: Option<StreamCount>,
}

/// One stream counted on its connection until dropped.
struct StreamCount(Rc<StreamWatch>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.streams.set(self.0.streams.get() - 1);
    }
}

impl Tracked {
    fn new(body: api::ApiBody, watch: &Rc<StreamWatch>) -> Tracked {
        let stream = body.size_hint().exact().is_none().then(|| {
            watch.streams.set(watch.streams.get() + 1);
            StreamCount(watch.clone())
        });
        Tracked {
            body,
            _stream: stream,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <api::ApiBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection hyper let go of between two requests, to move to `owner`.
struct Leaving<S> {
    owner: usize,
    io: HyperStream<S>,
    /// What hyper read from the socket and did not parse.
    unread: Bytes,
}

/// Serves HTTP/1.1 on one connection until the client leaves, it idles out, or the
/// shard drains; or, given an [`Affinity`], until it is time to move the connection
/// to the shard its requests are for: then hyper lets go of it between two requests
/// and the connection is returned.
async fn serve_http<S>(
    io: HyperStream<S>,
    watch: Rc<StreamWatch>,
    server: &ShardServer,
    affinity: Option<Rc<Affinity>>,
) -> Option<Leaving<S>>
where
    HyperStream<S>: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let (shard, settings, state) = (server.ctx.shard, &server.settings, &server.state);
    let in_flight = Rc::new(Cell::new(0usize));
    let service = {
        let (ctx, in_flight, affinity) = (server.ctx.clone(), in_flight.clone(), affinity.clone());
        let watch = watch.clone();
        service_fn(move |req: Request<Incoming>| {
            let (ctx, in_flight, affinity) = (ctx.clone(), in_flight.clone(), affinity.clone());
            let watch = watch.clone();
            in_flight.set(in_flight.get() + 1);
            watch.request_arrived();
            let mut req = req;
            let moving = affinity.map(|affinity| {
                affinity.arrived();
                let owner = owner_of_path(&ctx.router, req.uri().path());
                // A body counts as read once the handler read it to its end.
                let read_to_end = (!req.body().is_end_stream()).then(|| {
                    let flag = BodyReadToEnd::default();
                    req.extensions_mut().insert(flag.clone());
                    flag
                });
                (affinity, owner, read_to_end)
            });
            // Boxed (an allocation per request) because `poll_without_shutdown`, which
            // hands the connection back, wants an `Unpin` future.
            Box::pin(async move {
                let response = api::handle(ctx, req).await;
                if let (Some((affinity, owner, read_to_end)), Ok(answer)) = (moving, &response) {
                    affinity.answered(&Answered {
                        owner,
                        status: answer.status(),
                        body_read: read_to_end.as_ref().is_none_or(BodyReadToEnd::get),
                        sized: answer.body().size_hint().exact().is_some(),
                    });
                }
                watch.answered();
                in_flight.set(in_flight.get() - 1);
                response.map(|answer| answer.map(|body| Tracked::new(body, &watch)))
            })
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(GlommioTimer)
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        // hyper's read and write buffers per connection (default ~400 KiB): a request
        // head is far smaller, a whole answer is handed over 64 KiB at a time
        // (`api::SlicedBody`), and a `/watch` reader that stops must not hold 400 KiB
        // of events here.
        .max_buf_size(HYPER_BUFFER_BYTES);
    let mut conn = builder.serve_connection(io, service);
    // Idleness is checked a few times per idle timeout: a thousand open `/watch`
    // streams must not mean ten thousand wake-ups a second.
    let tick_every = (settings.idle_timeout / 4).clamp(MIN_IDLE_CHECK, MAX_IDLE_CHECK);
    let mut tick = glommio::timer::Timer::new(tick_every);
    let mut pace = SendPace::default();
    let mut shutting_down = false;
    let mut moving_to = None;
    let (waiter, occupancy) = state.occupy(Some(watch.clone()), in_flight.clone());
    let outcome = poll_fn(|cx| {
        if moving_to.is_some() {
            return conn.poll_without_shutdown(cx);
        }
        if state.draining.get() && !shutting_down {
            shutting_down = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        if !shutting_down {
            state.watch(waiter, cx);
        }
        let mut ticked = false;
        while Pin::new(&mut tick).poll(cx).is_ready() {
            tick = glommio::timer::Timer::new(tick_every);
            ticked = true;
            let idle = watch.last_activity.get().elapsed() >= settings.idle_timeout;
            if in_flight.get() == 0 && idle {
                return Poll::Ready(Ok(()));
            }
        }
        let polled = Pin::new(&mut conn).poll(cx);
        if occupancy.evicted.get() && !shutting_down && polled.is_pending() {
            // Asked to make room. hyper has just read what arrived: a request that came
            // meanwhile is answered (with `Connection: close`); owing nothing, the
            // connection closes now, as hyper's graceful shutdown would wait out the
            // header timeout for a request head begun but not finished.
            let owes = in_flight.get() > 0 || watch.write_blocked.get() || watch.streams.get() > 0;
            if !owes {
                return Poll::Ready(Ok(()));
            }
            shutting_down = true;
            Pin::new(&mut conn).graceful_shutdown();
            return Pin::new(&mut conn).poll(cx);
        }
        // After hyper's poll, which wrote what the socket would take: a shard that was
        // held up must not blame the client for bytes it did not offer.
        let (blocked, sent) = (watch.write_blocked.get(), watch.sent_bytes.get());
        let min_rate = settings.min_send_bytes_per_s;
        if ticked && polled.is_pending() && !pace.keeps_up(blocked, sent, Instant::now(), min_rate)
        {
            // What it was sent (an answer charged to the queries' memory, a `/watch`
            // backlog) is let go with the connection.
            tracing::debug!(
                shard,
                sent,
                "closing a connection whose client reads too slowly"
            );
            metrics::with_http(|m| m.slow_readers_closed += 1);
            // SAFETY: `conn`, which owns the stream and its socket, lives until this
            // function returns.
            unsafe { watch.reset_on_close() };
            return Poll::Ready(Ok(()));
        }
        // Between two requests, with the last answer sent: hyper is idle (it writes an
        // answer's head in the poll that finishes the request, and flushes all it holds
        // unless the socket is full: `pipeline_flush` stays off), so its graceful
        // shutdown just closes the connection (no `Connection: close` on an answer) and
        // `poll_without_shutdown` hands the socket back unshut.
        let between_requests = polled.is_pending()
            && !shutting_down
            && in_flight.get() == 0
            && !watch.write_blocked.get();
        if between_requests {
            moving_to = affinity.as_ref().and_then(|a| a.destination(shard));
            if moving_to.is_some() {
                Pin::new(&mut conn).graceful_shutdown();
                return conn.poll_without_shutdown(cx);
            }
        }
        polled
    })
    .await;
    state.forget(waiter);
    match (outcome, moving_to) {
        (Ok(()), Some(owner)) => {
            let parts = conn.into_parts();
            Some(Leaving {
                owner,
                io: parts.io,
                unread: parts.read_buf,
            })
        }
        (Ok(()), None) => None,
        (Err(e), _) => {
            // Clients that leave mid-request or never finish their headers end up here.
            tracing::debug!(shard, error = %e, "connection closed with an error");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: StatusCode = StatusCode::OK;

    /// `count` requests for `owner`'s tenants, each read whole and answered whole with
    /// `status`.
    fn answer(affinity: &Affinity, owner: Option<usize>, status: StatusCode, count: u32) {
        for _ in 0..count {
            affinity.arrived();
            affinity.answered(&Answered {
                owner,
                status,
                body_read: true,
                sized: true,
            });
        }
    }

    const _: () = assert!(MOVE_AFTER << MOST_MOVE_DOUBLINGS == 64);

    #[test]
    fn failed_accepts_are_logged_once_a_second_with_the_count_left_out() {
        let mut failures = AcceptFailures::new("api", Some(0));
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        failures.note(&error);
        assert_eq!(failures.unlogged, 0, "the first is logged");
        for _ in 0..5 {
            failures.note(&error);
        }
        assert_eq!(
            failures.unlogged, 5,
            "within the second: counted, not logged"
        );
        failures.last_logged = Some(Instant::now() - Duration::from_secs(2));
        failures.note(&error);
        assert_eq!(
            failures.unlogged, 0,
            "a second later: logged with the count"
        );
    }

    #[test]
    fn a_client_is_too_slow_only_after_a_whole_window_of_a_full_socket_below_the_minimum() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let window = SEND_RATE_WINDOW.as_millis() as u64;
        // 1000 bytes a second asked; a full socket from 0 on.
        let mut pace = SendPace::default();
        assert!(pace.keeps_up(true, 0, at(0), 1000));
        assert!(
            pace.keeps_up(true, 10, at(window - 1), 1000),
            "not a window yet"
        );
        assert!(
            !pace.keeps_up(true, 10, at(window), 1000),
            "10 bytes in a window"
        );
        // Exactly the minimum passes, and the next window starts from there.
        let mut pace = SendPace::default();
        assert!(pace.keeps_up(true, 0, at(0), 1000));
        assert!(pace.keeps_up(true, window, at(window), 1000));
        assert!(!pace.keeps_up(true, window + 5, at(2 * window), 1000));
        // A socket with room at one check starts the window again.
        let mut pace = SendPace::default();
        assert!(pace.keeps_up(true, 0, at(0), 1000));
        assert!(pace.keeps_up(false, 0, at(window - 1), 1000));
        assert!(pace.keeps_up(true, 0, at(window), 1000));
        assert!(pace.keeps_up(true, 0, at(2 * window - 1), 1000));
        assert!(!pace.keeps_up(true, 0, at(2 * window - 1 + window), 1000));
        // No minimum: never too slow.
        let mut pace = SendPace::default();
        assert!(pace.keeps_up(true, 0, at(0), 0));
        assert!(pace.keeps_up(true, 0, at(10 * window), 0));
    }

    #[test]
    fn an_address_freed_within_the_wait_is_bound_and_one_held_past_it_is_refused_naming_it() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let freed = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        bind_exclusive(addr).expect("bound once the other socket closed");
        assert!(started.elapsed() >= Duration::from_millis(250));
        freed.join().expect("join");

        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        let started = std::time::Instant::now();
        let refused = bind_shared(addr, 2).expect_err("held for good");
        assert!(started.elapsed() >= ADDR_IN_USE_WAIT);
        assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            refused.to_string().contains(&format!("{addr} is in use")),
            "{refused}"
        );
    }

    #[test]
    fn a_shard_takes_a_moved_connection_only_with_no_more_open_than_the_sender_and_room_left() {
        assert!(takes_moved(0, 1, 512));
        assert!(takes_moved(31, 32, 512));
        assert!(
            takes_moved(32, 32, 512),
            "at par: the move leaves it two ahead"
        );
        assert!(!takes_moved(33, 32, 512), "a busier shard takes no more");
        assert!(takes_moved(383, 400, 512));
        assert!(!takes_moved(384, 400, 512), "three quarters of 512 reached");
        assert!(
            !takes_moved(0, 5, 1),
            "a share of one keeps no room for moves"
        );
    }

    #[test]
    fn a_connection_moves_after_a_streak_for_another_shard_and_the_streak_doubles() {
        for moves in 0..8 {
            let needed = MOVE_AFTER << moves.min(MOST_MOVE_DOUBLINGS);
            let affinity = Affinity::new(moves);
            answer(&affinity, Some(1), OK, needed - 1);
            assert_eq!(affinity.destination(0), None, "{moves} moves");
            answer(&affinity, Some(1), OK, 1);
            assert_eq!(affinity.destination(0), Some(1), "{moves} moves");
            // Already on the owner: nowhere to go.
            assert_eq!(affinity.destination(1), None);
        }
    }

    #[test]
    fn another_shards_request_restarts_the_streak_and_untenanted_ones_leave_it() {
        let affinity = Affinity::new(0);
        answer(&affinity, Some(1), OK, MOVE_AFTER - 1);
        answer(&affinity, None, OK, 10); // `/v1/tenants`, `/v1/admin/…`
        answer(&affinity, Some(1), OK, 1);
        assert_eq!(affinity.destination(0), Some(1));
        answer(&affinity, Some(2), OK, 1);
        answer(&affinity, Some(1), OK, MOVE_AFTER - 1);
        assert_eq!(affinity.destination(0), None);
    }

    #[test]
    fn requests_refused_for_their_credentials_do_not_count() {
        let affinity = Affinity::new(0);
        answer(&affinity, Some(1), StatusCode::UNAUTHORIZED, 100);
        answer(&affinity, Some(1), StatusCode::FORBIDDEN, 100);
        assert_eq!(affinity.destination(0), None);
        // Any other answer counts: a missing row is a request for the tenant's data.
        answer(&affinity, Some(1), StatusCode::NOT_FOUND, MOVE_AFTER);
        assert_eq!(affinity.destination(0), Some(1));
    }

    #[test]
    fn only_an_answered_request_whose_body_was_read_lets_the_connection_move() {
        let affinity = Affinity::new(0);
        answer(&affinity, Some(1), OK, MOVE_AFTER);
        affinity.arrived();
        assert_eq!(affinity.destination(0), None, "a request in flight");
        affinity.answered(&Answered {
            owner: Some(1),
            status: OK,
            body_read: false,
            sized: true,
        });
        assert_eq!(
            affinity.destination(0),
            None,
            "hyper may not have read all its body"
        );
        answer(&affinity, Some(1), OK, 1);
        assert_eq!(affinity.destination(0), Some(1));
    }

    #[test]
    fn a_connection_that_carried_a_stream_stays() {
        let affinity = Affinity::new(0);
        affinity.arrived();
        affinity.answered(&Answered {
            owner: Some(1),
            status: OK,
            body_read: true,
            sized: false,
        });
        answer(&affinity, Some(1), OK, 100);
        assert_eq!(affinity.destination(0), None);
    }
}
