//! A count in a checkpoint frame is untrusted: the loader reserves memory by the bytes
//! left in that frame's payload, never by the count or by the whole snapshot, so a
//! frame claiming four billion rows cannot make a load allocate gigabytes.
//!
//! This file is its own test binary because it installs a global allocator that
//! records the largest single allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use oc_engine::command::Command;
use oc_engine::fuzz_entry::{self, fixture_schema, FIXTURE_TABLE, FIXTURE_TENANT};
use oc_engine::record;
use oc_io::wal::frame::{self, Epoch, Frame, Lsn, RecordKind, TimestampMicros};

struct Largest;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, which is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

#[test]
fn a_rows_frame_claiming_four_billion_rows_reserves_by_its_payload_not_the_snapshot() {
    const VERSION: u8 = 1;
    const PADDING_BYTES: usize = 4 << 20;
    let lsn = Lsn(9);
    let (_, create_table) = record::encode(&Command::CreateTable(fixture_schema()));
    let table_payload = [&[VERSION][..], &9u64.to_le_bytes(), &create_table[1..]].concat();
    let mut rows_payload = vec![VERSION];
    rows_payload.extend_from_slice(&(FIXTURE_TABLE.len() as u16).to_le_bytes());
    rows_payload.extend_from_slice(FIXTURE_TABLE.as_bytes());
    rows_payload.extend_from_slice(&9u64.to_le_bytes());
    rows_payload.extend_from_slice(&u32::MAX.to_le_bytes());
    let padding = vec![0u8; PADDING_BYTES];
    let header = [&[VERSION][..], &[0; 12]].concat();
    let frames: [(u16, &[u8], &[u8]); 5] = [
        (16, b"", &header),
        (17, FIXTURE_TENANT.as_bytes(), &[VERSION]),
        (18, FIXTURE_TENANT.as_bytes(), &table_payload),
        (19, FIXTURE_TENANT.as_bytes(), &rows_payload),
        // Never reached; it makes the snapshot large.
        (22, FIXTURE_TENANT.as_bytes(), &padding),
    ];
    // Mode 0 of the entry: the snapshot bytes as they are.
    let mut input = vec![0u8];
    for (index, (kind, tenant, payload)) in frames.into_iter().enumerate() {
        input.extend_from_slice(&frame::encode(&Frame {
            lsn,
            commit_ts: TimestampMicros(0),
            epoch: Epoch(1),
            group_index: index as u32,
            kind: RecordKind(kind),
            tenant,
            payload,
        }));
    }
    LARGEST_ALLOCATION.store(0, Ordering::Relaxed);
    fuzz_entry::checkpoint_load(&input);
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest < 64 << 10,
        "loading a {} byte snapshot allocated {largest} bytes at once",
        input.len()
    );
}
