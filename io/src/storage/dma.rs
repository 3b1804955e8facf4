//! The real storage: O_DIRECT files through glommio's io_uring reactor. Every write is
//! one aligned DMA transfer from a registered buffer; `sync` is `fdatasync`, and a file
//! from `open_durable` has `O_DSYNC`, so each of its writes is durable on completion. Directory
//! work that has no io_uring form (mkdir, readdir) runs on glommio's blocking pool so a
//! shard never stalls on it.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions};

use super::{Storage, StorageFile};
use crate::buffer::BLOCK_SIZE;
use crate::error::{Error, Result};

/// A directory on a real file system (ext4 or xfs; tmpfs silently drops O_DIRECT).
#[derive(Clone)]
pub struct DmaStorage {
    dir: Rc<PathBuf>,
    handle: Rc<Directory>,
}

fn glommio_err(op: &'static str, file: &str, err: glommio::GlommioError<()>) -> Error {
    Error::io(op, file, std::io::Error::from(err))
}

impl DmaStorage {
    /// Opens (creating it and its parents if needed) the directory `dir`. A relative
    /// `dir` is made absolute first: glommio opens paths relative to no directory and
    /// fails them with EBADF.
    pub async fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let shown = dir.as_ref().display().to_string();
        let dir = std::path::absolute(dir.as_ref())
            .map_err(|e| Error::io("resolving directory", shown.clone(), e))?;
        let to_create = dir.clone();
        glommio::executor()
            .spawn_blocking(move || std::fs::create_dir_all(to_create))
            .await
            .map_err(|e| Error::io("creating directory", shown.clone(), e))?;
        prime_iopoll_probe(&dir).await?;
        let handle = Directory::open(&dir)
            .await
            .map_err(|e| glommio_err("opening directory", &shown, e))?;
        Ok(DmaStorage {
            dir: Rc::new(dir),
            handle: Rc::new(handle),
        })
    }

    /// Opens an existing file for reading and writing, with `O_DSYNC` when `dsync`.
    async fn open_existing(&self, name: &str, dsync: bool) -> Result<DmaStorageFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if dsync { libc::O_DSYNC } else { 0 })
            .dma_open(self.path(name))
            .await
            .map_err(|e| glommio_err("opening", name, e))?;
        Ok(DmaStorageFile {
            file,
            name: name.to_string(),
            dsync,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(!name.contains('/'), "storage names are flat: {name}");
        self.dir.join(name)
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Name of the short-lived file used by [`prime_iopoll_probe`].
const IOPOLL_PROBE_NAME: &str = ".oc-iopoll-probe";

/// glommio decides once per thread and device whether reads may use the IOPOLL ring,
/// by reading the first block of the first file it opens. If that file is empty the
/// read ends at EOF without reaching the device, the probe "succeeds", and every later
/// read on a device without poll queues (virtio, most cloud disks) fails with
/// EOPNOTSUPP. So before anything else, let glommio probe a file that holds a block.
/// A log segment of the directory whose header block is written (it reads back as a
/// valid header) is probed as it is, after the first start: nothing is written, which
/// a full disk would refuse (and the server could not restart to free space). A block
/// only allocated would read as zeros without reaching the device, as an empty file.
///
/// A directory without such a segment (a shard that never took a write) probes one of
/// its siblings' (the other shards of the data directory, on the same device) before
/// it writes a probe file of its own: a full disk would refuse that write, and with it
/// every restart, while the data already on it is readable.
async fn prime_iopoll_probe(dir: &Path) -> Result<()> {
    let listed = dir.to_path_buf();
    let existing = glommio::executor()
        .spawn_blocking(move || -> Option<PathBuf> {
            use std::os::unix::fs::MetadataExt;
            let device = |path: &Path| std::fs::metadata(path).ok().map(|m| m.dev());
            let own_device = device(&listed);
            let siblings = listed.parent().and_then(|p| std::fs::read_dir(p).ok());
            let sibling_dirs = siblings
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path != &listed && path.is_dir() && device(path) == own_device);
            std::iter::once(listed.clone())
                .chain(sibling_dirs)
                .find_map(|dir| written_segment_in(&dir))
        })
        .await;
    if let Some(path) = existing {
        if let Ok(file) = OpenOptions::new().read(true).dma_open(&path).await {
            return file
                .close()
                .await
                .map_err(|e| glommio_err("closing", &path.display().to_string(), e));
        }
    }
    let path = dir.join(IOPOLL_PROBE_NAME);
    let shown = path.display().to_string();
    let to_write = path.clone();
    glommio::executor()
        .spawn_blocking(move || std::fs::write(to_write, [0xA5u8; BLOCK_SIZE]))
        .await
        .map_err(|e| Error::io("writing", shown.clone(), e))?;
    let probed = OpenOptions::new().read(true).dma_open(&path).await;
    let removed = glommio::io::remove(&path).await;
    probed
        .map_err(|e| glommio_err("probing", IOPOLL_PROBE_NAME, e))?
        .close()
        .await
        .map_err(|e| glommio_err("closing", IOPOLL_PROBE_NAME, e))?;
    removed.map_err(|e| glommio_err("removing", IOPOLL_PROBE_NAME, e))
}

/// A log segment in `dir` whose header block reads back as a valid header.
fn written_segment_in(dir: &Path) -> Option<PathBuf> {
    use std::io::Read;
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name();
        crate::wal::segment::parse_segment_name(name.to_str()?)?;
        let mut header = vec![0u8; BLOCK_SIZE];
        std::fs::File::open(entry.path())
            .and_then(|mut f| f.read_exact(&mut header))
            .ok()?;
        crate::wal::segment::SegmentHeader::decode(&header).ok()?;
        Some(entry.path())
    })
}

