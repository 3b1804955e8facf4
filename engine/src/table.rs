//! One table's rows: a B+ tree from encoded primary key to row ([`KeyMap`]), and one
//! B-tree per secondary index from (encoded index key, encoded primary key). A write
//! batch is validated whole before any of it is applied, so it applies all or nothing.
//!
//! One file, about 790 lines of code: the primary B-tree and its indexes change
//! together under one all-or-nothing batch, so their bookkeeping stays in one type.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::EngineError;
use crate::key::Key;
use crate::key_map::KeyMap;
use crate::limits::{MAX_BATCH_ROWS, MAX_COLUMNS_PER_TABLE, MAX_KEY_BYTES, MAX_ROW_BYTES};
pub use crate::row::Row;
use crate::schema::TableSchema;
use crate::value::{encode_key, ColumnType, Value};

/// A requested row operation, as received (JSON objects keyed by column name).
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// Insert or replace the row with this primary key.
    Upsert(serde_json::Map<String, serde_json::Value>),
    /// Delete the row whose primary-key columns have these values.
    Delete(serde_json::Map<String, serde_json::Value>),
}

/// A row operation that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub enum RowWrite {
    Upsert(Row),
    /// The encoded primary key.
    Delete(Vec<u8>),
}

impl RowWrite {
    /// An upsert of these values (tests and fixtures; a client's row comes through
    /// [`Table::validate_batch`]).
    pub fn upsert(values: &[Value]) -> RowWrite {
        RowWrite::Upsert(Row::from_values(values))
    }
}

/// What a batch changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub inserted: usize,
    pub updated: usize,
    pub deleted: usize,
    /// Deletes of keys that did not exist (not an error).
    pub missing: usize,
}

/// Per-table usage counters, kept current by every write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableUsage {
    pub rows: usize,
    pub bytes: usize,
    /// Non-null vector values.
    pub vectors: usize,
}

/// A table and its indexes.
#[derive(Debug, Clone)]
pub struct Table {
    schema: TableSchema,
    /// The LSN of the command that created this table: a write validated against one
    /// incarnation of a table is refused by a later one.
    version: u64,
    rows: KeyMap<Row>,
    indexes: Vec<BTreeSet<(Key, Key)>>,
    usage: TableUsage,
    /// The LSN of the newest write applied to the table: its creation's LSN before any,
    /// and the checkpoint's LSN when loaded from one (then an upper bound).
    written_lsn: u64,
    /// Index entries that moved while scans of their index were open, for them to
    /// account for.
    moves: MoveLog,
    /// Per index, the queries scanning it now ([`IndexScanMoves`] holds a count).
    index_scans: Arc<[AtomicUsize]>,
    /// Rows the batch being applied deleted under open index scans.
    deleted_in_batch: DeletedInBatch,
}

/// Rows one batch deleted while scans of their indexes were open, with their entries
/// in the scanned indexes. A scan sees a batch as one step, so a key the same batch
/// writes again has moved in the index (from the old entry to the new), not left it:
/// the re-insert records the move.
#[derive(Debug, Clone, Default)]
struct DeletedInBatch {
    /// The LSN of the batch the rows are from; an entry of an earlier one is stale.
    lsn: u64,
    /// Per row key, its entry in each index with open scans (None for the others).
    rows: HashMap<Key, Vec<Option<Key>>>,
}

/// Most index moves kept for open scans, and most bytes of keys they may hold; a scan
/// that falls further behind, or has more moved rows to remember, is refused
/// ([`RangeScan::lost_moves`]).
pub const MAX_INDEX_MOVES: usize = 65_536;
const MAX_INDEX_MOVE_BYTES: usize = 16 << 20;

/// A count of open scans per index of a schema.
fn scan_counts(indexes: usize) -> Arc<[AtomicUsize]> {
    (0..indexes).map(|_| AtomicUsize::new(0)).collect()
}

/// A row's entry in an index moved: its indexed value changed under an open scan.
#[derive(Debug, Clone)]
struct IndexMove {
    index: usize,
    before: Key,
    after: Key,
    row: Key,
}

impl IndexMove {
    fn bytes(&self) -> usize {
        self.before.as_bytes().len() + self.after.as_bytes().len() + self.row.as_bytes().len()
    }
}

/// The index moves since the oldest kept, numbered.
#[derive(Debug, Clone, Default)]
struct MoveLog {
    /// The number of the first entry in `moves`.
    first: u64,
    moves: VecDeque<IndexMove>,
    /// Bytes of keys the moves hold.
    bytes: usize,
}

impl MoveLog {
    fn end(&self) -> u64 {
        self.first + self.moves.len() as u64
    }

    fn record(&mut self, m: IndexMove) {
        self.bytes += m.bytes();
        self.moves.push_back(m);
        while self.moves.len() > MAX_INDEX_MOVES || self.bytes > MAX_INDEX_MOVE_BYTES {
            let Some(oldest) = self.moves.pop_front() else {
                break;
            };
            self.bytes -= oldest.bytes();
            self.first += 1;
        }
    }

    /// Forgets every move: no scan is open to need them.
    fn clear(&mut self) {
        self.first = self.end();
        self.moves.clear();
        self.bytes = 0;
    }
}

impl DeletedInBatch {
    fn note(&mut self, lsn: u64, row: Key, entries: Vec<Option<Key>>) {
        if self.lsn != lsn {
            self.rows.clear();
            self.lsn = lsn;
        }
        self.rows.insert(row, entries);
    }

    /// The entries of `row` if the batch at `lsn` deleted it.
    fn take(&mut self, lsn: u64, row: &Key) -> Option<Vec<Option<Key>>> {
        if self.lsn != lsn {
            self.rows.clear();
            return None;
        }
        self.rows.remove(row)
    }
}

/// A running digest of a table's rows in primary-key order: the CRC-32C of each row's
/// encoded key and values as the log encodes them (FORMAT.md §5), so two copies of a
/// table with the same rows have the same digest whatever their history. Taken a slice
/// at a time ([`Table::digest_rows`]) so a large table never holds a shard for long.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableDigest {
    pub rows: u64,
    pub crc: u32,
    /// The key of the last row digested.
    resume: Option<Vec<u8>>,
}

/// Rows whose paths in the row tree [`Table::apply`] asks for at once before applying
/// them: enough for their cache misses to overlap, few enough for their paths to stay
/// in the core's L2 cache until they are used (32 leaves of about 2.5 KiB and their
/// inner nodes). Not tuned: 8, 32 and 100 at once were level in a scratch measurement.
const PREFETCH_CHUNK: usize = 32;

