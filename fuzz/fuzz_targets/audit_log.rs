#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keyhaven_broker_core::fuzz_targets::audit_log(data));
