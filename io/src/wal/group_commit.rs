//! Group commit: appenders copy unstamped frames into the *filling* group; one writer
//! task per log takes the whole group, stamps it (LSNs, commit time, CRCs), writes it
//! with one aligned O_DIRECT write that is durable when it completes (the segment is open
//! with `O_DSYNC`: the write and its `fdatasync` in one trip through the ring), then
//! wakes every appender of the group. While one group is being written the next one
//! fills, and a small one may be written before the first returns (at most
//! [`GROUPS_IN_FLIGHT`] writes on their way; FORMAT.md §3.3).
//!
//! What must stay true:
//! - a group is acknowledged only after its durable write, and every earlier group's,
//!   returned Ok;
//! - a group written while another is on its way is marked overlapped, lies in a
//!   segment made from a new spare (zero-filled or preallocated: it reads as zero past
//!   its groups), and its file's durable writes each report their own
//!   durability (`O_DSYNC`): recovery's tell between a tear and corruption rests on it;
//! - LSNs are assigned at write time, so a group that cannot be written leaves no gap;
//! - after a failed write (or `fdatasync`) the log accepts nothing more (the kernel may
//!   have dropped the dirty pages; retrying would acknowledge lost data);
//! - a disk-full (ENOSPC) or out-of-descriptors (EMFILE, ENFILE) error while preparing
//!   a new segment fails only the frames that needed it; the log keeps going and
//!   retries the segment on the next write. (A write into a preallocated segment
//!   converts its extents, which the file system does from blocks it keeps in reserve
//!   for that, ext4's reserved clusters and XFS's reserve pool, and a log's sequential
//!   writes only grow one written extent; a conversion that failed anyway would fail
//!   the log like any failed write.)
//!
//! A follower's log takes frames the writer already stamped ([`super::Wal::submit_stamped`])
//! and keeps their LSNs, epochs, commit times and contents; the writer checks that a
//! stamped batch continues the log before writing it, and each segment holds one
//! epoch. Its groups are its own: one write is one group, indexed from 0, as on the
//! writer. Keeping the writer's group indexes instead would put several group starts
//! in one write, and a crash that kept a later one's sectors but not an earlier one's
//! would look like corruption to recovery (the stamped-append simulator found this).
//!
//! One file, about 1,200 lines: the appenders' group, the writer task and the spare
//! preparer share one state and one set of invariants (above), which are easier to
//! check in one place.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::frame::{
    frame_start_at, mark_overlapped, peek_len, peek_position, stamp, Epoch, Lsn, TimestampMicros,
};
use super::recovery::{ActiveSegment, SegmentInfo};
// Why a second write: a closed loop of writers that each work between commits (a shard
// applies each group before its writers write again) otherwise leaves the disk idle
// while the CPU works and the CPU idle while the disk does. Recovery's tell between a
// tear and corruption rests on this bound (FORMAT.md §3.3).
use super::scan::GROUPS_IN_FLIGHT;
// Only small groups are written while another is on its way: a small durable write
// costs the disk's fixed time per write (about 110 µs here, and a second one in flight
// nearly doubles the writes a second), a large one its transfer, which a second write
// only shares. 64 writers of 100-row batches (700 KB groups) had a commit p99 of
// 37–42 ms with every group overlapped, 15–20 ms without.
use super::scan::OVERLAPPED_GROUP_MAX_BYTES;
use super::segment::{
    segment_name, SegmentFooter, SegmentHeader, DATA_START, RECYCLED_NAME, SEGMENT_FORMAT_VERSION,
    SPARE_PARTIAL_NAME, SPARE_READY_NAME,
};
use super::WalConfig;
use crate::buffer::{align_up, IoBuffer, BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::storage::{Storage, StorageFile};

/// Counters and histograms of one log, read by the metrics exporter.
#[derive(Debug, Clone)]
pub struct WalStats {
    pub appends: u64,
    pub append_bytes: u64,
    pub append_failures: u64,
    pub groups: u64,
    /// Groups written while the previous group's write was on its way.
    pub groups_overlapped: u64,
    /// Bytes written for frames, including the padding to block boundaries.
    pub bytes_written: u64,
    pub syncs: u64,
    pub segments_created: u64,
    pub segments_sealed: u64,
    /// Spares made by zero-filling a new file.
    pub spares_zero_filled: u64,
    /// Spares left preallocated, unwritten (the log's groups were large).
    pub spares_preallocated: u64,
    /// Spares made from a released segment.
    pub spares_recycled: u64,
    /// Rotations that found no spare ready and waited for one: each held the log's
    /// appends meanwhile (the fill fell behind the log).
    pub spare_waits: u64,
    /// Append → durable, per frame, in microseconds (`oc_wal_fsync_lag_ms`).
    pub fsync_lag_us: Histogram<u64>,
    /// The durable write of one group, in microseconds.
    pub group_write_us: Histogram<u64>,
    /// Frames per group.
    pub group_frames: Histogram<u64>,
}

impl Default for WalStats {
    #[expect(clippy::expect_used, reason = "static histogram bounds are valid")]
    fn default() -> Self {
        let hist =
            || Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid");
        WalStats {
            appends: 0,
            append_bytes: 0,
            append_failures: 0,
            groups: 0,
            groups_overlapped: 0,
            bytes_written: 0,
            syncs: 0,
            segments_created: 0,
            segments_sealed: 0,
            spares_zero_filled: 0,
            spares_preallocated: 0,
            spares_recycled: 0,
            spare_waits: 0,
            fsync_lag_us: hist(),
            group_write_us: hist(),
            group_frames: hist(),
        }
    }
}

/// The result of a group, shared by all its appenders.
struct Outcome {
    first_lsn: Lsn,
    /// The commit time stamped on every frame of the group (of a stamped group, the
    /// newest of its frames' own times).
    commit_ts: TimestampMicros,
    /// Frames `[0, durable)` are durable; the others failed with `error`.
    durable: usize,
    error: Option<Error>,
}

/// Where the appenders of one group wait.
#[derive(Default)]
pub(crate) struct Completion {
    outcome: RefCell<Option<Outcome>>,
    wakers: RefCell<Vec<Waker>>,
}

impl Completion {
    fn complete(&self, outcome: Outcome) {
        let previous = self.outcome.borrow_mut().replace(outcome);
        assert!(previous.is_none(), "a group completes once");
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Waits for the frame at `index` of this group to be durable.
    /// Waits for the frame at `index` of this group to be durable; returns its LSN and
    /// commit time.
    #[expect(
        clippy::expect_used,
        reason = "a partial group stores the error that split it"
    )]
    pub(crate) async fn wait(&self, index: usize) -> Result<(Lsn, TimestampMicros)> {
        poll_fn(|cx| match &*self.outcome.borrow() {
            Some(o) if index < o.durable => {
                Poll::Ready(Ok((Lsn(o.first_lsn.0 + index as u64), o.commit_ts)))
            }
            Some(o) => Poll::Ready(Err(o
                .error
                .clone()
                .expect("a partial group carries its error"))),
            None => {
                self.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Frames waiting to be written, contiguous in one aligned buffer.
pub(crate) struct Group<B> {
    pub buf: Option<B>,
    pub len: usize,
    /// Start offset of each frame in `buf`.
    pub starts: Vec<u32>,
    pub enqueued: Vec<Instant>,
    pub completion: Rc<Completion>,
    /// The frames are already stamped (a follower's groups).
    pub stamped: bool,
}

impl<B> Default for Group<B> {
    fn default() -> Self {
        Group {
            buf: None,
            len: 0,
            starts: Vec::new(),
            enqueued: Vec::new(),
            completion: Rc::default(),
            stamped: false,
        }
    }
}

/// The state of the zero-filled file that becomes the next segment.
pub(crate) enum Spare<F> {
    Wanted,
    Preparing,
    /// `zeroed`: every byte reads as zero (zero-filled or preallocated here), not a
    /// recycled segment's older frames.
    Ready {
        file: F,
        zeroed: bool,
    },
    /// The writer took the spare and is renaming it into a segment; the preparer waits,
    /// or its next spare (renamed to the same ready name) could replace the taken one.
    Claimed,
    Failed(Error),
}

/// Who stamps the log's frames. Fixed by the first submission after opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stamping {
    Undecided,
    /// The log stamps the frames it is given (a writer).
    Own,
    /// The log takes frames a writer stamped (a follower).
    Stamped,
}

/// Where the next stamped group must continue the log: checked when it is submitted
/// (the writer checks again before writing, the authority after a failed group).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StampedCursor {
    pub next_lsn: Lsn,
    pub epoch: Epoch,
    pub commit_ts: TimestampMicros,
}

/// State shared by appenders, the writer and the spare preparer (one executor).
pub(crate) struct State<S: Storage> {
    pub filling: Group<S::Buffer>,
    pub failed: Option<Error>,
    pub closing: bool,
    pub writer_done: bool,
    pub writer_waker: Option<Waker>,
    pub preparer_waker: Option<Waker>,
    pub space_waiters: Vec<Waker>,
    pub close_waiters: Vec<Waker>,
    pub spare: Spare<S::File>,
    /// The writer is blocked until the spare is ready: prepare it at full speed.
    pub writer_needs_spare: bool,
    /// A released segment waits under [`RECYCLED_NAME`] to become the next spare.
    pub recycled: bool,
    pub segments: Vec<SegmentInfo>,
    /// Segments a reader is opening or reading now (one entry per reader): a release
    /// keeps them. glommio's open panics (an `unwrap` of `statfs`) when the file is
    /// renamed or removed between its `openat` and the `statfs` after it.
    pub reading: Vec<String>,
    /// Segments a release is removing or renaming now: a reader does not open them.
    pub releasing: Vec<String>,
    /// Segments `Wal::check_unread_segments` found damaged (names; those released
    /// since are skipped when read).
    pub damaged: Vec<String>,
    pub durable_lsn: Lsn,
    /// End of the durable groups in the newest of `segments` (block-aligned).
    pub durable_end: u64,
    pub stamping: Stamping,
    pub cursor: StampedCursor,
    /// Own frames are refused ([`super::Wal::stop_own_writes`]).
    pub own_writes_stopped: bool,
    /// Frames taken into a group, and frames whose group was written (or failed):
    /// equal when nothing is on its way.
    pub frames_taken: u64,
    pub frames_settled: u64,
    /// When frames last settled, or were first taken after the log was at rest: how
    /// long the log has gone without progress while frames wait ([`super::Wal::stalled_for`]).
    pub progress_at: std::time::Instant,
}

impl<S: Storage> State<S> {
    /// Whether the log takes a frame now: it has not failed, is not closing, and is
    /// not of the other kind (a writer's log, or a follower's).
    pub fn admit(&self, frame: Stamping) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.closing {
            return Err(Error::WalClosed);
        }
        if self.own_writes_stopped && frame == Stamping::Own {
            return Err(Error::OwnWritesStopped);
        }
        match (self.stamping, frame) {
            (Stamping::Own, Stamping::Stamped) => Err(Error::FrameRefused(
                "this log stamps its own frames (it is a writer's)".into(),
            )),
            (Stamping::Stamped, Stamping::Own) => Err(Error::FrameRefused(
                "this log takes stamped frames (it is a follower's)".into(),
            )),
            _ => Ok(()),
        }
    }
}

pub(crate) struct Shared<S: Storage> {
    pub storage: S,
    pub config: WalConfig,
    /// The epoch this log stamps its own frames with: `config.epoch`, until a
    /// follower's log becomes a writer's ([`super::Wal::take_writes`]).
    pub epoch: std::cell::Cell<Epoch>,
    pub state: RefCell<State<S>>,
    pub stats: RefCell<WalStats>,
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

impl<S: Storage> Shared<S> {
    /// Marks the log failed and fails every frame not yet written.
    pub(super) fn fail(&self, cause: Error) -> Error {
        let failed = Error::WalFailed {
            cause: std::sync::Arc::new(cause),
        };
        tracing::error!(error = %failed, "write-ahead log failed");
        let mut state = self.state.borrow_mut();
        state.failed = Some(failed.clone());
        let filling = std::mem::take(&mut state.filling);
        // Answered here, so [`super::Wal::settled`] holds once the groups on their way land.
        state.frames_settled += filling.starts.len() as u64;
        for waker in state.space_waiters.drain(..) {
            waker.wake();
        }
        wake(&mut state.preparer_waker);
        drop(state);
        self.stats.borrow_mut().append_failures += filling.starts.len() as u64;
        filling.completion.complete(Outcome {
            first_lsn: Lsn::ZERO,
            commit_ts: TimestampMicros(0),
            durable: 0,
            error: Some(failed.clone()),
        });
        failed
    }
}

/// A run of frames to write: a whole group, or the part of one that goes to a new segment.
struct Batch<B> {
    buf: B,
    len: usize,
    starts: Vec<u32>,
    stamped: bool,
}

impl<B: IoBuffer> Batch<B> {
    /// Bytes of the first `k` frames.
    fn bytes_of(&self, k: usize) -> usize {
        if k == self.starts.len() {
            self.len
        } else {
            self.starts[k] as usize
        }
    }

    /// How many leading frames fit in `room` bytes once padded to a block. Only frames
    /// of a stamped batch's first epoch go in one segment.
    fn frames_fitting(&self, room: u64) -> usize {
        let same_epoch = if self.stamped {
            let epoch = self.position(0).epoch;
            (1..self.starts.len())
                .find(|&k| self.position(k).epoch != epoch)
                .unwrap_or(self.starts.len())
        } else {
            self.starts.len()
        };
        (0..=same_epoch)
            .rev()
            .find(|&k| align_up(self.bytes_of(k) as u64) <= room)
            .unwrap_or(0)
    }

    /// The position fields of stamped frame `k`.
    fn position(&self, k: usize) -> super::frame::Position {
        peek_position(&self.buf.as_bytes()[self.starts[k] as usize..])
    }

    /// The encoded length of the frame starting at `start`.
    #[expect(
        clippy::expect_used,
        reason = "the filling group holds only whole frames it encoded"
    )]
    fn frame_len_at(&self, start: u32) -> usize {
        peek_len(&self.buf.as_bytes()[start as usize..]).expect("the group holds whole frames")
            as usize
    }

    /// Moves frames `k..` into a new batch with its own buffer, laid out again from
    /// offset 0 (frame starts depend on the offset inside a block).
    fn split_off<S: Storage<Buffer = B>>(&mut self, k: usize, storage: &S) -> Batch<B> {
        let moved: Vec<(usize, usize)> = self.starts[k..]
            .iter()
            .map(|&s| (s as usize, self.frame_len_at(s)))
            .collect();
        let most = moved.iter().map(|(_, len)| len + 3).sum::<usize>();
        let mut buf = storage.alloc_buffer(align_up(most as u64) as usize + BLOCK_SIZE);
        let (mut len, mut starts) = (0, Vec::with_capacity(moved.len()));
        {
            let to = buf.as_bytes_mut();
            let from = self.buf.as_bytes();
            for (at, frame_len) in moved {
                let start = frame_start_at(len);
                to[len..start].fill(0);
                to[start..start + frame_len].copy_from_slice(&from[at..at + frame_len]);
                starts.push(start as u32);
                len = start + frame_len;
            }
        }
        self.len = self.bytes_of(k);
        self.starts.truncate(k);
        Batch {
            buf,
            len,
            starts,
            stamped: self.stamped,
        }
    }
}

/// The writer task's own state: the active segment and the next LSN.
pub(crate) struct Writer<S: Storage> {
    pub shared: Rc<Shared<S>>,
    pub active: Option<ActiveSegment<S::File>>,
    pub next_lsn: Lsn,
    pub last_commit_ts: TimestampMicros,
    /// Epoch of the last frame written (of the newest segment at open).
    pub last_epoch: Epoch,
    /// When the filling group is taken at the latest (`max_group_delay` after the
    /// writer first saw it), kept across looks so a write landing meanwhile does not
    /// restart the delay.
    pub group_due: std::cell::Cell<Option<Instant>>,
}

enum GroupError {
    /// The log is broken; nothing more may be written.
    Fatal(Error),
    /// Only this group's remaining frames fail (disk full for a new segment).
    Skipped(Error),
}

/// A group whose durable write is on its way.
struct InFlight {
    write: glommio::Task<Result<()>>,
    completion: Rc<Completion>,
    enqueued: Vec<Instant>,
    first_lsn: Lsn,
    frames: usize,
    commit_ts: TimestampMicros,
    started: Instant,
    /// Where the group starts in the active segment, and where it ends (padded).
    offset: u64,
    end: u64,
}

/// What the writer does next.
enum Next<B> {
    /// The next group, or None when the log closes or has failed.
    Group(Option<Group<B>>),
    /// The oldest write on its way returned.
    Landed(Result<()>),
}

/// How a group's write turned out.
struct Settled {
    completion: Rc<Completion>,
    enqueued: Vec<Instant>,
    first_lsn: Lsn,
    frames: usize,
    /// Frames `[0, durable)` are durable; the others failed with `error`.
    durable: usize,
    error: Option<Error>,
    commit_ts: TimestampMicros,
    started: Instant,
    /// The active segment's durable end, when it moved.
    durable_end: Option<u64>,
}

impl Settled {
    fn of(
        group: InFlight,
        durable: usize,
        error: Option<Error>,
        durable_end: Option<u64>,
    ) -> Settled {
        Settled {
            completion: group.completion,
            enqueued: group.enqueued,
            first_lsn: group.first_lsn,
            frames: group.frames,
            durable,
            error,
            commit_ts: group.commit_ts,
            started: group.started,
            durable_end,
        }
    }
}

impl<S: Storage> Writer<S> {
    /// Runs until the log closes or fails.
    #[expect(
        clippy::expect_used,
        reason = "a landed write is the oldest one on its way"
    )]
    pub(crate) async fn run(mut self) {
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        loop {
            let next = match in_flight.len() {
                0 => Next::Group(self.next_group().await),
                n if n >= GROUPS_IN_FLIGHT => Next::Landed((&mut in_flight[0].write).await),
                _ => {
                    let oldest = &mut in_flight[0].write;
                    futures_lite::future::or(
                        async { Next::Group(self.next_group().await) },
                        async { Next::Landed(oldest.await) },
                    )
                    .await
                }
            };
            let running = match next {
                Next::Landed(result) => {
                    let landed = in_flight.pop_front().expect("the oldest write landed");
                    self.land(landed, result)
                }
                // Closing or failed: what is on its way still lands and is settled.
                Next::Group(None) => {
                    self.drain(&mut in_flight).await;
                    false
                }
                Next::Group(Some(group)) if self.may_overlap(&group) => {
                    let overlapped = !in_flight.is_empty();
                    in_flight.push_back(self.issue(group, overlapped));
                    true
                }
                Next::Group(Some(group)) => {
                    // Rotation, a stamped group, or a segment with older bytes past its
                    // end: written alone, after everything before it.
                    if self.drain(&mut in_flight).await {
                        self.write_alone(group).await
                    } else {
                        self.settle_unwritten(group);
                        false
                    }
                }
            };
            if !running {
                // A failed write fails what is still on its way too.
                let failure = self.shared.state.borrow().failed.clone();
                for mut rest in in_flight.drain(..) {
                    // Landed or not, it is not acknowledged: an earlier write failed.
                    drop((&mut rest.write).await);
                    let error = failure.clone().unwrap_or(Error::WalClosed);
                    self.settle(Settled::of(rest, 0, Some(error), None));
                }
                break;
            }
        }
        let mut state = self.shared.state.borrow_mut();
        state.writer_done = true;
        for waker in state.close_waiters.drain(..) {
            waker.wake();
        }
        // The preparer stops too (`Wal::close` waits for it).
        wake(&mut state.preparer_waker);
    }

    /// Whether `group` may be written while another group is on its way: one small own
    /// group that fits whole in an active segment whose bytes past its end are zero (so
    /// no zero block after the earlier group is needed to end the log, and the two
    /// writes do not overlap), and whose durable writes each report their own
    /// durability.
    fn may_overlap(&self, group: &Group<S::Buffer>) -> bool {
        let epoch = self.shared.epoch.get();
        !group.stamped
            && align_up(group.len as u64) <= OVERLAPPED_GROUP_MAX_BYTES as u64
            && self.active.as_ref().is_some_and(|a| {
                a.zeroed
                    && a.file.durable_writes_independent()
                    && !a.sealed
                    && a.header.epoch == epoch
                    && a.write_offset + align_up(group.len as u64) <= a.header.footer_offset()
            })
    }

    /// Stamps `group` for the end of the active segment and starts its durable write.
    #[expect(
        clippy::expect_used,
        reason = "may_overlap checked that the group has frames and an active segment"
    )]
    fn issue(&mut self, group: Group<S::Buffer>, overlapped: bool) -> InFlight {
        let started = Instant::now();
        let commit_ts = TimestampMicros::now().max(self.last_commit_ts);
        let epoch = self.shared.epoch.get();
        let first_lsn = self.next_lsn;
        let frames = group.starts.len();
        let mut batch = Batch {
            buf: group.buf.expect("a non-empty group has a buffer"),
            len: group.len,
            starts: group.starts,
            stamped: false,
        };
        let active = self
            .active
            .as_ref()
            .expect("may_overlap saw the active segment");
        let (offset, file) = (active.write_offset, active.file.clone());
        let padded = self.seal(&mut batch, epoch, commit_ts, overlapped);
        self.advance(frames, padded, epoch, commit_ts);
        self.shared.stats.borrow_mut().groups_overlapped += u64::from(overlapped);
        let buf = batch.buf;
        InFlight {
            write: glommio::spawn_local(async move { file.write_durable_at(buf, offset).await }),
            completion: group.completion,
            enqueued: group.enqueued,
            first_lsn,
            frames,
            commit_ts,
            started,
            offset,
            end: offset + padded as u64,
        }
    }

    /// Settles the oldest write on its way; false when it failed the log.
    fn land(&mut self, landed: InFlight, result: Result<()>) -> bool {
        let (durable, error, durable_end, running) = match result {
            Ok(()) => {
                if let Some(segment) = self.shared.state.borrow_mut().segments.last_mut() {
                    segment.group_starts.push((landed.first_lsn, landed.offset));
                }
                (landed.frames, None, Some(landed.end), true)
            }
            Err(e) => (0, Some(self.shared.fail(e)), None, false),
        };
        self.settle(Settled::of(landed, durable, error, durable_end));
        running
    }

    /// Lands every write on its way, oldest first; false when one failed the log.
    async fn drain(&mut self, in_flight: &mut VecDeque<InFlight>) -> bool {
        while let Some(mut oldest) = in_flight.pop_front() {
            let result = (&mut oldest.write).await;
            if !self.land(oldest, result) {
                return false;
            }
        }
        true
    }

    /// Writes a group with nothing else on its way (rotating segments as needed) and
    /// settles it; false when it failed the log.
    async fn write_alone(&mut self, mut group: Group<S::Buffer>) -> bool {
        let completion = group.completion.clone();
        let stamped = group.stamped;
        let enqueued = std::mem::take(&mut group.enqueued);
        let frames = group.starts.len();
        let first_lsn = self.next_lsn;
        let started = Instant::now();
        // One commit time per group, so every reader of a frame sees the same one.
        let commit_ts = TimestampMicros::now().max(self.last_commit_ts);
        let (durable, error, fatal) = match self.write_group(group, commit_ts).await {
            Ok(()) => (frames, None, false),
            Err((done, GroupError::Skipped(e))) => (done, Some(e), false),
            Err((done, GroupError::Fatal(e))) => (done, Some(self.shared.fail(e)), true),
        };
        if stamped && durable < frames {
            // The next stamped group must continue what is durable, not what was
            // submitted.
            self.shared.state.borrow_mut().cursor = StampedCursor {
                next_lsn: self.next_lsn,
                epoch: self.last_epoch,
                commit_ts: self.last_commit_ts,
            };
        }
        self.settle(Settled {
            completion,
            enqueued,
            first_lsn,
            frames,
            durable,
            error,
            // A stamped group's frames keep the writer's times; the last one here.
            commit_ts: if stamped {
                self.last_commit_ts
            } else {
                commit_ts
            },
            started,
            durable_end: self.active.as_ref().map(|a| a.write_offset),
        });
        !fatal
    }

    /// Fails a group taken after the log failed: none of it was written.
    fn settle_unwritten(&mut self, group: Group<S::Buffer>) {
        let error = self.shared.state.borrow().failed.clone();
        self.settle(Settled {
            completion: group.completion,
            enqueued: group.enqueued,
            first_lsn: self.next_lsn,
            frames: group.starts.len(),
            durable: 0,
            error: Some(error.unwrap_or(Error::WalClosed)),
            commit_ts: self.last_commit_ts,
            started: Instant::now(),
            durable_end: None,
        });
    }

    /// Records a written (or failed) group and wakes its appenders.
    fn settle(&mut self, group: Settled) {
        let now = Instant::now();
        {
            let mut stats = self.shared.stats.borrow_mut();
            stats.groups += 1;
            stats.appends += group.durable as u64;
            stats.append_failures += (group.frames - group.durable) as u64;
            stats
                .group_write_us
                .saturating_record(now.duration_since(group.started).as_micros() as u64);
            stats.group_frames.saturating_record(group.frames as u64);
            for at in &group.enqueued[..group.durable] {
                stats
                    .fsync_lag_us
                    .saturating_record(now.duration_since(*at).as_micros() as u64);
            }
        }
        {
            let mut state = self.shared.state.borrow_mut();
            state.frames_settled += group.frames as u64;
            state.progress_at = now;
            if group.durable > 0 {
                state.durable_lsn = Lsn(group.first_lsn.0 + group.durable as u64 - 1);
            }
            if let Some(end) = group.durable_end {
                state.durable_end = end;
            }
        }
        group.completion.complete(Outcome {
            first_lsn: group.first_lsn,
            commit_ts: group.commit_ts,
            durable: group.durable,
            error: group.error,
        });
    }

    /// Waits for a non-empty filling group and takes it; None when the log closes.
    async fn next_group(&self) -> Option<Group<S::Buffer>> {
        let delay = self.shared.config.max_group_delay;
        loop {
            let ready = poll_fn(|cx| {
                let mut state = self.shared.state.borrow_mut();
                if state.failed.is_some() {
                    return Poll::Ready(None);
                }
                if state.filling.len > 0 {
                    return Poll::Ready(Some(state.filling.len));
                }
                if state.closing {
                    return Poll::Ready(None);
                }
                state.writer_waker = Some(cx.waker().clone());
                Poll::Pending
            })
            .await?;
            if !delay.is_zero() && ready < self.shared.config.max_group_bytes {
                let due = self
                    .group_due
                    .get()
                    .unwrap_or_else(|| Instant::now() + delay);
                self.group_due.set(Some(due));
                if let Some(left) = due.checked_duration_since(Instant::now()) {
                    if !left.is_zero() {
                        glommio::timer::sleep(left).await;
                        continue;
                    }
                }
            }
            self.group_due.set(None);
            let mut state = self.shared.state.borrow_mut();
            let group = std::mem::take(&mut state.filling);
            for waker in state.space_waiters.drain(..) {
                waker.wake();
            }
            return Some(group);
        }
    }

    /// Writes a group, rotating segments as needed. On error returns how many leading
    /// frames were made durable.
    #[expect(
        clippy::expect_used,
        reason = "a group with frames always has its buffer"
    )]
    async fn write_group(
        &mut self,
        group: Group<S::Buffer>,
        commit_ts: TimestampMicros,
    ) -> Result<(), (usize, GroupError)> {
        let buf = group.buf.expect("a non-empty group has a buffer");
        let mut batch = Batch {
            buf,
            len: group.len,
            starts: group.starts,
            stamped: group.stamped,
        };
        let mut done = 0;
        loop {
            // A segment of another epoch takes no more frames: each segment has one epoch.
            let epoch = if batch.stamped {
                let first = batch.position(0);
                if first.lsn != self.next_lsn || first.epoch < self.last_epoch {
                    let refused = Error::FrameRefused(format!(
                        "LSN {} of epoch {} does not continue the log at LSN {} of epoch {}",
                        first.lsn, first.epoch.0, self.next_lsn, self.last_epoch.0
                    ));
                    return Err((done, GroupError::Skipped(refused)));
                }
                first.epoch
            } else {
                self.shared.epoch.get()
            };
            // A segment whose header promises smaller groups than this log now writes
            // (a restart with a larger setting) takes no more: recovery bounds a
            // tear by the header's figure.
            let max_group = self.shared.config.max_group_bytes;
            let room = match &self.active {
                Some(a)
                    if !a.sealed
                        && a.header.epoch == epoch
                        && a.header.max_group_bytes as usize >= max_group =>
                {
                    a.header.footer_offset() - a.write_offset
                }
                _ => 0,
            };
            let fit = batch.frames_fitting(room);
            if fit == 0 {
                self.rotate(epoch).await.map_err(|e| (done, e))?;
                continue;
            }
            let rest =
                (fit < batch.starts.len()).then(|| batch.split_off(fit, &self.shared.storage));
            self.write_batch(batch, commit_ts)
                .await
                .map_err(|e| (done, GroupError::Fatal(e)))?;
            done += fit;
            match rest {
                Some(r) => batch = r,
                None => return Ok(()),
            }
        }
    }

    /// Stamps, pads, writes and syncs one batch into the active segment.
    #[expect(
        clippy::expect_used,
        reason = "rotation runs before a batch, so an active segment exists"
    )]
    async fn write_batch(
        &mut self,
        mut batch: Batch<S::Buffer>,
        commit_ts: TimestampMicros,
    ) -> Result<()> {
        let (epoch, commit_ts) = if batch.stamped {
            let last = batch.position(batch.starts.len() - 1);
            (last.epoch, last.commit_ts)
        } else {
            (self.shared.epoch.get(), commit_ts)
        };
        let padded = self.seal(&mut batch, epoch, commit_ts, false);
        let active = self
            .active
            .as_ref()
            .expect("a batch is written into an active segment");
        let offset = active.write_offset;
        active.file.write_durable_at(batch.buf, offset).await?;
        if let Some(segment) = self.shared.state.borrow_mut().segments.last_mut() {
            segment.group_starts.push((self.next_lsn, offset));
        }
        let frames = batch.starts.len();
        self.advance(frames, padded, epoch, commit_ts);
        Ok(())
    }

    /// Stamps a batch's frames for the end of the active segment (LSNs from
    /// `next_lsn`; the first marked [`FLAG_OVERLAPPED`](super::frame::FLAG_OVERLAPPED) when
    /// `overlapped`), pads it to
    /// a block, and adds the zero block that ends the log when older bytes may lie
    /// past it. Returns the padded length of the frames, and leaves the bytes to write
    /// in `batch.buf`; the segment's CRC is taken over them.
    #[expect(
        clippy::expect_used,
        reason = "rotation runs before a batch, so an active segment exists, and the batch holds whole frames"
    )]
    fn seal(
        &mut self,
        batch: &mut Batch<S::Buffer>,
        epoch: Epoch,
        commit_ts: TimestampMicros,
        overlapped: bool,
    ) -> usize {
        let active = self
            .active
            .as_mut()
            .expect("a batch is written into an active segment");
        let padded = align_up(batch.len as u64) as usize;
        // One zero block after the group (when the segment has room for it) marks the
        // end of the log, whatever older bytes a recycled file holds beyond it. A
        // zero-filled segment is zero there already.
        let end_marker = if !active.zeroed
            && active.write_offset + (padded + BLOCK_SIZE) as u64 <= active.header.footer_offset()
        {
            BLOCK_SIZE
        } else {
            0
        };
        let bytes = batch.buf.as_bytes_mut();
        for (index, &start) in batch.starts.iter().enumerate() {
            let end = start as usize
                + peek_len(&bytes[start as usize..]).expect("the group holds whole frames")
                    as usize;
            let lsn = Lsn(self.next_lsn.0 + index as u64);
            let frame = &mut bytes[start as usize..end];
            if index == 0 && overlapped {
                mark_overlapped(frame);
            }
            if batch.stamped {
                // The writer's position stays; the group index becomes this log's.
                let at = peek_position(frame);
                debug_assert_eq!(at.lsn, lsn, "a stamped batch continues the log");
                stamp(frame, lsn, at.commit_ts, at.epoch, index as u32);
            } else {
                stamp(frame, lsn, commit_ts, epoch, index as u32);
            }
            // Checked again here as recovery will check it (debug builds).
            debug_assert!(
                super::frame::decode(frame)
                    .is_ok_and(|f| f.lsn == lsn && f.group_index == index as u32),
                "a stamped frame must decode"
            );
        }
        bytes[batch.len..padded + end_marker].fill(0);
        active.data_crc = crc32c::crc32c_append(active.data_crc, &bytes[..padded]);
        batch.buf.trim_to(padded + end_marker);
        debug_assert!(active.write_offset + padded as u64 <= active.header.footer_offset());
        padded
    }

    /// Moves the log's end past a sealed batch of `frames` frames, `padded` bytes.
    #[expect(
        clippy::expect_used,
        reason = "a sealed batch was sealed for the active segment"
    )]
    fn advance(&mut self, frames: usize, padded: usize, epoch: Epoch, commit_ts: TimestampMicros) {
        let active = self
            .active
            .as_mut()
            .expect("a batch is written into an active segment");
        active.write_offset += padded as u64;
        self.next_lsn = Lsn(self.next_lsn.0 + frames as u64);
        active.last_lsn = Lsn(self.next_lsn.0 - 1);
        active.last_commit_ts = commit_ts;
        self.last_commit_ts = commit_ts;
        self.last_epoch = epoch;
        let mut stats = self.shared.stats.borrow_mut();
        stats.bytes_written += padded as u64;
        stats.syncs += 1;
    }

    /// Opens the next segment from the spare, then seals the active one (if any). The
    /// next segment's header is durable before the footer that says so: a log whose
    /// newest segment is sealed with that flag has lost a segment, and recovery can
    /// tell (FORMAT.md §3.2, §4). A crash between the two leaves the active segment
    /// unsealed before an empty one, which recovery removes (the active one stays).
    async fn rotate(&mut self, epoch: Epoch) -> Result<(), GroupError> {
        let (spare, zeroed) = self.take_spare().await.map_err(|e| {
            // Preparing the next segment touched no acknowledged data: a full disk or
            // a full descriptor table fails only the frames that needed the segment,
            // and the next write asks for it again.
            if e.is_storage_full() || e.is_out_of_descriptors() {
                GroupError::Skipped(e)
            } else {
                GroupError::Fatal(e)
            }
        })?;
        drop(spare);
        let config = &self.shared.config;
        let storage = &self.shared.storage;
        let header = SegmentHeader {
            shard: config.shard,
            max_group_bytes: config.max_group_bytes as u32,
            epoch,
            first_lsn: self.next_lsn,
            capacity_bytes: config.segment_bytes,
            created: TimestampMicros::now(),
        };
        let name = segment_name(config.shard, epoch, self.next_lsn);
        let opened = async {
            storage.rename(SPARE_READY_NAME, &name).await?;
            let file = storage.open_durable(&name).await?;
            // The header is durable before any frame: recovery relies on it.
            let mut buf = storage.alloc_buffer(BLOCK_SIZE);
            buf.as_bytes_mut().copy_from_slice(&header.encode());
            file.write_durable_at(buf, 0).await?;
            storage.sync_dir().await?;
            Ok::<_, Error>(file)
        };
        let opened = opened.await;
        {
            // The ready name is free again: the preparer may make the next spare.
            let mut state = self.shared.state.borrow_mut();
            state.spare = Spare::Wanted;
            wake(&mut state.preparer_waker);
        }
        let file = opened.map_err(GroupError::Fatal)?;
        if let Some(active) = self.active.as_mut().filter(|a| !a.sealed) {
            let footer = SegmentFooter {
                first_lsn: active.header.first_lsn,
                last_lsn: active.last_lsn,
                data_end: active.write_offset,
                last_commit_ts: active.last_commit_ts,
                data_crc: active.data_crc,
                successor: true,
            };
            let mut buf = self.shared.storage.alloc_buffer(BLOCK_SIZE);
            buf.as_bytes_mut()
                .copy_from_slice(&footer.encode_as(active.version));
            let at = active.header.footer_offset();
            active
                .file
                .write_durable_at(buf, at)
                .await
                .map_err(GroupError::Fatal)?;
            active.sealed = true;
            self.shared.stats.borrow_mut().segments_sealed += 1;
        }
        tracing::debug!(segment = %name, "opened write-ahead log segment");
        {
            let mut state = self.shared.state.borrow_mut();
            state.segments.push(SegmentInfo {
                name,
                first_lsn: self.next_lsn,
                group_starts: Vec::new(),
                starts_from_reads: false,
            });
            state.durable_end = DATA_START;
        }
        self.shared.stats.borrow_mut().segments_created += 1;
        self.active = Some(ActiveSegment {
            file: Rc::new(file),
            header,
            write_offset: DATA_START,
            data_crc: 0,
            last_lsn: Lsn(self.next_lsn.0 - 1),
            last_commit_ts: self.last_commit_ts,
            sealed: false,
            version: SEGMENT_FORMAT_VERSION,
            zeroed,
        });
        Ok(())
    }

    /// Takes the prepared spare file (waiting for it) and asks for the next one. A
    /// failure recorded by an earlier attempt is retried once now, so the error
    /// reflects the disk as it is (space may have been freed since).
    async fn take_spare(&self) -> Result<(S::File, bool)> {
        let mut retried = false;
        let mut waited = false;
        let taken = poll_fn(|cx| {
            let mut state = self.shared.state.borrow_mut();
            match std::mem::replace(&mut state.spare, Spare::Wanted) {
                Spare::Ready { file, zeroed } => {
                    state.writer_needs_spare = false;
                    state.spare = Spare::Claimed;
                    return Poll::Ready(Ok((file, zeroed)));
                }
                Spare::Failed(e) if retried => {
                    state.writer_needs_spare = false;
                    // Stays failed: the next rotation asks again.
                    state.spare = Spare::Failed(e.clone());
                    return Poll::Ready(Err(e));
                }
                Spare::Failed(_) => retried = true,
                other @ (Spare::Wanted | Spare::Preparing | Spare::Claimed) => state.spare = other,
            }
            state.writer_needs_spare = true;
            wake(&mut state.preparer_waker);
            state.writer_waker = Some(cx.waker().clone());
            waited = true;
            Poll::Pending
        })
        .await;
        if waited {
            self.shared.stats.borrow_mut().spare_waits += 1;
        }
        taken
    }
}

