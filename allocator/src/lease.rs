//! Leases: the allocator's sans-IO state machine.
//!
//! [`Allocator`] owns the pools, the alias schedule, every lease and per-client limits. Every
//! method takes `now_ms` (milliseconds on the allocator's wall clock, e.g. since the Unix epoch)
//! and first advances the state to it: leases whose lifetime ended start draining, leases whose
//! drain (`t_remove`) ended go back to the pool, alias epochs rotate. Nothing here reads a clock,
//! touches a socket or spawns a thread.
//!
//! A lease is `Assigned` from its grant until `expires_ms` (lifetime `t_ip`, uniform in
//! `[t_ip_min, t_ip_max]`, or until the client releases it), then `Draining` until
//! `expires_ms + t_remove` (the switches keep its rules for in-flight packets), then it is deleted
//! and the address is free. An address is never in two leases and never handed out while its
//! previous lease is still assigned or draining.
//!
//! Every change produces two outputs, which the I/O shell drains after each batch:
//! * [`JournalOp`]s for the [`Store`](crate::store::Store): commit them before answering clients
//!   or publishing rules, so nothing acknowledged is ever lost;
//! * numbered [`RuleUpdate`]s for the switches.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::alias::{AliasConfig, AliasConfigError, AliasEpoch, AliasSchedule};
use crate::pool::{Ipv4Prefix, Ipv6Prefix, PoolError, V4Pool, V6Pool};
use crate::rng::Csprng;
use crate::{Family, Mac, Sid};

/// Interval between sweeps of idle per-client records.
const CLIENT_GC_INTERVAL_MS: u64 = 10_000;

/// The allocator's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Shortest lease lifetime `t_ip`, ms.
    pub t_ip_min_ms: u64,
    /// Longest lease lifetime `t_ip`, ms.
    pub t_ip_max_ms: u64,
    /// How long rules stay after a lease ends, `t_remove`, ms.
    pub t_remove_ms: u64,
    /// Most addresses one request may ask for.
    pub max_per_request: u32,
    /// Most assigned (not draining) addresses one client (MAC) may hold.
    pub max_live_per_client: u32,
    /// Sustained requests per second per client (token bucket refill).
    pub rate_per_s: u32,
    /// Requests a client may burst above the rate (bucket size).
    pub rate_burst: u32,
    /// Most assigned addresses the clients behind one port of one access switch may hold
    /// together: one port rotating its MAC cannot take the pool from the other ports.
    pub max_live_per_port: u32,
    /// MACs new to a port (holding no address through it) that the port may bring per second,
    /// sustained (token bucket refill).
    pub new_macs_per_port_per_s: u32,
    /// New MACs a port may bring at once above that rate (bucket size).
    pub new_macs_per_port_burst: u32,
    /// A lease whose client (MAC) has sent nothing through its access switch this long after
    /// the grant ends early (drains for `t_remove`, then returns to the pool), so addresses
    /// taken by MACs that never use them come back before their lifetime ends; 0: never. The
    /// access switch reports the first packet from each binding ([`Allocator::seen`]).
    pub reclaim_silent_after_ms: u64,
    /// Access switch SIDs that may relay requests.
    pub sids: Vec<Sid>,
    /// IPv4 pool, if any.
    pub ipv4: Option<V4Config>,
    /// IPv6 pool, if any.
    pub ipv6: Option<V6Config>,
}

/// IPv4 pool configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct V4Config {
    /// Prefixes.
    pub prefixes: Vec<Ipv4Prefix>,
    /// Addresses never handed out (gateways, servers).
    pub reserved: Vec<Ipv4Addr>,
}

/// IPv6 pool configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct V6Config {
    /// Prefix P.
    pub prefix: Ipv6Prefix,
    /// Alias bits `a`.
    pub alias_bits: u8,
    /// Aliases per SID per epoch `n`.
    pub aliases_per_sid: u32,
    /// Alias validity in epochs `k`.
    pub k: u32,
    /// Epoch period `t_sid`, ms.
    pub t_sid_ms: u64,
}

/// Why an [`Allocator`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// t_ip range empty or zero.
    #[error("t_ip range is invalid: need 0 < t_ip_min ({min} ms) <= t_ip_max ({max} ms)")]
    Lifetime {
        /// t_ip_min.
        min: u64,
        /// t_ip_max.
        max: u64,
    },
    /// A limit is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// Neither pool configured.
    #[error("no address pool is configured (need ipv4, ipv6 or both)")]
    NoPool,
    /// No SID.
    #[error("no access switch (SID) is configured")]
    NoSids,
    /// Pool problem.
    #[error("pool: {0}")]
    Pool(#[from] PoolError),
    /// Alias problem.
    #[error("ipv6 aliases: {0}")]
    Alias(#[from] AliasConfigError),
    /// An IPv6 lease could outlive its alias.
    #[error(
        "IPv6 leases could outlive their alias: an address made at the end of an epoch lives up to \
         t_sid + t_ip_max + t_remove = {need} ms, but aliases route for only k·t_sid = {have} ms; \
         the bound (k-1)·t_sid >= t_ip_max + t_remove is broken: raise k or t_sid, or lower t_ip_max or t_remove"
    )]
    AliasOutlived {
        /// t_sid + t_ip_max + t_remove.
        need: u64,
        /// k·t_sid.
        have: u64,
    },
    /// The OS CSPRNG failed.
    #[error(transparent)]
    Rng(#[from] crate::rng::RngError),
}

/// One address granted to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The address.
    pub ip: IpAddr,
    /// When its lifetime ends (ms); the client must stop using it then.
    pub expires_ms: u64,
    /// `expires_ms - now`.
    pub lifetime_ms: u64,
}

/// An allocation request, as relayed by an access switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocParams {
    /// The client's MAC as observed by the switch.
    pub mac: Mac,
    /// The relaying switch.
    pub sid: Sid,
    /// The switch port the request came in on.
    pub port: u16,
    /// Address family.
    pub family: Family,
    /// Number of addresses.
    pub count: u32,
}

/// Why an allocation was refused. No state changed except the client's rate bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Zero addresses, or more than `max_per_request`.
    #[error("bad request: count {0} outside 1..=max_per_request")]
    BadCount(u32),
    /// The family has no pool.
    #[error("no {0:?} pool is configured")]
    FamilyNotConfigured(Family),
    /// The relaying SID is not configured.
    #[error("unknown SID {0}")]
    UnknownSid(Sid),
    /// The client exceeded its request rate.
    #[error("rate limited")]
    RateLimited,
    /// The client would hold more than `max_live_per_client` addresses.
    #[error("client holds {live} addresses; {asked} more would exceed the cap of {cap}")]
    ClientCap {
        /// Currently assigned.
        live: u32,
        /// Requested.
        asked: u32,
        /// The cap.
        cap: u32,
    },
    /// Not enough free addresses (or no alias epoch yet).
    #[error("pool exhausted")]
    PoolExhausted,
    /// The port brought more new MACs than `new_macs_per_port_per_s` allows.
    #[error("too many new MACs on this port")]
    PortRateLimited,
    /// The clients behind the port would hold more than `max_live_per_port` addresses.
    #[error(
        "the port's clients hold {live} addresses; {asked} more would exceed its cap of {cap}"
    )]
    PortCap {
        /// Currently assigned through the port.
        live: u32,
        /// Requested (with what the client holds through another port, which moves).
        asked: u32,
        /// The cap.
        cap: u32,
    },
}

