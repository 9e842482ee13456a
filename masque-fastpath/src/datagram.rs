//! HTTP datagram framing: the Quarter Stream ID that HTTP/3 puts in front of every HTTP datagram
//! (RFC 9297 §2.1) and the Context ID that CONNECT-UDP (RFC 9298 §5) and CONNECT-IP (RFC 9484 §6)
//! put in front of their payload. Context ID 0 carries a UDP payload or a full IP packet.
//!
//! ```text
//! QUIC DATAGRAM frame payload {
//!   Quarter Stream ID (i),     // request stream ID / 4, at most 2^60 - 1
//!   Context ID (i),            // 0 = UDP payload / IP packet
//!   Payload (..),
//! }
//! ```
//!
//! [`Datagram::parse`] borrows the payload from the received bytes; [`Datagram::emit`] and
//! [`emit_header`] write into a caller buffer, so the proxy can build datagrams straight into its
//! send buffers. Inside a DATAGRAM capsule (RFC 9297 §3.5) there is no Quarter Stream ID: use
//! [`ContextPayload`] on the capsule's value.
//!
//! No allocation; nothing here panics on any input.

use crate::varint;

/// The largest legal Quarter Stream ID, 2^60 - 1.
pub const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// The Context ID that carries the protocol's payload (a UDP payload or an IP packet).
pub const CONTEXT_ID_PAYLOAD: u64 = 0;

/// Why a datagram could not be parsed or emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The datagram ends inside the Quarter Stream ID: an HTTP/3 connection error of type
    /// H3_DATAGRAM_ERROR.
    TruncatedQuarterStreamId,
    /// The Quarter Stream ID is above [`MAX_QUARTER_STREAM_ID`]: an HTTP/3 connection error of type
    /// H3_DATAGRAM_ERROR.
    QuarterStreamIdTooLarge,
    /// The datagram ends inside the Context ID: the datagram is dropped.
    TruncatedContextId,
    /// A value to emit does not fit a varint (above 2^62 - 1).
    ValueTooLarge,
    /// The stream ID is not a client-initiated bidirectional stream (not a multiple of 4).
    NotARequestStream,
    /// The output buffer is too short.
    BufferTooSmall,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::TruncatedQuarterStreamId => "datagram too short for its quarter stream ID",
            Error::QuarterStreamIdTooLarge => "quarter stream ID above 2^60-1",
            Error::TruncatedContextId => "datagram too short for its context ID",
            Error::ValueTooLarge => "value above 2^62-1",
            Error::NotARequestStream => "stream ID is not a client-initiated bidirectional stream",
            Error::BufferTooSmall => "output buffer too small",
        })
    }
}

impl std::error::Error for Error {}

/// The HTTP/3 layer of an HTTP datagram (RFC 9297 §2.1): the request stream it belongs to and the
/// HTTP Datagram Payload, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H3Datagram<'a> {
    /// The request stream ID divided by four.
    pub quarter_stream_id: u64,
    /// The HTTP Datagram Payload (for MASQUE: Context ID then payload).
    pub payload: &'a [u8],
}

impl<'a> H3Datagram<'a> {
    /// Reads the Quarter Stream ID from the front of a QUIC DATAGRAM frame payload.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
        //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow
        //# parsing the Quarter Stream ID field MUST be treated as an HTTP/3
        //# connection error of type H3_DATAGRAM_ERROR (0x33).
        let (qsid, n) = varint::decode(buf).map_err(|_| Error::TruncatedQuarterStreamId)?;
        //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
        //# The largest legal QUIC stream ID value is 2^62-1, so the
        //# largest legal value of the Quarter Stream ID field is 2^60-1.
        //# Receipt of an HTTP/3 Datagram that includes a larger value MUST be
        //# treated as an HTTP/3 connection error of type H3_DATAGRAM_ERROR (0x33).
        if qsid > MAX_QUARTER_STREAM_ID {
            return Err(Error::QuarterStreamIdTooLarge);
        }
        Ok(H3Datagram {
            quarter_stream_id: qsid,
            payload: &buf[n..],
        })
    }

    /// The request stream ID this datagram belongs to.
    pub fn stream_id(&self) -> u64 {
        // quarter_stream_id <= 2^60 - 1 after parse; a hand-built value saturates rather than wraps.
        self.quarter_stream_id.saturating_mul(4)
    }
}

/// The MASQUE layer of an HTTP Datagram Payload (RFC 9298 §5, RFC 9484 §6): Context ID and the
/// payload, borrowed. Also the value of a DATAGRAM capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextPayload<'a> {
    /// 0 for a UDP payload or IP packet; other values are registered by extensions.
    pub context_id: u64,
    /// The payload; may be empty.
    pub payload: &'a [u8],
}

