//! The byte encoding of [`Command`]s inside WAL frames (FORMAT.md §5). The frame
//! carries the tenant id as its tenant tag and the command's kind as its record kind;
//! the payload starts with a format version byte. Every decode checks lengths before
//! slicing and re-validates schemas: a record never panics the decoder.
//!
//! About 500 lines of code; the rest are unit tests (round trips and hostile bytes).

use oc_io::wal::frame::frame_len;
use oc_io::RecordKind;

use crate::api_key::{MAX_API_KEYS_PER_TENANT, MAX_KEY_ID_BYTES, MAX_KEY_NAME_BYTES};
use crate::command::Command;
use crate::idempotency;
use crate::limits::{
    MAX_BATCH_ROWS, MAX_COLUMNS_PER_TABLE, MAX_INDEXES_PER_TABLE, MAX_KEY_BYTES, MAX_KEY_COLUMNS,
    MAX_NAME_BYTES, MAX_ROW_BYTES, MAX_VECTOR_DIM,
};
use crate::migration::Layout;
use crate::row::Row;
use crate::schema::{Column, TableSchema};
use crate::table::RowWrite;
use crate::tenant_id::MAX_TENANT_ID_BYTES;
use crate::value::ColumnType;

/// Payload format version of every engine record.
pub const RECORD_FORMAT_VERSION: u8 = 1;

// Every length or count this module (and the checkpoint) narrows to a fixed width is
// bounded by a limit that fits the width: a legal value is never truncated on disk.
// Raising a limit past its width fails the build here, not a restore later.
const _: () = assert!(MAX_NAME_BYTES <= u16::MAX as usize); // str16 names
const _: () = assert!(idempotency::MAX_KEY_BYTES <= u16::MAX as usize); // str16 key
const _: () = assert!(MAX_KEY_ID_BYTES <= u16::MAX as usize); // str16 key id
const _: () = assert!(MAX_KEY_NAME_BYTES <= u16::MAX as usize); // str16 key name
const _: () = assert!(MAX_API_KEYS_PER_TENANT <= u16::MAX as usize); // u16 count (§6)
const _: () = assert!(MAX_COLUMNS_PER_TABLE <= u16::MAX as usize); // u16 value count, positions
const _: () = assert!(MAX_KEY_COLUMNS <= u8::MAX as usize); // u8 key column count
const _: () = assert!(MAX_INDEXES_PER_TABLE <= u8::MAX as usize); // u8 index count
const _: () = assert!(MAX_BATCH_ROWS <= u32::MAX as usize); // u32 write count
const _: () = assert!(MAX_ROW_BYTES <= u32::MAX as usize); // bytes32 text, u32 vector length
const _: () = assert!(MAX_KEY_BYTES <= u32::MAX as usize); // bytes32 delete key
const _: () = assert!(MAX_VECTOR_DIM as usize <= MAX_ROW_BYTES);

/// Bytes a row takes inside a record: its `u16` value count, then its values.
/// [`Value::stored_bytes`] is exactly a value's encoding, so this is what
/// `MAX_ROW_BYTES` bounds, plus 2 (a test holds the two together).
pub fn row_entry_bytes(row: &Row) -> usize {
    row.encoded().len()
}

/// Payload bytes of a write record before its first row write, at most: version,
/// table name, table version, idempotency flag and key, write count.
pub const WRITE_HEAD_MAX_BYTES: usize =
    1 + (2 + MAX_NAME_BYTES) + 8 + 1 + (2 + idempotency::MAX_KEY_BYTES) + 4;
