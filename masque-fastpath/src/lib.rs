//! mimiq-masque: the MASQUE proxy (CONNECT-IP, RFC 9484, and CONNECT-UDP, RFC 9298, over HTTP/3
//! datagrams on quiche) and its client library.
//!
//! Not built yet: this crate holds the place that ARCHITECTURE.md §2 gives it. The capsule codec,
//! datagram framing, sessions and the quiche glue land with their issue.
#![forbid(unsafe_code)]
