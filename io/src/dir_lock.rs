//! One writer per directory: an exclusive `flock` on `<dir>/oc.lock`, held for the life
//! of the process that writes the directory (FORMAT.md §10).
//!
//! The lock is the kernel's, not the file's: it is released when the holder's
//! descriptor closes, so a `kill -9` frees it at once and a stale file never blocks a
//! restart. The file's text (the holder's PID, then what it is) is only for the
//! message a refused process prints. Take the lock before reading or writing anything
//! else in the directory: a second process must be refused before it recovers, and
//! so rewrites, a log another process is appending to.
//!
//! The directory itself is locked too, first: deleting or replacing `oc.lock` (an
//! operator "unlocking" a directory) would otherwise let a second process lock a new
//! file of that name while the first still writes, and the directory cannot be
//! replaced under a running process without moving its data along.
//!
//! `flock` is per open file description and local to one machine: a directory on a
//! network file system shared by two machines is not protected by it (OPERATIONS.md).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file's name inside a locked directory.
pub const LOCK_FILE: &str = "oc.lock";
/// Most bytes of the lock file read back to name its holder.
const MAX_LOCK_TEXT_BYTES: u64 = 4096;

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another process holds the lock.
    #[error("{} is locked by {}: another process is using it. Stop that process first, or give this one another directory (RUNBOOK.md: \"data directory is locked by PID N\")", dir.display(), holder.as_deref().unwrap_or("a process that has not written its PID yet (it is starting), or whose oc.lock was removed (`fuser -v <dir>` names it)"))]
    Held {
        dir: PathBuf,
        /// `PID <n> (<what>)` as the holder wrote it, when it has.
        holder: Option<String>,
        pid: Option<u32>,
    },
    /// The lock file could not be created, locked or written.
    #[error("cannot lock {}: {source}{}", path.display(), writable_advice(source))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The path names something other than a directory.
    #[error("{} is not a directory: give a directory (absent ones are made)", path.display())]
    NotADirectory { path: PathBuf },
}

/// The next step for a lock file that cannot be written for want of permission.
fn writable_advice(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EROFS) => {
            "; the file system is mounted read-only (after a disk error the kernel may remount \
             it so: check `dmesg` and the disk before anything else), and this process writes \
             there: remount it read-write or give a writable directory"
        }
        Some(libc::EACCES | libc::EPERM) => {
            "; this process's user may not write there: give the directory to that user \
             (`chown`) or run as its owner"
        }
        _ => "",
    }
}

/// A held lock; dropping it (or the process ending in any way) releases it.
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    _file: File,
    _dir_handle: File,
}

