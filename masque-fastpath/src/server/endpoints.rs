//! What a worker reads and writes, as traits: the QUIC datagrams ([`Datagrams`], the worker's
//! UDP socket), the inner packets ([`Packets`], its TUN queue) and CONNECT-UDP targets
//! ([`UdpTarget`], opened by a [`Connect`]). `Worker::run` drives
//! the real ones with `poll(2)`; everything a pass does (`Worker::pass` and what it calls) goes
//! through these traits, so the unit tests (`server/tests.rs`) run the whole proxy logic, with
//! a real quiche client, on in-memory ones, without root.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use crate::tundev::TunDevice;
use crate::udp::UdpIo;

/// A worker's QUIC datagrams: received in bursts, sent through a buffer that is filled, then
/// committed.
pub(crate) trait Datagrams {
    /// The address datagrams are received on.
    fn local_addr(&self) -> SocketAddr;
    /// Receives a burst; how many datagrams it holds (0: none waiting).
    fn recv_burst(&mut self) -> io::Result<usize>;
    /// Whether the last burst filled the buffer (more may be waiting).
    fn burst_full(&self) -> bool;
    /// Datagram `i` of the burst, its sender, and the address it was sent to.
    fn datagram(&mut self, i: usize) -> (&mut [u8], SocketAddr, SocketAddr);
    /// Room for the next datagram to send.
    fn send_buf(&mut self) -> &mut [u8];
    /// Sends the first `len` bytes of [`Datagrams::send_buf`] from `from` (one of the addresses
    /// datagrams were received on) to `to`, queued until [`Datagrams::flush`].
    fn commit(&mut self, len: usize, from: SocketAddr, to: SocketAddr);
    /// Sends what is queued.
    fn flush(&mut self);
    /// What the endpoint counted.
    fn counters(&self) -> EndpointCounters;
    /// A descriptor that is readable when datagrams wait (for `poll`).
    fn poll_fd(&self) -> RawFd;
}

impl Datagrams for UdpIo {
    fn local_addr(&self) -> SocketAddr {
        UdpIo::local_addr(self)
    }
    fn recv_burst(&mut self) -> io::Result<usize> {
        UdpIo::recv_burst(self)
    }
    fn burst_full(&self) -> bool {
        UdpIo::burst_full(self)
    }
    fn datagram(&mut self, i: usize) -> (&mut [u8], SocketAddr, SocketAddr) {
        let local = UdpIo::local_addr(self);
        let (d, from) = UdpIo::datagram(self, i);
        (d, from, local)
    }
    fn send_buf(&mut self) -> &mut [u8] {
        UdpIo::send_buf(self)
    }
    fn commit(&mut self, len: usize, _from: SocketAddr, to: SocketAddr) {
        UdpIo::commit(self, len, to)
    }
    fn flush(&mut self) {
        UdpIo::flush(self)
    }
    fn counters(&self) -> EndpointCounters {
        EndpointCounters {
            send_errors: self.send_errors,
            send_dropped: self.send_dropped,
            rx_trains: self.rx_trains,
            rx_malformed: 0,
        }
    }
    fn poll_fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }
}

/// What a [`Datagrams`] endpoint counted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EndpointCounters {
    /// Sends that failed.
    pub send_errors: u64,
    /// Datagrams dropped unsent (a full buffer or ring; on AF_XDP also no frame free).
    pub send_dropped: u64,
    /// Received messages that were a UDP GRO train.
    pub rx_trains: u64,
    /// Frames received that were no UDP datagram to the proxy's port (AF_XDP).
    pub rx_malformed: u64,
}

/// A CONNECT-UDP session's connected socket to its target (RFC 9298 §5).
pub(crate) trait UdpTarget {
    /// Sends one payload to the target.
    fn send(&self, payload: &[u8]) -> io::Result<usize>;
    /// Reads one payload from the target (`WouldBlock` when none waits).
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// A descriptor readable when a payload waits (for `poll`), different for every target.
    fn fd(&self) -> RawFd;
}

impl UdpTarget for std::net::UdpSocket {
    fn send(&self, payload: &[u8]) -> io::Result<usize> {
        std::net::UdpSocket::send(self, payload)
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::net::UdpSocket::recv(self, buf)
    }
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

/// Opens a CONNECT-UDP session's target: a connected UDP socket in the proxy, in memory in the
/// unit tests.
pub(crate) type Connect = Box<dyn FnMut(SocketAddr) -> io::Result<Box<dyn UdpTarget>>>;

/// A worker's inner packets, each behind a virtio-net header (`tundev.rs`).
pub(crate) trait Packets {
    /// Reads one packet (`WouldBlock` when none is waiting).
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one packet (a GSO packet counts as one).
    fn send(&self, pkt: &[u8]) -> io::Result<usize>;
}

impl Packets for TunDevice {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        TunDevice::recv(self, buf)
    }
    fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        TunDevice::send(self, pkt)
    }
}
