//! Named topologies, shared by the tests, the demo and `mimiq-perf testbed up`.

use super::{LinkOpts, Testbed, TestbedError};

/// The topologies `mimiq-perf testbed up` can build.
pub const NAMES: &[&str] = &["line", "bridge", "single-box", "split"];

/// Addresses of the two end hosts of [`line`] and [`bridge`].
pub mod addr {
    /// h1, IPv4.
    pub const H1_V4: &str = "198.18.0.1";
    /// h2, IPv4.
    pub const H2_V4: &str = "198.18.0.2";
    /// h1, IPv6.
    pub const H1_V6: &str = "fd00::1";
    /// h2, IPv6.
    pub const H2_V6: &str = "fd00::2";
}

/// `h1:eth0 — p0:sw:p1 — eth0:h2`, one subnet. The middle host `sw` forwards nothing by
/// itself: the ports `p0` and `p1` carry traffic only while a switch (`mimiq-switch`, role
/// `l2fwd`) runs on them.
pub fn line(tb: &mut Testbed) -> Result<(), TestbedError> {
    line_with(tb, LinkOpts::default())
}

/// [`line`] with links of the given options (e.g. several queues per veth).
pub fn line_with(tb: &mut Testbed, opts: LinkOpts) -> Result<(), TestbedError> {
    for host in ["h1", "sw", "h2"] {
        tb.add_host(host)?;
    }
    tb.add_link(("h1", "eth0"), ("sw", "p0"), opts)?;
    tb.add_link(("sw", "p1"), ("h2", "eth0"), opts)?;
    // The switch host has no addresses; keep its kernel from chattering IPv6 on the ports.
    tb.sysctl("sw", "net.ipv6.conf.all.disable_ipv6", "1")?;
    tb.add_addr("h1", "eth0", &format!("{}/24", addr::H1_V4))?;
    tb.add_addr("h2", "eth0", &format!("{}/24", addr::H2_V4))?;
    tb.add_addr("h1", "eth0", &format!("{}/64", addr::H1_V6))?;
    tb.add_addr("h2", "eth0", &format!("{}/64", addr::H2_V6))?;
    Ok(())
}

/// [`line`] with a kernel bridge joining `p0` and `p1` on `sw`: the kernel's own forwarding,
/// the baseline that switch figures are compared against.
pub fn bridge(tb: &mut Testbed) -> Result<(), TestbedError> {
    line(tb)?;
    tb.add_bridge("sw", "br0", &["p0", "p1"])
}

/// Builds the topology called `name` (one of [`NAMES`]).
pub fn build(tb: &mut Testbed, name: &str) -> Result<(), String> {
    match name {
        "line" => line(tb).map_err(|e| e.to_string()),
        "bridge" => bridge(tb).map_err(|e| e.to_string()),
        "single-box" => single_box(tb).map_err(|e| e.to_string()),
        "split" => split(tb).map_err(|e| e.to_string()),
        _ => Err(format!(
            "unknown topology {name:?}; known: {}",
            NAMES.join(", ")
        )),
    }
}

/// Addresses of [`single_box`].
pub mod single_box_addr {
    /// The outside host.
    pub const OUT_V4: &str = "198.18.200.2";
    /// The edge's outside address (what the outside routes the client pools to).
    pub const EDGE_OUT_V4: &str = "198.18.200.1";
    /// The outside host, IPv6.
    pub const OUT_V6: &str = "fd00:200::2";
    /// The edge's outside address, IPv6.
    pub const EDGE_OUT_V6: &str = "fd00:200::1";
    /// The IPv4 client pool.
    pub const POOL_V4: &str = "198.18.1.0/24";
    /// The gateway clients use.
    pub const GATEWAY_V4: &str = "198.18.1.1";
    /// The IPv6 client pool.
    pub const POOL_V6: &str = "fd00:1::/64";
}

/// The MIMIQ single box (ARCHITECTURE §8): clients `c1`, `c2` on one LAN (a bridge in `lan`)
/// to the switch host `sw`'s first client port `cl0`, client `c3` alone on its second client
/// port `cl1`; the access role (`cl0`, `cl1` → `int0`) and the edge role (`int1` → `out0`) are
/// joined by an internal veth pair (MTU 1600), and the outside host `out`. The outside routes
/// the client pools to the edge's outside address; the clients get their addresses from the
/// allocator through the switch.
pub fn single_box(tb: &mut Testbed) -> Result<(), TestbedError> {
    single_box_with(tb, LinkOpts::default())
}

/// [`single_box`] with links of the given options (the internal link's MTU stays 1600).
pub fn single_box_with(tb: &mut Testbed, opts: LinkOpts) -> Result<(), TestbedError> {
    use single_box_addr::*;
    for host in ["c1", "c2", "c3", "lan", "sw", "out"] {
        tb.add_host(host)?;
    }
    tb.add_link(("c1", "eth0"), ("lan", "c1"), opts)?;
    tb.add_link(("c2", "eth0"), ("lan", "c2"), opts)?;
    tb.add_link(("lan", "sw"), ("sw", "cl0"), opts)?;
    tb.add_bridge("lan", "br0", &["c1", "c2", "sw"])?;
    tb.add_link(("c3", "eth0"), ("sw", "cl1"), opts)?;
    let internal = LinkOpts {
        mtu_bytes: 1600,
        ..opts
    };
    tb.add_link(("sw", "int0"), ("sw", "int1"), internal)?;
    tb.add_link(("sw", "out0"), ("out", "eth0"), opts)?;
    tb.add_addr("out", "eth0", &format!("{OUT_V4}/24"))?;
    tb.add_addr("out", "eth0", &format!("{OUT_V6}/64"))?;
    tb.add_route("out", POOL_V4, EDGE_OUT_V4)?;
    tb.add_route("out", POOL_V6, EDGE_OUT_V6)?;
    Ok(())
}

/// The access and edge roles on two hosts: client `c1` — `swa` (access: `cl0`, `up0`) —
/// `swe` (edge: `in0`, `out0`) — `out`, with a management link (`mgmt0`, 198.18.250.1 on
/// `swa`, .2 on `swe`, no XDP) for the edge's rule stream from the allocator on `swa`.
pub fn split(tb: &mut Testbed) -> Result<(), TestbedError> {
    split_with(tb, LinkOpts::default())
}

/// [`split`] with links of the given options (the internal link's MTU stays 1600; the
/// management link has one queue).
pub fn split_with(tb: &mut Testbed, opts: LinkOpts) -> Result<(), TestbedError> {
    use single_box_addr::*;
    for host in ["c1", "swa", "swe", "out"] {
        tb.add_host(host)?;
    }
    tb.add_link(("c1", "eth0"), ("swa", "cl0"), opts)?;
    let internal = LinkOpts {
        mtu_bytes: 1600,
        ..opts
    };
    tb.add_link(("swa", "up0"), ("swe", "in0"), internal)?;
    tb.add_link(("swe", "out0"), ("out", "eth0"), opts)?;
    tb.add_link(("swa", "mgmt0"), ("swe", "mgmt0"), LinkOpts::default())?;
    tb.add_addr("swa", "mgmt0", "198.18.250.1/24")?;
    tb.add_addr("swe", "mgmt0", "198.18.250.2/24")?;
    tb.add_addr("out", "eth0", &format!("{OUT_V4}/24"))?;
    tb.add_addr("out", "eth0", &format!("{OUT_V6}/64"))?;
    tb.add_route("out", POOL_V4, EDGE_OUT_V4)?;
    tb.add_route("out", POOL_V6, EDGE_OUT_V6)?;
    Ok(())
}
