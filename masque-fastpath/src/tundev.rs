//! A layer-3 TUN device (no packet-information header), non-blocking, for the proxy's CONNECT-IP
//! egress and the client's tunnel. Opening and configuring it is the `tun` crate's job; addresses
//! and routes go through [`crate::netcfg`].
//!
//! The proxy opens its device with a virtio-net header ([`TunDevice::create_with_vnet_hdr`]) so
//! that [`TcpCoalescer`] can hand the kernel consecutive TCP segments of one flow as one GSO
//! write (the kernel segments it again on the way out): one `write(2)` and one pass through the
//! proxy host's forwarding for up to 64 KB instead of per packet. The other way, with the
//! device's offloads on ([`TunDevice::enable_tcp_offload`]), the kernel hands over a TCP flow's
//! data as one large segment per `read(2)` with its checksum left partial, and
//! [`TunSegments`] cuts it into packets of the flow's MSS, as `tcp_gso_segment` would.
//!
//! A proxy with several workers opens one device with a queue per worker
//! ([`TunDevice::create_queues`], `IFF_MULTI_QUEUE`); the `tun` crate opens one queue only, so
//! those queues are opened here with the `/dev/net/tun` ioctls
//! (Documentation/networking/tuntap.rst, "Multiqueue tuntap interface"), and
//! [`crate::steer::TunSteering`] picks the queue of each packet the host sends into the device.
//!
//! Threading: none; a device (or queue), a coalescer and a segmenter belong to one event loop.
//! Panics: none (every length is checked before use).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use mimiq_wire::checksum::{checksum, Sum};

use crate::netcfg::NetConfig;

/// An open TUN device, or one queue of a multi-queue device.
pub struct TunDevice {
    handle: Handle,
    name: String,
}

/// How the device was opened.
enum Handle {
    /// By the `tun` crate: a single-queue device.
    Single(tun::Device),
    /// One queue of a multi-queue device ([`TunDevice::create_queues`]): its `/dev/net/tun`
    /// descriptor, non-blocking.
    Queue(File),
}

/// `TUNSETIFF`, `_IOW('T', 202, int)` (include/uapi/linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFNAMSIZ` (include/uapi/linux/if.h), the terminating NUL included.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` (include/uapi/linux/if.h) as `TUNSETIFF` reads and writes it: the name, then
/// the union's `ifr_flags`, padded to the union's 24 bytes (40 in all, as the kernel copies).
#[repr(C)]
struct TunIfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}
const _: () = assert!(size_of::<TunIfReq>() == 40);

impl TunDevice {
    /// Creates (or attaches to) the TUN device `name`, sets its MTU and brings it up.
    pub fn create(name: &str, mtu: usize) -> io::Result<TunDevice> {
        Self::open(name, mtu, false)
    }

    /// Like [`TunDevice::create`], with `IFF_VNET_HDR`: every packet read or written starts with
    /// a [`VNET_HDR_LEN`]-byte virtio-net header. Without `TUNSETOFFLOAD` the kernel still hands
    /// over whole packets with their checksums done (header all zero); writes may be GSO
    /// packets ([`TcpCoalescer`]).
    pub fn create_with_vnet_hdr(name: &str, mtu: usize) -> io::Result<TunDevice> {
        Self::open(name, mtu, true)
    }