impl<'a> ContextPayload<'a> {
    /// Reads the Context ID from the front of an HTTP Datagram Payload.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        let (context_id, n) = varint::decode(buf).map_err(|_| Error::TruncatedContextId)?;
        Ok(ContextPayload {
            context_id,
            payload: &buf[n..],
        })
    }

    /// Bytes [`ContextPayload::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        varint::encoded_len(self.context_id) + self.payload.len()
    }

    /// Writes Context ID and payload at the front of `buf`; returns the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let n = varint::encode(self.context_id, buf).map_err(map_varint)?;
        let out = buf
            .get_mut(n..n + self.payload.len())
            .ok_or(Error::BufferTooSmall)?;
        out.copy_from_slice(self.payload);
        Ok(n + self.payload.len())
    }
}

/// A whole MASQUE HTTP/3 datagram: Quarter Stream ID, Context ID, payload (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The request stream ID divided by four.
    pub quarter_stream_id: u64,
    /// 0 for a UDP payload or IP packet.
    pub context_id: u64,
    /// The payload; may be empty.
    pub payload: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Parses a QUIC DATAGRAM frame payload. Errors say which field failed, because the RFCs ask
    /// for different handling: a bad Quarter Stream ID is a connection error, a truncated Context
    /// ID a dropped datagram.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        let h3 = H3Datagram::parse(buf)?;
        let inner = ContextPayload::parse(h3.payload)?;
        Ok(Datagram {
            quarter_stream_id: h3.quarter_stream_id,
            context_id: inner.context_id,
            payload: inner.payload,
        })
    }

    /// Bytes [`Datagram::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        header_len(self.quarter_stream_id, self.context_id) + self.payload.len()
    }

    /// Writes the datagram at the front of `buf`; returns the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let n = emit_header(self.quarter_stream_id, self.context_id, buf)?;
        let out = buf
            .get_mut(n..n + self.payload.len())
            .ok_or(Error::BufferTooSmall)?;
        out.copy_from_slice(self.payload);
        Ok(n + self.payload.len())
    }
}

/// Quarter Stream ID for a request stream ID; the stream must be client-initiated bidirectional.
pub fn quarter_stream_id(stream_id: u64) -> Result<u64, Error> {
    if !stream_id.is_multiple_of(4) {
        return Err(Error::NotARequestStream);
    }
    let qsid = stream_id / 4;
    if qsid > MAX_QUARTER_STREAM_ID {
        return Err(Error::QuarterStreamIdTooLarge);
    }
    Ok(qsid)
}

/// Bytes of the Quarter Stream ID and Context ID fields: the per-datagram overhead above QUIC.
pub fn header_len(quarter_stream_id: u64, context_id: u64) -> usize {
    varint::encoded_len(quarter_stream_id) + varint::encoded_len(context_id)
}

/// Writes Quarter Stream ID and Context ID at the front of `buf`, leaving the payload to the
/// caller (who can then read a packet straight behind it); returns the header length.
pub fn emit_header(
    quarter_stream_id: u64,
    context_id: u64,
    buf: &mut [u8],
) -> Result<usize, Error> {
    if quarter_stream_id > MAX_QUARTER_STREAM_ID {
        return Err(Error::QuarterStreamIdTooLarge);
    }
    let n = varint::encode(quarter_stream_id, buf).map_err(map_varint)?;
    let m = varint::encode(context_id, buf.get_mut(n..).ok_or(Error::BufferTooSmall)?)
        .map_err(map_varint)?;
    Ok(n + m)
}

