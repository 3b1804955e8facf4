//! The local-directory archive: one file per key under a root directory. Every write
//! goes to a temporary file in `<root>/.tmp/`, is fsynced, and is then renamed (plain
//! put) or hard-linked (put-if-absent, which the file system makes atomic) into place,
//! and the parent directory is fsynced: a crash leaves the old object or the new one,
//! never a mix. Conditional puts are compare-and-swaps that are atomic between
//! processes: the check and the rename (or link) happen under an exclusive `flock` on
//! `<root>/.cas-lock`, so two processes claiming the owner record (`lease.json`) cannot
//! both win. Readers (`oc-pitr`) may open the archive while a server ships to it:
//! opening only clears temporary files old enough that no put can still be using them.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{check_key, envelope, Archive, ArchiveError, Condition, Version};

const TMP_DIR: &str = ".tmp";
/// The file whose `flock` serialises conditional puts between processes.
pub const CAS_LOCK_FILE: &str = ".cas-lock";
/// Longest wait for [`CAS_LOCK_FILE`]: its holders keep it for a read, a compare and a
/// rename, so a longer wait means a holder that stopped (see `lock_exclusive_within`).
const CAS_LOCK_WAIT: Duration = Duration::from_secs(10);
/// A temporary file this old was left by a crash: no put takes this long.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

pub struct LocalDirArchive {
    root: PathBuf,
    next_tmp: AtomicU64,
    /// This opener's temporary names: the process id and a random token, so neither
    /// another opener in this process nor a restarted process that got the same id
    /// (PID 1 in a container) meets a name a crash left in `.tmp/`.
    tmp_prefix: String,
}

fn io(key: &str) -> impl Fn(std::io::Error) -> ArchiveError + '_ {
    move |e| ArchiveError::Io {
        key: key.to_string(),
        source: Arc::new(e),
    }
}

fn version_of(sealed: &[u8]) -> Version {
    version(crc32c::crc32c(sealed), sealed.len())
}

