//! `oc-bench wal`, run as a user runs it: the one-appender and 256 KiB-record phases
//! carry their own baseline, the raw disk measured before each slice of the measured
//! load and after the last.

use std::process::Command;

#[test]
fn the_phases_with_a_baseline_are_measured_against_the_raw_disk_between_their_slices() {
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
        let around = rates(&one["raw_fsync_around_per_s"]);
        let appends = one["appends_per_s"].as_f64().expect("appends/s");
        let ratio = one["ratio_to_raw_fsync_around"]
            .as_f64()
            .expect("the ratio");
        assert!((ratio - appends / mean(&around)).abs() < 1e-9, "{one}");
        // Only the lone appender gets a baseline of its own.
        assert!(four["raw_fsync_around_per_s"].is_null(), "{four}");
        assert!(four["ratio_to_raw_fsync_around"].is_null(), "{four}");
    }
    for large in [
        &report["raw_durable_around_fresh_mb_s"],
        &report["steady_state"]["raw_durable_around_mb_s"],
    ] {
        rates(large);
    }
    let markdown = std::fs::read_to_string(json.with_extension("md")).expect("the Markdown");
    assert!(
        markdown.contains("× raw fsync/s around and between its slices")
            && markdown.contains("× raw durable around and between its slices"),
        "{markdown}"
    );
}

/// A baseline's rates: one before each of the measured load's slices and one after the
/// last (`BASELINE_SLICES` in bench/src/wal.rs is 5), each a rate the disk made.
fn rates(value: &serde_json::Value) -> Vec<f64> {
    let rates: Vec<f64> = value
        .as_array()
        .unwrap_or_else(|| panic!("a baseline's rates: {value}"))
        .iter()
        .map(|v| v.as_f64().expect("a rate"))
        .collect();
    assert!(
        rates.len() == 6 && rates.iter().all(|r| *r > 0.0),
        "{value}"
    );
    rates
}

fn mean(rates: &[f64]) -> f64 {
    rates.iter().sum::<f64>() / rates.len() as f64
}
