//! Address pools: which addresses exist, which are free, and a uniform random pick among the free.
//!
//! # IPv4: bitmap + lazily built dense free list
//!
//! An IPv4 pool is one or more prefixes (network and broadcast addresses of prefixes up to /30
//! are never handed out, nor are the configured `reserved` addresses). Every address has an index
//! in `[0, size)`; a bitmap (1 bit per address: 2 MiB for a /8) records which are in use.
//!
//! * While at most 3/4 of the pool is in use, [`V4Pool::allocate`] draws an index uniformly and
//!   retries if it is taken (rejection sampling): at most 4 expected draws, no extra memory.
//! * Above 3/4 the pool builds a dense list of the free indices (one scan of the bitmap) and from
//!   then on picks a uniform position in the list and swap-removes it: O(1) exactly, at 99 % as
//!   at 76 %. Freed addresses are pushed onto the list. The list is dropped again when more than
//!   half of the pool is free, so it never holds more than size/2 entries (32 MiB for a /8, 2 bytes
//!   per address) and exists only while the pool is busy.
//!
//! The hysteresis between 1/4 and 1/2 free means at least size/4 operations separate two
//! rebuilds, so the O(size/64) scan is amortised O(1) per operation. Both modes pick uniformly
//! among the free addresses, so the distribution does not depend on the mode.
//!
//! # IPv6: prefix | alias | random
//!
//! An IPv6 address is `P | alias (a bits) | random` (ARCHITECTURE §4). The random part has at
//! least 16 bits (the configuration is refused otherwise) and the pool is sparse in practice
//! (2^48 random values per alias in a /64 with a = 16), so allocation draws the random bits and
//! rejects a value already in use (a hash set of in-use addresses), up to
//! [`V6_MAX_DRAWS`] times before reporting the alias full.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::rng::Csprng;

/// Draws before an IPv6 allocation reports the alias's space as exhausted. With 16 random bits
/// and 90 % of them in use, 64 draws all fail with probability 0.9^64 ≈ 0.1 %.
pub const V6_MAX_DRAWS: u32 = 64;

/// An IPv4 prefix, e.g. `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Prefix {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

/// An IPv6 prefix, e.g. `2001:db8::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Prefix {
    /// Network address (host bits zero).
    pub addr: Ipv6Addr,
    /// Prefix length, 0..=128.
    pub len: u8,
}

/// Why a prefix string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixParseError {
    /// No `/len` part.
    #[error("`{0}` is not a prefix: expected ADDRESS/LENGTH")]
    MissingLength(String),
    /// The address part is not an address of the family.
    #[error("`{0}` is not a valid address")]
    BadAddress(String),
    /// The length is not a number within the family's width.
    #[error("`{0}` is not a valid prefix length (0..={1})")]
    BadLength(String, u8),
    /// Bits are set after the prefix length.
    #[error("`{0}` has host bits set; did you mean {1}?")]
    HostBitsSet(String, String),
}

impl std::str::FromStr for Ipv4Prefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| PrefixParseError::MissingLength(s.into()))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| PrefixParseError::BadAddress(a.into()))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|&l| l <= 32)
            .ok_or_else(|| PrefixParseError::BadLength(l.into(), 32))?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let net = u32::from(addr) & mask;
        if net != u32::from(addr) {
            return Err(PrefixParseError::HostBitsSet(
                s.into(),
                format!("{}/{len}", Ipv4Addr::from(net)),
            ));
        }
        Ok(Ipv4Prefix { addr, len })
    }
}

impl std::str::FromStr for Ipv6Prefix {
    type Err = PrefixParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| PrefixParseError::MissingLength(s.into()))?;
        let addr: Ipv6Addr = a
            .parse()
            .map_err(|_| PrefixParseError::BadAddress(a.into()))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|&l| l <= 128)
            .ok_or_else(|| PrefixParseError::BadLength(l.into(), 128))?;
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        let net = u128::from(addr) & mask;
        if net != u128::from(addr) {
            return Err(PrefixParseError::HostBitsSet(
                s.into(),
                format!("{}/{len}", Ipv6Addr::from(net)),
            ));
        }
        Ok(Ipv6Prefix { addr, len })
    }
}

