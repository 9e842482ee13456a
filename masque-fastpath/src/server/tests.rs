//! The worker's logic without root: a real quiche HTTP/3 client against a worker whose socket
//! and TUN queue are in memory (`server/endpoints.rs`): accept, extended CONNECT and its
//! statuses, capsules, datagrams both ways, hops, teardown, stateless resets, counters.

use std::cell::RefCell;
use std::collections::VecDeque;

use quiche::h3::NameValue;

use super::admission::ResetKey;
use super::endpoints::{Datagrams, Packets};
use super::proxy::Shared;
use super::route::Routes;
use super::*;
use crate::capsule::{CapsuleRepr, IpPrefix};
use crate::session::connect_ip::HostPool;
use crate::template::{IpScope, UdpTarget};

const SERVER: &str = "10.0.0.2:4433";
const POOL: &str = "10.77.0.0";

/// Datagrams the test delivers, and those the worker sent.
struct MemDatagrams {
    local: SocketAddr,
    inbox: VecDeque<(Vec<u8>, SocketAddr)>,
    burst: Vec<(Vec<u8>, SocketAddr)>,
    out: Vec<u8>,
    sent: Vec<(Vec<u8>, SocketAddr)>,
}

impl Datagrams for MemDatagrams {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
    fn recv_burst(&mut self) -> io::Result<usize> {
        self.burst = self.inbox.drain(..).collect();
        Ok(self.burst.len())
    }
    fn burst_full(&self) -> bool {
        false
    }
    fn datagram(&mut self, i: usize) -> (&mut [u8], SocketAddr, SocketAddr) {
        let (d, from) = &mut self.burst[i];
        (&mut d[..], *from, self.local)
    }
    fn send_buf(&mut self) -> &mut [u8] {
        self.out.resize(65_535, 0);
        &mut self.out
    }
    fn commit(&mut self, len: usize, _from: SocketAddr, to: SocketAddr) {
        self.sent.push((self.out[..len].to_vec(), to));
    }
    fn flush(&mut self) {}
    fn counters(&self) -> super::endpoints::EndpointCounters {
        Default::default()
    }
    fn poll_fd(&self) -> std::os::fd::RawFd {
        -1
    }
}

/// Packets for the worker to read from its TUN queue, and those it wrote.
#[derive(Default)]
struct MemTun {
    reads: RefCell<VecDeque<Vec<u8>>>,
    writes: RefCell<Vec<Vec<u8>>>,
}

impl Packets for MemTun {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self
            .reads
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }
    fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        self.writes.borrow_mut().push(pkt.to_vec());
        Ok(pkt.len())
    }
}

/// A worker and one HTTP/3 client, packets carried between them in memory.
struct Harness {
    /// Worker 0, the one the client's datagrams are given to.
    worker: Worker<MemDatagrams, MemTun>,
    /// Workers 1.. (sharing the route table and rings with worker 0).
    others: Vec<Worker<MemDatagrams, MemTun>>,
    client: quiche::Connection,
    h3: Option<quiche::h3::Connection>,
    client_addr: SocketAddr,
    /// Response headers and body bytes per request stream.
    responses: HashMap<u64, (Vec<quiche::h3::Header>, Vec<u8>)>,
    /// HTTP datagrams the client received.
    datagrams: Vec<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A worker with a CONNECT-IP pool 10.77.0.0/24 and `extra` config, and a client that has
    /// finished its handshake.
    fn new(extra: &str) -> Harness {
        Self::with_workers(extra, 1)
    }

