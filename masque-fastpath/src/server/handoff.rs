//! Packets one worker passes to another: a QUIC datagram that reached a worker not owning its
//! connection ID, a TUN packet read from another worker's queue. One SPSC ring (rtrb) per
//! ordered pair of workers, and an eventfd per worker that its poll loop waits on, so a handed
//! packet wakes its owner at once. Both are rare after a handshake when the steering programs
//! (`masque-fastpath/bpf/`) do their job; every one is counted (`handoffs`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Packets a ring holds before handing off drops (counted `handoff_drops`): a few bursts of a
/// busy connection whose datagrams all arrive at another worker's queue (AF_XDP after a hop).
const RING: usize = 4096;

/// A packet passed to the worker that owns it.
pub enum Handoff {
    /// A QUIC datagram and its sender.
    Quic {
        /// The client's address.
        from: SocketAddr,
        /// The address it was sent to.
        to: SocketAddr,
        /// The datagram.
        data: Vec<u8>,
    },
    /// A packet read from the TUN device, for an address the receiving worker serves.
    Tun(Vec<u8>),
}

/// A worker's ends of the rings.
pub struct Rings {
    /// Worker this is.
    index: usize,
    /// From every other worker (`None` at this worker's own index).
    inbox: Vec<Option<rtrb::Consumer<Handoff>>>,
    /// To every other worker.
    outbox: Vec<Option<rtrb::Producer<Handoff>>>,
    /// Every worker's wake-up descriptor.
    wake: Arc<Vec<EventFd>>,
}

impl Rings {
    /// The rings between `n` workers: entry i is worker i's.
    pub fn mesh(n: usize) -> io::Result<Vec<Rings>> {
        let wake = Arc::new(
            (0..n)
                .map(|_| EventFd::new())
                .collect::<io::Result<Vec<_>>>()?,
        );
        let mut all: Vec<Rings> = (0..n)
            .map(|index| Rings {
                index,
                inbox: (0..n).map(|_| None).collect(),
                outbox: (0..n).map(|_| None).collect(),
                wake: Arc::clone(&wake),
            })
            .collect();
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                let (p, c) = rtrb::RingBuffer::new(RING);
                all[from].outbox[to] = Some(p);
                all[to].inbox[from] = Some(c);
            }
        }
        Ok(all)
    }

    /// The descriptor that becomes readable when something was handed to this worker.
    pub fn wake_fd(&self) -> RawFd {
        self.wake[self.index].as_raw_fd()
    }

    /// Passes `h` to worker `to` and wakes it; false when its ring is full (the packet is
    /// dropped).
    pub fn send(&mut self, to: usize, h: Handoff) -> bool {
        let Some(ring) = self.outbox.get_mut(to).and_then(Option::as_mut) else {
            return false;
        };
        if ring.push(h).is_err() {
            return false;
        }
        self.wake[to].notify();
        true
    }

    /// Takes what was handed to this worker, ring by ring, until all are empty.
    pub fn take(&mut self) -> Option<Handoff> {
        self.wake[self.index].clear();
        self.inbox.iter_mut().flatten().find_map(|c| c.pop().ok())
    }
}

/// A non-blocking eventfd (eventfd(2)).
pub struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a negative result is an error, checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this process owns and nothing else holds.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn notify(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64; a full counter (EAGAIN) still leaves the
        // descriptor readable, which is all a wake-up needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (nothing pending) is fine.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_packets_reach_their_worker_in_order() {
        let mut rings = Rings::mesh(3).unwrap();
        for i in 0..5u8 {
            assert!(rings[0].send(2, Handoff::Tun(vec![i])));
        }
        assert!(rings[1].send(2, Handoff::Tun(vec![9])));
        assert!(
            !rings[0].send(0, Handoff::Tun(vec![0])),
            "no ring to itself"
        );
        let mut got = Vec::new();
        while let Some(Handoff::Tun(d)) = rings[2].take() {
            got.push(d[0]);
        }
        assert_eq!(got, [0, 1, 2, 3, 4, 9]);
        assert!(rings[0].take().is_none() && rings[1].take().is_none());
    }

    #[test]
    fn a_full_ring_refuses() {
        let mut rings = Rings::mesh(2).unwrap();
        let sent = (0..RING + 10)
            .filter(|_| rings[0].send(1, Handoff::Tun(Vec::new())))
            .count();
        assert_eq!(sent, RING);
    }
}
