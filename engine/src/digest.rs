//! What a shard holds, summed up so two copies can be compared without moving their
//! rows: per table, its row count and a content digest ([`TableDigest`]), and when it
//! was last written. The restore drill compares a restored shard with the live one this
//! way: a table not written since the restore point must match exactly.

use oc_io::Storage;
use serde::{Deserialize, Serialize};

use crate::apply::ShardState;
use crate::shard::Shard;
use crate::table::{Table, TableDigest};
use crate::tenant_id::TenantId;

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

/// Where a live shard's log stands, and its tables summed up.
#[derive(Debug, Clone)]
pub struct ShardDigest {
    pub applied_lsn: u64,
    /// The commit time of the newest applied record, µs since the epoch (0: none).
    pub last_commit_us: u64,
    pub tables: Vec<TableSummary>,
}

/// A shard no one else uses (a restored copy), checked and summed up whole.
#[derive(Debug, Clone, Default)]
pub struct ShardCheck {
    pub tenants: usize,
    pub tables: usize,
    pub rows: usize,
    /// Each table whose rows and indexes disagree, named with why.
    pub problems: Vec<String>,
    pub summaries: Vec<TableSummary>,
}

impl<S: Storage> Shard<S> {
    /// Where the log stands and, with `with_tables`, every table digested
    /// `slice_rows` rows at a time, the shard free to run other work between slices.
    /// A table written while it is digested has no digest (`None`).
    pub async fn digest(&self, with_tables: bool, slice_rows: usize) -> ShardDigest {
        let (applied_lsn, last_commit_us, mut tables) = self.with_state(|state| {
            let tables: Vec<(TenantId, TableSummary)> = state
                .tenants
                .iter()
                .filter(|_| with_tables)
                .flat_map(|(id, t)| {
                    t.tables()
                        .map(|table| (id.clone(), TableSummary::start(id.as_str(), table)))
                })
                .collect();
            (state.applied_lsn.0, state.last_commit.0, tables)
        });
        let mut turns = oc_io::executor::Turns::new(crate::query::SLICE_TARGET);
        for (tenant, summary) in &mut tables {
            let mut digest = TableDigest::default();
            loop {
                let step = self.with_state(|state| {
                    let table = state
                        .tenants
                        .get(tenant)?
                        .table(&summary.table)
                        .ok()
                        .filter(|t| t.version() == summary.version)?;
                    (table.written_lsn() == summary.written_lsn)
                        .then(|| table.digest_rows(&mut digest, slice_rows))
                });
                match step {
                    Some(true) => summary.finish(&digest),
                    Some(false) => {
                        turns.between_slices().await;
                        continue;
                    }
                    None => {}
                }
                break;
            }
        }
        ShardDigest {
            applied_lsn,
            last_commit_us,
            tables: tables.into_iter().map(|(_, s)| s).collect(),
        }
    }

    /// Every table's rows checked against its indexes, and every table summed up whole.
    pub fn check(&self) -> ShardCheck {
        self.with_state(|state| {
            let mut found = ShardCheck::default();
            for (id, tenant) in &state.tenants {
                found.tenants += 1;
                for table in tenant.tables() {
                    found.tables += 1;
                    match table.check_integrity() {
                        Ok(rows) => found.rows += rows,
                        Err(why) => found
                            .problems
                            .push(format!("tenant {id}, table {}: {why}", table.schema().name)),
                    }
                }
            }
            found.summaries = summarize(state);
            found
        })
    }
}
