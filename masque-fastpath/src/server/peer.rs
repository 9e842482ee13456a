//! Passing datagrams and TUN packets to the other live generation's process (a graceful
//! restart, `server/generation.rs`).
//!
//! Two proxies run with one reset key while the old one drains: both bind the same port in one
//! SO_REUSEPORT group and attach queues to the same TUN device. The group has one steering
//! program and the device one steering program, the newest process's, which knows only its own
//! sockets and addresses; so some of the old connections' datagrams and packets reach the new
//! process, and some new ones the old. Each process binds a Unix datagram socket next to the key
//! (`<reset_key_file>.gen<N>.<port>.sock`: processes of one key on other ports are not its
//! peers) and passes what belongs to the other generation to the other's socket, with the addresses the datagram travelled between; the receiver serves it as
//! if its own socket or TUN queue had read it. What was passed once is never passed back.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use super::handoff::Handoff;

/// Largest item passed: a datagram or a TUN packet, and its header.
pub const MAX_ITEM: usize = 65_536 + HEADER;
/// Kind, and two socket addresses (family, 16 address bytes, port).
const HEADER: usize = 1 + 2 * 19;
const QUIC: u8 = 0;
const TUN: u8 = 1;

/// The socket a process of generation `generation` of the key at `key`, listening on `port`,
/// receives on.
pub fn socket_path(key: &Path, generation: u8, port: u16) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(format!(".gen{generation}.{port}.sock"));
    PathBuf::from(p)
}

/// Binds this process's socket (a stale one a dead process of this generation left is
/// replaced: the generation's lock says none lives).
pub fn bind(path: &Path) -> Result<UnixDatagram, String> {
    let _ = std::fs::remove_file(path);
    let s = UnixDatagram::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(s)
}

/// A worker's way to the other generation's process.
pub struct PeerLink {
    tx: UnixDatagram,
    other: PathBuf,
    buf: Vec<u8>,
}

impl PeerLink {
    /// Sends to the process whose socket is at `other`.
    pub fn new(other: PathBuf) -> io::Result<PeerLink> {
        let tx = UnixDatagram::unbound()?;
        tx.set_nonblocking(true)?;
        Ok(PeerLink {
            tx,
            other,
            buf: Vec::with_capacity(MAX_ITEM),
        })
    }

    /// Passes a QUIC datagram `from` a client `to` one of our addresses; false if it could not
    /// be (the other process is gone, or its socket is full).
    pub fn send_quic(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) -> bool {
        self.buf.clear();
        self.buf.push(QUIC);
        put_addr(&mut self.buf, from);
        put_addr(&mut self.buf, to);
        self.buf.extend_from_slice(data);
        self.send()
    }

    /// Passes an inner packet read from the TUN device.
    pub fn send_tun(&mut self, packet: &[u8]) -> bool {
        self.buf.clear();
        self.buf.push(TUN);
        let none = SocketAddr::from(([0u8; 4], 0));
        put_addr(&mut self.buf, none);
        put_addr(&mut self.buf, none);
        self.buf.extend_from_slice(packet);
        self.send()
    }

    fn send(&self) -> bool {
        self.buf.len() <= MAX_ITEM && self.tx.send_to(&self.buf, &self.other).is_ok()
    }
}

/// An item read from the socket, as the handoff it becomes; `None` if it is malformed.
pub fn decode(item: &[u8]) -> Option<Handoff> {
    if item.len() < HEADER {
        return None;
    }
    let from = get_addr(&item[1..20])?;
    let to = get_addr(&item[20..39])?;
    let data = item[HEADER..].to_vec();
    match item[0] {
        QUIC => Some(Handoff::Quic { from, to, data }),
        TUN => Some(Handoff::Tun(data)),
        _ => None,
    }
}

fn put_addr(buf: &mut Vec<u8>, a: SocketAddr) {
    let (family, ip) = match a.ip() {
        IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6u8, v6),
    };
    buf.push(family);
    buf.extend_from_slice(&ip.octets());
    buf.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[1..17]).ok()?);
    let port = u16::from_be_bytes([b[17], b[18]]);
    let ip = match b[0] {
        4 => IpAddr::V4(ip.to_ipv4_mapped()?),
        6 => IpAddr::V6(ip),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_and_packets_cross_with_their_addresses_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("reset.key");
        let rx = bind(&socket_path(&key, 1, 4433)).unwrap();
        let mut link = PeerLink::new(socket_path(&key, 1, 4433)).unwrap();
        let from: SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
        let to: SocketAddr = "198.18.10.1:4433".parse().unwrap();
        assert!(link.send_quic(from, to, b"short header"));
        assert!(link.send_tun(&[0x45, 0, 0, 20]));
        let mut buf = vec![0u8; MAX_ITEM];
        let n = rx.recv(&mut buf).unwrap();
        match decode(&buf[..n]) {
            Some(Handoff::Quic {
                from: f,
                to: t,
                data,
            }) => {
                assert_eq!((f, t, &data[..]), (from, to, &b"short header"[..]));
            }
            _ => panic!("not a QUIC datagram"),
        }
        let n = rx.recv(&mut buf).unwrap();
        assert!(matches!(decode(&buf[..n]), Some(Handoff::Tun(d)) if d == [0x45, 0, 0, 20]));
        assert!(decode(&[QUIC; 10]).is_none());
        let mut bad = vec![9u8; HEADER + 4];
        bad[1] = 4;
        bad[20] = 4;
        assert!(decode(&bad).is_none(), "unknown kind");
        // Nobody listening at the other path: the send fails, nothing blocks.
        let mut lost = PeerLink::new(socket_path(&key, 1, 4434)).unwrap();
        assert!(!lost.send_tun(&[0x45]));
    }
}