/// The largest row write: the upsert tag and a row of `MAX_ROW_BYTES` (a delete, tag
/// plus `bytes32` key, is far smaller).
pub const ROW_WRITE_MAX_BYTES: usize = 1 + 2 + MAX_ROW_BYTES;
const _: () = assert!(1 + 4 + MAX_KEY_BYTES <= ROW_WRITE_MAX_BYTES);
/// The log record (frame included) of a one-row write of the largest legal row, with
/// the longest tenant, table and idempotency key. The log's record limit must never
/// fall below it, or a legal row could not be written at all: `oc-server` refuses a
/// segment size that would put it there.
pub const MAX_ONE_ROW_RECORD_BYTES: usize = frame_len(
    MAX_TENANT_ID_BYTES,
    WRITE_HEAD_MAX_BYTES + ROW_WRITE_MAX_BYTES,
);
/// The longest schema encoding (below): every limit of `TableSchema` at its maximum.
pub const SCHEMA_MAX_BYTES: usize = (2 + MAX_NAME_BYTES)
    + 2
    + MAX_COLUMNS_PER_TABLE * ((2 + MAX_NAME_BYTES) + 1 + 4 + 1)
    + 1
    + 2 * MAX_KEY_COLUMNS
    + 1
    + MAX_INDEXES_PER_TABLE * ((2 + MAX_NAME_BYTES) + 1 + 2 * MAX_KEY_COLUMNS);
// Every command other than a write batch fits under the record limit's floor, so a
// write batch is the only command a legal request can make too large for the log.
const _: () =
    assert!(frame_len(MAX_TENANT_ID_BYTES, 1 + SCHEMA_MAX_BYTES) <= MAX_ONE_ROW_RECORD_BYTES);
const _: () = assert!(
    frame_len(
        MAX_TENANT_ID_BYTES,
        1 + (2 + MAX_KEY_ID_BYTES) + (2 + MAX_KEY_NAME_BYTES) + 32
    ) <= MAX_ONE_ROW_RECORD_BYTES
);

pub const KIND_CREATE_TENANT: RecordKind = RecordKind(1);
pub const KIND_DROP_TENANT: RecordKind = RecordKind(2);
pub const KIND_CREATE_TABLE: RecordKind = RecordKind(3);
pub const KIND_DROP_TABLE: RecordKind = RecordKind(4);
pub const KIND_WRITE: RecordKind = RecordKind(5);
pub const KIND_CREATE_API_KEY: RecordKind = RecordKind(6);
pub const KIND_REVOKE_API_KEY: RecordKind = RecordKind(7);
pub const KIND_START_MIGRATION: RecordKind = RecordKind(8);
pub const KIND_BACKFILL: RecordKind = RecordKind(9);
pub const KIND_CUTOVER: RecordKind = RecordKind(10);
pub const KIND_ABORT_MIGRATION: RecordKind = RecordKind(11);
/// A start of a migration whose columns keep their slots (kind 8 is one an earlier
/// build started, which cuts over to the compact layout).
pub const KIND_START_MIGRATION_IN_PLACE: RecordKind = RecordKind(12);
// Migration records fit under the record limit's floor too.
const _: () = assert!(
    frame_len(
        MAX_TENANT_ID_BYTES,
        1 + (2 + MAX_NAME_BYTES) + 8 + 4 + crate::migration::MAX_STEPS_JSON_BYTES
    ) <= MAX_ONE_ROW_RECORD_BYTES
);
const _: () = assert!(
    frame_len(
        MAX_TENANT_ID_BYTES,
        1 + (2 + MAX_NAME_BYTES) + 8 + 4 + MAX_KEY_BYTES
    ) <= MAX_ONE_ROW_RECORD_BYTES
);

// Column type tags.
const T_TEXT: u8 = 1;
const T_INT: u8 = 2;
const T_FLOAT: u8 = 3;
const T_BOOL: u8 = 4;
const T_JSON: u8 = 5;
const T_VECTOR: u8 = 6;
/// A column's flags byte: bit 0 nullable, bit 1 dropped (FORMAT.md §5).
const COLUMN_FLAGS: u8 = 0b11;
// Row write tags.
const W_UPSERT: u8 = 1;
const W_DELETE: u8 = 2;

/// Why a payload does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {kind:?} record at byte {at}: {why}")]
pub struct RecordError {
    pub kind: RecordKind,
    pub at: usize,
    pub why: String,
}

/// The payload length of a write, exactly, so its buffer is allocated once at its size:
/// grown by doubling, each of the shard's writes reallocated a few times, and
/// glibc's search for those odd sizes among the freed ones cost 9 % of a saturated
/// shard's time (`perf` of `oc-bench engine`'s pool phase). Other commands are small.
fn payload_len_hint(command: &Command) -> usize {
    match command {
        Command::Write {
            table,
            writes,
            idempotency_key,
            ..
        } => {
            let rows: usize = writes
                .iter()
                .map(|w| match w {
                    RowWrite::Upsert(row) => 1 + row_entry_bytes(row),
                    RowWrite::Delete(key) => 1 + 4 + key.len(),
                })
                .sum();
            1 + (2 + table.len())
                + 8
                + 1
                + idempotency_key.as_ref().map_or(0, |k| 2 + k.len())
                + 4
                + rows
        }
        _ => 64,
    }
}

