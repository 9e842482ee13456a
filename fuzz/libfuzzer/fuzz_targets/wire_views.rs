#![no_main]
//! Fuzz target `wire_views`: see `mimiq_fuzz_cases::wire_views` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("wire_views", data);
});
