//! The archive's owner record (`lease.json`, FORMAT.md §9.2): which data directory
//! writes this archive. One archive has one writer: a server whose data directory is
//! not the recorded owner is refused at start, before it ships or deletes anything.
//!
//! This is version 1 of the replication lease. It already has the lease's fields
//! (`epoch`, `renewed_at_us`, `lease_ttl_ms`) so replication extends this object
//! instead of adding a second one: today the epoch is always 1, the record is
//! renewed once per start, and it has no TTL (`null`: held until an operator removes
//! it). Every write is conditional: a claim is "only if absent" and a renewal "only
//! if the version I read is still there", so two processes racing for one archive
//! cannot both win, on S3 (`If-None-Match` / `If-Match`) or a local directory
//! (hard link / compare-and-swap under a `flock`).

use oc_engine::json_file::JsonFile;
use oc_engine::FileProblem;
use serde::{Deserialize, Serialize};

use crate::archive::{Archive, ArchiveError, Condition, Version};

/// The owner record's key at the archive's root.
pub const LEASE_KEY: &str = "lease.json";
/// The record's format version.
pub const LEASE_FORMAT_VERSION: u64 = 1;
/// Conditional writes lost to a racing writer before giving up.
const MAX_CLAIM_ATTEMPTS: usize = 4;

/// Who wrote the record, for the humans reading a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// The program and version, e.g. `oc-server 0.1.0`.
    pub program: String,
}

/// The owner record, field by field as FORMAT.md §9.2 gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub format_version: u64,
    /// The owning data directory's id (`oc-layout.json`'s `data_dir_id`).
    pub owner_id: String,
    /// The owner's replication epoch; always 1 until replication exists.
    pub epoch: u64,
    pub holder: Holder,
    /// When this owner first claimed the archive (µs since the Unix epoch).
    pub claimed_at_us: u64,
    /// When the holder last wrote the record: its claim or its latest start.
    pub renewed_at_us: u64,
    /// How long the record holds without a renewal; `None` (v1): until removed.
    pub lease_ttl_ms: Option<u64>,
}

/// Why the archive could not be claimed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(
        "the archive is owned by another data directory ({}, last started by {} PID {} on {} at {}); \
         this data directory is {mine}. One archive takes one writer: give this server its own \
         --archive location (after a restore, always a new one). See RUNBOOK.md: \"archive is \
         owned by another data directory\"",
        .owner.owner_id, .owner.holder.program, .owner.holder.pid, .owner.holder.host,
        crate::timestamp::format_rfc3339(.owner.renewed_at_us)
    )]
    OwnedByAnother { owner: Box<Lease>, mine: String },
    #[error(
        "the archive's {LEASE_KEY} is unreadable: {problem}; it was not written by this version of oc"
    )]
    Unreadable { problem: FileProblem },
    #[error("the archive's {LEASE_KEY} kept changing while this server claimed it ({MAX_CLAIM_ATTEMPTS} attempts): another process is claiming it too")]
    Contended,
}

impl Lease {
    /// Encodes the record as its stored JSON (the archive seals it in an envelope).
    pub fn encode(&self) -> Vec<u8> {
        JsonFile::encode(self)
    }

    /// Decodes a stored record, refusing unknown versions and fields.
    pub fn decode(bytes: &[u8]) -> Result<Lease, LeaseError> {
        let unreadable = |problem| LeaseError::Unreadable { problem };
        let lease = <Lease as JsonFile>::decode(bytes).map_err(unreadable)?;
        if lease.owner_id.is_empty() {
            return Err(unreadable(FileProblem::BadField {
                field: "owner_id",
                why: "is empty".into(),
            }));
        }
        if lease.epoch == 0 {
            return Err(unreadable(FileProblem::BadField {
                field: "epoch",
                why: "is 0 (epochs start at 1)".into(),
            }));
        }
        Ok(lease)
    }
}

/// `lease_ttl_ms` may be absent (read as `null`), as serde has always read it.
impl JsonFile for Lease {
    const VERSIONS: &'static [u64] = &[LEASE_FORMAT_VERSION];
    const REQUIRED_FIELDS: &'static [&'static str] = &[
        "format_version",
        "owner_id",
        "epoch",
        "holder",
        "claimed_at_us",
        "renewed_at_us",
    ];
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The archive had no owner; it is now ours.
    New,
    /// We already owned it; the record is renewed.
    Renewed,
}

/// Claims `archive` for data directory `owner_id` (or renews our claim), refusing
/// when another data directory owns it. `now_us` stamps the record.
pub fn claim(
    archive: &dyn Archive,
    owner_id: &str,
    holder: Holder,
    now_us: u64,
) -> Result<(Claimed, Lease), LeaseError> {
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let current = read(archive)?;
        let (lease, condition, claimed) = match current {
            None => (
                Lease {
                    format_version: LEASE_FORMAT_VERSION,
                    owner_id: owner_id.to_string(),
                    epoch: 1,
                    holder: holder.clone(),
                    claimed_at_us: now_us,
                    renewed_at_us: now_us,
                    lease_ttl_ms: None,
                },
                Condition::IfAbsent,
                Claimed::New,
            ),
            Some((found, _)) if found.owner_id != owner_id => {
                return Err(LeaseError::OwnedByAnother {
                    owner: Box::new(found),
                    mine: owner_id.to_string(),
                })
            }
            Some((found, version)) => (
                Lease {
                    holder: holder.clone(),
                    renewed_at_us: now_us.max(found.renewed_at_us),
                    ..found
                },
                Condition::IfVersion(version),
                Claimed::Renewed,
            ),
        };
        match archive.put(LEASE_KEY, &lease.encode(), &condition) {
            Ok(_) => return Ok((claimed, lease)),
            Err(ArchiveError::PreconditionFailed { .. }) => continue, // raced: read again
            Err(e) => return Err(e.into()),
        }
    }
    Err(LeaseError::Contended)
}