/// Keeps a spare segment ready so rotation never waits for one to be made.
pub(crate) async fn run_preparer<S: Storage>(shared: Rc<Shared<S>>) {
    // The log's bytes and groups when the previous spare's preparation started: what
    // it wrote since is one segment's worth of its groups. And what that spare was.
    let mut written_at_last = (0, 0);
    let mut large_groups = false;
    loop {
        let go = poll_fn(|cx| {
            let mut state = shared.state.borrow_mut();
            if state.failed.is_some() || state.writer_done {
                return Poll::Ready(false);
            }
            if matches!(state.spare, Spare::Wanted) {
                state.spare = Spare::Preparing;
                return Poll::Ready(true);
            }
            state.preparer_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        if !go {
            return;
        }
        let written = {
            let stats = shared.stats.borrow();
            (stats.bytes_written, stats.groups)
        };
        // Nothing written since (a retry after a failed attempt): as the last time.
        if let Some(mean) = mean_group_bytes(written_at_last, written) {
            large_groups = mean >= shared.config.preallocated_spare_min_group_bytes;
        }
        let recycled = std::mem::take(&mut shared.state.borrow_mut().recycled);
        let created = async {
            if recycled {
                if let Some(file) = recycle(&shared.storage, shared.config.segment_bytes).await? {
                    shared.stats.borrow_mut().spares_recycled += 1;
                    return Ok((file, false));
                }
            }
            if large_groups {
                let file = preallocate(&shared).await?;
                shared.stats.borrow_mut().spares_preallocated += 1;
                return Ok((file, true));
            }
            let file = zero_fill(&shared).await?;
            shared.stats.borrow_mut().spares_zero_filled += 1;
            Ok((file, true))
        };
        let spare = match created.await {
            Ok((file, zeroed)) => {
                written_at_last = written;
                Spare::Ready { file, zeroed }
            }
            // The log closed mid-fill: the half-made spare is removed at the next start.
            Err(Error::WalClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not prepare the next write-ahead log segment");
                Spare::Failed(e)
            }
        };
        let mut state = shared.state.borrow_mut();
        state.spare = spare;
        wake(&mut state.writer_waker);
    }
}

/// A log whose groups averaged at least this many bytes over its last segment gets its
/// next spare preallocated, not zero-filled. Its blocks are then unwritten extents: they
/// read as zero, as a filled spare's do, and each durable write into them also converts
/// its extents, about one more journal commit per group. That makes small groups' syncs
/// about half as fast (the design brief's fio figures: ~5 k against ~9.5 k syncs/s), so
/// a log of small groups keeps the zero-fill. The fill costs per byte and the conversion
/// per group: on this project's test disk a 1 MiB group's write took 2.2–2.9 ms into
/// a recycled segment, 4.2–5.2 ms while a fill ran and 3.0–4.2 ms into a preallocated
/// one, so the fill cost about 2 ms per MiB and the conversion 0.5–1.5 ms per group,
/// and the two would break even between about 256 and 768 KiB groups (BENCHMARKS.md,
/// "Spares preallocated for large groups"). The mean is the statistic that weighs
/// them: over a segment the fill costs its bytes, the conversions its groups.
pub const DEFAULT_PREALLOCATED_SPARE_MIN_GROUP_BYTES: u64 = 512 << 10;

/// The mean bytes of the groups written between two readings of (bytes written, groups);
/// `None` when none was.
fn mean_group_bytes(before: (u64, u64), now: (u64, u64)) -> Option<u64> {
    let groups = now.1.checked_sub(before.1).filter(|g| *g > 0)?;
    Some(now.0.saturating_sub(before.0) / groups)
}

/// Makes a new spare without writing it: the file's extents are reserved (so a full
/// disk fails here) and read as zero until written.
async fn preallocate<S: Storage>(shared: &Shared<S>) -> Result<S::File> {
    let storage = &shared.storage;
    let file = create_partial_spare(storage, shared.config.segment_bytes).await?;
    file.sync().await?;
    storage.rename(SPARE_PARTIAL_NAME, SPARE_READY_NAME).await?;
    Ok(file)
}

/// Creates `wal-spare.tmp` at its full size, removing one a failed attempt left.
async fn create_partial_spare<S: Storage>(storage: &S, segment_bytes: u64) -> Result<S::File> {
    if storage
        .list()
        .await?
        .iter()
        .any(|n| n == SPARE_PARTIAL_NAME)
    {
        storage.remove(SPARE_PARTIAL_NAME).await?;
    }
    storage.create(SPARE_PARTIAL_NAME, segment_bytes).await
}

/// Zero-fill writes are sized to the fill's rate: about [`ZERO_FILL_WRITES_PER_S`] of
/// them a second, between these two sizes. Each lands on an unwritten extent, and their
/// number, not their bytes, is what a fast fill costs the log's own writes: with 128 KiB
/// writes at 4× a log writing 110 MB/s, 64 writers of 100-row batches waited 66–71 ms
/// at p99 (the log's fsync lag 56–61 ms), with 512 KiB–8 MiB writes 15–22 ms, and
/// pausing only every 1 MiB between 128 KiB writes did not help. A slow fill keeps
/// small writes: it gains nothing from large ones, and each group commit's durable
/// write also flushes the fill written since the previous one from the device's cache
/// (no FUA here), so a quiet log's writes carry less of it (BENCHMARKS.md, "Zero-fill
/// in writes sized to its rate").
const ZERO_FILL_MIN_CHUNK_BYTES: usize = 128 << 10;
const ZERO_FILL_MAX_CHUNK_BYTES: usize = 512 << 10;
const ZERO_FILL_WRITES_PER_S: f64 = 1000.0;
/// The zero-fill runs at least this fast (bytes per second)...
const ZERO_FILL_MIN_BYTES_PER_S: f64 = 32e6;
/// ...and otherwise this many times faster than the log itself is writing, so the
/// spare is ready long before the active segment is full.
const ZERO_FILL_LOG_RATE_FACTOR: f64 = 4.0;
/// The longest the fill sleeps before looking whether the writer waits for it.
const ZERO_FILL_PAUSE_STEP: Duration = Duration::from_millis(2);

/// Makes a new spare by writing real zeroes over a new file: written extents keep later
/// durable writes free of extent conversion (the design brief's fio figures: ~9.5 k vs ~5 k
/// syncs/s). The fill is paced against the log's own write rate so it does not crowd
/// out group commits, and runs at full speed when the writer is waiting for it.
async fn zero_fill<S: Storage>(shared: &Shared<S>) -> Result<S::File> {
    let storage = &shared.storage;
    let segment_bytes = shared.config.segment_bytes;
    let file = create_partial_spare(storage, segment_bytes).await?;
    let started = Instant::now();
    let log_bytes_at_start = shared.stats.borrow().bytes_written;
    let mut offset = 0;
    let mut rate = ZERO_FILL_MIN_BYTES_PER_S;
    while offset < segment_bytes {
        if shared.state.borrow().writer_done {
            return Err(Error::WalClosed);
        }
        let full_speed = shared.state.borrow().writer_needs_spare;
        let chunk = if full_speed {
            ZERO_FILL_MAX_CHUNK_BYTES
        } else {
            fill_chunk_bytes(rate)
        };
        let chunk = (segment_bytes - offset).min(chunk as u64) as usize;
        let mut zeroes = storage.alloc_buffer(chunk);
        zeroes.as_bytes_mut().fill(0);
        file.write_at(zeroes, offset).await?;
        offset += chunk as u64;
        if offset == segment_bytes || shared.state.borrow().writer_needs_spare {
            continue;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let log_rate =
            (shared.stats.borrow().bytes_written - log_bytes_at_start) as f64 / elapsed.max(1e-3);
        rate = (log_rate * ZERO_FILL_LOG_RATE_FACTOR).max(ZERO_FILL_MIN_BYTES_PER_S);
        // Paused in short steps, so a writer that starts waiting for the spare waits
        // at most one step for the fill to go full speed.
        let due = Duration::from_secs_f64(offset as f64 / rate);
        while !shared.state.borrow().writer_needs_spare {
            let Some(left) = due.checked_sub(started.elapsed()).filter(|d| !d.is_zero()) else {
                break;
            };
            glommio::timer::sleep(left.min(ZERO_FILL_PAUSE_STEP)).await;
        }
    }
    file.sync().await?;
    // Renamed only once every byte is zero and synced, so a `.ready` spare found at
    // start can be used as is.
    storage.rename(SPARE_PARTIAL_NAME, SPARE_READY_NAME).await?;
    Ok(file)
}

/// The size of the fill's next write at `rate` bytes per second: a power of two, so a
/// segment (a whole number of blocks) is filled in whole blocks.
fn fill_chunk_bytes(rate: f64) -> usize {
    ((rate / ZERO_FILL_WRITES_PER_S) as usize)
        .min(ZERO_FILL_MAX_CHUNK_BYTES)
        .next_power_of_two()
        .max(ZERO_FILL_MIN_CHUNK_BYTES)
}

/// Makes a spare from a released segment: its blocks are already written (no extents
/// to convert, but for a preallocated segment's unwritten end, no zero-fill competing
/// with the log for the disk), so only its header and footer are cleared. Older frames
/// stay behind the zero block that ends every group, and carry LSNs below the new
/// segment's. None if the file has the wrong size.
async fn recycle<S: Storage>(storage: &S, segment_bytes: u64) -> Result<Option<S::File>> {
    // Claim the file first: once it has left the shared name, a concurrent release can
    // put the next released segment there without touching this one.
    storage.rename(RECYCLED_NAME, SPARE_PARTIAL_NAME).await?;
    let file = storage.open(SPARE_PARTIAL_NAME).await?;
    if file.len().await? != segment_bytes {
        drop(file);
        storage.remove(SPARE_PARTIAL_NAME).await?;
        return Ok(None);
    }
    for at in [0, segment_bytes - BLOCK_SIZE as u64] {
        let mut blank = storage.alloc_buffer(BLOCK_SIZE);
        blank.as_bytes_mut().fill(0);
        file.write_at(blank, at).await?;
    }
    file.sync().await?;
    storage.rename(SPARE_PARTIAL_NAME, SPARE_READY_NAME).await?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_group_is_taken_over_what_was_written_since_the_last_spare() {
        assert_eq!(mean_group_bytes((0, 0), (0, 0)), None);
        assert_eq!(mean_group_bytes((64 << 20, 100), (64 << 20, 100)), None);
        assert_eq!(mean_group_bytes((0, 0), (1 << 20, 4)), Some(256 << 10));
        assert_eq!(
            mean_group_bytes((1 << 20, 4), (2 << 20, 260)),
            Some((1 << 20) / 256)
        );
    }

    #[test]
    fn fill_writes_are_small_when_the_fill_is_slow_and_large_when_it_is_fast() {
        // The floor rate keeps the small writes a quiet log always had.
        assert_eq!(fill_chunk_bytes(ZERO_FILL_MIN_BYTES_PER_S), 128 << 10);
        // 4 × a log writing 37 MB/s (64 single-row writers) and 110 MB/s (64 × 100 rows).
        assert_eq!(fill_chunk_bytes(4.0 * 37e6), 256 << 10);
        assert_eq!(fill_chunk_bytes(4.0 * 110e6), 512 << 10);
        assert_eq!(fill_chunk_bytes(1e12), ZERO_FILL_MAX_CHUNK_BYTES);
        // Every size fills a segment in whole blocks.
        for rate in [
            0.0,
            1.0,
            3e7,
            1e8,
            2.5e8,
            7e8,
            1e10,
            f64::MAX,
            f64::INFINITY,
        ] {
            let chunk = fill_chunk_bytes(rate);
            assert!(
                chunk.is_power_of_two() && chunk.is_multiple_of(BLOCK_SIZE),
                "{rate}: {chunk}"
            );
        }
    }
}
