//! Starts the real `oc-server` binary on loopback with a temp data directory and talks
//! to it over real HTTP.
#![allow(dead_code)] // each test file uses its own part of the harness

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct Server {
    child: Child,
    pub api: String,
    pub ops: String,
    /// The replication listener (`host:port`), when started with one.
    pub replication: Option<String>,
    pub stderr_log: PathBuf,
}

/// What a request got back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
    pub retry_after: Option<String>,
    pub allow: Option<String>,
}

impl Server {
    /// Starts a server on ports chosen by the kernel and waits until it serves.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start(data_dir, extra).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::try_start_in(None, data_dir, extra)
    }

    /// Starts the server in working directory `cwd` (so `data_dir` may be relative).
    pub fn try_start_in(
        cwd: Option<&Path>,
        data_dir: &Path,
        extra: &[&str],
    ) -> Result<Server, String> {
        Self::try_start_with_env(cwd, data_dir, extra, &[])
    }

    /// Starts the server with extra environment variables.
    pub fn try_start_with_env(
        cwd: Option<&Path>,
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let log_base = cwd.map_or_else(|| data_dir.to_path_buf(), |c| c.join(data_dir));
        let stderr_log = log_base.with_extension(format!(
            "stderr-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let stderr = std::fs::File::create(&stderr_log).map_err(|e| e.to_string())?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_oc-server"));
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        // Ports chosen by the kernel unless the test names its own.
        for flag in ["--listen", "--ops-listen"] {
            if !extra.contains(&flag) {
                command.args([flag, "127.0.0.1:0"]);
            }
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--no-pin")
            .args(unsafe_fs_allowance(&log_base))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| e.to_string())?;
        match oc_net::announce::wait_for(&mut child, Duration::from_secs(60)) {
            Ok(endpoints) => Ok(Server {
                child,
                api: endpoints.api,
                ops: endpoints.ops,
                replication: endpoints.replication,
                stderr_log,
            }),
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                Err(format!("{why}:\n{log}"))
            }
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Polls for the process's exit until `within` has passed; `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server (SIGSTOP) at a moment it does not hold the local archive's
    /// lock (`<archive_dir>/.cas-lock`), as a process paused between two archive
    /// operations. (One stopped inside that lock holds up every other process's
    /// conditional put until they give up, 10 s later: a different fault.) The server
    /// is resumed (SIGCONT) when the returned guard drops, so a failed assertion while
    /// it is stopped fails the test instead of hanging clients waiting on it.
    pub fn pause_outside_archive_lock(&self, archive_dir: &Path) -> Paused {
        let lock = archive_dir.join(oc_ship::archive::local::CAS_LOCK_FILE);
        for _ in 0..1000 {
            let paused = Paused::stop(self.pid());
            match oc_io::dir_lock::lock_exclusive_within(&lock, Duration::ZERO) {
                Ok(_released_on_drop) => return paused,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    drop(paused);
                    std::thread::sleep(Duration::from_millis(fastrand::u64(1..10)));
                }
                Err(e) => panic!("cannot test {}: {e}", lock.display()),
            }
        }
        panic!(
            "the server held {} at every one of 1000 pauses",
            lock.display()
        )
    }

    pub fn get(&self, path: &str) -> Reply {
        request("GET", &format!("{}{path}", self.api), None)
    }

    pub fn delete(&self, path: &str) -> Reply {
        request("DELETE", &format!("{}{path}", self.api), None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        request(
            "POST",
            &format!("{}{path}", self.api),
            Some(&body.to_string()),
        )
    }

    pub fn post_raw(&self, path: &str, body: &str) -> Reply {
        request("POST", &format!("{}{path}", self.api), Some(body))
    }

    /// Creates `tenant` with the items table (see [`items_table`]).
    pub fn create_tenant_with_items(&self, tenant: &str) {
        self.create_tenant_with(tenant, &items_table());
    }

    /// Creates `tenant` with one table, `table` being its schema as the API takes it.
    pub fn create_tenant_with(&self, tenant: &str, table: &Value) {
        let created = self.post("/v1/tenants", &serde_json::json!({"tenant": tenant}));
        assert_eq!(created.status, 201, "{created:?}");
        let table = self.post(&format!("/v1/tenants/{tenant}/tables"), table);
        assert_eq!(table.status, 201, "{table:?}");
    }

    pub fn ops_get(&self, path: &str) -> (u16, String) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        match agent.get(&format!("{}{path}", self.ops)).call() {
            Ok(r) => (r.status(), r.into_string().expect("body")),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }
}

/// A process stopped with SIGSTOP, resumed with SIGCONT when dropped.
pub struct Paused {
    pid: u32,
    stopped_at: std::time::Instant,
}

