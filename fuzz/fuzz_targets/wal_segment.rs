//! Arbitrary bytes as a WAL segment file through the recovery scanner.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_io::fuzz_entry::wal_segment(data));
