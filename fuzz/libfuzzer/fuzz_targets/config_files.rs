#![no_main]
//! Fuzz target `config_files`: see `mimiq_fuzz_cases::config_files` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("config_files", data);
});
