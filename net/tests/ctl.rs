//! `oc-ctl` on what a real server wrote: log segments frame by frame, a shard's
//! checkpoints loaded and checked (and a damaged one named unusable), archive keys and
//! an archived segment described.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;
use serde_json::json;

fn oc_ctl(args: &[&str]) -> (bool, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc-ctl");
    assert!(
        bin.exists(),
        "{} is missing: cargo test --workspace builds it",
        bin.display()
    );
    let out = Command::new(&bin).args(args).output().expect("run oc-ctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn files_in(dir: &Path, suffix: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| {
            let path = e.ok()?.path();
            path.to_string_lossy()
                .ends_with(suffix)
                .then(|| path.to_string_lossy().into_owned())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn oc_ctl_describes_segments_checkpoints_and_archive_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let archive = dir.path().join("archive");
    let uri = format!("file://{}", archive.display());
    let server = Server::start(
        &data,
        &[
            "--shards",
            "1",
            "--archive",
            &uri,
            "--wal-segment-bytes",
            "274432",
            "--checkpoint-wal-bytes",
            "600000",
        ],
    );
    server.create_tenant_with_items("acme");
    let name = "z".repeat(4000);
    let shard = data.join("shard-0");
    let mut id = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    // Write until a checkpoint exists and a sealed segment is archived (both run in
    // the background, so give them time as well as log).
    while files_in(&shard, ".snap").is_empty()
        || !archive.join("shard-0/wal").exists()
        || files_in(&archive.join("shard-0/wal"), "").is_empty()
    {
        let ops: Vec<_> = (id..id + 20)
            .map(|i| json!({"upsert": {"id": i, "name": name, "batch": i % 7}}))
            .collect();
        id += 20;
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint or archived segment appeared"
        );
        if id > 2000 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert!(server.terminate().success());

    let segments = files_in(&shard, ".seg");
    let (ok, text) = oc_ctl(
        &[
            &["wal"],
            segments
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .as_slice(),
        ]
        .concat(),
    );
    assert!(ok, "{text}");
    assert!(text.contains("lsn") || text.contains("LSN"), "{text}");

    let shard_arg = shard.to_str().expect("utf-8");
    let (ok, text) = oc_ctl(&["checkpoints", shard_arg]);
    assert!(ok, "{text}");
    assert!(
        text.contains("usable") && text.contains("indexes agree"),
        "{text}"
    );

    // The data directory given for a shard's is refused, naming the one to give.
    let data_arg = shard.parent().expect("data dir").to_str().expect("utf-8");
    let (ok, text) = oc_ctl(&["checkpoints", data_arg]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("is a data directory") && text.contains("shard-<n>"),
        "{text}"
    );

    // A damaged snapshot is named unusable, and the exit status says so.
    let snapshot = files_in(&shard, ".snap").pop().expect("a snapshot");
    let mut bytes = std::fs::read(&snapshot).expect("read");
    let middle = bytes.len() / 3;
    bytes[middle] ^= 0x10;
    std::fs::write(&snapshot, bytes).expect("damage");
    let (ok, text) = oc_ctl(&["checkpoints", shard_arg]);
    assert!(!ok, "{text}");
    assert!(text.contains("UNUSABLE"), "{text}");

    let (ok, keys) = oc_ctl(&["archive-ls", "--archive", &uri, "--prefix", "shard-0/wal/"]);
    assert!(ok, "{keys}");
    let key = keys.lines().next().expect("an archived segment");
    let (ok, text) = oc_ctl(&["archive-show", "--archive", &uri, key]);
    assert!(ok, "{text}");
    assert!(text.contains("sealed"), "{text}");
}
