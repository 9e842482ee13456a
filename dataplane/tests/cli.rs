//! `mimiq-switch` refuses bad configs and flags with one clear line and a non-zero exit.
//! (Errors that need interfaces are tested in perf/tests/switch_l2fwd.rs.)

use std::process::Command;

fn switch(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mimiq-switch"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_error_line(args: &[&str], want: &str) {
    let (ok, _, stderr) = switch(args);
    assert!(!ok, "{args:?} must fail");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: exactly one line, got {stderr:?}");
    assert!(lines[0].starts_with("mimiq-switch: error: "), "{stderr:?}");
    assert!(
        lines[0].contains(want),
        "{args:?}: {stderr:?} should mention {want:?}"
    );
}

#[test]
fn unreadable_or_invalid_configs_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.toml");
    std::fs::write(&garbage, "role = [[[\n").unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        "role = \"l2fwd\"\ninterfaces = [\"p0\", \"p1\"]\nspeed = 9\n",
    )
    .unwrap();
    let binary = dir.path().join("binary.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let dir_path = dir.path().to_str().unwrap();
    for (path, want) in [
        (
            "/nonexistent/switch.toml",
            "cannot read config /nonexistent/switch.toml",
        ),
        (dir_path, "cannot read config"),
        (garbage.to_str().unwrap(), "line 1"),
        (unknown.to_str().unwrap(), "unknown field `speed`"),
        (binary.to_str().unwrap(), "cannot read config"),
    ] {
        assert_one_error_line(&["run", "--config", path], want);
        assert_one_error_line(&["check-config", path], want);
    }
}

#[test]
fn invalid_flags_are_refused_before_touching_any_interface() {
    assert_one_error_line(
        &["run", "--role", "l2fwd", "--port", "p0"],
        "exactly 2 interfaces",
    );
    assert_one_error_line(
        &[
            "run",
            "--role",
            "l2fwd",
            "--port",
            "a",
            "--port",
            "b",
            "--ring-size",
            "1000",
        ],
        "power of two",
    );
    assert_one_error_line(
        &[
            "run", "--role", "l2fwd", "--port", "a", "--port", "b", "--cores", "4096",
        ],
        "core 4096 does not exist",
    );
    assert_one_error_line(
        &[
            "run", "--role", "l2fwd", "--port", "a", "--port", "b", "--queues", "2", "--cores", "0",
        ],
        "1 cores for 2 queues",
    );
    assert_one_error_line(
        &[
            "run",
            "--role",
            "l2fwd",
            "--port",
            "a",
            "--port",
            "b",
            "--busy-poll-budget",
            "0",
        ],
        "at least 1",
    );
    let (ok, _, stderr) = switch(&[
        "run",
        "--role",
        "l2fwd",
        "--port",
        "a",
        "--port",
        "b",
        "--metrics-listen",
        "nope",
    ]);
    assert!(!ok && stderr.contains("invalid value 'nope'"), "{stderr}");
}

#[test]
fn shipped_config_checks_ok_and_stats_of_a_missing_file_is_an_error() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/switch-l2fwd.toml");
    let (ok, stdout, stderr) = switch(&["check-config", config]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(": ok"));
    assert_one_error_line(
        &["stats", "--stats-path", "/nonexistent/s.json"],
        "cannot read",
    );
}
