//! Distributed tracing as Envoy's Zipkin tracer does it in Istio: per request a sampling
//! decision (the caller's `x-b3-sampled` when it sent one), B3 context propagated upstream with
//! this proxy's span as the parent, and sampled spans reported in batches to the collector
//! cluster as Zipkin v2 JSON (`POST /api/v2/spans`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use envoy_types::pb::envoy::config::trace::v3::{ZipkinConfig, tracing as pb_tracing, zipkin_config};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as PbTracing;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::config::route::roll;
use crate::stats::Stats;

const TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");
const FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");

pub const ZIPKIN: &str = "envoy.tracers.zipkin";

/// Envoy's defaults (`tracing.zipkin.min_flush_spans`, `tracing.zipkin.flush_interval_ms`).
const MIN_FLUSH_SPANS: usize = 5;
const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// A report waits this long for the collector's answer.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Finished spans waiting for the reporter; beyond this they are dropped (and counted) rather
/// than held while a collector is slow.
const QUEUE: usize = 4096;
/// Spans in one report at most.
const MAX_BATCH: usize = 1000;
/// Envoy's default `max_path_tag_length`.
const MAX_PATH_TAG: usize = 256;

/// Where spans go: the collector cluster, path and `Host`, how long a report may take, and
/// headers it carries.
#[derive(Debug, PartialEq, Eq)]
pub struct Collector {
    pub cluster: String,
    pub endpoint: String,
    pub hostname: String,
    pub timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Collector {
    /// From `collector_service` (Istio 1.29 and later) or the older `collector_cluster`,
    /// `collector_endpoint` and `collector_hostname`.
    fn of(z: ZipkinConfig) -> Result<Collector, String> {
        use envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType;
        let Some(service) = z.collector_service else {
            if z.collector_cluster.is_empty() {
                return Err("zipkin tracer: collector_cluster is empty".into());
            }
            return Ok(Collector {
                hostname: if z.collector_hostname.is_empty() {
                    z.collector_cluster.clone()
                } else {
                    z.collector_hostname
                },
                cluster: z.collector_cluster,
                endpoint: if z.collector_endpoint.is_empty() {
                    "/api/v2/spans".into()
                } else {
                    z.collector_endpoint
                },
                timeout: REPORT_TIMEOUT,
                headers: Vec::new(),
            });
        };
        let uri = service.http_uri.unwrap_or_default();
        let Some(HttpUpstreamType::Cluster(cluster)) = uri.http_upstream_type else {
            return Err("zipkin tracer: collector_service names no cluster".into());
        };
        let parsed: http::Uri = uri.uri.parse().map_err(|_| {
            format!(
                "zipkin tracer: collector_service uri {:?} is not a URI",
                uri.uri
            )
        })?;
        let mut headers = Vec::new();
        for h in &service.request_headers_to_add {
            let Some(hv) = &h.header else { continue };
            let name = HeaderName::from_bytes(hv.key.as_bytes());
            let value = HeaderValue::from_str(&hv.value);
            match (name, value) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                _ => return Err(format!("zipkin tracer: bad collector header {:?}", hv.key)),
            }
        }
        Ok(Collector {
            hostname: parsed
                .authority()
                .map_or_else(|| cluster.clone(), |a| a.to_string()),
            endpoint: parsed
                .path_and_query()
                .map_or("/api/v2/spans", |p| p.as_str())
                .to_string(),
            cluster,
            timeout: uri
                .timeout
                .as_ref()
                .map(crate::config::listener::pb_duration)
                .filter(|d| !d.is_zero())
                .unwrap_or(REPORT_TIMEOUT),
            headers,
        })
    }
}

#[derive(Debug)]
enum TagValue {
    Literal(String),
    Header { name: HeaderName, default: String },
}

/// A connection manager's `tracing`, when it names a tracer this proxy runs.
#[derive(Debug)]
pub struct Tracing {
    /// Shares of requests traced, in parts per million.
    client: u32,
    random: u32,
    overall: u32,
    max_path_tag: usize,
    tags: Vec<(String, TagValue)>,
    trace_id_128bit: bool,
    collector: Arc<Collector>,
}

