//! The writer's replication listener (`--replication-listen`): one connection per
//! (follower, shard). After the hello (token, what it wants, its position), the
//! connection streams that shard's durable frames after the follower's position, page
//! by page from the log (`Wal::read_after`, on the shard, through the mesh), then each
//! new batch as the shard publishes it, with a heartbeat when there is nothing new. The
//! follower's acknowledgements are read on the same connection by a second task.
//!
//! A connection is refused (a `Refused` message, then closed) for a wrong token, a
//! malformed hello, a shard that does not exist, a position not on this writer's
//! history, or a position the log no longer holds (the follower must start from the
//! archive). Every read is bounded in size and time; a follower that stops reading is
//! cut off by the write timeout.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_rustls::TlsAcceptor;
use glommio::net::{TcpListener, TcpStream};
use oc_engine::placement::Layout;
use oc_engine::{ShardNode, ShardRouter};
use oc_io::{LogRead, Lsn, TimestampMicros};

use super::gate::{self, OnTimeout, SyncPolicy};
use super::wire::{self, EpochStart, Message, RefusedCode, Want};
use super::{token_matches, ReplicationStatus, HEARTBEAT_EVERY, TLS_HANDSHAKE_RECORD};

/// Follower connections served at once per shard (each follower holds one per shard);
/// more are refused once they have shown the token.
pub const MAX_CONNECTIONS_PER_SHARD: usize = 16;
/// Connections that have not yet shown the token, at most, per follower place: past it
/// the oldest of them is closed to make room. Clients without the token thus cannot
/// take the places followers need, and a follower's hello, sent at once, comes in
/// long before this many newer connections push it out.
const PENDING_PER_PLACE: usize = 4;
/// Time a peer gets to send its hello, from connecting (a TLS handshake included).
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest hello (a token and a few numbers).
const MAX_HELLO_BYTES: usize = 2048;
/// A follower that does not take a message for this long is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A follower that acknowledges nothing for this long is cut off (it acknowledges
/// every message, and heartbeats come every [`HEARTBEAT_EVERY`]).
const ACK_TIMEOUT: Duration = Duration::from_secs(15);

/// What the listener serves with.
pub struct Sender {
    pub router: Rc<ShardRouter>,
    pub layout: Arc<Layout>,
    /// The token followers must present (`None`: authentication is off).
    pub token: Option<String>,
    /// TLS, with the API's certificate (`--tls-cert`).
    pub tls: Option<TlsAcceptor>,
    pub status: Rc<ReplicationStatus>,
    /// Synchronous replication: the shards' gates are moved as the followers'
    /// acknowledgements arrive.
    pub sync: Option<SyncPolicy>,
    /// Per shard: a new follower is copying its checkpoint now.
    pub copying: Vec<Cell<bool>>,
}

impl Sender {
    /// What the heartbeats say: how many followers must confirm every write for the
    /// writer to acknowledge it; 0 when it may acknowledge without them (asynchronous,
    /// or `degrade` after a timeout), so a promotion must wait out its lease.
    fn confirmed_by(&self) -> u16 {
        match self.sync {
            Some(policy) if policy.on_timeout == OnTimeout::Refuse => policy.replicas as u16,
            _ => 0,
        }
    }
}

/// Numbers the connections (the key of their acknowledgements).
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Accepts follower connections until the executor ends.
pub async fn serve(listener: TcpListener, sender: Rc<Sender>) {
    let places = MAX_CONNECTIONS_PER_SHARD * sender.layout.shards;
    let admission = Rc::new(Admission::new(places));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a replication connection failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sender = sender.clone();
        let place = Place::enter(&admission);
        glommio::spawn_local(async move {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            let served = accepted(stream, sender, &place);
            // Only a connection still without the token can be pushed out.
            let pushed_out = async {
                place.pushed_out().await;
                Err(
                    "closed to make room for newer connections before it showed the token"
                        .to_string(),
                )
            };
            if let Err(why) = futures_lite::future::or(served, pushed_out).await {
                tracing::info!(%peer, %why, "replication connection ended");
            }
        })
        .detach();
    }
}