/// A lease as stored and published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: IpAddr,
    /// The client's MAC.
    pub mac: Mac,
    /// The access switch behind which the client sits.
    pub sid: Sid,
    /// The switch's client-facing port it was granted through (where its traffic is delivered).
    pub port: u16,
    /// When it was granted (ms).
    pub assigned_ms: u64,
    /// When its lifetime ends (ms); after that it drains for `t_remove`.
    pub expires_ms: u64,
}

/// A lease's state at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Before `expires_ms`.
    Assigned,
    /// Between `expires_ms` and `expires_ms + t_remove`.
    Draining,
}

/// A change for the switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleUpdate {
    /// Install or replace the binding `ip → (mac, sid)`; a switch may drop it by itself at
    /// `valid_until_ms` (lease end + t_remove) if it missed the remove.
    BindingAdd {
        /// Address.
        ip: IpAddr,
        /// Client MAC.
        mac: Mac,
        /// Access switch.
        sid: Sid,
        /// The access switch's client-facing port behind which the client sits.
        port: u16,
        /// End of the drain (ms).
        valid_until_ms: u64,
    },
    /// Remove the binding of `ip`.
    BindingRemove {
        /// Address.
        ip: IpAddr,
    },
    /// A new alias epoch; its aliases route until `valid_until_ms`. A switch drops an epoch at its
    /// `valid_until_ms` or when it receives epoch `epoch + k`, whichever it sees first.
    AliasEpoch {
        /// Epoch number.
        epoch: u64,
        /// SID → aliases.
        aliases: Vec<(Sid, Vec<u32>)>,
        /// End of validity (ms).
        valid_until_ms: u64,
    },
    /// Start of a snapshot: replace all state with the `count` updates that follow, which bring
    /// the switch to sequence number `seq`.
    Snapshot {
        /// The sequence number the snapshot is consistent with.
        seq: u64,
        /// Number of updates in the snapshot.
        count: u32,
    },
}

/// A rule update and its sequence number (consecutive from 1; snapshots reuse the number they
/// are consistent with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    /// Sequence number.
    pub seq: u64,
    /// The update.
    pub update: RuleUpdate,
}

impl Sequenced {
    /// A snapshot as the rule stream carries it: `Snapshot{seq, count}`, then the `count`
    /// updates, all numbered `seq`.
    pub fn snapshot(seq: u64, updates: Vec<RuleUpdate>) -> Vec<Sequenced> {
        let mut out = Vec::with_capacity(updates.len() + 1);
        out.push(Sequenced {
            seq,
            update: RuleUpdate::Snapshot {
                seq,
                count: updates.len() as u32,
            },
        });
        out.extend(updates.into_iter().map(|update| Sequenced { seq, update }));
        out
    }
}

/// A durable change for the lease store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalOp {
    /// Insert or replace a lease.
    PutLease(Lease),
    /// Delete the lease of an address.
    DeleteLease(IpAddr),
    /// Insert an alias epoch.
    PutEpoch(AliasEpoch),
    /// Delete an alias epoch.
    DeleteEpoch(u64),
}

/// State loaded from a store.
#[derive(Debug, Default, Clone)]
pub struct Loaded {
    /// Every stored lease.
    pub leases: Vec<Lease>,
    /// Every stored epoch.
    pub epochs: Vec<AliasEpoch>,
}

/// Counters the core keeps (the shell exports them as metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoreStats {
    /// Addresses granted.
    pub allocations: u64,
    /// Addresses released by their client.
    pub releases: u64,
    /// Leases whose lifetime ended.
    pub expiries: u64,
    /// Leases deleted after draining (address free again).
    pub freed: u64,
    /// Leases dropped at restore because they had ended while the allocator was down.
    pub expired_while_down: u64,
    /// Requests refused for a port's new-MAC rate.
    pub refused_port_rate: u64,
    /// Requests refused for a port's cap.
    pub refused_port_cap: u64,
    /// Leases ended early because their client had sent nothing (`reclaim_silent_after_ms`).
    pub reclaimed_silent: u64,
}

/// A lease as the table keeps it: the address is the key (32 bytes instead of 56).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseEntry {
    mac: Mac,
    sid: Sid,
    port: u16,
    state: LeaseState,
    assigned_ms: u64,
    expires_ms: u64,
}

impl LeaseEntry {
    fn new(l: &Lease, state: LeaseState) -> Self {
        LeaseEntry {
            mac: l.mac,
            sid: l.sid,
            port: l.port,
            state,
            assigned_ms: l.assigned_ms,
            expires_ms: l.expires_ms,
        }
    }

    fn lease(&self, ip: IpAddr) -> Lease {
        Lease {
            ip,
            mac: self.mac,
            sid: self.sid,
            port: self.port,
            assigned_ms: self.assigned_ms,
            expires_ms: self.expires_ms,
        }
    }
}

/// Leases by address, one map per family with integer keys: an IPv4 bucket is 40 bytes, so the
/// table of a full /8 stays within one cache line per lookup.
#[derive(Debug, Default)]
struct LeaseTable {
    v4: HashMap<u32, LeaseEntry, BuildHasherDefault<AddrHasher>>,
    v6: HashMap<u128, LeaseEntry, BuildHasherDefault<AddrHasher>>,
}

impl LeaseTable {
    fn get(&self, ip: IpAddr) -> Option<&LeaseEntry> {
        match ip {
            IpAddr::V4(a) => self.v4.get(&u32::from(a)),
            IpAddr::V6(a) => self.v6.get(&u128::from(a)),
        }
    }

    fn get_mut(&mut self, ip: IpAddr) -> Option<&mut LeaseEntry> {
        match ip {
            IpAddr::V4(a) => self.v4.get_mut(&u32::from(a)),
            IpAddr::V6(a) => self.v6.get_mut(&u128::from(a)),
        }
    }

