//! `mimiq-agent`: the client agent binary. Not built yet; it says so and exits non-zero.
use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() {
    eprintln!("mimiq-agent: error: the client agent is not built yet");
    std::process::exit(2);
}
