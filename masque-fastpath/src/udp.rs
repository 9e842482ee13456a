//! The QUIC socket, in bursts: `recvmmsg` fills up to [`BURST`] messages per call, and sends are
//! queued and flushed with one `sendmmsg` per burst, consecutive same-size datagrams to one peer
//! coalesced into a single UDP GSO message (`UDP_SEGMENT`) when the kernel supports it.
//!
//! Receives use UDP GRO (`UDP_GRO`) when the kernel supports it: the kernel then hands over a
//! train of same-size datagrams from one sender as one message of up to 64 KB (a GSO send
//! arrives whole instead of being segmented for the socket, and GRO on the interface merges
//! the rest), with the segment size in a `UDP_GRO` control message; [`UdpIo::recv_burst`] splits
//! each message back into its datagrams. `MIMIQ_NO_GRO` in the environment turns it off (as
//! `MIMIQ_NO_GSO` does GSO), for comparisons.
//!
//! The buffers are allocated once; nothing here allocates per packet.

use std::io;
use std::mem::MaybeUninit;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// Messages per `recvmmsg` / `sendmmsg` call.
pub const BURST: usize = 64;
/// Bytes per receive slot without GRO (a QUIC datagram on a 1500-byte link, with room for jumbo
/// paths).
pub const SLOT: usize = 2048;
/// Bytes per receive slot with GRO: the largest UDP payload, one coalesced train.
const GRO_SLOT: usize = 65_536;
/// Messages per `recvmmsg` with GRO (1 MiB of buffers).
const GRO_BURST: usize = 16;
/// Most segments the kernel accepts in one GSO send.
const MAX_GSO_SEGMENTS: usize = 64;
/// Bytes of outgoing datagrams queued between flushes.
const SEND_BUFFER: usize = 1 << 20;

/// A non-blocking UDP socket with burst receive and GSO send.
pub struct UdpIo {
    sock: UdpSocket,
    local: SocketAddr,
    rx: Vec<u8>,
    /// Bytes per receive slot and slots per call ([`SLOT`]·[`BURST`], or the GRO sizes).
    rx_slot: usize,
    rx_msgs: usize,
    /// The datagrams of the last burst: (offset in rx, length, sender).
    rx_dgrams: Vec<(usize, usize, SocketAddr)>,
    /// Whether the last receive filled every slot (more may be waiting).
    rx_full: bool,
    gro: bool,
    tx: Vec<u8>,
    tx_used: usize,
    /// Room reserved for one outgoing datagram.
    max_payload: usize,
    /// Queued sends: (offset in tx, total length, segment size, destination).
    tx_msgs: Vec<(usize, usize, usize, SocketAddr)>,
    gso: bool,
    /// Send calls that failed for a reason other than a full socket buffer.
    pub send_errors: u64,
    /// Datagrams dropped because the socket buffer was full.
    pub send_dropped: u64,
    /// Messages received that carried a GRO train (more than one datagram).
    pub rx_trains: u64,
}

