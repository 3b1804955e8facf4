//! Arbitrary bytes as a checkpoint (snapshot frames, framed records, or manifest and
//! snapshot files) through the loader (`oc_engine::fuzz_entry::checkpoint_load`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_engine::fuzz_entry::checkpoint_load(data));
