//! mimiq's one metrics path, shared by every binary (switch, proxy, allocator, agent).
//!
//! A binary describes what it counts as a [`Source`]: on each scrape, [`Source::collect`] turns
//! the counters its threads last published (plain integers, copied out on an interval, never
//! atomics on the per-packet path) into [`Families`], which prometheus-client encodes through its
//! collector interface in the Prometheus text format (version 0.0.4). [`serve`] answers on one
//! address:
//!
//! * `GET /metrics`: every family, named `mimiq_<binary>_<what>` (`_total` added to counters),
//!   with labels for worker, port and reason;
//! * `GET /healthz`: `200 ready: ...` or `503 not ready: ...` ([`Source::health`]), for load
//!   balancers and routing daemons;
//! * whatever else the source serves ([`Source::page`]; the allocator's `/leases`).
//!
//! [`get`] is the client `<binary> stats` uses to read a running process's counters, and
//! [`hlog`] writes the latency histograms every binary keeps.

#![forbid(unsafe_code)]

pub mod hlog;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

/// Whether a family only grows (a counter, named with `_total`) or moves both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows while the process lives.
    Counter,
    /// Goes up and down (open connections, leases, a latency percentile).
    Gauge,
}

/// One family: a name, a help text and its samples.
#[derive(Debug, Clone)]
pub struct Family {
    name: String,
    help: String,
    kind: Kind,
    samples: Vec<(Vec<(String, String)>, u64)>,
}

impl Family {
    /// Adds a sample with `labels`.
    pub fn sample<K: ToString, V: ToString>(&mut self, labels: &[(K, V)], value: u64) -> &mut Self {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.push((labels, value));
        self
    }

    /// Adds a sample without labels.
    pub fn value(&mut self, value: u64) -> &mut Self {
        self.samples.push((Vec::new(), value));
        self
    }
}

/// What one scrape collects.
#[derive(Debug, Clone, Default)]
pub struct Families(Vec<Family>);

impl Families {
    /// A new counter family; `name` without the `_total` the encoding adds.
    pub fn counter(&mut self, name: impl Into<String>, help: impl Into<String>) -> &mut Family {
        self.family(Kind::Counter, name, help)
    }

    /// A new gauge family.
    pub fn gauge(&mut self, name: impl Into<String>, help: impl Into<String>) -> &mut Family {
        self.family(Kind::Gauge, name, help)
    }

    /// A new family of `kind`.
    pub fn family(
        &mut self,
        kind: Kind,
        name: impl Into<String>,
        help: impl Into<String>,
    ) -> &mut Family {
        self.0.push(Family {
            name: name.into(),
            help: help.into(),
            kind,
            samples: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }

    /// The families' names as exposed (`_total` on counters).
    pub fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|f| match f.kind {
                Kind::Counter => format!("{}_total", f.name),
                Kind::Gauge => f.name.clone(),
            })
            .collect()
    }
}

/// How a field of a binary's JSON counters is exposed ([`Families::from_json`]).
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The field's key in the JSON object; the family is `<prefix>_<key>`.
    pub key: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// For a field holding an object of counts by reason or status: the label its keys become.
    pub label: Option<&'static str>,
    /// The help text.
    pub help: &'static str,
}

impl Field {
    /// A plain counter.
    pub const fn counter(key: &'static str, help: &'static str) -> Field {
        Field {
            key,
            kind: Kind::Counter,
            label: None,
            help,
        }
    }

    /// A gauge.
    pub const fn gauge(key: &'static str, help: &'static str) -> Field {
        Field {
            key,
            kind: Kind::Gauge,
            label: None,
            help,
        }
    }

    /// Counters by `label` (an object of counts).
    pub const fn by(key: &'static str, label: &'static str, help: &'static str) -> Field {
        Field {
            key,
            kind: Kind::Counter,
            label: Some(label),
            help,
        }
    }
}

