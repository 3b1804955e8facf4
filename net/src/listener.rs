//! The data listener on every shard: accept, serve HTTP/1.1 with hyper, enforce the
//! connection limit and the idle timeout, and drain on shutdown.
//!
//! Sockets are made before the shards start: one `SO_REUSEPORT` socket per shard on the
//! same address (port 0 is resolved by the first), so the kernel spreads connections
//! over shards and a test can bind port 0 and still get one port. `SO_REUSEPORT` would
//! as gladly let a second server of the same user join the group and take part of the
//! traffic, so the address is first bound alone ([`refuse_if_taken`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{future, AsyncWriteExt};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use oc_engine::{ShardNode, ShardRouter};
use socket2::{Domain, Protocol, Socket, Type};

use crate::api::{self, ApiContext, ApiLimits};
use crate::auth::AuthConfig;
use crate::hyper_glommio::{GlommioTimer, HyperStream, PlainStream, SecureStream};
use crate::metrics;

/// hyper's per-connection buffer limit (its minimum is 8 KiB).
const HYPER_BUFFER_BYTES: usize = 64 << 10;
/// How often a connection checks for idleness: a quarter of the idle timeout, within
/// these bounds.
const MIN_IDLE_CHECK: Duration = Duration::from_millis(100);
const MAX_IDLE_CHECK: Duration = Duration::from_secs(1);
/// Pending connections per socket.
const LISTEN_BACKLOG: i32 = 1024;

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

/// A socket bound to `addr` without `SO_REUSEPORT`; an address in use is refused
/// naming it.
fn bound_alone(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Not refused for a port whose old connections linger in TIME_WAIT after a restart.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                e.kind(),
                format!(
                    "{addr} is in use by another process (another oc-server?): stop it or \
                     choose another address"
                ),
            )
        } else {
            e
        }
    })?;
    Ok(socket)
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
    /// Open connections this shard serves; more are answered 503 and closed.
    pub max_connections: usize,
    pub limits: ApiLimits,
    pub auth: AuthConfig,
    /// Serve TLS (rustls) instead of plain HTTP.
    pub tls: Option<TlsAcceptor>,
    /// The archive, read by `/watch` resumes older than the local log.
    pub archive: Option<std::sync::Arc<dyn oc_ship::archive::Archive>>,
    /// The data directory's layout (its epochs).
    pub layout: std::sync::Arc<oc_engine::placement::Layout>,
    /// The audit log of operator actions.
    pub auditor: oc_ship::audit::Auditor,
    /// A follower's role: writes are refused, naming its writer, until it is promoted.
    pub role: Option<std::sync::Arc<crate::replication::ApiRole>>,
}

thread_local! {
    /// This shard's listener state, for the drain call from the control executor.
    static DRAIN: RefCell<Option<Rc<DrainState>>> = const { RefCell::new(None) };
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

    fn forget(&self, id: u64) {
        self.wakers.borrow_mut().remove(&id);
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
    let ctx = Rc::new(ctx);
    let settings = Rc::new(settings);
    let accept_waiter = state.new_waiter();
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
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                tracing::warn!(shard = node.id(), error = %e, "accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if state.open.get() >= settings.max_connections {
            metrics::with_http(|m| m.connections_refused += 1);
            glommio::spawn_local(refuse(stream)).detach();
            continue;
        }
        metrics::with_http(|m| {
            m.connections_accepted += 1;
            m.connections_open += 1;
        });
        state.open.set(state.open.get() + 1);
        let (ctx, state, settings) = (ctx.clone(), state.clone(), settings.clone());
        glommio::spawn_local(async move {
            serve_connection(stream, ctx, &settings, &state).await;
            state.open.set(state.open.get() - 1);
            metrics::with_http(|m| m.connections_open -= 1);
        })
        .detach();
    }
    drop(listener);
    state.listener_closed.set(true);
    tracing::info!(shard = node.id(), "listener closed for shutdown");
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

async fn serve_connection(
    stream: TcpStream,
    ctx: Rc<ApiContext>,
    settings: &ConnectionSettings,
    state: &DrainState,
) {
    let _ = stream.set_nodelay(true);
    let shard = ctx.shard;
    let Some(tls) = &settings.tls else {
        let (io, last_activity) = PlainStream::new(stream);
        return serve_http(io, last_activity, ctx, settings, state).await;
    };
    // The handshake gets the header-read budget: a client that stalls in it is cut off.
    let handshake = future::or(async { Some(tls.accept(stream).await) }, async {
        glommio::timer::sleep(settings.header_read_timeout).await;
        None
    })
    .await;
    match handshake {
        Some(Ok(stream)) => {
            let (io, last_activity) = SecureStream::new(stream);
            serve_http(io, last_activity, ctx, settings, state).await
        }
        Some(Err(e)) => tracing::debug!(shard, error = %e, "TLS handshake failed"),
        None => tracing::debug!(shard, "TLS handshake timed out"),
    }
}

/// Serves HTTP/1.1 on one connection until the client leaves, it idles out, or the
/// shard drains.
async fn serve_http<S>(
    io: HyperStream<S>,
    last_activity: Rc<Cell<Instant>>,
    ctx: Rc<ApiContext>,
    settings: &ConnectionSettings,
    state: &DrainState,
) where
    HyperStream<S>: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
{
    let shard = ctx.shard;
    let in_flight = Rc::new(Cell::new(0usize));
    let service = {
        let in_flight = in_flight.clone();
        service_fn(move |req| {
            let (ctx, in_flight) = (ctx.clone(), in_flight.clone());
            in_flight.set(in_flight.get() + 1);
            async move {
                let response = api::handle(ctx, req).await;
                in_flight.set(in_flight.get() - 1);
                response
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(GlommioTimer)
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        // hyper's read and write buffers per connection (default ~400 KiB): a request
        // head is far smaller, a whole answer is queued as one buffer regardless, and
        // a `/watch` reader that stops must not hold 400 KiB of events here.
        .max_buf_size(HYPER_BUFFER_BYTES);
    let mut conn = pin!(builder.serve_connection(io, service));
    // Idleness is checked a few times per idle timeout: a thousand open `/watch`
    // streams must not mean ten thousand wake-ups a second.
    let tick_every = (settings.idle_timeout / 4).clamp(MIN_IDLE_CHECK, MAX_IDLE_CHECK);
    let mut tick = glommio::timer::Timer::new(tick_every);
    let mut shutting_down = false;
    let waiter = state.new_waiter();
    let outcome = poll_fn(|cx| {
        if state.draining.get() && !shutting_down {
            shutting_down = true;
            conn.as_mut().graceful_shutdown();
        }
        if !shutting_down {
            state.watch(waiter, cx);
        }
        while Pin::new(&mut tick).poll(cx).is_ready() {
            tick = glommio::timer::Timer::new(tick_every);
            let idle = last_activity.get().elapsed() >= settings.idle_timeout;
            if in_flight.get() == 0 && idle {
                return Poll::Ready(Ok(()));
            }
        }
        conn.as_mut().poll(cx)
    })
    .await;
    state.forget(waiter);
    if let Err(e) = outcome {
        // Clients that leave mid-request or never finish their headers end up here.
        tracing::debug!(shard, error = %e, "connection closed with an error");
    }
}