    fn open(name: &str, mtu: usize, vnet_hdr: bool) -> io::Result<TunDevice> {
        let mtu16 = u16::try_from(mtu).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN MTU {mtu} > 65535"),
            )
        })?;
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).mtu(mtu16).up();
        if vnet_hdr {
            cfg.platform_config(|p| {
                p.vnet_hdr(true);
            });
        }
        let dev = tun::create(&cfg)
            .map_err(|e| io::Error::other(format!("create TUN device {name}: {e}")))?;
        dev.set_nonblock()?;
        Ok(TunDevice {
            handle: Handle::Single(dev),
            name: name.to_owned(),
        })
    }

    /// Creates (or attaches to) the multi-queue TUN device `name` with `queues` queues
    /// (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`), sets its MTU and brings it up.
    /// Each queue is a [`TunDevice`] of its own, non-blocking, with a [`VNET_HDR_LEN`]-byte
    /// virtio-net header as with [`TunDevice::create_with_vnet_hdr`]. The kernel spreads the
    /// packets the host sends into the device over the queues (by flow hash, or by
    /// [`crate::steer::TunSteering`] once attached); a write to any queue enters the host.
    /// The device goes when its last queue is closed.
    pub fn create_queues(name: &str, mtu: usize, queues: usize) -> io::Result<Vec<TunDevice>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        if queues == 0 {
            return Err(invalid(format!("TUN device {name}: 0 queues")));
        }
        let mtu32 = u32::try_from(mtu)
            .ok()
            .filter(|&m| m <= 65_535)
            .ok_or_else(|| invalid(format!("TUN MTU {mtu} > 65535")))?;
        if name.is_empty() || name.len() >= IFNAMSIZ || name.as_bytes().contains(&0) {
            return Err(invalid(format!(
                "TUN device name {name:?}: 1 to {} bytes, no NUL",
                IFNAMSIZ - 1
            )));
        }
        let mut devices = Vec::with_capacity(queues);
        // The kernel may complete a template name ("mq%d"); later queues attach by the name it
        // chose.
        let mut name = name.to_owned();
        for queue in 0..queues {
            let (file, actual) = open_queue(&name).map_err(|e| {
                io::Error::new(e.kind(), format!("TUN device {name} queue {queue}: {e}"))
            })?;
            name = actual;
            devices.push(TunDevice {
                handle: Handle::Queue(file),
                name: name.clone(),
            });
        }
        let configure = || -> Result<(), crate::netcfg::NetConfigError> {
            let net = NetConfig::new()?;
            let link = net.link(&name)?;
            net.set_mtu(&link, mtu32)?;
            net.set_link_up(&link)
        };
        configure().map_err(|e| io::Error::other(format!("configure TUN device {name}: {e}")))?;
        Ok(devices)
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet (with a vnet header first, if the device has one); `WouldBlock` when none
    /// is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.handle {
            Handle::Single(dev) => dev.recv(buf),
            // One read(2) is one packet.
            Handle::Queue(file) => (&*file).read(buf),
        }
    }

    /// Writes one packet (with a vnet header first, if the device has one).
    pub fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        match &self.handle {
            Handle::Single(dev) => dev.send(pkt),
            // One write(2) is one packet.
            Handle::Queue(file) => (&*file).write(pkt),
        }
    }

    /// Lets the kernel hand over TCP segments larger than the MTU (TSO for IPv4 and IPv6, with
    /// ECN) and packets with their checksum left partial (`TUNSETOFFLOAD`, a device with a vnet
    /// header only): reads must then go through [`TunSegments`].
    #[allow(unsafe_code)]
    pub fn enable_tcp_offload(&self) -> io::Result<()> {
        const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
        const TUN_F_CSUM: libc::c_uint = 0x01;
        const TUN_F_TSO4: libc::c_uint = 0x02;
        const TUN_F_TSO6: libc::c_uint = 0x04;
        const TUN_F_TSO_ECN: libc::c_uint = 0x08;
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor is this device's
        // and lives as long as `self`.
        let rc = unsafe { libc::ioctl(self.as_raw_fd(), TUNSETOFFLOAD as _, flags) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        match &self.handle {
            Handle::Single(dev) => dev.as_raw_fd(),
            Handle::Queue(file) => file.as_raw_fd(),
        }
    }
}

/// Opens `/dev/net/tun` (non-blocking, close-on-exec) and attaches it as a queue of the
/// multi-queue device `name`, creating the device if it does not exist; returns the descriptor
/// and the device's name as the kernel reports it.
#[allow(unsafe_code)]
fn open_queue(name: &str) -> io::Result<(File, String)> {
    // std opens with O_CLOEXEC.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    if name.len() >= IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name longer than 15 bytes",
        ));
    }
    let mut req = TunIfReq {
        name: [0; IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
            as libc::c_short,
        _union_rest: [0; 22],
    };
    // Shorter than IFNAMSIZ (checked above): the name stays NUL-terminated.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) through the pointer, which
    // points to a live, writable `TunIfReq` of that size and layout; the descriptor is ours.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut TunIfReq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
    let actual = String::from_utf8_lossy(&req.name[..len]).into_owned();
    Ok((file, actual))
}

