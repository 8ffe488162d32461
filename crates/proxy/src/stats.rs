//! Telemetry: Istio's standard metrics (Prometheus, on 15090) and Envoy-style counters for
//! the admin `/stats` page.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::cluster::ServiceRef;
use crate::config::istio_stats::{Expr, LABELS, Metric, StatsConfig};
use crate::envoy_stats::{self, Inclusions, Kind};
use crate::peer::Workload;

/// Istio's duration buckets, in milliseconds.
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's size buckets, in bytes.
const SIZE_BYTES: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// What one request or connection is labelled with. Made per request from what the proxy
/// and its connections hold, so every part is shared rather than copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Parties {
    pub source: Arc<Workload>,
    pub source_principal: Arc<str>,
    pub destination: Arc<Workload>,
    pub destination_principal: Arc<str>,
    pub destination_service: Arc<ServiceRef>,
    pub mutual_tls: bool,
}

/// A series' labels: the standard ones its stats filter keeps, then the ones it adds.
type Labels = Vec<(Cow<'static, str>, String)>;

/// A label's value, `missing` when there is none.
fn or(s: &str, missing: &str) -> String {
    if s.is_empty() { missing } else { s }.to_string()
}

fn or_unknown(s: &str) -> String {
    or(s, "unknown")
}

/// A canonical revision: Istio's `latest` when none is known.
fn revision(s: &str) -> String {
    or(s, "latest")
}

impl Parties {
    fn security(&self, reporter: Reporter) -> String {
        match (reporter, self.mutual_tls) {
            (Reporter::Destination, true) => "mutual_tls",
            (Reporter::Destination, false) => "none",
            (Reporter::Source, _) => "unknown",
        }
        .to_string()
    }
}

/// An Envoy-style counter whose name the configuration fixes (`cluster.<name>.upstream_rq_total`),
/// kept where that configuration is: found by name on its first use, then counted without
/// spelling the name out and looking it up on every request.
#[derive(Debug, Default)]
pub struct CounterCell(OnceLock<Arc<AtomicU64>>);

impl CounterCell {
    pub fn inc(&self, stats: &Stats, name: impl std::fmt::Display) {
        self.0
            .get_or_init(|| stats.handle(name))
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// An Envoy stat whose value is read where it lives when asked (connections open now, the
/// configuration's size), rather than counted here.
pub type ReadStat = (String, u64, Kind);

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// What a request's metric series are chosen by (its labels, before they are spelled out).
struct SeriesKey {
    reporter: Reporter,
    parties: Parties,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<String>,
    flags: &'static str,
    dimensions: Dimensions,
}

impl SeriesKey {
    fn matches(&self, o: &RequestOutcome<'_>) -> bool {
        self.reporter == o.reporter
            && self.status == o.status
            && self.protocol == o.protocol
            && self.flags == o.flags
            && self.grpc_status == o.grpc_status
            && self.parties == *o.parties
            && self.dimensions == *o.dimensions
    }
}

/// A request's or connection's stats filter, with the values of the labels it adds that come
/// from the request and its connection.
#[derive(Debug, Clone)]
pub struct Dimensions {
    pub config: Arc<StatsConfig>,
    pub values: Vec<String>,
}

impl PartialEq for Dimensions {
    fn eq(&self, o: &Self) -> bool {
        self.config.id == o.config.id
            && self.values == o.values
            && (Arc::ptr_eq(&self.config, &o.config) || self.config == o.config)
    }
}

/// The metrics one request updates (those its stats filter keeps), resolved from their label
/// sets once.
#[derive(Clone)]
struct Series {
    requests: Option<Counter>,
    duration: Option<Histogram>,
    request_bytes: Option<Histogram>,
    response_bytes: Option<Histogram>,
    /// gRPC's messages each way (gRPC requests only).
    request_messages: Option<Counter>,
    response_messages: Option<Counter>,
}

/// Label sets remembered with their series (a proxy sees a bounded set of peers and codes;
/// past this, requests take the uncached path).
const MAX_SERIES: usize = 4096;

pub struct Stats {
    registry: Registry,
    requests: Family<Labels, Counter>,
    duration: Histograms<Labels>,
    request_bytes: Histograms<Labels>,
    response_bytes: Histograms<Labels>,
    request_messages: Family<Labels, Counter>,
    response_messages: Family<Labels, Counter>,
    tcp_opened: Family<Labels, Counter>,
    tcp_closed: Family<Labels, Counter>,
    tcp_sent: Family<Labels, Counter>,
    tcp_received: Family<Labels, Counter>,
    /// Envoy-style counters by full name (`cluster.<name>.upstream_rq_total`).
    counters: Slots,
    /// Envoy-style gauges of what lives now, by full name.
    gauges: Slots,
    /// Request series by a hash of their key: spelling out and hashing the labels of every
    /// request cost more than the request's own routing.
    series: Mutex<HashMap<u64, (SeriesKey, Series), foldhash::fast::RandomState>>,
    hasher: foldhash::fast::RandomState,
    /// Which Envoy stats Prometheus gets.
    inclusions: Inclusions,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stats")
    }
}

/// The outcome of one request.
pub struct RequestOutcome<'a> {
    pub reporter: Reporter,
    pub parties: &'a Parties,
    pub dimensions: &'a Dimensions,
    pub protocol: &'static str,
    pub status: u16,
    pub grpc_status: Option<String>,
    pub flags: &'static str,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// gRPC messages (request, response), for a gRPC request.
    pub messages: (u64, u64),
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Self::with_inclusions(Inclusions::default())
    }

    /// Stats whose Envoy part reaches Prometheus as `inclusions` say.
    pub fn with_inclusions(inclusions: Inclusions) -> Stats {
        fn durations() -> Histogram {
            Histogram::new(DURATION_MS)
        }
        fn sizes() -> Histogram {
            Histogram::new(SIZE_BYTES)
        }
        let mut registry = Registry::default();
        let requests = Family::default();
        let duration: Histograms<Labels> = Family::new_with_constructor(durations);
        let request_bytes: Histograms<Labels> = Family::new_with_constructor(sizes);
        let response_bytes: Histograms<Labels> = Family::new_with_constructor(sizes);
        let request_messages = Family::default();
        let response_messages = Family::default();
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent = Family::default();
        let tcp_received = Family::default();
        registry.register("istio_requests", "Requests", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size",
            response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages sent by the client",
            request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent by the server",
            response_messages.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register("istio_tcp_sent_bytes", "Bytes sent", tcp_sent.clone());
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received",
            tcp_received.clone(),
        );
        // Istio's stats filter reports the proxy's version, which dashboards read.
        let build: Family<Labels, Gauge> = Family::default();
        build
            .get_or_create(&vec![
                (Cow::Borrowed("component"), "proxy".to_string()),
                (Cow::Borrowed("tag"), env!("CARGO_PKG_VERSION").to_string()),
            ])
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        Stats {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            request_messages,
            response_messages,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            counters: Mutex::default(),
            gauges: Mutex::default(),
            series: Mutex::default(),
            hasher: foldhash::fast::RandomState::default(),
            inclusions,
        }
    }

    pub fn record_request(&self, o: RequestOutcome<'_>) {
        let series = self.series_of(&o);
        if let Some(c) = &series.requests {
            c.inc();
        }
        if let Some(h) = &series.duration {
            h.observe(o.duration_ms);
        }
        if let Some(h) = &series.request_bytes {
            h.observe(o.request_bytes as f64);
        }
        if let Some(h) = &series.response_bytes {
            h.observe(o.response_bytes as f64);
        }
        if let Some(c) = &series.request_messages {
            c.inc_by(o.messages.0);
        }
        if let Some(c) = &series.response_messages {
            c.inc_by(o.messages.1);
        }
    }

    /// The series of a request's labels, from the cache when its key was seen before.
    fn series_of(&self, o: &RequestOutcome<'_>) -> Series {
        let hash = self.hasher.hash_one((
            o.reporter,
            o.parties,
            o.protocol,
            o.status,
            o.grpc_status.as_deref(),
            o.flags,
            o.dimensions.config.id,
            &o.dimensions.values,
        ));
        let mut cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(&hash) {
            Some((key, series)) if key.matches(o) => return series.clone(),
            // A hash collision: the other key keeps its place.
            Some(_) => return self.resolve(o),
            None => {}
        }
        let series = self.resolve(o);
        if cache.len() < MAX_SERIES {
            let key = SeriesKey {
                reporter: o.reporter,
                parties: o.parties.clone(),
                protocol: o.protocol,
                status: o.status,
                grpc_status: o.grpc_status.clone(),
                flags: o.flags,
                dimensions: o.dimensions.clone(),
            };
            cache.insert(hash, (key, series.clone()));
        }
        series
    }

    fn resolve(&self, o: &RequestOutcome<'_>) -> Series {
        let mut values = standard_values(o.reporter, o.parties, o.protocol, o.flags);
        values.push(o.status.to_string());
        values.push(o.grpc_status.clone().unwrap_or_default());
        let status = Some(o.status);
        let labels = |m: Metric| labels_of(m, &values, o.dimensions, status);
        Series {
            requests: labels(Metric::Requests).map(|l| self.requests.get_or_create(&l).clone()),
            duration: labels(Metric::Duration).map(|l| self.duration.get_or_create(&l).clone()),
            request_bytes: labels(Metric::RequestBytes)
                .map(|l| self.request_bytes.get_or_create(&l).clone()),
            response_bytes: labels(Metric::ResponseBytes)
                .map(|l| self.response_bytes.get_or_create(&l).clone()),
            request_messages: labels(Metric::RequestMessages)
                .filter(|_| o.protocol == "grpc")
                .map(|l| self.request_messages.get_or_create(&l).clone()),
            response_messages: labels(Metric::ResponseMessages)
                .filter(|_| o.protocol == "grpc")
                .map(|l| self.response_messages.get_or_create(&l).clone()),
        }
    }

    /// A TCP connection opened, on a chain with the stats filter (`d`).
    pub fn tcp_opened(&self, reporter: Reporter, p: &Parties, d: Option<&Dimensions>) {
        let Some(d) = d else { return };
        let values = standard_values(reporter, p, "tcp", "-");
        if let Some(l) = labels_of(Metric::TcpOpened, &values, d, None) {
            self.tcp_opened.get_or_create(&l).inc();
        }
    }

    /// A TCP connection closed, with the bytes it moved since they were last reported.
    pub fn tcp_closed(
        &self,
        reporter: Reporter,
        p: &Parties,
        d: Option<&Dimensions>,
        flags: &str,
        sent: u64,
        received: u64,
    ) {
        self.tcp_counters(reporter, p, d, flags, [1, sent, received]);
    }

    /// Bytes an open TCP connection moved since they were last reported.
    pub fn tcp_bytes(
        &self,
        reporter: Reporter,
        p: &Parties,
        d: Option<&Dimensions>,
        sent: u64,
        received: u64,
    ) {
        self.tcp_counters(reporter, p, d, "-", [0, sent, received]);
    }

    /// Adds `n` to the closed-connection, sent-bytes and received-bytes counters, those of
    /// them the stats filter `d` keeps (none without one).
    fn tcp_counters(
        &self,
        reporter: Reporter,
        p: &Parties,
        d: Option<&Dimensions>,
        flags: &str,
        n: [u64; 3],
    ) {
        let Some(d) = d else { return };
        let values = standard_values(reporter, p, "tcp", flags);
        let counters = [
            (Metric::TcpClosed, &self.tcp_closed),
            (Metric::TcpSent, &self.tcp_sent),
            (Metric::TcpReceived, &self.tcp_received),
        ];
        for ((metric, family), n) in counters.into_iter().zip(n) {
            if n == 0 && metric == Metric::TcpClosed {
                continue;
            }
            if let Some(l) = labels_of(metric, &values, d, None) {
                family.get_or_create(&l).inc_by(n);
            }
        }
    }

    /// Adds to an Envoy-style counter.
    pub fn inc(&self, name: impl std::fmt::Display) {
        self.add(name, 1);
    }

    /// Adds `n` to the counter `name`.
    pub fn add(&self, name: impl std::fmt::Display, n: u64) {
        slot(&self.counters, name).fetch_add(n, Ordering::Relaxed);
    }

    /// The counter `name`, made at zero when new, for a [`CounterCell`] to keep.
    fn handle(&self, name: impl std::fmt::Display) -> Arc<AtomicU64> {
        slot(&self.counters, name)
    }

    /// A downstream connection of `scope` (`listener.<address>`, `http.<prefix>`): counted in
    /// its `downstream_cx_total`, and in its `downstream_cx_active` while the guard lives.
    pub fn downstream_connection(&self, scope: impl std::fmt::Display) -> Held {
        self.inc(format_args!("{scope}.downstream_cx_total"));
        let gauge = slot(&self.gauges, format_args!("{scope}.downstream_cx_active"));
        gauge.fetch_add(1, Ordering::Relaxed);
        Held(gauge)
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Envoy's stats for `/stats`, sorted by name and filtered by a regex: the counters and
    /// gauges kept here and the stats `read` when asked. Every stat, whatever Prometheus gets.
    pub fn envoy_stats(
        &self,
        filter: Option<&regex::Regex>,
        read: &[ReadStat],
    ) -> Vec<(String, u64)> {
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<(String, u64)> = c
            .iter()
            .chain(g.iter())
            .map(|(k, v)| (k.as_str(), v.load(Ordering::Relaxed)))
            .chain(read.iter().map(|(k, v, _)| (k.as_str(), *v)))
            .filter(|(k, _)| filter.is_none_or(|f| f.is_match(k)))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        all.sort_unstable();
        all
    }

    /// Envoy's `/stats` text: `name: value` lines.
    pub fn envoy_text(&self, filter: Option<&regex::Regex>, read: &[ReadStat]) -> String {
        let mut out = String::new();
        for (k, v) in self.envoy_stats(filter, read) {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out
    }

    /// Prometheus text of Istio's metrics and of the Envoy stats (kept here, and `read` when
    /// asked) that the inclusion list lets through.
    pub fn prometheus_text(&self, read: &[ReadStat]) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &self.registry).is_err() {
            out.clear();
        }
        let c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        let counters = c.iter().map(|(k, v)| (k, v, Kind::Counter));
        let gauges = g.iter().map(|(k, v)| (k, v, Kind::Gauge));
        let kept = counters
            .chain(gauges)
            .map(|(k, v, kind)| (k.as_str(), v.load(Ordering::Relaxed), kind));
        let read = read.iter().map(|(k, v, kind)| (k.as_str(), *v, *kind));
        out.push_str(&envoy_stats::prometheus(&self.inclusions, kept.chain(read)));
        out.push_str("# EOF\n");
        out
    }
}

