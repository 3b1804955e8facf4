//! The engine's error type. Each variant says what to fix; the server maps them to
//! HTTP statuses (validation → 400, missing → 404, conflicts → 409, limits → 413).
//!
//! Files read from disk or an archive are untrusted: their loaders return an
//! [`UnreadableFile`] (the file, and a [`FileProblem`] saying what in it is wrong) or,
//! where the caller names the file itself (an archive key), the bare [`FileProblem`].

use oc_io::wal::frame::FrameError;
use oc_io::Lsn;

use crate::record::RecordError;

/// Everything the engine refuses or fails at.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        what: &'static str,
        name: String,
        why: String,
    },
    #[error("invalid schema for table {table:?}: {why}")]
    InvalidSchema { table: String, why: String },
    #[error("{what} {name:?} does not exist")]
    NotFound { what: &'static str, name: String },
    #[error("{what} {name:?} already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("row {row} of the batch: {why}")]
    InvalidRow { row: usize, why: String },
    #[error("{what} is {actual}, above the limit of {limit}")]
    LimitExceeded {
        what: &'static str,
        actual: usize,
        limit: usize,
    },
    #[error("tenant {tenant} would hold {after} {what}, above its quota of {limit} (it holds {used}); delete data or ask the operator to raise the quota")]
    QuotaExceeded {
        tenant: String,
        what: &'static str,
        used: usize,
        after: usize,
        limit: usize,
    },
    #[error("the server holds {resident_bytes} bytes in memory, above its budget of {budget_bytes} (--memory-budget-bytes); writes that add data are refused until data is deleted or the budget is raised")]
    MemoryFull {
        resident_bytes: u64,
        budget_bytes: u64,
    },
    /// A write batch whose log record would exceed the log's record limit.
    #[error(
        "the batch takes {bytes} bytes as a log record, above the record limit of {limit} \
         bytes; split it into smaller batches"
    )]
    BatchTooLarge { bytes: usize, limit: usize },
    #[error(
        "idempotency key {key:?} was first used with a different request (another table, or \
         another body); give each distinct write its own key"
    )]
    IdempotencyConflict { key: String },
    #[error(
        "table {table:?} was dropped, created again or migrated while the write was in flight; retry it"
    )]
    TableChanged { table: String },
    /// A migration's steps that cannot be carried out (`400`).
    #[error("invalid migration: {0}")]
    InvalidMigration(String),
    /// A migration request that conflicts with the migration's state (`409`).
    #[error("{0}")]
    MigrationConflict(String),
    /// A v0 write that an active migration cannot carry into the v1 shape.
    #[error("row {row} of the batch cannot be carried by migration {id} of table {table:?}: {why}; fix the row, or abort the migration")]
    MigrationRefused {
        id: u64,
        table: String,
        row: usize,
        why: String,
    },
    /// This server may not acknowledge writes: it is a follower, or a writer whose
    /// lease lapsed or was taken.
    #[error("{0}")]
    NotLeader(String),
    /// A writer handing over to a follower (a switchover) refused the write before
    /// logging it: nothing was written, so it may be sent to the new writer as is.
    #[error("{0}")]
    HandingOver(String),
    /// Synchronous replication: the followers did not confirm the write in time. It is
    /// durable and applied here, but not acknowledged.
    #[error("{0}")]
    ReplicationUnavailable(String),
    #[error("the log holds a record that cannot be replayed at LSN {lsn}: {why}")]
    Replay { lsn: u64, why: String },
    #[error("data directory layout: {0}")]
    Layout(String),
    /// A file on disk that this build cannot use (a damaged or foreign layout file).
    #[error(transparent)]
    Unreadable(#[from] UnreadableFile),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("write-ahead log: {0}")]
    Wal(#[from] oc_io::Error),
}

/// A file this build cannot use: which one, and what is wrong with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file} is unreadable: {problem}")]
pub struct UnreadableFile {
    /// The file's path, or its name in a shard's directory.
    pub file: String,
    pub problem: FileProblem,
}

/// What is wrong with a file read from disk or an archive (FORMAT.md §6, §7, §9).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FileProblem {
    /// Reading it failed.
    #[error("cannot read it: {0}")]
    Io(oc_io::Error),
    /// The bytes are not JSON at all (or end early).
    #[error("not JSON: {0}")]
    NotJson(String),
    /// A field every supported version has is absent.
    #[error("no {0}")]
    MissingField(&'static str),
    /// A `format_version` this build does not read (the versioning rule of FORMAT.md).
    #[error(
        "format_version {found} is not supported (this build reads {}){}",
        versions(supported),
        newer_advice(*found, supported)
    )]
    UnsupportedVersion {
        found: u64,
        supported: &'static [u64],
    },
    /// A field is present but its value is refused.
    #[error("{field} {why}")]
    BadField { field: &'static str, why: String },
    /// JSON of the wrong shape: a field of the wrong type, or one the format refuses
    /// (serde's account, which names the value and where it is).
    #[error("{0}")]
    Malformed(String),
    /// The snapshot holds fewer bytes than its manifest counts.
    #[error("snapshot has {actual} bytes, manifest says {expected}")]
    SnapshotTooShort { actual: u64, expected: u64 },
    /// The snapshot's data does not match its manifest's checksum.
    #[error("snapshot crc {actual:#010x} does not match the manifest's {expected:#010x}")]
    SnapshotCrc { actual: u32, expected: u32 },
    /// One frame of a snapshot is wrong.
    #[error("frame at byte {offset}: {problem}")]
    Frame {
        offset: usize,
        problem: SnapshotProblem,
    },
    /// The snapshot stops before its end record.
    #[error("snapshot has no end record")]
    NoEndRecord,
    /// A checkpoint a returning ex-writer took after its history left its writer's.
    #[error(
        "it holds LSN {lsn} of epoch {epoch}, which is not on the writer's history (it was \
         taken after the two histories diverged)"
    )]
    OffHistory { lsn: u64, epoch: u64 },
}

/// What is wrong with one frame of a checkpoint snapshot (FORMAT.md §6).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotProblem {
    #[error("{0}")]
    Frame(FrameError),
    #[error("has LSN {lsn} and position {index}; LSN {expected_lsn} and position {expected_index} were expected")]
    OutOfPlace {
        lsn: Lsn,
        index: u32,
        expected_lsn: Lsn,
        expected_index: u32,
    },
    #[error("follows the end record")]
    AfterEnd,
    #[error("payload version {0} is not supported")]
    UnknownVersion(u8),
    #[error("bad tenant tag")]
    BadTenant,
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("{0} before its tenant")]
    BeforeTenant(&'static str),
    /// The state machine refused what the frame holds (a bad schema, a duplicate key).
    #[error("refused: {0}")]
    Refused(Box<EngineError>),
    #[error("the end record counts {counted} frames, the snapshot has {frames}")]
    EndCount { counted: u32, frames: u32 },
    #[error("unexpected record kind {0}")]
    UnknownKind(u16),
}

/// What to do about a file from a newer build (a rollback after an upgrade that changed
/// a format).
fn newer_advice(found: u64, supported: &[u64]) -> &'static str {
    if supported.iter().all(|&v| found > v) {
        ": a newer oc wrote it; run that version, or restore from the archive with it \
         (DEPLOY.md, \"Rollback\")"
    } else {
        ""
    }
}

fn versions(supported: &[u64]) -> String {
    let list: Vec<String> = supported.iter().map(u64::to_string).collect();
    list.join(" and ")
}
