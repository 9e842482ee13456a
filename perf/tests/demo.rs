//! The main job (`scripts/demo`, `mimiq_perf::demo`) as a test: two clients hopping at once
//! through the single box and the MASQUE proxy. It returns an error when any of its checks
//! fails: a download not byte-exact (so neither client got the other's traffic), a client that
//! never hopped, a connection ID seen from two client addresses or a client address used
//! outside its lease + t_remove in the capture of the outside link, a spoofed source that got
//! through.

use mimiq_perf::testbed::require_root;

#[test]
fn two_hopping_clients_end_to_end_pass_every_check_of_the_demo() {
    if !require_root() {
        return;
    }
    mimiq_perf::demo::run(8).unwrap();
}
