//! The proxy's CONNECT-IP receive path in memory, for instruction counts under callgrind: a
//! quiche client sends inner TCP segments of one bulk flow as HTTP/3 datagrams; the server side
//! does per burst what the proxy's loop does with the QUIC datagrams of one pass
//! (`server::Worker::pass`): `Connection::recv` for each, then `dgram_recv_buf`, the HTTP datagram and
//! context ID parse, `ConnectIpSession::on_datagram`, `TcpCoalescer::push`/`take` (the GSO write
//! to the TUN device, here into a byte counter), and the connection's outgoing packets (the ACKs).
//! No syscalls: what it counts is the proxy's user-space work per packet, exact and repeatable.
//!
//! ```text
//! cargo build --profile bench -p mimiq-masque --example tunnel_callgrind
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.tunnel --toggle-collect='*proxy_burst*' \
//!   target/release/examples/tunnel_callgrind 30000
//! # instructions per packet = callgrind's "Collected" / 30000
//! ```
//!
//! Arguments: packets (default 100000), burst (default 32 datagrams per pass). It prints what it
//! forwarded and fails if a packet was lost or refused, so the count is of work done.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mimiq_masque::capsule::IpPrefix;
use mimiq_masque::datagram::{self, ContextPayload, H3Datagram};
use mimiq_masque::policy::{Guard, OwnAddresses, Policies, PolicyConfig};
use mimiq_masque::quic::{self, QuicSettings, Tls};
use mimiq_masque::session::connect_ip::{ConnectIpSession, HostPool, SessionConfig, Verdict};
use mimiq_masque::template::IpScope;
use mimiq_masque::tundev::TcpCoalescer;

// The proxy's allocator (`mimiq-proxy` runs on mimalloc): quiche allocates per datagram.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SERVER_V4: [u8; 4] = [198, 51, 100, 7];

/// What one burst through the proxy side did.
#[derive(Default)]
struct Sink {
    packets: u64,
    bytes: u64,
    writes: u64,
    refused: u64,
}

/// The proxy's work for one pass: every received QUIC packet into the connection, every
/// datagram through the session and the coalescer, then the connection's replies.
#[inline(never)]
fn proxy_burst(
    conn: &mut quiche::Connection,
    rx: &mut [Vec<u8>],
    local: SocketAddr,
    peer: SocketAddr,
    session: &mut ConnectIpSession,
    co: &mut TcpCoalescer,
    reply: &mut [u8],
    sink: &mut Sink,
    acks: &mut Vec<Vec<u8>>,
) {
    // As the proxy does: quiche's count of packets read, before and after the burst, tells
    // the datagrams it dropped (`quic_packets_dropped`).
    let read_before = conn.stats().recv;
    for pkt in rx.iter_mut() {
        if conn
            .recv(
                pkt,
                quiche::RecvInfo {
                    from: peer,
                    to: local,
                },
            )
            .is_err()
        {
            sink.refused += 1;
        }
    }
    let read = conn.stats().recv - read_before;
    sink.refused += rx.len().saturating_sub(read) as u64;
    while let Ok(mut d) = conn.dgram_recv_buf() {
        let len = d.len();
        let Ok(h) = H3Datagram::parse(&d) else {
            sink.refused += 1;
            continue;
        };
        let off = len - h.payload.len();
        let Ok(ctx) = ContextPayload::parse(&d[off..]) else {
            sink.refused += 1;
            continue;
        };
        let start = len - ctx.payload.len();
        let pkt = &mut d[start..];
        match session.on_datagram(pkt, reply) {
            Verdict::Forward(n) => {
                if !co.push(&pkt[..n]) {
                    write(co, sink);
                    if !co.push(&pkt[..n]) {
                        sink.refused += 1;
                    }
                }
            }
            _ => sink.refused += 1,
        }
    }
    write(co, sink);
    let mut out = [0u8; 1500];
    while let Ok((n, _)) = conn.send(&mut out) {
        acks.push(out[..n].to_vec());
    }
}

