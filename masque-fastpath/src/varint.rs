//! QUIC variable-length integers (RFC 9000 §16), the integer encoding of every field the MASQUE
//! codec reads: capsule types and lengths, quarter stream IDs, context IDs, request IDs.
//!
//! The two most significant bits of the first byte give the encoded length (1, 2, 4 or 8 bytes);
//! the rest is the value in network byte order. Decoding accepts any length (a non-minimal
//! encoding is legal on the wire); [`encode`] writes the minimal length and [`encode_with_len`]
//! a chosen one (for a length field reserved before its value is known).
//!
//! Pure functions over caller buffers; no allocation. Nothing here panics on any input.

/// The largest value a variable-length integer can carry, 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Why a varint could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer ends before the integer does (for a stream: wait for more bytes).
    Truncated,
    /// The value is above [`MAX`] and cannot be encoded.
    ValueTooLarge,
    /// The requested encoded length is not 1, 2, 4 or 8, or is too short for the value.
    InvalidLength,
    /// The output buffer is shorter than the encoding.
    BufferTooSmall,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Truncated => "varint truncated",
            Error::ValueTooLarge => "value above 2^62-1",
            Error::InvalidLength => "invalid varint length for this value",
            Error::BufferTooSmall => "output buffer too small",
        })
    }
}

impl std::error::Error for Error {}

//= https://www.rfc-editor.org/rfc/rfc9000#section-16
//# The QUIC variable-length integer encoding reserves the two most
//# significant bits of the first byte to encode the base-2 logarithm of
//# the integer encoding length in bytes.
/// Reads one varint from the front of `buf`: the value and the number of bytes it took.
pub fn decode(buf: &[u8]) -> Result<(u64, usize), Error> {
    let first = *buf.first().ok_or(Error::Truncated)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len).ok_or(Error::Truncated)?;
    let mut value = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        value = (value << 8) | u64::from(b);
    }
    Ok((value, len))
}

/// The number of bytes the minimal encoding of `value` takes (8 for values above [`MAX`], which
/// [`encode`] rejects).
pub const fn encoded_len(value: u64) -> usize {
    if value < (1 << 6) {
        1
    } else if value < (1 << 14) {
        2
    } else if value < (1 << 30) {
        4
    } else {
        8
    }
}

/// Writes `value` at the front of `buf` with the minimal length; returns the bytes written.
pub fn encode(value: u64, buf: &mut [u8]) -> Result<usize, Error> {
    encode_with_len(value, encoded_len(value), buf)
}

