//! mimiq-agent: the client agent (address sets, hop strategies, QUIC connection migration).
//!
//! Not built yet: this crate holds the place that ARCHITECTURE.md §2 gives it.
#![forbid(unsafe_code)]
