//! The WAL frame: one record, self-describing and CRC-protected (FORMAT.md §2).
//!
//! A frame is encoded in two steps. An appender writes the *unstamped* frame (length,
//! kind, tenant, payload) into the group buffer; the group-commit writer *stamps* it
//! just before the write (LSN, commit time, epoch, index in its group, then the CRC).
//! Stamping late is what lets a group that cannot be written (disk full) be dropped
//! without leaving a hole in the LSN sequence.

use std::fmt;

use crate::buffer::BLOCK_SIZE;

/// Log sequence number: per shard, +1 per frame, starting at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
    pub fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Replication epoch; promotion bumps it, frames from an older epoch are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// Microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimestampMicros(pub u64);

impl TimestampMicros {
    /// This host's wall clock (plus the test-only offset [`CLOCK_OFFSET_ENV`]).
    pub fn now() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        TimestampMicros((since.as_micros() as u64).saturating_add_signed(clock_offset_us()))
    }
}

/// Test-only fault injection: milliseconds (signed) added to every wall-clock reading
/// of this process, so replication's tests can run one node with a skewed clock. The
/// safety of the lease never rests on the wall clock (OPERATIONS.md, "Replication").
pub const CLOCK_OFFSET_ENV: &str = "OC_TEST_CLOCK_OFFSET_MS";

fn clock_offset_us() -> i64 {
    static OFFSET_US: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET_US.get_or_init(|| {
        std::env::var(CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|ms| ms.trim().parse::<i64>().ok())
            .map_or(0, |ms| ms.saturating_mul(1000))
    })
}

/// What a frame's payload means; owned by the layer above (0 is never valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordKind(pub u16);

// Byte layout of the frame header (FORMAT.md §2). Offsets derive from sizes here only.
const LEN_AT: usize = 0;
const CRC_AT: usize = LEN_AT + 4;
const LSN_AT: usize = CRC_AT + 4;
const TIMESTAMP_AT: usize = LSN_AT + 8;
const EPOCH_AT: usize = TIMESTAMP_AT + 8;
const GROUP_INDEX_AT: usize = EPOCH_AT + 8;
const KIND_AT: usize = GROUP_INDEX_AT + 4;
const TENANT_LEN_AT: usize = KIND_AT + 2;
const FLAGS_AT: usize = TENANT_LEN_AT + 1;
/// Bytes before the tenant tag.
pub const FRAME_HEADER_BYTES: usize = FLAGS_AT + 1;
const _: () = assert!(FRAME_HEADER_BYTES == 40);

/// `flags` bit 0, on a group's first frame only: the group was written while the
/// previous group's durable write was still on its way, so after a crash either may be
/// on disk without the other (FORMAT.md §2, §3.3). Segments of version 2 only.
pub const FLAG_OVERLAPPED: u8 = 1;

/// Longest tenant tag a frame carries.
pub const MAX_TENANT_BYTES: usize = 64;
/// Largest frame the format allows (header, tenant and payload).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);

/// Where a frame may start at or after `offset` in a group: never in the last 3 bytes
/// of a block (they stay zero), so a length field never straddles a block boundary and
/// a zero length inside a block can only be padding (FORMAT.md §3.3).
pub const fn frame_start_at(offset: usize) -> usize {
    let room = BLOCK_SIZE - offset % BLOCK_SIZE;
    if room < 4 {
        offset + room
    } else {
        offset
    }
}

/// Bytes a frame with this tenant tag and payload occupies.
pub const fn frame_len(tenant_len: usize, payload_len: usize) -> usize {
    FRAME_HEADER_BYTES + tenant_len + payload_len
}

/// A decoded frame borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub lsn: Lsn,
    pub commit_ts: TimestampMicros,
    pub epoch: Epoch,
    /// Position in the group commit that wrote it; 0 starts a group (at a block boundary).
    pub group_index: u32,
    pub kind: RecordKind,
    pub tenant: &'a [u8],
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Encoded length in bytes.
    pub fn len(&self) -> usize {
        frame_len(self.tenant.len(), self.payload.len())
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The LSN of the first frame of this frame's group.
    pub fn group_first_lsn(&self) -> Lsn {
        Lsn(self.lsn.0.saturating_sub(u64::from(self.group_index)))
    }
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header or the declared length.
    Truncated,
    /// The length field is zero: padding or the end of the log, not a frame.
    Zero,
    /// The length field is outside `[FRAME_HEADER_BYTES, MAX_FRAME_BYTES]`.
    BadLength(u32),
    /// The tenant tag does not fit the declared length or the limit.
    BadTenantLength(u8),
    /// Reserved flag bits are set (a newer format, or damage).
    BadFlags(u8),
    /// Kind 0 is never written.
    BadKind,
    /// The checksum does not match.
    BadCrc { stored: u32, computed: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "frame truncated"),
            FrameError::Zero => write!(f, "zero length"),
            FrameError::BadLength(n) => write!(f, "frame length {n} out of range"),
            FrameError::BadTenantLength(n) => write!(f, "tenant length {n} out of range"),
            FrameError::BadFlags(b) => write!(f, "unknown flags {b:#04x}"),
            FrameError::BadKind => write!(f, "record kind 0"),
            FrameError::BadCrc { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
        }
    }
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from(read_u32(b, at)) | (u64::from(read_u32(b, at + 4)) << 32)
}

