//! The `mimiq-allocator` binary's command line: clear errors and exit codes for bad input, and
//! `leases` both against a running server and against the store of a stopped one.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use mimiq_allocator::proto::Status;
use mimiq_allocator::server::wall_ms;
use mimiq_allocator::Family;

const BIN: &str = env!("CARGO_BIN_EXE_mimiq-allocator");

fn config(store: &str, extra: &str) -> String {
    format!(
        r#"
[server]
relay_listen = "127.0.0.1:0"
publish_listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store = "{store}"
[lease]
t_ip_min_ms = 3600000
t_ip_max_ms = 3600000
t_remove_ms = 1000
{extra}
[ipv4]
prefixes = ["10.0.0.0/24"]
gateway = "10.0.0.1"
[[switch]]
id = 1
role = "access"
key_hex = "{ACCESS_KEY}"
"#
    )
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/allocator.example.toml");
    let (code, out, err) = run(&["check", "--config", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("16777213 usable addresses"), "{out}");
}

#[test]
fn check_accepts_the_shipped_single_box_config() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/allocator.toml");
    let (code, out, err) = run(&["check", "--config", shipped]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("253 usable addresses"), "{out}");
}

#[test]
fn bad_configs_exit_2_with_the_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    let p = path.to_str().unwrap();
    std::fs::write(&path, config("memory", "colour = \"blue\"")).unwrap();
    let (code, _, err) = run(&["check", "--config", p]);
    assert_eq!(code, 2);
    assert!(err.contains("colour"), "{err}");
    std::fs::write(&path, config("memory", "").replace("[[switch]]", "[ipv6]\nprefix = \"2001:db8::/64\"\nalias_bits = 2\nt_sid_ms = 4000000\ngateway = \"fe80::1\"\n[[switch]]")).unwrap();
    let (code, _, err) = run(&["run", "--config", p]);
    assert_eq!(code, 2);
    assert!(err.contains("SIDs·n·k < 2^a"), "{err}");
    let (code, _, err) = run(&["run", "--config", "/nonexistent/allocator.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/allocator.toml"), "{err}");
    let (code, _, err) = run(&["frobnicate"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn leases_lists_from_the_server_and_from_the_store_when_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("l.redb");
    let path = dir.path().join("a.toml");
    std::fs::write(&path, config(store.to_str().unwrap(), "")).unwrap();
    let p = path.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", p])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let relay = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("relay="))
        .unwrap()
        .parse()
        .unwrap();
    let metrics: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .unwrap()
        .parse()
        .unwrap();
    let sw = Switch::new(relay);
    let r = sw.request(1, mac(7), Family::V4, 3);
    assert_eq!(r.status, Status::Ok);
    // `leases` asks the running server (the config's metrics port is 0, so point it at the
    // bound one).
    let live_cfg = dir.path().join("live.toml");
    std::fs::write(
        &live_cfg,
        config(store.to_str().unwrap(), "").replace(
            "metrics_listen = \"127.0.0.1:0\"",
            &format!("metrics_listen = \"{metrics}\""),
        ),
    )
    .unwrap();
    let (code, out, err) = run(&["leases", "--config", live_cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.lines()
            .all(|l| l.contains("02:00:00:00:00:07") && l.contains("assigned")),
        "{out}"
    );
    // SIGTERM stops it cleanly; then `leases` reads the store.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let (code, out2, err) = run(&["leases", "--config", p]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out2, out, "the store holds exactly what the server listed");
}

#[test]
fn leases_that_ended_while_the_allocator_was_down_are_expired_at_restart() {
    // Lifetimes of seconds: the allocator is killed within them (before it could expire the
    // leases itself) with seconds to spare.
    const T_REMOVE_MS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("l.redb");
    let path = dir.path().join("a.toml");
    let short = config(store.to_str().unwrap(), "")
        .replace("t_ip_min_ms = 3600000", "t_ip_min_ms = 2000")
        .replace("t_ip_max_ms = 3600000", "t_ip_max_ms = 2500")
        .replace(
            "t_remove_ms = 1000",
            &format!("t_remove_ms = {T_REMOVE_MS}"),
        );
    std::fs::write(&path, short).unwrap();
    let start = || {
        let mut child = Command::new(BIN)
            .args(["run", "--config", path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let get = |k: &str| -> std::net::SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap()
                .parse()
                .unwrap()
        };
        (child, get("relay="), get("metrics="))
    };
    let (mut child, relay, metrics) = start();
    let sw = Switch::new(relay);
    let r = sw.request(1, mac(1), Family::V4, 5);
    assert_eq!(r.status, Status::Ok);
    // Lifetimes count from the server's clock when it answered, before this reading.
    let drained_by =
        wall_ms() + r.addrs.iter().map(|&(_, l)| u64::from(l)).max().unwrap() + T_REMOVE_MS;
    assert_eq!(leases(metrics).len(), 5);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Down until every lease and its drain have ended, and a second more. Waiting for time
    // itself to pass: a slow machine only restarts it later, which changes nothing below.
    let restart_at = drained_by + 1_000;
    std::thread::sleep(std::time::Duration::from_millis(
        restart_at.saturating_sub(wall_ms()),
    ));
    let (mut child, _, metrics) = start();
    assert!(
        leases(metrics).is_empty(),
        "ended leases are not live after restart"
    );
    let text = http_get(metrics, "/metrics");
    assert_eq!(metric(&text, "mimiq_allocator_expired_while_down_total"), 5);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_metrics_address_in_use_is_one_error_line_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    let cfg = config("memory", "").replace(
        "metrics_listen = \"127.0.0.1:0\"",
        &format!("metrics_listen = \"{at}\""),
    );
    std::fs::write(&path, cfg).unwrap();
    let (code, _, err) = run(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let last = err.lines().last().unwrap_or("");
    assert_eq!(
        last,
        format!(
            "mimiq-allocator: error: metrics endpoint {at}: Address already in use (os error 98)"
        )
    );
}