/// Named atomic values, each shared with whoever keeps it.
type Slots = Mutex<BTreeMap<String, Arc<AtomicU64>>>;

/// The value `name` in `slots`, made at zero when new. The name is spelled out in a buffer
/// kept per thread: stats are named per request or connection, and only a new one needs a
/// string of its own.
fn slot(slots: &Slots, name: impl std::fmt::Display) -> Arc<AtomicU64> {
    use std::fmt::Write;
    thread_local! {
        static NAME: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    NAME.with_borrow_mut(|key| {
        key.clear();
        let _ = write!(key, "{name}");
        let mut m = slots.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(key.as_str()) {
            Some(v) => v.clone(),
            None => m.entry(key.clone()).or_default().clone(),
        }
    })
}

/// A gauge raised by [`Stats::downstream_connection`], lowered again when dropped.
#[derive(Debug)]
pub struct Held(Arc<AtomicU64>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The values of [`LABELS`] up to the request-only ones, in order. As Istio's stats filter:
/// inbound, the service is in this workload's namespace, and a request to no service is to
/// the workload's canonical service; outbound, a service of unknown namespace is in the
/// peer's.
fn standard_values(reporter: Reporter, p: &Parties, protocol: &str, flags: &str) -> Vec<String> {
    let inbound = reporter == Reporter::Destination;
    let service = |s: &str, otherwise: &str| or_unknown(if s.is_empty() { otherwise } else { s });
    let service_default = if inbound {
        &*p.destination.canonical_service
    } else {
        ""
    };
    let service_namespace = if inbound {
        ""
    } else {
        &*p.destination_service.namespace
    };
    let mut v = Vec::with_capacity(LABELS.len());
    v.extend([
        reporter_name(reporter).to_string(),
        or_unknown(&p.source.name),
        or_unknown(&p.source.canonical_service),
        revision(&p.source.canonical_revision),
        or_unknown(&p.source.namespace),
        or_unknown(&p.source_principal),
        or_unknown(&p.source.app),
        or_unknown(&p.source.version),
        or_unknown(&p.source.cluster),
        or_unknown(&p.destination.name),
        or_unknown(&p.destination.namespace),
        or_unknown(&p.destination_principal),
        or_unknown(&p.destination.app),
        or_unknown(&p.destination.version),
        service(&p.destination_service.host, service_default),
        or_unknown(&p.destination.canonical_service),
        revision(&p.destination.canonical_revision),
        service(&p.destination_service.name, service_default),
        service(service_namespace, &p.destination.namespace),
        or_unknown(&p.destination.cluster),
        p.security(reporter),
        protocol.to_string(),
        flags.to_string(),
    ]);
    v
}

/// The labels of metric `m`, None when its stats filter drops it: `values` (of [`LABELS`], as
/// many as the metric has) less the removed ones, then the added ones, of which the response
/// code is `status`.
fn labels_of(m: Metric, values: &[String], d: &Dimensions, status: Option<u16>) -> Option<Labels> {
    let shape = d.config.shape(m);
    if shape.drop {
        return None;
    }
    let mut labels: Labels = LABELS
        .iter()
        .zip(values)
        .enumerate()
        .filter(|(i, _)| shape.removed & (1 << i) == 0)
        .map(|(_, (k, v))| (Cow::Borrowed(*k), v.clone()))
        .collect();
    for (name, at) in &shape.added {
        let value = match (&d.config.exprs[*at], status) {
            (Expr::ResponseCode, Some(s)) => s.to_string(),
            _ => d.values[*at].clone(),
        };
        labels.push((Cow::Owned(name.to_string()), value));
    }
    Some(labels)
}

fn reporter_name(r: Reporter) -> &'static str {
    match r {
        Reporter::Source => "source",
        Reporter::Destination => "destination",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_named_by_format_by_string_or_kept_in_a_cell_are_one() {
        let stats = Stats::new();
        for cluster in ["a", "b", "a"] {
            stats.inc(format_args!("cluster.{cluster}.upstream_rq_total"));
        }
        stats.add("cluster.a.upstream_rq_total", 5);
        let cell = CounterCell::default();
        for _ in 0..2 {
            cell.inc(&stats, "cluster.a.upstream_rq_total");
        }
        assert_eq!(stats.counter("cluster.a.upstream_rq_total"), 9);
        assert_eq!(stats.counter("cluster.b.upstream_rq_total"), 1);
        assert_eq!(
            stats.envoy_text(None, &[]),
            "cluster.a.upstream_rq_total: 9\ncluster.b.upstream_rq_total: 1\n"
        );
    }

    #[test]
    fn requests_with_the_same_labels_share_a_series() {
        let stats = Stats::new();
        let plain = Parties {
            destination_service: Arc::new(ServiceRef {
                host: "reviews.default.svc.cluster.local".into(),
                ..ServiceRef::default()
            }),
            ..Parties::default()
        };
        let mtls = Parties {
            mutual_tls: true,
            ..plain.clone()
        };
        let dimensions = Dimensions {
            config: Arc::default(),
            values: Vec::new(),
        };
        for (parties, status) in [(&plain, 200), (&plain, 200), (&plain, 503), (&mtls, 200)] {
            stats.record_request(RequestOutcome {
                reporter: Reporter::Destination,
                parties,
                dimensions: &dimensions,
                protocol: "http",
                status,
                grpc_status: None,
                flags: "-",
                duration_ms: 1.0,
                request_bytes: 10,
                response_bytes: 20,
                messages: (0, 0),
            });
        }
        let text = stats.prometheus_text(&[]);
        let count = |code: &str, policy: &str| -> Vec<&str> {
            text.lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .filter(|l| l.contains(&format!("response_code=\"{code}\"")))
                .filter(|l| l.contains(&format!("connection_security_policy=\"{policy}\"")))
                .filter_map(|l| l.rsplit(' ').next())
                .collect()
        };
        assert_eq!(count("200", "none"), ["2"], "{text}");
        assert_eq!(count("503", "none"), ["1"], "{text}");
        assert_eq!(count("200", "mutual_tls"), ["1"], "{text}");
        let durations = text
            .lines()
            .filter(|l| l.starts_with("istio_request_duration_milliseconds_count{"))
            .count();
        assert_eq!(durations, 3, "{text}");
    }

    /// Inbound, a request to no service is to the workload's canonical service in its
    /// namespace; outbound, a service's namespace is its own, else the peer's.
    #[test]
    fn the_destination_service_falls_back_as_istios_filter_does() {
        let workload = |name: &str, namespace: &str| {
            Arc::new(Workload {
                name: name.into(),
                namespace: namespace.into(),
                canonical_service: name.into(),
                ..Workload::default()
            })
        };
        let value = |reporter, p: &Parties, label: &str| {
            let at = LABELS.iter().position(|l| *l == label).unwrap();
            standard_values(reporter, p, "http", "-")[at].clone()
        };
        let inbound = Parties {
            destination: workload("ratings", "shop"),
            ..Parties::default()
        };
        for label in ["destination_service", "destination_service_name"] {
            assert_eq!(value(Reporter::Destination, &inbound, label), "ratings");
            assert_eq!(value(Reporter::Source, &inbound, label), "unknown");
        }
        let service = |namespace: &str| {
            Arc::new(ServiceRef {
                host: "ratings.shop.svc.cluster.local".into(),
                name: "ratings".into(),
                namespace: namespace.into(),
            })
        };
        let ns = "destination_service_namespace";
        let to = |namespace| Parties {
            destination: workload("ratings", "peer"),
            destination_service: service(namespace),
            ..Parties::default()
        };
        assert_eq!(value(Reporter::Source, &to("shop"), ns), "shop");
        assert_eq!(value(Reporter::Source, &to(""), ns), "peer");
        assert_eq!(value(Reporter::Destination, &to("shop"), ns), "peer");
    }
}