impl DirLock {
    /// Creates `dir` if needed and takes its lock without waiting; `holder` says who
    /// holds it (e.g. `oc-server`), written after this process's PID.
    pub fn acquire(dir: &Path, holder: &str) -> Result<DirLock, DirLockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DirLockError::Io { path, source }
        };
        if dir.exists() && !dir.is_dir() {
            return Err(DirLockError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let held = |file: Option<&mut File>| {
            let text = file.and_then(read_text);
            DirLockError::Held {
                dir: dir.to_path_buf(),
                pid: text.as_deref().and_then(parse_pid),
                holder: text.as_deref().and_then(describe),
            }
        };
        // The directory first (see the module doc), before the file is even created:
        // a refused process must not leave a new, empty `oc.lock` in a directory whose
        // holder runs.
        let dir_handle = File::open(dir).map_err(io(dir))?;
        if let Err(e) = try_lock_exclusive(&dir_handle) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(held(File::open(&path).ok().as_mut()));
            }
            return Err(io(dir)(e));
        }
        // Then the file, which processes of builds that lock only the file take.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false) // the holder's text stays readable until we hold the lock
            .open(&path)
            .map_err(io(&path))?;
        if let Err(e) = try_lock_exclusive(&file) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(held(Some(&mut file)));
            }
            return Err(io(&path)(e));
        }
        let text = format!("{}\n{holder}\n", std::process::id());
        file.set_len(0).map_err(io(&path))?;
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        file.write_all(text.as_bytes()).map_err(io(&path))?;
        Ok(DirLock {
            dir: dir.to_path_buf(),
            _file: file,
            _dir_handle: dir_handle,
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What to look at, from any thread, to notice the directory or its lock file
    /// removed, moved or replaced while this process holds them.
    pub fn watch(&self) -> std::io::Result<LockWatch> {
        let id = |file: &File| file.metadata().map(|m| (m.dev(), m.ino()));
        Ok(LockWatch {
            dir: self.dir.clone(),
            dir_id: id(&self._dir_handle)?,
            file_id: id(&self._file)?,
        })
    }
}

/// Where a held lock's directory and file are (device and inode). A process writing a
/// directory that was deleted (`rm -rf`) keeps writing the unlinked files, and fsyncs
/// them as usual: its writes would be acknowledged and then lost with the files, and
/// nothing would keep a second process from locking a new directory of that name.
#[derive(Debug, Clone)]
pub struct LockWatch {
    dir: PathBuf,
    dir_id: (u64, u64),
    file_id: (u64, u64),
}

impl LockWatch {
    /// Whether the directory and its lock file are still where they were locked; the
    /// error says which is not. Only an absent path or another file under it counts:
    /// any other error of the look (a permission, an I/O error) is not taken for one.
    pub fn check(&self) -> Result<(), String> {
        let lock_file = self.dir.join(LOCK_FILE);
        for (path, id, what) in [
            (&self.dir, self.dir_id, "the data directory"),
            (&lock_file, self.file_id, "the data directory's lock file"),
        ] {
            match std::fs::metadata(path) {
                Ok(m) if (m.dev(), m.ino()) != id => {
                    return Err(format!(
                        "{what} {} was replaced by another while this process held it",
                        path.display()
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!(
                        "{what} {} was removed or moved while this process held it",
                        path.display()
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Who holds `dir`'s lock (`PID <n> (<what>)` as the holder wrote it, or a sentence
/// when it has not), or `None` when nobody does. Probes without creating or writing
/// anything, and holds the lock only for the probe: a check, not a claim.
pub fn holder_of(dir: &Path) -> std::io::Result<Option<String>> {
    let held = |file: Option<&mut File>| {
        file.and_then(read_text)
            .as_deref()
            .and_then(describe)
            .unwrap_or_else(|| {
                "a process that has not written its PID (or whose oc.lock was removed)".into()
            })
    };
    let mut lock_file = File::open(dir.join(LOCK_FILE)).ok();
    for handle in [
        Some(File::open(dir)?),
        lock_file.as_ref().map(File::try_clone).transpose()?,
    ] {
        let Some(handle) = handle else { continue };
        match try_lock_exclusive(&handle) {
            Ok(()) => {} // released as the handle closes
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Ok(Some(held(lock_file.as_mut())));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// `flock(LOCK_EX | LOCK_NB)`: fails with `EWOULDBLOCK` when another open file
/// description holds the lock.
fn try_lock_exclusive(file: &File) -> std::io::Result<()> {
    // SAFETY: flock(2) on a descriptor this `File` owns for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `flock(LOCK_EX)`, waiting at most `limit` for other holders: serialises short
/// critical sections between processes (the local archive's conditional puts).
/// Released on drop.
///
/// The wait is bounded because a holder can stop without exiting (SIGSTOP, a frozen
/// container, a debugger) and keep the lock for as long as it stays stopped: every
/// other process would then hang with it, at start or inside a promotion. Past
/// `limit` the error (`TimedOut`) names the holder's PID and state as `/proc/locks`
/// and `/proc/<pid>/status` give them.
pub fn lock_exclusive_within(path: &Path, limit: Duration) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(200);
    loop {
        match try_lock_exclusive(&file) {
            Ok(()) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "could not take the lock {} within {} s: {}",
                    path.display(),
                    limit.as_secs_f64(),
                    file.metadata()
                        .ok()
                        .and_then(|m| flock_holder(m.dev(), m.ino()))
                        .map_or_else(|| unknown_holder(path), describe_holder)
                ),
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The PID holding an `flock` on the file `dev`:`inode`, from `/proc/locks` (lines
/// such as `1: FLOCK  ADVISORY  WRITE 4321 08:01:123456 0 EOF`, the device's major and
/// minor in hex; waiters are marked `->` and skipped). The PID is as this process's PID
/// namespace sees it; a holder outside it is not listed. On btrfs `stat`'s device is
/// the subvolume's, not the one `/proc/locks` prints: there a lone lock on the inode
/// is taken for the file's.
fn flock_holder(dev: u64, inode: u64) -> Option<u32> {
    let device = format!("{:02x}:{:02x}:{inode}", libc::major(dev), libc::minor(dev));
    let same_inode = format!(":{inode}");
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let mut on_inode = Vec::new();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, file, ..] = fields.as_slice() else {
            continue;
        };
        let Ok(pid) = pid.parse() else { continue };
        if *file == device {
            return Some(pid);
        }
        if file.ends_with(&same_inode) {
            on_inode.push(pid);
        }
    }
    match on_inode.as_slice() {
        [pid] => Some(*pid),
        _ => None,
    }
}

/// What to do about a holder that kept the lock past the wait, by its state in
/// `/proc/<pid>/status`.
fn describe_holder(pid: u32) -> String {
    if pid == std::process::id() {
        return format!("this process (PID {pid}) holds it, in another thread");
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let state = status.lines().find_map(|l| l.strip_prefix("State:"))?;
            Some(state.trim().to_string())
        });
    let why = match state.as_deref().and_then(|s| s.chars().next()) {
        Some('T' | 't') => "it is stopped and keeps the lock until it resumes (SIGCONT) or exits",
        Some('D') => {
            "it is waiting on storage that does not answer, or is frozen by a cgroup freezer"
        }
        Some(_) => "it is holding the lock far longer than the few milliseconds a write takes",
        None => "it may have released the lock since",
    };
    format!(
        "PID {pid} (as this process's PID namespace sees it; state {}) holds it: {why}. See \
         RUNBOOK.md: \"could not take the lock\"",
        state.as_deref().unwrap_or("unknown")
    )
}

/// The message when `/proc/locks` names no holder (another PID namespace, or a file
/// system whose device numbers `stat` and `/proc/locks` give differently).
fn unknown_holder(path: &Path) -> String {
    format!(
        "another process holds it (`lslocks -o PID,PATH` on each host using {} names \
         it). See RUNBOOK.md: \"could not take the lock\"",
        path.display()
    )
}

fn read_text(file: &mut File) -> Option<String> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(MAX_LOCK_TEXT_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The PID on the lock file's first line.
fn parse_pid(text: &str) -> Option<u32> {
    text.lines().next()?.trim().parse().ok()
}

/// `PID <n> (<what>)` from the lock file's text.
fn describe(text: &str) -> Option<String> {
    let pid = parse_pid(text)?;
    let what: String = text
        .lines()
        .nth(1)
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    Some(if what.is_empty() {
        format!("PID {pid}")
    } else {
        format!("PID {pid} ({what})")
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_lock_file_refused_for_permission_names_the_fix() {
        for (errno, wanted) in [(libc::EROFS, "read-only"), (libc::EACCES, "chown")] {
            let e = DirLockError::Io {
                path: "/d/oc.lock".into(),
                source: std::io::Error::from_raw_os_error(errno),
            };
            assert!(e.to_string().contains(wanted), "{e}");
        }
    }

    use super::*;

    #[test]
    fn the_watch_notices_the_directory_moved_and_the_lock_file_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let lock = DirLock::acquire(&data, "oc-server").expect("lock");
        let watch = lock.watch().expect("watch");
        assert_eq!(watch.check(), Ok(()));
        // Replaced: a new file of the same name (an editor's save, an "unlock").
        std::fs::remove_file(data.join(LOCK_FILE)).expect("remove");
        std::fs::write(data.join(LOCK_FILE), b"1\n").expect("new file");
        let replaced = watch.check().expect_err("replaced");
        assert!(
            replaced.contains("lock file") && replaced.contains("replaced"),
            "{replaced}"
        );
        // Moved away: the path is gone, wherever the directory went.
        std::fs::rename(&data, dir.path().join("moved")).expect("move");
        let moved = watch.check().expect_err("moved");
        assert!(moved.contains("removed or moved"), "{moved}");
        // A new directory in its place is another directory.
        std::fs::create_dir(&data).expect("a new one");
        let other = watch.check().expect_err("another directory");
        assert!(
            other.contains("the data directory") && other.contains("replaced"),
            "{other}"
        );
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data, "oc-server").expect("first");
        // A second open file description, as a second process would have.
        let err = DirLock::acquire(&data, "oc-pitr restore").expect_err("held");
        let me = std::process::id();
        assert!(
            matches!(&err, DirLockError::Held { pid: Some(pid), .. } if *pid == me),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("PID {me} (oc-server)")),
            "{message}"
        );
        drop(first);
        let again = DirLock::acquire(&data, "oc-pitr restore").expect("released on drop");
        let text = std::fs::read_to_string(data.join(LOCK_FILE)).expect("read");
        assert_eq!(text, format!("{me}\noc-pitr restore\n"));
        assert_eq!(again.dir(), data.as_path());
    }

    #[test]
    fn a_probe_names_the_holder_and_neither_takes_nor_writes_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(holder_of(dir.path()).expect("probe"), None);
        assert!(
            !dir.path().join(LOCK_FILE).exists(),
            "the probe made oc.lock"
        );
        let held = DirLock::acquire(dir.path(), "oc-server").expect("lock");
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("read");
        let holder = holder_of(dir.path()).expect("probe").expect("held");
        assert!(
            holder.contains(&format!("PID {}", std::process::id())),
            "{holder}"
        );
        let after = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("read");
        assert_eq!(after, text, "the probe wrote the holder's lock file");
        drop(held);
        assert_eq!(holder_of(dir.path()).expect("probe"), None);
        DirLock::acquire(dir.path(), "oc-server").expect("the probe left it free");
    }

    #[test]
    fn a_deleted_or_replaced_lock_file_does_not_unlock_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let first = DirLock::acquire(&data, "oc-server").expect("first");
        std::fs::remove_file(data.join(LOCK_FILE)).expect("deleted");
        let err = DirLock::acquire(&data, "oc-server").expect_err("the directory is held");
        assert!(
            matches!(err, DirLockError::Held { pid: None, .. }),
            "{err:?}"
        );
        assert!(
            !data.join(LOCK_FILE).exists(),
            "a refused process creates nothing"
        );
        std::fs::write(data.join(LOCK_FILE), "1\nsomething else\n").expect("replaced");
        let err = DirLock::acquire(&data, "oc-server").expect_err("still held");
        assert!(
            matches!(err, DirLockError::Held { pid: Some(1), .. }),
            "{err:?}"
        );
        drop(first);
        DirLock::acquire(&data, "oc-server").expect("released on drop");
    }

    #[test]
    fn a_bounded_wait_for_a_held_lock_gives_up_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".cas-lock");
        let held = lock_exclusive_within(&path, Duration::from_secs(1)).expect("free");
        // A second open file description waits, then names this process.
        let started = Instant::now();
        let err = lock_exclusive_within(&path, Duration::from_millis(300)).expect_err("held");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let message = err.to_string();
        let me = std::process::id();
        assert!(
            message.contains(&format!("this process (PID {me}) holds it")),
            "{message}"
        );
        drop(held);
        lock_exclusive_within(&path, Duration::from_millis(300)).expect("released on drop");
    }

    #[test]
    fn a_stale_lock_file_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE), "999999999\noc-server\n").expect("write");
        DirLock::acquire(dir.path(), "oc-server").expect("nobody holds the flock");
    }

    #[test]
    fn lock_text_is_parsed_defensively() {
        assert_eq!(parse_pid("42\noc-server\n"), Some(42));
        assert_eq!(parse_pid(""), None);
        assert_eq!(parse_pid("x\n"), None);
        assert_eq!(describe("7\n"), Some("PID 7".into()));
        assert_eq!(describe("7\nA\u{1b}B\n"), Some("PID 7 (AB)".into()));
    }
}
