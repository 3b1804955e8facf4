//! The archive's owner record (`lease.json`, FORMAT.md §9.2): which data directory
//! writes this archive, and which process of it holds the record now. One archive has
//! one writer: a server whose data directory is not the recorded owner is refused at
//! start, before it ships or deletes anything.
//!
//! A data directory's id travels with every file-level copy of it (a volume snapshot,
//! a cloned VM, "stop, copy, start" while a supervisor restarts the original), so the
//! id alone cannot tell two running copies apart. The record therefore also names its
//! holder (host, PID and data directory path), and the holder renews it every
//! [`LEASE_RENEW_INTERVAL`] while it runs. At start, a claim by the owning id is
//! refused while the record was renewed less than [`LEASE_STALE`] ago by a different
//! holder (another host, or another path on this host); the same host and path take
//! over at once (the data directory's `flock` proves the previous process there is
//! gone). A renewal is "only if the version I last wrote is still there": when it
//! fails, another copy has taken the record, and this process stops writing the
//! archive ([`LeaseHold`]) and exits.
//!
//! This is version 1 of the replication lease. It already has the lease's fields
//! (`epoch`, `renewed_at_us`, `lease_ttl_ms`) so replication extends this object
//! instead of adding a second one: today the epoch is always 1 and ownership has no
//! TTL (`null`: the owning id holds the archive until an operator removes the record;
//! only the holder goes stale). Every write is conditional: a claim is "only if
//! absent" or "only if the version I read is still there", so two processes racing
//! for one archive cannot both win, on S3 (`If-None-Match` / `If-Match`) or a local
//! directory (hard link / compare-and-swap under a `flock`).
//!
//! About 490 lines of code; the rest are unit tests of the owner record's races.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use oc_engine::json_file::JsonFile;
use oc_engine::FileProblem;
use serde::{Deserialize, Serialize};

use crate::archive::{Archive, ArchiveError, Condition, Version};

/// The owner record's key at the archive's root.
pub const LEASE_KEY: &str = "lease.json";
/// The record's format version.
pub const LEASE_FORMAT_VERSION: u64 = 1;
/// How often a running server renews the record.
pub const LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// Renewal intervals after which a holder that stopped renewing is presumed gone.
pub const LEASE_STALE_INTERVALS: u32 = 3;
/// How long a record not renewed keeps another holder of the same id out (30 s).
pub const LEASE_STALE: Duration =
    Duration::from_secs(LEASE_RENEW_INTERVAL.as_secs() * LEASE_STALE_INTERVALS as u64);
/// Conditional writes lost to a racing writer before giving up.
const MAX_CLAIM_ATTEMPTS: usize = 4;

/// Who wrote the record: the process, and the data directory path it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// The program and version, e.g. `oc-server 0.1.0`.
    pub program: String,
    /// The data directory as an absolute path (symbolic links resolved).
    pub data_dir: String,
}

impl Holder {
    /// The same host and data directory path: on one host, the data directory's lock
    /// guarantees that a previous process there is gone.
    pub fn same_place(&self, other: &Holder) -> bool {
        self.host == other.host && self.data_dir == other.data_dir
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} PID {} on {} (data directory {})",
            self.program, self.pid, self.host, self.data_dir
        )
    }
}

/// The owner record, field by field as FORMAT.md §9.2 gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub format_version: u64,
    /// The owning data directory's id (`oc-layout.json`'s `data_dir_id`).
    pub owner_id: String,
    /// The owner's lease epoch: 1, and one more at each promotion.
    pub epoch: u64,
    pub holder: Holder,
    /// When this owner first claimed the archive (µs since the Unix epoch).
    pub claimed_at_us: u64,
    /// When the holder last wrote the record: its claim, then every renewal.
    pub renewed_at_us: u64,
    /// How long ownership holds without a renewal; `None` (v1): until removed.
    pub lease_ttl_ms: Option<u64>,
}

/// What a server refused for an archive another data directory owns is told. An owner
/// record past epoch 1 was written by a promotion: the refused server may be the writer
/// from before that failover, which must come back as a follower, not on an archive of
/// its own (it would take writes beside the new writer).
fn owned_by_another(owner: &Lease, mine: &str) -> String {
    let after_failover = if owner.epoch > 1 {
        format!(
            " The record is at lease epoch {}: a follower was promoted to writer on this \
             archive. If this server was the writer before that failover, it must not take \
             writes again: restart it as a follower of the new writer (--mode follower \
             --leader-addr <its replication address>; RUNBOOK.md \"Re-adding the old writer \
             as a follower\"), never on an --archive of its own.",
            owner.epoch
        )
    } else {
        String::new()
    };
    format!(
        "the archive is owned by another data directory ({}, last started by {} PID {} on {} \
         at {}); this data directory is {mine}. One archive takes one writer. If this \
         directory is a follower's (it ran with --mode follower, or was restored with \
         `oc-pitr restore --for-follower`), start it with --mode follower --leader-addr <the \
         writer's replication address>, and promote it to make it the writer: never give it \
         an --archive of its own, which would make it a second writer of the same tenants. \
         Only a directory meant as a separate server (a restore made for one) gets its own \
         --archive location, always a new one. See RUNBOOK.md: \"archive is owned by \
         another data directory\".{after_failover}",
        owner.owner_id,
        owner.holder.program,
        owner.holder.pid,
        owner.holder.host,
        crate::timestamp::format_rfc3339(owner.renewed_at_us)
    )
}

