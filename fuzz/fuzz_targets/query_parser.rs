//! Arbitrary text through SQL normalization, parsing, binding, planning and execution.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_engine::query::fuzz_entry(data));
