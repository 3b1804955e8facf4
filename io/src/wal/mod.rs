//! The write-ahead log of one shard: frames ([`frame`]), segment files ([`segment`]),
//! group commit ([`group_commit`]) and recovery ([`recovery`], [`scan`]).
//!
//! Usage: [`Wal::open`] recovers the log (replaying frames into the caller), then
//! [`Wal::append`] returns a frame's LSN once it is durable, and [`Wal::read_after`]
//! reads durable frames back ([`reader`]).

pub mod frame;
pub mod group_commit;
pub mod history;
pub mod image;
pub mod inspect;
pub mod reader;
pub mod recovery;
pub mod scan;
pub mod segment;

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use glommio::Task;

pub use frame::{
    Epoch, Frame, Lsn, RecordKind, TimestampMicros, MAX_FRAME_BYTES, MAX_TENANT_BYTES,
};
pub use group_commit::WalStats;
pub use history::{History, Position};
pub use reader::{LogRead, OwnedFrame};
pub use recovery::{HistoryCut, RecoveryReport, TailCut};

use crate::buffer::{IoBuffer, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::storage::Storage;
use group_commit::{Group, Shared, Spare, StampedCursor, Stamping, State, Writer};
use segment::{DEFAULT_SEGMENT_BYTES, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES};

/// Default upper bound of one group commit's bytes.
pub const DEFAULT_MAX_GROUP_BYTES: usize = 1 << 20;

/// How a log is laid out and flushed.
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// The shard that owns the log (in segment names and headers).
    pub shard: u32,
    /// The replication epoch stamped on new frames.
    pub epoch: Epoch,
    /// Size of a segment file, header and footer blocks included.
    pub segment_bytes: u64,
    /// Largest group commit; appenders wait when the filling group is full.
    pub max_group_bytes: usize,
    /// How long the writer lets a group fill before writing it (0: as soon as the
    /// previous write finished).
    pub max_group_delay: Duration,
    /// Cut the log at the first corrupt frame instead of refusing to open (loses the
    /// frames after it; an operator's explicit decision).
    pub truncate_corrupt: bool,
    /// A follower's writer's history: the log is cut at its first frame off it (a
    /// returning ex-writer's divergent tail), the cut frames set aside as
    /// `diverged-at-<lsn>-<segment>` files (FORMAT.md §4).
    pub history: Option<History>,
    /// When the groups written since the last spare averaged at least this many bytes,
    /// the next spare is preallocated instead of zero-filled
    /// ([`group_commit::DEFAULT_PREALLOCATED_SPARE_MIN_GROUP_BYTES`] says why; tests
    /// set 0 to preallocate every spare but the first).
    pub preallocated_spare_min_group_bytes: u64,
    /// How far the archive holds this log (a shipping writer's): recovery refuses a
    /// log that ends before it rather than cut or reuse frames that were durable.
    pub archived: Option<ArchivedLog>,
}

/// How far the archive holds one shard's log, from its listing at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchivedLog {
    /// The last LSN of the newest archived sealed segment (0: none).
    pub sealed_lsn: Lsn,
    /// The newest archived tail with frames: its segment's epoch and first LSN, and
    /// where its pieces end (contiguous from offset 0), past `DATA_START`.
    pub tail: Option<ArchivedTail>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchivedTail {
    pub epoch: Epoch,
    pub first_lsn: Lsn,
    pub end: u64,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            shard: 0,
            epoch: Epoch(1),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
            max_group_delay: Duration::ZERO,
            truncate_corrupt: false,
            history: None,
            preallocated_spare_min_group_bytes:
                group_commit::DEFAULT_PREALLOCATED_SPARE_MIN_GROUP_BYTES,
            archived: None,
        }
    }
}

