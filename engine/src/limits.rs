//! Every size the engine accepts is bounded here; what happens at each limit is a
//! typed error ([`crate::EngineError::LimitExceeded`]) the API turns into 413 or 400.

/// Tables one tenant may have.
pub const MAX_TABLES_PER_TENANT: usize = 256;
/// Columns one table may have.
pub const MAX_COLUMNS_PER_TABLE: usize = 256;
/// Columns in a primary key or a secondary index.
pub const MAX_KEY_COLUMNS: usize = 8;
/// Secondary indexes one table may have.
pub const MAX_INDEXES_PER_TABLE: usize = 16;
/// Dimensions of a `vector(dim)` column.
pub const MAX_VECTOR_DIM: u32 = 4096;
/// Bytes of one row as stored (see `Value::stored_bytes`).
pub const MAX_ROW_BYTES: usize = 256 * 1024;
/// Bytes of one encoded primary key or index key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Row operations in one write batch.
pub const MAX_BATCH_ROWS: usize = 1000;
/// Bytes of a table, column or index name.
pub const MAX_NAME_BYTES: usize = 63;
