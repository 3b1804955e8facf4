//! Shipping and restore over the simulated disk, with crashes. A shard on `SimStorage`
//! takes concurrent writes while a checkpointer writes checkpoints and releases the
//! log behind the shipper's barrier, and the shipper ships sealed segments,
//! checkpoints and tail pieces to a local-directory archive, reading the simulated
//! files (`ShardFiles`). The machine crashes at a random storage operation. Then:
//! - the restarted shard's log reaches at least the last acknowledged LSN (that the
//!   rows are right is `shard_crash_sim`'s to check);
//! - a new shipper (the restarted process) picks up where the archive is and ships the
//!   rest;
//! - `oc-pitr verify`'s walk finds no problem in the archive;
//! - `restore` to the latest point yields a shard equal, row for row, to the recovered
//!   one: nothing acknowledged and archived is lost, nothing is invented.
//!
//! Seeds: `OC_SIM_SEED`, `OC_SIM_SEEDS`, `OC_SIM_SEED_START` as for every simulator.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use oc_engine::placement::shard_dir;
use oc_engine::{ColumnType, Shard, TableSchema, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::{seeds_from_env, DmaStorage, Lsn, SimFaults, SimRng, SimStorage, WalConfig};
use oc_ship::archive::envelope::Sealed;
use oc_ship::archive::{Archive, ArchiveError, Condition, LocalDirArchive, Version};
use oc_ship::breaker::BreakerPolicy;
use oc_ship::lease;
use oc_ship::restore::{self, LATEST};
use oc_ship::shipper::{
    ShardFiles, ShardView, ShipError, ShipStatus, Shipper, ShipperConfig, DEFAULT_TAIL_WINDOW,
};
use serde_json::json;

fn wal_config() -> WalConfig {
    WalConfig {
        segment_bytes: 32 * 1024,
        max_group_bytes: 8 * 1024,
        ..WalConfig::default()
    }
}

fn schema() -> TableSchema {
    TableSchema::new(
        "items",
        &[("id", ColumnType::Int, false), ("n", ColumnType::Int, true)],
        &["id"],
        &[],
    )
    .expect("valid schema")
}

fn acme() -> TenantId {
    TenantId::parse("acme").expect("valid")
}

/// Shard 0's files on the simulated disk, as the shipping thread would read them.
struct SimFiles(SimStorage);

fn gone(name: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, name.to_string())
}

impl ShardFiles for SimFiles {
    fn names(&self, _: usize) -> std::io::Result<Vec<String>> {
        Ok(self.0.file_names())
    }

    fn read_exact_at(
        &self,
        _: usize,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        let bytes = self.0.read_file(name).ok_or_else(|| gone(name))?;
        let range = offset as usize..offset as usize + buf.len();
        let read = bytes
            .get(range)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(read);
        Ok(())
    }

    fn read(&self, _: usize, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.0.read_file(name))
    }

    fn len(&self, _: usize, name: &str) -> std::io::Result<u64> {
        Ok(self.0.read_file(name).ok_or_else(|| gone(name))?.len() as u64)
    }

    fn describe(&self, _: usize, name: &str) -> String {
        format!("sim:{name}")
    }
}

fn ship_config(dir: &std::path::Path) -> ShipperConfig {
    ShipperConfig {
        data_dir: dir.join("data"),
        owner_id: "0123456789abcdef0123456789abcdef".into(),
        lineage: Some("0123456789abcdef0123456789abcdef".into()),
        // One host and data directory path for both processes: the restarted one takes
        // the owner record over at once, as after a kill -9.
        holder: lease::this_process("ship-sim", &dir.join("data")),
        lease_renew: lease::LEASE_RENEW_INTERVAL,
        shards: 1,
        tail_window: DEFAULT_TAIL_WINDOW,
        retention: Duration::from_secs(24 * 3600),
        audit_retention: Duration::from_secs(24 * 3600),
        breaker: BreakerPolicy::default(),
        lease_ttl: None,
        held: None,
    }
}

/// A shipper of this process (same host and data directory path as any before it)
/// over the simulated disk.
fn open_shipper(
    archive: &Arc<dyn Archive>,
    dir: &std::path::Path,
    storage: &SimStorage,
) -> Result<Shipper<SimFiles>, ShipError> {
    Shipper::open_with(
        archive.clone(),
        ship_config(dir),
        ShipStatus::default(),
        SimFiles(storage.clone()),
    )
}

