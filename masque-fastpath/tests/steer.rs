//! The steering programs (`mimiq_masque::steer`) and the multi-queue TUN device against the real
//! kernel. Needs root (BPF, network namespaces, TUN); fails (not skips) without it.
//!
//! Each test runs on its own thread moved into a fresh network namespace
//! (`unshare(CLONE_NEWNET)` affects only the calling thread), so the tests run in parallel and
//! leave nothing behind: the namespace, and the sockets and the TUN device in it, vanish when the
//! thread ends, whether the test passed or panicked. `ip` run from that thread inherits its
//! namespace.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use mimiq_masque::steer::{ReuseportSteering, TunSteering, ROUTE_TABLE_LEN};
use mimiq_masque::tundev::{TunDevice, VNET_HDR_LEN};
use socket2::{Domain, Protocol, Socket, Type};

/// How long a test waits for packets that should arrive.
const DEADLINE: Duration = Duration::from_secs(5);

/// Runs `f` on a thread in a fresh network namespace with its loopback up.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the steer tests need root (BPF, namespaces, TUN)");
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only moves the calling thread into a new network
        // namespace; it touches no memory. This thread owns no sockets yet, and everything it
        // opens afterwards (and every child it starts) belongs to the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        ip(&["link", "set", "lo", "up"]);
        f();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip args…`, panicking with its stderr if it fails; returns stdout.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A non-blocking UDP socket in the SO_REUSEPORT group at `addr`.
fn reuseport_socket(addr: SocketAddr) -> UdpSocket {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    socket.set_reuse_port(true).expect("SO_REUSEPORT");
    socket.bind(&addr.into()).expect("bind");
    socket.set_nonblocking(true).expect("nonblocking");
    socket.into()
}

/// A QUIC packet with `first` as its first byte and a destination connection ID starting with
/// the route value `route`; `id` (8 bytes) follows, to tell the packets apart.
fn quic_packet(first: u8, route: u16, id: u64) -> Vec<u8> {
    let mut p = vec![first];
    p.extend_from_slice(&route.to_be_bytes());
    p.extend_from_slice(&[0x5a; 18]); // the rest of a 20-byte connection ID
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0; 20]); // "packet number and payload"
    p
}

/// Reads from `sockets` until `want` datagrams arrived in all or `DEADLINE` passed; returns
/// each datagram's id (its last-but-20 8 bytes, see `quic_packet`) per socket.
fn drain(sockets: &[&UdpSocket], want: usize) -> Vec<Vec<u64>> {
    let mut got = vec![Vec::new(); sockets.len()];
    let mut buf = [0u8; 2048];
    let start = Instant::now();
    while got.iter().map(Vec::len).sum::<usize>() < want && start.elapsed() < DEADLINE {
        let mut idle = true;
        for (i, s) in sockets.iter().enumerate() {
            match s.recv(&mut buf) {
                Ok(n) => {
                    idle = false;
                    let id: [u8; 8] = buf[n - 28..n - 20].try_into().expect("8 bytes");
                    got[i].push(u64::from_be_bytes(id));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    got
}

#[test]
fn short_headers_reach_the_worker_their_route_value_names() {
    in_netns(|| {
        let w0 = reuseport_socket("127.0.0.1:0".parse().unwrap());
        let addr = w0.local_addr().unwrap();
        let w1 = reuseport_socket(addr);
        let table: Vec<u32> = (0..ROUTE_TABLE_LEN as u32).map(|r| r % 2).collect();
        let steering = ReuseportSteering::load(&table).expect("load");
        steering.register(0, w0.as_raw_fd()).expect("register 0");
        steering.register(1, w1.as_raw_fd()).expect("register 1");
        steering.attach(w0.as_raw_fd()).expect("attach");
        assert_eq!(steering.counters(), (0, 0));

        // 64 clients (64 source ports), 4 packets each, with route values spread over the
        // table; packet `id` has the route value `routes[id]`.
        let clients: Vec<UdpSocket> = (0..64)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("client"))
            .collect();
        let mut routes = Vec::new();
        for (c, client) in clients.iter().enumerate() {
            for k in 0..4u64 {
                let id = routes.len() as u64;
                let route = ((c as u64 * 1031 + k * 16_411) & 0xffff) as u16;
                client
                    .send_to(&quic_packet(0x40, route, id), addr)
                    .expect("send");
                routes.push(route);
            }
        }
        let got = drain(&[&w0, &w1], routes.len());
        for (worker, ids) in got.iter().enumerate() {
            for &id in ids {
                let route = routes[id as usize];
                assert_eq!(
                    usize::from(route) % 2,
                    worker,
                    "packet {id} with route value {route:#06x} reached worker {worker}"
                );
            }
        }
        let received: usize = got.iter().map(Vec::len).sum();
        assert_eq!(received, routes.len(), "every packet arrived");
        assert!(
            got.iter().all(|ids| !ids.is_empty()),
            "both workers got packets"
        );
        assert_eq!(steering.counters(), (routes.len() as u64, 0));

        // Long headers are left to the kernel's hash: they arrive at one worker or the other.
        for (i, client) in clients.iter().take(16).enumerate() {
            client
                .send_to(&quic_packet(0xc0, 1, 1000 + i as u64), addr)
                .expect("send");
        }
        let got = drain(&[&w0, &w1], 16);
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 16);
        assert_eq!(steering.counters(), (routes.len() as u64, 16));
    });
}

#[test]
fn a_short_header_whose_worker_has_no_socket_falls_back_to_the_hash() {
    in_netns(|| {
        let w0 = reuseport_socket("127.0.0.1:0".parse().unwrap());
        let addr = w0.local_addr().unwrap();
        let w1 = reuseport_socket(addr);
        // Every route value names worker 7, which has no socket.
        let steering = ReuseportSteering::load(&vec![7; ROUTE_TABLE_LEN]).expect("load");
        steering.register(0, w0.as_raw_fd()).expect("register 0");
        steering.register(1, w1.as_raw_fd()).expect("register 1");
        steering.attach(w1.as_raw_fd()).expect("attach");
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client
            .send_to(&quic_packet(0x40, 3, 0), addr)
            .expect("send");
        // Too short to hold a connection ID's first two bytes.
        client.send_to(&[0x40, 1], addr).expect("send");
        let mut buf = [0u8; 64];
        let start = Instant::now();
        let mut received = 0;
        while received < 2 && start.elapsed() < DEADLINE {
            for s in [&w0, &w1] {
                if s.recv(&mut buf).is_ok() {
                    received += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(received, 2);
        assert_eq!(steering.counters(), (0, 2));
    });
}

#[test]
fn bad_arguments_are_errors() {
    in_netns(bad_arguments);
}

fn bad_arguments() {
    let err = ReuseportSteering::load(&[0; 10])
        .err()
        .expect("a short table");
    assert!(err.contains("65536"), "{err}");
    let steering = ReuseportSteering::load(&vec![0; ROUTE_TABLE_LEN]).expect("load");
    let err = steering.register(256, 0).expect_err("worker 256");
    assert!(err.contains("worker 256"), "{err}");
    // A UDP socket that is not bound is not in any group.
    let unbound = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
    let err = steering
        .register(0, unbound.as_raw_fd())
        .expect_err("unbound socket");
    assert!(err.contains("socket array"), "{err}");
    let tun = TunSteering::load().expect("load");
    let err = tun.attach(unbound.as_raw_fd()).expect_err("not a TUN");
    assert!(err.contains("TUNSETSTEERINGEBPF"), "{err}");
}

/// Reads from `queues` until `DEADLINE` or until each destination in `want` was seen; returns
/// (destination, queue index) for each UDP datagram to port 9000 read (vnet header skipped).
fn read_queues(queues: &[TunDevice], want: &[IpAddr]) -> Vec<(IpAddr, usize)> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let start = Instant::now();
    while !want.iter().all(|a| seen.iter().any(|(d, _)| d == a)) && start.elapsed() < DEADLINE {
        let mut idle = true;
        for (q, dev) in queues.iter().enumerate() {
            let n = match dev.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => panic!("read queue {q}: {e}"),
            };
            idle = false;
            let pkt = &buf[VNET_HDR_LEN..n];
            let (dst, proto, l4) = match pkt[0] >> 4 {
                4 => (
                    IpAddr::from(<[u8; 4]>::try_from(&pkt[16..20]).unwrap()),
                    pkt[9],
                    usize::from(pkt[0] & 0xf) * 4,
                ),
                6 => (
                    IpAddr::from(<[u8; 16]>::try_from(&pkt[24..40]).unwrap()),
                    pkt[6],
                    40,
                ),
                v => panic!("IP version {v} on queue {q}"),
            };
            // Anything else (IPv6 router solicitations, MLD reports) is the host's own.
            if proto == 17 && u16::from_be_bytes([pkt[l4 + 2], pkt[l4 + 3]]) == 9000 {
                seen.push((dst, q));
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    seen
}

#[test]
fn packets_into_a_multi_queue_tun_reach_the_queue_their_destination_is_assigned_to() {
    in_netns(|| {
        let queues = TunDevice::create_queues("mqtest0", 1400, 2).expect("create queues");
        assert_eq!(queues.len(), 2);
        assert!(queues.iter().all(|q| q.name() == "mqtest0"));
        ip(&["addr", "add", "10.77.0.1/32", "dev", "mqtest0"]);
        ip(&["route", "add", "10.77.0.0/24", "dev", "mqtest0"]);
        ip(&[
            "-6",
            "addr",
            "add",
            "fd77::1/128",
            "dev",
            "mqtest0",
            "nodad",
        ]);
        ip(&["-6", "route", "add", "fd77::/64", "dev", "mqtest0"]);
        let link = ip(&["-o", "link", "show", "mqtest0"]);
        assert!(link.contains(" mtu 1400 "), "{link}");
        assert!(link.contains(",UP"), "{link}");

        let steering = TunSteering::load().expect("load");
        steering.attach(queues[0].as_raw_fd()).expect("attach");
        let a5 = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 5));
        let a6 = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 6));
        let b5: IpAddr = "fd77::5".parse::<Ipv6Addr>().unwrap().into();
        let b6: IpAddr = "fd77::6".parse::<Ipv6Addr>().unwrap().into();
        steering.assign(a5, 1).expect("assign");
        steering.assign(a6, 0).expect("assign");
        steering.assign(b5, 1).expect("assign");
        steering.assign(b6, 0).expect("assign");
        assert_eq!(steering.owner(a5), Some(1));
        assert_eq!(steering.owner(a6), Some(0));
        assert_eq!(steering.owner(b5), Some(1));
        assert_eq!(steering.owner("10.77.0.7".parse().unwrap()), None);

        let v4 = UdpSocket::bind("10.77.0.1:0").expect("bind v4");
        let v6 = UdpSocket::bind("[fd77::1]:0").expect("bind v6");
        let send = |to: IpAddr| {
            let socket = if to.is_ipv4() { &v4 } else { &v6 };
            socket
                .send_to(b"steer me", SocketAddr::new(to, 9000))
                .expect("send");
        };
        for to in [a5, a6, b5, b6] {
            send(to);
        }
        let mut seen = read_queues(&queues, &[a5, a6, b5, b6]);
        seen.sort();
        let mut want = vec![(a5, 1), (a6, 0), (b5, 1), (b6, 0)];
        want.sort();
        assert_eq!(seen, want);

        // Released, an address goes to queue 0 again; releasing twice is no error.
        steering.release(a5);
        steering.release(a5);
        assert_eq!(steering.owner(a5), None);
        send(a5);
        assert_eq!(read_queues(&queues, &[a5]), vec![(a5, 0)]);
        // And reassigned, to its new queue.
        steering.assign(a5, 1).expect("assign");
        send(a5);
        assert_eq!(read_queues(&queues, &[a5]), vec![(a5, 1)]);

        // The queues are writable: a packet written to queue 1 enters the host.
        let answer = UdpSocket::bind("10.77.0.1:9001").expect("bind");
        answer.set_nonblocking(true).unwrap();
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        etherparse::PacketBuilder::ipv4([10, 77, 0, 5], [10, 77, 0, 1], 64)
            .udp(9000, 9001)
            .write(&mut pkt, b"back")
            .unwrap();
        queues[1].send(&pkt).expect("write queue 1");
        let mut buf = [0u8; 16];
        let start = Instant::now();
        let n = loop {
            match answer.recv(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock && start.elapsed() < DEADLINE => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("recv: {e}"),
            }
        };
        assert_eq!(&buf[..n], b"back");
    });
}
