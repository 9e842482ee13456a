//! mimiq-dataplane: the poll-mode AF_XDP packet processor that runs mimiq's switches.
//!
//! Layout (ARCHITECTURE.md §2–3): [`port`] (AF_XDP and in-memory ports), [`engine`] (the
//! poll-mode worker), [`pipeline`] (what a worker does with a burst: l2fwd, the MIMIQ roles),
//! [`config`] (the `mimiq-switch` config file); the packet views are [`wire`] (mimiq-wire).
//!
//! Threading: each worker is one thread that owns its ports, frame memory, pipeline and
//! counters; it shares nothing on the packet path. The `mimiq-switch` main thread publishes the
//! counters a worker copies out between bursts.
//!
//! Panics: nothing here panics on input (frames, config files, kernel descriptors). `unsafe`
//! lives only in `port::xsk` (AF_XDP rings and `poll`), each block with its `SAFETY:` argument.

pub mod config;
pub mod control;
pub mod engine;
pub mod pipeline;
pub mod port;
pub mod slowpath;
pub mod tables;
pub mod telemetry;

/// The packet views, emitters and checksum, from their own crate (wire/).
pub use mimiq_wire as wire;
