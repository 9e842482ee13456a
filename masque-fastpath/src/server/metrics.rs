//! The proxy's metrics (`mimiq_proxy_*`, served by `mimiq_metrics::serve` at `metrics_listen`):
//! each worker's [`Stats`](super::Stats) as the stats file last held them, one family per
//! counter with a `worker` label (and `reason` or `status` for counts by reason), and the
//! steering program's figures. `/healthz` is ready while every worker keeps publishing.

use std::time::Duration;

use mimiq_metrics::{Families, Field, Health, Latest, Source};
use serde_json::Value;

/// How each field of a worker's counters is exposed (the field docs in `server/mod.rs` say more).
pub const FIELDS: &[Field] = &[
    Field::counter("udp_rx", "QUIC datagrams received"),
    Field::counter("udp_tx", "QUIC datagrams sent"),
    Field::counter("passes", "Passes of the worker's loop"),
    Field::counter("quic_recv_errors", "Received datagrams quiche refused"),
    Field::counter("unknown_connection", "Datagrams for no known connection"),
    Field::by(
        "unknown_dropped",
        "reason",
        "Datagrams for no known connection dropped unanswered, by reason",
    ),
    Field::counter(
        "retries_sent",
        "Retry packets sent (RFC 9000 section 8.1.2)",
    ),
    Field::counter(
        "stateless_resets_sent",
        "Stateless resets sent (RFC 9000 section 10.3)",
    ),
    Field::counter(
        "version_negotiations_sent",
        "Version Negotiation packets sent",
    ),
    Field::counter(
        "handshake_timeouts",
        "Connections dropped for a handshake that did not finish in time",
    ),
    Field::gauge("half_open", "Connections in their handshake now"),
    Field::counter(
        "quic_packets_dropped",
        "Datagrams for a live connection quiche read no packet of",
    ),
    Field::counter("connections_accepted", "Connections accepted"),
    Field::counter(
        "connections_refused",
        "Initials dropped at max_connections or quic.max_half_open",
    ),
    Field::counter("connections_closed", "Connections that ended"),
    Field::gauge("connections_open", "Connections open now"),
    Field::counter("connections_flushed", "Connections visited to send"),
    Field::counter(
        "peer_migrations",
        "Clients that moved their connection to a new, validated address",
    ),
    Field::counter("cids_issued", "Connection IDs issued after the handshake"),
    Field::counter(
        "paths_abandoned",
        "Paths forgotten after a client migrated away from them",
    ),
    Field::gauge("paths_peak", "The most paths one connection had at once"),
    Field::counter("sessions_ip", "CONNECT-IP sessions started"),
    Field::counter("sessions_udp", "CONNECT-UDP sessions started"),
    Field::by("refused", "status", "Requests refused, by HTTP status"),
    Field::by(
        "policy_refused",
        "reason",
        "Requests refused by the target policy, by reason",
    ),
    Field::counter("dgram_rx", "HTTP/3 datagrams received"),
    Field::counter("dgram_tx", "HTTP/3 datagrams sent"),
    Field::counter(
        "dgram_unknown_stream",
        "Datagrams with a bad Quarter Stream ID or for no session",
    ),
    Field::counter(
        "dgram_queue_full",
        "Datagrams dropped on a full connection send queue",
    ),
    Field::counter(
        "dgram_recv_queue_full",
        "Datagrams quiche received that were never read",
    ),
    Field::counter(
        "dgram_too_big",
        "Inner packets larger than the connection can carry in a datagram",
    ),
    Field::counter(
        "capsule_errors",
        "Capsule-stream errors (the request stream is reset)",
    ),
    Field::counter("capsules_skipped", "Capsules of unknown types skipped"),
    Field::counter(
        "addresses_requested",
        "Addresses asked for in ADDRESS_REQUEST capsules",
    ),
    Field::counter(
        "addresses_refused",
        "ADDRESS_REQUESTs answered with the all-zero address",
    ),
    Field::counter(
        "addresses_exchanged",
        "Addresses a session gave up for the one it asked for",
    ),
    Field::counter("tun_tx", "Packets written to the TUN device"),
    Field::counter("tun_rx", "Packets read from the TUN device"),
    Field::counter("tun_reads", "Reads from the TUN device"),
    Field::counter(
        "tun_bad_reads",
        "TUN reads that could not be cut into packets",
    ),
    Field::counter("tun_no_session", "TUN packets for no session's address"),
    Field::counter("tun_errors", "TUN write errors"),
    Field::by(
        "ip_drops",
        "reason",
        "CONNECT-IP packets dropped, by reason",
    ),
    Field::counter("icmp_errors", "ICMP errors generated"),
    Field::by(
        "udp_drops",
        "reason",
        "CONNECT-UDP payloads dropped, by reason",
    ),
    Field::counter("udp_to_target", "CONNECT-UDP payloads sent to targets"),
    Field::counter("udp_to_client", "CONNECT-UDP payloads sent to clients"),
    Field::counter("socket_send_errors", "QUIC socket send failures"),
    Field::counter(
        "socket_send_dropped",
        "Datagrams dropped by a full socket send buffer",
    ),
    Field::counter(
        "socket_rx_trains",
        "Received messages that carried a UDP GRO train",
    ),
    Field::counter(
        "xdp_rx_malformed",
        "AF_XDP frames that were not a UDP datagram to the proxy",
    ),
    Field::counter(
        "misrouted",
        "Datagrams the steering program gave a worker that does not own them",
    ),
    Field::counter(
        "handoffs",
        "Packets passed to another worker (misrouted datagrams and TUN packets)",
    ),
    Field::counter(
        "tun_handoffs",
        "TUN packets handed to the worker serving their address",
    ),
    Field::counter("handoff_drops", "Handoffs dropped on a full ring"),
    Field::counter("handoffs_received", "Handoffs taken from other workers"),
    Field::counter("steering_errors", "Failed updates of the TUN steering map"),
    Field::counter(
        "peer_forwarded",
        "Datagrams and TUN packets passed to the other live generation's process",
    ),
    Field::counter(
        "peer_drops",
        "Datagrams and TUN packets that could not be passed to the other generation's process",
    ),
    Field::counter(
        "peer_received",
        "Datagrams and TUN packets the other generation's process passed to this one",
    ),
];