/// `struct virtio_net_hdr` (include/uapi/linux/virtio_net.h), the header of an `IFF_VNET_HDR`
/// device: flags, gso_type (u8 each), hdr_len, gso_size, csum_start, csum_offset (u16 each, host
/// byte order: the device is not switched to `TUNSETVNETLE`/`BE`).
pub const VNET_HDR_LEN: usize = 10;
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_GSO_NONE: u8 = 0;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;
/// Set in `gso_type` with a GSO type: the segments carry ECN (CWR on the first only).
const VNET_GSO_ECN: u8 = 0x80;
const TCP_FIN: u8 = 0x01;
const TCP_CWR: u8 = 0x80;
/// Where the flags and the checksum sit in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_CHECK_OFFSET: usize = 16;
/// The largest IP packet a batch grows to (the IPv4 total length and IPv6 payload length are
/// 16 bits).
const MAX_BATCH_BYTES: usize = 65_535;
/// TCP flags a segment in a batch may carry: ACK, and PSH on the last one (the kernel's GRO rules,
/// `tcp_gro_receive`). Anything else (SYN, FIN, RST, URG, ECE, CWR) is written on its own.
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Coalesces consecutive TCP segments of one flow into one GSO packet for a TUN device with a
/// vnet header, the way the kernel's GRO would: same addresses, ports, IP TOS/TTL (IPv4 DF),
/// flow label and hop limit (IPv6), ACK number, window and TCP options; each segment's sequence
/// number follows the last; all have the first one's payload length except a shorter last one;
/// only ACK (PSH ends the batch, and the batch's header takes it: the kernel's segmentation puts
/// it back on the last segment only). Sans-IO: the caller writes [`TcpCoalescer::take`]'s bytes.
pub struct TcpCoalescer {
    /// vnet header + the batch's IP packet (the first segment's headers, then every payload).
    buf: Vec<u8>,
    /// IP packet bytes in `buf` after the vnet header; 0 when empty.
    len: usize,
    segments: usize,
    ip_header_len: usize,
    tcp_header_len: usize,
    payload_len: usize,
    next_seq: u32,
    /// The last segment was short or had PSH: nothing may follow it.
    closed: bool,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        TcpCoalescer {
            buf: vec![0; VNET_HDR_LEN + MAX_BATCH_BYTES],
            len: 0,
            segments: 0,
            ip_header_len: 0,
            tcp_header_len: 0,
            payload_len: 0,
            next_seq: 0,
            closed: false,
        }
    }
}

impl TcpCoalescer {
    /// Segments in the pending batch (0: none).
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Adds `pkt` (an IP packet) to the pending batch, or starts one when none is pending.
    /// `false` when it cannot join: the caller writes [`TcpCoalescer::take`] and pushes again; a
    /// packet refused by an empty coalescer (not plain TCP data) is written on its own.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        let Some(seg) = Segment::parse(pkt) else {
            return false;
        };
        let flags_ok = seg.flags == TCP_ACK || seg.flags == TCP_ACK | TCP_PSH;
        if !flags_ok || pkt.len() > MAX_BATCH_BYTES {
            return false;
        }
        let payload = &pkt[seg.ip_header_len + seg.tcp_header_len..];
        if self.len == 0 {
            self.buf[VNET_HDR_LEN..VNET_HDR_LEN + pkt.len()].copy_from_slice(pkt);
            self.len = pkt.len();
            self.segments = 1;
            self.ip_header_len = seg.ip_header_len;
            self.tcp_header_len = seg.tcp_header_len;
            self.payload_len = payload.len();
            self.next_seq = seg.seq.wrapping_add(payload.len() as u32);
            self.closed = seg.flags & TCP_PSH != 0;
            return true;
        }
        let first =
            &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.ip_header_len + self.tcp_header_len];
        if self.closed
            || seg.ip_header_len != self.ip_header_len
            || seg.tcp_header_len != self.tcp_header_len
            || seg.seq != self.next_seq
            || payload.len() > self.payload_len
            || self.len + payload.len() > MAX_BATCH_BYTES
            || !same_flow(first, pkt, self.ip_header_len, self.tcp_header_len)
        {
            return false;
        }
        self.buf[VNET_HDR_LEN + self.len..VNET_HDR_LEN + self.len + payload.len()]
            .copy_from_slice(payload);
        if seg.flags & TCP_PSH != 0 {
            // The batch carries the first segment's header: it takes the last one's PSH, as GRO
            // does (`tcp_gro_receive`), and `tcp_gso_segment` leaves PSH on the last segment.
            self.buf[VNET_HDR_LEN + self.ip_header_len + TCP_FLAGS_OFFSET] |= TCP_PSH;
        }
        self.len += payload.len();
        self.segments += 1;
        self.next_seq = seg.seq.wrapping_add(payload.len() as u32);
        self.closed = payload.len() < self.payload_len || seg.flags & TCP_PSH != 0;
        true
    }

    /// The pending batch as one write (vnet header + IP packet), and empties the coalescer;
    /// `None` when nothing is pending. One segment is written as it came (header all zero); more
    /// become a GSO packet: IP length and IPv4 header checksum rewritten, the TCP checksum field
    /// set to the pseudo-header sum and left to the kernel (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub fn take(&mut self) -> Option<&[u8]> {
        if self.len == 0 {
            return None;
        }
        let (len, ihl, thl) = (self.len, self.ip_header_len, self.tcp_header_len);
        let segments = self.segments;
        self.len = 0;
        self.segments = 0;
        let (hdr, pkt) = self.buf.split_at_mut(VNET_HDR_LEN);
        let pkt = &mut pkt[..len];
        hdr.fill(0);
        if segments > 1 {
            let v4 = pkt[0] >> 4 == 4;
            let tcp_len = len - ihl;
            let addresses = if v4 {
                pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                pkt[10..12].fill(0);
                let check = checksum(&pkt[..ihl]);
                pkt[10..12].copy_from_slice(&check.to_be_bytes());
                &pkt[12..20]
            } else {
                pkt[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
                &pkt[8..40]
            };
            // The pseudo header's addresses, protocol and TCP length, folded and not
            // complemented: the kernel adds the segments' sums and adjusts the length per
            // segment (`tcp_gso_segment`).
            let pseudo = Sum::ZERO
                .add_bytes(addresses)
                .add_u32(6 + tcp_len as u32)
                .fold();
            pkt[ihl + TCP_CHECK_OFFSET..ihl + TCP_CHECK_OFFSET + 2]
                .copy_from_slice(&pseudo.to_be_bytes());
            hdr[0] = VNET_F_NEEDS_CSUM;
            hdr[1] = if v4 { VNET_GSO_TCPV4 } else { VNET_GSO_TCPV6 };
            hdr[2..4].copy_from_slice(&((ihl + thl) as u16).to_ne_bytes());
            hdr[4..6].copy_from_slice(&(self.payload_len as u16).to_ne_bytes());
            hdr[6..8].copy_from_slice(&(ihl as u16).to_ne_bytes());
            hdr[8..10].copy_from_slice(&(TCP_CHECK_OFFSET as u16).to_ne_bytes());
        }
        Some(&self.buf[..VNET_HDR_LEN + len])
    }
}

