//! hyper 1.x on glommio: the socket adapter and the timer hyper needs for its header
//! read timeout.
//!
//! The adapter reads through a buffered stream (glommio's own for plain TCP, a
//! `BufReader` over rustls for TLS) and copies what arrived into hyper's buffer, so
//! nothing is zeroed per read and a read error stays an error (glommio's example
//! adapter gets both wrong).
//!
//! A plain connection can also be taken apart between requests
//! ([`PlainStream::take_unread`]) and served again from a duplicate of its socket on
//! another shard ([`PlainStream::resume`]), with the bytes already read from it in front.
//!
//! A client may half-close its side after its last request and still read the
//! answer. hyper, told to allow that (`half_close`), stops watching for the client's
//! end for the rest of a request, which would keep a `/watch` stream to a departed
//! client open; told not to, it drops a request whose answer is not yet made when it
//! finds the end. So the adapter holds the end back from hyper while an answer is
//! owed ([`StreamWatch::request_arrived`]), and hands it over once the answer is made:
//! streams still end when their client leaves. A half-close and a client that left
//! look alike, so the hold is bounded ([`HALF_CLOSE_GRACE`]): a departed client's
//! request is then cancelled, as it is at once on a reset (an error, not an end).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::io::BufReader;
use futures_lite::{AsyncBufRead, AsyncWrite};
use futures_rustls::server::TlsStream;
use glommio::net::{Preallocated, TcpStream};

/// How long a request may still take to answer once its client's end of stream is
/// found: enough for writes and ordinary reads on a loaded shard, short enough that the
/// requests of clients that gave up and left do not pile up for a whole request
/// deadline.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A buffered byte stream as hyper I/O, noting when bytes last moved (for idle timeouts)
/// and whether its last write had to wait.
pub struct HyperStream<S> {
    stream: S,
    /// Bytes read from the socket before this stream took it over, served first.
    prefix: Bytes,
    watch: Rc<StreamWatch>,
}

/// What a connection's owner can see of its stream while hyper holds it.
pub struct StreamWatch {
    /// The connection's socket (open while the stream lives).
    socket: RawFd,
    /// When bytes last moved either way.
    pub last_activity: Cell<Instant>,
    /// When bytes were last sent (or the stream was made): a client that trickles a
    /// request's head in gets no answer, and is as idle as one that sends nothing.
    pub last_sent: Cell<Instant>,
    /// The last write or flush found the socket full: bytes wait to be sent.
    pub write_blocked: Cell<bool>,
    /// Bytes the socket (or TLS) took from hyper, in all.
    pub sent_bytes: Cell<u64>,
    /// Answers of no known length (`/watch` streams) being sent on it.
    pub streams: Cell<u32>,
    /// hyper handed over a request whose answer is not made yet.
    answer_owed: Cell<bool>,
    /// The client's end of stream, found while hyper owed it an answer.
    held_end: RefCell<Option<HeldEnd>>,
}

/// A client's end of stream kept from hyper while hyper owes the client an answer.
struct HeldEnd {
    /// When hyper gets the end anyway: [`HALF_CLOSE_GRACE`] after the end was found or
    /// bytes last moved, whichever is later.
    deadline: Instant,
    /// Fires at `deadline`.
    timer: glommio::timer::Timer,
    /// hyper's read, woken once the answer is made and sent.
    read: Waker,
}

impl StreamWatch {
    /// hyper handed over a request: until its answer is made and sent, the client's
    /// end of stream is held back from hyper (for at most [`HALF_CLOSE_GRACE`] while
    /// no bytes move), so that hyper answers before it closes.
    pub(crate) fn request_arrived(&self) {
        self.answer_owed.set(true);
    }

    /// The answer to the request is made: once it is sent, the end goes to hyper.
    pub(crate) fn answered(&self) {
        self.answer_owed.set(false);
        self.release_end_when_settled();
    }

