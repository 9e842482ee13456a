//! Named topologies, shared by the tests, the demo and `mimiq-perf testbed up`.

use super::{LinkOpts, Testbed, TestbedError};

/// The topologies `mimiq-perf testbed up` can build.
pub const NAMES: &[&str] = &["line", "bridge"];

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
        _ => Err(format!("unknown topology {name:?}; known: {}", NAMES.join(", "))),
    }
}