/// Encodes a command into its record kind and payload.
pub fn encode(command: &Command) -> (RecordKind, Vec<u8>) {
    let mut w = Writer(Vec::with_capacity(payload_len_hint(command)));
    w.u8(RECORD_FORMAT_VERSION);
    let kind = match command {
        Command::CreateTenant => KIND_CREATE_TENANT,
        Command::DropTenant => KIND_DROP_TENANT,
        Command::CreateTable(schema) => {
            w.schema(schema);
            KIND_CREATE_TABLE
        }
        Command::DropTable { table } => {
            w.str16(table);
            KIND_DROP_TABLE
        }
        Command::Write {
            table,
            table_version,
            writes,
            idempotency_key,
        } => {
            w.str16(table);
            w.u64(*table_version);
            match idempotency_key {
                Some(k) => {
                    w.u8(1);
                    w.str16(k);
                }
                None => w.u8(0),
            }
            w.u32(writes.len() as u32);
            for write in writes {
                match write {
                    RowWrite::Upsert(row) => {
                        w.u8(W_UPSERT);
                        w.row(row);
                    }
                    RowWrite::Delete(key) => {
                        w.u8(W_DELETE);
                        w.bytes32(key);
                    }
                }
            }
            KIND_WRITE
        }
        Command::CreateApiKey {
            key_id,
            name,
            secret_sha256,
        } => {
            w.str16(key_id);
            w.str16(name);
            w.0.extend_from_slice(secret_sha256);
            KIND_CREATE_API_KEY
        }
        Command::RevokeApiKey { key_id } => {
            w.str16(key_id);
            KIND_REVOKE_API_KEY
        }
        Command::StartMigration {
            table,
            table_version,
            steps,
            layout,
        } => {
            w.str16(table);
            w.u64(*table_version);
            w.bytes32(crate::migration::steps_json(steps).as_bytes());
            match layout {
                Layout::InPlace => KIND_START_MIGRATION_IN_PLACE,
                Layout::Compact => KIND_START_MIGRATION,
            }
        }
        Command::Backfill { table, id, upto } => {
            w.str16(table);
            w.u64(*id);
            w.bytes32(upto);
            KIND_BACKFILL
        }
        Command::Cutover { table, id } => {
            w.str16(table);
            w.u64(*id);
            KIND_CUTOVER
        }
        Command::AbortMigration { table, id } => {
            w.str16(table);
            w.u64(*id);
            KIND_ABORT_MIGRATION
        }
    };
    (kind, w.0)
}

/// The hash an idempotency key remembers of a keyed write: [`idempotency::request_hash`]
/// of the write's record as if it had no key and table version 0, so the same rows to
/// the same table hash the same whatever the key and the table's version. It is read
/// off the record's bytes, so a write's hash is computed once, from what is logged
/// (live, at recovery, and on a follower alike). `None` for any other record.
pub fn write_request_hash(kind: RecordKind, payload: &[u8]) -> Option<u64> {
    if kind != KIND_WRITE {
        return None;
    }
    let version = payload.first()?;
    let table_len = usize::from(u16::from_le_bytes(payload.get(1..3)?.try_into().ok()?));
    let table_end = 3 + table_len;
    let table = payload.get(1..table_end)?;
    let flag_at = table_end + 8;
    if *payload.get(flag_at)? != 1 {
        return None;
    }
    let key_len = usize::from(u16::from_le_bytes(
        payload.get(flag_at + 1..flag_at + 3)?.try_into().ok()?,
    ));
    let rest = payload.get(flag_at + 3 + key_len..)?;
    // version, table, table version 0, no key, then the rows exactly as logged.
    Some(idempotency::request_hash_joined(&[
        std::slice::from_ref(version),
        table,
        &[0; 9],
        rest,
    ]))
}