/// The encoded key of `row` over `columns`, as the B-trees hold it.
fn key_of(row: &Row, columns: &[usize]) -> Key {
    row.tree_key(columns)
}

impl Table {
    pub fn new(schema: TableSchema, version: u64) -> Self {
        let indexes = vec![BTreeSet::new(); schema.indexes.len()];
        let index_scans = scan_counts(indexes.len());
        Table {
            schema,
            version,
            rows: KeyMap::new(),
            indexes,
            usage: TableUsage::default(),
            written_lsn: version,
            moves: MoveLog::default(),
            index_scans,
            deleted_in_batch: DeletedInBatch::default(),
        }
    }

    /// See the field: a table whose `written_lsn` is at most some LSN has had the same
    /// rows since that LSN.
    pub fn written_lsn(&self) -> u64 {
        self.written_lsn
    }

    pub(crate) fn set_written_lsn(&mut self, lsn: u64) {
        self.written_lsn = lsn;
    }

    /// Adds up to `max_rows` more rows to `digest`; true once every row is in.
    pub fn digest_rows(&self, digest: &mut TableDigest, max_rows: usize) -> bool {
        let mut bytes = crate::record::Writer(Vec::new());
        let mut values = Vec::new();
        let dead = self.schema.dead_slots();
        let mut taken = 0;
        let mut last = None;
        for (key, row) in self.rows_after(digest.resume.as_deref()) {
            if taken == max_rows {
                break;
            }
            bytes.0.clear();
            bytes.bytes32(key);
            digest.crc = crc32c::crc32c_append(digest.crc, &bytes.0);
            // The values of the table's shape, a dropped column's as NULL: a copy that
            // left out what no shape reads holds the same rows.
            values.clear();
            row.copy_values(self.schema.columns.len(), &dead, &mut values);
            digest.crc = crc32c::crc32c_append(digest.crc, &values);
            digest.rows += 1;
            taken += 1;
            last = Some(key);
        }
        match last {
            Some(key) if taken == max_rows => {
                digest.resume = Some(key.to_vec());
                false
            }
            _ => true,
        }
    }

