//! A checkpoint that fails leaves nothing behind, and what an interrupted one left is
//! removed at open: simulated storage with failures injected at the two renames that
//! publish a checkpoint.

use std::cell::Cell;
use std::rc::Rc;

use oc_engine::checkpoint::{manifest_name, snapshot_name};
use oc_engine::{ColumnType, Shard, TableSchema, TenantId, WriteOp};
use oc_io::executor::run_local;
use oc_io::{Lsn, SimFaults, SimStorage, Storage, WalConfig};
use serde_json::json;

/// Where a checkpoint is made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Renaming the snapshot into place: both temporary files exist.
    SnapshotRename,
    /// Renaming the manifest into place: the snapshot is already in place, alone.
    ManifestRename,
}

/// [`SimStorage`] with an injectable rename failure.
#[derive(Clone)]
struct Flaky {
    inner: SimStorage,
    fault: Rc<Cell<Option<Fault>>>,
}

impl Storage for Flaky {
    type File = <SimStorage as Storage>::File;
    type Buffer = <SimStorage as Storage>::Buffer;

    fn alloc_buffer(&self, len: usize) -> Self::Buffer {
        self.inner.alloc_buffer(len)
    }
    async fn create(&self, name: &str, len: u64) -> oc_io::Result<Self::File> {
        self.inner.create(name, len).await
    }
    async fn open(&self, name: &str) -> oc_io::Result<Self::File> {
        self.inner.open(name).await
    }
    async fn rename(&self, from: &str, to: &str) -> oc_io::Result<()> {
        let hit = match self.fault.get() {
            Some(Fault::SnapshotRename) => to.starts_with("checkpoint-") && to.ends_with(".snap"),
            Some(Fault::ManifestRename) => to.starts_with("checkpoint-") && to.ends_with(".json"),
            None => false,
        };
        if hit {
            return Err(oc_io::Error::io(
                "renaming",
                from,
                std::io::Error::other("injected failure"),
            ));
        }
        self.inner.rename(from, to).await
    }
    async fn remove(&self, name: &str) -> oc_io::Result<()> {
        self.inner.remove(name).await
    }
    async fn list(&self) -> oc_io::Result<Vec<String>> {
        self.inner.list().await
    }
    async fn sync_dir(&self) -> oc_io::Result<()> {
        self.inner.sync_dir().await
    }
}

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

async fn checkpoint_files(storage: &impl Storage) -> Vec<String> {
    storage
        .list()
        .await
        .expect("list")
        .into_iter()
        .filter(|n| n.starts_with("checkpoint-"))
        .collect()
}

async fn write_rows(shard: &Shard<Flaky>, from: i64, to: i64) {
    for k in from..to {
        let row = json!({"k": k, "v": format!("v{k}")});
        let ops = [WriteOp::Upsert(row.as_object().expect("o").clone())];
        shard.write(&acme(), "kv", &ops, None).await.expect("write");
    }
}

#[test]
fn a_failed_checkpoint_leaves_no_files_and_stale_ones_are_removed_at_open() {
    run_local(async {
        let storage = Flaky {
            inner: SimStorage::new(7, SimFaults::default()),
            fault: Rc::default(),
        };
        let (shard, _) = Shard::open(storage.clone(), config()).await.expect("open");
        shard.create_tenant(&acme()).await.expect("tenant");
        let schema = TableSchema::new(
            "kv",
            &[("k", ColumnType::Int, false), ("v", ColumnType::Text, true)],
            &["k"],
            &[],
        )
        .expect("schema");
        shard.create_table(&acme(), schema).await.expect("table");
        write_rows(&shard, 0, 50).await;

        for fault in [Fault::SnapshotRename, Fault::ManifestRename] {
            storage.fault.set(Some(fault));
            let failed = shard.checkpoint().await;
            assert!(failed.is_err(), "{fault:?}: {failed:?}");
            assert_eq!(
                checkpoint_files(&storage).await,
                Vec::<String>::new(),
                "{fault:?}: a failed checkpoint leaves nothing behind"
            );
            assert!(!shard.unchanged_since_checkpoint());
        }
        storage.fault.set(None);
        let good = shard.checkpoint().await.expect("checkpoint");
        assert_eq!(
            checkpoint_files(&storage).await,
            vec![manifest_name(good.lsn), snapshot_name(good.lsn)]
        );
        write_rows(&shard, 50, 60).await;

        // What a crash in the middle of later checkpoints would leave.
        let later = Lsn(good.lsn.0 + 5);
        let stale = [
            format!("{}.tmp", snapshot_name(later)),
            format!("{}.tmp", manifest_name(later)),
            snapshot_name(Lsn(good.lsn.0 + 9)), // renamed, its manifest never was
        ];
        for name in &stale {
            storage.inner.create(name, 4096).await.expect("plant");
        }
        storage.inner.sync_dir().await.expect("sync");
        let rows = shard.read(&acme(), |t| t.usage().rows).expect("tenant");
        shard.close().await.expect("close");
        drop(shard);

        let (shard, report) = Shard::open(storage.clone(), config())
            .await
            .expect("reopen");
        assert_eq!(
            report.checkpoint,
            Some(good.lsn),
            "the good checkpoint loads"
        );
        assert_eq!(
            checkpoint_files(&storage).await,
            vec![manifest_name(good.lsn), snapshot_name(good.lsn)],
            "the stale files are gone"
        );
        assert_eq!(
            shard.read(&acme(), |t| t.usage().rows).expect("tenant"),
            rows
        );
        shard.close().await.expect("close");
    });
}
