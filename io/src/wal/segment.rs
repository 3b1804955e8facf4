//! Segment files (FORMAT.md §3): block 0 holds the header, frames fill the blocks after
//! it, and the last block is reserved for the footer written when the segment is
//! sealed. Groups of frames start on block boundaries; the bytes between a group's last
//! frame and the next block boundary are zero.

use super::frame::{Epoch, Lsn, TimestampMicros};
use crate::buffer::BLOCK_SIZE;

/// Segment header magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"OCWALSEG";
/// Segment footer magic.
pub const FOOTER_MAGIC: [u8; 8] = *b"OCWALEND";
/// Segment format version this build writes. Version 2 added the overlapped flag of a
/// group's first frame (FORMAT.md §2, §3.3); version 1 segments have no such frames and
/// read the same way. Readers refuse versions outside `OLDEST..=this`, so a build that
/// knows only version 1 refuses a version 2 log instead of cutting it.
pub const SEGMENT_FORMAT_VERSION: u32 = 2;
/// The oldest segment format version this build reads.
pub const OLDEST_SEGMENT_FORMAT_VERSION: u32 = 1;
/// The format version a header block claims, read without decoding the header.
pub fn header_version(block: &[u8]) -> Option<u32> {
    (block.len() >= H_BLOCK).then(|| u32_at(block, H_VERSION))
}

/// The format version a footer block claims, read without decoding the footer.
pub fn footer_version(block: &[u8]) -> Option<u32> {
    (block.len() >= F_FLAGS).then(|| u32_at(block, F_VERSION))
}

/// Frames start after the header block.
pub const DATA_START: u64 = BLOCK_SIZE as u64;
/// Smallest segment: header, one data block, footer.
pub const MIN_SEGMENT_BYTES: u64 = 3 * BLOCK_SIZE as u64;
/// Largest segment the log writes and an archive image may expand to (a header that
/// claims more is refused before anything is allocated for it).
pub const MAX_SEGMENT_BYTES: u64 = 4 << 30;
/// Default segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

// Header layout (FORMAT.md §3.1).
const H_MAGIC: usize = 0;
const H_VERSION: usize = H_MAGIC + 8;
const H_BLOCK: usize = H_VERSION + 4;
const H_SHARD: usize = H_BLOCK + 4;
const H_MAX_GROUP: usize = H_SHARD + 4;
const H_EPOCH: usize = H_MAX_GROUP + 4;
const H_FIRST_LSN: usize = H_EPOCH + 8;
const H_CAPACITY: usize = H_FIRST_LSN + 8;
const H_CREATED: usize = H_CAPACITY + 8;
const H_CRC: usize = H_CREATED + 8;
/// Bytes of the header that carry meaning; the rest of block 0 is zero.
pub const HEADER_BYTES: usize = H_CRC + 4;
const _: () = assert!(HEADER_BYTES == 60);

// Footer layout (FORMAT.md §3.2).
const F_MAGIC: usize = 0;
const F_VERSION: usize = F_MAGIC + 8;
const F_FLAGS: usize = F_VERSION + 4;
const F_FIRST_LSN: usize = F_FLAGS + 4;
const F_LAST_LSN: usize = F_FIRST_LSN + 8;
const F_DATA_END: usize = F_LAST_LSN + 8;
const F_LAST_TS: usize = F_DATA_END + 8;
const F_DATA_CRC: usize = F_LAST_TS + 8;
const F_CRC: usize = F_DATA_CRC + 4;
/// Bytes of the footer that carry meaning; the rest of its block is zero.
pub const FOOTER_BYTES: usize = F_CRC + 4;
const _: () = assert!(FOOTER_BYTES == 56);
/// Footer flag: the next segment's header was durable before this footer was written.
const FOOTER_FLAG_SUCCESSOR: u32 = 1;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

/// The first block of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub shard: u32,
    /// Largest group commit written into this segment: the torn writes of a crash can
    /// only have touched twice this many bytes (two writes on their way, plus the
    /// trailing zero block) after the last valid frame.
    pub max_group_bytes: u32,
    pub epoch: Epoch,
    pub first_lsn: Lsn,
    pub capacity_bytes: u64,
    pub created: TimestampMicros,
}

