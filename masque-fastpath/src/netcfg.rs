//! Host network configuration over rtnetlink: links, addresses and routes.
//!
//! Used by the MASQUE client (configure its TUN device from ADDRESS_ASSIGN and
//! ROUTE_ADVERTISEMENT) and by the client agent (put allocated addresses on the host interface).
//!
//! [`NetConfig`] is a small synchronous handle: it owns one `NETLINK_ROUTE` socket driven by
//! `rtnetlink` on a private current-thread tokio runtime, and every call blocks until the kernel
//! has answered (the kernel answers route-netlink requests at once; nothing here waits on the
//! network). The async stays inside this file: nothing else in the tree is async.
//!
//! Threading: `NetConfig` is `Send + Sync`; calls from several threads are serialised by the
//! runtime. The socket lives in the network namespace of the thread that called
//! [`NetConfig::new`], and keeps acting there whatever thread uses it later.
//!
//! Semantics chosen where the kernel leaves a choice:
//!
//! - **Adding is "replace".** [`NetConfig::add_address`] and [`NetConfig::add_route`] send
//!   `NLM_F_CREATE | NLM_F_REPLACE` (what `ip addr replace` / `ip route replace` do): adding an
//!   address or route that is already there succeeds and updates it (an address's flags and
//!   lifetimes, a route's gateway), so callers never special-case `EEXIST`. An address added
//!   without a lifetime is permanent, also when it replaces one that had a lifetime.
//! - **Deleting is idempotent.** [`NetConfig::delete_address`] and [`NetConfig::delete_route`]
//!   return `Ok(false)` when there was nothing to delete (the kernel's `EADDRNOTAVAIL` /
//!   `ESRCH`), `Ok(true)` when they deleted it.
//! - **IPv6 addresses are added with `IFA_F_NODAD`**: usable at once, never `tentative` (a
//!   MIMIQ address is unique by construction: the allocator hands each out to one client).
//! - A missing interface is always [`NetConfigError::NoSuchLink`], both when looking it up and
//!   when a [`Link`] found earlier has gone since.
//!
//! What may panic: nothing. Every argument is checked (prefix lengths, families, host bits of
//! route destinations, interface names) and bad ones are [`NetConfigError::BadArgument`]; every
//! kernel refusal is [`NetConfigError::Kernel`] with the errno, the interface and the address in
//! its message.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::stream::StreamExt;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, CacheInfo,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use rtnetlink::{AddressMessageBuilder, Handle};

/// `IFNAMSIZ` less its terminating NUL: the longest interface name.
const MAX_IFNAME_LEN: usize = 15;
/// The kernel's "forever" for address lifetimes (`INFINITY_LIFE_TIME`).
const INFINITE_LIFETIME_S: u32 = u32::MAX;

/// A network interface found by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    index: u32,
    name: String,
}

impl Link {
    /// The interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// How long an address stays, as the kernel counts it (whole seconds, rounded up).
///
/// At `valid` the kernel removes the address by itself; after `preferred` it is *deprecated*:
/// still usable when a socket binds it, but no longer picked as a source address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressLifetime {
    /// Until the kernel removes the address. Must not be zero.
    pub valid: Duration,
    /// Until the address is deprecated. Clamped to `valid`.
    pub preferred: Duration,
}

impl AddressLifetime {
    /// Valid and preferred for the same time.
    pub fn new(valid: Duration) -> Self {
        Self {
            valid,
            preferred: valid,
        }
    }
}

/// An address on an interface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The kernel's `IFA_F_*` flags.
    pub flags: u32,
    /// Seconds until the kernel removes it; `None` for a permanent address.
    pub valid_lft_s: Option<u32>,
    /// Seconds until it is deprecated; `None` if never.
    pub preferred_lft_s: Option<u32>,
}

impl AddressInfo {
    /// IPv6 duplicate address detection has not finished: the address cannot be used yet.
    pub fn is_tentative(&self) -> bool {
        self.flags & AddressFlags::Tentative.bits() != 0
    }

    /// Added with `IFA_F_NODAD`.
    pub fn is_nodad(&self) -> bool {
        self.flags & AddressFlags::Nodad.bits() != 0
    }
}

/// A route to a prefix through an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// The destination prefix's network address (host bits zero).
    pub destination: IpAddr,
    /// The destination prefix length.
    pub prefix_len: u8,
    /// The next hop, of the destination's family; `None` for an on-link route.
    pub gateway: Option<IpAddr>,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "route {}/{}", self.destination, self.prefix_len)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        Ok(())
    }
}

