#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhaven_broker::fuzz_targets::jwt(data));
