//! The archive: where sealed segments, checkpoints and tails go so that a lost machine
//! can be restored. An `Archive` stores whole objects under `/`-separated keys, each
//! sealed with a checksummed trailer (`envelope`), and supports the conditional writes
//! that leases and manifests need ("only if absent", "only if the version matches").
//!
//! Two implementations: a local directory (`file://<dir>`, the embedded default) and
//! S3 (`s3://bucket/prefix`).

pub mod envelope;
pub mod local;
pub mod s3;

use std::sync::Arc;

pub use local::LocalDirArchive;
pub use s3::S3Archive;

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// What a put requires of the object already under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Replace whatever is there.
    Always,
    /// Only if nothing is there.
    IfAbsent,
    /// Only if the object there has this version.
    IfVersion(Version),
}

/// An opaque version of one object (the local archive uses the sealed object's
/// checksum and length; S3 its ETag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

/// The next step for an archive a server may not write to.
fn writable_advice(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EROFS) => {
            "; the archive's file system is mounted read-only: a server ships to it (and \
             renews its lease there), so remount it read-write, or point --archive at a \
             writable location (a restore only reads)"
        }
        Some(libc::EACCES | libc::EPERM) => {
            "; this process's user may not write there: give the archive directory to that \
             user (`chown`)"
        }
        _ => "",
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ArchiveError {
    #[error("invalid archive key {key:?}: {why}")]
    InvalidKey { key: String, why: String },
    #[error("the condition on {key:?} does not hold: {why}")]
    PreconditionFailed { key: String, why: String },
    #[error("archive object {key:?} is damaged: {why}")]
    Corrupt { key: String, why: String },
    /// A manifest or record (JSON, FORMAT.md §9) this build cannot use.
    #[error("archive object {key:?} is unreadable: {problem}")]
    Unreadable {
        key: String,
        problem: oc_engine::FileProblem,
    },
    #[error("archive I/O on {key:?}: {source}{}", writable_advice(source))]
    Io {
        key: String,
        source: Arc<std::io::Error>,
    },
    #[error("archive URI {uri:?}: {why}")]
    Uri { uri: String, why: String },
    /// An archive object that is readable but cannot be used as it is.
    #[error("archive object {key:?}: {why}")]
    Unusable { key: String, why: String },
    /// No archive here: nothing was ever shipped to this location.
    #[error("no archive here: it holds no manifest.json, so nothing was ever shipped to it (is the location mistyped?)")]
    NotAnArchive,
}

/// An object store. Calls block: archives are used from the shipping and restore
/// threads, never from a data shard's executor.
pub trait Archive: Send + Sync {
    /// Stores `object` (a payload sealed by [`envelope::seal`]) under `key` if
    /// `condition` holds; returns the new version.
    fn put_sealed(
        &self,
        key: &str,
        object: &envelope::Sealed,
        condition: &Condition,
    ) -> Result<Version, ArchiveError>;
    /// Stores `payload` as is (`envelope::seal_plain`) under `key` if `condition`
    /// holds; returns the new version. For records (the owner record, manifests,
    /// timelines): any build reads them, whatever format the rest of the archive is
    /// in. The shipper encodes what it ships with `envelope::seal` and `put_sealed`.
    fn put(
        &self,
        key: &str,
        payload: &[u8],
        condition: &Condition,
    ) -> Result<Version, ArchiveError> {
        self.put_sealed(key, &envelope::seal_plain(payload), condition)
    }
    /// The payload under `key` (checksum verified) and its version.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError>;
    /// Keys starting with `prefix`, in byte order (so LSN-named keys list in LSN order).
    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError>;
    /// Removes `key`; removing a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), ArchiveError>;
}

/// An archive seen under a key prefix (`epoch-2/`): a promoted writer's namespace, so
/// that its keys never meet an earlier writer's. Keys and listings are the archive's
/// own, with the prefix added and removed.
pub struct Prefixed {
    inner: Arc<dyn Archive>,
    prefix: String,
}

impl Prefixed {
    /// `prefix` ends with `/` and is a valid key part sequence (`epoch-2/`).
    pub fn new(inner: Arc<dyn Archive>, prefix: String) -> Result<Prefixed, ArchiveError> {
        check_key(prefix.trim_end_matches('/'))?;
        if !prefix.ends_with('/') {
            return Err(ArchiveError::InvalidKey {
                key: prefix,
                why: "a namespace prefix ends with `/`".into(),
            });
        }
        Ok(Prefixed { inner, prefix })
    }
}

