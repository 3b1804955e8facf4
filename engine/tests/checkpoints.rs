//! Checkpoints on the real disk: restart from a checkpoint plus the log after it,
//! fall back when the newest checkpoint is damaged, refuse clearly when nothing usable
//! is left, and release log segments a checkpoint covers.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use oc_engine::checkpoint::{manifest_name, snapshot_name};
use oc_engine::{ColumnType, EngineError, Shard, TableSchema, TenantId, Value, WriteOp};
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
            t.table("kv").expect("table").rows().cloned().collect()
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
            report.unusable_checkpoints[0].1.contains("crc"),
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
        let _scheduler = oc_engine::spawn_checkpointer(shard.clone(), policy);
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