    pub fn schema(&self) -> &TableSchema {
        &self.schema
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn usage(&self) -> TableUsage {
        self.usage
    }

    /// Converts a JSON object into a row of this table, or says what is wrong.
    pub fn validate_upsert(
        &self,
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Row, String> {
        if let Some(unknown) = object.keys().find(|k| self.schema.column(k).is_none()) {
            return Err(format!(
                "unknown column {unknown:?} in table {:?}",
                self.schema.name
            ));
        }
        let row = Row::build(|row| {
            for column in &self.schema.columns {
                if column.dropped {
                    row.value(&Value::Null);
                    continue;
                }
                let json = object.get(&column.name);
                // Text, the common case, is copied once: into the row.
                if let (Some(serde_json::Value::String(s)), ColumnType::Text) = (json, column.ty) {
                    row.text(s);
                    continue;
                }
                let value = match json {
                    Some(json) => Value::from_json(json, column.ty)
                        .map_err(|e| format!("column {:?}: {e}", column.name))?,
                    None => Value::Null,
                };
                if value.is_null() && !column.nullable {
                    return Err(format!(
                        "column {:?} is part of the primary key and cannot be null or missing",
                        column.name
                    ));
                }
                row.value(&value);
            }
            Ok(())
        })?;
        check_row_limits(&self.schema, &row)?;
        Ok(row)
    }

    /// Checks a row a migration's transform made: what [`Table::check_writes`] checks,
    /// and the size limits [`Table::validate_upsert`] holds a client's row to (a
    /// transform can widen a row past them).
    pub fn check_transformed_row(&self, row: &Row) -> Result<(), String> {
        check_transformed_row(&self.schema, row)
    }

    /// Encodes the primary key named by a JSON object holding exactly the key columns.
    pub fn validate_key(
        &self,
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<u8>, String> {
        let mut values = Vec::with_capacity(self.schema.primary_key.len());
        for &p in &self.schema.primary_key {
            let column = &self.schema.columns[p];
            let json = object
                .get(&column.name)
                .ok_or_else(|| format!("primary key column {:?} is missing", column.name))?;
            let value = Value::from_json(json, column.ty)
                .map_err(|e| format!("column {:?}: {e}", column.name))?;
            if value.is_null() {
                return Err(format!(
                    "primary key column {:?} cannot be null",
                    column.name
                ));
            }
            values.push(value);
        }
        if let Some(extra) = object.keys().find(|k| {
            !self
                .schema
                .primary_key
                .iter()
                .any(|&p| self.schema.columns[p].name == **k)
        }) {
            return Err(format!(
                "{extra:?} is not a primary key column; a delete names only the key"
            ));
        }
        Ok(encode_key(values.iter()))
    }

    /// Validates a whole batch; the error names the first bad row.
    pub fn validate_batch(&self, ops: &[WriteOp]) -> Result<Vec<RowWrite>, EngineError> {
        if ops.len() > MAX_BATCH_ROWS {
            return Err(EngineError::LimitExceeded {
                what: "rows in one batch",
                actual: ops.len(),
                limit: MAX_BATCH_ROWS,
            });
        }
        ops.iter()
            .enumerate()
            .map(|(row, op)| {
                let written = match op {
                    WriteOp::Upsert(object) => self.validate_upsert(object).map(RowWrite::Upsert),
                    WriteOp::Delete(object) => self.validate_key(object).map(RowWrite::Delete),
                };
                written.map_err(|why| EngineError::InvalidRow { row, why })
            })
            .collect()
    }

    /// Checks writes that arrive already typed, decoded from the log or a checkpoint:
    /// every upsert must be a row [`Table::validate_upsert`] could have built (one value
    /// per column, of the column's type, vectors of its dimension, finite numbers, NULL
    /// only where allowed). Those bytes are untrusted: a row that does not fit would
    /// panic a key encoding, an index or a query later, far from where it came in.
    pub fn check_writes(&self, writes: &[RowWrite]) -> Result<(), EngineError> {
        for (row, write) in writes.iter().enumerate() {
            if let RowWrite::Upsert(values) = write {
                check_row(&self.schema, values)
                    .map_err(|why| EngineError::InvalidRow { row, why })?;
            }
        }
        Ok(())
    }

    /// Checks rows as a checkpoint stored them: a migration converts rows in place,
    /// appending its columns' values, so a stored row may hold more values than the
    /// table's columns (the migration that appended them checks them when it is
    /// restored; those of one that ended without a cutover are never read).
    pub(crate) fn check_stored_rows(&self, writes: &[RowWrite]) -> Result<(), EngineError> {
        for (row, write) in writes.iter().enumerate() {
            if let RowWrite::Upsert(values) = write {
                let columns = self.schema.columns.len();
                // A converted row holds its old slots and the new ones.
                let checked = if values.len() > 2 * MAX_COLUMNS_PER_TABLE {
                    Err(format!(
                        "{} values, above twice the {MAX_COLUMNS_PER_TABLE} columns a table \
                         may have",
                        values.len()
                    ))
                } else if values.len() < columns {
                    Err(format!(
                        "{} values for the {columns} columns of table {:?}",
                        values.len(),
                        self.schema.name
                    ))
                } else {
                    check_values(&self.schema, values)
                };
                checked.map_err(|why| EngineError::InvalidRow { row, why })?;
            }
        }
        Ok(())
    }

    /// Checks that the table agrees with itself: the row tree is well formed
    /// ([`KeyMap::check`]), each row is stored under its primary key, each index holds
    /// exactly one entry per row, and the usage counters match the rows. Returns the
    /// rows checked, or what disagrees (a restore drill runs it on every table it
    /// restores).
    pub fn check_integrity(&self) -> Result<usize, String> {
        self.rows
            .check()
            .map_err(|e| format!("the row tree is malformed: {e}"))?;
        let mut usage = TableUsage::default();
        for (key, row) in &self.rows {
            if key_of(row, &self.schema.primary_key) != *key {
                return Err("a row is stored under a key that is not its primary key".into());
            }
            usage.rows += 1;
            usage.bytes += row.stored_bytes();
            usage.vectors += row.vectors();
        }
        for (i, index) in self.schema.indexes.iter().enumerate() {
            let entries = &self.indexes[i];
            if entries.len() != self.rows.len() {
                return Err(format!(
                    "index {} has {} entries for {} rows",
                    index.name,
                    entries.len(),
                    self.rows.len()
                ));
            }
            for (key, row) in &self.rows {
                if !entries.contains(&(key_of(row, &index.columns), key.clone())) {
                    return Err(format!("index {} misses a row", index.name));
                }
            }
        }
        if usage != self.usage {
            return Err(format!(
                "usage says {} rows, {} bytes and {} vectors, the rows are {}, {} bytes and {} vectors",
                self.usage.rows,
                self.usage.bytes,
                self.usage.vectors,
                usage.rows,
                usage.bytes,
                usage.vectors
            ));
        }
        Ok(usage.rows)
    }

    /// Applies validated writes in order. Cannot fail: validation happened first.
    pub fn apply(&mut self, writes: Vec<RowWrite>, lsn: u64) -> BatchOutcome {
        self.written_lsn = lsn;
        let mut outcome = BatchOutcome::default();
        if writes.len() == 1 {
            // One row has nothing to overlap its cache misses with.
            for write in writes {
                self.apply_one(write, &mut outcome);
            }
            return outcome;
        }
        let mut writes = writes.into_iter();
        while writes.len() > 0 {
            let chunk = writes.len().min(PREFETCH_CHUNK);
            let keys: Vec<Key> = writes.as_slice()[..chunk]
                .iter()
                .map(|write| self.key_of_write(write))
                .collect();
            // Keys in ascending order (a checkpoint's rows, ids written in order) mostly
            // take the path the key before took, already in cache: asking for them
            // would walk the tree twice (checkpoint loads were 6.8 % slower). Scattered
            // ids sent sorted lose the prefetch; a hint is all it is.
            if !keys.is_sorted() {
                self.rows.prefetch_paths(&keys);
            }
            for (write, key) in writes.by_ref().take(chunk).zip(keys) {
                self.apply_keyed(write, key, &mut outcome);
            }
        }
        outcome
    }

    /// The key of the row `write` changes.
    fn key_of_write(&self, write: &RowWrite) -> Key {
        match write {
            RowWrite::Upsert(row) => key_of(row, &self.schema.primary_key),
            RowWrite::Delete(key) => Key::from_slice(key),
        }
    }

    /// Applies one validated write, counting it in `outcome` (the caller sets the
    /// written LSN).
    pub(crate) fn apply_one(&mut self, write: RowWrite, outcome: &mut BatchOutcome) {
        let key = self.key_of_write(&write);
        self.apply_keyed(write, key, outcome);
    }

    /// [`Table::apply_one`] with the key of the row `write` changes already made.
    fn apply_keyed(&mut self, write: RowWrite, key: Key, outcome: &mut BatchOutcome) {
        match write {
            RowWrite::Upsert(row) => {
                if self.upsert_row(key, row) {
                    outcome.updated += 1;
                } else {
                    outcome.inserted += 1;
                }
            }
            RowWrite::Delete(_) => match self.remove_row(&key) {
                Some(_) => outcome.deleted += 1,
                None => outcome.missing += 1,
            },
        }
    }

    /// Inserts the row at `key`, or replaces the one there in place, in one walk of
    /// the tree (replay and checkpoint loads do this for every row), touching only the
    /// index entries whose keys changed. True when a row was replaced.
    fn upsert_row(&mut self, key: Key, row: Row) -> bool {
        let Table {
            schema,
            rows,
            indexes,
            usage,
            moves,
            index_scans,
            deleted_in_batch,
            written_lsn,
            ..
        } = self;
        // Moves matter only to scans open now, of their index.
        let scanned = index_scans.iter().any(|n| n.load(Ordering::Relaxed) > 0);
        if !scanned && !moves.moves.is_empty() {
            moves.clear();
        }
        let replaced = rows.upsert(key, row, |key, old, row| {
            let deleted = match old {
                None if scanned => deleted_in_batch.take(*written_lsn, key),
                _ => None,
            };
            for (i, index) in schema.indexes.iter().enumerate() {
                let after = key_of(row, &index.columns);
                if let Some(Some(before)) = deleted.as_ref().map(|d| &d[i]) {
                    if *before != after && index_scans[i].load(Ordering::Relaxed) > 0 {
                        moves.record(IndexMove {
                            index: i,
                            before: before.clone(),
                            after: after.clone(),
                            row: key.clone(),
                        });
                    }
                }
                match old {
                    Some(old) => {
                        let before = key_of(old, &index.columns);
                        if before != after {
                            if scanned && index_scans[i].load(Ordering::Relaxed) > 0 {
                                moves.record(IndexMove {
                                    index: i,
                                    before: before.clone(),
                                    after: after.clone(),
                                    row: key.clone(),
                                });
                            }
                            let existed = indexes[i].remove(&(before, key.clone()));
                            debug_assert!(existed, "every row has its index entries");
                            indexes[i].insert((after, key.clone()));
                        }
                    }
                    None => {
                        let fresh = indexes[i].insert((after, key.clone()));
                        debug_assert!(fresh, "an index entry exists once");
                    }
                }
            }
            if let Some(old) = old {
                usage.bytes -= old.stored_bytes();
                usage.vectors -= old.vectors();
            } else {
                usage.rows += 1;
            }
            usage.bytes += row.stored_bytes();
            usage.vectors += row.vectors();
        });
        replaced.is_some()
    }

    fn remove_row(&mut self, key: &Key) -> Option<Row> {
        let row = self.rows.remove(key)?;
        let mut scanned_entries = Vec::new();
        for (i, index) in self.schema.indexes.iter().enumerate() {
            let entry = (key_of(&row, &index.columns), key.clone());
            let existed = self.indexes[i].remove(&entry);
            debug_assert!(existed, "every row has its index entries");
            if self.index_scans[i].load(Ordering::Relaxed) > 0 {
                scanned_entries.resize(i, None);
                scanned_entries.push(Some(entry.0));
            }
        }
        if !scanned_entries.is_empty() {
            scanned_entries.resize(self.indexes.len(), None);
            self.deleted_in_batch
                .note(self.written_lsn, key.clone(), scanned_entries);
        }
        self.usage.rows -= 1;
        self.usage.bytes -= row.stored_bytes();
        self.usage.vectors -= row.vectors();
        Some(row)
    }

    /// How applying `writes` would change this table's usage, exactly: each write is
    /// taken against the table as the batch's earlier writes left it (a delete and a
    /// re-insert of one key in one batch is an update, not a row freed).
    pub fn growth(&self, writes: &[RowWrite]) -> crate::quota::Growth {
        let mut g = crate::quota::Growth::default();
        let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let figures = |row: &Row| (signed(row.stored_bytes()), signed(row.vectors()));
        // Keys this batch wrote already: their (bytes, vectors) after it, None if deleted.
        let mut written: BTreeMap<Key, Option<(i64, i64)>> = BTreeMap::new();
        for write in writes {
            let (key, new) = match write {
                RowWrite::Upsert(row) => {
                    (key_of(row, &self.schema.primary_key), Some(figures(row)))
                }
                RowWrite::Delete(key) => (Key::new(key.clone()), None),
            };
            let old = match written.get(&key) {
                Some(earlier) => *earlier,
                None => self.rows.get(&key).map(figures),
            };
            g.rows += i64::from(new.is_some()) - i64::from(old.is_some());
            let (new_bytes, new_vectors) = new.unwrap_or_default();
            let (old_bytes, old_vectors) = old.unwrap_or_default();
            g.bytes = g.bytes.saturating_add(new_bytes - old_bytes);
            g.vectors += new_vectors - old_vectors;
            written.insert(key, new);
        }
        g
    }

    /// The most `writes` could add to any table: every upsert taken as a new row, every
    /// delete as removing nothing. Each figure is at least [`Table::growth`]'s, so a
    /// batch this admits the exact figure admits too; it looks nothing up (the exact
    /// figure's lookups cost as much as the apply's own on a large table).
    pub fn growth_bound(writes: &[RowWrite]) -> crate::quota::Growth {
        let mut g = crate::quota::Growth::default();
        let signed = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for write in writes {
            if let RowWrite::Upsert(row) = write {
                g.rows += 1;
                g.bytes = g.bytes.saturating_add(signed(row.stored_bytes()));
                g.vectors += signed(row.vectors());
            }
        }
        g
    }

    /// The row whose primary key is named by a JSON object of the key columns.
    pub fn get_by_json_key(
        &self,
        key: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<&Row>, String> {
        Ok(self.rows.get(&Key::new(self.validate_key(key)?)))
    }

    /// A row as a JSON object keyed by column name.
    pub fn row_to_json(&self, row: &Row) -> serde_json::Map<String, serde_json::Value> {
        row_to_json(&self.schema, row)
    }

    /// The row with this primary key (values in key-column order).
    pub fn get(&self, key: &[Value]) -> Option<&Row> {
        self.rows.get(&Key::new(encode_key(key.iter())))
    }

    /// Rows in primary-key order between two key prefixes (values of the leading key
    /// columns). `Included(p)` as an upper bound includes every key starting with `p`.
    pub fn scan_primary<'a>(
        &'a self,
        lower: Bound<&[Value]>,
        upper: Bound<&[Value]>,
    ) -> impl Iterator<Item = &'a Row> + 'a {
        let (start, skip, stop) = prefix_bounds(lower, upper);
        let start = start.map(Key::new);
        self.rows
            .range_from(start.as_ref())
            .skip_while(move |(k, _)| skip.as_ref().is_some_and(|p| k.as_bytes().starts_with(p)))
            .take_while(move |(k, _)| stop.admits(k.as_bytes()))
            .map(|(_, row)| row)
    }

    /// Rows in index order (ties in primary-key order) between two index-key prefixes.
    #[expect(
        clippy::expect_used,
        reason = "every index entry points at a live row (kept in step by every write)"
    )]
    pub fn scan_index<'a>(
        &'a self,
        index: &str,
        lower: Bound<&[Value]>,
        upper: Bound<&[Value]>,
    ) -> Result<impl Iterator<Item = &'a Row> + 'a, EngineError> {
        let position = self
            .schema
            .indexes
            .iter()
            .position(|i| i.name == index)
            .ok_or_else(|| EngineError::NotFound {
                what: "index",
                name: index.to_string(),
            })?;
        let (start, skip, stop) = prefix_bounds(lower, upper);
        let start = match start {
            Bound::Included(k) => Bound::Included((Key::new(k), Key::new(Vec::new()))),
            _ => Bound::Unbounded,
        };
        Ok(self.indexes[position]
            .range((start, Bound::Unbounded))
            .skip_while(move |(k, _)| skip.as_ref().is_some_and(|p| k.as_bytes().starts_with(p)))
            .take_while(move |(k, _)| stop.admits(k.as_bytes()))
            .map(|(_, pk)| self.rows.get(pk).expect("index entries point at live rows")))
    }

