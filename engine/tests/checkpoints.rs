//! Checkpoints on the real disk: restart from a checkpoint plus the log after it,
//! fall back when the newest checkpoint is damaged, refuse clearly when nothing usable
//! is left, release log segments a checkpoint covers, carry rows of the largest legal
//! size, and write nothing for an idle shard.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use oc_engine::checkpoint::{manifest_name, snapshot_name, FRAME_PAYLOAD_BUDGET_BYTES};
use oc_engine::limits::{MAX_ROW_BYTES, MAX_VECTOR_DIM};
use oc_engine::{
    ColumnType, EngineError, FileProblem, Row, Shard, TableSchema, TenantId, UnreadableFile, Value,
    WriteOp,
};
use oc_io::executor::run_local;
use oc_io::{DmaStorage, WalConfig};
use serde_json::json;

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 64 * 1024,
        max_group_bytes: 16 * 1024,
        ..WalConfig::default()
    }
}

fn acme() -> TenantId {
    TenantId::parse("acme").expect("valid")
}

async fn open(dir: &Path) -> Result<(Shard<DmaStorage>, oc_engine::ShardOpenReport), EngineError> {
    Shard::open(DmaStorage::open(dir).await?, config()).await
}

async fn setup(shard: &Shard<DmaStorage>) {
    shard.create_tenant(&acme()).await.expect("tenant");
    let schema = TableSchema::new(
        "kv",
        &[
            ("k", ColumnType::Int, false),
            ("v", ColumnType::Text, true),
            ("e", ColumnType::Vector(2), true),
        ],
        &["k"],
        &[("by_v", &["v"])],
    )
    .expect("schema");
    shard.create_table(&acme(), schema).await.expect("table");
}

/// Writes keys `from..to` (value "v<k>"), 10 per batch, from 4 tasks.
async fn write_range(shard: &Rc<Shard<DmaStorage>>, from: i64, to: i64) {
    let mut tasks = Vec::new();
    for t in 0..4 {
        let shard = shard.clone();
        tasks.push(glommio::spawn_local(async move {
            let mut k = from + t * 10;
            while k < to {
                let ops: Vec<WriteOp> = (k..(k + 10).min(to))
                    .map(|k| {
                        WriteOp::Upsert(
                            json!({"k": k, "v": format!("v{k}"), "e": [k as f32, 1.0]})
                                .as_object()
                                .expect("o")
                                .clone(),
                        )
                    })
                    .collect();
                shard.write(&acme(), "kv", &ops, None).await.expect("write");
                k += 40;
            }
        }));
    }
    for t in tasks {
        t.await;
    }
}

fn rows(shard: &Shard<DmaStorage>) -> Vec<Vec<Value>> {
    shard
        .read(&acme(), |t| {
            t.table("kv")
                .expect("table")
                .rows()
                .map(Row::to_values)
                .collect()
        })
        .expect("tenant")
}

fn damage(dir: &Path, name: &str, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(name))
        .expect("open");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset).expect("read");
    file.write_all_at(&[b[0] ^ 0xFF], offset).expect("write");
}

#[test]
fn restart_loads_the_checkpoint_and_replays_only_the_log_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 2000).await;
        let info = shard.checkpoint().await.expect("checkpoint");
        assert_eq!(info.rows, 2000);
        assert_eq!(info.lsn, shard.applied_lsn());
        write_range(&shard, 2000, 2400).await;
        let before = rows(&shard);
        let applied = shard.applied_lsn();
        shard.close().await.expect("close");
        drop(shard);

        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert_eq!(report.checkpoint, Some(info.lsn));
        assert!(report.unusable_checkpoints.is_empty());
        assert_eq!(
            report.wal.frames_replayed,
            applied.0 - info.lsn.0,
            "only the log after the checkpoint is replayed"
        );
        assert_eq!(rows(&shard), before);
        let usage = shard.read(&acme(), |t| t.usage()).expect("tenant");
        assert_eq!(
            (usage.rows, usage.vectors),
            (2400, 2400),
            "usage is rebuilt from the checkpoint"
        );
    });
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 500).await;
        let first = shard.checkpoint().await.expect("checkpoint 1");
        write_range(&shard, 500, 1000).await;
        let second = shard.checkpoint().await.expect("checkpoint 2");
        write_range(&shard, 1000, 1200).await;
        let before = rows(&shard);
        shard.close().await.expect("close");
        drop(shard);

        damage(dir.path(), &snapshot_name(second.lsn), 5000);
        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert_eq!(report.checkpoint, Some(first.lsn));
        assert_eq!(report.unusable_checkpoints.len(), 1);
        assert!(
            report.unusable_checkpoints[0].1.to_string().contains("crc"),
            "{:?}",
            report.unusable_checkpoints
        );
        assert_eq!(
            rows(&shard),
            before,
            "the log after the older checkpoint rebuilds the rest"
        );
        shard.close().await.expect("close");
        drop(shard);

        // Both damaged, log intact: everything is replayed from the start.
        damage(dir.path(), &manifest_name(first.lsn), 0);
        let (shard, report) = open(dir.path()).await.expect("reopen from the log");
        assert_eq!(report.checkpoint, None);
        assert_eq!(report.unusable_checkpoints.len(), 2);
        assert_eq!(rows(&shard), before);
    });
}

