//! A follower's write path, `Wal::submit_stamped`, over `SimStorage` with seeded
//! crashes and fsync failures. A writer's log (two epochs, groups of many frames,
//! segments of another size than the follower's) is read back with `read_after` and
//! fed frame by frame into a follower's log, whose machine crashes at a random point.
//! After the crash:
//! - the recovered log is a prefix of the writer's, frame for frame (LSN, epoch, commit
//!   time, kind, tenant, payload), and holds every frame that was acknowledged;
//! - the follower resumes from its own durable LSN and ends with the writer's whole
//!   log, one segment per epoch boundary.
//!
//! Some runs fill the disk instead: the log is not failed by it, and takes the frame
//! after its durable LSN again.
//!
//! Seeds: `OC_SIM_SEED`, `OC_SIM_SEEDS`, `OC_SIM_SEED_START` as for every simulator.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use oc_io::executor::run_local;
use oc_io::{
    seeds_from_env, Epoch, Error, LogRead, Lsn, OwnedFrame, RecordKind, SimFaults, SimRng,
    SimStorage, TimestampMicros, Wal, WalConfig,
};

const KIND: RecordKind = RecordKind(1);
/// The follower is configured with the newest epoch it will see.
const FOLLOWER_EPOCH: Epoch = Epoch(2);

fn faults(crash_after_ops: Option<u64>, sync_error_per_mille: u32) -> SimFaults {
    SimFaults {
        crash_after_ops,
        sync_error_per_mille,
        capacity_bytes: u64::MAX,
        max_files: usize::MAX,
        yield_per_mille: 300,
    }
}

fn config(segment_bytes: u64, epoch: Epoch) -> WalConfig {
    WalConfig {
        segment_bytes,
        max_group_bytes: 8 * 1024,
        epoch,
        ..WalConfig::default()
    }
}