    /// The row with this encoded primary key.
    pub fn row_by_key(&self, key: &Key) -> Option<&Row> {
        self.rows.get(key)
    }

    /// A resumable scan over the primary key or an index between two key prefixes
    /// (values of the leading columns; `Included(p)` as an upper bound includes every
    /// key starting with `p`).
    pub fn range_scan(
        &self,
        target: ScanTarget,
        lower: Bound<&[Value]>,
        upper: Bound<&[Value]>,
    ) -> RangeScan {
        let (start, skip, stop) = prefix_bounds(lower, upper);
        RangeScan {
            target,
            start,
            skip,
            stop,
            resume: None,
            done: false,
            moves: None,
        }
    }

    /// Has the index scans in `scans` (one query's ranges, in key order, disjoint)
    /// account together for the rows that move in their index between their slices, so
    /// each row present throughout is returned once. `return_behind`: a row that moved
    /// behind them before they returned it is returned out of index order (not for a
    /// scan whose order is the answer's: it is missed instead).
    pub fn track_index_moves<'s>(
        &self,
        scans: impl IntoIterator<Item = &'s mut RangeScan>,
        return_behind: bool,
    ) {
        let scans: Vec<&mut RangeScan> = scans.into_iter().collect();
        let Some(ScanTarget::Index(index)) = scans.first().map(|s| s.target) else {
            return;
        };
        let Some(count) = self.index_scans.get(index) else {
            return;
        };
        count.fetch_add(1, Ordering::Relaxed);
        let bounds = scans
            .iter()
            .map(|s| ScanRange {
                start: s.start.clone(),
                skip: s.skip.clone(),
                stop: s.stop.clone(),
            })
            .collect();
        let shared = Rc::new(RefCell::new(IndexScanMoves {
            seen: self.moves.end(),
            cursor: None,
            bounds,
            finished: 0,
            returned: HashSet::new(),
            missed: HashSet::new(),
            behind: Vec::new(),
            return_behind,
            lost: false,
            open: (self.index_scans.clone(), index),
        }));
        for scan in scans {
            scan.moves = Some(shared.clone());
        }
    }

    /// Appends up to `max` more rows of `scan` to `out`, in key order; returns whether
    /// the scan is finished. Between calls the table may change: the scan resumes after
    /// the last key it returned, so a row present throughout is returned exactly once.
    #[expect(
        clippy::expect_used,
        reason = "every index entry points at a live row (kept in step by every write)"
    )]
    pub fn next_rows<'a>(
        &'a self,
        scan: &mut RangeScan,
        max: usize,
        out: &mut Vec<&'a Row>,
    ) -> bool {
        if scan.done {
            return true;
        }
        debug_assert!(max > 0, "a scan asked for no rows cannot tell it ended");
        let before = out.len();
        let mut last = None;
        match scan.target {
            ScanTarget::Primary => {
                let from_start = match scan.resume {
                    Some(_) => Bound::Unbounded,
                    None => scan.start.as_ref().map(|k| Key::from_slice(k)),
                };
                let start = match &scan.resume {
                    Some((pk, _)) => Bound::Excluded(pk),
                    None => from_start.as_ref(),
                };
                let skip = scan.skip.as_deref().filter(|_| scan.resume.is_none());
                for (k, row) in self
                    .rows
                    .range_from(start)
                    .skip_while(|(k, _)| skip.is_some_and(|p| k.as_bytes().starts_with(p)))
                {
                    if !scan.stop.admits(k.as_bytes()) {
                        scan.done = true;
                        break;
                    }
                    if out.len() - before == max {
                        break;
                    }
                    out.push(row);
                    last = Some(k);
                }
                if let Some(k) = last {
                    scan.resume = Some((k.clone(), Key::new(Vec::new())));
                }
                // Fewer rows than asked: the tree ended (a row added after it later
                // is one written meanwhile, which a scan may miss).
                if out.len() - before < max {
                    scan.done = true;
                }
            }
            ScanTarget::Index(i) => {
                let Some(index) = self.indexes.get(i) else {
                    scan.done = true;
                    return true;
                };
                let moves = scan.moves.clone();
                if let Some(moves) = &moves {
                    let mut moves = moves.borrow_mut();
                    moves.catch_up(&self.moves, i);
                    // Rows moved behind the scan before it reached them come first.
                    while out.len() - before < max {
                        let Some(key) = moves.behind.pop() else { break };
                        if let Some(row) = self.rows.get(&key) {
                            out.push(row);
                        }
                    }
                    if out.len() - before == max {
                        return false;
                    }
                }
                let start = match scan.resume.take() {
                    Some(entry) => Bound::Excluded(entry),
                    None => match &scan.start {
                        Bound::Included(k) => {
                            Bound::Included((Key::new(k.clone()), Key::new(Vec::new())))
                        }
                        _ => Bound::Unbounded,
                    },
                };
                let resumed = matches!(start, Bound::Excluded(_));
                let skip = scan.skip.as_deref().filter(|_| !resumed);
                let mut last_entry = None;
                for entry in index
                    .range((start, Bound::Unbounded))
                    .skip_while(|(k, _)| skip.is_some_and(|p| k.as_bytes().starts_with(p)))
                {
                    if !scan.stop.admits(entry.0.as_bytes()) {
                        scan.done = true;
                        break;
                    }
                    if out.len() - before == max {
                        break;
                    }
                    last_entry = Some(entry);
                    // Moved here after the scan passed it elsewhere: returned already.
                    if moves.as_ref().is_some_and(|m| {
                        let mut m = m.borrow_mut();
                        !m.returned.is_empty() && m.returned.remove(&entry.1)
                    }) {
                        continue;
                    }
                    out.push(
                        self.rows
                            .get(&entry.1)
                            .expect("index entries point at live rows"),
                    );
                }
                if let Some(entry) = last_entry {
                    scan.resume = Some(entry.clone());
                    if let Some(moves) = &moves {
                        moves.borrow_mut().cursor = Some(entry.clone());
                    }
                }
                if out.len() - before < max {
                    scan.done = true;
                }
                if let (true, Some(moves)) = (scan.done, &moves) {
                    // All of its range is behind the scans now, beyond its last entry too.
                    moves.borrow_mut().finished += 1;
                }
            }
        }
        scan.done
    }

    /// (encoded key, row) pairs after `after` in key order: a scan that can stop, yield
    /// and resume (from the last key it saw) while the table changes. The caller bounds
    /// how much it takes per turn, by rows and by bytes.
    pub fn rows_after<'a>(
        &'a self,
        after: Option<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a Row)> + 'a {
        let after = after.map(Key::from_slice);
        self.rows
            .range_from(after.as_ref().map_or(Bound::Unbounded, Bound::Excluded))
            .map(|(k, r)| (k.as_bytes(), r))
    }

    /// The encoded primary key of the last row, if any.
    pub fn last_key(&self) -> Option<&[u8]> {
        self.rows.last_key().map(Key::as_bytes)
    }

    /// Every row in primary-key order.
    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }
}

