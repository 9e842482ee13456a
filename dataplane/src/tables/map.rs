//! The bindings' hash map: open addressing with linear probing, at most half full, and
//! backward-shift deletion (no tombstones), keyed by an address.
//!
//! Hand-written rather than a `HashMap` for one operation no map crate offers: [`BindingMap::
//! prefetch`] — compute where a key's probe sequence starts and ask the CPU to load that line
//! without waiting for it. The roles do that for every packet of a burst before looking any of
//! them up (VPP's dual/quad loop), so the burst's cache misses overlap instead of queueing one
//! behind the other: with a million bindings spread over 64 MB, nearly every lookup is a miss.
//!
//! A key's home slot is the top bits of its Fibonacci hash (the key times 2^64/φ). At most half
//! the slots are full, so a lookup reads one slot, rarely two: a slot is 32 bytes, two to a
//! cache line. One key value marks an empty slot ([`Key::EMPTY`]: the broadcast address
//! 255.255.255.255, the unspecified address ::), which is never a client's address; inserting
//! it is refused.

use super::Binding;

/// An address usable as a key.
pub trait Key: Copy + Eq {
    /// The key that marks an empty slot.
    const EMPTY: Self;
    /// 64 bits of hash; the map takes the top bits.
    fn hash(self) -> u64;
}

/// 2^64 / φ: multiplying by it spreads consecutive keys over the whole table (Knuth's
/// multiplicative hashing).
const FIBONACCI: u64 = 0x9e37_79b9_7f4a_7c15;

impl Key for u32 {
    const EMPTY: u32 = u32::MAX;
    #[inline]
    fn hash(self) -> u64 {
        u64::from(self).wrapping_mul(FIBONACCI)
    }
}

impl Key for u128 {
    const EMPTY: u128 = 0;
    #[inline]
    fn hash(self) -> u64 {
        // Both halves count: a /64 pool differs in the low half, aliases in the high one.
        ((self as u64) ^ ((self >> 64) as u64).rotate_left(29)).wrapping_mul(FIBONACCI)
    }
}

/// Address → binding.
pub struct BindingMap<K: Key> {
    slots: Vec<(K, Binding)>,
    /// 64 − log2(slots): the home slot of hash `h` is `h >> shift`.
    shift: u32,
    len: usize,
}

/// Slots of a new map.
const MIN_SLOTS: usize = 16;

/// What an empty slot holds besides its key.
const NO_BINDING: Binding = Binding {
    mac: [0; 6],
    sid: 0,
    port: 0,
    valid_until_ms: 0,
    seen: false,
};

impl<K: Key> Default for BindingMap<K> {
    fn default() -> Self {
        Self::with_slots(MIN_SLOTS)
    }
}

impl<K: Key> BindingMap<K> {
    fn with_slots(slots: usize) -> Self {
        BindingMap {
            slots: vec![(K::EMPTY, NO_BINDING); slots],
            shift: 64 - slots.trailing_zeros(),
            len: 0,
        }
    }

    #[inline]
    fn home(&self, key: K) -> usize {
        (key.hash() >> self.shift) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        (i + 1) & (self.slots.len() - 1)
    }

    /// Where `key` is, if it is.
    #[inline]
    fn find(&self, key: K) -> Option<usize> {
        if key == K::EMPTY {
            return None;
        }
        let mut i = self.home(key);
        loop {
            let k = self.slots[i].0;
            if k == key {
                return Some(i);
            }
            if k == K::EMPTY {
                return None;
            }
            i = self.next(i);
        }
    }

    /// Asks the CPU to bring the line of `key`'s home slot into the cache, without waiting.
    #[inline(always)]
    pub fn prefetch(&self, key: K) {
        prefetch(&self.slots[self.home(key)]);
    }

    /// The binding of `key`.
    #[inline]
    pub fn get(&self, key: K) -> Option<&Binding> {
        self.find(key).map(|i| &self.slots[i].1)
    }

    /// The binding of `key`, to change.
    pub fn get_mut(&mut self, key: K) -> Option<&mut Binding> {
        self.find(key).map(|i| &mut self.slots[i].1)
    }