fn percent_ppm(p: Option<&envoy_types::pb::envoy::r#type::v3::Percent>) -> u32 {
    // Envoy's defaults: client and overall 100%, random 100%.
    p.map_or(1_000_000, |p| {
        (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32
    })
}

impl Tracing {
    /// None when the connection manager traces with no tracer (Envoy then has nothing to
    /// report to); an error for a tracer other than Zipkin, or a Zipkin it cannot run.
    pub fn compile(t: &PbTracing) -> Result<Option<Tracing>, String> {
        use prost::Message;
        let Some(provider) = &t.provider else {
            return Ok(None);
        };
        let any = provider
            .config_type
            .as_ref()
            .map(|pb_tracing::http::ConfigType::TypedConfig(any)| any);
        let type_url = any.map_or("", |a| a.type_url.as_str());
        if !(provider.name == ZIPKIN || type_url.ends_with(".ZipkinConfig")) {
            return Err(format!(
                "tracing provider {:?} ({type_url}) is not supported; only {ZIPKIN} is",
                provider.name
            ));
        }
        let z = any
            .map(|a| ZipkinConfig::decode(a.value.as_slice()))
            .transpose()
            .map_err(|e| format!("zipkin tracer: {e}"))?
            .unwrap_or_default();
        match zipkin_config::CollectorEndpointVersion::try_from(z.collector_endpoint_version) {
            Ok(zipkin_config::CollectorEndpointVersion::HttpJson) => {}
            _ => {
                return Err(format!(
                    "zipkin tracer: collector_endpoint_version {} is not supported; only HTTP_JSON is",
                    z.collector_endpoint_version
                ));
            }
        }
        if z.shared_span_context.as_ref().is_some_and(|b| b.value) {
            return Err("zipkin tracer: shared_span_context is not supported".into());
        }
        if z.trace_context_option != zipkin_config::TraceContextOption::UseB3 as i32 {
            return Err("zipkin tracer: only B3 context propagation (USE_B3) is supported".into());
        }
        #[allow(deprecated)]
        if z.split_spans_for_request {
            return Err("zipkin tracer: split_spans_for_request is not supported".into());
        }
        let trace_id_128bit = z.trace_id_128bit;
        let collector = Collector::of(z)?;
        let mut tags = Vec::new();
        for tag in &t.custom_tags {
            let value = match &tag.r#type {
                Some(custom_tag::Type::Literal(l)) => TagValue::Literal(l.value.clone()),
                Some(custom_tag::Type::Environment(e)) => TagValue::Literal(
                    std::env::var(&e.name).unwrap_or_else(|_| e.default_value.clone()),
                ),
                Some(custom_tag::Type::RequestHeader(h)) => TagValue::Header {
                    name: HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                        format!("custom tag {:?}: bad header name {:?}", tag.tag, h.name)
                    })?,
                    default: h.default_value.clone(),
                },
                // Metadata and formatter tags: values this proxy does not keep; such a tag
                // is left out of the span, as Envoy does when the value is absent.
                Some(custom_tag::Type::Metadata(_) | custom_tag::Type::Value(_)) | None => {
                    continue;
                }
            };
            tags.push((tag.tag.clone(), value));
        }
        Ok(Some(Tracing {
            client: percent_ppm(t.client_sampling.as_ref()),
            random: percent_ppm(t.random_sampling.as_ref()),
            overall: percent_ppm(t.overall_sampling.as_ref()),
            max_path_tag: t
                .max_path_tag_length
                .as_ref()
                .map_or(MAX_PATH_TAG, |l| l.value as usize),
            tags,
            trace_id_128bit,
            collector: Arc::new(collector),
        }))
    }

    /// Whether a request without a sampling decision of its caller is traced: forced, or
    /// chosen by the client's trace id or at random, then within the overall share.
    fn decide(&self, h: &HeaderMap) -> bool {
        let chosen = h.contains_key(FORCE_TRACE)
            || (h.contains_key(CLIENT_TRACE_ID) && roll(self.client))
            || roll(self.random);
        chosen && roll(self.overall)
    }

    /// Starts this proxy's span of a request: the caller's trace continues (its span is the
    /// parent), or a new one begins.
    pub fn start(&self, req: &Parts, ctx: SpanStart<'_>) -> Span {
        let h = &req.headers;
        let incoming = h
            .get(TRACE_ID)
            .and_then(|v| TraceId::parse(v.as_bytes()))
            .map(|t| (t, h.get(SPAN_ID).and_then(|v| parse_id(v.as_bytes()))));
        let sampled = match h.get(SAMPLED).map(HeaderValue::as_bytes) {
            Some(b"1" | b"true" | b"d") => true,
            Some(b"0" | b"false") => false,
            _ => h.get(FLAGS).is_some_and(|f| f == "1") || self.decide(h),
        };
        let (trace, parent) = match incoming {
            Some((t, parent)) => (t, parent),
            None => (TraceId::new(self.trace_id_128bit), None),
        };
        let id = nonzero_id();
        let record = sampled.then(|| Box::new(self.record(req, ctx)));
        Span {
            trace,
            id,
            parent,
            sampled,
            record,
        }
    }

    /// What a sampled span reports, read from the request as it arrived.
    fn record(&self, req: &Parts, ctx: SpanStart<'_>) -> Record {
        let h = &req.headers;
        let text = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let host = crate::http::authority(req).unwrap_or_default();
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let scheme = if ctx.tls { "https" } else { "http" };
        let mut url = format!("{scheme}://{host}{path}");
        if url.len() > self.max_path_tag {
            let mut end = self.max_path_tag;
            while !url.is_char_boundary(end) {
                end -= 1;
            }
            url.truncate(end);
        }
        let mut tags = Map::new();
        let mut tag = |k: &str, v: &str| {
            tags.insert(k.to_string(), Value::String(v.to_string()));
        };
        tag("component", "proxy");
        tag("node_id", ctx.node_id);
        tag("guid:x-request-id", text("x-request-id"));
        tag("http.url", &url);
        tag("http.method", req.method.as_str());
        tag("http.protocol", crate::http::protocol_name(req.version));
        tag("user_agent", text("user-agent"));
        tag(
            "downstream_cluster",
            Some(text("x-envoy-downstream-service-cluster"))
                .filter(|s| !s.is_empty())
                .unwrap_or("-"),
        );
        tag("peer.address", &ctx.peer.to_string());
        for (name, value) in &self.tags {
            match value {
                TagValue::Literal(v) => tag(name, v),
                TagValue::Header {
                    name: header,
                    default,
                } => match h.get(header).and_then(|v| v.to_str().ok()) {
                    Some(v) => tag(name, v),
                    None if !default.is_empty() => tag(name, default),
                    None => {}
                },
            }
        }
        Record {
            collector: self.collector.clone(),
            reporter: ctx.reporter.clone(),
            // The request's host until a route's decorator names it.
            name: host.to_string(),
            kind: if ctx.inbound { "SERVER" } else { "CLIENT" },
            upstream_cluster: String::new(),
            local: ctx.local.clone(),
            wall: SystemTime::now(),
            start: Instant::now(),
            tags,
        }
    }
}

