//! `oc-server check` (the preflight) and the start-time refusal of a data directory on
//! a file system that keeps nothing across a power loss, through the real binary.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_expecting_exit, Server};

fn check(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_oc-server"))
        .arg("check")
        .args(args)
        .output()
        .expect("run oc-server check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tmpfs directory for the refusal tests: /dev/shm where it is tmpfs.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    (oc_net::preflight::unsafe_file_system(shm) == Some("tmpfs"))
        .then(|| tempfile::tempdir_in(shm).expect("tempdir in /dev/shm"))
}

#[test]
fn check_passes_on_a_disk_and_names_each_finding() {
    let dir = tempfile::tempdir().expect("tempdir");
    if oc_net::preflight::unsafe_file_system(dir.path()).is_some() {
        eprintln!("skipped: the temp directory is in memory here");
        return;
    }
    let data = dir.path().join("data");
    let archive = format!("file://{}", dir.path().join("archive").display());
    let data_arg = data.to_str().expect("utf-8");
    let (passed, stdout, stderr) = check(&[
        "--data-dir",
        data_arg,
        "--archive",
        &archive,
        "--output",
        "json",
    ]);
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
    let checks = report["checks"].as_array().expect("checks");
    let verdict = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {report:#}"))["verdict"]
            .as_str()
            .expect("verdict")
            .to_string()
    };
    for name in [
        "kernel",
        "io_uring",
        "O_DIRECT",
        "archive",
        "data directory lock",
    ] {
        assert_eq!(verdict(name), "ok", "{report:#}");
    }
    // The archive beside the data, on one disk: said, not refused.
    assert_eq!(verdict("archive file system"), "warn", "{report:#}");
    // ext4 or XFS is ok; another disk file system (btrfs, …) a warning, never a failure.
    assert_ne!(verdict("data directory file system"), "fail", "{report:#}");
    // Latency depends on the disk: present, measured, never an unreadable verdict.
    assert!(
        ["ok", "warn", "fail"].contains(&verdict("durable write latency").as_str()),
        "{report:#}"
    );
    assert!(report.to_string().contains("p99"), "{report:#}");
    // The test's own memlock limit starts executors, so it is never a failure here.
    assert_ne!(verdict("memlock limit"), "fail", "{report:#}");
    assert_eq!(
        passed,
        report["ok"] == true,
        "exit status follows the report"
    );
    // The check leaves no probe behind: the archive holds no preflight object.
    let leftovers = std::fs::read_dir(dir.path().join("archive").join("preflight"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);

    // Text output: one line per check, a fix under each warning.
    let (_, text, _) = check(&["--data-dir", data_arg, "--archive", "none"]);
    assert!(text.contains("WARN  archive"), "{text}");
    assert!(text.contains("fix: without an archive"), "{text}");
}

#[test]
fn a_data_directory_in_memory_is_refused_unless_allowed() {
    let Some(shm) = tmpfs_dir() else {
        eprintln!("skipped: /dev/shm is not tmpfs here");
        return;
    };
    let data = shm.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let refused = run_expecting_exit(
        &[
            "--data-dir",
            data_arg,
            "--archive",
            "none",
            "--listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(refused.status.is_some_and(|s| !s.success()), "{refused:?}");
    assert!(refused.stderr.contains("is on tmpfs"), "{refused:?}");
    assert!(refused.stderr.contains("--allow-unsafe-fs"), "{refused:?}");
    assert!(!data.exists(), "nothing was written: {refused:?}");

    let (passed, text, _) = check(&["--data-dir", data_arg, "--archive", "none"]);
    assert!(!passed, "{text}");
    assert!(text.contains("FAIL  data directory file system"), "{text}");

    // Allowed explicitly (the harness adds --allow-unsafe-fs on tmpfs): it serves.
    assert_eq!(common::unsafe_fs_allowance(&data), ["--allow-unsafe-fs"]);
    let server = Server::start(&data, &["--archive", "none"]);
    assert_eq!(server.get("/v1/tenants").status, 200);
}

/// The check names what a start would run into: a server already running on the data
/// directory (by its PID, without touching its lock), and a local archive in memory.
#[test]
fn check_names_a_locked_data_directory_and_fails_an_archive_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8");
    let server = Server::start(&data, &["--archive", "none"]);
    let lock_text = || std::fs::read_to_string(data.join("oc.lock")).expect("oc.lock");
    let before = lock_text();
    let (_, text, _) = check(&["--data-dir", data_arg, "--archive", "none"]);
    assert!(text.contains("WARN  data directory lock"), "{text}");
    assert!(text.contains(&format!("PID {}", server.pid())), "{text}");
    assert_eq!(
        lock_text(),
        before,
        "the check wrote the live server's lock file"
    );
    drop(server);
    let (_, text, _) = check(&["--data-dir", data_arg, "--archive", "none"]);
    assert!(text.contains("ok    data directory lock"), "{text}");
    assert_eq!(lock_text(), before, "the check wrote the lock file");

    let Some(shm) = tmpfs_dir() else {
        eprintln!("skipped the archive part: /dev/shm is not tmpfs here");
        return;
    };
    let archive = format!("file://{}", shm.path().join("archive").display());
    let (passed, text, _) = check(&["--data-dir", data_arg, "--archive", &archive]);
    assert!(!passed, "{text}");
    assert!(text.contains("FAIL  archive file system"), "{text}");
    assert!(text.contains("is on tmpfs"), "{text}");
}
