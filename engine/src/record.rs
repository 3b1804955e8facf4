//! The byte encoding of [`Command`]s inside WAL frames (FORMAT.md §5). The frame
//! carries the tenant id as its tenant tag and the command's kind as its record kind;
//! the payload starts with a format version byte. Every decode checks lengths before
//! slicing and re-validates schemas: a record never panics the decoder.

use oc_io::RecordKind;

use crate::command::Command;
use crate::schema::TableSchema;
use crate::table::RowWrite;
use crate::value::{ColumnType, Value};

/// Payload format version of every engine record.
pub const RECORD_FORMAT_VERSION: u8 = 1;

pub const KIND_CREATE_TENANT: RecordKind = RecordKind(1);
pub const KIND_DROP_TENANT: RecordKind = RecordKind(2);
pub const KIND_CREATE_TABLE: RecordKind = RecordKind(3);
pub const KIND_DROP_TABLE: RecordKind = RecordKind(4);
pub const KIND_WRITE: RecordKind = RecordKind(5);
pub const KIND_CREATE_API_KEY: RecordKind = RecordKind(6);
pub const KIND_REVOKE_API_KEY: RecordKind = RecordKind(7);

// Value tags.
const V_NULL: u8 = 0;
const V_BOOL: u8 = 1;
const V_INT: u8 = 2;
const V_FLOAT: u8 = 3;
const V_TEXT: u8 = 4;
const V_JSON: u8 = 5;
const V_VECTOR: u8 = 6;
// Column type tags.
const T_TEXT: u8 = 1;
const T_INT: u8 = 2;
const T_FLOAT: u8 = 3;
const T_BOOL: u8 = 4;
const T_JSON: u8 = 5;
const T_VECTOR: u8 = 6;
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

/// Encodes a command into its record kind and payload.
pub fn encode(command: &Command) -> (RecordKind, Vec<u8>) {
    let mut w = Writer(vec![RECORD_FORMAT_VERSION]);
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
                        w.u16(row.len() as u16);
                        for v in row {
                            w.value(v);
                        }
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
    };
    (kind, w.0)
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
                    W_UPSERT => {
                        let n = r.u16()? as usize;
                        let mut row = Vec::with_capacity(n.min(r.remaining()));
                        for _ in 0..n {
                            row.push(r.value()?);
                        }
                        RowWrite::Upsert(row)
                    }
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
    pub(crate) fn str16(&mut self, s: &str) {
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn bytes32(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    pub(crate) fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.u8(V_NULL),
            Value::Bool(b) => {
                self.u8(V_BOOL);
                self.u8(u8::from(*b));
            }
            Value::Int(i) => {
                self.u8(V_INT);
                self.u64(*i as u64);
            }
            Value::Float(f) => {
                self.u8(V_FLOAT);
                self.u64(f.to_bits());
            }
            Value::Text(s) => {
                self.u8(V_TEXT);
                self.bytes32(s.as_bytes());
            }
            Value::Json(s) => {
                self.u8(V_JSON);
                self.bytes32(s.as_bytes());
            }
            Value::Vector(v) => {
                self.u8(V_VECTOR);
                self.u32(v.len() as u32);
                for x in v {
                    self.0.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    pub(crate) fn schema(&mut self, s: &TableSchema) {
        self.str16(&s.name);
        self.u16(s.columns.len() as u16);
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
            self.u8(u8::from(c.nullable));
        }
        self.u8(s.primary_key.len() as u8);
        for &p in &s.primary_key {
            self.u16(p as u16);
        }
        self.u8(s.indexes.len() as u8);
        for index in &s.indexes {
            self.str16(&index.name);
            self.u8(index.columns.len() as u8);
            for &p in &index.columns {
                self.u16(p as u16);
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
    pub(crate) fn value(&mut self) -> Result<Value, RecordError> {
        Ok(match self.u8()? {
            V_NULL => Value::Null,
            V_BOOL => Value::Bool(self.u8()? != 0),
            V_INT => Value::Int(self.u64()? as i64),
            V_FLOAT => Value::Float(f64::from_bits(self.u64()?)),
            V_TEXT => {
                let b = self.bytes32()?;
                Value::Text(self.utf8(b)?)
            }
            V_JSON => {
                let b = self.bytes32()?;
                Value::Json(self.utf8(b)?)
            }
            V_VECTOR => {
                let n = self.u32()? as usize;
                let raw = self.take(
                    n.checked_mul(4)
                        .ok_or_else(|| self.error("vector too long".into()))?,
                )?;
                Value::Vector(
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
                        .collect(),
                )
            }
            other => return Err(self.error(format!("bad value tag {other}"))),
        })
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
            columns.push((col, ty, self.u8()? != 0));
        }
        let positions = |r: &mut Self| -> Result<Vec<String>, RecordError> {
            let n = r.u8()? as usize;
            (0..n)
                .map(|_| {
                    let p = r.u16()? as usize;
                    columns
                        .get(p)
                        .map(|c| c.0.clone())
                        .ok_or_else(|| r.error(format!("column position {p} out of range")))
                })
                .collect()
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
        let cols: Vec<(&str, ColumnType, bool)> = columns
            .iter()
            .map(|(n, t, b)| (n.as_str(), *t, *b))
            .collect();
        let pk: Vec<&str> = primary_key.iter().map(String::as_str).collect();
        let index_cols: Vec<Vec<&str>> = indexes
            .iter()
            .map(|(_, c)| c.iter().map(String::as_str).collect())
            .collect();
        let ix: Vec<(&str, &[&str])> = indexes
            .iter()
            .zip(&index_cols)
            .map(|((n, _), c)| (n.as_str(), c.as_slice()))
            .collect();
        TableSchema::new(&name, &cols, &pk, &ix).map_err(|e| self.error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                    RowWrite::Upsert(vec![
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
        ]
    }

    #[test]
    fn every_command_round_trips() {
        for c in commands() {
            let (kind, payload) = encode(&c);
            assert_eq!(decode(kind, &payload), Ok(c));
        }
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

    proptest! {
        #[test]
        fn decode_never_panics(kind in 0u16..8, bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(RecordKind(kind), &bytes);
        }
    }
}