/// What a span takes from its connection and route when it starts.
pub struct SpanStart<'a> {
    pub inbound: bool,
    pub tls: bool,
    pub peer: std::net::SocketAddr,
    pub node_id: &'a str,
    pub local: &'a Arc<Endpoint>,
    pub reporter: &'a Reporter,
}

/// Zipkin's `localEndpoint`: the service this proxy reports as and its address.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    pub service_name: String,
    pub ip: Option<std::net::IpAddr>,
}

impl Endpoint {
    fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "serviceName".into(),
            Value::String(self.service_name.clone()),
        );
        match self.ip {
            Some(std::net::IpAddr::V4(ip)) => {
                m.insert("ipv4".into(), Value::String(ip.to_string()));
            }
            Some(std::net::IpAddr::V6(ip)) => {
                m.insert("ipv6".into(), Value::String(ip.to_string()));
            }
            None => {}
        }
        Value::Object(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TraceId {
    /// The high 64 bits of a 128-bit id; None for a 64-bit one.
    high: Option<u64>,
    low: u64,
}

impl TraceId {
    fn new(bits128: bool) -> TraceId {
        TraceId {
            high: bits128.then(nonzero_id),
            low: nonzero_id(),
        }
    }

    /// 16 or 32 hex digits, as B3 carries them.
    fn parse(b: &[u8]) -> Option<TraceId> {
        match b.len() {
            16 => Some(TraceId {
                high: None,
                low: parse_id(b)?,
            }),
            32 => Some(TraceId {
                high: Some(parse_id(&b[..16])?),
                low: parse_id(&b[16..])?,
            }),
            _ => None,
        }
    }

    fn hex(&self) -> String {
        match self.high {
            Some(h) => format!("{h:016x}{:016x}", self.low),
            None => format!("{:016x}", self.low),
        }
    }
}

fn parse_id(b: &[u8]) -> Option<u64> {
    if b.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(b).ok()?, 16)
        .ok()
        .filter(|id| *id != 0)
}

