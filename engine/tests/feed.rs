//! The change feed of a shard (over `SimStorage` with random yields): a tap receives
//! every applied command's events in LSN order; what `changes_after` reads back from
//! the log describes the same changes; a tap that is not drained is closed as
//! overflowed without the applier ever waiting; other tenants' writes do not reach it.

use std::sync::Arc;

use oc_engine::feed::{self, ChangeBatch, EventKind, TapEnd};
use oc_engine::{ChangesRead, ColumnType, Shard, TableSchema, TenantId, WriteOp};
use oc_io::executor::run_local;
use oc_io::{Lsn, SimFaults, SimStorage, WalConfig};
use serde_json::json;

fn schema(name: &str) -> TableSchema {
    TableSchema::new(
        name,
        &[
            ("id", ColumnType::Int, false),
            ("k", ColumnType::Text, false),
            ("v", ColumnType::Text, true),
        ],
        &["k", "id"],
        &[],
    )
    .expect("valid schema")
}

fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid")
}

fn upsert(id: i64, k: &str) -> WriteOp {
    WriteOp::Upsert(
        json!({"id": id, "k": k, "v": "x"})
            .as_object()
            .expect("object")
            .clone(),
    )
}

fn delete(id: i64, k: &str) -> WriteOp {
    WriteOp::Delete(
        json!({"id": id, "k": k})
            .as_object()
            .expect("object")
            .clone(),
    )
}

fn faults() -> SimFaults {
    SimFaults {
        crash_after_ops: None,
        sync_error_per_mille: 0,
        capacity_bytes: u64::MAX,
        max_files: usize::MAX,
        yield_per_mille: 200,
    }
}

/// (kind, data) of every event, for comparing live and read-back batches.
fn described(batches: &[&ChangeBatch]) -> Vec<(Lsn, EventKind, String)> {
    batches
        .iter()
        .flat_map(|b| {
            b.events
                .iter()
                .map(move |e| (b.lsn, e.kind, e.data.to_string()))
        })
        .collect()
}