/// Why a header or footer block does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The block is all zeroes: never written.
    Blank,
    Invalid(String),
}

impl SegmentHeader {
    /// Encodes into a full block.
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[H_MAGIC..H_VERSION].copy_from_slice(&SEGMENT_MAGIC);
        b[H_VERSION..H_BLOCK].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        b[H_BLOCK..H_SHARD].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[H_SHARD..H_MAX_GROUP].copy_from_slice(&self.shard.to_le_bytes());
        b[H_MAX_GROUP..H_EPOCH].copy_from_slice(&self.max_group_bytes.to_le_bytes());
        b[H_EPOCH..H_FIRST_LSN].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[H_FIRST_LSN..H_CAPACITY].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        b[H_CAPACITY..H_CREATED].copy_from_slice(&self.capacity_bytes.to_le_bytes());
        b[H_CREATED..H_CRC].copy_from_slice(&self.created.0.to_le_bytes());
        let crc = crc32c::crc32c(&b[..H_CRC]);
        b[H_CRC..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes block 0 of a segment (at least [`HEADER_BYTES`] bytes).
    pub fn decode(b: &[u8]) -> Result<Self, BlockError> {
        let b = b
            .get(..HEADER_BYTES)
            .ok_or_else(|| BlockError::Invalid("header truncated".into()))?;
        if b.iter().all(|&x| x == 0) {
            return Err(BlockError::Blank);
        }
        if b[H_MAGIC..H_VERSION] != SEGMENT_MAGIC {
            return Err(BlockError::Invalid("bad segment magic".into()));
        }
        let crc = crc32c::crc32c(&b[..H_CRC]);
        if crc != u32_at(b, H_CRC) {
            return Err(BlockError::Invalid("segment header crc mismatch".into()));
        }
        let version = u32_at(b, H_VERSION);
        if !(OLDEST_SEGMENT_FORMAT_VERSION..=SEGMENT_FORMAT_VERSION).contains(&version) {
            return Err(BlockError::Invalid(format!(
                "unsupported segment version {version}"
            )));
        }
        let block = u32_at(b, H_BLOCK);
        if block as usize != BLOCK_SIZE {
            return Err(BlockError::Invalid(format!(
                "unsupported block size {block}"
            )));
        }
        let header = SegmentHeader {
            shard: u32_at(b, H_SHARD),
            max_group_bytes: u32_at(b, H_MAX_GROUP),
            epoch: Epoch(u64_at(b, H_EPOCH)),
            first_lsn: Lsn(u64_at(b, H_FIRST_LSN)),
            capacity_bytes: u64_at(b, H_CAPACITY),
            created: TimestampMicros(u64_at(b, H_CREATED)),
        };
        if header.capacity_bytes < MIN_SEGMENT_BYTES
            || !header.capacity_bytes.is_multiple_of(BLOCK_SIZE as u64)
        {
            return Err(BlockError::Invalid(format!(
                "bad capacity {}",
                header.capacity_bytes
            )));
        }
        if (header.max_group_bytes as usize) < BLOCK_SIZE
            || u64::from(header.max_group_bytes) > header.capacity_bytes
        {
            return Err(BlockError::Invalid(format!(
                "bad max group bytes {}",
                header.max_group_bytes
            )));
        }
        if header.first_lsn == Lsn::ZERO {
            return Err(BlockError::Invalid("first LSN 0".into()));
        }
        Ok(header)
    }

    /// Offset of the footer block (frames end before it).
    pub fn footer_offset(&self) -> u64 {
        self.capacity_bytes - BLOCK_SIZE as u64
    }
}

/// The last block of a sealed segment: what it holds and a CRC over all of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentFooter {
    pub first_lsn: Lsn,
    /// `first_lsn - 1` when the segment holds no frame.
    pub last_lsn: Lsn,
    /// End of the last group (block-aligned): frames lie in `[DATA_START, data_end)`.
    pub data_end: u64,
    pub last_commit_ts: TimestampMicros,
    /// CRC32C of the bytes `[DATA_START, data_end)`.
    pub data_crc: u32,
    /// The next segment existed, its header durable, before this footer was written:
    /// the log goes on in a later segment, so a log that ends here lost its newest
    /// segment (FORMAT.md §4). False in footers written before the flag existed.
    pub successor: bool,
}

