//! mimiq-agent: the client agent (address sets, hop strategies, QUIC connection migration).
//!
//! The sans-IO core decides *when* a connection hops ([`strategy`]) and *which* address it
//! hops to, when to ask the allocator for more addresses and when to release and drop them
//! ([`addrset`]); [`hopper`] puts the two together per connection with expiry-forced hops and
//! counters (what the migration driver calls before each packet), and [`config`] is the agent's
//! config file. These never read a clock, open a socket or spawn a thread: time is an argument
//! and the results are plain data, so they are tested on a virtual clock. Each value is owned by
//! one thread (the agent's event loop); none is shared. Nothing here panics on input: bad
//! configs are errors.
//!
//! The I/O shells around it: [`addr`] (addresses on the host over netlink), [`alloc_client`]
//! (the allocator through the access switch's relay), [`migrate`] (the quiche migration driver),
//! [`direct`] (direct mode: any quiche client connection hops between local addresses) and
//! [`tunnel`] (tunnel mode: the agent is the CONNECT-IP client of `mimiq-proxy`, through
//! `mimiq_masque::client`, and its one connection hops). The `mimiq-agent` binary
//! (`src/main.rs`) runs tunnel mode from a config file.
#![forbid(unsafe_code)]

/// The agent's addresses on the host interface (netlink; IPv6 /128 nodad, IPv4 /32).
pub mod addr;
pub mod addrset;
/// The allocator client: keeps the address set supplied, releases, backs off on failure.
pub mod alloc_client;
pub mod config;
/// Direct mode: a hopping quiche client connection over one UDP socket per local address.
pub mod direct;
pub mod hopper;
pub mod metrics;
/// The QUIC migration driver: probe, migrate, retire CIDs; sans-IO around `quiche::Connection`.
pub mod migrate;
pub mod rng;
pub mod strategy;
pub mod tunnel;

pub use addrset::{AddressSet, AddressSetConfig};
pub use config::AgentConfig;
pub use hopper::{ConnectionHopper, PacketAction};
pub use strategy::{Decision, HopStrategy, HopStrategyConfig};
