//! The internet checksum (RFC 1071), the IPv4/IPv6 pseudo-headers (RFC 768, RFC 8200 §8.1),
//! and the incremental update for one changed 16-bit field (RFC 1624, eqn. 3).
//!
//! Hand-written rather than taken from etherparse: etherparse computes whole checksums over its
//! own header structs, while the fast path updates a checksum in place after changing one field
//! (the TTL), which costs a few instructions instead of a pass over the header.
//!
//! Sums are kept unfolded in a `u64` ([`Sum`]) so a caller can add a pseudo-header, a header
//! and a payload, and fold once at the end.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Error, IpProtocol, Result};

/// An unfolded one's-complement sum of 16-bit big-endian words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum(u64);

impl Sum {
    /// The empty sum.
    pub const ZERO: Sum = Sum(0);

    /// Adds the bytes of `data` as big-endian 16-bit words (a trailing odd byte is padded with
    /// zero, RFC 1071 §4.1). `data` must start on an even offset of the checksummed region.
    #[inline]
    pub fn add_bytes(self, data: &[u8]) -> Sum {
        // Four words at a time, as one big-endian u64, into a u128 (an add and an add-with-carry
        // per 8 bytes, as the kernel's `csum_partial`): a 64-bit word is congruent to the sum of
        // its four 16-bit words modulo 0xffff, since 2^16 ≡ 1. It cannot overflow before 2^64
        // chunks.
        let mut wide = u128::from(self.0);
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            wide += u128::from(u64::from_be_bytes(word));
        }
        // Back to 64 bits with end-around carries (2^64 - 1 is a multiple of 0xffff too).
        let folded = (wide & u128::from(u64::MAX)) + (wide >> 64);
        let folded = (folded & u128::from(u64::MAX)) + (folded >> 64);
        // At most 2^64: one more fold fits, and leaves room for the words below.
        let mut acc = ((folded & u128::from(u64::MAX)) + (folded >> 64)) as u64;
        let mut words = chunks.remainder().chunks_exact(2);
        for w in &mut words {
            acc = fold_add(acc, u64::from(u16::from_be_bytes([w[0], w[1]])));
        }
        if let [last] = words.remainder() {
            acc = fold_add(acc, u64::from(u16::from_be_bytes([*last, 0])));
        }
        Sum(acc)
    }

    /// Adds one 16-bit word.
    #[inline]
    pub fn add_u16(self, word: u16) -> Sum {
        Sum(fold_add(self.0, u64::from(word)))
    }

    /// Adds a 32-bit value as two words.
    #[inline]
    pub fn add_u32(self, value: u32) -> Sum {
        Sum(fold_add(self.0, u64::from(value)))
    }

    /// The 16-bit one's-complement sum (end-around carries folded in).
    #[inline]
    pub fn fold(self) -> u16 {
        // Loop-free: 64 → 33 bits, then three 16-bit folds (≤ 0x2fffe, ≤ 0x10001, ≤ 0xffff).
        let mut s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s as u16
    }

    /// The checksum field value: the complement of the folded sum.
    #[inline]
    pub fn checksum(self) -> u16 {
        !self.fold()
    }
}

/// `a + b` with the carry out of 64 bits added back in (one's complement addition).
#[inline(always)]
fn fold_add(a: u64, b: u64) -> u64 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u64::from(carry)
}

/// The internet checksum of `data` (with its checksum field, if any, set to zero).
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    Sum::ZERO.add_bytes(data).checksum()
}

/// True if `data`, checksum field included, sums to all ones (RFC 1071 §1 step 3).
#[inline]
pub fn verify(data: &[u8]) -> bool {
    Sum::ZERO.add_bytes(data).fold() == 0xffff
}

/// The pseudo-header a transport checksum covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PseudoHeader {
    /// RFC 768 / RFC 793: source, destination, zero, protocol, transport length (16 bits).
    V4 {
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
    },
    /// RFC 8200 §8.1: source, destination, upper-layer length (32 bits), zero, next header.
    V6 {
        /// Source address.
        src: Ipv6Addr,
        /// Destination address.
        dst: Ipv6Addr,
    },
}