/// Who holds the listener's places: followers (connections that showed the token), up
/// to [`MAX_CONNECTIONS_PER_SHARD`] per shard, and apart from them connections before
/// their hello, up to [`PENDING_PER_PLACE`] per place, the oldest closed to make room.
struct Admission {
    places: usize,
    followers: Cell<usize>,
    pending: RefCell<std::collections::VecDeque<Rc<Entry>>>,
}

impl Admission {
    fn new(places: usize) -> Self {
        Admission {
            places,
            followers: Cell::new(0),
            pending: RefCell::default(),
        }
    }
}

/// A connection's standing in [`Admission`].
struct Entry {
    state: Cell<Standing>,
    waker: RefCell<Option<std::task::Waker>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Before its hello: counted among the pending.
    Pending,
    /// Pushed out by a newer pending connection.
    PushedOut,
    /// Showed the token and took a follower's place.
    Follower,
    /// Showed the token when every follower place was taken: refused.
    Refused,
}

/// One connection's place, given back when the connection ends.
struct Place {
    admission: Rc<Admission>,
    entry: Rc<Entry>,
}

impl Place {
    /// A place before the hello; the oldest such connection is pushed out when they
    /// are at their bound.
    fn enter(admission: &Rc<Admission>) -> Place {
        let entry = Rc::new(Entry {
            state: Cell::new(Standing::Pending),
            waker: RefCell::default(),
        });
        let mut pending = admission.pending.borrow_mut();
        if pending.len() >= admission.places * PENDING_PER_PLACE {
            if let Some(oldest) = pending.pop_front() {
                oldest.state.set(Standing::PushedOut);
                if let Some(waker) = oldest.waker.borrow_mut().take() {
                    waker.wake();
                }
            }
        }
        pending.push_back(entry.clone());
        Place {
            admission: admission.clone(),
            entry,
        }
    }

    /// Leaves the pending connections.
    fn leave_pending(&self) {
        self.admission
            .pending
            .borrow_mut()
            .retain(|e| !Rc::ptr_eq(e, &self.entry));
    }

    /// Turns this connection, which showed the token, into a follower's; `Err` with the
    /// reason to refuse it when every follower place is taken.
    fn admit(&self) -> Result<(), String> {
        self.leave_pending();
        let admission = &self.admission;
        if admission.followers.get() >= admission.places {
            self.entry.state.set(Standing::Refused);
            tracing::warn!(
                limit = admission.places,
                "refusing a replication connection: too many open"
            );
            return Err(format!(
                "this writer serves at most {} replication connections",
                admission.places
            ));
        }
        admission.followers.set(admission.followers.get() + 1);
        self.entry.state.set(Standing::Follower);
        Ok(())
    }

