//! `oc-server check`: what an operator should know before the first start, each finding
//! with its fix. The kernel and io_uring (not disabled by sysctl or seccomp), the data
//! directory's file system (tmpfs, ramfs and overlay lose or may not honour what
//! `fdatasync` and `O_DSYNC` promise), O_DIRECT honoured there, the latency of a durable
//! (`O_DSYNC`) write on the data disk against the 50 ms alert, the memlock limit against
//! what registering the I/O buffers needs, the open-files limit, the archive reachable
//! and writable (a local one neither in memory nor on the data's own disk), and no
//! server already running on the data directory.
//!
//! The file-system rule also guards every start: the server refuses an unsafe file
//! system for `--data-dir` unless `--allow-unsafe-fs` ([`unsafe_file_system`]).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use oc_io::buffer::{AlignedBuf, IoBuffer};
use serde::Serialize;

use crate::config::ServerConfig;

/// One finding.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    /// `ok`, `warn` or `fail`.
    pub verdict: &'static str,
    pub found: String,
    /// What to do about it, for `warn` and `fail`.
    pub fix: Option<String>,
}

fn ok(name: &'static str, found: String) -> Check {
    Check {
        name,
        verdict: "ok",
        found,
        fix: None,
    }
}

fn finding(name: &'static str, verdict: &'static str, found: String, fix: &str) -> Check {
    Check {
        name,
        verdict,
        found,
        fix: Some(fix.to_string()),
    }
}

/// Durable writes timed by the latency check.
const DURABLE_WRITE_SAMPLES: usize = 200;
/// The documents' alert on fsync lag.
const FSYNC_ALERT_MS: f64 = 50.0;