/// Why the archive could not be claimed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{}", owned_by_another(owner, mine))]
    OwnedByAnother { owner: Box<Lease>, mine: String },
    #[error(
        "another copy of this data directory seems to be running: the archive's owner record \
         (data directory id {}) was renewed {:.1}s ago by {}, and this server is {mine} (a file-level \
         copy of a data directory keeps its id). Two copies shipping one archive would mix two \
         histories. Stop the other copy; or, if it has stopped, start this one once its record is \
         {}s old; or, if this copy is meant to be a separate server, give it a new id and its own \
         --archive. See RUNBOOK.md: \"another copy of this data directory\"",
        .owner.owner_id, .age.as_secs_f64(), .owner.holder, .stale.as_secs()
    )]
    HeldByAnotherCopy {
        owner: Box<Lease>,
        mine: Box<Holder>,
        /// How long ago the record was renewed, by this host's clock.
        age: Duration,
        stale: Duration,
    },
    #[error(
        "the archive's {LEASE_KEY} is unreadable: {problem}; it was not written by this version of oc"
    )]
    Unreadable { problem: FileProblem },
    /// The record this process held was written by someone else before it started
    /// shipping.
    #[error("{message}")]
    Displaced { message: String },
    #[error("the archive's {LEASE_KEY} kept changing while this server claimed it ({MAX_CLAIM_ATTEMPTS} attempts): another process is claiming it too")]
    Contended,
    /// The store took a put its condition forbids: it cannot fence an old writer.
    #[error(
        "the archive ignores conditional writes ({which} was not refused on a probe object): \
         a lease there cannot fence an old writer, so replication refuses it. Use an object \
         store that honours If-None-Match and If-Match (S3 does), or a local or shared \
         directory archive"
    )]
    ConditionsIgnored { which: &'static str },
}

/// Where [`check_conditions`] writes its probe objects (one per call, removed after).
pub const CONDITIONS_PROBE_PREFIX: &str = "preflight/conditions-";

/// Checks that `archive` refuses puts whose condition does not hold ("only if absent"
/// over an object, "only if this version" with another version), as the lease needs:
/// a store that ignores them would let two writers both believe they hold it. Writes,
/// overwrites and removes one probe object.
pub fn check_conditions(archive: &dyn Archive) -> Result<(), LeaseError> {
    let host = hostname();
    let key_for = |attempt: u32| {
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(64)
            .collect();
        format!(
            "{CONDITIONS_PROBE_PREFIX}{host}-{}-{}-{attempt}",
            std::process::id(),
            oc_io::TimestampMicros::now().0
        )
    };
    // A first put whose answer was lost and retried by the client comes back as a
    // failed condition: once more under a new key.
    let first = key_for(0);
    let (key, version) = match archive.put(&first, b"probe", &Condition::IfAbsent) {
        Err(ArchiveError::PreconditionFailed { .. }) => {
            // Best effort: the lost first object is a probe too.
            let _ = archive.delete(&first);
            let key = key_for(1);
            let version = archive.put(&key, b"probe", &Condition::IfAbsent)?;
            (key, version)
        }
        put => (first, put?),
    };
    let refused = |put: Result<Version, ArchiveError>, which| match put {
        Err(ArchiveError::PreconditionFailed { .. }) => Ok(()),
        Ok(_) => Err(LeaseError::ConditionsIgnored { which }),
        Err(e) => Err(LeaseError::from(e)),
    };
    let outcome = refused(
        archive.put(&key, b"again", &Condition::IfAbsent),
        "If-None-Match: * over an existing object",
    )
    .and_then(|()| {
        // Another well-formed version: the same tag with a suffix, quoted as an ETag is.
        let other = Version(format!("\"{}-not\"", version.0.trim_matches('"')));
        refused(
            archive.put(&key, b"again", &Condition::IfVersion(other)),
            "If-Match with another version",
        )
    });
    let removed = archive.delete(&key);
    outcome?;
    removed?;
    Ok(())
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
    /// We already owned it, from this host and path; the record is renewed.
    Renewed,
    /// We already owned it, but another holder (another host or path: a copy of this
    /// data directory) wrote the record last and stopped renewing it `idle` ago.
    TakenOver { from: Box<Holder>, idle: Duration },
}

/// A successful claim: what it did, the record written and its version (the
/// condition of the first renewal).
#[derive(Debug, Clone)]
pub struct Claim {
    pub claimed: Claimed,
    pub lease: Lease,
    pub version: Version,
}

/// Claims `archive` for data directory `owner_id` (or renews our claim), refusing
/// when another data directory owns it, or when another holder of the same id renewed
/// it less than `stale` ago. `now_us` stamps the record.
pub fn claim(
    archive: &dyn Archive,
    owner_id: &str,
    holder: Holder,
    now_us: u64,
    stale: Duration,
) -> Result<Claim, LeaseError> {
    claim_with_ttl(archive, owner_id, holder, now_us, stale, None)
}

