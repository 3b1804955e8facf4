//! Arbitrary bytes through the WAL frame decoder.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_io::fuzz_entry::wal_frame(data));
