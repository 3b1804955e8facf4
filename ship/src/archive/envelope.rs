//! Every archive object is its payload, stored as is or compressed, followed by a
//! 24-byte trailer that makes the object self-checking wherever it is stored
//! (FORMAT.md §8):
//!
//! | offset from the trailer's start | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `OCAR` |
//! | 4 | 2 | version, u16 LE: 1 (stored as is) or 2 (encoded, see bytes 6..8) |
//! | 6 | 2 | version 1: zero; version 2: the encoding, u16 LE (1 = LZ4 block) |
//! | 8 | 8 | stored length, u64 LE |
//! | 16 | 4 | CRC-32C of the stored bytes, u32 LE |
//! | 20 | 4 | CRC-32C of trailer bytes 0..20, u32 LE |
//!
//! An LZ4-encoded payload starts with its decoded length (u64 LE) and the CRC-32C of
//! the decoded bytes (u32 LE), then one LZ4 block. Why compress at all: at a low write
//! rate every log group is padded with zeros to a 4 KiB block, and the archive took
//! those zeros twice (as a tail piece, then in the sealed segment) on the disk the log
//! syncs to. Why LZ4: it runs at memory speed on that padding, so the shipping thread
//! spends less time compressing than it saves writing. An object that does not shrink
//! by an eighth is stored as is (version 1, as every object was before encodings), and
//! so is every record (`seal_plain`: the owner record, manifests, timelines), which any
//! build must be able to read. A build that reads only version 1 refuses an encoded
//! object by its version, and an archive holding them by its manifest's
//! `format_version` (FORMAT.md §9).

use std::borrow::Cow;

/// Bytes of the trailer.
pub const TRAILER_BYTES: usize = 24;
const MAGIC: &[u8; 4] = b"OCAR";
/// A payload stored as is.
const VERSION_PLAIN: u16 = 1;
/// A payload stored in the encoding that trailer bytes 6..8 name.
const VERSION_ENCODED: u16 = 2;
const ENCODING_LZ4: u16 = 1;
/// Decoded length and decoded CRC-32C, before an LZ4 block.
const LZ4_HEADER_BYTES: usize = 8 + 4;
/// Smaller payloads are stored as is: too little to save.
const COMPRESS_FROM_BYTES: usize = 4096;
/// Larger payloads are stored as is. This bounds the encoder's scratch buffer (it
/// wants 1.1 times the payload) and what a reader allocates for a claimed length: a
/// log segment is 64 MiB by default, so only a large checkpoint is stored as is.
const COMPRESS_UP_TO_BYTES: usize = 256 << 20;
/// LZ4 encodes a run of up to 255 more bytes in each further byte, so no block
/// decodes to more than this many times its size (plus a sequence's worth): a larger
/// claimed length is damage, refused before anything is allocated for it.
const LZ4_MAX_RATIO: usize = 256;

const _: () = assert!(TRAILER_BYTES == 4 + 2 + 2 + 8 + 4 + 4);

/// An object ready to store: its stored bytes (the payload, or its encoding) and the
/// trailer that follows them. A writer may store the two without joining them (a join
/// is a copy of the whole body).
pub struct Sealed<'a> {
    pub body: Cow<'a, [u8]>,
    pub trailer: [u8; TRAILER_BYTES],
    body_crc: u32,
}

impl Sealed<'_> {
    /// Bytes of the whole object, body and trailer.
    pub fn len(&self) -> usize {
        self.body.len() + TRAILER_BYTES
    }

    /// Never: an object holds at least its trailer.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The CRC-32C of the whole object, body and trailer, without reading the body
    /// again.
    pub fn object_crc(&self) -> u32 {
        crc32c::crc32c_combine(self.body_crc, crc32c::crc32c(&self.trailer), TRAILER_BYTES)
    }

    /// The whole object in one buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.trailer);
        out
    }
}

/// Seals `payload` as is (trailer version 1): for records every build must read, such
/// as `lease.json` and the manifests that say which format the rest is in.
pub fn seal_plain(payload: &[u8]) -> Sealed<'_> {
    let body_crc = crc32c::crc32c(payload);
    Sealed {
        trailer: trailer(payload, body_crc, VERSION_PLAIN, 0),
        body: Cow::Borrowed(payload),
        body_crc,
    }
}

