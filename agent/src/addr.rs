//! The agent's addresses on the host interface (seed 000 §3.2: "the MIMIQ agent triggers
//! connection migration by changing the host IP address").
//!
//! [`HostAddresses`] is the thin I/O shell of [`AddressSet`]: [`HostAddresses::sync`] drops the
//! addresses that have expired from the set ([`AddressSet::drain_expired`]) and makes the
//! interface hold exactly the set's addresses — IPv6 as /128 with `IFA_F_NODAD` (usable at once:
//! each address is unique by the allocator's construction, so duplicate address detection would
//! only delay the first packet by a second or more), IPv4 as /32. Dropping the value (or
//! [`HostAddresses::remove_all`]) takes every address it put there off again.
//!
//! Each address also gets a kernel lifetime: valid until its expiry plus [`KERNEL_SLACK`] (so an
//! agent killed with `SIGKILL`, whose destructors never run, still leaves nothing behind for
//! long), and preferred until the set stops handing it out (expiry minus the set's expiry
//! margin), so the kernel does not pick a draining address as the source of a socket that did not
//! bind one. The agent removes each address itself at its expiry; the kernel's timer is the
//! backstop.
//!
//! Where the addresses go is an [`AddressBackend`]: the host interface over rtnetlink
//! ([`NetlinkInterface`], the default) or memory ([`MemInterface`], for tests and dry runs).
//!
//! Threading: owned by the agent's event loop. Nothing here panics: netlink failures are error
//! values in the [`SyncReport`] and counted; a failed add is retried at the next sync.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use mimiq_masque::netcfg::{AddressLifetime, Link, NetConfig, NetConfigError, Operation};

use crate::addrset::AddressSet;

/// Prefix length of an IPv4 address on the host interface.
pub const IPV4_PREFIX_LEN: u8 = 32;
/// Prefix length of an IPv6 address on the host interface.
pub const IPV6_PREFIX_LEN: u8 = 128;
/// How long after an address's expiry the kernel removes it if the agent did not.
pub const KERNEL_SLACK: Duration = Duration::from_secs(1);

/// The prefix length an address is configured with.
pub fn host_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        IPV4_PREFIX_LEN
    } else {
        IPV6_PREFIX_LEN
    }
}

/// Somewhere addresses can be put and taken off.
pub trait AddressBackend {
    /// Adds the address, or updates its lifetime if it is there already.
    fn add(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        lifetime: AddressLifetime,
    ) -> Result<(), NetConfigError>;

    /// Deletes the address; `Ok(false)` if it was not there.
    fn delete(&mut self, addr: IpAddr, prefix_len: u8) -> Result<bool, NetConfigError>;
}

/// The host interface, over rtnetlink.
#[derive(Debug)]
pub struct NetlinkInterface {
    net: NetConfig,
    link: Link,
}

impl NetlinkInterface {
    /// Opens a netlink socket (in the calling thread's network namespace) and finds `name`.
    pub fn open(name: &str) -> Result<Self, NetConfigError> {
        let net = NetConfig::new()?;
        let link = net.link(name)?;
        Ok(Self { net, link })
    }

    /// The interface.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// The netlink handle (to read the interface's addresses, say).
    pub fn net(&self) -> &NetConfig {
        &self.net
    }
}

impl AddressBackend for NetlinkInterface {
    fn add(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        lifetime: AddressLifetime,
    ) -> Result<(), NetConfigError> {
        self.net
            .add_address(&self.link, addr, prefix_len, Some(lifetime))
    }

    fn delete(&mut self, addr: IpAddr, prefix_len: u8) -> Result<bool, NetConfigError> {
        self.net.delete_address(&self.link, addr, prefix_len)
    }
}

/// Addresses kept in memory: what a [`NetlinkInterface`] would hold, for tests and dry runs.
#[derive(Debug, Clone, Default)]
pub struct MemInterface {
    addrs: BTreeMap<IpAddr, (u8, AddressLifetime)>,
    failing: bool,
}

impl MemInterface {
    /// An empty interface.
    pub fn new() -> Self {
        Self::default()
    }

    /// The addresses held, with prefix length and the last lifetime set.
    pub fn addresses(&self) -> &BTreeMap<IpAddr, (u8, AddressLifetime)> {
        &self.addrs
    }

