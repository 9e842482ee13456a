//! Hostile input over the wire to a running `mimiq-proxy`: a raw quiche HTTP/3 client in the
//! client namespace crafts CONNECT-IP requests, capsules and HTTP datagrams with the crate's codec
//! (and raw bytes for the malformed ones), while the real `mimiq-proxy client ip` on the same host
//! keeps pinging the server through its own tunnel. Each case is checked against what the RFCs
//! ask (drop, ICMP error, stream error) and against the exact counter the proxy keeps for it.
//!
//! ```text
//!  c: hostile (198.18.10.3) ─┐
//!  c: mimiq-proxy client ip ─┴─ p: mimiq-proxy (tunnel MTU 1280) ── s: UDP echo, ping target
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use mimiq_masque::capsule::{Capsule, CapsuleDecoder, CapsuleRepr, Decoded, IpPrefix};
use mimiq_masque::datagram::Datagram;
use mimiq_masque::quic::{self, QuicSettings, Tls};
use mimiq_masque::request::{self, Target};
use mimiq_masque::template::{IpProtocolScope, IpScope, IpTarget};
use mimiq_perf::masque::{self, addr, echo_server, start_ip_client, stop_client, ProxyProc};
use mimiq_perf::testbed::{self, require_root, Testbed};
use mimiq_perf::traffic::ping;
use serde_json::Value;

/// The hostile client's address (the real client binds `CLIENT_V4[0]`).
const HOSTILE_V4: &str = addr::CLIENT_V4[1];
/// The UDP echo server on `s`.
const ECHO_PORT: u16 = 7007;
/// The inner MTU the proxy enforces here: the floor, so that oversize packets still fit a QUIC
/// datagram and reach the proxy's checks.
const TUNNEL_MTU: usize = 1280;
/// The proxy's ICMP source (the test config's `icmp_source_v4`).
const ICMP_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);
/// H3_MESSAGE_ERROR (RFC 9114 §8.1): the code a malformed request is reset with.
const H3_MESSAGE_ERROR: u64 = 0x10e;
/// H3_DATAGRAM_ERROR (RFC 9297 §2.1): the connection error for a malformed HTTP/3 datagram.
const H3_DATAGRAM_ERROR: u64 = 0x33;
/// How long the flood runs.
const FLOOD: Duration = Duration::from_secs(3);
/// Growth of the proxy's resident memory that the flood may cause, at most.
const RSS_GROWTH_LIMIT_KB: u64 = 32 * 1024;

