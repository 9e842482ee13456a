//! `mimiq-proxy`: the MASQUE proxy binary. Not built yet; it says so and exits non-zero.
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    eprintln!("mimiq-proxy: error: the MASQUE proxy is not built yet");
    std::process::exit(2);
}
