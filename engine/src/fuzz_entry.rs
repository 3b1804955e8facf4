//! Entry points shared by the cargo-fuzz targets in `fuzz/` (`record_decode`,
//! `checkpoint_load`) and the corpus replay tests `cargo test` runs on stable: the same
//! code sees the same inputs in both. Each returns on any bytes; a panic is a bug, and
//! so is an allocation far larger than the input (a length field is checked against the
//! bytes that hold it before anything is reserved for it).
//!
//! Decoding alone is not the whole risk: a record or snapshot that decodes is then
//! *applied*, and the state it builds is *read*. Both entries go that far, because a
//! row the decoder accepts but the table cannot hold panics later, in replay or in a
//! query, not in the decoder.
#![allow(
    clippy::expect_used,
    reason = "a fuzz harness: its fixtures are valid by construction, and a failed expectation on fuzzed input is the finding"
)]

use oc_io::wal::frame::{self, Epoch, Frame, Lsn, RecordKind, TimestampMicros, MAX_TENANT_BYTES};
use oc_io::{align_up, IoBuffer, SimFaults, SimStorage, Storage, StorageFile, BLOCK_SIZE};

use crate::apply::{apply, ShardState};
use crate::checkpoint;
use crate::command::Command;
use crate::query::{ask_now, AskLimits};
use crate::record;
use crate::schema::TableSchema;
use crate::table::RowWrite;
use crate::tenant_id::TenantId;
use crate::value::{ColumnType, Value};

/// The tenant every fixture command is for.
pub const FIXTURE_TENANT: &str = "fuzz";
/// The fixture table: one column of every type, a two-column primary key, two indexes.
pub const FIXTURE_TABLE: &str = "t";
/// The LSN that created the fixture table, so its `table_version` (a write record
/// must name it to reach the rows).
pub const FIXTURE_TABLE_VERSION: u64 = 2;
/// The LSN a fuzzed snapshot claims when it has no frame to take one from.
const DEFAULT_SNAPSHOT_LSN: Lsn = Lsn(7);

/// The fixture table's schema.
pub fn fixture_schema() -> TableSchema {
    TableSchema::new(
        FIXTURE_TABLE,
        &[
            ("id", ColumnType::Int, false),
            ("name", ColumnType::Text, false),
            ("score", ColumnType::Float, true),
            ("ok", ColumnType::Bool, true),
            ("doc", ColumnType::Json, true),
            ("emb", ColumnType::Vector(3), true),
        ],
        &["id", "name"],
        &[("by_name", &["name"]), ("by_score", &["score", "ok"])],
    )
    .expect("the fixture schema is valid")
}

/// The commands that build the fixture: the tenant, its table, two rows and an API
/// key. Applied in order from LSN 1, the table is created at
/// [`FIXTURE_TABLE_VERSION`].
pub fn fixture_commands() -> Vec<Command> {
    let row = |id: i64, name: &str, emb: [f32; 3]| {
        RowWrite::Upsert(crate::row::Row::from_values(&[
            Value::Int(id),
            Value::Text(name.into()),
            Value::Float(1.5),
            Value::Bool(true),
            Value::Json("{\"k\":[1,2]}".into()),
            Value::Vector(emb.to_vec()),
        ]))
    };
    vec![
        Command::CreateTenant,
        Command::CreateTable(fixture_schema()),
        Command::Write {
            table: FIXTURE_TABLE.into(),
            table_version: FIXTURE_TABLE_VERSION,
            writes: vec![row(1, "a", [1.0, 0.0, 0.0]), row(2, "b", [0.0, 1.0, 0.0])],
            idempotency_key: Some("seed".into()),
        },
        Command::CreateApiKey {
            key_id: "k1".into(),
            name: "ci".into(),
            secret_sha256: [0xab; 32],
        },
    ]
}

/// A shard state holding the fixture, built through [`apply`] as replay builds it.
pub fn fixture() -> (TenantId, ShardState) {
    let tenant = TenantId::parse(FIXTURE_TENANT).expect("a valid tenant id");
    let mut state = ShardState::default();
    for command in fixture_commands() {
        let lsn = state.applied_lsn.next();
        apply(&mut state, &tenant, lsn, TimestampMicros(lsn.0), command)
            .expect("the fixture applies");
    }
    assert_eq!(
        state.tenants[&tenant]
            .table(FIXTURE_TABLE)
            .map(|t| t.version())
            .ok(),
        Some(FIXTURE_TABLE_VERSION)
    );
    (tenant, state)
}

/// Splits `bytes` into records `[kind: u8][len: u16 LE][payload]`; the last one takes
/// what is left when its length runs past the end.
fn records(mut bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&kind, rest) = bytes.split_first()?;
        let (payload, after) = field16(rest);
        bytes = after;
        Some((kind, payload))
    })
}

/// WAL record payloads through the decoder, then applied to the fixture as replay
/// applies them. Input: records `[kind: u8][len: u16 LE][payload]...`. A payload that
/// decodes must encode back to as many bytes, and encoding must be a fixed point.
pub fn record_decode(bytes: &[u8]) {
    let (tenant, mut state) = fixture();
    for (kind, payload) in records(bytes) {
        let kind = RecordKind(u16::from(kind));
        let Ok(command) = record::decode(kind, payload) else {
            continue;
        };
        let (encoded_kind, encoded) = record::encode(&command);
        assert_eq!(
            encoded_kind, kind,
            "a command encodes to the kind it came from"
        );
        assert_eq!(
            encoded.len(),
            payload.len(),
            "a decoded command re-encodes to as many bytes"
        );
        let again = record::decode(kind, &encoded).expect("an encoded command decodes");
        assert_eq!(
            record::encode(&again).1,
            encoded,
            "encoding is a fixed point"
        );
        let lsn = state.applied_lsn.next();
        // A refused command is a result, not a failure: replay ignores it the same way.
        let _ = apply(&mut state, &tenant, lsn, TimestampMicros(lsn.0), command);
    }
    read_everything(&state);
}