#[test]
fn hostile_capsules_and_datagrams_are_dropped_answered_or_reset_and_counted_while_others_are_served(
) {
    require_root();
    let started = Instant::now();
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ip = format!(
        "[quic]\ndgram_queue_len = 256\n[ip]\ntun = \"mqp0\"\npool_v4 = \"{}\"\npool_v6 = \"{}\"\n\
         icmp_source_v4 = \"{ICMP_SOURCE_V4}\"\nicmp_source_v6 = \"fd00:200::1\"\ntunnel_mtu = {TUNNEL_MTU}\n",
        addr::POOL_V4,
        addr::POOL_V6
    );
    let mut proxy = ProxyProc::start(&tb, "p", dir.path(), "0.0.0.0:4433", &ip).unwrap();
    echo_server(
        &tb,
        "s",
        SocketAddr::new(addr::SERVER_V4.parse().unwrap(), ECHO_PORT),
    )
    .unwrap();

    // The client host's kernel sends nothing of its own through the tunnel (router solicitations,
    // link-local chatter): the proxy would count it as spoofed, next to the hostile client's.
    tb.sysctl("c", "net.ipv6.conf.default.router_solicitations", "0")
        .unwrap();
    tb.sysctl("c", "net.ipv6.conf.default.addr_gen_mode", "1")
        .unwrap();

    // The well-behaved client, up before the attack and pinging through it.
    let url = format!("{}:4433", addr::PROXY_V4);
    let (mut good, ready) = start_ip_client(&tb).unwrap();
    assert!(ready.contains("198.18.200."), "{ready}");
    ping(&tb, "c", addr::SERVER_V4, 3).unwrap_or_else(|e| panic!("{e}; {}", good.describe()));

    // The hostile client's socket lives in the client namespace; the client itself is driven
    // from this thread and, during the flood, from a thread in that namespace.
    let sock = tb
        .run_in("c", || UdpSocket::bind(format!("{HOSTILE_V4}:0")))
        .unwrap()
        .unwrap();
    let proxy_addr: SocketAddr = url.parse().unwrap();
    let mut h = Hostile::connect(sock, proxy_addr);
    h.pump_until(Duration::from_secs(5), |h| h.h3.is_some());
    assert!(h.h3.is_some(), "hostile client: no HTTP/3 connection");

    let before = proxy.fresh_stats().unwrap();

    // ---- Malformed capsules: each on its own request stream ----
    let any = IpScope::ANY;
    let greased = h.open_ip(&any);
    let empty_request = h.open_ip(&any);
    let oversized = h.open_ip(&any);
    let truncated = h.open_ip(&any);
    let zero_id = h.open_ip(&any);
    let cut_by_fin = h.open_ip(&any);
    let sessions = [
        greased,
        empty_request,
        oversized,
        truncated,
        zero_id,
        cut_by_fin,
    ];
    h.pump_until(Duration::from_secs(5), |h| {
        sessions.iter().all(|s| h.status.contains_key(s))
    });
    for s in sessions {
        assert_eq!(h.status.get(&s), Some(&200), "stream {s}: {:?}", h.status);
    }

    // An unknown capsule type (a GREASE-like 0x17), then a well-formed capsule: the stream lives.
    let mut unknown = [0u8; 16];
    let n = CapsuleRepr::Unknown {
        capsule_type: 0x17,
        value: b"ignore me",
    }
    .emit(&mut unknown)
    .unwrap();
    h.send_body(greased, &unknown[..n], false);
    // ADDRESS_REQUEST with zero Requested Addresses: Type 0x02, Length 0.
    h.send_body(empty_request, &[0x02, 0x00], false);
    // ADDRESS_REQUEST whose Length (1 000 000, a 4-byte varint) is past any bound the proxy keeps:
    // it is refused before any of the value is buffered.
    h.send_body(
        oversized,
        &[0x02, 0x80, 0x0f, 0x42, 0x40, 0x01, 0x04],
        false,
    );
    // ADDRESS_REQUEST of Length 5 that ends inside its IPv4 address: Request ID 1, IP Version 4,
    // three of the four address bytes.
    h.send_body(truncated, &[0x02, 0x05, 0x01, 0x04, 198, 18, 200], false);
    // ADDRESS_REQUEST with Request ID 0: Request ID 0, IP Version 4, 0.0.0.0, prefix length 32.
    h.send_body(zero_id, &[0x02, 0x07, 0x00, 0x04, 0, 0, 0, 0, 32], false);
    // The first bytes of an ADDRESS_REQUEST (Length 7, one byte of value), then FIN.
    h.send_body(cut_by_fin, &[0x02, 0x07, 0x01], true);
    let malformed = [empty_request, oversized, truncated, zero_id, cut_by_fin];
    h.pump_until(Duration::from_secs(5), |h| {
        malformed.iter().all(|s| h.resets.contains_key(s))
    });

    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
    //# Endpoints that receive a Capsule with an unknown Capsule Type MUST
    //# silently drop that Capsule and skip over it to parse the next
    //# Capsule.
    assert!(
        !h.resets.contains_key(&greased),
        "an unknown capsule reset its stream: {:?}",
        h.resets
    );
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
    //# When a receiver encounters an error processing the Capsule Protocol,
    //# the receiver MUST treat it as if it had received a malformed or
    //# incomplete HTTP message.
    //= https://www.rfc-editor.org/rfc/rfc9484#section-4.7.2
    //# If an endpoint receives an ADDRESS_REQUEST capsule that contains zero Requested
    //# Addresses, it MUST abort the IP proxying request stream.
    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
    //# If the receive side of a stream carrying capsules is terminated
    //# cleanly (for example, in HTTP/3 this is defined as receiving a QUIC
    //# STREAM frame with the FIN bit set) and the last capsule on the stream
    //# was truncated, this MUST be treated as if it were a malformed or
    //# incomplete message.
    //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1.2
    //# Malformed requests or responses that are
    //# detected MUST be treated as a stream error of type H3_MESSAGE_ERROR.
    for s in malformed {
        assert_eq!(
            h.resets.get(&s),
            Some(&H3_MESSAGE_ERROR),
            "stream {s}: {:?}",
            h.resets
        );
    }

    // ---- Datagrams: two healthy sessions, one scoped to the echo server ----
    let scoped = IpScope {
        target: IpTarget::Prefix(IpPrefix::host(addr::SERVER_V4.parse().unwrap())),
        ipproto: IpProtocolScope::Any,
    };
    let s_scoped = h.open_ip(&scoped);
    let s_any = h.open_ip(&any);
    h.pump_until(Duration::from_secs(5), |h| {
        h.assigned(s_scoped).len() == 2 && h.assigned(s_any).len() == 2
    });
    let (a4, a6) = (h.v4(s_scoped), h.v6(s_any));
    let any_v4 = h.v4(s_any);
    let server4: Ipv4Addr = addr::SERVER_V4.parse().unwrap();
    let server6: Ipv6Addr = addr::SERVER_V6.parse().unwrap();
    let outside4: Ipv4Addr = "198.18.20.1".parse().unwrap();
    let (q_scoped, q_any) = (s_scoped / 4, s_any / 4);

    // A well-formed packet first: the session carries traffic (an echo comes back).
    let hello = ipv4_udp(a4, server4, ECHO_PORT, b"hostile hello", true);
    h.send_datagram(q_scoped, 0, &hello);
    // Context ID 5 (never registered) in front of a packet that would otherwise be forwarded.
    h.send_datagram(
        q_scoped,
        5,
        &ipv4_udp(a4, server4, ECHO_PORT, b"context 5", true),
    );
    // A Quarter Stream ID and nothing else: no Context ID.
    h.send_raw_datagram(&encode_varint(q_scoped));
    // A stream that was never opened (client bidi stream 400) and one whose session was reset.
    h.send_datagram(
        100,
        0,
        &ipv4_udp(a4, server4, ECHO_PORT, b"no stream", true),
    );
    h.send_datagram(
        empty_request / 4,
        0,
        &ipv4_udp(a4, server4, ECHO_PORT, b"reset", true),
    );
    // Spoofed sources: addresses of the pool that are not this session's.
    h.send_datagram(
        q_scoped,
        0,
        &ipv4_udp(any_v4, server4, ECHO_PORT, b"spoofed", true),
    );
    let other6: Ipv6Addr = "fd00:200::99".parse().unwrap();
    h.send_datagram(q_any, 0, &ipv6_udp(other6, server6, ECHO_PORT, b"spoofed6"));
    // Out of scope: the scoped session to another host, over IPv4 and IPv6.
    let oos4 = ipv4_udp(a4, outside4, ECHO_PORT, b"out of scope", true);
    h.send_datagram(q_scoped, 0, &oos4);
    let a6_scoped = h.v6(s_scoped);
    h.send_datagram(
        q_scoped,
        0,
        &ipv6_udp(a6_scoped, server6, ECHO_PORT, b"out of scope 6"),
    );
    // Oversize: 1300-byte packets (they fit a QUIC datagram, not the 1280-byte tunnel).
    let big = vec![0xab; 1300 - 28];
    let big4_df = ipv4_udp(a4, server4, ECHO_PORT, &big, true);
    h.send_datagram(q_scoped, 0, &big4_df);
    h.send_datagram(q_scoped, 0, &ipv4_udp(a4, server4, ECHO_PORT, &big, false));
    let big6 = ipv6_udp(a6, server6, ECHO_PORT, &vec![0xcd; 1300 - 48]);
    h.send_datagram(q_any, 0, &big6);
    let expect_from_proxy = 5; // the echo and four ICMP errors
    h.pump_until(Duration::from_secs(5), |h| {
        h.dgrams.len() >= expect_from_proxy
    });
    // Anything more (an answer to a dropped packet) would arrive within this.
    h.pump(Duration::from_millis(300));

    let replies = std::mem::take(&mut h.dgrams);
    let mut by_kind: HashMap<&'static str, Vec<Vec<u8>>> = HashMap::new();
    for d in &replies {
        let d = Datagram::parse(d).expect("the proxy sends well-formed datagrams");
        assert_eq!(d.context_id, 0, "{d:?}");
        let kind = classify(d.payload);
        assert!(
            [q_scoped, q_any].contains(&d.quarter_stream_id),
            "{kind} on quarter stream {}",
            d.quarter_stream_id
        );
        by_kind.entry(kind).or_default().push(d.payload.to_vec());
    }
    let kinds: HashMap<&str, usize> = by_kind.iter().map(|(k, v)| (*k, v.len())).collect();
    // The echo of the well-formed packet, and nothing for any of the dropped ones.
    assert_eq!(kinds.get("echo"), Some(&1), "{kinds:?}");
    //= https://www.rfc-editor.org/rfc/rfc9484#section-7.2.1
    //# For unroutable destination addresses, send Destination Unreachable
    //# (Section 3.1 of [ICMPv6]) with code 0, "No route to destination",
    //# or code 1, "Communication with destination administratively
    //# prohibited".
    assert_eq!(kinds.get("icmp4_prohibited"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("icmp6_prohibited"), Some(&1), "{kinds:?}");
    let unreachable = &by_kind["icmp4_prohibited"][0];
    assert_eq!(
        &unreachable[12..16],
        &ICMP_SOURCE_V4.octets(),
        "ICMP source"
    );
    assert_eq!(&unreachable[16..20], &a4.octets(), "ICMP destination");
    assert_eq!(
        &unreachable[28..48],
        &oos4[..20],
        "the ICMP error quotes the packet"
    );
    //= https://www.rfc-editor.org/rfc/rfc9484#section-10.1
    //# In this scenario, the endpoint SHOULD drop the IP packet and send an
    //# ICMP Packet Too Big message to the sender of the dropped packet; see
    //# Section 3.2 of [ICMPv6].
    assert_eq!(kinds.get("icmp4_too_big"), Some(&1), "{kinds:?}");
    assert_eq!(kinds.get("icmp6_too_big"), Some(&1), "{kinds:?}");
    let frag_needed = &by_kind["icmp4_too_big"][0];
    assert_eq!(
        u16::from_be_bytes([frag_needed[26], frag_needed[27]]) as usize,
        TUNNEL_MTU
    );
    let ptb = &by_kind["icmp6_too_big"][0];
    assert_eq!(
        u32::from_be_bytes([ptb[44], ptb[45], ptb[46], ptb[47]]) as usize,
        TUNNEL_MTU
    );
    assert_eq!(replies.len(), 5, "{kinds:?}");

    let after = proxy.fresh_stats().unwrap();
    let d = |path: &[&str]| delta(&before, &after, path);
    let sessions_opened = sessions.len() as u64 + 2;
    assert_eq!(d(&["sessions_ip"]), sessions_opened, "{after}");
    assert_eq!(d(&["capsules_skipped"]), 1, "{after}");
    assert_eq!(d(&["capsule_errors"]), malformed.len() as u64, "{after}");
    //= https://www.rfc-editor.org/rfc/rfc9484#section-6
    //# If an HTTP/3 datagram that carries an unknown Context ID is
    //# received, the receiver SHALL either drop that datagram silently or
    //# buffer it temporarily (on the order of a round trip) while
    //# awaiting the registration of the corresponding Context ID.
    assert_eq!(d(&["ip_drops", "unknown_context"]), 1, "{after}");
    assert_eq!(d(&["ip_drops", "truncated_context_id"]), 1, "{after}");
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# If an HTTP/3 Datagram is received and its Quarter Stream ID maps to a
    //# stream that has not yet been created, the receiver SHALL either drop
    //# that datagram silently or buffer it temporarily (on the order of a
    //# round trip) while awaiting the creation of the corresponding stream.
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# If a datagram is received after the corresponding
    //# stream's receive side is closed, the received datagrams MUST be
    //# silently dropped.
    assert_eq!(d(&["dgram_unknown_stream"]), 2, "{after}");
    //= https://www.rfc-editor.org/rfc/rfc9484#section-11
    //# In such
    //# scenarios, endpoints MUST follow the recommendations from [BCP38] to
    //# prevent source address spoofing.
    assert_eq!(d(&["ip_drops", "spoofed_source"]), 2, "{after}");
    assert_eq!(d(&["ip_drops", "out_of_scope"]), 2, "{after}");
    assert_eq!(d(&["ip_drops", "too_big"]), 3, "{after}");
    assert_eq!(d(&["icmp_errors"]), 4, "{after}");
    assert_eq!(d(&["refused"]), 0, "{after}");
    assert_eq!(d(&["dgram_recv_queue_full"]), 0, "{after}");
    assert_all_datagrams_accounted(&before, &after);
    // The capsule errors cost the hostile client its sessions, not its connection.
    assert_eq!(d(&["connections_closed"]), 0, "{after}");
    ping(&tb, "c", addr::SERVER_V4, 5).unwrap_or_else(|e| panic!("after the malformed input: {e}"));

    // ---- Flood: out-of-scope packets as fast as the connection takes them, each one asking for
    // an ICMP error back, while the real client pings ----
    let rss_before = rss_kb(proxy.proc.pid());
    let flood_pkt = ipv4_udp(a4, outside4, ECHO_PORT, b"flood", true);
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let flood = tb
        .spawn_in("c", move || {
            go2.wait();
            let sent0 = h.conn.stats().dgram_sent;
            let end = Instant::now() + FLOOD;
            let mut back = 0usize;
            while Instant::now() < end {
                while h.conn.dgram_send_queue_len() < 1024 {
                    if !h.try_send_datagram(q_scoped, 0, &flood_pkt) {
                        break;
                    }
                }
                h.pump(Duration::from_millis(2));
                back += h.dgrams.len();
                h.dgrams.clear();
            }
            h.pump(Duration::from_millis(500));
            back += h.dgrams.len();
            h.dgrams.clear();
            let sent = h.conn.stats().dgram_sent - sent0;
            (h, sent as u64, back as u64)
        })
        .unwrap();
    go.wait();
    std::thread::sleep(Duration::from_millis(300));
    let during = ping_answered(&tb, addr::SERVER_V4, 20);
    let (mut h, flood_sent, flood_back) = flood.join().unwrap().unwrap();
    let rss_after = rss_kb(proxy.proc.pid());
    let flooded = proxy.fresh_stats().unwrap();
    let f = |path: &[&str]| delta(&after, &flooded, path);
    eprintln!(
        "flood: {flood_sent} datagrams sent, {flood_back} answered; proxy rx {} out_of_scope {} \
         icmp {} tx {} queue_full {} recv_queue_full {}; rss {rss_before} -> {rss_after} kB; \
         ping during: {during}/20; hostile lost {}",
        f(&["dgram_rx"]),
        f(&["ip_drops", "out_of_scope"]),
        f(&["icmp_errors"]),
        f(&["dgram_tx"]),
        f(&["dgram_queue_full"]),
        f(&["dgram_recv_queue_full"]),
        h.conn.stats().lost
    );
    assert!(
        proxy.proc.try_status().is_none(),
        "the proxy died: {}",
        proxy.proc.describe()
    );
    // How fast the flood goes and what share of the real client's pings get through it are
    // rates of this machine's load (printed above); what must hold is that there was a flood
    // and that the real client was served through it.
    assert!(
        flood_sent > 1_000,
        "the flood sent only {flood_sent} datagrams"
    );
    assert!(
        during > 0,
        "the real client got no ping through during the flood"
    );
    // Every flood datagram that reached the proxy was read and counted, or counted as dropped at
    // the bounded receive queue (a packet lost on the way carried at most ~40 of them).
    let reached = f(&["dgram_rx"]) + f(&["dgram_recv_queue_full"]);
    let lost_at_most = h.conn.stats().lost as u64 * 40;
    assert!(
        reached + lost_at_most >= flood_sent && reached <= flood_sent + 1_000,
        "{flood_sent} flood datagrams sent, {reached} received or counted as dropped: {flooded}"
    );
    let hit = f(&["ip_drops", "out_of_scope"]);
    assert!(
        hit > 0 && hit <= flood_sent,
        "{hit} of {flood_sent} counted: {flooded}"
    );
    // Every datagram refused got its ICMP error built; each was sent or counted as a drop
    // at the bounded send queue.
    assert_eq!(f(&["icmp_errors"]), hit, "{flooded}");
    assert!(
        f(&["dgram_tx"]) + f(&["dgram_queue_full"]) >= hit,
        "{flooded}"
    );
    assert!(flood_back <= f(&["dgram_tx"]), "{flooded}");
    assert_all_datagrams_accounted(&after, &flooded);
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_GROWTH_LIMIT_KB,
        "the proxy grew from {rss_before} to {rss_after} kB under the flood"
    );

    // ---- Datagrams without a valid Quarter Stream ID: each costs its sender the connection ----
    let mut closed = Vec::new();
    for (what, bytes) in [
        ("no Quarter Stream ID", Vec::new()),
        // 2^62-1 in an 8-byte varint, then Context ID 0.
        (
            "Quarter Stream ID above 2^60-1",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00],
        ),
    ] {
        let sock = tb
            .run_in("c", || UdpSocket::bind(format!("{HOSTILE_V4}:0")))
            .unwrap()
            .unwrap();
        let mut bad = Hostile::connect(sock, proxy_addr);
        bad.pump_until(Duration::from_secs(5), |h| h.h3.is_some());
        bad.send_raw_datagram(&bytes);
        bad.pump_until(Duration::from_secs(3), |h| {
            h.conn.is_closed() || h.conn.peer_error().is_some()
        });
        closed.push((
            what,
            bad.conn.peer_error().map(|e| (e.is_app, e.error_code)),
        ));
    }
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow
    //# parsing the Quarter Stream ID field MUST be treated as an HTTP/3
    //# connection error of type H3_DATAGRAM_ERROR (0x33).
    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of an
    //# HTTP/3 Datagram that includes a larger value MUST be treated as an
    //# HTTP/3 connection error of type H3_DATAGRAM_ERROR (0x33).
    for (what, error) in closed {
        assert_eq!(error, Some((true, H3_DATAGRAM_ERROR)), "{what}");
    }

    // ---- After: both clients are served; the hostile one's healthy session still works ----
    ping(&tb, "c", addr::SERVER_V4, 10)
        .unwrap_or_else(|e| panic!("after the flood: {e}; {}", good.describe()));
    ping(&tb, "c", addr::SERVER_V6, 5).unwrap_or_else(|e| panic!("after the flood (IPv6): {e}"));
    h.send_datagram(q_scoped, 0, &hello);
    h.pump_until(Duration::from_secs(3), |h| {
        h.dgrams.iter().any(|d| is_echo(d))
    });
    assert!(
        h.dgrams.iter().any(|d| is_echo(d)),
        "the hostile client's healthy session stopped"
    );
    let end = proxy.fresh_stats().unwrap();
    assert_eq!(delta(&flooded, &end, &["connections_closed"]), 2, "{end}");
    assert_eq!(delta(&flooded, &end, &["dgram_unknown_stream"]), 2, "{end}");
    assert_eq!(delta(&flooded, &end, &["connections_accepted"]), 2, "{end}");
    assert_eq!(
        end["sessions_ip"],
        before["sessions_ip"].as_u64().unwrap() + sessions_opened,
        "{end}"
    );
    stop_client(&mut good).unwrap();
    eprintln!("masque_hostile took {:?}", started.elapsed());
}

