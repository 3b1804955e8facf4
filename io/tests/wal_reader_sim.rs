//! `Wal::read_after` over `SimStorage` while writers append and a releaser releases
//! segments, with random yields between storage operations: every read returns a
//! gap-free run of frames starting right after the asked LSN, each byte-equal to what
//! was appended at that LSN, or says the log no longer holds it — and only when a
//! release really moved the log's start past it. After a crash and recovery, the whole
//! recovered log reads back frame for frame.
//!
//! Seeds: `OC_SIM_SEED`, `OC_SIM_SEEDS`, `OC_SIM_SEED_START` as for every simulator.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use oc_io::executor::run_local;
use oc_io::{
    seeds_from_env, LogRead, Lsn, RecordKind, SimFaults, SimRng, SimStorage, Wal, WalConfig,
};

const KIND: RecordKind = RecordKind(1);

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 32 * 1024,
        max_group_bytes: 8 * 1024,
        ..WalConfig::default()
    }
}

fn faults(crash_after_ops: Option<u64>) -> SimFaults {
    SimFaults {
        crash_after_ops,
        sync_error_per_mille: 0,
        capacity_bytes: u64::MAX,
        max_files: usize::MAX,
        yield_per_mille: 300,
    }
}

/// Appended payloads by LSN (filled as appends return) and every payload attempted.
type Appended = Rc<RefCell<BTreeMap<u64, Vec<u8>>>>;

/// Reads the whole log after `after` page by page; checks each page against `appended`.
async fn read_through(
    seed: u64,
    wal: &Wal<SimStorage>,
    mut after: Lsn,
    upto: Lsn,
    appended: &Appended,
    oldest_kept: &Cell<Lsn>,
) -> (u64, u64) {
    let (mut frames_read, mut not_held) = (0, 0);
    while after < upto {
        match wal.read_after(after, upto).await {
            Ok(LogRead::Frames(frames)) => {
                assert!(
                    !frames.is_empty(),
                    "seed {seed}: an empty page below the durable LSN"
                );
                for (i, frame) in frames.iter().enumerate() {
                    assert_eq!(frame.lsn.0, after.0 + 1 + i as u64, "seed {seed}: a gap");
                    assert!(frame.lsn <= upto, "seed {seed}: past upto");
                    if let Some(p) = appended.borrow().get(&frame.lsn.0) {
                        assert_eq!(&frame.payload, p, "seed {seed}: LSN {} differs", frame.lsn);
                    }
                    assert_eq!(frame.tenant, b"t");
                }
                frames_read += frames.len() as u64;
                after = frames.last().map_or(after, |f| f.lsn);
            }
            Ok(LogRead::NotHeld { oldest }) => {
                // Only a release can make the log stop holding a durable frame.
                assert!(
                    oldest_kept.get() > after.next() || oldest.is_some_and(|o| o > after.next()),
                    "seed {seed}: LSN {} reported not held, log starts at {oldest:?}",
                    after.next()
                );
                not_held += 1;
                break;
            }
            Err(e) => panic!("seed {seed}: read failed: {e}"),
        }
    }
    (frames_read, not_held)
}

async fn run_seed(seed: u64) -> (u64, u64) {
    let mut rng = SimRng::new(seed);
    let storage = SimStorage::new(seed, faults(None));
    let (wal, _) = Wal::open(storage.clone(), config(), Lsn(1), |_| Ok(()))
        .await
        .expect("open");
    let wal = Rc::new(wal);
    let appended: Appended = Rc::default();
    let oldest_kept = Rc::new(Cell::new(Lsn(1)));
    let done = Rc::new(Cell::new(false));
    let mut writers = Vec::new();
    for writer in 0..1 + rng.below(6) {
        let (wal, appended) = (wal.clone(), appended.clone());
        let mut rng = SimRng::new(seed ^ (writer + 1).wrapping_mul(0x9E37));
        writers.push(glommio::spawn_local(async move {
            for seq in 0..50u64 {
                let len = 16 + rng.below(1500) as usize;
                let mut p = Vec::with_capacity(len);
                p.extend_from_slice(&writer.to_le_bytes());
                p.extend_from_slice(&seq.to_le_bytes());
                p.resize(len, writer as u8);
                let lsn = wal.append(KIND, b"t", &p).await.expect("append");
                appended.borrow_mut().insert(lsn.0, p);
            }
        }));
    }
    let releaser = {
        let (wal, done, oldest_kept) = (wal.clone(), done.clone(), oldest_kept.clone());
        let pause = 5 + rng.below(60);
        glommio::spawn_local(async move {
            while !done.get() {
                for _ in 0..pause {
                    futures_lite::future::yield_now().await;
                }
                let bound = Lsn(wal.durable_lsn().0 / 2 + 1);
                if bound > oldest_kept.get() {
                    oldest_kept.set(bound);
                    wal.release_before(bound).await.expect("release");
                }
            }
        })
    };
    let reader = {
        let (wal, done, appended, oldest_kept) = (
            wal.clone(),
            done.clone(),
            appended.clone(),
            oldest_kept.clone(),
        );
        let mut rng = SimRng::new(seed ^ 0xabcdef);
        glommio::spawn_local(async move {
            let (mut frames, mut not_held) = (0, 0);
            while !done.get() {
                let durable = wal.durable_lsn();
                let after = Lsn(rng.below(durable.0 + 1));
                let (f, n) =
                    read_through(seed, &wal, after, durable, &appended, &oldest_kept).await;
                frames += f;
                not_held += n;
                futures_lite::future::yield_now().await;
            }
            (frames, not_held)
        })
    };
    let run = async {
        for w in writers {
            w.await;
        }
        done.set(true);
        releaser.await;
        reader.await
    };
    let deadline = async {
        glommio::timer::sleep(Duration::from_secs(20)).await;
        panic!("seed {seed}: the run hung");
    };
    let counts = futures_lite::future::or(run, deadline).await;

    // Crash, recover: what recovery replays is exactly what the reader reads back.
    let durable = wal.durable_lsn();
    drop(wal);
    storage.restart(faults(None));
    let mut recovered = BTreeMap::new();
    let (wal, _) = Wal::open(storage.clone(), config(), oldest_kept.get(), |f| {
        recovered.insert(f.lsn.0, f.payload.to_vec());
        Ok(())
    })
    .await
    .expect("recovery");
    let first = *recovered.keys().next().expect("frames survive");
    let mut read = BTreeMap::new();
    let mut after = Lsn(first - 1);
    while after < durable {
        let LogRead::Frames(frames) = wal.read_after(after, durable).await.expect("read") else {
            panic!("seed {seed}: the recovered log does not hold what it replayed");
        };
        after = frames.last().expect("a page").lsn;
        read.extend(frames.into_iter().map(|f| (f.lsn.0, f.payload)));
    }
    assert_eq!(read, recovered, "seed {seed}");
    counts
}

#[test]
fn reads_return_exactly_the_appended_frames_or_say_they_are_released() {
    let seeds = seeds_from_env(200);
    let (mut frames, mut not_held) = (0, 0);
    run_local(async {
        for &seed in &seeds {
            let (f, n) = run_seed(seed).await;
            frames += f;
            not_held += n;
        }
    });
    eprintln!(
        "{} seeds: {frames} frames read back, {not_held} reads past a release",
        seeds.len()
    );
    if seeds.len() >= 100 {
        assert!(
            frames > 1000 * seeds.len() as u64 / 10,
            "too few frames read"
        );
        assert!(
            not_held * 20 > seeds.len() as u64,
            "too few reads raced a release"
        );
    }
}
