#![no_main]
//! Fuzz target `capsules`: see `mimiq_fuzz_cases::capsules` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("capsules", data);
});
