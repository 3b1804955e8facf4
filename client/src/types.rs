//! Request and answer bodies, as docs/openapi.yaml describes them. Answers ignore
//! fields they do not know, so a newer server never breaks an older client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A row: column name to value (vectors as arrays of numbers, `json` columns any JSON).
pub type Row = Map<String, Value>;

#[derive(Debug, Clone, Deserialize)]
pub struct TenantCreated {
    pub tenant: String,
    pub shard: u32,
    pub lsn: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dropped {
    pub dropped: bool,
    pub lsn: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Counts {
    pub rows: u64,
    pub bytes: u64,
    pub vectors: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Usage {
    pub tenant: String,
    pub shard: u32,
    pub rows: u64,
    pub bytes: u64,
    pub vectors: u64,
    pub tables: BTreeMap<String, Counts>,
    pub quotas: Counts,
    pub in_flight_requests: u64,
    pub watch_streams: u64,
    /// What its running `/ask` queries and unread answers hold (0 from servers that
    /// do not say).
    #[serde(default)]
    pub ask_memory_bytes: u64,
    pub applied_lsn: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `text`, `int`, `float`, `bool`, `json` or `vector(N)`.
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default = "nullable_by_default")]
    pub nullable: bool,
}

fn nullable_by_default() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub columns: Vec<String>,
}

/// A table's schema: what `create_table` sends and what describes answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    pub name: String,
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    #[serde(default)]
    pub indexes: Vec<Index>,
}

impl TableSchema {
    /// A schema with these columns (`(name, type)`, nullable) and primary key.
    pub fn new(name: &str, columns: &[(&str, &str)], primary_key: &[&str]) -> TableSchema {
        TableSchema {
            name: name.to_string(),
            columns: columns
                .iter()
                .map(|(name, ty)| Column {
                    name: name.to_string(),
                    ty: ty.to_string(),
                    nullable: true,
                })
                .collect(),
            primary_key: primary_key.iter().map(|c| c.to_string()).collect(),
            indexes: Vec::new(),
        }
    }

    /// Adds a secondary index.
    pub fn index(mut self, name: &str, columns: &[&str]) -> TableSchema {
        self.indexes.push(Index {
            name: name.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        });
        self
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableCreated {
    pub table: TableSchema,
    pub lsn: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TableInfo {
    pub schema: TableSchema,
    pub rows: u64,
    pub bytes: u64,
    pub vectors: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyCreated {
    pub tenant: String,
    pub key_id: String,
    pub name: String,
    /// The bearer token of the key, shown only in this answer.
    pub key: String,
    pub lsn: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub name: String,
    pub created_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct KeyRevoked {
    pub key_id: String,
    pub revoked: bool,
    pub lsn: u64,
}

/// One operation of a write batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOp {
    /// Insert or replace the row with this primary key.
    Upsert(Row),
    /// Delete the row with this primary key (exactly the key columns).
    Delete(Row),
}

/// An atomic batch of row writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
    /// Makes the batch safe to send again: a repeat gets the first answer. The client
    /// sets one when it may retry and the caller gave none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl WriteBatch {
    pub fn upsert(mut self, row: Row) -> WriteBatch {
        self.ops.push(WriteOp::Upsert(row));
        self
    }

    pub fn delete(mut self, key: Row) -> WriteBatch {
        self.ops.push(WriteOp::Delete(key));
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> WriteBatch {
        self.idempotency_key = Some(key.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WriteOutcome {
    pub lsn: u64,
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub missing: u64,
}

/// A row read by its key.
#[derive(Debug, Clone, Deserialize)]
pub struct FoundRow {
    pub row: Row,
    /// The read saw every write of the tenant's shard up to this LSN.
    #[serde(default)]
    pub applied_lsn: u64,
}

/// An `/ask` answer: rows as arrays in `columns` order.
#[derive(Debug, Clone, Deserialize)]
pub struct AskAnswer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub row_count: u64,
    pub rows_scanned: u64,
    /// The answer saw every write of the tenant's shard up to this LSN.
    #[serde(default)]
    pub applied_lsn: u64,
    /// With `explain`: the stage tree (docs/API.md, "EXPLAIN").
    #[serde(default)]
    pub plan: Option<Plan>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Plan {
    pub cached: bool,
    pub normalized_sql: String,
    #[serde(default)]
    pub elapsed_us: Option<u64>,
    #[serde(default)]
    pub root: Option<PlanStage>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PlanStage {
    pub stage: String,
    pub detail: String,
    #[serde(default)]
    pub rows_in: Option<u64>,
    #[serde(default)]
    pub rows_out: Option<u64>,
    #[serde(default)]
    pub elapsed_us: Option<u64>,
    #[serde(default)]
    pub input: Option<Box<PlanStage>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WatchToken {
    pub token: String,
    pub expires_unix_s: u64,
    pub ttl_s: u64,
}

/// Filters of `GET /v1/audit/logs`.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// RFC 3339.
    pub since: Option<String>,
    pub after: Option<u64>,
    pub tenant: Option<String>,
    pub action: Option<String>,
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<Value>,
    pub next_after: Option<u64>,
    pub problems: Vec<String>,
}

/// How a read is answered.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Read-your-writes: the `lsn` of a write of this tenant. The server answers once
    /// it has applied that far (a follower waits a bounded time, then answers `503
    /// lsn_not_applied`: the client retries, on the next server when it has several).
    pub min_lsn: Option<u64>,
    /// `/ask` only: the plan and its per-stage figures in [`AskAnswer::plan`].
    pub explain: bool,
}