impl UdpIo {
    /// Binds `addr`, non-blocking, with large socket buffers.
    pub fn bind(addr: SocketAddr) -> io::Result<UdpIo> {
        let sock = UdpSocket::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("bind UDP {addr}: {e}")))?;
        UdpIo::from_socket(sock)
    }

    /// Wraps a bound socket.
    pub fn from_socket(sock: UdpSocket) -> io::Result<UdpIo> {
        sock.set_nonblocking(true)?;
        let fd = sock.as_raw_fd();
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            setsockopt_int(fd, libc::SOL_SOCKET, opt, 8 << 20);
        }
        let gso = std::env::var_os("MIMIQ_NO_GSO").is_none() && probe_gso(fd);
        let gro = std::env::var_os("MIMIQ_NO_GRO").is_none()
            && setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1);
        let (rx_slot, rx_msgs) = if gro {
            (GRO_SLOT, GRO_BURST)
        } else {
            (SLOT, BURST)
        };
        let local = sock.local_addr()?;
        Ok(UdpIo {
            sock,
            local,
            rx: vec![0; rx_msgs * rx_slot],
            rx_slot,
            rx_msgs,
            // The kernel merges at most 64 datagrams into one train.
            rx_dgrams: Vec::with_capacity(rx_msgs * 64),
            rx_full: false,
            gro,
            tx: vec![0; SEND_BUFFER],
            tx_used: 0,
            max_payload: SLOT,
            tx_msgs: Vec::with_capacity(BURST),
            gso,
            send_errors: 0,
            send_dropped: 0,
            rx_trains: 0,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Whether receives use UDP GRO.
    pub fn gro(&self) -> bool {
        self.gro
    }

    /// Sets the largest datagram [`UdpIo::send_buf`] must hold (the QUIC max UDP payload).
    pub fn set_max_payload(&mut self, bytes: usize) {
        self.max_payload = bytes.clamp(1, SEND_BUFFER / 4);
    }

    /// The raw socket.
    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Receives a burst (up to [`BURST`] datagrams, or with GRO up to 16 trains of them);
    /// returns how many datagrams (0 when none are waiting). Read them with
    /// [`UdpIo::datagram`].
    pub fn recv_burst(&mut self) -> io::Result<usize> {
        let (slot, msgs) = (self.rx_slot, self.rx_msgs);
        let mut iov: [MaybeUninit<libc::iovec>; BURST] = [const { MaybeUninit::uninit() }; BURST];
        let mut names: [MaybeUninit<libc::sockaddr_storage>; BURST] =
            [const { MaybeUninit::zeroed() }; BURST];
        // u64 words keep the control buffers aligned for cmsghdr.
        let mut cmsgs = [[0u64; 4]; GRO_BURST];
        let mut hdrs: [MaybeUninit<libc::mmsghdr>; BURST] =
            [const { MaybeUninit::zeroed() }; BURST];
        for i in 0..msgs {
            iov[i].write(libc::iovec {
                iov_base: self.rx[i * slot..].as_mut_ptr().cast(),
                iov_len: slot,
            });
            // SAFETY: zeroed mmsghdr is valid; the pointers stay alive for the call below.
            let h = unsafe { hdrs[i].assume_init_mut() };
            h.msg_hdr.msg_name = names[i].as_mut_ptr().cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = iov[i].as_mut_ptr();
            h.msg_hdr.msg_iovlen = 1;
            if self.gro {
                h.msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = std::mem::size_of_val(&cmsgs[i]);
            }
        }
        // SAFETY: hdrs holds `msgs` initialised headers pointing at live buffers of `slot` bytes.
        let n = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr().cast(),
                msgs as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        self.rx_dgrams.clear();
        self.rx_full = n == msgs as i32;
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        for i in 0..n as usize {
            // SAFETY: the kernel filled the first n headers and their names.
            let h = unsafe { hdrs[i].assume_init_ref() };
            // SAFETY: as above, the kernel filled the first n names.
            let from = unsafe { sockaddr_to_std(names[i].assume_init_ref()) }.unwrap_or(self.local);
            let len = (h.msg_len as usize).min(slot);
            let seg = if self.gro {
                // SAFETY: the header's control buffer is ours and the kernel set its length.
                unsafe { gro_segment(&h.msg_hdr) }
            } else {
                None
            };
            let seg = seg.filter(|&s| s > 0).unwrap_or(len.max(1));
            if len > seg {
                self.rx_trains += 1;
            }
            let mut off = 0;
            while off < len {
                let l = seg.min(len - off);
                self.rx_dgrams.push((i * slot + off, l, from));
                off += l;
            }
            if len == 0 {
                self.rx_dgrams.push((i * slot, 0, from));
            }
        }
        Ok(self.rx_dgrams.len())
    }

    /// Whether the last [`UdpIo::recv_burst`] filled every slot, so more may be waiting.
    pub fn burst_full(&self) -> bool {
        self.rx_full
    }

    /// The `i`-th datagram of the last burst, mutable (quiche decrypts in place), and its sender.
    pub fn datagram(&mut self, i: usize) -> (&mut [u8], SocketAddr) {
        let (off, len, from) = self.rx_dgrams[i];
        (&mut self.rx[off..off + len], from)
    }

    /// A buffer to write the next outgoing datagram into (the max payload set with
    /// [`UdpIo::set_max_payload`]); commit it with [`UdpIo::commit`]. Flushes first when the queue
    /// is full.
    pub fn send_buf(&mut self) -> &mut [u8] {
        if self.tx_used + self.max_payload > SEND_BUFFER || self.tx_msgs.len() >= BURST {
            self.flush();
        }
        &mut self.tx[self.tx_used..self.tx_used + self.max_payload]
    }

    /// Whether datagrams are queued.
    pub fn has_pending(&self) -> bool {
        !self.tx_msgs.is_empty()
    }

    /// Queues the first `len` bytes of the buffer [`UdpIo::send_buf`] returned, for `to`.
    pub fn commit(&mut self, len: usize, to: SocketAddr) {
        let start = self.tx_used;
        let len = len.min(self.max_payload);
        self.tx_used += len;
        if let Some(last) = self.tx_msgs.last_mut() {
            let (off, total, seg, dst) = *last;
            let segments = total.div_ceil(seg);
            // GSO: every segment but the last has the same size; a shorter one ends the train.
            if self.gso
                && dst == to
                && off + total == start
                && total % seg == 0
                && len <= seg
                && segments < MAX_GSO_SEGMENTS
                && total + len <= 65_000
            {
                last.1 += len;
                return;
            }
        }
        self.tx_msgs.push((start, len, len, to));
    }

    /// Sends everything queued. A full socket buffer drops the rest of the burst (counted; QUIC
    /// recovers the loss).
    pub fn flush(&mut self) {
        let mut sent = 0;
        while sent < self.tx_msgs.len() {
            let batch = &self.tx_msgs[sent..(sent + BURST).min(self.tx_msgs.len())];
            let n = batch.len();
            let mut iov: [MaybeUninit<libc::iovec>; BURST] =
                [const { MaybeUninit::uninit() }; BURST];
            let mut names: [MaybeUninit<libc::sockaddr_storage>; BURST] =
                [const { MaybeUninit::zeroed() }; BURST];
            let mut cmsgs = [[0u8; 32]; BURST];
            let mut hdrs: [MaybeUninit<libc::mmsghdr>; BURST] =
                [const { MaybeUninit::zeroed() }; BURST];
            for (i, &(off, total, seg, to)) in batch.iter().enumerate() {
                iov[i].write(libc::iovec {
                    iov_base: self.tx[off..].as_mut_ptr().cast(),
                    iov_len: total,
                });
                // SAFETY: names[i] is a zeroed sockaddr_storage large enough for either family.
                let namelen = unsafe { std_to_sockaddr(to, names[i].assume_init_mut()) };
                // SAFETY: a zeroed mmsghdr is valid; pointers outlive the call.
                let h = unsafe { hdrs[i].assume_init_mut() };
                h.msg_hdr.msg_name = names[i].as_mut_ptr().cast();
                h.msg_hdr.msg_namelen = namelen;
                h.msg_hdr.msg_iov = iov[i].as_mut_ptr();
                h.msg_hdr.msg_iovlen = 1;
                if total > seg {
                    // SAFETY: cmsgs[i] has room for one cmsghdr with a u16 (CMSG_SPACE(2) ≤ 24).
                    unsafe {
                        h.msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
                        h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
                        let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                        (*c).cmsg_level = libc::SOL_UDP;
                        (*c).cmsg_type = libc::UDP_SEGMENT;
                        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
                    }
                }
            }
            // SAFETY: n initialised headers pointing at live buffers.
            let r = unsafe {
                libc::sendmmsg(self.sock.as_raw_fd(), hdrs.as_mut_ptr().cast(), n as u32, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                let (off, total, seg, to) = self.tx_msgs[sent];
                if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
                {
                    self.send_dropped += (self.tx_msgs.len() - sent) as u64;
                } else if e.raw_os_error() == Some(libc::EIO) && total > seg {
                    // A device that cannot segment (no checksum offload) fails GSO sends with
                    // EIO: GSO goes off for this socket, and the train is sent datagram by
                    // datagram (quinn-udp does the same).
                    tracing::warn!("UDP GSO send failed with EIO: GSO off for this socket");
                    self.gso = false;
                    let one_by_one = (off..off + total)
                        .step_by(seg)
                        .map(|o| (o, seg.min(off + total - o), seg.min(off + total - o), to));
                    self.tx_msgs
                        .splice(sent..=sent, one_by_one.collect::<Vec<_>>());
                    continue;
                } else {
                    // One bad destination (unreachable, EINVAL) must not block the others.
                    self.send_errors += 1;
                    sent += 1;
                    continue;
                }
                break;
            }
            sent += r.max(1) as usize;
        }
        self.tx_used = 0;
        self.tx_msgs.clear();
    }
}

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) -> bool {
    // SAFETY: a valid fd and a pointer to an int of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        ) == 0
    }
}

