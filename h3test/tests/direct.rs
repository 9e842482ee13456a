//! Direct mode over loopback (127/8 is local on Linux, no root needed): GETs over a hopping
//! connection against the quiche HTTP/3 test server, servers that forbid migration or give few
//! connection IDs, garbage on the client's sockets, addresses withdrawn and gone.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use mimiq_agent::direct::*;
use mimiq_agent::migrate::*;
use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::{
    client_config, run_gets, run_gets_until_hops, H3Server, H3ServerConfig, H3ServerStats, TestCert,
};

/// An `H3Server` on 127.0.0.1 on its own thread; stopped and joined by `finish`.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<H3ServerStats>,
}

impl Server {
    fn start(config: H3ServerConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let cert = TestCert::new().unwrap();
                let mut server =
                    H3Server::bind("127.0.0.1:0".parse().unwrap(), &cert, config).unwrap();
                drop(cert);
                tx.send(server.local_addr()).unwrap();
                server.run(&stop).unwrap();
                server.stats()
            })
        };
        let addr = rx.recv().unwrap();
        Self { addr, stop, thread }
    }

    fn finish(self) -> H3ServerStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Three loopback addresses (all of 127/8 is local on Linux, no root needed).
fn locals() -> Vec<SocketAddr> {
    ["127.0.0.2:0", "127.0.0.3:0", "127.0.0.4:0"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect()
}

fn direct(server: SocketAddr, strategy: HopStrategyConfig) -> DirectConnection {
    let mut quic = client_config(3).unwrap();
    let config = DirectConfig {
        strategy,
        seed: 7.into(),
        connection: 0,
        migration: MigrationConfig::default(),
    };
    DirectConnection::connect(&locals(), server, Some("quic.tech"), &mut quic, &config).unwrap()
}

/// Body sizes from tiny to a few dozen packets, so hops land between requests and
/// inside responses.
fn sizes(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 1 + (i * 7_919) % 40_000).collect()
}

#[test]
fn gets_over_loopback_hop_hundreds_of_times_and_stay_byte_exact() {
    let server = Server::start(H3ServerConfig::default());
    let mut client = direct(
        server.addr,
        HopStrategyConfig::RandomPackets {
            min_packets: 3,
            max_packets: 10,
        },
    );
    let sizes = sizes(300);
    let deadline = Duration::from_secs(60);
    let report = run_gets_until_hops(&mut client, "quic.tech", &sizes, 100, deadline).unwrap();
    client.close().unwrap();
    let hops = client.migration_stats();
    let shell = client.stats();
    let summary = client.migrator().latency_summary();
    drop(client);
    let server_stats = server.finish();
    eprintln!("{report:?}\n{hops:?}\n{shell:?}\nhop latency: {summary}\n{server_stats:?}");
    assert!(report.responses >= 300, "{report:?}");
    let expected: u64 = sizes.iter().cycle().take(report.responses as usize).sum();
    assert_eq!(report.body_bytes, expected);
    assert!(hops.hops_completed >= 100, "{hops:?}");
    assert_eq!(hops.hops_failed, 0, "{hops:?}");
    assert_eq!(shell.tx_unroutable, 0);
    assert_eq!(
        server_stats.client_addresses, 3,
        "the server saw every address"
    );
    assert_eq!(server_stats.reused_cids, 0, "no CID from two addresses");
    // The server followed (how often it saw each hop is a rate of loss: see
    // perf/tests/direct_hop.rs).
    assert!(
        server_stats.peer_migrations > 0 && server_stats.peer_migrations <= hops.hops_completed,
        "{server_stats:?}"
    );
    assert_eq!(server_stats.responses_completed, report.responses);
}

#[test]
fn a_server_without_migration_gets_no_hop_and_the_gets_complete() {
    let server = Server::start(H3ServerConfig {
        disable_active_migration: true,
        ..H3ServerConfig::default()
    });
    let mut client = direct(server.addr, HopStrategyConfig::EveryPackets { packets: 4 });
    let report = run_gets(
        &mut client,
        "quic.tech",
        &sizes(40),
        Duration::from_secs(30),
    )
    .unwrap();
    let hops = client.migration_stats();
    let shell = client.stats();
    drop(client);
    let server_stats = server.finish();
    assert_eq!(report.responses, 40);
    assert_eq!(hops.hops_completed, 0);
    assert!(hops.hops_refused > 10, "{hops:?}");
    assert_eq!(shell.strategy_hops_not_started, shell.strategy_hops);
    assert_eq!(server_stats.client_addresses, 1);
    assert_eq!(server_stats.peer_migrations, 0);
}