/// The indexes a migration's new shape has and its table does not: built over the
/// rows the migration has converted in place, then handed to the table at the cutover
/// ([`Table::cut_over`]). An index the new shape keeps as it is (same name, same column
/// slots) is the table's own already: it holds the same entries in either shape.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewStructures {
    /// (position in the new shape's indexes, its entries).
    indexes: Vec<(usize, BTreeSet<(Key, Key)>)>,
}

impl NewStructures {
    /// Empty structures for what `target` has and `table` lacks.
    pub(crate) fn new(table: &TableSchema, target: &TableSchema) -> Self {
        let indexes = target
            .indexes
            .iter()
            .enumerate()
            .filter(|(_, def)| !table.indexes.contains(def))
            .map(|(i, _)| (i, BTreeSet::new()))
            .collect();
        NewStructures { indexes }
    }

    /// About the resident bytes these take once they cover `rows` rows: an index entry
    /// (two keys in a B-tree node) about 128 bytes. (An appended vector lives in its
    /// row, whose bytes the migration counts as stored.)
    pub(crate) fn resident_estimate(&self, rows: usize) -> u64 {
        (128 * self.indexes.len() as u64).saturating_mul(rows as u64)
    }

    /// Adds the entries of a row converted to `target`'s shape.
    pub(crate) fn insert(&mut self, target: &TableSchema, row: &Row) {
        let key = key_of(row, &target.primary_key);
        for (i, entries) in &mut self.indexes {
            let fresh = entries.insert((key_of(row, &target.indexes[*i].columns), key.clone()));
            debug_assert!(fresh, "an index entry exists once");
        }
    }

