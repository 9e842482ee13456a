//! `mimiq-perf`: build testbeds by hand, run the demo and the benchmarks.
//!
//! ```text
//! mimiq-perf testbed up line       # build a topology and leave it up
//! mimiq-perf testbed list          # the namespaces mimiq testbeds left on this machine
//! mimiq-perf testbed down line     # tear it down
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use mimiq_perf::testbed::{self, topology, Testbed};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(name = "mimiq-perf", version, about = "mimiq testbeds, demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, list or remove a testbed by hand.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Build a topology (namespaces `mq-<topology>-<host>`) and leave it up.
    Up {
        /// One of: line, bridge.
        topology: String,
    },
    /// Remove a topology built with `up`, and every process inside it.
    Down {
        /// The name given to `up`.
        topology: String,
    },
    /// List the namespaces of mimiq testbeds on this machine.
    List,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("mimiq-perf: error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Testbed { action } => match action {
            TestbedAction::Up { topology } => {
                if !topology::NAMES.contains(&topology.as_str()) {
                    anyhow::bail!(
                        "unknown topology {topology:?}; known: {}",
                        topology::NAMES.join(", ")
                    );
                }
                let mut tb = Testbed::with_id(topology.clone())?;
                if let Err(err) = topology::build(&mut tb, &topology) {
                    // `tb` is dropped here and removes what was built.
                    anyhow::bail!("building {topology}: {err}");
                }
                for host in tb.hosts() {
                    println!("{}  (ip netns exec {} bash)", host, tb.netns(host));
                }
                tb.keep();
            }
            TestbedAction::Down { topology } => {
                let prefix = format!("{}{topology}-", testbed::NETNS_PREFIX);
                let mut removed = 0;
                for ns in testbed::list_netns()?.iter().filter(|n| n.starts_with(&prefix)) {
                    testbed::remove_netns(ns).with_context(|| format!("removing {ns}"))?;
                    removed += 1;
                }
                if removed == 0 {
                    anyhow::bail!("no testbed {topology:?} is up (see `mimiq-perf testbed list`)");
                }
                println!("removed {removed} namespaces");
            }
            TestbedAction::List => {
                for ns in testbed::list_netns()? {
                    println!("{ns}");
                }
            }
        },
    }
    Ok(())
}