impl Families {
    /// One family per entry of `fields`, `<prefix>_<key>`, with a sample per part: each part is
    /// the labels that name it (a worker) and its JSON counters. A part without the field, or
    /// with a value that is not a count, adds no sample.
    pub fn from_json(
        &mut self,
        prefix: &str,
        fields: &[Field],
        parts: &[(Vec<(&str, String)>, &Value)],
    ) {
        for f in fields {
            let family = self.family(f.kind, format!("{prefix}_{}", f.key), f.help);
            for (labels, counters) in parts {
                match (&counters[f.key], f.label) {
                    (Value::Object(by), Some(label)) => {
                        let mut by: Vec<_> = by.iter().collect();
                        by.sort_by(|a, b| a.0.cmp(b.0));
                        for (k, v) in by {
                            if let Some(v) = v.as_u64() {
                                let mut l = labels.clone();
                                l.push((label, k.clone()));
                                family.sample(&l, v);
                            }
                        }
                    }
                    (v, None) => {
                        if let Some(v) = v.as_u64() {
                            family.sample(labels, v);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Ready and forwarding (200), with what was checked.
    Ready(String),
    /// Not ready (503), with why.
    NotReady(String),
}

/// The counters a binary last published as JSON (its stats file's content), and when: what
/// the proxy's and the agent's sources read. Ready while they are renewed; not before the
/// first, nor after `silence` without one.
pub struct Latest {
    latest: std::sync::Mutex<Option<(std::time::Instant, Value)>>,
    silence: Duration,
}

impl Latest {
    /// Nothing published yet.
    pub fn new(silence: Duration) -> Latest {
        Latest {
            latest: std::sync::Mutex::new(None),
            silence,
        }
    }

    /// The counters now.
    pub fn update(&self, counters: Value) {
        *self.lock() = Some((std::time::Instant::now(), counters));
    }

    /// `f` of the latest counters, if any were published.
    pub fn read<R>(&self, f: impl FnOnce(&Value) -> R) -> Option<R> {
        self.lock().as_ref().map(|(_, v)| f(v))
    }

    /// Ready (saying `ready` of the counters) while they are renewed; otherwise why not.
    pub fn health(&self, waiting: &str, ready: impl FnOnce(&Value) -> String) -> Health {
        match &*self.lock() {
            None => Health::NotReady(waiting.to_string()),
            Some((at, _)) if at.elapsed() > self.silence => Health::NotReady(format!(
                "nothing published for {} ms",
                at.elapsed().as_millis()
            )),
            Some((_, v)) => Health::Ready(ready(v)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, Value)>> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A binary's counters and health, read on each request.
pub trait Source: Send + Sync + 'static {
    /// The families of this scrape.
    fn collect(&self, out: &mut Families);
    /// Whether the process is ready and forwarding.
    fn health(&self) -> Health;
    /// A page of its own at `path` (text), if the binary serves one.
    fn page(&self, _path: &str) -> Option<Result<String, String>> {
        None
    }
}

/// The adapter between a [`Source`] and prometheus-client's registry.
struct Collect(Arc<dyn Source>);

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collect")
    }
}

impl Collector for Collect {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut families = Families::default();
        self.0.collect(&mut families);
        for f in &families.0 {
            match f.kind {
                Kind::Counter => {
                    let mut metric = encoder.encode_descriptor(
                        &f.name,
                        &f.help,
                        None,
                        prometheus_client::metrics::MetricType::Counter,
                    )?;
                    for (labels, v) in &f.samples {
                        ConstCounter::new(*v).encode(metric.encode_family(labels)?)?;
                    }
                }
                Kind::Gauge => {
                    let mut metric = encoder.encode_descriptor(
                        &f.name,
                        &f.help,
                        None,
                        prometheus_client::metrics::MetricType::Gauge,
                    )?;
                    for (labels, v) in &f.samples {
                        let v = i64::try_from(*v).unwrap_or(i64::MAX);
                        ConstGauge::new(v).encode(metric.encode_family(labels)?)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The Content-Type of what [`render`] gives.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// `source`'s families in the Prometheus text format.
pub fn render(source: Arc<dyn Source>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collect(source)));
    let mut out = String::new();
    // Writing to a String cannot fail, and the families are well-formed by construction.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// A metrics endpoint serving from a thread of its own; stopped when dropped.
pub struct Endpoint {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `source` on `addr` (`/metrics`, `/healthz` and its pages). tiny_http reads each
/// connection on a thread of its own, so a client that connects and says nothing holds up no
/// scrape. Fails with one line when the address cannot be bound (in use, not local).
pub fn serve(addr: SocketAddr, source: Arc<dyn Source>) -> Result<Endpoint, String> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
    let addr = server.server_addr().to_ip().unwrap_or(addr);
    let server = Arc::new(server);
    let thread = {
        let server = Arc::clone(&server);
        std::thread::Builder::new()
            .name("mimiq-metrics".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let (status, content_type, body) =
                        answer(&source, request.method(), request.url());
                    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type)
                        .expect("constant header is valid");
                    let response = tiny_http::Response::from_string(body)
                        .with_status_code(status)
                        .with_header(header);
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| format!("metrics thread: {e}"))?
    };
    Ok(Endpoint {
        addr,
        server,
        thread: Some(thread),
    })
}

/// Status, Content-Type and body for a request.
fn answer(
    source: &Arc<dyn Source>,
    method: &tiny_http::Method,
    url: &str,
) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if *method != tiny_http::Method::Get {
        return (405, TEXT, "GET only\n".into());
    }
    let path = url.split('?').next().unwrap_or(url);
    match path {
        "/metrics" => (200, CONTENT_TYPE, render(Arc::clone(source))),
        "/healthz" => match source.health() {
            Health::Ready(why) => (200, TEXT, format!("ready: {why}\n")),
            Health::NotReady(why) => (503, TEXT, format!("not ready: {why}\n")),
        },
        _ => match source.page(path) {
            Some(Ok(body)) => (200, TEXT, body),
            Some(Err(why)) => (503, TEXT, format!("{why}\n")),
            None => (404, TEXT, "not found: try /metrics or /healthz\n".into()),
        },
    }
}

/// `GET path` from a metrics endpoint at `at`: the body of a 200 answer, or the status line.
/// An unspecified address (`0.0.0.0`, `::`) is asked on loopback.
pub fn get(mut at: SocketAddr, path: &str) -> Result<String, String> {
    if at.ip().is_unspecified() {
        at.set_ip(match at {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let fail = |e: std::io::Error| format!("{at}: {e}");
    let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(2)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    // HTTP/1.0: the answer comes whole (no chunked encoding) and the server closes.
    write!(s, "GET {path} HTTP/1.0\r\nHost: {at}\r\n\r\n").map_err(fail)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(fail)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{at}: malformed HTTP response"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{at}{path}: {status}"));
    }
    Ok(body.to_string())
}

/// The samples of a scrape as `name{labels} value` lines, those at 0 left out unless `all`.
pub fn samples_table(text: &str, all: bool) -> String {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| all || l.rsplit_once(' ').is_none_or(|(_, v)| v != "0"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixed(Health);

    impl Source for Fixed {
        fn collect(&self, out: &mut Families) {
            out.counter("mimiq_test_rx_packets", "Packets received")
                .sample(&[("worker", "0")], 10)
                .sample(&[("worker", "1")], 0);
            out.gauge("mimiq_test_connections_open", "Connections open now")
                .value(3);
            let w0 = json!({"drops": {"too_big": 2, "no_route": 1}, "udp_rx": 5});
            out.from_json(
                "mimiq_test",
                &[
                    Field::by("drops", "reason", "Drops by reason"),
                    Field::counter("udp_rx", "Datagrams received"),
                    Field::counter("absent", "Not in the JSON"),
                ],
                &[(vec![("worker", "0".into())], &w0)],
            );
        }
        fn health(&self) -> Health {
            self.0.clone()
        }
        fn page(&self, path: &str) -> Option<Result<String, String>> {
            (path == "/leases").then(|| Ok("one lease\n".into()))
        }
    }

    /// A sample: its name, its sorted labels, its value.
    type Sample = (String, Vec<(String, String)>, f64);

    fn scrape(text: &str) -> Vec<Sample> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
        parsed
            .samples
            .into_iter()
            .map(|s| {
                let mut labels: Vec<_> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                labels.sort();
                let v = match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    other => panic!("unexpected {other:?}"),
                };
                (s.metric, labels, v)
            })
            .collect()
    }

    #[test]
    fn families_render_as_prometheus_text_with_types_and_labels() {
        let text = render(Arc::new(Fixed(Health::Ready("ok".into()))));
        assert!(
            text.contains("# TYPE mimiq_test_rx_packets_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP mimiq_test_rx_packets_total Packets received\n"));
        assert!(text.contains("# TYPE mimiq_test_connections_open gauge\n"));
        let samples = scrape(&text);
        let l = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            samples,
            [
                (
                    "mimiq_test_rx_packets_total".into(),
                    l(&[("worker", "0")]),
                    10.0
                ),
                (
                    "mimiq_test_rx_packets_total".into(),
                    l(&[("worker", "1")]),
                    0.0
                ),
                ("mimiq_test_connections_open".into(), vec![], 3.0),
                (
                    "mimiq_test_drops_total".into(),
                    l(&[("reason", "no_route"), ("worker", "0")]),
                    1.0
                ),
                (
                    "mimiq_test_drops_total".into(),
                    l(&[("reason", "too_big"), ("worker", "0")]),
                    2.0
                ),
                ("mimiq_test_udp_rx_total".into(), l(&[("worker", "0")]), 5.0),
            ]
        );
    }

    #[test]
    fn the_endpoint_serves_metrics_health_and_pages_and_reports_an_address_in_use() {
        let ready = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Fixed(Health::Ready("2 workers".into()))),
        )
        .unwrap();
        let at = ready.local_addr();
        let metrics = get(at, "/metrics").unwrap();
        assert!(
            metrics.contains("mimiq_test_rx_packets_total{worker=\"0\"} 10"),
            "{metrics}"
        );
        assert_eq!(get(at, "/healthz").unwrap(), "ready: 2 workers\n");
        assert_eq!(get(at, "/leases").unwrap(), "one lease\n");
        assert!(get(at, "/nothing").unwrap_err().contains("404"));
        // An idle client that never sends a request holds up no scrape.
        let _idle = TcpStream::connect(at).unwrap();
        assert!(get(at, "/metrics").is_ok());

        let in_use = serve(at, Arc::new(Fixed(Health::Ready(String::new()))))
            .err()
            .unwrap();
        assert!(
            in_use.starts_with(&format!("metrics endpoint {at}: ")),
            "{in_use}"
        );
        assert!(!in_use.contains('\n'));

        let not_ready = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Fixed(Health::NotReady("worker 1 silent for 3 s".into()))),
        )
        .unwrap();
        let err = get(not_ready.local_addr(), "/healthz").unwrap_err();
        assert!(err.contains("503"), "{err}");
    }

    #[test]
    fn the_samples_table_leaves_zeros_out_unless_asked() {
        let text = render(Arc::new(Fixed(Health::Ready(String::new()))));
        let t = samples_table(&text, false);
        assert!(t.contains("mimiq_test_rx_packets_total{worker=\"0\"} 10\n"));
        assert!(!t.contains("worker=\"1\""));
        assert!(samples_table(&text, true).contains("worker=\"1\"} 0\n"));
    }
}
