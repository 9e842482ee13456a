#![no_main]
//! Fuzz target `gen_capture`: see `mimiq_fuzz_cases::gen_capture` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("gen_capture", data);
});
