//! The agent's metrics (`mimiq_agent_*`, served by `mimiq_metrics::serve` at
//! `[tunnel] metrics_listen`): the tunnel's counters ([`TunnelReport`]) as last published, and
//! `/healthz` ready while the tunnel is up and publishing.

use std::time::Duration;

use mimiq_metrics::{Families, Field, Health, Latest, Source};

use crate::tunnel::TunnelReport;

/// The tunnel client's counters (`client` in the report).
const CLIENT: &[Field] = &[
    Field::counter("dgram_tx", "HTTP/3 datagrams sent"),
    Field::counter("dgram_rx", "HTTP/3 datagrams received"),
    Field::counter("bytes_tx", "Inner bytes sent"),
    Field::counter("bytes_rx", "Inner bytes received"),
    Field::counter(
        "dgram_dropped",
        "Datagrams dropped: send queue full or too big",
    ),
    Field::counter(
        "dgram_unknown",
        "Datagrams received for another stream or context",
    ),
    Field::counter("hops_started", "Hops started"),
    Field::counter(
        "hops_done",
        "Hops completed (migrated to the validated path)",
    ),
    Field::counter(
        "hops_failed",
        "Hops that failed (no spare connection ID, validation failed)",
    ),
    Field::counter(
        "hops_deferred",
        "Hops postponed until a spare connection ID arrived",
    ),
    Field::counter(
        "hop_idle_ms",
        "Milliseconds spent quiet before hops (tunnel.hop_idle_max_ms)",
    ),
    Field::counter(
        "probes_resent",
        "PATH_CHALLENGEs asked for again after a late answer",
    ),
    Field::counter(
        "hops_refused",
        "Hops not made because the proxy disabled active migration",
    ),
    Field::counter("paths_abandoned", "Paths forgotten after hops"),
    Field::counter(
        "tx_unroutable",
        "QUIC packets built for a path whose socket was closed",
    ),
    Field::counter("quic_send_errors", "Passes where quiche's send failed"),
    Field::counter("keepalives", "Keep-alives sent on a quiet connection"),
    Field::counter(
        "reconnects",
        "Connections after the first that carried the tunnel on",
    ),
    Field::counter(
        "addresses_changed",
        "Reconnections that got other inner addresses",
    ),
    Field::gauge("mtu", "Tunnel MTU, bytes"),
];

/// The agent's own counters (the report's top level).
const AGENT: &[Field] = &[
    Field::counter(
        "datagrams_counted",
        "QUIC datagrams the hop strategy counted",
    ),
    Field::counter(
        "hops_without_address",
        "Hops wanted with no other usable address",
    ),
    Field::gauge(
        "addresses_used",
        "Distinct local addresses the connection sent from",
    ),
    Field::counter(
        "addresses_allocated",
        "Addresses received from the allocator",
    ),
    Field::counter("allocation_failures", "Allocations that failed"),
    Field::counter(
        "addresses_released",
        "Addresses the allocator acknowledged as released",
    ),
    Field::gauge(
        "addresses_in_use",
        "Addresses on the host interface or held now",
    ),
    Field::gauge(
        "hop_latency_p50_us",
        "Median hop latency (request to switch), microseconds",
    ),
    Field::gauge("hop_latency_max_us", "Largest hop latency, microseconds"),
];

/// The latest report of a running agent.
pub struct AgentMetrics(Latest);

impl AgentMetrics {
    /// Not ready until the first report; then while reports come every `interval` (three
    /// missed make it not ready).
    pub fn new(interval: Duration) -> AgentMetrics {
        AgentMetrics(Latest::new(
            interval.max(Duration::from_millis(100)).saturating_mul(3),
        ))
    }

    /// The report now.
    pub fn update(&self, report: &TunnelReport) {
        self.0
            .update(serde_json::to_value(report).unwrap_or_default());
    }
}

impl Source for AgentMetrics {
    fn collect(&self, out: &mut Families) {
        self.0.read(|report| {
            out.from_json("mimiq_agent", CLIENT, &[(Vec::new(), &report["client"])]);
            out.from_json("mimiq_agent", AGENT, &[(Vec::new(), report)]);
        });
    }

    fn health(&self) -> Health {
        self.0.health("the tunnel is not up yet", |r| {
            format!(
                "tunnel up, {} address(es) in use",
                r["addresses_in_use"].as_u64().unwrap_or(0)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_of_the_report_has_a_family() {
        let r = serde_json::to_value(TunnelReport::default()).unwrap();
        for (fields, obj, skip) in [
            (AGENT, &r, &["client"][..]),
            (CLIENT, &r["client"], &["addresses"][..]),
        ] {
            for k in obj.as_object().unwrap().keys() {
                assert!(
                    skip.contains(&k.as_str()) || fields.iter().any(|f| f.key == k),
                    "report field {k} has no entry"
                );
            }
        }
    }

    #[test]
    fn the_report_renders_and_health_follows_it() {
        let m = std::sync::Arc::new(AgentMetrics::new(Duration::from_millis(100)));
        assert!(matches!(m.health(), Health::NotReady(_)));
        let mut r = TunnelReport::default();
        r.client.hops_done = 4;
        r.addresses_in_use = 2;
        m.update(&r);
        assert_eq!(
            m.health(),
            Health::Ready("tunnel up, 2 address(es) in use".into())
        );
        let text = mimiq_metrics::render(m);
        assert!(text.contains("mimiq_agent_hops_done_total 4\n"), "{text}");
        assert!(text.contains("mimiq_agent_addresses_in_use 2\n"));
    }
}