fn nonzero_id() -> u64 {
    rand::random::<u64>().max(1)
}

fn id_header(id: u64) -> HeaderValue {
    HeaderValue::try_from(format!("{id:016x}")).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A request's span: its B3 context, and what it reports when sampled.
#[derive(Debug)]
pub struct Span {
    trace: TraceId,
    id: u64,
    parent: Option<u64>,
    sampled: bool,
    record: Option<Box<Record>>,
}

#[derive(Debug)]
struct Record {
    collector: Arc<Collector>,
    reporter: Reporter,
    name: String,
    kind: &'static str,
    upstream_cluster: String,
    local: Arc<Endpoint>,
    wall: SystemTime,
    start: Instant,
    tags: Map<String, Value>,
}

/// How a traced request ended.
pub struct Outcome<'a> {
    pub status: u16,
    pub flags: &'a str,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Span {
    /// Names the span after the route's decorator.
    pub fn set_operation(&mut self, op: &str) {
        if let Some(r) = self.record.as_mut() {
            op.clone_into(&mut r.name);
        }
    }

    pub fn set_upstream_cluster(&mut self, cluster: &str) {
        if let Some(r) = self.record.as_mut() {
            cluster.clone_into(&mut r.upstream_cluster);
        }
    }

    /// The B3 headers the upstream gets: the same trace, this span as its parent.
    pub fn inject(&self, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::try_from(self.trace.hex()) {
            h.insert(TRACE_ID, v);
        }
        h.insert(SPAN_ID, id_header(self.id));
        match self.parent {
            Some(p) => {
                h.insert(PARENT_SPAN_ID, id_header(p));
            }
            None => {
                h.remove(PARENT_SPAN_ID);
            }
        }
        h.insert(
            SAMPLED,
            HeaderValue::from_static(if self.sampled { "1" } else { "0" }),
        );
    }

    /// Ends the span; a sampled one goes to the reporter.
    pub fn finish(self, o: Outcome<'_>) {
        let Some(r) = self.record else {
            return;
        };
        let mut tags = r.tags;
        let mut tag = |k: &str, v: String| {
            tags.insert(k.to_string(), Value::String(v));
        };
        tag("http.status_code", o.status.to_string());
        tag("response_flags", o.flags.to_string());
        tag("request_size", o.request_bytes.to_string());
        tag("response_size", o.response_bytes.to_string());
        let cluster = if r.upstream_cluster.is_empty() {
            "-".to_string()
        } else {
            r.upstream_cluster
        };
        tag("upstream_cluster", cluster.clone());
        tag("upstream_cluster.name", cluster);
        if o.status >= 500 || o.status == 0 {
            tag("error", "true".to_string());
        }
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut span = json!({
            "traceId": self.trace.hex(),
            "id": format!("{:016x}", self.id),
            "name": r.name,
            "kind": r.kind,
            "timestamp": micros(r.wall.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()),
            "duration": micros(r.start.elapsed()).max(1),
            "localEndpoint": r.local.json(),
            "tags": tags,
        });
        if let (Some(p), Some(m)) = (self.parent, span.as_object_mut()) {
            m.insert("parentId".into(), Value::String(format!("{p:016x}")));
        }
        r.reporter.report(Finished {
            collector: r.collector,
            span,
        });
    }
}

