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

use glommio::net::{TcpListener, TcpStream};
use oc_engine::placement::Layout;
use oc_engine::{ShardNode, ShardRouter};
use oc_io::{LogRead, Lsn, TimestampMicros};

use super::wire::{self, EpochStart, Message, RefusedCode, Want};
use super::{gate, token_matches, ReplicationStatus, HEARTBEAT_EVERY};

/// Follower connections served at once; more are refused.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a peer gets to send its hello.
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
    pub status: Rc<ReplicationStatus>,
    /// With synchronous replication: how many followers must hold a write (the shards'
    /// gates are moved as their acknowledgements arrive).
    pub sync_replicas: Option<usize>,
}

/// Numbers the connections (the key of their acknowledgements).
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Accepts follower connections until the executor ends.
pub async fn serve(listener: TcpListener, sender: Rc<Sender>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a replication connection failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.get() >= MAX_CONNECTIONS {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "refusing a replication connection: too many open"
            );
            let mut stream = stream;
            let _ = refuse(
                &mut stream,
                RefusedCode::BadHello,
                format!("this writer serves at most {MAX_CONNECTIONS} replication connections"),
            )
            .await;
            continue;
        }
        open.set(open.get() + 1);
        let sender = sender.clone();
        let open = open.clone();
        glommio::spawn_local(async move {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            if let Err(why) = connection(stream, sender).await {
                tracing::info!(%peer, %why, "replication connection ended");
            }
            open.set(open.get() - 1);
        })
        .detach();
    }
}

async fn refuse(stream: &mut TcpStream, code: RefusedCode, reason: String) -> Result<(), String> {
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

async fn connection(mut stream: TcpStream, sender: Rc<Sender>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let hello = match wire::read_message(&mut stream, MAX_HELLO_BYTES).await {
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
    let Message::Hello { token, epoch, want } = hello else {
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
    let layout = &sender.layout;
    let (shard, after) = match want {
        Want::Layout => {
            let answer = Message::Layout {
                shards: layout.shards as u16,
                data_dir_id: layout.id.to_string(),
                epochs: layout
                    .epochs
                    .iter()
                    .map(|e| EpochStart {
                        epoch: e.epoch,
                        first_lsn: e.first_lsn.clone(),
                    })
                    .collect(),
                sync_replicas: sender.sync_replicas.unwrap_or(0) as u16,
            };
            return wire::write_message(&mut stream, &answer)
                .await
                .map_err(|e| e.to_string());
        }
        Want::Stream { shard, after } => (usize::from(shard), after),
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
    stream
        .set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(|e| e.to_string())?;
    tracing::info!(shard, after = after.0, "a follower is streaming");
    let (reader, writer) = futures_lite::io::split(stream);
    let link = &sender.status.links[shard];
    link.borrow_mut().connected += 1;
    let ended = Rc::new(RefCell::new(None::<String>));
    let id = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let acks = glommio::spawn_local(read_acks(
        reader,
        sender.clone(),
        (shard, id),
        ended.clone(),
    ));
    let streamed = stream_frames(writer, &sender, shard, after, &ended).await;
    drop(acks);
    sender.status.acks[shard].borrow_mut().remove(&id);
    link.borrow_mut().connected -= 1;
    let ack_end = ended.borrow_mut().take();
    streamed.and(ack_end.map_or(Ok(()), Err))
}

/// Sends the frames of `shard` after `after`, then follows the log, until the
/// connection fails or the ack reader ends it.
async fn stream_frames(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    sender: &Sender,
    shard: usize,
    mut after: Lsn,
    ended: &RefCell<Option<String>>,
) -> Result<(), String> {
    let router = &sender.router;
    // The first message goes out at once, even with nothing to send: it tells the
    // follower its hello was accepted.
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
            Ok((LogRead::Frames(frames), durable)) if !frames.is_empty() => {
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
                if published > after {
                    continue;
                }
                sender.status.links[shard].borrow_mut().writer_durable = published;
                Message::Heartbeat {
                    durable: published,
                    writer_time_us: TimestampMicros::now().0,
                }
            }
            Ok((LogRead::NotHeld { oldest }, _)) => {
                let reason = format!(
                    "this writer's log of shard {shard} no longer holds LSN {} (it starts at {}): \
                     start the follower from the archive (oc-pitr restore) or an empty directory \
                     while the log still holds LSN 1",
                    after.0 + 1,
                    oldest.map_or("nothing".into(), |l| l.0.to_string())
                );
                let _ = wire::write_message(
                    &mut writer,
                    &Message::Refused {
                        code: RefusedCode::NotHeld,
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(reason);
            }
            Err(why) => {
                let reason = format!("reading shard {shard}'s log failed: {why}");
                let _ = wire::write_message(
                    &mut writer,
                    &Message::Refused {
                        code: RefusedCode::Failed,
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(reason);
            }
        };
        wire::write_message(&mut writer, &message)
            .await
            .map_err(|e| format!("sending to the follower: {e}"))?;
        answered = true;
    }
}

/// Reads the follower's acknowledgements into the link (and, with synchronous
/// replication, moves the shard's gate) until the connection ends.
async fn read_acks(
    mut reader: futures_lite::io::ReadHalf<TcpStream>,
    sender: Rc<Sender>,
    (shard, id): (usize, u64),
    ended: Rc<RefCell<Option<String>>>,
) {
    let status = &sender.status;
    let why = loop {
        match wire::read_message(&mut reader, 64).await {
            Ok(Message::Ack { durable, applied }) => {
                {
                    let mut link = status.links[shard].borrow_mut();
                    link.durable = durable;
                    link.applied = applied;
                }
                status.acks[shard].borrow_mut().insert(id, durable);
                let Some(replicas) = sender.sync_replicas else {
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
            Ok(other) => break format!("the follower sent {other:?} where an ack belongs"),
            Err(e) => break format!("reading the follower's acks: {e}"),
        }
    };
    *ended.borrow_mut() = Some(why);
}
