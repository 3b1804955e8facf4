//! The replication protocol's messages and their bytes (FORMAT.md §11). Every message
//! is `u32 length, body, u32 CRC-32C of the body`, little-endian; the body's first byte
//! is its type. Decoding never panics and never allocates more than the length it
//! checked against [`MAX_MESSAGE_BYTES`] first: the peer is untrusted until it has
//! proved the token, and a damaged stream must end the connection, not the process.

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use oc_io::wal::frame;
use oc_io::{Lsn, OwnedFrame};

/// `OCRP`: the first four bytes of a hello.
pub const MAGIC: [u8; 4] = *b"OCRP";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest message body: a page of frames (about 1 MiB) plus one frame of the largest
/// size, with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;
/// Longest token a hello may carry.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Longest refusal message.
const MAX_REASON_BYTES: usize = 4096;

const HELLO: u8 = 1;
const LAYOUT: u8 = 2;
const FRAMES: u8 = 3;
const HEARTBEAT: u8 = 4;
const ACK: u8 = 5;
const REFUSED: u8 = 6;
const CHECKPOINT: u8 = 7;
const CHECKPOINT_PART: u8 = 8;
/// Snapshot bytes in one [`Message::CheckpointPart`].
pub const CHECKPOINT_PART_BYTES: usize = 1 << 20;

/// What a follower asks for in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The writer's layout (shard count, id, epochs), then the connection ends.
    Layout,
    /// The frames of `shard` after `after` (the follower's durable LSN), continuously.
    Stream { shard: u16, after: Lsn },
    /// The newest checkpoint of `shard` (a new follower starts from it), then the
    /// connection ends.
    Checkpoint { shard: u16 },
}

/// One epoch's start on every shard, as the layout file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochStart {
    pub epoch: u64,
    pub first_lsn: Vec<u64>,
}

/// Why the writer refused a hello or ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedCode {
    /// The token is missing or wrong.
    Unauthorized = 1,
    /// The hello is malformed, of another version, or names a shard that does not exist.
    BadHello = 2,
    /// The writer's log no longer holds the frame after the follower's position: the
    /// follower must start again from the archive.
    NotHeld = 3,
    /// The follower's epoch or position is not on the writer's history.
    Diverged = 4,
    /// The server asked is not a writer (a follower does not serve replication).
    NotWriter = 5,
    /// Reading the log failed on the writer.
    Failed = 6,
}

impl RefusedCode {
    fn from_u16(code: u16) -> Option<RefusedCode> {
        Some(match code {
            1 => RefusedCode::Unauthorized,
            2 => RefusedCode::BadHello,
            3 => RefusedCode::NotHeld,
            4 => RefusedCode::Diverged,
            5 => RefusedCode::NotWriter,
            6 => RefusedCode::Failed,
            _ => return None,
        })
    }
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Follower → writer, first: who it is and what it wants.
    Hello {
        token: Vec<u8>,
        /// The follower's data directory id: a writer counts followers, not connections.
        follower_id: String,
        /// The epoch of the follower's last frame (0: it holds none).
        epoch: u64,
        want: Want,
    },
    /// Writer → follower: the writer's layout.
    Layout {
        shards: u16,
        data_dir_id: String,
        /// Epochs after the first, oldest first.
        epochs: Vec<EpochStart>,
        /// The data directory whose first start began the writer's history, when it
        /// knows (a trailing field: a writer that does not send it sends none).
        lineage: Option<String>,
    },
    /// Writer → follower: consecutive durable frames, and the writer's durable LSN
    /// and wall clock when they were sent.
    Frames {
        durable: Lsn,
        writer_time_us: u64,
        frames: Vec<OwnedFrame>,
    },
    /// Writer → follower, first on every stream and when there is nothing new: the
    /// same figures, and how many followers must confirm each write before the writer
    /// acknowledges it (0: asynchronous, or synchronous but acknowledging without them
    /// after a timeout) — what a promotion needs to know.
    Heartbeat {
        durable: Lsn,
        writer_time_us: u64,
        sync_replicas: u16,
    },
    /// Follower → writer: what it holds durable and has applied.
    Ack { durable: Lsn, applied: Lsn },
    /// Writer → follower: the refusal, then the connection ends.
    Refused { code: RefusedCode, reason: String },
    /// Writer → follower, the answer to [`Want::Checkpoint`]: the checkpoint's LSN and
    /// manifest file (`Lsn(0)` and empty: the shard has none yet), and the size of its
    /// snapshot file, which follows in [`Message::CheckpointPart`]s.
    Checkpoint {
        lsn: Lsn,
        manifest: Vec<u8>,
        snapshot_bytes: u64,
    },
    /// The next bytes of the snapshot (at most [`CHECKPOINT_PART_BYTES`]).
    CheckpointPart { bytes: Vec<u8> },
}

