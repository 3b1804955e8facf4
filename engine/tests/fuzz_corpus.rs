//! Replays the engine's fuzz corpora (`fuzz/corpus/query_parser`, `record_decode`,
//! `checkpoint_load`) through the fuzz targets' entry points, so `cargo test` on
//! stable covers what the fuzzers keep.
//!
//! `OC_WRITE_CORPUS=1 cargo test -p oc-engine --test fuzz_corpus` (re)writes the seed
//! files made with the engine's own encoders and a real checkpoint (see
//! `write_seed_corpus`).

use std::path::{Path, PathBuf};

use oc_engine::checkpoint::{manifest_name, snapshot_name};
use oc_engine::command::Command;
use oc_engine::fuzz_entry::{
    self, fixture_commands, fixture_schema, FIXTURE_TABLE, FIXTURE_TABLE_VERSION,
};
use oc_engine::table::RowWrite;
use oc_engine::{record, Shard, TenantId, Value, WriteOp};
use oc_io::executor::run_local;
use oc_io::wal::frame;
use oc_io::{SimFaults, SimStorage, WalConfig};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut count = 0;
    for entry_path in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry_path.expect("corpus entry").path();
        let bytes = std::fs::read(&path).expect("corpus file");
        let outcome = std::panic::catch_unwind(|| entry(&bytes));
        assert!(outcome.is_ok(), "{target} panicked on {}", path.display());
        count += 1;
    }
    count
}

#[test]
fn query_parser_corpus_replays_without_panics() {
    let count = replay("query_parser", oc_engine::query::fuzz_entry);
    assert!(count >= 20, "the seed corpus is committed ({count} files)");
}

#[test]
fn record_decode_corpus_replays_without_panics() {
    let count = replay("record_decode", fuzz_entry::record_decode);
    assert!(count >= 6, "the corpus is committed ({count} files)");
}

#[test]
fn checkpoint_load_corpus_replays_without_panics() {
    let count = replay("checkpoint_load", fuzz_entry::checkpoint_load);
    assert!(count >= 6, "the corpus is committed ({count} files)");
}

/// `[kind: u8][len: u16 LE][payload]`, the `record_decode` input of one command.
fn record_input(command: &Command) -> Vec<u8> {
    let (kind, payload) = record::encode(command);
    let mut out = vec![u8::try_from(kind.0).expect("engine record kinds fit a byte")];
    out.extend_from_slice(
        &u16::try_from(payload.len())
            .expect("seeds are small")
            .to_le_bytes(),
    );
    out.extend_from_slice(&payload);
    out
}

fn write_to_fixture(writes: Vec<RowWrite>, key: Option<&str>) -> Command {
    Command::Write {
        table: FIXTURE_TABLE.into(),
        table_version: FIXTURE_TABLE_VERSION,
        writes,
        idempotency_key: key.map(str::to_string),
    }
}

/// Seeds for `record_decode`: every command kind, encoded by the engine, one per file,
/// and a sequence that creates, writes, drops and creates again.
fn record_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let row = |id: i64, name: &str| {
        oc_engine::Row::from_values(&[
            Value::Int(id),
            Value::Text(name.into()),
            Value::Float(-0.25),
            Value::Null,
            Value::Json("[1,{\"a\":null}]".into()),
            Value::Vector(vec![0.0, 0.5, -1.0]),
        ])
    };
    let upserts = write_to_fixture(
        vec![RowWrite::Upsert(row(3, "c")), RowWrite::Upsert(row(1, "a"))],
        None,
    );
    let delete_key = oc_engine::value::encode_key([&Value::Int(2), &Value::Text("b".into())]);
    let deletes = write_to_fixture(
        vec![
            RowWrite::Delete(delete_key),
            RowWrite::Delete(vec![0xff; 3]),
        ],
        Some("req-7"),
    );
    let commands = [
        ("create_tenant", Command::CreateTenant),
        ("drop_tenant", Command::DropTenant),
        ("create_table", Command::CreateTable(fixture_schema())),
        (
            "drop_table",
            Command::DropTable {
                table: FIXTURE_TABLE.into(),
            },
        ),
        ("write_upserts", upserts.clone()),
        ("write_deletes", deletes.clone()),
        (
            "create_api_key",
            Command::CreateApiKey {
                key_id: "k2".into(),
                name: "deploy bot".into(),
                secret_sha256: [7; 32],
            },
        ),
        (
            "revoke_api_key",
            Command::RevokeApiKey {
                key_id: "k1".into(),
            },
        ),
    ];
    let mut seeds: Vec<(&'static str, Vec<u8>)> = commands
        .iter()
        .map(|(name, c)| (*name, record_input(c)))
        .collect();
    let mut sequence = Vec::new();
    for c in [
        Command::DropTable {
            table: FIXTURE_TABLE.into(),
        },
        Command::CreateTable(fixture_schema()),
        // The table is created again at LSN 6: a write naming the fixture's version is
        // refused, one naming 6 applies.
        write_to_fixture(vec![RowWrite::Upsert(row(9, "z"))], None),
        Command::Write {
            table: FIXTURE_TABLE.into(),
            table_version: 6,
            writes: vec![RowWrite::Upsert(row(9, "z"))],
            idempotency_key: Some("again".into()),
        },
        upserts,
        deletes,
    ] {
        sequence.extend(record_input(&c));
    }
    seeds.push(("sequence", sequence));
    seeds.push((
        "fixture",
        fixture_commands().iter().flat_map(record_input).collect(),
    ));
    seeds
}