/// One shipping round over shard 0; moves its release barrier on success.
fn ship_round(shipper: &mut Shipper<SimFiles>, shard: &Shard<SimStorage>) -> bool {
    let view = ShardView {
        segments: shard.wal().segments(),
        tail: shard.wal().durable_tail(),
    };
    match shipper.round(&[Some(view)], true).remove(0) {
        Ok(barrier) => {
            shard.set_release_barrier(Some(barrier));
            true
        }
        Err(_) => false,
    }
}

type Rows = Vec<Vec<Value>>;

fn rows<S: oc_io::Storage>(shard: &Shard<S>) -> Option<Rows> {
    shard
        .read(&acme(), |t| {
            t.table("items")
                .ok()
                .map(|table| table.rows().map(oc_engine::Row::to_values).collect())
        })
        .ok()
        .flatten()
}

#[derive(Default)]
struct Counts {
    crashed: usize,
    acked: usize,
    segments_released: usize,
    restored_from_checkpoint: usize,
    deletions_verified: usize,
    lost_segments_verified: usize,
}

async fn run_seed(seed: u64, counts: &mut Counts) {
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let archive: Arc<dyn Archive> =
        Arc::new(LocalDirArchive::open(dir.path().join("archive")).expect("archive"));
    let storage = SimStorage::new(
        seed,
        SimFaults {
            crash_after_ops: Some(20 + rng.below(300)),
            sync_error_per_mille: 0,
            capacity_bytes: u64::MAX,
            max_files: usize::MAX,
            yield_per_mille: 300,
        },
    );
    let last_acked = Rc::new(Cell::new(Lsn(0)));
    let released = Rc::new(Cell::new(0usize));

    // The first process: writers, a checkpointer and the shipper, until the crash.
    if let Ok((shard, _)) = Shard::open(storage.clone(), wal_config()).await {
        let shard = Rc::new(shard);
        shard.set_release_barrier(Some(Lsn(1)));
        let mut shipper = open_shipper(&archive, dir.path(), &storage)
            .unwrap_or_else(|e| panic!("seed {seed}: the first shipper: {e}"));
        let ready = async {
            shard.create_tenant(&acme()).await.ok()?;
            shard.create_table(&acme(), schema()).await.ok()
        };
        if let Some(lsn) = ready.await {
            last_acked.set(lsn);
            let done = Rc::new(Cell::new(false));
            let mut writers = Vec::new();
            for writer in 0..1 + rng.below(4) {
                let (shard, last_acked) = (shard.clone(), last_acked.clone());
                let mut rng = SimRng::new(seed ^ (writer + 1).wrapping_mul(0x9E37_79B9));
                writers.push(glommio::spawn_local(async move {
                    for _ in 0..40 {
                        let ops: Vec<WriteOp> = (0..1 + rng.below(4))
                            .map(|_| {
                                let row = json!({"id": rng.below(50), "n": rng.next_u64() >> 12});
                                WriteOp::Upsert(row.as_object().expect("an object").clone())
                            })
                            .collect();
                        match shard.write(&acme(), "items", &ops, None).await {
                            Ok((lsn, _)) => last_acked.set(last_acked.get().max(lsn)),
                            Err(_) => break,
                        }
                    }
                }));
            }
            let checkpointer = {
                let (shard, done, released) = (shard.clone(), done.clone(), released.clone());
                let pause = 20 + rng.below(100);
                glommio::spawn_local(async move {
                    while !done.get() {
                        for _ in 0..pause {
                            futures_lite::future::yield_now().await;
                        }
                        if shard.checkpoint().await.is_err() {
                            break;
                        }
                        match shard.release_covered_wal().await {
                            Ok(names) => released.set(released.get() + names.len()),
                            Err(_) => break,
                        }
                    }
                })
            };
            let shipping = {
                let (shard, done, storage) = (shard.clone(), done.clone(), storage.clone());
                let pause = 10 + rng.below(60);
                glommio::spawn_local(async move {
                    while !done.get() && !storage.crashed() {
                        for _ in 0..pause {
                            futures_lite::future::yield_now().await;
                        }
                        ship_round(&mut shipper, &shard);
                    }
                })
            };
            let all = async {
                for w in writers {
                    w.await;
                }
                done.set(true);
                checkpointer.await;
                shipping.await;
            };
            let deadline = async {
                glommio::timer::sleep(Duration::from_secs(30)).await;
                panic!("seed {seed}: the run hung");
            };
            futures_lite::future::or(all, deadline).await;
        }
    }
    counts.crashed += usize::from(storage.crashed());
    counts.acked += usize::from(last_acked.get() > Lsn(0));
    counts.segments_released += usize::from(released.get() > 0);

    // The restarted process: recovery, then a new shipper ships what is left.
    storage.restart(SimFaults::default());
    let (shard, _) = Shard::open(storage.clone(), wal_config())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: recovery failed: {e}"));
    assert!(
        shard.applied_lsn() >= last_acked.get(),
        "seed {seed}: acknowledged LSN {} lost (recovered {})",
        last_acked.get(),
        shard.applied_lsn()
    );
    shard.set_release_barrier(Some(Lsn(1)));
    let mut shipper = open_shipper(&archive, dir.path(), &storage)
        .unwrap_or_else(|e| panic!("seed {seed}: the restarted shipper: {e}"));
    assert!(
        ship_round(&mut shipper, &shard),
        "seed {seed}: shipping after the restart failed"
    );
    let recovered = rows(&shard);
    let recovered_lsn = shard.applied_lsn();
    shard.close().await.expect("close");

    // The archive passes its own walk: every object readable, the chain whole.
    let verified = restore::verify(archive.as_ref(), &mut |_| {})
        .unwrap_or_else(|e| panic!("seed {seed}: verify failed: {e}"));
    for shard in &verified {
        assert!(
            shard.problems.is_empty(),
            "seed {seed}: verify found {:?}",
            shard.problems
        );
    }

    // Restore the latest point and compare.
    let restored_dir = dir.path().join("restored");
    let restored = restore::restore(&archive, LATEST, &restored_dir, &mut |_| {})
        .unwrap_or_else(|e| panic!("seed {seed}: restore failed: {e}"));
    assert_eq!(
        restored.shards[0].last_lsn,
        recovered_lsn,
        "seed {seed}: the restore ends where the shard's log ends ({:?}; archive {:?})",
        restored.shards[0],
        archive.list("shard-0/").unwrap_or_default()
    );
    counts.restored_from_checkpoint += usize::from(restored.shards[0].checkpoint.is_some());
    let storage = DmaStorage::open(&shard_dir(&restored_dir, 0))
        .await
        .expect("restored storage");
    let (restored_shard, _) = Shard::open(storage, wal_config())
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the restored shard does not open: {e}"));
    assert_eq!(
        rows(&restored_shard),
        recovered,
        "seed {seed}: the restored rows differ from the recovered ones"
    );
    restored_shard.close().await.expect("close");

    verify_outlives_a_live_writers_deletions(seed, &archive, counts);
}

