//! What a shard holds, summed up so two copies can be compared without moving their
//! rows: per table, its row count and a content digest ([`TableDigest`]), and when it
//! was last written. The restore drill compares a restored shard with the live one this
//! way: a table not written since the restore point must match exactly.

use serde::{Deserialize, Serialize};

use crate::apply::ShardState;
use crate::table::{Table, TableDigest};

/// One table, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSummary {
    pub tenant: String,
    pub table: String,
    /// The LSN that created this incarnation of the table.
    pub version: u64,
    /// No write reached the table after this LSN ([`Table::written_lsn`]).
    pub written_lsn: u64,
    pub rows: u64,
    /// The CRC-32C of its rows in key order, 8 hex digits; `None` when the table changed
    /// while a live digest was being taken slice by slice.
    pub digest: Option<String>,
}

impl TableSummary {
    /// The summary of `table` before its digest is taken.
    pub fn start(tenant: &str, table: &Table) -> TableSummary {
        TableSummary {
            tenant: tenant.to_string(),
            table: table.schema().name.clone(),
            version: table.version(),
            written_lsn: table.written_lsn(),
            rows: 0,
            digest: None,
        }
    }

    pub fn finish(&mut self, digest: &TableDigest) {
        self.rows = digest.rows;
        self.digest = Some(format!("{:08x}", digest.crc));
    }
}

/// Every table of `state`, each digested whole (for a shard no one else uses, like a
/// restored one: on a live shard take the digests a slice at a time).
pub fn summarize(state: &ShardState) -> Vec<TableSummary> {
    let mut out = Vec::new();
    for (id, tenant) in &state.tenants {
        for table in tenant.tables() {
            let mut summary = TableSummary::start(id.as_str(), table);
            let mut digest = TableDigest::default();
            while !table.digest_rows(&mut digest, usize::MAX) {}
            summary.finish(&digest);
            out.push(summary);
        }
    }
    out
}