/// The CRC32C of a frame: its length field followed by everything after the CRC field.
fn frame_crc(frame: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&frame[LEN_AT..CRC_AT]);
    crc32c::crc32c_append(crc, &frame[LSN_AT..])
}

/// Writes an unstamped frame into `out[..frame_len]`; returns its length.
/// `out` must hold at least [`frame_len`] bytes; tenant and size limits are the
/// caller's to check first (the WAL does, with a typed error).
pub fn encode_unstamped(out: &mut [u8], kind: RecordKind, tenant: &[u8], payload: &[u8]) -> usize {
    let len = frame_len(tenant.len(), payload.len());
    assert!(kind.0 != 0, "record kind 0 is reserved");
    assert!(tenant.len() <= MAX_TENANT_BYTES);
    assert!(len <= MAX_FRAME_BYTES);
    let out = &mut out[..len];
    out[LEN_AT..CRC_AT].copy_from_slice(&(len as u32).to_le_bytes());
    out[CRC_AT..KIND_AT].fill(0);
    out[KIND_AT..TENANT_LEN_AT].copy_from_slice(&kind.0.to_le_bytes());
    out[TENANT_LEN_AT] = tenant.len() as u8;
    out[FLAGS_AT] = 0;
    out[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + tenant.len()].copy_from_slice(tenant);
    out[FRAME_HEADER_BYTES + tenant.len()..].copy_from_slice(payload);
    len
}

/// Writes a frame's LSN, commit time and epoch, leaving it unsealed: a frame a writer
/// stamped, waiting in a follower's group until [`stamp`] seals it there.
pub(crate) fn place(frame: &mut [u8], lsn: Lsn, commit_ts: TimestampMicros, epoch: Epoch) {
    frame[LSN_AT..TIMESTAMP_AT].copy_from_slice(&lsn.0.to_le_bytes());
    frame[TIMESTAMP_AT..EPOCH_AT].copy_from_slice(&commit_ts.0.to_le_bytes());
    frame[EPOCH_AT..GROUP_INDEX_AT].copy_from_slice(&epoch.0.to_le_bytes());
}

/// Fills in the position fields of an unstamped frame and seals it with its CRC.
pub fn stamp(
    frame: &mut [u8],
    lsn: Lsn,
    commit_ts: TimestampMicros,
    epoch: Epoch,
    group_index: u32,
) {
    debug_assert_eq!(read_u32(frame, LEN_AT) as usize, frame.len());
    place(frame, lsn, commit_ts, epoch);
    frame[GROUP_INDEX_AT..KIND_AT].copy_from_slice(&group_index.to_le_bytes());
    let crc = frame_crc(frame);
    frame[CRC_AT..LSN_AT].copy_from_slice(&crc.to_le_bytes());
}

/// Marks an unsealed group-start frame as written while the previous group was on its
/// way ([`FLAG_OVERLAPPED`]); [`stamp`] then seals it.
pub(crate) fn mark_overlapped(frame: &mut [u8]) {
    frame[FLAGS_AT] = FLAG_OVERLAPPED;
}

/// Whether a frame that [`decode`] accepted carries [`FLAG_OVERLAPPED`].
pub fn is_overlapped(frame: &[u8]) -> bool {
    frame.get(FLAGS_AT) == Some(&FLAG_OVERLAPPED)
}

/// [`encode`] of a group's first frame marked [`FLAG_OVERLAPPED`] (tests).
#[cfg(test)]
pub(crate) fn encode_overlapped(frame: &Frame<'_>) -> Vec<u8> {
    encode_flagged(frame, true)
}

/// Encodes a complete frame into a new vector (tests, tools and fuzz seeds).
pub fn encode(frame: &Frame<'_>) -> Vec<u8> {
    encode_flagged(frame, false)
}

fn encode_flagged(frame: &Frame<'_>, overlapped: bool) -> Vec<u8> {
    let mut out = vec![0; frame.len()];
    encode_unstamped(&mut out, frame.kind, frame.tenant, frame.payload);
    if overlapped {
        mark_overlapped(&mut out);
    }
    stamp(
        &mut out,
        frame.lsn,
        frame.commit_ts,
        frame.epoch,
        frame.group_index,
    );
    out
}

/// Reads the length field at the start of `bytes`, if four bytes are there.
pub fn peek_len(bytes: &[u8]) -> Option<u32> {
    (bytes.len() >= 4).then(|| read_u32(bytes, LEN_AT))
}

/// A stamped frame's position fields, read without checking its CRC (the group-commit
/// writer reads back what an appender placed).
pub(crate) struct Position {
    pub lsn: Lsn,
    pub commit_ts: TimestampMicros,
    pub epoch: Epoch,
}

pub(crate) fn peek_position(frame: &[u8]) -> Position {
    Position {
        lsn: Lsn(read_u64(frame, LSN_AT)),
        commit_ts: TimestampMicros(read_u64(frame, TIMESTAMP_AT)),
        epoch: Epoch(read_u64(frame, EPOCH_AT)),
    }
}

