//! `mimiq-perf`: build testbeds by hand, run the demo and the benchmarks.
//!
//! ```text
//! mimiq-perf testbed up line       # build a topology and leave it up
//! mimiq-perf testbed list          # the namespaces mimiq testbeds left on this machine
//! mimiq-perf testbed down line     # tear it down
//! mimiq-perf gen send --iface eth0 --pps 1M --duration 10 --flows 16   # AF_XDP generator
//! mimiq-perf gen recv --iface eth0 --json r.json --hlog r.hlog          # its receiver
//! ```

use anyhow::Context;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

use mimiq_perf::testbed::{self, topology, Testbed};
use mimiq_perf::write_json;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
#[command(
    name = "mimiq-perf",
    version,
    about = "mimiq testbeds, demo and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The demo: clients that hop addresses mid-connection (mimiq-agent through the single box
    /// to mimiq-proxy), with live progress and checks.
    Demo {
        /// Seconds of downloads.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Where the processes' configs, counters, hop logs and address logs are kept, with the
        /// outside link's capture of the clients' datagrams to the proxy (outside.pcap, headers
        /// only) and the TLS key logs.
        #[arg(long, default_value = "target/demo")]
        out: std::path::PathBuf,
    },
    /// Faults under load: the switch, the allocator and the proxy killed with SIGKILL in the
    /// middle of a TCP download through them and started again, and an agent killed; what
    /// survived, the data lost and each recovery time. Fails (exit 1) when one did not recover.
    Faults {
        /// Also write the faults as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/faults")]
        out: std::path::PathBuf,
    },
    /// The demo's load for many minutes (two hopping agents downloading through the single
    /// box and mimiq-proxy, leases expiring, the proxy killed now and then), with every
    /// process's memory and file descriptors sampled each minute. Fails (exit 1) on a broken
    /// transfer or a wrong byte.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1440))]
        minutes: u32,
        /// Kill the proxy with SIGKILL and start it again every this many minutes (0: never).
        #[arg(long, default_value_t = 5)]
        fault_every_min: u32,
        /// Also write the samples, transfers and summary as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Directory for results.json, results.md, the processes' configs and counters.
        #[arg(long, default_value = "target/experiments/soak")]
        out: std::path::PathBuf,
    },
    /// Benchmarks that compare mimiq with a baseline in the same run.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// The AF_XDP traffic generator: send, receive (loss, reordering, latency), reflect.
    Gen {
        #[command(subcommand)]
        command: Box<mimiq_perf::gen::cli::GenCommand>,
    },
    /// What an HdrHistogram interval log (.hlog) holds: a percentile table per tag (µs), and
    /// with --svg a percentile plot.
    Hlog {
        /// The log (a mimiq binary's hlog_file, the generator's --hlog, or another tool's).
        file: std::path::PathBuf,
        /// Only the tags that start with this (e.g. `up.` for the proxy's uploads).
        #[arg(long)]
        tag: Option<String>,
        /// Also write the percentile plot here.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
    /// Build, list or remove a testbed by hand.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// mimiq-switch l2fwd against the kernel bridge: TCP throughput, RTT, CPU per frame.
    L2fwd {
        /// Seconds of TCP traffic per forwarder.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/l2fwd")]
        out: std::path::PathBuf,
        /// Also write the runs and the summary (`tcp_ratio_to_bridge`: the switch's TCP
        /// throughput over the kernel bridge's) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// 64-byte forwarding rate through mimiq-switch, a bare AF_XDP reflector and the kernel's
    /// IP forwarding, plus the generator's own ceiling, all with `mimiq-perf gen`.
    Forwarding {
        /// Seconds of traffic per path.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Rounds over all paths; the table shows medians.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
        /// Also write the runs and the summary (`switch_over_reflector`, `switch_over_kernel`:
        /// medians, into the kernel sink) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/forwarding")]
        out: std::path::PathBuf,
    },
    /// 64-byte forwarding rate through the MIMIQ single box with full tables (1M IPv4
    /// bindings, 64k aliases), next to l2fwd, with `mimiq-perf gen`.
    SingleBox {
        /// Seconds of traffic per path.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// IPv4 bindings in the tables.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u32).range(64..=4_000_000))]
        bindings: u32,
        /// Queues of every link: the switches run a worker per queue, the generator a sender.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        queues: u32,
        /// Also write the rows and the summary (`ratio_to_l2fwd`, `switch_cpu_ns_per_packet`,
        /// `l2fwd_cpu_ns_per_packet`, of the quiet single box) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/single-box")]
        out: std::path::PathBuf,
    },
    /// Seed 000 Figure 3: throughput of one hopping QUIC connection (sequential GETs)
    /// at 0-50 migrations per 100 packets and 10-50 ms RTT (the switch's impair stage), loss
    /// against no migration, and the latency each hop adds (HdrHistogram per RTT). Writes
    /// results.json, results.md, results.csv, figure3.svg and hop-latency-rtt<N>ms.hgrm.
    Figure3 {
        /// Seconds of GETs per cell (7 rates + a second baseline, per RTT).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=600))]
        seconds: u32,
        /// Round-trip times in ms, comma-separated.
        #[arg(long = "rtt-ms", value_delimiter = ',', default_values_t = mimiq_perf::experiments::figure3::RTTS_MS.to_vec(), value_parser = clap::value_parser!(u32).range(1..=1000))]
        rtt_ms: Vec<u32>,
        /// Migrations per 100 packets, comma-separated (0, the baseline, is always run).
        #[arg(long, value_delimiter = ',', default_values_t = mimiq_perf::experiments::figure3::RATES.to_vec(), value_parser = clap::value_parser!(u32).range(0..=50))]
        rates: Vec<u32>,
        /// Directory for the results.
        #[arg(long, default_value = "target/experiments/figure3")]
        out: std::path::PathBuf,
        /// Also write the cells and the summary (`added_per_hop_p99_ms` and
        /// `noise_floor_p99_ms`, the worst over the RTTs, side by side; `loss_met`) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Direct mode against HTTP/3 servers on another QUIC stack (aioquic) and against a server
    /// that retires connection IDs at once, next to a stock quiche server: runs that complete
    /// every request byte-exact, and hops per run against the stock server's.
    Interop {
        /// Runs per cell (server, family, strategy).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
        /// GETs per run (bodies of 1 B to 20 KB).
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        requests: u32,
        /// Servers, comma-separated: quiche (the baseline), quiche-retiring, aioquic.
        #[arg(long, value_delimiter = ',', default_values_t = mimiq_perf::experiments::interop::SERVERS.map(String::from).to_vec())]
        servers: Vec<String>,
        /// Hop strategies, comma-separated: never, every:N, random:A:B, time:A:B, once:N.
        #[arg(long, value_delimiter = ',', default_values_t = mimiq_perf::experiments::interop::STRATEGIES.map(String::from).to_vec())]
        strategies: Vec<String>,
        /// Address families, comma-separated: v4, v6.
        #[arg(long, value_delimiter = ',', default_values_t = vec!["v4".to_string(), "v6".to_string()])]
        families: Vec<String>,
        /// Also write the rows, cells and summary as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/interop")]
        out: std::path::PathBuf,
    },
    /// The MASQUE proxy: overhead per packet from captures, the largest inner packet,
    /// goodput, packets per second and proxy CPU per GB for CONNECT-IP and CONNECT-UDP, next to
    /// the kernel's forwarding between the same namespaces.
    Masque {
        /// Seconds of traffic per throughput run.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Only CONNECT-IP TCP bulk with a NIC's offloads and with threaded NAPI (the CPU
        /// target's runs): no captures, no CONNECT-UDP.
        #[arg(long)]
        bulk_only: bool,
        /// TCP congestion controls of the bulk runs (iperf3 -C), comma-separated; each bulk run
        /// is made with each. "default" alone: the hosts' default, no -C.
        #[arg(long, value_delimiter = ',', default_values_t = mimiq_perf::experiments::masque::DEFAULT_CONGESTION.map(String::from).to_vec())]
        congestion: Vec<String>,
        /// The proxy's worker counts, comma-separated: the CONNECT-IP runs are made with a
        /// proxy of each. Default: the proxy's own (one per core).
        #[arg(long, value_delimiter = ',')]
        workers: Vec<usize>,
        /// The proxy's datapaths, comma-separated: socket, xdp (AF_XDP, one worker per queue
        /// of the proxy's veth, which gets as many queues as the largest --workers).
        #[arg(long, value_delimiter = ',', default_value = "socket")]
        datapath: Vec<String>,
        /// Times each TCP bulk run is repeated, each beside its own kernel run.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        repeat: u32,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/masque")]
        out: std::path::PathBuf,
        /// Also write the runs and the summary (`ratio_to_kernel_up`, `ratio_to_kernel_down`:
        /// the proxy host's CPU per GB over the kernel's forwarding, medians under threaded
        /// NAPI, with their spread) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// A bulk download's goodput through a hopping agent's tunnel (the single box, the proxy
    /// outside) against the same tunnel unhopped, at round trips added by the switch's impair
    /// stage, with the proxy's congestion state reset on a hop (RFC 9000 §9.4) and kept.
    BulkHop {
        /// Seconds of download per cell.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// Added round trips, ms, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,50", value_parser = clap::value_parser!(u64).range(0..=1000))]
        rtt_ms: Vec<u64>,
        /// Hop every N QUIC datagrams the agent sends, comma-separated; 0: never (the baseline,
        /// always run).
        #[arg(long, value_delimiter = ',', default_value = "0,100,25,5")]
        hops: Vec<u32>,
        /// Directory for results.json and results.md.
        #[arg(long, default_value = "target/experiments/bulk-hop")]
        out: std::path::PathBuf,
        /// Also have the proxy and the agent write a qlog per connection into this directory
        /// (large: every packet of every cell).
        #[arg(long)]
        qlog: Option<std::path::PathBuf>,
        /// Also write the cells and the summary (`goodput_ratio_hop25`, per RTT and congestion
        /// state) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Website fingerprinting and linkage by an observer of the outside link, through the
    /// single box with hopping agents, for each hop setting (docs/PRIVACY.md).
    Privacy {
        /// The suite's grid: 5 sites × 5 visits, two clients, hop settings never and every:25.
        #[arg(long)]
        quick: bool,
        /// Sites (closed world). Default 50 (5 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=10_000))]
        sites: Option<u32>,
        /// Visits per site and hop setting. Default 10 (5 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1_000))]
        visits: Option<u32>,
        /// Clients visiting in parallel, 1 to 3. Default 3 (2 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3))]
        clients: Option<u32>,
        /// Hop settings, comma-separated: never, every:N, random:A:B, time:A:B (ms), once:N.
        /// Default: never, every:100, every:50, every:25, every:10, random:10:100, once:50.
        #[arg(long, value_delimiter = ',')]
        hops: Vec<mimiq_agent::strategy::HopStrategyConfig>,
        /// Hop settings run again in direct mode (each page load its own QUIC connection
        /// straight to an HTTP/3 server on the outside host), as --hops; the flag alone: none.
        /// Default: never, every:25 (every:25 with --quick).
        #[arg(long, value_delimiter = ',', num_args = 0..)]
        direct_hops: Option<Vec<mimiq_agent::strategy::HopStrategyConfig>>,
        /// Fixes the sites, the visits, the agents' hops and the folds.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// No testbed: attack again the captures and logs an earlier run kept in this
        /// directory (its --out; give the same --quick, --clients, --hops and --direct-hops).
        #[arg(long)]
        reanalyse: Option<std::path::PathBuf>,
        /// The padding defence: agents and proxy pad every QUIC packet to a multiple of this
        /// many bytes (16 up to the datagram size, 1452; 0: none).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1452))]
        pad: u16,
        /// The proxy keeps a client's congestion state across its hops
        /// (`quic.keep_congestion_on_migration`), as the linkage attacker should be run with.
        #[arg(long)]
        keep_congestion: bool,
        /// The idle defence: agents stay quiet for a random 0..=N ms before each hop
        /// (`tunnel.hop_idle_max_ms`; 0: none).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        idle_ms: u64,
        /// Directory for results.json, results.md, privacy.svg, the outside link's captures
        /// (outside-<hop>.pcap) with the proxy's and agents' TLS key logs, and the agents' logs.
        #[arg(long, default_value = "target/experiments/privacy")]
        out: std::path::PathBuf,
        /// Also write the rows and the summary (`wf_accuracy_unhopped`, `wf_accuracy_hop25`,
        /// `linkage_precision`, `linkage_recall`, `cid_linked`) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Build a topology (namespaces `mq-<topology>-<host>`) and leave it up.
    Up {
        /// One of: line, bridge, single-box, split.
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => exit_on_bad_usage(err),
    };
    if let Err(err) = run(cli) {
        eprintln!("mimiq-perf: error: {err:#}");
        std::process::exit(1);
    }
}

/// Help and version go to stdout as usual; a usage mistake is one line on stderr and exit 2.
fn exit_on_bad_usage(err: clap::Error) -> ! {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => err.exit(),
        _ => {
            // clap's message, without its usage and tip sections, joined onto one line.
            let text = err.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim())
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("mimiq-perf: error: {message}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gen { command } => mimiq_perf::gen::cli::run(*command)?,
        Command::Hlog { file, tag, svg } => {
            use mimiq_perf::hlog;
            let tags = hlog::by_tag(&file, tag.as_deref()).map_err(anyhow::Error::msg)?;
            if tags.is_empty() {
                anyhow::bail!("{}: no interval with such a tag", file.display());
            }
            print!("{}", hlog::table(&tags));
            if let Some(out) = svg {
                let title = file
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                let plot = hlog::svg(&tags, &title).map_err(anyhow::Error::msg)?;
                std::fs::write(&out, plot).with_context(|| format!("writing {}", out.display()))?;
            }
        }
        Command::Demo { seconds, out } => {
            mimiq_perf::demo::run(seconds, Some(&out)).map_err(anyhow::Error::msg)?;
        }
        Command::Faults { json, out } => {
            use mimiq_perf::faults;
            let progress = mimiq_perf::progress::Progress::new("faults");
            let all = faults::run(&mut |l| progress.line(l)).map_err(anyhow::Error::msg)?;
            drop(progress);
            let summary = serde_json::json!({
                "faults": all.len(),
                "recovered": all.iter().filter(|f| f.survived).count(),
                "lost_bytes": all.iter().map(|f| f.lost_bytes).sum::<u64>(),
                "recovery_ms": all.iter().map(|f| (f.fault.clone(), f.recovery_ms)).collect::<std::collections::BTreeMap<_, _>>(),
            });
            let results = serde_json::json!({ "rows": all, "summary": summary });
            write_json(json.as_deref(), &results)?;
            write_results(&out, &results, &faults::markdown(&all))?;
            if let Some(f) = all.iter().find(|f| !f.survived) {
                anyhow::bail!("{}: {}", f.fault, f.detail);
            }
        }
        Command::Soak {
            minutes,
            fault_every_min,
            json,
            out,
        } => {
            use mimiq_perf::soak;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let params = soak::Params {
                minutes,
                fault_every_min,
            };
            let progress = mimiq_perf::progress::Progress::new("soak");
            let results =
                soak::run(params, &out, &mut |l| progress.line(l)).map_err(anyhow::Error::msg)?;
            drop(progress);
            write_json(json.as_deref(), &results)?;
            write_results(&out, &results, &soak::markdown(&results))?;
            std::fs::write(
                out.join("soak.svg"),
                soak::svg(&results).map_err(anyhow::Error::msg)?,
            )?;
            let s = &results.summary;
            if s.broken_transfers > 0 || s.bytes_wrong > 0 {
                anyhow::bail!(
                    "{} broken transfers, {} bytes wrong",
                    s.broken_transfers,
                    s.bytes_wrong
                );
            }
        }
        Command::Bench {
            bench:
                Bench::SingleBox {
                    seconds,
                    bindings,
                    queues,
                    json,
                    out,
                },
        } => {
            use mimiq_perf::experiments::single_box;
            let progress = mimiq_perf::progress::Progress::new("bench single-box");
            let (runs, md) =
                single_box::compare(seconds, bindings, queues, &mut |l| progress.line(l))
                    .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &runs, &md)?;
            let (l2fwd, single) = (&runs[0], &runs[1]);
            let summary = serde_json::json!({
                "ratio_to_l2fwd": single.forwarded_pps / l2fwd.forwarded_pps.max(1.0),
                "switch_cpu_ns_per_packet": single.switch_cpu_ns_per_packet,
                "l2fwd_cpu_ns_per_packet": l2fwd.switch_cpu_ns_per_packet,
            });
            write_json_results(json.as_deref(), &runs, summary)?;
        }
        Command::Bench {
            bench:
                Bench::Figure3 {
                    seconds,
                    rtt_ms,
                    rates,
                    out,
                    json,
                },
        } => {
            use mimiq_perf::experiments::figure3;
            let params = figure3::Params {
                rtts_ms: rtt_ms,
                rates,
                per_cell: std::time::Duration::from_secs(u64::from(seconds)),
                ..figure3::Params::default()
            };
            let progress = mimiq_perf::progress::Progress::new("bench figure3");
            let fig =
                figure3::run(&params, &mut |l| progress.line(l)).map_err(anyhow::Error::msg)?;
            drop(progress);
            figure3::write_files(&out, &fig).map_err(anyhow::Error::msg)?;
            write_results(&out, &fig, &figure3::markdown(&fig))?;
            let v = &fig.verdict;
            let summary = serde_json::json!({
                "added_per_hop_p99_ms": v.worst_added_per_hop_p99_us as f64 / 1e3,
                "noise_floor_p99_ms": v.worst_noise_floor_p99_us as f64 / 1e3,
                "added_per_hop_p50_ms": v.worst_added_per_hop_p50_us as f64 / 1e3,
                "added_p99_met": v.added_p99_met,
                "loss_met": v.loss_met,
            });
            write_json_results(json.as_deref(), &fig.cells, summary)?;
        }
        Command::Bench {
            bench:
                Bench::Masque {
                    seconds,
                    bulk_only,
                    congestion,
                    repeat,
                    workers,
                    datapath,
                    out,
                    json,
                },
        } => {
            // "default" means no -C at all, so it cannot be combined with named ones.
            let congestion = match congestion.as_slice() {
                [d] if d == "default" => Vec::new(),
                list if list.iter().any(|c| c == "default") => {
                    anyhow::bail!("--congestion: \"default\" (the hosts' own) cannot be combined with named controls")
                }
                _ => congestion,
            };
            let params = mimiq_perf::experiments::masque::Params {
                seconds,
                bulk_only,
                repeat,
                congestion,
                workers,
                datapaths: datapath,
            };
            let progress = mimiq_perf::progress::Progress::new("bench masque");
            let (results, md) =
                mimiq_perf::experiments::masque::compare(&params, &mut |l| progress.line(l))
                    .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &results, &md)?;
            let meta = serde_json::json!({
                "seconds": seconds,
                "repeat": repeat,
                "congestion": params.congestion,
                "workers": params.workers,
                "datapaths": params.datapaths,
                "steering": results.steering,
                "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            });
            let mut summary = mimiq_perf::experiments::masque::summary(&results);
            summary["instr_per_packet"] =
                match mimiq_perf::experiments::masque::instructions_per_packet() {
                    Ok(ipp) => {
                        println!("instructions per packet (tunnel_callgrind): {ipp:.1}");
                        serde_json::json!(ipp)
                    }
                    Err(e) => {
                        println!("instructions per packet not measured: {e}");
                        serde_json::Value::Null
                    }
                };
            write_json(
                json.as_deref(),
                &serde_json::json!({
                    "rows": results.throughput,
                    "summary": summary,
                    "meta": meta,
                }),
            )?;
        }
        Command::Bench {
            bench:
                Bench::Interop {
                    runs,
                    requests,
                    servers,
                    strategies,
                    families,
                    json,
                    out,
                },
        } => {
            use mimiq_perf::experiments::interop::{self, Family};
            let families = families
                .iter()
                .map(|f| match f.as_str() {
                    "v4" => Ok(Family::V4),
                    "v6" => Ok(Family::V6),
                    other => Err(anyhow::anyhow!("--families: {other:?}: expected v4 or v6")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let params = interop::Params {
                runs,
                requests: requests as usize,
                servers,
                strategies,
                families,
            };
            let progress = mimiq_perf::progress::Progress::new("bench interop");
            let results =
                interop::run(&params, &mut |l| progress.line(l)).map_err(anyhow::Error::msg)?;
            drop(progress);
            write_json(json.as_deref(), &results)?;
            write_results(&out, &results, &interop::markdown(&results))?;
        }
        Command::Bench {
            bench:
                Bench::Privacy {
                    quick,
                    sites,
                    visits,
                    clients,
                    hops,
                    direct_hops,
                    seed,
                    reanalyse,
                    pad,
                    keep_congestion,
                    idle_ms,
                    out,
                    json,
                },
        } => {
            use mimiq_perf::experiments::privacy;
            let base = if quick {
                privacy::Options::quick()
            } else {
                privacy::Options::full()
            };
            let o = privacy::Options {
                sites: sites.map_or(base.sites, |n| n as usize),
                visits: visits.map_or(base.visits, |n| n as usize),
                clients: clients.map_or(base.clients, |n| n as usize),
                hops: if hops.is_empty() { base.hops } else { hops },
                direct_hops: direct_hops.unwrap_or(base.direct_hops),
                seed,
                pad: usize::from(pad),
                keep_congestion,
                hop_idle_max_ms: idle_ms,
                out: Some(out.clone()),
                ..base
            };
            let progress = mimiq_perf::progress::Progress::new("bench privacy");
            let report = match &reanalyse {
                Some(kept) => privacy::reanalyse(kept, &o),
                None => privacy::run(&o, &mut |l| progress.line(l)),
            }
            .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &report, &privacy::markdown(&report))?;
            std::fs::write(
                out.join("privacy.svg"),
                privacy::svg(&report).map_err(anyhow::Error::msg)?,
            )?;
            write_json_results(json.as_deref(), &report.rows, privacy::summary(&report))?;
        }
        Command::Bench {
            bench:
                Bench::BulkHop {
                    seconds,
                    rtt_ms,
                    mut hops,
                    out,
                    qlog,
                    json,
                },
        } => {
            use mimiq_perf::experiments::bulk_hop;
            if !hops.contains(&0) {
                hops.insert(0, 0);
            }
            let progress = mimiq_perf::progress::Progress::new("bench bulk-hop");
            // The proxy and the agents run elsewhere: they get the directory as an absolute path.
            let qlog = qlog.map(std::path::absolute).transpose()?;
            let cells = bulk_hop::run(&rtt_ms, &hops, seconds, qlog.as_deref(), &mut |l| {
                progress.line(l)
            })
            .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &cells, &bulk_hop::markdown(&cells))?;
            write_json_results(json.as_deref(), &cells, bulk_hop::summary(&cells))?;
        }
        Command::Bench {
            bench: Bench::L2fwd { seconds, out, json },
        } => {
            use mimiq_perf::experiments::l2fwd::Forwarder;
            let progress = mimiq_perf::progress::Progress::new("bench l2fwd");
            let (runs, md) =
                mimiq_perf::experiments::l2fwd::compare(seconds, &mut |l| progress.line(l))
                    .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &runs, &md)?;
            let tcp = |f: Forwarder| runs.iter().find(|r| r.forwarder == f).map(|r| r.tcp_gbps);
            let ratio = match (tcp(Forwarder::MimiqSwitch), tcp(Forwarder::KernelBridge)) {
                (Some(s), Some(b)) if b > 0.0 => Some(s / b),
                _ => None,
            };
            write_json_results(
                json.as_deref(),
                &runs,
                serde_json::json!({ "tcp_ratio_to_bridge": ratio }),
            )?;
        }
        Command::Bench {
            bench:
                Bench::Forwarding {
                    seconds,
                    repeat,
                    json,
                    out,
                },
        } => {
            use mimiq_perf::experiments::forwarding;
            let progress = mimiq_perf::progress::Progress::new("bench forwarding");
            let (runs, md) = forwarding::compare(seconds, repeat, &mut |l| progress.line(l))
                .map_err(anyhow::Error::msg)?;
            drop(progress);
            write_results(&out, &runs, &md)?;
            write_json_results(json.as_deref(), &runs, forwarding::summary(&runs))?;
        }
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
                for ns in testbed::list_netns()?
                    .iter()
                    .filter(|n| n.starts_with(&prefix))
                {
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

/// Writes an experiment's rows as `results.json` and its table as `results.md` into `out`, and
/// prints the table.
/// A bench's `--json`: its rows and the summary its figures are read from.
fn write_json_results(
    path: Option<&std::path::Path>,
    rows: &impl serde::Serialize,
    summary: serde_json::Value,
) -> anyhow::Result<()> {
    write_json(
        path,
        &serde_json::json!({ "rows": rows, "summary": summary }),
    )
}

fn write_results(
    out: &std::path::Path,
    runs: &impl serde::Serialize,
    md: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(runs)?)?;
    std::fs::write(out.join("results.md"), md)?;
    println!("{md}");
    println!("written to {}", out.display());
    Ok(())
}