struct Finished {
    collector: Arc<Collector>,
    span: Value,
}

/// Hands finished spans to the task that reports them.
#[derive(Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Finished>,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporter")
    }
}

impl Reporter {
    /// Starts the reporting task, which sends to clusters of the configuration in force.
    pub fn start(config: watch::Receiver<Arc<Config>>, stats: Arc<Stats>) -> Reporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, config, stats.clone()));
        Reporter { tx, stats }
    }

    fn report(&self, f: Finished) {
        if self.tx.try_send(f).is_err() {
            self.stats.inc(format_args!("tracing.zipkin.spans_dropped"));
        }
    }
}

/// Collects finished spans and sends them when enough wait or the flush interval has passed
/// since the first, as Envoy's Zipkin reporter does; one report at a time, each bounded in
/// time. Idle, it sleeps without a timer.
async fn run(
    mut rx: mpsc::Receiver<Finished>,
    config: watch::Receiver<Arc<Config>>,
    stats: Arc<Stats>,
) {
    let mut batch: Vec<Finished> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            None => rx.recv().await,
            Some(d) => tokio::select! {
                got = rx.recv() => got,
                () = tokio::time::sleep_until(d) => {
                    stats.inc(format_args!("tracing.zipkin.timer_flushed"));
                    flush(&mut batch, &mut rx, &config, &stats).await;
                    deadline = None;
                    continue;
                }
            },
        };
        let Some(f) = next else {
            flush(&mut batch, &mut rx, &config, &stats).await;
            return;
        };
        batch.push(f);
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_INTERVAL);
        if batch.len() >= MIN_FLUSH_SPANS {
            flush(&mut batch, &mut rx, &config, &stats).await;
            deadline = None;
        }
    }
}