/// Replaces a manifest's text, keeping its block-padded length.
fn rewrite_manifest(dir: &Path, name: &str, edit: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(dir.join(name)).expect("read");
    let edited = edit(text.trim_end());
    assert!(edited.len() <= text.len());
    std::fs::write(
        dir.join(name),
        format!("{edited:<width$}", width = text.len()),
    )
    .expect("write");
}

#[test]
fn a_manifest_of_an_unknown_version_or_without_a_field_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 100).await;
        let first = shard.checkpoint().await.expect("checkpoint 1");
        write_range(&shard, 100, 200).await;
        let second = shard.checkpoint().await.expect("checkpoint 2");
        let before = rows(&shard);
        shard.close().await.expect("close");
        drop(shard);

        let newest = manifest_name(second.lsn);
        for wanted in ["version", "lsn"] {
            let original = std::fs::read(dir.path().join(&newest)).expect("read");
            rewrite_manifest(dir.path(), &newest, |t| match wanted {
                "version" => t.replace("\"format_version\":1", "\"format_version\":7"),
                _ => t.replace(&format!("\"lsn\":{},", second.lsn.0), ""),
            });
            let (shard, report) = open(dir.path()).await.expect("reopen");
            assert_eq!(report.checkpoint, Some(first.lsn), "fell back ({wanted})");
            let [(lsn, UnreadableFile { file, problem })] = &report.unusable_checkpoints[..] else {
                panic!("{wanted}: {:?}", report.unusable_checkpoints);
            };
            assert_eq!((*lsn, file), (second.lsn, &newest));
            match (wanted, problem) {
                ("version", FileProblem::UnsupportedVersion { found: 7, .. }) => {}
                ("lsn", FileProblem::MissingField("lsn")) => {}
                _ => panic!("{wanted}: {problem:?}"),
            }
            assert_eq!(rows(&shard), before);
            shard.close().await.expect("close");
            drop(shard);
            std::fs::write(dir.path().join(&newest), original).expect("restore");
        }
    });
}

#[test]
fn covered_segments_are_released_and_without_a_checkpoint_recovery_refuses_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 3000).await;
        let segments = shard.wal().segments().len();
        assert!(segments >= 3, "64 KiB segments: {segments}");
        assert!(
            shard
                .release_covered_wal()
                .await
                .expect("release")
                .is_empty(),
            "nothing is covered yet"
        );
        shard.checkpoint().await.expect("checkpoint 1");
        shard.checkpoint().await.expect("checkpoint 2");
        // The shipper's barrier holds back what the archive does not have yet.
        shard.set_release_barrier(Some(oc_io::Lsn(1)));
        assert!(shard
            .release_covered_wal()
            .await
            .expect("release")
            .is_empty());
        shard.set_release_barrier(None);
        let released = shard.release_covered_wal().await.expect("release");
        assert!(!released.is_empty());
        let before = rows(&shard);
        shard.close().await.expect("close");
        drop(shard);

        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert!(report.checkpoint.is_some());
        assert_eq!(rows(&shard), before);
        shard.close().await.expect("close");
        drop(shard);

        // Without any usable checkpoint the released log cannot rebuild the state.
        for entry in std::fs::read_dir(dir.path()).expect("dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            if name.ends_with(".json") {
                damage(dir.path(), &name, 0);
            }
        }
        let refused = open(dir.path()).await.err().expect("refused");
        assert!(matches!(&refused, EngineError::Replay { .. }), "{refused}");
        assert!(
            refused.to_string().contains("no usable checkpoint"),
            "{refused}"
        );

        // Manifests cut short are named as such, not as a failed read.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        for name in names.iter().filter(|n| n.ends_with(".json")) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(name))
                .expect("open");
            file.set_len(100).expect("cut the manifest short");
        }
        let refused = open(dir.path()).await.err().expect("refused").to_string();
        assert!(
            refused.contains("is not a whole number of 4096-byte blocks: it was cut short"),
            "{refused}"
        );

        // Without any checkpoint file, the message says they are missing.
        for name in names.iter().filter(|n| n.starts_with("checkpoint-")) {
            std::fs::remove_file(dir.path().join(name)).expect("remove");
        }
        let refused = open(dir.path()).await.err().expect("refused").to_string();
        assert!(
            refused.contains("no checkpoint file is in the shard's directory"),
            "{refused}"
        );
    });
}