/// [`claim`], recording `ttl` as the record's `lease_ttl_ms` (a replicating writer's:
/// how long its ownership holds without a renewal, which a promoting follower waits
/// out).
pub fn claim_with_ttl(
    archive: &dyn Archive,
    owner_id: &str,
    holder: Holder,
    now_us: u64,
    stale: Duration,
    ttl: Option<Duration>,
) -> Result<Claim, LeaseError> {
    let ttl_ms = ttl.map(|t| t.as_millis() as u64);
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
                    lease_ttl_ms: ttl_ms,
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
            Some((found, version)) => {
                // A record stamped in this host's future (clock skew) counts as fresh.
                let age = Duration::from_micros(now_us.saturating_sub(found.renewed_at_us));
                let claimed = if found.holder.same_place(&holder) {
                    Claimed::Renewed
                } else if age < stale {
                    return Err(LeaseError::HeldByAnotherCopy {
                        owner: Box::new(found),
                        mine: Box::new(holder),
                        age,
                        stale,
                    });
                } else {
                    Claimed::TakenOver {
                        from: Box::new(found.holder.clone()),
                        idle: age,
                    }
                };
                (
                    Lease {
                        holder: holder.clone(),
                        renewed_at_us: now_us.max(found.renewed_at_us + 1),
                        lease_ttl_ms: ttl_ms,
                        ..found
                    },
                    Condition::IfVersion(version),
                    claimed,
                )
            }
        };
        match archive.put(LEASE_KEY, &lease.encode(), &condition) {
            Ok(version) => {
                return Ok(Claim {
                    claimed,
                    lease,
                    version,
                })
            }
            Err(ArchiveError::PreconditionFailed { .. }) => continue, // raced: read again
            Err(e) => return Err(e.into()),
        }
    }
    Err(LeaseError::Contended)
}

/// Why a promotion could not take the record.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoteError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The record is no longer the one the promoting follower watched lapse: the
    /// writer renewed it, so it is alive (or another follower was promoted).
    #[error(
        "the archive's lease record changed while this follower waited for it to lapse \
         (now held by {} at epoch {}, renewed at {}): the writer is alive; stop it or cut it \
         off from the archive first, or promote with force once it is known to be stopped",
        .now.holder, .now.epoch, crate::timestamp::format_rfc3339(.now.renewed_at_us)
    )]
    Changed { now: Box<Lease> },
}

/// Whether `found` is a claim this process wrote: this data directory, this process's
/// holder (host, PID, program, path) and one of the claim times it used.
pub fn is_own_claim(found: &Lease, owner_id: &str, holder: &Holder, own_claims: &[u64]) -> bool {
    found.owner_id == owner_id
        && found.holder == *holder
        && own_claims.contains(&found.claimed_at_us)
}

/// What a promotion may displace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Whatever holds the record: the old writer is known to be fenced.
    Any,
    /// Only the record at this version, which the caller watched stay unchanged for
    /// the old lease's TTL plus the drift margin on its own monotonic clock (so the old
    /// writer, which stops acknowledging before its TTL runs out from the start of its
    /// last renewal, has stopped, whatever the two hosts' wall clocks say).
    Version(Version),
    /// Only no record: the caller found none.
    Absent,
}

/// Takes the record for a promoted follower: its data directory becomes the owner,
/// with the epoch one above the record's, if the record is what `expect` allows. The
/// write is "only if the version read is still there", so the old writer's next
/// renewal fails and it stops.
///
/// `own_claims` are the claim times this process has written or tried to write with
/// `holder` (`now_us` among them): a record carrying one of them is this process's own
/// write, whose answer was lost, and is returned as it is. Any other record, even one
/// naming this data directory (a copy of it elsewhere, or a clone with the same host
/// name and path, may hold it), is displaced only as `expect` allows.
pub fn promote(
    archive: &dyn Archive,
    owner_id: &str,
    holder: Holder,
    now_us: u64,
    ttl: Duration,
    expect: &Expect,
    own_claims: &[u64],
) -> Result<Claim, PromoteError> {
    for _ in 0..MAX_CLAIM_ATTEMPTS {
        let current = read(archive)?;
        let (epoch, condition) = match current {
            Some((found, version)) if is_own_claim(&found, owner_id, &holder, own_claims) => {
                return Ok(Claim {
                    claimed: Claimed::Renewed,
                    lease: found,
                    version,
                })
            }
            Some((found, version)) => {
                let allowed = match expect {
                    Expect::Any => true,
                    Expect::Version(watched) => *watched == version,
                    Expect::Absent => false,
                };
                if !allowed {
                    return Err(PromoteError::Changed {
                        now: Box::new(found),
                    });
                }
                (found.epoch + 1, Condition::IfVersion(version))
            }
            None => (2, Condition::IfAbsent),
        };
        let lease = Lease {
            format_version: LEASE_FORMAT_VERSION,
            owner_id: owner_id.to_string(),
            epoch,
            holder: holder.clone(),
            claimed_at_us: now_us,
            renewed_at_us: now_us,
            lease_ttl_ms: Some(ttl.as_millis() as u64),
        };
        match archive.put(LEASE_KEY, &lease.encode(), &condition) {
            Ok(version) => {
                return Ok(Claim {
                    claimed: Claimed::New,
                    lease,
                    version,
                })
            }
            Err(ArchiveError::PreconditionFailed { .. }) => continue, // renewed meanwhile
            Err(e) => return Err(LeaseError::from(e).into()),
        }
    }
    Err(LeaseError::Contended.into())
}

