//! `mimiq-allocator`: the address allocator binary. Not built yet; it says so and exits non-zero.
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    eprintln!("mimiq-allocator: error: the allocator is not built yet");
    std::process::exit(2);
}
