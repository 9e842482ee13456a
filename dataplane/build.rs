//! Compiles mimiq's XDP program (bpf/xdp_mimiq.c) with clang into OUT_DIR; port::xdp_prog
//! embeds the object.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/xdp_mimiq.c";
    println!("cargo:rerun-if-changed={src}");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("xdp_mimiq.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    // Debian keeps <asm/types.h> under the multiarch directory.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    let status = Command::new("clang")
        .args([
            "-O2", "-g", "-Wall", "-target", "bpf", &multiarch, "-c", src, "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("clang failed to compile {src} ({s}); run scripts/setup"),
        Err(e) => panic!("cannot run clang to compile {src}: {e}; run scripts/setup"),
    }
}
