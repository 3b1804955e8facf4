//! The audit log: every operator action (tenants, tables, keys, watch tokens, restores)
//! with who did it, what, when, the request id and the result (FORMAT.md §10).
//!
//! An action writes a `begin` entry durably *before* it runs, and is refused when that
//! fails, so nothing changes without a trace; the `end` entry with the result follows.
//! A `begin` without an `end` is an action whose outcome the log does not know (the
//! request ran past its deadline, or the process stopped in between).
//!
//! Files are `<data-dir>/audit/<first seq>-<first time µs>.log` (16 hex digits each),
//! lines `<CRC-32C of the JSON, 8 hex> <JSON array of entries>\n`, readable with `grep`
//! and checked on every read. A line is one group commit (one write, one fdatasync):
//! a power cut during the write can only damage the last line, which was never
//! acknowledged, so a bad line followed by good ones is real damage. The newest file is appended to; at 8 MiB a new one starts. The shipper
//! copies the files to the archive (`audit/<file name>`), restore brings them back.
//!
//! Blocking: the log is written and read on a thread of its own ([`start`]); shards
//! talk to it through an [`Auditor`], which never blocks them.
//!
//! One file, about 810 lines of code: the file format, the writer and the query share
//! the line format and its limits (FORMAT.md §10).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::timestamp::format_rfc3339;

/// The audit log's directory inside a data directory.
pub const AUDIT_DIR: &str = "audit";
/// A file this long is sealed and a new one started.
const ROTATE_BYTES: u64 = 8 << 20;
/// Jobs waiting for the audit thread; more are refused (`Busy`), never queued without
/// bound.
const QUEUE: usize = 1024;
/// How often the audit thread deletes files past the retention period.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Most entries one query returns.
pub const MAX_QUERY_LIMIT: usize = 1000;
/// Longest text field of an entry: longer names are cut (the request was refused
/// anyway, by its own validation), so no request can write a large entry.
pub const MAX_FIELD_BYTES: usize = 256;
/// Reads running at once (each on a thread of its own); more are refused (`Busy`).
const MAX_READS: usize = 2;

/// True once the log refused a write: operator actions are refused until a restart
/// (`oc_audit_log_failed`).
pub static FAILED: AtomicBool = AtomicBool::new(false);

/// The newest file's name and how much of it is durable: the shipper copies no more
/// (a line whose sync failed is cut and must not reach the archive).
static SYNCED: Mutex<Option<(String, u64)>> = Mutex::new(None);

/// How many bytes of audit file `name` the shipper may copy: all of a file no longer
/// written, the durable part of the newest.
pub fn shippable_len(name: &str, complete: u64) -> u64 {
    match &*SYNCED.lock().unwrap_or_else(|e| e.into_inner()) {
        Some((active, synced)) if active == name => complete.min(*synced),
        _ => complete,
    }
}

/// `text` cut to at most [`MAX_FIELD_BYTES`] on a character boundary, marked `…`.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_FIELD_BYTES {
        return text.to_string();
    }
    let mut end = MAX_FIELD_BYTES - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Record {
    Begin {
        seq: u64,
        time_us: u64,
        #[serde(flatten)]
        action: Action,
    },
    End {
        seq: u64,
        time_us: u64,
        /// The `seq` of the action's `begin`.
        of: u64,
        status: u16,
        /// The error's `code` when the action was refused or failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(flatten)]
        effect: Effect,
    },
}

/// What a successful action left behind, when its answer says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    /// The log position of the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
    /// The object made, when the server named it (a new key's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

impl Record {
    fn seq(&self) -> u64 {
        match self {
            Record::Begin { seq, .. } | Record::End { seq, .. } => *seq,
        }
    }
}

/// What was done, by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    pub request_id: String,
    /// `admin`, `key:<key id>`, `anonymous` (authentication off) or a tool's name.
    pub actor: String,
    /// `tenant.create`, `table.drop`, `restore`, … (docs/API.md lists them).
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The table, key id or other object acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A line to append; the log assigns its sequence number and time.
#[derive(Debug, Clone)]
pub enum Pending {
    Begin(Action),
    End {
        of: u64,
        status: u16,
        code: Option<String>,
        effect: Effect,
    },
}

