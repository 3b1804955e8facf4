//! The runbook's point-in-time restore, run exactly as RUNBOOK.md writes it: the shell
//! block of "Backup and restore" step 2 is taken from the file and run by bash with its
//! variables set, against an archive a real server wrote. The restored server must hold
//! every row committed at or before the target and none after.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_until_archived, Server};
use serde_json::json;

/// The first ```sh block after the line that names the test running it.
fn runbook_block() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/RUNBOOK.md");
    let text = std::fs::read_to_string(&path).expect("RUNBOOK.md");
    let after = text
        .split_once("(`net/tests/runbook.rs` runs exactly this block)")
        .expect("RUNBOOK.md names net/tests/runbook.rs before the restore block")
        .1;
    let block = after
        .split_once("```sh\n")
        .expect("a sh block")
        .1
        .split_once("```")
        .expect("the block ends")
        .0;
    // The block is indented under its list item.
    block
        .lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn write_rows(server: &Server, ids: std::ops::Range<u64>) {
    for id in ids {
        let body =
            json!({"ops": [{"upsert": {"id": id, "name": format!("row {id}"), "batch": 0}}]});
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &body);
        assert_eq!(reply.status, 200, "{reply:?}");
    }
}

#[test]
fn the_runbooks_restore_block_runs_as_written_and_restores_to_the_target() {
    let block = runbook_block();
    assert!(block.contains("oc-pitr restore"), "{block}");
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = format!("file://{}", dir.path().join("archive").display());
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--shards",
            "2",
            "--archive",
            &archive,
            "--tail-window-ms",
            "100",
        ],
    );
    server.create_tenant_with_items("acme");
    write_rows(&server, 0..40);
    wait_until_archived(&server, 2);
    std::thread::sleep(Duration::from_millis(20));
    let target = oc_ship::timestamp::format_rfc3339(oc_io::TimestampMicros::now().0);
    std::thread::sleep(Duration::from_millis(20));
    write_rows(&server, 40..60);
    wait_until_archived(&server, 2);
    server.kill9();

    let (api_port, ops_port) = (free_port(), free_port());
    let api = format!("http://127.0.0.1:{api_port}");
    let ops = format!("http://127.0.0.1:{ops_port}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_oc-server"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let restored = dir.path().join("restored");
    // Files, not pipes: the block's server runs on in the background holding them.
    let (out_path, err_path) = (dir.path().join("block.out"), dir.path().join("block.err"));
    let status = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &block])
        .env("PATH", path)
        .env("ARCHIVE", &archive)
        .env("TARGET", &target)
        .env("RESTORED", &restored)
        .env(
            "NEW_ARCHIVE",
            format!("file://{}", dir.path().join("archive-2").display()),
        )
        .env("API", &api)
        .env("OPS", &ops)
        .env(
            "SERVER_FLAGS",
            format!(
                "--shards 2 --listen 127.0.0.1:{api_port} --ops-listen 127.0.0.1:{ops_port} {}",
                common::unsafe_fs_allowance(dir.path()).join(" ")
            ),
        )
        .stdout(Stdio::from(
            std::fs::File::create(&out_path).expect("stdout file"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(&err_path).expect("stderr file"),
        ))
        .status()
        .expect("run bash");
    // The block's server runs on in the background: found by its data directory.
    let server_pid = (|| {
        let ps = Command::new("pgrep")
            .args([
                "-f",
                &format!("oc-server --data-dir {}", restored.display()),
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&ps.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
    })();
    let stop = || {
        if let Some(pid) = server_pid {
            // SAFETY: kill(2) with a PID read from pgrep; a stale PID only fails.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        stop();
        panic!("the runbook block failed ({status}):\n{stdout}\n{stderr}");
    }
    assert!(stdout.contains("\"ready\":true"), "{stdout}");
    assert!(stdout.contains("\"action\":\"restore\""), "{stdout}");
    for id in 0..60u64 {
        let reply = common::request(
            "GET",
            &format!("{api}/v1/tenants/acme/tables/items/rows/{id}"),
            None,
        );
        let expected = if id < 40 { 200 } else { 404 };
        if reply.status != expected {
            stop();
            panic!("row {id}: {reply:?} (target {target})");
        }
    }
    stop();
}