impl SegmentFooter {
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        self.encode_as(SEGMENT_FORMAT_VERSION)
    }

    /// Encodes the footer with `version`: the version of the header it seals, so a
    /// version 1 segment stays readable as a whole by a build that knows only that.
    pub fn encode_as(&self, version: u32) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[F_MAGIC..F_VERSION].copy_from_slice(&FOOTER_MAGIC);
        b[F_VERSION..F_FLAGS].copy_from_slice(&version.to_le_bytes());
        let flags = if self.successor {
            FOOTER_FLAG_SUCCESSOR
        } else {
            0
        };
        b[F_FLAGS..F_FIRST_LSN].copy_from_slice(&flags.to_le_bytes());
        b[F_FIRST_LSN..F_LAST_LSN].copy_from_slice(&self.first_lsn.0.to_le_bytes());
        b[F_LAST_LSN..F_DATA_END].copy_from_slice(&self.last_lsn.0.to_le_bytes());
        b[F_DATA_END..F_LAST_TS].copy_from_slice(&self.data_end.to_le_bytes());
        b[F_LAST_TS..F_DATA_CRC].copy_from_slice(&self.last_commit_ts.0.to_le_bytes());
        b[F_DATA_CRC..F_CRC].copy_from_slice(&self.data_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..F_CRC]);
        b[F_CRC..FOOTER_BYTES].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, BlockError> {
        let b = b
            .get(..FOOTER_BYTES)
            .ok_or_else(|| BlockError::Invalid("footer truncated".into()))?;
        if b.iter().all(|&x| x == 0) {
            return Err(BlockError::Blank);
        }
        if b[F_MAGIC..F_VERSION] != FOOTER_MAGIC {
            return Err(BlockError::Invalid("bad footer magic".into()));
        }
        if crc32c::crc32c(&b[..F_CRC]) != u32_at(b, F_CRC) {
            return Err(BlockError::Invalid("footer crc mismatch".into()));
        }
        let version = u32_at(b, F_VERSION);
        if !(OLDEST_SEGMENT_FORMAT_VERSION..=SEGMENT_FORMAT_VERSION).contains(&version) {
            return Err(BlockError::Invalid(format!(
                "unsupported footer version {version}"
            )));
        }
        let flags = u32_at(b, F_FLAGS);
        if flags & !FOOTER_FLAG_SUCCESSOR != 0 {
            return Err(BlockError::Invalid(format!(
                "unknown footer flags {flags:#x}"
            )));
        }
        Ok(SegmentFooter {
            first_lsn: Lsn(u64_at(b, F_FIRST_LSN)),
            last_lsn: Lsn(u64_at(b, F_LAST_LSN)),
            data_end: u64_at(b, F_DATA_END),
            last_commit_ts: TimestampMicros(u64_at(b, F_LAST_TS)),
            data_crc: u32_at(b, F_DATA_CRC),
            successor: flags & FOOTER_FLAG_SUCCESSOR != 0,
        })
    }
}

/// `block`, a footer with the successor flag, re-encoded without it (same version);
/// None when `block` is not such a footer. For a log that ends at a sealed segment on
/// purpose: restored from an archive, or the segments after it set aside or cut.
pub fn footer_without_successor(block: &[u8]) -> Option<[u8; BLOCK_SIZE]> {
    let footer = SegmentFooter::decode(block).ok()?;
    footer.successor.then(|| {
        SegmentFooter {
            successor: false,
            ..footer
        }
        .encode_as(u32_at(block, F_VERSION))
    })
}

/// The name of a segment file: shard, epoch and first LSN in fixed-width hex, so a
/// lexicographic listing is LSN order (epochs only grow with LSN).
pub fn segment_name(shard: u32, epoch: Epoch, first_lsn: Lsn) -> String {
    format!("wal-{shard:04x}-{:016x}-{:016x}.seg", epoch.0, first_lsn.0)
}

