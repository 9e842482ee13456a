//! What a capture point on the outside link sees of hopping clients (issue 7's capture checks):
//! the QUIC packets clients send to the proxy, by source address and destination connection ID.
//! [`HopWatch`] is fed frames by [`crate::capture::watch`]; [`HopWatch::check`] holds them
//! against the clients' address logs (`mimiq-agent`'s `address_log`):
//!
//! - no connection ID arrives from two different client addresses (a CID from two addresses
//!   links them, which is what hopping must never give away);
//! - every packet's source is an address the allocator gave that client, seen no earlier than
//!   its allocation and no later than its expiry plus t_remove.
//!
//! Sans-IO apart from the clock read per frame: parsing is etherparse's, the QUIC header is
//! read by hand (RFC 9000 §17: a long header carries its DCID length; a short header's DCID has
//! the length the proxy chose, [`mimiq_masque::quic::CID_LEN`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

/// One address a client held: from its allocation to its expiry (Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The client (host name).
    pub client: String,
    /// The address.
    pub addr: IpAddr,
    /// When the allocation arrived.
    pub from_ms: u64,
    /// When it expired.
    pub until_ms: u64,
}

/// Reads an agent's address log (`unix_ms,allocated,address,expires_unix_ms` lines, and
/// `unix_ms,released,address,` ending a lease early; other events are skipped) into leases of
/// `client`. A line that does not parse is an error.
pub fn leases_from_log(client: &str, text: &str) -> Result<Vec<Lease>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || format!("{client} address log line {}: {line:?}", i + 1);
        if f.len() != 4 {
            return Err(bad());
        }
        if f[1] == "released" {
            // Given back before its lifetime ended: held until then.
            let addr: IpAddr = f[2].parse().map_err(|_| bad())?;
            let at: u64 = f[0].parse().map_err(|_| bad())?;
            if let Some(l) = out
                .iter_mut()
                .rev()
                .find(|l: &&mut Lease| l.addr == addr && l.from_ms <= at)
            {
                l.until_ms = l.until_ms.min(at);
            }
            continue;
        }
        if f[1] != "allocated" {
            continue;
        }
        out.push(Lease {
            client: client.to_string(),
            addr: f[2].parse().map_err(|_| bad())?,
            from_ms: f[0].parse().map_err(|_| bad())?,
            until_ms: f[3].parse().map_err(|_| bad())?,
        });
    }
    Ok(out)
}

/// The client packets seen on the way to the proxy.
#[derive(Debug)]
pub struct HopWatch {
    proxy: SocketAddr,
    /// Packets to the proxy, by source address: (first seen, last seen, packets).
    pub sources: BTreeMap<IpAddr, (u64, u64, u64)>,
    /// Destination connection ID → the source addresses it came from.
    pub cids: BTreeMap<Vec<u8>, BTreeSet<IpAddr>>,
    /// Every (source, Unix ms) of a packet, to hold against the leases; one entry per
    /// source per millisecond.
    seen: BTreeMap<IpAddr, BTreeSet<u64>>,
    /// Packets to the proxy too short to hold a connection ID.
    pub malformed: u64,
}

/// What [`HopWatch::check`] found; `violations` is empty when both properties hold.
#[derive(Debug, Default)]
pub struct HopCheck {
    /// Client packets seen.
    pub packets: u64,
    /// Distinct client addresses seen.
    pub addresses: usize,
    /// Distinct connection IDs seen.
    pub cids: usize,
    /// Connection IDs seen from more than one address.
    pub cids_from_two_addresses: usize,
    /// Milliseconds with a packet from an address outside its lease (+ t_remove).
    pub outside_lease: usize,
    /// One line per violation (at most 20).
    pub violations: Vec<String>,
}

impl HopWatch {
    /// Watches for packets to `proxy`.
    pub fn new(proxy: SocketAddr) -> Self {
        Self {
            proxy,
            sources: BTreeMap::new(),
            cids: BTreeMap::new(),
            seen: BTreeMap::new(),
            malformed: 0,
        }
    }