/// Why a read from a TUN device with offloads could not be cut into packets (a counted drop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError {
    /// Shorter than the vnet header, or than the headers it announces.
    Truncated,
    /// A GSO type other than TCP over IPv4 or IPv6, IPv4 options or IPv6 extension headers, a
    /// checksum offset outside the packet, or a segment size of 0.
    Unsupported,
}

/// Cuts what a TUN device with offloads hands over — a vnet header and one packet, possibly a
/// TCP segment of up to 64 KB ([`TunDevice::enable_tcp_offload`]) — into the packets that would
/// have crossed a link of the device's MTU: each with its own IP length, IPv4 ID and header
/// checksum, TCP sequence number and full checksum; FIN and PSH on the last only, CWR on the
/// first only (`tcp_gso_segment`). A packet without GSO whose checksum the kernel left partial
/// gets it completed. Sans-IO: read into [`TunSegments::buffer`], [`TunSegments::start`], then
/// [`TunSegments::next_into`] until `None`.
pub struct TunSegments {
    /// vnet header + packet, as read.
    buf: Vec<u8>,
    /// Bytes read (0: nothing pending).
    len: usize,
    /// The packet's IP and TCP header lengths, MSS (0: not GSO) and the next payload offset.
    ip_header_len: usize,
    tcp_header_len: usize,
    mss: usize,
    next: usize,
    /// Segments given out of this packet.
    index: usize,
}

impl Default for TunSegments {
    fn default() -> Self {
        TunSegments {
            buf: vec![0; VNET_HDR_LEN + MAX_BATCH_BYTES],
            len: 0,
            ip_header_len: 0,
            tcp_header_len: 0,
            mss: 0,
            next: 0,
            index: 0,
        }
    }
}