/// A checkpoint through its loader. The first byte picks how the rest is used:
/// - `0`: snapshot bytes through the frame-by-frame decoder, at the LSN of the first
///   frame (so a valid snapshot reaches its records);
/// - `1`: records `[kind: u8][tenant_len: u8][tenant][len: u16 LE][payload]...`, each
///   framed with a valid CRC in its place, through the same decoder (so the fuzzer
///   explores record payloads instead of CRCs);
/// - `2`: `[manifest_len: u16 LE][manifest][snapshot]` written as a checkpoint's two
///   files on a simulated disk and loaded as a shard's open loads them (listing,
///   manifest JSON, sizes, CRC, then the snapshot).
pub fn checkpoint_load(bytes: &[u8]) {
    let Some((&mode, rest)) = bytes.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let lsn = frame::decode(rest).map_or(DEFAULT_SNAPSHOT_LSN, |f| f.lsn);
            if let Ok(state) = checkpoint::decode_snapshot(rest, lsn) {
                assert_eq!(state.applied_lsn, lsn);
                read_everything(&state);
            }
        }
        1 => {
            let snapshot = frame_records(rest, DEFAULT_SNAPSHOT_LSN);
            if let Ok(state) = checkpoint::decode_snapshot(&snapshot, DEFAULT_SNAPSHOT_LSN) {
                assert_eq!(state.applied_lsn, DEFAULT_SNAPSHOT_LSN);
                read_everything(&state);
            }
        }
        _ => load_files(rest),
    }
}

/// Splits off a `[len: u16 LE][bytes]` field; a length past the end takes what is left.
fn field16(bytes: &[u8]) -> (&[u8], &[u8]) {
    let (declared, rest) = match bytes.split_first_chunk::<2>() {
        Some((len, rest)) => (usize::from(u16::from_le_bytes(*len)), rest),
        None => (bytes.len(), &[][..]),
    };
    rest.split_at(declared.min(rest.len()))
}

/// Frames checkpoint records in order at `lsn`, as the checkpoint writer does.
fn frame_records(mut bytes: &[u8], lsn: Lsn) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    let mut index = 0u32;
    while let [kind, tenant_len, rest @ ..] = bytes {
        let tenant_len = usize::from(*tenant_len)
            .min(MAX_TENANT_BYTES)
            .min(rest.len());
        let (tenant, rest) = rest.split_at(tenant_len);
        let (payload, rest) = field16(rest);
        out.extend_from_slice(&frame::encode(&Frame {
            lsn,
            commit_ts: TimestampMicros(0),
            epoch: Epoch(1),
            group_index: index,
            kind: RecordKind(u16::from(*kind).max(1)),
            tenant,
            payload,
        }));
        index += 1;
        bytes = rest;
    }
    out
}

/// Writes a manifest and a snapshot as checkpoint files and loads them. The files are
/// named for the LSN of the snapshot's first frame, as the checkpoint writer names them.
fn load_files(bytes: &[u8]) {
    let (manifest, snapshot) = field16(bytes);
    let lsn = frame::decode(snapshot).map_or(DEFAULT_SNAPSHOT_LSN, |f| f.lsn);
    let storage = SimStorage::new(0, SimFaults::default());
    futures_lite::future::block_on(async {
        // Padded as the writer pads them: the manifest with spaces, the snapshot with zeroes.
        write_file(&storage, &checkpoint::manifest_name(lsn), manifest, b' ').await;
        write_file(&storage, &checkpoint::snapshot_name(lsn), snapshot, 0).await;
        let listed = checkpoint::list_checkpoints(&storage)
            .await
            .expect("the simulated disk lists");
        assert_eq!(listed, [lsn]);
        if let Ok(loaded) = checkpoint::load_checkpoint(&storage, lsn).await {
            read_everything(&loaded.0);
        }
    });
}

/// Creates `name` holding `bytes`, padded with `pad` to a whole block.
async fn write_file(storage: &SimStorage, name: &str, bytes: &[u8], pad: u8) {
    let len = align_up(bytes.len() as u64).max(BLOCK_SIZE as u64);
    let file = storage
        .create(name, len)
        .await
        .expect("the simulated disk creates");
    let mut buf = storage.alloc_buffer(len as usize);
    let out = buf.as_bytes_mut();
    out[..bytes.len()].copy_from_slice(bytes);
    out[bytes.len()..].fill(pad);
    file.write_at(buf, 0)
        .await
        .expect("the simulated disk writes");
}

/// Reads a state the way the API would: every row as JSON, usage, a full scan of each
/// table and a nearest-neighbour search over each vector column.
pub fn read_everything(state: &ShardState) {
    for tenant in state.tenants.values() {
        let _ = tenant.usage();
        for table in tenant.tables() {
            for row in table.rows() {
                let _ = table.row_to_json(row);
            }
            let schema = table.schema();
            let scan = format!("SELECT * FROM {}", schema.name);
            let _ = ask_now(tenant, &scan, Vec::new(), AskLimits::default());
            for (_, column) in schema.live_columns() {
                if let ColumnType::Vector(dim) = column.ty {
                    let knn = format!(
                        "SELECT * FROM {} ORDER BY {} <-> $1 LIMIT 3",
                        schema.name, column.name
                    );
                    let query = Value::Vector(vec![0.5; dim as usize]);
                    let _ = ask_now(tenant, &knn, vec![query], AskLimits::default());
                }
            }
        }
    }
}