/// Every HTTP datagram the proxy received between two snapshots is accounted for: forwarded to
/// the TUN device, or dropped under a named reason.
fn assert_all_datagrams_accounted(a: &Value, b: &Value) {
    let d = |path: &[&str]| delta(a, b, path);
    let drops: u64 = b["ip_drops"]
        .as_object()
        .map(|m| m.keys().map(|k| d(&["ip_drops", k])).sum())
        .unwrap_or(0);
    let accounted = d(&["tun_tx"]) + d(&["tun_errors"]) + d(&["dgram_unknown_stream"]) + drops;
    assert_eq!(
        d(&["dgram_rx"]),
        accounted,
        "datagrams received vs accounted for: {b}"
    );
}

/// `b - a` at a JSON path (a missing value is 0; a map counts its values' sum).
fn delta(a: &Value, b: &Value, path: &[&str]) -> u64 {
    let at = |v: &Value| {
        let mut v = v;
        for p in path {
            v = &v[*p];
        }
        match v {
            Value::Object(m) => m.values().filter_map(Value::as_u64).sum(),
            v => v.as_u64().unwrap_or(0),
        }
    };
    at(b).saturating_sub(at(a))
}

/// A raw HTTP/3 client on quiche, with the transport settings of the real one.
struct Hostile {
    sock: UdpSocket,
    local: SocketAddr,
    conn: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    h3cfg: quiche::h3::Config,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Response status by request stream.
    status: HashMap<u64, u16>,
    /// Capsule bytes received by request stream.
    body: HashMap<u64, Vec<u8>>,
    /// Streams the proxy reset, with the error code.
    resets: HashMap<u64, u64>,
    /// HTTP datagrams received, whole.
    dgrams: Vec<Vec<u8>>,
}