/// What holds a directory, by its file system's magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSystem {
    /// ext4 or XFS: what oc is built and measured on.
    Disk(&'static str),
    /// tmpfs, ramfs or overlay: nothing durable (or a container's layer).
    Unsafe(&'static str),
    /// Anything else (NFS, FUSE, virtiofs, btrfs, …), by magic number.
    Other(u32),
}

/// The file system under `dir` (or its nearest existing parent, after making the path
/// absolute); `None` when it cannot be read.
pub fn file_system(dir: &Path) -> Option<FileSystem> {
    const EXT4_MAGIC: u32 = 0xef53;
    const XFS_MAGIC: u32 = 0x5846_5342;
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    const OVERLAYFS_MAGIC: u32 = 0x794c_7630;
    let absolute = std::path::absolute(dir).ok()?;
    let existing = absolute.ancestors().find(|p| p.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs(2) fills the zeroed struct we own from a NUL-terminated path.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    // Magic numbers are 32 bits; f_type's width and sign differ between C libraries.
    Some(match stat.f_type as u32 {
        EXT4_MAGIC => FileSystem::Disk("ext4"),
        XFS_MAGIC => FileSystem::Disk("xfs"),
        TMPFS_MAGIC => FileSystem::Unsafe("tmpfs"),
        RAMFS_MAGIC => FileSystem::Unsafe("ramfs"),
        OVERLAYFS_MAGIC => FileSystem::Unsafe("overlay"),
        other => FileSystem::Other(other),
    })
}

/// The name of an unsafe file system under `dir`: `tmpfs`, `ramfs` or `overlay`.
pub fn unsafe_file_system(dir: &Path) -> Option<&'static str> {
    match file_system(dir)? {
        FileSystem::Unsafe(name) => Some(name),
        _ => None,
    }
}

/// The message a start on an unsafe file system is refused with.
pub fn unsafe_file_system_refusal(dir: &Path, fs: &str) -> String {
    format!(
        "the data directory {} is on {fs}: {}; put --data-dir on a local disk (XFS or ext4), \
         or pass --allow-unsafe-fs for a throwaway server",
        dir.display(),
        if fs == "overlay" {
            "a container's writable layer, which is lost with the container and may not honour O_DIRECT; mount a volume"
        } else {
            "memory, which a restart or power loss empties, so no write is durable"
        }
    )
}

/// Runs every check.
pub fn run(config: &ServerConfig) -> Vec<Check> {
    let mut checks = vec![kernel(), io_uring()];
    let shown = config.data_dir.display();
    const NAME: &str = "data directory file system";
    checks.push(match file_system(&config.data_dir) {
        Some(FileSystem::Unsafe(fs)) => finding(
            NAME,
            "fail",
            format!("{shown} is on {fs}"),
            &unsafe_file_system_refusal(&config.data_dir, fs),
        ),
        Some(FileSystem::Disk(fs)) => ok(NAME, format!("{shown} is on {fs}")),
        Some(FileSystem::Other(magic)) => finding(
            NAME,
            "warn",
            format!("{shown} is on a file system with magic {magic:#x}, not ext4 or XFS"),
            "oc is built and measured on a local ext4 or XFS disk; network, FUSE and shared-folder file systems may not honour fdatasync",
        ),
        None => finding(
            NAME,
            "warn",
            format!("cannot tell the file system of {shown}"),
            "check that its parent directory exists and is readable",
        ),
    });
    checks.push(lock(&config.data_dir));
    checks.extend(disk(&config.data_dir));
    checks.push(memlock(config));
    checks.push(open_files(config));
    checks.push(archive(config));
    checks.extend(local_archive_placement(config));
    checks
}

/// Whether a server already runs on the data directory (it holds the lock). A warning,
/// not a failure: an upgrade runs this check before it stops the old server. The probe
/// creates and writes nothing.
fn lock(data_dir: &Path) -> Check {
    const NAME: &str = "data directory lock";
    if !data_dir.is_dir() {
        return ok(NAME, format!("{} is new", data_dir.display()));
    }
    match oc_io::dir_lock::holder_of(data_dir) {
        Ok(None) => ok(NAME, format!("no process holds {}", data_dir.display())),
        Ok(Some(holder)) => finding(
            NAME,
            "warn",
            format!("{} is locked by {holder}", data_dir.display()),
            "a server runs on this directory: another one is refused until it stops, and the durable-write latency includes its load",
        ),
        Err(e) => finding(
            NAME,
            "fail",
            format!("cannot read the lock of {}: {e}", data_dir.display()),
            "make the data directory a directory the server's user can read",
        ),
    }
}

/// Where a local (`file://`) archive lives: not in memory, and not on the data
/// directory's own file system, where one lost disk takes the data and its archive.
fn local_archive_placement(config: &ServerConfig) -> Option<Check> {
    use std::os::unix::fs::MetadataExt;
    const NAME: &str = "archive file system";
    let uri = config.archive_uri()?;
    let dir = Path::new(uri.strip_prefix("file://")?);
    if let Some(fs) = unsafe_file_system(dir) {
        return Some(finding(
            NAME,
            "fail",
            format!("{} is on {fs}", dir.display()),
            "an archive in memory is gone after a restart, with every restore it was for: put it on a disk or in S3",
        ));
    }
    let device = |path: &Path| {
        let absolute = std::path::absolute(path).ok()?;
        let existing = absolute.ancestors().find(|p| p.exists())?;
        std::fs::metadata(existing).ok().map(|m| m.dev())
    };
    Some(match (device(dir), device(&config.data_dir)) {
        (Some(archive), Some(data)) if archive == data => finding(
            NAME,
            "warn",
            format!("{} is on the data directory's file system", dir.display()),
            "losing that disk loses the data and its archive together: in production ship to S3 (or another machine's disk)",
        ),
        (Some(_), Some(_)) => ok(
            NAME,
            format!("{} is on another file system than the data directory", dir.display()),
        ),
        _ => finding(
            NAME,
            "warn",
            format!("cannot tell where {} is", dir.display()),
            "check that its parent directory exists and is readable",
        ),
    })
}

fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    match version.as_slice() {
        [major, minor] if (*major, *minor) >= (5, 10) => ok("kernel", format!("Linux {release}")),
        [_, _] => finding(
            "kernel",
            "fail",
            format!("Linux {release}"),
            "run Linux 5.10 or later (glommio's io_uring needs it)",
        ),
        _ => finding(
            "kernel",
            "warn",
            format!("cannot read the kernel version ({release})"),
            "run Linux 5.10 or later",
        ),
    }
}