#[test]
fn a_checkpoint_copy_outlives_its_pruning_and_holds_the_log_after_it_until_a_stream_comes() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 1000).await;
        let copied = shard.checkpoint().await.expect("checkpoint").lsn;
        let (lsn, manifest, send) = shard
            .open_checkpoint_copy(std::time::Duration::from_secs(60))
            .await
            .expect("open the copy")
            .expect("there is a checkpoint");
        assert_eq!(lsn, copied);
        let on_disk = std::fs::read(dir.path().join(snapshot_name(lsn))).expect("snapshot");
        assert_eq!(
            manifest,
            std::fs::read(dir.path().join(manifest_name(lsn))).expect("m")
        );

        // Two newer checkpoints prune the copied one; the log after it would go.
        write_range(&shard, 1000, 3000).await;
        shard.checkpoint().await.expect("checkpoint 2");
        write_range(&shard, 3000, 5000).await;
        shard.checkpoint().await.expect("checkpoint 3");
        assert!(!dir.path().join(snapshot_name(lsn)).exists(), "pruned");
        let mut copy = Vec::new();
        while (copy.len() as u64) < send {
            let len = (send - copy.len() as u64).min(64 * 1024) as usize;
            copy.extend(
                shard
                    .read_checkpoint_copy(copy.len() as u64, len)
                    .await
                    .expect("read the open copy"),
            );
        }
        assert_eq!(
            copy,
            on_disk[..send as usize],
            "the copy is the file as it was"
        );
        assert_eq!(send % 4096, 0, "whole blocks");
        shard.close_checkpoint_copy();

        shard.release_covered_wal().await.expect("release");
        assert!(
            matches!(
                shard.wal().read_after(lsn, oc_io::Lsn(u64::MAX)).await.expect("read"),
                oc_io::LogRead::Frames(frames) if frames.first().map(|f| f.lsn) == Some(lsn.next())
            ),
            "the log after the copied checkpoint is held"
        );
        // A follower's stream from there ends the hold.
        shard.follower_streams_from(lsn);
        let released = shard.release_covered_wal().await.expect("release");
        assert!(!released.is_empty(), "released once the follower streams");
        assert!(matches!(
            shard
                .wal()
                .read_after(lsn, oc_io::Lsn(u64::MAX))
                .await
                .expect("read"),
            oc_io::LogRead::NotHeld { .. }
        ));
        shard.close().await.expect("close");
    });
}

#[test]
fn the_scheduler_checkpoints_on_log_growth_and_reports_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        let before = shard.checkpoint_metrics();
        assert_eq!(before.checkpoints_total, 0);
        assert!(before.age_s >= 0.0);
        // An hour-long interval: only the log growth can trigger it.
        let policy = oc_engine::CheckpointPolicy {
            interval: std::time::Duration::from_secs(3600),
            wal_bytes: 64 * 1024,
        };
        let scheduler = oc_engine::spawn_checkpointer(shard.clone(), policy);
        write_range(&shard, 0, 1000).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while shard.checkpoint_metrics().checkpoints_total == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint after the log grew"
            );
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
        }
        let m = shard.checkpoint_metrics();
        assert!(m.last_bytes > 0 && m.last_duration_s > 0.0, "{m:?}");
        assert!(m.age_s < 30.0, "{m:?}");
        assert_eq!(m.failures_total, 0);
        // Stopped (a checkpoint in progress finishes) before the shard closes.
        scheduler.stop().await;
        shard.close().await.expect("close");
    });
}

