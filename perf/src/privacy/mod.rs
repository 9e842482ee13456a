//! The privacy evaluation: how much an on-path attacker learns about a client whose tunnel hops
//! to a new IP address every N packets.
//!
//! The evaluation follows the MIMIQ paper §5. The attacker captures the link outside the
//! client, splits the capture into sub-flows by client address, and runs closed-world website
//! fingerprinting on each sub-flow: the fewer packets a sub-flow holds, the less it says about
//! the page. A second attacker tries to undo the splitting by linking a client's consecutive
//! sub-flows. `perf/src/experiments/privacy.rs` loads the pages through the testbed, captures
//! the packets and hands them to the pure analysis here:
//!
//! - [`sites`]: the synthetic websites and the variation between visits of one site, fixed by a
//!   seed;
//! - [`features`]: a sub-flow's feature vector (k-FP's hand-crafted features and Tik-Tok's
//!   directional timing);
//! - [`classify`]: closed-world accuracy of a random forest by stratified cross-validation;
//! - [`linkage`]: the attacker who chains sub-flows by timing and volume continuity;
//! - [`stats`]: tests of the address allocator (uniformity, next-address prediction);
//! - [`web`]: the sites on the wire (an HTTP/1.1 server and a page load).
//!
//! Everything is deterministic for a given seed, and nothing panics on bad input: malformed
//! input is an `Err` with a message, or a documented value (zeros for an empty sub-flow).

pub mod classify;
pub mod features;
pub mod linkage;
pub mod sites;
pub mod stats;
pub mod web;

#[cfg(test)]
mod tests {
    use super::classify::cross_validate;
    use super::features::{features, Dir, Packet};
    use super::sites::generate;

    /// A crude packet trace of a page load, standing in for the testbed: per object one
    /// 300-byte request, then the response in 1350-byte packets (the last one shorter),
    /// 1 ms apart, with a 20 ms round trip between objects.
    fn trace(objects: &[u32]) -> Vec<Packet> {
        let mut packets = Vec::new();
        let mut at = 0.0;
        for &size in objects {
            packets.push(Packet {
                at,
                size: 300,
                dir: Dir::Out,
            });
            at += 0.02;
            let mut left = size;
            while left > 0 {
                let chunk = left.min(1350);
                packets.push(Packet {
                    at,
                    size: chunk + 50,
                    dir: Dir::In,
                });
                left -= chunk;
                at += 0.001;
            }
        }
        packets
    }

    /// Whole page loads identify the site; sub-flows of a few packets say much less.
    #[test]
    fn whole_traces_are_fingerprinted_and_short_sub_flows_are_not() {
        let sites = generate(42, 10);
        let mut whole = (Vec::new(), Vec::new());
        let mut short = (Vec::new(), Vec::new());
        for site in &sites {
            for visit in 0..10 {
                let packets = trace(&site.visit(visit));
                whole.0.push(features(&packets));
                whole.1.push(site.id);
                // A sub-flow of 10 packets from the middle of the load.
                let mid = packets.len() / 2;
                short
                    .0
                    .push(features(&packets[mid..(mid + 10).min(packets.len())]));
                short.1.push(site.id);
            }
        }
        let whole = cross_validate(&whole.0, &whole.1, 5, 50, 1).expect("valid input");
        let short = cross_validate(&short.0, &short.1, 5, 50, 1).expect("valid input");
        assert!(whole.accuracy >= 0.9, "{whole:?}");
        assert!(
            short.accuracy < whole.accuracy - 0.2,
            "{short:?} vs {whole:?}"
        );
    }
}