/// `verify` against an archive a live writer deletes from while it runs: an object
/// deleted between the listing and its read is not a problem (a fresh listing no
/// longer has it), but one still listed and never readable is, with the gap it leaves.
/// Runs last: the deletion changes the seed's archive.
fn verify_outlives_a_live_writers_deletions(
    seed: u64,
    archive: &Arc<dyn Archive>,
    counts: &mut Counts,
) {
    let walk = |archive: &dyn Archive| {
        let mut relistings = 0;
        let verified = restore::verify(archive, &mut |line| {
            relistings +=
                usize::from(line.contains("listing 2 of") || line.contains("listing 3 of"));
        })
        .unwrap_or_else(|e| panic!("seed {seed}: verify failed: {e}"));
        (verified.into_iter().next().expect("one shard"), relistings)
    };
    let (whole, _) = walk(archive.as_ref());
    let segments = archive.list("shard-0/wal/").expect("list");
    if segments.len() >= 3 {
        let hidden = &segments[1];
        counts.lost_segments_verified += 1;
        let (verified, relistings) = walk(&hides_an_object(archive, hidden));
        assert_eq!(
            relistings, 0,
            "seed {seed}: still listed, so not listed again"
        );
        let problems = &verified.problems;
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(hidden.as_str()) && p.contains("missing")),
            "seed {seed}: a segment listed but unreadable is a problem: {problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("gap:")),
            "seed {seed}: the LSNs it held are a gap: {problems:?}"
        );
    }
    let Some(doomed) = segments.first() else {
        return;
    };
    counts.deletions_verified += 1;
    let (verified, relistings) = walk(&deleted_on_first_read(archive, doomed));
    assert!(
        verified.problems.is_empty(),
        "seed {seed}: a deleted object counted as a problem: {:?}",
        verified.problems
    );
    assert_eq!(
        relistings, 1,
        "seed {seed}: verified again from a second listing"
    );
    assert_eq!(
        verified.objects,
        whole.objects - 1,
        "seed {seed}: every object but the deleted one is read"
    );
    // Without the oldest segment the window may have no start left (no checkpoint
    // before the rest); where it has one, it reaches as far: to the newest commit, or
    // to its start when a checkpoint completed after that commit.
    if let (Some((from, to)), Some((_, whole_to))) = (verified.window, whole.window) {
        assert_eq!(
            to,
            whole_to.max(from),
            "seed {seed}: the second listing reaches as far"
        );
    }
}