/// Parses a segment file name back into (shard, epoch, first LSN).
pub fn parse_segment_name(name: &str) -> Option<(u32, Epoch, Lsn)> {
    let rest = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    let mut parts = rest.split('-');
    let shard = parts.next().filter(|p| p.len() == 4)?;
    let epoch = parts.next().filter(|p| p.len() == 16)?;
    let lsn = parts.next().filter(|p| p.len() == 16)?;
    if parts.next().is_some() {
        return None;
    }
    Some((
        u32::from_str_radix(shard, 16).ok()?,
        Epoch(u64::from_str_radix(epoch, 16).ok()?),
        Lsn(u64::from_str_radix(lsn, 16).ok()?),
    ))
}

/// Name of a released segment waiting to become the next spare (kept at start).
pub const RECYCLED_NAME: &str = "wal-recycled.tmp";
/// Name of the next segment's file while it is being zero-filled (removed at start).
pub const SPARE_PARTIAL_NAME: &str = "wal-spare.tmp";
/// Name of the next segment's file once it is wholly zeroed and synced (kept at start).
pub const SPARE_READY_NAME: &str = "wal-spare.ready";

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            shard: 3,
            max_group_bytes: 1 << 16,
            epoch: Epoch(2),
            first_lsn: Lsn(1000),
            capacity_bytes: 1 << 20,
            created: TimestampMicros(1_700_000_000_000_000),
        }
    }

    #[test]
    fn header_and_footer_round_trip() {
        assert_eq!(SegmentHeader::decode(&header().encode()), Ok(header()));
        let footer = SegmentFooter {
            first_lsn: Lsn(1000),
            last_lsn: Lsn(1999),
            data_end: 65536,
            last_commit_ts: TimestampMicros(42),
            data_crc: 0xdead_beef,
            successor: false,
        };
        assert_eq!(SegmentFooter::decode(&footer.encode()), Ok(footer));
        let followed = SegmentFooter {
            successor: true,
            ..footer
        };
        assert_eq!(SegmentFooter::decode(&followed.encode()), Ok(followed));
        // A flag this build does not know is refused, checksum valid or not.
        let mut unknown = followed.encode();
        unknown[F_FLAGS] = 0b11;
        let crc = crc32c::crc32c(&unknown[..F_CRC]);
        unknown[F_CRC..FOOTER_BYTES].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentFooter::decode(&unknown),
            Err(BlockError::Invalid(_))
        ));
    }

    #[test]
    fn blank_and_damaged_headers_are_told_apart() {
        assert_eq!(
            SegmentHeader::decode(&[0; BLOCK_SIZE]),
            Err(BlockError::Blank)
        );
        let mut b = header().encode();
        b[20] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&b),
            Err(BlockError::Invalid(_))
        ));
    }

    fn fixture_bytes(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("fixture is hex"))
            .collect()
    }

    #[test]
    fn golden_header_bytes_match_the_fixture() {
        let expected = fixture_bytes(include_str!("../../tests/fixtures/segment_header_v2.hex"));
        assert_eq!(
            &header().encode()[..HEADER_BYTES],
            &expected[..],
            "segment header format changed"
        );
    }

    #[test]
    fn a_version_1_header_still_reads() {
        let mut block = fixture_bytes(include_str!("../../tests/fixtures/segment_header_v1.hex"));
        block.resize(BLOCK_SIZE, 0);
        assert_eq!(SegmentHeader::decode(&block), Ok(header()));
        // A version this build does not know is refused, not guessed at.
        let mut future = header().encode();
        future[H_VERSION..H_BLOCK].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&future[..H_CRC]);
        future[H_CRC..H_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            SegmentHeader::decode(&future),
            Err(BlockError::Invalid(m)) if m.contains("version 3")
        ));
    }

    #[test]
    fn names_sort_in_lsn_order_and_parse_back() {
        let a = segment_name(1, Epoch(1), Lsn(9));
        let b = segment_name(1, Epoch(1), Lsn(10));
        let c = segment_name(1, Epoch(2), Lsn(0x1_0000));
        assert!(a < b && b < c);
        assert_eq!(parse_segment_name(&c), Some((1, Epoch(2), Lsn(0x1_0000))));
        assert_eq!(parse_segment_name("wal-0001-x.seg"), None);
        assert_eq!(parse_segment_name(SPARE_PARTIAL_NAME), None);
        assert_eq!(parse_segment_name(SPARE_READY_NAME), None);
    }
}
