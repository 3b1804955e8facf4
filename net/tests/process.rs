//! The process is fully up or gone, and it is the only writer of what it writes: a
//! second server (or a restore) on a locked data directory is refused naming the
//! holder's PID; a second data directory on a claimed archive is refused, and so is a
//! copy of a data directory while the original runs (the original exits once a copy
//! took the archive over); a panic on a shard, or a failed log, ends the process with
//! a non-zero status and one clear line, and the restart recovers every acknowledged
//! write; SIGTERM always ends it.
//!
//! Panics and log failures come from the test-only failpoints (`OC_FAILPOINTS`, see
//! io/src/failpoint.rs), which test builds of `oc-server` compile in.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{copy_dir, restore_latest, run_expecting_exit, segment_files, try_request, Server};
use serde_json::{json, Value};

/// Generous bounds for a loaded 2-core machine; the tests print what they measured.
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

fn file_uri(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn write_row(server: &Server, tenant: &str, id: u64) -> Result<common::Reply, String> {
    let body = json!({"ops": [{"upsert": {"id": id, "name": format!("row {id}"), "batch": 0}}]});
    try_request(
        "POST",
        &format!("{}/v1/tenants/{tenant}/tables/items/rows", server.api),
        Some(&body.to_string()),
    )
}

fn has_row(server: &Server, tenant: &str, id: u64) -> bool {
    let got = server.get(&format!("/v1/tenants/{tenant}/tables/items/rows/{id}"));
    match got.status {
        200 => true,
        404 => false,
        _ => panic!("reading {tenant}/{id}: {got:?}"),
    }
}

fn data_dir_id(data: &Path) -> String {
    let layout: Value =
        serde_json::from_slice(&std::fs::read(data.join("oc-layout.json")).expect("layout file"))
            .expect("layout JSON");
    layout["data_dir_id"]
        .as_str()
        .expect("a data directory id")
        .to_string()
}

/// One shard without an archive, in segments of 268 KiB: a few thousand 4 KB rows
/// fill several.
const SMALL_SEGMENTS: [&str; 6] = [
    "--shards",
    "1",
    "--archive",
    "none",
    "--wal-segment-bytes",
    "274432",
];

/// Writes rows of tenant `acme`'s items table, 20 of about 4 KB a request from id 0,
/// until `enough`; returns the number written.
fn write_until(server: &Server, enough: impl Fn() -> bool) -> u64 {
    let name = "z".repeat(4000);
    let mut id = 0;
    while !enough() {
        let ops: Vec<_> = (id..id + 20)
            .map(|i| json!({"upsert": {"id": i, "name": name, "batch": 0}}))
            .collect();
        id += 20;
        let reply = server.post("/v1/tenants/acme/tables/items/rows", &json!({ "ops": ops }));
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(id < 4000, "the log did not rotate as often as wanted");
    }
    id
}

fn fatal_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("FATAL")).collect()
}

/// A supervisor that restarts at once after a kill -9 gets a server: the killed one's
/// listening sockets close a few milliseconds after its exit (the kernel tears its
/// io_uring down late), and the new one waits for its addresses rather than refusing
/// to start (about 1 restart in 5 was refused before).
#[test]
fn a_restart_right_after_a_kill_9_on_the_same_ports_comes_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (api, ops) = (common::free_addr(), common::free_addr());
    let args = common::fixed_addr_args(&api, &ops, "2");
    for id in 1..=20 {
        let server = Server::start(&data, &args);
        if id == 1 {
            server.create_tenant_with_items("acme");
        }
        assert_eq!(write_row(&server, "acme", id).expect("write").status, 200);
        assert!((1..=id).all(|i| has_row(&server, "acme", i)));
        server.kill9();
    }
}

/// Even on the same ports (SO_REUSEPORT would let it bind them), a second server is
/// refused before it reads the directory, and the message names the first one's PID.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused_naming_the_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let first = Server::start(&data, &["--shards", "1", "--archive", "none"]);
    first.create_tenant_with_items("acme");
    assert_eq!(write_row(&first, "acme", 1).expect("write").status, 200);
    let (api, ops) = (
        first.api.trim_start_matches("http://").to_string(),
        first.ops.trim_start_matches("http://").to_string(),
    );
    let second = run_expecting_exit(
        &[
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--listen",
            &api,
            "--ops-listen",
            &ops,
            "--shards",
            "1",
            "--archive",
            "none",
            "--no-pin",
        ],
        &[],
        EXIT_DEADLINE,
    );
    assert!(
        second.status.is_some_and(|s| !s.success()),
        "the second server did not refuse: {second:?}"
    );
    assert!(
        second
            .stderr
            .contains(&format!("locked by PID {}", first.pid())),
        "{}",
        second.stderr
    );
    assert!(
        second.stderr.contains("Stop that process first"),
        "{}",
        second.stderr
    );
    assert!(
        second.stdout.is_empty(),
        "it must never serve: {}",
        second.stdout
    );
    // The first one is untouched and still the only writer.
    assert_eq!(write_row(&first, "acme", 2).expect("write").status, 200);
    assert!(has_row(&first, "acme", 1) && has_row(&first, "acme", 2));
    assert!(first.terminate().success());
    // Once it is gone the directory opens again (the lock died with the process).
    let again = Server::start(&data, &["--shards", "1", "--archive", "none"]);
    assert!(has_row(&again, "acme", 2));
}

