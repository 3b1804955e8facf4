//! The raw-disk baseline, driven by the `io-uring` crate directly (no glommio, no
//! WAL): what the device and file system give to a program that does nothing else.
//! Both cases write into a file that was zero-filled first, as WAL segments are, so
//! neither pays for block allocation or unwritten-extent conversion.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use io_uring::{opcode, types, IoUring};
use oc_io::{AlignedBuf, IoBuffer};

use crate::latency::histogram;

const MIB: usize = 1 << 20;

/// Creates `path` with `bytes` of zeroes written through O_DIRECT, then syncs it.
pub fn zero_filled_file(path: &Path, bytes: u64) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let zeroes = AlignedBuf::zeroed(MIB);
    let mut at = 0;
    while at < bytes {
        file.write_all_at(zeroes.as_bytes(), at)
            .context("zero-filling")?;
        at += MIB as u64;
    }
    file.sync_all().context("syncing the zero-filled file")?;
    Ok(file)
}

/// Sequential O_DIRECT writes of `block` bytes with `depth` in flight, wrapping
/// around in the file, for `duration`. Returns MB/s (10^6 bytes per second).
pub fn sequential_write_mb_s(
    file: &File,
    file_bytes: u64,
    block: usize,
    depth: usize,
    duration: Duration,
) -> Result<f64> {
    let mut ring = IoUring::new((depth * 2) as u32).context("creating an io_uring")?;
    let mut buffers: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::zeroed(block)).collect();
    for (i, b) in buffers.iter_mut().enumerate() {
        b.as_bytes_mut().fill(i as u8 + 1);
    }
    let fd = types::Fd(file.as_raw_fd());
    let slots = file_bytes / block as u64;
    let (mut next, mut in_flight, mut written) = (0u64, 0usize, 0u64);
    let mut free: Vec<usize> = (0..depth).collect();
    let start = Instant::now();
    loop {
        let running = start.elapsed() < duration;
        while running && !free.is_empty() {
            let slot = free.pop().expect("checked non-empty");
            let buf = &mut buffers[slot];
            let offset = (next % slots) * block as u64;
            next += 1;
            let entry = opcode::Write::new(fd, buf.as_bytes_mut().as_mut_ptr(), block as u32)
                .offset(offset)
                .build()
                .user_data(slot as u64);
            // SAFETY: the buffer lives in `buffers` until its completion is reaped.
            unsafe { ring.submission().push(&entry) }.context("submission queue full")?;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        ring.submit_and_wait(1).context("io_uring submit")?;
        for cqe in ring.completion() {
            if cqe.result() != block as i32 {
                bail!("raw write returned {}", cqe.result());
            }
            written += block as u64;
            in_flight -= 1;
            free.push(cqe.user_data() as usize);
        }
    }
    Ok(written as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// One `block`-byte O_DIRECT write linked to an `fdatasync`, one pair at a time, at
/// sequential offsets, for `duration`. Returns (operations per second, latency µs).
pub fn write_fdatasync(
    file: &File,
    file_bytes: u64,
    block: usize,
    duration: Duration,
) -> Result<(f64, Histogram<u64>)> {
    let mut ring = IoUring::new(4).context("creating an io_uring")?;
    let mut buf = AlignedBuf::zeroed(block);
    buf.as_bytes_mut().fill(0x5A);
    let fd = types::Fd(file.as_raw_fd());
    let slots = file_bytes / block as u64;
    let mut hist = histogram();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < duration {
        let offset = (ops % slots) * block as u64;
        let write = opcode::Write::new(fd, buf.as_bytes_mut().as_mut_ptr(), block as u32)
            .offset(offset)
            .build()
            .flags(io_uring::squeue::Flags::IO_LINK)
            .user_data(1);
        let sync = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(2);
        let began = Instant::now();
        // SAFETY: `buf` outlives both operations, which complete before the next loop.
        unsafe {
            let mut sq = ring.submission();
            sq.push(&write).context("submission queue full")?;
            sq.push(&sync).context("submission queue full")?;
        }
        ring.submit_and_wait(2).context("io_uring submit")?;
        for cqe in ring.completion() {
            let expected = if cqe.user_data() == 1 {
                block as i32
            } else {
                0
            };
            if cqe.result() != expected {
                bail!("raw write/fdatasync returned {}", cqe.result());
            }
        }
        hist.saturating_record(began.elapsed().as_micros() as u64);
        ops += 1;
    }
    Ok((ops as f64 / start.elapsed().as_secs_f64(), hist))
}
