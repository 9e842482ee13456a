//! The client's address set (seed 000 §3.2; issue 7): which addresses it holds and until when,
//! which one is current, which one to hop to, when to ask the allocator for more, and which to
//! release and drop.
//!
//! Sans-IO: the caller passes its monotonic clock (`now_ms`) into every call and acts on what
//! comes back — it sends the allocator request, adds and removes addresses on the interface,
//! migrates connections. Nothing here reads a clock or touches the host.
//!
//! Times, for an address that expires at `E` (allocation time + lifetime):
//! - it is *usable* (may be chosen, or stay current) while `now + expiry_margin_ms < E`;
//! - after that it is only *draining*: packets already in flight may still arrive on it, but the
//!   set never hands it out again, and once nothing uses it [`AddressSet::poll_release`] returns it
//!   so the agent can tell the allocator;
//! - at `E` it is dropped ([`AddressSet::drain_expired`]) and no call returns it any more.
//!
//! The set asks for the next allocation `refill_lead_ms` before it would hold fewer usable
//! addresses than it needs (`min_usable`, or one more than the connections it serves), so
//! traffic never waits for the allocator (the seed's prototype blocked on DHCP).
//!
//! Cost: every call is linear in the addresses held (a set holds tens, `set_size` ≤ 1024) and
//! does not allocate except where it returns a `Vec`; the per-packet call
//! ([`crate::hopper::ConnectionHopper::on_packet`]) allocates only when it hops.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::rng::{HopRng, Seed};

/// Address-set settings (the agent config's `[addresses]` table). Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddressSetConfig {
    /// Stop choosing an address this long before it expires, in milliseconds, so a connection
    /// never migrates onto an address about to vanish and in-flight replies still reach it.
    /// Default 2,000.
    pub expiry_margin_ms: u64,
    /// Ask the allocator for the next set this long, in milliseconds, before the set would run
    /// short of usable addresses. Must cover the allocator's round trip. Default 10,000.
    pub refill_lead_ms: u64,
    /// Ask again if no set arrived this long, in milliseconds, after a request. Default 1,000.
    pub refill_retry_ms: u64,
    /// Addresses asked for in one request. 1 ..= 1024. Default 8.
    pub set_size: u16,
    /// Usable addresses to keep on hand (the current one and spares to hop to). At least 2.
    /// Default 2.
    pub min_usable: usize,
}

impl Default for AddressSetConfig {
    fn default() -> Self {
        Self {
            expiry_margin_ms: 2_000,
            refill_lead_ms: 10_000,
            refill_retry_ms: 1_000,
            set_size: 8,
            min_usable: 2,
        }
    }
}

/// Why an address-set config was refused. Each message is one line naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressSetConfigError {
    /// `set_size` is 0 or above 1024.
    #[error("addresses: set_size must be between 1 and 1024, got {0}")]
    SetSize(u16),
    /// `min_usable` is below 2: with one address there is nothing to hop to.
    #[error(
        "addresses: min_usable must be at least 2 (the current address and one to hop to), got {0}"
    )]
    MinUsable(usize),
    /// `refill_retry_ms` is 0, which would resend the request on every poll.
    #[error("addresses: refill_retry_ms must be at least 1, got 0")]
    RefillRetry,
}

impl AddressSetConfig {
    /// Refuses settings the set cannot follow.
    pub fn validate(&self) -> Result<(), AddressSetConfigError> {
        if self.set_size == 0 || self.set_size > 1024 {
            return Err(AddressSetConfigError::SetSize(self.set_size));
        }
        if self.min_usable < 2 {
            return Err(AddressSetConfigError::MinUsable(self.min_usable));
        }
        if self.refill_retry_ms == 0 {
            return Err(AddressSetConfigError::RefillRetry);
        }
        Ok(())
    }
}

/// A request the agent should send to the allocator now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefillRequest {
    /// Addresses to ask for.
    pub count: u16,
}