/// The segment size of a GRO train, from its `UDP_GRO` control message; `None` when the message
/// is one datagram.
///
/// # Safety
/// `h` must be a header the kernel filled, its control buffer alive.
unsafe fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    if h.msg_controllen == 0 || h.msg_control.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees that the kernel filled `h` and that its control buffer is
    // alive; CMSG_FIRSTHDR and CMSG_NXTHDR return either null or a header inside that buffer,
    // and a UDP_GRO message carries one (possibly unaligned) int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                return Some(
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>()) as usize,
                );
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

fn probe_gso(fd: i32) -> bool {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as u32;
    // SAFETY: getsockopt into a local int.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&mut v as *mut i32).cast(),
            &mut len,
        ) == 0
    }
}

/// # Safety
/// `s` must be a sockaddr_storage filled by the kernel.
unsafe fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote an AF_INET address, and sockaddr_storage is large and
            // aligned enough for any sockaddr.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for AF_INET6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// # Safety
/// `out` must be a writable sockaddr_storage.
unsafe fn std_to_sockaddr(a: SocketAddr, out: &mut libc::sockaddr_storage) -> u32 {
    match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr, and
            // `out` is borrowed mutably for this call.
            let s =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as u16;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let s =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as u16;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_flowinfo = a.flowinfo();
            s.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_round_trip_with_gso_trains() {
        let mut a = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut b = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = b.local_addr();
        // Ten full-size datagrams then a short one: one GSO train when supported.
        for i in 0..11u8 {
            let len = if i == 10 { 100 } else { 1200 };
            let buf = a.send_buf();
            buf[..len].fill(i);
            a.commit(len, to);
        }
        a.flush();
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = b.recv_burst().unwrap();
            for i in 0..n {
                let (d, from) = b.datagram(i);
                assert_eq!(from, a.local_addr());
                got.push((d.len(), d[0]));
            }
            if got.len() == 11 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let want: Vec<_> = (0..11u8)
            .map(|i| (if i == 10 { 100 } else { 1200 }, i))
            .collect();
        assert_eq!(got, want, "gso={} gro={}", a.gso(), b.gro());
        assert_eq!(a.send_errors + a.send_dropped, 0);
        // Over loopback a GSO send reaches a GRO socket whole: one message, split here.
        if a.gso() && b.gro() {
            assert_eq!(b.rx_trains, 1);
        }
    }

    #[test]
    fn empty_socket_reads_zero() {
        let mut a = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(a.recv_burst().unwrap(), 0);
    }

    #[test]
    fn unreachable_destination_is_counted_not_fatal() {
        let mut a = UdpIo::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // An IPv6 destination on an IPv4 socket fails with EAFNOSUPPORT / EINVAL.
        let buf = a.send_buf();
        buf[..10].fill(1);
        a.commit(10, "[::1]:9".parse().unwrap());
        a.flush();
        assert_eq!(a.send_errors, 1);
    }
}