/// Why bytes are not a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("a message of {0} bytes is over the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("a message's checksum does not match its bytes")]
    Checksum,
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

impl Message {
    /// The message's type, for an error that must not print its contents (a frames
    /// message or a checkpoint part is up to 8 MiB).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "a hello",
            Message::Layout { .. } => "a layout",
            Message::Frames { .. } => "frames",
            Message::Heartbeat { .. } => "a heartbeat",
            Message::Ack { .. } => "an ack",
            Message::Refused { .. } => "a refusal",
            Message::Checkpoint { .. } => "a checkpoint",
            Message::CheckpointPart { .. } => "a checkpoint part",
        }
    }

    /// The message's body (type byte first), without length and checksum.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Hello {
                token,
                follower_id,
                epoch,
                want,
            } => {
                out.push(HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&VERSION.to_le_bytes());
                put_bytes16(&mut out, token);
                put_bytes16(&mut out, follower_id.as_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                match want {
                    Want::Layout => out.push(1),
                    Want::Stream { shard, after } => {
                        out.push(2);
                        out.extend_from_slice(&shard.to_le_bytes());
                        out.extend_from_slice(&after.0.to_le_bytes());
                    }
                    Want::Checkpoint { shard } => {
                        out.push(3);
                        out.extend_from_slice(&shard.to_le_bytes());
                    }
                }
            }
            Message::Layout {
                shards,
                data_dir_id,
                epochs,
                lineage,
            } => {
                out.push(LAYOUT);
                out.extend_from_slice(&shards.to_le_bytes());
                put_bytes16(&mut out, data_dir_id.as_bytes());
                out.extend_from_slice(&(epochs.len() as u16).to_le_bytes());
                for e in epochs {
                    out.extend_from_slice(&e.epoch.to_le_bytes());
                    for lsn in &e.first_lsn {
                        out.extend_from_slice(&lsn.to_le_bytes());
                    }
                }
                if let Some(lineage) = lineage {
                    put_bytes16(&mut out, lineage.as_bytes());
                }
            }
            Message::Frames {
                durable,
                writer_time_us,
                frames,
            } => {
                out.push(FRAMES);
                out.extend_from_slice(&durable.0.to_le_bytes());
                out.extend_from_slice(&writer_time_us.to_le_bytes());
                out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
                for f in frames {
                    out.extend_from_slice(&frame::encode(&f.as_frame()));
                }
            }
            Message::Heartbeat {
                durable,
                writer_time_us,
                sync_replicas,
            } => {
                out.push(HEARTBEAT);
                out.extend_from_slice(&durable.0.to_le_bytes());
                out.extend_from_slice(&writer_time_us.to_le_bytes());
                out.extend_from_slice(&sync_replicas.to_le_bytes());
            }
            Message::Ack { durable, applied } => {
                out.push(ACK);
                out.extend_from_slice(&durable.0.to_le_bytes());
                out.extend_from_slice(&applied.0.to_le_bytes());
            }
            Message::Refused { code, reason } => {
                out.push(REFUSED);
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                let reason = truncate_utf8(reason, MAX_REASON_BYTES);
                put_bytes16(&mut out, reason.as_bytes());
            }
            Message::Checkpoint {
                lsn,
                manifest,
                snapshot_bytes,
            } => {
                out.push(CHECKPOINT);
                out.extend_from_slice(&lsn.0.to_le_bytes());
                out.extend_from_slice(&snapshot_bytes.to_le_bytes());
                put_bytes32(&mut out, manifest);
            }
            Message::CheckpointPart { bytes } => {
                out.push(CHECKPOINT_PART);
                put_bytes32(&mut out, bytes);
            }
        }
        out
    }

    /// The whole message as sent: length, body, checksum.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out
    }

    /// Decodes a body (type byte first). Frames are checked by their own CRCs, and
    /// must be consecutive.
    pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader(body);
        let message = match r.u8()? {
            HELLO => {
                if r.take(4)? != MAGIC {
                    return Err(malformed("a hello without the OCRP magic"));
                }
                let version = r.u16()?;
                if version != VERSION {
                    return Err(malformed(format!(
                        "protocol version {version}; this server speaks {VERSION}"
                    )));
                }
                let token = r.bytes16()?.to_vec();
                if token.len() > MAX_TOKEN_BYTES {
                    return Err(malformed("a token over 1024 bytes"));
                }
                let follower_id = String::from_utf8(r.bytes16()?.to_vec())
                    .ok()
                    .filter(|id| !id.is_empty() && id.len() <= 64)
                    .ok_or_else(|| malformed("a follower id that is empty, long or not UTF-8"))?;
                let epoch = r.u64()?;
                let want = match r.u8()? {
                    1 => Want::Layout,
                    2 => Want::Stream {
                        shard: r.u16()?,
                        after: Lsn(r.u64()?),
                    },
                    3 => Want::Checkpoint { shard: r.u16()? },
                    other => return Err(malformed(format!("a hello wanting {other}"))),
                };
                Message::Hello {
                    token,
                    follower_id,
                    epoch,
                    want,
                }
            }
            LAYOUT => {
                let shards = r.u16()?;
                let data_dir_id = String::from_utf8(r.bytes16()?.to_vec())
                    .map_err(|_| malformed("a data directory id that is not UTF-8"))?;
                let count = r.u16()?;
                let mut epochs = Vec::new();
                for _ in 0..count {
                    let epoch = r.u64()?;
                    let mut first_lsn = Vec::with_capacity(usize::from(shards).min(r.0.len() / 8));
                    for _ in 0..shards {
                        first_lsn.push(r.u64()?);
                    }
                    epochs.push(EpochStart { epoch, first_lsn });
                }
                let lineage = if r.0.is_empty() {
                    None
                } else {
                    Some(
                        String::from_utf8(r.bytes16()?.to_vec())
                            .ok()
                            .filter(|id| !id.is_empty() && id.len() <= 64)
                            .ok_or_else(|| {
                                malformed("a lineage that is empty, long or not UTF-8")
                            })?,
                    )
                };
                Message::Layout {
                    shards,
                    data_dir_id,
                    epochs,
                    lineage,
                }
            }
            FRAMES => {
                let durable = Lsn(r.u64()?);
                let writer_time_us = r.u64()?;
                let count = r.u32()? as usize;
                let mut frames = Vec::with_capacity(count.min(r.0.len() / 64));
                for _ in 0..count {
                    let f = frame::decode(r.0)
                        .map_err(|e| malformed(format!("a frame that does not decode: {e:?}")))?;
                    let len = f.len();
                    let owned = OwnedFrame::from(&f);
                    if let Some(prev) = frames.last().map(|p: &OwnedFrame| p.lsn) {
                        if owned.lsn != prev.next() {
                            return Err(malformed(format!(
                                "frame LSN {} after {prev}: not consecutive",
                                owned.lsn
                            )));
                        }
                    }
                    frames.push(owned);
                    r.take(len)?;
                }
                Message::Frames {
                    durable,
                    writer_time_us,
                    frames,
                }
            }
            HEARTBEAT => Message::Heartbeat {
                durable: Lsn(r.u64()?),
                writer_time_us: r.u64()?,
                sync_replicas: r.u16()?,
            },
            ACK => Message::Ack {
                durable: Lsn(r.u64()?),
                applied: Lsn(r.u64()?),
            },
            REFUSED => {
                let code = r.u16()?;
                let code = RefusedCode::from_u16(code)
                    .ok_or_else(|| malformed(format!("refusal code {code}")))?;
                let reason = String::from_utf8_lossy(r.bytes16()?).into_owned();
                Message::Refused { code, reason }
            }
            CHECKPOINT => Message::Checkpoint {
                lsn: Lsn(r.u64()?),
                snapshot_bytes: r.u64()?,
                manifest: r.bytes32()?.to_vec(),
            },
            CHECKPOINT_PART => {
                let bytes = r.bytes32()?;
                if bytes.len() > CHECKPOINT_PART_BYTES {
                    return Err(malformed(format!(
                        "a checkpoint part of {} bytes (at most {CHECKPOINT_PART_BYTES})",
                        bytes.len()
                    )));
                }
                Message::CheckpointPart {
                    bytes: bytes.to_vec(),
                }
            }
            other => return Err(malformed(format!("message type {other}"))),
        };
        if !r.0.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the message's fields",
                r.0.len()
            )));
        }
        Ok(message)
    }
}

