//! Which shard owns a tenant, and the data directory's record of the shard count.
//!
//! Placement is a contract with the data on disk: a tenant's rows live in its owner's
//! log and checkpoints, so the hash and its seed never change (FORMAT.md §7). The
//! count is recorded in `oc-layout.json` when the directory is first used; starting
//! with another count is refused, since every tenant would look for its data on the
//! wrong shard. Re-sharding goes through a checkpoint and a restore.
//!
//! The layout also names the directory: a random [`DataDirId`] drawn when it is
//! created (a restore draws a new one), which the archive's owner record holds so that
//! one archive has one writing data directory. A layout written before ids existed
//! gets one at its next start.
//!
//! About 390 lines of code; the rest are unit tests.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oc_io::{Epoch, History, Lsn};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{EngineError, FileProblem, UnreadableFile};
use crate::json_file::JsonFile;
use crate::tenant_id::TenantId;

/// FNV-1a 64-bit offset basis and prime: the fixed seed of tenant placement.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The layout file's name in the data directory.
pub const LAYOUT_FILE: &str = "oc-layout.json";
/// Present while a restore writes a data directory (FORMAT.md §7): made before its
/// first shard file, removed after its layout file. A directory holding it and no
/// layout file is a restore that did not finish, never a new directory.
pub const RESTORE_MARKER: &str = "oc-restore-incomplete";
/// The version of the layout file (FORMAT.md §7). Version 2 added `data_dir_id`;
/// version 1 files (same placement rule, no id) are read and upgraded at start.
pub const LAYOUT_FORMAT_VERSION: u64 = 2;
/// The version before data directory ids.
const LAYOUT_FORMAT_VERSION_NO_ID: u64 = 1;
/// The layout file's version when it records epochs.
const LAYOUT_FORMAT_VERSION_EPOCHS: u64 = 3;
/// Most shards a data directory can have.
pub const MAX_SHARDS: usize = 256;
/// The placement rule's name in `oc-layout.json` and the archive's `manifest.json`.
pub const PLACEMENT_RULE: &str = "fnv1a64-mod";

/// A data directory's identity: 128 random bits, written as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataDirId(pub u128);

impl DataDirId {
    /// A fresh random id (from the kernel's random source).
    pub fn random() -> std::io::Result<DataDirId> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let id = u128::from_le_bytes(bytes);
        if id == 0 {
            return Err(std::io::Error::other("the random source returned zeroes"));
        }
        Ok(DataDirId(id))
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(s: &str) -> Option<DataDirId> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| u128::from_str_radix(s, 16).ok())?
            .filter(|&id| id != 0)
            .map(DataDirId)
    }
}

impl fmt::Display for DataDirId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Written as its 32 hex digits, the form [`DataDirId::parse`] reads.
impl Serialize for DataDirId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DataDirId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<DataDirId, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = DataDirId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a data_dir_id: 32 lowercase hex digits, not all zero")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DataDirId, E> {
                DataDirId::parse(s)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(Hex)
    }
}

/// `oc-layout.json`, field for field (FORMAT.md §7). Fields are in the order the file
/// has always had them (alphabetical); do not reorder. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LayoutFile {
    /// Required from version 2 on; version 1 files have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data_dir_id: Option<DataDirId>,
    /// Version 3: the epochs after the first, oldest first (absent: epoch 1 only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    epochs: Vec<EpochStart>,
    /// The writer this directory follows (its `data_dir_id`), from its first start as a
    /// follower (or a restore made for one) until a promotion makes it a writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    follows: Option<DataDirId>,
    format_version: u64,
    /// The directory whose first start began this history (its `data_dir_id`): a
    /// follower refuses a writer of another one. Absent: unknown (files written before
    /// it was recorded, restores of archives that do not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lineage: Option<DataDirId>,
    placement: String,
    shards: u64,
}

impl JsonFile for LayoutFile {
    const VERSIONS: &'static [u64] = &[
        LAYOUT_FORMAT_VERSION_NO_ID,
        LAYOUT_FORMAT_VERSION,
        LAYOUT_FORMAT_VERSION_EPOCHS,
    ];
    const REQUIRED_FIELDS: &'static [&'static str] = &["format_version", "placement", "shards"];
}

impl LayoutFile {
    fn of(layout: &Layout) -> LayoutFile {
        LayoutFile {
            data_dir_id: Some(layout.id),
            epochs: layout.epochs.clone(),
            follows: layout.follows,
            lineage: layout.lineage,
            // A file with epochs is version 3, so a binary that would ignore them (and
            // write frames of an older epoch) refuses it instead.
            format_version: if layout.epochs.is_empty() {
                LAYOUT_FORMAT_VERSION
            } else {
                LAYOUT_FORMAT_VERSION_EPOCHS
            },
            placement: PLACEMENT_RULE.to_string(),
            shards: layout.shards as u64,
        }
    }

    /// The file's bytes: pretty JSON and a newline, for the humans who read it.
    #[expect(
        clippy::expect_used,
        reason = "a struct of strings and integers always serializes"
    )]
    fn text(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(self).expect("a struct of strings and integers");
        text.push('\n');
        text
    }
}

/// Where an epoch begins: on each shard (by index), the first LSN written in it. Frames
/// below it on that shard are the history the epoch continues from (FORMAT.md §7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub first_lsn: Vec<u64>,
    /// The archive lease epoch of the promotion that started this epoch, in the data
    /// directory that was promoted (absent for a restore's epoch, for epochs taken from
    /// a writer, and in files written before it was recorded): a writer start tells by
    /// it whether the promotion that took its lease got as far as starting its epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_epoch: Option<u64>,
}