impl WalConfig {
    pub fn validate(&self) -> Result<()> {
        let block = BLOCK_SIZE as u64;
        if self.segment_bytes < MIN_SEGMENT_BYTES
            || self.segment_bytes > MAX_SEGMENT_BYTES
            || !self.segment_bytes.is_multiple_of(block)
        {
            return Err(Error::Config(format!(
                "segment size {} must be a multiple of {block} from {MIN_SEGMENT_BYTES} to {MAX_SEGMENT_BYTES}",
                self.segment_bytes
            )));
        }
        let usable = self.segment_bytes - 2 * block;
        if self.max_group_bytes < BLOCK_SIZE
            || !self.max_group_bytes.is_multiple_of(BLOCK_SIZE)
            || self.max_group_bytes as u64 > usable
        {
            return Err(Error::Config(format!(
                "max group bytes {} must be a multiple of {block} between {block} and {usable}",
                self.max_group_bytes
            )));
        }
        if self.shard > 0xffff {
            return Err(Error::Config(format!("shard {} above 65535", self.shard)));
        }
        // Checked here, before recovery reads (and may cut) anything: the cut frames'
        // LSNs and object names would be written again with other frames.
        let holds_frames = self
            .archived
            .is_some_and(|a| a.sealed_lsn > Lsn(0) || a.tail.is_some());
        if self.truncate_corrupt && holds_frames {
            return Err(Error::Config(
                "cutting a corrupt log is refused for a log the archive already holds frames of"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Largest frame this log accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_group_bytes.min(MAX_FRAME_BYTES)
    }
}

/// A record placed in the log, not yet known durable.
#[derive(Clone)]
pub struct Pending {
    completion: Rc<group_commit::Completion>,
    index: usize,
}

impl Pending {
    /// Waits until the record is durable and returns its LSN, or the error that kept
    /// it from the log.
    pub async fn durable(&self) -> Result<Lsn> {
        Ok(self.durable_at().await?.0)
    }

    /// Like [`Pending::durable`], with the commit time stamped on the frame (the same
    /// time recovery reads back). For a stamped frame ([`Wal::submit_stamped`]) it is
    /// the newest commit time of the write that made it durable; the frame has its own.
    pub async fn durable_at(&self) -> Result<(Lsn, TimestampMicros)> {
        self.completion.wait(self.index).await
    }
}

/// The durable end of a log (see [`Wal::durable_tail`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableTail {
    /// File name of the newest segment.
    pub segment: String,
    pub first_lsn: Lsn,
    /// Offset just past its last durable group (`DATA_START` when it has none).
    pub end: u64,
    /// The last durable LSN (it may lie in an older segment when `end` is `DATA_START`).
    pub lsn: Lsn,
}

/// A shard's write-ahead log. Dropping it cancels its tasks without flushing (a crash,
/// as far as the disk can tell); call [`Wal::close`] to stop cleanly.
pub struct Wal<S: Storage> {
    shared: Rc<Shared<S>>,
    _writer: Task<()>,
    /// Awaited by `close`: a task dropped mid-way through a blocking-pool call (a
    /// rename, a listing) makes glommio's pool thread panic when it cannot answer, so
    /// nothing of the log may still be running when its executor ends.
    preparer: RefCell<Option<Task<()>>>,
}

impl<S: Storage> Wal<S> {
    /// Recovers the log in `storage`, calls `on_frame` for every frame with LSN ≥
    /// `replay_from`, repairs a torn tail, and starts the writer.
    pub async fn open(
        storage: S,
        config: WalConfig,
        replay_from: Lsn,
        on_frame: impl FnMut(&Frame<'_>) -> std::result::Result<(), String>,
    ) -> Result<(Self, RecoveryReport)> {
        config.validate()?;
        let (report, resume) = recovery::recover(&storage, &config, replay_from, on_frame).await?;
        let durable_lsn = Lsn(resume.next_lsn.0 - 1);
        let durable_end = resume
            .active
            .as_ref()
            .map_or(segment::DATA_START, |a| a.write_offset);
        let shared = Rc::new(Shared {
            storage,
            epoch: std::cell::Cell::new(config.epoch),
            config,
            state: RefCell::new(State {
                filling: Group::default(),
                failed: None,
                closing: false,
                writer_done: false,
                writer_waker: None,
                preparer_waker: None,
                space_waiters: Vec::new(),
                close_waiters: Vec::new(),
                // A spare found at start may be a recycled one (both are renamed to
                // the same ready name): its bytes are not known to be zero.
                spare: resume.spare.map_or(Spare::Wanted, |file| Spare::Ready {
                    file,
                    zeroed: false,
                }),
                recycled: resume.recycled,
                writer_needs_spare: false,
                segments: resume.segments,
                reading: Vec::new(),
                releasing: Vec::new(),
                damaged: Vec::new(),
                durable_lsn,
                durable_end,
                stamping: Stamping::Undecided,
                own_writes_stopped: false,
                frames_taken: 0,
                frames_settled: 0,
                progress_at: std::time::Instant::now(),
                cursor: StampedCursor {
                    next_lsn: resume.next_lsn,
                    epoch: report.last_epoch,
                    commit_ts: resume.last_commit_ts,
                },
            }),
            stats: RefCell::new(WalStats::default()),
        });
        let writer = Writer {
            shared: shared.clone(),
            active: resume.active,
            next_lsn: resume.next_lsn,
            last_commit_ts: resume.last_commit_ts,
            last_epoch: report.last_epoch,
            group_due: std::cell::Cell::new(None),
        };
        let wal = Wal {
            _writer: glommio::spawn_local(writer.run()),
            preparer: RefCell::new(Some(glommio::spawn_local(group_commit::run_preparer(
                shared.clone(),
            )))),
            shared,
        };
        Ok((wal, report))
    }

    /// Appends one record and returns its LSN once it is durable.
    pub async fn append(&self, kind: RecordKind, tenant: &[u8], payload: &[u8]) -> Result<Lsn> {
        self.submit(kind, tenant, payload).await?.durable().await
    }

    /// Places one record in the log (waiting only for room in the filling group) and
    /// returns a handle that resolves to its LSN once durable. Records submitted one
    /// after another get increasing LSNs, which lets a caller keep its own queue in
    /// exactly the log's order: nothing else runs between the enqueue and the return.
    pub async fn submit(&self, kind: RecordKind, tenant: &[u8], payload: &[u8]) -> Result<Pending> {
        if tenant.len() > MAX_TENANT_BYTES {
            return Err(Error::TenantTooLong {
                bytes: tenant.len(),
                limit: MAX_TENANT_BYTES,
            });
        }
        let len = frame::frame_len(tenant.len(), payload.len());
        let limit = self.shared.config.max_frame_bytes();
        if len > limit {
            return Err(Error::RecordTooLarge { bytes: len, limit });
        }
        let enqueued = Instant::now();
        loop {
            if let Some((completion, index)) =
                self.try_enqueue(kind, tenant, payload, len, enqueued)?
            {
                self.shared.stats.borrow_mut().append_bytes += len as u64;
                return Ok(Pending { completion, index });
            }
            // The filling group is full: wait until the writer takes it, then retry.
            self.wait_for_space().await;
        }
    }

    /// Places one frame a writer already stamped (a follower's write path): it keeps
    /// the writer's LSN, epoch, commit time and contents, under the same durability
    /// contract as [`Wal::submit`]. Frames submitted one after another share group
    /// commits as [`Wal::submit`]'s do; a group is this log's own unit of writing, so
    /// a frame's `group_index` (and with it the CRC) is this log's, not the writer's.
    ///
    /// The frame must continue the log: its LSN follows the last one submitted, its
    /// epoch and commit time do not go back. Anything else is [`Error::FrameRefused`]
    /// and nothing is written; after any failed group the log continues from
    /// [`Wal::durable_lsn`]. A log takes stamped frames or stamps its own, whichever
    /// it is given first after opening, never both.
    pub async fn submit_stamped(&self, frame: &OwnedFrame) -> Result<Pending> {
        let f = frame.as_frame();
        if f.kind.0 == 0 {
            return Err(Error::FrameRefused(format!(
                "LSN {} has record kind 0",
                f.lsn
            )));
        }
        if f.tenant.len() > MAX_TENANT_BYTES {
            return Err(Error::TenantTooLong {
                bytes: f.tenant.len(),
                limit: MAX_TENANT_BYTES,
            });
        }
        let len = f.len();
        let limit = self.shared.config.max_frame_bytes();
        if len > limit {
            return Err(Error::RecordTooLarge { bytes: len, limit });
        }
        let enqueued = Instant::now();
        loop {
            if let Some(pending) = self.try_enqueue_stamped(&f, enqueued)? {
                self.shared.stats.borrow_mut().append_bytes += len as u64;
                return Ok(pending);
            }
            self.wait_for_space().await;
        }
    }

    fn try_enqueue_stamped(&self, f: &Frame<'_>, enqueued: Instant) -> Result<Option<Pending>> {
        let mut guard = self.shared.state.borrow_mut();
        let state = &mut *guard;
        state.admit(Stamping::Stamped)?;
        if f.epoch > self.shared.epoch.get() {
            // Recovery refuses a log holding an epoch above the configured one: the
            // follower must take the new epoch on first (and reopen with it).
            return Err(Error::FrameRefused(format!(
                "LSN {} is of epoch {}, above this log's epoch {}",
                f.lsn,
                f.epoch.0,
                self.shared.epoch.get().0
            )));
        }
        let cursor = state.cursor;
        if f.lsn != cursor.next_lsn || f.epoch < cursor.epoch {
            return Err(Error::FrameRefused(format!(
                "LSN {} of epoch {} does not continue the log at LSN {} of epoch {}",
                f.lsn, f.epoch.0, cursor.next_lsn, cursor.epoch.0
            )));
        }
        if f.commit_ts < cursor.commit_ts {
            return Err(Error::FrameRefused(format!(
                "commit time of LSN {} goes back",
                f.lsn
            )));
        }
        let max = self.shared.config.max_group_bytes;
        let group = &mut state.filling;
        let start = frame::frame_start_at(group.len);
        let end = start + f.len();
        if end > max {
            return Ok(None);
        }
        let buf = group
            .buf
            .get_or_insert_with(|| self.shared.storage.alloc_buffer(max + BLOCK_SIZE));
        let bytes = buf.as_bytes_mut();
        bytes[group.len..start].fill(0);
        // The writer's position goes in now; the group index and the CRC when the
        // group is written.
        frame::encode_unstamped(&mut bytes[start..end], f.kind, f.tenant, f.payload);
        frame::place(&mut bytes[start..end], f.lsn, f.commit_ts, f.epoch);
        group.len = end;
        group.starts.push(start as u32);
        group.enqueued.push(enqueued);
        group.stamped = true;
        if state.frames_taken == state.frames_settled {
            state.progress_at = std::time::Instant::now();
        }
        state.frames_taken += 1;
        state.stamping = Stamping::Stamped;
        state.cursor = StampedCursor {
            next_lsn: f.lsn.next(),
            epoch: f.epoch,
            commit_ts: f.commit_ts,
        };
        if let Some(w) = state.writer_waker.take() {
            w.wake();
        }
        Ok(Some(Pending {
            completion: group.completion.clone(),
            index: group.starts.len() - 1,
        }))
    }

    /// Waits until the writer takes the filling group (it had no room).
    async fn wait_for_space(&self) {
        let mut registered = false;
        poll_fn(|cx| {
            if registered {
                return Poll::Ready(());
            }
            registered = true;
            self.shared
                .state
                .borrow_mut()
                .space_waiters
                .push(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// Copies a frame into the filling group if it has room; returns the group's
    /// completion and the frame's index in it.
    fn try_enqueue(
        &self,
        kind: RecordKind,
        tenant: &[u8],
        payload: &[u8],
        len: usize,
        enqueued: Instant,
    ) -> Result<Option<(Rc<group_commit::Completion>, usize)>> {
        let mut guard = self.shared.state.borrow_mut();
        let state = &mut *guard;
        state.admit(Stamping::Own)?;
        state.stamping = Stamping::Own;
        let max = self.shared.config.max_group_bytes;
        let group = &mut state.filling;
        let start = frame::frame_start_at(group.len);
        if start + len > max {
            return Ok(None);
        }
        // One block more than a group: room for the zero block that ends a write into
        // a recycled segment.
        let buf = group
            .buf
            .get_or_insert_with(|| self.shared.storage.alloc_buffer(max + BLOCK_SIZE));
        let bytes = buf.as_bytes_mut();
        bytes[group.len..start].fill(0);
        frame::encode_unstamped(&mut bytes[start..], kind, tenant, payload);
        group.len = start + len;
        group.starts.push(start as u32);
        group.enqueued.push(enqueued);
        let index = group.starts.len() - 1;
        let completion = group.completion.clone();
        if state.frames_taken == state.frames_settled {
            state.progress_at = std::time::Instant::now();
        }
        state.frames_taken += 1;
        if let Some(w) = state.writer_waker.take() {
            w.wake();
        }
        Ok(Some((completion, index)))
    }

    /// The epoch this log stamps its own frames with.
    pub fn epoch(&self) -> Epoch {
        self.shared.epoch.get()
    }

    /// A follower's log becomes a writer's (promotion): from now on it stamps its own
    /// frames, continuing the LSNs, with `epoch`, in a new segment (each segment has one
    /// epoch). Refused while stamped frames are still on their way to the disk (wait
    /// until the last placed one is durable), and unless `epoch` is above every epoch
    /// the log holds.
    pub fn take_writes(&self, epoch: Epoch) -> Result<()> {
        let mut state = self.shared.state.borrow_mut();
        // A log that has taken no stamped frame yet may change its epoch too.
        state.admit(Stamping::Stamped)?;
        let placed = Lsn(state.cursor.next_lsn.0 - 1);
        if !state.filling.starts.is_empty() || state.durable_lsn != placed {
            return Err(Error::FrameRefused(format!(
                "stamped frames up to LSN {} are still being written (durable: {})",
                placed.0, state.durable_lsn.0
            )));
        }
        let current = self.shared.epoch.get().max(state.cursor.epoch);
        if epoch <= current {
            return Err(Error::FrameRefused(format!(
                "epoch {} is not above the log's epoch {}",
                epoch.0, current.0
            )));
        }
        state.stamping = Stamping::Own;
        self.shared.epoch.set(epoch);
        Ok(())
    }

    /// For a log that takes stamped frames (a follower's): the last frame placed and
    /// its epoch (`Lsn(0)` when the log holds none), which the next stamped frame must
    /// continue. With nothing in flight it is the last durable frame. (A log that
    /// stamps its own frames does not keep this current.)
    pub fn last_placed(&self) -> (Lsn, Epoch) {
        let cursor = self.shared.state.borrow().cursor;
        (Lsn(cursor.next_lsn.0 - 1), cursor.epoch)
    }

    /// Whether a [`Wal::submit`] would be taken now: the log stamps its own frames (a
    /// writer's), has not stopped them for a handover, and has not failed.
    pub fn takes_own_writes(&self) -> bool {
        self.shared.state.borrow().admit(Stamping::Own).is_ok()
    }

    /// From now on every [`Wal::submit`] is refused with [`Error::OwnWritesStopped`],
    /// including one waiting for room in a group; what was taken before is written as
    /// usual. A writer handing over to a follower (a switchover) calls it so that its
    /// log ends where the follower's new epoch will start.
    pub fn stop_own_writes(&self) {
        self.shared.state.borrow_mut().own_writes_stopped = true;
    }

    /// Whether every frame taken so far has been written (or its group failed): the
    /// log is at rest until the next submit.
    pub fn settled(&self) -> bool {
        let state = self.shared.state.borrow();
        state.frames_taken == state.frames_settled
    }

    /// How long frames have waited with none settling (a disk that stopped answering),
    /// or `None` when nothing is on its way.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        let state = self.shared.state.borrow();
        (state.frames_taken != state.frames_settled).then(|| state.progress_at.elapsed())
    }

    /// Undoes [`Wal::stop_own_writes`] (a handover that did not happen).
    pub fn resume_own_writes(&self) {
        self.shared.state.borrow_mut().own_writes_stopped = false;
    }

    /// The last LSN known durable.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.state.borrow().durable_lsn
    }

    /// Where the durable log ends: the newest segment, the end of its durable groups
    /// and the last durable LSN, read together. Every byte of that segment before `end`
    /// is final (groups never rewrite earlier blocks), so a reader on another thread may
    /// copy it, as the archive shipper does. `None` before the first segment exists.
    pub fn durable_tail(&self) -> Option<DurableTail> {
        let state = self.shared.state.borrow();
        state.segments.last().map(|newest| DurableTail {
            segment: newest.name.clone(),
            first_lsn: newest.first_lsn,
            end: state.durable_end,
            lsn: state.durable_lsn,
        })
    }

    /// The error that failed the log, if it has failed.
    pub fn failure(&self) -> Option<Error> {
        self.shared.state.borrow().failed.clone()
    }

    /// Fails the log for a cause found outside it (its directory was removed): as
    /// after a failed write, every frame not yet written is refused, and so is every
    /// later one. Groups already on their way still land.
    pub fn fail_with(&self, cause: Error) {
        if self.failure().is_none() {
            self.shared.fail(cause);
        }
    }

    /// Bytes written for frames so far (`WalStats::bytes_written`), without copying the
    /// histograms `stats` copies.
    pub fn bytes_written(&self) -> u64 {
        self.shared.stats.borrow().bytes_written
    }

    /// A copy of the log's counters and histograms.
    pub fn stats(&self) -> WalStats {
        self.shared.stats.borrow().clone()
    }

    /// Names of the segment files, oldest first.
    pub fn segments(&self) -> Vec<String> {
        let state = self.shared.state.borrow();
        state.segments.iter().map(|s| s.name.clone()).collect()
    }

    /// The configuration the log runs with.
    pub fn config(&self) -> &WalConfig {
        &self.shared.config
    }

    /// Releases segments whose frames all lie below `lsn` (the active segment stays):
    /// the newest becomes the next spare (recycled), the others are removed. Returns
    /// the released names.
    pub async fn release_before(&self, lsn: Lsn) -> Result<Vec<String>> {
        // Oldest first, up to the first one a reader holds (the next release takes
        // it); readers do not open what is listed here while it goes.
        let doomed: Vec<String> = {
            let mut state = self.shared.state.borrow_mut();
            let doomed: Vec<String> = state
                .segments
                .windows(2)
                .take_while(|pair| {
                    pair[1].first_lsn <= lsn && !state.reading.contains(&pair[0].name)
                })
                .map(|pair| pair[0].name.clone())
                .collect();
            state.releasing.extend(doomed.iter().cloned());
            doomed
        };
        let mut gone = 0;
        let released = self.remove_segments(&doomed, &mut gone).await;
        let mut state = self.shared.state.borrow_mut();
        state.releasing.retain(|name| !doomed.contains(name));
        // A segment whose file is gone leaves the list even when a later removal
        // failed: the log lists only segments it can read (a reader or the check after
        // an open would take a listed segment without its file for a damaged one).
        let gone = &doomed[..gone];
        state.segments.retain(|s| !gone.contains(&s.name));
        let recycle = released?;
        state.recycled |= recycle;
        Ok(doomed)
    }

    /// Removes released segments, oldest first (the newest of them becomes the recycled
    /// spare when none waits), counting in `gone` those whose file is gone; whether it
    /// was recycled.
    async fn remove_segments(&self, doomed: &[String], gone: &mut usize) -> Result<bool> {
        let Some((newest, older)) = doomed.split_last() else {
            return Ok(false);
        };
        let storage = &self.shared.storage;
        // A file found gone already (removed from outside the log) counts as removed:
        // kept listed, it would fail every release.
        let removed = |result: Result<()>| match result {
            Err(e) if e.is_not_found() => {
                tracing::warn!(error = %e, "a released log segment's file was already gone");
                Ok(false)
            }
            other => other.map(|()| true),
        };
        for name in older {
            removed(storage.remove(name).await)?;
            *gone += 1;
        }
        let mut recycle = !self.shared.state.borrow().recycled;
        if recycle {
            recycle = removed(storage.rename(newest, segment::RECYCLED_NAME).await)?;
        } else {
            removed(storage.remove(newest).await)?;
        }
        *gone += 1;
        // Renamed to the recycled spare's name: a failed sync below leaves it there
        // unclaimed, and the next release's rename replaces it.
        storage.sync_dir().await?;
        Ok(recycle)
    }

    /// Stops taking appends, writes what is pending, and waits for the writer to stop.
    pub async fn close(&self) -> Result<()> {
        {
            let mut state = self.shared.state.borrow_mut();
            state.closing = true;
            if let Some(w) = state.writer_waker.take() {
                w.wake();
            }
        }
        poll_fn(|cx| {
            let mut state = self.shared.state.borrow_mut();
            if state.writer_done {
                return Poll::Ready(());
            }
            state.close_waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let preparer = self.preparer.borrow_mut().take();
        if let Some(preparer) = preparer {
            preparer.await;
        }
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_a_corrupt_log_is_refused_only_when_the_archive_holds_frames_of_it() {
        let config = |archived| WalConfig {
            truncate_corrupt: true,
            archived,
            ..WalConfig::default()
        };
        assert!(config(None).validate().is_ok());
        assert!(config(Some(ArchivedLog::default())).validate().is_ok());
        let sealed = ArchivedLog {
            sealed_lsn: Lsn(7),
            tail: None,
        };
        let tail = ArchivedLog {
            sealed_lsn: Lsn(0),
            tail: Some(ArchivedTail {
                epoch: Epoch(1),
                first_lsn: Lsn(1),
                end: 8192,
            }),
        };
        for archived in [sealed, tail] {
            let refused = config(Some(archived)).validate().expect_err("refused");
            assert!(refused.to_string().contains("archive"), "{refused}");
            let kept = WalConfig {
                truncate_corrupt: false,
                ..config(Some(archived))
            };
            assert!(kept.validate().is_ok());
        }
    }
}