impl Hostile {
    fn connect(sock: UdpSocket, peer: SocketAddr) -> Hostile {
        let local = sock.local_addr().unwrap();
        let mut cfg = QuicSettings::default()
            .transport_config(Tls::Client { ca: None })
            .unwrap();
        // Any unique ID will do for a test client: the clock's nanoseconds, spread.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let id: Vec<u8> = (0..quic::CID_LEN)
            .map(|i| (seed >> (i % 16 * 8)) as u8 ^ i as u8)
            .collect();
        let scid = quiche::ConnectionId::from_vec(id);
        let conn = quiche::connect(Some("proxy"), &scid, local, peer, &mut cfg).unwrap();
        Hostile {
            sock,
            local,
            conn,
            h3: None,
            h3cfg: quic::h3_config().unwrap(),
            out: vec![0; 65_536],
            buf: vec![0; 65_536],
            status: HashMap::new(),
            body: HashMap::new(),
            resets: HashMap::new(),
            dgrams: Vec::new(),
        }
    }

    /// Sends a CONNECT-IP request like the real client's; returns its stream.
    fn open_ip(&mut self, scope: &IpScope) -> u64 {
        let hdrs = request::request_headers(&Target::Ip(scope.clone()), "proxy", None, None);
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        let sid = h3.send_request(&mut self.conn, &hdrs, false).unwrap();
        self.flush();
        sid
    }