#[test]
fn api_keys_survive_restarts_through_the_log_and_through_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys_of = |shard: &Shard<DmaStorage>| {
        shard
            .read(&acme(), |t| {
                t.api_keys()
                    .iter()
                    .map(|(id, k)| (id.clone(), k.name.clone(), k.secret_sha256))
                    .collect::<Vec<_>>()
            })
            .expect("tenant")
    };
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        shard.create_tenant(&acme()).await.expect("tenant");
        shard
            .create_api_key(&acme(), "first", "ci", [1; 32])
            .await
            .expect("key");
        shard
            .create_api_key(&acme(), "second", "app", [2; 32])
            .await
            .expect("key");
        assert!(matches!(
            shard
                .create_api_key(&acme(), "first", "again", [3; 32])
                .await,
            Err(EngineError::AlreadyExists { .. })
        ));
        shard.close().await.expect("close");
    });
    let expected = vec![
        ("first".to_string(), "ci".to_string(), [1; 32]),
        ("second".to_string(), "app".to_string(), [2; 32]),
    ];
    run_local(async {
        // From the log alone.
        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert_eq!(report.checkpoint, None);
        assert_eq!(keys_of(&shard), expected);
        shard.checkpoint().await.expect("checkpoint");
        shard
            .revoke_api_key(&acme(), "first")
            .await
            .expect("revoke");
        assert!(matches!(
            shard.revoke_api_key(&acme(), "first").await,
            Err(EngineError::NotFound { .. })
        ));
        shard.close().await.expect("close");
    });
    run_local(async {
        // From the checkpoint (both keys) plus the log after it (the revoke).
        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert!(report.checkpoint.is_some());
        assert_eq!(keys_of(&shard), expected[1..].to_vec());
        assert!(shard
            .read(&acme(), |t| t.api_keys().verify("second", &[2; 32]))
            .expect("tenant"));
        shard.close().await.expect("close");
    });
}

/// A log that takes the largest legal row (the server's default group size).
fn large_config() -> WalConfig {
    WalConfig {
        segment_bytes: 8 << 20,
        max_group_bytes: 1 << 20,
        ..WalConfig::default()
    }
}

fn wide_schema() -> TableSchema {
    TableSchema::new(
        "wide",
        &[
            ("k", ColumnType::Int, false),
            ("v", ColumnType::Text, true),
            ("e", ColumnType::Vector(MAX_VECTOR_DIM), true),
            ("j", ColumnType::Json, true),
        ],
        &["k"],
        &[],
    )
    .expect("schema")
}

/// Row `k` at exactly `MAX_ROW_BYTES`, its text different for every `k`; every third
/// row spends part of its bytes on a vector instead.
fn max_row(k: i64) -> serde_json::Map<String, serde_json::Value> {
    let with_vector = k % 3 == 0;
    let fixed = Value::Int(k).stored_bytes()
        + Value::Null.stored_bytes() // j
        + if with_vector {
            Value::Vector(vec![0.0; MAX_VECTOR_DIM as usize]).stored_bytes()
        } else {
            Value::Null.stored_bytes()
        };
    let text_len = MAX_ROW_BYTES - fixed - Value::Text(String::new()).stored_bytes();
    let stamp = format!("row {k} ");
    let text: String = stamp.chars().cycle().take(text_len).collect();
    let mut row = json!({"k": k, "v": text});
    if with_vector {
        row["e"] = json!((0..MAX_VECTOR_DIM)
            .map(|i| (k as f32) + i as f32 / 8.0)
            .collect::<Vec<_>>());
    }
    row.as_object().expect("object").clone()
}

fn wide_rows(shard: &Shard<DmaStorage>) -> Vec<Vec<Value>> {
    shard
        .read(&acme(), |t| {
            t.table("wide")
                .expect("table")
                .rows()
                .map(Row::to_values)
                .collect()
        })
        .expect("tenant")
}

/// Every frame of a snapshot file: (kind, frame length).
fn snapshot_frames(dir: &Path, lsn: oc_io::Lsn) -> Vec<(u16, usize)> {
    let bytes = std::fs::read(dir.join(snapshot_name(lsn))).expect("snapshot");
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(frame) = oc_io::wal::frame::decode(&bytes[at..]) {
        frames.push((frame.kind.0, frame.len()));
        at += frame.len();
    }
    frames
}