impl PseudoHeader {
    /// The sum of the pseudo-header for `protocol` and an upper-layer packet of `len` bytes.
    #[inline]
    pub fn sum(&self, protocol: IpProtocol, len: u32) -> Sum {
        let proto = u16::from(u8::from(protocol));
        match self {
            PseudoHeader::V4 { src, dst } => Sum::ZERO
                .add_bytes(&src.octets())
                .add_bytes(&dst.octets())
                .add_u16(proto)
                .add_u32(len),
            PseudoHeader::V6 { src, dst } => Sum::ZERO
                .add_bytes(&src.octets())
                .add_bytes(&dst.octets())
                .add_u32(len)
                .add_u16(proto),
        }
    }

    /// True for IPv6, where a transport checksum is mandatory.
    pub fn is_v6(&self) -> bool {
        matches!(self, PseudoHeader::V6 { .. })
    }
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed from
/// `old_word` to `new_word`: `HC' = ~(~HC + ~m + m')`.
///
/// Equal to a full recomputation whenever the covered data is not all zeros (an IPv4 header
/// never is: its version nibble is 4); RFC 1624 §3 explains why eqn. 2 (`HC - ~m - m'`) is not
/// used.
#[inline]
pub fn update(old_checksum: u16, old_word: u16, new_word: u16) -> u16 {
    Sum::ZERO
        .add_u16(!old_checksum)
        .add_u16(!old_word)
        .add_u16(new_word)
        .checksum()
}

/// [`update`] for a changed 32-bit field (e.g. an IPv4 address in a NAT), as two words.
#[inline]
pub fn update_u32(old_checksum: u16, old: u32, new: u32) -> u16 {
    let c = update(old_checksum, (old >> 16) as u16, (new >> 16) as u16);
    update(c, old as u16, new as u16)
}

/// Offsets within the IPv4 header used by [`decrement_ipv4_ttl`] (the same as in
/// [`super::ipv4`]; repeated here so the function works on a bare header slice).
const IPV4_TTL: usize = 8;
const IPV4_CHECKSUM: usize = 10;
const IPV4_MIN_HEADER_LEN: usize = 20;

/// Decrements the TTL of the IPv4 header at the start of `header` and updates its header
/// checksum incrementally (RFC 1624; the TTL shares a 16-bit word with the protocol, RFC 1141).
/// Returns the new TTL.
///
/// Errors: [`Error::Truncated`] if `header` is shorter than 20 bytes;
/// [`Error::HopLimitExceeded`] if the TTL is 0 or 1 (RFC 1812 §5.3.1: a router must not forward
/// it; the caller sends ICMP Time Exceeded or drops). The header is unchanged on error.
#[inline(always)]
pub fn decrement_ipv4_ttl(header: &mut [u8]) -> Result<u8> {
    let Some(h) = header.get_mut(..IPV4_MIN_HEADER_LEN) else {
        return Err(Error::Truncated);
    };
    let ttl = h[IPV4_TTL];
    if ttl <= 1 {
        return Err(Error::HopLimitExceeded);
    }
    let old_sum = u16::from_be_bytes([h[IPV4_CHECKSUM], h[IPV4_CHECKSUM + 1]]);
    // RFC 1624 eqn. 3 with m = ttl·256 + proto and m' = m − 256: ~m + m' = 0xffff − 256 =
    // 0xfeff whatever the TTL and protocol, so HC' = ~(~HC + 0xfeff) (RFC 1141's trick, in the
    // form that never yields 0xffff for -0). Property-tested against a full recompute.
    let new_sum = Sum::ZERO.add_u16(!old_sum).add_u16(0xfeff).checksum();
    h[IPV4_TTL] = ttl - 1;
    h[IPV4_CHECKSUM..IPV4_CHECKSUM + 2].copy_from_slice(&new_sum.to_be_bytes());
    Ok(ttl - 1)
}

/// Decrements the hop limit of the IPv6 header at the start of `header` (no checksum to
/// update). Returns the new hop limit; errors as [`decrement_ipv4_ttl`].
#[inline(always)]
pub fn decrement_ipv6_hop_limit(header: &mut [u8]) -> Result<u8> {
    const IPV6_HOP_LIMIT: usize = 7;
    const IPV6_HEADER_LEN: usize = 40;
    if header.len() < IPV6_HEADER_LEN {
        return Err(Error::Truncated);
    }
    let hop_limit = header[IPV6_HOP_LIMIT];
    if hop_limit <= 1 {
        return Err(Error::HopLimitExceeded);
    }
    header[IPV6_HOP_LIMIT] = hop_limit - 1;
    Ok(hop_limit - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 §3's worked example: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    #[test]
    fn rfc1071_example_sums_to_ddf2() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Sum::ZERO.add_bytes(&data).fold(), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    /// A real IPv4 header (20 bytes, from a capture) whose checksum is 0xb861.
    const IPV4_HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn a_captured_ipv4_header_verifies_and_recomputes_to_its_checksum() {
        assert!(verify(&IPV4_HEADER));
        let mut h = IPV4_HEADER;
        h[10] = 0;
        h[11] = 0;
        assert_eq!(checksum(&h), 0xb861);
    }

    #[test]
    fn odd_length_data_is_padded_with_a_zero_byte() {
        assert_eq!(
            checksum(&[0x12, 0x34, 0x56]),
            checksum(&[0x12, 0x34, 0x56, 0x00])
        );
    }

    #[test]
    fn ttl_decrement_updates_the_checksum_like_a_recompute() {
        let mut h = IPV4_HEADER;
        assert_eq!(decrement_ipv4_ttl(&mut h), Ok(0x3f));
        assert!(verify(&h));
        let mut zeroed = h;
        zeroed[10..12].fill(0);
        assert_eq!(u16::from_be_bytes([h[10], h[11]]), checksum(&zeroed));
    }

    #[test]
    fn ttl_decrement_is_right_for_every_ttl_and_protocol() {
        for ttl in 2..=255u8 {
            for proto in 0..=255u8 {
                let mut h = IPV4_HEADER;
                h[8] = ttl;
                h[9] = proto;
                h[10..12].fill(0);
                let c = checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                decrement_ipv4_ttl(&mut h).unwrap();
                let after = [h[10], h[11]];
                h[10..12].fill(0);
                assert_eq!(
                    u16::from_be_bytes(after),
                    checksum(&h),
                    "ttl {ttl} proto {proto}"
                );
            }
        }
    }

    #[test]
    fn ttl_of_one_or_zero_is_not_forwarded_and_the_header_is_unchanged() {
        for ttl in [0, 1] {
            let mut h = IPV4_HEADER;
            h[8] = ttl;
            let before = h;
            assert_eq!(decrement_ipv4_ttl(&mut h), Err(Error::HopLimitExceeded));
            assert_eq!(h, before);
        }
        assert_eq!(decrement_ipv4_ttl(&mut [0x45; 19]), Err(Error::Truncated));
        assert_eq!(
            decrement_ipv6_hop_limit(&mut [0x60; 39]),
            Err(Error::Truncated)
        );
        let mut v6 = [0u8; 40];
        v6[7] = 1;
        assert_eq!(
            decrement_ipv6_hop_limit(&mut v6),
            Err(Error::HopLimitExceeded)
        );
        v6[7] = 64;
        assert_eq!(decrement_ipv6_hop_limit(&mut v6), Ok(63));
    }

    #[test]
    fn pseudo_header_sums_match_their_rfc_layouts() {
        let src = Ipv4Addr::new(192, 168, 0, 1);
        let dst = Ipv4Addr::new(10, 0, 0, 2);
        let mut v4 = Vec::new();
        v4.extend_from_slice(&src.octets());
        v4.extend_from_slice(&dst.octets());
        v4.extend_from_slice(&[0, 17, 0x01, 0x23]);
        assert_eq!(
            PseudoHeader::V4 { src, dst }
                .sum(IpProtocol::Udp, 0x123)
                .fold(),
            Sum::ZERO.add_bytes(&v4).fold()
        );
        let src6: Ipv6Addr = "fe80::1".parse().unwrap();
        let dst6: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
        let mut v6 = Vec::new();
        v6.extend_from_slice(&src6.octets());
        v6.extend_from_slice(&dst6.octets());
        v6.extend_from_slice(&[0, 1, 0, 0x20, 0, 0, 0, 58]);
        assert_eq!(
            PseudoHeader::V6 {
                src: src6,
                dst: dst6
            }
            .sum(IpProtocol::Icmpv6, 0x10020)
            .fold(),
            Sum::ZERO.add_bytes(&v6).fold()
        );
    }

    proptest! {
        /// RFC 1624: the incremental update of one changed 16-bit word equals a full
        /// recomputation (for data that is not all zeros; word 0 is forced non-zero here as the
        /// IPv4 version nibble is).
        #[test]
        fn incremental_update_equals_full_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 4..128usize),
            word_index in any::<prop::sample::Index>(),
            new_word in any::<u16>(),
        ) {
            if data.len() % 2 == 1 { data.pop(); }
            data[0] |= 0x40;
            // The checksum lives in word 1; change any other word.
            data[2] = 0;
            data[3] = 0;
            let words = data.len() / 2;
            let idx = match word_index.index(words) { 1 => 0, i => i };
            let c = checksum(&data);
            data[2..4].copy_from_slice(&c.to_be_bytes());
            let old_word = u16::from_be_bytes([data[2 * idx], data[2 * idx + 1]]);
            let new_word = if idx == 0 { new_word | 0x4000 } else { new_word };
            data[2 * idx..2 * idx + 2].copy_from_slice(&new_word.to_be_bytes());
            let incremental = update(c, old_word, new_word);
            data[2] = 0;
            data[3] = 0;
            prop_assert_eq!(incremental, checksum(&data));
        }

        /// The TTL decrement's incremental checksum equals a recompute, for any header.
        #[test]
        fn ttl_decrement_equals_full_recompute(mut h in any::<[u8; 20]>(), ttl in 2u8..=255) {
            h[0] = 0x45;
            h[8] = ttl;
            h[10] = 0;
            h[11] = 0;
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            prop_assert_eq!(decrement_ipv4_ttl(&mut h), Ok(ttl - 1));
            let after = u16::from_be_bytes([h[10], h[11]]);
            h[10] = 0;
            h[11] = 0;
            prop_assert_eq!(after, checksum(&h));
        }

        /// A 32-bit field update (two words) equals a recompute.
        #[test]
        fn u32_update_equals_full_recompute(mut h in any::<[u8; 20]>(), new in any::<u32>()) {
            h[0] = 0x45;
            h[10] = 0;
            h[11] = 0;
            let c = checksum(&h);
            let old = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            h[12..16].copy_from_slice(&new.to_be_bytes());
            prop_assert_eq!(update_u32(c, old, new), checksum(&h));
        }

        /// The word-at-a-time sum equals the textbook byte-pair loop.
        #[test]
        fn fold_of_any_u64_is_the_ones_complement_sum(x in any::<u64>()) {
            let mut s = x;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            prop_assert_eq!(Sum(x).fold(), s as u16);
        }

        /// Sums of pieces (at even offsets), of words and of any starting value chain into the
        /// sum of the whole, whatever carries the 64-bit accumulator takes.
        #[test]
        fn sums_chain_whatever_the_accumulator_holds(
            start in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..600usize),
            cut in any::<prop::sample::Index>(),
            word in any::<u32>(),
        ) {
            let cut = cut.index(data.len() + 1) & !1;
            let chained = Sum(start)
                .add_bytes(&data[..cut])
                .add_u32(word)
                .add_bytes(&data[cut..])
                .add_u16(word as u16)
                .fold();
            let mut whole = data.clone();
            if whole.len() % 2 == 1 {
                whole.push(0);
            }
            whole.extend_from_slice(&word.to_be_bytes());
            whole.extend_from_slice(&(word as u16).to_be_bytes());
            whole.extend_from_slice(&start.to_be_bytes());
            let mut acc: u32 = 0;
            for pair in whole.chunks(2) {
                acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
                acc = (acc & 0xffff) + (acc >> 16);
            }
            prop_assert_eq!(chained, acc as u16);
        }

        #[test]
        fn fast_sum_equals_textbook_sum(data in proptest::collection::vec(any::<u8>(), 0..300usize)) {
            let mut acc: u32 = 0;
            for pair in data.chunks(2) {
                let w = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
                acc += u32::from(w);
                acc = (acc & 0xffff) + (acc >> 16);
            }
            prop_assert_eq!(Sum::ZERO.add_bytes(&data).fold(), acc as u16);
        }
    }
}
