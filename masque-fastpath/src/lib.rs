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
//! - [`template`]: the CONNECT-UDP and CONNECT-IP URI templates (RFC 9298 §2, RFC 9484 §4.6),
//!   the well-known ones and any other the proxy is configured with.
//! - [`policy`]: which destinations a proxy's clients may reach (`[policy]`, RFC 9298 §7,
//!   RFC 9484 §12).
//! - [`session`]: sans-IO session state; [`session::connect_ip`] is the proxy side of a CONNECT-IP
//!   session (address assignment, routes, inner-packet checks, ICMP errors).
//!
//! Threading: plain functions and values; nothing shared, nothing blocks, every type is `Send`.
//! What may panic: nothing on input. Every parser returns a small `Copy` error enum on any byte
//! sequence or path (property tests over random input check it); errors implement `Display` and
//! `std::error::Error` for the control-path glue.
//!
//! - [`request`]: the extended CONNECT request both protocols share, and its validation with the
//!   HTTP status of each failure.
//! - [`quic`]: quiche settings shared by proxy and client (datagrams, extended CONNECT, the UDP
//!   payload for 1280-byte inner packets, spare connection IDs for migration, qlog, key log).
//! - [`migrate`]: the sans-IO migration driver that moves a client connection between local
//!   addresses (probe, then migrate, then forget the path left); the MASQUE client runs it, and
//!   so does the agent's direct mode.
//! - [`udp`]: the QUIC socket in bursts (`recvmmsg`, `sendmmsg` with UDP GSO trains).
//! - [`tundev`]: TUN devices; [`netcfg`]: addresses and routes over rtnetlink.
//! - [`steer`]: the BPF programs that steer QUIC packets to the worker owning their connection
//!   ID (SO_REUSEPORT) and a TUN device's packets to the queue of the worker serving their
//!   destination.
//! - [`server`]: the proxy (`mimiq-proxy run`); [`client`]: the client (`mimiq-proxy client`).
//!
//! `unsafe` is confined to [`udp`], [`steer`] (libbpf), the ioctls of [`tundev`], the `poll(2)`
//! calls of the two event loops and `getifaddrs(3)` in [`policy`].
#![deny(unsafe_code)]

pub mod capsule;
#[allow(unsafe_code)]
pub mod client;
pub mod datagram;
pub mod migrate;
pub mod netcfg;
#[allow(unsafe_code)]
pub mod policy;
pub mod quic;
pub mod request;
#[allow(unsafe_code)]
pub mod server;
pub mod session;
#[allow(unsafe_code)]
pub mod steer;
pub mod template;
pub mod tundev;
#[allow(unsafe_code)]
pub mod udp;
pub mod varint;
