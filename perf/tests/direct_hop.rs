//! Direct mode between real network namespaces (seed 000 §4): a client host with several
//! addresses on its veth runs many HTTP/3 GETs over one QUIC connection that hops between its
//! addresses, against an HTTP/3 server on quiche's h3 API in another host, and against one on
//! aioquic, an independent QUIC stack (`perf/interop/aioquic_h3_server.py`, installed by
//! `scripts/setup`). The kernel's own stack carries every datagram; the client and the quiche
//! server run in-process on threads that joined their hosts' namespaces, the aioquic server as
//! a process in its host.

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use mimiq_agent::direct::DirectControl;
use mimiq_agent::strategy::HopStrategyConfig;
use mimiq_h3test::H3ServerConfig;
use mimiq_perf::direct::{
    self, body_bytes, run_gets_in, sizes, sockets, v4_clients, v6_clients, AioquicServer,
    ClientRun, Gets, QuicheServer, PORT,
};
use mimiq_perf::testbed::{require_root, Testbed};

fn topology(server_ip: &str, client_ips: &[String], prefix: u8) -> Testbed {
    direct::topology(server_ip, client_ips, prefix).unwrap()
}

/// Runs `sizes` GETs from `cli` over one connection bound to all of `locals`, and on through
/// `sizes` again until the connection has made `min_hops` hops (how many hops a run of GETs
/// sees depends on the machine's load; the tests count hops, the benches rate them).
fn client_run(
    tb: &Testbed,
    locals: Vec<SocketAddr>,
    server: SocketAddr,
    strategy: HopStrategyConfig,
    sizes: Vec<u64>,
    min_hops: u64,
) -> Result<ClientRun, String> {
    client_run_with(tb, locals, server, strategy, sizes, min_hops, None, None)
}

/// [`client_run`], handing the connection's control handle and bound addresses to `control`.
fn client_run_with(
    tb: &Testbed,
    locals: Vec<SocketAddr>,
    server: SocketAddr,
    strategy: HopStrategyConfig,
    sizes: Vec<u64>,
    min_hops: u64,
    control: Option<Sender<(DirectControl, Vec<SocketAddr>)>>,
    start: Option<Receiver<()>>,
) -> Result<ClientRun, String> {
    let gets = Gets {
        locals,
        server,
        strategy,
        seed: 0x5eed,
        sizes,
        min_hops,
    };
    run_gets_in(tb, gets, control, start)
}