    fn insert(&mut self, ip: IpAddr, e: LeaseEntry) -> Option<LeaseEntry> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(u32::from(a), e),
            IpAddr::V6(a) => self.v6.insert(u128::from(a), e),
        }
    }

    fn remove(&mut self, ip: IpAddr) -> Option<LeaseEntry> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(&u32::from(a)),
            IpAddr::V6(a) => self.v6.remove(&u128::from(a)),
        }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn iter(&self) -> impl Iterator<Item = (IpAddr, &LeaseEntry)> {
        let v4 = self
            .v4
            .iter()
            .map(|(k, e)| (IpAddr::V4(Ipv4Addr::from(*k)), e));
        v4.chain(
            self.v6
                .iter()
                .map(|(k, e)| (IpAddr::V6(Ipv6Addr::from(*k)), e)),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Expire,
    Free,
    /// `reclaim_silent_after_ms` after a grant.
    Silent,
}

#[derive(Debug, Clone, Copy)]
struct Client {
    live: u32,
    tokens_milli: u64,
    last_ms: u64,
    /// The (switch, port) its addresses count against: the one of its last grant. Unknown for
    /// a client restored from the store until its next request.
    port: Option<(Sid, u16)>,
    /// Its access switch has seen a packet from one of its addresses (or it was restored from
    /// the store: a client the allocator cannot vouch for is never reclaimed early).
    seen: bool,
}

/// One port of one access switch: what its clients hold, and its bucket of new MACs.
#[derive(Debug, Clone, Copy)]
struct Port {
    live: u32,
    /// Addresses granted through the port that drain (ended, not yet back in the pool): they
    /// count against its cap too, or ending a port's leases early would let it hold more.
    draining: u32,
    tokens_milli: u64,
    last_ms: u64,
}

/// The allocator core (see the module docs).
#[derive(Debug)]
pub struct Allocator {
    cfg: Config,
    rng: Csprng,
    v4: Option<V4Pool>,
    v6: Option<V6Pool>,
    aliases: Option<AliasSchedule>,
    leases: LeaseTable,
    timers: BinaryHeap<Reverse<(u64, TimerKind, IpAddr)>>,
    clients: HashMap<Mac, Client>,
    ports: HashMap<(Sid, u16), Port>,
    next_client_gc_ms: u64,
    now_ms: u64,
    seq: u64,
    journal: Vec<JournalOp>,
    updates: Vec<Sequenced>,
    stats: CoreStats,
}

impl Allocator {
    /// A fresh allocator with no leases.
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        Self::restore(cfg, Loaded::default(), 0)
    }

    /// An allocator rebuilt from stored state at `now_ms`: leases whose drain ended while it was
    /// down are deleted (journal ops are queued for that), the others are re-marked in the pools.
    /// Rules are republished through [`snapshot`](Self::snapshot), which every switch receives
    /// when it (re)connects; sequence numbers restart from 0 with the new snapshot.
    pub fn restore(cfg: Config, loaded: Loaded, now_ms: u64) -> Result<Self, ConfigError> {
        validate(&cfg)?;
        let v4 = match &cfg.ipv4 {
            Some(c) => Some(V4Pool::new(&c.prefixes, &c.reserved)?),
            None => None,
        };
        let (v6, aliases, alias_changes) = match &cfg.ipv6 {
            Some(c) => {
                let pool = V6Pool::new(c.prefix, c.alias_bits)?;
                let acfg = AliasConfig {
                    alias_bits: c.alias_bits,
                    aliases_per_sid: c.aliases_per_sid,
                    k: c.k,
                    t_sid_ms: c.t_sid_ms,
                    sids: cfg.sids.clone(),
                };
                let (sched, ch) = AliasSchedule::restore(acfg, loaded.epochs, now_ms)?;
                (Some(pool), Some(sched), ch)
            }
            None => (None, None, Default::default()),
        };
        let mut a = Allocator {
            rng: Csprng::new()?,
            cfg,
            v4,
            v6,
            aliases,
            leases: LeaseTable::default(),
            timers: BinaryHeap::new(),
            clients: HashMap::new(),
            ports: HashMap::new(),
            next_client_gc_ms: now_ms.saturating_add(CLIENT_GC_INTERVAL_MS),
            now_ms,
            seq: 0,
            journal: Vec::new(),
            updates: Vec::new(),
            stats: CoreStats::default(),
        };
        for e in alias_changes.expired {
            a.journal.push(JournalOp::DeleteEpoch(e));
        }
        let n4 = loaded.leases.iter().filter(|l| l.ip.is_ipv4()).count();
        a.leases.v4.reserve(n4);
        a.leases.v6.reserve(loaded.leases.len() - n4);
        let mut timers = Vec::with_capacity(loaded.leases.len());
        for lease in loaded.leases {
            let drain_end = lease.expires_ms.saturating_add(a.cfg.t_remove_ms);
            if drain_end <= now_ms {
                a.journal.push(JournalOp::DeleteLease(lease.ip));
                a.stats.expired_while_down += 1;
                continue;
            }
            // Mark the address used; an address outside today's pools (the configuration
            // changed) keeps its lease until it drains but is never handed out again.
            match lease.ip {
                IpAddr::V4(ip) => {
                    if let Some(p) = &mut a.v4 {
                        p.mark_used(ip);
                    }
                }
                IpAddr::V6(ip) => {
                    if let Some(p) = &mut a.v6 {
                        p.mark_used(ip);
                    }
                }
            }
            let state = if lease.expires_ms > now_ms {
                LeaseState::Assigned
            } else {
                LeaseState::Draining
            };
            if state == LeaseState::Assigned {
                timers.push(Reverse((lease.expires_ms, TimerKind::Expire, lease.ip)));
                let client = a.client_entry(lease.mac);
                client.live += 1;
                client.seen = true;
            } else {
                timers.push(Reverse((drain_end, TimerKind::Free, lease.ip)));
                a.port_entry((lease.sid, lease.port)).draining += 1;
            }
            a.leases.insert(lease.ip, LeaseEntry::new(&lease, state));
        }
        // Heapify once: O(n) instead of n pushes.
        a.timers = BinaryHeap::from(timers);
        // Nothing is queued for the switches here: they lost their stream with the old process,
        // and every (re)connecting subscriber starts from `snapshot()`.
        a.advance(now_ms);
        Ok(a)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// The latest time the state was advanced to.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Sequence number of the latest rule update.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The IPv4 pool.
    pub fn v4_pool(&self) -> Option<&V4Pool> {
        self.v4.as_ref()
    }

    /// The IPv6 pool.
    pub fn v6_pool(&self) -> Option<&V6Pool> {
        self.v6.as_ref()
    }

    /// The alias schedule.
    pub fn aliases(&self) -> Option<&AliasSchedule> {
        self.aliases.as_ref()
    }

    /// Number of leases (assigned or draining).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every lease with its state, in no particular order.
    pub fn leases(&self) -> impl Iterator<Item = (Lease, LeaseState)> + '_ {
        self.leases.iter().map(|(ip, e)| (e.lease(ip), e.state))
    }

    /// The lease of `ip`, if any.
    pub fn lease(&self, ip: IpAddr) -> Option<(Lease, LeaseState)> {
        self.leases.get(ip).map(|e| (e.lease(ip), e.state))
    }

    /// Moves the state to `now_ms` (times before the last one are treated as the last one):
    /// expiries, frees, alias rotation.
    pub fn advance(&mut self, now_ms: u64) {
        let now = now_ms.max(self.now_ms);
        self.now_ms = now;
        if let Some(s) = &mut self.aliases {
            let ch = s.advance(now, &mut self.rng);
            for e in ch.expired {
                self.journal.push(JournalOp::DeleteEpoch(e));
            }
            if let Some(e) = ch.started {
                self.journal.push(JournalOp::PutEpoch(e.clone()));
                self.emit(RuleUpdate::AliasEpoch {
                    epoch: e.epoch,
                    aliases: e.aliases,
                    valid_until_ms: e.valid_until_ms,
                });
            }
        }
        while let Some(&Reverse((t, kind, ip))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.leases.get_mut(ip) else {
                continue;
            };
            match kind {
                TimerKind::Expire => {
                    // Stale if the lease was released (state already Draining) or replaced.
                    if entry.state == LeaseState::Assigned && entry.expires_ms == t {
                        entry.state = LeaseState::Draining;
                        let (mac, port) = (entry.mac, (entry.sid, entry.port));
                        self.port_entry(port).draining += 1;
                        // One timer per lease at a time: the drain's end is scheduled now.
                        let free_at = t.saturating_add(self.cfg.t_remove_ms);
                        self.timers.push(Reverse((free_at, TimerKind::Free, ip)));
                        self.stats.expiries += 1;
                        self.client_lost_one(mac);
                    }
                }
                TimerKind::Silent => {
                    let granted_at = t.saturating_sub(self.cfg.reclaim_silent_after_ms);
                    let mac = entry.mac;
                    // Stale if this is another lease of the address, or it ended already.
                    if entry.state == LeaseState::Assigned
                        && entry.assigned_ms == granted_at
                        && !self.clients.get(&mac).is_some_and(|c| c.seen)
                        && self.end_at(ip, t)
                    {
                        self.stats.reclaimed_silent += 1;
                    }
                }
                TimerKind::Free => {
                    if entry.expires_ms.saturating_add(self.cfg.t_remove_ms) == t {
                        let port = (entry.sid, entry.port);
                        if entry.state == LeaseState::Assigned {
                            // Cannot happen (Free timers are pushed only once a lease drains),
                            // but keep the client count right regardless.
                            let mac = entry.mac;
                            self.client_lost_one(mac);
                        }
                        if let Some(p) = self.ports.get_mut(&port) {
                            p.draining = p.draining.saturating_sub(1);
                        }
                        self.leases.remove(ip);
                        self.release_addr(ip);
                        self.stats.freed += 1;
                        self.journal.push(JournalOp::DeleteLease(ip));
                        self.emit(RuleUpdate::BindingRemove { ip });
                    }
                }
            }
        }
        if now >= self.next_client_gc_ms {
            self.next_client_gc_ms = now.saturating_add(CLIENT_GC_INTERVAL_MS);
            let (rate, burst) = (self.cfg.rate_per_s, self.cfg.rate_burst);
            self.clients.retain(|_, c| {
                refill(&mut c.tokens_milli, &mut c.last_ms, now, rate, burst);
                c.live > 0 || c.tokens_milli < u64::from(burst) * 1000
            });
            let (rate, burst) = (
                self.cfg.new_macs_per_port_per_s,
                self.cfg.new_macs_per_port_burst,
            );
            self.ports.retain(|_, p| {
                refill(&mut p.tokens_milli, &mut p.last_ms, now, rate, burst);
                p.live > 0 || p.draining > 0 || p.tokens_milli < u64::from(burst) * 1000
            });
        }
    }

    /// Grants `p.count` addresses to a client, all or none.
    pub fn allocate(&mut self, now_ms: u64, p: AllocParams) -> Result<Vec<Grant>, AllocError> {
        self.advance(now_ms);
        let now = self.now_ms;
        let (rate, burst, cap) = (
            self.cfg.rate_per_s,
            self.cfg.rate_burst,
            self.cfg.max_live_per_client,
        );
        let client = self.client_entry(p.mac);
        refill(
            &mut client.tokens_milli,
            &mut client.last_ms,
            now,
            rate,
            burst,
        );
        if client.tokens_milli < 1000 {
            return Err(AllocError::RateLimited);
        }
        client.tokens_milli -= 1000;
        let live = client.live;
        if p.count == 0 || p.count > self.cfg.max_per_request {
            return Err(AllocError::BadCount(p.count));
        }
        if !self.cfg.sids.contains(&p.sid) {
            return Err(AllocError::UnknownSid(p.sid));
        }
        if live.saturating_add(p.count) > cap {
            return Err(AllocError::ClientCap {
                live,
                asked: p.count,
                cap,
            });
        }
        self.check_port(&p)?;
        let mut ips = Vec::with_capacity(p.count as usize);
        let mut alias_end = u64::MAX;
        match p.family {
            Family::V4 => {
                let pool = self
                    .v4
                    .as_mut()
                    .ok_or(AllocError::FamilyNotConfigured(Family::V4))?;
                if pool.free() < u64::from(p.count) {
                    return Err(AllocError::PoolExhausted);
                }
                for _ in 0..p.count {
                    // free() >= count was checked, so every draw succeeds.
                    match pool.allocate(&mut self.rng) {
                        Some(ip) => ips.push(IpAddr::V4(ip)),
                        None => break,
                    }
                }
            }
            Family::V6 => {
                let pool = self
                    .v6
                    .as_mut()
                    .ok_or(AllocError::FamilyNotConfigured(Family::V6))?;
                let sched = self
                    .aliases
                    .as_ref()
                    .ok_or(AllocError::FamilyNotConfigured(Family::V6))?;
                alias_end = sched.current().map_or(0, |e| e.valid_until_ms);
                for _ in 0..p.count {
                    let got = sched
                        .pick(p.sid, &mut self.rng)
                        .and_then(|a| pool.allocate(a, &mut self.rng));
                    match got {
                        Some(ip) => ips.push(IpAddr::V6(ip)),
                        None => break,
                    }
                }
            }
        }
        if ips.len() < p.count as usize {
            for ip in ips {
                self.release_addr(ip);
            }
            return Err(AllocError::PoolExhausted);
        }
        let mut grants = Vec::with_capacity(ips.len());
        for ip in ips {
            let t_ip = self
                .rng
                .in_range(self.cfg.t_ip_min_ms, self.cfg.t_ip_max_ms);
            // An IPv6 lease never outlives its alias: its drain ends by the epoch's end. The
            // configuration bound makes this a no-op unless the clock jumped.
            let expires_ms = now
                .saturating_add(t_ip)
                .min(alias_end.saturating_sub(self.cfg.t_remove_ms))
                .max(now);
            let lease = Lease {
                ip,
                mac: p.mac,
                sid: p.sid,
                port: p.port,
                assigned_ms: now,
                expires_ms,
            };
            let previous = self
                .leases
                .insert(ip, LeaseEntry::new(&lease, LeaseState::Assigned));
            // The pools hand out only addresses no lease holds (restored leases are marked).
            debug_assert!(previous.is_none(), "{ip} granted while leased");
            self.timers
                .push(Reverse((expires_ms, TimerKind::Expire, ip)));
            if self.cfg.reclaim_silent_after_ms > 0 {
                let at = now.saturating_add(self.cfg.reclaim_silent_after_ms);
                self.timers.push(Reverse((at, TimerKind::Silent, ip)));
            }
            self.journal.push(JournalOp::PutLease(lease));
            self.emit(RuleUpdate::BindingAdd {
                ip,
                mac: p.mac,
                sid: p.sid,
                port: p.port,
                valid_until_ms: expires_ms.saturating_add(self.cfg.t_remove_ms),
            });
            grants.push(Grant {
                ip,
                expires_ms,
                lifetime_ms: expires_ms - now,
            });
        }
        self.client_gained(p.mac, (p.sid, p.port), p.count);
        self.stats.allocations += u64::from(p.count);
        Ok(grants)
    }

    /// Ends the lifetime of the client's addresses among `ips` now; they drain for `t_remove`.
    /// Addresses the client (MAC) does not hold, or that already ended, are ignored. Returns how
    /// many were released.
    pub fn release(&mut self, now_ms: u64, mac: Mac, ips: &[IpAddr]) -> usize {
        self.advance(now_ms);
        let mut n = 0;
        for &ip in ips {
            if self.leases.get(ip).is_some_and(|e| e.mac == mac) && self.end_at(ip, self.now_ms) {
                n += 1;
            }
        }
        self.stats.releases += n as u64;
        n
    }

    /// The access switch `sid` has seen packets from `ips` (the first from each of its
    /// bindings): their clients are not silent. Addresses it does not serve are ignored.
    /// Returns how many of `ips` it serves.
    pub fn seen(&mut self, now_ms: u64, sid: Sid, ips: &[IpAddr]) -> usize {
        self.advance(now_ms);
        let mut n = 0;
        for &ip in ips {
            let Some(mac) = self.leases.get(ip).filter(|e| e.sid == sid).map(|e| e.mac) else {
                continue;
            };
            self.client_entry(mac).seen = true;
            n += 1;
        }
        n
    }

    /// Ends the assigned lease of `ip` at `now` (at most the current time): it drains for
    /// `t_remove`. False if there is no such lease.
    fn end_at(&mut self, ip: IpAddr, now: u64) -> bool {
        let Some(entry) = self.leases.get_mut(ip) else {
            return false;
        };
        if entry.state != LeaseState::Assigned {
            return false;
        }
        entry.state = LeaseState::Draining;
        entry.expires_ms = now;
        let lease = entry.lease(ip);
        let drain_end = now.saturating_add(self.cfg.t_remove_ms);
        self.timers.push(Reverse((drain_end, TimerKind::Free, ip)));
        self.port_entry((lease.sid, lease.port)).draining += 1;
        self.journal.push(JournalOp::PutLease(lease));
        self.emit(RuleUpdate::BindingAdd {
            ip,
            mac: lease.mac,
            sid: lease.sid,
            port: lease.port,
            valid_until_ms: drain_end,
        });
        self.client_lost_one(lease.mac);
        true
    }

    /// A consistent snapshot: the sequence number it matches and the updates that rebuild the
    /// switches' state (every binding, then every valid epoch).
    pub fn snapshot(&self) -> (u64, Vec<RuleUpdate>) {
        let mut out = Vec::with_capacity(self.leases.len() + 4);
        let mut leases: Vec<(IpAddr, &LeaseEntry)> = self.leases.iter().collect();
        leases.sort_by_key(|(ip, _)| *ip);
        for (ip, e) in leases {
            out.push(RuleUpdate::BindingAdd {
                ip,
                mac: e.mac,
                sid: e.sid,
                port: e.port,
                valid_until_ms: e.expires_ms.saturating_add(self.cfg.t_remove_ms),
            });
        }
        if let Some(s) = &self.aliases {
            for e in s.valid_epochs() {
                out.push(RuleUpdate::AliasEpoch {
                    epoch: e.epoch,
                    aliases: e.aliases.clone(),
                    valid_until_ms: e.valid_until_ms,
                });
            }
        }
        (self.seq, out)
    }

    /// Takes the journal ops produced since the last call.
    pub fn take_journal(&mut self) -> Vec<JournalOp> {
        std::mem::take(&mut self.journal)
    }

    /// Takes the rule updates produced since the last call.
    pub fn take_updates(&mut self) -> Vec<Sequenced> {
        std::mem::take(&mut self.updates)
    }

    /// When the next timer (expiry, free or alias rotation) is due, if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let r = self.aliases.as_ref().map(|s| s.next_rotation_ms());
        match (t, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn emit(&mut self, update: RuleUpdate) {
        self.seq += 1;
        self.updates.push(Sequenced {
            seq: self.seq,
            update,
        });
    }

    fn release_addr(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                if let Some(p) = &mut self.v4 {
                    p.release(a);
                }
            }
            IpAddr::V6(a) => {
                if let Some(p) = &mut self.v6 {
                    p.release(a);
                }
            }
        }
    }

    fn client_entry(&mut self, mac: Mac) -> &mut Client {
        let (now, burst) = (self.now_ms, self.cfg.rate_burst);
        self.clients.entry(mac).or_insert(Client {
            live: 0,
            tokens_milli: u64::from(burst) * 1000,
            last_ms: now,
            port: None,
            seen: false,
        })
    }

    fn port_entry(&mut self, key: (Sid, u16)) -> &mut Port {
        let (now, burst) = (self.now_ms, self.cfg.new_macs_per_port_burst);
        self.ports.entry(key).or_insert(Port {
            live: 0,
            draining: 0,
            tokens_milli: u64::from(burst) * 1000,
            last_ms: now,
        })
    }

    /// Port security: a MAC new to the port takes one of the port's new-MAC tokens (taken
    /// even when the request is refused later, as the client's own are), and the port's
    /// clients may not hold more than `max_live_per_port` together. A client that comes
    /// through another port than before brings what it holds along.
    fn check_port(&mut self, p: &AllocParams) -> Result<(), AllocError> {
        let key = (p.sid, p.port);
        let (held, from) = self
            .clients
            .get(&p.mac)
            .map_or((0, None), |c| (c.live, c.port));
        let new_here = held == 0 || from != Some(key);
        let (now, rate, burst, cap) = (
            self.now_ms,
            self.cfg.new_macs_per_port_per_s,
            self.cfg.new_macs_per_port_burst,
            self.cfg.max_live_per_port,
        );
        let port = self.port_entry(key);
        refill(&mut port.tokens_milli, &mut port.last_ms, now, rate, burst);
        if new_here && port.tokens_milli < 1000 {
            self.stats.refused_port_rate += 1;
            return Err(AllocError::PortRateLimited);
        }
        if new_here {
            port.tokens_milli -= 1000;
        }
        let moving = if from == Some(key) { 0 } else { held };
        let asked = p.count.saturating_add(moving);
        let live = port.live + port.draining;
        if live.saturating_add(asked) > cap {
            self.stats.refused_port_cap += 1;
            return Err(AllocError::PortCap { live, asked, cap });
        }
        Ok(())
    }

    /// `count` addresses granted to `mac` through `port`; what it held through another port
    /// (or an unknown one, after a restore) counts against this one from now on.
    fn client_gained(&mut self, mac: Mac, port: (Sid, u16), count: u32) {
        let client = self.client_entry(mac);
        let (held, from) = (client.live, client.port);
        client.live += count;
        client.port = Some(port);
        if from != Some(port) {
            if let Some(old) = from.and_then(|k| self.ports.get_mut(&k)) {
                old.live = old.live.saturating_sub(held);
            }
            self.port_entry(port).live += held;
        }
        self.port_entry(port).live += count;
    }

    /// One of `mac`'s assigned addresses ended (expired or released).
    fn client_lost_one(&mut self, mac: Mac) {
        let client = self.client_entry(mac);
        client.live = client.live.saturating_sub(1);
        if let Some(port) = client.port.and_then(|k| self.ports.get_mut(&k)) {
            port.live = port.live.saturating_sub(1);
        }
    }
}

