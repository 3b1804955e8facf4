//! Shipping: sealed segments, checkpoints and the durable tail of the active segment go
//! to the archive; a segment leaves the local disk only once the archive has it.
//!
//! Two halves. [`run_shipper`] runs on the control executor: every `tail_window` it
//! asks each shard where its log ends ([`ShardView`], one cross-core call), hands the
//! views to the shipping thread, and moves each shard's release barrier up to what is
//! now archived. The shipping thread ([`Shipper`]) does every blocking thing: it reads
//! the shard's files through [`ShardFiles`] (every byte it reads is durable and never
//! rewritten, see `Wal::durable_tail`) and calls the archive. On a server those are
//! blocking reads on the shipping thread, segments without readahead
//! ([`DataDirFiles`]), never a shard's io_uring; in
//! the simulator they read the simulated disk, so shipping and restore are tested
//! with crashes (`ship/tests/ship_restore_sim.rs`). So an archive that is
//! slow or down never blocks a shard: writes go on, segments stay on disk, and the
//! lag metrics grow until uploads succeed again.
//!
//! Order within a round, per shard: sealed segments oldest first (then their tail
//! pieces are deleted), checkpoints (snapshot, then manifest), then the new bytes of
//! the active segment as one tail piece. The barrier becomes the first LSN of the
//! oldest segment not archived sealed, so the active segment is never released.
//!
//! One file, about 860 lines of code: one shipping round and its ordering rules
//! (above); the control-executor half is the small `run_shipper` at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::future::Future;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use oc_engine::json_file::JsonFile;
use oc_engine::placement::shard_dir;
use oc_engine::{ShardNode, ShardRouter, UnreadableFile};
use oc_io::wal::segment::{parse_segment_name, DATA_START};
use oc_io::wal::{ArchivedLog, ArchivedTail, DurableTail};
use oc_io::{Epoch, Lsn, BLOCK_SIZE};

use crate::archive::{envelope, Archive, ArchiveError, Condition};
use crate::audit;
use crate::breaker::{Breaker, BreakerPolicy};
use crate::layout::{self, SegmentKey, TailPieceKey};
use crate::lease::{self, FencedArchive, Holder, Lease, LeaseError, LeaseHold, Renewal, Renewed};

/// Default interval between tail uploads.
pub const DEFAULT_TAIL_WINDOW: Duration = Duration::from_millis(500);
/// Default time archived checkpoints and segments are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often retention runs, at most. It runs after a successful shipping round, and
/// no less often than twice per retention window while rounds succeed (a short window
/// is kept to).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ShipperConfig {
    pub data_dir: PathBuf,
    /// The data directory's id, recorded as the archive's owner (`lease.json`).
    pub owner_id: String,
    /// Where its history began (`Layout::lineage`), recorded in the archive's manifest.
    pub lineage: Option<String>,
    /// This process, as the owner record names it.
    pub holder: Holder,
    /// How often the owner record is renewed ([`lease::LEASE_RENEW_INTERVAL`]; shorter
    /// only in tests). Another holder is refused for 3 intervals after a renewal.
    pub lease_renew: Duration,
    pub shards: usize,
    pub tail_window: Duration,
    pub retention: Duration,
    /// How long the audit log's archived files are kept.
    pub audit_retention: Duration,
    pub breaker: BreakerPolicy,
    /// A replicating writer's lease: recorded with its TTL, and this process stops
    /// writing (the archive, and acknowledgements through [`LeaseHold`]) `max_drift`
    /// before the TTL runs out since its last renewal. `None`: the owner record of a
    /// lone server (no TTL; writes stop 2 renewal intervals after the last renewal).
    pub lease_ttl: Option<LeaseTtl>,
    /// The record this process already took (a promotion's claim): shipping renews it
    /// from that version instead of claiming again, so a record written since (a clone
    /// of this directory promoted meanwhile) displaces this process rather than being
    /// overwritten. `None`: claim at start.
    pub held: Option<HeldClaim>,
}

/// A claim this process wrote, and when its write was sent (the hold's first
/// confirmation).
#[derive(Debug, Clone)]
pub struct HeldClaim {
    pub claim: lease::Claim,
    pub sent: Instant,
}

/// A replicating writer's lease timing (FORMAT.md §9.2).
#[derive(Debug, Clone, Copy)]
pub struct LeaseTtl {
    pub ttl: Duration,
    /// The most two hosts' clocks may disagree (and a renewal's write may take).
    pub max_drift: Duration,
}

/// Where one shard's log ends, as the shard saw it.
#[derive(Debug, Clone)]
pub struct ShardView {
    /// Segment files, oldest first; all but the newest are sealed.
    pub segments: Vec<String>,
    pub tail: Option<DurableTail>,
}

impl ShardView {
    pub fn of(node: &ShardNode) -> ShardView {
        let wal = node.shard().wal();
        ShardView {
            segments: wal.segments(),
            tail: wal.durable_tail(),
        }
    }
}

/// Why a round did not finish, by kind (`oc_archive_failures_total{kind}`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("reading {file}: {why}")]
    Local { file: String, why: String },
    /// A sealed segment that fails its checks: never shipped as it is.
    #[error("{file} is damaged: {why}")]
    Damaged { file: String, why: String },
    /// A local checkpoint file this build cannot ship (it would not restore either).
    #[error(transparent)]
    Unreadable(#[from] UnreadableFile),
    #[error("the archive's circuit breaker is open: no upload this round")]
    CircuitOpen,
    #[error("the archive already holds a different {key:?}: it belongs to another server or timeline; ship to a new archive location")]
    Conflict { key: String },
    #[error(transparent)]
    Owner(#[from] LeaseError),
    /// The local log and the archive hold different frames for the same LSNs: shipping
    /// on would continue one history with the other.
    #[error(
        "{file} differs from the archive's {key}: {why}. This data directory's log and the \
         archive hold different histories (an older copy of this directory that wrote on \
         without the archive?); shipping would mix them and a restore would give a state \
         no server had. Start this server on a new --archive, or restore from this one \
         into a new directory (RUNBOOK.md, \"The log and the archive differ\")"
    )]
    Diverged {
        file: String,
        key: String,
        why: String,
    },
}

impl ShipError {
    pub fn kind(&self) -> &'static str {
        match self {
            ShipError::Archive(ArchiveError::Io { .. }) => "io",
            ShipError::Archive(ArchiveError::Corrupt { .. } | ArchiveError::Unreadable { .. }) => {
                "corrupt"
            }
            ShipError::Archive(ArchiveError::PreconditionFailed { .. })
            | ShipError::Conflict { .. } => "conflict",
            ShipError::Archive(_) => "config",
            ShipError::Local { .. }
            | ShipError::Damaged { .. }
            | ShipError::Unreadable(_)
            | ShipError::Diverged { .. } => "local",
            ShipError::CircuitOpen => "circuit_open",
            // Only at start and renewal: a round never claims.
            ShipError::Owner(LeaseError::Archive(e)) => ShipError::Archive(e.clone()).kind(),
            ShipError::Owner(_) => "conflict",
        }
    }
}

/// What `/metrics` shows about shipping.
#[derive(Debug, Clone, Default)]
pub struct ShipMetrics {
    /// Per shard: durable bytes not yet archived, as of the last round.
    pub lag_bytes: Vec<u64>,
    /// Per shard: seconds since the archive last held everything the shard had made
    /// durable.
    pub lag_seconds: Vec<f64>,
    /// Unix seconds of the last round that uploaded everything it had to.
    pub last_success_unix_s: f64,
    pub uploads: BTreeMap<&'static str, u64>,
    /// Payload bytes handed to the archive.
    pub uploaded_bytes: u64,
    /// Bytes the archive stored for them: encoded bodies and trailers (FORMAT.md §8).
    pub stored_bytes: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub circuit_open: bool,
    pub circuit_opened_total: u64,
    pub deleted_by_retention: u64,
    /// Per shard: damaged sealed segments left out of the archive, an archived
    /// checkpoint covering them ([`Shipper::skip_damaged`]).
    pub segments_skipped: Vec<u64>,
}

/// The shared view of [`ShipMetrics`]: written by the shipping thread, read at scrape
/// time. A lock is fine here: neither side is a data shard.
#[derive(Debug, Clone, Default)]
pub struct ShipStatus(Arc<Mutex<ShipMetrics>>);

impl ShipStatus {
    pub fn snapshot(&self) -> ShipMetrics {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut ShipMetrics)) {
        if let Ok(mut m) = self.0.lock() {
            f(&mut m);
        }
    }
}

/// One shard's archive progress, as the shipping thread knows it.
#[derive(Debug, Default)]
struct ShardProgress {
    /// The sealed segments in the archive, by epoch and first LSN (an empty segment
    /// sealed when a new epoch began shares its first LSN with the next one), and the
    /// damaged ones left out of it for good.
    segments: BTreeSet<(u64, Lsn)>,
    /// Checkpoint LSN → completion time (µs), for those in the archive.
    checkpoints: BTreeMap<Lsn, u64>,
    /// Active segment (its tail folder) → end of the pieces shipped from offset 0.
    tail_ends: BTreeMap<(u64, Lsn), u64>,
    /// When the archive last held all of this shard's durable log.
    caught_up: Option<Instant>,
    /// Archived sealed segments still on the local disk whose cached pages this
    /// process has dropped ([`ShardFiles::forget`]), so each is dropped once.
    forgotten: BTreeSet<(u64, Lsn)>,
    /// Sealed segments found damaged twice by this process, the second time read from
    /// the disk: not read again while they wait for a checkpoint to cover them.
    damaged: BTreeMap<(u64, Lsn), ShipError>,
}