fn io_uring() -> Check {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok());
    let probe = oc_io::probe::probe_io_uring();
    if !probe.available {
        let why = probe.error.unwrap_or_default();
        let fix = if disabled.is_some_and(|d| d > 0) {
            "io_uring is disabled by sysctl: set kernel.io_uring_disabled=0 (or 1 with this user in kernel.io_uring_group)"
        } else {
            "io_uring is blocked: allow io_uring_setup, io_uring_enter and io_uring_register in the seccomp profile (Docker: --security-opt seccomp=<profile with them>)"
        };
        return finding(
            "io_uring",
            "fail",
            format!("no ring could be created: {why}"),
            fix,
        );
    }
    if !(probe.write && probe.read && probe.fsync) {
        return finding(
            "io_uring",
            "fail",
            format!("the ring lacks read, write or fsync: {probe:?}"),
            "run a kernel whose io_uring supports read, write and fsync (5.10 or later)",
        );
    }
    ok("io_uring", "available with read, write and fsync".into())
}

/// O_DIRECT honoured in the data directory, and the latency of a durable 4 KiB write
/// there (what every group commit waits for: one O_DIRECT write to an O_DSYNC file).
fn disk(data_dir: &Path) -> Vec<Check> {
    let absolute = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let Some(dir) = absolute
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
    else {
        return vec![finding(
            "O_DIRECT",
            "fail",
            format!("no part of {} exists", data_dir.display()),
            "create the data directory",
        )];
    };
    let probe = dir.join(format!(".oc-check-{}", std::process::id()));
    let result = measure_durable_writes(&probe);
    let _ = std::fs::remove_file(&probe);
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => vec![finding(
            "O_DIRECT",
            "fail",
            format!("{} refuses O_DIRECT writes", dir.display()),
            "put --data-dir on a file system that supports O_DIRECT (XFS, ext4)",
        )],
        Err(e) => vec![finding(
            "O_DIRECT",
            "fail",
            format!("writing {}: {e}", probe.display()),
            if dir == absolute {
                "make the data directory writable by the server's user"
            } else {
                "create the data directory (owned by the server's user) and check again"
            },
        )],
        Ok(mut us) => {
            us.sort_unstable();
            let pct = |q: f64| us[((us.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
            let (p50, p99) = (pct(0.5), pct(0.99));
            let found = format!(
                "4 KiB O_DSYNC write in {}: p50 {p50:.2} ms, p99 {p99:.2} ms over {} writes",
                dir.display(),
                us.len()
            );
            let latency = if p99 > FSYNC_ALERT_MS {
                finding(
                    "durable write latency",
                    "fail",
                    found,
                    "this disk's p99 is above the 50 ms fsync-lag alert: use a local NVMe disk, not network storage or a throttled volume",
                )
            } else if p99 > FSYNC_ALERT_MS / 5.0 {
                finding(
                    "durable write latency",
                    "warn",
                    found,
                    "a p99 over 10 ms makes every write wait that long: prefer local NVMe",
                )
            } else {
                ok("durable write latency", found)
            };
            vec![
                ok("O_DIRECT", format!("honoured in {}", dir.display())),
                latency,
            ]
        }
    }
}

/// Microseconds of each O_DIRECT + O_DSYNC 4 KiB write on a new file at `path`.
fn measure_durable_writes(path: &Path) -> std::io::Result<Vec<u64>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
        .open(path)?;
    let mut block = AlignedBuf::zeroed(4096);
    block.as_bytes_mut().fill(0x6f);
    let mut samples = Vec::with_capacity(DURABLE_WRITE_SAMPLES);
    for i in 0..DURABLE_WRITE_SAMPLES as u64 {
        let started = Instant::now();
        file.write_all_at(block.as_bytes(), (i % 64) * 4096)?;
        samples.push(started.elapsed().as_micros() as u64);
    }
    Ok(samples)
}

fn limit(resource: libc::__rlimit_resource_t) -> Option<(u64, u64)> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    (unsafe { libc::getrlimit(resource, &mut l) } == 0).then_some((l.rlim_cur, l.rlim_max))
}