    /// One frame from the capture (Ethernet first).
    pub fn frame(&mut self, frame: &[u8]) {
        let Ok(p) = SlicedPacket::from_ethernet(frame) else {
            return;
        };
        let (src, dst) = match &p.net {
            Some(NetSlice::Ipv4(ip)) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
            ),
            _ => return,
        };
        let Some(TransportSlice::Udp(udp)) = &p.transport else {
            return;
        };
        if dst != self.proxy.ip() || udp.destination_port() != self.proxy.port() {
            return;
        }
        let Some(dcid) = dcid(udp.payload()) else {
            self.malformed += 1;
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let e = self.sources.entry(src).or_insert((now, now, 0));
        e.1 = now;
        e.2 += 1;
        self.cids.entry(dcid.to_vec()).or_default().insert(src);
        self.seen.entry(src).or_default().insert(now);
    }

    /// Holds what was seen against the leases (see the module docs); `t_remove_ms` is the
    /// allocator's, `slack_ms` covers the clocks of two processes and the capture's delay.
    pub fn check(&self, leases: &[Lease], t_remove_ms: u64, slack_ms: u64) -> HopCheck {
        let mut c = HopCheck {
            packets: self.sources.values().map(|s| s.2).sum(),
            addresses: self.sources.len(),
            cids: self.cids.len(),
            ..HopCheck::default()
        };
        let note = |c: &mut HopCheck, line: String| {
            if c.violations.len() < 20 {
                c.violations.push(line);
            }
        };
        for (cid, addrs) in &self.cids {
            if addrs.len() > 1 {
                c.cids_from_two_addresses += 1;
                let hex: String = cid.iter().map(|b| format!("{b:02x}")).collect();
                note(&mut c, format!("connection ID {hex} from {addrs:?}"));
            }
        }
        for (addr, times) in &self.seen {
            let held: Vec<&Lease> = leases.iter().filter(|l| l.addr == *addr).collect();
            // The allocator gives an address again once its lease and t_remove are over; two
            // clients holding it at once would be a fault.
            for (i, a) in held.iter().enumerate() {
                for b in &held[i + 1..] {
                    // A lease starts when its request was sent, a moment before the
                    // allocator granted it: the slack covers that.
                    if a.client != b.client
                        && a.from_ms + slack_ms < b.until_ms + t_remove_ms
                        && b.from_ms + slack_ms < a.until_ms + t_remove_ms
                    {
                        note(
                            &mut c,
                            format!(
                                "{addr} was held by {} and {} at once: {a:?} {b:?}",
                                a.client, b.client
                            ),
                        );
                    }
                }
            }
            for &t in times {
                let inside = held
                    .iter()
                    .any(|l| t + slack_ms >= l.from_ms && t <= l.until_ms + t_remove_ms + slack_ms);
                if !inside {
                    c.outside_lease += 1;
                    note(
                        &mut c,
                        format!("{addr} sent at {t} ms, outside its leases {held:?}"),
                    );
                }
            }
        }
        c
    }
}