/// A second server with a data directory of its own but a running one's API or ops
/// address is refused: with `SO_REUSEPORT` it would have joined the address and taken
/// part of the traffic, answering for tenants it does not hold.
#[test]
fn a_second_server_on_a_running_ones_addresses_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Server::start(&dir.path().join("first"), &["--shards", "2"]);
    first.create_tenant_with_items("acme");
    let (api, ops) = (
        first.api.trim_start_matches("http://").to_string(),
        first.ops.trim_start_matches("http://").to_string(),
    );
    let second = dir.path().join("second");
    let allowance = common::unsafe_fs_allowance(dir.path());
    for (listen, ops_listen, taken) in [(&*api, "127.0.0.1:0", &api), ("127.0.0.1:0", &*ops, &ops)]
    {
        let mut args = vec![
            "--data-dir",
            second.to_str().expect("utf-8"),
            "--listen",
            listen,
            "--ops-listen",
            ops_listen,
            "--no-pin",
        ];
        args.extend(&allowance);
        let refused = run_expecting_exit(&args, &[], EXIT_DEADLINE);
        assert!(
            refused.status.is_some_and(|s| !s.success()),
            "a server on {taken} too did not refuse: {refused:?}"
        );
        assert!(
            refused
                .stderr
                .contains(&format!("{taken} is in use by another process")),
            "{}",
            refused.stderr
        );
        assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    }
    // Every request still reaches the first server.
    for _ in 0..32 {
        assert_eq!(first.get("/v1/tenants/acme").status, 200);
        assert_eq!(first.ops_get("/health").0, 200);
    }
}

/// A shard directory emptied (or swapped with another) between two runs is refused at
/// start, naming it, instead of opening as an empty shard whose tenants are gone; with
/// its own files back, the server starts with every row.
#[test]
fn a_shard_directory_that_is_not_its_own_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = ["--shards", "2", "--archive", "none"];
    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    assert_eq!(write_row(&server, "acme", 1).expect("write").status, 200);
    assert!(server.terminate().success());
    for shard in ["shard-0", "shard-1"] {
        assert!(data.join(shard).join("oc-shard.json").exists(), "{shard}");
    }
    let (one, aside) = (data.join("shard-1"), dir.path().join("aside"));
    std::fs::rename(&one, &aside).expect("files moved away");
    std::fs::create_dir(&one).expect("an empty shard-1");
    let refused = Server::try_start(&data, &args)
        .err()
        .expect("an emptied shard directory must be refused");
    assert!(
        refused.contains("shard-1 has lost its oc-shard.json and holds no log"),
        "{refused}"
    );
    std::fs::remove_dir(&one).expect("rmdir");
    std::fs::rename(&aside, &one).expect("files back");
    let (zero, one) = (data.join("shard-0"), data.join("shard-1"));
    std::fs::rename(&zero, &aside).expect("swap");
    std::fs::rename(&one, &zero).expect("swap");
    std::fs::rename(&aside, &one).expect("swap");
    let refused = Server::try_start(&data, &args)
        .err()
        .expect("swapped shard directories must be refused");
    assert!(refused.contains("holds shard 1's files"), "{refused}");
    std::fs::rename(&one, &aside).expect("swap back");
    std::fs::rename(&zero, &one).expect("swap back");
    std::fs::rename(&aside, &zero).expect("swap back");
    let again = Server::start(&data, &args);
    assert!(has_row(&again, "acme", 1));
}

/// A segment deleted from the middle of the log is refused at start as a missing file,
/// naming the LSNs it held and warning off the truncate option (which would drop the
/// whole segments after it), not as damage inside a segment.
#[test]
fn a_log_segment_deleted_from_the_middle_is_named_as_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = SMALL_SEGMENTS;
    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    let shard = data.join("shard-0");
    let segments = || segment_files(&shard);
    write_until(&server, || segments().len() >= 3);
    server.kill9();
    let all = segments();
    let middle = &all[all.len() - 2];
    std::fs::remove_file(shard.join(middle)).expect("delete a middle segment");
    let refused = Server::try_start(&data, &args)
        .err()
        .expect("a missing middle segment must be refused");
    assert!(
        refused.contains("are in no segment file") && refused.contains("do not use --truncate"),
        "{refused}"
    );
}