#[test]
fn rows_of_the_largest_legal_size_survive_a_checkpoint_and_a_restart_byte_for_byte() {
    const ROWS: i64 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, _) = Shard::open(storage, large_config()).await.expect("open");
        shard.create_tenant(&acme()).await.expect("tenant");
        shard
            .create_table(&acme(), wide_schema())
            .await
            .expect("table");
        for k in 0..ROWS {
            let ops = [WriteOp::Upsert(max_row(k))];
            shard
                .write(&acme(), "wide", &ops, None)
                .await
                .expect("write");
        }
        let usage = shard.read(&acme(), |t| t.usage()).expect("tenant");
        assert_eq!(
            usage.bytes,
            ROWS as usize * MAX_ROW_BYTES,
            "every row is at the limit"
        );
        let info = shard.checkpoint().await.expect("checkpoint");
        assert_eq!(info.rows, ROWS as u64);
        // Rows frames were cut by bytes: none holds more than the budget plus one row.
        let frames = snapshot_frames(dir.path(), info.lsn);
        let rows_frames: Vec<usize> = frames
            .iter()
            .filter(|(kind, _)| *kind == 19)
            .map(|(_, len)| *len)
            .collect();
        assert!(rows_frames.len() >= (ROWS as usize * MAX_ROW_BYTES) / FRAME_PAYLOAD_BUDGET_BYTES);
        assert!(
            rows_frames
                .iter()
                .all(|&len| len <= 256 + FRAME_PAYLOAD_BUDGET_BYTES),
            "{rows_frames:?}"
        );
        // A few more after the checkpoint: the restart replays them from the log.
        for k in ROWS..ROWS + 10 {
            let ops = [WriteOp::Upsert(max_row(k))];
            shard
                .write(&acme(), "wide", &ops, None)
                .await
                .expect("write");
        }
        let before = wide_rows(&shard);
        shard.close().await.expect("close");
        drop(shard);

        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, report) = Shard::open(storage, large_config()).await.expect("reopen");
        assert_eq!(report.checkpoint, Some(info.lsn));
        assert_eq!(report.wal.frames_replayed, 10);
        let after = wide_rows(&shard);
        assert_eq!(after.len(), ROWS as usize + 10);
        assert!(after == before, "every row is back, value for value");
        // And a checkpoint of the restored state loads again.
        let second = shard.checkpoint().await.expect("checkpoint after restart");
        assert_eq!(second.rows, ROWS as u64 + 10);
        shard.close().await.expect("close");
    });
}

#[test]
fn a_batch_over_the_record_limit_is_refused_before_it_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, _) = Shard::open(storage, large_config()).await.expect("open");
        shard.create_tenant(&acme()).await.expect("tenant");
        shard
            .create_table(&acme(), wide_schema())
            .await
            .expect("table");
        let (lsn, logged) = (shard.applied_lsn(), shard.wal().stats().append_bytes);
        // Five legal rows: 1.25 MiB, over the 1 MiB record limit.
        let ops: Vec<WriteOp> = (0..5).map(|k| WriteOp::Upsert(max_row(k))).collect();
        let refused = shard
            .write(&acme(), "wide", &ops, Some("key-1".into()))
            .await;
        match refused {
            Err(EngineError::BatchTooLarge { bytes, limit }) => {
                assert_eq!(limit, 1 << 20);
                assert!(bytes > 5 * MAX_ROW_BYTES, "{bytes}");
            }
            other => panic!("expected BatchTooLarge, got {other:?}"),
        }
        assert_eq!(shard.applied_lsn(), lsn, "nothing was logged");
        assert_eq!(shard.wal().stats().append_bytes, logged);
        assert!(shard.wal().failure().is_none(), "the log is fine");
        // The same rows in batches that fit go through, and the key is still free.
        let (first, second) = ops.split_at(3);
        shard
            .write(&acme(), "wide", first, Some("key-1".into()))
            .await
            .expect("3 rows fit");
        shard
            .write(&acme(), "wide", second, None)
            .await
            .expect("2 rows fit");
        assert_eq!(wide_rows(&shard).len(), 5);
        shard.close().await.expect("close");
    });
}

#[test]
fn after_a_long_idle_the_first_write_does_not_look_hours_overdue() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 10).await;
        shard.checkpoint().await.expect("checkpoint");
        // Idle for a while, with only the scheduler looking (no scrapes).
        glommio::timer::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(shard.unchanged_since_checkpoint());
        let began = std::time::Instant::now();
        write_range(&shard, 10, 11).await;
        // As old as the write (which a loaded disk can stall for a second), not as
        // old as the checkpoint (1.5 s more).
        let (age, took) = (
            shard.checkpoint_metrics().age_s,
            began.elapsed().as_secs_f64(),
        );
        assert!(
            age <= took + 0.1,
            "the first write after 1.5 s idle counts from the checkpoint: {age} s, the write took {took} s"
        );
        shard.close().await.expect("close");
    });
}