/// Seals `payload`: LZ4-encoded when that saves at least an eighth, as is otherwise.
pub fn seal(payload: &[u8]) -> Sealed<'_> {
    let payload_crc = crc32c::crc32c(payload);
    let (body, body_crc, version, encoding) = match lz4_encode(payload, payload_crc) {
        Some(encoded) => {
            let crc = crc32c::crc32c(&encoded);
            (Cow::Owned(encoded), crc, VERSION_ENCODED, ENCODING_LZ4)
        }
        None => (Cow::Borrowed(payload), payload_crc, VERSION_PLAIN, 0),
    };
    Sealed {
        trailer: trailer(&body, body_crc, version, encoding),
        body,
        body_crc,
    }
}

fn trailer(body: &[u8], body_crc: u32, version: u16, encoding: u16) -> [u8; TRAILER_BYTES] {
    let mut trailer = [0u8; TRAILER_BYTES];
    trailer[..4].copy_from_slice(MAGIC);
    trailer[4..6].copy_from_slice(&version.to_le_bytes());
    trailer[6..8].copy_from_slice(&encoding.to_le_bytes());
    trailer[8..16].copy_from_slice(&(body.len() as u64).to_le_bytes());
    trailer[16..20].copy_from_slice(&body_crc.to_le_bytes());
    let trailer_crc = crc32c::crc32c(&trailer[..20]);
    trailer[20..].copy_from_slice(&trailer_crc.to_le_bytes());
    trailer
}

/// The LZ4 encoding of `payload` (whose CRC-32C is `payload_crc`) with its header,
/// unless the payload is outside the sizes worth encoding or does not shrink by an
/// eighth.
fn lz4_encode(payload: &[u8], payload_crc: u32) -> Option<Vec<u8>> {
    if !(COMPRESS_FROM_BYTES..=COMPRESS_UP_TO_BYTES).contains(&payload.len()) {
        return None;
    }
    // The encoder insists on room for its worst case. A large `vec![0; n]` comes
    // zeroed from the kernel, so only the pages the encoder writes cost memory: the
    // output's, or about the payload's size for a payload that does not shrink.
    let room = LZ4_HEADER_BYTES + lz4_flex::block::get_maximum_output_size(payload.len());
    let mut out = vec![0u8; room];
    out[..8].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[8..12].copy_from_slice(&payload_crc.to_le_bytes());
    let written = lz4_flex::block::compress_into(payload, &mut out[LZ4_HEADER_BYTES..]).ok()?;
    let encoded = LZ4_HEADER_BYTES + written;
    if encoded > payload.len() - payload.len() / 8 {
        return None;
    }
    out.truncate(encoded);
    out.shrink_to_fit();
    Some(out)
}

/// The payload of a stored object, after checking its trailer and checksums and
/// decoding it.
pub fn open(mut object: Vec<u8>) -> Result<Vec<u8>, String> {
    let Some(split) = object.len().checked_sub(TRAILER_BYTES) else {
        return Err(format!(
            "{} bytes is shorter than the {TRAILER_BYTES}-byte trailer",
            object.len()
        ));
    };
    let (body, trailer) = object.split_at(split);
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
    let encoding = u16::from_le_bytes([trailer[6], trailer[7]]);
    match (version, encoding) {
        (VERSION_PLAIN, _) | (VERSION_ENCODED, ENCODING_LZ4) => {}
        (VERSION_ENCODED, other) => {
            return Err(format!(
                "payload encoding {other} is not supported (this build reads {ENCODING_LZ4}, LZ4)"
            ))
        }
        (other, _) => {
            return Err(format!(
                "trailer version {other} is not supported (this build reads \
                 {VERSION_PLAIN} and {VERSION_ENCODED})"
            ))
        }
    }
    let length = u64::from(word(8)) | (u64::from(word(12)) << 32);
    if length != body.len() as u64 {
        return Err(format!(
            "the trailer says {length} stored bytes, the object has {}",
            body.len()
        ));
    }
    if crc32c::crc32c(body) != word(16) {
        return Err("the stored bytes' checksum does not match".into());
    }
    if version == VERSION_ENCODED {
        return lz4_decode(body);
    }
    object.truncate(split);
    Ok(object)
}

