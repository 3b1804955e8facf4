//! The follower's side: before the shards open, the writer's layout (its shard count
//! and epochs) is fetched so a new data directory is laid out like the writer's; then
//! one task per shard holds a connection to the writer, asks for the frames after the
//! shard's durable LSN, hands each batch to the shard (`Shard::replicate`: durable in
//! this server's log, then applied), and acknowledges what it holds. A connection that
//! fails or falls silent is made again with a back-off; every restart resumes from the
//! follower's own log.

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use oc_engine::placement::EpochStart;
use oc_engine::{ShardNode, ShardRouter};
use oc_io::{Epoch, Lsn};

use super::wire::{self, Message, RefusedCode, Want, MAX_MESSAGE_BYTES};
use super::{LeaderTls, ReplicationStatus, SILENCE_LIMIT};

/// Time to set up a connection to the writer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The first and the longest wait before connecting again.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The writer's layout as its replication listener gives it.
#[derive(Debug, Clone)]
pub struct WriterLayout {
    pub shards: usize,
    pub data_dir_id: String,
    pub epochs: Vec<EpochStart>,
    /// Where its history began (a data directory id), when it knows.
    pub lineage: Option<String>,
}

/// Resolves `--leader-addr` (once, at start: a blocking lookup has no place on the
/// control executor).
pub fn resolve(leader: &str) -> Result<SocketAddr, String> {
    leader
        .to_socket_addrs()
        .map_err(|e| format!("resolving --leader-addr {leader}: {e}"))?
        .next()
        .ok_or_else(|| format!("--leader-addr {leader} resolves to no address"))
}

/// Asks the writer at `leader` for its layout (a blocking call, made once at start).
pub fn fetch_layout(
    leader: &str,
    addr: SocketAddr,
    follower_id: &str,
    token: Option<&str>,
    tls: Option<&LeaderTls>,
) -> Result<WriterLayout, LayoutError> {
    let hello = Message::Hello {
        token: token.unwrap_or_default().as_bytes().to_vec(),
        follower_id: follower_id.to_string(),
        epoch: 0,
        want: Want::Layout,
    };
    // One deadline for the whole exchange: a writer trickling bytes cannot hold the
    // start longer.
    let answer = ask_writer((leader, addr, tls), &hello, Patience::Whole, |stream| {
        read_blocking(stream, 1 << 20)
    })
    .map_err(|e| e.context(&format!("asking {leader} for its layout")))?;
    match answer {
        Message::Layout {
            shards,
            data_dir_id,
            epochs,
            lineage,
        } => Ok(WriterLayout {
            shards: usize::from(shards),
            data_dir_id,
            lineage,
            epochs: epochs
                .into_iter()
                .map(|e| EpochStart {
                    epoch: e.epoch,
                    first_lsn: e.first_lsn,
                    lease_epoch: None,
                })
                .collect(),
        }),
        Message::Refused { reason, .. } => Err(LayoutError::Refused(format!(
            "the writer at {leader} refused: {reason}"
        ))),
        other => Err(LayoutError::Refused(format!(
            "the writer at {leader} answered {} instead of its layout",
            other.kind()
        ))),
    }
}

/// Copies the writer's newest checkpoint of `shard` into `dir` (a new follower's shard
/// directory), its snapshot and manifest files durable under their usual names, and
/// returns its LSN (`None`: the writer has none yet). The snapshot is written as it
/// arrives and checked against the manifest's size and CRC-32C before it counts.
pub fn fetch_checkpoint(
    (leader, addr): (&str, SocketAddr),
    (follower_id, token, tls): (&str, Option<&str>, Option<&LeaderTls>),
    shard: usize,
    dir: &std::path::Path,
) -> Result<Option<Lsn>, LayoutError> {
    let hello = Message::Hello {
        token: token.unwrap_or_default().as_bytes().to_vec(),
        follower_id: follower_id.to_string(),
        epoch: 0,
        want: Want::Checkpoint {
            shard: shard as u16,
        },
    };
    // A checkpoint may take long to copy: the writer must only keep sending.
    ask_writer((leader, addr, tls), &hello, Patience::Progress, |stream| {
        receive_checkpoint(stream, dir)
    })
    .map_err(|e| e.context(&format!("copying shard {shard}'s checkpoint from {leader}")))
}

