//! Every archive object is its payload followed by a 24-byte trailer that makes the
//! object self-checking wherever it is stored (FORMAT.md §8):
//!
//! | offset from the trailer's start | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `OCAR` |
//! | 4 | 2 | version, u16 LE (1) |
//! | 6 | 2 | reserved, zero |
//! | 8 | 8 | payload length, u64 LE |
//! | 16 | 4 | CRC-32C of the payload, u32 LE |
//! | 20 | 4 | CRC-32C of trailer bytes 0..20, u32 LE |

/// Bytes of the trailer.
pub const TRAILER_BYTES: usize = 24;
const MAGIC: &[u8; 4] = b"OCAR";
const VERSION: u16 = 1;

const _: () = assert!(TRAILER_BYTES == 4 + 2 + 2 + 8 + 4 + 4);

/// The payload with its trailer.
pub fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + TRAILER_BYTES);
    out.extend_from_slice(payload);
    out.extend_from_slice(&trailer(payload).bytes);
    out
}

/// The trailer that follows `payload`, for a writer that stores the two without
/// joining them (a join is a copy of the whole payload).
pub struct Trailer {
    pub bytes: [u8; TRAILER_BYTES],
    /// The CRC-32C of the payload (bytes 16..20).
    pub payload_crc: u32,
}

impl Trailer {
    /// The CRC-32C of the whole object, payload and trailer, without reading the
    /// payload again.
    pub fn object_crc(&self) -> u32 {
        crc32c::crc32c_combine(self.payload_crc, crc32c::crc32c(&self.bytes), TRAILER_BYTES)
    }
}

pub fn trailer(payload: &[u8]) -> Trailer {
    let payload_crc = crc32c::crc32c(payload);
    let mut bytes = [0u8; TRAILER_BYTES];
    bytes[..4].copy_from_slice(MAGIC);
    bytes[4..6].copy_from_slice(&VERSION.to_le_bytes());
    bytes[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes[16..20].copy_from_slice(&payload_crc.to_le_bytes());
    let trailer_crc = crc32c::crc32c(&bytes[..20]);
    bytes[20..].copy_from_slice(&trailer_crc.to_le_bytes());
    Trailer { bytes, payload_crc }
}

/// The payload of a sealed object, after checking its trailer and checksum.
pub fn open(object: &[u8]) -> Result<&[u8], String> {
    let Some(split) = object.len().checked_sub(TRAILER_BYTES) else {
        return Err(format!(
            "{} bytes is shorter than the {TRAILER_BYTES}-byte trailer",
            object.len()
        ));
    };
    let (payload, trailer) = object.split_at(split);
    let word = |at: usize| {
        u32::from_le_bytes([
            trailer[at],
            trailer[at + 1],
            trailer[at + 2],
            trailer[at + 3],
        ])
    };
    if &trailer[..4] != MAGIC {
        return Err("no OCAR trailer: not an oc archive object, or truncated".into());
    }
    if crc32c::crc32c(&trailer[..20]) != word(20) {
        return Err("the trailer's own checksum does not match".into());
    }
    let version = u16::from_le_bytes([trailer[4], trailer[5]]);
    if version != VERSION {
        return Err(format!(
            "trailer version {version} is not supported (this build reads {VERSION})"
        ));
    }
    let length = u64::from(word(8)) | (u64::from(word(12)) << 32);
    if length != payload.len() as u64 {
        return Err(format!(
            "the trailer says {length} payload bytes, the object has {}",
            payload.len()
        ));
    }
    if crc32c::crc32c(payload) != word(16) {
        return Err("the payload's checksum does not match".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_open_to_their_payload() {
        for payload in [&b""[..], b"x", &[7u8; 5000]] {
            assert_eq!(open(&seal(payload)), Ok(payload));
        }
    }

    #[test]
    fn an_objects_crc_from_its_trailer_is_the_crc_of_its_bytes() {
        for payload in [&b""[..], b"x", &[7u8; 5000], &[0xa5; 1 << 20]] {
            let trailer = trailer(payload);
            assert_eq!(trailer.object_crc(), crc32c::crc32c(&seal(payload)));
            assert_eq!(trailer.payload_crc, crc32c::crc32c(payload));
        }
    }

    #[test]
    fn every_single_bit_flip_and_every_truncation_is_refused() {
        let sealed = seal(b"segment bytes that must not change");
        for byte in 0..sealed.len() {
            for bit in 0..8 {
                let mut damaged = sealed.clone();
                damaged[byte] ^= 1 << bit;
                assert!(
                    open(&damaged).is_err(),
                    "flip at {byte}.{bit} went unnoticed"
                );
            }
        }
        for cut in 0..sealed.len() {
            assert!(open(&sealed[..cut]).is_err(), "cut at {cut} went unnoticed");
        }
    }

    #[test]
    fn the_trailer_layout_is_the_documented_one() {
        let sealed = seal(b"abc");
        let t = &sealed[3..];
        assert_eq!(&t[..4], b"OCAR");
        assert_eq!(&t[4..8], &[1, 0, 0, 0]);
        assert_eq!(&t[8..16], &3u64.to_le_bytes());
        assert_eq!(&t[16..20], &crc32c::crc32c(b"abc").to_le_bytes());
    }
}
