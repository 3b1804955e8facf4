//! Block-aligned buffers. O_DIRECT needs the memory address, the file offset and the
//! length all aligned to the device block; [`BLOCK_SIZE`] is the one alignment the whole
//! crate uses (FORMAT.md §1), so a buffer that satisfies it satisfies any 512-byte or
//! 4 KiB device.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// The I/O block: alignment of every buffer, offset and length written with O_DIRECT.
pub const BLOCK_SIZE: usize = 4096;

/// Rounds `n` up to a multiple of [`BLOCK_SIZE`].
pub const fn align_up(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64
}

/// Rounds `n` down to a multiple of [`BLOCK_SIZE`].
pub const fn align_down(n: u64) -> u64 {
    n - n % BLOCK_SIZE as u64
}

/// A buffer that a [`crate::Storage`] can write with O_DIRECT.
pub trait IoBuffer {
    fn as_bytes(&self) -> &[u8];
    fn as_bytes_mut(&mut self) -> &mut [u8];
    /// Shrinks the visible length (it cannot grow back); `len` must be block-aligned
    /// before the buffer is written.
    fn trim_to(&mut self, len: usize);
}

/// A heap buffer aligned to [`BLOCK_SIZE`], zeroed at allocation. Used by the simulated
/// storage and by readers; the real storage uses glommio's registered buffers.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (rounded up to a whole block of capacity).
    pub fn zeroed(len: usize) -> Self {
        let capacity = (align_up(len as u64) as usize).max(BLOCK_SIZE);
        let layout = Self::layout(capacity);
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, capacity, len }
    }

    #[expect(
        clippy::expect_used,
        reason = "block-multiple sizes and block alignment always form a valid layout"
    )]
    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, BLOCK_SIZE)
            .expect("block-multiple sizes are valid layouts")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl IoBuffer for AlignedBuf {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` owns `capacity >= len` initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn trim_to(&mut self, len: usize) {
        assert!(len <= self.len, "a buffer cannot grow by trimming");
        self.len = len;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl IoBuffer for glommio::io::DmaBuffer {
    fn as_bytes(&self) -> &[u8] {
        glommio::io::DmaBuffer::as_bytes(self)
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        glommio::io::DmaBuffer::as_bytes_mut(self)
    }

    fn trim_to(&mut self, len: usize) {
        self.trim_to_size(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_block_aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(10_000);
        assert_eq!(buf.as_bytes().as_ptr() as usize % BLOCK_SIZE, 0);
        assert_eq!(buf.len(), 10_000);
        assert!(buf.as_bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn align_helpers_round_to_blocks() {
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
        assert_eq!(align_down(8191), 4096);
    }
}