fn receive_checkpoint(
    stream: &mut dyn Duplex,
    dir: &std::path::Path,
) -> Result<Option<Lsn>, LayoutError> {
    use oc_engine::checkpoint::{manifest_name, snapshot_name, CheckpointManifest};
    use std::io::Write;
    let refused = LayoutError::Refused;
    let (lsn, manifest_bytes, snapshot_bytes) = match read_blocking(stream, MAX_MESSAGE_BYTES)? {
        Message::Checkpoint {
            lsn,
            manifest,
            snapshot_bytes,
        } => (lsn, manifest, snapshot_bytes),
        // A read that failed on the writer, or another follower's copy under way.
        Message::Refused {
            code: RefusedCode::Failed,
            reason,
        } => return Err(LayoutError::Unreachable(format!("not now: {reason}"))),
        Message::Refused { reason, .. } => return Err(refused(format!("refused: {reason}"))),
        other => {
            return Err(refused(format!(
                "answered {} instead of a checkpoint",
                other.kind()
            )))
        }
    };
    if lsn == Lsn(0) {
        return match (manifest_bytes.is_empty(), snapshot_bytes) {
            (true, 0) => Ok(None),
            _ => Err(refused("a checkpoint at LSN 0 with contents".into())),
        };
    }
    let manifest = CheckpointManifest::decode_for(&manifest_bytes, lsn)
        .map_err(|problem| refused(format!("its manifest: {problem}")))?;
    // (`manifest.shard` is not checked: every shard writes 0 there, FORMAT.md §6.)
    if snapshot_bytes != oc_io::align_up(manifest.data_bytes) {
        return Err(refused(format!(
            "its manifest names {} bytes of data, and the writer would send {snapshot_bytes} \
             (the data to the end of its last block is due)",
            manifest.data_bytes
        )));
    }
    let free = free_bytes(dir).map_err(|e| refused(format!("{}: {e}", dir.display())))?;
    if free < snapshot_bytes {
        return Err(refused(format!(
            "its snapshot takes {snapshot_bytes} bytes and {} has {free} free",
            dir.display()
        )));
    }
    let local = |path: &std::path::Path, e: std::io::Error| {
        refused(format!("writing {}: {e}", path.display()))
    };
    let snapshot_path = dir.join(snapshot_name(lsn));
    let mut file = std::fs::File::create(&snapshot_path).map_err(|e| local(&snapshot_path, e))?;
    let (mut received, mut crc) = (0u64, 0u32);
    while received < snapshot_bytes {
        let bytes = match read_blocking(stream, MAX_MESSAGE_BYTES)? {
            Message::CheckpointPart { bytes } => bytes,
            other => {
                return Err(refused(format!(
                    "sent {} inside a checkpoint",
                    other.kind()
                )))
            }
        };
        if bytes.is_empty() || received + bytes.len() as u64 > snapshot_bytes {
            return Err(refused(format!(
                "sent a part of {} bytes at byte {received} of a {snapshot_bytes}-byte snapshot",
                bytes.len()
            )));
        }
        let data_left = manifest.data_bytes.saturating_sub(received);
        let data = &bytes[..bytes
            .len()
            .min(usize::try_from(data_left).unwrap_or(usize::MAX))];
        crc = crc32c::crc32c_append(crc, data);
        file.write_all(&bytes)
            .map_err(|e| local(&snapshot_path, e))?;
        received += bytes.len() as u64;
    }
    if crc != manifest.crc32c {
        return Err(refused(format!(
            "the snapshot's CRC-32C is {crc:#010x}, its manifest says {:#010x}",
            manifest.crc32c
        )));
    }
    file.sync_all().map_err(|e| local(&snapshot_path, e))?;
    let manifest_path = dir.join(manifest_name(lsn));
    std::fs::write(&manifest_path, &manifest_bytes)
        .and_then(|()| std::fs::File::open(&manifest_path)?.sync_all())
        .map_err(|e| local(&manifest_path, e))?;
    Ok(Some(lsn))
}

/// Bytes an unprivileged writer may still put on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a NUL-terminated string and `stat` a zeroed out-parameter that
    // statvfs(3) fills; both outlive the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A blocking byte stream to the writer, plain or TLS.
trait Duplex: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> Duplex for T {}

