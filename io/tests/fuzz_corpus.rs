//! Replays every committed fuzz corpus file through the fuzz targets' entry points,
//! so `cargo test` on stable covers what the fuzzers found interesting.
//!
//! `OC_WRITE_CORPUS=1 cargo test -p oc-io --test fuzz_corpus` (re)writes the seed files
//! made from real segments (see `write_seed_corpus`).

use std::path::{Path, PathBuf};

use oc_io::executor::run_local;
use oc_io::fuzz_entry;
use oc_io::{Lsn, RecordKind, SimFaults, SimStorage, Wal, WalConfig};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry_path in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry_path.expect("corpus entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| entry(&bytes));
        assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
        count += 1;
    }
    count
}

#[test]
fn wal_frame_corpus_replays_without_panics() {
    assert!(
        replay("wal_frame", fuzz_entry::wal_frame) >= 3,
        "the seed corpus is committed"
    );
}

#[test]
fn wal_segment_corpus_replays_without_panics() {
    assert!(
        replay("wal_segment", fuzz_entry::wal_segment) >= 3,
        "the seed corpus is committed"
    );
}

/// Seeds: real segments written by the WAL (active, sealed, torn) and frames from them.
#[test]
fn write_seed_corpus() {
    if std::env::var_os("OC_WRITE_CORPUS").is_none() {
        return;
    }
    run_local(async {
        let config = WalConfig {
            segment_bytes: 16 * 1024,
            max_group_bytes: 4096,
            ..WalConfig::default()
        };
        let storage = SimStorage::new(1, SimFaults::default());
        let (wal, _) = Wal::open(storage.clone(), config, Lsn(1), |_| Ok(()))
            .await
            .expect("open");
        for i in 0..40u8 {
            let payload = vec![i; 40 + usize::from(i) * 7];
            wal.append(RecordKind(1 + u16::from(i % 3)), b"acme", &payload)
                .await
                .expect("append");
        }
        wal.close().await.expect("close");
        let segments = wal.segments();
        let sealed = storage.read_file(&segments[0]).expect("sealed segment");
        let active = storage
            .read_file(segments.last().expect("segments"))
            .expect("active segment");
        let mut torn = active.clone();
        for b in &mut torn[4096 + 300..4096 + 700] {
            *b ^= 0x5A;
        }
        let seg_dir = corpus_dir("wal_segment");
        std::fs::write(seg_dir.join("sealed"), &sealed).expect("write");
        std::fs::write(seg_dir.join("active"), &active).expect("write");
        std::fs::write(seg_dir.join("torn"), &torn).expect("write");
        let frame_dir = corpus_dir("wal_frame");
        let first_frame_len =
            u32::from_le_bytes(sealed[4096..4100].try_into().expect("4 bytes")) as usize;
        let frame = &sealed[4096..4096 + first_frame_len];
        std::fs::write(frame_dir.join("valid"), frame).expect("write");
        std::fs::write(frame_dir.join("truncated"), &frame[..frame.len() / 2]).expect("write");
        std::fs::write(frame_dir.join("zero"), [0u8; 64]).expect("write");
    });
}