#[test]
fn an_idle_shard_does_not_rewrite_its_checkpoint_and_its_age_stays_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifest_bytes =
        |lsn| std::fs::read(dir.path().join(manifest_name(lsn))).expect("manifest");
    let (first, written) = run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 100).await;
        assert!(!shard.unchanged_since_checkpoint());
        let first = shard.checkpoint().await.expect("checkpoint");
        let written = manifest_bytes(first.lsn);
        assert!(shard.unchanged_since_checkpoint());
        let again = shard.checkpoint().await.expect("checkpoint, idle");
        assert_eq!(again, first, "the same checkpoint, not a new one");
        assert_eq!(
            manifest_bytes(first.lsn),
            written,
            "its files are untouched"
        );
        let m = shard.checkpoint_metrics();
        assert_eq!((m.checkpoints_total, m.age_s), (1, 0.0), "{m:?}");
        shard.close().await.expect("close");
        (first, written)
    });
    run_local(async {
        // After a restart that replays nothing, the loaded checkpoint is current.
        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert_eq!(report.checkpoint, Some(first.lsn));
        assert!(shard.unchanged_since_checkpoint());
        assert_eq!(shard.checkpoint_metrics().age_s, 0.0);
        let loaded = shard.checkpoint().await.expect("checkpoint, idle");
        assert_eq!(
            (loaded.lsn, loaded.rows, loaded.crc),
            (first.lsn, first.rows, first.crc)
        );
        assert_eq!(
            manifest_bytes(first.lsn),
            written,
            "its files are untouched"
        );
        assert_eq!(shard.checkpoint_metrics().checkpoints_total, 0);
        // One write later the state differs again, and a checkpoint is written.
        let ops = [WriteOp::Upsert(
            json!({"k": 1}).as_object().expect("o").clone(),
        )];
        shard.write(&acme(), "kv", &ops, None).await.expect("write");
        assert!(!shard.unchanged_since_checkpoint());
        let next = shard.checkpoint().await.expect("checkpoint");
        assert!(next.lsn > first.lsn);
        shard.close().await.expect("close");
    });
}

/// A table's `written_lsn` (what `oc-pitr drill --live` trusts to skip a comparison or
/// make one) is never below its last write: exact when the write is applied live or
/// replayed, the checkpoint's LSN when loaded from one — an emptied table included.
#[test]
fn a_tables_last_write_survives_restarts_as_an_upper_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        let written = |shard: &Shard<DmaStorage>| {
            shard
                .read(&acme(), |t| t.table("kv").map(|t| t.written_lsn()))
                .expect("tenant")
                .expect("table")
        };
        let created = written(&shard);
        write_range(&shard, 0, 40).await;
        let last_write = shard.applied_lsn().0;
        assert!(last_write > created);
        assert_eq!(written(&shard), last_write);
        // Emptied, then checkpointed: the checkpoint holds no rows of the table.
        let ops: Vec<WriteOp> = (0..40)
            .map(|k| WriteOp::Delete(json!({"k": k}).as_object().expect("o").clone()))
            .collect();
        shard
            .write(&acme(), "kv", &ops, None)
            .await
            .expect("delete");
        let emptied = shard.applied_lsn().0;
        shard
            .create_tenant(&TenantId::parse("other").expect("valid"))
            .await
            .expect("other");
        let info = shard.checkpoint().await.expect("checkpoint");
        assert!(info.lsn.0 > emptied);
        shard.close().await.expect("close");
        drop(shard);

        let (shard, _) = open(dir.path()).await.expect("reopen");
        assert_eq!(written(&shard), info.lsn.0, "at most the checkpoint's LSN");
        shard.close().await.expect("close");
    });
}