/// How long a blocking exchange with the writer may take.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// [`SILENCE_LIMIT`] for the whole exchange.
    Whole,
    /// [`SILENCE_LIMIT`] for each [`PROGRESS_BYTES`] received: a long copy goes on
    /// while the writer keeps sending, and one trickling bytes is cut off.
    Progress,
}

/// What a writer must send within each [`SILENCE_LIMIT`] under [`Patience::Progress`].
const PROGRESS_BYTES: usize = 64 << 10;

/// Connects to the writer (TLS when `tls`), sends `hello`, and hands the connection
/// to `then`. Data that is not the protocol (a TLS certificate refused, a listener
/// speaking TLS to plain TCP) is a refusal; a silent or closed connection is not.
fn ask_writer<T>(
    (leader, addr, tls): (&str, SocketAddr, Option<&LeaderTls>),
    hello: &Message,
    patience: Patience,
    then: impl FnOnce(&mut dyn Duplex) -> Result<T, LayoutError>,
) -> Result<T, LayoutError> {
    let stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        LayoutError::Unreachable(format!(
            "connecting to the writer's replication listener {leader}: {e}"
        ))
    })?;
    let mut stream = Deadline {
        stream,
        until: Instant::now() + SILENCE_LIMIT,
        patience,
        progress: 0,
    };
    let Some(tls) = tls else {
        return say_hello(&mut stream, hello).and_then(|()| then(&mut stream));
    };
    let connection =
        futures_rustls::rustls::ClientConnection::new(tls.config.clone(), tls.name.clone())
            .map_err(|e| LayoutError::Refused(tls_failure(leader, e)))?;
    let mut stream = TlsExplained {
        stream: futures_rustls::rustls::StreamOwned::new(connection, stream),
        leader,
    };
    say_hello(&mut stream, hello).and_then(|()| then(&mut stream))
}

/// A TLS stream whose TLS errors (invalid data) say what to check.
struct TlsExplained<'a, S> {
    stream: S,
    leader: &'a str,
}

impl<S> TlsExplained<'_, S> {
    fn explain(&self, e: std::io::Error) -> std::io::Error {
        match e.kind() {
            std::io::ErrorKind::InvalidData => {
                std::io::Error::new(e.kind(), tls_failure(self.leader, e))
            }
            _ => e,
        }
    }
}

impl<S: std::io::Read> std::io::Read for TlsExplained<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf).map_err(|e| self.explain(e))
    }
}

impl<S: std::io::Write> std::io::Write for TlsExplained<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf).map_err(|e| self.explain(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush().map_err(|e| self.explain(e))
    }
}

fn say_hello(stream: &mut dyn Duplex, hello: &Message) -> Result<(), LayoutError> {
    stream
        .write_all(&hello.encode())
        .and_then(|()| stream.flush())
        .map_err(classify_io)
}

/// Reads one message from a blocking stream.
fn read_blocking(stream: &mut dyn Duplex, limit: usize) -> Result<Message, LayoutError> {
    let mut reader = futures_lite::io::AssertAsync::new(stream);
    futures_lite::future::block_on(wire::read_message(&mut reader, limit)).map_err(|e| match e {
        wire::WireError::Io(e) => classify_io(e),
        other => LayoutError::Refused(other.to_string()),
    })
}

fn classify_io(e: std::io::Error) -> LayoutError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => LayoutError::Refused(e.to_string()),
        _ => LayoutError::Unreachable(e.to_string()),
    }
}

/// A blocking stream whose reads and writes end by a deadline (see [`Patience`]).
struct Deadline {
    stream: std::net::TcpStream,
    until: Instant,
    patience: Patience,
    /// Bytes read since the deadline last moved.
    progress: usize,
}

impl Deadline {
    fn remaining(&self) -> std::io::Result<Option<Duration>> {
        match self.until.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(self.remaining()?)?;
        let n = std::io::Read::read(&mut self.stream, buf)?;
        self.progress += n;
        if let Patience::Progress = self.patience {
            if self.progress >= PROGRESS_BYTES {
                self.progress = 0;
                self.until = Instant::now() + SILENCE_LIMIT;
            }
        }
        Ok(n)
    }
}

impl std::io::Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(self.remaining()?)?;
        std::io::Write::write(&mut self.stream, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut self.stream)
    }
}