fn map_varint(e: varint::Error) -> Error {
    match e {
        varint::Error::ValueTooLarge => Error::ValueTooLarge,
        _ => Error::BufferTooSmall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POISON: u8 = 0xA5;

    // A CONNECT-IP datagram on request stream 4 carrying a 20-byte IPv4 header.
    const CAPTURE: [u8; 22] = [
        0x01, // Quarter Stream ID = 1 (stream 4), 1-byte varint
        0x00, // Context ID = 0 (IP packet)
        0x45, 0x00, 0x00, 0x14, // IPv4: version/IHL, DSCP, total length 20
        0x00, 0x00, 0x40, 0x00, // identification, DF
        0x40, 0x11, 0x00, 0x00, // TTL 64, UDP, checksum
        0x0a, 0x00, 0x00, 0x02, // source 10.0.0.2
        0x0a, 0x00, 0x00, 0x01, // destination 10.0.0.1
    ];

    #[test]
    fn capture_parses_field_by_field() {
        let d = Datagram::parse(&CAPTURE).unwrap();
        assert_eq!(d.quarter_stream_id, 1);
        assert_eq!(d.context_id, CONTEXT_ID_PAYLOAD);
        assert_eq!(d.payload, &CAPTURE[2..]);
        assert_eq!(H3Datagram::parse(&CAPTURE).unwrap().stream_id(), 4);
    }

    #[test]
    fn emit_into_poisoned_buffer_matches_capture() {
        let d = Datagram {
            quarter_stream_id: 1,
            context_id: 0,
            payload: &CAPTURE[2..],
        };
        let mut buf = [POISON; 30];
        assert_eq!(d.buffer_len(), CAPTURE.len());
        assert_eq!(d.emit(&mut buf), Ok(CAPTURE.len()));
        assert_eq!(&buf[..CAPTURE.len()], &CAPTURE);
        assert!(buf[CAPTURE.len()..].iter().all(|&b| b == POISON));
    }

    #[test]
    fn multi_byte_ids_field_by_field() {
        let bytes = [
            0x7b, 0xbd, // Quarter Stream ID = 15,293 (2-byte varint)
            0x80, 0x00, 0x00, 0x03, // Context ID = 3 (non-minimal 4-byte varint)
            0xde, 0xad, // payload
        ];
        let d = Datagram::parse(&bytes).unwrap();
        assert_eq!(
            (d.quarter_stream_id, d.context_id, d.payload),
            (15_293, 3, &[0xde, 0xad][..])
        );
    }

    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of a QUIC DATAGRAM frame whose payload is too short to allow
    //# parsing the Quarter Stream ID field MUST be treated as an HTTP/3
    //# connection error of type H3_DATAGRAM_ERROR (0x33).
    #[test]
    fn truncated_at_every_length_names_the_field() {
        let bytes = [0x7b, 0xbd, 0x80, 0x00, 0x00, 0x03];
        for cut in 0..bytes.len() {
            let want = if cut < 2 {
                Error::TruncatedQuarterStreamId
            } else {
                Error::TruncatedContextId
            };
            assert_eq!(Datagram::parse(&bytes[..cut]), Err(want), "cut {cut}");
        }
        // Empty payload after a complete header is legal.
        assert_eq!(Datagram::parse(&bytes).unwrap().payload, &[] as &[u8]);
    }

    //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1
    //# Receipt of an HTTP/3 Datagram that includes a larger value MUST be
    //# treated as an HTTP/3 connection error of type H3_DATAGRAM_ERROR (0x33).
    #[test]
    fn quarter_stream_id_above_2_60_minus_1_is_rejected() {
        let mut buf = [0u8; 9];
        varint::encode(MAX_QUARTER_STREAM_ID, &mut buf).unwrap();
        assert_eq!(
            H3Datagram::parse(&buf[..8]).unwrap().quarter_stream_id,
            MAX_QUARTER_STREAM_ID
        );
        varint::encode(MAX_QUARTER_STREAM_ID + 1, &mut buf).unwrap();
        assert_eq!(
            H3Datagram::parse(&buf[..8]),
            Err(Error::QuarterStreamIdTooLarge)
        );
        assert_eq!(
            emit_header(MAX_QUARTER_STREAM_ID + 1, 0, &mut buf),
            Err(Error::QuarterStreamIdTooLarge)
        );
    }

    #[test]
    fn stream_id_conversion() {
        assert_eq!(quarter_stream_id(0), Ok(0));
        assert_eq!(quarter_stream_id(8), Ok(2));
        assert_eq!(quarter_stream_id(2), Err(Error::NotARequestStream));
        assert_eq!(
            quarter_stream_id(u64::MAX - 3),
            Err(Error::QuarterStreamIdTooLarge)
        );
    }

    #[test]
    fn emit_reports_short_buffers() {
        let d = Datagram {
            quarter_stream_id: 1,
            context_id: 0,
            payload: &[1, 2, 3],
        };
        for len in 0..d.buffer_len() {
            assert_eq!(
                d.emit(&mut vec![0; len]),
                Err(Error::BufferTooSmall),
                "len {len}"
            );
        }
        let c = ContextPayload {
            context_id: 70,
            payload: &[9],
        };
        for len in 0..c.buffer_len() {
            assert_eq!(
                c.emit(&mut vec![0; len]),
                Err(Error::BufferTooSmall),
                "len {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn round_trip(q in 0..=MAX_QUARTER_STREAM_ID, c in 0..=varint::MAX,
                      payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let d = Datagram { quarter_stream_id: q, context_id: c, payload: &payload };
            let mut buf = vec![POISON; d.buffer_len() + 4];
            let n = d.emit(&mut buf).unwrap();
            prop_assert_eq!(n, d.buffer_len());
            prop_assert_eq!(Datagram::parse(&buf[..n]), Ok(d));
            prop_assert!(buf[n..].iter().all(|&b| b == POISON));
            let inner = ContextPayload { context_id: c, payload: &payload };
            let mut buf2 = vec![0; inner.buffer_len()];
            inner.emit(&mut buf2).unwrap();
            prop_assert_eq!(ContextPayload::parse(&buf2), Ok(inner));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = Datagram::parse(&bytes);
            let _ = ContextPayload::parse(&bytes);
        }
    }
}