    /// [`Harness::new`] with `n` workers.
    fn with_workers(extra: &str, n: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["proxy".into()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let cfg = ProxyConfig::parse(&format!(
            "listen = \"{SERVER}\"\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n[ip]\npool_v4 = \"{POOL}/24\"\n[policy]\nallow_private = true\n",
            cert.display(),
            key.display()
        ))
        .unwrap();
        let reset_key = ResetKey::from_bytes(&[7; 32]);
        let pool = HostPool::new(
            Some(IpPrefix::new(POOL.parse().unwrap(), 24).unwrap()),
            None,
        );
        let shared = Arc::new(Shared::new(
            Routes::new(&reset_key, n, 0),
            super::generation::Generation::claim(None).unwrap(),
            reset_key,
            1350,
            pool,
            None,
            true,
        ));
        let mut workers = Rings::mesh(n)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, rings)| {
                let io = MemDatagrams {
                    local: SERVER.parse().unwrap(),
                    inbox: VecDeque::new(),
                    burst: Vec::new(),
                    out: Vec::new(),
                    sent: Vec::new(),
                };
                let (cfg, shared) = (cfg.clone(), Arc::clone(&shared));
                Worker::new(cfg, i, shared, io, Some(MemTun::default()), rings).unwrap()
            });
        let worker = workers.next().unwrap();
        let others = workers.collect();
        let mut ccfg = QuicSettings::default()
            .transport_config(Tls::Client { ca: None })
            .unwrap();
        let client_addr: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let (cid, _) = quic::new_cid(&SystemRandom::new());
        let client = quiche::connect(
            Some("proxy"),
            &cid,
            client_addr,
            SERVER.parse().unwrap(),
            &mut ccfg,
        )
        .unwrap();
        let mut h = Harness {
            worker,
            others,
            client,
            h3: None,
            client_addr,
            responses: HashMap::new(),
            datagrams: Vec::new(),
            _dir: dir,
        };
        h.until("handshake", |h| h.h3.is_some());
        h
    }

    /// One round: the client's packets to the worker, a pass, the worker's packets back, the
    /// client's HTTP/3 events.
    fn step(&mut self) {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, info)) = self.client.send(&mut buf) {
            self.worker
                .io
                .inbox
                .push_back((buf[..n].to_vec(), info.from));
        }
        self.worker.pass(Ready::ALL).unwrap();
        for (mut d, to) in std::mem::take(&mut self.worker.io.sent) {
            let info = quiche::RecvInfo {
                from: SERVER.parse().unwrap(),
                to,
            };
            let _ = self.client.recv(&mut d, info);
        }
        if self.client.timeout() == Some(Duration::ZERO) {
            self.client.on_timeout();
        }
        // Spare client IDs, so the proxy can answer on a new path after a hop.
        while self.client.is_established() && self.client.scids_left() > 0 {
            let (cid, token) = quic::new_cid(&SystemRandom::new());
            if self.client.new_scid(&cid, token, false).is_err() {
                break;
            }
        }
        if self.h3.is_none() && self.client.is_established() {
            self.h3 = Some(
                quiche::h3::Connection::with_transport(
                    &mut self.client,
                    &quic::h3_config().unwrap(),
                )
                .unwrap(),
            );
        }
        let Some(h3) = self.h3.as_mut() else {
            return;
        };
        loop {
            match h3.poll(&mut self.client) {
                Ok((sid, quiche::h3::Event::Headers { list, .. })) => {
                    self.responses.entry(sid).or_default().0 = list;
                }
                Ok((sid, quiche::h3::Event::Data)) => {
                    while let Ok(n) = h3.recv_body(&mut self.client, sid, &mut buf) {
                        self.responses
                            .entry(sid)
                            .or_default()
                            .1
                            .extend_from_slice(&buf[..n]);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        while let Ok(n) = self.client.dgram_recv(&mut buf) {
            self.datagrams.push(buf[..n].to_vec());
        }
    }

    /// Steps until `done` holds: 50 rounds at once, then one every 2 ms so that timers
    /// (draining, idle) can fire, up to 5 s.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Harness) -> bool) {
        for round in 0..2550 {
            if done(self) {
                return;
            }
            if round >= 50 {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.step();
        }
        panic!("{what}: not reached; worker {:?}", self.worker.stats());
    }

    /// Sends a request for `target`; its stream.
    fn request(&mut self, target: &Target, token: Option<&str>) -> u64 {
        let hdrs = request::request_headers(target, "proxy", token, None);
        self.send_request(&hdrs)
    }

    fn send_request(&mut self, hdrs: &[quiche::h3::Header]) -> u64 {
        let h3 = self.h3.as_mut().unwrap();
        h3.send_request(&mut self.client, hdrs, false).unwrap()
    }

    /// The `:status` the request on `sid` got, waiting for it.
    fn status(&mut self, sid: u64) -> String {
        self.until("a response", |h| h.responses.contains_key(&sid));
        let hdrs = &self.responses[&sid].0;
        let s = hdrs.iter().find(|h| h.name() == b":status").unwrap();
        String::from_utf8_lossy(s.value()).into_owned()
    }

    /// Gives the worker `pkt` to read from its TUN queue, behind an all-zero vnet header.
    fn tun_read(&mut self, pkt: &[u8]) {
        let mut framed = vec![0u8; VNET_HDR_LEN];
        framed.extend_from_slice(pkt);
        let tun = self.worker.tun.as_ref().unwrap();
        tun.reads.borrow_mut().push_back(framed);
    }

    /// Sends `pkt` as an HTTP datagram of the session on stream `sid` (context 0).
    fn send_packet(&mut self, sid: u64, pkt: &[u8]) {
        let mut dgram = vec![0u8; pkt.len() + 16];
        let n = Datagram {
            quarter_stream_id: sid / 4,
            context_id: 0,
            payload: pkt,
        }
        .emit(&mut dgram)
        .unwrap();
        self.client.dgram_send(&dgram[..n]).unwrap();
    }

    /// A CONNECT-IP session: its stream and its assigned IPv4 address.
    fn connect_ip(&mut self) -> (u64, Ipv4Addr) {
        let sid = self.request(&Target::Ip(IpScope::ANY), None);
        assert_eq!(self.status(sid), "200");
        self.until("ADDRESS_ASSIGN", |h| !h.responses[&sid].1.is_empty());
        let body = self.responses[&sid].1.clone();
        let Ok(Decoded::Capsule {
            capsule: Capsule::AddressAssign(a),
            ..
        }) = CapsuleDecoder::default().decode(&body)
        else {
            panic!("no ADDRESS_ASSIGN first: {body:?}");
        };
        let IpAddr::V4(addr) = a.iter().next().unwrap().prefix.addr() else {
            panic!("no IPv4 address");
        };
        (sid, addr)
    }
}

fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    udp_packet_ttl(src, dst, payload, 64)
}

fn udp_packet_ttl(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], ttl: u8) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ipv4(src.octets(), dst.octets(), ttl).udp(4000, 53);
    let mut v = Vec::new();
    b.write(&mut v, payload).unwrap();
    v
}