type GetHook = Box<dyn Fn(&str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> + Send + Sync>;
type ListHook = Box<dyn Fn(&str) -> Result<Vec<String>, ArchiveError> + Send + Sync>;

/// An archive as `verify` sees it while something changes it between its listing and
/// its reads: reads and listings go through the hooks. `verify` only reads, so a
/// write is a failure of the test.
struct Changing {
    get: GetHook,
    list: ListHook,
}

impl Archive for Changing {
    fn put_sealed(&self, key: &str, _: &Sealed, _: &Condition) -> Result<Version, ArchiveError> {
        panic!("verify wrote {key}")
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
        (self.get)(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        (self.list)(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        panic!("verify deleted {key}")
    }
}

/// Deletes `doomed` just before its first read, as a live writer's retention can
/// between `verify`'s listing and its read.
fn deleted_on_first_read(inner: &Arc<dyn Archive>, doomed: &str) -> Changing {
    let deleted = AtomicBool::new(false);
    let (reader, lister, doomed) = (inner.clone(), inner.clone(), doomed.to_string());
    Changing {
        get: Box::new(move |key| {
            if key == doomed && !deleted.swap(true, Relaxed) {
                reader.delete(key)?;
            }
            reader.get(key)
        }),
        list: Box::new(move |prefix| lister.list(prefix)),
    }
}

/// Lists `hidden` but never finds it when read: a lost object.
fn hides_an_object(inner: &Arc<dyn Archive>, hidden: &str) -> Changing {
    let (reader, lister, hidden) = (inner.clone(), inner.clone(), hidden.to_string());
    Changing {
        get: Box::new(move |key| {
            if key == hidden {
                Ok(None)
            } else {
                reader.get(key)
            }
        }),
        list: Box::new(move |prefix| lister.list(prefix)),
    }
}

#[test]
fn shipping_through_crashes_restores_exactly_what_recovery_has() {
    let seeds = seeds_from_env(100);
    let mut counts = Counts::default();
    run_local(async {
        for &seed in &seeds {
            let guard = oc_io::SeedGuard::new(seed);
            run_seed(seed, &mut counts).await;
            guard.passed();
        }
    });
    eprintln!(
        "{} seeds: {} crashed, {} acknowledged writes, {} released segments behind the \
         barrier, {} restored from a checkpoint, {} verified through deletions, {} with a lost segment",
        seeds.len(),
        counts.crashed,
        counts.acked,
        counts.segments_released,
        counts.restored_from_checkpoint,
        counts.deletions_verified,
        counts.lost_segments_verified
    );
    if seeds.len() >= 100 {
        let n = seeds.len();
        assert!(counts.crashed * 3 > n, "too few runs crashed");
        assert!(counts.acked * 2 > n, "too few runs acknowledged writes");
        assert!(
            counts.segments_released * 5 > n,
            "too few runs released segments"
        );
        assert!(
            counts.restored_from_checkpoint * 5 > n,
            "too few restores started from a checkpoint"
        );
        assert!(
            counts.deletions_verified * 5 > n,
            "too few archives had a sealed segment to delete under verify"
        );
        assert!(
            counts.lost_segments_verified * 5 > n,
            "too few archives had a sealed segment to lose under verify"
        );
    }
}

/// `verify` while the writer seals the segment whose tail pieces it listed: the pieces
/// are gone when read, and the sealed segment that replaced them is in a second
/// listing, so nothing is a problem and the walk ends where the sealed archive's does.
#[test]
fn verify_outlives_a_segment_sealed_under_it() {
    run_local(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("archive");
        let archive: Arc<dyn Archive> = Arc::new(LocalDirArchive::open(&root).expect("archive"));
        let storage = SimStorage::new(7, SimFaults::default());
        let (shard, _) = Shard::open(storage.clone(), wal_config())
            .await
            .expect("open");
        shard.set_release_barrier(Some(Lsn(1)));
        let mut shipper = open_shipper(&archive, dir.path(), &storage).expect("shipper");
        shard.create_tenant(&acme()).await.expect("tenant");
        shard.create_table(&acme(), schema()).await.expect("table");
        let mut id = 0;
        let mut write = || {
            id += 1;
            let row = json!({"id": id, "n": id});
            let ops = [WriteOp::Upsert(row.as_object().expect("object").clone())];
            let shard = &shard;
            async move {
                shard
                    .write(&acme(), "items", &ops, None)
                    .await
                    .expect("written")
            }
        };
        write().await;
        assert!(ship_round(&mut shipper, &shard), "shipped");
        let tails = oc_ship::layout::tails_prefix(0);
        let pieces = archive.list(&tails).expect("list");
        let sealing = pieces
            .iter()
            .filter_map(|k| oc_ship::layout::TailPieceKey::parse(k))
            .map(|p| p.first_lsn)
            .next()
            .expect("the active segment's tail went out in pieces");
        let before_seal = dir.path().join("before-seal");
        copy_dir(&root, &before_seal);

        let sealed = |shard: &Shard<SimStorage>| shard.wal().segments().len() > 1;
        for _ in 0..1000 {
            if sealed(&shard) {
                break;
            }
            write().await;
        }
        assert!(sealed(&shard), "the segment sealed");
        assert!(ship_round(&mut shipper, &shard), "shipped sealed");
        let segments = archive.list("shard-0/wal/").expect("list");
        assert!(
            segments
                .iter()
                .filter_map(|k| oc_ship::layout::SegmentKey::parse(k))
                .any(|s| s.first_lsn == sealing),
            "the segment is archived sealed: {segments:?}"
        );
        let left = archive.list(&tails).expect("list");
        assert!(
            pieces.iter().all(|p| !left.contains(p)),
            "its pieces are gone: {left:?}"
        );
        shard.close().await.expect("close");

        let after = restore::verify(archive.as_ref(), &mut |_| {}).expect("verify");
        let mut relistings = 0;
        let during = restore::verify(
            &sealed_while_read(
                Arc::new(LocalDirArchive::open(&before_seal).expect("archive")),
                archive.clone(),
            ),
            &mut |line| relistings += usize::from(line.contains("listing 2 of")),
        )
        .expect("verify");
        let (during, after) = (&during[0], &after[0]);
        assert!(during.problems.is_empty(), "{:?}", during.problems);
        assert_eq!(relistings, 1, "verified again from a second listing");
        assert_eq!(during.objects, after.objects);
        assert_eq!(during.window, after.window);
    });
}

/// Copies a local archive's directory as it is at one moment.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// The archive `before` a segment sealed until the first read of a tail piece, and
/// the archive `after` it from then on: the seal lands between `verify`'s listing and
/// its reads.
fn sealed_while_read(before: Arc<dyn Archive>, after: Arc<dyn Archive>) -> Changing {
    let sealed = Arc::new(AtomicBool::new(false));
    let now = {
        let sealed = sealed.clone();
        move || {
            if sealed.load(Relaxed) {
                after.clone()
            } else {
                before.clone()
            }
        }
    };
    let lister = now.clone();
    Changing {
        get: Box::new(move |key| {
            if oc_ship::layout::TailPieceKey::parse(key).is_some() {
                sealed.store(true, Relaxed);
            }
            now().get(key)
        }),
        list: Box::new(move |prefix| lister().list(prefix)),
    }
}
