//! Where things live in an archive (FORMAT.md §9) and the segment images stored there.
//!
//! ```text
//! manifest.json                                        the archive's layout
//! shard-<i>/checkpoint/<lsn>.snap, <lsn>.json          a checkpoint, manifest last
//! shard-<i>/wal/<epoch>-<first>-<last>-<last_commit>   a sealed segment image
//! shard-<i>/tail/<epoch>-<first>/<start>-<end>         a piece of the active segment
//! audit/<first seq>-<first time>.log                   a file of the audit log
//! ```
//!
//! Numbers are 16 lowercase hex digits, so a listing in byte order is LSN order, and a
//! sealed segment's key carries its range and last commit time: listing the archive is
//! enough to plan a restore. A segment *image* is the segment file without its unused
//! space: the header block, the data area up to the end of the last group, and (sealed
//! segments only) the footer block. A tail piece is the bytes `[start, end)` of the
//! active segment's file; the first piece starts at 0 and so holds the header.

use oc_io::wal::segment::segment_name;
use oc_io::{Epoch, Lsn, BLOCK_SIZE};

/// Version of the archive layout, recorded in `manifest.json`: 2 since objects may be
/// LZ4-encoded (FORMAT.md §8); this build also reads 1.
pub const ARCHIVE_FORMAT_VERSION: u64 = 2;
pub const MANIFEST_KEY: &str = "manifest.json";

/// Where the audit log's files are copied (`audit/<file name>`, see `audit.rs`).
pub const AUDIT_PREFIX: &str = "audit/";

pub fn audit_key(file_name: &str) -> String {
    format!("{AUDIT_PREFIX}{file_name}")
}

pub fn shard_prefix(shard: usize) -> String {
    format!("shard-{shard}/")
}

pub fn checkpoint_prefix(shard: usize) -> String {
    format!("shard-{shard}/checkpoint/")
}

pub fn checkpoint_snapshot_key(shard: usize, lsn: Lsn) -> String {
    format!("shard-{shard}/checkpoint/{:016x}.snap", lsn.0)
}

pub fn checkpoint_manifest_key(shard: usize, lsn: Lsn) -> String {
    format!("shard-{shard}/checkpoint/{:016x}.json", lsn.0)
}

/// The LSN of a checkpoint manifest's key.
pub fn parse_checkpoint_manifest_key(key: &str) -> Option<(usize, Lsn)> {
    let (shard, rest) = split_shard(key)?;
    let hex = rest.strip_prefix("checkpoint/")?.strip_suffix(".json")?;
    Some((shard, Lsn(parse_hex(hex)?)))
}

pub fn segment_prefix(shard: usize) -> String {
    format!("shard-{shard}/wal/")
}

/// What a sealed segment's key says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentKey {
    pub shard: usize,
    pub epoch: Epoch,
    pub first_lsn: Lsn,
    /// `first_lsn - 1` for a segment without frames.
    pub last_lsn: Lsn,
    pub last_commit_us: u64,
}

impl SegmentKey {
    pub fn key(&self) -> String {
        format!(
            "shard-{}/wal/{:016x}-{:016x}-{:016x}-{:016x}",
            self.shard, self.epoch.0, self.first_lsn.0, self.last_lsn.0, self.last_commit_us
        )
    }

    pub fn parse(key: &str) -> Option<SegmentKey> {
        let (shard, rest) = split_shard(key)?;
        let mut parts = rest.strip_prefix("wal/")?.split('-');
        let mut next = || parts.next().and_then(parse_hex);
        let parsed = SegmentKey {
            shard,
            epoch: Epoch(next()?),
            first_lsn: Lsn(next()?),
            last_lsn: Lsn(next()?),
            last_commit_us: next()?,
        };
        (parts.next().is_none()
            && parsed.first_lsn.0 >= 1
            && parsed.last_lsn.0 + 1 >= parsed.first_lsn.0)
            .then_some(parsed)
    }

    /// The segment's file name in a data directory.
    pub fn file_name(&self) -> String {
        segment_name(self.shard as u32, self.epoch, self.first_lsn)
    }
}

/// The folder of the pieces of one active segment.
pub fn tail_prefix(shard: usize, epoch: Epoch, first_lsn: Lsn) -> String {
    format!("shard-{shard}/tail/{:016x}-{:016x}/", epoch.0, first_lsn.0)
}

pub fn tails_prefix(shard: usize) -> String {
    format!("shard-{shard}/tail/")
}

/// What a tail piece's key says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TailPieceKey {
    pub shard: usize,
    pub epoch: Epoch,
    pub first_lsn: Lsn,
    pub start: u64,
    pub end: u64,
}

impl TailPieceKey {
    pub fn key(&self) -> String {
        format!(
            "{}{:016x}-{:016x}",
            tail_prefix(self.shard, self.epoch, self.first_lsn),
            self.start,
            self.end
        )
    }

    pub fn parse(key: &str) -> Option<TailPieceKey> {
        let (shard, rest) = split_shard(key)?;
        let (segment, piece) = rest.strip_prefix("tail/")?.split_once('/')?;
        let (epoch, first) = segment.split_once('-')?;
        let (start, end) = piece.split_once('-')?;
        let parsed = TailPieceKey {
            shard,
            epoch: Epoch(parse_hex(epoch)?),
            first_lsn: Lsn(parse_hex(first)?),
            start: parse_hex(start)?,
            end: parse_hex(end)?,
        };
        (parsed.start < parsed.end
            && parsed.start.is_multiple_of(BLOCK_SIZE as u64)
            && parsed.end.is_multiple_of(BLOCK_SIZE as u64))
        .then_some(parsed)
    }

    pub fn file_name(&self) -> String {
        segment_name(self.shard as u32, self.epoch, self.first_lsn)
    }
}

fn split_shard(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("shard-")?;
    let (shard, rest) = rest.split_once('/')?;
    if shard.is_empty() || shard.len() > 3 || !shard.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((shard.parse().ok()?, rest))
}

fn parse_hex(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| u64::from_str_radix(s, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_list_in_lsn_order() {
        let a = SegmentKey {
            shard: 3,
            epoch: Epoch(1),
            first_lsn: Lsn(0xff),
            last_lsn: Lsn(0x1ff),
            last_commit_us: 1_700_000_000_000_000,
        };
        let b = SegmentKey {
            first_lsn: Lsn(0x200),
            last_lsn: Lsn(0x1000),
            ..a
        };
        assert_eq!(SegmentKey::parse(&a.key()), Some(a));
        assert!(a.key() < b.key());
        crate::archive::check_key(&a.key()).expect("valid key");
        let piece = TailPieceKey {
            shard: 0,
            epoch: Epoch(1),
            first_lsn: Lsn(7),
            start: 0,
            end: 8192,
        };
        assert_eq!(TailPieceKey::parse(&piece.key()), Some(piece));
        crate::archive::check_key(&piece.key()).expect("valid key");
        assert_eq!(
            parse_checkpoint_manifest_key(&checkpoint_manifest_key(2, Lsn(9))),
            Some((2, Lsn(9)))
        );
        for bad in [
            "shard-0/wal/0-1-2-3",
            "shard-x/wal/0000000000000001-0000000000000001-0000000000000000-0000000000000000",
            "shard-0/tail/0000000000000001-0000000000000001/0000000000000000-0000000000000000",
            "shard-0/tail/0000000000000001-0000000000000001/0000000000000000-0000000000000100",
        ] {
            assert_eq!(SegmentKey::parse(bad), None, "{bad}");
            assert_eq!(TailPieceKey::parse(bad), None, "{bad}");
        }
    }
}