use std::net::Ipv4Addr;

use crate::quic::QuicSettings;

#[test]
fn a_connect_ip_session_carries_packets_both_ways_byte_exact() {
    let mut h = Harness::new("");
    let (sid, me) = h.connect_ip();
    assert!(me.to_string().starts_with("10.77.0."), "{me}");
    // Client → TUN: an HTTP datagram with the packet, written behind an all-zero vnet header.
    let server: Ipv4Addr = "198.51.100.7".parse().unwrap();
    let up = udp_packet(me, server, b"to the internet");
    h.send_packet(sid, &up);
    h.until("the packet on the TUN device", |h| {
        !h.worker.tun.as_ref().unwrap().writes.borrow().is_empty()
    });
    let writes = h.worker.tun.as_ref().unwrap().writes.borrow().clone();
    assert_eq!(writes.len(), 1);
    assert_eq!(&writes[0][..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN]);
    assert_eq!(&writes[0][VNET_HDR_LEN..], &up[..]);
    // TUN → client: a packet to the assigned address comes back as an HTTP datagram.
    let down = udp_packet(server, me, b"from the internet");
    h.tun_read(&down);
    h.until("the packet at the client", |h| !h.datagrams.is_empty());
    let d = H3Datagram::parse(&h.datagrams[0]).unwrap();
    assert_eq!(d.stream_id(), sid);
    let ctx = crate::datagram::ContextPayload::parse(d.payload).unwrap();
    // The proxy is a hop (RFC 9484 §4.3): the TTL is one less, the checksum updated.
    let forwarded = udp_packet_ttl(server, me, b"from the internet", 63);
    assert_eq!((ctx.context_id, ctx.payload), (0, &forwarded[..]));
    // A packet for an address no session has is counted, not sent.
    let stray = udp_packet(server, "10.77.0.200".parse().unwrap(), b"nobody");
    h.tun_read(&stray);
    h.step();
    let s = h.worker.stats();
    assert_eq!(
        (
            s.connections_accepted,
            s.sessions_ip,
            s.tun_tx,
            s.tun_rx,
            s.tun_no_session
        ),
        (1, 1, 1, 2, 1),
        "{s:?}"
    );
    assert_eq!(
        (s.dgram_rx, s.dgram_tx, s.dgram_unknown_stream),
        (1, 1, 0),
        "{s:?}"
    );
}