/// The operation that failed (named in error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Looking an interface up by name.
    LookupLink,
    /// Setting an interface up.
    SetLinkUp,
    /// Setting an interface's MTU.
    SetMtu,
    /// Adding (or replacing) an address.
    AddAddress,
    /// Deleting an address.
    DeleteAddress,
    /// Listing an interface's addresses.
    ListAddresses,
    /// Adding (or replacing) a route.
    AddRoute,
    /// Deleting a route.
    DeleteRoute,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::LookupLink => "look up interface",
            Operation::SetLinkUp => "set link up",
            Operation::SetMtu => "set mtu",
            Operation::AddAddress => "add address",
            Operation::DeleteAddress => "delete address",
            Operation::ListAddresses => "list addresses",
            Operation::AddRoute => "add route",
            Operation::DeleteRoute => "delete route",
        })
    }
}

/// Why a [`NetConfig`] call failed. Every message is one line naming the operation, the
/// interface and (where there is one) the address, route or value.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    /// The netlink socket or its runtime could not be created (e.g. out of file descriptors).
    #[error("netlink: cannot open a route socket: {0}")]
    Open(#[source] io::Error),
    /// No interface of that name (or the interface has gone since it was looked up).
    #[error("{op}: no interface named {link:?}")]
    NoSuchLink {
        /// What was being done.
        op: Operation,
        /// The interface name.
        link: String,
    },
    /// An argument the kernel would refuse, caught before asking it.
    #[error("{op} {target} on {link}: {reason}")]
    BadArgument {
        /// What was being done.
        op: Operation,
        /// The interface name.
        link: String,
        /// The address, route or value concerned.
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The kernel refused the request.
    #[error("{op} {target} on {link}: {source}")]
    Kernel {
        /// What was being done.
        op: Operation,
        /// The interface name.
        link: String,
        /// The address, route or value concerned.
        target: String,
        /// The errno the kernel answered.
        #[source]
        source: io::Error,
    },
}

impl NetConfigError {
    /// The errno behind the error, if the kernel (or the socket) gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetConfigError::Open(e) | NetConfigError::Kernel { source: e, .. } => e.raw_os_error(),
            NetConfigError::NoSuchLink { .. } => Some(libc::ENODEV),
            NetConfigError::BadArgument { .. } => Some(libc::EINVAL),
        }
    }
}

