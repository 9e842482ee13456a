//! Reproducible experiments. Each one builds its topology, measures a baseline and mimiq in the
//! same run, and reports ratios, so figures survive a shared, drifting machine.

pub mod bulk_hop;
pub mod figure3;
pub mod forwarding;
pub mod interop;
pub mod l2fwd;
pub mod masque;
pub mod privacy;
pub mod single_box;