/// A log segment deleted by hand is refused at start, naming the segment sealed before
/// it, instead of starting without the writes it held; the truncate option accepts the
/// loss once, and then the server starts as usual.
#[test]
fn a_deleted_newest_log_segment_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = SMALL_SEGMENTS;
    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    let shard = data.join("shard-0");
    let segments = || segment_files(&shard);
    write_until(&server, || segments().len() >= 3);
    // One more write lands in the newest segment; no shutdown checkpoint covers it.
    assert_eq!(
        write_row(&server, "acme", 100_000).expect("write").status,
        200
    );
    server.kill9();
    let all = segments();
    let (newest, sealed) = (&all[all.len() - 1], &all[all.len() - 2]);
    std::fs::remove_file(shard.join(newest)).expect("delete the newest segment");

    let refused = Server::try_start(&data, &args)
        .err()
        .expect("a lost newest segment must be refused");
    assert!(
        refused.contains(sealed.as_str())
            && refused.contains("the log's newest segment was deleted or lost"),
        "{refused}"
    );
    let truncating = [&args[..], &["--truncate-corrupt-wal"]].concat();
    let accepted = Server::start(&data, &truncating);
    assert!(
        has_row(&accepted, "acme", 0),
        "rows before the lost segment stay"
    );
    assert!(
        !has_row(&accepted, "acme", 100_000),
        "the lost segment's row is gone"
    );
    assert!(accepted.terminate().success());
    let again = Server::start(&data, &args);
    assert!(has_row(&again, "acme", 0));
}

/// The truncate option may cut frames an archive already holds, after which the log
/// would write other frames under their LSNs and object names: with an archive that
/// was shipped to, the start is refused before the log is opened (nothing is cut); a
/// new, empty archive is accepted.
#[test]
fn the_truncate_option_refuses_an_archive_that_was_shipped_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let with_archive = |archive: &str| {
        let uri = format!("file://{}", dir.path().join(archive).display());
        let mut args: Vec<String> = SMALL_SEGMENTS.iter().map(|a| a.to_string()).collect();
        args[3] = uri;
        args
    };
    let shipped = with_archive("archive");
    fn as_strs(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    fn truncating(args: &[String]) -> Vec<&str> {
        [as_strs(args), vec!["--truncate-corrupt-wal"]].concat()
    }
    let server = Server::start(&data, &as_strs(&shipped));
    server.create_tenant_with_items("acme");
    let shard = data.join("shard-0");
    write_until(&server, || segment_files(&shard).len() >= 3);
    common::wait_until_archived(&server, 1);
    server.kill9();
    let all = segment_files(&shard);
    std::fs::remove_file(shard.join(&all[all.len() - 1])).expect("delete the newest segment");

    let refused = Server::try_start(&data, &truncating(&shipped))
        .err()
        .expect("the truncate option with a shipped-to archive must be refused");
    assert!(
        refused.contains("--truncate-corrupt-wal may cut frames the archive")
            && refused.contains("new, empty location"),
        "{refused}"
    );
    // Nothing was cut: the loss is still found and refused.
    let still = Server::try_start(&data, &as_strs(&shipped))
        .err()
        .expect("still refused without the option");
    assert!(
        still.contains("the log's newest segment was deleted or lost"),
        "{still}"
    );
    let accepted = Server::start(&data, &truncating(&with_archive("fresh-archive")));
    assert!(has_row(&accepted, "acme", 0), "rows before the loss stay");
    assert!(accepted.terminate().success());
}

/// A damaged log segment that the newest checkpoint covers does not stop a start: the
/// open reads the log only from the checkpoint on, every acknowledged row is served,
/// and the check after the start reports the damage (`oc_wal_segments_damaged`,
/// the OcWalSegmentDamaged alert) with a line naming the segment.
#[test]
fn a_damaged_segment_behind_the_checkpoint_is_reported_after_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = SMALL_SEGMENTS;
    let checkpointing = [&args[..], &["--checkpoint-interval-s", "1"]].concat();
    let shard = data.join("shard-0");
    let segments = || segment_files(&shard);
    let scrape = |server: &Server, series: &str| {
        let text = ureq::get(&format!("{}/metrics", server.ops))
            .call()
            .expect("GET /metrics")
            .into_string()
            .expect("a text scrape");
        common::scrape_value(&text, series)
    };
    // Starts a server that checkpoints within a second and stops it once its
    // checkpoint holds everything logged.
    let checkpoint = || {
        let server = Server::start(&data, &checkpointing);
        let deadline = Instant::now() + Duration::from_secs(60);
        while scrape(&server, "oc_checkpoint_age_s{shard=\"0\"}") != Some(0.0) {
            assert!(Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(server.terminate().success());
    };

    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    assert!(server.terminate().success());
    checkpoint();
    // Three more segments, then a second checkpoint: the log between the two is kept
    // (a segment goes once both cover it), and the newest covers all but the last.
    let server = Server::start(&data, &args);
    let before = segments().len();
    let id = write_until(&server, || segments().len() >= before + 3);
    assert!(server.terminate().success());
    checkpoint();
    let kept = segments();
    assert!(kept.len() >= 3, "{kept:?}");
    // 8 KiB of a sealed segment's frames (a group's padding is under 4 KiB).
    let damaged = &kept[0];
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(shard.join(damaged))
        .expect("open the oldest segment");
    std::os::unix::fs::FileExt::write_all_at(&file, &[0xAB; 8192], 100_000).expect("damage");
    file.sync_all().expect("sync");

    let server = Server::start(&data, &args);
    for i in [0, id / 2, id - 1] {
        assert!(has_row(&server, "acme", i), "row {i} after the restart");
    }
    let scrape_damaged = || scrape(&server, "oc_wal_segments_damaged{shard=\"0\"}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while scrape_damaged() != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the damage was not reported: {:?}\n{}",
            scrape_damaged(),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = server.stderr();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("is damaged") && l.contains(damaged.as_str())),
        "{stderr}"
    );
    let (ready, _) = server.ops_get("/ready");
    assert_eq!(ready, 200);
    assert!(has_row(&server, "acme", 0));
}