/// A hop of the set's current address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The address left, if there was a usable-or-draining current one.
    pub from: Option<IpAddr>,
    /// The new current address.
    pub to: IpAddr,
}

/// No address can be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    /// Every address is expired, within the expiry margin, or the one being left.
    #[error("no spare address: {usable} usable address(es), none other than the current one")]
    NoSpareAddress {
        /// Usable addresses, counting the one being left.
        usable: usize,
    },
}

/// Identifies a connection for per-connection assignment (the caller's own numbering).
pub type ConnectionId = u64;

/// The addresses the client holds. See the module docs for the life of an address.
#[derive(Debug, Clone)]
pub struct AddressSet {
    config: AddressSetConfig,
    /// In allocation order, so choices under a seed are reproducible.
    entries: Vec<Entry>,
    current: Option<IpAddr>,
    connections: BTreeMap<ConnectionId, IpAddr>,
    /// When the outstanding refill request was sent.
    refill_sent_ms: Option<u64>,
    rng: HopRng,
}

#[derive(Debug, Clone)]
struct Entry {
    addr: IpAddr,
    expires_ms: u64,
    released: bool,
}

impl AddressSet {
    /// An empty set; `seed` fixes which address each hop picks.
    pub fn new(
        config: AddressSetConfig,
        seed: impl Into<Seed>,
    ) -> Result<Self, AddressSetConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            entries: Vec::new(),
            current: None,
            connections: BTreeMap::new(),
            refill_sent_ms: None,
            rng: HopRng::new(seed),
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &AddressSetConfig {
        &self.config
    }

    /// Adds an allocation received at `now_ms`: each address with its lifetime. Answers the
    /// outstanding refill request. An address already held takes the later expiry; one with a
    /// zero lifetime is ignored. Returns how many addresses were new or extended.
    pub fn add_allocation(&mut self, now_ms: u64, addresses: &[(IpAddr, Duration)]) -> usize {
        self.refill_sent_ms = None;
        let mut accepted = 0;
        for &(addr, lifetime) in addresses {
            let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
            if lifetime_ms == 0 {
                continue;
            }
            let expires_ms = now_ms.saturating_add(lifetime_ms);
            match self.entries.iter_mut().find(|e| e.addr == addr) {
                Some(entry) => {
                    if expires_ms > entry.expires_ms {
                        entry.expires_ms = expires_ms;
                        entry.released = false;
                        accepted += 1;
                    }
                }
                None => {
                    self.entries.push(Entry {
                        addr,
                        expires_ms,
                        released: false,
                    });
                    accepted += 1;
                }
            }
        }
        accepted
    }

    /// The current address, unless there is none or it has expired.
    pub fn current(&self, now_ms: u64) -> Option<IpAddr> {
        self.current
            .filter(|&a| self.expires_ms(a).is_some_and(|e| now_ms < e))
    }

    /// Whether the current address must be left now (missing, or within the expiry margin),
    /// whatever the hop strategy says.
    pub fn must_leave_current(&self, now_ms: u64) -> bool {
        self.current.is_none_or(|a| !self.is_usable(a, now_ms))
    }

    /// Moves the current address to a usable one other than the current, chosen uniformly.
    /// Fails (and keeps the current one) when there is no such address.
    pub fn hop(&mut self, now_ms: u64) -> Result<Hop, ChooseError> {
        let from = self.current(now_ms);
        let to = self.choose(now_ms, from, &[])?;
        self.current = Some(to);
        Ok(Hop { from, to })
    }