/// A real checkpoint of the fixture plus a second tenant and an idempotency key,
/// written by a shard on a simulated disk: (manifest, snapshot data).
fn real_checkpoint() -> (Vec<u8>, Vec<u8>) {
    run_local(async {
        let storage = SimStorage::new(1, SimFaults::default());
        let (shard, _) = Shard::open(storage.clone(), WalConfig::default())
            .await
            .expect("open");
        let fuzz = TenantId::parse(oc_engine::fuzz_entry::FIXTURE_TENANT).expect("valid");
        let other = TenantId::parse("other").expect("valid");
        for tenant in [&fuzz, &other] {
            shard.create_tenant(tenant).await.expect("tenant");
            shard
                .create_table(tenant, fixture_schema())
                .await
                .expect("table");
        }
        let ops: Vec<WriteOp> = (0..5)
            .map(|i| {
                let row = serde_json::json!({
                    "id": i, "name": format!("n{i}"), "score": i as f64 / 2.0,
                    "ok": i % 2 == 0, "doc": {"i": i}, "emb": [i, 1, 0],
                });
                WriteOp::Upsert(row.as_object().expect("object").clone())
            })
            .collect();
        shard
            .write(&fuzz, FIXTURE_TABLE, &ops, Some("seed-key".into()))
            .await
            .expect("write");
        shard
            .create_api_key(&other, "k9", "reader", [3; 32])
            .await
            .expect("key");
        let info = shard.checkpoint().await.expect("checkpoint");
        shard.close().await.expect("close");
        let manifest = storage
            .read_file(&manifest_name(info.lsn))
            .expect("manifest");
        let snapshot = storage
            .read_file(&snapshot_name(info.lsn))
            .expect("snapshot");
        (manifest, snapshot[..info.data_bytes as usize].to_vec())
    })
}

/// The snapshot's frames as `checkpoint_load` mode-1 records:
/// `[kind: u8][tenant_len: u8][tenant][len: u16 LE][payload]`.
fn as_framed_records(mut snapshot: &[u8]) -> Vec<u8> {
    let mut out = vec![1];
    while let Ok(f) = frame::decode(snapshot) {
        out.push(u8::try_from(f.kind.0).expect("checkpoint kinds fit a byte"));
        out.push(u8::try_from(f.tenant.len()).expect("tenant ids fit a byte"));
        out.extend_from_slice(f.tenant);
        out.extend_from_slice(&u16::try_from(f.payload.len()).expect("small").to_le_bytes());
        out.extend_from_slice(f.payload);
        snapshot = &snapshot[f.len()..];
    }
    out
}

/// Seeds: records and a checkpoint encoded by the engine itself. Run with
/// `OC_WRITE_CORPUS=1`; the fuzzers grow the corpora from here.
#[test]
fn write_seed_corpus() {
    if std::env::var_os("OC_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = corpus_dir("record_decode");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (name, bytes) in record_seeds() {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write");
    }

    let (manifest, snapshot) = real_checkpoint();
    let dir = corpus_dir("checkpoint_load");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let mode = |m: u8, rest: &[u8]| [&[m][..], rest].concat();
    let manifest_text = String::from_utf8(manifest.clone()).expect("manifest is text");
    let manifest_text = manifest_text.trim_end();
    let files = |manifest: &[u8]| {
        let len = u16::try_from(manifest.len()).expect("a small manifest");
        [&[2][..], &len.to_le_bytes(), manifest, &snapshot].concat()
    };
    let mut truncated = snapshot.clone();
    truncated.truncate(snapshot.len() / 2);
    let seeds = [
        ("seed-snapshot", mode(0, &snapshot)),
        ("seed-snapshot-truncated", mode(0, &truncated)),
        ("seed-records", as_framed_records(&snapshot)),
        ("seed-files", files(manifest_text.as_bytes())),
        ("seed-files-padded", files(&manifest)),
        (
            "seed-files-bad-manifest",
            files(manifest_text.replace("\"lsn\"", "\"lsm\"").as_bytes()),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("write");
    }
}
