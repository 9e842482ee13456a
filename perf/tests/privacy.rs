//! `mimiq-perf bench privacy` on its small grid (5 sites × 5 visits, two clients, no hopping and
//! a hop every 25 packets, and a hop every 25 packets in direct mode) through the real single
//! box: page loads through hopping agents and hopping direct connections, the outside link
//! captured to pcap files, the attacker's pipeline end to end.

use mimiq_perf::capture::read_pcap;
use mimiq_perf::experiments::privacy::{self, Mode, Options};
use mimiq_perf::testbed::require_root;

#[test]
fn the_privacy_bench_attacks_the_captures_of_unhopped_and_hopping_clients() {
    require_root();
    let out = tempfile::tempdir().unwrap();
    let o = Options {
        out: Some(out.path().to_path_buf()),
        ..Options::quick()
    };
    let r = privacy::run(&o, &mut |_| {}).unwrap();
    let loads = o.sites * o.visits;
    assert_eq!(r.rows.len(), 3);
    let (never, hop25, direct25) = (&r.rows[0], &r.rows[1], &r.rows[2]);
    assert_eq!(
        (
            never.hop.as_str(),
            hop25.hop.as_str(),
            direct25.hop.as_str()
        ),
        ("never", "every:25", "every:25")
    );
    assert_eq!(
        (never.mode, hop25.mode, direct25.mode),
        (Mode::Tunnel, Mode::Tunnel, Mode::Direct)
    );
    for row in &r.rows {
        let a = &row.analysis;
        assert_eq!(row.visits, loads, "every page load completed: {row:?}");
        assert!(a.packets > 0 && a.subflows >= loads, "{row:?}");
        assert_eq!(a.chance, 1.0 / o.sites as f64);
        assert_eq!(
            a.cid_linked, 0,
            "no connection ID from two addresses: {row:?}"
        );
        // The attacker read the capture the bench kept: every frame is accounted for.
        let prefix = if row.mode == Mode::Direct {
            "direct-"
        } else {
            ""
        };
        let frames = read_pcap(&out.path().join(format!(
            "outside-{prefix}{}.pcap",
            row.hop.replace(':', "-")
        )))
        .unwrap();
        assert_eq!(
            frames.len() as u64,
            a.packets + a.skipped_frames + a.not_quic,
            "{row:?}"
        );
    }
    // Unhopped, one address carries each whole page load, and the sites are told apart.
    assert_eq!(never.hops_done, 0);
    assert!(
        never.analysis.accuracy >= 0.6,
        "unhopped accuracy {} against chance {}",
        never.analysis.accuracy,
        never.analysis.chance
    );
    // Hopping splits page loads over addresses, in either mode.
    for row in [hop25, direct25] {
        assert!(row.hops_done >= 1, "{row:?}");
        assert!(row.analysis.subflows > loads, "{row:?}");
    }
    let u = r.uniformity.as_ref().expect("allocations were tested");
    assert!(
        u.allocations >= 2 && (0.0..=1.0).contains(&u.p_value),
        "{u:?}"
    );
    // Key logs beside the captures, for Wireshark.
    for file in [
        "proxy-keys.log",
        "c1-keys-never.log",
        "c2-keys-every-25.log",
    ] {
        let text = std::fs::read_to_string(out.path().join(file)).unwrap_or_default();
        assert!(text.contains("CLIENT_TRAFFIC_SECRET_0"), "{file}: {text:?}");
    }
    // The attacker again from the kept files alone: the same figures.
    let again = privacy::reanalyse(out.path(), &o).unwrap();
    assert_eq!(again.rows.len(), r.rows.len());
    for (a, b) in r.rows.iter().zip(&again.rows) {
        assert_eq!(
            (
                a.hops_done,
                a.visits,
                a.analysis.subflows,
                a.analysis.accuracy
            ),
            (
                b.hops_done,
                b.visits,
                b.analysis.subflows,
                b.analysis.accuracy
            )
        );
    }
    let md = privacy::markdown(&r);
    assert!(
        md.contains("| never |") && md.contains("| every:25 |"),
        "{md}"
    );
    let svg = privacy::svg(&r).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
}