/// What the per-shard tasks follow with.
pub struct Receiver {
    pub router: Rc<ShardRouter>,
    /// `--leader-addr` as given, and as resolved at start.
    pub leader: String,
    pub addr: SocketAddr,
    /// This follower's data directory id (the writer counts followers by it).
    pub follower_id: String,
    pub token: Option<String>,
    /// TLS to the writer (`--leader-ca`).
    pub tls: Option<LeaderTls>,
    pub status: Rc<ReplicationStatus>,
    /// Ends the process when the writer refuses this follower as diverged.
    pub on_diverged: OnDiverged,
    /// Told when the writer takes a shard's position (reads may then rely on LSNs).
    pub api_role: Option<std::sync::Arc<super::ApiRole>>,
    /// This directory's layout: a writer must share its lineage (checked on every
    /// connection, since the address may reach another database's writer by then).
    pub layout: oc_engine::placement::LiveLayout,
}

/// What a follower does when its writer says its log left the writer's history.
pub type OnDiverged = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Why asking the writer for its layout or a checkpoint failed.
#[derive(Debug)]
pub enum LayoutError {
    /// No answer (not listening, gone silent): a follower with a directory may start
    /// from its own layout meanwhile.
    Unreachable(String),
    /// An answer that will not change by waiting: a refusal, a TLS certificate
    /// problem, a protocol error.
    Refused(String),
}

impl LayoutError {
    /// The same error, saying what was being done.
    fn context(self, doing: &str) -> LayoutError {
        match self {
            LayoutError::Unreachable(e) => LayoutError::Unreachable(format!("{doing}: {e}")),
            LayoutError::Refused(e) => LayoutError::Refused(format!("{doing}: {e}")),
        }
    }
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutError::Unreachable(e) | LayoutError::Refused(e) => f.write_str(e),
        }
    }
}

