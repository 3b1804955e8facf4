//! Commands: the mutations a shard logs and applies. Each becomes one WAL record
//! (its kind and payload are encoded in [`crate::record`]).
//!
//! Applying is a total, deterministic function of (state, command): it never panics
//! and reports a refused command as a result instead of failing. Live apply and crash
//! replay therefore build the same state from the same log.

use crate::migration::Step;
use crate::schema::TableSchema;
use crate::table::RowWrite;

/// A mutation of one tenant, in the order the log holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateTenant,
    DropTenant,
    CreateTable(TableSchema),
    DropTable {
        table: String,
    },
    /// Validated row writes to one table. `table_version` is the LSN of the
    /// `CreateTable` the rows were validated against: if the table was dropped and
    /// created again since, the batch is refused at apply time.
    Write {
        table: String,
        table_version: u64,
        writes: Vec<RowWrite>,
        idempotency_key: Option<String>,
    },
    /// A new API key of the tenant; the server keeps only the secret's SHA-256.
    CreateApiKey {
        key_id: String,
        name: String,
        secret_sha256: [u8; 32],
    },
    RevokeApiKey {
        key_id: String,
    },
    /// Starts a migration of `table` (the incarnation `table_version`); its id is the
    /// record's LSN.
    StartMigration {
        table: String,
        table_version: u64,
        steps: Vec<Step>,
        /// `InPlace` for every start this build logs (record kind 12); `Compact` for
        /// one an earlier build logged (kind 8).
        layout: crate::migration::Layout,
    },
    /// Converts the base rows after the migration's cursor up to the key `upto`.
    Backfill {
        table: String,
        id: u64,
        upto: Vec<u8>,
    },
    /// The table takes the migration's new shape.
    Cutover {
        table: String,
        id: u64,
    },
    AbortMigration {
        table: String,
        id: u64,
    },
}