/// An archive belongs to the data directory that claimed it, running or not.
#[test]
fn a_second_data_directory_on_a_claimed_archive_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let uri = file_uri(&dir.path().join("archive"));
    let args = ["--shards", "1", "--archive", &uri];
    let owner = Server::start(&data_a, &args);
    let owner_id = data_dir_id(&data_a);
    let refused = Server::try_start(&data_b, &args)
        .err()
        .expect("a second data directory on the archive must be refused");
    assert!(
        refused.contains("the archive is owned by another data directory"),
        "{refused}"
    );
    assert!(refused.contains(&owner_id), "{refused}");
    assert!(
        refused.contains(&format!("PID {}", owner.pid())),
        "{refused}"
    );
    assert!(owner.terminate().success());
    // Stopped is not released: the archive still holds the owner's history.
    let refused = Server::try_start(&data_b, &args)
        .err()
        .expect("still owned after the owner stopped");
    assert!(refused.contains(&owner_id), "{refused}");
    // The refused start leaves no layout or audit log behind: nothing of it is
    // inherited by the next start, once the archive is fixed.
    for left in ["oc-layout.json", "audit"] {
        assert!(
            !data_b.join(left).exists(),
            "the refused start left {left} in {}",
            data_b.display()
        );
    }
    let own = file_uri(&dir.path().join("archive-b"));
    let second = Server::start(&data_b, &["--shards", "2", "--archive", &own]);
    second.create_tenant_with_items("acme");
    drop(second);
    // The owner itself restarts on it.
    let owner = Server::start(&data_a, &args);
    assert_eq!(data_dir_id(&data_a), owner_id, "the id survives restarts");
    drop(owner);
}

/// A first start that fails after it claimed its archive (a damaged object in it)
/// keeps its layout: the archive now names that directory's id, and the start after
/// the repair must be the same directory's, not one the archive refuses.
#[test]
fn a_first_start_that_fails_after_claiming_its_archive_keeps_its_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let archive = dir.path().join("archive");
    let damaged = archive.join("shard-0/checkpoint/0000000000000001.json");
    std::fs::create_dir_all(damaged.parent().expect("parent")).expect("mkdir");
    std::fs::write(&damaged, b"not a manifest").expect("write");
    let uri = file_uri(&archive);
    let args = ["--shards", "1", "--archive", &uri];
    let refused = Server::try_start(&data, &args)
        .err()
        .expect("a damaged manifest refuses the start");
    assert!(refused.contains("0000000000000001.json"), "{refused}");
    assert!(
        data.join("oc-layout.json").exists(),
        "the layout the archive names was removed: {refused}"
    );
    let id = data_dir_id(&data);
    std::fs::remove_file(&damaged).expect("repair");
    let server = Server::start(&data, &args);
    assert_eq!(data_dir_id(&data), id);
    server.create_tenant_with_items("acme");
}

/// A process stopped while it holds the local archive's lock (a Python child taking
/// it, then SIGSTOPped) keeps it for as long as it stays stopped. A server starting on
/// that archive gives up after the bounded wait, naming the lock, the holder's PID and
/// its stopped state, instead of hanging at start; once the holder resumes and exits,
/// the server starts.
#[test]
fn a_stopped_holder_of_the_archive_lock_fails_a_start_naming_it_instead_of_hanging() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("archive");
    std::fs::create_dir_all(&archive).expect("archive dir");
    let lock = archive.join(oc_ship::archive::local::CAS_LOCK_FILE);
    let holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl, sys, time\n\
             f = open(sys.argv[1], 'a')\n\
             fcntl.flock(f, fcntl.LOCK_EX)\n\
             print('held', flush=True)\n\
             time.sleep(600)",
        ])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut holder = KilledOnDrop(holder);
    let mut line = String::new();
    std::io::BufReader::new(holder.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "held");
    let paused = common::Paused::stop(holder.0.id());

    let args = ["--shards", "1", "--archive", &file_uri(&archive)];
    let started = Instant::now();
    let refused = Server::try_start(&dir.path().join("data"), &args)
        .err()
        .expect("the start must fail while the lock is held");
    let waited = started.elapsed();
    for needed in [
        format!("could not take the lock {} within 10 s", lock.display()),
        format!(
            "PID {} (as this process's PID namespace sees it; state T (stopped)) holds it",
            holder.0.id()
        ),
        "it is stopped and keeps the lock until it resumes (SIGCONT) or exits".to_string(),
        "RUNBOOK.md: \"could not take the lock\"".to_string(),
    ] {
        assert!(refused.contains(&needed), "{needed:?} in:\n{refused}");
    }
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(40)).contains(&waited),
        "gave up after {waited:?}"
    );
    drop(paused);
    drop(holder);
    let server = Server::start(&dir.path().join("data"), &args);
    server.create_tenant_with_items("acme");
    assert_eq!(write_row(&server, "acme", 1).expect("write").status, 200);
}

