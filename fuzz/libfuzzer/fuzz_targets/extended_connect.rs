#![no_main]
//! Fuzz target `extended_connect`: see `mimiq_fuzz_cases::extended_connect` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("extended_connect", data);
});