    /// Takes out the entries of a converted row that is replaced or deleted.
    pub(crate) fn remove(&mut self, target: &TableSchema, row: &Row) {
        let key = key_of(row, &target.primary_key);
        for (i, entries) in &mut self.indexes {
            let existed = entries.remove(&(key_of(row, &target.indexes[*i].columns), key.clone()));
            debug_assert!(existed, "every converted row has its entries");
        }
    }
}

impl Table {
    /// Makes this table the new shape of a migration whose backfill converted every
    /// row in place: the schema changes, the indexes the new shape keeps stay, `built` supplies the others, and the table becomes incarnation
    /// `version`. No row is touched: the cost is that of the structures dropped, which
    /// go off the shard thread.
    pub(crate) fn cut_over(&mut self, target: TableSchema, built: NewStructures, version: u64) {
        let mut old_indexes: Vec<Option<BTreeSet<(Key, Key)>>> = std::mem::take(&mut self.indexes)
            .into_iter()
            .map(Some)
            .collect();
        let mut built_indexes = built.indexes;
        let mut indexes = Vec::with_capacity(target.indexes.len());
        for (i, def) in target.indexes.iter().enumerate() {
            let entries = match built_indexes.iter().position(|(at, _)| *at == i) {
                Some(at) => Some(built_indexes.swap_remove(at).1),
                None => self
                    .schema
                    .indexes
                    .iter()
                    .position(|old| old == def)
                    .and_then(|old| old_indexes[old].take()),
            };
            // Every index of the new shape is one of the two (NewStructures::new): an
            // empty one would answer queries wrongly from here on, so stop instead.
            let entries = entries
                .unwrap_or_else(|| panic!("the cutover found no entries for index {}", def.name));
            indexes.push(entries);
        }
        crate::reclaim::later(old_indexes);
        // Scans of the old shape end (the version changed): none of theirs counts here.
        self.index_scans = scan_counts(indexes.len());
        self.moves.clear();
        self.deleted_in_batch = DeletedInBatch::default();
        self.schema = target;
        self.indexes = indexes;
        self.version = version;
        // Every row changed shape here.
        self.written_lsn = version;
    }
}

/// What [`Table::check_transformed_row`] checks, against `schema` (a migration's new
/// shape, which has no table of its own until its cutover).
pub(crate) fn check_transformed_row(schema: &TableSchema, row: &Row) -> Result<(), String> {
    check_row(schema, row)?;
    check_row_limits(schema, row)
}

fn check_row(schema: &TableSchema, row: &Row) -> Result<(), String> {
    let columns = &schema.columns;
    if row.len() != columns.len() {
        return Err(format!(
            "{} values for the {} columns of table {:?}",
            row.len(),
            columns.len(),
            schema.name
        ));
    }
    check_values(schema, row)
}

/// Whether each value fits its column (values past the last column are not looked at).
fn check_values(schema: &TableSchema, row: &Row) -> Result<(), String> {
    for (value, column) in row.values().zip(&schema.columns) {
        if !value.fits(column.ty, column.nullable) {
            return Err(format!(
                "column {:?} ({}{}) cannot hold a {} value",
                column.name,
                column.ty,
                if column.nullable { "" } else { ", not null" },
                value.kind()
            ));
        }
    }
    Ok(())
}

/// The size limits of a row of `schema`: its bytes, its primary key's and each index
/// key's.
fn check_row_limits(schema: &TableSchema, row: &Row) -> Result<(), String> {
    // A dropped slot counts as the NULL a write stores there: a migration keeps the
    // old values of the columns it drops or retypes until its cutover, and those
    // count toward no limit. So a write's row is exactly this long.
    let bytes = if schema.columns.iter().any(|c| c.dropped) {
        row.shape_bytes(schema.columns.len(), |i| schema.columns[i].dropped)
    } else {
        row.stored_bytes()
    };
    if bytes > MAX_ROW_BYTES {
        return Err(format!(
            "row is {bytes} bytes, above the limit of {MAX_ROW_BYTES}"
        ));
    }
    let key = row.key_len(&schema.primary_key);
    if key > MAX_KEY_BYTES {
        return Err(format!(
            "primary key is {key} bytes encoded, above the limit of {MAX_KEY_BYTES}"
        ));
    }
    for index in &schema.indexes {
        let len = row.key_len(&index.columns);
        if len > MAX_KEY_BYTES {
            return Err(format!(
                "key of index {:?} is {len} bytes, above the limit of {MAX_KEY_BYTES}",
                index.name
            ));
        }
    }
    Ok(())
}