/// A child process killed (and reaped) when dropped, failed assertion or not.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A file-level copy of a data directory keeps its id, so the archive's owner record
/// cannot tell the copies apart by id; it tells them apart by holder. While the
/// original runs (and renews the record), the copy is refused, naming it. Once the
/// original has stopped renewing for the stale window (SIGSTOPped here, as a paused VM
/// or a partitioned host would), the copy takes the record over; the original, resumed,
/// finds its renewal refused and exits with status 5 and one line naming the copy.
#[test]
fn a_copy_of_a_data_directory_is_refused_while_the_original_runs_and_displaces_it_once_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, copy) = (dir.path().join("data"), dir.path().join("copy"));
    let archive = dir.path().join("archive");
    let uri = file_uri(&archive);
    // A renewal every second: a copy is refused for 3 s after the latest one.
    let args = [
        "--shards",
        "1",
        "--archive",
        &uri,
        "--tail-window-ms",
        "100",
        "--lease-renew-ms",
        "1000",
    ];
    let original = Server::start(&data, &args);
    original.create_tenant_with_items("acme");
    assert_eq!(write_row(&original, "acme", 1).expect("write").status, 200);
    assert!(original.terminate().success());
    copy_dir(&data, &copy);
    assert_eq!(
        data_dir_id(&copy),
        data_dir_id(&data),
        "a copy keeps the id"
    );

    let mut original = Server::start(&data, &args);
    let original_path = std::fs::canonicalize(&data).expect("canonical path");
    let refused = Server::try_start(&copy, &args)
        .err()
        .expect("a copy must be refused while the original runs");
    println!("the copy was refused:\n{refused}");
    for needed in [
        "another copy of this data directory seems to be running".to_string(),
        format!("PID {} on ", original.pid()),
        format!("(data directory {})", original_path.display()),
        "Stop the other copy".to_string(),
        "RUNBOOK.md: \"another copy of this data directory\"".to_string(),
    ] {
        assert!(refused.contains(&needed), "{needed:?} in:\n{refused}");
    }
    assert_eq!(write_row(&original, "acme", 2).expect("write").status, 200);

    // The original stops renewing (paused) for longer than the stale window.
    let paused = original.pause_outside_archive_lock(&archive);
    std::thread::sleep(Duration::from_secs(5));
    let copy_server = Server::start(&copy, &args);
    assert!(has_row(&copy_server, "acme", 1));
    assert!(
        copy_server
            .stderr()
            .contains("took the archive's owner record over"),
        "{}",
        copy_server.stderr()
    );
    let resumed = Instant::now();
    drop(paused);
    let status = original
        .wait_exit(EXIT_DEADLINE)
        .expect("the displaced original must exit");
    println!(
        "exited {status:?} {} ms after SIGCONT",
        resumed.elapsed().as_millis()
    );
    assert_eq!(status.code(), Some(5), "{status:?}\n{}", original.stderr());
    let stderr = original.stderr();
    let fatal = fatal_lines(&stderr);
    assert_eq!(fatal.len(), 1, "one clear line:\n{stderr}");
    println!("the original's line: {}", fatal[0]);
    let copy_path = std::fs::canonicalize(&copy).expect("canonical path");
    for needed in [
        "another copy of this data directory took the archive's owner record".to_string(),
        format!(
            "now held by oc-server {} PID {} on ",
            env!("CARGO_PKG_VERSION"),
            copy_server.pid()
        ),
        format!("(data directory {})", copy_path.display()),
        "no longer holds the archive".to_string(),
        "Exiting with status 5".to_string(),
    ] {
        assert!(fatal[0].contains(&needed), "{needed:?} in {}", fatal[0]);
    }

    // The copy holds the record and keeps renewing it; it serves and ships.
    let local = oc_ship::archive::LocalDirArchive::open(&archive).expect("archive");
    let held = |what: &str| {
        oc_ship::lease::read(&local)
            .expect("read lease.json")
            .unwrap_or_else(|| panic!("no lease.json {what}"))
            .0
    };
    let before = held("after the takeover");
    assert_eq!(before.holder.pid, copy_server.pid());
    assert_eq!(before.holder.data_dir, copy_path.display().to_string());
    assert_eq!(
        write_row(&copy_server, "acme", 3).expect("write").status,
        200
    );
    std::thread::sleep(Duration::from_millis(2500));
    let after = held("after renewals");
    assert_eq!(after.holder, before.holder);
    assert!(after.renewed_at_us > before.renewed_at_us, "{after:?}");
    assert!(copy_server.terminate().success());
}