#[test]
fn a_checkpoint_past_where_the_history_diverged_is_passed_over_and_the_log_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 400).await;
        let older = shard.checkpoint().await.expect("checkpoint");
        write_range(&shard, 400, 800).await;
        let newer = shard.checkpoint().await.expect("checkpoint");
        write_range(&shard, 800, 900).await;
        shard.close().await.expect("close");
        drop(shard);

        // A new writer's epoch 5 began between the two checkpoints: this directory's
        // frames from there on, and the newer checkpoint, are a dead branch.
        let start = oc_io::Lsn(older.lsn.0 + 3);
        assert!(start < newer.lsn);
        let following = WalConfig {
            epoch: oc_io::Epoch(5),
            history: Some(oc_io::History::new(vec![(oc_io::Epoch(5), start)])),
            ..config()
        };
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let (shard, report) = Shard::open(storage, following).await.expect("reopen");
        assert_eq!(report.checkpoint, Some(older.lsn));
        let [(passed_over, UnreadableFile { problem, .. })] = &report.unusable_checkpoints[..]
        else {
            panic!("{:?}", report.unusable_checkpoints);
        };
        assert_eq!(*passed_over, newer.lsn);
        assert!(
            matches!(problem, FileProblem::OffHistory { lsn, epoch: 1 } if *lsn == newer.lsn.0),
            "{problem}"
        );
        assert_eq!(shard.applied_lsn().0, start.0 - 1);
        let cut = report.wal.history_cut.as_ref().expect("a cut");
        assert_eq!(cut.lsn, start);
        assert!(!cut.set_aside.is_empty());
        shard.close().await.expect("close");
        drop(shard);

        // The passed-over checkpoint is set aside (nothing loads or ships it again),
        // and the cut frames' segments are kept aside, whole.
        assert!(!dir.path().join(manifest_name(newer.lsn)).exists());
        for name in [manifest_name(newer.lsn), snapshot_name(newer.lsn)] {
            assert!(
                dir.path().join(format!("diverged-{name}")).exists(),
                "{name}"
            );
        }
        let aside: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("diverged-at-{}-", start.0)))
            .collect();
        assert_eq!(aside.len(), cut.set_aside.len(), "{aside:?}");

        // Without the older checkpoint's log, nothing on the history is left to start
        // from: the open is refused and says why.
        let dir = tempfile::tempdir().expect("tempdir");
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, 3000).await;
        let only = shard.checkpoint().await.expect("checkpoint");
        let released = shard.release_covered_wal().await.expect("release");
        assert!(!released.is_empty());
        shard.close().await.expect("close");
        drop(shard);
        let following = WalConfig {
            epoch: oc_io::Epoch(5),
            history: Some(oc_io::History::new(vec![(
                oc_io::Epoch(5),
                oc_io::Lsn(only.lsn.0 - 5),
            )])),
            ..config()
        };
        let storage = DmaStorage::open(dir.path()).await.expect("storage");
        let refused = Shard::open(storage, following)
            .await
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(
            message.contains("not on the writer's history")
                && message.contains("cannot rejoin its writer without a re-copy"),
            "{message}"
        );
    });
}

/// A migration aborted while a checkpoint copies its table, then a row its transform
/// could not carry, written where the copy has not reached: the checkpoint must not
/// record the migration as active (loading would try to carry that row and fail).
#[test]
fn a_migration_that_ends_while_its_table_is_copied_is_not_recorded_as_active() {
    let dir = tempfile::tempdir().expect("tempdir");
    run_local(async {
        let open = |dir: &Path| {
            let dir = dir.to_path_buf();
            async move {
                let storage = DmaStorage::open(&dir).await.expect("storage");
                Shard::open(storage, large_config()).await
            }
        };
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        const ROWS: i64 = 100_000;
        // Wide enough rows that copying them outlasts two commits.
        let pad = "v".repeat(200);
        for start in (0..ROWS).step_by(500) {
            let ops: Vec<WriteOp> = (start..start + 500)
                .map(|k| WriteOp::Upsert(json!({"k": k, "v": pad}).as_object().expect("o").clone()))
                .collect();
            shard.write(&acme(), "kv", &ops, None).await.expect("fill");
        }
        let steps = oc_engine::migration::parse_steps(
            br#"[{"op":"add_column","name":"q","type":"int","default":"1000000 / (k - 1000000000)"}]"#,
        )
        .expect("steps");
        let m = shard
            .start_migration(&acme(), "kv", steps)
            .await
            .expect("start");
        // (No backfill driver runs here: the migration stays where it started.)
        let copying = {
            let shard = shard.clone();
            glommio::spawn_local(async move { shard.checkpoint().await })
        };
        // Once the snapshot holds some rows, the table's copy has begun (with the
        // migration active): abort it then.
        let snapshot_bytes = || {
            std::fs::read_dir(dir.path())
                .expect("dir")
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".snap.tmp"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        };
        while snapshot_bytes() < 256 * 1024 {
            glommio::timer::sleep(std::time::Duration::from_micros(100)).await;
        }
        shard.abort_migration(&acme(), m.id).await.expect("abort");
        let poison = WriteOp::Upsert(
            json!({"k": 1_000_000_000, "v": "after the abort"})
                .as_object()
                .expect("o")
                .clone(),
        );
        shard
            .write(&acme(), "kv", &[poison], None)
            .await
            .expect("no migration refuses it now");
        let info = copying.await.expect("checkpoint");
        assert_eq!(
            info.rows,
            ROWS as u64 + 1,
            "the copy must reach the last key after the abort and the write (else this test \
             proves nothing)"
        );
        shard.close().await.expect("close");
        drop(shard);

        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert!(
            report.unusable_checkpoints.is_empty(),
            "{:?}",
            report.unusable_checkpoints
        );
        assert_eq!(report.checkpoint, Some(info.lsn));
        let state = shard.migration(&acme(), m.id).expect("known").state;
        assert_eq!(state, oc_engine::migration::MigrationState::Aborted);
        assert_eq!(rows(&shard).len(), ROWS as usize + 1);
    });
}