    /// Makes the socket's close a reset: the bytes it still holds for the client are
    /// dropped at once instead of sent on, at the client's pace, by the kernel.
    ///
    /// # Safety
    ///
    /// The stream this watch was made with must still be open: the descriptor is
    /// borrowed by number, and another file could take the number once it closed.
    pub(crate) unsafe fn reset_on_close(&self) {
        // SAFETY: the caller keeps the stream, and so the socket, open.
        let socket = unsafe { BorrowedFd::borrow_raw(self.socket) };
        if let Err(e) = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO)) {
            tracing::debug!(error = %e, "cannot make a connection's close a reset");
        }
    }

    /// hyper owes the client: an answer not made yet, or bytes it could not send yet.
    fn owes(&self) -> bool {
        self.answer_owed.get() || self.write_blocked.get()
    }

    /// Wakes hyper's held read once it owes nothing, for it to find the end.
    fn release_end_when_settled(&self) {
        if self.owes() {
            return;
        }
        let end = self.held_end.borrow_mut().take();
        if let Some(end) = end {
            end.read.wake();
        }
    }

    /// Whether a read that found the end should keep it from hyper for now.
    fn holds_end(&self, cx: &mut Context<'_>) -> bool {
        if !self.owes() {
            return false;
        }
        let now = Instant::now();
        let mut held = self.held_end.borrow_mut();
        let end = held.get_or_insert_with(|| HeldEnd {
            deadline: now + HALF_CLOSE_GRACE,
            timer: glommio::timer::Timer::new(HALF_CLOSE_GRACE),
            read: cx.waker().clone(),
        });
        let after_activity = self.last_activity.get() + HALF_CLOSE_GRACE;
        if after_activity > end.deadline {
            // Bytes moved since the end was found (a slow reader taking a large
            // answer): the grace counts from then.
            end.deadline = after_activity;
            end.timer = glommio::timer::Timer::new(after_activity.saturating_duration_since(now));
        }
        end.read.clone_from(cx.waker());
        now < end.deadline && Pin::new(&mut end.timer).poll(cx).is_pending()
    }
}

/// Plain TCP.
pub type PlainStream = HyperStream<TcpStream<Preallocated>>;
/// TLS over TCP.
pub type SecureStream = HyperStream<BufReader<TlsStream<TcpStream>>>;

impl<S> HyperStream<S> {
    fn wrap(stream: S, socket: RawFd, prefix: Bytes) -> (Self, Rc<StreamWatch>) {
        let watch = Rc::new(StreamWatch {
            socket,
            last_activity: Cell::new(Instant::now()),
            last_sent: Cell::new(Instant::now()),
            write_blocked: Cell::new(false),
            sent_bytes: Cell::new(0),
            streams: Cell::new(0),
            answer_owed: Cell::new(false),
            held_end: RefCell::new(None),
        });
        let stream = HyperStream {
            stream,
            prefix,
            watch: watch.clone(),
        };
        (stream, watch)
    }
}

impl PlainStream {
    pub fn new(stream: TcpStream) -> (Self, Rc<StreamWatch>) {
        let socket = stream.as_raw_fd();
        Self::wrap(stream.buffered(), socket, Bytes::new())
    }

    /// Serves a connection that another stream read `unread` from already.
    pub(crate) fn resume(stream: TcpStream, unread: Bytes) -> (Self, Rc<StreamWatch>) {
        let socket = stream.as_raw_fd();
        Self::wrap(stream.buffered(), socket, unread)
    }

    /// Takes out every byte read from the socket and not yet parsed, in the order the
    /// client sent them, given what hyper read and did not parse: `hyper_unparsed`
    /// (read first), then what this stream had not handed to hyper yet, then what
    /// glommio buffered or the socket holds right now. The flag is false when the
    /// socket reached its end or failed: the connection should then finish where it
    /// is, with these bytes. (The end may also be found only by the next reader, which
    /// then answers what it was given before it closes.)
    pub(crate) fn take_unread(&mut self, hyper_unparsed: Bytes) -> (Bytes, bool) {
        let mut unread = BytesMut::from(&hyper_unparsed[..]);
        unread.extend_from_slice(&std::mem::take(&mut self.prefix));
        // A stream that would wait has nothing more to give: no waker is needed.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut stream = Pin::new(&mut self.stream);
        let open = match stream.as_mut().poll_fill_buf(&mut cx) {
            Poll::Ready(Ok([]) | Err(_)) => false,
            Poll::Ready(Ok(buffered)) => {
                unread.extend_from_slice(buffered);
                let taken = buffered.len();
                stream.consume(taken);
                true
            }
            Poll::Pending => true,
        };
        (unread.freeze(), open)
    }