    /// Whether `addr` is held and may still be handed out at `now_ms` (outside the margin).
    pub fn is_usable(&self, addr: IpAddr, now_ms: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.addr == addr && self.entry_usable(e, now_ms))
    }

    /// Usable addresses at `now_ms` (including the current one).
    pub fn usable_count(&self, now_ms: u64) -> usize {
        self.entries
            .iter()
            .filter(|e| self.entry_usable(e, now_ms))
            .count()
    }

    /// Every address held and its expiry (ms on the caller's clock), in allocation order.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.entries.iter().map(|e| (e.addr, e.expires_ms))
    }

    /// The time (ms) from which the set would hold fewer usable addresses than it needs if no
    /// allocation arrived; 0 when it already holds too few addresses.
    pub fn runs_out_ms(&self) -> u64 {
        let need = self.needed();
        let mut until: Vec<u64> = self
            .entries
            .iter()
            .map(|e| e.expires_ms.saturating_sub(self.config.expiry_margin_ms))
            .collect();
        if until.len() < need {
            return 0;
        }
        until.sort_unstable_by(|a, b| b.cmp(a));
        until[need - 1]
    }

    /// A request to send to the allocator now, if the set will run short within the refill
    /// lead and no request is outstanding (one unanswered for `refill_retry_ms` is resent).
    pub fn poll_refill(&mut self, now_ms: u64) -> Option<RefillRequest> {
        if now_ms.saturating_add(self.config.refill_lead_ms) < self.runs_out_ms() {
            return None;
        }
        if let Some(sent) = self.refill_sent_ms {
            if now_ms < sent.saturating_add(self.config.refill_retry_ms) {
                return None;
            }
        }
        self.refill_sent_ms = Some(now_ms);
        Some(RefillRequest {
            count: self.config.set_size,
        })
    }

    /// Addresses that will never be handed out again (within the expiry margin), that neither the
    /// current address nor any connection uses, and that were not returned before: tell the
    /// allocator it may recycle them. They stay on the interface until they expire.
    pub fn poll_release(&mut self, now_ms: u64) -> Vec<IpAddr> {
        let margin = self.config.expiry_margin_ms;
        let mut released = Vec::new();
        for entry in &mut self.entries {
            let draining = now_ms.saturating_add(margin) >= entry.expires_ms;
            let in_use = self.current == Some(entry.addr)
                || self.connections.values().any(|&a| a == entry.addr);
            if draining && !in_use && !entry.released && now_ms < entry.expires_ms {
                entry.released = true;
                released.push(entry.addr);
            }
        }
        released
    }

    /// Drops the addresses that have expired at `now_ms` and returns them, for the agent to take
    /// off the interface. The current address is cleared if it was one of them; connections on
    /// them show up in [`Self::connections_to_move`].
    pub fn drain_expired(&mut self, now_ms: u64) -> Vec<IpAddr> {
        let mut expired = Vec::new();
        self.entries.retain(|e| {
            let keep = now_ms < e.expires_ms;
            if !keep {
                expired.push(e.addr);
            }
            keep
        });
        if self.current.is_some_and(|a| expired.contains(&a)) {
            self.current = None;
        }
        // Connections on an expired address keep their entry, so that
        // `connections_to_move` still reports them; `connection_address` returns `None`.
        expired
    }

    /// Every unexpired address not released before (on exit: send them in one `Release`).
    pub fn release_all(&mut self, now_ms: u64) -> Vec<IpAddr> {
        let mut released = Vec::new();
        for entry in &mut self.entries {
            if !entry.released && now_ms < entry.expires_ms {
                entry.released = true;
                released.push(entry.addr);
            }
        }
        released
    }

    /// The next time at which a poll can return something new (an address leaves its usable
    /// window or expires, a refill falls due or is resent), so the driver can arm one timer.
    pub fn next_timeout_ms(&self, now_ms: u64) -> Option<u64> {
        let margin = self.config.expiry_margin_ms;
        let mut next = self
            .entries
            .iter()
            .flat_map(|e| [e.expires_ms.saturating_sub(margin), e.expires_ms])
            .filter(|&t| t > now_ms)
            .min();
        let refill = match self.refill_sent_ms {
            Some(sent) => sent.saturating_add(self.config.refill_retry_ms),
            None => self
                .runs_out_ms()
                .saturating_sub(self.config.refill_lead_ms),
        };
        let refill = refill.max(now_ms);
        next = Some(next.map_or(refill, |n| n.min(refill)));
        next
    }

    /// Gives connection `conn` a usable address of its own ("a different address per
    /// simultaneous connection", seed 000 §3.2): one no other connection holds if there is one,
    /// else the least shared; never the address `conn` held before, unless that is the only
    /// usable one. Call again to move the connection (its address nears expiry, or a hop).
    pub fn assign_connection(
        &mut self,
        conn: ConnectionId,
        now_ms: u64,
    ) -> Result<IpAddr, ChooseError> {
        let previous = self.connections.get(&conn).copied();
        let mut load: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for (&other, &addr) in &self.connections {
            if other != conn {
                *load.entry(addr).or_default() += 1;
            }
        }
        let least = self
            .entries
            .iter()
            .filter(|e| self.entry_usable(e, now_ms) && Some(e.addr) != previous)
            .map(|e| load.get(&e.addr).copied().unwrap_or(0))
            .min();
        let chosen = match least {
            Some(least) => {
                let busier: Vec<IpAddr> = load
                    .iter()
                    .filter(|&(_, &n)| n > least)
                    .map(|(&a, _)| a)
                    .collect();
                self.choose(now_ms, previous, &busier)?
            }
            // Only the previous address (or nothing) is usable: keep it if it is.
            None => match previous.filter(|&a| self.is_usable(a, now_ms)) {
                Some(a) => a,
                None => return Err(ChooseError::NoSpareAddress { usable: 0 }),
            },
        };
        self.connections.insert(conn, chosen);
        Ok(chosen)
    }

    /// The address assigned to `conn`, unless it has expired.
    pub fn connection_address(&self, conn: ConnectionId, now_ms: u64) -> Option<IpAddr> {
        let addr = *self.connections.get(&conn)?;
        self.expires_ms(addr).filter(|&e| now_ms < e).map(|_| addr)
    }

    /// Connections whose address is missing or within the expiry margin: move them with
    /// [`Self::assign_connection`].
    pub fn connections_to_move(&self, now_ms: u64) -> Vec<ConnectionId> {
        self.connections
            .iter()
            .filter(|&(_, &a)| !self.is_usable(a, now_ms))
            .map(|(&c, _)| c)
            .collect()
    }

    /// Records that `conn` is on `addr`: the I/O shell's truth when a hop the set chose did not
    /// happen (the connection stayed where it was).
    pub fn set_connection_address(&mut self, conn: ConnectionId, addr: IpAddr) {
        self.connections.insert(conn, addr);
    }

    /// Forgets a closed connection; its address becomes free for others.
    pub fn remove_connection(&mut self, conn: ConnectionId) {
        self.connections.remove(&conn);
    }

    /// Usable addresses the set wants on hand: `min_usable`, or one more than the connections
    /// with an address of their own, so each can still move.
    fn needed(&self) -> usize {
        self.config.min_usable.max(self.connections.len() + 1)
    }

    /// A uniformly chosen usable address other than `avoid` and outside `exclude` (if that
    /// leaves any), else any usable one other than `avoid`.
    fn choose(
        &mut self,
        now_ms: u64,
        avoid: Option<IpAddr>,
        exclude: &[IpAddr],
    ) -> Result<IpAddr, ChooseError> {
        let usable: Vec<IpAddr> = self
            .entries
            .iter()
            .filter(|e| self.entry_usable(e, now_ms))
            .map(|e| e.addr)
            .collect();
        let mut candidates: Vec<IpAddr> = usable
            .iter()
            .copied()
            .filter(|&a| Some(a) != avoid && !exclude.contains(&a))
            .collect();
        if candidates.is_empty() {
            candidates = usable
                .iter()
                .copied()
                .filter(|&a| Some(a) != avoid)
                .collect();
        }
        if candidates.is_empty() {
            return Err(ChooseError::NoSpareAddress {
                usable: usable.len(),
            });
        }
        Ok(candidates[self.rng.index(candidates.len())])
    }

    fn expires_ms(&self, addr: IpAddr) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.addr == addr)
            .map(|e| e.expires_ms)
    }

    fn entry_usable(&self, entry: &Entry, now_ms: u64) -> bool {
        now_ms.saturating_add(self.config.expiry_margin_ms) < entry.expires_ms
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn ip(n: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))
    }

    fn config() -> AddressSetConfig {
        AddressSetConfig {
            expiry_margin_ms: 100,
            refill_lead_ms: 1_000,
            refill_retry_ms: 200,
            set_size: 4,
            min_usable: 2,
        }
    }

    /// A set holding addresses 1..=n, each living `lifetime_ms` from t = 0.
    fn set_with(n: u16, lifetime_ms: u64) -> AddressSet {
        let mut set = AddressSet::new(config(), 1).unwrap();
        let addrs: Vec<_> = (1..=n)
            .map(|i| (ip(i), Duration::from_millis(lifetime_ms)))
            .collect();
        assert_eq!(set.add_allocation(0, &addrs), usize::from(n));
        set
    }

    #[test]
    fn hop_never_returns_the_current_address() {
        let mut set = set_with(3, 10_000);
        let first = set.hop(0).unwrap();
        assert_eq!(first.from, None);
        let mut previous = first.to;
        for t in 1..1_000 {
            let hop = set.hop(t).unwrap();
            assert_eq!(hop.from, Some(previous));
            assert_ne!(hop.to, previous);
            assert_eq!(set.current(t), Some(hop.to));
            previous = hop.to;
        }
    }

    #[test]
    fn hop_picks_every_other_address_uniformly() {
        let mut set = set_with(5, u64::MAX / 2);
        let mut seen = BTreeMap::new();
        for t in 0..10_000 {
            *seen.entry(set.hop(t).unwrap().to).or_insert(0u32) += 1;
        }
        assert_eq!(seen.len(), 5);
        // 2,000 expected each; 1,700 is > 7 sigma below.
        assert!(seen.values().all(|&n| n > 1_700), "{seen:?}");
    }

    #[test]
    fn hops_are_fixed_by_the_seed() {
        let run = |seed| {
            let mut set = AddressSet::new(config(), seed).unwrap();
            let addrs: Vec<_> = (1..=6).map(|i| (ip(i), Duration::from_secs(60))).collect();
            set.add_allocation(0, &addrs);
            (0..20).map(|t| set.hop(t).unwrap().to).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn hop_without_a_spare_fails_and_keeps_the_current_address() {
        let mut set = set_with(1, 10_000);
        let only = set.hop(0).unwrap().to;
        assert_eq!(set.hop(1), Err(ChooseError::NoSpareAddress { usable: 1 }));
        assert_eq!(set.current(1), Some(only));
        assert_eq!(
            set.hop(1).unwrap_err().to_string(),
            "no spare address: 1 usable address(es), none other than the current one"
        );
    }

    #[test]
    fn addresses_within_the_expiry_margin_are_never_chosen() {
        let mut set = AddressSet::new(config(), 0).unwrap();
        set.add_allocation(
            0,
            &[
                (ip(1), Duration::from_millis(1_000)),
                (ip(2), Duration::from_millis(5_000)),
            ],
        );
        set.add_allocation(0, &[(ip(3), Duration::from_millis(5_000))]);
        // At t = 900, ip(1) expires in 100 ms = the margin: unusable.
        assert_eq!(set.usable_count(899), 3);
        assert_eq!(set.usable_count(900), 2);
        for t in 900..1_500 {
            assert_ne!(set.hop(t).unwrap().to, ip(1));
        }
    }

    #[test]
    fn current_address_is_left_at_the_margin_and_gone_at_expiry() {
        let mut set = AddressSet::new(config(), 0).unwrap();
        set.add_allocation(0, &[(ip(1), Duration::from_millis(1_000))]);
        assert!(set.must_leave_current(0), "no current address yet");
        set.hop(0).unwrap();
        assert!(!set.must_leave_current(899));
        assert!(set.must_leave_current(900));
        assert_eq!(set.current(999), Some(ip(1)));
        // Never handed out past its expiry, drained or not.
        assert_eq!(set.current(1_000), None);
        assert_eq!(set.drain_expired(999), Vec::<IpAddr>::new());
        assert_eq!(set.drain_expired(1_000), vec![ip(1)]);
        assert_eq!(set.addresses().count(), 0);
    }

    #[test]
    fn reallocated_addresses_take_the_later_expiry_and_zero_lifetimes_are_ignored() {
        let mut set = set_with(2, 1_000);
        assert_eq!(
            set.add_allocation(500, &[(ip(1), Duration::from_millis(2_000))]),
            1
        );
        assert_eq!(
            set.add_allocation(500, &[(ip(2), Duration::from_millis(100))]),
            0
        );
        assert_eq!(set.add_allocation(500, &[(ip(9), Duration::ZERO)]), 0);
        let held: Vec<_> = set.addresses().collect();
        assert_eq!(held, vec![(ip(1), 2_500), (ip(2), 1_000)]);
    }

    #[test]
    fn an_empty_set_asks_for_addresses_at_once() {
        let mut set = AddressSet::new(config(), 0).unwrap();
        assert_eq!(set.runs_out_ms(), 0);
        assert_eq!(set.poll_refill(0), Some(RefillRequest { count: 4 }));
        assert_eq!(
            set.poll_refill(1),
            None,
            "one outstanding request at a time"
        );
    }

    #[test]
    fn refill_is_requested_the_lead_time_before_the_set_runs_short() {
        // Two addresses usable until 10,000 - 100 and 20,000 - 100: with min_usable = 2 the set
        // runs short at 9,900, so it asks at 9,900 - 1,000.
        let mut set = AddressSet::new(config(), 0).unwrap();
        set.add_allocation(
            0,
            &[
                (ip(1), Duration::from_secs(10)),
                (ip(2), Duration::from_secs(20)),
            ],
        );
        assert_eq!(set.runs_out_ms(), 9_900);
        assert_eq!(set.next_timeout_ms(0), Some(8_900));
        assert_eq!(set.poll_refill(8_899), None);
        assert_eq!(set.poll_refill(8_900), Some(RefillRequest { count: 4 }));
        // Unanswered: asked again after refill_retry_ms, not before.
        assert_eq!(set.poll_refill(9_099), None);
        assert_eq!(set.next_timeout_ms(9_000), Some(9_100));
        assert_eq!(set.poll_refill(9_100), Some(RefillRequest { count: 4 }));
        // Answered: nothing more until the new set runs short.
        set.add_allocation(9_200, &[(ip(3), Duration::from_secs(30))]);
        assert_eq!(set.runs_out_ms(), 19_900);
        assert_eq!(set.poll_refill(9_300), None);
    }

    #[test]
    fn connections_with_their_own_addresses_raise_the_refill_need() {
        let mut set = set_with(3, 60_000);
        assert_eq!(set.poll_refill(0), None);
        for conn in 0..3 {
            set.assign_connection(conn, 0).unwrap();
        }
        // Three connections want four usable addresses: the set is short already.
        assert_eq!(set.runs_out_ms(), 0);
        assert!(set.poll_refill(0).is_some());
    }

    #[test]
    fn draining_unused_addresses_are_released_once_and_dropped_at_expiry() {
        let mut set = AddressSet::new(config(), 0).unwrap();
        set.add_allocation(
            0,
            &[
                (ip(1), Duration::from_millis(1_000)),
                (ip(2), Duration::from_millis(1_000)),
                (ip(3), Duration::from_millis(1_000)),
                (ip(4), Duration::from_millis(9_000)),
            ],
        );
        while set.current(0) != Some(ip(1)) {
            set.hop(0).unwrap();
        }
        let conn_addr = set.assign_connection(7, 0).unwrap();
        assert!(set.poll_release(899).is_empty(), "all still usable");
        let released = set.poll_release(900);
        // Neither the current address nor the connection's is released while in use.
        let mut expected: Vec<IpAddr> = [ip(2), ip(3), ip(4)]
            .into_iter()
            .filter(|&a| a != conn_addr && a != ip(4))
            .collect();
        expected.sort();
        assert_eq!(released, expected);
        assert!(set.poll_release(901).is_empty(), "released once");
        let mut dropped = set.drain_expired(1_000);
        dropped.sort();
        assert_eq!(dropped, vec![ip(1), ip(2), ip(3)]);
        assert_eq!(set.current(1_000), None);
        if conn_addr != ip(4) {
            assert_eq!(set.connection_address(7, 1_000), None);
        }
        assert_eq!(set.release_all(1_000), vec![ip(4)]);
        assert!(set.release_all(1_000).is_empty());
    }

    #[test]
    fn each_connection_gets_its_own_address_while_there_are_enough() {
        let mut set = set_with(4, 60_000);
        let mut given: Vec<IpAddr> = (0..4)
            .map(|conn| set.assign_connection(conn, 0).unwrap())
            .collect();
        given.sort();
        given.dedup();
        assert_eq!(given.len(), 4, "four connections, four addresses");
        // A fifth shares, with a connection that has no other company.
        let fifth = set.assign_connection(4, 0).unwrap();
        assert!((1..=4).map(ip).any(|a| a == fifth));
        // Moving a connection never keeps its address when another is usable.
        for t in 0..100 {
            let before = set.connection_address(2, t).unwrap();
            assert_ne!(set.assign_connection(2, t).unwrap(), before);
        }
        // A closed connection frees its address for the next one.
        set.remove_connection(4);
        set.remove_connection(0);
        let free: Vec<IpAddr> = (1..=4)
            .map(ip)
            .filter(|a| (1..4).all(|c| set.connection_address(c, 0) != Some(*a)))
            .collect();
        assert_eq!(free.len(), 1);
        assert_eq!(set.assign_connection(9, 0).unwrap(), free[0]);
    }

    #[test]
    fn connections_on_draining_addresses_are_reported_for_moving() {
        let mut set = AddressSet::new(config(), 0).unwrap();
        set.add_allocation(0, &[(ip(1), Duration::from_millis(1_000))]);
        assert_eq!(set.assign_connection(1, 0), Ok(ip(1)));
        // Re-assigning with no other address keeps the only usable one.
        assert_eq!(set.assign_connection(1, 10), Ok(ip(1)));
        set.add_allocation(500, &[(ip(2), Duration::from_millis(5_000))]);
        assert!(set.connections_to_move(899).is_empty());
        assert_eq!(set.connections_to_move(900), vec![1]);
        assert_eq!(set.assign_connection(1, 900), Ok(ip(2)));
        assert!(set.connections_to_move(900).is_empty());
        set.drain_expired(5_500);
        assert_eq!(
            set.assign_connection(1, 5_500),
            Err(ChooseError::NoSpareAddress { usable: 0 })
        );
    }

    #[test]
    fn config_validation_refuses_impossible_values() {
        let bad = |f: fn(&mut AddressSetConfig)| {
            let mut c = AddressSetConfig::default();
            f(&mut c);
            AddressSet::new(c, 0).unwrap_err()
        };
        assert_eq!(bad(|c| c.set_size = 0), AddressSetConfigError::SetSize(0));
        assert_eq!(
            bad(|c| c.set_size = 2_000),
            AddressSetConfigError::SetSize(2_000)
        );
        assert_eq!(
            bad(|c| c.min_usable = 1),
            AddressSetConfigError::MinUsable(1)
        );
        assert_eq!(
            bad(|c| c.refill_retry_ms = 0),
            AddressSetConfigError::RefillRetry
        );
        assert!(AddressSetConfig::default().validate().is_ok());
    }
}