fn lz4_decode(body: &[u8]) -> Result<Vec<u8>, String> {
    let Some((header, block)) = body.split_at_checked(LZ4_HEADER_BYTES) else {
        return Err(format!(
            "an LZ4 body of {} bytes is shorter than its {LZ4_HEADER_BYTES}-byte header",
            body.len()
        ));
    };
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[..8]);
    let length = u64::from_le_bytes(length);
    let crc = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if length > COMPRESS_UP_TO_BYTES as u64 {
        return Err(format!(
            "the LZ4 header claims {length} decoded bytes, more than any writer encodes \
             ({COMPRESS_UP_TO_BYTES})"
        ));
    }
    let most = block.len().saturating_mul(LZ4_MAX_RATIO).saturating_add(64);
    let length = usize::try_from(length)
        .ok()
        .filter(|&length| length <= most)
        .ok_or_else(|| {
            format!(
                "the LZ4 header claims {length} decoded bytes from a {}-byte block, more \
                 than LZ4 can encode in it",
                block.len()
            )
        })?;
    let mut payload = Vec::new();
    payload
        .try_reserve_exact(length)
        .map_err(|_| format!("no memory for the {length} decoded bytes"))?;
    payload.resize(length, 0);
    let decoded = lz4_flex::block::decompress_into(block, &mut payload)
        .map_err(|e| format!("the LZ4 block does not decode: {e}"))?;
    if decoded != length {
        return Err(format!(
            "the LZ4 block decodes to {decoded} bytes, its header says {length}"
        ));
    }
    if crc32c::crc32c(&payload) != crc {
        return Err("the decoded payload's checksum does not match".into());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log's bytes at a low write rate: each 4 KiB block one small group, padded.
    fn padded_groups(blocks: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; blocks * 4096];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for block in bytes.chunks_mut(4096) {
            for b in &mut block[..300] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        bytes
    }

    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn version_of(object: &[u8]) -> u16 {
        let t = &object[object.len() - TRAILER_BYTES..];
        u16::from_le_bytes([t[4], t[5]])
    }

    /// An object around `body` with a valid trailer of this version and encoding,
    /// whatever the body holds: what damage past the checksums would look like.
    fn wrapped(body: &[u8], version: u16, encoding: u16) -> Vec<u8> {
        let mut object = body.to_vec();
        object.extend_from_slice(&trailer(body, crc32c::crc32c(body), version, encoding));
        object
    }

    #[test]
    fn sealed_objects_open_to_their_payload_encoded_only_when_it_pays() {
        let cases: [(Vec<u8>, u16); 7] = [
            (Vec::new(), VERSION_PLAIN),
            (b"x".to_vec(), VERSION_PLAIN),
            (vec![7u8; COMPRESS_FROM_BYTES - 1], VERSION_PLAIN),
            (vec![7u8; COMPRESS_FROM_BYTES], VERSION_ENCODED),
            (vec![7u8; 5000], VERSION_ENCODED),
            (noise(1 << 16), VERSION_PLAIN),
            (padded_groups(256), VERSION_ENCODED),
        ];
        for (payload, version) in cases {
            let object = seal(&payload).to_bytes();
            assert_eq!(version_of(&object), version, "{} bytes", payload.len());
            assert_eq!(open(object), Ok(payload));
        }
    }

    #[test]
    fn a_padded_log_is_stored_in_a_tenth_of_its_bytes() {
        let payload = padded_groups(1024);
        let sealed = seal(&payload);
        assert!(
            sealed.len() * 10 < payload.len(),
            "{} bytes stored for {}",
            sealed.len(),
            payload.len()
        );
    }

    #[test]
    fn the_most_compressible_payload_decodes_within_the_ratio_bound() {
        let payload = vec![0u8; 16 << 20];
        let object = seal(&payload).to_bytes();
        assert_eq!(version_of(&object), VERSION_ENCODED);
        let block = object.len() - TRAILER_BYTES - LZ4_HEADER_BYTES;
        assert!(
            payload.len() <= block * LZ4_MAX_RATIO,
            "ratio {}",
            payload.len() / block
        );
        assert_eq!(open(object).map(|p| p.len()), Ok(payload.len()));
    }

    #[test]
    fn an_objects_crc_from_its_trailer_is_the_crc_of_its_bytes() {
        for payload in [
            vec![],
            b"x".to_vec(),
            vec![7u8; 5000],
            vec![0xa5; 1 << 20],
            noise(9000),
        ] {
            let sealed = seal(&payload);
            let crc = sealed.object_crc();
            let len = sealed.len();
            let object = sealed.to_bytes();
            assert_eq!(crc, crc32c::crc32c(&object));
            assert_eq!(len, object.len());
        }
    }

    #[test]
    fn every_single_bit_flip_and_every_truncation_is_refused() {
        let plain = seal(b"segment bytes that must not change").to_bytes();
        let encoded = seal(&padded_groups(2)).to_bytes();
        assert_eq!(version_of(&encoded), VERSION_ENCODED);
        for sealed in [plain, encoded] {
            for byte in 0..sealed.len() {
                for bit in 0..8 {
                    let mut damaged = sealed.clone();
                    damaged[byte] ^= 1 << bit;
                    assert!(
                        open(damaged).is_err(),
                        "flip at {byte}.{bit} went unnoticed"
                    );
                }
            }
            for cut in 0..sealed.len() {
                assert!(
                    open(sealed[..cut].to_vec()).is_err(),
                    "cut at {cut} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn an_encoded_body_that_checks_but_does_not_decode_is_refused_by_name() {
        let payload = padded_groups(4);
        let object = seal(&payload).to_bytes();
        let body = &object[..object.len() - TRAILER_BYTES];
        let refusal = |body: &[u8], version, encoding| {
            open(wrapped(body, version, encoding)).expect_err("opened")
        };

        let short = refusal(&body[..LZ4_HEADER_BYTES - 1], VERSION_ENCODED, ENCODING_LZ4);
        assert!(short.contains("shorter than its 12-byte header"), "{short}");

        let mut huge = body.to_vec();
        huge[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        let huge = refusal(&huge, VERSION_ENCODED, ENCODING_LZ4);
        assert!(huge.contains("more than any writer encodes"), "{huge}");

        // One past what the block could hold is refused unallocated; the bound itself
        // passes that check and fails on what the block decodes to.
        let most = (body.len() - LZ4_HEADER_BYTES) * LZ4_MAX_RATIO + 64;
        let mut past = body.to_vec();
        past[..8].copy_from_slice(&(most as u64 + 1).to_le_bytes());
        let past = refusal(&past, VERSION_ENCODED, ENCODING_LZ4);
        assert!(past.contains("more than LZ4 can encode"), "{past}");
        let mut at = body.to_vec();
        at[..8].copy_from_slice(&(most as u64).to_le_bytes());
        let at = refusal(&at, VERSION_ENCODED, ENCODING_LZ4);
        assert!(at.contains(&format!("its header says {most}")), "{at}");

        let mut longer = body.to_vec();
        longer[..8].copy_from_slice(&(payload.len() as u64 + 1).to_le_bytes());
        let longer = refusal(&longer, VERSION_ENCODED, ENCODING_LZ4);
        assert!(longer.contains("its header says"), "{longer}");

        let mut wrong_crc = body.to_vec();
        wrong_crc[8] ^= 1;
        let wrong_crc = refusal(&wrong_crc, VERSION_ENCODED, ENCODING_LZ4);
        assert!(
            wrong_crc.contains("decoded payload's checksum"),
            "{wrong_crc}"
        );

        let mut broken = body.to_vec();
        broken.truncate(body.len() - 3);
        let broken = refusal(&broken, VERSION_ENCODED, ENCODING_LZ4);
        assert!(broken.contains("the LZ4 block does not decode"), "{broken}");

        let unknown = refusal(body, VERSION_ENCODED, 2);
        assert!(unknown.contains("encoding 2 is not supported"), "{unknown}");
        let newer = refusal(body, 3, ENCODING_LZ4);
        assert!(newer.contains("version 3 is not supported"), "{newer}");
        // Read as a plain payload, an encoded body is its bytes, unchanged.
        assert_eq!(open(wrapped(body, VERSION_PLAIN, 0)).as_deref(), Ok(body));
    }

    #[test]
    fn the_trailer_layout_is_the_documented_one() {
        let sealed = seal(b"abc").to_bytes();
        let t = &sealed[3..];
        assert_eq!(&t[..4], b"OCAR");
        assert_eq!(&t[4..8], &[1, 0, 0, 0]);
        assert_eq!(&t[8..16], &3u64.to_le_bytes());
        assert_eq!(&t[16..20], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&t[20..24], &crc32c::crc32c(&t[..20]).to_le_bytes());

        let payload = vec![0u8; 8192];
        let sealed = seal(&payload).to_bytes();
        let (body, t) = sealed.split_at(sealed.len() - TRAILER_BYTES);
        assert_eq!(&t[..4], b"OCAR");
        assert_eq!(&t[4..8], &[2, 0, 1, 0], "version 2, encoding 1 (LZ4)");
        assert_eq!(&t[8..16], &(body.len() as u64).to_le_bytes());
        assert_eq!(&t[16..20], &crc32c::crc32c(body).to_le_bytes());
        assert_eq!(&body[..8], &8192u64.to_le_bytes());
        assert_eq!(&body[8..12], &crc32c::crc32c(&payload).to_le_bytes());
        let decoded = lz4_flex::block::decompress(&body[12..], 8192).expect("an LZ4 block");
        assert_eq!(decoded, payload);
    }
}