/// Why the audit log cannot do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {file}: {why}")]
    Io { file: String, why: String },
    #[error(
        "audit log file {file} is damaged at byte {offset} ({why}) and valid entries follow; \
         move the file out of the audit directory to start (its valid lines stay readable \
         with grep), then report it"
    )]
    Damaged {
        file: String,
        offset: u64,
        why: String,
    },
    #[error("the audit log could not write earlier ({0}) and writes nothing more until the server restarts")]
    Failed(String),
    #[error("the audit log has {QUEUE} requests waiting; retry shortly")]
    Busy,
    #[error("the audit log has stopped")]
    Stopped,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> AuditError + '_ {
    move |e| AuditError::Io {
        file: path.display().to_string(),
        why: e.to_string(),
    }
}

/// A file of the log, as its name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AuditFile {
    pub first_seq: u64,
    pub first_time_us: u64,
}

impl AuditFile {
    pub fn name(&self) -> String {
        format!("{:016x}-{:016x}.log", self.first_seq, self.first_time_us)
    }

    pub fn parse(name: &str) -> Option<AuditFile> {
        let (seq, time) = name.strip_suffix(".log")?.split_once('-')?;
        let hex = |s: &str| {
            (s.len() == 16)
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        Some(AuditFile {
            first_seq: hex(seq)?,
            first_time_us: hex(time)?,
        })
    }
}

/// The log's files in `dir`, oldest first.
pub fn list_files(dir: &Path) -> Result<Vec<AuditFile>, AuditError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut files: Vec<AuditFile> = entries
        .flatten()
        .filter_map(|e| AuditFile::parse(e.file_name().to_str()?))
        .collect();
    files.sort();
    Ok(files)
}

/// How a file's bytes end.
#[derive(Debug, PartialEq)]
pub enum ScanEnd {
    Clean,
    /// An incomplete or invalid last part from `offset` on, nothing valid after it: a
    /// write the process did not finish.
    Torn {
        offset: u64,
    },
    /// An invalid line at `offset` with valid lines after it.
    Damaged {
        offset: u64,
        why: String,
    },
}

/// The entries of a file's valid lines (those after a damaged line too), and how it
/// ends.
pub fn scan(bytes: &[u8]) -> (Vec<Record>, ScanEnd) {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut first_bad: Option<(usize, String)> = None;
    let mut damaged = false;
    while offset < bytes.len() {
        let Some(len) = bytes[offset..].iter().position(|&b| b == b'\n') else {
            first_bad.get_or_insert((offset, "no line end".into()));
            break;
        };
        match parse_line(&bytes[offset..offset + len]) {
            Ok(group) => {
                // A valid line after a bad one: the bad one is damage, not a torn end.
                damaged |= first_bad.is_some();
                records.extend(group);
            }
            Err(why) => {
                first_bad.get_or_insert((offset, why));
            }
        }
        offset += len + 1;
    }
    let end = match first_bad {
        Some((at, why)) if damaged => ScanEnd::Damaged {
            offset: at as u64,
            why,
        },
        Some((at, _)) => ScanEnd::Torn { offset: at as u64 },
        None => ScanEnd::Clean,
    };
    (records, end)
}

fn parse_line(line: &[u8]) -> Result<Vec<Record>, String> {
    let (crc, json) = line
        .split_first_chunk::<9>()
        .filter(|(head, _)| head[8] == b' ')
        .ok_or("too short for a checksum and an entry")?;
    let crc = std::str::from_utf8(&crc[..8])
        .ok()
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or("the checksum is not 8 hex digits")?;
    if crc32c::crc32c(json) != crc {
        return Err("checksum mismatch".into());
    }
    serde_json::from_slice(json).map_err(|e| format!("not a list of audit entries: {e}"))
}