impl From<NetConfigError> for io::Error {
    fn from(e: NetConfigError) -> io::Error {
        let kind = match &e {
            NetConfigError::Open(inner) | NetConfigError::Kernel { source: inner, .. } => {
                inner.kind()
            }
            NetConfigError::NoSuchLink { .. } => io::ErrorKind::NotFound,
            NetConfigError::BadArgument { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// A synchronous handle on the kernel's routing tables (see the module docs).
pub struct NetConfig {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl fmt::Debug for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetConfig").finish_non_exhaustive()
    }
}

impl NetConfig {
    /// Opens a route-netlink socket in the calling thread's network namespace.
    pub fn new() -> Result<Self, NetConfigError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetConfigError::Open)?;
        // The socket registers with the runtime's reactor, so it is made inside the runtime.
        let (connection, handle, _unsolicited) = {
            let _entered = runtime.enter();
            rtnetlink::new_connection().map_err(NetConfigError::Open)?
        };
        // The connection task runs whenever a call blocks on the runtime, and ends with it.
        runtime.spawn(connection);
        Ok(Self { runtime, handle })
    }

    /// The interface named `name`.
    pub fn link(&self, name: &str) -> Result<Link, NetConfigError> {
        let op = Operation::LookupLink;
        check_link_name(op, name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let replies = self
            .exchange(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST)
            .map_err(|e| kernel_error(op, name, String::new(), e))?;
        replies
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link {
                    index: l.header.index,
                    name: name.to_owned(),
                }),
                _ => None,
            })
            .ok_or_else(|| NetConfigError::NoSuchLink {
                op,
                link: name.to_owned(),
            })
    }

    /// The index of the interface named `name`.
    pub fn link_index(&self, name: &str) -> Result<u32, NetConfigError> {
        self.link(name).map(|l| l.index)
    }

    /// Sets the interface up (`ip link set dev up`). Setting an up link up is not an error.
    pub fn set_link_up(&self, link: &Link) -> Result<(), NetConfigError> {
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.exchange(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)
            .map(drop)
            .map_err(|e| kernel_error(Operation::SetLinkUp, &link.name, String::new(), e))
    }

    /// Sets the interface's MTU, in bytes. The kernel refuses values outside the device's range
    /// (`EINVAL`).
    pub fn set_mtu(&self, link: &Link, mtu_bytes: u32) -> Result<(), NetConfigError> {
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        msg.attributes.push(LinkAttribute::Mtu(mtu_bytes));
        self.exchange(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)
            .map(drop)
            .map_err(|e| kernel_error(Operation::SetMtu, &link.name, format!("{mtu_bytes}"), e))
    }

    /// Adds `addr/prefix_len` to the interface, or updates it if it is already there (see the
    /// module docs). IPv6 addresses get `IFA_F_NODAD`. Without `lifetime` the address is
    /// permanent; with one, the kernel removes it when `lifetime.valid` has passed.
    pub fn add_address(
        &self,
        link: &Link,
        addr: IpAddr,
        prefix_len: u8,
        lifetime: Option<AddressLifetime>,
    ) -> Result<(), NetConfigError> {
        let op = Operation::AddAddress;
        let target = format!("{addr}/{prefix_len}");
        check_prefix_len(op, link, &target, addr, prefix_len)?;
        let mut msg = address_message(link.index, addr, prefix_len);
        if addr.is_ipv6() {
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Some(lifetime) = lifetime {
            let valid = whole_seconds(lifetime.valid);
            if valid == 0 {
                return Err(NetConfigError::BadArgument {
                    op,
                    link: link.name.clone(),
                    target,
                    reason: "the valid lifetime must not be zero",
                });
            }
            let mut info = CacheInfo::default();
            info.ifa_valid = valid;
            info.ifa_preferred = whole_seconds(lifetime.preferred).min(valid);
            msg.attributes.push(AddressAttribute::CacheInfo(info));
        }
        self.exchange(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|e| kernel_error(op, &link.name, target, e))
    }

    /// Deletes `addr/prefix_len` from the interface. `Ok(false)`: it was not there.
    pub fn delete_address(
        &self,
        link: &Link,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<bool, NetConfigError> {
        let op = Operation::DeleteAddress;
        let target = format!("{addr}/{prefix_len}");
        check_prefix_len(op, link, &target, addr, prefix_len)?;
        let msg = address_message(link.index, addr, prefix_len);
        match self.exchange(
            RouteNetlinkMessage::DelAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(e) => Err(kernel_error(op, &link.name, target, e)),
        }
    }

    /// Every address on the interface (both families), in the kernel's order.
    pub fn addresses(&self, link: &Link) -> Result<Vec<AddressInfo>, NetConfigError> {
        let op = Operation::ListAddresses;
        let mut msg = AddressMessage::default();
        msg.header.index = link.index;
        let replies = self
            .exchange(
                RouteNetlinkMessage::GetAddress(msg),
                NLM_F_REQUEST | NLM_F_DUMP,
            )
            .map_err(|e| kernel_error(op, &link.name, String::new(), e))?;
        // A dump of a vanished interface is just empty; say so rather than "no addresses".
        let addrs: Vec<AddressInfo> = replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == link.index => {
                    address_info(&a)
                }
                _ => None,
            })
            .collect();
        if addrs.is_empty() {
            self.check_link_still_there(op, link)?;
        }
        Ok(addrs)
    }

    /// Adds a route to `route.destination/prefix_len` through the interface (in the main
    /// table), or replaces the route to that prefix if there is one (see the module docs).
    pub fn add_route(&self, link: &Link, route: &Route) -> Result<(), NetConfigError> {
        let op = Operation::AddRoute;
        check_route(op, link, route)?;
        let mut msg = route_message(link.index, route);
        msg.header.protocol = RouteProtocol::Static;
        msg.header.kind = RouteType::Unicast;
        // As `ip route add`: an IPv4 route without a gateway reaches hosts on the link.
        msg.header.scope = if route.gateway.is_none() && route.destination.is_ipv4() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        self.exchange(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
        .map_err(|e| kernel_error(op, &link.name, route.to_string(), e))
    }

    /// Deletes the route through the interface to that prefix (and via that gateway, if given).
    /// `Ok(false)`: there was no such route.
    pub fn delete_route(&self, link: &Link, route: &Route) -> Result<bool, NetConfigError> {
        let op = Operation::DeleteRoute;
        check_route(op, link, route)?;
        let mut msg = route_message(link.index, route);
        // As `ip route del`: match any scope, protocol and type.
        msg.header.scope = RouteScope::NoWhere;
        match self.exchange(
            RouteNetlinkMessage::DelRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                self.check_link_still_there(op, link)?;
                Ok(false)
            }
            Err(e) => Err(kernel_error(op, &link.name, route.to_string(), e)),
        }
    }

    /// `NoSuchLink` if the interface has gone (by index) since it was looked up.
    fn check_link_still_there(&self, op: Operation, link: &Link) -> Result<(), NetConfigError> {
        let mut msg = LinkMessage::default();
        msg.header.index = link.index;
        match self.exchange(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST) {
            Ok(_) => Ok(()),
            Err(e) => Err(kernel_error(op, &link.name, String::new(), e)),
        }
    }

    /// Sends one request and collects the kernel's answer: the messages of a dump or a get,
    /// nothing for an acknowledged change, the errno of a refusal.
    fn exchange(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, io::Error> {
        let mut handle = self.handle.clone();
        self.runtime.block_on(async move {
            let mut request = NetlinkMessage::from(message);
            request.header.flags = flags;
            let mut responses = handle.request(request).map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "netlink connection closed")
            })?;
            let mut out = Vec::new();
            while let Some(response) = responses.next().await {
                match response.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    _ => {}
                }
            }
            Ok(out)
        })
    }
}

