//! When the client hops and to which local address: the [`HopPolicy`] the client asks once per
//! pass of its event loop. The client does the hop (a new socket, handed to the migration
//! driver, `crate::migrate`, which probes, migrates and forgets the path left); the policy only
//! decides. [`TimerHops`] is the CLI's
//! (`--hop-every-ms` over the `--bind` list); the agent's tunnel mode plugs in its hop strategies
//! and allocator-fed address sets.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::ClientStats;

/// What the client reports about a hop the policy asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopOutcome {
    /// The connection now sends from `to`.
    Done {
        /// The address left.
        from: IpAddr,
        /// The new address.
        to: IpAddr,
        /// From the request to the switch.
        latency: Duration,
    },
    /// The hop did not happen (no socket on that address, the probe failed or timed out); the
    /// connection stays where it was.
    Failed {
        /// The address asked for.
        to: IpAddr,
    },
}

/// Decides the client's hops. Called from the client's thread; nothing here may block.
pub trait HopPolicy {
    /// Called once per pass, after `sent` more QUIC datagrams went out from `current`: the
    /// address to hop to now, if any. Not called while a hop is in progress.
    fn poll_hop(&mut self, now: Instant, current: IpAddr, sent: u64) -> Option<IpAddr>;

    /// How long the client stays quiet (sends nothing) before the hop just asked for: a gap
    /// between the current address's last packet and the new one's first, against an observer
    /// who links addresses by the one appearing as the other goes quiet. Zero by default.
    fn idle_before_hop(&mut self) -> Duration {
        Duration::ZERO
    }

    /// The outcome of a hop [`HopPolicy::poll_hop`] asked for.
    fn on_hop(&mut self, _outcome: HopOutcome, _now: Instant) {}

    /// Housekeeping once per pass (refill addresses, expire them); returns when it wants to be
    /// called again at the latest.
    fn poll(&mut self, _now: Instant) -> Option<Duration> {
        None
    }

    /// The client's counters, once per pass while the tunnel is up (the policy may publish
    /// them; nothing here may block).
    fn on_stats(&mut self, _stats: &ClientStats, _now: Instant) {}
}

/// Never hops.
#[derive(Debug, Default)]
pub struct NoHops;

impl HopPolicy for NoHops {
    fn poll_hop(&mut self, _now: Instant, _current: IpAddr, _sent: u64) -> Option<IpAddr> {
        None
    }
}

/// Hops every `every` to the next address of a fixed list, round robin (each hop binds a new
/// port, so even one address gives a fresh 4-tuple per hop).
#[derive(Debug)]
pub struct TimerHops {
    addrs: Vec<IpAddr>,
    every: Duration,
    next: usize,
    last: Option<Instant>,
}

impl TimerHops {
    /// Hops over `addrs` (the first is where the connection starts) every `every`.
    pub fn new(addrs: Vec<IpAddr>, every: Duration) -> Self {
        Self {
            next: 1,
            addrs,
            every,
            last: None,
        }
    }
}

impl HopPolicy for TimerHops {
    fn poll_hop(&mut self, now: Instant, _current: IpAddr, _sent: u64) -> Option<IpAddr> {
        let last = *self.last.get_or_insert(now);
        if self.addrs.is_empty() || now.saturating_duration_since(last) < self.every {
            return None;
        }
        self.last = Some(now);
        let addr = self.addrs[self.next % self.addrs.len()];
        self.next += 1;
        Some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_hops_round_robin_after_each_interval() {
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let mut p = TimerHops::new(vec![a, b], Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(p.poll_hop(t0, a, 10), None);
        assert_eq!(p.poll_hop(t0 + Duration::from_millis(50), a, 10), None);
        assert_eq!(p.poll_hop(t0 + Duration::from_millis(100), a, 10), Some(b));
        assert_eq!(p.poll_hop(t0 + Duration::from_millis(150), b, 10), None);
        assert_eq!(p.poll_hop(t0 + Duration::from_millis(200), b, 10), Some(a));
        assert_eq!(NoHops.poll_hop(t0, a, 1_000), None);
    }
}