/// What a data directory's layout file records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub shards: usize,
    pub id: DataDirId,
    /// The epochs after the first, oldest first: a restore starts a new one, so LSNs
    /// it writes again are told apart from the old history's.
    pub epochs: Vec<EpochStart>,
    /// The writer whose follower this directory is (its id), if it is one: a writer's
    /// start refuses it unless the promotion that made it the writer took the archive's
    /// lease, or it is started with `--promote-at-start`.
    pub follows: Option<DataDirId>,
    /// The directory whose first start began this history, when known: a writer's own
    /// id from its first start, kept by its followers, promotions and restores. Two
    /// directories of different lineages hold different databases, whatever their
    /// epochs and LSNs say.
    pub lineage: Option<DataDirId>,
}

/// Whose history a new layout continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lineage {
    /// Its own: a new database.
    Begins,
    /// That of the directory named (a follower's writer's, an archive's).
    Of(DataDirId),
    /// Not known (an archive that does not record it).
    Unknown,
}

/// The layout a running server goes by, shared by its threads: a promotion records a
/// new epoch while requests (`/watch` ids and resumes) read it.
#[derive(Debug, Clone)]
pub struct LiveLayout(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Layout>>>);

impl LiveLayout {
    pub fn new(layout: Layout) -> LiveLayout {
        LiveLayout(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(layout),
        )))
    }

    /// The layout as last recorded.
    pub fn current(&self) -> std::sync::Arc<Layout> {
        let held = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.clone()
    }

    /// Replaces it with one just recorded in the layout file.
    pub fn replace(&self, layout: Layout) {
        let mut held = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *held = std::sync::Arc::new(layout);
    }
}

impl Layout {
    /// The epoch new frames are stamped with.
    pub fn epoch(&self) -> u64 {
        self.epochs.last().map_or(1, |e| e.epoch)
    }

    /// Whether position (`epoch`, `lsn`) of `shard` is on this directory's history
    /// ([`History::contains`]).
    pub fn on_history(&self, shard: usize, epoch: u64, lsn: u64) -> bool {
        self.history(shard).contains(Epoch(epoch), Lsn(lsn))
    }