/// Follows the writer's log of `shard` until the executor ends.
pub async fn follow(receiver: Rc<Receiver>, shard: usize) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let started = Instant::now();
        let why = match follow_once(&receiver, shard).await {
            Ok(()) => "the writer closed the connection".to_string(),
            Err(why) => why,
        };
        {
            let mut link = receiver.status.links[shard].borrow_mut();
            if link.connected > 0 {
                link.reconnects += 1;
            }
            link.connected = 0;
            link.last_error = Some(why.clone());
        }
        tracing::warn!(shard, leader = %receiver.leader, %why, retry_ms = backoff.as_millis() as u64, "replication from the writer stopped; connecting again");
        // A connection that lasted a while starts the back-off over.
        if started.elapsed() > BACKOFF_MAX * 5 {
            backoff = BACKOFF_FIRST;
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn follow_once(receiver: &Receiver, shard: usize) -> Result<(), String> {
    let router = &receiver.router;
    // The log continues after its last placed frame; acks say only what is durable.
    let ((after, epoch), durable, applied) = router
        .call(shard, |node: Rc<ShardNode>| async move {
            let wal = node.shard().wal();
            let (after, epoch) = wal.last_placed();
            // A log holding no frame yet continues a checkpoint (a new follower's copy
            // of the writer's): its position is on the history in that epoch.
            let epoch = match node.shard().newest_checkpoint_epoch() {
                Some(checkpoint) if epoch == Epoch(0) => checkpoint,
                _ => epoch,
            };
            (
                (after, epoch),
                wal.durable_lsn(),
                node.shard().applied_lsn(),
            )
        })
        .await
        .map_err(|e| e.to_string())?;
    let position = (after, epoch, durable, applied);
    check_writer(receiver, dial(receiver).await?).await?;
    exchange(receiver, shard, dial(receiver).await?, position).await
}

/// A connection to the writer's replication listener, or its TLS session.
trait Link: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Link for T {}

/// Connects to the writer, in TLS when the follower has `--leader-ca`.
async fn dial(receiver: &Receiver) -> Result<Box<dyn Link>, String> {
    let stream = TcpStream::connect_timeout(receiver.addr, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {}: {e}", receiver.leader))?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(SILENCE_LIMIT))
        .and_then(|()| stream.set_write_timeout(Some(SILENCE_LIMIT)))
        .map_err(|e| e.to_string())?;
    let Some(tls) = &receiver.tls else {
        return Ok(Box::new(stream));
    };
    let connector = futures_rustls::TlsConnector::from(tls.config.clone());
    let handshake = async {
        connector
            .connect(tls.name.clone(), stream)
            .await
            .map_err(|e| tls_failure(&receiver.leader, e))
    };
    let deadline = async {
        glommio::timer::sleep(CONNECT_TIMEOUT).await;
        Err(format!(
            "no TLS handshake with {} within {} s",
            receiver.leader,
            CONNECT_TIMEOUT.as_secs()
        ))
    };
    let stream = futures_lite::future::or(handshake, deadline).await?;
    Ok(Box::new(stream))
}

/// Asks the writer for its layout (on `link`, a connection of its own) before a
/// stream: one of another database (reached at a start that could not ask, or put at
/// the address since) ends this process, as at start, rather than have its frames
/// placed after this log's.
async fn check_writer(receiver: &Receiver, mut link: Box<dyn Link>) -> Result<(), String> {
    use oc_engine::placement::{check_lineage, DataDirId};
    let hello = Message::Hello {
        token: receiver.token.clone().unwrap_or_default().into_bytes(),
        follower_id: "new".into(),
        epoch: 0,
        want: Want::Layout,
    };
    wire::write_message(&mut link, &hello)
        .await
        .map_err(|e| format!("asking {} for its layout: {e}", receiver.leader))?;
    let answer = wire::read_message(&mut link, 1 << 20)
        .await
        .map_err(|e| format!("reading {}'s layout: {e}", receiver.leader))?;
    let (data_dir_id, lineage) = match answer {
        Message::Layout {
            data_dir_id,
            lineage,
            ..
        } => (data_dir_id, lineage),
        Message::Refused { reason, .. } => {
            return Err(format!(
                "the writer at {} refused: {reason}",
                receiver.leader
            ))
        }
        other => {
            return Err(format!(
                "the writer at {} answered {} instead of its layout",
                receiver.leader,
                other.kind()
            ))
        }
    };
    let Some(writer_id) = DataDirId::parse(&data_dir_id) else {
        return Err(format!(
            "the writer at {} named a data directory that is not an id",
            receiver.leader
        ));
    };
    let lineage = lineage.as_deref().and_then(DataDirId::parse);
    if let Err(e) = check_lineage(&receiver.layout.current(), writer_id, lineage) {
        (receiver.on_diverged)(&format!("the writer at {}: {e}", receiver.leader));
        return Err(e.to_string());
    }
    Ok(())
}

/// Why TLS with the writer failed, with the likely fix.
fn tls_failure(leader: &str, e: impl std::fmt::Display) -> String {
    format!(
        "TLS with {leader}: {e} (a writer's replication listener speaks TLS only when it \
         has --tls-cert, and its certificate must chain to --leader-ca and name \
         --leader-addr's host)"
    )
}

/// Says hello from `position` (the log's last placed frame and its epoch, what is
/// durable and applied) and places what the writer sends until the connection ends.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    receiver: &Receiver,
    shard: usize,
    mut stream: S,
    (after, epoch, durable, applied): (Lsn, Epoch, Lsn, Lsn),
) -> Result<(), String> {
    let router = &receiver.router;
    let hello = Message::Hello {
        token: receiver.token.clone().unwrap_or_default().into_bytes(),
        follower_id: receiver.follower_id.clone(),
        epoch: hello_epoch(after, epoch),
        want: Want::Stream {
            shard: shard as u16,
            after,
        },
    };
    wire::write_message(&mut stream, &hello)
        .await
        .map_err(|e| format!("sending the hello: {e}"))?;
    let mut first = true;
    let mut held = (durable, applied);
    let mut expected = after.next();
    let mut skew_said: Option<Instant> = None;
    loop {
        let message = wire::read_message(&mut stream, MAX_MESSAGE_BYTES)
            .await
            .map_err(|e| format!("reading from the writer: {e}"))?;
        if first {
            first = false;
            if !matches!(message, Message::Refused { .. }) {
                let mut link = receiver.status.links[shard].borrow_mut();
                link.connected = 1;
                link.last_error = None;
                if let Some(role) = &receiver.api_role {
                    role.confirm_history(shard);
                }
                tracing::info!(shard, leader = %receiver.leader, after = after.0, "following the writer");
            }
        }
        if let Message::Frames { writer_time_us, .. } | Message::Heartbeat { writer_time_us, .. } =
            &message
        {
            warn_of_clock_skew(receiver, shard, *writer_time_us, &mut skew_said);
        }
        let writer_durable = match message {
            Message::Frames {
                durable, frames, ..
            } => {
                let count = frames.len() as u64;
                let bytes: usize = frames.iter().map(|f| f.as_frame().len()).sum();
                if frames.first().is_some_and(|f| f.lsn != expected) {
                    return Err(format!(
                        "the writer sent LSN {} where LSN {expected} was due",
                        frames[0].lsn
                    ));
                }
                expected = frames.last().map_or(expected, |f| f.lsn.next());
                held = router
                    .call(shard, move |node: Rc<ShardNode>| async move {
                        let durable = node.shard().replicate(&frames).await?;
                        Ok::<_, oc_engine::EngineError>((durable, node.shard().applied_lsn()))
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("placing the writer's frames in this log: {e}"))?;
                let mut link = receiver.status.links[shard].borrow_mut();
                link.frames += count;
                link.bytes += bytes as u64;
                durable
            }
            Message::Heartbeat {
                durable,
                sync_replicas,
                ..
            } => {
                receiver.status.writer_confirmed_by.set(sync_replicas);
                held.1 = router
                    .call(shard, |node: Rc<ShardNode>| async move {
                        node.shard().applied_lsn()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                durable
            }
            Message::Refused {
                code: RefusedCode::Diverged,
                reason,
            } => {
                (receiver.on_diverged)(&format!(
                    "the writer at {} refused shard {shard}: {reason}. Restart this follower: \
                     at start it takes the writer's epochs and cuts its log where it left the \
                     writer's history (RUNBOOK.md, re-adding the old writer)",
                    receiver.leader
                ));
                return Err(reason);
            }
            Message::Refused { code, reason } => {
                return Err(format!("the writer refused ({code:?}): {reason}"))
            }
            other => {
                return Err(format!(
                    "the writer sent {}, which a follower never gets",
                    other.kind()
                ))
            }
        };
        {
            let mut link = receiver.status.links[shard].borrow_mut();
            link.writer_durable = link.writer_durable.max(writer_durable);
            link.durable = held.0;
            link.applied = held.1;
            if held.1 >= link.writer_durable {
                link.caught_up_at = Some(Instant::now());
            }
        }
        let ack = Message::Ack {
            durable: held.0,
            applied: held.1,
        };
        wire::write_message(&mut stream, &ack)
            .await
            .map_err(|e| format!("acknowledging to the writer: {e}"))?;
    }
}

/// How far the writer's clock may be from this server's before a follower says so.
const CLOCK_SKEW_WARNING: Duration = Duration::from_secs(30);

/// Says (every 10 minutes at most per stream) that the writer's clock is off from this
/// server's: commits are stamped with the writer's clock, and a promotion keeps
/// stamping at least the last of them, so restore targets and the archive's listing
/// follow the skewed clock until this server's catches up.
fn warn_of_clock_skew(
    receiver: &Receiver,
    shard: usize,
    writer_time_us: u64,
    said: &mut Option<Instant>,
) {
    let now_us = oc_io::TimestampMicros::now().0;
    let skew_s = (writer_time_us as f64 - now_us as f64) / 1e6;
    if skew_s.abs() < CLOCK_SKEW_WARNING.as_secs_f64()
        || said.is_some_and(|at| at.elapsed() < Duration::from_secs(600))
    {
        return;
    }
    *said = Some(Instant::now());
    tracing::warn!(
        shard,
        leader = %receiver.leader,
        skew_s = skew_s.round(),
        "the writer's clock is {:.0} s {} this server's: commit times (restore targets, \
         oc-pitr list) follow the writer's clock, and a promoted follower keeps stamping at \
         least the writer's last commit time; fix the clocks (NTP)",
        skew_s.abs(),
        if skew_s > 0.0 { "ahead of" } else { "behind" }
    );
}

/// The epoch of a frame position, as the hello carries it (0: the log holds nothing).
fn hello_epoch(after: Lsn, epoch: Epoch) -> u64 {
    if after.0 == 0 {
        0
    } else {
        epoch.0
    }
}