/// A restore into a directory a server holds is refused naming the server; a restore
/// into a new directory gives it a new id, which the old archive refuses.
#[test]
fn restore_into_a_locked_directory_is_refused_and_a_restored_directory_needs_a_new_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let uri = file_uri(&dir.path().join("archive"));
    let args = [
        "--shards",
        "1",
        "--archive",
        &uri,
        "--tail-window-ms",
        "100",
    ];
    let server = Server::start(&data, &args);
    server.create_tenant_with_items("acme");
    assert_eq!(write_row(&server, "acme", 7).expect("write").status, 200);

    let into_live = restore_latest(&uri, &data);
    assert!(!into_live.success, "{into_live:?}");
    assert!(
        into_live
            .stderr
            .contains(&format!("locked by PID {}", server.pid())),
        "{into_live:?}"
    );
    assert!(
        has_row(&server, "acme", 7),
        "the live directory is untouched"
    );
    // A stop does not ship a last tail: wait until the archive holds row 7, so the
    // restore below must have it.
    common::wait_until_archived(&server, 1);
    assert!(server.terminate().success());

    let restored = dir.path().join("restored");
    let run = restore_latest(&uri, &restored);
    assert!(run.success, "{run:?}");
    let new_id = data_dir_id(&restored);
    assert_ne!(
        new_id,
        data_dir_id(&data),
        "a restore is a new data directory"
    );
    assert!(run.stdout.contains(&new_id), "{}", run.stdout);
    let refused = Server::try_start(&restored, &args)
        .err()
        .expect("the restored directory must not ship to the old archive");
    assert!(
        refused.contains("owned by another data directory"),
        "{refused}"
    );
    let fresh = file_uri(&dir.path().join("archive-after-restore"));
    let server = Server::start(&restored, &["--shards", "1", "--archive", &fresh]);
    assert!(has_row(&server, "acme", 7));
}

/// A panic on the shard that owns a tenant ends the whole process at once (not just
/// the shard's thread), with one line naming the thread and the panic; the restart
/// recovers every acknowledged write.
#[test]
fn a_shard_panic_ends_the_process_and_a_restart_recovers_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let args = ["--shards", "2", "--archive", "none"];
    let mut server = Server::try_start_with_env(
        None,
        &data,
        &args,
        &[
            ("OC_FAILPOINTS", "shard.panic=doomed"),
            ("RUST_BACKTRACE", "0"),
        ],
    )
    .expect("start");
    server.create_tenant_with_items("acme");
    server.create_tenant_with_items("doomed");
    let acked: Vec<u64> = (0..30)
        .inspect(|&id| {
            assert_eq!(write_row(&server, "acme", id).expect("write").status, 200);
        })
        .collect();
    let panicked_at = Instant::now();
    let answer = write_row(&server, "doomed", 1_000);
    assert!(
        answer.as_ref().map_or(true, |r| r.status >= 500),
        "the panicking write was acknowledged: {answer:?}"
    );
    let status = server
        .wait_exit(EXIT_DEADLINE)
        .expect("the process must exit after a shard panic");
    let took = panicked_at.elapsed();
    println!("exited {status:?} {} ms after the panic", took.as_millis());
    assert_eq!(status.code(), Some(101), "{status:?}");
    let stderr = server.stderr();
    let fatal = fatal_lines(&stderr);
    assert_eq!(fatal.len(), 1, "one clear line:\n{stderr}");
    assert!(
        fatal[0].contains("panic on thread 'oc-shard-"),
        "{}",
        fatal[0]
    );
    assert!(fatal[0].contains("failpoint shard.panic"), "{}", fatal[0]);
    drop(server);

    let server = Server::start(&data, &args);
    for id in acked {
        assert!(has_row(&server, "acme", id), "acknowledged acme/{id} lost");
    }
    assert_eq!(write_row(&server, "doomed", 1).expect("write").status, 200);
}

