//! The S3 archive against a real S3-compatible server (moto): the same contract the
//! local archive meets, checked through the public `Archive` trait, and the owner
//! record's claim on top of it.

#[path = "common_s3.rs"]
mod common_s3;

use common_s3::Moto;
use oc_ship::archive::{open_archive, ArchiveError, Condition};

#[test]
fn s3_archive_keeps_the_archive_contract() {
    // The only test in this binary, so setting the environment races nothing.
    for (k, v) in Moto::ENV {
        std::env::set_var(k, v);
    }
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("oc-contract");
    let archive = open_archive(&moto.uri("oc-contract", "cluster-a")).expect("open");

    // Put, get, versions.
    let v1 = archive
        .put("shard-0/x", b"one", &Condition::Always)
        .expect("put");
    let (got, version) = archive.get("shard-0/x").expect("get").expect("present");
    assert_eq!((got.as_slice(), &version), (&b"one"[..], &v1));
    assert_eq!(archive.get("shard-0/missing").expect("get"), None);

    // Only if absent: refused on an existing key, the object unchanged.
    let refused = archive.put("shard-0/x", b"two", &Condition::IfAbsent);
    assert!(
        matches!(refused, Err(ArchiveError::PreconditionFailed { .. })),
        "{refused:?}"
    );
    assert_eq!(
        archive.get("shard-0/x").expect("get").expect("present").0,
        b"one"
    );
    archive
        .put("shard-0/y", b"new", &Condition::IfAbsent)
        .expect("absent put");

    // Only if the version matches: the current version wins, a stale one is refused.
    let v2 = archive
        .put("shard-0/x", b"two", &Condition::IfVersion(v1.clone()))
        .expect("matching version");
    let stale = archive.put("shard-0/x", b"three", &Condition::IfVersion(v1));
    assert!(
        matches!(stale, Err(ArchiveError::PreconditionFailed { .. })),
        "{stale:?}"
    );
    assert_eq!(
        archive.get("shard-0/x").expect("get").expect("present").1,
        v2
    );

    // Listing is by prefix, in byte order, without the archive's own prefix; more
    // than one page of keys.
    for i in (0..1100).rev() {
        archive
            .put(&format!("shard-1/wal/{i:016x}"), b"s", &Condition::Always)
            .expect("put many");
    }
    let listed = archive.list("shard-1/").expect("list");
    assert_eq!(listed.len(), 1100);
    assert!(listed.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(listed[0], "shard-1/wal/0000000000000000");
    assert_eq!(
        archive.list("shard-0/").expect("list"),
        vec!["shard-0/x", "shard-0/y"]
    );

    // Delete, and deleting a missing key is fine.
    archive.delete("shard-0/y").expect("delete");
    archive.delete("shard-0/y").expect("delete again");
    assert_eq!(archive.get("shard-0/y").expect("get"), None);

    // Another prefix in the same bucket is another archive.
    let other = open_archive(&moto.uri("oc-contract", "cluster-b")).expect("open");
    assert!(other.list("").expect("list").is_empty());

    // An object damaged in the bucket is refused by name.
    moto.put_raw(
        "oc-contract",
        "cluster-a/shard-0/bad",
        b"not an oc object at all, no trailer",
    );
    let damaged = archive.get("shard-0/bad");
    assert!(
        matches!(&damaged, Err(ArchiveError::Corrupt { key, .. }) if key == "shard-0/bad"),
        "{damaged:?}"
    );
    // Bad keys never reach the server.
    assert!(matches!(
        archive.put("../escape", b"x", &Condition::Always),
        Err(ArchiveError::InvalidKey { .. })
    ));

    // The owner record (lease.json) through the same conditional puts: the first data
    // directory claims, renews, and a second one is refused; a renewal after another
    // holder wrote the record (If-Match with a stale ETag) is displaced.
    use oc_ship::lease::{self, Claimed, LeaseHold, Renewal, Renewed};
    let stale = lease::LEASE_STALE;
    let holder = lease::this_process("test", std::path::Path::new("/var/lib/oc/data"));
    lease::check_conditions(other.as_ref()).expect("S3 honours If-None-Match and If-Match");
    assert!(
        other
            .list(lease::CONDITIONS_PROBE_PREFIX)
            .expect("list")
            .is_empty(),
        "the probe object is removed"
    );
    let first = lease::claim(other.as_ref(), "aa", holder.clone(), 1, stale).expect("claim");
    assert_eq!(first.claimed, Claimed::New);
    let renewed = lease::claim(other.as_ref(), "aa", holder.clone(), 2, stale).expect("renew");
    assert_eq!(
        (renewed.claimed.clone(), renewed.lease.renewed_at_us),
        (Claimed::Renewed, 2)
    );
    let refused = lease::claim(other.as_ref(), "bb", holder.clone(), 3, stale);
    assert!(
        matches!(&refused, Err(lease::LeaseError::OwnedByAnother { .. })),
        "{refused:?}"
    );
    let hold = std::sync::Arc::new(LeaseHold::new(std::time::Instant::now(), stale));
    let mut renewal = Renewal::new(other.clone(), renewed, hold.clone());
    assert!(matches!(renewal.renew(4), Renewed::Yes));
    let copy = lease::Holder {
        host: "elsewhere".into(),
        ..holder
    };
    let taken = lease::claim(other.as_ref(), "aa", copy.clone(), 4 + 31_000_000, stale)
        .expect("a stale holder is taken over");
    assert!(matches!(taken.claimed, Claimed::TakenOver { .. }));
    match renewal.renew(4 + 32_000_000) {
        Renewed::Displaced(Ok(Some(found))) => assert_eq!(found.holder, copy),
        outcome => panic!("not displaced: {outcome:?}"),
    }
    assert!(hold.is_displaced());

    // A server that is down is an I/O error, not a hang or a panic.
    let uri = moto.uri("oc-contract", "cluster-a");
    drop(moto);
    let down = open_archive(&uri).expect("open is lazy");
    let err = down.get("shard-0/x").expect_err("server is down");
    assert!(matches!(err, ArchiveError::Io { .. }), "{err:?}");
}
