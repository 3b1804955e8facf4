//! Segment *images*: a segment file without its unused space, as the archive stores it
//! (FORMAT.md §9): the header block, the data area up to the end of the last group,
//! and (sealed segments only) the footer block. A live segment's tail pieces joined
//! from offset 0 are an image too. This module turns files into images and back, and
//! reads frames out of an image, validated as recovery validates a file: the archive's
//! frame reader for `/watch` resumes past the local log, restore and (later) a
//! follower's bootstrap.

use super::frame::Lsn;
use super::reader::OwnedFrame;
use super::scan::{scan_segment, ScanEnd, SegmentScan};
use super::segment::{SegmentFooter, SegmentHeader, DATA_START, MAX_SEGMENT_BYTES};
use crate::buffer::BLOCK_SIZE;

/// A sealed segment file's image: header block, data up to `data_end`, footer block.
/// Refuses a segment whose footer or data checksum is wrong, so a damaged local file
/// is never archived as if it were good.
pub fn sealed_image(
    header_block: &[u8],
    data: &[u8],
    footer_block: &[u8],
) -> Result<(Vec<u8>, SegmentHeader, SegmentFooter), String> {
    if header_block.len() != BLOCK_SIZE || footer_block.len() != BLOCK_SIZE {
        return Err("header and footer are one block each".into());
    }
    let mut image = Vec::with_capacity(2 * BLOCK_SIZE + data.len());
    image.extend_from_slice(header_block);
    image.extend_from_slice(data);
    image.extend_from_slice(footer_block);
    let (header, footer) = check_sealed_image(&image)?;
    Ok((image, header, footer))
}

// An image is the file's first block (the header), its data, then the footer block.
const _: () = assert!(DATA_START == BLOCK_SIZE as u64);

/// [`sealed_image`]'s checks on an image already laid out (a writer that reads the
/// file straight into it saves a copy of the segment).
pub fn check_sealed_image(image: &[u8]) -> Result<(SegmentHeader, SegmentFooter), String> {
    let Some(data_len) = image.len().checked_sub(2 * BLOCK_SIZE) else {
        return Err(format!(
            "{} bytes cannot hold a header and a footer",
            image.len()
        ));
    };
    let (header_block, rest) = image.split_at(BLOCK_SIZE);
    let (data, footer_block) = rest.split_at(data_len);
    let header = SegmentHeader::decode(header_block).map_err(|e| format!("header: {e:?}"))?;
    let footer = SegmentFooter::decode(footer_block).map_err(|e| format!("footer: {e:?}"))?;
    if footer.data_end != DATA_START + data.len() as u64 {
        return Err(format!(
            "footer says data ends at {}, {} bytes were read",
            footer.data_end,
            DATA_START + data.len() as u64
        ));
    }
    if crc32c::crc32c(data) != footer.data_crc {
        return Err("data checksum does not match the footer".into());
    }
    Ok((header, footer))
}

/// Turns an image (a sealed image, or tail pieces joined from offset 0) back into a
/// whole segment file: the header's capacity, zeroes where nothing was stored, the
/// footer in the last block when `sealed`.
pub fn expand_image(image: &[u8], sealed: bool) -> Result<(Vec<u8>, SegmentHeader), String> {
    let (header, capacity, data_len) = image_layout(image, sealed)?;
    // A fresh zeroed allocation: the pages nothing is copied into stay untouched.
    let mut file = vec![0u8; capacity];
    file[..data_len].copy_from_slice(&image[..data_len]);
    if sealed {
        file[capacity - BLOCK_SIZE..].copy_from_slice(&image[data_len..]);
    }
    Ok((file, header))
}

/// [`expand_image`] in the image's own buffer: it grows to the segment's capacity
/// (a large allocation grows in place, without a copy) and only the footer moves, so
/// a restore copies no segment's worth of bytes a second time. The space past the
/// data is zeroed in memory (a whole segment resident), which suits a caller about to
/// write the whole file.
pub fn expand_image_owned(
    mut image: Vec<u8>,
    sealed: bool,
) -> Result<(Vec<u8>, SegmentHeader), String> {
    let (header, capacity, data_len) = image_layout(&image, sealed)?;
    let footer = sealed.then(|| image[data_len..].to_vec());
    image.truncate(data_len);
    image.resize(capacity, 0);
    if let Some(footer) = footer {
        image[capacity - BLOCK_SIZE..].copy_from_slice(&footer);
    }
    Ok((image, header))
}

/// An image's header, its segment's capacity and the length of its stored data,
/// checked to fit that capacity.
fn image_layout(image: &[u8], sealed: bool) -> Result<(SegmentHeader, usize, usize), String> {
    if image.len() < BLOCK_SIZE || !image.len().is_multiple_of(BLOCK_SIZE) {
        return Err(format!(
            "{} bytes is not a whole number of blocks",
            image.len()
        ));
    }
    let header =
        SegmentHeader::decode(&image[..BLOCK_SIZE]).map_err(|e| format!("header: {e:?}"))?;
    if header.capacity_bytes > MAX_SEGMENT_BYTES {
        return Err(format!(
            "its header claims a {}-byte segment, above the largest, {MAX_SEGMENT_BYTES}",
            header.capacity_bytes
        ));
    }
    let capacity = header.capacity_bytes as usize;
    let data_len = image.len() - if sealed { BLOCK_SIZE } else { 0 };
    if data_len > capacity - BLOCK_SIZE || (sealed && data_len < BLOCK_SIZE) {
        return Err(format!(
            "{} bytes do not fit a {capacity}-byte segment",
            image.len()
        ));
    }
    Ok((header, capacity, data_len))
}