/// A data directory removed under the running server (`rm -rf`): its logs would go on
/// writing and syncing the unlinked files, acknowledging writes that no restart can
/// find. The server notices within a check (100 ms), refuses writes from then on, and
/// exits with status 7 and one line that says what happened and what to do.
#[test]
fn a_data_directory_removed_under_the_server_ends_it_with_status_7() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &["--shards", "2", "--archive", "none"]);
    server.create_tenant_with_items("acme");
    for id in 0..10 {
        assert_eq!(write_row(&server, "acme", id).expect("write").status, 200);
    }
    std::fs::remove_dir_all(&data).expect("remove the data directory");
    let removed = Instant::now();
    // Writes sent once the check has had a few chances are not acknowledged.
    std::thread::sleep(Duration::from_millis(500));
    let mut acknowledged_late = Vec::new();
    for id in 100..200 {
        match write_row(&server, "acme", id) {
            Ok(reply) if reply.status == 200 => acknowledged_late.push(id),
            Ok(reply) => {
                assert_eq!(reply.status, 503, "{reply:?}");
                assert_eq!(reply.body["error"]["code"], "log_failed", "{reply:?}");
            }
            Err(_) => break, // the process is gone
        }
    }
    assert!(
        acknowledged_late.is_empty(),
        "acknowledged after the directory was removed: {acknowledged_late:?}"
    );
    let status = server
        .wait_exit(EXIT_DEADLINE)
        .expect("the process must exit once its data directory is gone");
    println!(
        "exited {status:?} {} ms after the removal",
        removed.elapsed().as_millis()
    );
    assert_eq!(status.code(), Some(7), "{status:?}\n{}", server.stderr());
    let stderr = server.stderr();
    let fatal = fatal_lines(&stderr);
    assert_eq!(fatal.len(), 1, "one clear line:\n{stderr}");
    assert!(
        fatal[0].contains("was removed or moved") && fatal[0].contains("oc-pitr restore"),
        "{}",
        fatal[0]
    );
}

/// A disk that stops answering (its syncs hang) makes the server not ready within a few
/// seconds, saying why, and `oc_ready` with it; once the disk answers again, the write
/// waiting is acknowledged and the server is ready again.
#[test]
fn a_stalled_log_disk_makes_the_server_not_ready_until_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let trigger = dir.path().join("stall-sync");
    let armed = format!("wal.sync.stall={}", trigger.display());
    let args = ["--shards", "1", "--archive", "none"];
    let server = Server::try_start_with_env(None, &data, &args, &[("OC_FAILPOINTS", &armed)])
        .expect("start");
    server.create_tenant_with_items("acme");
    assert_eq!(write_row(&server, "acme", 1).expect("write").status, 200);
    std::fs::write(&trigger, b"").expect("freeze the disk");
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| write_row(&server, "acme", 2));
        let deadline = Instant::now() + Duration::from_secs(20);
        let body = loop {
            let (status, body) = server.ops_get("/ready");
            if status == 503 {
                break body;
            }
            assert!(Instant::now() < deadline, "still ready: {body}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            body.contains("waited") && body.contains("for the disk"),
            "{body}"
        );
        let (_, scrape) = server.ops_get("/metrics");
        assert!(scrape.lines().any(|l| l == "oc_ready 0"), "{scrape}");
        std::fs::remove_file(&trigger).expect("thaw the disk");
        let answer = waiting.join().expect("writer").expect("an answer");
        assert_eq!(answer.status, 200, "{answer:?}");
    });
    let (status, body) = server.ops_get("/ready");
    assert_eq!(status, 200, "{body}");
}

/// A failed `fdatasync` fails the log: the write in flight gets `503 log_failed`, the
/// process exits with status 3 and one line, and the restart recovers every write
/// acknowledged before.
#[test]
fn a_failed_log_sync_answers_503_log_failed_then_ends_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let trigger = dir.path().join("fail-sync");
    let armed = format!("wal.sync.err={}", trigger.display());
    let args = ["--shards", "1", "--archive", "none"];
    let mut server = Server::try_start_with_env(None, &data, &args, &[("OC_FAILPOINTS", &armed)])
        .expect("start");
    server.create_tenant_with_items("acme");
    let acked: Vec<u64> = (0..30)
        .inspect(|&id| {
            assert_eq!(write_row(&server, "acme", id).expect("write").status, 200);
        })
        .collect();
    std::fs::write(&trigger, b"").expect("arm the failpoint");
    let failed_at = Instant::now();
    let answer = write_row(&server, "acme", 1_000).expect("an answer, not a dropped connection");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.body["error"]["code"], "log_failed", "{answer:?}");
    // Until it exits, /health says the log failed (or the process is already gone).
    let mut health_seen = None;
    while failed_at.elapsed() < EXIT_DEADLINE {
        match ureq::get(&format!("{}/health", server.ops)).call() {
            Ok(response) => assert_eq!(response.status(), 200), // not noticed yet
            Err(ureq::Error::Status(code, response)) => {
                health_seen = Some((code, response.into_string().unwrap_or_default()));
                break;
            }
            Err(_) => break, // already gone
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = server
        .wait_exit(EXIT_DEADLINE)
        .expect("the process must exit after its log failed");
    println!(
        "exited {status:?} {} ms after the failed sync; /health seen: {health_seen:?}",
        failed_at.elapsed().as_millis()
    );
    if let Some((code, body)) = &health_seen {
        assert_eq!(*code, 503, "{body}");
        assert!(body.contains("\"status\":\"failed\""), "{body}");
        assert!(body.contains("write-ahead log of shard 0 failed"), "{body}");
    }
    assert_eq!(status.code(), Some(3), "{status:?}");
    let stderr = server.stderr();
    let fatal = fatal_lines(&stderr);
    assert_eq!(fatal.len(), 1, "one clear line:\n{stderr}");
    assert!(
        fatal[0].contains("write-ahead log of shard 0 failed"),
        "{}",
        fatal[0]
    );
    drop(server);

    std::fs::remove_file(&trigger).expect("disarm");
    let server = Server::start(&data, &args);
    for id in acked {
        assert!(has_row(&server, "acme", id), "acknowledged acme/{id} lost");
    }
}

/// SIGTERM with a client stuck mid-request: the drain gives up after the grace period
/// and the process exits 0.
#[test]
fn sigterm_ends_the_server_within_the_grace_period() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(
        &dir.path().join("data"),
        &[
            "--shards",
            "1",
            "--archive",
            "none",
            "--shutdown-grace-ms",
            "1000",
        ],
    );
    // Headers that never finish: the connection stays open through the drain.
    let mut stuck =
        std::net::TcpStream::connect(server.api.trim_start_matches("http://")).expect("connect");
    stuck
        .write_all(b"POST /v1/tenants HTTP/1.1\r\nhost: x\r\n")
        .expect("half a request");
    let asked = Instant::now();
    server.send_sigterm();
    let status = server
        .wait_exit(EXIT_DEADLINE)
        .expect("SIGTERM must end it");
    println!(
        "exited {status:?} {} ms after SIGTERM",
        asked.elapsed().as_millis()
    );
    assert!(status.success(), "{status:?}\n{}", server.stderr());
    drop(stuck);
}