impl std::fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a pool could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No prefix was given.
    #[error("the IPv4 pool has no prefixes")]
    Empty,
    /// Two prefixes share addresses.
    #[error("IPv4 prefixes {0} and {1} overlap")]
    Overlap(Ipv4Prefix, Ipv4Prefix),
    /// A reserved address is outside every prefix.
    #[error("reserved address {0} is not inside any pool prefix")]
    ReservedOutside(Ipv4Addr),
    /// Every address is reserved (or the prefixes have no usable host).
    #[error("the IPv4 pool has no usable addresses")]
    NoUsableAddress,
    /// IPv6 alias width outside 1..=24.
    #[error("alias_bits = {0}: must be between 1 and 24")]
    AliasBits(u8),
    /// IPv6 layout leaves too few random bits.
    #[error("IPv6 prefix /{prefix_len} with {alias_bits} alias bits leaves {random_bits} random bits; at least 16 are required (prefix_len + alias_bits <= 112)")]
    TooFewRandomBits {
        /// Prefix length.
        prefix_len: u8,
        /// Alias bits.
        alias_bits: u8,
        /// What is left.
        random_bits: u8,
    },
}

#[derive(Debug, Clone, Copy)]
struct Range {
    /// First usable address.
    first: u32,
    /// Number of usable addresses.
    len: u32,
    /// Index of `first` in the pool's index space.
    offset: u64,
}

/// An IPv4 address pool (see the module docs for the data structure).
#[derive(Debug)]
pub struct V4Pool {
    prefixes: Vec<Ipv4Prefix>,
    ranges: Vec<Range>,
    size: u64,
    /// Bit set: in use (assigned, draining or reserved).
    used: Vec<u64>,
    free_count: u64,
    reserved_count: u64,
    /// Reserved indices, sorted: never freed, whatever a caller (or a stored lease) says.
    reserved: Vec<u64>,
    /// Free indices, present only while the pool is dense (see module docs).
    dense: Option<Vec<u32>>,
}

impl V4Pool {
    /// A pool over `prefixes`, never handing out `reserved`.
    pub fn new(prefixes: &[Ipv4Prefix], reserved: &[Ipv4Addr]) -> Result<Self, PoolError> {
        if prefixes.is_empty() {
            return Err(PoolError::Empty);
        }
        let mut sorted = prefixes.to_vec();
        sorted.sort_by_key(|p| (u32::from(p.addr), p.len));
        for w in sorted.windows(2) {
            let end0 = u64::from(u32::from(w[0].addr)) + (1u64 << (32 - w[0].len));
            if u64::from(u32::from(w[1].addr)) < end0 {
                return Err(PoolError::Overlap(w[0], w[1]));
            }
        }
        let mut ranges = Vec::with_capacity(sorted.len());
        let mut offset = 0u64;
        for p in &sorted {
            let base = u64::from(u32::from(p.addr));
            let span = 1u64 << (32 - p.len);
            // Network and broadcast addresses are not host addresses on prefixes up to /30.
            let (first, len) = if p.len <= 30 {
                (base + 1, span - 2)
            } else {
                (base, span)
            };
            // first + len <= 2^32, so both fit in u32 except len == 2^32 (impossible: /0 gives
            // 2^32 - 2).
            ranges.push(Range {
                first: first as u32,
                len: len as u32,
                offset,
            });
            offset += len;
        }
        let size = offset;
        let words = size.div_ceil(64) as usize;
        let mut pool = V4Pool {
            prefixes: sorted,
            ranges,
            size,
            used: vec![0u64; words],
            free_count: size,
            reserved_count: 0,
            reserved: Vec::with_capacity(reserved.len()),
            dense: None,
        };
        for &r in reserved {
            let idx = pool.index_of(r).ok_or(PoolError::ReservedOutside(r))?;
            if pool.set_used(idx) {
                pool.free_count -= 1;
                pool.reserved_count += 1;
                pool.reserved.push(idx);
            }
        }
        pool.reserved.sort_unstable();
        if pool.free_count == 0 {
            return Err(PoolError::NoUsableAddress);
        }
        Ok(pool)
    }

    /// The configured prefixes, sorted.
    pub fn prefixes(&self) -> &[Ipv4Prefix] {
        &self.prefixes
    }

    /// Usable addresses (excluding network/broadcast, including reserved ones).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Addresses available to clients (size minus reserved).
    pub fn capacity(&self) -> u64 {
        self.size - self.reserved_count
    }

    /// Free addresses.
    pub fn free(&self) -> u64 {
        self.free_count
    }

    /// Addresses assigned or draining.
    pub fn in_use(&self) -> u64 {
        self.capacity() - self.free_count
    }

    /// Whether the dense free list is currently built (for tests and metrics).
    pub fn is_dense(&self) -> bool {
        self.dense.is_some()
    }

