//! mimiq-masque: the MASQUE proxy (CONNECT-IP, RFC 9484, and CONNECT-UDP, RFC 9298, over HTTP/3
//! datagrams on quiche) and its client library.
//!
//! Built so far: the sans-IO codec, one protocol per module.
//!
//! - [`varint`]: QUIC variable-length integers (RFC 9000 §16).
//! - [`capsule`]: the capsule protocol (RFC 9297 §3) with DATAGRAM and the CONNECT-IP capsules
//!   ADDRESS_ASSIGN, ADDRESS_REQUEST and ROUTE_ADVERTISEMENT (RFC 9484 §4.7), and a streaming
//!   decoder that skips unknown capsule types.
//! - [`datagram`]: HTTP datagram framing (RFC 9297 §2.1 quarter stream ID, RFC 9298/9484 context
//!   ID).
//! - [`template`]: the CONNECT-UDP and CONNECT-IP URI templates (RFC 9298 §2, RFC 9484 §4.6).
//!
//! Threading: plain functions and values; nothing shared, nothing blocks, every type is `Send`.
//! What may panic: nothing on input. Every parser returns a small `Copy` error enum on any byte
//! sequence (property tests over random bytes check it). The sessions and the quiche glue land
//! with the rest of issue 6.
#![forbid(unsafe_code)]

pub mod capsule;
pub mod datagram;
pub mod template;
pub mod varint;
