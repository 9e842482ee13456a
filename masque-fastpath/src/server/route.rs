//! Connection IDs that name the worker owning their connection, and look random to everyone
//! else.
//!
//! A hopping client changes its address every few packets, so the kernel's SO_REUSEPORT hash
//! (by 4-tuple) would hand each hop to another worker, one that holds none of the connection's
//! keys. The proxy steers by destination connection ID instead: every server ID is
//! [`CID_LEN`](crate::quic::CID_LEN) bytes, fully random but for its first two bytes, a route
//! value `r` drawn at random among the values whose entry in a secret table names the worker
//! (the table is a keyed shuffle of the 65,536 values dealt round-robin to the workers, so it is
//! balanced). An observer sees 20 random bytes: no bit is stable across a connection's IDs, and
//! the IDs of two hops are unlinkable (the MIMIQ paper, "MIMIQ: Masking IPs with Migration in
//! QUIC", §4, and RFC 9000 §9.5). The same table is loaded into the steering program
//! (`masque-fastpath/bpf/reuseport_cid.c`), which reads `r` from short-header packets.
//!
//! The table's key is derived from the stateless reset key, so every worker, and a restarted
//! proxy with the same `quic.reset_key_file` and worker count, computes the same table.
//!
//! The table also names a process generation (0 or 1) for each route value, dealt with the
//! workers: a proxy draws its IDs among its own generation's values, so a proxy started while
//! another runs with the same reset key (`server/generation.rs` picks the free generation) can
//! tell the other's connection IDs from unknown ones, and does not reset them while the other
//! lives. An observer sees no more of the generation than of the worker.

use ring::rand::{SecureRandom, SystemRandom};

use super::admission::ResetKey;
use crate::quic::CID_LEN;

/// Route values: the first two bytes of a server connection ID.
pub const ROUTE_VALUES: usize = 1 << 16;

/// Process generations the table tells apart.
pub const GENERATIONS: usize = 2;

/// The secret assignment of route values to workers and process generations.
#[derive(Debug, Clone)]
pub struct Routes {
    /// Route value → worker.
    table: Vec<u32>,
    /// Route value → generation.
    generations: Vec<u8>,
    /// This process's generation.
    generation: u8,
    /// Worker → the route values of this process's generation it owns.
    owned: Vec<Vec<u16>>,
}

impl Routes {
    /// The table for `workers` workers (1 to 32,768) under `key`, drawing IDs for process
    /// generation `generation` (0 or 1).
    pub fn new(key: &ResetKey, workers: usize, generation: u8) -> Routes {
        assert!(
            (1..=ROUTE_VALUES / GENERATIONS).contains(&workers),
            "1..=32768 workers"
        );
        assert!(usize::from(generation) < GENERATIONS, "generation 0 or 1");
        // Fisher–Yates over the route values, driven by HMAC(key, label | counter) blocks.
        let mut values: Vec<u16> = (0..=u16::MAX).collect();
        let mut stream = KeyStream::new(key);
        for i in (1..values.len()).rev() {
            let j = stream.below(i as u32 + 1) as usize;
            values.swap(i, j);
        }
        let mut table = vec![0u32; ROUTE_VALUES];
        let mut generations = vec![0u8; ROUTE_VALUES];
        let mut owned = vec![Vec::with_capacity(ROUTE_VALUES / workers + 1); workers];
        for (i, &r) in values.iter().enumerate() {
            let slot = i % (workers * GENERATIONS);
            let (w, g) = (slot / GENERATIONS, (slot % GENERATIONS) as u8);
            table[usize::from(r)] = w as u32;
            generations[usize::from(r)] = g;
            if g == generation {
                owned[w].push(r);
            }
        }
        Routes {
            table,
            generations,
            generation,
            owned,
        }
    }

    /// This process's generation.
    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// The process generation of a server connection ID (`None` for a client-chosen ID of
    /// another length).
    pub fn generation_of(&self, dcid: &[u8]) -> Option<u8> {
        if dcid.len() != CID_LEN {
            return None;
        }
        Some(self.generations[usize::from(u16::from_be_bytes([dcid[0], dcid[1]]))])
    }

    /// Workers the table serves.
    pub fn workers(&self) -> usize {
        self.owned.len()
    }

    /// The table, route value → worker (for the steering program's map).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The worker owning a server connection ID (`None` for a client-chosen ID of another
    /// length: the handshake's first Initials).
    #[inline]
    pub fn owner(&self, dcid: &[u8]) -> Option<usize> {
        if dcid.len() != CID_LEN {
            return None;
        }
        let r = u16::from_be_bytes([dcid[0], dcid[1]]);
        Some(self.table[usize::from(r)] as usize)
    }

