//! `mimiq-proxy` in front of a hostile network (masque-fastpath/src/server/admission.rs): a
//! flood of Initials from spoofed sources, and a restart that the clients learn of at once
//! through stateless resets. Real kernel hosts in namespaces, the real proxy and client.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mimiq_masque::server::admission::ResetKey;
use mimiq_masque::server::route::Routes;
use mimiq_perf::capture::{inject_frames, watch_incoming};
use mimiq_perf::masque::{
    self, addr, start_client, start_ip_client, start_ip_client_with, stop_client, ProxyProc,
};
use mimiq_perf::singlebox::mac;
use mimiq_perf::testbed::{self, eventually, require_root};
use mimiq_perf::traffic::iperf3_with;

/// Spoofed sources: 198.18.64.0/18, routed by the proxy's host back to the client's host,
/// where nothing owns them (what the proxy sends there is seen on the wire and dropped).
const SPOOFED_NET: u32 = u32::from_be_bytes([198, 18, 64, 0]);
const SPOOFED_MASK: u32 = 0x3fff;

/// `count` distinct client Initials (quiche pads them to 1200 bytes), each to a fresh
/// destination connection ID.
fn initials(count: usize) -> Vec<Vec<u8>> {
    let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    config.verify_peer(false);
    config
        .set_application_protos(quiche::h3::APPLICATION_PROTOCOL)
        .unwrap();
    let local: SocketAddr = "198.18.64.1:1".parse().unwrap();
    let server: SocketAddr = format!("{}:4433", addr::PROXY_V4).parse().unwrap();
    (0..count)
        .map(|i| {
            let mut scid = [0u8; 20];
            scid[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let scid = quiche::ConnectionId::from_ref(&scid);
            let mut conn = quiche::connect(None, &scid, local, server, &mut config).unwrap();
            let mut out = vec![0u8; 1500];
            let (len, _) = conn.send(&mut out).unwrap();
            out.truncate(len);
            out
        })
        .collect()
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// UDP payload bytes per destination address, of the IPv4/UDP frames from the proxy's port
/// 4433 to the spoofed range.
fn count_replies(sent: &mut HashMap<u32, u64>, frame: &[u8]) {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
        return;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let Some(udp) = ip.get(ihl..ihl + 8) else {
        return;
    };
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    if dst & !SPOOFED_MASK == SPOOFED_NET && sport == 4433 {
        let len = u64::from(u16::from_be_bytes([udp[4], udp[5]])).saturating_sub(8);
        *sent.entry(dst).or_insert(0) += len;
    }
}

fn rss_kb(pid: u32) -> u64 {
    testbed::rss_kb(pid).unwrap_or_else(|| panic!("no VmRSS for {pid}"))
}

#[test]
fn an_initial_flood_from_spoofed_sources_leaves_the_tunnel_and_new_clients_served() {
    require_root();
    let (mut tb, _dir, proxy) = masque::with_proxy(
        "[quic]\nretry = \"auto\"\nretry_threshold = 16\nmax_half_open = 64\nhandshake_timeout_ms = 2000\n",
    )
    .unwrap();
    tb.add_route("p", "198.18.64.0/18", addr::CLIENT_V4[0])
        .unwrap();
    let (mut first, _) = start_ip_client(&tb).unwrap();
    let rss_before = rss_kb(proxy.pid());

    let templates = initials(512);
    let proxy_mac = parse_mac(&mac(&tb, "p", "p0"));
    const RATE: u64 = 20_000;
    const SECONDS: u64 = 10;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher =
        watch_incoming(&tb, "c", "c0", stop.clone(), HashMap::new(), count_replies).unwrap();
    // What the flood sends, per spoofed source (UDP payload bytes), shared with the injector.
    let flood_sent = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<u32, u64>::new()));
    let injector = {
        let flood_sent = flood_sent.clone();
        let (mut n, mut rng) = (0u64, 0x2545_f491_4f6c_dd1du64);
        let started = Instant::now();
        inject_frames(&tb, "c", "c0", move || {
            if n >= RATE * SECONDS {
                return None;
            }
            // Paced: never more than the rate says by now.
            while n * 1_000_000 / RATE > started.elapsed().as_micros() as u64 {
                std::thread::sleep(Duration::from_micros(200));
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let src = SPOOFED_NET | (rng as u32 & SPOOFED_MASK);
            let initial = &templates[(n as usize / 2) % templates.len()];
            // Every other one cut to the 168 bytes of a cheap flood (RFC 9000 §14.1 says drop).
            let payload = if n % 2 == 0 {
                &initial[..]
            } else {
                &initial[..168]
            };
            n += 1;
            *flood_sent.lock().unwrap().entry(src).or_insert(0) += payload.len() as u64;
            let mut frame = Vec::with_capacity(14 + 28 + payload.len());
            etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], proxy_mac)
                .ipv4(
                    Ipv4Addr::from(src).octets(),
                    addr::PROXY_V4.parse::<Ipv4Addr>().unwrap().octets(),
                    64,
                )
                .udp(1024 + (rng >> 48) as u16 % 60_000, 4433)
                .write(&mut frame, payload)
                .unwrap();
            Some(frame)
        })
        .unwrap()
    };

    // During the flood: a fixed-rate transfer through the first client's tunnel, and a new
    // client connecting.
    let transfer = std::thread::scope(|scope| {
        let tb = &tb;
        let transfer = scope.spawn(move || {
            iperf3_with(
                tb,
                "c",
                "s",
                addr::SERVER_V4,
                8,
                &["-u", "-b", "20M", "-l", "1200"],
            )
        });
        std::thread::sleep(Duration::from_secs(3));
        let url = format!("{}:4433", addr::PROXY_V4);
        let args = [
            "ip",
            "--proxy",
            &url,
            "--bind",
            addr::CLIENT_V4[1],
            "--tun",
            "mq1",
            "--route",
            "none",
        ];
        let (mut second, ready) = start_client(tb, "c", &args)
            .unwrap_or_else(|e| panic!("a new client during the flood: {e}"));
        assert!(ready.contains("198.18.200."), "{ready}");
        let _ = stop_client(&mut second);
        transfer.join().unwrap().unwrap()
    });
    let sent = injector.join().unwrap().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let replies = watcher.join().unwrap().unwrap().unwrap();
    let flood_sent = flood_sent.lock().unwrap();

    assert!(
        sent > RATE * SECONDS * 9 / 10,
        "the flood sent {sent} frames"
    );
    let goodput = transfer.received_bytes as f64 / (20e6 / 8.0 * 8.0);
    assert!(
        goodput >= 0.8,
        "the tunnel kept {:.0}% of its 20 Mbit/s: {transfer:?}",
        goodput * 100.0
    );
    // RFC 9000 §8: never more than three times what an unvalidated address sent.
    for (dst, &out) in &replies {
        let got = flood_sent.get(dst).copied().unwrap_or(0);
        assert!(
            out <= 3 * got,
            "{} was sent {out} bytes after sending {got}",
            Ipv4Addr::from(*dst)
        );
    }
    let total_out: u64 = replies.values().sum();
    let total_in: u64 = flood_sent.values().sum();
    let rss_after = rss_kb(proxy.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "the proxy grew from {rss_before} to {rss_after} kB"
    );
    // The spoofed half-open connections time out; the first client stays.
    let s = eventually(Duration::from_secs(10), || {
        let s = proxy.fresh_stats()?;
        (s["half_open"] == 0 && s["connections_open"] == 1)
            .then_some(s.clone())
            .ok_or(format!("{s}"))
    })
    .unwrap();
    let dropped = &s["unknown_dropped"];
    assert!(dropped["initial_too_small"].as_u64().unwrap() > 0, "{s}");
    assert!(s["retries_sent"].as_u64().unwrap() > 0, "{s}");
    assert!(s["handshake_timeouts"].as_u64().unwrap() > 0, "{s}");
    let report = stop_client(&mut first).unwrap();
    assert_eq!(report["reconnects"], 0, "{report}");
    eprintln!(
        "flood: {sent} Initials (half of 168 bytes) from {} spoofed sources, {total_in} bytes; \
         {total_out} bytes sent back to them; tunnel goodput {:.0}%; proxy RSS {rss_before} → \
         {rss_after} kB; {s}",
        flood_sent.len(),
        goodput * 100.0
    );
}

