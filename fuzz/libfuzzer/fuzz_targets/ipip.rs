#![no_main]
//! Fuzz target `ipip`: see `mimiq_fuzz_cases::ipip` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("ipip", data);
});