    /// Bindings held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Sets the binding of `key` (not [`Key::EMPTY`], which is refused); returns the one it
    /// replaces.
    pub fn insert(&mut self, key: K, binding: Binding) -> Option<Binding> {
        if key == K::EMPTY {
            return None;
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mut i = self.home(key);
        loop {
            let slot = &mut self.slots[i];
            if slot.0 == key {
                return Some(std::mem::replace(&mut slot.1, binding));
            }
            if slot.0 == K::EMPTY {
                *slot = (key, binding);
                self.len += 1;
                return None;
            }
            i = self.next(i);
        }
    }

    /// Removes the binding of `key`; returns it.
    pub fn remove(&mut self, key: K) -> Option<Binding> {
        let mut hole = self.find(key)?;
        let removed = self.slots[hole].1;
        // Backward shift: move every later entry of the run that may sit in the hole (its home
        // is not cyclically within (hole, j]) back into it, so no probe sequence breaks.
        let mut j = hole;
        loop {
            j = self.next(j);
            let k = self.slots[j].0;
            if k == K::EMPTY {
                break;
            }
            let home = self.home(k);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = (K::EMPTY, NO_BINDING);
        self.len -= 1;
        Some(removed)
    }

    /// Keeps the bindings `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&Binding) -> bool) {
        let entries: Vec<(K, Binding)> = self
            .slots
            .iter()
            .filter(|(k, b)| *k != K::EMPTY && keep(b))
            .copied()
            .collect();
        self.clear();
        for (k, b) in entries {
            self.insert(k, b);
        }
    }

    /// Removes every binding and keeps the room (a snapshot refills it).
    pub fn clear(&mut self) {
        self.slots.fill((K::EMPTY, NO_BINDING));
        self.len = 0;
    }

    fn grow(&mut self) {
        let mut bigger = Self::with_slots(self.slots.len() * 2);
        for &(k, b) in &self.slots {
            if k != K::EMPTY {
                bigger.insert(k, b);
            }
        }
        *self = bigger;
    }
}

/// A hint to load the cache line of `value`; never faults, reads nothing into the program.
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint that cannot fault, on any address; `value` is a live
    // reference besides.
    unsafe {
        std::arch::x86_64::_mm_prefetch(
            (value as *const T).cast::<i8>(),
            std::arch::x86_64::_MM_HINT_T0,
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn binding(n: u64) -> Binding {
        Binding {
            mac: [2, 0, 0, 0, 0, n as u8],
            sid: n as u16,
            port: 0,
            valid_until_ms: n,
            seen: false,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u64),
        Remove(u32),
        Retain(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct keys, so runs collide, wrap around the table and shift back.
        let key = prop_oneof![0u32..64, Just(u32::MAX), any::<u32>()];
        prop_oneof![
            8 => (key.clone(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            4 => key.prop_map(Op::Remove),
            1 => any::<u64>().prop_map(Op::Retain),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #[test]
        fn the_map_agrees_with_a_hash_map_whatever_the_operations(ops in proptest::collection::vec(op(), 1..400)) {
            let mut map = BindingMap::<u32>::default();
            let mut model: HashMap<u32, Binding> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let got = map.insert(k, binding(v));
                        let want = if k == u32::MAX { None } else { model.insert(k, binding(v)) };
                        prop_assert_eq!(got, want);
                    }
                    Op::Remove(k) => prop_assert_eq!(map.remove(k), model.remove(&k)),
                    Op::Retain(t) => {
                        map.retain(|b| b.valid_until_ms > t);
                        model.retain(|_, b| b.valid_until_ms > t);
                    }
                    Op::Clear => {
                        map.clear();
                        model.clear();
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                for (k, b) in &model {
                    prop_assert_eq!(map.get(*k), Some(b));
                }
                prop_assert!(map.len() * 2 <= map.slots.len(), "at most half full");
            }
            for k in 0..64 {
                prop_assert_eq!(map.get(k), model.get(&k));
            }
        }
    }

    #[test]
    fn a_million_consecutive_addresses_are_found_and_removed() {
        let mut map = BindingMap::<u32>::default();
        for k in 0..1_000_000u32 {
            map.insert(0x0a00_0000 + k, binding(u64::from(k)));
        }
        assert_eq!(map.len(), 1_000_000);
        assert_eq!(map.slots.len(), 1 << 21);
        for k in (0..1_000_000u32).step_by(7) {
            assert_eq!(
                map.get(0x0a00_0000 + k).map(|b| b.valid_until_ms),
                Some(u64::from(k))
            );
            map.prefetch(0x0a00_0000 + k);
        }
        assert_eq!(map.get(0x0b00_0000), None);
        for k in (0..1_000_000u32).step_by(2) {
            assert!(map.remove(0x0a00_0000 + k).is_some());
        }
        assert_eq!(map.len(), 500_000);
        for k in 0..1_000_000u32 {
            assert_eq!(map.get(0x0a00_0000 + k).is_some(), k % 2 == 1, "{k}");
        }
    }

    #[test]
    fn ipv6_keys_in_one_pool_and_across_aliases_and_the_empty_key() {
        let mut map = BindingMap::<u128>::default();
        let pool = 0xfd00_0001_0000_0000_0000_0000_0000_0000u128;
        for i in 0..10_000u128 {
            map.insert(pool | i, binding(i as u64));
            map.insert(pool | (i << 48) | 1, binding(i as u64));
        }
        assert_eq!(map.len(), 19_999, "pool | 0 << 48 | 1 is inserted twice");
        assert_eq!(map.insert(0, binding(1)), None);
        assert_eq!(map.get(0), None, "the unspecified address is never a key");
        assert_eq!(map.get(pool | 77).map(|b| b.sid), Some(77));
    }
}