    /// Whether `addr` is a usable address of this pool.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.index_of(addr).is_some()
    }

    /// Whether `addr` is in the pool and free.
    pub fn is_free(&self, addr: Ipv4Addr) -> bool {
        self.index_of(addr).is_some_and(|i| !self.is_used(i))
    }

    /// Picks a free address uniformly at random and marks it in use; `None` if none is free.
    pub fn allocate(&mut self, rng: &mut Csprng) -> Option<Ipv4Addr> {
        if self.free_count == 0 {
            return None;
        }
        if self.dense.is_none() && self.free_count * 4 < self.size {
            self.build_dense();
        }
        let idx = if let Some(list) = &mut self.dense {
            let pos = rng.below(list.len() as u64) as usize;
            // pos < list.len() by `below`; the list is non-empty because free_count > 0 and the
            // list holds exactly the free indices while it exists.
            list.swap_remove(pos) as u64
        } else {
            loop {
                let i = rng.below(self.size);
                if !self.is_used(i) {
                    break i;
                }
            }
        };
        self.set_used(idx);
        self.free_count -= 1;
        Some(self.addr_of(idx))
    }

    /// Marks a specific address in use (restoring leases after a restart). Returns false if it is
    /// outside the pool or already in use.
    pub fn mark_used(&mut self, addr: Ipv4Addr) -> bool {
        let Some(idx) = self.index_of(addr) else {
            return false;
        };
        if !self.set_used(idx) {
            return false;
        }
        self.free_count -= 1;
        // The dense list would now hold a used index; drop it, the next allocation rebuilds it.
        self.dense = None;
        true
    }

    /// Returns an address to the pool. Returns false if it is outside the pool, reserved or
    /// already free.
    pub fn release(&mut self, addr: Ipv4Addr) -> bool {
        let Some(idx) = self.index_of(addr) else {
            return false;
        };
        if !self.is_used(idx) || self.reserved.binary_search(&idx).is_ok() {
            return false;
        }
        self.used[(idx / 64) as usize] &= !(1u64 << (idx % 64));
        self.free_count += 1;
        if self.free_count * 2 > self.size {
            self.dense = None;
        } else if let Some(list) = &mut self.dense {
            list.push(idx as u32);
        }
        true
    }

    fn build_dense(&mut self) {
        let mut list = Vec::with_capacity(self.free_count as usize);
        for (w, &word) in self.used.iter().enumerate() {
            let mut free = !word;
            while free != 0 {
                let bit = free.trailing_zeros() as u64;
                let idx = w as u64 * 64 + bit;
                if idx >= self.size {
                    break;
                }
                list.push(idx as u32);
                free &= free - 1;
            }
        }
        debug_assert_eq!(list.len() as u64, self.free_count);
        self.dense = Some(list);
    }

    fn is_used(&self, idx: u64) -> bool {
        self.used[(idx / 64) as usize] & (1u64 << (idx % 64)) != 0
    }

    /// Sets the bit; returns whether it was clear.
    fn set_used(&mut self, idx: u64) -> bool {
        let w = &mut self.used[(idx / 64) as usize];
        let bit = 1u64 << (idx % 64);
        let was_clear = *w & bit == 0;
        *w |= bit;
        was_clear
    }

    fn index_of(&self, addr: Ipv4Addr) -> Option<u64> {
        let a = u32::from(addr);
        let pos = self.ranges.partition_point(|r| r.first <= a);
        let r = self.ranges.get(pos.checked_sub(1)?)?;
        let delta = a - r.first;
        (delta < r.len).then(|| r.offset + u64::from(delta))
    }

    fn addr_of(&self, idx: u64) -> Ipv4Addr {
        let pos = self.ranges.partition_point(|r| r.offset <= idx);
        // idx < size, and ranges[0].offset == 0, so pos >= 1.
        let r = &self.ranges[pos - 1];
        Ipv4Addr::from(r.first + (idx - r.offset) as u32)
    }
}

/// An IPv6 pool: `prefix | alias | random` addresses (see the module docs).
#[derive(Debug)]
pub struct V6Pool {
    prefix: Ipv6Prefix,
    alias_bits: u8,
    random_bits: u8,
    used: HashSet<u128>,
}