#[test]
fn a_thousand_gets_over_one_hopping_connection_are_byte_exact_with_hundreds_of_hops() {
    require_root();
    let clients = v4_clients(5);
    let tb = topology("198.18.0.1", &clients, 24);
    let server_addr = SocketAddr::new("198.18.0.1".parse().unwrap(), PORT);
    let server = QuicheServer::start(&tb, "srv", server_addr, H3ServerConfig::default()).unwrap();
    let sizes = sizes(1_000);
    let run = client_run(
        &tb,
        sockets(&clients).unwrap(),
        server_addr,
        HopStrategyConfig::RandomPackets {
            min_packets: 3,
            max_packets: 12,
        },
        sizes.clone(),
        200,
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    eprintln!(
        "{:?}\n{:?}\n{:?}\nhop latency (request -> switch): {}\nserver: {:?}",
        run.report, run.hops, run.shell, run.latency, srv
    );
    assert!(
        run.report.responses >= 1_000,
        "every GET answered, byte-exact: {:?}",
        run.report
    );
    assert_eq!(
        run.report.body_bytes,
        body_bytes(&sizes, run.report.responses)
    );
    assert!(
        run.hops.hops_completed >= 200,
        "hundreds of hops: {:?}",
        run.hops
    );
    assert!(
        run.report.hops_during_bodies > 0,
        "hops inside responses: {:?}",
        run.report
    );
    assert!(
        run.report.hops_between_bodies > 0,
        "hops between responses: {:?}",
        run.report
    );
    assert_eq!(run.hops.hops_failed, 0, "{:?}", run.hops);
    // The example server is a stock quiche server: it keeps a path, and a CID, per client
    // address, and so does the client (each CID is only ever sent from its own address).
    assert_eq!(
        run.hops.paths_forgotten + run.pending_forgets,
        0,
        "a stock server's client keeps its paths: {:?}",
        run.hops
    );
    assert_eq!(
        run.shell.tx_unroutable + run.shell.tx_errors,
        0,
        "{:?}",
        run.shell
    );
    assert_eq!(run.latency.count as u64, run.hops.hops_completed);
    // The server saw the client at every address and followed each move.
    assert_eq!(srv.client_addresses, 5, "{srv:?}");
    //= https://www.rfc-editor.org/rfc/rfc9000#section-9.5
    //# An endpoint MUST NOT reuse a connection ID when sending from more than one local
    //# address -- for example, when initiating connection migration as described in Section
    //# 9.2 or when probing a new network path as described in Section 9.1.
    assert_eq!(
        srv.reused_cids, 0,
        "quiche saw a CID come from a second address"
    );
    assert_eq!(srv.responses_completed, run.report.responses);
    // The server follows a hop when a non-probing packet from the new address reaches it
    // (RFC 9000 §9.3); the client's first one after a hop is a PING, which is not sent again if
    // lost, and the next hop may come first. How many hops the server saw one by one is a rate
    // of loss (the benches report it); that it followed, and never more often than the client
    // moved, holds whatever the load.
    assert!(
        srv.peer_migrations > 0 && srv.peer_migrations <= run.hops.hops_completed,
        "the server followed the hops: {srv:?} vs {:?}",
        run.hops
    );
}

#[test]
fn a_server_that_retires_the_ids_of_paths_left_at_once_serves_every_get_byte_exact() {
    require_root();
    // A conforming server may retire the client's connection ID of a path as soon as the
    // client has left it (RFC 9000 §5.1.2): what it sent there just before then reaches the
    // client with a retired ID, which the client reads for a grace of three PTOs and drops after
    // (vendor/quiche/MIMIQ-PATCH.md, the third and sixth fixes).
    let clients = v4_clients(5);
    let tb = topology("198.18.0.1", &clients, 24);
    let server_addr = SocketAddr::new("198.18.0.1".parse().unwrap(), PORT);
    let config = H3ServerConfig {
        retire_left_paths: true,
        ..H3ServerConfig::default()
    };
    let server = QuicheServer::start(&tb, "srv", server_addr, config).unwrap();
    let sizes = sizes(1_000);
    let run = client_run(
        &tb,
        sockets(&clients).unwrap(),
        server_addr,
        HopStrategyConfig::EveryPackets { packets: 5 },
        sizes.clone(),
        200,
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    eprintln!(
        "{:?}\n{:?}\n{:?}\nserver: {srv:?}",
        run.report, run.hops, run.shell
    );
    assert!(run.report.responses >= 1_000, "{:?}", run.report);
    assert_eq!(
        run.report.body_bytes,
        body_bytes(&sizes, run.report.responses)
    );
    assert!(run.hops.hops_completed >= 200, "{:?}", run.hops);
    assert_eq!(run.hops.hops_failed, 0, "{:?}", run.hops);
    assert_eq!(srv.responses_completed, run.report.responses);
    assert!(srv.paths_forgotten > 0, "{srv:?}");
    assert_eq!(srv.reused_cids, 0, "{srv:?}");
}

#[test]
fn gets_over_ipv6_hop_between_nodad_addresses() {
    require_root();
    let clients = v6_clients(4);
    let tb = topology("fd00::1", &clients, 64);
    let server_addr = SocketAddr::new("fd00::1".parse().unwrap(), PORT);
    let server = QuicheServer::start(&tb, "srv", server_addr, H3ServerConfig::default()).unwrap();
    let run = client_run(
        &tb,
        sockets(&clients).unwrap(),
        server_addr,
        HopStrategyConfig::EveryPackets { packets: 5 },
        sizes(300),
        100,
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    eprintln!(
        "{:?}\n{:?}\nhop latency: {}\nserver: {srv:?}",
        run.report, run.hops, run.latency
    );
    assert!(run.report.responses >= 300, "{:?}", run.report);
    assert!(run.hops.hops_completed >= 100, "{:?}", run.hops);
    assert_eq!(run.hops.hops_failed, 0, "{:?}", run.hops);
    assert_eq!(srv.client_addresses, 4);
}

#[test]
fn a_server_that_disables_active_migration_gets_no_hop_and_the_transfer_completes() {
    require_root();
    let clients = v4_clients(3);
    let tb = topology("198.18.0.1", &clients, 24);
    let server_addr = SocketAddr::new("198.18.0.1".parse().unwrap(), PORT);
    let config = H3ServerConfig {
        disable_active_migration: true,
        ..H3ServerConfig::default()
    };
    let server = QuicheServer::start(&tb, "srv", server_addr, config).unwrap();
    let sizes = sizes(200);
    let expected_bytes: u64 = sizes.iter().sum();
    let run = client_run(
        &tb,
        sockets(&clients).unwrap(),
        server_addr,
        HopStrategyConfig::EveryPackets { packets: 4 },
        sizes,
        0,
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    assert_eq!(run.report.responses, 200);
    assert_eq!(run.report.body_bytes, expected_bytes);
    assert_eq!(run.hops.hops_completed, 0, "{:?}", run.hops);
    assert!(
        run.hops.hops_refused >= 50,
        "every strategy hop refused and counted: {:?}",
        run.hops
    );
    assert_eq!(run.shell.strategy_hops_not_started, run.shell.strategy_hops);
    assert_eq!(
        srv.client_addresses, 1,
        "the server only ever saw the first address"
    );
    assert_eq!(srv.peer_migrations, 0);
}

/// Starts `sizes` GETs on `cli` bound to `order` (the connection starts on the first), and
/// runs `during` on the test thread with the connection's control handle and bound addresses.
/// Runs GETs while `during` acts on the connection from another thread; with
/// `gets_after_during`, the GETs start only once `during` is done (what it does must happen
/// before the run can end, however fast the GETs go), otherwise at once beside it.
fn run_with_control(
    tb: &Testbed,
    order: Vec<SocketAddr>,
    server: SocketAddr,
    strategy: HopStrategyConfig,
    sizes: Vec<u64>,
    min_hops: u64,
    gets_after_during: bool,
    during: impl FnOnce(DirectControl, Vec<SocketAddr>) + Send,
) -> Result<ClientRun, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            client_run_with(
                tb,
                order,
                server,
                strategy,
                sizes,
                min_hops,
                Some(tx),
                Some(go_rx),
            )
        });
        let (control, bound) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the client connected");
        if !gets_after_during {
            let _ = go_tx.send(());
        }
        during(control, bound);
        let _ = go_tx.send(());
        client.join().expect("client thread")
    })
}