/// Where a writer holding the record ships: the archive's root for epoch 1, and
/// `epoch-<n>/` for a writer promoted to epoch n, so that two writers' histories never
/// share keys (FORMAT.md §9.3).
pub fn namespace(lease_epoch: u64) -> Option<String> {
    (lease_epoch > 1).then(|| format!("epoch-{lease_epoch}/"))
}

/// The archive's owner record and its version, if it has one.
pub fn read(archive: &dyn Archive) -> Result<Option<(Lease, Version)>, LeaseError> {
    match archive.get(LEASE_KEY)? {
        None => Ok(None),
        Some((bytes, version)) => Ok(Some((Lease::decode(&bytes)?, version))),
    }
}

/// This process, running on `data_dir`, as a [`Holder`].
pub fn this_process(program: &str, data_dir: &Path) -> Holder {
    let data_dir = std::fs::canonicalize(data_dir)
        .or_else(|_| std::path::absolute(data_dir))
        .unwrap_or_else(|_| data_dir.to_path_buf());
    Holder {
        host: hostname(),
        pid: std::process::id(),
        program: program.to_string(),
        data_dir: data_dir.display().to_string(),
    }
}

/// This machine's host name (`unknown` when it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most `buf.len()` bytes into a live buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Why a displaced holder's archive writes fail.
const DISPLACED: &str = "another copy of this data directory took the archive's owner record; \
                         this server writes nothing more to the archive";

/// This process's hold on the record, shared by the renewal and shipping threads: the
/// archive may be written only while the hold is confirmed, that is, not displaced and
/// renewed within the fence window (less than [`LEASE_STALE`], so a holder cut off from
/// the archive stops writing before another copy may take the record over).
#[derive(Debug)]
pub struct LeaseHold {
    displaced: AtomicBool,
    /// The latest confirmation, on the monotonic clock and on the wall clock.
    confirmed_at: Mutex<(Instant, SystemTime)>,
    fence: Duration,
}

impl LeaseHold {
    /// A hold confirmed by a write sent at `confirmed_at` (the claim), which lapses
    /// `fence` after its latest confirmation.
    pub fn new(confirmed_at: Instant, fence: Duration) -> LeaseHold {
        LeaseHold {
            displaced: AtomicBool::new(false),
            confirmed_at: Mutex::new((confirmed_at, wall_time_of(confirmed_at))),
            fence,
        }
    }

    /// Why the archive may not be written now, if it may not.
    pub fn check(&self) -> Result<(), String> {
        if self.displaced.load(Ordering::SeqCst) {
            return Err(DISPLACED.into());
        }
        // The longer of the two: the monotonic clock ignores the wall clock's steps
        // back, and the wall clock sees time a paused VM's monotonic clock may not
        // (once the guest's time is corrected).
        let since = self.confirmed_at.lock().map_or(Duration::MAX, |at| {
            let (mono, wall) = *at;
            mono.elapsed()
                .max(SystemTime::now().duration_since(wall).unwrap_or_default())
        });
        if since >= self.fence {
            return Err(format!(
                "this server's hold on the archive's owner record was last renewed {}s ago \
                 (renewals are failing); no archive writes until a renewal succeeds",
                since.as_secs()
            ));
        }
        Ok(())
    }

    pub fn is_displaced(&self) -> bool {
        self.displaced.load(Ordering::SeqCst)
    }

    fn confirm(&self, at: Instant) {
        if let Ok(mut confirmed) = self.confirmed_at.lock() {
            *confirmed = (at, wall_time_of(at));
        }
    }
}