#[test]
fn a_proxy_restarted_with_the_same_reset_key_resets_its_old_connections_at_once() {
    require_root();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("reset.key");
    let (tb, _dir, proxy) =
        masque::with_proxy(&format!("[quic]\nreset_key_file = \"{}\"\n", key.display())).unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().len(),
        32,
        "key file created"
    );
    // A client that would wait a minute for its idle timeout: only a reset tells it sooner.
    let (mut client, _) = start_ip_client_with(&tb, &["--idle-timeout-ms", "60000"]).unwrap();
    // A hop's worth of new connection IDs: the client has sent with IDs issued after the
    // handshake by the time the proxy dies.
    mimiq_perf::traffic::ping(&tb, "c", addr::SERVER_V4, 5).unwrap();
    proxy.kill_and_restart(&tb, "p").unwrap();
    let killed = Instant::now();
    // Traffic through the tunnel makes the client send to the new process, which knows no
    // connection: it answers with a stateless reset, and the client reconnects.
    let s = eventually(Duration::from_secs(20), || {
        let _ = tb.exec("c", &["ping", "-4", "-c", "1", "-W", "1", addr::SERVER_V4]);
        let s = proxy.stats()?;
        (s["sessions_ip"] == 1)
            .then_some(s.clone())
            .ok_or(format!("{s}"))
    })
    .unwrap();
    let after = killed.elapsed();
    assert!(s["stateless_resets_sent"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        after < Duration::from_secs(30),
        "back after {after:?}: the reset was not recognised"
    );
    let report = stop_client(&mut client).unwrap();
    assert_eq!(report["reconnects"], 1, "{report}");
    assert!(
        client.stderr().contains("stateless reset"),
        "the client names the reset: {}",
        client.stderr()
    );
    eprintln!("tunnel back {after:?} after the restart; {s}");
}