    /// A second descriptor of the socket, for another shard to serve it from.
    pub(crate) fn duplicate(&self) -> io::Result<OwnedFd> {
        // SAFETY: the descriptor is this stream's socket, open while `self` lives; the
        // borrow ends within this call.
        unsafe { BorrowedFd::borrow_raw(self.stream.as_raw_fd()) }.try_clone_to_owned()
    }

    /// Serves the same socket again, with `unread` in front.
    pub(crate) fn restart(self, unread: Bytes) -> (Self, Rc<StreamWatch>) {
        let socket = self.stream.as_raw_fd();
        Self::wrap(self.stream, socket, unread)
    }
}

impl SecureStream {
    pub fn new(stream: TlsStream<TcpStream>) -> (Self, Rc<StreamWatch>) {
        let socket = stream.get_ref().0.as_raw_fd();
        Self::wrap(BufReader::new(stream), socket, Bytes::new())
    }
}

impl<S: AsyncBufRead + Unpin> hyper::rt::Read for HyperStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.watch.last_activity.set(Instant::now());
            return Poll::Ready(Ok(()));
        }
        let mut stream = Pin::new(&mut this.stream);
        let available = match stream.as_mut().poll_fill_buf(cx) {
            Poll::Ready(Ok(available)) => available,
            // TLS without the peer's close_notify: for a request that carries its own
            // length, as good as an end.
            Poll::Ready(Err(e))
                if e.kind() == io::ErrorKind::UnexpectedEof && this.watch.holds_end(cx) =>
            {
                return Poll::Pending
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if available.is_empty() && this.watch.holds_end(cx) {
            return Poll::Pending;
        }
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        stream.consume(n);
        if n > 0 {
            this.watch.last_activity.set(Instant::now());
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
        this.watch.write_blocked.set(written.is_pending());
        if let Poll::Ready(Ok(n)) = written {
            if n > 0 {
                let now = Instant::now();
                this.watch.last_activity.set(now);
                this.watch.last_sent.set(now);
                let sent = &this.watch.sent_bytes;
                sent.set(sent.get() + n as u64);
            }
            this.watch.release_end_when_settled();
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // TLS takes bytes into its own buffer and sends them in the flush.
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch.write_blocked.set(flushed.is_pending());
        if flushed.is_ready() {
            this.watch.release_end_when_settled();
        }
        flushed
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use glommio::net::TcpListener;

    use super::*;

    /// A loopback connection: the client's socket and the server's plain stream, with
    /// `sent` written by the client (then its side closed, if `close`) and read by the
    /// stream up to `served` bytes, as hyper would have.
    async fn stream_that_read(
        sent: &[u8],
        served: usize,
        close: bool,
    ) -> (PlainStream, std::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut plain, _) = PlainStream::new(listener.accept().await.expect("accept"));
        client.write_all(sent).expect("send");
        if close {
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut stream = Pin::new(&mut plain.stream);
        let Poll::Ready(Ok(buffered)) = stream.as_mut().poll_fill_buf(&mut cx) else {
            panic!("the bytes arrived");
        };
        assert_eq!(buffered.len(), sent.len(), "one read takes them all");
        stream.consume(served);
        (plain, client)
    }

    #[test]
    fn unread_bytes_come_out_in_the_order_they_were_sent() {
        oc_io::executor::run_local(async {
            let (mut plain, _client) = stream_that_read(b"cdef", 1, false).await;
            // The stream's prefix is what an earlier hyper left; hyper read "a" from it.
            plain.prefix = Bytes::from_static(b"b");
            let (unread, open) = plain.take_unread(Bytes::from_static(b"a"));
            // hyper's unparsed bytes, the prefix's rest, glommio's buffer ("c" went to
            // hyper with "a" in this made-up history, and came back through it).
            assert_eq!(&unread[..], b"abdef");
            assert!(open);
            // Taken out: served again, the stream starts after them.
            let (unread, open) = plain.take_unread(Bytes::new());
            assert_eq!(&unread[..], b"");
            assert!(open, "nothing more yet, and the client is still there");
        });
    }

    #[test]
    fn a_stream_at_its_end_says_so_and_keeps_what_it_read() {
        oc_io::executor::run_local(async {
            let (mut plain, _client) = stream_that_read(b"GET / HTTP/1.1\r\n\r\n", 18, true).await;
            // glommio asked the ring whether more can be read; its answer arrives while
            // the shard runs (until then the end is found by whoever reads next).
            glommio::timer::sleep(Duration::from_millis(50)).await;
            let (unread, open) = plain.take_unread(Bytes::from_static(b"GET /"));
            assert_eq!(&unread[..], b"GET /");
            assert!(!open, "the client closed its side");
        });
    }

    /// Serves one connection with hyper over the adapter, answering its request after
    /// `delay` with `answer_bytes` bytes, to a client that sends one request,
    /// half-closes, then reads `slowly` (pausing 300 ms before each 2 MiB) or at once:
    /// the answer's body (`None`: no whole answer came), and how long after the
    /// half-close the connection ended.
    fn half_closing_client(
        delay: Duration,
        answer_bytes: usize,
        slowly: bool,
    ) -> (Option<Vec<u8>>, Duration) {
        oc_io::executor::run_local(async move {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let client = std::thread::spawn(move || {
                let mut client = std::net::TcpStream::connect(addr).expect("connect");
                client
                    .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    .expect("send");
                client
                    .shutdown(std::net::Shutdown::Write)
                    .expect("half-close");
                let half_closed = Instant::now();
                let mut answer = Vec::new();
                let mut chunk = vec![0u8; 2 << 20];
                loop {
                    if slowly {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    match std::io::Read::read(&mut client, &mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    }
                }
                (answer, half_closed.elapsed())
            });
            let (io, watch) = PlainStream::new(listener.accept().await.expect("accept"));
            let service = hyper::service::service_fn(move |_req| {
                let watch = watch.clone();
                watch.request_arrived();
                async move {
                    glommio::timer::sleep(delay).await;
                    watch.answered();
                    let body = http_body_util::Full::new(Bytes::from(vec![b'a'; answer_bytes]));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(GlommioTimer)
                .serve_connection(io, service)
                .await;
            let (answer, took) = client.join().expect("client");
            let body_at = answer.windows(4).position(|w| w == b"\r\n\r\n");
            let whole = body_at
                .map(|at| answer[at + 4..].to_vec())
                .filter(|body| body.len() == answer_bytes);
            (whole, took)
        })
    }

    #[test]
    fn a_half_closed_client_reads_an_answer_made_within_the_grace() {
        let (answer, took) = half_closing_client(Duration::from_millis(300), 8, false);
        assert_eq!(answer.as_deref(), Some(&b"aaaaaaaa"[..]));
        assert!(took < HALF_CLOSE_GRACE, "closed after its answer: {took:?}");
    }

    #[test]
    fn a_half_closed_client_reading_slowly_gets_all_of_a_large_answer() {
        // More than the loopback socket's buffers hold, read over longer than the grace:
        // hyper writes it in many turns, with the client's end found before the last.
        let size = 24 << 20;
        let (answer, took) = half_closing_client(Duration::ZERO, size, true);
        assert!(answer.is_some(), "the answer was cut short");
        assert!(took > HALF_CLOSE_GRACE, "read faster than meant: {took:?}");
    }

    #[test]
    fn a_request_whose_client_ended_its_side_is_dropped_after_the_grace() {
        let (answer, took) = half_closing_client(Duration::from_secs(60), 8, false);
        assert_eq!(answer, None, "no answer: the request was dropped");
        assert!(
            took >= HALF_CLOSE_GRACE - Duration::from_millis(100),
            "dropped before the grace: {took:?}"
        );
        assert!(
            took < Duration::from_secs(20),
            "held far past the grace, towards the request's own end: {took:?}"
        );
    }
}
