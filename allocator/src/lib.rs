//! mimiq-allocator: the only writer of address state in a mimiq network (ARCHITECTURE.md §1, §4,
//! §5; seed 000 §3.2–3.3).
//!
//! It hands out sets of random, unused, unpredictable addresses (drawn with the OS CSPRNG through
//! `ring`) with lifetimes `t_ip`, keeps their forwarding rules `t_remove` after they end, rotates
//! the SID alias sets every `t_sid`, pushes rule updates to the switches and keeps every lease in
//! a crash-safe journal.
//!
//! # Layout
//!
//! * Sans-IO core — [`pool`], [`alias`], [`lease`]: no sockets, no clocks (time is an argument),
//!   no threads; tested in microseconds on a virtual clock.
//! * [`proto`]: the relay protocol and rule-update wire formats (shared with the dataplane and the
//!   agent), and [`client`]: the agent's side of it.
//! * [`store`]: the lease journal ([`store::Store`]; [`store::MemStore`] and the embedded
//!   [`store::RedbStore`]).
//! * [`publish`]: rule-update fan-out to switches over bounded in-process queues (used by the
//!   TCP publisher, and directly by a switch hosting the allocator).
//! * [`config`]: the `mimiq-allocator` TOML configuration.
//! * [`server`]: the I/O shell — UDP request server, TCP rule publisher, metrics endpoint.
//!
//! [`config`], [`server`] and [`store::RedbStore`] (and the binary) need the default `server`
//! feature; without it the crate is the core, the wire formats, [`store::MemStore`], [`publish`]
//! and [`client`], with no redb, clap or toml.
//!
//! # Threading model
//!
//! The core is a plain single-threaded value (`Allocator: Send`, no interior locking). The server
//! runs it on one *core thread* that owns the allocator and the store: it reads a batch of
//! datagrams, applies them, commits the batch's journal in one transaction (group commit), and only
//! then sends the replies and publishes the batch's rule updates. Around it, an acceptor thread
//! takes rule-stream subscribers, one writer thread per subscriber drains a bounded queue to its
//! TCP stream, and a metrics thread answers HTTP scrapes from atomic counters. When a switch hosts
//! the allocator on its slow-path thread, it drives [`lease::Allocator`] directly and moves the
//! updates over its own rings.
//!
//! # Panics
//!
//! Nothing panics on input (packets, configuration files, CLI arguments, store contents): bad
//! input is an error value or a counted drop. The one deliberate panic is the OS CSPRNG failing
//! after it initialised ([`rng::Csprng::next_u64`]), where continuing would make addresses
//! predictable.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod alias;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod lease;
pub mod pool;
pub mod proto;
pub mod publish;
pub mod rng;
#[cfg(feature = "server")]
pub mod server;
pub mod store;

/// An access switch identifier (seed 000 §3.3).
pub type Sid = u16;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}