fn format_line(group: &[Record], out: &mut Vec<u8>) {
    // serde_json escapes every control character in strings: the JSON has no newline.
    let json = serde_json::to_vec(group).unwrap_or_default();
    let _ = write!(out, "{:08x} ", crc32c::crc32c(&json));
    out.extend_from_slice(&json);
    out.push(b'\n');
}

/// Test builds: `audit.sync.err=<path>` fails every sync while that file exists.
fn sync_failpoint() -> std::io::Result<()> {
    match oc_io::failpoint::armed("audit.sync.err") {
        Some(trigger) if Path::new(trigger).exists() => {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        }
        _ => Ok(()),
    }
}

fn now_us() -> u64 {
    oc_io::TimestampMicros::now().0
}

/// The writer of one data directory's audit log.
pub struct AuditLog {
    dir: PathBuf,
    active: AuditFile,
    file: File,
    len: u64,
    next_seq: u64,
    /// Set when a write or sync failed: what is on disk is then unknown until restart.
    failed: Option<String>,
}

impl AuditLog {
    /// Opens (or starts) the log in `data_dir`, cutting a torn last line and refusing a
    /// damaged newest file.
    pub fn open(data_dir: &Path) -> Result<AuditLog, AuditError> {
        let dir = data_dir.join(AUDIT_DIR);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let Some(&active) = list_files(&dir)?.last() else {
            return AuditLog::start_file(dir, 1);
        };
        let path = dir.join(active.name());
        let bytes = fs::read(&path).map_err(io_error(&path))?;
        let (records, end) = scan(&bytes);
        let mut len = bytes.len() as u64;
        match end {
            ScanEnd::Clean => {}
            ScanEnd::Torn { offset } => {
                tracing::warn!(file = %path.display(), offset, "cutting an unfinished audit entry");
                len = offset;
            }
            ScanEnd::Damaged { offset, why } => {
                return Err(AuditError::Damaged {
                    file: path.display().to_string(),
                    offset,
                    why,
                })
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        if len < bytes.len() as u64 {
            file.set_len(len).map_err(io_error(&path))?;
            file.sync_data().map_err(io_error(&path))?;
        }
        let next_seq = records
            .last()
            .map_or(active.first_seq, |r| r.seq() + 1)
            .max(active.first_seq);
        let log = AuditLog {
            dir,
            active,
            file,
            len,
            next_seq,
            failed: None,
        };
        log.publish_synced();
        Ok(log)
    }

    fn start_file(dir: PathBuf, first_seq: u64) -> Result<AuditLog, AuditError> {
        let active = AuditFile {
            first_seq,
            first_time_us: now_us(),
        };
        let path = dir.join(active.name());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&dir))?;
        let log = AuditLog {
            dir,
            active,
            file,
            len: 0,
            next_seq: first_seq,
            failed: None,
        };
        log.publish_synced();
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn publish_synced(&self) {
        *SYNCED.lock().unwrap_or_else(|e| e.into_inner()) = Some((self.active.name(), self.len));
    }

    /// Appends `pending` durably (one write, one fdatasync); returns their sequence
    /// numbers. After a failed write or sync nothing more is written: the file's state
    /// is unknown (a failed fsync may have dropped pages), and a restart re-reads it.
    pub fn append(&mut self, pending: Vec<Pending>) -> Result<Vec<u64>, AuditError> {
        if let Some(why) = &self.failed {
            return Err(AuditError::Failed(why.clone()));
        }
        if self.len >= ROTATE_BYTES {
            match AuditLog::start_file(self.dir.clone(), self.next_seq) {
                Ok(next) => *self = next,
                Err(e) => {
                    // A new file may exist half-made: nothing more is written until a
                    // restart reopens the newest file.
                    self.failed = Some(e.to_string());
                    FAILED.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        let time_us = now_us();
        let mut group = Vec::with_capacity(pending.len());
        let mut seqs = Vec::with_capacity(pending.len());
        for p in pending {
            let seq = self.next_seq;
            self.next_seq += 1;
            let record = match p {
                Pending::Begin(action) => Record::Begin {
                    seq,
                    time_us,
                    action,
                },
                Pending::End {
                    of,
                    status,
                    code,
                    effect,
                } => Record::End {
                    seq,
                    time_us,
                    of,
                    status,
                    code,
                    effect,
                },
            };
            group.push(record);
            seqs.push(seq);
        }
        if group.is_empty() {
            return Ok(seqs);
        }
        let mut bytes = Vec::new();
        format_line(&group, &mut bytes);
        let path = self.dir.join(self.active.name());
        let written = {
            use std::os::unix::fs::FileExt;
            self.file
                .write_all_at(&bytes, self.len)
                .and_then(|()| sync_failpoint())
                .and_then(|()| self.file.sync_data())
        };
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                self.publish_synced();
                Ok(seqs)
            }
            Err(e) => {
                let why = io_error(&path)(e).to_string();
                self.failed = Some(why.clone());
                FAILED.store(true, Ordering::Relaxed);
                // Best effort: what did not become durable should not reappear after a
                // restart as an action that never ran.
                let _ = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.sync_data());
                Err(AuditError::Io {
                    file: path.display().to_string(),
                    why,
                })
            }
        }
    }

    /// Deletes sealed files whose every entry is older than `cutoff_us`; returns how many.
    pub fn retain(&mut self, cutoff_us: u64) -> Result<usize, AuditError> {
        let files = list_files(&self.dir)?;
        let mut deleted = 0;
        for pair in files.windows(2) {
            // Every entry of a file is older than the next file's first.
            if pair[1].first_time_us < cutoff_us && pair[0] != self.active {
                let path = self.dir.join(pair[0].name());
                fs::remove_file(&path).map_err(io_error(&path))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

/// What to read back. Without `since` and `after`, the newest `limit` entries.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Entries begun at or after this time (µs since the epoch).
    pub since_us: Option<u64>,
    /// Entries with a larger sequence number (for paging: the last answer's `next_after`).
    pub after_seq: Option<u64>,
    pub tenant: Option<String>,
    pub action: Option<String>,
    pub limit: usize,
}

/// One action as read back: its `begin` joined with its `end`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub action: Action,
    /// `null` when the log holds no outcome (see the module's comment).
    pub result: Option<Outcome>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub status: u16,
    pub code: Option<String>,
    pub finished: String,
    #[serde(flatten)]
    pub effect: Effect,
}

#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub entries: Vec<Entry>,
    /// Pass as `after` to read on from here.
    pub next_after: Option<u64>,
    /// Damaged lines met while reading (skipped).
    pub problems: Vec<String>,
}

/// Reads the entries of the log in `dir` that `query` asks for. Without `since` and
/// `after` it reads files newest first and stops once it holds `limit` entries;
/// otherwise oldest first, stopping one file after it has them (a slow action's `end`
/// may be in the next file).
pub fn read(dir: &Path, query: &Query) -> Result<Answer, AuditError> {
    let files = list_files(dir)?;
    let tail_mode = query.since_us.is_none() && query.after_seq.is_none();
    let mut order: Vec<usize> = (0..files.len())
        .filter(|&i| {
            // Skip files that hold nothing asked for.
            let Some(next) = files.get(i + 1) else {
                return true;
            };
            let before_after = query
                .after_seq
                .is_some_and(|a| next.first_seq <= a.saturating_add(1));
            let before_since = query.since_us.is_some_and(|s| next.first_time_us < s);
            !(before_after || before_since)
        })
        .collect();
    if tail_mode {
        order.reverse();
    }
    let mut found: BTreeMap<u64, Entry> = BTreeMap::new();
    // Outcomes by the `seq` of their `begin`: newest-first reading meets them first.
    let mut outcomes: BTreeMap<u64, Outcome> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut files_after_limit = 0;
    for i in order {
        if found.len() >= query.limit {
            if tail_mode || files_after_limit == 1 {
                break;
            }
            files_after_limit += 1;
        }
        let file = files[i];
        let path = dir.join(file.name());
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            // Removed by retention since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path)(e)),
        };
        let (records, end) = scan(&bytes);
        match end {
            ScanEnd::Clean => {}
            // The newest file may be mid-append; an older one is damaged.
            ScanEnd::Torn { offset } if i + 1 < files.len() => {
                problems.push(format!("{}: unreadable from byte {offset}", file.name()))
            }
            ScanEnd::Torn { .. } => {}
            ScanEnd::Damaged { offset, why } => problems.push(format!(
                "{}: damaged from byte {offset} ({why}); the damaged lines are skipped",
                file.name()
            )),
        }
        let mut begun = Vec::new();
        for record in records {
            match record {
                Record::Begin {
                    seq,
                    time_us,
                    action,
                } => {
                    let wanted = query.after_seq.is_none_or(|a| seq > a)
                        && query.since_us.is_none_or(|s| time_us >= s)
                        && query
                            .tenant
                            .as_ref()
                            .is_none_or(|t| action.tenant.as_ref() == Some(t))
                        && query.action.as_ref().is_none_or(|a| &action.action == a);
                    if wanted {
                        begun.push(Entry {
                            seq,
                            time: format_rfc3339(time_us),
                            action,
                            result: None,
                        });
                    }
                }
                Record::End {
                    time_us,
                    of,
                    status,
                    code,
                    effect,
                    ..
                } => {
                    outcomes.insert(
                        of,
                        Outcome {
                            status,
                            code,
                            finished: format_rfc3339(time_us),
                            effect,
                        },
                    );
                }
            }
        }
        for entry in begun {
            if tail_mode || found.len() < query.limit {
                found.insert(entry.seq, entry);
            }
        }
        // Newest first: keep the newest `limit` of what was read.
        while tail_mode && found.len() > query.limit {
            found.pop_first();
        }
    }
    let mut entries: Vec<Entry> = found.into_values().collect();
    for entry in &mut entries {
        entry.result = outcomes.remove(&entry.seq);
    }
    Ok(Answer {
        next_after: entries.last().map(|e| e.seq).or(query.after_seq),
        entries,
        problems,
    })
}

/// Lines to append, and where their sequence numbers go.
type Job = (
    Vec<Pending>,
    async_channel::Sender<Result<Vec<u64>, AuditError>>,
);

/// A handle on the audit thread; cheap to clone, usable from any shard.
#[derive(Clone)]
pub struct Auditor {
    jobs: SyncSender<Job>,
    dir: Arc<PathBuf>,
    reads: Arc<AtomicUsize>,
}

impl Auditor {
    async fn append(&self, pending: Vec<Pending>) -> Result<Vec<u64>, AuditError> {
        let (tx, rx) = async_channel::bounded(1);
        match self.jobs.try_send((pending, tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(AuditError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(AuditError::Stopped),
        }
        rx.recv().await.map_err(|_| AuditError::Stopped)?
    }

    /// Records that `action` starts; returns its sequence number for [`Auditor::end`].
    pub async fn begin(&self, action: Action) -> Result<u64, AuditError> {
        let seqs = self.append(vec![Pending::Begin(action)]).await?;
        seqs.first().copied().ok_or(AuditError::Stopped)
    }

    /// Records the outcome of the action begun as `of`.
    pub async fn end(
        &self,
        of: u64,
        status: u16,
        code: Option<String>,
        effect: Effect,
    ) -> Result<(), AuditError> {
        let end = Pending::End {
            of,
            status,
            code,
            effect,
        };
        self.append(vec![end]).await.map(drop)
    }

    /// Reads on a thread of its own (never the writer's: a long read must not hold
    /// up actions), at most [`MAX_READS`] at once.
    pub async fn read(&self, query: Query) -> Result<Answer, AuditError> {
        if self
            .reads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_READS).then_some(n + 1)
            })
            .is_err()
        {
            return Err(AuditError::Busy);
        }
        let (tx, rx) = async_channel::bounded(1);
        let (dir, reads) = (self.dir.clone(), self.reads.clone());
        let spawned = std::thread::Builder::new()
            .name("oc-audit-read".into())
            .spawn(move || {
                let answer = read(&dir, &query);
                reads.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send_blocking(answer);
            });
        if let Err(e) = spawned {
            self.reads.fetch_sub(1, Ordering::AcqRel);
            return Err(AuditError::Io {
                file: self.dir.display().to_string(),
                why: format!("no thread to read the audit log: {e}"),
            });
        }
        rx.recv().await.map_err(|_| AuditError::Stopped)?
    }
}