/// The files of the shards' directories, as the shipper reads them: only segments and
/// checkpoints, only bytes that are durable and not rewritten while the file has its
/// name (a released segment's file may become a later segment).
pub trait ShardFiles {
    /// Names of the files in `shard`'s directory.
    fn names(&self, shard: usize) -> std::io::Result<Vec<String>>;
    /// `buf.len()` bytes of `name` from `offset`, into `buf`.
    fn read_exact_at(
        &self,
        shard: usize,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()>;
    /// `len` bytes of `name` from `offset`.
    fn read_at(
        &self,
        shard: usize,
        name: &str,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read_exact_at(shard, name, offset, &mut buf)?;
        Ok(buf)
    }
    /// The whole file; `None` when it is gone (a superseded checkpoint).
    fn read(&self, shard: usize, name: &str) -> std::io::Result<Option<Vec<u8>>>;
    fn len(&self, shard: usize, name: &str) -> std::io::Result<u64>;
    /// The file as error messages name it.
    fn describe(&self, shard: usize, name: &str) -> String;
    /// Done with segment `name` for good (it is archived sealed): what reading it left
    /// cached can go. The log reuses a released segment's file for a later segment,
    /// whose writes must not meet those pages (see [`DataDirFiles`]'s `read_exact_at`).
    fn forget(&self, _shard: usize, _name: &str) {}
}

/// Gives the kernel `advice` about `file`; a failure only costs speed (the log's writes
/// into cached pages go through a worker), so it is logged, once per process.
fn advise(file: &File, advice: libc::c_int) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    // SAFETY: advice on an open descriptor; it changes no memory.
    let errno = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, advice) };
    if errno != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::from_raw_os_error(errno),
            "posix_fadvise on a log segment failed: the log's writes may go through a worker thread while shipping"
        );
    }
}

/// The largest read of a log segment the shipper asks the disk for at once.
const SEGMENT_READ_BYTES: usize = 128 << 10;

/// A server's shard directories, read with blocking reads (segments without readahead).
#[derive(Debug, Clone)]
pub struct DataDirFiles {
    pub data_dir: PathBuf,
}

impl DataDirFiles {
    fn path(&self, shard: usize, name: &str) -> PathBuf {
        shard_dir(&self.data_dir, shard).join(name)
    }
}