/// The destination connection ID of a QUIC packet (RFC 9000 §17.2, §17.3).
fn dcid(payload: &[u8]) -> Option<&[u8]> {
    let first = *payload.first()?;
    if first & 0x80 != 0 {
        let len = usize::from(*payload.get(5)?);
        payload.get(6..6 + len)
    } else {
        payload.get(1..1 + mimiq_masque::quic::CID_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(src: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, [198, 18, 200, 2], 64)
            .udp(50_000, 4433);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn short(cid: u8) -> Vec<u8> {
        let mut p = vec![0x40];
        p.extend(std::iter::repeat_n(cid, mimiq_masque::quic::CID_LEN));
        p.extend([0; 20]);
        p
    }

    #[test]
    fn a_cid_from_two_addresses_and_a_packet_after_its_lease_are_violations() {
        let mut w = HopWatch::new("198.18.200.2:4433".parse().unwrap());
        w.frame(&udp_frame([198, 18, 1, 10], &short(1)));
        w.frame(&udp_frame([198, 18, 1, 11], &short(2)));
        w.frame(&udp_frame([198, 18, 1, 11], &[0x40, 1])); // too short for a CID
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let lease = |a: &str, until: u64| Lease {
            client: "c1".into(),
            addr: a.parse().unwrap(),
            from_ms: now - 1000,
            until_ms: until,
        };
        let leases = [
            lease("198.18.1.10", now + 1000),
            lease("198.18.1.11", now + 1000),
        ];
        let ok = w.check(&leases, 0, 0);
        assert_eq!(
            (ok.packets, ok.addresses, ok.cids, w.malformed),
            (2, 2, 2, 1)
        );
        assert!(ok.violations.is_empty(), "{:?}", ok.violations);

        let expired = [
            lease("198.18.1.10", now + 1000),
            lease("198.18.1.11", now - 500),
        ];
        let late = w.check(&expired, 100, 0);
        assert_eq!(late.outside_lease, 1, "{late:?}");
        assert!(
            w.check(&expired, 1000, 0).violations.is_empty(),
            "t_remove covers it"
        );

        // An address given to another client after the first one's lease + t_remove is fine;
        // held by two at once it is not.
        let c2 = |from: u64, until: u64| Lease {
            client: "c2".into(),
            addr: "198.18.1.10".parse().unwrap(),
            from_ms: from,
            until_ms: until,
        };
        let again = [
            lease("198.18.1.10", now + 1000),
            lease("198.18.1.11", now + 1000),
            c2(now + 1500, now + 9000),
        ];
        assert!(w.check(&again, 400, 0).violations.is_empty());
        let twice = [
            lease("198.18.1.10", now + 1000),
            lease("198.18.1.11", now + 1000),
            c2(now + 500, now + 9000),
        ];
        assert_eq!(w.check(&twice, 0, 0).violations.len(), 1);

        w.frame(&udp_frame([198, 18, 1, 11], &short(1)));
        let linked = w.check(&leases, 0, 0);
        assert_eq!(linked.cids_from_two_addresses, 1, "{linked:?}");
    }

    #[test]
    fn an_address_released_early_is_held_until_then_and_may_go_to_another_after_t_remove() {
        let c2 = leases_from_log(
            "c2",
            "1000,allocated,198.18.1.51,7000\n4000,released,198.18.1.51,\n",
        )
        .unwrap();
        assert_eq!(c2[0].until_ms, 4000);
        let c1 = leases_from_log("c1", "6050,allocated,198.18.1.51,12000\n").unwrap();
        let leases: Vec<Lease> = c2.into_iter().chain(c1).collect();
        let mut w = HopWatch::new("198.18.200.2:4433".parse().unwrap());
        w.frame(&udp_frame([198, 18, 1, 51], &short(1)));
        // Given back at 4 s, t_remove 2 s: c1's lease from 6.05 s is no overlap (it was one
        // when the release was not in the log).
        let check = w.check(&leases, 2000, 100);
        assert!(
            !check.violations.iter().any(|v| v.contains("at once")),
            "{:?}",
            check.violations
        );
    }

    #[test]
    fn address_logs_parse_and_bad_lines_are_errors() {
        let log = "100,allocated,198.18.1.9,900\n950,removed,198.18.1.9,\n";
        let l = leases_from_log("c2", log).unwrap();
        assert_eq!(
            l,
            vec![Lease {
                client: "c2".into(),
                addr: "198.18.1.9".parse().unwrap(),
                from_ms: 100,
                until_ms: 900
            }]
        );
        assert!(leases_from_log("c2", "100,allocated,nope,900\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(leases_from_log("c2", "garbage\n").is_err());
    }
}
