//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test
//! that `cargo test` runs on stable: the same code sees the same inputs in both.
//! Each must never panic, whatever the bytes.

use crate::buffer::align_up;
use crate::wal::frame::{self, Epoch, Lsn, TimestampMicros};
use crate::wal::scan::scan_segment;
use crate::wal::segment::{SegmentHeader, MIN_SEGMENT_BYTES};

/// Decodes arbitrary bytes as a frame; a frame that decodes must re-encode to the
/// same bytes.
pub fn wal_frame(bytes: &[u8]) {
    if let Ok(f) = frame::decode(bytes) {
        let encoded = frame::encode(&f);
        assert_eq!(
            &bytes[..encoded.len()],
            &encoded[..],
            "decode and encode disagree"
        );
    }
}

/// Treats arbitrary bytes as a segment file: decodes its header (or assumes one) and
/// scans its frames. Frames handed out must be in LSN order.
pub fn wal_segment(bytes: &[u8]) {
    let header = SegmentHeader::decode(bytes).unwrap_or(SegmentHeader {
        shard: 0,
        max_group_bytes: 1 << 20,
        epoch: Epoch(1),
        first_lsn: Lsn(1),
        capacity_bytes: align_up(bytes.len() as u64).max(MIN_SEGMENT_BYTES),
        created: TimestampMicros(0),
    });
    let mut last = Lsn(header.first_lsn.0 - 1);
    let scan = scan_segment(bytes, &header, |f, _| {
        assert_eq!(f.lsn, last.next(), "frames out of order");
        last = f.lsn;
        Ok::<(), ()>(())
    });
    if let Ok(scan) = scan {
        assert_eq!(scan.last_lsn, last);
    }
}
