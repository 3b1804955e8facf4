//! Arbitrary bytes as WAL record payloads through the engine's decoder, then applied
//! as replay applies them (`oc_engine::fuzz_entry::record_decode` says the format).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_engine::fuzz_entry::record_decode(data));
