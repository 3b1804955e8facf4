//! Encoded keys as a table's B-trees hold them. A key orders exactly like its bytes
//! (lexicographically: the order `value.rs` encodes), but keeps its first 15 bytes and
//! a length byte as one big-endian `u128` beside them, so most comparisons are one
//! integer compare instead of a `memcmp` call: int keys (9 bytes) and short text keys
//! never reach the bytes. The profile of `oc-bench engine` had `memcmp` on `Vec<u8>`
//! keys at 11–19%. A key of at most 15 bytes lives in its head alone: no allocation of
//! its own. A longer key keeps its bytes behind one thin pointer ([`LongBytes`]), so
//! every key is 24 bytes: the larger part of each B-tree entry (`oc-bench memory`).

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ptr::NonNull;

/// Bytes of a key folded into its integer head; the head's last byte is the length.
const HEAD_BYTES: usize = 15;
/// The length byte of a key longer than the head: above every short key's length, so a
/// short key sorts before a long one with the same first 15 bytes (it is their prefix,
/// zero-padded).
const LONG: u8 = u8::MAX;

const _: () = assert!(std::mem::size_of::<Key>() == 24);
const _: () = assert!(HEAD_BYTES < LONG as usize);

#[derive(Clone, Debug)]
pub struct Key {
    /// The first 15 bytes, zero-padded, then the length (or [`LONG`]): the whole key
    /// when it is that short, so an int key or a short text key needs no allocation of
    /// its own.
    head: [u8; HEAD_BYTES + 1],
    /// The whole key when it is longer than the head.
    long: Option<LongBytes>,
}

/// A key's bytes behind a thin pointer: one allocation of a `u32` length (native
/// endian, unaligned) followed by the bytes. A `Box<[u8]>` would carry its length in a
/// second word of every key instead.
struct LongBytes(NonNull<u8>);

/// Bytes of the length before a [`LongBytes`]' bytes.
const LENGTH_BYTES: usize = 4;

// SAFETY: a `LongBytes` owns its allocation alone (as a `Box` does) and never mutates
// it after `new`.
unsafe impl Send for LongBytes {}
// SAFETY: as above; shared references only read.
unsafe impl Sync for LongBytes {}

impl LongBytes {
    #[expect(clippy::expect_used, reason = "a key is at most MAX_KEY_BYTES long")]
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(LENGTH_BYTES + len, 1).expect("a key's length fits a layout")
    }

    #[expect(clippy::expect_used, reason = "a key is at most MAX_KEY_BYTES long")]
    fn new(bytes: &[u8]) -> Self {
        let len = u32::try_from(bytes.len()).expect("keys are bounded far below 4 GiB");
        let layout = LongBytes::layout(bytes.len());
        // SAFETY: the layout's size is at least LENGTH_BYTES, so not zero.
        let Some(ptr) = NonNull::new(unsafe { alloc(layout) }) else {
            handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds LENGTH_BYTES then bytes.len() bytes; the length
        // is written unaligned (the allocation's alignment is 1), and the source cannot
        // overlap a fresh allocation.
        unsafe {
            ptr.as_ptr().cast::<u32>().write_unaligned(len);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                ptr.as_ptr().add(LENGTH_BYTES),
                bytes.len(),
            );
        }
        LongBytes(ptr)
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `new` wrote the length and that many bytes after it, and nothing
        // writes to the allocation until `drop`.
        unsafe {
            let len = self.0.as_ptr().cast::<u32>().read_unaligned() as usize;
            std::slice::from_raw_parts(self.0.as_ptr().add(LENGTH_BYTES), len)
        }
    }
}

impl Drop for LongBytes {
    fn drop(&mut self) {
        let layout = LongBytes::layout(self.as_slice().len());
        // SAFETY: allocated in `new` with this same layout, and dropped once.
        unsafe { dealloc(self.0.as_ptr(), layout) }
    }
}

impl Clone for LongBytes {
    fn clone(&self) -> Self {
        LongBytes::new(self.as_slice())
    }
}

impl std::fmt::Debug for LongBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl Key {
    pub fn new(bytes: Vec<u8>) -> Self {
        Key::from_slice(&bytes)
    }

    /// The same from borrowed bytes: copied only into the head when they fit it.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut head = [0u8; HEAD_BYTES + 1];
        if bytes.len() <= HEAD_BYTES {
            head[..bytes.len()].copy_from_slice(bytes);
            head[HEAD_BYTES] = bytes.len() as u8;
            return Key { head, long: None };
        }
        head[..HEAD_BYTES].copy_from_slice(&bytes[..HEAD_BYTES]);
        head[HEAD_BYTES] = LONG;
        Key {
            head,
            long: Some(LongBytes::new(bytes)),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.long {
            None => &self.head[..usize::from(self.head[HEAD_BYTES])],
            Some(long) => long.as_slice(),
        }
    }

    /// The bytes after the head.
    fn tail(&self) -> &[u8] {
        match &self.long {
            None => &[],
            Some(long) => &long.as_slice()[HEAD_BYTES..],
        }
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        // Equal heads mean equal first 15 bytes with zero padding and equal length
        // bytes: two short keys are then equal, two long ones are settled by their tails
        // (a prefix sorts first).
        u128::from_be_bytes(self.head)
            .cmp(&u128::from_be_bytes(other.head))
            .then_with(|| self.tail().cmp(other.tail()))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.tail() == other.tail()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

/// Lookups by plain bytes order the same way (byte order), as `Borrow` requires.
impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        // Short alphabets and lengths around 16 make equal heads and prefixes common.
        prop::collection::vec(prop::sample::select(vec![0u8, 1, 0x7f, 0xff]), 0..40)
    }

    proptest! {
        #[test]
        fn keys_order_exactly_like_their_bytes(a in bytes(), b in bytes()) {
            let (ka, kb) = (Key::new(a.clone()), Key::new(b.clone()));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(ka == kb, a == b);
            prop_assert_eq!((ka.as_bytes(), kb.as_bytes()), (&a[..], &b[..]));
            prop_assert_eq!(Key::from_slice(&a), ka);
        }
    }

    #[test]
    fn prefixes_and_zero_padding_do_not_confuse_the_head() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"ab", b"ab\0"),
            (&[1; 15], &[1; 16]),
            (&[1; 16], &[1; 17]),
            (
                b"a",
                &[b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            (b"", b"\0"),
        ];
        for (short, long) in cases {
            assert_eq!(
                Key::new(short.to_vec()).cmp(&Key::new(long.to_vec())),
                Ordering::Less
            );
        }
    }
}
