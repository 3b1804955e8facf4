//! Encoded keys as a table's B-trees hold them. A key orders exactly like its bytes
//! (lexicographically: the order `value.rs` encodes), but keeps its first 16 bytes as
//! one big-endian `u128` beside them, so most comparisons are one integer compare
//! instead of a `memcmp` call: int keys (9 bytes) and short text keys never reach the
//! bytes. The profile of `oc-bench engine` had `memcmp` on `Vec<u8>` keys at 11–19%.
//! A key of at most 16 bytes lives in its head alone: no allocation of its own.

use std::borrow::Borrow;
use std::cmp::Ordering;

/// Bytes of a key folded into its integer head.
const HEAD_BYTES: usize = 16;

#[derive(Clone, Debug)]
pub struct Key {
    /// The first 16 bytes, zero-padded: the whole key when it is that short, so an int
    /// key or a short text key needs no allocation of its own.
    head: [u8; HEAD_BYTES],
    len: u32,
    /// The whole key when it is longer than the head; empty (no allocation) otherwise.
    long: Box<[u8]>,
}

impl Key {
    pub fn new(bytes: Vec<u8>) -> Self {
        if bytes.len() <= HEAD_BYTES {
            return Key::new_short(&bytes);
        }
        let mut head = [0u8; HEAD_BYTES];
        head.copy_from_slice(&bytes[..HEAD_BYTES]);
        // Keys are bounded far below (MAX_KEY_BYTES; a log's delete key by its u32).
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        Key {
            head,
            len,
            long: bytes.into_boxed_slice(),
        }
    }

    /// The same from borrowed bytes: copied only into the head when they fit it.
    pub fn from_slice(bytes: &[u8]) -> Self {
        if bytes.len() > HEAD_BYTES {
            Key::new(bytes.to_vec())
        } else {
            Key::new_short(bytes)
        }
    }

    fn new_short(bytes: &[u8]) -> Self {
        let mut head = [0u8; HEAD_BYTES];
        head[..bytes.len()].copy_from_slice(bytes);
        Key {
            head,
            len: bytes.len() as u32,
            long: Box::default(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        if self.long.is_empty() {
            &self.head[..self.len as usize]
        } else {
            &self.long
        }
    }

    /// The bytes after the head.
    fn tail(&self) -> &[u8] {
        self.long.get(HEAD_BYTES..).unwrap_or_default()
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        // Equal heads mean equal first min(len, 16) bytes with zero padding: the tails
        // and then the lengths (a prefix sorts first) settle the rest.
        u128::from_be_bytes(self.head)
            .cmp(&u128::from_be_bytes(other.head))
            .then_with(|| self.tail().cmp(other.tail()))
            .then_with(|| self.len.cmp(&other.len))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.len == other.len && self.tail() == other.tail()
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
        prop::collection::vec(prop::sample::select(vec![0u8, 1, 0x7f, 0xff]), 0..24)
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
        let cases: [(&[u8], &[u8]); 4] = [
            (b"ab", b"ab\0"),
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