/// Decodes a record payload of `kind`.
pub fn decode(kind: RecordKind, payload: &[u8]) -> Result<Command, RecordError> {
    let mut r = Reader::new(kind, payload);
    let version = r.u8()?;
    if version != RECORD_FORMAT_VERSION {
        return Err(r.error(format!("unsupported record version {version}")));
    }
    let command = match kind {
        KIND_CREATE_TENANT => Command::CreateTenant,
        KIND_DROP_TENANT => Command::DropTenant,
        KIND_CREATE_TABLE => Command::CreateTable(r.schema()?),
        KIND_DROP_TABLE => Command::DropTable { table: r.str16()? },
        KIND_WRITE => {
            let table = r.str16()?;
            let table_version = r.u64()?;
            let idempotency_key = match r.u8()? {
                0 => None,
                1 => Some(r.str16()?),
                other => return Err(r.error(format!("bad idempotency flag {other}"))),
            };
            let count = r.u32()? as usize;
            let mut writes = Vec::with_capacity(count.min(r.remaining()));
            for _ in 0..count {
                writes.push(match r.u8()? {
                    W_UPSERT => RowWrite::Upsert(r.row()?),
                    W_DELETE => RowWrite::Delete(r.bytes32()?.to_vec()),
                    other => return Err(r.error(format!("bad row write tag {other}"))),
                });
            }
            Command::Write {
                table,
                table_version,
                writes,
                idempotency_key,
            }
        }
        KIND_CREATE_API_KEY => Command::CreateApiKey {
            key_id: r.str16()?,
            name: r.str16()?,
            secret_sha256: r.array()?,
        },
        KIND_REVOKE_API_KEY => Command::RevokeApiKey { key_id: r.str16()? },
        KIND_START_MIGRATION | KIND_START_MIGRATION_IN_PLACE => {
            let table = r.str16()?;
            let table_version = r.u64()?;
            let json = r.bytes32()?;
            let steps = crate::migration::parse_steps(json)
                .map_err(|why| r.error(format!("bad migration steps: {why}")))?;
            Command::StartMigration {
                table,
                table_version,
                steps,
                layout: if kind == KIND_START_MIGRATION {
                    Layout::Compact
                } else {
                    Layout::InPlace
                },
            }
        }
        KIND_BACKFILL => Command::Backfill {
            table: r.str16()?,
            id: r.u64()?,
            upto: r.bytes32()?.to_vec(),
        },
        KIND_CUTOVER => Command::Cutover {
            table: r.str16()?,
            id: r.u64()?,
        },
        KIND_ABORT_MIGRATION => Command::AbortMigration {
            table: r.str16()?,
            id: r.u64()?,
        },
        other => return Err(r.error(format!("unknown record kind {}", other.0))),
    };
    r.finish()?;
    Ok(command)
}

