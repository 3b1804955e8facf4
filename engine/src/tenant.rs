//! A tenant's state: its tables. Every operation validates completely before it
//! changes anything, so a refused request leaves the tenant exactly as it was.

use std::collections::BTreeMap;

use crate::api_key::ApiKeys;
use crate::error::EngineError;
use crate::idempotency::IdempotencyStore;
use crate::limits::MAX_TABLES_PER_TENANT;
use crate::migration::Migrations;
use crate::quota::TenantQueryMemory;
use crate::schema::TableSchema;
use crate::table::{BatchOutcome, Row, Table, TableUsage, WriteOp};
use crate::tenant_id::TenantId;
use oc_io::Lsn;

/// Usage of a whole tenant (`GET /v1/tenants/:t/usage`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantUsage {
    pub tables: BTreeMap<String, TableUsage>,
    pub rows: usize,
    pub bytes: usize,
    pub vectors: usize,
}

/// One tenant, owned by exactly one shard.
#[derive(Debug, Clone)]
pub struct Tenant {
    id: TenantId,
    tables: BTreeMap<String, Table>,
    /// The LSN of the newest schema change this tenant's state has seen (plan caches
    /// key on it): unique across drops and re-creations, unlike a counter.
    schema_version: u64,
    idempotency: IdempotencyStore,
    api_keys: ApiKeys,
    migrations: Migrations,
    /// What this tenant's running queries and unsent answers hold.
    query_memory: TenantQueryMemory,
    /// The LSN that created this tenant (0: not known, loaded from a checkpoint written
    /// before it was recorded): frames before it belong to an earlier tenant of the
    /// same name.
    created_lsn: u64,
}

impl Tenant {
    pub fn new(id: TenantId) -> Self {
        Tenant {
            id,
            tables: BTreeMap::new(),
            schema_version: 0,
            idempotency: IdempotencyStore::default(),
            api_keys: ApiKeys::default(),
            migrations: Migrations::default(),
            query_memory: TenantQueryMemory::default(),
            created_lsn: 0,
        }
    }

    /// A tenant created by the command at `lsn`.
    pub fn created_at(id: TenantId, lsn: u64) -> Self {
        Tenant {
            created_lsn: lsn,
            ..Tenant::new(id)
        }
    }

    /// The LSN that created this tenant; 0 when not known.
    pub fn created_lsn(&self) -> u64 {
        self.created_lsn
    }

    /// The share of the queries' memory this tenant's queries and answers count toward.
    pub fn query_memory(&self) -> &TenantQueryMemory {
        &self.query_memory
    }

    pub fn id(&self) -> &TenantId {
        &self.id
    }

    pub fn schema_version(&self) -> u64 {
        self.schema_version
    }

    /// The remembered results of keyed writes.
    pub fn idempotency(&self) -> &IdempotencyStore {
        &self.idempotency
    }

    pub(crate) fn idempotency_mut(&mut self) -> &mut IdempotencyStore {
        &mut self.idempotency
    }

    /// The tenant's API keys (hashes only).
    pub fn api_keys(&self) -> &ApiKeys {
        &self.api_keys
    }

    pub(crate) fn api_keys_mut(&mut self) -> &mut ApiKeys {
        &mut self.api_keys
    }