//= https://www.rfc-editor.org/rfc/rfc9000#section-16
//# Values do not need to be encoded on the minimum number of bytes
//# necessary, with the sole exception of the Frame Type field; see
//# Section 12.4.
/// Writes `value` at the front of `buf` in exactly `len` bytes (1, 2, 4 or 8).
pub fn encode_with_len(value: u64, len: usize, buf: &mut [u8]) -> Result<usize, Error> {
    if value > MAX {
        return Err(Error::ValueTooLarge);
    }
    let prefix: u8 = match len {
        1 => 0b00,
        2 => 0b01,
        4 => 0b10,
        8 => 0b11,
        _ => return Err(Error::InvalidLength),
    };
    if encoded_len(value) > len {
        return Err(Error::InvalidLength);
    }
    let out = buf.get_mut(..len).ok_or(Error::BufferTooSmall)?;
    let be = value.to_be_bytes();
    out.copy_from_slice(&be[8 - len..]);
    out[0] |= prefix << 6;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The examples of RFC 9000 Appendix A.1, byte for byte.
    #[test]
    fn rfc9000_examples_decode() {
        // 8 bytes: prefix 0b11, value 151,288,809,941,952,652.
        assert_eq!(
            decode(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Ok((151_288_809_941_952_652, 8))
        );
        // 4 bytes: prefix 0b10, value 494,878,333.
        assert_eq!(decode(&[0x9d, 0x7f, 0x3e, 0x7d]), Ok((494_878_333, 4)));
        // 2 bytes: prefix 0b01, value 15,293.
        assert_eq!(decode(&[0x7b, 0xbd]), Ok((15_293, 2)));
        // 1 byte: value 37.
        assert_eq!(decode(&[0x25]), Ok((37, 1)));
        // 2 bytes, non-minimal: value 37.
        assert_eq!(decode(&[0x40, 0x25]), Ok((37, 2)));
    }

    #[test]
    fn rfc9000_examples_encode_minimal() {
        let mut buf = [0xAAu8; 8];
        assert_eq!(encode(151_288_809_941_952_652, &mut buf), Ok(8));
        assert_eq!(buf, [0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]);
        let mut buf = [0xAAu8; 5];
        assert_eq!(encode(494_878_333, &mut buf), Ok(4));
        assert_eq!(buf, [0x9d, 0x7f, 0x3e, 0x7d, 0xAA]);
        let mut buf = [0xAAu8; 3];
        assert_eq!(encode(15_293, &mut buf), Ok(2));
        assert_eq!(buf, [0x7b, 0xbd, 0xAA]);
        let mut buf = [0xAAu8; 2];
        assert_eq!(encode(37, &mut buf), Ok(1));
        assert_eq!(buf, [0x25, 0xAA]);
    }

    #[test]
    fn encode_with_len_writes_non_minimal_and_rejects_too_short() {
        let mut buf = [0xAAu8; 4];
        assert_eq!(encode_with_len(37, 2, &mut buf), Ok(2));
        assert_eq!(buf, [0x40, 0x25, 0xAA, 0xAA]);
        assert_eq!(encode_with_len(37, 4, &mut buf), Ok(4));
        assert_eq!(buf, [0x80, 0x00, 0x00, 0x25]);
        assert_eq!(encode_with_len(64, 1, &mut buf), Err(Error::InvalidLength));
        assert_eq!(encode_with_len(1, 3, &mut buf), Err(Error::InvalidLength));
        assert_eq!(encode_with_len(1, 8, &mut buf), Err(Error::BufferTooSmall));
    }

    #[test]
    fn boundaries_take_the_next_length() {
        for (v, len) in [
            (0, 1),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (MAX, 8),
        ] {
            assert_eq!(encoded_len(v), len, "value {v}");
        }
        assert_eq!(encode(MAX + 1, &mut [0; 8]), Err(Error::ValueTooLarge));
        assert_eq!(encode(u64::MAX, &mut [0; 8]), Err(Error::ValueTooLarge));
    }

    #[test]
    fn truncated_at_every_length() {
        let full = [0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c];
        for cut in 0..full.len() {
            assert_eq!(decode(&full[..cut]), Err(Error::Truncated), "cut {cut}");
        }
        assert_eq!(decode(&[]), Err(Error::Truncated));
    }

    proptest! {
        #[test]
        fn minimal_round_trip(v in 0..=MAX, tail in proptest::collection::vec(any::<u8>(), 0..4)) {
            let mut buf = [0u8; 12];
            let n = encode(v, &mut buf).unwrap();
            prop_assert_eq!(n, encoded_len(v));
            buf[n..n + tail.len()].copy_from_slice(&tail);
            prop_assert_eq!(decode(&buf[..n + tail.len()]), Ok((v, n)));
        }

        #[test]
        fn any_length_round_trip(v in 0..=MAX, len in prop::sample::select(vec![1usize, 2, 4, 8])) {
            let mut buf = [0u8; 8];
            match encode_with_len(v, len, &mut buf) {
                Ok(n) => prop_assert_eq!(decode(&buf[..n]), Ok((v, len))),
                Err(e) => {
                    prop_assert_eq!(e, Error::InvalidLength);
                    prop_assert!(encoded_len(v) > len);
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok((v, n)) = decode(&bytes) {
                prop_assert!(v <= MAX);
                prop_assert!(n <= bytes.len());
            }
        }
    }
}
