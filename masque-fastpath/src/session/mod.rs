//! MASQUE session state machines, sans-IO: they take caller-owned buffers and parsed capsules and
//! return plain data (capsules to send, per-packet verdicts). No sockets, clocks or threads.
//!
//! - [`connect_ip`]: the proxy side of a CONNECT-IP session (RFC 9484).

pub mod connect_ip;
