//! Rollback safety: this build refuses a data directory or an archive written by a newer
//! format version, naming the file, the version and what to do, and changes nothing.
//! The fixtures are this build's own files with the version raised, as a newer release
//! would write them.

mod common;

use std::time::Duration;

use common::{oc_pitr, run_expecting_exit, Server};
use oc_ship::archive::{open_archive, Condition};
use serde_json::Value;

#[test]
fn a_newer_data_directory_or_archive_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let uri = format!("file://{}", dir.path().join("archive").display());
    let server = Server::start(
        &data,
        &[
            "--shards",
            "2",
            "--archive",
            &uri,
            "--tail-window-ms",
            "100",
        ],
    );
    server.create_tenant_with_items("acme");
    common::wait_until_archived(&server, 2);
    assert!(server.terminate().success());

    // The data directory's layout file, as a newer release would write it.
    let layout_path = data.join("oc-layout.json");
    let mut layout: Value =
        serde_json::from_slice(&std::fs::read(&layout_path).expect("layout")).expect("JSON");
    layout["format_version"] = Value::from(99);
    let newer = serde_json::to_vec_pretty(&layout).expect("JSON");
    std::fs::write(&layout_path, &newer).expect("write");
    let data_arg = data.to_str().expect("utf-8");
    let mut args = vec!["--data-dir", data_arg, "--archive", uri.as_str()];
    args.extend(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"]);
    let refused = run_expecting_exit(&args, &[], Duration::from_secs(30));
    assert!(refused.status.is_some_and(|s| !s.success()), "{refused:?}");
    for wanted in [
        "oc-layout.json",
        "format_version 99 is not supported",
        "a newer oc wrote it",
        "Rollback",
    ] {
        assert!(
            refused.stderr.contains(wanted),
            "{wanted}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        std::fs::read(&layout_path).expect("layout"),
        newer,
        "the refused directory is left as it was"
    );

    // The archive's manifest, as a newer release would write it.
    let archive = open_archive(&uri).expect("archive");
    let (bytes, _) = archive
        .get("manifest.json")
        .expect("read")
        .expect("a manifest");
    let mut manifest: Value = serde_json::from_slice(&bytes).expect("JSON");
    manifest["format_version"] = Value::from(7);
    archive
        .put(
            "manifest.json",
            &serde_json::to_vec(&manifest).expect("JSON"),
            &Condition::Always,
        )
        .expect("write");
    let verified = oc_pitr(&["verify", "--archive", &uri]);
    assert!(!verified.success, "{verified:?}");
    for wanted in [
        "manifest.json",
        "format_version 7 is not supported",
        "a newer oc wrote it",
    ] {
        assert!(verified.stderr.contains(wanted), "{wanted}: {verified:?}");
    }
    let restored = dir.path().join("restored");
    let restore = common::restore_latest(&uri, &restored);
    assert!(!restore.success, "{restore:?}");
    assert!(restore.stderr.contains("format_version 7"), "{restore:?}");
}
