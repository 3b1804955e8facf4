//! hyper 1.x on glommio: the socket adapter and the timer hyper needs for its header
//! read timeout.
//!
//! The adapter reads through a buffered stream (glommio's own for plain TCP, a
//! `BufReader` over rustls for TLS) and copies what arrived into hyper's buffer, so
//! nothing is zeroed per read and a read error stays an error (glommio's example
//! adapter gets both wrong).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::io::BufReader;
use futures_lite::{AsyncBufRead, AsyncWrite};
use futures_rustls::server::TlsStream;
use glommio::net::{Preallocated, TcpStream};

/// A buffered byte stream as hyper I/O, noting when bytes last moved (for idle timeouts).
pub struct HyperStream<S> {
    stream: S,
    last_activity: Rc<Cell<Instant>>,
}

/// Plain TCP.
pub type PlainStream = HyperStream<TcpStream<Preallocated>>;
/// TLS over TCP.
pub type SecureStream = HyperStream<BufReader<TlsStream<TcpStream>>>;

impl<S> HyperStream<S> {
    fn wrap(stream: S) -> (Self, Rc<Cell<Instant>>) {
        let last_activity = Rc::new(Cell::new(Instant::now()));
        (
            HyperStream {
                stream,
                last_activity: last_activity.clone(),
            },
            last_activity,
        )
    }
}

impl PlainStream {
    pub fn new(stream: TcpStream) -> (Self, Rc<Cell<Instant>>) {
        Self::wrap(stream.buffered())
    }
}

impl SecureStream {
    pub fn new(stream: TlsStream<TcpStream>) -> (Self, Rc<Cell<Instant>>) {
        Self::wrap(BufReader::new(stream))
    }
}

impl<S: AsyncBufRead + Unpin> hyper::rt::Read for HyperStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut stream = Pin::new(&mut this.stream);
        let available = match stream.as_mut().poll_fill_buf(cx) {
            Poll::Ready(Ok(available)) => available,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        stream.consume(n);
        if n > 0 {
            this.last_activity.set(Instant::now());
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> hyper::rt::Write for HyperStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                this.last_activity.set(Instant::now());
            }
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.get_mut().stream).poll_close(cx) {
            // The peer already left: there is nothing to shut down.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

/// hyper's timer over glommio's. hyper asks for `Send + Sync` sleeps because its timer
/// may be used from any thread; here every sleep is created and polled inside one
/// connection future that never leaves its shard's thread, so the bound is never
/// exercised. A glommio timer polled on another thread would be a bug; the assertion
/// in `poll` catches it.
#[derive(Clone, Copy, Debug, Default)]
pub struct GlommioTimer;

impl hyper::rt::Timer for GlommioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ShardSleep {
            timer: glommio::timer::Timer::new(duration),
            thread: std::thread::current().id(),
        })
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }
}

struct ShardSleep {
    timer: glommio::timer::Timer,
    thread: std::thread::ThreadId,
}

// SAFETY: see `GlommioTimer`: a `ShardSleep` is created and polled on one shard thread
// only (asserted in `poll`), so no other thread ever touches the glommio timer.
unsafe impl Send for ShardSleep {}
// SAFETY: as above; `&ShardSleep` is never shared across threads.
unsafe impl Sync for ShardSleep {}

impl Future for ShardSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        assert_eq!(
            this.thread,
            std::thread::current().id(),
            "a shard's timer was polled on another thread"
        );
        Pin::new(&mut this.timer).poll(cx).map(|_| ())
    }
}

impl hyper::rt::Sleep for ShardSleep {}
