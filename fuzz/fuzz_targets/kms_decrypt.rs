#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kms_plugin::fuzz_targets::decrypt_request(data));
