//! `oc-bench wal`, run as a user runs it: the one-appender phases carry their own
//! baseline, the raw disk measured right before and right after each of them.

use std::process::Command;

#[test]
fn the_one_appender_phases_are_measured_against_the_raw_disk_right_around_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("wal.json");
    let out = Command::new(env!("CARGO_BIN_EXE_oc-bench"))
        .args(["wal", "--seconds", "0.2", "--concurrency", "1,4", "--dir"])
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .output()
        .expect("oc-bench runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "oc-bench failed: {stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON result")).expect("JSON");
    for phases in [
        &report["small_appends"],
        &report["steady_state"]["small_appends"],
    ] {
        let phases = phases.as_array().expect("small-append phases");
        assert_eq!(phases.len(), 2, "{report}");
        let (one, four) = (&phases[0], &phases[1]);
        assert_eq!(one["concurrency"], 1, "{report}");
        let around: Vec<f64> = one["raw_fsync_around_per_s"]
            .as_array()
            .expect("the raw rate before and after")
            .iter()
            .map(|v| v.as_f64().expect("a rate"))
            .collect();
        assert!(
            around.len() == 2 && around.iter().all(|r| *r > 0.0),
            "{one}"
        );
        let appends = one["appends_per_s"].as_f64().expect("appends/s");
        let ratio = one["ratio_to_raw_fsync_around"]
            .as_f64()
            .expect("the ratio");
        assert!(
            (ratio - 2.0 * appends / (around[0] + around[1])).abs() < 1e-9,
            "{one}"
        );
        // Only the lone appender gets a baseline of its own.
        assert!(four["raw_fsync_around_per_s"].is_null(), "{four}");
        assert!(four["ratio_to_raw_fsync_around"].is_null(), "{four}");
    }
    let markdown = std::fs::read_to_string(json.with_extension("md")).expect("the Markdown");
    assert!(
        markdown.contains("× raw fsync/s right before and after it"),
        "{markdown}"
    );
}