/// Opens the audit log of `data_dir` (its errors refuse start-up) and starts its thread,
/// which ends when the last [`Auditor`] is dropped. Entries older than `retention` are
/// deleted locally (whole files) every hour.
pub fn start(data_dir: &Path, retention: Duration) -> Result<Auditor, AuditError> {
    let mut log = AuditLog::open(data_dir)?;
    let dir = log.dir().to_path_buf();
    let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
    std::thread::Builder::new()
        .name("oc-audit".into())
        .spawn(move || {
            let mut last_retention: Option<Instant> = None;
            loop {
                if last_retention.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
                    last_retention = Some(Instant::now());
                    let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
                    match log.retain(cutoff) {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(files = n, "audit retention deleted old files"),
                        Err(e) => tracing::warn!(error = %e, "audit retention failed"),
                    }
                }
                let first = match queue.recv_timeout(RETENTION_EVERY) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                // Group commit: every append waiting now shares one write and one sync.
                let mut appends = vec![first];
                while let Ok(next) = queue.try_recv() {
                    appends.push(next);
                }
                let all: Vec<Pending> = appends.iter().flat_map(|(p, _)| p.clone()).collect();
                match log.append(all) {
                    Ok(seqs) => {
                        let mut seqs = seqs.into_iter();
                        for (pending, reply) in appends {
                            let mine: Vec<u64> = seqs.by_ref().take(pending.len()).collect();
                            let _ = reply.send_blocking(Ok(mine));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the audit log could not write; operator actions are refused until restart");
                        for (_, reply) in appends {
                            let _ = reply.send_blocking(Err(e.clone()));
                        }
                    }
                }
            }
        })
        .map_err(|e| AuditError::Io {
            file: AUDIT_DIR.into(),
            why: format!("no thread for the audit log: {e}"),
        })?;
    Ok(Auditor {
        jobs,
        dir: Arc::new(dir),
        reads: Arc::new(AtomicUsize::new(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(what: &str, tenant: &str) -> Action {
        Action {
            request_id: "r1".into(),
            actor: "admin".into(),
            action: what.into(),
            tenant: Some(tenant.into()),
            target: None,
        }
    }

    fn query(limit: usize) -> Query {
        Query {
            limit,
            ..Query::default()
        }
    }

    #[test]
    fn entries_survive_reopen_and_join_their_outcomes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        let begun = log
            .append(vec![Pending::Begin(action("tenant.create", "a"))])
            .expect("append");
        log.append(vec![
            Pending::End {
                of: begun[0],
                status: 201,
                code: None,
                effect: Effect {
                    lsn: Some(9),
                    created: None,
                },
            },
            Pending::Begin(action("table.drop", "b")),
        ])
        .expect("append");
        drop(log);
        let mut log = AuditLog::open(dir.path()).expect("reopen");
        assert_eq!(log.next_seq, 4);
        let answer = read(log.dir(), &query(10)).expect("read");
        assert_eq!(answer.entries.len(), 2);
        assert_eq!(answer.entries[0].action.action, "tenant.create");
        let outcome = answer.entries[0].result.as_ref().expect("joined");
        assert_eq!((outcome.status, outcome.effect.lsn), (201, Some(9)));
        assert!(
            answer.entries[1].result.is_none(),
            "no end: outcome unknown"
        );
        assert_eq!(answer.next_after, Some(3));
        // Filters and paging.
        let only_b = read(
            log.dir(),
            &Query {
                tenant: Some("b".into()),
                ..query(10)
            },
        )
        .expect("read");
        assert_eq!(only_b.entries.len(), 1);
        let after = read(
            log.dir(),
            &Query {
                after_seq: Some(1),
                ..query(10)
            },
        )
        .expect("read");
        assert_eq!(after.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(log.append(vec![]).expect("empty append"), Vec::<u64>::new());
    }

    #[test]
    fn a_torn_last_line_is_cut_and_damage_before_valid_lines_refuses_to_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        log.append(vec![Pending::Begin(action("tenant.create", "a"))])
            .expect("append");
        let path = log.dir().join(log.active.name());
        drop(log);
        let good = fs::read(&path).expect("read");
        let mut torn = good.clone();
        torn.extend_from_slice(b"0000 {\"phase\":");
        fs::write(&path, &torn).expect("write");
        let mut log = AuditLog::open(dir.path()).expect("torn tail is cut");
        assert_eq!(fs::read(&path).expect("read"), good);
        log.append(vec![Pending::Begin(action("tenant.drop", "a"))])
            .expect("append after cut");
        drop(log);
        // Flip a byte inside the first line's JSON: valid lines follow it.
        let mut damaged = fs::read(&path).expect("read");
        damaged[20] ^= 1;
        fs::write(&path, &damaged).expect("write");
        // Reads skip the damaged line and still show what follows it.
        let read_back = read(&dir.path().join(AUDIT_DIR), &query(10)).expect("read");
        assert_eq!(read_back.entries.len(), 1, "{read_back:?}");
        assert_eq!(read_back.entries[0].action.action, "tenant.drop");
        assert_eq!(read_back.problems.len(), 1, "{read_back:?}");
        let err = AuditLog::open(dir.path()).err().expect("damage refuses");
        assert!(
            matches!(err, AuditError::Damaged { offset: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("move the file"), "{err}");
    }

    #[test]
    fn rotation_tail_queries_and_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        for i in 0..5 {
            log.append(vec![Pending::Begin(action("key.create", &format!("t{i}")))])
                .expect("append");
            // Force a new file after each entry.
            log.len = ROTATE_BYTES;
        }
        assert_eq!(list_files(log.dir()).expect("list").len(), 5);
        let newest = read(log.dir(), &query(2)).expect("read");
        assert_eq!(
            newest.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        let paged = read(
            log.dir(),
            &Query {
                after_seq: Some(2),
                ..query(2)
            },
        )
        .expect("read");
        assert_eq!(
            paged.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4]
        );
        // Everything is older than "now + 1 s": all files but the newest go.
        assert_eq!(log.retain(now_us() + 1_000_000).expect("retain"), 4);
        let left = read(log.dir(), &query(10)).expect("read");
        assert_eq!(left.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn an_outcome_in_a_later_file_joins_its_action_read_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = AuditLog::open(dir.path()).expect("open");
        let begun = log
            .append(vec![
                Pending::Begin(action("tenant.drop", "a")),
                Pending::Begin(action("tenant.drop", "b")),
            ])
            .expect("one line, two entries");
        assert_eq!(begun, [1, 2]);
        log.len = ROTATE_BYTES;
        log.append(vec![Pending::End {
            of: 2,
            status: 200,
            code: None,
            effect: Effect::default(),
        }])
        .expect("append");
        assert_eq!(list_files(log.dir()).expect("list").len(), 2);
        let newest = read(log.dir(), &query(1)).expect("read");
        assert_eq!(newest.entries.len(), 1);
        assert_eq!(newest.entries[0].seq, 2);
        assert_eq!(
            newest.entries[0].result.as_ref().map(|r| r.status),
            Some(200)
        );
        let after_max = read(
            log.dir(),
            &Query {
                after_seq: Some(u64::MAX),
                ..query(10)
            },
        )
        .expect("read");
        assert!(after_max.entries.is_empty());
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(400);
        let cut = bounded(&long);
        assert!(
            cut.len() <= MAX_FIELD_BYTES && cut.ends_with('…'),
            "{}",
            cut.len()
        );
    }

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let f = AuditFile {
            first_seq: 7,
            first_time_us: 1_700_000_000_000_000,
        };
        assert_eq!(AuditFile::parse(&f.name()), Some(f));
        for bad in ["x.log", "0000000000000007.log", "7-8.log", "notes.txt"] {
            assert_eq!(AuditFile::parse(bad), None, "{bad}");
        }
    }
}
