//! The testbed's etcd cluster (`mimiq_perf::etcd`): three members in namespaces of their own on
//! one LAN, real `etcd` processes from the system package. It keeps taking writes with one
//! member killed (SIGKILL), refuses them with two (no quorum), and a killed member restarted on
//! its data directory catches up with what was written while it was down. And the allocator's
//! etcd store (`allocator/src/store/etcd.rs`) on it.

use std::time::Duration;

use mimiq_allocator::lease::{JournalOp, Lease};
use mimiq_allocator::store::{EtcdSettings, EtcdStore, Store, MAX_TXN_OPS};
use mimiq_allocator::{Family, Mac};
use mimiq_perf::etcd::{self, EtcdCluster};
use mimiq_perf::singlebox::{self, LONG};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::topology;
use mimiq_perf::testbed::{require_root, Testbed};

/// Three members (e1–e3) on one LAN with `also` (hosts of the testbed or new ones) as their
/// clients, started; their data in the directory returned.
fn three_members(tb: &mut Testbed, also: &[&str]) -> (EtcdCluster, tempfile::TempDir) {
    let hosts: Vec<&str> = ["e1", "e2", "e3"].iter().chain(also).copied().collect();
    let lan = etcd::lan(tb, &hosts).unwrap();
    let data = tempfile::tempdir().unwrap();
    let cluster = EtcdCluster::start(tb, &lan[..3], data.path()).unwrap();
    (cluster, data)
}

#[test]
fn a_three_member_cluster_survives_a_killed_member_which_catches_up_after_a_restart() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    let (mut cluster, _data) = three_members(&mut tb, &[]);
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

#[test]
fn the_allocators_etcd_store_survives_a_takeover_skips_stray_keys_and_fences_a_lost_owner() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    let (cluster, _data) = three_members(&mut tb, &[]);
    let endpoints = cluster.endpoints();
    let settings = |owner: &str, wait_ms: u64| EtcdSettings {
        endpoints: endpoints.split(',').map(str::to_string).collect(),
        prefix: "/mimiq/test/".into(),
        user: None,
        connect_timeout: Duration::from_millis(wait_ms),
        request_timeout: Duration::from_secs(2),
        owner: owner.into(),
    };
    let (first, second, second_late) = (
        settings("first", 10_000),
        settings("second", 1_000),
        settings("second", 10_000),
    );
    let eps = endpoints.clone();
    // The clients run on a thread inside e1 (the cluster's addresses are the testbed's).
    tb.run_in("e1", move || {
        let etcdctl = |args: &[&str]| {
            let out = std::process::Command::new("etcdctl")
                .args(["--endpoints", &eps])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        };
        let mut a = EtcdStore::open(&first).unwrap();
        assert!(a.load().unwrap().leases.is_empty());
        // 1,000 leases in one batch: 16 transactions of at most 64 operations.
        let leases: Vec<Lease> = (0..1000u32)
            .map(|i| Lease {
                ip: std::net::IpAddr::from([10, 7, (i / 250) as u8, (i % 250) as u8]),
                mac: Mac([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
                sid: 1 + (i % 3) as u16,
                port: 0,
                assigned_ms: 1_000,
                expires_ms: 61_000,
            })
            .collect();
        let puts: Vec<JournalOp> = leases.iter().map(|l| JournalOp::PutLease(*l)).collect();
        assert!(puts.len() > 10 * MAX_TXN_OPS);
        a.commit(&puts).unwrap();
        a.commit(&[JournalOp::DeleteLease(leases[0].ip)]).unwrap();

        // A second allocator cannot serve the prefix while the first holds it.
        let refused = EtcdStore::open(&second).err().expect("the prefix is held");
        assert!(
            refused
                .to_string()
                .contains("served by another allocator (first)"),
            "{refused}"
        );
        // The first stops (cleanly: it gives the prefix up); the second takes over with
        // everything the first committed.
        drop(a);
        let mut b = EtcdStore::open(&second_late).unwrap();
        let mut got = b.load().unwrap().leases;
        got.sort_by_key(|l| l.ip);
        let mut want = leases[1..].to_vec();
        want.sort_by_key(|l| l.ip);
        assert_eq!(got, want);

        // A stray key under the prefix is skipped and counted, not fatal.
        etcdctl(&["put", "/mimiq/test/lease/zz", "not a lease"]);
        assert_eq!(b.load().unwrap().leases.len(), 999);
        assert_eq!(b.skipped(), 1);

        // The owner key gone (as after a partition longer than its lease, with another
        // allocator in its place): the next commit is refused, not written.
        etcdctl(&["del", "/mimiq/test/owner"]);
        let fenced = b
            .commit(&[JournalOp::PutLease(leases[0])])
            .expect_err("a commit without the owner key");
        assert!(fenced.to_string().contains("no longer holds"), "{fenced}");
    })
    .unwrap();
}

#[test]
fn an_allocator_on_etcd_killed_and_replaced_serves_the_same_leases_through_the_switch() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::single_box(&mut tb).unwrap();
    // Three members, and the single box's switch host on their LAN (its allocator's client).
    let (cluster, _data) = three_members(&mut tb, &["sw"]);
    let dir = tempfile::tempdir().unwrap();
    // The single box's allocator config, its store on the cluster.
    let cfg = singlebox::allocator_config(dir.path(), &LONG);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let redb = format!("store = \"{}\"", dir.path().join("leases.redb").display());
    assert!(text.contains(&redb), "{text}");
    let endpoints: Vec<String> = (cluster.endpoints().split(','))
        .map(|e| format!("\"{e}\""))
        .collect();
    let text = text.replace(&redb, "store = \"etcd\"")
        + &format!(
            "\n[etcd]\nendpoints = [{}]\nprefix = \"/mimiq/sb/\"\n",
            endpoints.join(", ")
        );
    std::fs::write(&cfg, text).unwrap();
    let mut allocator = singlebox::start_allocator(&tb, "sw", &cfg);
    let sw_cfg = singlebox::switch_config(dir.path(), 1);
    let _switch = Switch::start(
        &tb,
        "sw",
        &["--config", sw_cfg.to_str().unwrap()],
        &dir.path().join("stats.json"),
    )
    .unwrap_or_else(|e| panic!("{e}; allocator: {}", allocator.describe()));
    let a = singlebox::allocate(&tb, "c1", Family::V4).addr;
    let b = singlebox::allocate(&tb, "c2", Family::V4).addr;
    assert_ne!(a, b);

    // kill -9: the owner key stays until its etcd lease lapses; the replacement waits for it,
    // loads the leases from etcd and serves.
    allocator.signal(libc::SIGKILL);
    allocator.wait_timeout(Duration::from_secs(5)).unwrap();
    let mut allocator = singlebox::start_allocator(&tb, "sw", &cfg);
    let bin = mimiq_perf::testbed::bin_path("mimiq-allocator").unwrap();
    let listed = mimiq_testkit::eventually(Duration::from_secs(30), || {
        let out = tb
            .exec(
                "sw",
                &[
                    bin.to_str().unwrap(),
                    "leases",
                    "--config",
                    cfg.to_str().unwrap(),
                ],
            )
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains(&a.to_string()) {
            Ok(text)
        } else {
            Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr)))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; allocator: {}", allocator.describe()));
    assert!(listed.contains(&b.to_string()), "{listed}");
    // A new client gets neither address: nothing is handed out twice.
    let c = singlebox::allocate(&tb, "c3", Family::V4).addr;
    assert!(c != a && c != b, "{c} was handed out again");
    assert!(allocator.try_status().is_none(), "{}", allocator.describe());
}
