#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| broker_agent::fuzz_targets::agent_config(data));