    /// The tenant's schema migrations.
    pub fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    /// A row of `table` as reads see it: in the new shape while a migration of the
    /// table runs (dual read; a row the migration has not converted yet is
    /// transformed as it is read).
    pub fn row_as_read(
        &self,
        table: &Table,
        row: &Row,
    ) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
        let migration = self
            .migrations
            .active(&table.schema().name)
            .filter(|m| m.table_version == table.version());
        match migration {
            None => Ok(table.row_to_json(row)),
            Some(m) => {
                let reshaped = m.read_view(row).map_err(|why| {
                    EngineError::MigrationConflict(format!(
                        "this row cannot be read in the new shape of migration {}, which \
                         runs on table {:?}: {why}",
                        m.info.id,
                        table.schema().name
                    ))
                })?;
                Ok(crate::table::row_to_json(m.target_schema(), &reshaped))
            }
        }
    }

    pub(crate) fn migrations_mut(&mut self) -> &mut Migrations {
        &mut self.migrations
    }

    /// A table and the migrations, borrowed together (a backfill reads one and
    /// changes the other).
    pub(crate) fn base_and_migrations(
        &mut self,
        table: &str,
    ) -> Result<(&mut Table, &mut Migrations), EngineError> {
        let base = self.tables.get_mut(table).ok_or_else(|| not_found(table))?;
        Ok((base, &mut self.migrations))
    }

    /// Puts a rewritten table in place of the one of its name (a compact cutover at
    /// `lsn`).
    pub(crate) fn replace_table(&mut self, table: Table, lsn: u64) {
        if let Some(old) = self.tables.insert(table.schema().name.clone(), table) {
            crate::reclaim::later(old);
        }
        self.schema_version = self.schema_version.max(lsn);
    }

    pub(crate) fn table_mut(&mut self, name: &str) -> Result<&mut Table, EngineError> {
        self.tables.get_mut(name).ok_or_else(|| not_found(name))
    }

    /// Gives `table` a migration's new shape (a cutover at `lsn`); returns the shape
    /// it replaced.
    pub(crate) fn cut_over_table(
        &mut self,
        table: &str,
        target: TableSchema,
        built: crate::table::NewStructures,
        lsn: u64,
    ) -> Result<TableSchema, EngineError> {
        let base = self.table_mut(table)?;
        let v0 = base.schema().clone();
        base.cut_over(target, built, lsn);
        self.schema_version = self.schema_version.max(lsn);
        Ok(v0)
    }

    /// Adds a table; `version` identifies this incarnation (the creating LSN).
    pub fn create_table(&mut self, schema: TableSchema, version: u64) -> Result<(), EngineError> {
        if self.tables.contains_key(&schema.name) {
            return Err(EngineError::AlreadyExists {
                what: "table",
                name: schema.name,
            });
        }
        if self.tables.len() >= MAX_TABLES_PER_TENANT {
            return Err(EngineError::LimitExceeded {
                what: "tables per tenant",
                actual: self.tables.len() + 1,
                limit: MAX_TABLES_PER_TENANT,
            });
        }
        self.tables
            .insert(schema.name.clone(), Table::new(schema, version));
        self.schema_version = self.schema_version.max(version);
        Ok(())
    }

    /// Drops a table; `lsn` is the dropping command's.
    pub fn drop_table(&mut self, name: &str, lsn: u64) -> Result<(), EngineError> {
        crate::reclaim::later(self.tables.remove(name).ok_or_else(|| not_found(name))?);
        self.schema_version = self.schema_version.max(lsn);
        Ok(())
    }

    pub fn table(&self, name: &str) -> Result<&Table, EngineError> {
        self.tables.get(name).ok_or_else(|| not_found(name))
    }

    pub fn tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.values()
    }

    /// The tables named after `after` (all with `None`), in name order: a listing's
    /// next page.
    pub fn tables_after(&self, after: Option<&str>) -> impl Iterator<Item = &Table> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.tables
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(_, table)| table)
    }

    /// Validates the whole batch, then applies it: all rows or none. Without a log (tests
    /// and tools): the table's `written_lsn` stays as it was.
    pub fn write(&mut self, table: &str, ops: &[WriteOp]) -> Result<BatchOutcome, EngineError> {
        let target = self.tables.get_mut(table).ok_or_else(|| not_found(table))?;
        let writes = target.validate_batch(ops)?;
        let lsn = target.written_lsn();
        self.migrations.apply_writes(target, writes, lsn)
    }

    /// Marks `table` as loaded from a checkpoint at `lsn`: written at or before it.
    pub(crate) fn table_loaded_at(&mut self, table: &str, lsn: Lsn) -> Result<(), EngineError> {
        let target = self.tables.get_mut(table).ok_or_else(|| not_found(table))?;
        target.set_written_lsn(lsn.0);
        Ok(())
    }

    /// Applies writes validated earlier against the table incarnation `version`. They
    /// come back from the log or a checkpoint, so every row is checked against the
    /// table again first (all or none): what was checked before logging is checked
    /// again after reading.
    pub fn apply_writes(
        &mut self,
        table: &str,
        version: u64,
        writes: Vec<crate::table::RowWrite>,
        lsn: Lsn,
    ) -> Result<BatchOutcome, EngineError> {
        let target = self.tables.get_mut(table).ok_or_else(|| not_found(table))?;
        if target.version() != version {
            return Err(EngineError::TableChanged {
                table: table.to_string(),
            });
        }
        target.check_writes(&writes)?;
        self.migrations.apply_writes(target, writes, lsn.0)
    }

    /// Loads rows of a checkpoint into a table: like [`Tenant::apply_writes`], but rows
    /// are stored as they were (a migration converts rows in place, and is attached
    /// once the table is whole).
    pub(crate) fn load_rows(
        &mut self,
        table: &str,
        version: u64,
        writes: Vec<crate::table::RowWrite>,
        lsn: Lsn,
    ) -> Result<BatchOutcome, EngineError> {
        let target = self.tables.get_mut(table).ok_or_else(|| not_found(table))?;
        if target.version() != version {
            return Err(EngineError::TableChanged {
                table: table.to_string(),
            });
        }
        target.check_stored_rows(&writes)?;
        Ok(target.apply(writes, lsn.0))
    }

    /// A table frame of a checkpoint for a table already loaded: the checkpoint copied
    /// the table again after it changed incarnation (a cutover) during the copy, and
    /// the later copy wins.
    pub(crate) fn forget_table_for_reload(&mut self, name: &str) {
        self.tables.remove(name);
        self.migrations.forget_table(name);
    }

    /// Rows, bytes and vectors over all tables, without the per-table breakdown (the
    /// write path's quota check: no allocation).
    pub fn totals(&self) -> TenantUsage {
        let mut usage = TenantUsage::default();
        for table in self.tables.values() {
            let u = table.usage();
            usage.rows += u.rows;
            usage.bytes += u.bytes;
            usage.vectors += u.vectors;
        }
        usage
    }

    pub fn usage(&self) -> TenantUsage {
        let mut usage = TenantUsage::default();
        for (name, table) in &self.tables {
            let u = table.usage();
            usage.rows += u.rows;
            usage.bytes += u.bytes;
            usage.vectors += u.vectors;
            usage.tables.insert(name.clone(), u);
        }
        usage
    }
}

fn not_found(name: &str) -> EngineError {
    EngineError::NotFound {
        what: "table",
        name: name.to_string(),
    }
}