#[test]
fn more_addresses_than_the_server_gives_cids_for_stay_within_its_limit() {
    let server = Server::start(H3ServerConfig {
        active_cid_limit: 4,
        ..H3ServerConfig::default()
    });
    let locals: Vec<SocketAddr> = (2..=8)
        .map(|i| SocketAddr::from(([127, 0, 0, i], 0)))
        .collect();
    let mut quic = client_config(locals.len()).unwrap();
    let config = DirectConfig {
        strategy: HopStrategyConfig::EveryPackets { packets: 3 },
        seed: 3.into(),
        connection: 0,
        migration: MigrationConfig::default(),
    };
    let mut client =
        DirectConnection::connect(&locals, server.addr, None, &mut quic, &config).unwrap();
    // Enough hops to reach the budget (about 60 are due in 100 GETs; fewer complete on
    // busy cores, where a request arriving while the previous hop validates is not started).
    let report = run_gets_until_hops(
        &mut client,
        "quic.tech",
        &sizes(100),
        8,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(client.migrator().path_budget(), 4);
    let hops = client.migration_stats();
    // A hop beyond the budget is refused with an error and counted.
    while client.migrator().hop_in_progress().is_some() {
        client.poll(Duration::from_millis(10)).unwrap();
    }
    let unused = client
        .local_addrs()
        .into_iter()
        .find(|a| !client.migrator().has_path(*a))
        .unwrap();
    let refused = client.hop_to(unused);
    assert!(
        matches!(
            refused,
            Err(DirectError::Hop(HopError::PathBudget { budget: 4, .. }))
        ),
        "{refused:?}"
    );
    drop(client);
    let server_stats = server.finish();
    assert!(report.responses >= 100, "{report:?}");
    assert!(hops.hops_completed >= 8, "{hops:?}");
    assert_eq!(hops.hops_failed, 0, "{hops:?}");
    assert_eq!(server_stats.client_addresses, 4, "{server_stats:?}");
}

#[test]
fn garbage_datagrams_on_a_client_socket_are_counted_and_ignored() {
    let server = Server::start(H3ServerConfig::default());
    let mut client = direct(server.addr, HopStrategyConfig::EveryPackets { packets: 5 });
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for target in client.local_addrs() {
        for garbage in [
            &[0u8; 0][..],
            &[0xc0; 1][..],
            &[0x41; 60][..],
            &[0xff; 1400][..],
        ] {
            attacker.send_to(garbage, target).unwrap();
        }
    }
    let report = run_gets(
        &mut client,
        "quic.tech",
        &sizes(50),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(report.responses, 50);
    assert!(client.stats().rx_rejected >= 1, "{:?}", client.stats());
    drop(client);
    server.finish();
}

#[test]
fn withdrawing_the_current_address_forces_a_hop_and_it_is_never_used_again() {
    let server = Server::start(H3ServerConfig::default());
    let mut client = direct(server.addr, HopStrategyConfig::Never {});
    run_gets(&mut client, "quic.tech", &[1_000], Duration::from_secs(10)).unwrap();
    let first = client.migrator().local_addr();
    assert!(client.withdraw_address(first).unwrap());
    assert!(!client.withdraw_address(first).unwrap(), "once");
    for _ in 0..200 {
        if client.migrator().local_addr() != first {
            break;
        }
        client.poll(Duration::from_millis(5)).unwrap();
    }
    assert_ne!(
        client.migrator().local_addr(),
        first,
        "forced off the withdrawn address"
    );
    assert!(matches!(client.hop_to(first), Err(DirectError::Withdrawn(a)) if a == first));
    let stats = client.stats();
    assert_eq!((stats.addresses_withdrawn, stats.forced_hops), (1, 1));
    // Withdrawing the rest leaves nowhere to go: an error, and the connection stays.
    let second = client.migrator().local_addr();
    let third = client
        .local_addrs()
        .into_iter()
        .find(|a| *a != first && *a != second)
        .unwrap();
    client.withdraw_address(third).unwrap();
    assert!(matches!(
        client.withdraw_address(second),
        Err(DirectError::NoOtherAddress(a)) if a == second
    ));
    drop(client);
    server.finish();
}

#[test]
fn bad_addresses_are_errors() {
    let server = Server::start(H3ServerConfig::default());
    let mut quic = client_config(3).unwrap();
    let config = DirectConfig {
        strategy: HopStrategyConfig::Never {},
        seed: 1.into(),
        connection: 0,
        migration: MigrationConfig::default(),
    };
    let none = DirectConnection::connect(&[], server.addr, None, &mut quic, &config);
    assert!(matches!(none, Err(DirectError::NoAddresses)));
    let twice: Vec<SocketAddr> = vec!["127.0.0.2:41999".parse().unwrap(); 2];
    let dup = DirectConnection::connect(&twice, server.addr, None, &mut quic, &config);
    assert!(matches!(dup, Err(DirectError::DuplicateAddress(_))));
    // 198.18.255.254 is not on this host: binding fails with an error.
    let foreign = ["198.18.255.254:0".parse().unwrap()];
    let bind = DirectConnection::connect(&foreign, server.addr, None, &mut quic, &config);
    assert!(matches!(bind, Err(DirectError::Bind { .. })));
    let mut client = direct(server.addr, HopStrategyConfig::Never {});
    let stranger: SocketAddr = "127.0.0.9:5555".parse().unwrap();
    assert!(
        matches!(client.hop_to(stranger), Err(DirectError::UnknownAddress(a)) if a == stranger)
    );
    let report = run_gets(&mut client, "quic.tech", &[10, 20], Duration::from_secs(10)).unwrap();
    assert_eq!(report.responses, 2);
    let other = client.local_addrs()[1];
    client.hop_to(other).unwrap();
    for _ in 0..100 {
        if client.migrator().local_addr() == other {
            break;
        }
        client.poll(Duration::from_millis(10)).unwrap();
    }
    assert_eq!(client.migrator().local_addr(), other, "a manual hop");
    drop(client);
    server.finish();
}