/// Which B-tree a [`RangeScan`] walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanTarget {
    Primary,
    /// The secondary index at this position in the schema.
    Index(usize),
}

/// A scan in progress (see [`Table::range_scan`]).
#[derive(Debug)]
pub struct RangeScan {
    target: ScanTarget,
    start: Bound<Vec<u8>>,
    /// Keys starting with this prefix are skipped at the start (an excluded lower bound).
    skip: Option<Vec<u8>>,
    stop: Stop,
    /// The last entry returned: (primary key, empty) or (index key, primary key).
    resume: Option<(Key, Key)>,
    done: bool,
    /// The account its query's index scans keep of the rows that moved meanwhile.
    moves: Option<Rc<RefCell<IndexScanMoves>>>,
}

impl RangeScan {
    /// More rows moved in the index while the scan was between two slices than the
    /// table keeps ([`MAX_INDEX_MOVES`]): it cannot tell which rows it returned.
    pub fn lost_moves(&self) -> bool {
        self.moves.as_ref().is_some_and(|m| m.borrow().lost)
    }
}

/// One scan's range of keys: from `start` (less those starting with `skip`, an
/// excluded lower bound) to `stop`.
#[derive(Debug)]
struct ScanRange {
    start: Bound<Vec<u8>>,
    skip: Option<Vec<u8>>,
    stop: Stop,
}

/// What one query's index scans need to return each row present throughout exactly
/// once while rows move in the index (their indexed value changes) between slices.
/// They resume after the last entry returned, so a row that moves from behind that
/// point to ahead of it would be returned twice, and one that moves from ahead to
/// behind would never be. At each slice the moves since the last one ([`MoveLog`]) are
/// gone through: a row returned already is skipped where it is found again, and a row
/// that went behind before it was returned is returned at once.
#[derive(Debug)]
struct IndexScanMoves {
    /// The next move to go through.
    seen: u64,
    /// The last entry returned, by any of the scans (they run in key order).
    cursor: Option<(Key, Key)>,
    /// Each scan's range, in key order.
    bounds: Vec<ScanRange>,
    /// The scans done (the first ones of `bounds`): their whole ranges are behind.
    finished: usize,
    /// Rows returned already (or put in `behind`) that moved ahead of the scans since:
    /// skipped where they are found.
    returned: HashSet<Key>,
    /// Rows that moved behind the scans unreturned while `return_behind` is off: not
    /// returned yet if they move ahead again.
    missed: HashSet<Key>,
    /// Rows that moved behind the scans before they returned them.
    behind: Vec<Key>,
    return_behind: bool,
    lost: bool,
    /// The table's counts of open scans per index, and this one's index: its count is
    /// held while this lives.
    open: (Arc<[AtomicUsize]>, usize),
}

impl IndexScanMoves {
    /// The scan whose range `entry` of the index lies in, if any (the ranges are in
    /// key order and disjoint: an IN list has thousands).
    fn range_of(&self, entry: &Key) -> Option<usize> {
        let bytes = entry.as_bytes();
        let after = self.bounds.partition_point(|r| match &r.start {
            Bound::Included(k) => k.as_slice() <= bytes,
            _ => true,
        });
        let at = after.checked_sub(1)?;
        let r = &self.bounds[at];
        (!r.skip.as_ref().is_some_and(|p| bytes.starts_with(p)) && r.stop.admits(bytes))
            .then_some(at)
    }

    /// Goes through the moves of index `index` since the last slice, with the scans at
    /// `cursor` (nothing returned yet: nothing to account for).
    fn catch_up(&mut self, log: &MoveLog, index: usize) {
        if self.seen < log.first {
            self.lost = true;
        }
        let from = ((self.seen.max(log.first) - log.first) as usize).min(log.moves.len());
        self.seen = log.end();
        let Some((at_entry, at_row)) = self.cursor.clone() else {
            return;
        };
        // Behind the scans: up to the last entry returned, or in a range they finished.
        let passed = |moves: &Self, entry: &Key, row: &Key| {
            (entry, row) <= (&at_entry, &at_row)
                || moves.range_of(entry).is_some_and(|r| r < moves.finished)
        };
        for m in log.moves.range(from..).filter(|m| m.index == index) {
            let behind = |at: &Key| passed(self, at, &m.row) && self.range_of(at).is_some();
            let (was_behind, now_behind) = (behind(&m.before), behind(&m.after));
            let ahead = !passed(self, &m.after, &m.row) && self.range_of(&m.after).is_some();
            // Returned already: found again ahead (to skip), or met where it was (or
            // returned from `behind`); not if it went behind unreturned earlier.
            let returned = if self.returned.remove(&m.row) {
                true
            } else if self.missed.remove(&m.row) {
                false
            } else {
                was_behind
            };
            if returned {
                if ahead {
                    // Not again where it went.
                    self.returned.insert(m.row.clone());
                }
            } else if now_behind {
                if self.return_behind {
                    self.behind.push(m.row.clone());
                } else {
                    self.missed.insert(m.row.clone());
                }
            }
        }
        // What it remembers is bounded like the log.
        if self.returned.len() + self.missed.len() > MAX_INDEX_MOVES {
            self.lost = true;
        }
    }
}

