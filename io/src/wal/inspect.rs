//! A human-readable account of a segment file, frame by frame: what an operator runs
//! (`oc-ctl wal <file>`) before deciding anything about a damaged log.

use std::fmt::Write;

use super::scan::{scan_segment, ScanEnd};
use super::segment::SegmentHeader;

/// Describes a segment's header, every valid frame and how the valid part ends.
pub fn describe_segment(name: &str, bytes: &[u8]) -> String {
    let mut out = format!("{name}: {} bytes\n", bytes.len());
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(e) => {
            let _ = writeln!(out, "header: unreadable ({e:?}); no frame can be trusted");
            return out;
        }
    };
    let _ = writeln!(
        out,
        // Every writer so far leaves the header's shard 0 (FORMAT.md §3.4): the shard is
        // the directory's, which the line says rather than let 0 read as shard 0.
        "header: shard field {} (the shard is the directory's) epoch {} first LSN {} \
         capacity {} max group {} created {} µs",
        header.shard,
        header.epoch.0,
        header.first_lsn,
        header.capacity_bytes,
        header.max_group_bytes,
        header.created.0
    );
    let scan = scan_segment(bytes, &header, |f, offset| {
        let _ = writeln!(
            out,
            "  @{offset:>10} LSN {:>12} ts {} epoch {} group[{}] kind {} tenant {:?} payload {} B",
            f.lsn,
            f.commit_ts.0,
            f.epoch.0,
            f.group_index,
            f.kind.0,
            String::from_utf8_lossy(f.tenant),
            f.payload.len()
        );
        Ok::<(), ()>(())
    });
    let Ok(scan) = scan else {
        return out;
    };
    let end = match &scan.end {
        ScanEnd::Sealed(f) => format!(
            "sealed: last LSN {}, data end {}, data crc {:#010x} verified{}",
            f.last_lsn,
            f.data_end,
            f.data_crc,
            if f.successor {
                "; the next segment was made first (a log must not end here)"
            } else {
                ""
            }
        ),
        ScanEnd::Clean => format!("open: the log ends cleanly at offset {}", scan.valid_end),
        ScanEnd::Full => "open: the data area is full (not yet sealed)".to_string(),
        ScanEnd::Torn { offset, reason } => {
            format!("torn tail at offset {offset}: {reason} (recovery cuts it if this is the last segment)")
        }
        ScanEnd::Corrupt { offset, reason } => format!("CORRUPT at offset {offset}: {reason}"),
    };
    let _ = writeln!(
        out,
        "{} frame(s), last LSN {}; {end}",
        scan.frames, scan.last_lsn
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::frame::{encode, Epoch, Frame, Lsn, RecordKind, TimestampMicros};
    use crate::wal::segment::DATA_START;

    #[test]
    fn describes_frames_and_a_torn_tail() {
        let header = SegmentHeader {
            shard: 1,
            max_group_bytes: 4096,
            epoch: Epoch(1),
            first_lsn: Lsn(5),
            capacity_bytes: 4 * 4096,
            created: TimestampMicros(0),
        };
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[..4096].copy_from_slice(&header.encode());
        let frame = encode(&Frame {
            lsn: Lsn(5),
            commit_ts: TimestampMicros(9),
            epoch: Epoch(1),
            group_index: 0,
            kind: RecordKind(3),
            tenant: b"acme",
            payload: b"x",
        });
        let at = DATA_START as usize;
        bytes[at..at + frame.len()].copy_from_slice(&frame);
        bytes[at + frame.len()..at + frame.len() + 8].fill(0xEE);
        let text = describe_segment("seg", &bytes);
        assert!(text.contains("LSN            5"), "{text}");
        assert!(text.contains("tenant \"acme\""), "{text}");
        assert!(text.contains("torn tail at offset"), "{text}");
    }
}