/// The latest counters of a running proxy, for its metrics endpoint.
pub struct ProxyMetrics(Latest);

impl ProxyMetrics {
    /// Nothing published yet; not ready once 3 s pass without the workers' counters renewed.
    pub fn new() -> ProxyMetrics {
        ProxyMetrics(Latest::new(Duration::from_secs(3)))
    }

    /// The proxy's counters now (what the stats file holds).
    pub fn update(&self, counters: &Value) {
        self.0.update(counters.clone());
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Source for ProxyMetrics {
    fn collect(&self, out: &mut Families) {
        self.0.read(|counters| {
            let workers: Vec<(Vec<(&str, String)>, &Value)> = counters["workers"]
                .as_array()
                .map(|ws| {
                    ws.iter()
                        .enumerate()
                        .map(|(i, w)| (vec![("worker", i.to_string())], w))
                        .collect()
                })
                .unwrap_or_default();
            out.from_json("mimiq_proxy", FIELDS, &workers);
            for (key, help) in [
                (
                    "burst_ns",
                    "99th percentile of a burst of QUIC datagrams through the proxy to the TUN device since start, ns",
                ),
                (
                    "tun_burst_ns",
                    "99th percentile of a burst of TUN packets through the proxy to datagrams sent since start, ns",
                ),
            ] {
                let p99 = out.gauge(format!("mimiq_proxy_{key}_p99"), help);
                for (labels, w) in &workers {
                    if let Some(v) = w[key]["p99"].as_u64() {
                        p99.sample(labels, v);
                    }
                }
            }
            out.counter(
                "mimiq_proxy_steered",
                "Datagrams the connection-ID steering program sent to their worker's socket",
            )
            .value(counters["steered"].as_u64().unwrap_or(0));
            out.counter(
                "mimiq_proxy_steering_fallback",
                "Datagrams the steering program left to the kernel's hash (long headers, unreadable)",
            )
            .value(counters["steering_fallback"].as_u64().unwrap_or(0));
        });
    }

    fn health(&self) -> Health {
        self.0
            .health("the workers have not all published yet", |counters| {
                format!(
                    "{} worker(s) serving",
                    counters["workers"].as_array().map_or(0, Vec::len)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_counter_of_a_worker_has_a_family() {
        let stats = serde_json::to_value(super::super::Stats::default()).unwrap();
        let keys: Vec<&String> = stats.as_object().unwrap().keys().collect();
        for k in keys {
            assert!(
                k == "burst_ns" || k == "tun_burst_ns" || FIELDS.iter().any(|f| f.key == k),
                "Stats field {k} has no entry in FIELDS"
            );
        }
        for f in FIELDS {
            assert!(
                stats.get(f.key).is_some(),
                "FIELDS names {} which Stats lacks",
                f.key
            );
        }
    }

    #[test]
    fn workers_become_labels_and_health_follows_the_updates() {
        let m = ProxyMetrics::new();
        assert!(matches!(m.health(), Health::NotReady(_)));
        let mut w1 = serde_json::to_value(super::super::Stats::default()).unwrap();
        w1["udp_rx"] = json!(7);
        w1["refused"] = json!({"403": 2});
        let w0 = serde_json::to_value(super::super::Stats::default()).unwrap();
        m.update(&json!({"workers": [w0, w1], "steered": 5, "steering_fallback": 1}));
        assert!(matches!(m.health(), Health::Ready(_)));
        let text = mimiq_metrics::render(std::sync::Arc::new(m));
        assert!(
            text.contains("mimiq_proxy_udp_rx_total{worker=\"1\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("mimiq_proxy_refused_total{worker=\"1\",status=\"403\"} 2\n"));
        assert!(text.contains("# TYPE mimiq_proxy_connections_open gauge\n"));
        assert!(text.contains("mimiq_proxy_steered_total 5\n"));
    }
}