/// A checkpoint taken while a backfill converts rows in place holds them as they were
/// copied, converted or not; the reopened shard carries the migration on and finishes
/// it. A checkpoint after an abort leaves out the values the aborted migration had
/// appended: the table reads and digests as before it.
#[test]
fn a_checkpoint_during_a_backfill_resumes_it_and_one_after_an_abort_leaves_no_trace() {
    use oc_engine::migration::{parse_steps, MigrationState};
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = |shard: &Shard<DmaStorage>| {
        shard
            .read(&acme(), |t| {
                let table = t.table("kv").expect("table");
                let mut d = oc_engine::table::TableDigest::default();
                while !table.digest_rows(&mut d, usize::MAX) {}
                (d, table.check_integrity())
            })
            .expect("tenant")
    };
    let state = |shard: &Shard<DmaStorage>, id| shard.migration(&acme(), id).expect("known");
    const ROWS: i64 = 40_000;
    let id = run_local(async {
        let (shard, _) = open(dir.path()).await.expect("open");
        let shard = Rc::new(shard);
        setup(&shard).await;
        write_range(&shard, 0, ROWS).await;
        let steps = parse_steps(
            br#"[{"op":"add_column","name":"q","type":"int","default":"k * 2"},
                 {"op":"add_index","name":"by_q","columns":["q"]}]"#,
        )
        .expect("steps");
        let m = shard
            .start_migration(&acme(), "kv", steps)
            .await
            .expect("start");
        let driver = oc_engine::shard::spawn_backfill(shard.clone());
        while state(&shard, m.id).rows_done == 0 {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Copied while the backfill runs: some rows converted before their copy,
        // some after.
        let info = shard.checkpoint().await.expect("checkpoint");
        let done = state(&shard, m.id);
        assert_eq!(done.state, MigrationState::Backfilling, "{done:?}");
        assert!(
            done.rows_done < ROWS as u64,
            "the checkpoint caught the backfill half way"
        );
        assert!(info.rows >= ROWS as u64);
        drop(driver);
        shard.close().await.expect("close");
        m.id
    });
    run_local(async {
        let (shard, report) = open(dir.path()).await.expect("reopen");
        assert!(
            report.unusable_checkpoints.is_empty(),
            "{:?}",
            report.unusable_checkpoints
        );
        let shard = Rc::new(shard);
        assert!(state(&shard, id).state.is_active());
        assert_eq!(digest(&shard).1, Ok(ROWS as usize));
        let _driver = oc_engine::shard::spawn_backfill(shard.clone());
        while state(&shard, id).state != MigrationState::Done {
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        let converted = shard
            .read(&acme(), |t| {
                let table = t.table("kv").expect("table");
                assert_eq!(
                    table.check_integrity(),
                    Ok(ROWS as usize),
                    "the new index is whole"
                );
                let q = table.schema().column("q").expect("q");
                table
                    .rows()
                    .filter(|r| match (r.get(0).to_value(), r.get(q).to_value()) {
                        (Value::Int(k), Value::Int(q)) => q == 2 * k,
                        _ => false,
                    })
                    .count()
            })
            .expect("tenant");
        assert_eq!(converted, ROWS as usize, "every row has q = 2k, once");

        // An aborted migration's appended values stay in the rows it converted
        // until a checkpoint leaves them out.
        let before = digest(&shard);
        let steps =
            parse_steps(br#"[{"op":"add_column","name":"r","type":"text","default":"'x'"}]"#)
                .expect("steps");
        let m = shard
            .start_migration(&acme(), "kv", steps)
            .await
            .expect("start");
        while state(&shard, m.id).rows_done < ROWS as u64 / 2 {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        shard.abort_migration(&acme(), m.id).await.expect("abort");
        assert_eq!(digest(&shard), before, "the abort is immediate");
        shard.checkpoint().await.expect("checkpoint");
        shard.close().await.expect("close");
    });
    run_local(async {
        let (shard, _) = open(dir.path()).await.expect("reopen");
        let (widest, slots) = shard
            .read(&acme(), |t| {
                let table = t.table("kv").expect("table");
                (
                    table.rows().map(Row::len).max(),
                    table.schema().columns.len(),
                )
            })
            .expect("tenant");
        assert_eq!(
            widest,
            Some(slots),
            "no row holds the aborted migration's values"
        );
        assert_eq!(digest(&shard).1, Ok(ROWS as usize));
    });
}
