#![no_main]
//! Fuzz target `http_datagrams`: see `mimiq_fuzz_cases::http_datagrams` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("http_datagrams", data);
});