#[test]
fn taps_see_every_change_in_order_and_the_log_reads_back_the_same() {
    run_local(async {
        let storage = SimStorage::new(7, faults());
        let config = WalConfig {
            segment_bytes: 32 * 1024,
            max_group_bytes: 8 * 1024,
            ..WalConfig::default()
        };
        let (shard, _) = Shard::open(storage, config).await.expect("open");
        let (acme, other) = (tenant("acme"), tenant("other"));
        shard.create_tenant(&acme).await.expect("tenant");
        shard.create_tenant(&other).await.expect("tenant");
        let start = shard.applied_lsn();
        let tap = shard.feed().attach(&acme, 10_000);
        assert_eq!(tap.start, start);
        feed::lock(&tap.interest).add(None);
        assert!(shard.feed().listening(&acme) && !shard.feed().listening(&other));

        shard
            .create_table(&acme, schema("items"))
            .await
            .expect("table");
        shard
            .create_table(&other, schema("items"))
            .await
            .expect("table");
        let mut written = Vec::new();
        for i in 0..200i64 {
            let k = format!("k\u{0}{}", i % 7); // NUL bytes survive the key's round trip
            let (lsn, _) = shard
                .write(&acme, "items", &[upsert(i, &k), upsert(i + 1000, &k)], None)
                .await
                .expect("write");
            written.push((lsn, i, k.clone()));
            shard
                .write(&other, "items", &[upsert(i, "o")], None)
                .await
                .expect("other");
            if i % 10 == 0 {
                shard
                    .write(&acme, "items", &[delete(i, &k)], None)
                    .await
                    .expect("delete");
            }
        }
        // A repeat of an idempotency key changes nothing and publishes nothing.
        let (first, _) = shard
            .write(&acme, "items", &[upsert(5000, "z")], Some("once".into()))
            .await
            .expect("write");
        let (again, _) = shard
            .write(&acme, "items", &[upsert(5000, "z")], Some("once".into()))
            .await
            .expect("repeat");
        assert_eq!(first, again);

        let mut live: Vec<Arc<ChangeBatch>> = Vec::new();
        while let Ok(batch) = tap.batches.try_recv() {
            live.push(batch);
        }
        assert!(tap.published() >= shard.applied_lsn());
        assert!(live.windows(2).all(|w| w[0].lsn < w[1].lsn), "LSN order");
        assert!(live.iter().all(|b| b.applied_at.is_some() && b.lsn > start));
        assert_eq!(
            live.first().map(|b| b.events[0].kind),
            Some(EventKind::Schema)
        );
        let changes = live
            .iter()
            .flat_map(|b| &b.events)
            .filter(|e| e.kind == EventKind::Change)
            .count();
        assert_eq!(
            changes,
            200 * 2 + 20 + 1,
            "two upserts per write, 20 deletes, one keyed write"
        );
        let (lsn0, _, k0) = &written[0];
        let first_write = live
            .iter()
            .find(|b| b.lsn == *lsn0)
            .expect("batch of the first write");
        assert_eq!(
            first_write.events[0].data.as_ref(),
            format!(
                r#"{{"table":"items","op":"upsert","key":{{"k":{},"id":0}},"lsn":{}}}"#,
                serde_json::to_string(k0).expect("json"),
                lsn0.0
            )
        );
        let delete_batch = live
            .iter()
            .find(|b| b.events.iter().any(|e| e.data.contains(r#""op":"delete""#)))
            .expect("a delete");
        assert!(
            delete_batch.events[0]
                .data
                .contains(r#""key":{"k":"k\u0000"#),
            "{}",
            delete_batch.events[0].data
        );

        // The log, read back page by page, describes the same changes.
        let live_refs: Vec<&ChangeBatch> = live.iter().map(Arc::as_ref).collect();
        let live_described = described(&live_refs);
        let replay = read_back(&shard, &acme, start).await;
        // A repeat of an idempotency key is answered without logging anything: the
        // log holds exactly what was published, no more.
        assert_eq!(replay, live_described);

        // After the table is dropped, a replay still has every change, at its LSN; a
        // key is null where its schema is no longer known.
        shard.drop_table(&acme, "items").await.expect("drop");
        let after_drop = read_back(&shard, &acme, start).await;
        assert_eq!(
            after_drop.len(),
            replay.len() + 1,
            "plus the drop_table event"
        );
        for ((lsn, kind, data), (lsn2, kind2, data2)) in replay.iter().zip(&after_drop) {
            assert_eq!((lsn, kind), (lsn2, kind2));
            assert!(
                data == data2 || data2.contains(r#""key":null"#),
                "{data} vs {data2}"
            );
        }
    });
}

async fn read_back(
    shard: &Shard<SimStorage>,
    tenant: &TenantId,
    start: Lsn,
) -> Vec<(Lsn, EventKind, String)> {
    let mut read = Vec::new();
    let mut after = start;
    loop {
        match shard
            .changes_after(tenant, after, shard.applied_lsn())
            .await
            .expect("read")
        {
            ChangesRead::Batches { batches, through } => {
                read.extend(batches);
                if through == after || through >= shard.applied_lsn() {
                    break;
                }
                after = through;
            }
            ChangesRead::NotHeld { .. } => panic!("nothing was released"),
        }
    }
    described(&read.iter().collect::<Vec<_>>())
}

#[test]
fn a_tap_that_is_not_drained_is_closed_as_overflowed_and_writes_go_on() {
    run_local(async {
        let (shard, _) = Shard::open(SimStorage::new(3, faults()), WalConfig::default())
            .await
            .expect("open");
        let acme = tenant("acme");
        shard.create_tenant(&acme).await.expect("tenant");
        shard
            .create_table(&acme, schema("items"))
            .await
            .expect("table");
        let tap = shard.feed().attach(&acme, 4);
        feed::lock(&tap.interest).add(None);
        for i in 0..20 {
            shard
                .write(&acme, "items", &[upsert(i, "a")], None)
                .await
                .expect("writes never wait for a tap");
        }
        let mut got = 0;
        while tap.batches.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 4, "the tap held its capacity");
        assert!(tap.batches.is_closed());
        assert_eq!(tap.end(), TapEnd::Overflow);
        assert!(!shard.feed().listening(&acme), "the overflowed tap is gone");

        // A tap carries only the tables its consumer watches (tenant events always).
        let tap = shard.feed().attach(&acme, 100);
        feed::lock(&tap.interest).add(Some(&["other".to_string()]));
        shard
            .write(&acme, "items", &[upsert(99, "a")], None)
            .await
            .expect("write");
        assert!(tap.batches.try_recv().is_err(), "items is not watched");
        assert!(
            tap.published() >= shard.applied_lsn(),
            "the position still moves"
        );
        feed::lock(&tap.interest).add(Some(&["items".to_string()]));
        let (lsn, _) = shard
            .write(&acme, "items", &[upsert(98, "a")], None)
            .await
            .expect("write");
        assert_eq!(
            tap.batches.try_recv().expect("items is watched now").lsn,
            lsn
        );
        drop(tap);

        // Dropping the tenant ends a tap with its last batch.
        let tap = shard.feed().attach(&acme, 100);
        shard.drop_tenant(&acme).await.expect("drop");
        let last = tap.batches.try_recv().expect("the drop's batch");
        assert_eq!(last.events[0].kind, EventKind::TenantDropped);
        assert!(tap.batches.is_closed());
        assert_eq!(tap.end(), TapEnd::TenantDropped);
    });
}

/// Resumes read the log one at a time per shard, and one at a time per tenant before
/// that: one tenant's many resumes queue behind each other, not in front of another
/// tenant's (which waited behind all of them when the shard's turn was the only one).
#[test]
fn one_tenants_many_resumes_do_not_queue_in_front_of_anothers() {
    use std::cell::RefCell;
    use std::rc::Rc;
    run_local(async {
        let (shard, _) = Shard::open(SimStorage::new(3, faults()), WalConfig::default())
            .await
            .expect("open");
        let (busy, calm) = (tenant("busy"), tenant("calm"));
        for t in [&busy, &calm] {
            shard.create_tenant(t).await.expect("tenant");
            shard.create_table(t, schema("items")).await.expect("table");
            for id in 0..20 {
                shard
                    .write(t, "items", &[upsert(id, "a")], None)
                    .await
                    .expect("write");
            }
        }
        let shard = Rc::new(shard);
        let finished = Rc::new(RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, t) in std::iter::repeat_n(&busy, 16).chain([&calm]).enumerate() {
            let (shard, finished, t) = (shard.clone(), finished.clone(), t.clone());
            tasks.push(glommio::spawn_local(async move {
                let upto = shard.applied_lsn();
                let read = shard.changes_after(&t, Lsn(0), upto).await.expect("read");
                assert!(matches!(read, ChangesRead::Batches { .. }));
                finished
                    .borrow_mut()
                    .push(if i == 16 { "calm" } else { "busy" });
            }));
        }
        for task in tasks {
            task.await;
        }
        let order = finished.borrow();
        let calm_at = order.iter().position(|t| *t == "calm").expect("calm read");
        assert!(
            calm_at <= 2,
            "the other tenant read {}th: {order:?}",
            calm_at + 1
        );
    });
}
