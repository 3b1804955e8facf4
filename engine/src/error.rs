//! The engine's error type. Each variant says what to fix; the server maps them to
//! HTTP statuses (validation → 400, missing → 404, conflicts → 409, limits → 413).

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
    #[error("idempotency key {key:?} was first used with a different request body")]
    IdempotencyConflict { key: String },
    #[error(
        "table {table:?} was dropped and created again while the write was in flight; retry it"
    )]
    TableChanged { table: String },
    #[error("the log holds a record that cannot be replayed at LSN {lsn}: {why}")]
    Replay { lsn: u64, why: String },
    #[error("data directory layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    #[error("write-ahead log: {0}")]
    Wal(#[from] oc_io::Error),
}
