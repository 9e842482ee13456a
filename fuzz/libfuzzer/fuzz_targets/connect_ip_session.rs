#![no_main]
//! Fuzz target `connect_ip_session`: see `mimiq_fuzz_cases::connect_ip_session` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("connect_ip_session", data);
});
