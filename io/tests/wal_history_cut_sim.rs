//! A returning ex-writer's log cut where it left its new writer's history
//! (`WalConfig::history`), over `SimStorage` with a seeded crash during the cut.
//!
//! The ex-writer wrote epoch 1 (concurrent appenders, so groups hold many frames, in
//! small segments); the new writer's epoch 5 began at a random LSN `s` (sometimes a
//! segment's first LSN, sometimes past the end). After the cut, and a crash at any
//! point of it, the next open finds:
//! - the log holds exactly the ex-writer's frames below `s`, and continues with epoch 5
//!   frames from `s` (stamped, as the new writer streams them);
//! - the frames cut, `s` to the end, are all in the `diverged-at-<s>-*` files, in order,
//!   and nothing else was lost;
//! - opening again cuts nothing more.
//!
//! Seeds: `OC_SIM_SEED`, `OC_SIM_SEEDS`, `OC_SIM_SEED_START` as for every simulator.

use std::rc::Rc;

use oc_io::executor::run_local;
use oc_io::wal::scan::scan_segment;
use oc_io::wal::segment::SegmentHeader;
use oc_io::{
    seeds_from_env, Epoch, Error, History, LogRead, Lsn, OwnedFrame, RecordKind, SimFaults, SimRng,
    SimStorage, TimestampMicros, Wal, WalConfig,
};

const KIND: RecordKind = RecordKind(1);
const SEGMENT_BYTES: u64 = 24 * 1024;
const NEW_EPOCH: Epoch = Epoch(5);

fn faults(crash_after_ops: Option<u64>) -> SimFaults {
    SimFaults {
        crash_after_ops,
        sync_error_per_mille: 0,
        capacity_bytes: u64::MAX,
        max_files: usize::MAX,
        yield_per_mille: 300,
    }
}

fn config(epoch: Epoch, history: Option<History>) -> WalConfig {
    WalConfig {
        segment_bytes: SEGMENT_BYTES,
        max_group_bytes: 8 * 1024,
        epoch,
        history,
        ..WalConfig::default()
    }
}

