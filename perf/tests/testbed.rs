//! The testbed builds real namespaces and removes every trace of them, also after a panic.

use std::time::Duration;

use mimiq_perf::testbed::{self, require_root, topology, Testbed, TestbedError};

fn namespaces_of(id: &str) -> Vec<String> {
    let prefix = format!("{}{id}-", testbed::NETNS_PREFIX);
    testbed::list_netns()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn teardown_removes_namespaces_links_and_processes() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::bridge(&mut tb).unwrap();
    let id = tb.id().to_string();
    assert_eq!(namespaces_of(&id).len(), 3, "h1, sw, h2");
    tb.exec_ok("h1", &["ping", "-c", "1", "-W", "2", topology::addr::H2_V4])
        .expect("the bridge topology connects h1 and h2");
    let mut sleeper = tb.spawn("sw", &["sleep", "600"], false).unwrap();
    assert!(sleeper.try_status().is_none(), "running");
    drop(tb);
    assert!(namespaces_of(&id).is_empty(), "no namespace left");
    // The testbed killed the process with its namespace; the handle only reaps it.
    let status = sleeper
        .wait_timeout(Duration::from_secs(5))
        .expect("process killed");
    assert!(!status.success());
}

#[test]
fn a_panic_in_the_middle_of_a_test_still_tears_everything_down() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut tb = Testbed::new().unwrap();
        tb.add_host("a").unwrap();
        tb.add_host("b").unwrap();
        tx.send(tb.id().to_string()).unwrap();
        // Half-built: one link, then a failure.
        tb.add_link(("a", "x0"), ("b", "x0"), Default::default())
            .unwrap();
        panic!("deliberate panic halfway through building a topology");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let id = rx.recv().unwrap();
    assert!(
        namespaces_of(&id).is_empty(),
        "namespaces of {id} removed during unwinding"
    );
}

#[test]
fn two_topologies_built_at_once_do_not_collide() {
    require_root();
    let build_and_ping = || {
        std::thread::spawn(|| {
            let mut tb = Testbed::new()?;
            topology::bridge(&mut tb)
                .map_err(|e| e.to_string())
                .unwrap();
            // Same addresses in both testbeds: they are separate networks.
            tb.exec_ok(
                "h1",
                &[
                    "ping",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    topology::addr::H2_V4,
                ],
            )?;
            tb.exec_ok(
                "h2",
                &[
                    "ping",
                    "-6",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    topology::addr::H1_V6,
                ],
            )?;
            Ok::<String, TestbedError>(tb.id().to_string())
        })
    };
    let (a, b) = (build_and_ping(), build_and_ping());
    let id_a = a.join().unwrap().unwrap();
    let id_b = b.join().unwrap().unwrap();
    assert_ne!(id_a, id_b);
    assert!(namespaces_of(&id_a).is_empty() && namespaces_of(&id_b).is_empty());
}

#[test]
fn bad_names_and_addresses_are_refused_with_an_error() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    assert!(matches!(
        tb.add_host("Bad_Name"),
        Err(TestbedError::BadHostName(_))
    ));
    assert!(matches!(
        tb.add_host("waytoolonghostname"),
        Err(TestbedError::BadHostName(_))
    ));
    tb.add_host("a").unwrap();
    assert!(matches!(
        tb.add_addr("a", "lo", "10.1.2.3/24"),
        Err(TestbedError::BadAddress(_))
    ));
    assert!(matches!(
        tb.add_addr("zz", "lo", "198.18.0.1/24"),
        Err(TestbedError::UnknownHost(_))
    ));
    let err = tb.add_addr("a", "nosuch0", "198.18.0.1/24").unwrap_err();
    assert!(matches!(err, TestbedError::Command { .. }), "{err}");
    assert!(
        err.to_string().contains("nosuch0"),
        "the error names the command: {err}"
    );
}