    /// The epochs `shard`'s log went through, as it checks frames against them. A
    /// shard an epoch does not name began it at LSN 0 (nothing below it is kept).
    pub fn history(&self, shard: usize) -> History {
        History::new(
            self.epochs
                .iter()
                .map(|e| {
                    (
                        Epoch(e.epoch),
                        Lsn(e.first_lsn.get(shard).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        )
    }
}

/// The shard that owns `tenant` among `shards`: FNV-1a 64 of the id's bytes, mod count.
pub fn owner_shard(tenant: &TenantId, shards: usize) -> usize {
    assert!(shards > 0, "a pool has at least one shard");
    let hash = tenant.as_str().bytes().fold(FNV_OFFSET_BASIS, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    (hash % shards as u64) as usize
}

/// The directory of shard `shard` under `data_dir`.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// The refusal for a layout file this build cannot use. A newer format's message says
/// what to run; a damaged file gets the next step here, since nothing else records the
/// directory's id and epochs.
fn unreadable_layout(path: &Path, problem: FileProblem) -> EngineError {
    let file = path.display().to_string();
    if matches!(problem, FileProblem::UnsupportedVersion { .. }) {
        return UnreadableFile { file, problem }.into();
    }
    EngineError::Layout(format!(
        "{file} is unreadable: {problem}; it records the directory's shard count, id and \
         epochs, which are not guessed: put back a copy of the file from a backup of the \
         directory, or restore the directory from the archive into an empty one \
         (RUNBOOK.md, \"The layout file is unreadable\")"
    ))
}

/// Checks that `data_dir` was laid out for `shards` shards, or records that it is when
/// the directory is new, and returns its layout (giving it an id if it has none yet).
/// Called once at start, before any shard opens.
pub fn ensure_layout(data_dir: &Path, shards: usize) -> Result<Layout, EngineError> {
    check_shard_count(shards)?;
    let io_error = |what: &str, e: std::io::Error| {
        EngineError::Layout(format!("{what} {}: {e}", data_dir.display()))
    };
    std::fs::create_dir_all(data_dir).map_err(|e| io_error("cannot create", e))?;
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let (recorded, named) =
                parse_layout(&bytes).map_err(|problem| unreadable_layout(&path, problem))?;
            if recorded != shards {
                return Err(EngineError::Layout(format!(
                    "the data directory {} was created with {recorded} shard(s) and this server \
                     was started with {shards}: start with --shards {recorded} (re-sharding goes \
                     through a checkpoint and a restore)",
                    data_dir.display()
                )));
            }
            let layout = match named {
                Some(layout) => layout,
                None => {
                    // Version 1, written before data directory ids: name it now.
                    let layout = new_layout(shards).map_err(|e| io_error("cannot name", e))?;
                    write_layout(data_dir, &layout)
                        .map_err(|e| io_error("cannot record the id of", e))?;
                    layout
                }
            };
            Ok(layout)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join(RESTORE_MARKER).exists() {
                return Err(EngineError::Layout(format!(
                    "{} holds a restore that did not finish ({RESTORE_MARKER} is there and \
                     {LAYOUT_FILE} is not): remove the directory and restore again into an \
                     empty one",
                    data_dir.display()
                )));
            }
            if let Some(refused) = archive_as_data_dir(data_dir) {
                return Err(refused);
            }
            if shard_dir(data_dir, 0).exists() {
                return Err(EngineError::Layout(format!(
                    "{} holds shard data but no {LAYOUT_FILE}: it was not written by this \
                     version of oc, the file was removed, or a restore into it did not \
                     finish; restore it again (into an empty directory)",
                    data_dir.display()
                )));
            }
            create_layout(data_dir, shards)
        }
        Err(e) => Err(io_error("cannot read the layout of", e)),
    }
}

/// The layout `data_dir` records, if it records one (naming a version 1 directory as
/// [`ensure_layout`] does).
pub fn existing_layout(data_dir: &Path) -> Result<Option<Layout>, EngineError> {
    let path = data_dir.join(LAYOUT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let (shards, _) = parse_layout(&bytes).map_err(|problem| UnreadableFile {
                file: path.display().to_string(),
                problem,
            })?;
            ensure_layout(data_dir, shards).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(EngineError::Layout(format!(
            "cannot read the layout of {}: {e}",
            data_dir.display()
        ))),
    }
}

/// Records a new layout, with a new id, in `data_dir` (which must not have one). A
/// restore calls this last, after every shard's files are in place, so a restore that
/// did not finish leaves a directory `oc-server` refuses to open.
pub fn create_layout(data_dir: &Path, shards: usize) -> Result<Layout, EngineError> {
    create_layout_with_epochs(data_dir, shards, Vec::new(), None, Lineage::Begins)
}

/// [`create_layout`] for a directory whose history already went through `epochs` (a
/// restore starts a new epoch), made to follow the writer `follows` when it is a
/// follower's.
pub fn create_layout_with_epochs(
    data_dir: &Path,
    shards: usize,
    epochs: Vec<EpochStart>,
    follows: Option<DataDirId>,
    lineage: Lineage,
) -> Result<Layout, EngineError> {
    check_shard_count(shards)?;
    let io_error = |what: &str, e: std::io::Error| {
        EngineError::Layout(format!("{what} {}: {e}", data_dir.display()))
    };
    if data_dir.join(LAYOUT_FILE).exists() {
        return Err(EngineError::Layout(format!(
            "{} already has a {LAYOUT_FILE}",
            data_dir.display()
        )));
    }
    let mut layout = new_layout(shards).map_err(|e| io_error("cannot name", e))?;
    layout.epochs = epochs;
    layout.follows = follows;
    layout.lineage = match lineage {
        Lineage::Begins => Some(layout.id),
        Lineage::Of(id) => Some(id),
        Lineage::Unknown => None,
    };
    write_layout(data_dir, &layout).map_err(|e| io_error("cannot record the layout in", e))?;
    Ok(layout)
}

/// Refuses a writer (`writer`, whose history began in data directory `writers`) that
/// holds another database than `layout`'s: both lineages known and different.
pub fn check_lineage(
    layout: &Layout,
    writer: DataDirId,
    writers: Option<DataDirId>,
) -> Result<(), EngineError> {
    match (layout.lineage, writers) {
        (Some(own), Some(writers)) if own != writers => Err(EngineError::Layout(format!(
            "the writer (data directory {writer}) holds another database: its history \
             began in data directory {writers}, this directory's in {own}{}. Check \
             --leader-addr (and --archive); to follow this writer, start on an empty \
             data directory",
            layout
                .follows
                .map(|f| format!(", and it follows data directory {f}"))
                .unwrap_or_default()
        ))),
        _ => Ok(()),
    }
}

/// An archive's root (`manifest.json`, FORMAT.md §9; `shard-<i>/` folders too) given
/// as a data directory: the likely mistake is the one flag for the other. Checked
/// before the directory is locked, so nothing is written into the archive.
pub fn archive_as_data_dir(data_dir: &Path) -> Option<EngineError> {
    let archive = data_dir.join("manifest.json").exists() && !data_dir.join(LAYOUT_FILE).exists();
    archive.then(|| {
        EngineError::Layout(format!(
            "{} is an archive (it holds manifest.json and no {LAYOUT_FILE}), not a data \
             directory: did you mean --archive file://{}? To serve its data, restore it into \
             an empty directory (oc-pitr restore)",
            data_dir.display(),
            data_dir.display()
        ))
    })
}

/// A follower takes on the epochs its writer (`writer`) went through: `epochs` must
/// continue the ones `layout` (this directory's, as read at start) records, each
/// recorded the same; the layout file is rewritten with them when they add any, or when
/// it did not name `writer` as the one it follows. Anything else means the two
/// histories diverged, and is refused.
pub fn follow_epochs(
    data_dir: &Path,
    layout: &Layout,
    (epochs, lineage): (Vec<EpochStart>, Option<DataDirId>),
    writer: DataDirId,
) -> Result<Layout, EngineError> {
    check_lineage(layout, writer, lineage)?;
    // The same history: epochs and where they start (a promotion's lease epoch is
    // recorded in its own directory only, never sent to followers).
    let same = |a: &EpochStart, b: &EpochStart| a.epoch == b.epoch && a.first_lsn == b.first_lsn;
    let continues = epochs.len() >= layout.epochs.len()
        && epochs.iter().zip(&layout.epochs).all(|(a, b)| same(a, b))
        && epochs.iter().all(|e| e.first_lsn.len() == layout.shards);
    if !continues {
        return Err(EngineError::Layout(format!(
            "the writer's epochs {:?} do not continue this data directory's {:?}: the two histories diverged; start this follower on an empty data directory",
            epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
            layout.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>()
        )));
    }
    let lineage = layout.lineage.or(lineage);
    if epochs.len() == layout.epochs.len()
        && layout.follows == Some(writer)
        && layout.lineage == lineage
    {
        return Ok(layout.clone());
    }
    let followed = Layout {
        epochs,
        follows: Some(writer),
        lineage,
        ..layout.clone()
    };
    write_layout(data_dir, &followed).map_err(|e| {
        EngineError::Layout(format!(
            "cannot record the writer's epochs in {}: {e}",
            data_dir.display()
        ))
    })?;
    Ok(followed)
}

/// A writer's directory from before lineages were recorded, that began its own history
/// (no epoch recorded, so no restore or promotion made it, and it follows no writer):
/// its lineage is its own id, recorded now so its followers and archive learn it.
/// Any other layout is returned as it is.
pub fn record_own_lineage(data_dir: &Path, layout: Layout) -> Result<Layout, EngineError> {
    if layout.lineage.is_some() || !layout.epochs.is_empty() || layout.follows.is_some() {
        return Ok(layout);
    }
    let recorded = Layout {
        lineage: Some(layout.id),
        ..layout
    };
    write_layout(data_dir, &recorded).map_err(|e| {
        EngineError::Layout(format!(
            "cannot record the lineage in {}: {e}",
            data_dir.display()
        ))
    })?;
    Ok(recorded)
}

/// Records that `data_dir` (laid out as `layout`) starts epoch `start` (a follower's
/// promotion), and returns the new layout, which follows no writer any more. The epoch
/// must be above every one recorded.
pub fn start_epoch(
    data_dir: &Path,
    layout: &Layout,
    start: EpochStart,
) -> Result<Layout, EngineError> {
    if start.epoch <= layout.epoch() || start.first_lsn.len() != layout.shards {
        return Err(EngineError::Layout(format!(
            "epoch {} (first LSNs {:?}) cannot follow epoch {} of a {}-shard directory",
            start.epoch,
            start.first_lsn,
            layout.epoch(),
            layout.shards
        )));
    }
    let mut started = layout.clone();
    started.epochs.push(start);
    started.follows = None;
    write_layout(data_dir, &started).map_err(|e| {
        EngineError::Layout(format!(
            "cannot record the new epoch in {}: {e}",
            data_dir.display()
        ))
    })?;
    Ok(started)
}

fn check_shard_count(shards: usize) -> Result<(), EngineError> {
    if shards == 0 || shards > MAX_SHARDS {
        return Err(EngineError::Layout(format!(
            "the shard count must be between 1 and {MAX_SHARDS}, not {shards}"
        )));
    }
    Ok(())
}

fn new_layout(shards: usize) -> std::io::Result<Layout> {
    Ok(Layout {
        shards,
        id: DataDirId::random()?,
        epochs: Vec::new(),
        follows: None,
        lineage: None,
    })
}

/// The shard count, and the layout (`None` for a version 1 file, which has no id).
type ParsedLayout = (usize, Option<Layout>);

fn parse_layout(bytes: &[u8]) -> Result<ParsedLayout, FileProblem> {
    let file = LayoutFile::decode(bytes)?;
    if file.placement != PLACEMENT_RULE {
        return Err(FileProblem::BadField {
            field: "placement",
            why: format!("{:?} is not supported", file.placement),
        });
    }
    let shards = match usize::try_from(file.shards) {
        Ok(n) if (1..=MAX_SHARDS).contains(&n) => n,
        _ => {
            return Err(FileProblem::BadField {
                field: "shards",
                why: format!("{} is out of range", file.shards),
            })
        }
    };
    if file.format_version == LAYOUT_FORMAT_VERSION_NO_ID {
        return Ok((shards, None));
    }
    let id = file
        .data_dir_id
        .ok_or(FileProblem::MissingField("data_dir_id"))?;
    // Epochs rise, each names every shard, and no shard's start goes back.
    let mut previous: Option<&EpochStart> = None;
    for e in &file.epochs {
        let bad = |why: String| FileProblem::BadField {
            field: "epochs",
            why,
        };
        if e.first_lsn.len() != shards {
            return Err(bad(format!(
                "epoch {} names {} shards, not {shards}",
                e.epoch,
                e.first_lsn.len()
            )));
        }
        let (last_epoch, last_starts) =
            previous.map_or((1, None), |p| (p.epoch, Some(&p.first_lsn)));
        if e.epoch <= last_epoch {
            return Err(bad(format!(
                "epoch {} does not follow epoch {last_epoch}",
                e.epoch
            )));
        }
        if last_starts.is_some_and(|starts| starts.iter().zip(&e.first_lsn).any(|(a, b)| b < a)) {
            return Err(bad(format!(
                "epoch {} starts before the epoch it follows",
                e.epoch
            )));
        }
        previous = Some(e);
    }
    if file.epochs.is_empty() != (file.format_version == LAYOUT_FORMAT_VERSION) {
        return Err(FileProblem::BadField {
            field: "format_version",
            why: "version 3 records epochs, version 2 none".into(),
        });
    }
    let layout = Layout {
        shards,
        id,
        epochs: file.epochs,
        follows: file.follows,
        lineage: file.lineage,
    };
    Ok((shards, Some(layout)))
}

/// Written to a temporary name, synced, renamed, and the directory synced, so a crash
/// leaves either the old layout (or none) or a whole new one.
fn write_layout(data_dir: &Path, layout: &Layout) -> std::io::Result<()> {
    write_file_durably(
        data_dir,
        LAYOUT_FILE,
        LayoutFile::of(layout).text().as_bytes(),
    )
}

/// Writes `dir/name` under a temporary name, syncs it, renames it into place and syncs
/// `dir`.
fn write_file_durably(dir: &Path, name: &str, text: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    if let Err(e) = write_synced_then_rename(&tmp, &dir.join(name), text) {
        // A disk that filled up mid-write should not also keep the partial file; a
        // crash here leaves it, and the next write replaces it.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

fn write_synced_then_rename(tmp: &Path, to: &Path, text: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(tmp)?;
    file.write_all(text)?;
    file.sync_all()?;
    std::fs::rename(tmp, to)
}

/// The file in each shard directory that says which shard of which data directory it
/// holds (FORMAT.md §7.2).
pub const SHARD_MARKER_FILE: &str = "oc-shard.json";
/// The version of [`SHARD_MARKER_FILE`].
const SHARD_MARKER_VERSION: u64 = 1;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct ShardMarker {
    format_version: u64,
    shard: usize,
    data_dir_id: String,
}

/// What a shard directory's marker says, `None` when it has none.
fn read_shard_marker(data_dir: &Path, shard: usize) -> Result<Option<ShardMarker>, EngineError> {
    let path = shard_dir(data_dir, shard).join(SHARD_MARKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        // No directory, or not a directory (which then fails to open as a shard).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(EngineError::Layout(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let unreadable = |problem: String| UnreadableFile {
        file: path.display().to_string(),
        problem: FileProblem::Malformed(problem),
    };
    let marker: ShardMarker =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
    if marker.format_version != SHARD_MARKER_VERSION {
        return Err(unreadable(format!(
            "format_version {} (this build reads {SHARD_MARKER_VERSION})",
            marker.format_version
        ))
        .into());
    }
    Ok(Some(marker))
}

/// Refuses a data directory whose shard directories are not all its own: once any of
/// them has its marker (the directory was opened before by a build that writes them),
/// every one must exist and hold its own shard's files: a marker naming its shard and
/// this data directory, or, not marked yet (a start that stopped while it wrote the
/// markers), log segments of its own shard or a checkpoint. A shard directory that was
/// deleted or emptied, swapped with another, or copied from another data directory
/// would otherwise open as an empty or a wrong shard: its tenants gone without a word,
/// or unreachable under the placement rule.
pub fn check_shard_dirs(data_dir: &Path, layout: &Layout) -> Result<(), EngineError> {
    let markers = (0..layout.shards)
        .map(|shard| read_shard_marker(data_dir, shard))
        .collect::<Result<Vec<_>, _>>()?;
    if markers.iter().all(Option::is_none) {
        return Ok(()); // new, restored, bootstrapped or from before markers
    }
    let id = layout.id.to_string();
    // Markers being written when a start stopped (a crash, a full disk): a shard not
    // written to yet then has neither marker nor files, legitimately.
    let marking = data_dir.join(MARKING_FILE).exists();
    for (shard, marker) in markers.iter().enumerate() {
        let dir = shard_dir(data_dir, shard);
        let problem = match marker {
            None if !dir.exists() => "is missing".to_string(),
            None if !dir.is_dir() => "is not a directory".to_string(),
            // While the markers are written, any shard may not have its own yet.
            None if marking => continue,
            // Otherwise one without a marker lost it: it could be any shard's.
            None => match unmarked_contents(&dir)? {
                Unmarked::Own => format!(
                    "has lost its {SHARD_MARKER_FILE} while the others have theirs (was it \
                     replaced, or copied from another shard? segment names do not say)"
                ),
                Unmarked::Empty => format!(
                    "has lost its {SHARD_MARKER_FILE} and holds no log or checkpoint (was it \
                     emptied or replaced?)"
                ),
            },
            Some(m) if m.shard != shard => format!("holds shard {}'s files", m.shard),
            Some(m) if m.data_dir_id != id => format!(
                "holds a shard of another data directory ({}, this one is {id})",
                m.data_dir_id
            ),
            Some(_) => continue,
        };
        return Err(EngineError::Layout(format!(
            "shard directory {} {problem}: its tenants' data is not there. Put the \
             directory's own files back, or restore the data directory from the archive \
             (RUNBOOK.md, \"A shard directory is missing or not its own\")",
            dir.display()
        )));
    }
    Ok(())
}

/// What a shard directory without a marker holds.
enum Unmarked {
    /// Log segments or a checkpoint: whose, the names do not say (they carry shard 0
    /// whatever the shard, FORMAT.md §3.4; read as a shard number, every shard but 0
    /// was refused after a start that stopped while it wrote the markers).
    Own,
    /// Neither.
    Empty,
}

fn unmarked_contents(dir: &Path) -> Result<Unmarked, EngineError> {
    let listed = std::fs::read_dir(dir)
        .map_err(|e| EngineError::Layout(format!("cannot list {}: {e}", dir.display())))?;
    for entry in listed {
        let entry = entry
            .map_err(|e| EngineError::Layout(format!("cannot list {}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if oc_io::wal::segment::parse_segment_name(&name).is_some()
            || crate::checkpoint::parse_manifest_name(&name).is_some()
        {
            return Ok(Unmarked::Own);
        }
    }
    Ok(Unmarked::Empty)
}

/// Present in the data directory while [`mark_shard_dirs`] writes markers.
const MARKING_FILE: &str = "oc-shard-markers.partial";

/// Gives every shard directory of `layout` its marker, once its shard opened.
pub fn mark_shard_dirs(data_dir: &Path, layout: &Layout) -> Result<(), EngineError> {
    let mut unmarked = Vec::new();
    for shard in 0..layout.shards {
        if read_shard_marker(data_dir, shard)?.is_none() {
            unmarked.push(shard);
        }
    }
    if unmarked.is_empty() {
        return Ok(());
    }
    let failed = |path: PathBuf| {
        move |e: std::io::Error| {
            EngineError::Layout(format!("cannot write {}: {e}", path.display()))
        }
    };
    let marking = data_dir.join(MARKING_FILE);
    write_file_durably(data_dir, MARKING_FILE, b"").map_err(failed(marking.clone()))?;
    let id = layout.id.to_string();
    for shard in unmarked {
        let marker = ShardMarker {
            format_version: SHARD_MARKER_VERSION,
            shard,
            data_dir_id: id.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&marker)
            .map_err(|e| EngineError::Layout(format!("cannot encode a shard marker: {e}")))?;
        text.push(b'\n');
        let dir = shard_dir(data_dir, shard);
        write_file_durably(&dir, SHARD_MARKER_FILE, &text)
            .map_err(failed(dir.join(SHARD_MARKER_FILE)))?;
    }
    std::fs::remove_file(&marking)
        .and_then(|()| std::fs::File::open(data_dir)?.sync_all())
        .map_err(failed(marking))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> TenantId {
        TenantId::parse(id).expect("valid id")
    }

    #[test]
    fn placement_is_the_documented_fnv1a_hash() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c (the published test vector).
        assert_eq!(
            owner_shard(&tenant("a"), 1 << 20),
            0xaf63dc4c8601ec8c % (1 << 20)
        );
        assert_eq!(
            owner_shard(&tenant("a"), 7),
            (0xaf63dc4c8601ec8c_u64 % 7) as usize
        );
    }

    #[test]
    fn placement_spreads_tenants_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[owner_shard(&tenant(&format!("tenant-{i}")), 4)] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven placement: {counts:?}");
        }
    }

    #[test]
    fn a_different_shard_count_is_refused_with_the_recorded_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        ensure_layout(dir.path(), 2).expect("new directory");
        ensure_layout(dir.path(), 2).expect("same count");
        let err = ensure_layout(dir.path(), 3).expect_err("other count");
        assert!(err.to_string().contains("--shards 2"), "{err}");
    }

    #[test]
    fn a_new_directory_gets_an_id_that_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ensure_layout(dir.path(), 2).expect("new directory");
        let again = ensure_layout(dir.path(), 2).expect("same directory");
        assert_eq!(first, again);
        let other = tempfile::tempdir().expect("temp dir");
        assert_ne!(ensure_layout(other.path(), 2).expect("other").id, first.id);
        assert_eq!(DataDirId::parse(&first.id.to_string()), Some(first.id));
        assert!(
            create_layout(dir.path(), 2).is_err(),
            "one layout per directory"
        );
    }

    #[test]
    fn a_version_1_layout_gets_an_id_at_its_next_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join(LAYOUT_FILE),
            br#"{"format_version":1,"shards":3,"placement":"fnv1a64-mod"}"#,
        )
        .expect("write");
        let named = ensure_layout(dir.path(), 3).expect("old layout");
        let text = std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).expect("read");
        assert!(text.contains(&named.id.to_string()), "{text}");
        assert!(text.contains("\"format_version\": 2"), "{text}");
        assert_eq!(ensure_layout(dir.path(), 3).expect("again"), named);
    }

