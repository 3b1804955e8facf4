//! `oc-engine` owns shards and routing, the tenant state machine (schemas, tables,
//! rows, indexes, vectors), commands ↔ WAL records, checkpoints, recovery, and the
//! query engine behind `/ask`. It speaks neither HTTP nor S3.
//!
//! Built so far: the data model — tenant ids, validated table schemas with named
//! limits, typed values with an order-preserving key encoding, and tables with
//! primary-key and secondary-index B-trees, atomic write batches, point gets, range
//! scans and usage counters. Not built yet: shards, WAL records, checkpoints,
//! recovery, idempotency keys (the engine issue is open).
#![deny(clippy::unwrap_used)]

pub mod checkpoint;
pub mod command;
pub mod error;
pub mod idempotency;
pub mod limits;
pub mod record;
pub mod scheduler;
pub mod schema;
pub mod shard;
pub mod table;
pub mod tenant;
pub mod tenant_id;
pub mod value;

pub use error::EngineError;
pub use oc_io as io;
pub use scheduler::{spawn_checkpointer, CheckpointMetrics, CheckpointPolicy};
pub use schema::TableSchema;
pub use shard::{Applied, Shard, ShardOpenReport, ShardState};
pub use table::{BatchOutcome, Row, Table, TableUsage, WriteOp};
pub use tenant::{Tenant, TenantUsage};
pub use tenant_id::TenantId;
pub use value::{ColumnType, Value};