    /// Writes raw bytes into DATA frames on a request stream.
    fn send_body(&mut self, sid: u64, bytes: &[u8], fin: bool) {
        let h3 = self.h3.as_mut().expect("HTTP/3 is up");
        let n = h3.send_body(&mut self.conn, sid, bytes, fin).unwrap();
        assert_eq!(n, bytes.len(), "stream {sid} took only {n} bytes");
        self.flush();
    }

    fn send_datagram(&mut self, qsid: u64, context_id: u64, payload: &[u8]) {
        assert!(
            self.try_send_datagram(qsid, context_id, payload),
            "datagram refused locally"
        );
        self.flush();
    }

    fn try_send_datagram(&mut self, qsid: u64, context_id: u64, payload: &[u8]) -> bool {
        let d = Datagram {
            quarter_stream_id: qsid,
            context_id,
            payload,
        };
        let mut v = vec![0u8; d.buffer_len()];
        let n = d.emit(&mut v).unwrap();
        self.conn.dgram_send(&v[..n]).is_ok()
    }

    fn send_raw_datagram(&mut self, bytes: &[u8]) {
        self.conn.dgram_send(bytes).unwrap();
        self.flush();
    }

    /// The addresses the proxy assigned on a stream (its last ADDRESS_ASSIGN).
    fn assigned(&self, sid: u64) -> Vec<IpPrefix> {
        let Some(body) = self.body.get(&sid) else {
            return Vec::new();
        };
        let mut decoder = CapsuleDecoder::default();
        let (mut pos, mut out) = (0, Vec::new());
        loop {
            match decoder.decode(&body[pos..]) {
                Ok(Decoded::Capsule {
                    capsule: Capsule::AddressAssign(a),
                    consumed,
                }) => {
                    out = a.iter().map(|e| e.prefix).collect();
                    pos += consumed;
                }
                Ok(Decoded::Capsule { consumed, .. }) | Ok(Decoded::Skipped { consumed, .. }) => {
                    pos += consumed
                }
                _ => return out,
            }
        }
    }