#[test]
fn requests_get_their_statuses() {
    let mut h = Harness::new("tokens = [\"secret\"]\n");
    let ip = Target::Ip(IpScope::ANY);
    let no_token = h.request(&ip, None);
    assert_eq!(h.status(no_token), "407");
    let wrong = h.request(&ip, Some("guess"));
    assert_eq!(h.status(wrong), "403");
    // CONNECT-UDP to the proxy's loopback: refused by the policy.
    let udp = Target::Udp(UdpTarget {
        host: crate::template::Host::Ip("127.0.0.1".parse().unwrap()),
        port: 53,
    });
    let lo = h.request(&udp, Some("secret"));
    assert_eq!(h.status(lo), "403");
    // A plain CONNECT (no :protocol): 501.
    let plain = h.send_request(&[
        quiche::h3::Header::new(b":method", b"CONNECT"),
        quiche::h3::Header::new(b":authority", b"example.com:443"),
    ]);
    assert_eq!(h.status(plain), "501");
    // A path no template serves: 404.
    let lost = h.send_request(&[
        quiche::h3::Header::new(b":method", b"CONNECT"),
        quiche::h3::Header::new(b":protocol", b"connect-ip"),
        quiche::h3::Header::new(b":scheme", b"https"),
        quiche::h3::Header::new(b":authority", b"proxy"),
        quiche::h3::Header::new(b":path", b"/elsewhere"),
        quiche::h3::Header::new(b"capsule-protocol", b"?1"),
        quiche::h3::Header::new(b"proxy-authorization", b"Bearer secret"),
    ]);
    assert_eq!(h.status(lost), "404");
    let ok = h.request(&ip, Some("secret"));
    assert_eq!(h.status(ok), "200");
    let s = h.worker.stats();
    assert_eq!(s.refused.get(&407), Some(&1), "{s:?}");
    assert_eq!(s.refused.get(&403), Some(&2), "{s:?}");
    assert_eq!(s.refused.get(&501), Some(&1), "{s:?}");
    assert_eq!(s.refused.get(&404), Some(&1), "{s:?}");
    assert_eq!(s.policy_refused.values().sum::<u64>(), 1, "{s:?}");
    assert_eq!(s.sessions_ip, 1, "{s:?}");
}

#[test]
fn sessions_per_connection_are_capped_with_429() {
    let mut h = Harness::new("max_sessions_per_connection = 1\n");
    let (_, _) = h.connect_ip();
    let second = h.request(&Target::Ip(IpScope::ANY), None);
    assert_eq!(h.status(second), "429");
}

#[test]
fn a_malformed_capsule_resets_its_stream_and_a_finished_stream_ends_the_session() {
    let mut h = Harness::new("");
    let (sid, me) = h.connect_ip();
    // A capsule whose length runs past what follows, then FIN: a truncated capsule.
    let h3 = h.h3.as_mut().unwrap();
    h3.send_body(&mut h.client, sid, &[0x01, 0x40, 0x40, 0x00], true)
        .unwrap();
    h.until("the session ended", |h| {
        h.worker.stats().capsule_errors == 1
    });
    // Its address went back to the pool: the next session gets it again.
    let (_, again) = h.connect_ip();
    assert_eq!(again, me);
    let s = h.worker.stats();
    assert_eq!((s.sessions_ip, s.capsule_errors), (2, 1), "{s:?}");
}