/// Sends what waits (and what queued meanwhile, up to a batch), one report per collector.
async fn flush(
    batch: &mut Vec<Finished>,
    rx: &mut mpsc::Receiver<Finished>,
    config: &watch::Receiver<Arc<Config>>,
    stats: &Stats,
) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(f) => batch.push(f),
            Err(_) => break,
        }
    }
    while !batch.is_empty() {
        let collector = batch[0].collector.clone();
        let (mine, rest): (Vec<_>, Vec<_>) =
            batch.drain(..).partition(|f| f.collector == collector);
        *batch = rest;
        let n = mine.len();
        let body = Value::Array(mine.into_iter().map(|f| f.span).collect());
        let cluster = config.borrow().clusters.get(&collector.cluster).cloned();
        let Some(cluster) = cluster else {
            stats.inc(format_args!("tracing.zipkin.reports_skipped_no_cluster"));
            continue;
        };
        let mut req = http::Request::post(collector.endpoint.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::HOST, collector.hostname.as_str());
        for (k, v) in &collector.headers {
            req = req.header(k, v);
        }
        let req = req.body(Bytes::from(body.to_string()));
        let Ok(req) = req else {
            stats.inc(format_args!("tracing.zipkin.reports_failed"));
            continue;
        };
        let sent = crate::http::send_to_cluster(&cluster, req, collector.timeout, stats).await;
        match sent {
            Some(status) if (200..300).contains(&status) => {
                stats.inc(format_args!("tracing.zipkin.reports_sent"));
                stats.add(format_args!("tracing.zipkin.spans_sent"), n as u64);
            }
            Some(status) => {
                tracing::debug!(status, cluster = %collector.cluster, "span report refused");
                stats.inc(format_args!("tracing.zipkin.reports_dropped"));
            }
            None => stats.inc(format_args!("tracing.zipkin.reports_failed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::tracing::v3::CustomTag;
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::util::pack_any;

    fn zipkin(random: f64) -> PbTracing {
        PbTracing {
            random_sampling: Some(Percent { value: random }),
            custom_tags: vec![
                CustomTag {
                    tag: "istio.namespace".into(),
                    r#type: Some(custom_tag::Type::Literal(custom_tag::Literal {
                        value: "default".into(),
                    })),
                },
                CustomTag {
                    tag: "tenant".into(),
                    r#type: Some(custom_tag::Type::RequestHeader(custom_tag::Header {
                        name: "x-tenant".into(),
                        default_value: "none".into(),
                    })),
                },
            ],
            provider: Some(pb_tracing::Http {
                name: ZIPKIN.into(),
                config_type: Some(pb_tracing::http::ConfigType::TypedConfig(pack_any(
                    ZipkinConfig {
                        collector_cluster: "outbound|9411||zipkin.istio-system.svc.cluster.local"
                            .into(),
                        collector_endpoint: "/api/v2/spans".into(),
                        collector_endpoint_version:
                            zipkin_config::CollectorEndpointVersion::HttpJson as i32,
                        trace_id_128bit: true,
                        ..Default::default()
                    },
                ))),
            }),
            ..Default::default()
        }
    }

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder()
            .uri("/reviews/0")
            .header("host", "reviews:9080");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn start(t: &Tracing, req: &Parts, reporter: &Reporter) -> Span {
        let local = Arc::new(Endpoint::default());
        t.start(
            req,
            SpanStart {
                inbound: false,
                tls: false,
                peer: "10.0.0.1:1234".parse().unwrap(),
                node_id: "sidecar~10.0.0.1~p.default~default.svc.cluster.local",
                local: &local,
                reporter,
            },
        )
    }

    fn reporter() -> (Reporter, mpsc::Receiver<Finished>) {
        let (tx, rx) = mpsc::channel(16);
        let stats = Arc::new(Stats::new());
        (Reporter { tx, stats }, rx)
    }

    #[test]
    fn a_callers_context_continues_and_its_decision_stands() {
        let t = Tracing::compile(&zipkin(0.0)).unwrap().unwrap();
        let (r, mut rx) = reporter();
        let req = parts(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let mut span = start(&t, &req, &r);
        span.set_operation("reviews.default.svc.cluster.local:9080/*");
        span.set_upstream_cluster("outbound|9080||reviews.default.svc.cluster.local");
        let mut h = HeaderMap::new();
        span.inject(&mut h);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "1");
        let id = h["x-b3-spanid"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 16);
        assert_ne!(id, "a2fb4a1d1a96d312");
        span.finish(Outcome {
            status: 503,
            flags: "UF",
            request_bytes: 0,
            response_bytes: 91,
        });
        let f = rx.try_recv().expect("a sampled span is reported");
        let s = &f.span;
        assert_eq!(s["traceId"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(s["parentId"], "a2fb4a1d1a96d312");
        assert_eq!(s["id"], id.as_str());
        assert_eq!(s["name"], "reviews.default.svc.cluster.local:9080/*");
        assert_eq!(s["kind"], "CLIENT");
        assert_eq!(s["tags"]["http.url"], "http://reviews:9080/reviews/0");
        assert_eq!(s["tags"]["http.status_code"], "503");
        assert_eq!(s["tags"]["error"], "true");
        assert_eq!(s["tags"]["istio.namespace"], "default");
        assert_eq!(s["tags"]["tenant"], "none");
        assert_eq!(f.collector.endpoint, "/api/v2/spans");
    }

    #[test]
    fn a_new_trace_is_sampled_by_the_configured_share() {
        let (r, mut rx) = reporter();
        let never = Tracing::compile(&zipkin(0.0)).unwrap().unwrap();
        let span = start(&never, &parts(&[]), &r);
        let mut h = HeaderMap::new();
        span.inject(&mut h);
        // Context goes upstream unsampled; a 128-bit trace id; no parent.
        assert_eq!(h["x-b3-sampled"], "0");
        assert_eq!(h["x-b3-traceid"].len(), 32);
        assert!(!h.contains_key("x-b3-parentspanid"));
        span.finish(Outcome {
            status: 200,
            flags: "-",
            request_bytes: 0,
            response_bytes: 0,
        });
        assert!(rx.try_recv().is_err(), "an unsampled span was reported");
        // A forced trace, and a caller that says no.
        let forced = start(&never, &parts(&[("x-envoy-force-trace", "1")]), &r);
        assert!(forced.sampled);
        let always = Tracing::compile(&zipkin(100.0)).unwrap().unwrap();
        assert!(start(&always, &parts(&[]), &r).sampled);
        assert!(!start(&always, &parts(&[("x-b3-sampled", "0")]), &r).sampled);
    }

    #[test]
    fn tracers_other_than_zipkin_are_refused() {
        let mut t = zipkin(1.0);
        if let Some(p) = t.provider.as_mut() {
            p.name = "envoy.tracers.opentelemetry".into();
            p.config_type = None;
        }
        let e = Tracing::compile(&t).unwrap_err();
        assert!(e.contains("envoy.tracers.opentelemetry"), "{e}");
        assert!(Tracing::compile(&PbTracing::default()).unwrap().is_none());
    }

    #[test]
    fn the_control_planes_tracing_compiles_to_a_tracer_and_named_routes() {
        use crate::config::listener::{NetworkFilter, compile};
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: zipkin, namespace: istio-system}\nspec:\n  ports: [{name: http, port: 9411}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\nspec:\n  selector: {app: ratings}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: ratings-0, namespace: default, labels: {app: ratings}}\nspec: {containers: [{name: ratings}, {name: istio-proxy}]}\nstatus: {podIP: 10.200.0.20}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: zipkin}]\n";
        let loaded = isthmus_config::Loader::default().load_str("t.yaml", yaml);
        assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
        let mesh: isthmus_config::MeshConfig = serde_json::from_value(json!({
            "extensionProviders": [{"name": "zipkin", "zipkin": {
                "service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}],
        }))
        .unwrap();
        let ctx = isthmus_pilot::context::PushContext::new(
            loaded.resources.into_iter().collect(),
            mesh,
            "cluster.local",
            None,
        );
        let proxy = isthmus_pilot::proxy::Proxy::from_node(
            "sidecar~10.200.0.20~ratings-0.default~default.svc.cluster.local",
            &isthmus_pilot::proxy::NodeMetadata::default(),
        )
        .unwrap();
        let mut traced = 0;
        for l in isthmus_pilot::listener::listeners(&ctx, &proxy) {
            let l = compile(&l).unwrap();
            for c in l.chains.iter().chain(&l.default_chain) {
                if let NetworkFilter::Http(hcm) = &c.filter {
                    let t = hcm.tracing.as_ref().expect("a tracer");
                    assert_eq!(
                        t.collector.cluster,
                        "outbound|9411||zipkin.istio-system.svc.cluster.local"
                    );
                    assert_eq!(t.random, 10_000, "Istio's default 1%");
                    traced += 1;
                }
            }
        }
        assert!(traced >= 2, "outbound and inbound connection managers");
        let routes = isthmus_pilot::route::routes(&ctx, &proxy, &["9080".to_string()]);
        let table = crate::config::route::compile(&routes[0]).unwrap();
        let vh = table
            .virtual_host("ratings.default.svc.cluster.local")
            .unwrap();
        let req = http::Request::get("/").body(()).unwrap().into_parts().0;
        assert_eq!(
            vh.route(&req).unwrap().operation.as_deref(),
            Some("ratings.default.svc.cluster.local:9080/*")
        );
    }
}