/// A shutdown that cannot finish is ended by the watchdog, grace plus margin after the
/// signal, with its own status and line.
#[test]
fn a_shutdown_that_hangs_is_ended_by_the_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::try_start_with_env(
        None,
        &dir.path().join("data"),
        &[
            "--shards",
            "1",
            "--archive",
            "none",
            "--shutdown-grace-ms",
            "500",
        ],
        &[("OC_FAILPOINTS", "shutdown.hang=1")],
    )
    .expect("start");
    let asked = Instant::now();
    server.send_sigterm();
    let status = server
        .wait_exit(EXIT_DEADLINE)
        .expect("the watchdog must end it");
    let took = asked.elapsed();
    println!("exited {status:?} {} ms after SIGTERM", took.as_millis());
    assert_eq!(status.code(), Some(4), "{status:?}");
    // Not before grace (500 ms) + margin (2 s): the orderly path had its chance.
    assert!(took >= Duration::from_millis(2500), "{took:?}");
    let stderr = server.stderr();
    let fatal = fatal_lines(&stderr);
    assert_eq!(fatal.len(), 1, "{stderr}");
    assert!(
        fatal[0].contains("did not finish within 2500 ms"),
        "{}",
        fatal[0]
    );
}

/// Under a memlock limit glommio cannot start an executor with, the server refuses to
/// start with one line naming the limit and its fix, before touching the data directory
/// (not a dead thread and an empty error).
#[test]
fn a_memlock_limit_too_small_for_any_executor_is_refused_naming_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -l 256 && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_oc-server"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--archive", "none", "--listen", "127.0.0.1:0"])
        .args(["--ops-listen", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run oc-server under sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("refusing to start: the memlock limit (RLIMIT_MEMLOCK) is 256 KiB"),
        "{stderr}"
    );
    assert!(stderr.contains("LimitMEMLOCK=infinity"), "{stderr}");
    assert!(!data.exists(), "the data directory was touched");
}

/// The server's environment once it serves (`/proc/<pid>/environ`) as text. glibc
/// splits `GLIBC_TUNABLES` at its colons in place while parsing it, so the tunables
/// show as separate entries.
fn environment_of(server: &Server) -> String {
    let raw = std::fs::read(format!("/proc/{}/environ", server.pid())).expect("environ");
    // Colons too: newer glibc leaves the string whole.
    String::from_utf8_lossy(&raw).replace(['\0', ':'], "\n")
}

/// glibc's per-thread cache is enlarged by one re-execution at start-up
/// (io/src/malloc_tuning.rs), keeping the other tunables; an operator's own cache
/// count is left alone.
#[test]
fn the_server_runs_with_glibcs_larger_thread_cache_unless_told_otherwise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::try_start_with_env(
        None,
        &dir.path().join("a"),
        &[],
        &[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")],
    )
    .expect("server");
    let env = environment_of(&server);
    assert!(
        env.contains("\nGLIBC_TUNABLES=glibc.malloc.trim_threshold=1000000\n")
            && env.contains(&format!("\n{}\n", oc_io::malloc_tuning::TCACHE_TUNABLE))
            && env.contains(&format!(
                "\n{}=1\n",
                oc_io::malloc_tuning::REEXECUTED_MARKER
            )),
        "{env}"
    );
    drop(server);
    let server = Server::try_start_with_env(
        None,
        &dir.path().join("b"),
        &[],
        &[("GLIBC_TUNABLES", "glibc.malloc.tcache_count=50")],
    )
    .expect("server");
    let env = environment_of(&server);
    assert!(
        env.contains("\nGLIBC_TUNABLES=glibc.malloc.tcache_count=50\n")
            && !env.contains(oc_io::malloc_tuning::TCACHE_TUNABLE),
        "{env}"
    );
}
