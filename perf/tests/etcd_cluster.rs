//! The testbed's etcd cluster (`mimiq_perf::etcd`): three members in namespaces of their own on
//! one LAN, real `etcd` processes from the system package. It keeps taking writes with one
//! member killed (SIGKILL), refuses them with two (no quorum), and a killed member restarted on
//! its data directory catches up with what was written while it was down.

use std::time::Duration;

use mimiq_perf::etcd::{self, EtcdCluster};
use mimiq_perf::testbed::{require_root, Testbed};

#[test]
fn a_three_member_cluster_survives_a_killed_member_which_catches_up_after_a_restart() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    let members = etcd::lan(&mut tb, &["e1", "e2", "e3"]).unwrap();
    let members: Vec<(&str, std::net::IpAddr)> =
        members.iter().map(|(h, ip)| (h.as_str(), *ip)).collect();
    let data = tempfile::tempdir().unwrap();
    let mut cluster = EtcdCluster::start(&tb, &members, data.path()).unwrap();
    assert_eq!(
        cluster.endpoints(),
        "http://198.19.1.1:2379,http://198.19.1.2:2379,http://198.19.1.3:2379"
    );

    cluster.put(&tb, "mimiq/test/before", "1").unwrap();
    for i in 0..3 {
        assert_eq!(
            cluster.get_from(&tb, i, "mimiq/test/before").unwrap(),
            Some("1".into()),
            "member {i}"
        );
    }

    // One of three killed: two still make a quorum, and a write commits (once they have
    // elected a new leader, if the killed one led: a write in between times out, and is tried
    // again).
    cluster.kill(2);
    mimiq_testkit::eventually(Duration::from_secs(20), || {
        cluster.put(&tb, "mimiq/test/while-down", "2")
    })
    .unwrap();
    assert_eq!(
        cluster.get(&tb, "mimiq/test/while-down").unwrap(),
        Some("2".into())
    );

    // Restarted on its data directory, the member applies what it missed.
    cluster.restart(&tb, 2).unwrap();
    mimiq_testkit::eventually(Duration::from_secs(20), || {
        match cluster.get_from(&tb, 2, "mimiq/test/while-down")? {
            Some(v) if v == "2" => Ok(()),
            other => Err(format!("member e3 has {other:?}")),
        }
    })
    .unwrap();

    // Two of three killed: no quorum, so a write fails (within etcdctl's timeout) instead of
    // pretending to succeed.
    cluster.kill(1);
    cluster.kill(2);
    let refused = cluster.put(&tb, "mimiq/test/no-quorum", "3");
    assert!(refused.is_err(), "a write without a quorum: {refused:?}");
}