#[test]
fn address_requests_are_answered_and_counted() {
    let mut h = Harness::new("");
    let (sid, _) = h.connect_ip();
    let want = IpPrefix::host("10.77.0.9".parse().unwrap());
    let mut out = vec![0u8; 64];
    let n = CapsuleRepr::AddressRequest(&[crate::capsule::AddressEntry {
        request_id: 1,
        prefix: want,
    }])
    .emit(&mut out)
    .unwrap();
    let before = h.responses[&sid].1.len();
    let h3 = h.h3.as_mut().unwrap();
    h3.send_body(&mut h.client, sid, &out[..n], false).unwrap();
    h.until("ADDRESS_ASSIGN for the request", |h| {
        h.responses[&sid].1.len() > before
    });
    let body = h.responses[&sid].1[before..].to_vec();
    let Ok(Decoded::Capsule {
        capsule: Capsule::AddressAssign(a),
        ..
    }) = CapsuleDecoder::default().decode(&body)
    else {
        panic!("{body:?}");
    };
    let e = a.iter().next().unwrap();
    assert_eq!((e.request_id, e.prefix), (1, want));
    let s = h.worker.stats();
    assert_eq!(
        (s.addresses_requested, s.addresses_refused),
        (1, 0),
        "{s:?}"
    );
}

#[test]
fn a_client_that_hops_keeps_its_session_and_the_old_path_is_forgotten() {
    let mut h = Harness::new("");
    let (sid, me) = h.connect_ip();
    let new_addr: SocketAddr = "10.0.0.3:5001".parse().unwrap();
    h.until("spare connection IDs", |h| h.client.available_dcids() > 0);
    // The proxy learns the client's spare IDs too.
    for _ in 0..10 {
        h.step();
    }
    h.client
        .probe_path(new_addr, SERVER.parse().unwrap())
        .unwrap();
    h.until("the new path validated", |h| {
        h.client
            .is_path_validated(new_addr, SERVER.parse().unwrap())
            .unwrap_or(false)
    });
    h.client.migrate(new_addr, SERVER.parse().unwrap()).unwrap();
    h.client_addr = new_addr;
    // A packet from the new address reaches the TUN device.
    let up = udp_packet(me, "198.51.100.7".parse().unwrap(), b"after the hop");
    h.send_packet(sid, &up);
    h.until("the packet from the new address", |h| {
        h.worker.tun.as_ref().unwrap().writes.borrow().len() == 1
    });
    let s = h.worker.stats();
    assert_eq!((s.peer_migrations, s.connections_accepted), (1, 1), "{s:?}");
    assert!(s.cids_issued >= 1, "{s:?}");
    assert_eq!(h.worker.clients.values().next().unwrap().peer, new_addr);
    // The path left behind is forgotten once nothing more arrives on it.
    // (The proxy looks at a connection's paths when something arrives on it.)
    h.until("the old path forgotten", |h| {
        let _ = h.client.send_ack_eliciting();
        h.worker.stats().paths_abandoned == 1
    });
}

#[test]
fn a_closed_connection_gives_its_addresses_back_and_is_counted() {
    let mut h = Harness::new("");
    let _ = h.connect_ip();
    h.client.close(true, 0, b"bye").unwrap();
    h.until("the connection gone", |h| {
        h.worker.stats().connections_open == 0
    });
    let s = h.worker.stats();
    assert_eq!((s.connections_closed, s.connections_open), (1, 0), "{s:?}");
    assert_eq!(h.worker.by_addr.map.len(), 0);
}

#[test]
fn a_short_header_for_no_connection_draws_a_stateless_reset_with_its_token() {
    let mut h = Harness::new("");
    let cid = h.worker.shared.routes.new_cid(0, &SystemRandom::new());
    let mut pkt = vec![0x41u8];
    pkt.extend_from_slice(&cid);
    pkt.extend_from_slice(&[0x55; 60]);
    let from: SocketAddr = "10.0.0.9:7000".parse().unwrap();
    h.worker.io.inbox.push_back((pkt.clone(), from));
    h.worker.pass(Ready::ALL).unwrap();
    let resets: Vec<_> = h
        .worker
        .io
        .sent
        .iter()
        .filter(|(_, to)| *to == from)
        .collect();
    assert_eq!(resets.len(), 1);
    let (reset, _) = resets[0];
    assert!(
        reset.len() < pkt.len() && reset.len() >= 21,
        "{}",
        reset.len()
    );
    assert_eq!(reset[0] & 0xc0, 0x40, "a short header");
    let token = h.worker.shared.reset_key.token(&cid).to_be_bytes();
    assert_eq!(&reset[reset.len() - 16..], &token);
    assert_eq!(h.worker.stats().stateless_resets_sent, 1);
}