impl Paused {
    /// Stops `pid` and returns once every one of its threads is stopped.
    pub fn stop(pid: u32) -> Paused {
        let sent_at = std::time::Instant::now();
        // SAFETY: kill(2) on a child process this test started.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        let mut paused = Paused {
            pid,
            stopped_at: sent_at,
        };
        let deadline = sent_at + Duration::from_secs(10);
        loop {
            match thread_states(pid) {
                None => panic!("PID {pid} exited instead of stopping"),
                Some(states) if states.is_empty() || states.contains(&'Z') => {
                    panic!("PID {pid} exited instead of stopping")
                }
                Some(states) if states.iter().all(|&s| s == 'T') => {
                    paused.stopped_at = std::time::Instant::now();
                    return paused;
                }
                Some(_) => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PID {pid} did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// When every thread was seen stopped. Not when SIGSTOP was sent: the group stop
    /// begins only once one thread takes the signal, and on a loaded machine the
    /// others run on (and may answer requests) until then.
    pub fn stopped_at(&self) -> std::time::Instant {
        self.stopped_at
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as in `stop`.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
    }
}

/// The state letter of each thread of `pid` in `/proc` (`T` stopped, `Z` zombie...);
/// `None` once the process is gone.
fn thread_states(pid: u32) -> Option<Vec<char>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                // `pid (comm) S ...`: the state follows the last `)`; comm may hold any byte.
                stat.rsplit_once(')')?.1.trim_start().chars().next()
            })
            .collect(),
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--allow-unsafe-fs` where the test's directory is on tmpfs (a machine whose /tmp is
/// in memory), so the tests run there too; nothing elsewhere.
pub fn unsafe_fs_allowance(dir: &Path) -> Vec<&'static str> {
    match oc_net::preflight::unsafe_file_system(dir) {
        Some(_) => vec!["--allow-unsafe-fs"],
        None => Vec::new(),
    }
}

/// What a run of `oc-server` that was expected to refuse to start did.
#[derive(Debug)]
pub struct Refusal {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `oc-server` with exactly `args` (no defaults added) and waits up to `within`
/// for it to exit; one that is still running then is killed (`status: None`).
pub fn run_expecting_exit(args: &[&str], env: &[(&str, &str)], within: Duration) -> Refusal {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_oc-server"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn oc-server");
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Refusal {
        status,
        stdout: std::fs::read_to_string(out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(err_path).unwrap_or_default(),
    }
}

/// One HTTP request with a JSON body; any status comes back as a `Reply`.
pub fn request(method: &str, url: &str, body: Option<&str>) -> Reply {
    try_request(method, url, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

pub fn try_request(method: &str, url: &str, body: Option<&str>) -> Result<Reply, String> {
    try_request_as(method, url, body, None)
}

/// A request with `Authorization: Bearer <token>`.
pub fn request_as(method: &str, url: &str, body: Option<&str>, token: &str) -> Reply {
    try_request_as(method, url, body, Some(token)).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

pub fn try_request_as(
    method: &str,
    url: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Result<Reply, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut req = agent
        .request(method, url)
        .set("content-type", "application/json");
    if let Some(token) = token {
        req = req.set("authorization", &format!("Bearer {token}"));
    }
    let outcome = match body {
        Some(body) => req.send_string(body),
        None => req.call(),
    };
    let response = match outcome {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = response.status();
    let header = |name: &str| response.header(name).map(str::to_string);
    let (request_id, retry_after, allow) = (
        header("x-request-id"),
        header("retry-after"),
        header("allow"),
    );
    let text = response.into_string().map_err(|e| e.to_string())?;
    let body = serde_json::from_str(&text).map_err(|e| format!("non-JSON body {text:?}: {e}"))?;
    Ok(Reply {
        status,
        body,
        request_id,
        retry_after,
        allow,
    })
}

/// The items table most tests use.
pub fn items_table() -> Value {
    serde_json::json!({
        "name": "items",
        "columns": [
            {"name": "id", "type": "int"},
            {"name": "name", "type": "text"},
            {"name": "batch", "type": "int"}
        ],
        "primary_key": ["id"],
        "indexes": [{"name": "by_batch", "columns": ["batch"]}]
    })
}

/// What an `oc-pitr` run printed.
#[derive(Debug)]
pub struct PitrRun {
    pub success: bool,
    /// The exit status (`None`: ended by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Waits until the archive holds every write acknowledged before the call: until a
/// shipping round that *started* after the call has finished with no lag on any shard.
/// Rounds run one after another, so the second round to finish after the call began
/// after it (its view of the durable log includes every earlier write).
pub fn wait_until_archived(server: &Server, shards: usize) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let called = now();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut first_after: Option<f64> = None;
    loop {
        let (_, scrape) = server.ops_get("/metrics");
        let last =
            scrape_value(&scrape, "oc_archive_last_success_timestamp_seconds").unwrap_or(0.0);
        let caught_up = (0..shards).all(|s| {
            scrape_value(&scrape, &format!("oc_archive_lag_bytes{{shard=\"{s}\"}}")) == Some(0.0)
        });
        match first_after {
            None if last > called => first_after = Some(last),
            Some(first) if last > first && caught_up => return,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the archive did not catch up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `oc-pitr restore --target latest` from `archive_uri` into `data_dir`.
pub fn restore_latest(archive_uri: &str, data_dir: &Path) -> PitrRun {
    restore_at(archive_uri, "latest", data_dir)
}

/// `oc-pitr restore --target <target>` (RFC 3339 or `latest`) from `archive_uri`
/// into `data_dir`.
pub fn restore_at(archive_uri: &str, target: &str, data_dir: &Path) -> PitrRun {
    let data_dir = data_dir.to_str().expect("utf-8 path");
    oc_pitr(&[
        "restore",
        "--archive",
        archive_uri,
        "--target",
        target,
        "--data-dir",
        data_dir,
    ])
}

/// Runs `oc-pitr` (built next to `oc-server` by `cargo test --workspace`).
pub fn oc_pitr(args: &[&str]) -> PitrRun {
    oc_pitr_with_env(args, &[])
}

pub fn oc_pitr_with_env(args: &[&str], env: &[(&str, &str)]) -> PitrRun {
    let bin = Path::new(env!("CARGO_BIN_EXE_oc-server")).with_file_name("oc-pitr");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p oc-ship` (cargo test --workspace does)",
        bin.display()
    );
    let out = Command::new(&bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run oc-pitr");
    PitrRun {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The value of one sample in a Prometheus scrape (`name{labels}` exactly as printed).
pub fn scrape_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Metric names fixed by the operating documents, whose unit suffix promtool's style
/// lint calls abbreviated.
const SEED_NAMES_WITH_SHORT_UNITS: [&str; 3] = [
    "oc_checkpoint_age_s",
    "oc_wal_fsync_lag_ms",
    "oc_ask_latency_ms",
];

/// Runs `promtool check metrics` on a scrape. CI installs promtool; without it (a
/// developer machine) the lint is skipped loudly and the rest of the test still runs.
pub fn promtool_check(scrape: &str) {
    assert_openmetrics_names_distinct(scrape);
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            eprintln!(
                "!!! promtool is not installed: the metrics lint is SKIPPED (CI installs it)"
            );
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("write scrape");
    let output = child.wait_with_output().expect("promtool");
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The operating contract names two metrics with abbreviated units; promtool flags
    // that style and nothing else may be flagged.
    let unexpected: Vec<&str> = findings
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            !(SEED_NAMES_WITH_SHORT_UNITS
                .iter()
                .any(|name| line.starts_with(&format!("{name} ")))
                && line.contains("abbreviated units"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics found problems:\n{}",
        unexpected.join("\n")
    );
    assert!(
        output.status.success() || !findings.trim().is_empty(),
        "promtool failed without saying why"
    );
}

/// Families whose OpenMetrics names collide: a counter `x_total` is family `x` there, and
/// a histogram `x` owns `x_bucket`, `x_count`, `x_sum` and `x_created`, so another family
/// by one of those names makes an OpenMetrics parser refuse the whole scrape.
pub fn assert_openmetrics_names_distinct(scrape: &str) {
    let families: Vec<(&str, &str)> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let names: std::collections::HashSet<&str> = families.iter().map(|(name, _)| *name).collect();
    for (name, kind) in &families {
        let taken: Vec<String> = match *kind {
            "counter" => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                vec![base.to_string(), format!("{base}_created")]
            }
            "histogram" | "summary" => ["bucket", "count", "sum", "created"]
                .iter()
                .map(|suffix| format!("{name}_{suffix}"))
                .collect(),
            _ => Vec::new(),
        };
        for other in taken {
            assert!(
                other == *name || !names.contains(other.as_str()),
                "the {kind} {name} and the family {other} collide in OpenMetrics"
            );
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as `cert.pem` and
/// `key.pem` in `dir`: (the certificate's path, the key's path, the certificate).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf, rcgen::CertifiedKey) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    (cert, key, certified)
}

/// A loopback address with a port free now (for a server restarted on the same ports).
pub fn free_addr() -> String {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").to_string()
}

/// Arguments that put a server on `api` and `ops` with `shards` shards and no archive:
/// restarts of it answer on the same addresses.
pub fn fixed_addr_args<'a>(api: &'a str, ops: &'a str, shards: &'a str) -> [&'a str; 8] {
    [
        "--shards",
        shards,
        "--archive",
        "none",
        "--listen",
        api,
        "--ops-listen",
        ops,
    ]
}

/// `cp -a` of a stopped data directory, as a volume snapshot or "stop, copy, start"
/// would make it: every file, the lock file and the layout (with its id) included.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A shard directory's log segment files, oldest first.
pub fn segment_files(shard: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(shard)
        .expect("shard dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wal-0000-") && n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}