/// The ex-writer's log, epoch 1, written by a few concurrent appenders; returns every
/// frame.
async fn ex_writer_log(storage: &SimStorage, rng: &mut SimRng) -> Vec<OwnedFrame> {
    let (wal, _) = Wal::open(storage.clone(), config(Epoch(1), None), Lsn(1), |_| Ok(()))
        .await
        .expect("writer open");
    let wal = Rc::new(wal);
    let mut tasks = Vec::new();
    for writer in 0..1 + rng.below(4) {
        let wal = wal.clone();
        let mut rng = SimRng::new(rng.next_u64());
        tasks.push(glommio::spawn_local(async move {
            for seq in 0..20 + rng.below(40) {
                let len = 16 + rng.below(1500) as usize;
                let mut p = Vec::with_capacity(len);
                p.extend_from_slice(&writer.to_le_bytes());
                p.extend_from_slice(&seq.to_le_bytes());
                p.resize(len, writer as u8);
                wal.append(KIND, b"t", &p).await.expect("writer append");
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    let frames = read_all(&wal).await;
    Rc::try_unwrap(wal)
        .unwrap_or_else(|_| panic!("the log is still shared"))
        .close()
        .await
        .expect("writer close");
    frames
}

async fn read_all(wal: &Wal<SimStorage>) -> Vec<OwnedFrame> {
    let end = wal.durable_lsn();
    let mut frames: Vec<OwnedFrame> = Vec::new();
    while frames.last().map_or(Lsn(0), |f| f.lsn) < end {
        let after = frames.last().map_or(Lsn(0), |f| f.lsn);
        match wal.read_after(after, end).await.expect("read") {
            LogRead::Frames(page) => frames.extend(page),
            other => panic!("the log holds everything after {after}: {other:?}"),
        }
    }
    frames
}

/// The frames at or after `from` in the files set aside for a cut at `from`, in order.
fn set_aside_frames(storage: &SimStorage, from: Lsn) -> Vec<OwnedFrame> {
    let prefix = format!("diverged-at-{}-", from.0);
    let mut names: Vec<String> = storage
        .file_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    names.sort(); // segment names sort in LSN order
    let mut frames = Vec::new();
    for name in names {
        let bytes = storage.read_file(&name).expect("a set-aside file");
        let header = SegmentHeader::decode(&bytes).expect("a segment header");
        scan_segment(&bytes, &header, |f, _| {
            if f.lsn >= from {
                frames.push(OwnedFrame::from(f));
            }
            Ok::<(), ()>(())
        })
        .expect("scan");
    }
    frames
}

fn same(a: &OwnedFrame, b: &OwnedFrame) -> bool {
    a.lsn == b.lsn
        && a.epoch == b.epoch
        && a.commit_ts == b.commit_ts
        && a.kind == b.kind
        && a.tenant == b.tenant
        && a.payload == b.payload
}

fn assert_frames(seed: u64, what: &str, got: &[OwnedFrame], want: &[OwnedFrame]) {
    assert_eq!(got.len(), want.len(), "seed {seed}: {what}: frame count");
    for (g, w) in got.iter().zip(want) {
        assert!(same(g, w), "seed {seed}: {what}: LSN {} differs", w.lsn);
    }
}

/// Opens the log with the new writer's history; `None` when the simulated machine
/// crashed during the open.
async fn open_following(
    seed: u64,
    storage: &SimStorage,
    history: &History,
) -> Option<(Wal<SimStorage>, oc_io::RecoveryReport)> {
    match Wal::open(
        storage.clone(),
        config(NEW_EPOCH, Some(history.clone())),
        Lsn(1),
        |_| Ok(()),
    )
    .await
    {
        Ok(opened) => Some(opened),
        Err(Error::SimulatedCrash) => None,
        Err(e) => panic!("seed {seed}: opening as a follower failed: {e}"),
    }
}

#[derive(Default)]
struct Counts {
    cut: usize,
    whole_segments: usize,
    crashed_in_cut: usize,
}

async fn run_seed(seed: u64, counts: &mut Counts) {
    let mut rng = SimRng::new(seed);
    let storage = SimStorage::new(seed ^ 0xc07, faults(None));
    let ex_writer = ex_writer_log(&storage, &mut rng).await;
    let last = ex_writer.last().expect("frames").lsn;
    // Where the new writer's epoch began: anywhere, a segment's first LSN, or past the
    // end (nothing to cut).
    let segment_starts: Vec<u64> = storage
        .file_names()
        .iter()
        .filter_map(|n| oc_io::wal::segment::parse_segment_name(n))
        .map(|(_, _, lsn)| lsn.0)
        .collect();
    let start = match rng.below(10) {
        0 => last.0 + 1,
        1..=3 => segment_starts[rng.below(segment_starts.len() as u64) as usize],
        _ => 1 + rng.below(last.0),
    };
    let start = Lsn(start);
    let history = History::new(vec![(NEW_EPOCH, start)]);
    counts.whole_segments += usize::from(segment_starts.contains(&start.0));

    // A crash somewhere in the cut, then a clean open.
    storage.restart(faults(Some(1 + rng.below(40))));
    if let Some((wal, _)) = open_following(seed, &storage, &history).await {
        wal.close().await.ok();
    }
    counts.crashed_in_cut += usize::from(storage.crashed());
    storage.restart(faults(None));
    let (wal, report) = open_following(seed, &storage, &history)
        .await
        .expect("no crash injected");
    let kept = &ex_writer[..(start.0 - 1) as usize];
    assert_frames(seed, "the log kept", &read_all(&wal).await, kept);
    assert_eq!(wal.durable_lsn(), Lsn(start.0 - 1), "seed {seed}");
    let cut = &ex_writer[kept.len()..];
    counts.cut += usize::from(!cut.is_empty());
    if let Some(history_cut) = &report.history_cut {
        assert_eq!(history_cut.lsn, start, "seed {seed}: where the cut began");
    }
    assert_frames(
        seed,
        "the frames set aside",
        &set_aside_frames(&storage, start),
        cut,
    );

    // The new writer's frames continue the log, and nothing more is cut on reopening.
    let wal = Rc::new(wal);
    for i in 0..3 + rng.below(20) {
        let frame = OwnedFrame {
            lsn: Lsn(start.0 + i),
            commit_ts: TimestampMicros(u64::MAX / 2 + i),
            epoch: NEW_EPOCH,
            group_index: 0,
            kind: KIND,
            tenant: b"t".to_vec(),
            payload: vec![i as u8; 200],
        };
        let pending = wal.submit_stamped(&frame).await.expect("a stamped frame");
        pending.durable().await.expect("durable");
    }
    let followed = read_all(&wal).await;
    Rc::try_unwrap(wal)
        .unwrap_or_else(|_| panic!("the log is still shared"))
        .close()
        .await
        .expect("close");
    let (wal, report) = open_following(seed, &storage, &history)
        .await
        .expect("no crash injected");
    assert!(
        report.history_cut.is_none(),
        "seed {seed}: a second cut: {:?}",
        report.history_cut
    );
    assert_frames(
        seed,
        "the log after following",
        &read_all(&wal).await,
        &followed,
    );
    assert!(followed[kept.len()..].iter().all(|f| f.epoch == NEW_EPOCH));
    wal.close().await.expect("close");
}

#[test]
fn a_returning_ex_writers_log_is_cut_where_it_left_the_history_and_keeps_what_it_cut() {
    let seeds = seeds_from_env(200);
    let mut counts = Counts::default();
    run_local(async {
        for &seed in &seeds {
            let guard = oc_io::SeedGuard::new(seed);
            run_seed(seed, &mut counts).await;
            guard.passed();
        }
    });
    eprintln!(
        "{} seeds: {} cut frames, {} at a segment's start, {} crashed during the cut",
        seeds.len(),
        counts.cut,
        counts.whole_segments,
        counts.crashed_in_cut
    );
    if seeds.len() >= 100 {
        let n = seeds.len();
        assert!(counts.cut * 10 > n * 8, "too few runs cut anything");
        assert!(
            counts.whole_segments * 10 > n,
            "too few cuts at a segment start"
        );
        assert!(
            counts.crashed_in_cut * 4 > n,
            "too few crashes during the cut"
        );
    }
}