    /// While `true`, every call fails as a kernel refusal (`EPERM`) would.
    pub fn set_failing(&mut self, failing: bool) {
        self.failing = failing;
    }

    fn refusal(&self, op: Operation, addr: IpAddr, prefix_len: u8) -> Result<(), NetConfigError> {
        if self.failing {
            return Err(NetConfigError::Kernel {
                op,
                link: "mem0".into(),
                target: format!("{addr}/{prefix_len}"),
                source: std::io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        Ok(())
    }
}

impl AddressBackend for MemInterface {
    fn add(
        &mut self,
        addr: IpAddr,
        prefix_len: u8,
        lifetime: AddressLifetime,
    ) -> Result<(), NetConfigError> {
        self.refusal(Operation::AddAddress, addr, prefix_len)?;
        self.addrs.insert(addr, (prefix_len, lifetime));
        Ok(())
    }

    fn delete(&mut self, addr: IpAddr, prefix_len: u8) -> Result<bool, NetConfigError> {
        self.refusal(Operation::DeleteAddress, addr, prefix_len)?;
        match self.addrs.get(&addr) {
            Some(&(p, _)) if p == prefix_len => {
                self.addrs.remove(&addr);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// What one [`HostAddresses::sync`] (or [`HostAddresses::remove_all`]) did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Addresses put on the interface (new, or with a later expiry).
    pub added: Vec<IpAddr>,
    /// Addresses taken off (expired, or no longer in the set).
    pub removed: Vec<IpAddr>,
    /// What failed; the rest went on. A failed add is tried again at the next sync, a failed
    /// delete too (the address stays on the list of installed ones).
    pub errors: Vec<NetConfigError>,
}

/// Counters, for `mimiq_agent_host_addresses_{added,removed,errors}_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostAddressCounters {
    /// Addresses added or refreshed.
    pub added_total: u64,
    /// Addresses removed (including ones the kernel had already removed).
    pub removed_total: u64,
    /// Netlink calls that failed.
    pub errors_total: u64,
}

/// The set's addresses on an interface (see the module docs).
#[derive(Debug)]
pub struct HostAddresses<B: AddressBackend = NetlinkInterface> {
    backend: B,
    /// Address → the expiry (ms, the caller's clock) its kernel lifetime was last set for.
    installed: BTreeMap<IpAddr, u64>,
    counters: HostAddressCounters,
}

impl HostAddresses<NetlinkInterface> {
    /// Manages addresses on the host interface `name`.
    pub fn open(name: &str) -> Result<Self, NetConfigError> {
        Ok(Self::new(NetlinkInterface::open(name)?))
    }
}

impl<B: AddressBackend> HostAddresses<B> {
    /// Manages addresses through `backend`; none is installed yet.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            installed: BTreeMap::new(),
            counters: HostAddressCounters::default(),
        }
    }

    /// Drops the set's expired addresses and makes the interface hold exactly the set's
    /// addresses, each with a kernel lifetime ending [`KERNEL_SLACK`] after its expiry. Call it
    /// after every allocation and at every [`AddressSet::next_timeout_ms`].
    pub fn sync(&mut self, now_ms: u64, set: &mut AddressSet) -> SyncReport {
        let mut report = SyncReport::default();
        set.drain_expired(now_ms);
        let wanted: BTreeMap<IpAddr, u64> = set.addresses().collect();
        let stale: Vec<IpAddr> = self
            .installed
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            self.remove(addr, &mut report);
        }
        let margin_ms = set.config().expiry_margin_ms;
        for (&addr, &expires_ms) in &wanted {
            if self.installed.get(&addr) == Some(&expires_ms) {
                continue;
            }
            let left = Duration::from_millis(expires_ms.saturating_sub(now_ms));
            let lifetime = AddressLifetime {
                valid: left.saturating_add(KERNEL_SLACK),
                preferred: Duration::from_millis(
                    expires_ms.saturating_sub(margin_ms).saturating_sub(now_ms),
                ),
            };
            match self.backend.add(addr, host_prefix_len(addr), lifetime) {
                Ok(()) => {
                    self.installed.insert(addr, expires_ms);
                    self.counters.added_total += 1;
                    report.added.push(addr);
                }
                Err(e) => {
                    self.counters.errors_total += 1;
                    report.errors.push(e);
                }
            }
        }
        report
    }

    /// Takes every address this value put on the interface off again (on exit; drop does it
    /// too). Addresses the kernel had already removed count as removed.
    pub fn remove_all(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        let all: Vec<IpAddr> = self.installed.keys().copied().collect();
        for addr in all {
            self.remove(addr, &mut report);
        }
        report
    }

    /// The addresses installed, with the expiry (ms) each was installed for.
    pub fn installed(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.installed.iter().map(|(&a, &e)| (a, e))
    }

    /// The counters so far.
    pub fn counters(&self) -> HostAddressCounters {
        self.counters
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (tests inject failures through it).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    fn remove(&mut self, addr: IpAddr, report: &mut SyncReport) {
        match self.backend.delete(addr, host_prefix_len(addr)) {
            Ok(_) => {
                self.installed.remove(&addr);
                self.counters.removed_total += 1;
                report.removed.push(addr);
            }
            Err(e) => {
                self.counters.errors_total += 1;
                report.errors.push(e);
            }
        }
    }
}

impl<B: AddressBackend> Drop for HostAddresses<B> {
    fn drop(&mut self) {
        // Errors cannot be returned from here; the kernel lifetimes remove what is left.
        self.remove_all();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::addrset::AddressSetConfig;

    fn v6(n: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))
    }

    fn v4(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn set() -> AddressSet {
        let config = AddressSetConfig {
            expiry_margin_ms: 500,
            refill_lead_ms: 1_000,
            refill_retry_ms: 200,
            set_size: 4,
            min_usable: 2,
        };
        AddressSet::new(config, 1).unwrap()
    }

    #[test]
    fn sync_installs_the_sets_addresses_with_host_prefixes_and_lifetimes() {
        let mut set = set();
        set.add_allocation(
            1_000,
            &[
                (v6(1), Duration::from_millis(10_000)),
                (v4(1), Duration::from_millis(4_200)),
            ],
        );
        let mut host = HostAddresses::new(MemInterface::new());
        let report = host.sync(1_000, &mut set);
        assert_eq!(report.added.len(), 2);
        assert!(report.errors.is_empty() && report.removed.is_empty());
        let held = host.backend().addresses();
        let (plen, life) = held[&v6(1)];
        assert_eq!(plen, 128);
        // Valid until expiry + slack; preferred until the expiry margin.
        assert_eq!(life.valid, Duration::from_millis(11_000));
        assert_eq!(life.preferred, Duration::from_millis(9_500));
        let (plen, life) = held[&v4(1)];
        assert_eq!(plen, 32);
        assert_eq!(life.valid, Duration::from_millis(5_200));
        assert_eq!(life.preferred, Duration::from_millis(3_700));
        // Nothing changed: nothing to do.
        let again = host.sync(2_000, &mut set);
        assert!(again.added.is_empty() && again.removed.is_empty());
        assert_eq!(host.counters().added_total, 2);
    }

    #[test]
    fn each_address_leaves_the_interface_at_its_expiry() {
        let mut set = set();
        set.add_allocation(
            0,
            &[
                (v6(1), Duration::from_millis(1_000)),
                (v6(2), Duration::from_millis(3_000)),
            ],
        );
        let mut host = HostAddresses::new(MemInterface::new());
        host.sync(0, &mut set);
        assert!(host.sync(999, &mut set).removed.is_empty());
        assert_eq!(host.backend().addresses().len(), 2);
        let report = host.sync(1_000, &mut set);
        assert_eq!(report.removed, vec![v6(1)]);
        assert_eq!(
            host.backend()
                .addresses()
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![v6(2)]
        );
        assert_eq!(set.addresses().count(), 1, "the set dropped it too");
        assert_eq!(host.sync(3_000, &mut set).removed, vec![v6(2)]);
        assert!(host.backend().addresses().is_empty());
        assert_eq!(host.counters().removed_total, 2);
    }

    #[test]
    fn an_extended_expiry_refreshes_the_kernel_lifetime() {
        let mut set = set();
        set.add_allocation(0, &[(v6(1), Duration::from_millis(2_000))]);
        let mut host = HostAddresses::new(MemInterface::new());
        host.sync(0, &mut set);
        set.add_allocation(1_000, &[(v6(1), Duration::from_millis(5_000))]);
        let report = host.sync(1_000, &mut set);
        assert_eq!(report.added, vec![v6(1)]);
        assert_eq!(
            host.backend().addresses()[&v6(1)].1.valid,
            Duration::from_millis(6_000)
        );
        assert_eq!(host.installed().collect::<Vec<_>>(), vec![(v6(1), 6_000)]);
    }

    #[test]
    fn failures_are_reported_counted_and_retried_at_the_next_sync() {
        let mut set = set();
        set.add_allocation(0, &[(v4(7), Duration::from_millis(5_000))]);
        let mut host = HostAddresses::new(MemInterface::new());
        host.backend_mut().set_failing(true);
        let report = host.sync(0, &mut set);
        assert!(report.added.is_empty());
        assert_eq!(report.errors.len(), 1);
        assert_eq!(
            report.errors[0].to_string(),
            "add address 10.0.0.7/32 on mem0: Operation not permitted (os error 1)"
        );
        assert_eq!(host.counters().errors_total, 1);
        assert_eq!(host.installed().count(), 0);
        host.backend_mut().set_failing(false);
        assert_eq!(host.sync(10, &mut set).added, vec![v4(7)]);
        // A failed delete keeps the address on the list, and the next sync deletes it.
        host.backend_mut().set_failing(true);
        assert_eq!(host.sync(5_000, &mut set).errors.len(), 1);
        assert_eq!(host.installed().count(), 1);
        host.backend_mut().set_failing(false);
        assert_eq!(host.sync(5_001, &mut set).removed, vec![v4(7)]);
        assert!(host.backend().addresses().is_empty());
    }

    #[test]
    fn remove_all_and_drop_take_every_address_off() {
        let mut set = set();
        set.add_allocation(
            0,
            &[
                (v6(1), Duration::from_secs(60)),
                (v4(1), Duration::from_secs(60)),
            ],
        );
        let mut host = HostAddresses::new(MemInterface::new());
        host.sync(0, &mut set);
        let report = host.remove_all();
        assert_eq!(report.removed.len(), 2);
        assert!(host.backend().addresses().is_empty());
        assert_eq!(host.installed().count(), 0);
        // Addresses the set still holds come back at the next sync.
        assert_eq!(host.sync(1, &mut set).added.len(), 2);
        // A shared backend shows what drop does.
        let shared = std::rc::Rc::new(std::cell::RefCell::new(MemInterface::new()));
        struct Shared(std::rc::Rc<std::cell::RefCell<MemInterface>>);
        impl AddressBackend for Shared {
            fn add(&mut self, a: IpAddr, p: u8, l: AddressLifetime) -> Result<(), NetConfigError> {
                self.0.borrow_mut().add(a, p, l)
            }
            fn delete(&mut self, a: IpAddr, p: u8) -> Result<bool, NetConfigError> {
                self.0.borrow_mut().delete(a, p)
            }
        }
        {
            let mut host = HostAddresses::new(Shared(shared.clone()));
            host.sync(1, &mut set);
            assert_eq!(shared.borrow().addresses().len(), 2);
        }
        assert!(shared.borrow().addresses().is_empty(), "drop removed them");
    }

    #[test]
    fn addresses_the_set_no_longer_holds_are_taken_off() {
        // Someone else drained the set (e.g. the driver called drain_expired first).
        let mut set = set();
        set.add_allocation(
            0,
            &[
                (v6(1), Duration::from_millis(1_000)),
                (v6(2), Duration::from_secs(9)),
            ],
        );
        let mut host = HostAddresses::new(MemInterface::new());
        host.sync(0, &mut set);
        assert_eq!(set.drain_expired(1_500), vec![v6(1)]);
        assert_eq!(host.sync(1_500, &mut set).removed, vec![v6(1)]);
        assert_eq!(
            host.installed().map(|(a, _)| a).collect::<Vec<_>>(),
            vec![v6(2)]
        );
    }
}