/// Reads one message; `limit` bounds its body (a hello gets far less than a page).
pub async fn read_message<R: AsyncRead + Unpin>(
    stream: &mut R,
    limit: usize,
) -> Result<Message, WireError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    if &len == b"HTTP" {
        // An HTTP answer ("HTTP/1.1 400 ..."): the address is an API listener.
        return Err(malformed(
            "the peer answered in HTTP: this is an API listener (--listen), not a \
             replication listener; give the writer's --replication-listen address",
        ));
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > limit.min(MAX_MESSAGE_BYTES) {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len + 4];
    stream.read_exact(&mut body).await?;
    let (body, crc) = body.split_at(len);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(WireError::Checksum);
    }
    Message::decode_body(body)
}

/// Writes one message and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    stream: &mut W,
    message: &Message,
) -> Result<(), WireError> {
    stream.write_all(&message.encode()).await?;
    stream.flush().await?;
    Ok(())
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(malformed("a message shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], WireError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    fn bytes32(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oc_io::{Epoch, RecordKind, TimestampMicros};

    fn frame(lsn: u64) -> OwnedFrame {
        OwnedFrame {
            lsn: Lsn(lsn),
            commit_ts: TimestampMicros(1_700_000_000_000_000 + lsn),
            epoch: Epoch(2),
            group_index: 0,
            kind: RecordKind(3),
            tenant: b"acme".to_vec(),
            payload: vec![lsn as u8; 40],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                token: b"secret-token-123".to_vec(),
                follower_id: "5f0c9d7e".into(),
                epoch: 2,
                want: Want::Stream {
                    shard: 1,
                    after: Lsn(41),
                },
            },
            Message::Hello {
                token: Vec::new(),
                follower_id: "5f0c9d7e".into(),
                epoch: 1,
                want: Want::Layout,
            },
            Message::Layout {
                shards: 2,
                data_dir_id: "5f0c9d7e".into(),
                epochs: vec![EpochStart {
                    epoch: 2,
                    first_lsn: vec![10, 20],
                }],
                lineage: Some("5f0c9d7e".into()),
            },
            // From a writer that does not know (or does not send) its lineage.
            Message::Layout {
                shards: 2,
                data_dir_id: "5f0c9d7e".into(),
                epochs: Vec::new(),
                lineage: None,
            },
            Message::Frames {
                durable: Lsn(44),
                writer_time_us: 7,
                frames: vec![frame(42), frame(43), frame(44)],
            },
            Message::Heartbeat {
                durable: Lsn(44),
                writer_time_us: 8,
                sync_replicas: 1,
            },
            Message::Ack {
                durable: Lsn(44),
                applied: Lsn(43),
            },
            Message::Refused {
                code: RefusedCode::NotHeld,
                reason: "oldest LSN 90".into(),
            },
            Message::Hello {
                token: Vec::new(),
                follower_id: "5f0c9d7e".into(),
                epoch: 0,
                want: Want::Checkpoint { shard: 1 },
            },
            Message::Checkpoint {
                lsn: Lsn(77),
                manifest: b"{\"lsn\": 77}".to_vec(),
                snapshot_bytes: 8192,
            },
            Message::CheckpointPart {
                bytes: vec![7; 300],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            assert_eq!(Message::decode_body(&m.encode_body()).expect("decodes"), m);
        }
    }

    #[test]
    fn truncated_or_extended_bodies_are_refused() {
        for m in samples() {
            let body = m.encode_body();
            for cut in 0..body.len() {
                // A layout's trailing lineage is optional: cut right before it, the
                // body is a layout from a writer that does not send one (the envelope's
                // CRC is what catches a cut on the wire).
                let without_lineage = match &m {
                    Message::Layout {
                        shards,
                        data_dir_id,
                        epochs,
                        lineage: Some(_),
                    } => Some(Message::Layout {
                        shards: *shards,
                        data_dir_id: data_dir_id.clone(),
                        epochs: epochs.clone(),
                        lineage: None,
                    }),
                    _ => None,
                };
                match Message::decode_body(&body[..cut]) {
                    Ok(decoded) if Some(&decoded) == without_lineage.as_ref() => {}
                    decoded => assert!(decoded.is_err(), "{m:?} cut at {cut}"),
                }
            }
            let mut longer = body.clone();
            longer.push(0);
            assert!(Message::decode_body(&longer).is_err(), "{m:?} extended");
        }
    }

    #[test]
    fn a_flipped_bit_in_a_frame_or_the_envelope_is_caught() {
        let m = &samples()[3];
        let whole = m.encode();
        for at in 4..whole.len() {
            let mut bad = whole.clone();
            bad[at] ^= 0x10;
            let body_len = whole.len() - 8;
            let (body, crc) = bad[4..].split_at(body_len);
            let envelope_ok = crc32c::crc32c(body).to_le_bytes() == crc;
            assert!(!envelope_ok, "flip at {at} passed the envelope");
        }
        // Inside the body, a frame's own CRC catches it too.
        let mut body = m.encode_body();
        let last = body.len() - 1;
        body[last] ^= 1;
        assert!(Message::decode_body(&body).is_err());
    }

    #[test]
    fn frames_out_of_order_are_refused() {
        let m = Message::Frames {
            durable: Lsn(50),
            writer_time_us: 1,
            frames: vec![frame(42), frame(44)],
        };
        assert!(Message::decode_body(&m.encode_body()).is_err());
    }

    #[test]
    fn a_huge_length_is_refused_before_reading() {
        let mut bytes = ((MAX_MESSAGE_BYTES + 1) as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let mut cursor = futures_lite::io::Cursor::new(bytes);
        let got = futures_lite::future::block_on(read_message(&mut cursor, MAX_MESSAGE_BYTES));
        assert!(matches!(got, Err(WireError::TooLarge(_))), "{got:?}");
        let http = b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec();
        let mut cursor = futures_lite::io::Cursor::new(http);
        let got = futures_lite::future::block_on(read_message(&mut cursor, 1 << 20));
        assert!(
            got.as_ref()
                .is_err_and(|e| e.to_string().contains("--replication-listen")),
            "{got:?}"
        );
    }

    #[test]
    fn a_wrong_magic_or_version_is_refused() {
        let mut body = samples()[0].encode_body();
        body[1] = b'X';
        assert!(Message::decode_body(&body).is_err());
        let mut body = samples()[0].encode_body();
        body[5] = 9;
        assert!(Message::decode_body(&body).is_err());
    }
}