#[test]
fn an_address_withdrawn_then_removed_after_a_drain_is_left_and_the_gets_complete() {
    require_root();
    let clients = v4_clients(3);
    let tb = topology("198.18.0.1", &clients, 24);
    let server_addr = SocketAddr::new("198.18.0.1".parse().unwrap(), PORT);
    let server = QuicheServer::start(&tb, "srv", server_addr, H3ServerConfig::default()).unwrap();
    // Start on a secondary address (removing the primary would take the others with it).
    let order = sockets(&[clients[1].clone(), clients[0].clone(), clients[2].clone()]).unwrap();
    let gone = clients[1].parse::<IpAddr>().unwrap();
    let run = run_with_control(
        &tb,
        order,
        server_addr,
        HopStrategyConfig::RandomPackets {
            min_packets: 3,
            max_packets: 12,
        },
        sizes(1_000),
        100,
        false,
        |control, bound| {
            // Beside the GETs (100 hops keep them going).
            // The agent's sequence when an address expires: withdraw it (the connection
            // leaves), then remove it from the host after a drain period (t_remove).
            let addr = bound.iter().copied().find(|a| a.ip() == gone).unwrap();
            assert!(control.withdraw(addr));
            std::thread::sleep(Duration::from_millis(100));
            let cidr = format!("{gone}/24");
            tb.exec_ok("cli", &["ip", "addr", "del", &cidr, "dev", "eth0"])
                .expect("ip addr del");
        },
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    eprintln!(
        "{:?}\n{:?}\n{:?}\nserver: {srv:?}",
        run.report, run.hops, run.shell
    );
    assert!(
        run.report.responses >= 1_000,
        "every GET answered, byte-exact: {:?}",
        run.report
    );
    assert_eq!(run.shell.addresses_withdrawn, 1, "{:?}", run.shell);
    assert!(
        run.withdrawn.iter().all(|a| a.ip() == gone),
        "{:?}",
        run.withdrawn
    );
    assert!(run.hops.hops_completed >= 100, "{:?}", run.hops);
    // At most the hop that was probing the address when it was withdrawn.
    assert!(run.hops.hops_failed <= 1, "{:?}", run.hops);
}

#[test]
fn a_hop_to_an_address_already_gone_from_the_host_fails_and_the_address_is_withdrawn() {
    require_root();
    let clients = v4_clients(3);
    let tb = topology("198.18.0.1", &clients, 24);
    let server_addr = SocketAddr::new("198.18.0.1".parse().unwrap(), PORT);
    let server = QuicheServer::start(&tb, "srv", server_addr, H3ServerConfig::default()).unwrap();
    let gone = clients[1].parse::<IpAddr>().unwrap();
    let run = run_with_control(
        &tb,
        sockets(&clients).unwrap(),
        server_addr,
        HopStrategyConfig::Never {},
        sizes(1_000),
        0,
        // Before the GETs: they may be over before `ip` has run (a loaded host).
        true,
        |control, bound| {
            let cidr = format!("{gone}/24");
            tb.exec_ok("cli", &["ip", "addr", "del", &cidr, "dev", "eth0"])
                .expect("ip addr del");
            // The socket is still bound to it; the probe cannot leave.
            let addr = bound.iter().copied().find(|a| a.ip() == gone).unwrap();
            assert!(control.hop_to(addr));
        },
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; server {srv:?}"));
    eprintln!(
        "{:?}\n{:?}\n{:?}\nserver: {srv:?}",
        run.report, run.hops, run.shell
    );
    assert_eq!(
        run.report.responses, 1_000,
        "every GET answered, byte-exact"
    );
    assert!(run.shell.tx_errors >= 1, "{:?}", run.shell);
    assert_eq!(run.shell.addresses_withdrawn, 1, "{:?}", run.shell);
    assert!(
        run.withdrawn.iter().all(|a| a.ip() == gone),
        "{:?}",
        run.withdrawn
    );
    assert_eq!(run.hops.hops_completed, 0, "{:?}", run.hops);
    assert_eq!(
        run.hops.failed_send, 1,
        "the hop was abandoned: {:?}",
        run.hops
    );
    assert_eq!(
        srv.client_addresses, 1,
        "the server never saw the vanished address"
    );
}

/// GETs over a hopping connection against aioquic: byte-exact, every hop completed, and the
/// server's counts agree with the client's.
fn against_aioquic(
    server_ip: &str,
    clients: &[String],
    prefix: u8,
    strategy: HopStrategyConfig,
    gets: usize,
    min_hops: u64,
) {
    let mut tb = topology(server_ip, clients, prefix);
    let server_addr = SocketAddr::new(server_ip.parse().unwrap(), PORT);
    let server = AioquicServer::start(&mut tb, server_addr).unwrap();
    let sizes = sizes(gets);
    let run = client_run(
        &tb,
        sockets(clients).unwrap(),
        server_addr,
        strategy,
        sizes.clone(),
        min_hops,
    );
    let srv = server.finish().unwrap();
    let run = run.unwrap_or_else(|e| panic!("{e}; aioquic server {srv}"));
    eprintln!(
        "{:?}\n{:?}\n{:?}\nhop latency: {}\naioquic server: {srv}",
        run.report, run.hops, run.shell, run.latency
    );
    assert!(run.report.responses >= gets as u64, "{:?}", run.report);
    assert_eq!(
        run.report.body_bytes,
        body_bytes(&sizes, run.report.responses)
    );
    assert!(run.hops.hops_completed >= min_hops, "{:?}", run.hops);
    assert_eq!(run.hops.hops_failed, 0, "{:?}", run.hops);
    assert_eq!(
        run.shell.tx_unroutable + run.shell.tx_errors,
        0,
        "{:?}",
        run.shell
    );
    assert_eq!(srv["connections"], 1, "{srv}");
    assert_eq!(srv["responses"], run.report.responses, "{srv}");
    assert_eq!(srv["requests"], run.report.responses, "{srv}");
    assert_eq!(srv["body_bytes"], run.report.body_bytes, "{srv}");
    // One socket per client address: the server heard from each.
    assert_eq!(srv["client_addresses"], clients.len(), "{srv}");
    // The client's own close (code 0) may have been lost; any other close is a failure.
    let closes = srv["closes"].as_array().unwrap();
    assert!(
        closes.len() <= 1 && closes.iter().all(|c| c["error_code"] == 0),
        "{srv}"
    );
}

#[test]
fn gets_against_an_aioquic_server_over_ipv4_hop_hundreds_of_times_and_stay_byte_exact() {
    require_root();
    against_aioquic(
        "198.18.0.1",
        &v4_clients(5),
        24,
        HopStrategyConfig::RandomPackets {
            min_packets: 3,
            max_packets: 12,
        },
        1_000,
        200,
    );
}

#[test]
fn gets_against_an_aioquic_server_over_ipv6_hop_every_five_packets_and_stay_byte_exact() {
    require_root();
    let clients = v6_clients(4);
    against_aioquic(
        "fd00::1",
        &clients,
        64,
        HopStrategyConfig::EveryPackets { packets: 5 },
        300,
        100,
    );
}