    /// A fresh connection ID owned by `worker` in this process's generation: a random route
    /// value among the worker's, then random bytes.
    pub fn new_cid(&self, worker: usize, rng: &SystemRandom) -> quiche::ConnectionId<'static> {
        let (mut id, mut pick) = ([0u8; CID_LEN], [0u8; 4]);
        // SystemRandom only fails when the OS has no randomness source, which quiche needs too.
        rng.fill(&mut id).expect("OS randomness");
        rng.fill(&mut pick).expect("OS randomness");
        let owned = &self.owned[worker];
        let r = owned[u32::from_be_bytes(pick) as usize % owned.len()];
        id[..2].copy_from_slice(&r.to_be_bytes());
        quiche::ConnectionId::from_vec(id.to_vec())
    }
}

/// Pseudo-random u32s from HMAC-SHA256(key, "mimiq route table" | block counter).
struct KeyStream<'a> {
    key: &'a ResetKey,
    block: u64,
    words: Vec<u32>,
}

impl<'a> KeyStream<'a> {
    fn new(key: &'a ResetKey) -> Self {
        KeyStream {
            key,
            block: 0,
            words: Vec::new(),
        }
    }

    fn next(&mut self) -> u32 {
        if self.words.is_empty() {
            let mut input = b"mimiq route table ".to_vec();
            input.extend_from_slice(&self.block.to_be_bytes());
            self.block += 1;
            let tag = self.key.derive(&input);
            self.words = tag
                .chunks_exact(4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
        }
        self.words.pop().expect("refilled above")
    }

    /// Uniform in `0..n` (rejection sampling: no modulo bias).
    fn below(&mut self, n: u32) -> u32 {
        let zone = u32::MAX - u32::MAX % n;
        loop {
            let x = self.next();
            if x < zone {
                return x % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> ResetKey {
        ResetKey::from_bytes(&[byte; 32])
    }

    #[test]
    fn balanced_and_owned() {
        for workers in [1, 2, 3, 8] {
            for generation in [0, 1] {
                let routes = Routes::new(&key(1), workers, generation);
                let mut count = vec![0usize; workers * GENERATIONS];
                for (r, &w) in routes.table().iter().enumerate() {
                    count[w as usize * GENERATIONS + usize::from(routes.generations[r])] += 1;
                }
                let slots = workers * GENERATIONS;
                let (lo, hi) = (ROUTE_VALUES / slots, ROUTE_VALUES.div_ceil(slots));
                assert!(count.iter().all(|&c| c == lo || c == hi), "{count:?}");
                let rng = SystemRandom::new();
                for w in 0..workers {
                    for _ in 0..200 {
                        let cid = routes.new_cid(w, &rng);
                        assert_eq!(cid.len(), CID_LEN);
                        assert_eq!(routes.owner(&cid), Some(w));
                        assert_eq!(routes.generation_of(&cid), Some(generation));
                    }
                }
            }
        }
    }

    #[test]
    fn same_key_same_table_other_key_other_table() {
        let a = Routes::new(&key(1), 2, 0);
        assert_eq!(a.table(), Routes::new(&key(1), 2, 1).table());
        let b = Routes::new(&key(2), 2, 0);
        let same = a
            .table()
            .iter()
            .zip(b.table())
            .filter(|(x, y)| x == y)
            .count();
        // Two independent balanced tables agree on about half the values.
        assert!((30_000..35_500).contains(&same), "{same}");
    }

    #[test]
    fn no_bit_is_stable_across_ids() {
        // Every bit of a worker's IDs takes both values: nothing an observer could link hops by.
        let routes = Routes::new(&key(3), 2, 1);
        let rng = SystemRandom::new();
        let ids: Vec<_> = (0..512).map(|_| routes.new_cid(1, &rng)).collect();
        for bit in 0..CID_LEN * 8 {
            let ones = ids
                .iter()
                .filter(|id| id[bit / 8] & (0x80 >> (bit % 8)) != 0)
                .count();
            assert!((150..362).contains(&ones), "bit {bit}: {ones} of 512");
        }
    }

    #[test]
    fn other_lengths_have_no_owner() {
        let routes = Routes::new(&key(1), 2, 0);
        assert_eq!(routes.owner(&[0u8; 8]), None);
        assert_eq!(routes.generation_of(&[0u8; 8]), None);
        assert_eq!(routes.owner(&[]), None);
    }
}