impl Storage for DmaStorage {
    type File = DmaStorageFile;
    type Buffer = DmaBuffer;

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        debug_assert_eq!(len % BLOCK_SIZE, 0);
        glommio::allocate_dma_buffer(len)
    }

    async fn create(&self, name: &str, len: u64) -> Result<DmaStorageFile> {
        assert_eq!(len % BLOCK_SIZE as u64, 0, "files are whole blocks");
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .dma_open(self.path(name))
            .await
            .map_err(|e| glommio_err("creating", name, e))?;
        let file = DmaStorageFile {
            file,
            name: name.to_string(),
            dsync: false,
        };
        // Reserve the extents so a full disk fails here, before any writing.
        file.file
            .pre_allocate(len, false)
            .await
            .map_err(|e| glommio_err("preallocating", name, e))?;
        Ok(file)
    }

    async fn open(&self, name: &str) -> Result<DmaStorageFile> {
        self.open_existing(name, false).await
    }

    /// With `O_DSYNC`: a write completes once it is durable, data and the metadata
    /// needed to read it back (an unwritten extent's conversion included), as write +
    /// `fdatasync` would leave it, in one trip through the ring instead of two. One
    /// appender commits 1.36–1.42× as often with it (`oc-bench wal`, BENCHMARKS.md).
    async fn open_durable(&self, name: &str) -> Result<DmaStorageFile> {
        self.open_existing(name, true).await
    }

    async fn rename(&self, from: &str, to: &str) -> Result<()> {
        glommio::io::rename(self.path(from), self.path(to))
            .await
            .map_err(|e| glommio_err("renaming", from, e))
    }

    async fn remove(&self, name: &str) -> Result<()> {
        glommio::io::remove(self.path(name))
            .await
            .map_err(|e| glommio_err("removing", name, e))
    }

    async fn list(&self) -> Result<Vec<String>> {
        let dir = (*self.dir).clone();
        let shown = dir.display().to_string();
        let listed = glommio::executor()
            .spawn_blocking(move || -> std::io::Result<Vec<String>> {
                let mut names = Vec::new();
                for entry in std::fs::read_dir(dir)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                names.sort();
                Ok(names)
            })
            .await;
        listed.map_err(|e| Error::io("listing", shown, e))
    }

    async fn sync_dir(&self) -> Result<()> {
        self.handle
            .sync()
            .await
            .map_err(|e| glommio_err("syncing directory", &self.dir.display().to_string(), e))
    }
}

/// An open O_DIRECT file.
pub struct DmaStorageFile {
    file: DmaFile,
    name: String,
    /// Opened with `O_DSYNC`: every write is durable when it completes.
    dsync: bool,
}

impl DmaStorageFile {
    /// The `wal.sync.err` failpoint: the error an `fdatasync` (or a durable write)
    /// returns while its trigger file exists.
    fn injected_sync_error(&self) -> Result<()> {
        if let Some(trigger) = crate::failpoint::armed("wal.sync.err") {
            if Path::new(trigger).exists() {
                return Err(Error::io(
                    "fdatasync",
                    &self.name,
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        }
        Ok(())
    }
}

impl DmaStorageFile {
    /// The `wal.sync.stall` failpoint: a sync (or a durable write) waits while its
    /// trigger file exists, as on a frozen disk.
    async fn injected_stall(&self) {
        if let Some(trigger) = crate::failpoint::armed("wal.sync.stall") {
            while Path::new(trigger).exists() {
                glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

impl StorageFile for DmaStorageFile {
    fn durable_writes_independent(&self) -> bool {
        self.dsync
    }

    type Buffer = DmaBuffer;

    fn name(&self) -> &str {
        &self.name
    }

    async fn write_at(&self, buf: DmaBuffer, offset: u64) -> Result<()> {
        let len = buf.len();
        debug_assert_eq!(len % BLOCK_SIZE, 0);
        debug_assert_eq!(offset % BLOCK_SIZE as u64, 0);
        let written = self
            .file
            .write_at(buf, offset)
            .await
            .map_err(|e| glommio_err("writing", &self.name, e))?;
        if written != len {
            // A short O_DIRECT write means the device or file system ran out of room.
            return Err(Error::io(
                "writing",
                &self.name,
                std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!("short write: {written} of {len} bytes at offset {offset}"),
                ),
            ));
        }
        Ok(())
    }

    async fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let read = self
            .file
            .read_at_aligned(offset, out.len())
            .await
            .map_err(|e| glommio_err("reading", &self.name, e))?;
        if read.len() != out.len() {
            return Err(Error::io(
                "reading",
                &self.name,
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "read {} of {} bytes at offset {offset}",
                        read.len(),
                        out.len()
                    ),
                ),
            ));
        }
        out.copy_from_slice(&read);
        Ok(())
    }

    async fn sync(&self) -> Result<()> {
        self.injected_stall().await;
        self.injected_sync_error()?;
        self.file
            .fdatasync()
            .await
            .map_err(|e| glommio_err("fdatasync", &self.name, e))
    }

    async fn write_durable_at(&self, buf: DmaBuffer, offset: u64) -> Result<()> {
        self.write_at(buf, offset).await?;
        if self.dsync {
            // Durable already; an injected failure reads as the write's own.
            self.injected_stall().await;
            self.injected_sync_error()
        } else {
            self.sync().await
        }
    }

    async fn len(&self) -> Result<u64> {
        self.file
            .file_size()
            .await
            .map_err(|e| glommio_err("stat", &self.name, e))
    }
}