/// Where a valid frame sits in a segment file.
#[derive(Debug, Clone, Copy)]
pub struct FrameAt {
    pub lsn: Lsn,
    pub commit_us: u64,
    /// Position in its group commit (0 starts a group, always on a block boundary).
    pub group_index: u32,
    pub start: u64,
}

/// Frames of a whole segment file, validated as recovery validates them. A sealed
/// file must end `Sealed`; an active one `Clean` or `Full`; anything else is damage.
pub fn scan_file(
    file: &[u8],
    header: &SegmentHeader,
    sealed: bool,
    mut on_frame: impl FnMut(&FrameAt),
) -> Result<SegmentScan, String> {
    let scan = scan_segment(file, header, |f, offset| {
        on_frame(&FrameAt {
            lsn: f.lsn,
            commit_us: f.commit_ts.0,
            group_index: f.group_index,
            start: offset,
        });
        Ok::<_, ()>(())
    })
    .map_err(|()| "scan stopped".to_string())?;
    check_end(&scan, sealed)?;
    Ok(scan)
}

/// The frames with LSN in `(after, upto]` of an image (`sealed`: a sealed segment's,
/// else tail pieces joined from offset 0), in order. Damage, a gap, or an image whose
/// frames do not end as its kind must is an error naming what is wrong.
pub fn frames_in_image(
    image: &[u8],
    sealed: bool,
    after: Lsn,
    upto: Lsn,
) -> Result<Vec<OwnedFrame>, String> {
    let (file, header) = expand_image(image, sealed)?;
    let mut frames = Vec::new();
    let mut expected = after.next();
    let scanned = scan_segment(&file, &header, |frame, _| {
        if frame.lsn > upto {
            return Err(None);
        }
        if frame.lsn > after {
            if frame.lsn != expected {
                return Err(Some(format!(
                    "LSN {} follows {}",
                    frame.lsn,
                    expected.0 - 1
                )));
            }
            expected = frame.lsn.next();
            frames.push(OwnedFrame::from(frame));
        }
        Ok(())
    });
    match scanned {
        Err(Some(why)) => return Err(why),
        // Stopped at `upto`: what was read is whole.
        Err(None) => return Ok(frames),
        Ok(scan) => check_end(&scan, sealed)?,
    }
    Ok(frames)
}

fn check_end(scan: &SegmentScan, sealed: bool) -> Result<(), String> {
    match (&scan.end, sealed) {
        (ScanEnd::Sealed(_), true) | (ScanEnd::Clean | ScanEnd::Full, false) => Ok(()),
        (end, _) => Err(format!("the frames end with {end:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::frame::{Epoch, TimestampMicros};

    /// The whole file an image stands for, built the slow way: zeroes, the stored data,
    /// the footer in the last block.
    fn expanded_by_copy(image: &[u8], capacity: usize, sealed: bool) -> Vec<u8> {
        let data_len = image.len() - if sealed { BLOCK_SIZE } else { 0 };
        let mut file = vec![0u8; capacity];
        file[..data_len].copy_from_slice(&image[..data_len]);
        if sealed {
            file[capacity - BLOCK_SIZE..].copy_from_slice(&image[data_len..]);
        }
        file
    }

    #[test]
    fn an_image_expands_in_its_own_buffer_to_the_file_it_stands_for() {
        let capacity = 16 * BLOCK_SIZE;
        let header = SegmentHeader {
            shard: 3,
            max_group_bytes: BLOCK_SIZE as u32,
            epoch: Epoch(1),
            first_lsn: Lsn(7),
            capacity_bytes: capacity as u64,
            created: TimestampMicros(1),
        };
        for (sealed, data_blocks) in [(true, 3), (false, 3), (true, 1), (false, 0)] {
            let mut image = header.encode().to_vec();
            for block in 0..data_blocks {
                image.extend(std::iter::repeat_n(0xA0 + block as u8, BLOCK_SIZE));
            }
            if sealed {
                image.extend(std::iter::repeat_n(0xFF, BLOCK_SIZE));
            }
            let (file, decoded) = expand_image_owned(image.clone(), sealed).expect("expands");
            assert_eq!(decoded, header);
            assert_eq!(
                file,
                expanded_by_copy(&image, capacity, sealed),
                "sealed {sealed}, {data_blocks} data blocks"
            );
            let (borrowed, _) = expand_image(&image, sealed).expect("expands");
            assert_eq!(borrowed, file);
        }
        // More than the capacity holds is refused, not truncated.
        let too_long = vec![0u8; capacity + BLOCK_SIZE];
        let mut too_long_image = header.encode().to_vec();
        too_long_image.extend_from_slice(&too_long[BLOCK_SIZE..]);
        assert!(expand_image_owned(too_long_image, true).is_err());
    }
}
