//! Simulated storage: files in memory, faults driven by one seed, so a failing run
//! replays exactly from its printed seed.
//!
//! Fault budget: what the simulator may do, and what it promises never to do.
//! - A write is visible to reads at once. Until the next successful `sync` of its file
//!   it is *pending*: at a crash each pending write is independently kept, lost, or torn
//!   (each 512-byte sector kept or lost by a coin flip).
//! - `sync` may fail with EIO (chance `sync_error_per_mille`). Like Linux after a failed
//!   fdatasync, the pending writes are then settled at random on the "disk" while reads
//!   still show them, and are never retried.
//! - When the total size of all files would exceed `capacity_bytes`, creating or
//!   growing a file fails with ENOSPC and changes nothing.
//! - When `max_files` names exist, creating another fails with EMFILE (the process is
//!   out of descriptors) and changes nothing.
//! - The `crash_after_ops`-th operation (counting every call) crashes the machine: that
//!   operation and every later one fail with [`Error::SimulatedCrash`] until
//!   [`SimStorage::restart`], which applies the crash to the disk. A write caught by the
//!   crash counts as pending.
//! - Names (create, rename, remove) revert at a crash to the last `sync_dir`.
//! - Never: change synced bytes, reorder a file's bytes, or lose a name after
//!   `sync_dir` returned Ok.
//!
//! Any operation may also yield to the executor first (`yield_per_mille`), which lets
//! the simulator explore interleavings of the WAL's tasks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use super::{Storage, StorageFile};
use crate::buffer::{AlignedBuf, IoBuffer, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Tearing granularity: a sector is written entirely or not at all.
pub const SECTOR_SIZE: usize = 512;

/// The seeds a simulation test runs: `OC_SIM_SEED=<seed>` replays one;
/// otherwise `OC_SIM_SEEDS=<count>` seeds (default `default_count`) starting at
/// `OC_SIM_SEED_START=<first>` (default 0), so anyone can run seeds no one ran before.
/// A malformed value is a test-setup error and panics with its name.
pub fn seeds_from_env(default_count: u64) -> Vec<u64> {
    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
    };
    if let Some(one) = var("OC_SIM_SEED") {
        return vec![one];
    }
    let start = var("OC_SIM_SEED_START").unwrap_or(0);
    let count = var("OC_SIM_SEEDS").unwrap_or(default_count);
    (start..start.saturating_add(count)).collect()
}

/// Names the seed of a simulator run that panics, so it can be replayed with
/// `OC_SIM_SEED=<seed>`: made before the run, [`SeedGuard::passed`] after it.
pub struct SeedGuard(Option<u64>);

impl SeedGuard {
    pub fn new(seed: u64) -> Self {
        SeedGuard(Some(seed))
    }

    /// The run ended without a panic: nothing to report.
    pub fn passed(mut self) {
        self.0 = None;
    }
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if let Some(seed) = self.0 {
            eprintln!("FAILED SEED: {seed} (replay with OC_SIM_SEED={seed})");
        }
    }
}

/// A small deterministic generator (SplitMix64). Chosen over the `rand` crate because
/// its output must never change across dependency upgrades: old seeds must replay.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }
}

/// What the simulator may do to the code under test.
#[derive(Debug, Clone)]
pub struct SimFaults {
    /// The operation with this number (1-based) crashes the machine.
    pub crash_after_ops: Option<u64>,
    pub sync_error_per_mille: u32,
    pub capacity_bytes: u64,
    pub max_files: usize,
    pub yield_per_mille: u32,
}

impl Default for SimFaults {
    fn default() -> Self {
        SimFaults {
            crash_after_ops: None,
            sync_error_per_mille: 0,
            capacity_bytes: u64::MAX,
            max_files: usize::MAX,
            yield_per_mille: 0,
        }
    }
}

#[derive(Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl Inode {
    /// Makes every pending write durable, in the order they were made.
    fn persist_pending(&mut self) {
        for (offset, data) in std::mem::take(&mut self.pending) {
            let end = offset as usize + data.len();
            if self.durable.len() < end {
                self.durable.resize(end, 0);
            }
            self.durable[offset as usize..end].copy_from_slice(&data);
        }
    }
}

