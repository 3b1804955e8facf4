//! Encoded keys as a table's B-trees hold them. A key orders exactly like its bytes
//! (lexicographically: the order `value.rs` encodes), but keeps its first 16 bytes as
//! one big-endian `u128` beside them, so most comparisons are one integer compare
//! instead of a `memcmp` call: int keys (9 bytes) and short text keys never reach the
//! bytes. The profile of `oc-bench engine` had `memcmp` on `Vec<u8>` keys at 11–19%.

use std::borrow::Borrow;
use std::cmp::Ordering;

/// Bytes of a key folded into its integer head.
const HEAD_BYTES: usize = 16;

#[derive(Clone, Debug)]
pub struct Key {
    /// The first 16 bytes, big-endian, zero-padded.
    head: u128,
    bytes: Box<[u8]>,
}

impl Key {
    pub fn new(bytes: Vec<u8>) -> Self {
        let mut head = [0u8; HEAD_BYTES];
        let n = bytes.len().min(HEAD_BYTES);
        head[..n].copy_from_slice(&bytes[..n]);
        Key {
            head: u128::from_be_bytes(head),
            bytes: bytes.into_boxed_slice(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes after the head.
    fn tail(&self) -> &[u8] {
        &self.bytes[self.bytes.len().min(HEAD_BYTES)..]
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        // Equal heads mean equal first min(len, 16) bytes with zero padding: the tails
        // and then the lengths (a prefix sorts first) settle the rest.
        self.head
            .cmp(&other.head)
            .then_with(|| self.tail().cmp(other.tail()))
            .then_with(|| self.bytes.len().cmp(&other.bytes.len()))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.bytes == other.bytes
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
}

/// Lookups by plain bytes order the same way (byte order), as `Borrow` requires.
impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.bytes
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
