//! Compiles the proxy's BPF programs (bpf/reuseport_cid.c, bpf/tun_steer.c) with clang into
//! OUT_DIR; the steer module embeds the objects.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    // Debian keeps <asm/types.h> under the multiarch directory.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    for name in ["reuseport_cid", "tun_steer"] {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let out = out_dir.join(format!("{name}.o"));
        let status = Command::new("clang")
            .args([
                "-O2", "-g", "-Wall", "-target", "bpf", &multiarch, "-c", &src, "-o",
            ])
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed to compile {src} ({s}); run scripts/setup"),
            Err(e) => panic!("cannot run clang to compile {src}: {e}; run scripts/setup"),
        }
    }
}
