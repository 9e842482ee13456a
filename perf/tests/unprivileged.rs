//! The systemd units of configs/systemd/: `systemd-analyze verify` accepts each, and each binary
//! does its job as an unprivileged user holding only the capabilities its unit grants
//! (`AmbientCapabilities=`), started the way the unit starts it (setpriv in a namespace:
//! `Testbed::run_as`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use mimiq_perf::masque::{self, stop_client, ProxyProc};
use mimiq_perf::switch::Switch;
use mimiq_perf::testbed::{
    bin_path, eventually, require_root, topology, Proc, Testbed, Unprivileged,
};
use mimiq_perf::traffic;

/// The user the binaries run as (nobody).
const UID: u32 = 65534;
const UNITS: [&str; 4] = ["switch", "proxy", "allocator", "agent"];

fn unit_text(binary: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/systemd")
        .join(format!("mimiq-{binary}.service"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` lines in the `[Service]` section of `binary`'s unit.
fn unit_values(binary: &str, key: &str) -> Vec<String> {
    unit_text(binary)
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// `binary`'s unit user, its capabilities, a runtime directory in `dir`.
fn as_unit(binary: &str, dir: &Path) -> Unprivileged {
    let caps = unit_values(binary, "AmbientCapabilities");
    assert_eq!(
        caps,
        unit_values(binary, "CapabilityBoundingSet"),
        "{binary}: the bounding set is the ambient set"
    );
    assert_eq!(unit_values(binary, "User"), ["mimiq"]);
    Unprivileged {
        uid: UID,
        caps,
        runtime_dir: dir.join(format!("run-{binary}")),
    }
}

/// A directory the unprivileged user can read and write (the unit's state and config
/// directories stand-in).
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chown_all(dir.path());
    dir
}

/// Hands `path` and everything under it to the user.
fn chown_all(path: &Path) {
    let ok = std::process::Command::new("chown")
        .args(["-R", &format!("{UID}:{UID}"), path.to_str().unwrap()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {}", path.display());
}

/// What the kernel says about a running process: its uid and effective capabilities, as
/// capability names.
fn identity(proc_pid: u32) -> (u32, Vec<String>) {
    let status = std::fs::read_to_string(format!("/proc/{proc_pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    let uid: u32 = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap();
    let out = std::process::Command::new("capsh")
        .arg(format!("--decode={eff:x}"))
        .output()
        .unwrap();
    let decoded = String::from_utf8_lossy(&out.stdout);
    let mut caps: Vec<String> = decoded
        .trim()
        .split_once('=')
        .map_or("", |(_, v)| v)
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| c.to_uppercase())
        .collect();
    caps.sort();
    (uid, caps)
}

fn assert_runs_as_unit(proc: &Proc, binary: &str) {
    let (uid, caps) = identity(proc.pid());
    let mut want = unit_values(binary, "AmbientCapabilities");
    want.sort();
    assert_eq!(
        (uid, caps),
        (UID, want),
        "{binary} runs as the unit's user with the unit's capabilities"
    );
}

#[test]
fn systemd_analyze_verify_accepts_every_unit() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    for binary in UNITS {
        // verify checks that ExecStart= is executable: point it at the built binary.
        let built = bin_path(&format!("mimiq-{binary}")).unwrap();
        let unit = unit_text(binary).replace(
            &format!("/usr/local/bin/mimiq-{binary}"),
            built.to_str().unwrap(),
        );
        let path = dir.path().join(format!("mimiq-{binary}.service"));
        std::fs::write(&path, unit).unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze (scripts/setup installs systemd)");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{binary}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_proxy_and_the_agent_carry_a_download_as_nobody_with_their_units_capabilities() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    masque::build(&mut tb).unwrap();
    let dir = shared_dir();
    tb.run_as("p", as_unit("proxy", dir.path()));
    tb.run_as("c", as_unit("agent", dir.path()));
    // Two workers: the SO_REUSEPORT and TUN steering programs are loaded too.
    let proxy_dir = dir.path().join("proxy");
    std::fs::create_dir(&proxy_dir).unwrap();
    let key = proxy_dir.join("reset.key");
    let proxy = {
        let extra = format!(
            "workers = 2\n[quic]\nreset_key_file = \"{}\"\n",
            key.display()
        );
        // The proxy writes its cert, config and stats in `proxy_dir`: hand it over first.
        chown_all(&proxy_dir);
        ProxyProc::start(&tb, "p", &proxy_dir, "0.0.0.0:4433", &extra)
            .unwrap_or_else(|e| panic!("proxy as nobody: {e}"))
    };
    assert_runs_as_unit(&proxy.proc, "proxy");
    assert!(key.exists(), "the proxy made its reset key");

    let agent_cfg = masque::write_agent_config(dir.path(), None, 5, "").unwrap();
    chown_all(&agent_cfg);
    let (mut agent, _) = masque::start_agent(&mut tb, "c", &agent_cfg)
        .unwrap_or_else(|e| panic!("agent as nobody: {e}"));
    assert_runs_as_unit(&agent, "agent");

    const LEN: u64 = 8 * 1024 * 1024;
    let (got, exact) = traffic::pattern_download(
        &tb,
        "s",
        "198.18.20.2:9000".parse().unwrap(),
        "c",
        LEN,
        None,
    )
    .unwrap_or_else(|e| panic!("{e}; agent {}", agent.describe()));
    assert!(got == LEN && exact, "{got} bytes, exact {exact}");
    let report = stop_client(&mut agent).unwrap();
    assert!(
        report["client"]["hops_done"].as_u64().unwrap() > 0,
        "{report}"
    );
    let stats = proxy.fresh_stats().unwrap();
    assert_eq!(stats["misrouted"], 0, "{stats}");
    assert!(stats["steered"].as_u64().unwrap() > 0, "{stats}");
}

#[test]
fn the_switch_forwards_as_nobody_with_its_units_capabilities_and_replaces_what_a_killed_one_left() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    topology::line(&mut tb).unwrap();
    let dir = shared_dir();
    tb.run_as("sw", as_unit("switch", dir.path()));
    let args = ["--role", "l2fwd", "--port", "p0", "--port", "p1"];
    let stats: PathBuf = dir.path().join("s1.json");
    let mut first = Switch::start(&tb, "sw", &args, &stats).unwrap();
    assert_runs_as_unit(&first.proc, "switch");
    traffic::ping(&tb, "h1", topology::addr::H2_V4, 3).unwrap();
    // Killed, it leaves its XDP program on the interfaces: the next one, as nobody too, finds
    // it by program ID (CAP_SYS_ADMIN) and replaces it.
    first.proc.signal(libc::SIGKILL);
    assert!(first.proc.wait_timeout(Duration::from_secs(5)).is_some());
    let second = Switch::start(&tb, "sw", &args, &dir.path().join("s2.json"))
        .unwrap_or_else(|e| panic!("restart as nobody: {e}"));
    assert_runs_as_unit(&second.proc, "switch");
    traffic::ping(&tb, "h1", topology::addr::H2_V4, 3).unwrap();
}

#[test]
fn the_allocator_serves_as_nobody_without_capabilities() {
    require_root();
    let mut tb = Testbed::new().unwrap();
    tb.add_host("a").unwrap();
    let dir = shared_dir();
    tb.run_as("a", as_unit("allocator", dir.path()));
    assert!(unit_values("allocator", "AmbientCapabilities").is_empty());
    let store = dir.path().join("allocator.redb");
    let cfg = dir.path().join("allocator.toml");
    // The shipped config, its store moved to a directory the user owns.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/allocator.toml"),
    )
    .unwrap();
    let store_line = "store = \"/var/lib/mimiq/allocator.redb\"";
    assert!(shipped.contains(store_line));
    std::fs::write(
        &cfg,
        shipped.replace(store_line, &format!("store = \"{}\"", store.display())),
    )
    .unwrap();
    chown_all(dir.path());
    let bin = bin_path("mimiq-allocator").unwrap();
    let mut proc = tb
        .spawn(
            "a",
            &[
                bin.to_str().unwrap(),
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ],
            false,
        )
        .unwrap();
    eventually(Duration::from_secs(10), || {
        tb.http_get("a", "127.0.0.1:9364", "/healthz")
            .and_then(|b| b.starts_with("ready").then_some(()).ok_or(b))
    })
    .unwrap_or_else(|e| panic!("allocator as nobody: {e}; {}", proc.describe()));
    assert_runs_as_unit(&proc, "allocator");
    assert!(store.exists(), "the allocator made its store");
    proc.stop(Duration::from_secs(5));
}

#[test]
fn each_unit_started_without_its_config_fails_with_one_line_naming_it() {
    require_root();
    for binary in UNITS {
        let exec = unit_values(binary, "ExecStart");
        let config = format!("/etc/mimiq/{binary}.toml");
        assert_eq!(
            exec[1..],
            ["run", "--config", config.as_str()],
            "{binary}: ExecStart"
        );
        assert!(
            !Path::new(&config).exists(),
            "{config} exists on this machine"
        );
        let out = std::process::Command::new(bin_path(&format!("mimiq-{binary}")).unwrap())
            .args(&exec[1..])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{binary}: {stderr}");
        assert!(
            stderr.starts_with(&format!("mimiq-{binary}: error: ")) && stderr.contains(&config),
            "{binary}: {stderr}"
        );
    }
}