impl ShardFiles for DataDirFiles {
    fn names(&self, shard: usize) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(shard_dir(&self.data_dir, shard))? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    /// Read through the page cache with the file's readahead off. The shard writes the
    /// same segments with `O_DIRECT`, and the kernel refuses a non-blocking `O_DIRECT`
    /// write into a range with cached pages: io_uring then hands the log's write to a
    /// blocking worker on the shard's CPU. Readahead would cache megabytes past the
    /// durable end, where the log writes next; without it only durable blocks are
    /// cached, which the log does not write again while the file is this segment (its
    /// groups end on 4 KiB blocks: pages on x86-64; a larger page straddling the
    /// durable end costs one hand-off per round). Once the segment is archived sealed,
    /// [`ShardFiles::forget`] drops them, before the log may reuse the file. `O_DIRECT`
    /// reads were tried instead and had far longer latency maxima (BENCHMARKS.md, "The
    /// shipper's reads and the log's writes").
    ///
    /// The log writes past the page cache, so these reads go to the disk the log syncs
    /// to, and one `pread` of a tail piece reached it as requests of up to 4 MiB that
    /// the log's small writes and cache flushes queued behind: reading in
    /// [`SEGMENT_READ_BYTES`] pieces took the log's fsync-lag p99 at 8,000 writes/s
    /// from 3.9–5.4 ms to 0.8–1.0 ms (BENCHMARKS.md, "Archive objects compressed").
    fn read_exact_at(
        &self,
        shard: usize,
        name: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> std::io::Result<()> {
        let file = File::open(self.path(shard, name))?;
        advise(&file, libc::POSIX_FADV_RANDOM);
        let mut at = offset;
        for piece in buf.chunks_mut(SEGMENT_READ_BYTES) {
            file.read_exact_at(piece, at)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    fn read(&self, shard: usize, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(shard, name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn len(&self, shard: usize, name: &str) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.path(shard, name))?.len())
    }

    fn describe(&self, shard: usize, name: &str) -> String {
        self.path(shard, name).display().to_string()
    }

    /// Its pages are clean (the shard writes past the cache), so they drop.
    fn forget(&self, shard: usize, name: &str) {
        if let Ok(file) = File::open(self.path(shard, name)) {
            advise(&file, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// The blocking half: reads shard files, writes the archive.
pub struct Shipper<F: ShardFiles = DataDirFiles> {
    files: F,
    /// The archive behind this process's hold on the owner record: writes stop when
    /// the hold is lost ([`FencedArchive`]).
    archive: Arc<dyn Archive>,
    config: ShipperConfig,
    shards: Vec<ShardProgress>,
    status: ShipStatus,
    last_retention: Option<Instant>,
    /// Audit log file → bytes of it the archive holds. Empty at start, so every local
    /// file is copied once per process (the audit log is small; its sealed files are
    /// then known complete).
    audit_shipped: BTreeMap<String, u64>,
    /// The owner record's renewals, until [`start`] hands them to their thread.
    renewal: Option<Renewal>,
    /// This process's hold on the record (shared with the renewals).
    hold: Arc<LeaseHold>,
    /// The record's epoch when claimed (above 1: a promoted writer's).
    lease_epoch: u64,
    /// How far the archive held each shard's log when this process listed it.
    archived: Vec<ArchivedLog>,
}

fn local(file: &Path, e: impl std::fmt::Display) -> ShipError {
    ShipError::Local {
        file: file.display().to_string(),
        why: e.to_string(),
    }
}

fn now_us() -> u64 {
    oc_io::TimestampMicros::now().0
}

/// Checks the archive's `manifest.json` against this layout, writing it if absent and
/// marking a format-1 archive format 2 (FORMAT.md §9) before anything is shipped.
pub fn claim_archive(
    archive: &dyn Archive,
    shards: usize,
    lineage: Option<&str>,
) -> Result<(), ShipError> {
    let manifest = crate::catalog::ArchiveManifest {
        lineage: lineage.map(str::to_string),
        ..crate::catalog::ArchiveManifest::new(shards, now_us())
    };
    match archive.put(
        layout::MANIFEST_KEY,
        &manifest.encode(),
        &Condition::IfAbsent,
    ) {
        Ok(_) => Ok(()),
        Err(ArchiveError::PreconditionFailed { .. }) => {
            let (found, version) = crate::catalog::read_archive_manifest_versioned(archive)?;
            if found.shards != shards {
                return Err(ShipError::Archive(ArchiveError::PreconditionFailed {
                    key: layout::MANIFEST_KEY.into(),
                    why: format!(
                        "the archive holds a {}-shard layout and this server runs {shards} shards",
                        found.shards
                    ),
                }));
            }
            mark_current_format(archive, found, version, lineage)
        }
        Err(e) => Err(e.into()),
    }
}

/// Marks a format-1 archive format 2 before this build ships into it. Its objects may
/// be LZ4-encoded, which a build reading format 1 cannot open: such a build then
/// refuses the archive when it starts (DEPLOY.md, "Rollback") instead of failing on the
/// first encoded object it meets.
fn mark_current_format(
    archive: &dyn Archive,
    found: crate::catalog::ArchiveManifest,
    version: crate::archive::Version,
    lineage: Option<&str>,
) -> Result<(), ShipError> {
    let current = layout::ARCHIVE_FORMAT_VERSION;
    // An archive made before lineages were recorded learns its writer's.
    let learns = found.lineage.is_none() && lineage.is_some();
    if found.format_version >= current && !learns {
        return Ok(());
    }
    let (from, shards) = (found.format_version, found.shards);
    let marked_lineage = found.lineage.clone().or(lineage.map(str::to_string));
    let marked = crate::catalog::ArchiveManifest {
        format_version: current.max(found.format_version),
        lineage: marked_lineage.clone(),
        ..found
    };
    match archive.put(
        layout::MANIFEST_KEY,
        &marked.encode(),
        &Condition::IfVersion(version),
    ) {
        Ok(_) => {
            tracing::info!(from, to = current, lineage = ?marked_lineage, "archive manifest marked");
            Ok(())
        }
        // Another put got there first (a retried request that had landed): what counts
        // is what the manifest says now.
        Err(ArchiveError::PreconditionFailed { .. }) => {
            let now = crate::catalog::read_archive_manifest(archive)?;
            if now.format_version >= current && now.shards == shards {
                return Ok(());
            }
            Err(ShipError::Archive(ArchiveError::PreconditionFailed {
                key: layout::MANIFEST_KEY.into(),
                why: format!(
                    "marking the archive format {current} (objects may be LZ4-encoded) found \
                     it changed under it: it now says format {} and {} shards",
                    now.format_version, now.shards
                ),
            }))
        }
        Err(e) => Err(e.into()),
    }
}

impl Shipper<DataDirFiles> {
    /// [`Shipper::open_with`] the server's shard directories.
    pub fn open(
        archive: Arc<dyn Archive>,
        config: ShipperConfig,
        status: ShipStatus,
    ) -> Result<Shipper, ShipError> {
        let files = DataDirFiles {
            data_dir: config.data_dir.clone(),
        };
        Shipper::open_with(archive, config, status, files)
    }
}

impl<F: ShardFiles> Shipper<F> {
    /// Claims the archive for this data directory (refused when another one owns it,
    /// or another copy of it holds the record) and for this layout, and learns what it
    /// already holds; reads the shards' files through `files`.
    pub fn open_with(
        archive: Arc<dyn Archive>,
        config: ShipperConfig,
        status: ShipStatus,
        files: F,
    ) -> Result<Shipper<F>, ShipError> {
        let (claim, claim_sent) = match config.held.clone() {
            Some(HeldClaim { claim, sent }) => (claim, sent),
            None => {
                let sent = Instant::now();
                let claim = lease::claim_with_ttl(
                    archive.as_ref(),
                    &config.owner_id,
                    config.holder.clone(),
                    now_us(),
                    config.lease_renew * lease::LEASE_STALE_INTERVALS,
                    config.lease_ttl.map(|l| l.ttl),
                )?;
                (claim, sent)
            }
        };
        match &claim.claimed {
            lease::Claimed::TakenOver { from, idle } => tracing::warn!(
                owner_id = %claim.lease.owner_id,
                previous_holder = %from,
                idle_s = idle.as_secs(),
                "took the archive's owner record over from another copy of this data directory that stopped renewing it"
            ),
            claimed => {
                tracing::info!(owner_id = %claim.lease.owner_id, ?claimed, "the archive is this data directory's")
            }
        }
        // Writes stop one renewal interval before another copy may take over, or (a
        // replicating writer) the drift margin before the TTL runs out.
        let fence = match config.lease_ttl {
            Some(l) => l.ttl.saturating_sub(l.max_drift),
            None => config.lease_renew * (lease::LEASE_STALE_INTERVALS - 1),
        };
        let hold = Arc::new(LeaseHold::new(claim_sent, fence));
        // A promoted writer ships under its own prefix: the old writer's keys stay its.
        let namespace = lease::namespace(claim.lease.epoch);
        let lease_epoch = claim.lease.epoch;
        let mut renewal = Renewal::new(archive.clone(), claim, hold.clone());
        if config.held.is_some() {
            // Time has passed since the claim (the promotion's other steps): renewing
            // it now both refreshes the hold and proves nobody took the record since.
            // An archive error is tried again a few times: the lease is already taken,
            // and failing here leaves the server between roles.
            let mut attempt = 0;
            loop {
                match renewal.renew(now_us()) {
                    Renewed::Yes => break,
                    Renewed::Failed(e) if attempt >= FIRST_RENEWAL_RETRIES => return Err(e.into()),
                    Renewed::Failed(e) => {
                        tracing::warn!(error = %e, "renewing the promotion's lease record failed; trying again");
                        std::thread::sleep(Duration::from_millis(100 << attempt));
                        attempt += 1;
                    }
                    Renewed::Displaced(found) => {
                        let mine = &renewal.lease().holder;
                        return Err(LeaseError::Displaced {
                            message: displaced_message(mine, &config.owner_id, found),
                        }
                        .into());
                    }
                }
            }
        }
        // The archive's keys as an operator finds them, under this writer's prefix.
        let key_prefix = namespace.clone().unwrap_or_default();
        let archive: Arc<dyn Archive> = match namespace {
            Some(prefix) => {
                tracing::info!(%prefix, lease_epoch, "shipping under this writer's epoch prefix");
                Arc::new(crate::archive::Prefixed::new(archive, prefix)?)
            }
            None => archive,
        };
        let archive: Arc<dyn Archive> = Arc::new(FencedArchive::new(archive, hold.clone()));
        claim_archive(archive.as_ref(), config.shards, config.lineage.as_deref())?;
        let mut shards = Vec::with_capacity(config.shards);
        let mut archived = Vec::with_capacity(config.shards);
        for shard in 0..config.shards {
            let catalog = crate::catalog::ShardCatalog::load(archive.as_ref(), shard)?;
            if let (Some(key), Some(why)) = (
                catalog.damaged_manifest_keys.first(),
                catalog.damaged_manifests.first(),
            ) {
                // Its checkpoint would be uploaded again on every round and refused by
                // the object already there, and that shard's shipping would stall.
                return Err(ArchiveError::Unusable {
                    key: key.clone(),
                    why: format!(
                        "{why}; this server cannot archive that checkpoint again over it. \
                         Move the object aside (keep it for diagnosis) and start again: \
                         the checkpoint is shipped anew (RUNBOOK.md, \"Backup and \
                         restore\")"
                    ),
                }
                .into());
            }
            check_same_history(&files, archive.as_ref(), &catalog, &key_prefix)?;
            archived.push(archived_log(&catalog));
            let mut progress = ShardProgress {
                segments: catalog
                    .segments
                    .iter()
                    .map(|s| (s.epoch.0, s.first_lsn))
                    .collect(),
                checkpoints: catalog
                    .checkpoints
                    .iter()
                    .map(|c| (c.lsn, c.restorable_from_us()))
                    .collect(),
                ..ShardProgress::default()
            };
            for (folder, pieces) in &catalog.tails {
                progress
                    .tail_ends
                    .insert(*folder, crate::catalog::contiguous_end(pieces));
            }
            shards.push(progress);
        }
        status.update(|m| {
            m.lag_bytes = vec![0; config.shards];
            m.lag_seconds = vec![0.0; config.shards];
            m.segments_skipped = vec![0; config.shards];
        });
        Ok(Shipper {
            files,
            archive,
            config,
            shards,
            status,
            last_retention: None,
            audit_shipped: BTreeMap::new(),
            renewal: Some(renewal),
            hold,
            lease_epoch,
            archived,
        })
    }

    fn count_upload(&self, what: &'static str, payload_bytes: usize, stored_bytes: usize) {
        self.status.update(|m| {
            *m.uploads.entry(what).or_default() += 1;
            m.uploaded_bytes += payload_bytes as u64;
            m.stored_bytes += stored_bytes as u64;
        });
    }

    /// Puts `payload` under `key` (sealed here, so the bytes stored are known);
    /// returns them.
    fn put(&self, key: &str, payload: &[u8], condition: &Condition) -> Result<usize, ShipError> {
        let object = envelope::seal(payload);
        self.archive.put_sealed(key, &object, condition)?;
        Ok(object.len())
    }

    /// Puts `payload` under `key` unless the archive already has it; an existing,
    /// different object is a conflict (never overwritten). Returns the bytes stored
    /// (none when the archive had it).
    fn put_once(&self, key: &str, payload: &[u8]) -> Result<usize, ShipError> {
        match self.put(key, payload, &Condition::IfAbsent) {
            Err(ShipError::Archive(ArchiveError::PreconditionFailed { .. })) => {
                match self.archive.get(key)? {
                    Some((existing, _)) if existing == payload => Ok(0),
                    _ => Err(ShipError::Conflict { key: key.into() }),
                }
            }
            other => other,
        }
    }

    /// Durable bytes of `shard` the archive does not have yet, by the local files.
    fn lag_bytes(&self, shard: usize, view: &ShardView) -> u64 {
        let progress = &self.shards[shard];
        let mut lag = 0;
        for name in view.segments.iter().rev().skip(1) {
            if let Some((_, epoch, first)) = parse_segment_name(name) {
                if !progress.segments.contains(&(epoch.0, first)) {
                    lag += self.files.len(shard, name).unwrap_or(0);
                }
            }
        }
        if let Some(tail) = &view.tail {
            let epoch = parse_segment_name(&tail.segment).map_or(0, |(_, e, _)| e.0);
            let shipped = progress
                .tail_ends
                .get(&(epoch, tail.first_lsn))
                .copied()
                .unwrap_or(0)
                .max(DATA_START);
            lag += tail.end.saturating_sub(shipped);
        }
        lag
    }

    /// One round over every shard; returns each shard's new release barrier (`None`
    /// where the round failed, leaving that shard's barrier as it was). With `upload`
    /// false (the breaker is open) it only measures lag.
    pub fn round(
        &mut self,
        views: &[Option<ShardView>],
        upload: bool,
    ) -> Vec<Result<Lsn, ShipError>> {
        let now = Instant::now();
        let mut outcomes = Vec::with_capacity(views.len());
        for (shard, view) in views.iter().enumerate() {
            let Some(view) = view else {
                outcomes.push(Err(ShipError::Local {
                    file: format!("shard {shard}"),
                    why: "the shard did not answer".into(),
                }));
                continue;
            };
            let outcome = if upload {
                self.ship_shard(shard, view)
            } else {
                Err(ShipError::CircuitOpen)
            };
            let lag = self.lag_bytes(shard, view);
            let progress = &mut self.shards[shard];
            if lag == 0 || progress.caught_up.is_none() {
                progress.caught_up = Some(now);
            }
            let lag_s = if lag == 0 {
                0.0
            } else {
                progress
                    .caught_up
                    .map_or(0.0, |t| now.duration_since(t).as_secs_f64())
            };
            self.status.update(|m| {
                m.lag_bytes[shard] = lag;
                m.lag_seconds[shard] = lag_s;
            });
            if let Err(e) = &outcome {
                if upload {
                    tracing::warn!(shard, error = %e, kind = e.kind(), "archive shipping failed; retrying with backoff");
                    self.status
                        .update(|m| *m.failures.entry(e.kind()).or_default() += 1);
                }
            }
            outcomes.push(outcome);
        }
        if upload {
            if let Err(e) = self.ship_audit() {
                tracing::warn!(error = %e, kind = e.kind(), "shipping the audit log failed; retrying next round");
                self.status
                    .update(|m| *m.failures.entry(e.kind()).or_default() += 1);
            }
        }
        if upload && outcomes.iter().all(Result::is_ok) {
            self.status
                .update(|m| m.last_success_unix_s = now_us() as f64 / 1e6);
            if self.last_retention.is_none_or(|at| {
                now.duration_since(at) >= RETENTION_EVERY.min(self.config.retention / 2)
            }) {
                self.last_retention = Some(now);
                for shard in 0..self.shards.len() {
                    if let Err(e) = self.retain(shard, now_us()) {
                        tracing::warn!(shard, error = %e, "archive retention failed; retrying later");
                    }
                }
                if let Err(e) = self.retain_audit(now_us()) {
                    tracing::warn!(error = %e, "archive retention of the audit log failed; retrying later");
                }
            }
        }
        outcomes
    }

    fn ship_shard(&mut self, shard: usize, view: &ShardView) -> Result<Lsn, ShipError> {
        let sealed = view.segments.len().saturating_sub(1);
        for (i, name) in view.segments[..sealed].iter().enumerate() {
            let id = parse_segment_name(name).map(|(_, epoch, first)| (epoch.0, first));
            let known = id.and_then(|id| self.shards[shard].damaged.get(&id).cloned());
            let shipped = match known {
                Some(damaged) => Err(damaged),
                None => {
                    let mut shipped = self.ship_sealed(shard, name);
                    if matches!(shipped, Err(ShipError::Damaged { .. })) {
                        // Read once more from the disk, not the page cache, before it
                        // counts.
                        self.files.forget(shard, name);
                        shipped = self.ship_sealed(shard, name);
                        if let (Err(damaged @ ShipError::Damaged { .. }), Some(id)) = (&shipped, id)
                        {
                            self.shards[shard].damaged.insert(id, damaged.clone());
                        }
                    }
                    shipped
                }
            };
            match shipped {
                Err(damaged @ ShipError::Damaged { .. }) => {
                    // Segments are contiguous: the next one starts after its last LSN.
                    let next = parse_segment_name(&view.segments[i + 1]).map(|(_, _, f)| f);
                    self.skip_damaged(shard, name, next, damaged)?;
                }
                other => other?,
            }
        }
        // Released segments are gone from the view: nothing of theirs to drop again.
        let local: BTreeSet<(u64, Lsn)> = view.segments[..sealed]
            .iter()
            .filter_map(|name| parse_segment_name(name).map(|(_, epoch, first)| (epoch.0, first)))
            .collect();
        let progress = &mut self.shards[shard];
        progress.forgotten.retain(|segment| local.contains(segment));
        progress
            .damaged
            .retain(|segment, _| local.contains(segment));
        self.ship_checkpoints(shard)?;
        let Some(tail) = &view.tail else {
            return Ok(Lsn(1));
        };
        self.ship_tail(shard, tail)?;
        Ok(tail.first_lsn)
    }

    fn ship_sealed(&mut self, shard: usize, name: &str) -> Result<(), ShipError> {
        let local = |e: &dyn std::fmt::Display| ShipError::Local {
            file: self.files.describe(shard, name),
            why: e.to_string(),
        };
        let Some((_, epoch, first)) = parse_segment_name(name) else {
            return Err(local(&"not a segment name"));
        };
        if self.shards[shard].segments.contains(&(epoch.0, first)) {
            // Archived by an earlier process, whose reads may still be cached.
            if self.shards[shard].forgotten.insert((epoch.0, first)) {
                self.files.forget(shard, name);
            }
            return Ok(());
        }
        let damaged = |why: &dyn std::fmt::Display| ShipError::Damaged {
            file: self.files.describe(shard, name),
            why: why.to_string(),
        };
        let read = |offset: u64, len: usize| {
            self.files
                .read_at(shard, name, offset, len)
                .map_err(|e| local(&e))
        };
        let capacity = self.files.len(shard, name).map_err(|e| local(&e))?;
        if capacity < 2 * BLOCK_SIZE as u64 {
            return Err(damaged(&format!("a segment of only {capacity} bytes")));
        }
        let footer_block = read(capacity - BLOCK_SIZE as u64, BLOCK_SIZE)?;
        let footer = oc_io::wal::segment::SegmentFooter::decode(&footer_block)
            .map_err(|e| damaged(&format!("a sealed segment without a valid footer: {e:?}")))?;
        if footer.data_end > capacity - BLOCK_SIZE as u64 {
            return Err(damaged(&format!(
                "its footer says the data ends at {}, past the footer",
                footer.data_end
            )));
        }
        // The image (header block, data, footer block: FORMAT.md §9) read in place,
        // one buffer from the file to the archive: a segment is 64 MiB.
        let data_len = footer.data_end.saturating_sub(DATA_START) as usize;
        let mut image = vec![0; DATA_START as usize + data_len + BLOCK_SIZE];
        let (head, footer_room) = image.split_at_mut(DATA_START as usize + data_len);
        self.files
            .read_exact_at(shard, name, 0, head)
            .map_err(|e| local(&e))?;
        footer_room.copy_from_slice(&footer_block);
        let (_, footer) = oc_io::wal::image::check_sealed_image(&image).map_err(|e| damaged(&e))?;
        let key = SegmentKey {
            shard,
            epoch,
            first_lsn: first,
            last_lsn: footer.last_lsn,
            last_commit_us: footer.last_commit_ts.0,
        };
        let stored = self.put_once(&key.key(), &image)?;
        self.count_upload("segment", image.len(), stored);
        self.shards[shard].segments.insert((epoch.0, first));
        self.files.forget(shard, name);
        self.shards[shard].forgotten.insert((epoch.0, first));
        // The sealed image supersedes the tail pieces of the same segment.
        let folder = layout::tail_prefix(shard, epoch, first);
        for piece in self.archive.list(&folder)? {
            self.archive.delete(&piece)?;
        }
        self.shards[shard].tail_ends.remove(&(epoch.0, first));
        tracing::debug!(
            shard,
            segment = name,
            bytes = image.len(),
            "archived a sealed segment"
        );
        Ok(())
    }

    /// Leaves a damaged sealed segment (`damaged`, the error its checks gave twice) out
    /// of the archive for good once an archived checkpoint covers every LSN it holds
    /// (below `next`, where the following segment starts): neither the shard's state
    /// nor a restore after that checkpoint needs it (the local checkpoints ship first
    /// when none in the archive does). The archive then has a gap: restores to targets
    /// from the last commit archived before it until that checkpoint completed are
    /// refused, and `oc-pitr verify` reports it. Otherwise shipping stops at the
    /// segment, as before, and the log behind it is kept.
    fn skip_damaged(
        &mut self,
        shard: usize,
        name: &str,
        next: Option<Lsn>,
        damaged: ShipError,
    ) -> Result<(), ShipError> {
        let (Some((_, epoch, first)), Some(next)) = (parse_segment_name(name), next) else {
            return Err(damaged);
        };
        let last = Lsn(next.0.saturating_sub(1));
        let covering = |shipper: &Self| {
            shipper.shards[shard]
                .checkpoints
                .range(last..)
                .next()
                .map(|(lsn, _)| *lsn)
        };
        if covering(self).is_none() {
            self.ship_checkpoints(shard)?;
        }
        let Some(checkpoint) = covering(self) else {
            return Err(damaged);
        };
        tracing::error!(
            shard,
            segment = name,
            error = %damaged,
            first_lsn = first.0,
            last_lsn = last.0,
            checkpoint = checkpoint.0,
            "a damaged log segment the archive lacks is left out of it: an archived checkpoint \
             covers it; restores to times from the last commit archived before it until that \
             checkpoint completed are impossible"
        );
        self.shards[shard].segments.insert((epoch.0, first));
        self.files.forget(shard, name);
        self.shards[shard].forgotten.insert((epoch.0, first));
        self.status.update(|m| {
            if let Some(skipped) = m.segments_skipped.get_mut(shard) {
                *skipped += 1;
            }
        });
        Ok(())
    }

    /// The LSNs of the checkpoints in `shard`'s directory, oldest first.
    fn local_checkpoints(&self, shard: usize) -> Result<Vec<Lsn>, ShipError> {
        let names = self.files.names(shard).map_err(|e| ShipError::Local {
            file: self.files.describe(shard, ""),
            why: e.to_string(),
        })?;
        let mut lsns: Vec<Lsn> = names
            .iter()
            .filter_map(|name| oc_engine::checkpoint::parse_manifest_name(name))
            .collect();
        lsns.sort();
        Ok(lsns)
    }

    fn ship_checkpoints(&mut self, shard: usize) -> Result<(), ShipError> {
        for lsn in self.local_checkpoints(shard)? {
            if self.shards[shard].checkpoints.contains_key(&lsn) {
                continue;
            }
            let manifest_name = oc_engine::checkpoint::manifest_name(lsn);
            let snapshot_name = oc_engine::checkpoint::snapshot_name(lsn);
            let read = |name: &str| {
                self.files.read(shard, name).map_err(|e| ShipError::Local {
                    file: self.files.describe(shard, name),
                    why: e.to_string(),
                })
            };
            // A checkpoint superseded and removed meanwhile is simply skipped.
            let (Some(manifest), Some(snapshot)) = (read(&manifest_name)?, read(&snapshot_name)?)
            else {
                continue;
            };
            let unreadable = |name: &str, problem| UnreadableFile {
                file: self.files.describe(shard, name),
                problem,
            };
            let info = crate::catalog::CheckpointManifest::decode_for(&manifest, lsn)
                .map_err(|problem| unreadable(&manifest_name, problem))?;
            info.check_snapshot(&snapshot)
                .map_err(|problem| unreadable(&snapshot_name, problem))?;
            let stored = self.put_once(&layout::checkpoint_snapshot_key(shard, lsn), &snapshot)?
                + self.put_once(&layout::checkpoint_manifest_key(shard, lsn), &manifest)?;
            self.count_upload("checkpoint", snapshot.len() + manifest.len(), stored);
            self.shards[shard]
                .checkpoints
                .insert(lsn, info.restorable_from_us());
            tracing::info!(
                shard,
                lsn = lsn.0,
                bytes = snapshot.len(),
                "archived a checkpoint"
            );
        }
        Ok(())
    }

    fn ship_tail(&mut self, shard: usize, tail: &DurableTail) -> Result<(), ShipError> {
        let local = |e: &dyn std::fmt::Display| ShipError::Local {
            file: self.files.describe(shard, &tail.segment),
            why: e.to_string(),
        };
        let Some((_, epoch, first)) = parse_segment_name(&tail.segment) else {
            return Err(local(&"not a segment name"));
        };
        if tail.end <= DATA_START || self.shards[shard].segments.contains(&(epoch.0, first)) {
            return Ok(()); // no frames yet, or already archived sealed
        }
        let shipped = self.shards[shard]
            .tail_ends
            .get(&(epoch.0, first))
            .copied()
            .unwrap_or(0);
        if tail.end <= shipped {
            return Ok(());
        }
        let bytes = self
            .files
            .read_at(shard, &tail.segment, shipped, (tail.end - shipped) as usize)
            .map_err(|e| local(&e))?;
        let piece = TailPieceKey {
            shard,
            epoch,
            first_lsn: first,
            start: shipped,
            end: tail.end,
        };
        let stored = self.put(&piece.key(), &bytes, &Condition::Always)?;
        self.count_upload("tail", bytes.len(), stored);
        self.shards[shard]
            .tail_ends
            .insert((epoch.0, first), tail.end);
        Ok(())
    }

    /// Copies the audit log's files that grew since the last round, each whole up to
    /// its last complete line (`audit/<file name>`).
    fn ship_audit(&mut self) -> Result<(), ShipError> {
        let dir = self.config.data_dir.join(audit::AUDIT_DIR);
        let files = audit::list_files(&dir).map_err(|e| local(&dir, e))?;
        for file in files {
            let name = file.name();
            let path = dir.join(&name);
            let bytes = match fs::metadata(&path) {
                Ok(m) if self.audit_shipped.get(&name) == Some(&m.len()) => continue,
                Ok(_) => match fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(local(&path, e)),
                },
                // Removed by the audit log's retention since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(local(&path, e)),
            };
            let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let complete = audit::shippable_len(&name, complete as u64) as usize;
            if self.audit_shipped.get(&name) == Some(&(complete as u64)) {
                continue;
            }
            let stored = self.put(
                &layout::audit_key(&name),
                &bytes[..complete],
                &Condition::Always,
            )?;
            self.count_upload("audit", complete, stored);
            self.audit_shipped.insert(name, complete as u64);
        }
        Ok(())
    }

    /// Deletes archived audit files whose every entry is older than the audit retention.
    fn retain_audit(&mut self, now_us: u64) -> Result<(), ShipError> {
        let cutoff = now_us.saturating_sub(self.config.audit_retention.as_micros() as u64);
        let mut files: Vec<(audit::AuditFile, String)> = self
            .archive
            .list(layout::AUDIT_PREFIX)?
            .into_iter()
            .filter_map(|key| {
                let file = audit::AuditFile::parse(key.strip_prefix(layout::AUDIT_PREFIX)?)?;
                Some((file, key))
            })
            .collect();
        files.sort();
        for pair in files.windows(2) {
            if pair[1].0.first_time_us < cutoff {
                self.archive.delete(&pair[0].1)?;
                self.audit_shipped.remove(&pair[0].0.name());
            }
        }
        Ok(())
    }

    /// Deletes what no restore point inside the retention window needs: checkpoints
    /// older than the newest one completed before the window starts, and segments and
    /// tail folders whose frames that checkpoint already covers. Without such a
    /// checkpoint, nothing goes.
    fn retain(&mut self, shard: usize, now_us: u64) -> Result<(), ShipError> {
        let cutoff = now_us.saturating_sub(self.config.retention.as_micros() as u64);
        let progress = &self.shards[shard];
        let Some((&keep, _)) = progress
            .checkpoints
            .iter()
            .rev()
            .find(|(_, &completed)| completed <= cutoff)
        else {
            return Ok(());
        };
        let old_checkpoints: Vec<Lsn> = progress
            .checkpoints
            .range(..keep)
            .map(|(l, _)| *l)
            .collect();
        // A tail folder's frames end before the next segment starts. Folders a sealed
        // image did not replace (a skipped damaged segment's, or one left by a crash
        // between the image's upload and the pieces' deletion) go when that start is
        // covered too.
        let starts: BTreeSet<Lsn> = (progress.segments.iter())
            .chain(progress.tail_ends.keys())
            .map(|&(_, first)| first)
            .collect();
        let old_tails: Vec<(u64, Lsn)> = (progress.tail_ends.keys())
            .filter(|&&(_, first)| {
                let mut later = starts.range((Bound::Excluded(first), Bound::Unbounded));
                later.next().is_some_and(|next| next.0 <= keep.0 + 1)
            })
            .copied()
            .collect();
        let mut deleted = 0;
        for (epoch, first) in old_tails {
            let folder = layout::tail_prefix(shard, Epoch(epoch), first);
            for piece in self.archive.list(&folder)? {
                self.archive.delete(&piece)?;
                deleted += 1;
            }
            self.shards[shard].tail_ends.remove(&(epoch, first));
        }
        for lsn in old_checkpoints {
            self.archive
                .delete(&layout::checkpoint_manifest_key(shard, lsn))?;
            self.archive
                .delete(&layout::checkpoint_snapshot_key(shard, lsn))?;
            self.shards[shard].checkpoints.remove(&lsn);
            deleted += 2;
        }
        for key in self.archive.list(&layout::segment_prefix(shard))? {
            if let Some(segment) = SegmentKey::parse(&key) {
                if segment.last_lsn <= keep {
                    self.archive.delete(&key)?;
                    self.shards[shard]
                        .segments
                        .remove(&(segment.epoch.0, segment.first_lsn));
                    deleted += 1;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(
                shard,
                deleted,
                keep_checkpoint = keep.0,
                "archive retention"
            );
            self.status.update(|m| m.deleted_by_retention += deleted);
        }
        Ok(())
    }
}

/// Refuses a shard whose local log holds other frames than the archive at the newest
/// LSNs the archive holds (its newest sealed segment and its newest tail): an old copy
/// of this data directory, started without the archive and then with it, has a log at
/// least as long as the archive's, so recovery's length checks pass, and the archive's
/// segments would go on with its frames. Only valid frames here count as a history: a
/// log that is only behind the archive, or damaged at its end, is left to recovery,
/// which refuses it with its own advice. Only the newest objects are compared (a
/// footer, the last tail piece's bytes): the history before them was compared when
/// they were shipped. A segment the log released is not compared.
fn check_same_history<F: ShardFiles>(
    files: &F,
    archive: &dyn Archive,
    catalog: &crate::catalog::ShardCatalog,
    key_prefix: &str,
) -> Result<(), ShipError> {
    let shard = catalog.shard;
    let names = match files.names(shard) {
        Ok(names) => names,
        // A new data directory: its shards make their directories after this.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(ShipError::Local {
                file: files.describe(shard, ""),
                why: e.to_string(),
            })
        }
    };
    let mut local: Vec<(Lsn, Epoch, String)> = names
        .into_iter()
        .filter_map(|name| parse_segment_name(&name).map(|(_, epoch, first)| (first, epoch, name)))
        .collect();
    local.sort();
    let diverged = |name: &str, key: String, why: String| ShipError::Diverged {
        file: files.describe(shard, name),
        key: format!("{key_prefix}{key}"),
        why,
    };
    let footer = |name: &str| {
        let capacity = files.len(shard, name).ok()?;
        let block = files
            .read_at(
                shard,
                name,
                capacity.checked_sub(BLOCK_SIZE as u64)?,
                BLOCK_SIZE,
            )
            .ok()?;
        oc_io::wal::segment::SegmentFooter::decode(&block).ok()
    };
    // The first `upto` bytes of a local segment (all of it: None) and its valid frames
    // there, as recovery reads them; None when it cannot be read or has no header.
    let scan = |name: &str, upto: Option<u64>| {
        let whole = files.len(shard, name).ok()?;
        let len = upto.map_or(whole, |upto| upto.min(whole));
        let bytes = files
            .read_at(shard, name, 0, usize::try_from(len).ok()?)
            .ok()?;
        let header = oc_io::wal::segment::SegmentHeader::decode(bytes.get(..BLOCK_SIZE)?).ok()?;
        let mut frames = Vec::new();
        let scanned = oc_io::wal::scan::scan_segment(&bytes, &header, |frame, _| {
            frames.push((frame.lsn, frame.commit_ts.0));
            Ok::<_, ()>(())
        })
        .ok()?;
        Some((bytes, frames, scanned))
    };
    // The sealed local segment holding `first` under another name than (`epoch`,
    // `first`): one that starts before it and whose footer says it reaches it. (Where
    // the newest local segment ends is not known before recovery reads it.)
    let covered_elsewhere = |first: Lsn| {
        let at = local.partition_point(|(f, _, _)| *f <= first);
        let (f, _, name) = &local[at.checked_sub(1)?];
        (*f < first && at < local.len() && footer(name)?.last_lsn >= first).then_some(name.as_str())
    };
    let same_segment = |epoch: Epoch, first: Lsn| {
        local
            .iter()
            .find(|(f, e, _)| (*f, *e) == (first, epoch))
            .map(|(_, _, name)| name.as_str())
    };
    let elsewhere = |first: Lsn| {
        format!(
            "LSN {} begins a segment there and falls inside this one here",
            first.0
        )
    };
    let newest_sealed = catalog
        .segments
        .iter()
        .filter(|s| s.last_lsn >= s.first_lsn)
        .max_by_key(|s| (s.first_lsn, s.epoch));
    if let Some(sealed) = newest_sealed {
        let key = sealed.key();
        if let Some(name) = covered_elsewhere(sealed.first_lsn) {
            return Err(diverged(name, key, elsewhere(sealed.first_lsn)));
        }
        if let Some(name) = same_segment(sealed.epoch, sealed.first_lsn) {
            let there = (sealed.last_lsn, sealed.last_commit_us);
            let why = match footer(name) {
                Some(f) if (f.last_lsn, f.last_commit_ts.0) != there => Some(format!(
                    "sealed here at LSN {} committed at {} µs, there at LSN {} committed at \
                     {} µs",
                    f.last_lsn.0, f.last_commit_ts.0, there.0 .0, there.1
                )),
                Some(_) => None,
                // Not sealed here: its valid frames must end at the same last frame, or
                // before it (behind the archive, which recovery refuses).
                None => scan(name, None).and_then(|(_, frames, _)| {
                    // Read whole: what the log writes next must not meet these pages.
                    files.forget(shard, name);
                    let past = frames.iter().find(|(lsn, _)| *lsn > there.0);
                    let last = frames.iter().find(|(lsn, _)| *lsn == there.0);
                    match (past, last) {
                        (Some((lsn, _)), _) => Some(format!(
                            "sealed there after LSN {}, while this log goes on to LSN {} in it",
                            there.0 .0, lsn.0
                        )),
                        (None, Some((lsn, commit))) if *commit != there.1 => Some(format!(
                            "LSN {} committed at {commit} µs here, at {} µs there",
                            lsn.0, there.1
                        )),
                        _ => None,
                    }
                }),
            };
            if let Some(why) = why {
                return Err(diverged(name, key, why));
            }
        }
    }
    let newest_tail = (catalog.tails.iter())
        .filter_map(|(&(epoch, first), pieces)| Some(((first, Epoch(epoch)), pieces.last()?)))
        .filter(|(_, piece)| piece.end > DATA_START)
        .max_by_key(|(at, _)| *at);
    let Some(((first, epoch), piece)) = newest_tail else {
        return Ok(());
    };
    let key = piece.key();
    if let Some(name) = covered_elsewhere(first) {
        return Err(diverged(name, key, elsewhere(first)));
    }
    let Some(name) = same_segment(epoch, first) else {
        return Ok(());
    };
    // The bytes of this log's valid frames that the piece covers: one history writes
    // each block of a segment once, so they must be the archive's.
    let Some((here, _, scanned)) = scan(name, Some(piece.end)) else {
        return Ok(());
    };
    let valid_end = scanned.valid_end.min(piece.end);
    if valid_end <= piece.start {
        return Ok(());
    }
    let there = match archive.get(&key) {
        Ok(Some((bytes, _))) => bytes,
        Ok(None) => return Ok(()), // sealed and replaced meanwhile: nothing to compare
        // A damaged piece tells nothing about this log: shipping goes on, and
        // `oc-pitr verify` names the object. Any other error refuses the start (it is
        // tried again), not the check.
        Err(e @ ArchiveError::Corrupt { .. }) => {
            tracing::warn!(shard, key, error = %e, "could not compare the log with the archive's newest tail piece");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let compared = (valid_end - piece.start) as usize;
    if there.len() != (piece.end - piece.start) as usize || here.len() < valid_end as usize {
        tracing::warn!(
            shard,
            key,
            bytes = there.len(),
            "the archive's newest tail piece does not hold the bytes its name says: not compared"
        );
        return Ok(());
    }
    let here = &here[piece.start as usize..valid_end as usize];
    let differs = (here.iter().zip(there.iter().take(compared))).position(|(a, b)| a != b);
    if let Some(offset) = differs {
        return Err(diverged(
            name,
            key,
            format!(
                "their frames differ from offset {} on",
                piece.start + offset as u64
            ),
        ));
    }
    Ok(())
}

/// How far `catalog` holds its shard's log: recovery refuses a log that ends before it
/// (`WalConfig::archived`).
fn archived_log(catalog: &crate::catalog::ShardCatalog) -> ArchivedLog {
    let sealed_lsn = catalog.segments.iter().map(|s| s.last_lsn).max();
    let tail = (catalog.tails.iter())
        .map(|(&(epoch, first_lsn), pieces)| ArchivedTail {
            epoch: Epoch(epoch),
            first_lsn,
            end: crate::catalog::contiguous_end(pieces),
        })
        .filter(|t| t.end > DATA_START)
        .max_by_key(|t| (t.first_lsn, t.epoch));
    ArchivedLog {
        sealed_lsn: sealed_lsn.unwrap_or(Lsn(0)),
        tail,
    }
}

/// How often the first renewal of a promotion's claim is tried again after an archive
/// error (100 ms, then doubling: 1.5 s in all).
const FIRST_RENEWAL_RETRIES: u32 = 4;
/// How long a process that finds its promotion's claim taken lives on, to answer the
/// promotion request, before `on_displaced` ends it.
const DISPLACED_AT_START_GRACE: Duration = Duration::from_secs(1);

/// The control executor's half, made on the main thread and run where the router is.
pub type ShipperLoop = Box<dyn FnOnce(Rc<ShardRouter>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A round's work, sent to the shipping thread.
struct Job {
    views: Vec<Option<ShardView>>,
    upload: bool,
    reply: futures_channel::oneshot::Sender<Vec<Result<Lsn, ShipError>>>,
}

/// What a displaced process is told: one sentence naming who holds the record now.
pub type OnDisplaced = Box<dyn FnOnce(String) + Send>;

/// Whether a server has claimed or shipped to `archive`: it holds an owner record or
/// a manifest (a writer writes both before anything else). Read at start, before the
/// log is opened: a start that may cut the log must not ship into an archive that can
/// hold the frames it cuts.
pub fn shipped_to(archive: &dyn Archive) -> Result<bool, ArchiveError> {
    Ok(archive.get(lease::LEASE_KEY)?.is_some() || archive.get(layout::MANIFEST_KEY)?.is_some())
}

/// Starts the shipping thread and the owner record's renewal thread, and returns the
/// control executor's loop, to be spawned there. The archive is claimed and listed
/// before this returns, so a wrong archive (another layout, unreachable at start, held
/// by another copy of this data directory) is an error at start-up.
///
/// When a renewal finds that someone else wrote the record, nothing more is written to
/// the archive (the shipper's writes are fenced) and `on_displaced` is called with a
/// message naming the new holder: the server ends the process there.
pub fn start(
    archive: Arc<dyn Archive>,
    config: ShipperConfig,
    status: ShipStatus,
    on_displaced: OnDisplaced,
) -> Result<Started, ShipError> {
    let window = config.tail_window;
    let policy = config.breaker;
    let renew_every = config.lease_renew;
    let mut shipper = match Shipper::open(archive, config, status.clone()) {
        // The record this process took was taken from it: as displaced as a renewal
        // finding so later. The end comes a moment later, so that the caller (a
        // promotion request) can still answer why.
        Err(ShipError::Owner(LeaseError::Displaced { message })) => {
            let last_words = message.clone();
            std::thread::Builder::new()
                .name("oc-lease".into())
                .spawn(move || {
                    std::thread::sleep(DISPLACED_AT_START_GRACE);
                    on_displaced(last_words);
                })
                .map_err(|e| ShipError::Local {
                    file: "oc-lease thread".into(),
                    why: e.to_string(),
                })?;
            return Err(LeaseError::Displaced { message }.into());
        }
        opened => opened?,
    };
    let hold = shipper.hold.clone();
    let lease_epoch = shipper.lease_epoch;
    let archived = std::mem::take(&mut shipper.archived);
    let renewal = shipper.renewal.take().ok_or_else(|| ShipError::Local {
        file: "oc-lease thread".into(),
        why: "the owner record's renewal was already started".into(),
    })?;
    let renew_status = status.clone();
    std::thread::Builder::new()
        .name("oc-lease".into())
        .spawn(move || renew_until_displaced(renewal, renew_every, renew_status, on_displaced))
        .map_err(|e| ShipError::Local {
            file: "oc-lease thread".into(),
            why: e.to_string(),
        })?;
    let (jobs, inbox) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("oc-ship".into())
        .spawn(move || {
            // Below the shards: a round's reads, copies and checksums would otherwise
            // take a shard's core for milliseconds every window, which is the read
            // tail's p99 (BENCHMARKS.md, "Shipping at nice 19"). Nice, not SCHED_IDLE:
            // a shard busy all the time must not stop shipping.
            // SAFETY: setpriority on this thread's own id with a valid value.
            let lowered =
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
            if lowered != 0 {
                tracing::warn!(
                    error = %std::io::Error::last_os_error(),
                    "could not lower the shipping thread's priority: shipping shares the shards' cores as an equal"
                );
            }
            for job in inbox {
                let _ = job.reply.send(shipper.round(&job.views, job.upload));
            }
        })
        .map_err(|e| ShipError::Local {
            file: "oc-ship thread".into(),
            why: e.to_string(),
        })?;
    let run: ShipperLoop = Box::new(move |router: Rc<ShardRouter>| {
        Box::pin(run_shipper(router, jobs, window, policy, status))
            as Pin<Box<dyn Future<Output = ()>>>
    });
    Ok(Started {
        run,
        hold,
        lease_epoch,
        archived,
    })
}

/// A started shipper: its loop (to spawn on the control executor), this process's
/// hold on the owner record (a replicating writer checks it before acknowledging), the
/// record's epoch, and how far the archive held each shard's log (for recovery).
pub struct Started {
    pub run: ShipperLoop,
    pub hold: Arc<LeaseHold>,
    pub lease_epoch: u64,
    pub archived: Vec<ArchivedLog>,
}

/// The renewal thread: renews the owner record every `every`; an archive error is
/// retried at the next interval (the shipper's writes pause once the hold lapses); a
/// lost record ends here, with `on_displaced`.
fn renew_until_displaced(
    mut renewal: Renewal,
    every: Duration,
    status: ShipStatus,
    on_displaced: OnDisplaced,
) {
    loop {
        std::thread::sleep(every);
        match renewal.renew(now_us()) {
            Renewed::Yes => {}
            Renewed::Failed(e) => {
                let e = ShipError::Archive(e);
                tracing::warn!(error = %e, kind = e.kind(), "renewing the archive's owner record failed; retrying at the next interval");
                status.update(|m| *m.failures.entry(e.kind()).or_default() += 1);
            }
            Renewed::Displaced(found) => {
                let message =
                    displaced_message(&renewal.lease().holder, &renewal.lease().owner_id, found);
                on_displaced(message);
                return;
            }
        }
    }
}

/// What a displaced holder says: who holds the record now, as read again.
pub fn displaced_message(
    mine: &Holder,
    owner_id: &str,
    found: Result<Option<Lease>, LeaseError>,
) -> String {
    let key = lease::LEASE_KEY;
    let stopped = "This server no longer holds the archive and writes nothing more to it: two \
                   writers would mix two histories there.";
    match found {
        Ok(Some(lease)) if lease.owner_id == owner_id => format!(
            "another copy of this data directory took the archive's owner record ({key}): it is \
             now held by {} (renewed at {}), and this server is {mine}. {stopped} Keep one \
             copy: stop the other, or give this one a new id and its own --archive",
            lease.holder,
            crate::timestamp::format_rfc3339(lease.renewed_at_us)
        ),
        Ok(Some(lease)) => format!(
            "the archive's owner record ({key}) was rewritten: it now names another data \
             directory ({}, held by {}, lease epoch {}), and this server is {mine}, data \
             directory id {owner_id}. {stopped} After a failover or a switchover that is the \
             promoted writer: keep this server stopped, then re-add it as its follower \
             (RUNBOOK.md \"Re-adding the old writer as a follower\"), never with an --archive \
             of its own",
            lease.owner_id, lease.holder, lease.epoch
        ),
        Ok(None) => format!(
            "the archive's owner record ({key}) was removed since this server's last renewal; \
             this server is {mine}. {stopped} Find out why before a restart, which would claim \
             the archive again (an unmounted file system leaves an empty mount point: mount it \
             again first; RUNBOOK.md \"The process exited with status 5\")"
        ),
        Err(e) => format!(
            "the archive's owner record ({key}) was rewritten since this server's last renewal \
             and reading it again failed ({e}); this server is {mine}. {stopped} Read the \
             record ({key} at the archive's root) before a restart: RUNBOOK.md \"The process \
             exited with status 5\""
        ),
    }
}

/// A shipping loop's last round, asked for at shutdown: the answer says whether every
/// shard's log was then archived to its end.
type LastRoundAsk = futures_channel::oneshot::Sender<futures_channel::oneshot::Sender<bool>>;

thread_local! {
    /// The shipping loops running on this executor (the control executor), for their
    /// last round at shutdown.
    static LAST_ROUNDS: std::cell::RefCell<Vec<LastRoundAsk>> = std::cell::RefCell::default();
}

/// At shutdown, once no request is in flight: has every shipping loop on this executor
/// ship one last round now (the circuit breaker notwithstanding), so that a clean stop
/// leaves the archive holding every acknowledged write, not all but the last tail
/// window's. Returns whether each loop archived every shard's log to its end; `None`
/// when no loop runs here. The caller bounds the wait.
pub async fn last_round() -> Option<bool> {
    let asks = LAST_ROUNDS.with(|l| std::mem::take(&mut *l.borrow_mut()));
    if asks.is_empty() {
        return None;
    }
    let mut all = true;
    for ask in asks {
        let (reply, answer) = futures_channel::oneshot::channel();
        all &= ask.send(reply).is_ok() && answer.await.unwrap_or(false);
    }
    Some(all)
}

async fn run_shipper(
    router: Rc<ShardRouter>,
    jobs: mpsc::Sender<Job>,
    window: Duration,
    policy: BreakerPolicy,
    status: ShipStatus,
) {
    let (ask, asked) = futures_channel::oneshot::channel();
    LAST_ROUNDS.with(|l| l.borrow_mut().push(ask));
    let mut asked = Some(asked);
    let mut breaker = Breaker::new(policy);
    loop {
        let tick = async {
            glommio::timer::sleep(window).await;
            None
        };
        let last = match asked.as_mut() {
            Some(ask) => futures_lite::future::or(tick, async { Some(ask.await) }).await,
            None => tick.await,
        };
        let last = match last {
            Some(Ok(reply)) => Some(reply),
            Some(Err(_)) => {
                asked = None; // nobody will ask: ticks only
                None
            }
            None => None,
        };
        let upload = last.is_some() || breaker.allows(Instant::now());
        let Some(all_ok) = ship_round(&router, &jobs, upload).await else {
            return; // the shipping thread is gone
        };
        if let Some(reply) = last {
            let _ = reply.send(all_ok == Some(true));
            return;
        }
        let Some(all_ok) = all_ok else {
            continue; // the breaker is open: nothing was uploaded
        };
        if all_ok {
            breaker.succeeded();
        } else {
            let was_open = breaker.is_open();
            breaker.failed(Instant::now());
            if breaker.is_open() && !was_open {
                tracing::error!("archive circuit opened: uploads paused; writes continue and shipping lag grows");
            }
        }
        status.update(|m| {
            m.circuit_open = breaker.is_open();
            m.circuit_opened_total = breaker.opened_total();
        });
    }
}

/// One round: each shard's view, the shipping thread's work, and each shard's release
/// barrier moved up to what is archived. `None` when the shipping thread is gone;
/// `Some(None)` when nothing was to be uploaded; else whether every shard shipped.
async fn ship_round(
    router: &Rc<ShardRouter>,
    jobs: &mpsc::Sender<Job>,
    upload: bool,
) -> Option<Option<bool>> {
    let mut views = Vec::with_capacity(router.shards());
    for shard in 0..router.shards() {
        let view = router
            .call(
                shard,
                |node: Rc<ShardNode>| async move { ShardView::of(&node) },
            )
            .await;
        views.push(view.ok());
    }
    let (reply, answer) = futures_channel::oneshot::channel();
    jobs.send(Job {
        views,
        upload,
        reply,
    })
    .ok()?;
    let outcomes = answer.await.ok()?;
    if !upload {
        return Some(None);
    }
    let mut all_ok = true;
    for (shard, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(barrier) => {
                let set = move |node: Rc<ShardNode>| async move {
                    node.shard().set_release_barrier(Some(barrier));
                };
                let _ = router.call(shard, set).await;
            }
            Err(_) => all_ok = false,
        }
    }
    Some(Some(all_ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oc_io::Epoch;

    #[test]
    fn a_format_1_archive_is_marked_format_2_before_anything_is_shipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = crate::archive::LocalDirArchive::open(dir.path().join("a")).expect("archive");
        let old = r#"{"created_us":1764000000000000,"format_version":1,"placement":"fnv1a64-mod","shards":2}"#;
        archive
            .put(layout::MANIFEST_KEY, old.as_bytes(), &Condition::IfAbsent)
            .expect("put");
        let refused = claim_archive(&archive, 3, None).expect_err("another shard count");
        assert!(refused.to_string().contains("2-shard layout"), "{refused}");
        let (unchanged, _) = archive
            .get(layout::MANIFEST_KEY)
            .expect("get")
            .expect("there");
        assert_eq!(unchanged, old.as_bytes(), "a refused claim changes nothing");

        claim_archive(&archive, 2, None).expect("claim");
        let upgraded = crate::catalog::read_archive_manifest(&archive).expect("manifest");
        assert_eq!(
            upgraded,
            crate::catalog::ArchiveManifest {
                format_version: 2,
                ..crate::catalog::ArchiveManifest::new(2, 1_764_000_000_000_000)
            }
        );
        let (before, version) = archive
            .get(layout::MANIFEST_KEY)
            .expect("get")
            .expect("there");
        claim_archive(&archive, 2, None).expect("claim again");
        let (after, same) = archive
            .get(layout::MANIFEST_KEY)
            .expect("get")
            .expect("there");
        assert_eq!(
            (before, version),
            (after, same),
            "a current manifest is not rewritten"
        );
    }

    /// One shard's shipper under `dir` (data in `data/`), keeping 24 hours.
    fn test_config(dir: &Path) -> ShipperConfig {
        ShipperConfig {
            data_dir: dir.join("data"),
            owner_id: "0123456789abcdef0123456789abcdef".into(),
            lineage: Some("0123456789abcdef0123456789abcdef".into()),
            holder: lease::this_process("test", dir),
            lease_renew: lease::LEASE_RENEW_INTERVAL,
            shards: 1,
            tail_window: DEFAULT_TAIL_WINDOW,
            retention: Duration::from_secs(24 * 3600),
            audit_retention: Duration::from_secs(400 * 24 * 3600),
            breaker: BreakerPolicy::default(),
            lease_ttl: None,
            held: None,
        }
    }

    fn manifest(lsn: u64, completed_us: u64) -> Vec<u8> {
        serde_json::json!({
            "format_version": 1, "shard": 0, "lsn": lsn, "epoch": 1,
            "created_us": completed_us - 1, "completed_us": completed_us,
            "snapshot": "x", "data_bytes": 0, "crc32c": 0, "rows": 0, "tenants": []
        })
        .to_string()
        .into_bytes()
    }

    /// Retention keeps the newest checkpoint completed before the window, everything
    /// newer, and the log after that checkpoint; older checkpoints, segments and tail
    /// folders go.
    #[test]
    fn retention_keeps_the_oldest_restore_point_inside_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive: Arc<dyn Archive> =
            Arc::new(crate::archive::LocalDirArchive::open(dir.path().join("a")).expect("archive"));
        let hour = 3_600_000_000u64;
        let now = 100 * hour;
        // Checkpoints at LSN 100 (50 h ago), 200 (30 h ago), 300 (1 h ago).
        for (lsn, age) in [(100, 50), (200, 30), (300, 1)] {
            let put = |key: String, bytes: &[u8]| {
                archive.put(&key, bytes, &Condition::Always).expect("put");
            };
            put(layout::checkpoint_snapshot_key(0, Lsn(lsn)), b"");
            put(
                layout::checkpoint_manifest_key(0, Lsn(lsn)),
                &manifest(lsn, now - age * hour),
            );
        }
        // Segments [1, 150], [151, 200], [201, 260], [261, 400].
        let segments =
            [(1, 150), (151, 200), (201, 260), (261, 400)].map(|(first, last)| SegmentKey {
                shard: 0,
                epoch: Epoch(1),
                first_lsn: Lsn(first),
                last_lsn: Lsn(last),
                last_commit_us: 0,
            });
        for s in &segments {
            archive
                .put(&s.key(), b"image", &Condition::Always)
                .expect("put");
        }
        // Tail pieces no sealed image replaced: the segments starting at 151 and 201
        // (left by a crash before their deletion, or damaged and skipped) and the active
        // one at 401.
        let piece = |first: u64, start: u64| TailPieceKey {
            shard: 0,
            epoch: Epoch(1),
            first_lsn: Lsn(first),
            start,
            end: start + BLOCK_SIZE as u64,
        };
        let pieces = [
            piece(151, 0),
            piece(151, 4096),
            piece(201, 0),
            piece(401, 0),
        ];
        for p in &pieces {
            archive
                .put(&p.key(), &[0; BLOCK_SIZE], &Condition::Always)
                .expect("put");
        }
        let config = test_config(dir.path());
        let mut shipper =
            Shipper::open(archive.clone(), config, ShipStatus::default()).expect("open");
        shipper.retain(0, now).expect("retain");
        // The window starts 24 h ago: checkpoint 200 (30 h) is the oldest restore point
        // needed; 100 goes, and so do segments wholly at or below LSN 200, and the tail
        // folder whose frames end before 201.
        let left = archive.list("shard-0/").expect("list");
        let expected: Vec<String> = {
            let mut keys = vec![
                layout::checkpoint_manifest_key(0, Lsn(200)),
                layout::checkpoint_snapshot_key(0, Lsn(200)),
                layout::checkpoint_manifest_key(0, Lsn(300)),
                layout::checkpoint_snapshot_key(0, Lsn(300)),
                segments[2].key(),
                segments[3].key(),
                pieces[2].key(),
                pieces[3].key(),
            ];
            keys.sort();
            keys
        };
        assert_eq!(left, expected);
        assert_eq!(shipper.status.snapshot().deleted_by_retention, 6);
        assert_eq!(
            shipper.shards[0].tail_ends.keys().collect::<Vec<_>>(),
            [&(1, Lsn(201)), &(1, Lsn(401))]
        );
        // A window longer than the archive's history deletes nothing.
        shipper.config.retention = Duration::from_secs(1000 * 3600);
        shipper.retain(0, now).expect("retain");
        assert_eq!(archive.list("shard-0/").expect("list").len(), 8);
    }

    fn page_size() -> usize {
        // SAFETY: sysconf has no preconditions.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    }

    /// Which pages of `file`'s first `len` bytes are in the page cache.
    fn resident_pages(file: &File, len: usize) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        // SAFETY: a shared read-only mapping of an open file (len > 0), unmapped below;
        // mincore writes one byte per page of the mapping into a vector of that many.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED, "mmap");
            let mut pages = vec![0u8; len.div_ceil(page_size())];
            let status = libc::mincore(map, len, pages.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(status, 0, "mincore");
            pages.iter().map(|&p| p & 1 == 1).collect()
        }
    }

    /// Segment bytes come back exact, an end past the file is an error, a read caches
    /// the pages it read and none after them, and `forget` drops what reads cached
    /// (where the file system caches pages apart from the file: not tmpfs, not a
    /// network file system without a cache).
    #[test]
    fn segment_reads_are_exact_read_nothing_ahead_and_are_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().to_path_buf();
        std::fs::create_dir_all(shard_dir(&data_dir, 0)).expect("shard dir");
        let name = "segment";
        let total = (4 << 20) + 100;
        let bytes: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let path = shard_dir(&data_dir, 0).join(name);
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        file.sync_all().expect("sync");
        advise(&file, libc::POSIX_FADV_DONTNEED);
        let dropped = !resident_pages(&file, total).contains(&true);
        let files = DataDirFiles { data_dir };
        // Tail pieces one after the other, as shipping rounds read them: with the pieces
        // before it cached, the kernel would take each for a sequential stream.
        let (page, at, piece) = (page_size(), 1 << 20, 256 << 10);
        for start in [at, at + piece, at + 2 * piece] {
            let read = files.read_at(0, name, start as u64, piece).expect("read");
            assert!(read == bytes[start..start + piece]);
        }
        let end = at + 3 * piece;
        let resident = resident_pages(&file, total);
        let cached = |from: usize, to: usize| resident[from / page..to / page].contains(&true);
        if dropped && cached(at, end) {
            assert!(!cached(end, total), "pages past the reads were cached");
            files.forget(0, name);
            assert!(
                !resident_pages(&file, total).contains(&true),
                "forgotten pages stayed"
            );
        } else {
            eprintln!("this file system does not cache pages apart from the file: not checked");
        }
        for (offset, len) in [
            (0, 1),
            (1000, 9000),
            (total - 100, 100),
            (1000, total - 1000),
            (total, 0),
        ] {
            let read = files.read_at(0, name, offset as u64, len).expect("read");
            assert!(
                read == bytes[offset..offset + len],
                "{len} bytes at {offset}"
            );
        }
        for (offset, len) in [(total - 50, 100), (total + 5000, 1)] {
            let past = files
                .read_at(0, name, offset as u64, len)
                .expect_err("past the end");
            assert_eq!(
                past.kind(),
                std::io::ErrorKind::UnexpectedEof,
                "{len} bytes at {offset}"
            );
        }
    }

    /// Files that answer nothing but remember which segments were forgotten.
    #[derive(Default)]
    struct Forgetful(std::cell::RefCell<Vec<String>>);

    impl ShardFiles for Forgetful {
        fn names(&self, _: usize) -> std::io::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn read_exact_at(&self, _: usize, _: &str, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Err(std::io::ErrorKind::NotFound.into())
        }
        fn read(&self, _: usize, _: &str) -> std::io::Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn len(&self, _: usize, _: &str) -> std::io::Result<u64> {
            Ok(0)
        }
        fn describe(&self, _: usize, name: &str) -> String {
            name.to_string()
        }
        fn forget(&self, _: usize, name: &str) {
            self.0.borrow_mut().push(name.to_string());
        }
    }

    /// An empty segment sealed when a new epoch began starts at the LSN the new
    /// epoch's first segment starts at: the new one's tail still ships, and a restore
    /// plan takes it as the live tail.
    #[test]
    fn a_new_epochs_segment_at_the_lsn_of_an_empty_sealed_one_still_ships() {
        use oc_io::wal::segment::{segment_name, SegmentFooter, SegmentHeader};
        use oc_io::{DmaStorage, RecordKind, TimestampMicros, Wal, WalConfig};
        let dir = tempfile::tempdir().expect("tempdir");
        let shard = shard_dir(&dir.path().join("data"), 0);
        std::fs::create_dir_all(&shard).expect("shard dir");
        let (capacity, max_group) = (64 * 1024, 16 * 1024);
        // The old epoch's segment, sealed empty (as a crash right after its rotation,
        // then a new epoch, leaves it).
        let mut empty = vec![0u8; capacity as usize];
        let header = SegmentHeader {
            shard: 0,
            max_group_bytes: max_group as u32,
            epoch: Epoch(1),
            first_lsn: Lsn(1),
            capacity_bytes: capacity,
            created: TimestampMicros(1),
        };
        empty[..BLOCK_SIZE].copy_from_slice(&header.encode());
        let footer = SegmentFooter {
            first_lsn: Lsn(1),
            last_lsn: Lsn(0),
            data_end: DATA_START,
            last_commit_ts: TimestampMicros(1),
            data_crc: 0,
            successor: false,
        };
        empty[capacity as usize - BLOCK_SIZE..].copy_from_slice(&footer.encode());
        std::fs::write(shard.join(segment_name(0, Epoch(1), Lsn(1))), empty).expect("write");
        // The new epoch's writer: its first segment starts at LSN 1 as well.
        let view = oc_io::executor::run_local(async {
            let storage = DmaStorage::open(&shard).await.expect("storage");
            let config = WalConfig {
                epoch: Epoch(2),
                segment_bytes: capacity,
                max_group_bytes: max_group,
                ..WalConfig::default()
            };
            let (wal, _) = Wal::open(storage, config, Lsn(1), |_| Ok(()))
                .await
                .expect("open");
            for _ in 0..3 {
                wal.append(RecordKind(1), b"t", b"a row")
                    .await
                    .expect("append");
            }
            let view = ShardView {
                segments: wal.segments(),
                tail: wal.durable_tail(),
            };
            wal.close().await.expect("close");
            view
        });
        assert_eq!(
            view.segments,
            vec![
                segment_name(0, Epoch(1), Lsn(1)),
                segment_name(0, Epoch(2), Lsn(1))
            ]
        );
        let archive: Arc<dyn Archive> =
            Arc::new(crate::archive::LocalDirArchive::open(dir.path().join("a")).expect("archive"));
        let mut shipper = Shipper::open(
            archive.clone(),
            test_config(dir.path()),
            ShipStatus::default(),
        )
        .expect("open");
        shipper.ship_shard(0, &view).expect("round");
        let catalog = crate::catalog::ShardCatalog::load(archive.as_ref(), 0).expect("catalog");
        assert_eq!(
            catalog.segments.len(),
            1,
            "the empty segment is archived sealed"
        );
        assert_eq!(
            catalog.live_tail().map(|(segment, _)| *segment),
            Some((2, Lsn(1))),
            "the new epoch's tail is archived and is the live one"
        );
    }

    /// A segment archived by an earlier process has its cached pages dropped once, not
    /// every round, and is no longer tracked once released.
    #[test]
    fn an_archived_segment_is_forgotten_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive: Arc<dyn Archive> =
            Arc::new(crate::archive::LocalDirArchive::open(dir.path().join("a")).expect("archive"));
        let config = test_config(dir.path());
        let mut shipper =
            Shipper::open_with(archive, config, ShipStatus::default(), Forgetful::default())
                .expect("open");
        let sealed = oc_io::wal::segment::segment_name(0, Epoch(1), Lsn(1));
        let active = oc_io::wal::segment::segment_name(0, Epoch(1), Lsn(100));
        shipper.shards[0].segments.insert((1, Lsn(1))); // archived before this process
        let view = |segments: Vec<String>| ShardView {
            segments,
            tail: None,
        };
        for _ in 0..3 {
            shipper
                .ship_shard(0, &view(vec![sealed.clone(), active.clone()]))
                .expect("round");
        }
        assert_eq!(*shipper.files.0.borrow(), vec![sealed.clone()]);
        shipper.ship_shard(0, &view(vec![active])).expect("round");
        assert!(
            shipper.shards[0].forgotten.is_empty(),
            "a released segment stays tracked"
        );
    }

    /// A promotion's claim is renewed from its version when shipping starts: a record
    /// written since (a clone of this directory, same id and holder, promoted once this
    /// one's lease lapsed) displaces this process instead of being claimed again.
    #[test]
    fn shipping_renews_a_promotions_claim_and_never_overwrites_a_later_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive: Arc<dyn Archive> =
            Arc::new(crate::archive::LocalDirArchive::open(dir.path().join("a")).expect("archive"));
        let config = test_config(dir.path());
        let promote = |at_us: u64, expect: &lease::Expect| {
            lease::promote(
                archive.as_ref(),
                &config.owner_id,
                config.holder.clone(),
                at_us,
                Duration::from_secs(10),
                expect,
                &[],
            )
            .expect("promote")
        };
        let start_us = now_us();
        let first = promote(start_us, &lease::Expect::Absent);
        let clone = promote(start_us + 1, &lease::Expect::Version(first.version.clone()));
        assert_eq!((first.lease.epoch, clone.lease.epoch), (2, 3));

        let late = ShipperConfig {
            held: Some(HeldClaim {
                claim: first.clone(),
                sent: Instant::now(),
            }),
            ..config.clone()
        };
        let refused = Shipper::open_with(
            archive.clone(),
            late,
            ShipStatus::default(),
            Forgetful::default(),
        )
        .err()
        .expect("the first promotion's shipping must not start");
        assert!(
            matches!(refused, ShipError::Owner(LeaseError::Displaced { .. })),
            "{refused}"
        );
        let (now, _) = lease::read(archive.as_ref())
            .expect("read")
            .expect("a record");
        assert_eq!(
            now, clone.lease,
            "the later promotion's record is left as it was"
        );

        // Through `start`, as the server runs it: refused, then ended a moment later
        // as a displaced writer is.
        let (told, heard) = mpsc::channel();
        let late = ShipperConfig {
            held: Some(HeldClaim {
                claim: first,
                sent: Instant::now(),
            }),
            ..config.clone()
        };
        let on_displaced: OnDisplaced = Box::new(move |why| {
            let _ = told.send(why);
        });
        let refused = start(archive.clone(), late, ShipStatus::default(), on_displaced)
            .err()
            .expect("the first promotion's shipping must not start");
        assert!(
            matches!(refused, ShipError::Owner(LeaseError::Displaced { .. })),
            "{refused}"
        );
        let why = heard
            .recv_timeout(Duration::from_secs(10))
            .expect("the displaced process is ended");
        assert!(why.contains("another copy of this data directory"), "{why}");

        let current = ShipperConfig {
            held: Some(HeldClaim {
                claim: clone.clone(),
                sent: Instant::now(),
            }),
            ..config
        };
        let shipper = Shipper::open_with(
            archive.clone(),
            current,
            ShipStatus::default(),
            Forgetful::default(),
        )
        .expect("the current holder ships");
        assert_eq!(shipper.lease_epoch, 3);
        let (renewed, _) = lease::read(archive.as_ref())
            .expect("read")
            .expect("a record");
        assert_eq!(
            (renewed.epoch, renewed.claimed_at_us),
            (3, clone.lease.claimed_at_us),
            "renewed, not claimed anew"
        );
        assert!(renewed.renewed_at_us > clone.lease.renewed_at_us);
    }
}