    fn v4(&self, sid: u64) -> Ipv4Addr {
        self.assigned(sid)
            .iter()
            .find_map(|p| match p.addr() {
                IpAddr::V4(a) => Some(a),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no IPv4 address on stream {sid}"))
    }

    fn v6(&self, sid: u64) -> Ipv6Addr {
        self.assigned(sid)
            .iter()
            .find_map(|p| match p.addr() {
                IpAddr::V6(a) => Some(a),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no IPv6 address on stream {sid}"))
    }

    fn pump_until(&mut self, limit: Duration, done: impl Fn(&Hostile) -> bool) {
        let end = Instant::now() + limit;
        while !done(self) && Instant::now() < end {
            self.pump(Duration::from_millis(10));
        }
    }

    /// Runs the connection for `dur`: packets out and in, timers, HTTP/3 events, datagrams.
    fn pump(&mut self, dur: Duration) {
        let end = Instant::now() + dur;
        loop {
            self.flush();
            let now = Instant::now();
            if now >= end {
                break;
            }
            let mut wait = end - now;
            if let Some(t) = self.conn.timeout() {
                wait = wait.min(t);
            }
            self.sock
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
                .unwrap();
            if let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
                let info = quiche::RecvInfo {
                    from,
                    to: self.local,
                };
                let _ = self.conn.recv(&mut self.buf[..n], info);
                self.sock.set_nonblocking(true).unwrap();
                while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
                    let info = quiche::RecvInfo {
                        from,
                        to: self.local,
                    };
                    let _ = self.conn.recv(&mut self.buf[..n], info);
                }
                self.sock.set_nonblocking(false).unwrap();
            }
            self.conn.on_timeout();
            self.events();
        }
    }

    fn events(&mut self) {
        if self.h3.is_none() && self.conn.is_established() {
            self.h3 =
                Some(quiche::h3::Connection::with_transport(&mut self.conn, &self.h3cfg).unwrap());
        }
        if let Some(h3) = self.h3.as_mut() {
            loop {
                match h3.poll(&mut self.conn) {
                    Ok((sid, quiche::h3::Event::Headers { list, .. })) => {
                        if let Some(s) = request::response_status(&list) {
                            self.status.insert(sid, s);
                        }
                    }
                    Ok((sid, quiche::h3::Event::Data)) => {
                        while let Ok(n) = h3.recv_body(&mut self.conn, sid, &mut self.buf) {
                            if n == 0 {
                                break;
                            }
                            self.body
                                .entry(sid)
                                .or_default()
                                .extend_from_slice(&self.buf[..n]);
                        }
                    }
                    Ok((sid, quiche::h3::Event::Reset(code))) => {
                        self.resets.insert(sid, code);
                    }
                    Ok(_) => {}
                    Err(quiche::h3::Error::Done) => break,
                    Err(e) => panic!("hostile client: HTTP/3 error {e}"),
                }
            }
        }
        while let Ok(n) = self.conn.dgram_recv(&mut self.buf) {
            self.dgrams.push(self.buf[..n].to_vec());
        }
    }

    fn flush(&mut self) {
        while let Ok((n, info)) = self.conn.send(&mut self.out) {
            let _ = self.sock.send_to(&self.out[..n], info.to);
        }
    }
}

/// What an inner packet from the proxy is.
fn classify(p: &[u8]) -> &'static str {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 28 && p[9] == 1 => match (p[20], p[21]) {
            (3, 13) => "icmp4_prohibited",
            (3, 4) => "icmp4_too_big",
            _ => "icmp4_other",
        },
        Some(4) if is_echo(p) => "echo",
        Some(6) if p.len() >= 48 && p[6] == 58 => match (p[40], p[41]) {
            (1, 1) => "icmp6_prohibited",
            (2, 0) => "icmp6_too_big",
            _ => "icmp6_other",
        },
        Some(6) => "ipv6",
        _ => "other",
    }
}

