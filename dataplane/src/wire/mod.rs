//! Zero-copy packet views and emitters, one protocol per file (smoltcp's `wire`).
