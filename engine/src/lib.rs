//! `oc-engine` owns shards and routing, the tenant state machine (schemas, tables,
//! rows, indexes, vectors), commands ↔ WAL records, checkpoints, recovery, and the
//! query engine behind `/ask`. It speaks neither HTTP nor S3.
//!
//! Built: the data model (tenant ids, typed schemas with named limits, tables with
//! primary-key and secondary-index B-trees), commands as WAL records, shards with
//! durable writes, fuzzy checkpoints and recovery, idempotency keys, and the pool of
//! shards (one executor per core) with tenant placement and cross-shard calls, and
//! the query engine behind `/ask` ([`query`]) with exact vector search
//! ([`vectors`]).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod api_key;
pub mod apply;
pub mod checkpoint;
pub mod command;
pub mod digest;
pub mod error;
pub mod feed;
pub mod fuzz_entry;
pub mod idempotency;
pub mod json_file;
pub mod key;
pub mod key_map;
pub mod limits;
pub mod mesh;
pub mod migration;
pub mod placement;
pub mod pool;
pub mod query;
pub mod quota;
pub mod reclaim;
pub mod record;
pub mod row;
pub mod scheduler;
pub mod schema;
pub mod shard;
pub mod stages;
pub mod table;
pub mod tenant;
pub mod tenant_id;
pub mod value;
pub mod vectors;
pub mod wait_list;

pub use error::{EngineError, FileProblem, UnreadableFile};
pub use mesh::{MeshError, Router};
pub use placement::owner_shard;
pub use pool::{owner_of, stop_all, PoolConfig, ShardNode, ShardPool, ShardRouter};
pub use quota::{Growth, TenantQuotas};
pub use row::{Row, ValueRef};
pub use scheduler::{spawn_checkpointer, CheckpointMetrics, CheckpointPolicy, Checkpointer};
pub use schema::TableSchema;
pub use shard::{
    AckGate, Applied, BackfillProgress, ChangesRead, MigrationMetrics, Shard, ShardOpenReport,
    ShardState,
};
pub use table::{BatchOutcome, Table, TableUsage, WriteOp};
pub use tenant::{Tenant, TenantUsage};
pub use tenant_id::TenantId;
pub use value::{ColumnType, Value};