#[test]
fn with_retry_always_a_client_proves_its_address_first_and_its_tunnel_works() {
    require_root();
    let (tb, _dir, proxy) = masque::with_proxy("[quic]\nretry = \"always\"\n").unwrap();
    let (mut client, _) =
        start_ip_client(&tb).unwrap_or_else(|e| panic!("{e}; proxy: {}", proxy.proc.describe()));
    mimiq_perf::traffic::ping(&tb, "c", addr::SERVER_V4, 3).unwrap();
    let s = proxy.fresh_stats().unwrap();
    // One Retry per Initial without a token the client sent (a second one before the first
    // Retry arrived gets one too, which the client ignores: RFC 9000 §17.2.5.2).
    assert!(s["retries_sent"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["connections_accepted"], 1, "{s}");
    assert_eq!(s["half_open"], 0, "{s}");
    let report = stop_client(&mut client).unwrap();
    assert_eq!(report["reconnects"], 0, "{report}");
}

#[test]
fn a_proxy_does_not_reset_the_ids_of_another_live_proxy_with_its_key_and_does_once_it_is_gone() {
    require_root();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("reset.key");
    let quic = format!(
        "workers = 1\n[quic]\nreset_key_file = \"{}\"\n",
        key.display()
    );
    // The first proxy takes generation 0, the second, on another port with its own TUN device
    // and pool, generation 1.
    let (tb, _dir, first) = masque::with_proxy(&quic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let second = ProxyProc::start(
        &tb,
        "p",
        dir.path(),
        "0.0.0.0:4434",
        &format!("{quic}[ip]\ntun = \"mqp1\"\npool_v4 = \"198.18.201.0/24\"\n"),
    )
    .unwrap();
    // IDs each generation would issue, from the key both read.
    let reset_key = ResetKey::load_or_create(&key, &ring::rand::SystemRandom::new()).unwrap();
    let rng = ring::rand::SystemRandom::new();
    let first_id = Routes::new(&reset_key, 1, 0).new_cid(0, &rng).to_vec();
    let second_id = Routes::new(&reset_key, 1, 1).new_cid(0, &rng).to_vec();
    // A short header to `id` at the second proxy, from the client host; the reset it drew.
    let probe = |id: Vec<u8>| {
        tb.run_in("c", move || {
            let s = std::net::UdpSocket::bind((addr::CLIENT_V4[0], 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut pkt = vec![0x41u8];
            pkt.extend_from_slice(&id);
            pkt.extend_from_slice(&[0x5a; 40]);
            s.send_to(&pkt, (addr::PROXY_V4, 4434)).unwrap();
            let mut buf = [0u8; 100];
            s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
        })
        .unwrap()
    };
    let dropped = |s: &serde_json::Value| s["unknown_dropped"]["other_generation"].as_u64();
    // The first proxy's ID: not reset while it lives (counted), whatever the wait.
    assert_eq!(probe(first_id.clone()), None);
    let s = second.fresh_stats().unwrap();
    assert_eq!(dropped(&s), Some(1), "{s}");
    assert_eq!(s["stateless_resets_sent"], 0, "{s}");
    // Its own generation's unknown ID: reset, with that ID's token.
    let reset = probe(second_id.clone()).expect("a reset for an unknown ID of its own");
    assert_eq!(
        reset[reset.len() - 16..],
        reset_key.token(&second_id).to_be_bytes()
    );
    // The first proxy gone, its IDs are reset too (the second looks once a second).
    first.proc.signal(libc::SIGKILL);
    let reset = eventually(Duration::from_secs(10), || {
        probe(first_id.clone()).ok_or("no reset yet")
    })
    .unwrap();
    assert_eq!(
        reset[reset.len() - 16..],
        reset_key.token(&first_id).to_be_bytes()
    );
}
