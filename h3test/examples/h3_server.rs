//! A minimal HTTP/3 server on quiche's h3 API (`mimiq_h3test::H3Server`): `GET /N`
//! answers N bytes of the test pattern. The far end of the seed's experiment; it knows nothing
//! about MIMIQ and accepts migrating clients like any quiche server that keeps issuing CIDs.
//!
//! ```text
//! cargo run -p mimiq-h3test --example h3_server -- --listen 198.18.0.1:4433 \
//!     [--disable-active-migration] [--cid-limit 8] [--retire-left-paths]
//! ```
//!
//! `--retire-left-paths` forgets each path a client left, retiring the client's connection ID
//! used there, as soon as the client has left it (what a conforming server may do, RFC 9000
//! §5.1.2; a stock quiche server keeps them).
//!
//! Uses quiche's public example certificate (tests only). Prints its counters every 5 s and
//! runs until killed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cli::{parse_args, Args};
use mimiq_h3test::{H3Server, H3ServerConfig, TestCert};

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("h3_server: {msg}\nusage: h3_server --listen ADDR:PORT [--disable-active-migration] [--cid-limit N] [--retire-left-paths]");
            std::process::exit(2);
        }
    };
    if let Err(msg) = run(&args) {
        eprintln!("h3_server: {msg}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let cert = TestCert::new().map_err(|e| format!("writing the test certificate: {e}"))?;
    let config = H3ServerConfig {
        disable_active_migration: args.disable_active_migration,
        active_cid_limit: args.cid_limit,
        retire_left_paths: args.retire_left_paths,
        ..H3ServerConfig::default()
    };
    let mut server = H3Server::bind(args.listen, &cert, config).map_err(|e| e.to_string())?;
    // Loaded: the files can go (so a killed server leaves nothing behind).
    drop(cert);
    eprintln!(
        "h3_server: listening on {} ({config:?})",
        server.local_addr()
    );
    let mut last = Instant::now();
    loop {
        server
            .run_once(Duration::from_millis(50))
            .map_err(|e| format!("socket: {e}"))?;
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            eprintln!("h3_server: {:?}", server.stats());
        }
    }
}

/// Argument parsing without a CLI dependency (the agent crate has none).
mod cli {
    use super::SocketAddr;

    pub struct Args {
        pub listen: SocketAddr,
        pub disable_active_migration: bool,
        pub cid_limit: u64,
        pub retire_left_paths: bool,
    }

    pub fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut args = Args {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            disable_active_migration: false,
            cid_limit: 8,
            retire_left_paths: false,
        };
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--listen" => {
                    let v = it.next().ok_or("--listen needs ADDR:PORT")?;
                    args.listen = v
                        .parse()
                        .map_err(|_| format!("--listen {v}: not ADDR:PORT"))?;
                }
                "--disable-active-migration" => args.disable_active_migration = true,
                "--retire-left-paths" => args.retire_left_paths = true,
                "--cid-limit" => {
                    let v = it.next().ok_or("--cid-limit needs a number")?;
                    args.cid_limit = v
                        .parse()
                        .ok()
                        .filter(|&n| (2..=64).contains(&n))
                        .ok_or(format!("--cid-limit {v}: 2 to 64"))?;
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(args)
    }
}
