#![no_main]
//! Fuzz target `tun_coalescer`: see `mimiq_fuzz_cases::tun_coalescer` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("tun_coalescer", data);
});