/// Room to register every executor's I/O memory: one executor per shard and the
/// control executor. The limit binds only a process without `CAP_IPC_LOCK`.
fn memlock(config: &ServerConfig) -> Check {
    let wanted = oc_io::executor::registered_bytes(shard_count(config) as u64 + 1);
    // Whatever the capabilities: glommio checks this floor itself.
    let floor = oc_io::executor::GLOMMIO_MIN_MEMLOCK_BYTES;
    if let Some(limit) = oc_io::executor::memlock_limit().filter(|&l| l < floor) {
        return finding(
            "memlock limit",
            "fail",
            format!(
                "{} KiB: no executor starts below {} KiB (the server refuses to start)",
                limit >> 10,
                floor >> 10
            ),
            "raise it (systemd LimitMEMLOCK=infinity, or ulimit -l unlimited)",
        );
    }
    if has_ipc_lock() {
        return ok(
            "memlock limit",
            "not enforced: the process has CAP_IPC_LOCK".into(),
        );
    }
    match limit(libc::RLIMIT_MEMLOCK) {
        Some((soft, _)) if soft == libc::RLIM_INFINITY || soft >= wanted => ok(
            "memlock limit",
            if soft == libc::RLIM_INFINITY {
                "unlimited".into()
            } else {
                format!("{} MiB, {} MiB needed", soft >> 20, wanted >> 20)
            },
        ),
        Some((soft, _)) => finding(
            "memlock limit",
            "warn",
            format!("{} KiB, {} MiB needed", soft >> 10, wanted >> 20),
            "below it the I/O buffers are not registered with io_uring and every write pins its pages (slower): raise it (systemd LimitMEMLOCK=infinity, or ulimit -l unlimited)",
        ),
        None => finding(
            "memlock limit",
            "warn",
            "unreadable".into(),
            "check ulimit -l",
        ),
    }
}

/// True when this process's effective capabilities hold `CAP_IPC_LOCK` (root outside a
/// container usually does; a container's root often does not).
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The shards the server would run: `--shards`, or one per CPU.
fn shard_count(config: &ServerConfig) -> usize {
    config
        .shards
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn open_files(config: &ServerConfig) -> Check {
    let shards = shard_count(config);
    let needed = crate::fd_limit::needed(config.max_connections, shards);
    match limit(libc::RLIMIT_NOFILE) {
        Some((_, hard)) if hard >= needed => ok(
            "open-files limit",
            format!(
                "hard limit {hard}, {needed} needed for --max-connections {} and {shards} shard(s)",
                config.max_connections
            ),
        ),
        Some((_, hard)) => finding(
            "open-files limit",
            "fail",
            format!(
                "hard limit {hard}, {needed} needed for --max-connections {} and {shards} shard(s)",
                config.max_connections
            ),
            "raise it (systemd LimitNOFILE=65536, or ulimit -Hn) or lower --max-connections",
        ),
        None => finding(
            "open-files limit",
            "warn",
            "unreadable".into(),
            "check ulimit -n",
        ),
    }
}

fn archive(config: &ServerConfig) -> Check {
    use oc_ship::archive::{open_archive, Condition};
    let Some(uri) = config.archive_uri() else {
        return finding(
            "archive",
            "warn",
            "none (--archive none)".into(),
            "without an archive, losing this machine loses the data: set --archive (S3 in production)",
        );
    };
    let key = format!(
        "preflight/{}-{}",
        oc_ship::lease::hostname()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            })
            .collect::<String>(),
        std::process::id()
    );
    let probe = || -> Result<(), String> {
        let archive = open_archive(&uri).map_err(|e| e.to_string())?;
        archive
            .list("preflight/")
            .map_err(|e| format!("listing: {e}"))?;
        archive
            .put(&key, b"oc-server check", &Condition::Always)
            .map_err(|e| format!("writing {key}: {e}"))?;
        let read = archive
            .get(&key)
            .map_err(|e| format!("reading {key}: {e}"))?;
        archive
            .delete(&key)
            .map_err(|e| format!("deleting {key}: {e}"))?;
        match read {
            Some((bytes, _)) if bytes == b"oc-server check" => Ok(()),
            _ => Err(format!("{key} did not read back as written")),
        }
    };
    match probe() {
        Ok(()) => ok("archive", format!("{uri}: listed, written, read back and deleted {key}")),
        Err(why) => finding(
            "archive",
            "fail",
            format!("{uri}: {why}"),
            "check the URI, the credentials (S3: AWS_* variables or the instance profile) and that the bucket or directory exists and is writable",
        ),
    }
}

/// Prints the checks as aligned text; returns whether none failed.
pub fn print_text(checks: &[Check], out: &mut impl Write) -> std::io::Result<bool> {
    for c in checks {
        let mark = match c.verdict {
            "ok" => "ok  ",
            "warn" => "WARN",
            _ => "FAIL",
        };
        writeln!(out, "{mark}  {:<28} {}", c.name, c.found)?;
        if let Some(fix) = &c.fix {
            writeln!(out, "      {:<28} fix: {fix}", "")?;
        }
    }
    Ok(checks.iter().all(|c| c.verdict != "fail"))
}
