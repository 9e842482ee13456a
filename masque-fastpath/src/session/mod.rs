//! MASQUE session state machines, sans-IO: they take caller-owned buffers and parsed capsules and
//! return plain data (capsules to send, per-packet verdicts). No sockets, clocks or threads.
//!
//! - [`connect_ip`]: the proxy side of a CONNECT-IP session (RFC 9484).
//! - [`connect_udp`]: the proxy side of a CONNECT-UDP session (RFC 9298).

pub mod connect_ip;
pub mod connect_udp;
