//! The agent's addresses on a real interface. Needs root; fails (not skips) without it.
//!
//! Each test runs on its own thread moved into a fresh network namespace
//! (`unshare(CLONE_NEWNET)` affects only the calling thread) holding an up veth pair, so the
//! tests run in parallel with anything and leave nothing behind, pass or fail. `ip -j`, run from
//! that thread, checks what is on the interface independently of the code under test.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use mimiq_agent::addr::HostAddresses;
use mimiq_agent::{AddressSet, AddressSetConfig};
use mimiq_masque::netcfg::NetConfigError;
use serde_json::Value;

fn in_netns(f: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the address tests need root (network namespaces, rtnetlink)"
    );
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only moves the calling thread into a new network
        // namespace; it touches no memory. Everything this thread opens afterwards (sockets,
        // child processes) belongs to the new namespace, which ends with the thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v0", "up"]);
        ip(&["link", "set", "v1", "up"]);
        f();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Global-scope addresses on v0, by address.
fn on_v0() -> std::collections::BTreeMap<IpAddr, Value> {
    let links: Value = serde_json::from_str(&ip(&["-j", "addr", "show", "dev", "v0"])).unwrap();
    links[0]["addr_info"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| (a["local"].as_str().unwrap().parse().unwrap(), a))
        .collect()
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn set() -> AddressSet {
    let config = AddressSetConfig {
        expiry_margin_ms: 2_000,
        ..AddressSetConfig::default()
    };
    AddressSet::new(config, 3).unwrap()
}

#[test]
fn allocated_addresses_go_on_the_interface_and_leave_at_expiry_and_on_drop() {
    in_netns(|| {
        let mut set = set();
        set.add_allocation(
            0,
            &[
                (addr("2001:db8:1:2::a"), Duration::from_secs(30)),
                (addr("2001:db8:1:2::b"), Duration::from_secs(60)),
                (addr("10.0.0.9"), Duration::from_secs(60)),
            ],
        );
        let mut host = HostAddresses::open("v0").unwrap();
        let report = host.sync(0, &mut set);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.added.len(), 3);

        let shown = on_v0();
        assert_eq!(shown.len(), 3, "{shown:?}");
        let a = &shown[&addr("2001:db8:1:2::a")];
        assert_eq!(a["prefixlen"], 128);
        assert_eq!(a["nodad"], true, "{a}");
        assert!(a.get("tentative").is_none(), "usable at once: {a}");
        // Valid until expiry + 1 s of slack; preferred until the 2 s expiry margin.
        assert!(
            (30..=31).contains(&a["valid_life_time"].as_u64().unwrap()),
            "{a}"
        );
        assert!(
            (27..=28).contains(&a["preferred_life_time"].as_u64().unwrap()),
            "{a}"
        );
        let v4 = &shown[&addr("10.0.0.9")];
        assert_eq!(v4["prefixlen"], 32);
        assert!(
            (60..=61).contains(&v4["valid_life_time"].as_u64().unwrap()),
            "{v4}"
        );
        // Usable at once: a socket binds the new IPv6 address right away.
        std::net::UdpSocket::bind("[2001:db8:1:2::a]:0").expect("bind a fresh address");

        // The first address expires (virtual clock): the set drops it, the interface follows.
        let report = host.sync(30_000, &mut set);
        assert_eq!(report.removed, vec![addr("2001:db8:1:2::a")]);
        let shown = on_v0();
        assert!(!shown.contains_key(&addr("2001:db8:1:2::a")));
        assert_eq!(shown.len(), 2);

        // An address removed behind the agent's back is no obstacle: drop takes the rest off.
        ip(&["addr", "del", "10.0.0.9/32", "dev", "v0"]);
        drop(host);
        assert!(
            on_v0().is_empty(),
            "drop removed every address: {:?}",
            on_v0()
        );
    });
}

#[test]
fn a_missing_interface_is_a_clear_error() {
    in_netns(|| {
        let e = HostAddresses::open("nosuch0").unwrap_err();
        assert!(
            matches!(&e, NetConfigError::NoSuchLink { link, .. } if link == "nosuch0"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "look up interface: no interface named \"nosuch0\""
        );
        // An interface that vanishes later: errors in the report, counted, no panic; the
        // address stays pending so a later sync would retry.
        let mut host = HostAddresses::open("v0").unwrap();
        ip(&["link", "del", "v0"]);
        let mut set = set();
        set.add_allocation(0, &[(addr("10.0.0.1"), Duration::from_secs(10))]);
        let report = host.sync(0, &mut set);
        assert_eq!(report.errors.len(), 1);
        assert!(
            report.errors[0]
                .to_string()
                .ends_with("no interface named \"v0\""),
            "{}",
            report.errors[0]
        );
        assert_eq!(host.counters().errors_total, 1);
        assert_eq!(host.installed().count(), 0);
    });
}
