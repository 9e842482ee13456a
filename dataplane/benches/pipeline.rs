//! Pipeline cost per packet (filled in by the next commit).
fn main() {}
