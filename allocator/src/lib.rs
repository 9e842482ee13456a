//! mimiq-allocator: pools, leases, SID alias epochs, the relay protocol and the lease store.
//!
//! Not built yet: this crate holds the place that ARCHITECTURE.md §2 gives it.
#![forbid(unsafe_code)]