    #[test]
    fn a_bad_id_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        for bad in [
            r#","data_dir_id":"xyz""#,
            r#","data_dir_id":7"#,
            r#","data_dir_id":"00000000000000000000000000000000""#,
            "",
        ] {
            std::fs::write(
                dir.path().join(LAYOUT_FILE),
                format!(r#"{{"format_version":2,"shards":1,"placement":"fnv1a64-mod"{bad}}}"#),
            )
            .expect("write");
            let err = ensure_layout(dir.path(), 1).expect_err(bad);
            assert!(err.to_string().contains("data_dir_id"), "{err}");
        }
    }

    #[test]
    fn shard_data_without_a_layout_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(shard_dir(dir.path(), 0)).expect("mkdir");
        let err = ensure_layout(dir.path(), 1).expect_err("no layout file");
        assert!(err.to_string().contains(LAYOUT_FILE), "{err}");
    }

    /// A restore killed before its first shard directory leaves only the marker (and
    /// its lock file): that is not a new, empty data directory.
    #[test]
    fn an_unfinished_restore_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(RESTORE_MARKER), b"").expect("marker");
        let err = ensure_layout(dir.path(), 1).expect_err("unfinished restore");
        assert!(err.to_string().contains(RESTORE_MARKER), "{err}");
        assert!(!dir.path().join(LAYOUT_FILE).exists());
    }

    #[test]
    fn a_damaged_layout_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(LAYOUT_FILE), b"{\"format_version\":1,").expect("write");
        let err = ensure_layout(dir.path(), 1).expect_err("damaged");
        assert!(err.to_string().contains("unreadable"), "{err}");
        std::fs::write(
            dir.path().join(LAYOUT_FILE),
            br#"{"format_version":9,"shards":1,"placement":"fnv1a64-mod"}"#,
        )
        .expect("write");
        let err = ensure_layout(dir.path(), 1).expect_err("future version");
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    /// A write that fails (here the rename: the layout's name is taken by a directory)
    /// reports the error and leaves no partial `.tmp` file behind.
    #[test]
    fn a_failed_layout_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join(LAYOUT_FILE)).expect("a directory in the way");
        let layout = Layout {
            shards: 2,
            id: DataDirId(7),
            epochs: Vec::new(),
            follows: None,
            lineage: None,
        };
        assert!(write_layout(dir.path(), &layout).is_err());
        assert!(!dir.path().join(format!("{LAYOUT_FILE}.tmp")).exists());
    }

    /// Once marked, a data directory refuses every shard directory that is not its own
    /// (missing, emptied, swapped, another directory's); unmarked ones all pass.
    #[test]
    fn shard_directories_that_are_not_their_own_are_refused_once_marked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path();
        let layout = Layout {
            shards: 3,
            id: DataDirId(7),
            epochs: Vec::new(),
            follows: None,
            lineage: None,
        };
        for shard in 0..3 {
            std::fs::create_dir_all(shard_dir(data, shard)).expect("mkdir");
        }
        check_shard_dirs(data, &layout).expect("nothing marked yet");
        mark_shard_dirs(data, &layout).expect("marked");
        check_shard_dirs(data, &layout).expect("each its own");
        let refused = |why: &str| {
            let e = check_shard_dirs(data, &layout).expect_err(why).to_string();
            assert!(e.contains(why), "{e} should say {why:?}");
        };
        let (one, two) = (shard_dir(data, 1), shard_dir(data, 2));
        let aside = data.join("aside");
        std::fs::rename(&one, &aside).expect("moved away");
        refused("shard-1 is missing");
        std::fs::create_dir(&one).expect("an empty one");
        refused("shard-1 has lost its oc-shard.json and holds no log");
        // A log but no marker: lost, unless a start stopped while writing the markers.
        // Every shard's segments are named for shard 0 (FORMAT.md §3.4).
        std::fs::write(
            one.join(oc_io::wal::segment::segment_name(0, Epoch(1), Lsn(1))),
            b"",
        )
        .expect("a segment");
        refused("shard-1 has lost its oc-shard.json while the others have theirs");
        std::fs::write(data.join(MARKING_FILE), b"").expect("marking");
        check_shard_dirs(data, &layout).expect("a segment while marking");
        std::fs::remove_file(data.join(MARKING_FILE)).expect("marked");
        std::fs::remove_dir_all(&one).expect("rm");
        std::fs::rename(&two, &one).expect("2 to 1");
        std::fs::rename(&aside, &two).expect("1 to 2");
        refused("holds shard 2's files");
        std::fs::rename(&one, &aside).expect("swap back");
        std::fs::rename(&two, &one).expect("swap back");
        std::fs::rename(&aside, &two).expect("swap back");
        check_shard_dirs(data, &layout).expect("each its own again");
        // A start that stopped while it wrote the markers: a shard not written to yet
        // has neither; only then does an empty one pass.
        let (zero, zero_aside) = (shard_dir(data, 0), data.join("zero-aside"));
        std::fs::rename(&zero, &zero_aside).expect("aside");
        std::fs::create_dir(&zero).expect("an empty shard-0");
        refused("shard-0 has lost its oc-shard.json");
        std::fs::write(data.join(MARKING_FILE), b"").expect("marking");
        check_shard_dirs(data, &layout).expect("an interrupted marking");
        mark_shard_dirs(data, &layout).expect("marked");
        assert!(!data.join(MARKING_FILE).exists());
        std::fs::remove_dir_all(&zero).expect("rm");
        std::fs::rename(&zero_aside, &zero).expect("back");
        let file = data.join("file");
        std::fs::rename(&two, &file).expect("aside");
        std::fs::write(&two, b"").expect("a file in its place");
        refused("shard-2 is not a directory");
        std::fs::remove_file(&two).expect("rm");
        std::fs::rename(&file, &two).expect("back");
        let other = Layout {
            id: DataDirId(8),
            ..layout.clone()
        };
        let e = check_shard_dirs(data, &other).expect_err("another directory's");
        assert!(e.to_string().contains("another data directory"), "{e}");
        std::fs::write(one.join(SHARD_MARKER_FILE), b"{").expect("damaged");
        let e = check_shard_dirs(data, &layout).expect_err("unreadable");
        assert!(e.to_string().contains(SHARD_MARKER_FILE), "{e}");
    }

    /// The bytes are those of the writer before the struct: a pretty `json!` map.
    #[test]
    fn the_layout_file_writes_the_bytes_it_always_did() {
        let layout = Layout {
            shards: 4,
            id: DataDirId(0x5f0c_9d7e_2b8a_41c6_a3e1_f0d2_c4b6_a8e0),
            epochs: Vec::new(),
            follows: None,
            lineage: None,
        };
        let text = LayoutFile::of(&layout).text();
        assert_eq!(
            text,
            "{\n  \"data_dir_id\": \"5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0\",\n  \"format_version\": 2,\n  \
             \"placement\": \"fnv1a64-mod\",\n  \"shards\": 4\n}\n"
        );
        let legacy = serde_json::json!({
            "format_version": LAYOUT_FORMAT_VERSION,
            "shards": layout.shards,
            "placement": "fnv1a64-mod",
            "data_dir_id": layout.id.to_string(),
        });
        assert_eq!(text, format!("{legacy:#}\n"));
        assert_eq!(
            parse_layout(text.as_bytes()).expect("round trip"),
            (4, Some(layout.clone()))
        );
        crate::json_file::assert_required_fields(&LayoutFile::of(&layout));
    }

    #[test]
    fn epochs_round_trip_as_version_3_and_tell_history_from_a_dead_branch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let epochs = vec![
            EpochStart {
                epoch: 2,
                first_lsn: vec![101, 51],
                lease_epoch: None,
            },
            EpochStart {
                epoch: 5,
                first_lsn: vec![201, 51],
                lease_epoch: None,
            },
        ];
        let made = create_layout_with_epochs(dir.path(), 2, epochs.clone(), None, Lineage::Unknown)
            .expect("create");
        let read = ensure_layout(dir.path(), 2).expect("read back");
        assert_eq!(read, made);
        assert_eq!(read.epoch(), 5);
        let text = std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).expect("file");
        assert!(text.contains("\"format_version\": 3"), "{text}");
        // Shard 0: epoch 1 up to LSN 100, epoch 2 from 101 to 200, epoch 5 from 201.
        assert!(read.on_history(0, 1, 100));
        assert!(
            !read.on_history(0, 1, 101),
            "past where epoch 2 began: a dead branch"
        );
        assert!(read.on_history(0, 2, 200));
        assert!(!read.on_history(0, 2, 201));
        assert!(
            read.on_history(0, 5, 1_000_000),
            "the current epoch (the log bounds it)"
        );
        assert!(!read.on_history(0, 6, 1), "a future epoch");
        assert!(
            !read.on_history(0, 3, 150),
            "an epoch this history has no record of"
        );
        // Epochs that go back, or name the wrong shard count, are refused.
        for bad in [
            vec![EpochStart {
                epoch: 1,
                first_lsn: vec![1, 1],
                lease_epoch: None,
            }],
            vec![EpochStart {
                epoch: 2,
                first_lsn: vec![1],
                lease_epoch: None,
            }],
            vec![
                EpochStart {
                    epoch: 2,
                    first_lsn: vec![10, 10],
                    lease_epoch: None,
                },
                EpochStart {
                    epoch: 3,
                    first_lsn: vec![5, 10],
                    lease_epoch: None,
                },
            ],
        ] {
            let file = LayoutFile::of(&Layout {
                epochs: bad,
                ..made.clone()
            });
            assert!(parse_layout(file.text().as_bytes()).is_err());
        }
    }

    #[test]
    fn an_unknown_version_or_a_missing_field_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(LAYOUT_FILE);
        for (text, wanted) in [
            (
                r#"{"format_version":4,"shards":1,"placement":"fnv1a64-mod"}"#,
                "version",
            ),
            (
                r#"{"format_version":2,"placement":"fnv1a64-mod","data_dir_id":"5f0c9d7e2b8a41c6a3e1f0d2c4b6a8e0"}"#,
                "shards",
            ),
            (r#"{"format_version":1,"shards":1}"#, "placement"),
        ] {
            std::fs::write(&path, text).expect("write");
            let err = ensure_layout(dir.path(), 1).expect_err(text);
            assert!(err.to_string().contains(LAYOUT_FILE), "{err}");
            if wanted == "version" {
                let EngineError::Unreadable(UnreadableFile { file, problem }) = &err else {
                    panic!("{text}: {err:?}");
                };
                assert_eq!(file, &path.display().to_string());
                assert!(
                    matches!(problem, FileProblem::UnsupportedVersion { found: 4, .. }),
                    "{text}: {problem:?}"
                );
            } else {
                // Damaged: the message says what is missing and what to do.
                let message = err.to_string();
                assert!(message.contains(&format!("no {wanted}")), "{message}");
                assert!(
                    message.contains("The layout file is unreadable"),
                    "{message}"
                );
            }
        }
    }

    /// A follower's directory names the writer it follows from its first layout (or
    /// the first time it follows one), keeps it through restarts, and loses it when a
    /// promotion starts its epoch.
    #[test]
    fn a_followers_layout_names_its_writer_until_its_promotion() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (writer, other) = (DataDirId(0xaa), DataDirId(0xbb));
        let made =
            create_layout_with_epochs(dir.path(), 2, Vec::new(), Some(writer), Lineage::Of(writer))
                .expect("create");
        assert_eq!(made.follows, Some(writer));
        let text = std::fs::read_to_string(dir.path().join(LAYOUT_FILE)).expect("file");
        assert!(
            text.contains(&format!("\"follows\": \"{writer}\"")),
            "{text}"
        );
        assert_eq!(ensure_layout(dir.path(), 2).expect("read back"), made);
        // A writer's own directory that becomes a follower (after a failover) is marked
        // by its first follow, with or without new epochs.
        let own = tempfile::tempdir().expect("temp dir");
        let plain = create_layout(own.path(), 2).expect("create");
        assert_eq!(plain.follows, None);
        // A writer of another database is refused by its lineage...
        let stranger = DataDirId(0x5151);
        let refused = follow_epochs(own.path(), &plain, (Vec::new(), Some(stranger)), other)
            .expect_err("another lineage");
        assert!(
            refused.to_string().contains("another database"),
            "{refused}"
        );
        // ...and one of this directory's own history is followed.
        let followed =
            follow_epochs(own.path(), &plain, (Vec::new(), plain.lineage), other).expect("follow");
        assert_eq!(followed.follows, Some(other));
        assert_eq!(followed.lineage, Some(plain.id));
        assert_eq!(ensure_layout(own.path(), 2).expect("read back"), followed);
        let started = start_epoch(
            own.path(),
            &followed,
            EpochStart {
                epoch: 7,
                first_lsn: vec![5, 9],
                lease_epoch: Some(2),
            },
        )
        .expect("promoted");
        assert_eq!(started.follows, None);
        let read = ensure_layout(own.path(), 2).expect("read back");
        assert_eq!(read, started);
        let text = std::fs::read_to_string(own.path().join(LAYOUT_FILE)).expect("file");
        assert!(!text.contains("follows"), "{text}");
    }
}
