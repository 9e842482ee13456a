#![no_main]
//! Fuzz target `allocator_messages`: see `mimiq_fuzz_cases::allocator_messages` (fuzz/cases/src/lib.rs).

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mimiq_fuzz_cases::run("allocator_messages", data);
});