/// An IPv4 UDP packet from the echo server's port.
fn is_echo(p: &[u8]) -> bool {
    let p = match Datagram::parse(p) {
        Ok(d) if d.payload.first().map(|b| b >> 4) == Some(4) => d.payload,
        _ => p,
    };
    p.len() >= 28 && p[0] >> 4 == 4 && p[9] == 17 && u16::from_be_bytes([p[20], p[21]]) == ECHO_PORT
}

/// An IPv4 + UDP packet (UDP checksum 0, which IPv4 allows).
fn ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
    dont_fragment: bool,
) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = if dont_fragment { 0x40 } else { 0 };
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p[20..22].copy_from_slice(&40_000u16.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// An IPv6 + UDP packet (no UDP checksum: these packets are never delivered).
fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let upper = 8 + payload.len();
    let mut p = vec![0u8; 40 + upper];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(upper as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&40_000u16.to_be_bytes());
    p[42..44].copy_from_slice(&dport.to_be_bytes());
    p[44..46].copy_from_slice(&(upper as u16).to_be_bytes());
    p[48..].copy_from_slice(payload);
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut acc: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn encode_varint(v: u64) -> Vec<u8> {
    let mut b = [0u8; 8];
    let n = mimiq_masque::varint::encode(v, &mut b).unwrap();
    b[..n].to_vec()
}

/// How many of `count` pings from the client host to `addr` were answered.
fn ping_answered(tb: &Testbed, addr: &str, count: u32) -> usize {
    let count = count.to_string();
    let out = tb
        .exec(
            "c",
            &["ping", "-4", "-c", &count, "-i", "0.1", "-W", "2", addr],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("time="))
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    testbed::rss_kb(pid).unwrap_or_else(|| panic!("no VmRSS for {pid}"))
}