/// The writer's whole log: epoch 1, then epoch 2 after a restart, each appended by
/// several concurrent writers so that groups hold many frames.
async fn writer_log(seed: u64, rng: &mut SimRng) -> Vec<OwnedFrame> {
    let storage = SimStorage::new(seed, faults(None, 0));
    for epoch in [Epoch(1), Epoch(2)] {
        let (wal, _) = Wal::open(
            storage.clone(),
            config(32 * 1024, epoch),
            Lsn(1),
            |_| Ok(()),
        )
        .await
        .expect("writer open");
        let wal = Rc::new(wal);
        let mut tasks = Vec::new();
        for writer in 0..1 + rng.below(6) {
            let wal = wal.clone();
            let mut rng = SimRng::new(seed ^ (writer + 1).wrapping_mul(0x9E37) ^ epoch.0);
            tasks.push(glommio::spawn_local(async move {
                for seq in 0..20 + rng.below(30) {
                    let len = 16 + rng.below(1500) as usize;
                    let mut p = Vec::with_capacity(len);
                    p.extend_from_slice(&writer.to_le_bytes());
                    p.extend_from_slice(&seq.to_le_bytes());
                    p.resize(len, (writer as u8) ^ (epoch.0 as u8));
                    wal.append(KIND, b"t", &p).await.expect("writer append");
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        wal.close().await.expect("writer close");
    }
    let (wal, report) = Wal::open(storage, config(32 * 1024, Epoch(2)), Lsn(1), |_| Ok(()))
        .await
        .expect("writer reopen");
    let mut frames = Vec::new();
    while frames.last().map_or(Lsn(0), |f: &OwnedFrame| f.lsn) < report.last_lsn {
        let after = frames.last().map_or(Lsn(0), |f: &OwnedFrame| f.lsn);
        let LogRead::Frames(page) = wal.read_after(after, report.last_lsn).await.expect("read")
        else {
            panic!("seed {seed}: the writer's log holds everything");
        };
        frames.extend(page);
    }
    wal.close().await.expect("writer close");
    frames
}

/// Feeds frames without waiting for each to be durable (so they share group commits),
/// then waits for all; returns the highest acknowledged LSN and the first error.
async fn feed(wal: &Rc<Wal<SimStorage>>, frames: &[OwnedFrame]) -> (Lsn, Option<Error>) {
    let acked = Rc::new(Cell::new(Lsn(0)));
    let mut waits = Vec::new();
    let mut failed = None;
    for frame in frames {
        match wal.submit_stamped(frame).await {
            Ok(pending) => {
                let (acked, want) = (acked.clone(), frame.lsn);
                waits.push(glommio::spawn_local(async move {
                    let lsn = pending.durable().await?;
                    assert_eq!(lsn, want, "a stamped frame keeps its LSN");
                    acked.set(acked.get().max(lsn));
                    Ok::<(), Error>(())
                }));
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    for w in waits {
        if let Err(e) = w.await {
            failed.get_or_insert(e);
        }
    }
    (acked.get(), failed)
}

/// Recovers the follower's log and checks it against the writer's; returns the log
/// and its frames.
async fn recover(
    seed: u64,
    storage: &SimStorage,
    segment_bytes: u64,
    writer: &[OwnedFrame],
) -> (Wal<SimStorage>, Vec<OwnedFrame>) {
    let mut recovered = Vec::new();
    let (wal, _) = Wal::open(
        storage.clone(),
        config(segment_bytes, FOLLOWER_EPOCH),
        Lsn(1),
        |f| {
            recovered.push(OwnedFrame::from(f));
            Ok(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: follower recovery failed: {e}"));
    assert!(
        recovered.len() <= writer.len(),
        "seed {seed}: frames nobody wrote"
    );
    for (got, want) in recovered.iter().zip(writer) {
        let same = got.lsn == want.lsn
            && got.epoch == want.epoch
            && got.commit_ts == want.commit_ts
            && got.kind == want.kind
            && got.tenant == want.tenant
            && got.payload == want.payload;
        assert!(
            same,
            "seed {seed}: LSN {} differs from the writer's",
            want.lsn
        );
    }
    (wal, recovered)
}

#[derive(Default)]
struct Counts {
    with_acks: usize,
    crashed: usize,
    unacked_survived: usize,
    follower_epoch_change: usize,
    disk_filled: usize,
}

async fn run_seed(seed: u64, counts: &mut Counts) {
    let mut rng = SimRng::new(seed);
    let writer = writer_log(seed, &mut rng).await;
    let segment_bytes = [24 * 1024, 32 * 1024, 64 * 1024][rng.below(3) as usize];
    let sync_errors = if rng.chance(200) { 30 } else { 0 };
    let mut first_faults = faults(Some(1 + rng.below(200)), sync_errors);
    // Some runs fill the disk instead of crashing: a new segment cannot be made, which
    // fails only the frames that needed it, and the log goes on from its durable LSN.
    let disk_full = rng.chance(150);
    if disk_full {
        first_faults.crash_after_ops = None;
        first_faults.capacity_bytes = 2 * segment_bytes + rng.below(segment_bytes);
    }
    let storage = SimStorage::new(seed ^ 0x5eed, first_faults);

    // First run: fed from the start until the machine crashes (or everything is in).
    let acked = match Wal::open(
        storage.clone(),
        config(segment_bytes, FOLLOWER_EPOCH),
        Lsn(1),
        |_| Ok(()),
    )
    .await
    {
        Ok((wal, _)) => {
            let wal = Rc::new(wal);
            let run = feed(&wal, &writer);
            let deadline = async {
                glommio::timer::sleep(Duration::from_secs(20)).await;
                panic!("seed {seed}: the run hung");
            };
            let (acked, failed) = futures_lite::future::or(run, deadline).await;
            if let Some(e) = failed {
                assert!(
                    storage.crashed() || sync_errors > 0 || disk_full,
                    "seed {seed}: a group failed with no fault injected: {e}"
                );
                if disk_full && wal.failure().is_none() {
                    // The log is not failed, and takes the frame after its durable
                    // LSN again (the cursor went back there), not the next submitted.
                    counts.disk_filled += 1;
                    let durable = wal.durable_lsn();
                    assert!(durable >= acked, "seed {seed}: durable went back");
                    if let Some(next) = writer.get(durable.0 as usize) {
                        let again = wal.submit_stamped(next).await;
                        assert!(
                            again.is_ok(),
                            "seed {seed}: LSN {} after the durable end refused: {:?}",
                            next.lsn,
                            again.err()
                        );
                    }
                }
            }
            acked
        }
        Err(Error::SimulatedCrash) => Lsn(0),
        Err(e) => panic!("seed {seed}: first open failed: {e}"),
    };
    counts.with_acks += usize::from(acked > Lsn(0));
    counts.crashed += usize::from(storage.crashed());

    // Restart: every acknowledged group survived, and nothing else but a prefix.
    storage.restart(faults(None, 0));
    let (wal, recovered) = recover(seed, &storage, segment_bytes, &writer).await;
    let last = recovered.last().map_or(Lsn(0), |f| f.lsn);
    assert!(
        last >= acked,
        "seed {seed}: acknowledged LSN {acked} lost (log ends at {last})"
    );

    counts.unacked_survived += usize::from(last > acked);

    // Resume from the follower's own log.
    let wal = Rc::new(wal);
    let (_, failed) = feed(&wal, &writer[recovered.len()..]).await;
    assert!(failed.is_none(), "seed {seed}: resuming failed: {failed:?}");
    Rc::try_unwrap(wal)
        .unwrap_or_else(|_| panic!("seed {seed}: the log is still shared"))
        .close()
        .await
        .expect("close");
    storage.restart(faults(None, 0));
    let (wal, recovered) = recover(seed, &storage, segment_bytes, &writer).await;
    assert_eq!(
        recovered.len(),
        writer.len(),
        "seed {seed}: the follower ends with the writer's whole log"
    );
    counts.follower_epoch_change += usize::from(
        wal.segments()
            .iter()
            .any(|n| n.contains("-0000000000000001-"))
            && wal
                .segments()
                .iter()
                .any(|n| n.contains("-0000000000000002-")),
    );
    wal.close().await.expect("close");
}

#[test]
fn a_followers_log_keeps_the_writers_frames_through_crashes() {
    let seeds = seeds_from_env(300);
    let mut counts = Counts::default();
    run_local(async {
        for &seed in &seeds {
            let guard = oc_io::SeedGuard::new(seed);
            run_seed(seed, &mut counts).await;
            guard.passed();
        }
    });
    eprintln!(
        "{} seeds: {} with acknowledged frames, {} crashed, {} kept unacknowledged frames, \
         {} kept both epochs' segments, {} filled the disk",
        seeds.len(),
        counts.with_acks,
        counts.crashed,
        counts.unacked_survived,
        counts.follower_epoch_change,
        counts.disk_filled
    );
    if seeds.len() >= 100 {
        let n = seeds.len();
        assert!(
            counts.with_acks * 2 > n,
            "too few runs acknowledged anything"
        );
        assert!(counts.crashed * 3 > n, "too few runs crashed");
        assert!(
            counts.unacked_survived * 20 > n,
            "too few runs crashed with frames in flight"
        );
        assert!(
            counts.follower_epoch_change * 10 > n,
            "too few runs kept segments of both epochs"
        );
        assert!(counts.disk_filled * 50 > n, "too few runs filled the disk");
    }
}

fn frame(lsn: u64, epoch: u64, commit_ts: u64, group_index: u32) -> OwnedFrame {
    OwnedFrame {
        lsn: Lsn(lsn),
        commit_ts: TimestampMicros(commit_ts),
        epoch: Epoch(epoch),
        group_index,
        kind: KIND,
        tenant: b"t".to_vec(),
        payload: vec![lsn as u8; 100],
    }
}

fn refused(result: Result<oc_io::Pending, Error>) -> String {
    match result {
        Err(Error::FrameRefused(why)) => why,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the group was taken"),
    }
}

#[test]
fn frames_that_do_not_continue_the_log_are_refused_and_nothing_is_written() {
    run_local(async {
        let storage = SimStorage::new(1, faults(None, 0));
        let (wal, _) = Wal::open(storage.clone(), config(32 * 1024, Epoch(2)), Lsn(1), |_| {
            Ok(())
        })
        .await
        .expect("open");
        let submit = |f: OwnedFrame| {
            let wal = &wal;
            async move { wal.submit_stamped(&f).await }
        };
        // Two frames of one writer group, then its third alone: this log's groups.
        let first = submit(frame(1, 1, 10, 0)).await.expect("taken");
        let second = submit(frame(2, 1, 10, 1)).await.expect("taken");
        assert_eq!(second.durable().await.expect("durable"), Lsn(2));
        assert_eq!(first.durable().await.expect("durable"), Lsn(1));
        let third = submit(frame(3, 1, 10, 2)).await.expect("taken");
        assert_eq!(third.durable().await.expect("durable"), Lsn(3));
        // A gap, an LSN again, a time going back.
        assert!(refused(submit(frame(5, 1, 10, 0)).await).contains("LSN 5"));
        assert!(refused(submit(frame(3, 1, 10, 0)).await).contains("LSN 3"));
        assert!(refused(submit(frame(4, 1, 9, 0)).await).contains("goes back"));
        // A new epoch starts a new segment; the old one is refused after it.
        let fourth = submit(frame(4, 2, 20, 0)).await.expect("taken");
        assert_eq!(fourth.durable().await.expect("durable"), Lsn(4));
        assert!(refused(submit(frame(5, 1, 30, 0)).await).contains("epoch 1"));
        // An epoch above the log's own would not reopen: refused until it is raised.
        assert!(refused(submit(frame(5, 3, 30, 0)).await).contains("above this log's epoch 2"));
        // A follower's log never stamps its own frames.
        assert!(refused(wal.submit(KIND, b"t", b"x").await).contains("stamped frames"));
        // A frame larger than this log's groups.
        let mut big = frame(5, 2, 30, 0);
        big.payload = vec![0; 9000];
        assert!(matches!(
            wal.submit_stamped(&big).await,
            Err(Error::RecordTooLarge { .. })
        ));
        let segments = wal.segments();
        wal.close().await.expect("close");

        let mut recovered = Vec::new();
        let (wal, report) = Wal::open(storage, config(32 * 1024, Epoch(2)), Lsn(1), |f| {
            recovered.push(OwnedFrame::from(f));
            Ok(())
        })
        .await
        .expect("reopen");
        assert_eq!(report.last_epoch, Epoch(2));
        assert_eq!(segments.len(), 2, "one segment per epoch: {segments:?}");
        let got: Vec<(u64, u64, u64, u32)> = recovered
            .iter()
            .map(|f| (f.lsn.0, f.epoch.0, f.commit_ts.0, f.group_index))
            .collect();
        assert_eq!(
            got,
            [(1, 1, 10, 0), (2, 1, 10, 1), (3, 1, 10, 0), (4, 2, 20, 0)]
        );
        for f in &recovered {
            assert_eq!(f.payload, frame(f.lsn.0, 0, 0, 0).payload);
        }
        // Reopened, the log may stamp its own frames (after a promotion), and from then
        // on refuses stamped ones.
        assert_eq!(wal.append(KIND, b"t", b"x").await.expect("append"), Lsn(5));
        assert!(
            refused(wal.submit_stamped(&frame(6, 2, u64::MAX, 0)).await).contains("stamps its own")
        );
        wal.close().await.expect("close");
    });
}