/// A kernel refusal, with `ENODEV` reported as the missing interface it is.
fn kernel_error(op: Operation, link: &str, target: String, e: io::Error) -> NetConfigError {
    if e.raw_os_error() == Some(libc::ENODEV) {
        NetConfigError::NoSuchLink {
            op,
            link: link.to_owned(),
        }
    } else {
        NetConfigError::Kernel {
            op,
            link: link.to_owned(),
            target,
            source: e,
        }
    }
}

/// What the kernel takes for an interface name (`dev_valid_name`, net/core/dev.c): 1 to 15
/// bytes, not `.` or `..`, no `/`, `:`, NUL or whitespace. Config checks use it, so a name the
/// kernel would refuse is an error at `check`, not at start.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn check_link_name(op: Operation, name: &str) -> Result<(), NetConfigError> {
    if is_interface_name(name) {
        Ok(())
    } else {
        Err(NetConfigError::BadArgument {
            op,
            link: format!("{name:?}"),
            target: String::new(),
            reason: "not an interface name (1 to 15 bytes, no '/', ':' or whitespace)",
        })
    }
}

fn max_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn check_prefix_len(
    op: Operation,
    link: &Link,
    target: &str,
    addr: IpAddr,
    prefix_len: u8,
) -> Result<(), NetConfigError> {
    if prefix_len > max_prefix_len(addr) {
        return Err(NetConfigError::BadArgument {
            op,
            link: link.name.clone(),
            target: target.to_owned(),
            reason: "prefix length longer than the address",
        });
    }
    Ok(())
}

fn check_route(op: Operation, link: &Link, route: &Route) -> Result<(), NetConfigError> {
    let bad = |reason| NetConfigError::BadArgument {
        op,
        link: link.name.clone(),
        target: route.to_string(),
        reason,
    };
    let dst = route.destination;
    if route.prefix_len > max_prefix_len(dst) {
        return Err(bad("prefix length longer than the address"));
    }
    if mask(dst, route.prefix_len) != dst {
        return Err(bad("the destination has bits set beyond the prefix length"));
    }
    if route
        .gateway
        .is_some_and(|gw| gw.is_ipv4() != dst.is_ipv4())
    {
        return Err(bad("the gateway is not of the destination's family"));
    }
    Ok(())
}

/// `addr` with the bits beyond `prefix_len` cleared (`prefix_len` already checked).
fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & keep))
        }
        IpAddr::V6(a) => {
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & keep))
        }
    }
}

/// Whole seconds, rounded up so an address never goes before its time; below "forever".
fn whole_seconds(d: Duration) -> u32 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    u32::try_from(s)
        .unwrap_or(INFINITE_LIFETIME_S - 1)
        .min(INFINITE_LIFETIME_S - 1)
}

fn address_message(index: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
    match addr {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, prefix_len)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, prefix_len)
            .build(),
    }
}

fn address_info(msg: &AddressMessage) -> Option<AddressInfo> {
    let mut local = None;
    let mut address = None;
    let mut flags = None;
    let mut cache = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Flags(f) => flags = Some(f.bits()),
            AddressAttribute::CacheInfo(c) => cache = Some(*c),
            _ => {}
        }
    }
    let lifetime = |s: u32| (s != INFINITE_LIFETIME_S).then_some(s);
    Some(AddressInfo {
        // IPv4 puts the interface's own address in IFA_LOCAL (IFA_ADDRESS is the peer on a
        // point-to-point link); IPv6 sends only IFA_ADDRESS unless there is a peer.
        addr: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        flags: flags.unwrap_or(u32::from(msg.header.flags.bits())),
        valid_lft_s: cache.and_then(|c| lifetime(c.ifa_valid)),
        preferred_lft_s: cache.and_then(|c| lifetime(c.ifa_preferred)),
    })
}