/// Little-endian payload writer shared by WAL records and checkpoint records.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u16` count; the limits asserted at the top of this module keep every count
    /// in range, and a count out of range would corrupt the record, so it stops here.
    pub(crate) fn count16(&mut self, n: usize) {
        assert!(n <= usize::from(u16::MAX), "count {n} does not fit a u16");
        self.u16(n as u16);
    }
    /// A `u8` count (see [`Writer::count16`]).
    pub(crate) fn count8(&mut self, n: usize) {
        assert!(n <= usize::from(u8::MAX), "count {n} does not fit a u8");
        self.u8(n as u8);
    }
    pub(crate) fn str16(&mut self, s: &str) {
        self.count16(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn bytes32(&mut self, b: &[u8]) {
        assert!(
            b.len() <= u32::MAX as usize,
            "{} bytes do not fit a u32",
            b.len()
        );
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    /// A row as [`row_entry_bytes`] counts it: `u16` value count, then the values.
    pub(crate) fn row(&mut self, row: &Row) {
        self.0.extend_from_slice(row.encoded());
    }
    /// The first `n` values of a row (all of it when it holds no more) as a row, NULL
    /// in each slot `dead` marks (see [`Row::copy_values`]).
    pub(crate) fn row_values(&mut self, row: &Row, n: usize, dead: &[bool]) {
        if n >= row.len() && dead.is_empty() {
            return self.row(row);
        }
        self.count16(n.min(row.len()));
        row.copy_values(n, dead, &mut self.0);
    }
    pub(crate) fn schema(&mut self, s: &TableSchema) {
        self.str16(&s.name);
        self.count16(s.columns.len());
        for c in &s.columns {
            self.str16(&c.name);
            match c.ty {
                ColumnType::Text => self.u8(T_TEXT),
                ColumnType::Int => self.u8(T_INT),
                ColumnType::Float => self.u8(T_FLOAT),
                ColumnType::Bool => self.u8(T_BOOL),
                ColumnType::Json => self.u8(T_JSON),
                ColumnType::Vector(d) => {
                    self.u8(T_VECTOR);
                    self.u32(d);
                }
            }
            self.u8(u8::from(c.nullable) | (u8::from(c.dropped) << 1));
        }
        self.count8(s.primary_key.len());
        for &p in &s.primary_key {
            self.count16(p);
        }
        self.count8(s.indexes.len());
        for index in &s.indexes {
            self.str16(&index.name);
            self.count8(index.columns.len());
            for &p in &index.columns {
                self.count16(p);
            }
        }
    }
}

/// Bounds-checked payload reader shared by WAL records and checkpoint records.
pub(crate) struct Reader<'a> {
    kind: RecordKind,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(kind: RecordKind, bytes: &'a [u8]) -> Self {
        Reader { kind, bytes, at: 0 }
    }

    /// Fails if bytes are left over.
    pub(crate) fn finish(&self) -> Result<(), RecordError> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }

    pub(crate) fn error(&self, why: String) -> RecordError {
        RecordError {
            kind: self.kind,
            at: self.at,
            why,
        }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if n > self.remaining() {
            return Err(self.error(format!("needs {n} more bytes, {} left", self.remaining())));
        }
        let slice = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }
    #[expect(
        clippy::expect_used,
        reason = "take returned exactly the bytes asked for; chunks_exact yields 4-byte chunks"
    )]
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn utf8(&mut self, bytes: &[u8]) -> Result<String, RecordError> {
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error("text is not UTF-8".into()))
    }
    pub(crate) fn str16(&mut self) -> Result<String, RecordError> {
        let n = self.u16()? as usize;
        let bytes = self.take(n)?;
        self.utf8(bytes)
    }
    pub(crate) fn bytes32(&mut self) -> Result<&'a [u8], RecordError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// A row as [`Writer::row`] writes it, checked (`Row::read`).
    pub(crate) fn row(&mut self) -> Result<Row, RecordError> {
        match Row::read(&self.bytes[self.at..]) {
            Ok((row, len)) => {
                self.at += len;
                Ok(row)
            }
            Err((at, why)) => {
                self.at += at;
                Err(self.error(why))
            }
        }
    }
    pub(crate) fn schema(&mut self) -> Result<TableSchema, RecordError> {
        let name = self.str16()?;
        let n = self.u16()? as usize;
        let mut columns = Vec::with_capacity(n.min(self.remaining()));
        for _ in 0..n {
            let col = self.str16()?;
            let ty = match self.u8()? {
                T_TEXT => ColumnType::Text,
                T_INT => ColumnType::Int,
                T_FLOAT => ColumnType::Float,
                T_BOOL => ColumnType::Bool,
                T_JSON => ColumnType::Json,
                T_VECTOR => ColumnType::Vector(self.u32()?),
                other => return Err(self.error(format!("bad column type tag {other}"))),
            };
            let flags = self.u8()?;
            if flags > COLUMN_FLAGS {
                return Err(self.error(format!("bad column flags {flags}")));
            }
            columns.push(Column {
                name: col,
                ty,
                nullable: flags & 1 != 0,
                dropped: flags & 2 != 0,
            });
        }
        let positions = |r: &mut Self| -> Result<Vec<usize>, RecordError> {
            let n = r.u8()? as usize;
            (0..n).map(|_| Ok(r.u16()? as usize)).collect()
        };
        let primary_key = positions(self)?;
        let n = self.u8()? as usize;
        let mut indexes = Vec::with_capacity(n);
        for _ in 0..n {
            let index = self.str16()?;
            indexes.push((index, positions(self)?));
        }
        // Rebuilt through the validating constructor: what was checked before logging
        // is checked again after reading.
        TableSchema::from_slots(&name, columns, primary_key, indexes)
            .map_err(|e| self.error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;
    use proptest::prelude::*;

    /// The hash a key has always remembered, as first defined: the write's record
    /// with table version 0 and no key, encoded again.
    fn hash_by_reencoding(table: &str, writes: &[RowWrite]) -> u64 {
        let body = Command::Write {
            table: table.to_string(),
            table_version: 0,
            writes: writes.to_vec(),
            idempotency_key: None,
        };
        idempotency::request_hash(&[&encode(&body).1])
    }

    proptest! {
        /// Read off the logged bytes, the hash equals the one checkpoints and
        /// remembered keys already hold, whatever the key and the table version.
        #[test]
        fn the_hash_of_the_logged_bytes_is_the_remembered_one(
            table in "[a-z]{1,20}",
            key in proptest::option::of("[ -~]{1,128}"),
            table_version in any::<u64>(),
            ids in proptest::collection::vec(any::<i64>(), 0..20),
            text in "[ -~]{0,40}",
        ) {
            let writes: Vec<RowWrite> = ids
                .iter()
                .map(|&id| RowWrite::upsert(&[Value::Int(id), Value::Text(text.clone())]))
                .chain([RowWrite::Delete(text.as_bytes().to_vec())])
                .collect();
            let command = Command::Write {
                table: table.clone(),
                table_version,
                writes: writes.clone(),
                idempotency_key: key.clone(),
            };
            let (kind, payload) = encode(&command);
            let expected = key.as_ref().map(|_| hash_by_reencoding(&table, &writes));
            prop_assert_eq!(write_request_hash(kind, &payload), expected);
            // Cut anywhere, the bytes give no hash or the same one, never a panic.
            for cut in 0..payload.len() {
                let _ = write_request_hash(kind, &payload[..cut]);
            }
        }
    }

    #[test]
    fn only_keyed_writes_have_a_request_hash() {
        let (kind, payload) = encode(&Command::CreateTenant);
        assert_eq!(write_request_hash(kind, &payload), None);
        let (kind, payload) = encode(&Command::DropTable {
            table: "items".into(),
        });
        assert_eq!(write_request_hash(kind, &payload), None);
    }

    fn schema() -> TableSchema {
        TableSchema::new(
            "items",
            &[
                ("id", ColumnType::Int, false),
                ("name", ColumnType::Text, true),
                ("emb", ColumnType::Vector(2), true),
                ("doc", ColumnType::Json, true),
                ("ok", ColumnType::Bool, true),
                ("f", ColumnType::Float, true),
            ],
            &["id"],
            &[("by_name", &["name", "ok"])],
        )
        .expect("valid")
    }

    fn commands() -> Vec<Command> {
        vec![
            Command::CreateTenant,
            Command::DropTenant,
            Command::CreateTable(schema()),
            Command::DropTable {
                table: "items".into(),
            },
            Command::Write {
                table: "items".into(),
                table_version: 42,
                idempotency_key: Some("req-1".into()),
                writes: vec![
                    RowWrite::upsert(&[
                        Value::Int(-5),
                        Value::Text("a\0b".into()),
                        Value::Vector(vec![1.5, -2.0]),
                        Value::Json("{\"k\":1}".into()),
                        Value::Bool(true),
                        Value::Float(0.25),
                    ]),
                    RowWrite::Delete(vec![2, 0x80, 0, 0, 0, 0, 0, 0, 1]),
                ],
            },
            Command::CreateApiKey {
                key_id: "k7f3a".into(),
                name: "ci runner".into(),
                secret_sha256: [0xab; 32],
            },
            Command::RevokeApiKey {
                key_id: "k7f3a".into(),
            },
            start_migration(Layout::InPlace),
            start_migration(Layout::Compact),
        ]
    }

    fn start_migration(layout: Layout) -> Command {
        Command::StartMigration {
            table: "items".into(),
            table_version: 3,
            steps: crate::migration::parse_steps(br#"[{"op":"drop_column","name":"doc"}]"#)
                .expect("steps"),
            layout,
        }
    }

    fn fixture(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("fixture is hex"))
            .collect()
    }

    /// `tools/golden_fixtures.py` encodes these independently of this module.
    #[test]
    fn golden_bytes_of_a_schema_with_dropped_slots_and_of_a_start_match_the_fixtures() {
        let column = |name: &str, ty, nullable, dropped| crate::schema::Column {
            name: name.into(),
            ty,
            nullable,
            dropped,
        };
        let schema = TableSchema::from_slots(
            "items",
            vec![
                column("id", ColumnType::Int, false, false),
                column("name", ColumnType::Text, true, true),
                column("n", ColumnType::Text, true, true),
                column("n", ColumnType::Int, true, false),
                column("name", ColumnType::Text, true, false),
            ],
            vec![0],
            vec![("by_n".into(), vec![3])],
        )
        .expect("valid");
        let create = Command::CreateTable(schema);
        let expected = fixture(include_str!(
            "../tests/fixtures/create_table_with_dropped_slots_v1.hex"
        ));
        assert_eq!(encode(&create), (KIND_CREATE_TABLE, expected.clone()));
        assert_eq!(decode(KIND_CREATE_TABLE, &expected), Ok(create));
        let expected = fixture(include_str!("../tests/fixtures/start_migration_v1.hex"));
        for (layout, kind) in [
            (Layout::Compact, KIND_START_MIGRATION),
            (Layout::InPlace, KIND_START_MIGRATION_IN_PLACE),
        ] {
            assert_eq!(encode(&start_migration(layout)), (kind, expected.clone()));
            assert_eq!(decode(kind, &expected), Ok(start_migration(layout)));
        }
    }

    /// Kind 8 is a start an earlier build logged, which cut over to the compact layout;
    /// this build logs kind 12.
    #[test]
    fn a_start_records_its_layout_in_its_kind() {
        assert_eq!(
            encode(&start_migration(Layout::Compact)).0,
            KIND_START_MIGRATION
        );
        assert_eq!(
            encode(&start_migration(Layout::InPlace)).0,
            KIND_START_MIGRATION_IN_PLACE
        );
    }

    #[test]
    fn every_command_round_trips() {
        for c in commands() {
            let (kind, payload) = encode(&c);
            assert_eq!(decode(kind, &payload), Ok(c));
        }
    }

    /// A migrated shape: a dropped slot whose name a live column took again.
    #[test]
    fn a_schema_with_dropped_slots_round_trips_and_bad_flags_are_refused() {
        let mut columns = schema().columns;
        columns[1].dropped = true;
        columns.push(crate::schema::Column {
            name: "name".into(),
            ty: ColumnType::Int,
            nullable: true,
            dropped: false,
        });
        let migrated =
            TableSchema::from_slots("items", columns, vec![0], Vec::new()).expect("valid");
        assert_eq!(migrated.column("name"), Some(6));
        let (kind, payload) = encode(&Command::CreateTable(migrated.clone()));
        assert_eq!(decode(kind, &payload), Ok(Command::CreateTable(migrated)));
        // The flags byte of the dropped slot (after its name and type tag) is 3.
        let at = payload
            .windows(6)
            .position(|w| w == b"\x04\0name")
            .expect("the dropped slot's name")
            + 6;
        assert_eq!((payload[at], payload[at + 1]), (T_TEXT, 0b11));
        let mut bad = payload.clone();
        bad[at + 1] = 4;
        let refused = decode(kind, &bad).expect_err("unknown flag");
        assert!(
            refused.to_string().contains("bad column flags 4"),
            "{refused}"
        );
    }

    #[test]
    fn truncated_and_trailing_payloads_are_refused() {
        for c in commands() {
            let (kind, payload) = encode(&c);
            for cut in 0..payload.len() {
                assert!(
                    decode(kind, &payload[..cut]).is_err(),
                    "{kind:?} cut at {cut}"
                );
            }
            let mut longer = payload.clone();
            longer.push(0);
            assert!(decode(kind, &longer).is_err());
        }
        assert!(decode(RecordKind(99), &[RECORD_FORMAT_VERSION]).is_err());
        assert!(decode(KIND_CREATE_TENANT, &[2]).is_err(), "unknown version");
    }

    #[test]
    fn a_values_stored_bytes_are_exactly_its_encoding() {
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Int(-1),
            Value::Float(0.5),
            Value::Text("héllo".into()),
            Value::Json("{\"a\":[1,2]}".into()),
            Value::Vector(vec![1.0, 2.0, 3.0]),
        ] {
            let row = Row::from_values(std::slice::from_ref(&v));
            assert_eq!(row.encoded_values().len(), v.stored_bytes(), "{v:?}");
        }
        let row = Row::from_values(&[Value::Int(1), Value::Text("abc".into()), Value::Null]);
        let mut w = Writer(Vec::new());
        w.row(&row);
        assert_eq!(w.0.len(), row_entry_bytes(&row));
        assert_eq!(row_entry_bytes(&row), 2 + 9 + 8 + 1);
    }

    /// A one-row write at every limit at once: longest tenant, table and key, and a row
    /// of exactly `MAX_ROW_BYTES`.
    #[test]
    fn the_largest_one_row_write_is_exactly_the_record_floor() {
        let text = "x".repeat(MAX_ROW_BYTES - Value::Text(String::new()).stored_bytes());
        let row = vec![Value::Text(text)];
        assert_eq!(
            row.iter().map(Value::stored_bytes).sum::<usize>(),
            MAX_ROW_BYTES
        );
        let command = Command::Write {
            table: "t".repeat(MAX_NAME_BYTES),
            table_version: u64::MAX,
            writes: vec![RowWrite::Upsert(Row::from_values(&row))],
            idempotency_key: Some("k".repeat(idempotency::MAX_KEY_BYTES)),
        };
        let (kind, payload) = encode(&command);
        assert_eq!(
            frame_len(MAX_TENANT_ID_BYTES, payload.len()),
            MAX_ONE_ROW_RECORD_BYTES
        );
        assert_eq!(payload_len_hint(&command), payload.len());
        let without_key = Command::Write {
            table: "t".into(),
            table_version: 7,
            writes: vec![
                RowWrite::upsert(&[Value::Int(1), Value::Null]),
                RowWrite::Delete(vec![2, 0, 1]),
            ],
            idempotency_key: None,
        };
        assert_eq!(payload_len_hint(&without_key), encode(&without_key).1.len());
        assert_eq!(decode(kind, &payload), Ok(command));
    }

    #[test]
    fn a_schema_at_every_limit_encodes_within_the_bound() {
        let names: Vec<String> = (0..MAX_COLUMNS_PER_TABLE)
            .map(|i| format!("c{i:0>width$}", width = MAX_NAME_BYTES - 1))
            .collect();
        let columns: Vec<(&str, ColumnType, bool)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let ty = if i < MAX_KEY_COLUMNS * 2 {
                    ColumnType::Int
                } else {
                    ColumnType::Vector(MAX_VECTOR_DIM)
                };
                (n.as_str(), ty, i >= MAX_KEY_COLUMNS)
            })
            .collect();
        let pk: Vec<&str> = names[..MAX_KEY_COLUMNS]
            .iter()
            .map(String::as_str)
            .collect();
        let index_cols: Vec<&str> = names[MAX_KEY_COLUMNS..2 * MAX_KEY_COLUMNS]
            .iter()
            .map(String::as_str)
            .collect();
        let index_names: Vec<String> = (0..MAX_INDEXES_PER_TABLE)
            .map(|i| format!("i{i:0>width$}", width = MAX_NAME_BYTES - 1))
            .collect();
        let indexes: Vec<(&str, &[&str])> = index_names
            .iter()
            .map(|n| (n.as_str(), index_cols.as_slice()))
            .collect();
        let schema = TableSchema::new(&"s".repeat(MAX_NAME_BYTES), &columns, &pk, &indexes)
            .expect("a schema at the limits is valid");
        let (kind, payload) = encode(&Command::CreateTable(schema.clone()));
        // Only the key columns, which cannot be vectors, lack a `u32` dimension.
        assert_eq!(
            payload.len(),
            1 + SCHEMA_MAX_BYTES - 2 * MAX_KEY_COLUMNS * 4,
            "the bound is the real maximum"
        );
        assert_eq!(decode(kind, &payload), Ok(Command::CreateTable(schema)));
    }

    proptest! {
        #[test]
        fn decode_never_panics(kind in 0u16..8, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(RecordKind(kind), &bytes);
        }
    }
}
