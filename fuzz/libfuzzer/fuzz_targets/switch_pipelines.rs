#![no_main]
//! Fuzz target `switch_pipelines`: see `mimiq_fuzz_cases::switch_pipelines` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("switch_pipelines", data);
});