impl V6Pool {
    /// A pool over `prefix` with `alias_bits` of alias after it.
    pub fn new(prefix: Ipv6Prefix, alias_bits: u8) -> Result<Self, PoolError> {
        if !(1..=24).contains(&alias_bits) {
            return Err(PoolError::AliasBits(alias_bits));
        }
        let taken = u16::from(prefix.len) + u16::from(alias_bits);
        if taken > 112 {
            return Err(PoolError::TooFewRandomBits {
                prefix_len: prefix.len,
                alias_bits,
                random_bits: 128u16.saturating_sub(taken) as u8,
            });
        }
        Ok(V6Pool {
            prefix,
            alias_bits,
            random_bits: (128 - taken) as u8,
            used: HashSet::new(),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> Ipv6Prefix {
        self.prefix
    }

    /// Random bits per address.
    pub fn random_bits(&self) -> u8 {
        self.random_bits
    }

    /// Addresses assigned or draining.
    pub fn in_use(&self) -> u64 {
        self.used.len() as u64
    }

    /// Whether `addr` is inside the prefix.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        let mask = if self.prefix.len == 0 {
            0
        } else {
            u128::MAX << (128 - self.prefix.len)
        };
        u128::from(addr) & mask == u128::from(self.prefix.addr)
    }

    /// The alias encoded in `addr` (whether or not it is in the prefix).
    pub fn alias_of(&self, addr: Ipv6Addr) -> u32 {
        let a = u128::from(addr) >> self.random_bits;
        (a & ((1u128 << self.alias_bits) - 1)) as u32
    }

    /// Draws a free address carrying `alias`, marks it in use. `None` if [`V6_MAX_DRAWS`] draws
    /// all hit used addresses.
    pub fn allocate(&mut self, alias: u32, rng: &mut Csprng) -> Option<Ipv6Addr> {
        let base = u128::from(self.prefix.addr) | (u128::from(alias) << self.random_bits);
        let mask = (1u128 << self.random_bits) - 1;
        for _ in 0..V6_MAX_DRAWS {
            let a = base | (rng.next_u128() & mask);
            if self.used.insert(a) {
                return Some(Ipv6Addr::from(a));
            }
        }
        None
    }

    /// Marks `addr` in use; false if it was already.
    pub fn mark_used(&mut self, addr: Ipv6Addr) -> bool {
        self.used.insert(u128::from(addr))
    }

    /// Returns `addr` to the pool; false if it was not in use.
    pub fn release(&mut self, addr: Ipv6Addr) -> bool {
        self.used.remove(&u128::from(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p4(s: &str) -> Ipv4Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn prefix_parse_errors_are_clear() {
        assert!(matches!(
            "10.0.0.0".parse::<Ipv4Prefix>(),
            Err(PrefixParseError::MissingLength(_))
        ));
        assert!(
            matches!("10.0.0.1/24".parse::<Ipv4Prefix>(), Err(PrefixParseError::HostBitsSet(_, s)) if s == "10.0.0.0/24")
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Prefix>(),
            Err(PrefixParseError::BadLength(..))
        ));
        assert!(matches!(
            "x/8".parse::<Ipv4Prefix>(),
            Err(PrefixParseError::BadAddress(_))
        ));
        assert_eq!("2001:db8::/64".parse::<Ipv6Prefix>().unwrap().len, 64);
        assert!(matches!(
            "2001:db8::1/64".parse::<Ipv6Prefix>(),
            Err(PrefixParseError::HostBitsSet(..))
        ));
    }

    #[test]
    fn small_pool_hands_out_every_host_once_then_nothing() {
        let mut rng = Csprng::new().unwrap();
        let mut pool = V4Pool::new(&[p4("192.0.2.0/29")], &[Ipv4Addr::new(192, 0, 2, 1)]).unwrap();
        assert_eq!(pool.size(), 6);
        assert_eq!(pool.capacity(), 5);
        let mut got: Vec<Ipv4Addr> = (0..5).map(|_| pool.allocate(&mut rng).unwrap()).collect();
        assert_eq!(pool.allocate(&mut rng), None);
        got.sort();
        let want: Vec<Ipv4Addr> = (2..=6).map(|h| Ipv4Addr::new(192, 0, 2, h)).collect();
        assert_eq!(got, want, "no network, broadcast or reserved address");
        assert!(pool.release(got[0]));
        assert!(!pool.release(got[0]), "double release is refused");
        assert!(
            !pool.release(Ipv4Addr::new(192, 0, 2, 1)),
            "a reserved address is never freed"
        );
        assert!(!pool.mark_used(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(pool.allocate(&mut rng), Some(got[0]));
    }

    #[test]
    fn overlapping_or_empty_pools_are_refused() {
        assert_eq!(V4Pool::new(&[], &[]).unwrap_err(), PoolError::Empty);
        assert!(matches!(
            V4Pool::new(&[p4("10.0.0.0/8"), p4("10.1.0.0/16")], &[]),
            Err(PoolError::Overlap(..))
        ));
        assert!(matches!(
            V4Pool::new(&[p4("10.0.0.0/30")], &[Ipv4Addr::new(10, 0, 0, 9)]),
            Err(PoolError::ReservedOutside(_))
        ));
        assert_eq!(
            V4Pool::new(&[p4("10.0.0.0/32")], &[Ipv4Addr::new(10, 0, 0, 0)]).unwrap_err(),
            PoolError::NoUsableAddress
        );
    }

    #[test]
    fn multi_prefix_pool_maps_indices_across_prefixes() {
        let mut rng = Csprng::new().unwrap();
        let mut pool = V4Pool::new(
            &[p4("10.0.1.0/31"), p4("10.0.0.0/30"), p4("10.9.9.9/32")],
            &[],
        )
        .unwrap();
        assert_eq!(pool.size(), 2 + 2 + 1);
        let mut got: Vec<Ipv4Addr> = std::iter::from_fn(|| pool.allocate(&mut rng)).collect();
        got.sort();
        let want: Vec<Ipv4Addr> = ["10.0.0.1", "10.0.0.2", "10.0.1.0", "10.0.1.1", "10.9.9.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn dense_mode_builds_above_three_quarters_and_drops_below_half() {
        let mut rng = Csprng::new().unwrap();
        let mut pool = V4Pool::new(&[p4("10.0.0.0/20")], &[]).unwrap();
        let n = pool.size();
        let mut held = Vec::new();
        while pool.free() * 4 >= n {
            held.push(pool.allocate(&mut rng).unwrap());
        }
        assert!(!pool.is_dense());
        held.push(pool.allocate(&mut rng).unwrap());
        assert!(pool.is_dense());
        // Fill completely in dense mode: every address exactly once.
        while let Some(a) = pool.allocate(&mut rng) {
            held.push(a);
        }
        let distinct: HashSet<_> = held.iter().collect();
        assert_eq!(distinct.len() as u64, n);
        // Free down to half: list kept until more than half is free.
        while pool.free() * 2 <= n {
            assert!(pool.is_dense());
            assert!(pool.release(held.pop().unwrap()));
        }
        assert!(!pool.is_dense());
    }

    #[test]
    fn mark_used_after_dense_rebuilds_correctly() {
        let mut rng = Csprng::new().unwrap();
        let mut pool = V4Pool::new(&[p4("10.0.0.0/24")], &[]).unwrap();
        let mut held: Vec<_> = (0..250).map(|_| pool.allocate(&mut rng).unwrap()).collect();
        assert!(pool.is_dense());
        let a = held.pop().unwrap();
        pool.release(a);
        assert!(pool.mark_used(a));
        assert!(!pool.mark_used(a));
        held.push(a);
        let rest: Vec<_> = std::iter::from_fn(|| pool.allocate(&mut rng)).collect();
        assert_eq!(rest.len(), 4);
        assert!(rest.iter().all(|r| !held.contains(r)));
    }

    #[test]
    fn v6_addresses_carry_prefix_and_alias() {
        let mut rng = Csprng::new().unwrap();
        let prefix: Ipv6Prefix = "2001:db8:1:2::/64".parse().unwrap();
        let mut pool = V6Pool::new(prefix, 16).unwrap();
        assert_eq!(pool.random_bits(), 48);
        for _ in 0..100 {
            let a = pool.allocate(0xbeef, &mut rng).unwrap();
            assert!(pool.contains(a));
            assert_eq!(pool.alias_of(a), 0xbeef);
            assert_eq!(a.segments()[4], 0xbeef);
        }
        assert_eq!(pool.in_use(), 100);
        assert_eq!(
            V6Pool::new("::/0".parse().unwrap(), 0).unwrap_err(),
            PoolError::AliasBits(0)
        );
        assert!(matches!(
            V6Pool::new("2001:db8::/100".parse().unwrap(), 16),
            Err(PoolError::TooFewRandomBits {
                random_bits: 12,
                ..
            })
        ));
    }

    #[test]
    fn v6_small_space_fills_without_collision() {
        let mut rng = Csprng::new().unwrap();
        let mut pool = V6Pool::new("2001:db8::/96".parse().unwrap(), 16).unwrap();
        let mut seen = HashSet::new();
        for _ in 0..20_000 {
            let a = pool.allocate(7, &mut rng).unwrap();
            assert!(seen.insert(a));
        }
    }
}
