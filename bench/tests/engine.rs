//! `oc-bench engine`, run as a user runs it: what `--checkpoint-only` runs and leaves
//! out, and what each write phase records, in its JSON and Markdown.

use std::process::Command;

/// Runs `oc-bench engine` with `args` (0.2 s phases) in a fresh directory; its stderr,
/// JSON result and Markdown table.
fn run_engine(args: &[&str]) -> (String, serde_json::Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("engine.json");
    let out = Command::new(env!("CARGO_BIN_EXE_oc-bench"))
        .arg("engine")
        .args(args)
        .args(["--seconds", "0.2", "--dir"])
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("oc-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "oc-bench failed: {stderr}");
    let report =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON result")).expect("JSON");
    let markdown = std::fs::read_to_string(json.with_extension("md")).expect("the Markdown");
    (stderr, report, markdown)
}

#[test]
fn checkpoint_only_runs_the_checkpoint_phase_and_its_load_alone() {
    let (stderr, report, markdown) = run_engine(&["--checkpoint-only"]);
    assert!(
        !stderr.contains("WAL alone") && !stderr.contains("pool of"),
        "only the checkpoint phase runs: {stderr}"
    );
    assert_eq!(report["writes"], serde_json::json!([]), "{report}");
    assert_eq!(report["pool"], serde_json::json!([]), "{report}");
    assert!(report["wal_replay_mb_s"].is_null(), "{report}");
    assert!(
        report["checkpoints_during_phase"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(report["checkpoint_bytes"].as_u64() > Some(0), "{report}");
    for p99 in ["no_checkpoint_p99_us", "during_checkpoint_p99_us"] {
        assert!(report[p99].as_u64() > Some(0), "{p99}: {report}");
    }
    assert!(
        report["checkpoint_load_mb_s"].as_f64() > Some(0.0),
        "{report}"
    );
    let after = &report["after_reopen"];
    assert!(after["commits_per_s"].as_f64() > Some(0.0), "{report}");
    assert!(after["commit_p99_us"].as_u64() > Some(0), "{report}");
    assert!(after["segments_not_read"].is_u64(), "{report}");
    assert!(markdown.contains("| checkpoint load |"), "{markdown}");
    assert!(
        !markdown.contains("log replay") && !markdown.contains("| upserts | commits/s"),
        "{markdown}"
    );
}

#[test]
fn each_write_phase_records_the_logs_groups_and_spares_and_the_shards_busy_share() {
    let (_, report, markdown) = run_engine(&["--concurrency", "1"]);
    let writes = report["writes"].as_array().expect("write phases");
    assert!(!writes.is_empty(), "{report}");
    for phase in writes {
        // One writer's single rows and 100-row batches: a group holds one command.
        let mean = phase["wal_mean_group_bytes"].as_u64().expect("mean group");
        let rows = phase["rows_per_batch"].as_u64().expect("rows");
        assert!(mean >= 4096 && mean < rows * 4096 + 8192, "{phase}");
        let spares = phase["wal_spares"].as_array().expect("spares");
        assert_eq!(spares.len(), 3, "{phase}");
        assert!(spares.iter().all(|n| n.is_u64()), "{phase}");
        // One writer: one frame a group (a frame of the shard's own would be a group
        // of its own too).
        assert_eq!(phase["wal_frames_per_group"].as_f64(), Some(1.0), "{phase}");
        let write_us = phase["wal_group_write_mean_us"]
            .as_f64()
            .expect("write mean");
        assert!(write_us > 0.0, "{phase}");
        // Thread time cannot pass the wall time it was counted over; the CPU window
        // is a little wider than the timed load (the phase's bookkeeping around it).
        let busy = phase["shard_cpu_busy"].as_f64().expect("busy share");
        assert!(busy > 0.0 && busy <= 1.02, "{phase}");
    }
    assert!(
        markdown.contains("| log: mean group KiB | log: spares | log: frames per group | log: group write mean µs | shard busy |"),
        "{markdown}"
    );
}