impl TunSegments {
    /// Where to read the next packet (vnet header first).
    pub fn buffer(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Takes the `n` bytes read into [`TunSegments::buffer`]: checks the vnet header and the
    /// headers a GSO packet needs. On an error nothing is pending.
    pub fn start(&mut self, n: usize) -> Result<(), SegmentError> {
        self.len = 0;
        let Some(read) = self.buf.get(..n).filter(|b| b.len() > VNET_HDR_LEN) else {
            return Err(SegmentError::Truncated);
        };
        let (hdr, pkt) = read.split_at(VNET_HDR_LEN);
        let ne16 = |at: usize| usize::from(u16::from_ne_bytes([hdr[at], hdr[at + 1]]));
        let (flags, gso) = (hdr[0], hdr[1] & !VNET_GSO_ECN);
        if gso == VNET_GSO_NONE {
            self.mss = 0;
            if flags & VNET_F_NEEDS_CSUM != 0 {
                let (start, offset) = (ne16(6), ne16(8));
                if start + offset + 2 > pkt.len() {
                    return Err(SegmentError::Unsupported);
                }
            }
        } else {
            if gso != VNET_GSO_TCPV4 && gso != VNET_GSO_TCPV6 {
                return Err(SegmentError::Unsupported);
            }
            let seg = Segment::parse(pkt).ok_or(SegmentError::Unsupported)?;
            let v4 = pkt[0] >> 4 == 4;
            if v4 != (gso == VNET_GSO_TCPV4) || ne16(4) == 0 {
                return Err(SegmentError::Unsupported);
            }
            self.ip_header_len = seg.ip_header_len;
            self.tcp_header_len = seg.tcp_header_len;
            self.mss = ne16(4);
            self.next = seg.ip_header_len + seg.tcp_header_len;
        }
        self.index = 0;
        self.len = n;
        Ok(())
    }

    /// Writes the next packet into `out` and returns its length; `None` when the read is all
    /// given out (or `out` is too small for the next one, which is then dropped).
    pub fn next_into(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        if self.mss == 0 {
            let (hdr, pkt) = self.buf[..self.len].split_at(VNET_HDR_LEN);
            self.len = 0;
            let out = out.get_mut(..pkt.len())?;
            out.copy_from_slice(pkt);
            if hdr[0] & VNET_F_NEEDS_CSUM != 0 {
                // The field holds the pseudo-header sum: summing from csum_start with it in
                // place and complementing gives the checksum (virtio-net, `skb_checksum_help`).
                let start = usize::from(u16::from_ne_bytes([hdr[6], hdr[7]]));
                let at = start + usize::from(u16::from_ne_bytes([hdr[8], hdr[9]]));
                let sum = Sum::ZERO.add_bytes(&out[start..]).checksum();
                out[at..at + 2].copy_from_slice(&sum.to_be_bytes());
            }
            return Some(pkt.len());
        }
        let pkt = &self.buf[VNET_HDR_LEN..self.len];
        let (ihl, thl) = (self.ip_header_len, self.tcp_header_len);
        let headers = ihl + thl;
        if self.next >= pkt.len() {
            self.len = 0;
            return None;
        }
        let end = (self.next + self.mss).min(pkt.len());
        let last = end == pkt.len();
        let payload = &pkt[self.next..end];
        let seg_len = headers + payload.len();
        let Some(out) = out.get_mut(..seg_len) else {
            self.len = 0;
            return None;
        };
        out[..headers].copy_from_slice(&pkt[..headers]);
        out[headers..].copy_from_slice(payload);
        let offset = (self.next - headers) as u32;
        let index = self.index;
        self.index += 1;
        self.next = end;
        if last {
            self.len = 0;
        }
        let v4 = out[0] >> 4 == 4;
        let tcp_len = seg_len - ihl;
        if v4 {
            out[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
            let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(index as u16);
            out[4..6].copy_from_slice(&id.to_be_bytes());
            out[10..12].fill(0);
            let check = checksum(&out[..ihl]);
            out[10..12].copy_from_slice(&check.to_be_bytes());
        } else {
            out[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        }
        let tcp = ihl;
        let seq = u32::from_be_bytes([out[tcp + 4], out[tcp + 5], out[tcp + 6], out[tcp + 7]]);
        out[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut flags = out[tcp + TCP_FLAGS_OFFSET];
        if !last {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            flags &= !TCP_CWR;
        }
        out[tcp + TCP_FLAGS_OFFSET] = flags;
        out[tcp + TCP_CHECK_OFFSET..tcp + TCP_CHECK_OFFSET + 2].fill(0);
        let addresses = if v4 { &out[12..20] } else { &out[8..40] };
        let check = Sum::ZERO
            .add_bytes(addresses)
            .add_u32(6 + tcp_len as u32)
            .add_bytes(&out[tcp..])
            .checksum();
        out[tcp + TCP_CHECK_OFFSET..tcp + TCP_CHECK_OFFSET + 2]
            .copy_from_slice(&check.to_be_bytes());
        Some(seg_len)
    }
}

/// The fields of a TCP segment [`TcpCoalescer`] looks at; `None` for anything else (IPv4 with
/// options or fragmented, IPv6 with extension headers, no payload, lengths that disagree).
struct Segment {
    ip_header_len: usize,
    tcp_header_len: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    fn parse(pkt: &[u8]) -> Option<Segment> {
        let ip_header_len = match pkt.first()? >> 4 {
            4 => {
                let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
                let frag = u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]);
                // IHL 5 (no options), protocol TCP, not a fragment (MF clear, offset 0).
                if pkt[0] & 0x0f != 5
                    || *pkt.get(9)? != 6
                    || frag & 0x3fff != 0
                    || total != pkt.len()
                {
                    return None;
                }
                20
            }
            6 => {
                let payload = usize::from(u16::from_be_bytes([*pkt.get(4)?, *pkt.get(5)?]));
                if *pkt.get(6)? != 6 || 40 + payload != pkt.len() {
                    return None;
                }
                40
            }
            _ => return None,
        };
        let tcp = pkt.get(ip_header_len..)?;
        let tcp_header_len = usize::from(tcp.get(12)? >> 4) * 4;
        // Data offset at least 5 words, the NS bit clear, and some payload.
        if tcp_header_len < 20 || tcp[12] & 0x01 != 0 || tcp.len() <= tcp_header_len {
            return None;
        }
        Some(Segment {
            ip_header_len,
            tcp_header_len,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            flags: tcp[13],
        })
    }
}

/// Whether `pkt` belongs to the batch whose first segment's headers are `first`: both were
/// parsed by [`Segment::parse`] with these header lengths.
fn same_flow(first: &[u8], pkt: &[u8], ihl: usize, thl: usize) -> bool {
    let ip_same = if ihl == 20 {
        // TOS, DF, TTL and the addresses (the ID and checksum differ per segment).
        first[1] == pkt[1]
            && first[6] & 0x40 == pkt[6] & 0x40
            && first[8] == pkt[8]
            && first[12..20] == pkt[12..20]
    } else {
        // Version, traffic class, flow label; hop limit; the addresses.
        first[..4] == pkt[..4] && first[7] == pkt[7] && first[8..40] == pkt[8..40]
    };
    let (a, b) = (&first[ihl..ihl + thl], &pkt[ihl..ihl + thl]);
    // Ports, ACK number, window and every option (timestamps included) as GRO requires.
    ip_same
        && a[..4] == b[..4]
        && a[8..12] == b[8..12]
        && a[14..16] == b[14..16]
        && a[20..] == b[20..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use mimiq_wire::checksum::verify;

    /// An IPv4 TCP segment 10.0.0.1:1000 → 10.0.0.2:2000, ACK, with a 12-byte timestamp option
    /// and `payload` bytes of `fill`, checksums valid.
    fn v4_segment(seq: u32, payload: usize, flags: u8, fill: u8) -> Vec<u8> {
        let (ihl, thl) = (20, 32);
        let mut p = vec![0u8; ihl + thl + payload];
        let total = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // IP ID, differs per segment
        p[6] = 0x40; // DF
        p[8] = 64; // TTL
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let check = checksum(&p[..20]);
        p[10..12].copy_from_slice(&check.to_be_bytes());
        let t = &mut p[ihl..];
        t[0..2].copy_from_slice(&1000u16.to_be_bytes());
        t[2..4].copy_from_slice(&2000u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&7u32.to_be_bytes()); // ACK number
        t[12] = ((thl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&512u16.to_be_bytes()); // window
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]); // NOP NOP TS
        t[thl..].fill(fill);
        let pseudo = Sum::ZERO
            .add_bytes(&p[12..20])
            .add_u32(6 + (thl + payload) as u32);
        let check = pseudo.add_bytes(&p[ihl..]).checksum();
        p[ihl + 16..ihl + 18].copy_from_slice(&check.to_be_bytes());
        p
    }

    fn ne16(b: &[u8]) -> u16 {
        u16::from_ne_bytes([b[0], b[1]])
    }

    #[test]
    fn consecutive_segments_become_one_gso_packet_with_a_pseudo_header_checksum() {
        let mut c = TcpCoalescer::default();
        assert!(c.push(&v4_segment(100, 1000, TCP_ACK, 0xa1)));
        assert!(c.push(&v4_segment(1100, 1000, TCP_ACK, 0xa2)));
        assert!(c.push(&v4_segment(2100, 400, TCP_ACK | TCP_PSH, 0xa3)));
        assert_eq!(c.segments(), 3);
        let out = c.take().unwrap().to_vec();
        let (hdr, pkt) = out.split_at(VNET_HDR_LEN);
        // flags NEEDS_CSUM, gso_type TCPV4, hdr_len 52, gso_size 1000, csum_start 20, offset 16.
        assert_eq!((hdr[0], hdr[1]), (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4));
        assert_eq!(
            (
                ne16(&hdr[2..]),
                ne16(&hdr[4..]),
                ne16(&hdr[6..]),
                ne16(&hdr[8..])
            ),
            (52, 1000, 20, 16)
        );
        assert_eq!(pkt.len(), 52 + 2400);
        assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
        assert!(verify(&pkt[..20]), "IPv4 header checksum");
        assert_eq!(&pkt[52..1052], &[0xa1; 1000][..]);
        assert_eq!(&pkt[1052..2052], &[0xa2; 1000][..]);
        assert_eq!(&pkt[2052..], &[0xa3; 400][..]);
        // The last segment's PSH, which the kernel puts back on the last segment it makes.
        assert_eq!(pkt[20 + TCP_FLAGS_OFFSET], TCP_ACK | TCP_PSH);
        // The TCP checksum field holds the folded pseudo-header sum over the whole TCP length.
        let pseudo = Sum::ZERO
            .add_bytes(&pkt[12..20])
            .add_u32(6 + (pkt.len() - 20) as u32)
            .fold();
        assert_eq!(u16::from_be_bytes([pkt[36], pkt[37]]), pseudo);
        assert!(c.take().is_none());
    }

    /// What [`TunSegments`] makes of `read` (a vnet header and a packet).
    fn split(read: &[u8]) -> Result<Vec<Vec<u8>>, SegmentError> {
        let mut s = TunSegments::default();
        s.buffer()[..read.len()].copy_from_slice(read);
        s.start(read.len())?;
        let mut out = vec![0u8; 2048];
        let mut packets = Vec::new();
        while let Some(n) = s.next_into(&mut out) {
            packets.push(out[..n].to_vec());
        }
        Ok(packets)
    }

    #[test]
    fn a_gso_read_is_cut_back_into_the_segments_it_was_made_of() {
        // The coalescer builds what the kernel would hand over: one GSO packet, checksum
        // partial. Cut again, every segment is the original but for the IPv4 ID.
        for last_flags in [TCP_ACK, TCP_ACK | TCP_PSH] {
            let segments = [
                v4_segment(100, 1000, TCP_ACK, 0xa1),
                v4_segment(1100, 1000, TCP_ACK, 0xa2),
                v4_segment(2100, 1000, TCP_ACK, 0xa3),
                v4_segment(3100, 10, last_flags, 0xa4),
            ];
            let mut c = TcpCoalescer::default();
            for seg in &segments {
                assert!(c.push(seg));
            }
            let read = c.take().unwrap().to_vec();
            let got = split(&read).unwrap();
            assert_eq!(got.len(), segments.len());
            for (i, (got, want)) in got.iter().zip(&segments).enumerate() {
                assert_eq!(got.len(), want.len(), "segment {i}");
                assert_eq!(got[..4], want[..4], "segment {i}");
                assert_eq!(got[6..10], want[6..10], "segment {i}");
                assert_eq!(got[12..], want[12..], "segment {i}: TCP header and payload");
                let id = |p: &[u8]| u16::from_be_bytes([p[4], p[5]]);
                let first_id = id(&read[VNET_HDR_LEN..]);
                assert_eq!(
                    id(got),
                    first_id.wrapping_add(i as u16),
                    "segment {i}: IPv4 ID"
                );
                assert!(verify(&got[..20]), "segment {i}: IPv4 header checksum");
            }
        }
    }

    #[test]
    fn an_ipv6_gso_read_is_cut_into_valid_segments() {
        let segment = |seq: u32, len: usize, psh: bool| {
            let b = etherparse::PacketBuilder::ipv6(
                [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
                64,
            )
            .tcp(1000, 2000, seq, 512)
            .ack(7);
            let b = if psh { b.psh() } else { b };
            let mut p = Vec::new();
            b.write(&mut p, &vec![seq as u8; len]).unwrap();
            p
        };
        let segments = [
            segment(0, 1200, false),
            segment(1200, 1200, false),
            segment(2400, 7, true),
        ];
        let mut c = TcpCoalescer::default();
        for seg in &segments {
            assert!(c.push(seg));
        }
        let read = c.take().unwrap().to_vec();
        assert_eq!(read[1], VNET_GSO_TCPV6);
        assert_eq!(split(&read).unwrap(), segments.to_vec());
    }

    #[test]
    fn a_partial_checksum_without_gso_is_completed() {
        let want = v4_segment(100, 300, TCP_ACK | TCP_PSH, 0x5a);
        let mut read = vec![0u8; VNET_HDR_LEN];
        read[0] = VNET_F_NEEDS_CSUM;
        read[6..8].copy_from_slice(&20u16.to_ne_bytes());
        read[8..10].copy_from_slice(&(TCP_CHECK_OFFSET as u16).to_ne_bytes());
        let mut pkt = want.clone();
        // What the kernel leaves: the pseudo-header sum, folded, not complemented.
        let pseudo = Sum::ZERO
            .add_bytes(&pkt[12..20])
            .add_u32(6 + (pkt.len() - 20) as u32);
        pkt[36..38].copy_from_slice(&pseudo.fold().to_be_bytes());
        read.extend_from_slice(&pkt);
        assert_eq!(split(&read).unwrap(), vec![want.clone()]);
        // With an all-zero header the packet passes unchanged.
        let mut plain = vec![0u8; VNET_HDR_LEN];
        plain.extend_from_slice(&want);
        assert_eq!(split(&plain).unwrap(), vec![want]);
    }

    #[test]
    fn bad_reads_are_errors_not_panics() {
        let seg = v4_segment(100, 100, TCP_ACK, 1);
        let gso = |gso_type: u8, mss: u16, pkt: &[u8]| {
            let mut r = vec![0u8; VNET_HDR_LEN];
            r[0] = VNET_F_NEEDS_CSUM;
            r[1] = gso_type;
            r[4..6].copy_from_slice(&mss.to_ne_bytes());
            r.extend_from_slice(pkt);
            r
        };
        assert_eq!(split(&[0; 5]), Err(SegmentError::Truncated));
        assert_eq!(split(&[0; VNET_HDR_LEN]), Err(SegmentError::Truncated));
        assert_eq!(
            split(&gso(3, 500, &seg)),
            Err(SegmentError::Unsupported),
            "UDP"
        );
        assert_eq!(
            split(&gso(VNET_GSO_TCPV6, 500, &seg)),
            Err(SegmentError::Unsupported)
        );
        assert_eq!(
            split(&gso(VNET_GSO_TCPV4, 0, &seg)),
            Err(SegmentError::Unsupported)
        );
        assert_eq!(
            split(&gso(VNET_GSO_TCPV4, 500, &seg[..30])),
            Err(SegmentError::Unsupported)
        );
        let mut far = vec![0u8; VNET_HDR_LEN];
        far[0] = VNET_F_NEEDS_CSUM;
        far[6..8].copy_from_slice(&1000u16.to_ne_bytes());
        far.extend_from_slice(&seg);
        assert_eq!(
            split(&far),
            Err(SegmentError::Unsupported),
            "checksum outside"
        );
        // Every truncation of a valid GSO read: an error or packets, never a panic.
        let full = gso(VNET_GSO_TCPV4, 40, &seg);
        for n in 0..full.len() {
            let _ = split(&full[..n]);
        }
    }

    #[test]
    fn one_segment_is_written_unchanged_with_a_zero_header() {
        let mut c = TcpCoalescer::default();
        let s = v4_segment(100, 1000, TCP_ACK, 1);
        assert!(c.push(&s));
        let out = c.take().unwrap();
        assert_eq!(&out[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&out[VNET_HDR_LEN..], &s[..]);
    }

    #[test]
    fn a_gap_a_longer_segment_other_flags_or_a_closed_batch_are_refused() {
        let mut c = TcpCoalescer::default();
        assert!(c.push(&v4_segment(100, 1000, TCP_ACK, 1)));
        assert!(!c.push(&v4_segment(1200, 1000, TCP_ACK, 1)), "sequence gap");
        assert!(
            !c.push(&v4_segment(1100, 1001, TCP_ACK, 1)),
            "longer than gso_size"
        );
        assert!(!c.push(&v4_segment(1100, 1000, TCP_ACK | 0x01, 1)), "FIN");
        let mut other_port = v4_segment(1100, 1000, TCP_ACK, 1);
        other_port[20] ^= 1;
        assert!(!c.push(&other_port), "another flow");
        let mut other_ts = v4_segment(1100, 1000, TCP_ACK, 1);
        other_ts[20 + 27] ^= 1;
        assert!(!c.push(&other_ts), "other TCP options");
        assert!(
            c.push(&v4_segment(1100, 500, TCP_ACK, 1)),
            "short last segment"
        );
        assert!(
            !c.push(&v4_segment(1600, 500, TCP_ACK, 1)),
            "nothing after a short one"
        );
        assert_eq!(c.segments(), 2);
    }

    #[test]
    fn non_tcp_and_truncated_packets_are_refused_at_every_length() {
        let mut c = TcpCoalescer::default();
        let s = v4_segment(100, 10, TCP_ACK, 1);
        for n in 0..s.len() {
            assert!(!c.push(&s[..n]), "{n}");
        }
        let mut udp = s.clone();
        udp[9] = 17;
        assert!(!c.push(&udp));
        let mut syn = v4_segment(100, 10, 0x02, 1);
        assert!(!c.push(&syn));
        syn[33] = TCP_ACK; // byte 13 of the TCP header
        assert!(c.push(&syn));
    }

    #[test]
    fn batches_stop_below_64k() {
        let mut c = TcpCoalescer::default();
        let mut seq = 0u32;
        let mut n = 0;
        while c.push(&v4_segment(seq, 1400, TCP_ACK, 1)) {
            seq += 1400;
            n += 1;
        }
        // (65535 − 52) / 1400 = 46 payloads fit.
        assert_eq!(n, 46);
        assert!(c.take().unwrap().len() <= VNET_HDR_LEN + MAX_BATCH_BYTES);
    }
}