fn write(co: &mut TcpCoalescer, sink: &mut Sink) {
    let segments = co.segments() as u64;
    if let Some(b) = co.take() {
        sink.packets += segments;
        sink.bytes += b.len() as u64;
        sink.writes += 1;
    }
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args
        .next()
        .map_or(Ok(100_000), |a| a.parse())
        .map_err(|e| format!("packets: {e}"))?;
    let burst: usize = args
        .next()
        .map_or(Ok(32), |a| a.parse())
        .map_err(|e| format!("burst: {e}"))?;
    if burst == 0 || burst > 1000 {
        return Err("burst must be 1..=1000".into());
    }

    let dir = std::env::temp_dir().join(format!("tunnel-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let ck = rcgen::generate_simple_self_signed(vec!["proxy".into()]).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&key, ck.signing_key.serialize_pem()).map_err(|e| e.to_string())?;
    let settings = QuicSettings::default();
    let mut scfg = settings.transport_config(Tls::Server {
        cert: &cert,
        key: &key,
    })?;
    let mut ccfg = settings.transport_config(Tls::Client { ca: None })?;
    let _ = std::fs::remove_dir_all(&dir);

    let (caddr, saddr): (SocketAddr, SocketAddr) = (
        "10.0.0.1:5000".parse().unwrap(),
        "10.0.0.2:4433".parse().unwrap(),
    );
    let rng = ring::rand::SystemRandom::new();
    let (ccid, _) = quic::new_cid(&rng);
    let (scid, _) = quic::new_cid(&rng);
    let mut client = quiche::connect(Some("proxy"), &ccid, caddr, saddr, &mut ccfg)
        .map_err(|e| e.to_string())?;
    let mut server =
        quiche::accept(&scid, None, saddr, caddr, &mut scfg).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_536];
    // The handshake, packets handed across in memory.
    for _ in 0..100 {
        if client.is_established() && server.is_established() {
            break;
        }
        relay(&mut client, &mut server, caddr, saddr, &mut buf);
        relay(&mut server, &mut client, saddr, caddr, &mut buf);
    }
    if !(client.is_established() && server.is_established()) {
        return Err("handshake did not complete in memory".into());
    }

    let mut pool = HostPool::new(
        Some(
            IpPrefix::new(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)), 16)
                .map_err(|e| e.to_string())?,
        ),
        None,
    );
    // The proxy's tunnel MTU for its default UDP payload, as `server::Worker` configures it.
    let mtu = quic::tunnel_mtu(settings.max_udp_payload_bytes);
    // The destination policy the proxy runs with by default, and its own addresses (a host with
    // a loopback, two interfaces and a TUN device).
    let policy = Policies::from_config(&PolicyConfig::default())?;
    let own = [
        "127.0.0.1",
        "::1",
        "198.18.10.1",
        "198.18.20.1",
        "fd00:10::1",
        "fd00:20::1",
    ];
    let config = SessionConfig {
        tunnel_mtu_bytes: mtu,
        guard: Some(Arc::new(Guard {
            policy: policy.for_token(None).clone(),
            own: OwnAddresses::new(&own.map(|a| a.parse().expect("literal"))),
        })),
        ..SessionConfig::default()
    };
    let mut session = ConnectIpSession::new(IpScope::ANY, config, &mut pool);
    let IpAddr::V4(client_ip) = session.assigned()[0].prefix.addr() else {
        return Err("no IPv4 address assigned".into());
    };
    // Full-sized segments: IPv4 (20) + TCP with timestamps (32) + payload = the tunnel MTU.
    let payload = vec![0x5a; mtu - 52];
    let mut seq = 1u32;

    let mut co = TcpCoalescer::default();
    let mut reply = vec![0u8; 2048];
    let mut sink = Sink::default();
    let mut sent = 0u64;
    let t0 = Instant::now();
    // The loop goes on after the last datagram is queued until the client's queue is empty
    // (its congestion window may hold some back for a pass).
    let mut idle = 0;
    while sink.packets < total && idle < 1000 {
        let n = burst.min((total - sent) as usize);
        for _ in 0..n {
            let b = etherparse::PacketBuilder::ipv4(client_ip.octets(), SERVER_V4, 64)
                .tcp(40000, 5201, seq, 65_000)
                .ack(1)
                .options(&[etherparse::TcpOptionElement::Timestamp(1, 1)])
                .map_err(|e| format!("{e:?}"))?;
            let mut dgram = Vec::with_capacity(2 + b.size(payload.len()));
            // Quarter stream ID 0 (stream 0) and context ID 0: two one-byte varints.
            let hl = datagram::header_len(0, 0);
            dgram.resize(hl, 0);
            datagram::emit_header(0, 0, &mut dgram).map_err(|e| format!("{e:?}"))?;
            b.write(&mut dgram, &payload).map_err(|e| e.to_string())?;
            client
                .dgram_send_buf(dgram)
                .map_err(|e| format!("dgram_send: {e}"))?;
            seq = seq.wrapping_add(payload.len() as u32);
        }
        let mut rx = Vec::with_capacity(n);
        while let Ok((len, _)) = client.send(&mut buf) {
            rx.push(buf[..len].to_vec());
        }
        idle = if rx.is_empty() { idle + 1 } else { 0 };
        let mut acks = Vec::new();
        proxy_burst(
            &mut server,
            &mut rx,
            saddr,
            caddr,
            &mut session,
            &mut co,
            &mut reply,
            &mut sink,
            &mut acks,
        );
        for mut a in acks {
            let _ = client.recv(
                &mut a,
                quiche::RecvInfo {
                    from: saddr,
                    to: caddr,
                },
            );
        }
        sent += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} inner packets ({} bytes in {} GSO writes) in bursts of {burst}; {} refused; {:.2} s",
        sink.packets, sink.bytes, sink.writes, sink.refused, secs
    );
    if sink.packets != total || sink.refused != 0 {
        return Err(format!(
            "forwarded {} of {total}, {} refused",
            sink.packets, sink.refused
        ));
    }
    Ok(())
}

/// Hands every packet `from` has to send to `to`.
fn relay(
    from: &mut quiche::Connection,
    to: &mut quiche::Connection,
    from_addr: SocketAddr,
    to_addr: SocketAddr,
    buf: &mut [u8],
) {
    while let Ok((len, _)) = from.send(buf) {
        let _ = to.recv(
            &mut buf[..len],
            quiche::RecvInfo {
                from: from_addr,
                to: to_addr,
            },
        );
    }
}