impl Archive for Prefixed {
    fn put_sealed(
        &self,
        key: &str,
        object: &envelope::Sealed,
        condition: &Condition,
    ) -> Result<Version, ArchiveError> {
        self.inner
            .put_sealed(&format!("{}{key}", self.prefix), object, condition)
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
        self.inner.get(&format!("{}{key}", self.prefix))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        let keys = self.inner.list(&format!("{}{prefix}", self.prefix))?;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.inner.delete(&format!("{}{key}", self.prefix))
    }
}

/// Checks a key: `/`-separated parts of `[a-z0-9_.-]`, none empty, none starting with
/// a dot (so no `.` or `..`), at most [`MAX_KEY_BYTES`]. Keys map to file paths in the
/// local archive, so this is what keeps them inside its directory.
pub fn check_key(key: &str) -> Result<(), ArchiveError> {
    let invalid = |why: &str| ArchiveError::InvalidKey {
        key: key.chars().take(100).collect(),
        why: why.to_string(),
    };
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(invalid("keys are 1 to 512 bytes"));
    }
    for part in key.split('/') {
        if part.is_empty() {
            return Err(invalid("empty path part (leading, trailing or double `/`)"));
        }
        if part.starts_with('.') {
            return Err(invalid("a part may not start with `.`"));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        {
            return Err(invalid("parts use only a-z, 0-9, `_`, `.` and `-`"));
        }
    }
    Ok(())
}

/// Opens the archive a URI names: `file://<dir>` (created if missing) or
/// `s3://bucket/prefix[?endpoint=<url>&region=<name>&path_style=true]`.
pub fn open_archive(uri: &str) -> Result<Arc<dyn Archive>, ArchiveError> {
    if let Some(dir) = uri.strip_prefix("file://") {
        if dir.is_empty() {
            return Err(ArchiveError::Uri {
                uri: uri.into(),
                why: "file:// needs a directory, e.g. file:///var/lib/oc-archive".into(),
            });
        }
        return Ok(Arc::new(LocalDirArchive::open(dir)?));
    }
    if uri.starts_with("s3://") {
        return Ok(Arc::new(S3Archive::open(uri)?));
    }
    Err(ArchiveError::Uri {
        uri: uri.into(),
        why: "not a supported form: use file://<dir> or s3://bucket/prefix (oc-server \
              --archive also takes none)"
            .into(),
    })
}

/// Opens an archive that must exist already (the tools that read one): a `file://`
/// directory that is not there is refused, not made.
pub fn open_existing_archive(uri: &str) -> Result<Arc<dyn Archive>, ArchiveError> {
    if let Some(dir) = uri.strip_prefix("file://") {
        if !dir.is_empty() && !std::path::Path::new(dir).is_dir() {
            return Err(ArchiveError::Uri {
                uri: uri.into(),
                why: "no such directory: nothing was ever shipped there (is it mistyped?)".into(),
            });
        }
    }
    open_archive(uri)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_archive_refused_for_permission_names_the_fix() {
        let e = super::ArchiveError::Io {
            key: "lease.json".into(),
            source: std::sync::Arc::new(std::io::Error::from_raw_os_error(libc::EROFS)),
        };
        assert!(e.to_string().contains("remount it read-write"), "{e}");
    }

    use super::*;

    #[test]
    fn keys_stay_inside_the_archive() {
        for ok in [
            "shard-0/wal/wal-0000-00000000000000aa.seg",
            "manifest.json",
            "a/b_c/d-1.e",
        ] {
            check_key(ok).expect(ok);
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../x",
            "a/../b",
            "a/./b",
            ".hidden",
            "A",
            "a b",
            "a\\b",
            &"a".repeat(513),
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn uris_name_what_is_supported() {
        let dir = tempfile::tempdir().expect("tempdir");
        open_archive(&format!("file://{}", dir.path().display())).expect("file uri");
        for (uri, says) in [
            ("s3://B", "bucket name"),
            ("file://", "needs a directory"),
            ("ftp://x", "s3://"),
        ] {
            let err = open_archive(uri).err().expect(uri).to_string();
            assert!(err.contains(says), "{uri}: {err}");
        }
    }
}