impl Drop for IndexScanMoves {
    fn drop(&mut self) {
        if let Some(count) = self.open.0.get(self.open.1) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Where a scan stops.
#[derive(Debug, Clone)]
enum Stop {
    Never,
    /// Keys below this (exclusive).
    Before(Vec<u8>),
    /// Keys up to this prefix, including every key that starts with it.
    Through(Vec<u8>),
}

impl Stop {
    fn admits(&self, key: &[u8]) -> bool {
        match self {
            Stop::Never => true,
            Stop::Before(p) => key < p.as_slice(),
            Stop::Through(p) => key <= p.as_slice() || key.starts_with(p),
        }
    }
}

/// Turns value-prefix bounds into (start key, prefix to skip at the start, stop rule).
fn prefix_bounds(
    lower: Bound<&[Value]>,
    upper: Bound<&[Value]>,
) -> (Bound<Vec<u8>>, Option<Vec<u8>>, Stop) {
    let encode = |values: &[Value]| encode_key(values.iter());
    let (start, skip) = match lower {
        Bound::Unbounded => (Bound::Unbounded, None),
        Bound::Included(v) => (Bound::Included(encode(v)), None),
        Bound::Excluded(v) => {
            let p = encode(v);
            (Bound::Included(p.clone()), Some(p))
        }
    };
    let stop = match upper {
        Bound::Unbounded => Stop::Never,
        Bound::Included(v) => Stop::Through(encode(v)),
        Bound::Excluded(v) => Stop::Before(encode(v)),
    };
    (start, skip, stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::ColumnType;

    /// An int key and a text column with an index on it.
    fn indexed_table() -> Table {
        let schema = TableSchema::new(
            "t",
            &[
                ("id", ColumnType::Int, false),
                ("g", ColumnType::Text, true),
            ],
            &["id"],
            &[("by_g", &["g"])],
        )
        .expect("schema");
        Table::new(schema, 1)
    }

    #[test]
    fn integrity_checks_find_a_missing_index_entry_and_wrong_usage() {
        let mut table = indexed_table();
        let ops: Vec<WriteOp> = (0..10)
            .map(|i| {
                let row = serde_json::json!({"id": i, "g": format!("g{}", i % 3)});
                WriteOp::Upsert(row.as_object().expect("object").clone())
            })
            .collect();
        let writes = table.validate_batch(&ops).expect("valid");
        table.apply(writes, 2);
        assert_eq!(table.check_integrity(), Ok(10));
        let entry = table.indexes[0].iter().next().cloned().expect("an entry");
        table.indexes[0].remove(&entry);
        assert!(table.check_integrity().is_err_and(|e| e.contains("by_g")));
        table.indexes[0].insert(entry);
        table.usage.rows += 1;
        assert!(table.check_integrity().is_err_and(|e| e.contains("usage")));
        table.usage.rows -= 1;
        table.usage.vectors += 1;
        assert!(table
            .check_integrity()
            .is_err_and(|e| e.contains("1 vectors")));
    }

    /// A batch longer than the rows asked for at once, of inserts, replacements,
    /// deletes and deletes of absent keys in scattered key order, applies every write
    /// once and in order: each id is written twice in a row (the later write must win)
    /// and some are then deleted in the same batch.
    #[test]
    fn a_batch_over_several_prefetch_chunks_applies_every_write_in_order() {
        let mut table = indexed_table();
        let scattered = |i: i64| (i * 7919) % 1000;
        let upsert = |id: i64, g: &str| {
            let row = serde_json::json!({"id": id, "g": g});
            WriteOp::Upsert(row.as_object().expect("object").clone())
        };
        let delete = |id: i64| {
            let key = serde_json::json!({"id": id});
            WriteOp::Delete(key.as_object().expect("object").clone())
        };
        let first: Vec<WriteOp> = (0..1000).map(|i| upsert(scattered(i), "a")).collect();
        let writes = table.validate_batch(&first).expect("valid");
        let outcome = table.apply(writes, 2);
        assert_eq!((outcome.inserted, outcome.updated), (1000, 0));

        let n = 3 * PREFETCH_CHUNK as i64 + 5;
        let mut ops = Vec::new();
        for i in 0..n {
            ops.push(upsert(scattered(i), "b"));
            ops.push(upsert(scattered(i), "c"));
            ops.push(upsert(1000 + i, "new"));
            if i % 3 == 0 {
                ops.push(delete(scattered(i)));
                ops.push(delete(5000 + i));
            }
        }
        let writes = table.validate_batch(&ops).expect("valid");
        let outcome = table.apply(writes, 3);
        let thirds = (0..n).step_by(3).count();
        assert_eq!(
            (outcome.inserted, outcome.updated),
            (n as usize, 2 * n as usize)
        );
        assert_eq!((outcome.deleted, outcome.missing), (thirds, thirds));
        assert_eq!(table.check_integrity(), Ok(1000 + n as usize - thirds));
        let g = |id: i64| {
            let key = Key::new(encode_key(&[Value::Int(id)]));
            table.rows.get(&key).map(|row| row.get(1).to_value())
        };
        for i in 0..n {
            let expected = (i % 3 != 0).then(|| Value::Text("c".into()));
            assert_eq!(g(scattered(i)), expected, "id {}", scattered(i));
            assert_eq!(g(1000 + i), Some(Value::Text("new".into())));
        }
        assert_eq!(g(scattered(n)), Some(Value::Text("a".into())));
    }
}

#[cfg(test)]
mod digest_tests {
    use super::*;
    use crate::value::ColumnType;

    fn table() -> Table {
        let schema = TableSchema::new(
            "t",
            &[
                ("id", ColumnType::Int, false),
                ("g", ColumnType::Text, true),
            ],
            &["id"],
            &[],
        )
        .expect("schema");
        Table::new(schema, 1)
    }

    fn write(table: &mut Table, rows: &[(i64, &str)], lsn: u64) {
        let ops: Vec<WriteOp> = rows
            .iter()
            .map(|(id, g)| {
                let row = serde_json::json!({"id": id, "g": g});
                WriteOp::Upsert(row.as_object().expect("object").clone())
            })
            .collect();
        let writes = table.validate_batch(&ops).expect("valid");
        table.apply(writes, lsn);
    }

    fn whole(table: &Table) -> TableDigest {
        let mut d = TableDigest::default();
        assert!(table.digest_rows(&mut d, usize::MAX));
        d
    }

    #[test]
    fn same_rows_same_digest_whatever_the_history_and_the_slicing() {
        let mut a = table();
        write(&mut a, &[(1, "x"), (2, "y"), (3, "z")], 2);
        let mut b = table();
        write(&mut b, &[(3, "z"), (2, "old")], 2);
        write(&mut b, &[(1, "x"), (2, "y")], 3);
        assert_eq!(
            (whole(&a).rows, whole(&a).crc),
            (whole(&b).rows, whole(&b).crc)
        );
        assert_eq!((a.written_lsn(), b.written_lsn()), (2, 3));
        // Two rows per slice: the same digest.
        let mut sliced = TableDigest::default();
        let mut slices = 0;
        while !b.digest_rows(&mut sliced, 2) {
            slices += 1;
        }
        assert_eq!((sliced.rows, sliced.crc, slices), (3, whole(&a).crc, 1));
        // One value differs: the digest differs.
        write(&mut b, &[(2, "Y")], 4);
        assert_ne!(whole(&a).crc, whole(&b).crc);
        assert_eq!(table().written_lsn(), 1, "a new table: its creation's LSN");
    }
}

/// A row of `schema` as a JSON object, column name to value.
pub fn row_to_json(schema: &TableSchema, row: &Row) -> serde_json::Map<String, serde_json::Value> {
    schema
        .columns
        .iter()
        .zip(row.values())
        .filter(|(column, _)| !column.dropped)
        .map(|(column, value)| (column.name.clone(), value.to_value().to_json()))
        .collect()
}
