//! `netcfg` against the real kernel. Needs root; fails (not skips) without it.
//!
//! Each test runs on its own thread moved into a fresh network namespace
//! (`unshare(CLONE_NEWNET)` affects only the calling thread), so the tests run in parallel and
//! leave nothing behind: the namespace, and the veth pair in it, vanish when the thread ends,
//! whether the test passed or panicked. `ip` run from that thread inherits its namespace and
//! checks, independently of the code under test, that each operation did what it says.
//! (veth, not dummy: veth does duplicate address detection, so `nodad` is observable, and the
//! dummy module is not available everywhere.)

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use mimiq_masque::netcfg::{AddressLifetime, Link, NetConfig, NetConfigError, Operation, Route};
use serde_json::Value;

/// Runs `f` on a thread in a fresh network namespace holding an up veth pair `v0`–`v1`, with a
/// `NetConfig` opened there and `v0` looked up.
fn in_netns(f: impl FnOnce(&NetConfig, &Link) + Send + 'static) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the netcfg tests need root (network namespaces, rtnetlink)"
    );
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) only moves the calling thread into a new network
        // namespace; it touches no memory. This thread owns no sockets yet, and everything it
        // opens afterwards (and every child it starts) belongs to the new namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "set", "v1", "up"]);
        let net = NetConfig::new().expect("open netlink");
        let link = net.link("v0").expect("v0 exists");
        f(&net, &link);
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip args…`, panicking with its stderr if it fails; returns stdout.
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

fn json(args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = ip(&full);
    if text.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&text).expect("ip -j prints JSON")
}

/// `addr_info` of `v0` as reported by `ip -j addr show dev v0`, global scope only.
fn ip_addrs() -> Vec<Value> {
    let links = json(&["addr", "show", "dev", "v0"]);
    links[0]["addr_info"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a["scope"] == "global")
        .collect()
}

fn find_addr(local: &str) -> Option<Value> {
    ip_addrs().into_iter().find(|a| a["local"] == local)
}

fn ip_routes(family: &str) -> Vec<Value> {
    json(&[family, "route", "show", "dev", "v0"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find_route(family: &str, dst: &str) -> Option<Value> {
    ip_routes(family).into_iter().find(|r| r["dst"] == dst)
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn link_lookup_finds_the_interface_and_names_a_missing_one() {
    in_netns(|net, link| {
        let shown = json(&["link", "show", "dev", "v0"]);
        assert_eq!(
            u64::from(link.index()),
            shown[0]["ifindex"].as_u64().unwrap()
        );
        assert_eq!(link.name(), "v0");
        assert_eq!(net.link_index("v0").unwrap(), link.index());
        let e = net.link("nosuch0").unwrap_err();
        assert!(
            matches!(&e, NetConfigError::NoSuchLink { op: Operation::LookupLink, link } if link == "nosuch0"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "look up interface: no interface named \"nosuch0\""
        );
        assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::NotFound);
        let e = net.link("way-too-long-a-name").unwrap_err();
        assert!(matches!(e, NetConfigError::BadArgument { .. }), "{e:?}");
    });
}

#[test]
fn set_link_up_and_mtu_change_the_link() {
    in_netns(|net, link| {
        let before = json(&["link", "show", "dev", "v0"]);
        assert!(!before[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "UP"));
        net.set_link_up(link).unwrap();
        net.set_link_up(link).unwrap(); // already up: fine
        let after = json(&["link", "show", "dev", "v0"]);
        assert!(
            after[0]["flags"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "UP"),
            "{after}"
        );
        net.set_mtu(link, 1400).unwrap();
        assert_eq!(json(&["link", "show", "dev", "v0"])[0]["mtu"], 1400);
        // Below the IPv4 minimum of a veth: the kernel refuses, and the message says what.
        let e = net.set_mtu(link, 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e:?}");
        assert!(e.to_string().starts_with("set mtu 10 on v0: "), "{e}");
        assert_eq!(json(&["link", "show", "dev", "v0"])[0]["mtu"], 1400);
    });
}

#[test]
fn ipv6_addresses_are_added_nodad_and_usable_at_once() {
    in_netns(|net, link| {
        net.set_link_up(link).unwrap();
        // Control: an address added by `ip` without nodad on this veth is tentative (DAD runs),
        // so the absence of `tentative` below is the NODAD flag at work, not the device.
        ip(&["addr", "add", "2001:db8::99/128", "dev", "v0"]);
        let control = find_addr("2001:db8::99").unwrap();
        assert_eq!(control["tentative"], true, "{control}");

        net.add_address(link, addr("2001:db8::1"), 128, None)
            .unwrap();
        let shown = find_addr("2001:db8::1").expect("address added");
        assert_eq!(shown["prefixlen"], 128);
        assert_eq!(shown["nodad"], true, "{shown}");
        assert!(shown.get("tentative").is_none(), "not tentative: {shown}");
        assert_eq!(shown["valid_life_time"], u64::from(u32::MAX), "permanent");

        // Our own listing agrees.
        let listed = net.addresses(link).unwrap();
        let mine = listed
            .iter()
            .find(|a| a.addr == addr("2001:db8::1"))
            .unwrap();
        assert_eq!(mine.prefix_len, 128);
        assert!(mine.is_nodad() && !mine.is_tentative(), "{mine:?}");
        assert_eq!(mine.valid_lft_s, None);
        let control = listed
            .iter()
            .find(|a| a.addr == addr("2001:db8::99"))
            .unwrap();
        assert!(control.is_tentative() && !control.is_nodad(), "{control:?}");

        // The address is usable: a socket can bind it right away.
        std::net::UdpSocket::bind("[2001:db8::1]:0").expect("bind a nodad address at once");
    });
}

#[test]
fn ipv4_addresses_are_added_listed_and_deleted() {
    in_netns(|net, link| {
        net.add_address(link, addr("10.9.8.7"), 32, None).unwrap();
        net.add_address(link, addr("192.0.2.5"), 24, None).unwrap();
        let a = find_addr("10.9.8.7").expect("added");
        assert_eq!(a["prefixlen"], 32);
        assert_eq!(a["family"], "inet");
        assert_eq!(find_addr("192.0.2.5").unwrap()["prefixlen"], 24);
        let listed: Vec<(IpAddr, u8)> = net
            .addresses(link)
            .unwrap()
            .iter()
            .map(|a| (a.addr, a.prefix_len))
            .collect();
        assert!(listed.contains(&(addr("10.9.8.7"), 32)), "{listed:?}");
        assert!(listed.contains(&(addr("192.0.2.5"), 24)), "{listed:?}");

        assert!(net.delete_address(link, addr("10.9.8.7"), 32).unwrap());
        assert!(find_addr("10.9.8.7").is_none());
        assert!(find_addr("192.0.2.5").is_some(), "the other one stays");
        // Deleting what is not there (again, or with another prefix length) is Ok(false).
        assert!(!net.delete_address(link, addr("10.9.8.7"), 32).unwrap());
        assert!(!net.delete_address(link, addr("192.0.2.5"), 25).unwrap());
        assert!(!net.delete_address(link, addr("2001:db8::7"), 128).unwrap());
        assert!(find_addr("192.0.2.5").is_some());
    });
}

#[test]
fn adding_an_existing_address_replaces_its_lifetimes() {
    in_netns(|net, link| {
        net.set_link_up(link).unwrap();
        for a in ["10.1.1.1", "2001:db8::5"] {
            let a = addr(a);
            let plen = if a.is_ipv4() { 32 } else { 128 };
            let life = AddressLifetime {
                valid: Duration::from_millis(99_500), // rounded up to 100 s
                preferred: Duration::from_secs(40),
            };
            net.add_address(link, a, plen, Some(life)).unwrap();
            let shown = find_addr(&a.to_string()).unwrap();
            let valid = shown["valid_life_time"].as_u64().unwrap();
            let preferred = shown["preferred_life_time"].as_u64().unwrap();
            assert!((98..=100).contains(&valid), "{shown}");
            assert!((38..=40).contains(&preferred), "{shown}");
            let info = net
                .addresses(link)
                .unwrap()
                .into_iter()
                .find(|i| i.addr == a)
                .unwrap();
            assert!(
                info.valid_lft_s.is_some_and(|s| (98..=100).contains(&s)),
                "{info:?}"
            );

            // Again, longer: not an error, the lifetimes move.
            net.add_address(
                link,
                a,
                plen,
                Some(AddressLifetime::new(Duration::from_secs(500))),
            )
            .unwrap();
            let shown = find_addr(&a.to_string()).unwrap();
            assert!(
                (498..=500).contains(&shown["valid_life_time"].as_u64().unwrap()),
                "{shown}"
            );
            assert!((498..=500).contains(&shown["preferred_life_time"].as_u64().unwrap()));
            // And without a lifetime: permanent again.
            net.add_address(link, a, plen, None).unwrap();
            let shown = find_addr(&a.to_string()).unwrap();
            assert_eq!(shown["valid_life_time"], u64::from(u32::MAX), "{shown}");
            assert_eq!(
                ip_addrs()
                    .iter()
                    .filter(|x| x["local"] == a.to_string())
                    .count(),
                1
            );
        }
        // A zero lifetime is refused before the kernel sees it.
        let e = net
            .add_address(
                link,
                addr("10.1.1.2"),
                32,
                Some(AddressLifetime::new(Duration::ZERO)),
            )
            .unwrap_err();
        assert!(matches!(e, NetConfigError::BadArgument { .. }), "{e:?}");
        assert!(e.to_string().contains("10.1.1.2/32 on v0"), "{e}");
        assert!(find_addr("10.1.1.2").is_none());
    });
}

#[test]
fn the_kernel_removes_an_address_when_its_valid_lifetime_ends() {
    in_netns(|net, link| {
        const LIFETIME: Duration = Duration::from_secs(1);
        net.set_link_up(link).unwrap();
        net.add_address(
            link,
            addr("2001:db8::77"),
            128,
            Some(AddressLifetime::new(LIFETIME)),
        )
        .unwrap();
        assert!(find_addr("2001:db8::77").is_some());
        // The kernel checks lifetimes on a timer with second granularity and some slack.
        mimiq_testkit::eventually(LIFETIME + Duration::from_secs(9), || {
            match find_addr("2001:db8::77") {
                None => Ok(()),
                Some(a) => Err(format!("still there: {a}")),
            }
        })
        .unwrap_or_else(|e| panic!("address outlived its lifetime: {e}"));
    });
}

#[test]
fn routes_are_added_replaced_and_deleted_for_both_families() {
    in_netns(|net, link| {
        net.set_link_up(link).unwrap();
        let on_link = Route {
            destination: addr("10.20.0.0"),
            prefix_len: 16,
            gateway: None,
        };
        let via = Route {
            destination: addr("10.30.0.0"),
            prefix_len: 16,
            gateway: Some(addr("10.20.0.1")),
        };
        let v6 = Route {
            destination: addr("2001:db8:5::"),
            prefix_len: 48,
            gateway: None,
        };
        let v6_via = Route {
            destination: addr("2001:db8:6::"),
            prefix_len: 48,
            gateway: Some(addr("2001:db8:5::1")),
        };
        for r in [&on_link, &via, &v6, &v6_via] {
            net.add_route(link, r).unwrap();
        }
        let r = find_route("-4", "10.20.0.0/16").expect("on-link route");
        assert_eq!(r["scope"], "link");
        assert!(r.get("gateway").is_none());
        assert_eq!(
            find_route("-4", "10.30.0.0/16").unwrap()["gateway"],
            "10.20.0.1"
        );
        assert!(find_route("-6", "2001:db8:5::/48").is_some());
        assert_eq!(
            find_route("-6", "2001:db8:6::/48").unwrap()["gateway"],
            "2001:db8:5::1"
        );

        // Adding again is not an error; with another gateway it replaces the route.
        net.add_route(link, &via).unwrap();
        let moved = Route {
            gateway: Some(addr("10.20.0.2")),
            ..via
        };
        net.add_route(link, &moved).unwrap();
        let shown: Vec<Value> = ip_routes("-4")
            .into_iter()
            .filter(|r| r["dst"] == "10.30.0.0/16")
            .collect();
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert_eq!(shown[0]["gateway"], "10.20.0.2");

        assert!(net.delete_route(link, &moved).unwrap());
        assert!(find_route("-4", "10.30.0.0/16").is_none());
        assert!(net.delete_route(link, &v6_via).unwrap());
        assert!(find_route("-6", "2001:db8:6::/48").is_none());
        assert!(
            find_route("-6", "2001:db8:5::/48").is_some(),
            "the others stay"
        );
        // Deleting what is not there is Ok(false).
        assert!(!net.delete_route(link, &moved).unwrap());
        assert!(!net.delete_route(link, &v6_via).unwrap());
        assert!(net.delete_route(link, &on_link).unwrap());
        assert!(net.delete_route(link, &v6).unwrap());
        assert!(find_route("-4", "10.20.0.0/16").is_none());

        // Bad routes are refused with the route in the message.
        let e = net
            .add_route(
                link,
                &Route {
                    destination: addr("10.20.0.1"),
                    prefix_len: 16,
                    gateway: None,
                },
            )
            .unwrap_err();
        assert!(matches!(e, NetConfigError::BadArgument { .. }));
        assert!(
            e.to_string()
                .starts_with("add route route 10.20.0.1/16 on v0: "),
            "{e}"
        );
        // A gateway the kernel cannot reach: its refusal, with the route named.
        let e = net
            .add_route(
                link,
                &Route {
                    destination: addr("10.40.0.0"),
                    prefix_len: 16,
                    gateway: Some(addr("192.0.2.1")),
                },
            )
            .unwrap_err();
        assert!(matches!(e, NetConfigError::Kernel { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("route 10.40.0.0/16 via 192.0.2.1 on v0"),
            "{e}"
        );
    });
}

#[test]
fn operations_on_a_vanished_interface_say_it_is_missing() {
    in_netns(|net, link| {
        ip(&["link", "del", "v0"]);
        let route = Route {
            destination: addr("10.20.0.0"),
            prefix_len: 16,
            gateway: None,
        };
        let errors = [
            net.set_link_up(link).unwrap_err(),
            net.set_mtu(link, 1400).unwrap_err(),
            net.add_address(link, addr("10.0.0.1"), 32, None)
                .unwrap_err(),
            net.add_address(link, addr("2001:db8::1"), 128, None)
                .unwrap_err(),
            net.delete_address(link, addr("10.0.0.1"), 32).unwrap_err(),
            net.addresses(link).unwrap_err(),
            net.add_route(link, &route).unwrap_err(),
            net.delete_route(link, &route).unwrap_err(),
        ];
        for e in errors {
            assert!(
                matches!(&e, NetConfigError::NoSuchLink { link, .. } if link == "v0"),
                "{e:?}"
            );
            assert!(e.to_string().ends_with("no interface named \"v0\""), "{e}");
        }
    });
}

#[test]
fn one_handle_serves_several_threads_at_once() {
    in_netns(|net, link| {
        net.set_link_up(link).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u16 {
                s.spawn(move || {
                    for i in 0..25u16 {
                        let a =
                            IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, t, i));
                        net.add_address(link, a, 128, None).unwrap();
                    }
                });
            }
        });
        let shown = ip_addrs();
        assert_eq!(shown.len(), 100, "{shown:?}");
        assert!(shown
            .iter()
            .all(|a| a["nodad"] == true && a.get("tentative").is_none()));
        assert_eq!(
            net.addresses(link)
                .unwrap()
                .iter()
                .filter(|a| a.addr.is_ipv6() && a.prefix_len == 128)
                .count(),
            100
        );
    });
}