/// The archive's owner record and its version, if it has one.
pub fn read(archive: &dyn Archive) -> Result<Option<(Lease, Version)>, LeaseError> {
    match archive.get(LEASE_KEY)? {
        None => Ok(None),
        Some((bytes, version)) => Ok(Some((Lease::decode(&bytes)?, version))),
    }
}

/// This process as a [`Holder`].
pub fn this_process(program: &str) -> Holder {
    Holder {
        host: hostname(),
        pid: std::process::id(),
        program: program.to_string(),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into a live buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::LocalDirArchive;

    fn holder(pid: u32) -> Holder {
        Holder {
            host: "db-1".into(),
            pid,
            program: "oc-server 0.1.0".into(),
        }
    }

    fn archive() -> (tempfile::TempDir, LocalDirArchive) {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = LocalDirArchive::open(dir.path().join("archive")).expect("open");
        (dir, archive)
    }

    #[test]
    fn the_first_data_directory_owns_the_archive_and_renews_it() {
        let (_dir, a) = archive();
        let (claimed, first) = claim(&a, "aa", holder(1), 100).expect("claim");
        assert_eq!(claimed, Claimed::New);
        let (claimed, second) = claim(&a, "aa", holder(2), 200).expect("renew");
        assert_eq!(claimed, Claimed::Renewed);
        assert_eq!(second.claimed_at_us, first.claimed_at_us);
        assert_eq!((second.renewed_at_us, second.holder.pid), (200, 2));
        assert_eq!(read(&a).expect("read").expect("present").0, second);
    }

    #[test]
    fn another_data_directory_is_refused_and_the_record_is_untouched() {
        let (_dir, a) = archive();
        claim(&a, "aa", holder(1), 100).expect("claim");
        let before = a.get(LEASE_KEY).expect("get");
        let err = claim(&a, "bb", holder(2), 200).expect_err("owned");
        let message = err.to_string();
        assert!(
            matches!(&err, LeaseError::OwnedByAnother { owner, mine } if owner.owner_id == "aa" && mine == "bb"),
            "{err:?}"
        );
        assert!(message.contains("PID 1 on db-1"), "{message}");
        assert!(message.contains("new one"), "{message}");
        assert_eq!(a.get(LEASE_KEY).expect("get"), before);
    }

    /// The stored bytes are exactly what FORMAT.md §9.2 shows (fields in this order).
    #[test]
    fn the_record_encodes_as_documented() {
        let lease = Lease {
            format_version: 1,
            owner_id: "5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0".into(),
            epoch: 1,
            holder: holder(4242),
            claimed_at_us: 1_764_000_000_000_000,
            renewed_at_us: 1_764_000_100_000_000,
            lease_ttl_ms: None,
        };
        let text = String::from_utf8(lease.encode()).expect("utf-8");
        assert_eq!(
            text,
            r#"{"format_version":1,"owner_id":"5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0","epoch":1,"holder":{"host":"db-1","pid":4242,"program":"oc-server 0.1.0"},"claimed_at_us":1764000000000000,"renewed_at_us":1764000100000000,"lease_ttl_ms":null}"#
        );
        assert_eq!(Lease::decode(text.as_bytes()).expect("decode"), lease);
    }

    #[test]
    fn unknown_versions_fields_and_garbage_are_unreadable() {
        for bad in [
            &b"not json"[..],
            br#"{"owner_id":"aa"}"#,
            br#"{"format_version":2,"owner_id":"aa"}"#,
            br#"{"format_version":1,"owner_id":"aa","epoch":1,"holder":{"host":"h","pid":1,"program":"p"},"claimed_at_us":1,"renewed_at_us":1,"lease_ttl_ms":null,"extra":1}"#,
            br#"{"format_version":1,"owner_id":"","epoch":1,"holder":{"host":"h","pid":1,"program":"p"},"claimed_at_us":1,"renewed_at_us":1,"lease_ttl_ms":null}"#,
        ] {
            assert!(
                matches!(Lease::decode(bad), Err(LeaseError::Unreadable { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn an_unknown_version_or_a_missing_field_is_named() {
        let lease = Lease {
            format_version: 1,
            owner_id: "aa".into(),
            epoch: 1,
            holder: holder(1),
            claimed_at_us: 1,
            renewed_at_us: 1,
            lease_ttl_ms: None,
        };
        let text = String::from_utf8(lease.encode()).expect("utf-8");
        let v2 = text.replace("\"format_version\":1", "\"format_version\":2");
        assert!(matches!(
            Lease::decode(v2.as_bytes()),
            Err(LeaseError::Unreadable {
                problem: FileProblem::UnsupportedVersion { found: 2, .. }
            })
        ));
        let headless = text.replace(
            r#""holder":{"host":"db-1","pid":1,"program":"oc-server 0.1.0"},"#,
            "",
        );
        let err = Lease::decode(headless.as_bytes()).expect_err("no holder");
        assert!(
            matches!(
                &err,
                LeaseError::Unreadable {
                    problem: FileProblem::MissingField("holder")
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("lease.json is unreadable: no holder"),
            "{err}"
        );
    }
}