/// Decodes the frame at the start of `bytes` (which may continue past it). Never
/// panics: every length is checked before it is used.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    let len = peek_len(bytes).ok_or(FrameError::Truncated)?;
    if len == 0 {
        return Err(FrameError::Zero);
    }
    if (len as usize) < FRAME_HEADER_BYTES || len as usize > MAX_FRAME_BYTES {
        return Err(FrameError::BadLength(len));
    }
    let frame = bytes.get(..len as usize).ok_or(FrameError::Truncated)?;
    let stored = read_u32(frame, CRC_AT);
    let computed = frame_crc(frame);
    if stored != computed {
        return Err(FrameError::BadCrc { stored, computed });
    }
    let tenant_len = frame[TENANT_LEN_AT];
    if usize::from(tenant_len) > MAX_TENANT_BYTES
        || FRAME_HEADER_BYTES + usize::from(tenant_len) > frame.len()
    {
        return Err(FrameError::BadTenantLength(tenant_len));
    }
    let flags = frame[FLAGS_AT];
    let group_index = read_u32(frame, GROUP_INDEX_AT);
    if flags != 0 && (flags != FLAG_OVERLAPPED || group_index != 0) {
        return Err(FrameError::BadFlags(flags));
    }
    let kind = read_u16(frame, KIND_AT);
    if kind == 0 {
        return Err(FrameError::BadKind);
    }
    let tenant_end = FRAME_HEADER_BYTES + usize::from(tenant_len);
    Ok(Frame {
        lsn: Lsn(read_u64(frame, LSN_AT)),
        commit_ts: TimestampMicros(read_u64(frame, TIMESTAMP_AT)),
        epoch: Epoch(read_u64(frame, EPOCH_AT)),
        group_index,
        kind: RecordKind(kind),
        tenant: &frame[FRAME_HEADER_BYTES..tenant_end],
        payload: &frame[tenant_end..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Frame<'static> {
        Frame {
            lsn: Lsn(7),
            commit_ts: TimestampMicros(1_700_000_000_000_000),
            epoch: Epoch(3),
            group_index: 2,
            kind: RecordKind(0x0102),
            tenant: b"acme",
            payload: b"hello, wal",
        }
    }

    #[test]
    fn an_overlapped_group_start_matches_its_fixture_and_no_other_frame_carries_the_flag() {
        let expected: Vec<u8> = include_str!("../../tests/fixtures/frame_overlapped.hex")
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("fixture is hex"))
            .collect();
        let start = Frame {
            group_index: 0,
            ..sample()
        };
        assert_eq!(encode_overlapped(&start), expected);
        assert_eq!(decode(&expected), Ok(start));
        assert!(is_overlapped(&expected));
        assert!(!is_overlapped(&encode(&start)));
        // Only a group's first frame may carry it, and no other bit is known.
        let later = encode_overlapped(&sample());
        assert_eq!(decode(&later), Err(FrameError::BadFlags(FLAG_OVERLAPPED)));
        let mut unknown = encode(&start);
        unknown[FLAGS_AT] = 2;
        stamp(&mut unknown, start.lsn, start.commit_ts, start.epoch, 0);
        assert_eq!(decode(&unknown), Err(FrameError::BadFlags(2)));
    }

    #[test]
    fn golden_bytes_match_the_committed_fixture() {
        let fixture = include_str!("../../tests/fixtures/frame_v1.hex");
        let expected: Vec<u8> = fixture
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("fixture is hex"))
            .collect();
        assert_eq!(
            encode(&sample()),
            expected,
            "frame format changed: bump the version"
        );
        assert_eq!(decode(&expected), Ok(sample()));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = encode(&sample());
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&damaged).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn frames_never_start_in_the_last_three_bytes_of_a_block() {
        assert_eq!(frame_start_at(0), 0);
        assert_eq!(frame_start_at(4092), 4092);
        assert_eq!(frame_start_at(4093), 4096);
        assert_eq!(frame_start_at(4095), 4096);
        assert_eq!(frame_start_at(8191), 8192);
    }

    #[test]
    fn zero_length_is_padding_not_a_frame() {
        assert_eq!(decode(&[0; 64]), Err(FrameError::Zero));
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
    }

    proptest! {
        #[test]
        fn round_trip(lsn: u64, ts: u64, epoch: u64, index: u32, kind in 1u16..,
                      tenant in proptest::collection::vec(any::<u8>(), 0..=MAX_TENANT_BYTES),
                      payload in proptest::collection::vec(any::<u8>(), 0..2048),
                      trailing in proptest::collection::vec(any::<u8>(), 0..16)) {
            let frame = Frame { lsn: Lsn(lsn), commit_ts: TimestampMicros(ts), epoch: Epoch(epoch),
                                group_index: index, kind: RecordKind(kind), tenant: &tenant, payload: &payload };
            let mut bytes = encode(&frame);
            prop_assert_eq!(bytes.len(), frame.len());
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(decode(&bytes), Ok(frame));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