/// Hasher of the lease table. Its keys are addresses the CSPRNG drew uniformly, which clients
/// cannot choose, so an unkeyed multiply-rotate hash with a murmur3 finaliser spreads them as
/// well as SipHash would, at a fraction of the cost. Client MACs, which clients do choose, stay on
/// the default keyed SipHash (HashDoS).
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        // murmur3 fmix64: every input bit reaches the low bits that pick the bucket.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Refills a token bucket (`tokens_milli`, last refilled at `last_ms`) at `rate_per_s`, up to
/// `burst` tokens.
fn refill(tokens_milli: &mut u64, last_ms: &mut u64, now: u64, rate_per_s: u32, burst: u32) {
    let elapsed = now.saturating_sub(*last_ms);
    // rate_per_s tokens per second = rate_per_s milli-tokens per millisecond.
    *tokens_milli = tokens_milli
        .saturating_add(elapsed.saturating_mul(u64::from(rate_per_s)))
        .min(u64::from(burst) * 1000);
    *last_ms = (*last_ms).max(now);
}

fn validate(cfg: &Config) -> Result<(), ConfigError> {
    if cfg.t_ip_min_ms == 0 || cfg.t_ip_min_ms > cfg.t_ip_max_ms {
        return Err(ConfigError::Lifetime {
            min: cfg.t_ip_min_ms,
            max: cfg.t_ip_max_ms,
        });
    }
    for (v, name) in [
        (cfg.max_per_request, "max_per_request"),
        (cfg.max_live_per_client, "max_live_per_client"),
        (cfg.rate_per_s, "rate_per_s"),
        (cfg.rate_burst, "rate_burst"),
        (cfg.max_live_per_port, "max_live_per_port"),
        (cfg.new_macs_per_port_per_s, "new_macs_per_port_per_s"),
        (cfg.new_macs_per_port_burst, "new_macs_per_port_burst"),
    ] {
        if v == 0 {
            return Err(ConfigError::Zero(name));
        }
    }
    if cfg.ipv4.is_none() && cfg.ipv6.is_none() {
        return Err(ConfigError::NoPool);
    }
    if cfg.sids.is_empty() {
        return Err(ConfigError::NoSids);
    }
    if let Some(c) = &cfg.ipv6 {
        let have = c.t_sid_ms.saturating_mul(u64::from(c.k));
        let need = c
            .t_sid_ms
            .saturating_add(cfg.t_ip_max_ms)
            .saturating_add(cfg.t_remove_ms);
        if c.k > 0 && c.t_sid_ms > 0 && need > have {
            return Err(ConfigError::AliasOutlived { need, have });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn v4_config(prefix: &str) -> Config {
        Config {
            t_ip_min_ms: 1_000,
            t_ip_max_ms: 2_000,
            t_remove_ms: 500,
            max_per_request: 16,
            max_live_per_client: 64,
            rate_per_s: 1000,
            rate_burst: 1000,
            max_live_per_port: u32::MAX,
            new_macs_per_port_per_s: u32::MAX / 1000,
            new_macs_per_port_burst: u32::MAX / 1000,
            reclaim_silent_after_ms: 0,
            sids: vec![1, 2],
            ipv4: Some(V4Config {
                prefixes: vec![prefix.parse().unwrap()],
                reserved: vec![],
            }),
            ipv6: None,
        }
    }

    fn req(mac: u8, count: u32) -> AllocParams {
        AllocParams {
            mac: Mac([2, 0, 0, 0, 0, mac]),
            sid: 1,
            port: 1,
            family: Family::V4,
            count,
        }
    }

    fn on_port(mac: u8, port: u16, count: u32) -> AllocParams {
        AllocParams {
            port,
            ..req(mac, count)
        }
    }

    #[test]
    fn leases_of_a_client_that_sent_nothing_end_early_and_those_of_one_that_did_do_not() {
        let mut cfg = v4_config("10.0.0.0/24");
        (cfg.t_ip_min_ms, cfg.t_ip_max_ms) = (60_000, 60_000);
        cfg.reclaim_silent_after_ms = 3_000;
        let mut a = Allocator::new(cfg).unwrap();
        let silent = a.allocate(10_000, req(1, 2)).unwrap();
        let talker = a.allocate(10_000, req(2, 2)).unwrap();
        // The switch saw the talker's first address only (and ignores what it does not serve).
        assert_eq!(
            a.seen(11_000, 1, &[talker[0].ip, "10.9.9.9".parse().unwrap()]),
            1
        );
        assert_eq!(
            a.seen(11_000, 2, &[silent[0].ip]),
            0,
            "another switch's report"
        );
        a.take_updates();
        a.advance(12_999);
        assert_eq!(a.stats().reclaimed_silent, 0);
        a.advance(13_000);
        assert_eq!(a.stats().reclaimed_silent, 2);
        for g in &silent {
            assert_eq!(a.lease(g.ip).unwrap().1, LeaseState::Draining);
        }
        for g in &talker {
            assert_eq!(a.lease(g.ip).unwrap().1, LeaseState::Assigned);
        }
        // The switches hear of it as of a release: the binding drains for t_remove.
        let mut drained: Vec<IpAddr> = a
            .take_updates()
            .into_iter()
            .filter_map(|u| match u.update {
                RuleUpdate::BindingAdd {
                    ip,
                    valid_until_ms: 13_500,
                    ..
                } => Some(ip),
                _ => None,
            })
            .collect();
        drained.sort();
        let mut want: Vec<IpAddr> = silent.iter().map(|g| g.ip).collect();
        want.sort();
        assert_eq!(drained, want);
        a.advance(13_500);
        assert!(a.lease(silent[0].ip).is_none());
        // A later grant to a client already seen is never reclaimed; the client that was
        // reclaimed holds nothing now and may ask again.
        assert_eq!(a.allocate(14_000, req(2, 1)).unwrap().len(), 1);
        assert_eq!(a.allocate(14_000, req(1, 2)).unwrap().len(), 2);
        a.advance(30_000);
        assert_eq!(a.stats().reclaimed_silent, 4);
        assert_eq!(a.lease_count(), 3);
    }

    #[test]
    fn one_port_rotating_macs_gets_its_cap_and_another_port_still_gets_addresses() {
        let mut cfg = v4_config("10.0.0.0/24");
        cfg.max_live_per_port = 10;
        let mut a = Allocator::new(cfg).unwrap();
        // 100 MACs, one address each, all through port 1: ten are granted.
        let granted = (0..100u8)
            .filter(|&m| a.allocate(10_000, on_port(m, 1, 1)).is_ok())
            .count();
        assert_eq!(granted, 10);
        assert_eq!(
            a.allocate(10_000, on_port(200, 1, 1)),
            Err(AllocError::PortCap {
                live: 10,
                asked: 1,
                cap: 10
            })
        );
        assert_eq!(a.stats().refused_port_cap, 91);
        // A client behind port 2 is not starved, and its bindings name its port (where the
        // switch delivers its traffic, and the only port it accepts it from).
        a.take_updates();
        assert_eq!(a.allocate(10_000, on_port(201, 2, 4)).unwrap().len(), 4);
        let ports: Vec<u16> = a
            .take_updates()
            .into_iter()
            .filter_map(|u| match u.update {
                RuleUpdate::BindingAdd { port, .. } => Some(port),
                _ => None,
            })
            .collect();
        assert_eq!(ports, [2; 4]);
        assert!(a.snapshot().1.iter().all(|u| !matches!(
            u,
            RuleUpdate::BindingAdd { mac, port, .. } if mac.0[5] == 201 && *port != 2
        )));
        // Once port 1's leases end, its clients get addresses again.
        assert!(a.allocate(20_000, on_port(202, 1, 8)).is_ok());
    }

    #[test]
    fn new_macs_on_a_port_are_rate_limited_and_its_known_clients_are_not() {
        let mut cfg = v4_config("10.0.0.0/24");
        cfg.new_macs_per_port_per_s = 2;
        cfg.new_macs_per_port_burst = 3;
        let mut a = Allocator::new(cfg).unwrap();
        for m in 0..3 {
            a.allocate(10_000, on_port(m, 1, 1)).unwrap();
        }
        assert_eq!(
            a.allocate(10_000, on_port(3, 1, 1)),
            Err(AllocError::PortRateLimited)
        );
        assert_eq!(a.stats().refused_port_rate, 1);
        // A client already holding addresses through the port is not new there.
        a.allocate(10_000, on_port(0, 1, 1)).unwrap();
        // Another port has its own bucket.
        a.allocate(10_000, on_port(3, 2, 1)).unwrap();
        // Half a second refills one token at 2 per second.
        a.allocate(10_500, on_port(4, 1, 1)).unwrap();
        assert_eq!(
            a.allocate(10_500, on_port(5, 1, 1)),
            Err(AllocError::PortRateLimited)
        );
    }

    #[test]
    fn a_client_that_moves_to_another_port_takes_what_it_holds_along() {
        let mut cfg = v4_config("10.0.0.0/24");
        cfg.max_live_per_port = 6;
        let mut a = Allocator::new(cfg).unwrap();
        a.allocate(10_000, on_port(1, 1, 4)).unwrap();
        // Through port 2 it would hold 4 + 3 there: over the cap of 6.
        assert_eq!(
            a.allocate(10_000, on_port(1, 2, 3)),
            Err(AllocError::PortCap {
                live: 0,
                asked: 7,
                cap: 6
            })
        );
        a.allocate(10_000, on_port(1, 2, 2)).unwrap();
        // Port 1 is free again, port 2 holds its 6.
        a.allocate(10_000, on_port(2, 1, 6)).unwrap();
        assert!(matches!(
            a.allocate(10_000, on_port(3, 2, 1)),
            Err(AllocError::PortCap { live: 6, .. })
        ));
    }

    #[test]
    fn lease_lifecycle_assigned_draining_free() {
        let mut a = Allocator::new(v4_config("10.0.0.0/24")).unwrap();
        a.take_updates();
        let g = a.allocate(10_000, req(1, 1)).unwrap()[0];
        assert!((11_000..=12_000).contains(&g.expires_ms));
        assert_eq!(a.lease(g.ip).unwrap().1, LeaseState::Assigned);
        let ups = a.take_updates();
        assert!(
            matches!(&ups[..], [Sequenced { seq: 1, update: RuleUpdate::BindingAdd { valid_until_ms, .. } }] if *valid_until_ms == g.expires_ms + 500)
        );
        a.advance(g.expires_ms);
        assert_eq!(a.lease(g.ip).unwrap().1, LeaseState::Draining);
        a.advance(g.expires_ms + 499);
        assert!(a.lease(g.ip).is_some());
        assert!(a.take_updates().is_empty());
        a.advance(g.expires_ms + 500);
        assert!(a.lease(g.ip).is_none());
        assert_eq!(
            a.take_updates(),
            vec![Sequenced {
                seq: 2,
                update: RuleUpdate::BindingRemove { ip: g.ip }
            }]
        );
        assert_eq!(a.take_journal().last(), Some(&JournalOp::DeleteLease(g.ip)));
        assert_eq!(a.stats().expiries, 1);
        assert_eq!(a.stats().freed, 1);
    }

    #[test]
    fn exhausted_pool_refuses_whole_request_and_changes_nothing() {
        let mut a = Allocator::new(v4_config("10.0.0.0/29")).unwrap();
        assert_eq!(a.allocate(0, req(1, 4)).unwrap().len(), 4);
        a.take_journal();
        assert_eq!(a.allocate(0, req(2, 3)), Err(AllocError::PoolExhausted));
        assert!(a.take_journal().is_empty());
        assert_eq!(a.allocate(0, req(2, 2)).unwrap().len(), 2);
        assert_eq!(a.allocate(0, req(3, 1)), Err(AllocError::PoolExhausted));
    }

    #[test]
    fn client_cap_counts_assigned_not_draining() {
        let mut cfg = v4_config("10.0.0.0/24");
        cfg.max_live_per_client = 3;
        let mut a = Allocator::new(cfg).unwrap();
        let g = a.allocate(0, req(1, 3)).unwrap();
        assert_eq!(
            a.allocate(0, req(1, 1)),
            Err(AllocError::ClientCap {
                live: 3,
                asked: 1,
                cap: 3
            })
        );
        assert!(a.allocate(0, req(2, 1)).is_ok(), "other clients unaffected");
        assert_eq!(
            a.release(1, Mac([2, 0, 0, 0, 0, 9]), &[g[0].ip]),
            0,
            "not the owner"
        );
        assert_eq!(a.release(1, req(1, 0).mac, &[g[0].ip, g[0].ip]), 1);
        assert_eq!(a.lease(g[0].ip).unwrap().1, LeaseState::Draining);
        assert!(a.allocate(2, req(1, 1)).is_ok());
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let mut cfg = v4_config("10.0.0.0/16");
        cfg.rate_per_s = 2;
        cfg.rate_burst = 3;
        let mut a = Allocator::new(cfg).unwrap();
        for _ in 0..3 {
            a.allocate(0, req(1, 1)).unwrap();
        }
        assert_eq!(a.allocate(0, req(1, 1)), Err(AllocError::RateLimited));
        assert!(a.allocate(0, req(2, 1)).is_ok());
        assert_eq!(a.allocate(499, req(1, 1)), Err(AllocError::RateLimited));
        assert!(
            a.allocate(500, req(1, 1)).is_ok(),
            "one token after 500 ms at 2/s"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut a = Allocator::new(v4_config("10.0.0.0/24")).unwrap();
        assert_eq!(a.allocate(0, req(1, 0)), Err(AllocError::BadCount(0)));
        assert_eq!(a.allocate(0, req(1, 17)), Err(AllocError::BadCount(17)));
        let mut r = req(1, 1);
        r.sid = 77;
        assert_eq!(a.allocate(0, r), Err(AllocError::UnknownSid(77)));
        r.sid = 1;
        r.family = Family::V6;
        assert_eq!(
            a.allocate(0, r),
            Err(AllocError::FamilyNotConfigured(Family::V6))
        );
    }

    #[test]
    fn config_errors_name_the_problem() {
        let mut c = v4_config("10.0.0.0/24");
        c.t_ip_min_ms = 5000;
        assert!(matches!(
            Allocator::new(c).unwrap_err(),
            ConfigError::Lifetime { .. }
        ));
        let mut c = v4_config("10.0.0.0/24");
        c.ipv6 = Some(V6Config {
            prefix: "2001:db8::/64".parse().unwrap(),
            alias_bits: 16,
            aliases_per_sid: 4,
            k: 2,
            t_sid_ms: 1000,
        });
        // (k-1)·t_sid = 1000 < t_ip_max + t_remove = 2500
        let e = Allocator::new(c.clone()).unwrap_err();
        assert!(
            e.to_string().contains("(k-1)·t_sid >= t_ip_max + t_remove"),
            "{e}"
        );
        c.ipv6.as_mut().unwrap().k = 4;
        assert!(Allocator::new(c.clone()).is_ok());
        c.ipv6.as_mut().unwrap().aliases_per_sid = 10_000;
        let e = Allocator::new(c).unwrap_err();
        assert!(e.to_string().contains("SIDs·n·k < 2^a"), "{e}");
    }

    #[test]
    fn v6_addresses_use_the_newest_alias_of_the_sid_and_never_outlive_it() {
        let mut c = v4_config("10.0.0.0/24");
        c.ipv6 = Some(V6Config {
            prefix: "2001:db8::/64".parse().unwrap(),
            alias_bits: 16,
            aliases_per_sid: 4,
            k: 4,
            t_sid_ms: 1000,
        });
        let mut a = Allocator::new(c).unwrap();
        let first = a.take_updates();
        assert!(matches!(
            first[0].update,
            RuleUpdate::AliasEpoch { epoch: 1, .. }
        ));
        for t in (0..10_000).step_by(250) {
            let mut r = req(1, 2);
            r.family = Family::V6;
            r.sid = 2;
            for g in a.allocate(t, r).unwrap() {
                let IpAddr::V6(ip) = g.ip else {
                    panic!("v4 address for a v6 request")
                };
                let alias = a.v6_pool().unwrap().alias_of(ip);
                let cur = a.aliases().unwrap().current().unwrap();
                assert!(cur
                    .aliases
                    .iter()
                    .find(|(s, _)| *s == 2)
                    .unwrap()
                    .1
                    .contains(&alias));
                assert!(g.expires_ms + 500 <= cur.valid_until_ms);
            }
            a.release(t, r.mac, &a.leases().map(|(l, _)| l.ip).collect::<Vec<_>>());
        }
    }

    #[test]
    fn restore_keeps_live_leases_and_drops_ended_ones() {
        let mut a = Allocator::new(v4_config("10.0.0.0/28")).unwrap();
        let g = a.allocate(0, req(1, 5)).unwrap();
        let leases: Vec<Lease> = a.leases().map(|(l, _)| l).collect();
        let earliest = g.iter().map(|g| g.expires_ms).min().unwrap();
        // Restart just after the earliest lease drained.
        let now = earliest + 500;
        let mut b = Allocator::restore(
            v4_config("10.0.0.0/28"),
            Loaded {
                leases: leases.clone(),
                epochs: vec![],
            },
            now,
        )
        .unwrap();
        let gone: Vec<_> = b.take_journal();
        assert!(gone.contains(&JournalOp::DeleteLease(
            g.iter().find(|g| g.expires_ms == earliest).unwrap().ip
        )));
        assert!(b.stats().expired_while_down >= 1);
        let restored = b.lease_count();
        assert_eq!(b.v4_pool().unwrap().in_use() as usize, restored);
        let (_, snap) = b.snapshot();
        assert_eq!(
            snap.len(),
            restored,
            "every live binding is in the snapshot"
        );
        assert!(snap
            .iter()
            .all(|u| matches!(u, RuleUpdate::BindingAdd { ip, .. } if b.lease(*ip).is_some())));
        // The remaining free addresses are exactly the pool minus restored leases.
        let more = b.allocate(now, req(2, (14 - restored) as u32)).unwrap();
        for m in &more {
            assert!(b.lease(m.ip).unwrap().0.mac == req(2, 0).mac);
        }
        assert_eq!(b.allocate(now, req(3, 1)), Err(AllocError::PoolExhausted));
    }

    #[test]
    fn a_stored_lease_on_a_now_reserved_address_never_frees_the_reservation() {
        let gw: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let stored = Lease {
            ip: IpAddr::V4(gw),
            mac: Mac([2, 0, 0, 0, 0, 1]),
            sid: 1,
            port: 0,
            assigned_ms: 0,
            expires_ms: 1_000,
        };
        let mut cfg = v4_config("10.0.0.0/29");
        cfg.ipv4.as_mut().unwrap().reserved = vec![gw];
        let mut a = Allocator::restore(
            cfg,
            Loaded {
                leases: vec![stored],
                epochs: vec![],
            },
            0,
        )
        .unwrap();
        assert!(
            a.lease(IpAddr::V4(gw)).is_some(),
            "the lease is honoured until it drains"
        );
        a.advance(2_000);
        assert!(a.lease(IpAddr::V4(gw)).is_none());
        let all = a.allocate(2_000, req(2, 5)).unwrap();
        assert!(
            all.iter().all(|g| g.ip != IpAddr::V4(gw)),
            "the reserved gateway is never handed out"
        );
        assert_eq!(a.allocate(2_000, req(3, 1)), Err(AllocError::PoolExhausted));
    }
}