struct SimState {
    rng: SimRng,
    faults: SimFaults,
    ops: u64,
    crashed: bool,
    /// The operation number that crashed the machine.
    crashed_at: Option<u64>,
    generation: u64,
    next_inode: u64,
    inodes: BTreeMap<u64, Inode>,
    names: BTreeMap<String, u64>,
    durable_names: BTreeMap<String, u64>,
    trace: u64,
}

/// In-memory storage with seeded faults. Clones share one simulated disk.
#[derive(Clone)]
pub struct SimStorage {
    state: Rc<RefCell<SimState>>,
}

impl SimState {
    /// Counts an operation and reports whether the machine is (now) crashed.
    fn tick(&mut self, what: &str, arg: u64) -> bool {
        self.ops += 1;
        for b in what.bytes().chain(arg.to_le_bytes()) {
            self.trace = (self.trace ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
        if !self.crashed && self.faults.crash_after_ops.is_some_and(|n| self.ops >= n) {
            self.crashed = true;
            self.crashed_at = Some(self.ops);
        }
        self.crashed
    }

    /// Space taken by named files (an unlinked file's space is free again).
    fn used_bytes(&self) -> u64 {
        let named: std::collections::BTreeSet<u64> = self.names.values().copied().collect();
        named
            .iter()
            .map(|ino| self.inodes[ino].current.len() as u64)
            .sum()
    }

    /// Settles pending writes onto the durable image: each kept, lost or torn.
    fn settle(rng: &mut SimRng, inode: &mut Inode) {
        for (offset, data) in std::mem::take(&mut inode.pending) {
            let offset = offset as usize;
            let end = offset + data.len();
            if inode.durable.len() < end {
                inode.durable.resize(end, 0);
            }
            match rng.below(3) {
                0 => inode.durable[offset..end].copy_from_slice(&data),
                1 => {}
                _ => {
                    for (i, sector) in data.chunks(SECTOR_SIZE).enumerate() {
                        if rng.chance(500) {
                            let at = offset + i * SECTOR_SIZE;
                            inode.durable[at..at + sector.len()].copy_from_slice(sector);
                        }
                    }
                }
            }
        }
    }
}

impl SimStorage {
    /// A fresh, empty simulated disk.
    pub fn new(seed: u64, faults: SimFaults) -> Self {
        SimStorage {
            state: Rc::new(RefCell::new(SimState {
                rng: SimRng::new(seed),
                faults,
                ops: 0,
                crashed: false,
                crashed_at: None,
                generation: 0,
                next_inode: 1,
                inodes: BTreeMap::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                trace: 0xCBF2_9CE4_8422_2325,
            })),
        }
    }

    /// Applies a crash to the disk (pending writes kept, lost or torn; names back to the
    /// last `sync_dir`), then lets the machine run again. Open handles become invalid.
    pub fn restart(&self, faults: SimFaults) {
        let mut guard = self.state.borrow_mut();
        let state = &mut *guard;
        state.names = state.durable_names.clone();
        let live: Vec<u64> = state.names.values().copied().collect();
        state.inodes.retain(|ino, _| live.contains(ino));
        for inode in state.inodes.values_mut() {
            SimState::settle(&mut state.rng, inode);
            inode.current = inode.durable.clone();
        }
        state.crashed = false;
        state.crashed_at = None;
        state.ops = 0;
        state.generation += 1;
        state.faults = faults;
    }

    /// Whether the configured crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.state.borrow().crashed
    }

    /// A digest of every operation so far: equal digests mean equal runs.
    pub fn trace_digest(&self) -> u64 {
        self.state.borrow().trace
    }

    /// Overwrites bytes of a file's durable image directly, as bit rot would.
    #[expect(
        clippy::expect_used,
        reason = "a test helper: a name that does not exist is a bug in the test"
    )]
    pub fn corrupt(&self, name: &str, offset: u64, bytes: &[u8]) {
        let mut state = self.state.borrow_mut();
        let ino = *state
            .names
            .get(name)
            .expect("corrupt() names an existing file");
        let inode = state
            .inodes
            .get_mut(&ino)
            .expect("names point at live inodes");
        let at = offset as usize;
        for image in [&mut inode.current, &mut inode.durable] {
            image[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// The names of the files as they are now (durable or not), sorted: what another
    /// process listing the directory would see.
    pub fn file_names(&self) -> Vec<String> {
        self.state.borrow().names.keys().cloned().collect()
    }

    /// A copy of a file's current contents (for assertions, and for another process's
    /// reads in the simulator: the archive shipper's).
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        let state = self.state.borrow();
        let ino = state.names.get(name)?;
        Some(state.inodes[ino].current.clone())
    }

    async fn begin(&self, what: &str, arg: u64) -> Result<u64> {
        let yield_first = {
            let mut state = self.state.borrow_mut();
            let per_mille = state.faults.yield_per_mille;
            state.rng.chance(per_mille)
        };
        if yield_first {
            futures_lite::future::yield_now().await;
        }
        let mut state = self.state.borrow_mut();
        if state.tick(what, arg) {
            return Err(Error::SimulatedCrash);
        }
        Ok(state.generation)
    }

    fn lookup(&self, name: &str) -> Result<u64> {
        self.state.borrow().names.get(name).copied().ok_or_else(|| {
            Error::io(
                "opening",
                name,
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })
    }
}

impl Storage for SimStorage {
    type File = SimFile;
    type Buffer = AlignedBuf;

    fn alloc_buffer(&self, len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }

    async fn create(&self, name: &str, len: u64) -> Result<SimFile> {
        let generation = self.begin("create", len).await?;
        let mut state = self.state.borrow_mut();
        if state.names.contains_key(name) {
            let err = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
            return Err(Error::io("creating", name, err));
        }
        if state.used_bytes().saturating_add(len) > state.faults.capacity_bytes {
            return Err(Error::StorageFull {
                op: "creating",
                file: name.to_string(),
            });
        }
        if state.names.len() >= state.faults.max_files {
            let err = std::io::Error::from_raw_os_error(libc::EMFILE);
            return Err(Error::io("creating", name, err));
        }
        let ino = state.next_inode;
        state.next_inode += 1;
        let zeroes = vec![0; len as usize];
        state.inodes.insert(
            ino,
            Inode {
                current: zeroes.clone(),
                durable: zeroes,
                pending: Vec::new(),
            },
        );
        state.names.insert(name.to_string(), ino);
        Ok(SimFile {
            storage: self.clone(),
            ino,
            generation,
            name: name.to_string(),
            dsync: false,
        })
    }

    async fn open(&self, name: &str) -> Result<SimFile> {
        let generation = self.begin("open", 0).await?;
        let ino = self.lookup(name)?;
        Ok(SimFile {
            storage: self.clone(),
            ino,
            generation,
            name: name.to_string(),
            dsync: false,
        })
    }

    async fn open_durable(&self, name: &str) -> Result<SimFile> {
        Ok(SimFile {
            dsync: true,
            ..self.open(name).await?
        })
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.begin("rename", 0).await?;
        let ino = self.lookup(from)?;
        let mut state = self.state.borrow_mut();
        state.names.remove(from);
        state.names.insert(to.to_string(), ino);
        Ok(())
    }

    async fn remove(&self, name: &str) -> Result<()> {
        self.begin("remove", 0).await?;
        self.lookup(name)?;
        self.state.borrow_mut().names.remove(name);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>> {
        self.begin("list", 0).await?;
        Ok(self.state.borrow().names.keys().cloned().collect())
    }

    async fn sync_dir(&self) -> Result<()> {
        self.begin("sync_dir", 0).await?;
        let mut state = self.state.borrow_mut();
        state.durable_names = state.names.clone();
        Ok(())
    }
}

/// The inode an open handle points at.
#[expect(
    clippy::expect_used,
    reason = "open handles point at live inodes (the simulator never frees one that is open)"
)]
fn live_inode(inodes: &mut BTreeMap<u64, Inode>, ino: u64) -> &mut Inode {
    inodes
        .get_mut(&ino)
        .expect("open handles point at live inodes")
}

/// A handle on a simulated file; dead after a crash.
pub struct SimFile {
    storage: SimStorage,
    ino: u64,
    generation: u64,
    name: String,
    /// Opened by `open_durable`: each `write_durable_at` is one `O_DSYNC` write, durable
    /// on its own completion whatever else is pending on the file.
    dsync: bool,
}

impl SimFile {
    async fn begin(&self, what: &str, arg: u64) -> Result<()> {
        let generation = self.storage.begin(what, arg).await;
        match generation {
            Ok(g) if g == self.generation => Ok(()),
            Ok(_) => Err(Error::SimulatedCrash),
            Err(e) => Err(e),
        }
    }
}

impl StorageFile for SimFile {
    fn durable_writes_independent(&self) -> bool {
        self.dsync
    }

    type Buffer = AlignedBuf;

    fn name(&self) -> &str {
        &self.name
    }

    async fn write_at(&self, buf: AlignedBuf, offset: u64) -> Result<()> {
        assert_eq!(offset % BLOCK_SIZE as u64, 0, "unaligned write offset");
        assert_eq!(buf.len() % BLOCK_SIZE, 0, "unaligned write length");
        let begun = self.storage.begin("write", offset).await;
        let mut state = self.storage.state.borrow_mut();
        if state.generation != self.generation {
            return Err(Error::SimulatedCrash);
        }
        // The write that crashes the machine may still reach the disk, torn or whole.
        let crashing_now = begun.is_err() && state.crashed_at == Some(state.ops);
        if begun.is_err() && !crashing_now {
            return Err(Error::SimulatedCrash);
        }
        let end = offset as usize + buf.len();
        let used = state.used_bytes();
        let capacity = state.faults.capacity_bytes;
        let inode = live_inode(&mut state.inodes, self.ino);
        let growth = end.saturating_sub(inode.current.len()) as u64;
        if !crashing_now && used + growth > capacity {
            return Err(Error::StorageFull {
                op: "writing",
                file: self.name.clone(),
            });
        }
        if inode.current.len() < end {
            inode.current.resize(end, 0);
        }
        inode.current[offset as usize..end].copy_from_slice(buf.as_bytes());
        inode.pending.push((offset, buf.as_bytes().to_vec()));
        begun.map(|_| ())
    }

    async fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.begin("read", offset).await?;
        let state = self.storage.state.borrow();
        let image = &state.inodes[&self.ino].current;
        let start = offset as usize;
        let Some(src) = image.get(start..start + out.len()) else {
            let err = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
            return Err(Error::io("reading", &self.name, err));
        };
        out.copy_from_slice(src);
        Ok(())
    }

    async fn write_durable_at(&self, buf: AlignedBuf, offset: u64) -> Result<()> {
        if !self.dsync {
            self.write_at(buf, offset).await?;
            return self.sync().await;
        }
        // Written, then completed durable: a crash in between leaves it pending (kept,
        // lost or torn), an I/O error settles it at random. Either way only this write:
        // the other writes on their way to the file complete on their own.
        self.write_at(buf, offset).await?;
        self.begin("dsync", offset).await?;
        let mut guard = self.storage.state.borrow_mut();
        let state = &mut *guard;
        let fail = state.rng.chance(state.faults.sync_error_per_mille);
        let inode = live_inode(&mut state.inodes, self.ino);
        let Some(at) = inode.pending.iter().rposition(|(o, _)| *o == offset) else {
            // A plain sync of the file already made it durable.
            return Ok(());
        };
        let write = inode.pending.remove(at);
        let others = std::mem::replace(&mut inode.pending, vec![write]);
        let result = if fail {
            SimState::settle(&mut state.rng, inode);
            let err = std::io::Error::from_raw_os_error(libc::EIO);
            Err(Error::io("writing (O_DSYNC)", &self.name, err))
        } else {
            inode.persist_pending();
            Ok(())
        };
        inode.pending = others;
        result
    }

    async fn sync(&self) -> Result<()> {
        self.begin("sync", 0).await?;
        let mut guard = self.storage.state.borrow_mut();
        let state = &mut *guard;
        let fail = state.rng.chance(state.faults.sync_error_per_mille);
        let inode = live_inode(&mut state.inodes, self.ino);
        if fail {
            SimState::settle(&mut state.rng, inode);
            let err = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(Error::io("fdatasync", &self.name, err));
        }
        inode.persist_pending();
        Ok(())
    }

    async fn len(&self) -> Result<u64> {
        self.begin("len", 0).await?;
        Ok(self.storage.state.borrow().inodes[&self.ino].current.len() as u64)
    }
}
