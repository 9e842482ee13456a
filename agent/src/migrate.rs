//! The migration driver both of the client's modes run is `mimiq_masque::migrate` (direct mode's
//! [`crate::direct::DirectConnection`], and tunnel mode through the MASQUE client); it is
//! re-exported here. Its in-memory tests are in `h3test/tests/migrate.rs`, with direct mode's
//! test peers.

pub use mimiq_masque::migrate::*;