fn route_message(index: u32, route: &Route) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = if route.destination.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.destination_prefix_length = route.prefix_len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.attributes
        .push(RouteAttribute::Destination(route_address(
            route.destination,
        )));
    if let Some(gw) = route.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(route_address(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            index: 7,
            name: "eth0".into(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn route_checks_refuse_host_bits_long_prefixes_and_mixed_families() {
        let op = Operation::AddRoute;
        let ok = Route {
            destination: ip("10.1.0.0"),
            prefix_len: 16,
            gateway: Some(ip("10.0.0.1")),
        };
        assert!(check_route(op, &link(), &ok).is_ok());
        let host_bits = Route {
            destination: ip("10.1.0.1"),
            ..ok
        };
        let e = check_route(op, &link(), &host_bits).unwrap_err();
        assert_eq!(
            e.to_string(),
            "add route route 10.1.0.1/16 via 10.0.0.1 on eth0: the destination has bits set beyond the prefix length"
        );
        let long = Route {
            prefix_len: 33,
            ..ok
        };
        assert!(check_route(op, &link(), &long).is_err());
        let mixed = Route {
            gateway: Some(ip("fe80::1")),
            ..ok
        };
        assert!(check_route(op, &link(), &mixed).is_err());
        let v6 = Route {
            destination: ip("2001:db8::"),
            prefix_len: 32,
            gateway: None,
        };
        assert!(check_route(op, &link(), &v6).is_ok());
        let default = Route {
            destination: ip("::"),
            prefix_len: 0,
            gateway: Some(ip("fe80::1")),
        };
        assert!(check_route(op, &link(), &default).is_ok());
        let v6_bits = Route {
            destination: ip("2001:db8::1"),
            prefix_len: 127,
            gateway: None,
        };
        assert!(check_route(op, &link(), &v6_bits).is_err());
        assert!(check_prefix_len(op, &link(), "x", ip("::1"), 129).is_err());
        assert!(check_prefix_len(op, &link(), "x", ip("::1"), 128).is_ok());
    }

    #[test]
    fn the_handle_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<NetConfig>();
        shareable::<NetConfigError>();
    }

    #[test]
    fn mask_clears_host_bits_at_every_length() {
        assert_eq!(mask(ip("255.255.255.255"), 0), ip("0.0.0.0"));
        assert_eq!(mask(ip("255.255.255.255"), 9), ip("255.128.0.0"));
        assert_eq!(mask(ip("255.255.255.255"), 32), ip("255.255.255.255"));
        assert_eq!(mask(ip("ffff::ffff"), 0), ip("::"));
        assert_eq!(mask(ip("ffff::ffff"), 12), ip("fff0::"));
        assert_eq!(mask(ip("ffff::ffff"), 128), ip("ffff::ffff"));
    }

    #[test]
    fn lifetimes_round_up_and_stay_below_forever() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1_000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1_001)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::MAX), u32::MAX - 1);
        assert_eq!(
            whole_seconds(Duration::from_secs(u64::from(u32::MAX))),
            u32::MAX - 1
        );
    }

    #[test]
    fn interface_names_are_checked_before_asking_the_kernel() {
        let op = Operation::LookupLink;
        assert!(check_link_name(op, "eth0").is_ok());
        assert!(check_link_name(op, "a23456789012345").is_ok());
        for bad in ["", "a234567890123456", "a/b", "a b", "a:1", ".", ".."] {
            let e = check_link_name(op, bad).unwrap_err();
            assert!(matches!(e, NetConfigError::BadArgument { .. }), "{bad:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn errors_name_the_interface_and_address_and_map_to_io_kinds() {
        let e = kernel_error(
            Operation::AddAddress,
            "eth0",
            "10.0.0.1/32".into(),
            io::Error::from_raw_os_error(libc::EPERM),
        );
        let text = e.to_string();
        assert!(
            text.starts_with("add address 10.0.0.1/32 on eth0: "),
            "{text}"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
        let gone = kernel_error(
            Operation::SetMtu,
            "tun0",
            "1400".into(),
            io::Error::from_raw_os_error(libc::ENODEV),
        );
        assert_eq!(gone.to_string(), "set mtu: no interface named \"tun0\"");
        assert_eq!(io::Error::from(gone).kind(), io::ErrorKind::NotFound);
    }
}
