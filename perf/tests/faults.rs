//! Faults under load (`mimiq_perf::faults`, also `mimiq-perf faults`): the switch, the
//! allocator and the proxy killed with SIGKILL in the middle of a TCP download through them and
//! started again, and an agent killed. Every byte must arrive as sent, every lease survive, and
//! a killed agent's addresses be withdrawn at their expiry. (The agent's own tunnel across a
//! proxy's kill -9 is in perf/tests/agent_tunnel.rs; the allocator's leases across kill -9 at
//! random moments under allocation load in allocator/tests/crash.rs.)

use mimiq_perf::faults::{self, Fault};
use mimiq_perf::testbed::require_root;

fn check(f: Fault) {
    eprintln!(
        "{}: {} ms ({}); {}",
        f.fault, f.recovery_ms, f.recovered_when, f.detail
    );
    assert!(f.survived, "{f:?}");
    assert_eq!(f.lost_bytes, 0, "{f:?}");
}

#[test]
fn a_switch_killed_under_a_tcp_download_comes_back_from_the_rule_snapshot_and_no_byte_is_lost() {
    require_root();
    check(faults::switch(60_000_000).unwrap());
}

#[test]
fn an_allocator_killed_under_a_tcp_download_comes_back_with_every_lease_and_no_byte_is_lost() {
    require_root();
    check(faults::allocator(60_000_000).unwrap());
}

#[test]
fn a_proxy_killed_under_a_tcp_download_gets_the_tunnel_back_with_its_addresses_and_no_byte_is_lost()
{
    require_root();
    check(faults::proxy(100_000_000).unwrap());
}

#[test]
fn a_killed_agents_addresses_are_withdrawn_at_their_expiry() {
    require_root();
    check(faults::agent().unwrap());
}