/// An object's version: its CRC-32C and length, so two puts of the same bytes agree.
fn version(object_crc: u32, len: usize) -> Version {
    Version(format!("{object_crc:08x}-{len}"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl LocalDirArchive {
    /// Opens (creating if needed) the archive rooted at `root`, and clears temporary
    /// files a crash left long ago (another process may be shipping to it right now:
    /// its files in flight are recent and stay).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, ArchiveError> {
        let root = root.as_ref().to_path_buf();
        let tmp = root.join(TMP_DIR);
        let label = root.display().to_string();
        fs::create_dir_all(&tmp).map_err(io(&label))?;
        let now = SystemTime::now();
        for entry in fs::read_dir(&tmp).map_err(io(&label))? {
            let entry = entry.map_err(io(&label))?;
            let modified = entry.metadata().and_then(|m| m.modified());
            let stale =
                modified.is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age >= STALE_TMP_AGE));
            if stale {
                match fs::remove_file(entry.path()) {
                    Err(e) if e.kind() != ErrorKind::NotFound => return Err(io(&label)(e)),
                    _ => {}
                }
            }
        }
        Ok(LocalDirArchive {
            root,
            next_tmp: AtomicU64::new(0),
            tmp_prefix: format!("{}-{:016x}", std::process::id(), fastrand::u64(..)),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, ArchiveError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes the object (its body, then its trailer) to a synced temporary file.
    fn stage(&self, key: &str, sealed: &envelope::Sealed) -> Result<PathBuf, ArchiveError> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(format!("{}-{n}", self.tmp_prefix));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(key))?;
        let written = file
            .write_all(&sealed.body)
            .and_then(|()| file.write_all(&sealed.trailer))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            // A full disk fails every retry the same way: none may leave its part behind.
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Err(io(key)(e));
        }
        Ok(tmp)
    }

    /// Creates the directories down to `dir`, syncing each new entry into its parent
    /// so a crash cannot lose a directory holding an acknowledged object.
    fn make_dirs(&self, dir: &Path) -> std::io::Result<()> {
        let Ok(relative) = dir.strip_prefix(&self.root) else {
            return Ok(());
        };
        let mut at = self.root.clone();
        for part in relative.components() {
            let parent = at.clone();
            at.push(part);
            match fs::create_dir(&at) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn current_version(&self, key: &str, path: &Path) -> Result<Option<Version>, ArchiveError> {
        match fs::read(path) {
            Ok(bytes) => Ok(Some(version_of(&bytes))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(key)(e)),
        }
    }
}

impl Archive for LocalDirArchive {
    #[expect(
        clippy::expect_used,
        reason = "every key path is built below the archive root, so it has a parent"
    )]
    fn put_sealed(
        &self,
        key: &str,
        object: &envelope::Sealed,
        condition: &Condition,
    ) -> Result<Version, ArchiveError> {
        let path = self.path(key)?;
        let parent = path.parent().expect("keys are below the root");
        self.make_dirs(parent).map_err(io(key))?;
        let version = version(object.object_crc(), object.len());
        let tmp = self.stage(key, object)?;
        // Check-and-place is one step for every process (and thread: each put opens
        // its own file description) using this archive.
        let serialised = match condition {
            Condition::Always => None,
            Condition::IfAbsent | Condition::IfVersion(_) => {
                let lock = self.root.join(CAS_LOCK_FILE);
                match oc_io::dir_lock::lock_exclusive_within(&lock, CAS_LOCK_WAIT) {
                    Ok(file) => Some(file),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(io(key)(e));
                    }
                }
            }
        };
        let placed = match condition {
            Condition::IfAbsent => match fs::hard_link(&tmp, &path) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    Err(ArchiveError::PreconditionFailed {
                        key: key.to_string(),
                        why: "an object already exists".into(),
                    })
                }
                other => other.map_err(io(key)),
            },
            Condition::Always => fs::rename(&tmp, &path).map_err(io(key)),
            Condition::IfVersion(expected) => match self.current_version(key, &path) {
                Ok(Some(current)) if &current == expected => {
                    fs::rename(&tmp, &path).map_err(io(key))
                }
                Ok(current) => Err(ArchiveError::PreconditionFailed {
                    key: key.to_string(),
                    why: format!("expected version {}, found {current:?}", expected.0),
                }),
                Err(e) => Err(e),
            },
        };
        // The lock covers the compare and the place, not the directory sync: a shorter
        // hold is a smaller window for a holder to be stopped inside.
        drop(serialised);
        let _ = fs::remove_file(&tmp); // already renamed away, or linked, or refused
                                       // A refusal syncs too: the object it found may be another put's, placed but not
                                       // yet synced, which a caller finding the same bytes takes for its own.
        if matches!(
            placed,
            Ok(()) | Err(ArchiveError::PreconditionFailed { .. })
        ) {
            sync_dir(parent).map_err(io(key))?;
        }
        placed?;
        Ok(version)
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
        let path = self.path(key)?;
        let sealed = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(key)(e)),
        };
        let version = version_of(&sealed);
        let payload = envelope::open(sealed).map_err(|why| ArchiveError::Corrupt {
            key: key.to_string(),
            why,
        })?;
        Ok(Some((payload, version)))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let mut keys = Vec::new();
        let mut pending = vec![self.root.clone()];
        while let Some(dir) = pending.pop() {
            let label = dir.display().to_string();
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&label)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io(&label))?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue; // the staging directory, never a key
                }
                let path = entry.path();
                if entry.file_type().map_err(io(&label))?.is_dir() {
                    pending.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.root) {
                    let key = relative.to_string_lossy().into_owned();
                    if key.starts_with(prefix) && check_key(&key).is_ok() {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    #[expect(
        clippy::expect_used,
        reason = "every key path is built below the archive root, so it has a parent"
    )]
    fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("below the root")).map_err(io(key)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(key)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> (tempfile::TempDir, LocalDirArchive) {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = LocalDirArchive::open(dir.path().join("archive")).expect("open");
        (dir, archive)
    }

    #[test]
    fn objects_round_trip_and_list_in_byte_order() {
        let (_dir, a) = archive();
        for key in [
            "shard-1/wal/b",
            "shard-0/wal/b",
            "shard-0/wal/a",
            "manifest.json",
        ] {
            a.put(key, key.as_bytes(), &Condition::Always).expect("put");
        }
        assert_eq!(
            a.list("shard-0/").expect("list"),
            vec!["shard-0/wal/a".to_string(), "shard-0/wal/b".to_string()]
        );
        assert_eq!(a.list("").expect("list").len(), 4);
        let (payload, _) = a.get("shard-1/wal/b").expect("get").expect("present");
        assert_eq!(payload, b"shard-1/wal/b");
        assert!(a.get("shard-9/none").expect("get").is_none());
        a.delete("shard-0/wal/a").expect("delete");
        a.delete("shard-0/wal/a").expect("deleting again is fine");
        assert_eq!(
            a.list("shard-0/").expect("list"),
            vec!["shard-0/wal/b".to_string()]
        );
    }

    #[test]
    fn conditional_puts_refuse_without_changing_the_object() {
        let (_dir, a) = archive();
        let first = a
            .put("lease", b"epoch 1", &Condition::IfAbsent)
            .expect("absent");
        let refused = a.put("lease", b"epoch 2", &Condition::IfAbsent);
        assert!(matches!(
            refused,
            Err(ArchiveError::PreconditionFailed { .. })
        ));
        assert_eq!(a.get("lease").expect("get").expect("present").0, b"epoch 1");
        let second = a
            .put("lease", b"epoch 2", &Condition::IfVersion(first.clone()))
            .expect("version matches");
        let stale = a.put("lease", b"epoch 3", &Condition::IfVersion(first));
        assert!(matches!(
            stale,
            Err(ArchiveError::PreconditionFailed { .. })
        ));
        let (payload, version) = a.get("lease").expect("get").expect("present");
        assert_eq!((payload.as_slice(), version), (&b"epoch 2"[..], second));
        assert!(a.list("").expect("list").iter().all(|k| !k.contains("tmp")));
    }

    #[test]
    fn records_are_stored_as_is_however_well_they_would_compress() {
        let (dir, a) = archive();
        let record = vec![b' '; 64 << 10];
        a.put("lease.json", &record, &Condition::Always)
            .expect("put");
        let stored = fs::read(dir.path().join("archive/lease.json")).expect("read");
        assert_eq!(stored.len(), record.len() + envelope::TRAILER_BYTES);
        assert_eq!(&stored[stored.len() - 20..stored.len() - 16], &[1, 0, 0, 0]);
    }

    #[test]
    fn an_encoded_objects_version_is_the_one_get_and_conditions_see() {
        let (dir, a) = archive();
        let first = vec![1u8; 64 << 10];
        let put = a
            .put_sealed("big", &envelope::seal(&first), &Condition::Always)
            .expect("put");
        let stored = fs::read(dir.path().join("archive/big")).expect("read");
        assert!(
            stored.len() < first.len() / 8,
            "stored as is: {}",
            stored.len()
        );
        assert_eq!(a.get("big").expect("get"), Some((first, put.clone())));
        let second = vec![2u8; 64 << 10];
        let next = a
            .put_sealed(
                "big",
                &envelope::seal(&second),
                &Condition::IfVersion(put.clone()),
            )
            .expect("the version put returned is the one stored");
        assert_ne!(next, put);
        assert_eq!(a.get("big").expect("get"), Some((second, next)));
    }

    /// Two openers of one directory stand for two processes: of many racing
    /// compare-and-swaps from the same version, exactly one wins.
    #[test]
    fn racing_compare_and_swaps_have_one_winner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("archive");
        let openers = [
            Arc::new(LocalDirArchive::open(&root).expect("open")),
            Arc::new(LocalDirArchive::open(&root).expect("open")),
        ];
        let base = openers[0]
            .put("lease.json", b"base", &Condition::IfAbsent)
            .expect("absent");
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let (archive, base) = (openers[i % 2].clone(), base.clone());
                std::thread::spawn(move || {
                    archive
                        .put(
                            "lease.json",
                            format!("racer {i}").as_bytes(),
                            &Condition::IfVersion(base),
                        )
                        .is_ok()
                })
            })
            .collect();
        let winners = racers
            .into_iter()
            .map(|r| r.join().expect("racer"))
            .filter(|&won| won)
            .count();
        assert_eq!(winners, 1);
        let refused = openers[1].put("lease.json", b"late", &Condition::IfAbsent);
        assert!(matches!(
            refused,
            Err(ArchiveError::PreconditionFailed { .. })
        ));
    }

    /// Set in the child process [`a_failed_write_leaves_no_temporary_file`] starts.
    const FILE_SIZE_LIMITED: &str = "OC_TEST_FILE_SIZE_LIMITED";

    /// Runs in a child process whose files may not grow past 64 KiB (`RLIMIT_FSIZE`, so
    /// a write fails as on a full disk); elsewhere it has nothing to do.
    #[test]
    #[ignore = "run by a_failed_write_leaves_no_temporary_file in a child process"]
    fn put_larger_than_the_file_size_limit() {
        let Some(root) = std::env::var_os(FILE_SIZE_LIMITED) else {
            return;
        };
        let archive = LocalDirArchive::open(&root).expect("open");
        let big: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let err = archive
            .put("seg", &big, &Condition::Always)
            .expect_err("a file-size limit of 64 KiB");
        // The write past the limit failed, after the temporary file was created.
        assert!(
            matches!(&err, ArchiveError::Io { source, .. } if source.raw_os_error() == Some(libc::EFBIG)),
            "{err}"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        use std::os::unix::process::CommandExt;
        let (dir, _a) = archive();
        let root = dir.path().join("archive");
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"));
        child
            .args([
                "--exact",
                "--ignored",
                "archive::local::tests::put_larger_than_the_file_size_limit",
            ])
            .env(FILE_SIZE_LIMITED, &root);
        // SAFETY: between fork and exec only setrlimit and signal, both
        // async-signal-safe, on a value on the stack.
        unsafe {
            child.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 64 << 10,
                    rlim_max: 64 << 10,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Past the limit a write fails with EFBIG instead of killing the process.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let out = child.output().expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("test result: ok. 1 passed;"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left: Vec<_> = fs::read_dir(root.join(TMP_DIR))
            .expect("temporary files")
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!root.join("seg").exists());
    }

    #[test]
    fn a_crashed_process_with_the_same_id_leaves_no_name_in_the_way() {
        let (dir, _) = archive();
        let tmp = dir.path().join("archive").join(TMP_DIR);
        // What an earlier process with this id (PID 1 in a container) may have left.
        for n in 0..4 {
            fs::write(tmp.join(format!("{}-{n}", std::process::id())), b"partial").expect("write");
        }
        for opener in 0..2 {
            let a = LocalDirArchive::open(dir.path().join("archive")).expect("open");
            a.put(&format!("seg-{opener}"), b"payload", &Condition::Always)
                .expect("a put beside leftovers");
        }
    }

    #[test]
    fn opening_leaves_another_writers_recent_temporary_files_alone() {
        let (dir, _a) = archive();
        let in_flight = dir.path().join("archive").join(TMP_DIR).join("4242-0");
        fs::write(&in_flight, b"being written").expect("write");
        let _b = LocalDirArchive::open(dir.path().join("archive")).expect("second opener");
        assert!(in_flight.exists());
    }

    #[test]
    fn damaged_and_truncated_objects_are_reported_with_their_key() {
        let (dir, a) = archive();
        a.put("seg", &[9u8; 4096], &Condition::Always).expect("put");
        let path = dir.path().join("archive/seg");
        let mut bytes = fs::read(&path).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        fs::write(&path, &bytes).expect("damage");
        let err = a.get("seg").expect_err("damaged");
        assert!(
            matches!(&err, ArchiveError::Corrupt { key, .. } if key == "seg"),
            "{err}"
        );
        fs::write(&path, &bytes[..middle]).expect("truncate");
        assert!(matches!(a.get("seg"), Err(ArchiveError::Corrupt { .. })));
    }

    #[test]
    fn invalid_keys_never_touch_the_file_system() {
        let (dir, a) = archive();
        for bad in ["../escape", "/abs", "a/../../b"] {
            assert!(matches!(
                a.put(bad, b"x", &Condition::Always),
                Err(ArchiveError::InvalidKey { .. })
            ));
            assert!(matches!(a.get(bad), Err(ArchiveError::InvalidKey { .. })));
        }
        assert!(!dir.path().join("escape").exists());
    }
}
