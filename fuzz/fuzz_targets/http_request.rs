//! Arbitrary bytes as an HTTP/1.1 request through the data API's parsing, routing,
//! header checks and body handling (`oc_net::api::fuzz::fuzz_entry`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| oc_net::api::fuzz::fuzz_entry(data));