    /// Resolves once this connection is pushed out (never once it showed the token).
    async fn pushed_out(&self) {
        std::future::poll_fn(|cx| {
            if self.entry.state.get() == Standing::PushedOut {
                return std::task::Poll::Ready(());
            }
            *self.entry.waker.borrow_mut() = Some(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        match self.entry.state.get() {
            Standing::Pending => self.leave_pending(),
            Standing::Follower => {
                let followers = &self.admission.followers;
                followers.set(followers.get() - 1);
            }
            Standing::PushedOut | Standing::Refused => {}
        }
    }
}

/// Sends a refusal (best effort: the peer may be gone) and returns it as the error
/// that ends the connection.
async fn refuse<W: AsyncWrite + Unpin>(
    stream: &mut W,
    code: RefusedCode,
    reason: String,
) -> Result<(), String> {
    let _ = wire::write_message(
        stream,
        &Message::Refused {
            code,
            reason: reason.clone(),
        },
    )
    .await;
    Err(reason)
}

/// Sets up an accepted connection, with TLS when the listener has it, and serves it.
async fn accepted(mut stream: TcpStream, sender: Rc<Sender>, place: &Place) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(ACK_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    // One deadline for the handshake and the hello: a peer sending a byte at a time
    // cannot hold the slot longer.
    let hello_by = std::time::Instant::now() + HELLO_TIMEOUT;
    let Some(tls) = sender.tls.clone() else {
        return connection(stream, sender, hello_by, place).await;
    };
    let handshake = async {
        // A follower speaking plain TCP hears why it is refused, in plain TCP. A TLS
        // record starts with its type and version 3.x; a plain hello with its length,
        // whose third byte is 0 (a hello is at most 2 KiB).
        let mut first = [0u8; 3];
        let peeked = stream.peek(&mut first).await.map_err(|e| e.to_string())?;
        let tls_record = match peeked {
            0 => return Ok(None),
            1 | 2 => first[0] == TLS_HANDSHAKE_RECORD,
            _ => first[0] == TLS_HANDSHAKE_RECORD && first[1] == 3 && first[2] != 0,
        };
        if !tls_record {
            return refuse(
                &mut stream,
                RefusedCode::BadHello,
                "this writer's replication listener speaks TLS (it has --tls-cert): start the \
                 follower with --leader-ca naming the certificate (or its CA)"
                    .into(),
            )
            .await
            .map(|()| None);
        }
        tls.accept(stream)
            .await
            .map(Some)
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    let deadline = async {
        sleep_until(hello_by).await;
        Err(format!(
            "no TLS handshake within {} s",
            HELLO_TIMEOUT.as_secs()
        ))
    };
    match futures_lite::future::or(handshake, deadline).await? {
        Some(stream) => connection(stream, sender, hello_by, place).await,
        None => Ok(()),
    }
}

async fn sleep_until(at: std::time::Instant) {
    glommio::timer::sleep(at.saturating_duration_since(std::time::Instant::now())).await;
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    mut stream: S,
    sender: Rc<Sender>,
    hello_by: std::time::Instant,
    place: &Place,
) -> Result<(), String> {
    let read = wire::read_message(&mut stream, MAX_HELLO_BYTES);
    let deadline = async {
        sleep_until(hello_by).await;
        Err(wire::WireError::Malformed(format!(
            "no complete hello within {} s",
            HELLO_TIMEOUT.as_secs()
        )))
    };
    let hello = futures_lite::future::or(read, deadline).await;
    let hello = match hello {
        Ok(hello) => hello,
        Err(e) => {
            return refuse(
                &mut stream,
                RefusedCode::BadHello,
                format!("bad hello: {e}"),
            )
            .await
        }
    };
    let Message::Hello {
        token,
        follower_id,
        epoch,
        want,
    } = hello
    else {
        return refuse(
            &mut stream,
            RefusedCode::BadHello,
            "the first message must be a hello".into(),
        )
        .await;
    };
    if !token_matches(sender.token.as_deref(), &token) {
        return refuse(
            &mut stream,
            RefusedCode::Unauthorized,
            "the replication token is missing or wrong (the writer's --replication-token-file, \
             or its admin token)"
                .into(),
        )
        .await;
    }
    if let Err(why) = place.admit() {
        return refuse(&mut stream, RefusedCode::BadHello, why).await;
    }
    let layout = &sender.layout;
    let (shard, after) = match want {
        Want::Layout => {
            let answer = Message::Layout {
                shards: layout.shards as u16,
                data_dir_id: layout.id.to_string(),
                lineage: layout.lineage.map(|id| id.to_string()),
                epochs: layout
                    .epochs
                    .iter()
                    .map(|e| EpochStart {
                        epoch: e.epoch,
                        first_lsn: e.first_lsn.clone(),
                    })
                    .collect(),
            };
            return wire::write_message(&mut stream, &answer)
                .await
                .map_err(|e| e.to_string());
        }
        Want::Stream { shard, after } => (usize::from(shard), Some(after)),
        Want::Checkpoint { shard } => (usize::from(shard), None),
    };
    if shard >= layout.shards {
        return refuse(
            &mut stream,
            RefusedCode::BadHello,
            format!(
                "shard {shard} does not exist: this writer has {} shards",
                layout.shards
            ),
        )
        .await;
    }
    let Some(after) = after else {
        return send_checkpoint(&mut stream, &sender, shard).await;
    };
    let durable = sender
        .router
        .call(shard, |node: Rc<ShardNode>| async move {
            node.shard().wal().durable_lsn()
        })
        .await
        .map_err(|e| e.to_string())?;
    if after > durable {
        return refuse(
            &mut stream,
            RefusedCode::Diverged,
            format!(
                "the follower's shard {shard} ends at LSN {after}, past this writer's log (LSN \
                 {durable}): it holds frames this writer does not (it is a copy of a newer \
                 state, or this writer was restored from an older one); start it on an empty \
                 data directory"
            ),
        )
        .await;
    }
    if after.0 > 0 && !layout.on_history(shard, epoch, after.0) {
        return refuse(
            &mut stream,
            RefusedCode::Diverged,
            format!(
                "the follower's shard {shard} ends at LSN {after} of epoch {epoch}, which is not \
                 on this writer's history (epoch {}): the follower holds frames this writer never \
                 wrote; start it on an empty data directory",
                layout.epoch()
            ),
        )
        .await;
    }
    // A synchronous writer that needs every follower to confirm serves exactly that
    // many: one more could confirm writes while another is being promoted.
    let replicas = usize::from(sender.confirmed_by());
    if replicas > 0 {
        let followers = sender.status.followers();
        if !followers.contains(&follower_id) && followers.len() >= replicas {
            return refuse(
                &mut stream,
                RefusedCode::BadHello,
                format!(
                    "this writer acknowledges a write once all {replicas} of its followers hold \
                     it (--sync-replicas {replicas}) and serves no more than that: another \
                     follower could keep confirming writes while one is promoted. Raise \
                     --sync-replicas, or stop a follower"
                ),
            )
            .await;
        }
    }
    tracing::info!(shard, after = after.0, %follower_id, "a follower is streaming");
    let _ = sender
        .router
        .call(shard, move |node: Rc<ShardNode>| async move {
            node.shard().follower_streams_from(after)
        })
        .await;
    let (reader, writer) = futures_lite::io::split(stream);
    let link = &sender.status.links[shard];
    link.borrow_mut().connected += 1;
    let ended = Rc::new(RefCell::new(None::<String>));
    let id = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // This connection replaces any older one of the same follower: only its acks count.
    sender.status.acks[shard].borrow_mut().insert(
        follower_id.clone(),
        super::FollowerAck {
            conn: id,
            durable: after,
            applied: after,
        },
    );
    sender.status.settle_link(shard);
    let sent = Rc::new(Cell::new(after));
    let acks = glommio::spawn_local(read_acks(
        reader,
        sender.clone(),
        (shard, id, follower_id.clone()),
        sent.clone(),
        ended.clone(),
    ));
    let streamed = stream_frames(writer, &sender, shard, &sent, &ended).await;
    drop(acks);
    {
        let mut acks = sender.status.acks[shard].borrow_mut();
        if acks.get(&follower_id).is_some_and(|ack| ack.conn == id) {
            acks.remove(&follower_id);
        }
    }
    sender.status.settle_link(shard);
    link.borrow_mut().connected -= 1;
    let ack_end = ended.borrow_mut().take();
    streamed.and(ack_end.map_or(Ok(()), Err))
}

/// How long the log after a checkpoint sent to a new follower is held for it, at
/// most: its other shards' copies, opening its shards and connecting its streams take
/// far less; its first stream from there ends the hold.
const FOLLOWER_HOLD: Duration = Duration::from_secs(30 * 60);

/// Sends the newest checkpoint of `shard` to a new follower: its manifest, then its
/// snapshot part by part, each read on the shard from the file held open for the copy
/// (a checkpoint can be far larger than memory allows to hold twice). One copy per
/// shard at a time; another follower asking meanwhile is told to try again. The
/// follower checks the snapshot against the manifest's CRC.
async fn send_checkpoint<S: AsyncWrite + Unpin>(
    stream: &mut S,
    sender: &Sender,
    shard: usize,
) -> Result<(), String> {
    let copying = &sender.copying[shard];
    if copying.replace(true) {
        let reason =
            format!("another follower is copying shard {shard}'s checkpoint; try again shortly");
        return refuse(stream, RefusedCode::Failed, reason).await;
    }
    let router = &sender.router;
    let sent = copy_checkpoint(stream, router, shard).await;
    let _ = router
        .call(shard, |node: Rc<ShardNode>| async move {
            node.shard().close_checkpoint_copy()
        })
        .await;
    copying.set(false);
    sent
}

async fn copy_checkpoint<S: AsyncWrite + Unpin>(
    stream: &mut S,
    router: &ShardRouter,
    shard: usize,
) -> Result<(), String> {
    let newest = router
        .call(shard, |node: Rc<ShardNode>| async move {
            node.shard()
                .open_checkpoint_copy(FOLLOWER_HOLD)
                .await
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?;
    let (lsn, manifest, snapshot_bytes) = match newest {
        Ok(Some(newest)) => newest,
        Ok(None) => (Lsn(0), Vec::new(), 0),
        Err(why) => {
            let reason = format!("reading shard {shard}'s newest checkpoint failed: {why}");
            return refuse(stream, RefusedCode::Failed, reason).await;
        }
    };
    let header = Message::Checkpoint {
        lsn,
        manifest,
        snapshot_bytes,
    };
    let failed = |e: wire::WireError| format!("sending a checkpoint to the follower: {e}");
    wire::write_message(stream, &header).await.map_err(failed)?;
    // The next part is read on the shard while this one is sent: one part at a time
    // left the disk and the connection each idle half the time.
    let read = |offset: u64| async move {
        if offset >= snapshot_bytes {
            return Ok(None);
        }
        let len = (snapshot_bytes - offset).min(wire::CHECKPOINT_PART_BYTES as u64) as usize;
        router
            .call(shard, move |node: Rc<ShardNode>| async move {
                node.shard()
                    .read_checkpoint_copy(offset, len)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
            .map(Some)
            .map_err(|why| format!("reading shard {shard}'s checkpoint at LSN {lsn}: {why}"))
    };
    let mut offset = 0u64;
    let mut part = read(offset).await?;
    while let Some(bytes) = part {
        offset += bytes.len() as u64;
        let send = async {
            wire::write_message(&mut *stream, &Message::CheckpointPart { bytes })
                .await
                .map_err(failed)
        };
        let (sent, next) = futures_lite::future::zip(send, read(offset)).await;
        sent?;
        part = next?;
    }
    tracing::info!(
        shard,
        lsn = lsn.0,
        bytes = snapshot_bytes,
        "sent a checkpoint to a new follower"
    );
    Ok(())
}

/// Sends the frames of `shard` after `after`, then follows the log, until the
/// connection fails or the ack reader ends it.
async fn stream_frames<S: AsyncRead + AsyncWrite + Unpin>(
    mut writer: futures_lite::io::WriteHalf<S>,
    sender: &Sender,
    shard: usize,
    sent: &Cell<Lsn>,
    ended: &RefCell<Option<String>>,
) -> Result<(), String> {
    let router = &sender.router;
    let mut after = sent.get();
    // The first message goes out at once, a heartbeat even when frames are waiting: it
    // tells the follower its hello was accepted, and how this writer acknowledges.
    let mut answered = false;
    loop {
        if ended.borrow().is_some() {
            return Ok(());
        }
        let read = router
            .call(shard, move |node: Rc<ShardNode>| async move {
                node.shard()
                    .wal()
                    .read_after(after, Lsn(u64::MAX))
                    .await
                    .map(|read| (read, node.shard().wal().durable_lsn()))
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?;
        let message = match read {
            Ok((LogRead::Frames(frames), durable)) if !frames.is_empty() && answered => {
                let bytes: usize = frames.iter().map(|f| f.as_frame().len()).sum();
                let count = frames.len() as u64;
                after = frames.last().map_or(after, |f| f.lsn);
                let mut link = sender.status.links[shard].borrow_mut();
                link.frames += count;
                link.bytes += bytes as u64;
                link.writer_durable = durable;
                drop(link);
                Message::Frames {
                    durable,
                    writer_time_us: TimestampMicros::now().0,
                    frames,
                }
            }
            Ok((LogRead::Frames(_), _)) => {
                // Nothing new: wait for the shard to publish more, or send a heartbeat.
                let published = router
                    .call(shard, move |node: Rc<ShardNode>| async move {
                        let feed = node.shard().feed();
                        let wait = async { feed.published_after(after).await };
                        let beat = async {
                            glommio::timer::sleep(HEARTBEAT_EVERY).await;
                            feed.published()
                        };
                        if !answered {
                            return feed.published();
                        }
                        futures_lite::future::or(wait, beat).await
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                if published > after && answered {
                    continue;
                }
                sender.status.links[shard].borrow_mut().writer_durable = published;
                Message::Heartbeat {
                    durable: published,
                    writer_time_us: TimestampMicros::now().0,
                    sync_replicas: sender.confirmed_by(),
                }
            }
            Ok((LogRead::NotHeld { oldest }, _)) => {
                let reason = format!(
                    "this writer's log of shard {shard} no longer holds LSN {} (it starts at {}): \
                     move the follower's data directory aside and start it on an empty one (a \
                     new follower copies this writer's newest checkpoints), or restore one from \
                     the archive (oc-pitr restore --for-follower)",
                    after.0 + 1,
                    oldest.map_or("nothing".into(), |l| l.0.to_string())
                );
                return refuse(&mut writer, RefusedCode::NotHeld, reason).await;
            }
            Err(why) => {
                let reason = format!("reading shard {shard}'s log failed: {why}");
                return refuse(&mut writer, RefusedCode::Failed, reason).await;
            }
        };
        // Acks up to what this message carries count from now on.
        sent.set(after);
        wire::write_message(&mut writer, &message)
            .await
            .map_err(|e| format!("sending to the follower: {e}"))?;
        answered = true;
    }
}

/// Reads the follower's acknowledgements into the link (and, with synchronous
/// replication, moves the shard's gate) until the connection ends.
async fn read_acks<S: AsyncRead + AsyncWrite + Unpin>(
    mut reader: futures_lite::io::ReadHalf<S>,
    sender: Rc<Sender>,
    (shard, id, follower): (usize, u64, String),
    sent: Rc<Cell<Lsn>>,
    ended: Rc<RefCell<Option<String>>>,
) {
    let status = &sender.status;
    let why = loop {
        match wire::read_message(&mut reader, 64).await {
            Ok(Message::Ack { durable, applied }) => {
                // A follower cannot hold what it was not sent on this connection.
                let (durable, applied) = (durable.min(sent.get()), applied.min(sent.get()));
                {
                    let mut acks = status.acks[shard].borrow_mut();
                    match acks.get_mut(&follower) {
                        Some(ack) if ack.conn == id => {
                            ack.durable = durable;
                            ack.applied = applied;
                        }
                        // A newer connection of this follower took over.
                        _ => break "replaced by a newer connection of the same follower".into(),
                    }
                }
                status.settle_link(shard);
                let Some(replicas) = sender.sync.map(|p| p.replicas) else {
                    continue;
                };
                let Some(held) = status.held_by(shard, replicas) else {
                    continue;
                };
                if held > status.links[shard].borrow().gate_at {
                    status.links[shard].borrow_mut().gate_at = held;
                    let moved = sender
                        .router
                        .call(shard, move |_: Rc<ShardNode>| async move {
                            gate::advance_local(held)
                        })
                        .await;
                    if let Err(e) = moved {
                        break format!("moving shard {shard}'s acknowledgement gate: {e}");
                    }
                }
            }
            Ok(other) => break format!("the follower sent {} where an ack belongs", other.kind()),
            Err(e) => break format!("reading the follower's acks: {e}"),
        }
    };
    *ended.borrow_mut() = Some(why);
}