#[test]
fn a_datagram_that_reaches_another_worker_is_handed_to_its_owner() {
    let mut h = Harness::with_workers("", 2);
    let (sid, me) = h.connect_ip();
    // The client's next datagrams go to worker 1, as a hash by address would send them after
    // a hop; the connection and its keys are worker 0's.
    let up = udp_packet(me, "198.51.100.7".parse().unwrap(), b"the long way");
    h.send_packet(sid, &up);
    let mut buf = vec![0u8; 65_535];
    let mut count = 0;
    while let Ok((len, info)) = h.client.send(&mut buf) {
        h.others[0]
            .io
            .inbox
            .push_back((buf[..len].to_vec(), info.from));
        count += 1;
    }
    assert!(count > 0);
    h.others[0].pass(Ready::ALL).unwrap();
    h.until("the packet on worker 0's TUN queue", |h| {
        h.worker.tun.as_ref().unwrap().writes.borrow().len() == 1
    });
    let w1 = h.others[0].stats();
    assert_eq!(
        (w1.misrouted, w1.handoffs, w1.handoff_drops),
        (count, count, 0),
        "{w1:?}"
    );
    assert_eq!(
        (w1.connections_accepted, w1.unknown_connection),
        (0, 0),
        "{w1:?}"
    );
    let w0 = h.worker.stats();
    assert_eq!(w0.handoffs_received, count, "{w0:?}");
    let writes = h.worker.tun.as_ref().unwrap().writes.borrow().clone();
    assert_eq!(&writes[0][VNET_HDR_LEN..], &up[..]);
}

/// A CONNECT-UDP target in memory: what the proxy sent it, and what it answers.
#[derive(Clone, Default)]
struct MemTarget {
    sent: std::rc::Rc<RefCell<Vec<Vec<u8>>>>,
    replies: std::rc::Rc<RefCell<VecDeque<Vec<u8>>>>,
}

impl super::endpoints::UdpTarget for MemTarget {
    fn send(&self, payload: &[u8]) -> io::Result<usize> {
        self.sent.borrow_mut().push(payload.to_vec());
        Ok(payload.len())
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self
            .replies
            .borrow_mut()
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }
    fn fd(&self) -> RawFd {
        // Never polled in these tests (they call `pass` themselves): any distinct value.
        1_000_000
    }
}

#[test]
fn a_connect_udp_session_carries_payloads_both_ways_byte_exact() {
    let mut h = Harness::new("");
    let target = MemTarget::default();
    let connected = std::rc::Rc::new(RefCell::new(Vec::new()));
    let (t, c) = (target.clone(), connected.clone());
    h.worker.connect = Box::new(move |addr| {
        c.borrow_mut().push(addr);
        Ok(Box::new(t.clone()))
    });
    let sid = h.request(
        &Target::Udp(UdpTarget {
            host: crate::template::Host::Ip("10.9.9.9".parse().unwrap()),
            port: 53,
        }),
        None,
    );
    assert_eq!(h.status(sid), "200");
    assert_eq!(
        *connected.borrow(),
        ["10.9.9.9:53".parse::<SocketAddr>().unwrap()]
    );
    h.send_packet(sid, b"a question");
    h.until("the payload at the target", |_| {
        !target.sent.borrow().is_empty()
    });
    assert_eq!(*target.sent.borrow(), [b"a question".to_vec()]);
    target.replies.borrow_mut().push_back(b"an answer".to_vec());
    h.until("the answer at the client", |h| !h.datagrams.is_empty());
    let d = H3Datagram::parse(&h.datagrams[0]).unwrap();
    assert_eq!(d.stream_id(), sid);
    let ctx = crate::datagram::ContextPayload::parse(d.payload).unwrap();
    assert_eq!((ctx.context_id, ctx.payload), (0, &b"an answer"[..]));
    let s = h.worker.stats();
    assert_eq!(
        (s.sessions_udp, s.udp_to_target, s.udp_to_client),
        (1, 1, 1),
        "{s:?}"
    );
}