/// The wall-clock time of a moment of the monotonic clock (now, less how long ago it
/// was).
fn wall_time_of(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// What one renewal found.
#[derive(Debug)]
pub enum Renewed {
    /// The record is ours, renewed.
    Yes,
    /// The archive could not be reached or answered an error: not a displacement; the
    /// next interval tries again.
    Failed(ArchiveError),
    /// Someone else wrote the record since our last write: this process no longer holds
    /// the archive. The hold is marked displaced before this returns. Carries the
    /// record as read again (or why it could not be read), for the message.
    Displaced(Result<Option<Lease>, LeaseError>),
}

/// The renewals of one claim.
pub struct Renewal {
    archive: Arc<dyn Archive>,
    lease: Lease,
    version: Version,
    hold: Arc<LeaseHold>,
}

impl Renewal {
    pub fn new(archive: Arc<dyn Archive>, claim: Claim, hold: Arc<LeaseHold>) -> Renewal {
        Renewal {
            archive,
            lease: claim.lease,
            version: claim.version,
            hold,
        }
    }

    /// The record as last written by this process.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Writes the record again with `renewed_at_us = now_us`, only if the version this
    /// process last wrote is still there.
    pub fn renew(&mut self, now_us: u64) -> Renewed {
        if self.hold.is_displaced() {
            return Renewed::Displaced(read(self.archive.as_ref()).map(|r| r.map(|(l, _)| l)));
        }
        let started = Instant::now();
        let lease = Lease {
            // Always above the last one: a renewal must change the record's bytes (and so
            // its version), or a promotion watching for a change would not see it when
            // this host's clock stepped back.
            renewed_at_us: now_us.max(self.lease.renewed_at_us + 1),
            ..self.lease.clone()
        };
        let condition = Condition::IfVersion(self.version.clone());
        match self.archive.put(LEASE_KEY, &lease.encode(), &condition) {
            Ok(version) => {
                // Confirmed as of when the write was sent, not when it was answered.
                self.hold.confirm(started);
                self.lease = lease;
                self.version = version;
                Renewed::Yes
            }
            Err(ArchiveError::PreconditionFailed { .. }) => {
                let found = read(self.archive.as_ref());
                // Our own write whose answer was lost and retried (an S3 client retry
                // after a timeout) reads back as exactly what we wrote.
                if let Ok(Some((current, version))) = &found {
                    if *current == lease {
                        self.hold.confirm(started);
                        self.lease = lease;
                        self.version = version.clone();
                        return Renewed::Yes;
                    }
                }
                self.hold.displaced.store(true, Ordering::SeqCst);
                Renewed::Displaced(found.map(|r| r.map(|(l, _)| l)))
            }
            Err(e) => Renewed::Failed(e),
        }
    }
}

/// The archive as the shipper sees it: every write and delete first checks the hold,
/// so a displaced (or cut-off) holder stops writing at once.
pub struct FencedArchive {
    inner: Arc<dyn Archive>,
    hold: Arc<LeaseHold>,
}

impl FencedArchive {
    pub fn new(inner: Arc<dyn Archive>, hold: Arc<LeaseHold>) -> FencedArchive {
        FencedArchive { inner, hold }
    }

    fn check(&self, key: &str) -> Result<(), ArchiveError> {
        self.hold
            .check()
            .map_err(|why| ArchiveError::PreconditionFailed {
                key: key.to_string(),
                why,
            })
    }
}

impl Archive for FencedArchive {
    fn put_sealed(
        &self,
        key: &str,
        object: &crate::archive::envelope::Sealed,
        condition: &Condition,
    ) -> Result<Version, ArchiveError> {
        self.check(key)?;
        self.inner.put_sealed(key, object, condition)
    }

    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
        self.inner.get(key)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
        self.inner.list(prefix)
    }

    fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        self.check(key)?;
        self.inner.delete(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::LocalDirArchive;

    const STALE: Duration = Duration::from_secs(30);
    const SECOND: u64 = 1_000_000;

    /// An object store that takes every put whatever its condition.
    struct Unconditional(LocalDirArchive);

    impl Archive for Unconditional {
        fn put_sealed(
            &self,
            key: &str,
            object: &crate::archive::envelope::Sealed,
            _: &Condition,
        ) -> Result<Version, ArchiveError> {
            self.0.put_sealed(key, object, &Condition::Always)
        }

        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
            self.0.get(key)
        }

        fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
            self.0.list(prefix)
        }

        fn delete(&self, key: &str) -> Result<(), ArchiveError> {
            self.0.delete(key)
        }
    }

    #[test]
    fn a_store_that_ignores_conditions_is_refused_for_a_lease_and_the_probe_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let honest = LocalDirArchive::open(dir.path().join("honest")).expect("open");
        check_conditions(&honest).expect("a local directory honours conditions");
        assert!(
            honest.list("").expect("list").is_empty(),
            "the probe is removed"
        );
        let ignoring =
            Unconditional(LocalDirArchive::open(dir.path().join("ignoring")).expect("open"));
        let refused = check_conditions(&ignoring).expect_err("refused");
        assert!(
            matches!(refused, LeaseError::ConditionsIgnored { .. }),
            "{refused}"
        );
        assert!(ignoring.list("").expect("list").is_empty());
    }

    fn holder(pid: u32) -> Holder {
        Holder {
            host: "db-1".into(),
            pid,
            program: "oc-server 0.1.0".into(),
            data_dir: "/var/lib/oc/data".into(),
        }
    }

    fn claim_at(
        a: &dyn Archive,
        owner: &str,
        holder: Holder,
        now_us: u64,
    ) -> Result<Claim, LeaseError> {
        claim(a, owner, holder, now_us, STALE)
    }

    fn archive() -> (tempfile::TempDir, LocalDirArchive) {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = LocalDirArchive::open(dir.path().join("archive")).expect("open");
        (dir, archive)
    }

    #[test]
    fn the_first_data_directory_owns_the_archive_and_renews_it() {
        let (_dir, a) = archive();
        let Claim {
            claimed,
            lease: first,
            ..
        } = claim_at(&a, "aa", holder(1), 100).expect("claim");
        assert_eq!(claimed, Claimed::New);
        let Claim {
            claimed,
            lease: second,
            ..
        } = claim_at(&a, "aa", holder(2), 200).expect("renew");
        assert_eq!(claimed, Claimed::Renewed);
        assert_eq!(second.claimed_at_us, first.claimed_at_us);
        assert_eq!((second.renewed_at_us, second.holder.pid), (200, 2));
        assert_eq!(read(&a).expect("read").expect("present").0, second);
    }

    #[test]
    fn another_data_directory_is_refused_and_the_record_is_untouched() {
        let (_dir, a) = archive();
        claim_at(&a, "aa", holder(1), 100).expect("claim");
        let before = a.get(LEASE_KEY).expect("get");
        let err = claim_at(&a, "bb", holder(2), 200).expect_err("owned");
        let message = err.to_string();
        assert!(
            matches!(&err, LeaseError::OwnedByAnother { owner, mine } if owner.owner_id == "aa" && mine == "bb"),
            "{err:?}"
        );
        assert!(message.contains("PID 1 on db-1"), "{message}");
        assert!(message.contains("new one"), "{message}");
        assert!(!message.contains("failover"), "{message}");
        assert_eq!(a.get(LEASE_KEY).expect("get"), before);
        // After a promotion (epoch 2) the refused server may be the old writer: it is
        // told to come back as a follower.
        let LeaseError::OwnedByAnother { mut owner, mine } = err else {
            unreachable!("matched above")
        };
        owner.epoch = 2;
        let after = LeaseError::OwnedByAnother { owner, mine }.to_string();
        assert!(
            after.contains("lease epoch 2") && after.contains("--mode follower"),
            "{after}"
        );
    }

    #[test]
    fn a_renewal_with_a_clock_that_stepped_back_still_changes_the_version() {
        let (_dir, a) = archive();
        let a: Arc<dyn Archive> = Arc::new(a);
        let claim = claim_with_ttl(
            a.as_ref(),
            "aa",
            holder(1),
            500 * SECOND,
            STALE,
            Some(STALE),
        )
        .expect("claim");
        let first = claim.version.clone();
        let hold = Arc::new(LeaseHold::new(Instant::now(), STALE));
        let mut renewal = Renewal::new(a.clone(), claim, hold);
        // The same instant, then an earlier one: a watcher must still see each renewal.
        assert!(matches!(renewal.renew(500 * SECOND), Renewed::Yes));
        let (_, second) = read(a.as_ref()).expect("read").expect("present");
        assert!(matches!(renewal.renew(100 * SECOND), Renewed::Yes));
        let (record, third) = read(a.as_ref()).expect("read").expect("present");
        assert!(
            first != second && second != third,
            "{first:?} {second:?} {third:?}"
        );
        assert_eq!(record.renewed_at_us, 500 * SECOND + 2);
    }

    /// `promote` by data directory `owner` with holder PID `pid` at `at_s` seconds,
    /// which is its only claim time.
    fn promote_at(
        a: &LocalDirArchive,
        owner: &str,
        pid: u32,
        at_s: u64,
        expect: &Expect,
    ) -> Result<Claim, PromoteError> {
        let ttl = Duration::from_secs(10);
        promote(
            a,
            owner,
            holder(pid),
            at_s * SECOND,
            ttl,
            expect,
            &[at_s * SECOND],
        )
    }

    #[test]
    fn a_promotion_displaces_only_what_it_expected() {
        let ttl = Duration::from_secs(10);
        let (_dir, a) = archive();
        // Expected no record, but a writer claimed one meanwhile.
        let claimed = claim_with_ttl(&a, "aa", holder(1), SECOND, STALE, Some(ttl)).expect("claim");
        let err = promote_at(&a, "bb", 2, 2, &Expect::Absent).expect_err("a record appeared");
        assert!(matches!(err, PromoteError::Changed { .. }), "{err:?}");
        // Watched one version, and the writer renewed it.
        let watched = Expect::Version(claimed.version.clone());
        claim_with_ttl(&a, "aa", holder(1), 3 * SECOND, STALE, Some(ttl)).expect("renew");
        let err = promote_at(&a, "bb", 2, 4, &watched).expect_err("renewed since");
        assert!(matches!(err, PromoteError::Changed { .. }), "{err:?}");
        // The version watched is still there: taken, with the next epoch.
        let (_, now) = read(&a).expect("read").expect("present");
        let taken = promote_at(&a, "bb", 2, 5, &Expect::Version(now)).expect("promote");
        assert_eq!(
            (taken.lease.owner_id.as_str(), taken.lease.epoch),
            ("bb", 2)
        );
        // Forced: whatever is there.
        let again = promote_at(&a, "cc", 3, 6, &Expect::Any).expect("forced");
        assert_eq!(again.lease.epoch, 3);
    }

    /// A promotion whose write landed but whose answer was lost finds its own claim on
    /// its retry and gets it back unchanged; a record naming the same data directory
    /// and holder with a claim time this process never used (a clone: same id, host
    /// name and path) is displaced only as `expect` allows, like any other.
    #[test]
    fn a_promotion_takes_back_only_its_own_lost_claim() {
        let ttl = Duration::from_secs(10);
        let (_dir, a) = archive();
        claim_with_ttl(&a, "aa", holder(1), SECOND, STALE, Some(ttl)).expect("claim");
        let (_, writers) = read(&a).expect("read").expect("present");
        let watched = Expect::Version(writers);
        let first = promote_at(&a, "bb", 2, 2, &watched).expect("promote");
        assert_eq!(
            (first.claimed.clone(), first.lease.epoch),
            (Claimed::New, 2)
        );
        // The retry of the same process (its answer lost): its own claim, unchanged.
        let own = [2 * SECOND, 3 * SECOND];
        let retry =
            promote(&a, "bb", holder(2), 3 * SECOND, ttl, &watched, &own).expect("its own claim");
        assert_eq!(retry.claimed, Claimed::Renewed);
        assert_eq!(retry.version, first.version);
        assert_eq!(retry.lease, first.lease);
        // A clone that watched the same writer's record: the record changed since.
        let err = promote_at(&a, "bb", 2, 4, &watched).expect_err("a clone's promotion");
        assert!(matches!(err, PromoteError::Changed { .. }), "{err:?}");
        // One that waited out the record now there: a new claim, with the next epoch.
        let (_, now) = read(&a).expect("read").expect("present");
        let taken = promote_at(&a, "bb", 2, 5, &Expect::Version(now)).expect("after its lapse");
        assert_eq!((taken.claimed, taken.lease.epoch), (Claimed::New, 3));
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
            r#"{"format_version":1,"owner_id":"5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0","epoch":1,"holder":{"host":"db-1","pid":4242,"program":"oc-server 0.1.0","data_dir":"/var/lib/oc/data"},"claimed_at_us":1764000000000000,"renewed_at_us":1764000100000000,"lease_ttl_ms":null}"#
        );
        assert_eq!(Lease::decode(text.as_bytes()).expect("decode"), lease);
    }

    #[test]
    fn unknown_versions_fields_and_garbage_are_unreadable() {
        for bad in [
            &b"not json"[..],
            br#"{"owner_id":"aa"}"#,
            br#"{"format_version":2,"owner_id":"aa"}"#,
            br#"{"format_version":1,"owner_id":"aa","epoch":1,"holder":{"host":"h","pid":1,"program":"p","data_dir":"/d"},"claimed_at_us":1,"renewed_at_us":1,"lease_ttl_ms":null,"extra":1}"#,
            br#"{"format_version":1,"owner_id":"","epoch":1,"holder":{"host":"h","pid":1,"program":"p","data_dir":"/d"},"claimed_at_us":1,"renewed_at_us":1,"lease_ttl_ms":null}"#,
            // A holder without its data directory path.
            br#"{"format_version":1,"owner_id":"aa","epoch":1,"holder":{"host":"h","pid":1,"program":"p"},"claimed_at_us":1,"renewed_at_us":1,"lease_ttl_ms":null}"#,
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
            r#""holder":{"host":"db-1","pid":1,"program":"oc-server 0.1.0","data_dir":"/var/lib/oc/data"},"#,
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

    /// A copy of the data directory (same id) on another host, or at another path on
    /// this host, is refused while the record is fresh, and the record is untouched.
    #[test]
    fn a_copy_is_refused_while_another_holder_renewed_recently() {
        let (_dir, a) = archive();
        let now = 1_000 * SECOND;
        claim_at(&a, "aa", holder(1), now).expect("claim");
        let before = a.get(LEASE_KEY).expect("get");
        let elsewhere = Holder {
            host: "db-2".into(),
            ..holder(2)
        };
        let other_path = Holder {
            data_dir: "/var/lib/oc/data-copy".into(),
            ..holder(2)
        };
        for copy in [elsewhere, other_path] {
            let err = claim_at(&a, "aa", copy.clone(), now + 29 * SECOND).expect_err("fresh");
            assert!(
                matches!(&err, LeaseError::HeldByAnotherCopy { owner, mine, age, .. }
                    if owner.holder == holder(1) && **mine == copy && age.as_secs() == 29),
                "{err:?}"
            );
            let message = err.to_string();
            for needed in [
                "another copy of this data directory seems to be running",
                "renewed 29.0s ago by oc-server 0.1.0 PID 1 on db-1 (data directory /var/lib/oc/data)",
                "Stop the other copy",
                "once its record is 30s old",
                "give it a new id",
            ] {
                assert!(message.contains(needed), "{needed:?} in {message}");
            }
            assert_eq!(a.get(LEASE_KEY).expect("get"), before);
        }
        // A clock behind the record's (skew) reads as fresh, never as stale.
        let err = claim_at(
            &a,
            "aa",
            Holder {
                host: "db-2".into(),
                ..holder(2)
            },
            now - SECOND,
        );
        assert!(
            matches!(err, Err(LeaseError::HeldByAnotherCopy { .. })),
            "{err:?}"
        );
    }

    /// A restart on the same host and path (after kill -9: the data directory's lock
    /// proves the previous process is gone) takes over at once.
    #[test]
    fn the_same_host_and_path_take_over_at_once() {
        let (_dir, a) = archive();
        let first = claim_at(&a, "aa", holder(1), 100 * SECOND).expect("claim");
        let again = claim_at(&a, "aa", holder(2), 100 * SECOND + 1).expect("restart");
        assert_eq!(again.claimed, Claimed::Renewed);
        assert_eq!(again.lease.holder.pid, 2);
        assert_eq!(again.lease.claimed_at_us, first.lease.claimed_at_us);
        assert_ne!(again.version, first.version);
    }

    /// A holder that stopped renewing for the stale window is taken over by a copy.
    #[test]
    fn a_stale_holder_is_taken_over() {
        let (_dir, a) = archive();
        let now = 1_000 * SECOND;
        claim_at(&a, "aa", holder(1), now).expect("claim");
        let copy = Holder {
            host: "db-2".into(),
            ..holder(7)
        };
        let taken = claim_at(&a, "aa", copy.clone(), now + 30 * SECOND).expect("stale");
        assert_eq!(
            taken.claimed,
            Claimed::TakenOver {
                from: Box::new(holder(1)),
                idle: STALE
            }
        );
        assert_eq!(read(&a).expect("read").expect("present").0.holder, copy);
    }

    /// Renewals move `renewed_at_us` and the version; once another holder wrote the
    /// record, a renewal with the version this process last wrote fails: displaced,
    /// the record left as the other wrote it, and the fenced archive refuses writes.
    #[test]
    fn a_renewal_after_another_holder_wrote_is_displaced_and_fences_the_archive() {
        let (_dir, a) = archive();
        let a: Arc<dyn Archive> = Arc::new(a);
        let now = 1_000 * SECOND;
        let first = claim_at(a.as_ref(), "aa", holder(1), now).expect("claim");
        let hold = Arc::new(LeaseHold::new(Instant::now(), STALE));
        let fenced = FencedArchive::new(a.clone(), hold.clone());
        let mut renewal = Renewal::new(a.clone(), first, hold.clone());
        assert!(matches!(renewal.renew(now + 10 * SECOND), Renewed::Yes));
        assert_eq!(renewal.lease().renewed_at_us, now + 10 * SECOND);
        let stored = read(a.as_ref()).expect("read").expect("present").0;
        assert_eq!(&stored, renewal.lease());
        fenced
            .put("shard-0/x", b"ok", &Condition::Always)
            .expect("a confirmed hold writes");

        // Paused past the stale window, then a copy elsewhere took over.
        let copy = Holder {
            host: "db-2".into(),
            ..holder(9)
        };
        claim_at(a.as_ref(), "aa", copy.clone(), now + 45 * SECOND).expect("take over");
        let after_takeover = a.get(LEASE_KEY).expect("get");
        match renewal.renew(now + 46 * SECOND) {
            Renewed::Displaced(Ok(Some(found))) => assert_eq!(found.holder, copy),
            outcome => panic!("not displaced: {outcome:?}"),
        }
        assert_eq!(a.get(LEASE_KEY).expect("get"), after_takeover);
        assert!(hold.is_displaced());
        let refused = fenced.put("shard-0/y", b"late", &Condition::Always);
        assert!(
            matches!(&refused, Err(ArchiveError::PreconditionFailed { why, .. }) if why.contains("took the archive's owner record")),
            "{refused:?}"
        );
        assert!(fenced.delete("shard-0/x").is_err());
        assert!(a.get("shard-0/y").expect("get").is_none());
        assert!(a.get("shard-0/x").expect("get").is_some());
        // It stays displaced.
        assert!(matches!(
            renewal.renew(now + 47 * SECOND),
            Renewed::Displaced(_)
        ));
    }

    /// An archive error during a renewal is not a displacement: the next one succeeds.
    #[test]
    fn a_failed_renewal_is_retried_not_displacement() {
        struct Flaky {
            inner: LocalDirArchive,
            down: AtomicBool,
        }
        impl Archive for Flaky {
            fn put_sealed(
                &self,
                key: &str,
                object: &crate::archive::envelope::Sealed,
                condition: &Condition,
            ) -> Result<Version, ArchiveError> {
                if self.down.load(Ordering::SeqCst) {
                    return Err(ArchiveError::Io {
                        key: key.into(),
                        source: Arc::new(std::io::Error::other("connection refused")),
                    });
                }
                self.inner.put_sealed(key, object, condition)
            }
            fn get(&self, key: &str) -> Result<Option<(Vec<u8>, Version)>, ArchiveError> {
                self.inner.get(key)
            }
            fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError> {
                self.inner.list(prefix)
            }
            fn delete(&self, key: &str) -> Result<(), ArchiveError> {
                self.inner.delete(key)
            }
        }
        let (_dir, inner) = archive();
        let a = Arc::new(Flaky {
            inner,
            down: AtomicBool::new(false),
        });
        let first = claim_at(a.as_ref(), "aa", holder(1), SECOND).expect("claim");
        let hold = Arc::new(LeaseHold::new(Instant::now(), STALE));
        let mut renewal = Renewal::new(a.clone(), first, hold.clone());
        a.down.store(true, Ordering::SeqCst);
        assert!(matches!(
            renewal.renew(2 * SECOND),
            Renewed::Failed(ArchiveError::Io { .. })
        ));
        assert!(!hold.is_displaced());
        a.down.store(false, Ordering::SeqCst);
        assert!(matches!(renewal.renew(3 * SECOND), Renewed::Yes));
        assert_eq!(
            read(a.as_ref())
                .expect("read")
                .expect("present")
                .0
                .renewed_at_us,
            3 * SECOND
        );
    }

    /// A hold not confirmed within its fence window refuses writes until a renewal.
    #[test]
    fn a_hold_not_renewed_within_the_fence_refuses_writes() {
        let hold = LeaseHold::new(Instant::now(), Duration::ZERO);
        let why = hold.check().expect_err("lapsed");
        assert!(why.contains("renewals are failing"), "{why}");
        assert!(!hold.is_displaced());
        assert!(LeaseHold::new(Instant::now(), STALE).check().is_ok());
    }
}
