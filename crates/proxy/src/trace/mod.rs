//! Distributed tracing as Envoy's tracers do it in Istio: per request a sampling decision (the
//! caller's, when its context carries one), the context propagated upstream with this proxy's
//! span as the parent — B3 headers for Zipkin, W3C `traceparent` for OpenTelemetry — and
//! sampled spans sent in batches to the collector cluster ([`report`]) in the tracer's format
//! ([`encode`]: Zipkin v2 JSON, OTLP over HTTP or gRPC).

mod encode;
mod report;

pub use report::Reporter;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{HeaderValue as PbHeaderValue, HttpService};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing as pb_tracing, zipkin_config,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing as PbTracing;
use envoy_types::pb::envoy::r#type::tracing::v3::custom_tag;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;

use crate::config::route::roll;
use report::Finished;

const TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");
const FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");

pub const ZIPKIN: &str = "envoy.tracers.zipkin";
pub const OPENTELEMETRY: &str = "envoy.tracers.opentelemetry";

/// A report waits this long for the collector's answer unless the config says.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `max_path_tag_length`.
const MAX_PATH_TAG: usize = 256;

/// What a collector takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Zipkin v2 JSON, `POST`ed.
    ZipkinJson,
    /// OTLP protobuf, `POST`ed (`/v1/traces`).
    OtlpHttp,
    /// OTLP's gRPC `TraceService/Export`.
    OtlpGrpc,
}

/// Where spans go: the collector cluster, path and `Host`/`:authority`, how long a report may
/// take, the headers it carries, and the format.
#[derive(Debug, PartialEq, Eq)]
pub struct Collector {
    pub cluster: String,
    pub path: String,
    pub host: String,
    pub timeout: Duration,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub format: Format,
    /// OTLP's `service.name`; empty: this proxy's own.
    pub service_name: String,
}

fn headers_of(list: &[PbHeaderValue]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    list.iter()
        .map(|h| {
            match (
                HeaderName::from_bytes(h.key.as_bytes()),
                HeaderValue::from_str(&h.value),
            ) {
                (Ok(n), Ok(v)) => Ok((n, v)),
                _ => Err(format!("bad collector header {:?}", h.key)),
            }
        })
        .collect()
}

fn timeout_of(d: Option<&envoy_types::pb::google::protobuf::Duration>) -> Duration {
    d.map(crate::config::listener::pb_duration)
        .filter(|d| !d.is_zero())
        .unwrap_or(REPORT_TIMEOUT)
}

impl Collector {
    /// An `HttpService`: cluster, URI (Istio writes it without a scheme: `host/v1/traces`),
    /// timeout, headers.
    fn http(service: HttpService, format: Format, default_path: &str) -> Result<Collector, String> {
        use envoy_types::pb::envoy::config::core::v3::http_uri::HttpUpstreamType;
        let uri = service.http_uri.unwrap_or_default();
        let Some(HttpUpstreamType::Cluster(cluster)) = uri.http_upstream_type else {
            return Err("collector http_service names no cluster".into());
        };
        let text = if uri.uri.contains("://") {
            uri.uri.clone()
        } else {
            format!("http://{}", uri.uri)
        };
        let parsed: http::Uri = text
            .parse()
            .map_err(|_| format!("collector uri {:?} is not a URI", uri.uri))?;
        let path = parsed.path_and_query().map_or("/", |p| p.as_str());
        Ok(Collector {
            host: parsed
                .authority()
                .map_or_else(|| cluster.clone(), |a| a.to_string()),
            path: if path == "/" { default_path } else { path }.to_string(),
            cluster,
            timeout: timeout_of(uri.timeout.as_ref()),
            headers: headers_of(
                &service
                    .request_headers_to_add
                    .iter()
                    .filter_map(|h| h.header.clone())
                    .collect::<Vec<_>>(),
            )?,
            format,
            service_name: String::new(),
        })
    }

    /// From `collector_service` (Istio 1.29 and later) or the older `collector_cluster`,
    /// `collector_endpoint` and `collector_hostname`.
    fn zipkin(z: ZipkinConfig) -> Result<Collector, String> {
        const SPANS: &str = "/api/v2/spans";
        if let Some(service) = z.collector_service {
            return Collector::http(service, Format::ZipkinJson, SPANS);
        }
        if z.collector_cluster.is_empty() {
            return Err("collector_cluster is empty".into());
        }
        Ok(Collector {
            host: if z.collector_hostname.is_empty() {
                z.collector_cluster.clone()
            } else {
                z.collector_hostname
            },
            cluster: z.collector_cluster,
            path: if z.collector_endpoint.is_empty() {
                SPANS.into()
            } else {
                z.collector_endpoint
            },
            timeout: REPORT_TIMEOUT,
            headers: Vec::new(),
            format: Format::ZipkinJson,
            service_name: String::new(),
        })
    }

    /// OTLP over `grpc_service` (Envoy's own gRPC client) or `http_service`.
    fn otel(o: OpenTelemetryConfig) -> Result<Collector, String> {
        use envoy_types::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
        if o.exporter.is_some() || o.sampler.is_some() {
            return Err("custom exporters and samplers are not supported".into());
        }
        let mut c = match (o.grpc_service, o.http_service) {
            (Some(g), None) => {
                let Some(TargetSpecifier::EnvoyGrpc(e)) = g.target_specifier else {
                    return Err("only an envoy_grpc service is supported".into());
                };
                Collector {
                    host: if e.authority.is_empty() {
                        e.cluster_name.clone()
                    } else {
                        e.authority
                    },
                    cluster: e.cluster_name,
                    path: String::new(),
                    timeout: timeout_of(g.timeout.as_ref()),
                    headers: headers_of(&g.initial_metadata)?,
                    format: Format::OtlpGrpc,
                    service_name: String::new(),
                }
            }
            (None, Some(h)) => Collector::http(h, Format::OtlpHttp, "/v1/traces")?,
            _ => return Err("exactly one of grpc_service and http_service is needed".into()),
        };
        c.service_name = o.service_name;
        Ok(c)
    }
}

/// How a trace's context travels between proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    B3,
    W3c,
    /// B3 read first, W3C's `traceparent` else; both sent.
    B3AndW3c,
}

/// A caller's trace and span, and its sampling decision: each when it sent one.
type Context = (Option<(TraceId, Option<u64>)>, Option<bool>);

fn b3_sampled(v: &[u8]) -> Option<bool> {
    match v {
        b"1" | b"true" | b"d" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// B3's headers: `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` (`x-b3-flags: 1`, debug, is
/// sampled), else the single `b3: <trace>-<span>[-<sampled>[-<parent>]]` or `b3: <sampled>`.
fn b3(h: &HeaderMap) -> Context {
    let incoming = h
        .get(TRACE_ID)
        .and_then(|v| TraceId::parse(v.as_bytes()))
        .map(|t| (t, h.get(SPAN_ID).and_then(|v| parse_id(v.as_bytes()))));
    let sampled = match h.get(SAMPLED) {
        Some(v) => b3_sampled(v.as_bytes()),
        None => h.get(FLAGS).is_some_and(|f| f == "1").then_some(true),
    };
    if incoming.is_some() || sampled.is_some() {
        return (incoming, sampled);
    }
    let Some(single) = h.get(B3).map(HeaderValue::as_bytes) else {
        return (None, None);
    };
    let mut parts = single.split(|b| *b == b'-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(s), None, None) => (None, b3_sampled(s)),
        (Some(t), Some(s), sampled) => {
            let ctx = TraceId::parse(t).zip(parse_id(s).map(Some));
            (ctx, sampled.and_then(b3_sampled).filter(|_| ctx.is_some()))
        }
        _ => (None, None),
    }
}

/// W3C's `traceparent: 00-<trace id>-<parent id>-<flags>`; the low bit of the flags is
/// "sampled".
fn w3c(h: &HeaderMap) -> Context {
    let Some(tp) = h.get(TRACEPARENT).map(HeaderValue::as_bytes) else {
        return (None, None);
    };
    let parsed = (tp.len() >= 55 && tp[2] == b'-' && tp[35] == b'-' && tp[52] == b'-')
        .then(|| {
            let trace = TraceId::parse(&tp[3..35])?;
            let parent = parse_id(&tp[36..52])?;
            let flags = std::str::from_utf8(&tp[53..55]).ok()?;
            let flags = u8::from_str_radix(flags, 16).ok()?;
            Some(((trace, Some(parent)), flags & 1 == 1))
        })
        .flatten();
    match parsed {
        Some((ctx, sampled)) => (Some(ctx), Some(sampled)),
        None => (None, None),
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
    propagation: Propagation,
    collector: Arc<Collector>,
}

fn percent_ppm(p: Option<&envoy_types::pb::envoy::r#type::v3::Percent>) -> u32 {
    // Envoy's defaults: client and overall 100%, random 100%.
    p.map_or(1_000_000, |p| {
        (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32
    })
}

/// Zipkin's settings that this proxy runs, else why not.
fn zipkin(z: ZipkinConfig) -> Result<(Collector, bool, Propagation), String> {
    match zipkin_config::CollectorEndpointVersion::try_from(z.collector_endpoint_version) {
        Ok(zipkin_config::CollectorEndpointVersion::HttpJson) => {}
        _ => {
            return Err(format!(
                "collector_endpoint_version {} is not supported; only HTTP_JSON is",
                z.collector_endpoint_version
            ));
        }
    }
    if z.shared_span_context.as_ref().is_some_and(|b| b.value) {
        return Err("shared_span_context is not supported".into());
    }
    let propagation = match zipkin_config::TraceContextOption::try_from(z.trace_context_option) {
        Ok(zipkin_config::TraceContextOption::UseB3) => Propagation::B3,
        Ok(zipkin_config::TraceContextOption::UseB3WithW3cPropagation) => Propagation::B3AndW3c,
        Err(_) => {
            return Err(format!(
                "trace_context_option {} is not known",
                z.trace_context_option
            ));
        }
    };
    #[allow(deprecated)]
    if z.split_spans_for_request {
        return Err("split_spans_for_request is not supported".into());
    }
    let bits128 = z.trace_id_128bit;
    Ok((Collector::zipkin(z)?, bits128, propagation))
}

impl Tracing {
    /// None when the connection manager traces with no tracer (Envoy then has nothing to
    /// report to); an error for a tracer other than Zipkin and OpenTelemetry, or one it cannot
    /// run.
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
        let bytes = any.map_or(&[][..], |a| a.value.as_slice());
        let (collector, trace_id_128bit, propagation) = if provider.name == ZIPKIN
            || type_url.ends_with(".ZipkinConfig")
        {
            let z = ZipkinConfig::decode(bytes).map_err(|e| format!("zipkin tracer: {e}"))?;
            zipkin(z).map_err(|e| format!("zipkin tracer: {e}"))?
        } else if provider.name == OPENTELEMETRY || type_url.ends_with(".OpenTelemetryConfig") {
            let o = OpenTelemetryConfig::decode(bytes)
                .map_err(|e| format!("opentelemetry tracer: {e}"))?;
            let c = Collector::otel(o).map_err(|e| format!("opentelemetry tracer: {e}"))?;
            (c, true, Propagation::W3c)
        } else {
            return Err(format!(
                "tracing provider {:?} ({type_url}) is not supported; {ZIPKIN} and {OPENTELEMETRY} are",
                provider.name
            ));
        };
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
            propagation,
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

    /// The caller's context: its trace, its span (this one's parent), and its sampling
    /// decision, when it made one.
    fn extract(&self, h: &HeaderMap) -> Context {
        match self.propagation {
            Propagation::B3 => b3(h),
            Propagation::W3c => w3c(h),
            // B3 first, as Envoy's Zipkin tracer with `USE_B3_WITH_W3C_PROPAGATION`.
            Propagation::B3AndW3c => {
                let c = b3(h);
                if c.0.is_some() || c.1.is_some() {
                    c
                } else {
                    w3c(h)
                }
            }
        }
    }

    /// Starts this proxy's span of a request: the caller's trace continues (its span is the
    /// parent), or a new one begins.
    pub fn start(&self, req: &Parts, ctx: SpanStart<'_>) -> Span {
        let (incoming, decision) = self.extract(&req.headers);
        let sampled = decision.unwrap_or_else(|| self.decide(&req.headers));
        let (trace, parent) = match incoming {
            Some((t, parent)) => (t, parent),
            None => (TraceId::new(self.trace_id_128bit), None),
        };
        Span {
            trace,
            id: nonzero_id(),
            parent,
            sampled,
            propagation: self.propagation,
            record: sampled.then(|| Box::new(self.record(req, ctx))),
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
        let downstream = Some(text("x-envoy-downstream-service-cluster"))
            .filter(|s| !s.is_empty())
            .unwrap_or("-");
        let mut tags: Vec<(String, String)> = [
            ("component", "proxy"),
            ("node_id", ctx.node_id),
            ("guid:x-request-id", text("x-request-id")),
            ("http.url", &url),
            ("http.method", req.method.as_str()),
            ("http.protocol", crate::http::protocol_name(req.version)),
            ("user_agent", text("user-agent")),
            ("downstream_cluster", downstream),
            ("peer.address", &ctx.peer.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (name, value) in &self.tags {
            let v = match value {
                TagValue::Literal(v) => Some(v.as_str()),
                TagValue::Header {
                    name: header,
                    default,
                } => h
                    .get(header)
                    .and_then(|v| v.to_str().ok())
                    .or((!default.is_empty()).then_some(default.as_str())),
            };
            if let Some(v) = v {
                tags.push((name.clone(), v.to_string()));
            }
        }
        Record {
            collector: self.collector.clone(),
            reporter: ctx.reporter.clone(),
            // The request's host until a route's decorator names it.
            name: host.to_string(),
            kind: if ctx.inbound {
                Kind::Server
            } else {
                Kind::Client
            },
            upstream_cluster: String::new(),
            local: ctx.local.clone(),
            wall: SystemTime::now(),
            start: Instant::now(),
            tags,
        }
    }
}

/// What a span takes from its connection when it starts.
pub struct SpanStart<'a> {
    pub inbound: bool,
    pub tls: bool,
    pub peer: std::net::SocketAddr,
    pub node_id: &'a str,
    pub local: &'a Arc<Endpoint>,
    pub reporter: &'a Reporter,
}

/// The service this proxy reports its spans as, and its address.
#[derive(Debug, Clone, Default)]
pub struct Endpoint {
    pub service_name: String,
    pub ip: Option<std::net::IpAddr>,
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

    /// 16 or 32 hex digits, as B3 and W3C carry them.
    fn parse(b: &[u8]) -> Option<TraceId> {
        match b.len() {
            16 => Some(TraceId {
                high: None,
                low: parse_id(b)?,
            }),
            32 => Some(TraceId {
                high: Some(u64::from_str_radix(std::str::from_utf8(&b[..16]).ok()?, 16).ok()?),
                low: u64::from_str_radix(std::str::from_utf8(&b[16..]).ok()?, 16).ok()?,
            })
            .filter(|t| t.high != Some(0) || t.low != 0),
            _ => None,
        }
    }

    fn hex(&self) -> String {
        match self.high {
            Some(h) => format!("{h:016x}{:016x}", self.low),
            None => format!("{:016x}", self.low),
        }
    }

    /// 16 bytes, as OTLP carries it (a 64-bit id in the low half).
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.high.unwrap_or(0).to_be_bytes());
        b[8..].copy_from_slice(&self.low.to_be_bytes());
        b
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An outbound request: this proxy calls.
    Client,
    /// An inbound request: this proxy's workload is called.
    Server,
}

/// A request's span: its context, and what it reports when sampled.
#[derive(Debug)]
pub struct Span {
    trace: TraceId,
    id: u64,
    parent: Option<u64>,
    sampled: bool,
    propagation: Propagation,
    record: Option<Box<Record>>,
}

#[derive(Debug)]
struct Record {
    collector: Arc<Collector>,
    reporter: Reporter,
    name: String,
    kind: Kind,
    upstream_cluster: String,
    local: Arc<Endpoint>,
    wall: SystemTime,
    start: Instant,
    tags: Vec<(String, String)>,
}

/// A finished span, as every format reports it.
#[derive(Debug)]
struct SpanData {
    trace: TraceId,
    id: u64,
    parent: Option<u64>,
    name: String,
    kind: Kind,
    start_unix_micros: u64,
    duration_micros: u64,
    tags: Vec<(String, String)>,
    error: bool,
    local: Arc<Endpoint>,
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

    /// The context the upstream gets: the same trace, this span as its parent.
    pub fn inject(&self, h: &mut HeaderMap) {
        if self.propagation != Propagation::W3c {
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
            // The single header the caller may have used would say otherwise: it goes.
            h.remove(B3);
        }
        if self.propagation != Propagation::B3 {
            let flags = if self.sampled { "01" } else { "00" };
            // W3C trace ids are 128 bits: a 64-bit one is padded.
            let trace = format!(
                "{:016x}{:016x}",
                self.trace.high.unwrap_or(0),
                self.trace.low
            );
            let tp = format!("00-{trace}-{:016x}-{flags}", self.id);
            if let Ok(v) = HeaderValue::try_from(tp) {
                h.insert(TRACEPARENT, v);
            }
        }
    }

    /// Ends the span; a sampled one goes to the reporter.
    pub fn finish(self, o: Outcome<'_>) {
        let Some(r) = self.record else {
            return;
        };
        let r = *r;
        let mut tags = r.tags;
        let cluster = if r.upstream_cluster.is_empty() {
            "-".to_string()
        } else {
            r.upstream_cluster
        };
        tags.extend([
            ("http.status_code".to_string(), o.status.to_string()),
            ("response_flags".to_string(), o.flags.to_string()),
            ("request_size".to_string(), o.request_bytes.to_string()),
            ("response_size".to_string(), o.response_bytes.to_string()),
            ("upstream_cluster".to_string(), cluster.clone()),
            ("upstream_cluster.name".to_string(), cluster),
        ]);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        r.reporter.report(Finished {
            collector: r.collector,
            span: SpanData {
                trace: self.trace,
                id: self.id,
                parent: self.parent,
                name: r.name,
                kind: r.kind,
                start_unix_micros: micros(
                    r.wall
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                ),
                duration_micros: micros(r.start.elapsed()).max(1),
                tags,
                error: o.status >= 500 || o.status == 0,
                local: r.local,
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::r#type::tracing::v3::CustomTag;
    use envoy_types::pb::envoy::r#type::v3::Percent;
    use envoy_types::util::pack_any;
    use serde_json::json;
    use tokio::sync::mpsc;

    fn zipkin_tracing(random: f64) -> PbTracing {
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
        (Reporter::for_test(tx), rx)
    }

    /// A finished span as Zipkin's JSON shows it.
    fn zipkin_view(f: Finished) -> serde_json::Value {
        let body = encode::zipkin_json(&[f.span]);
        let all: serde_json::Value = serde_json::from_slice(&body).unwrap();
        all[0].clone()
    }

    #[test]
    fn a_callers_context_continues_and_its_decision_stands() {
        let t = Tracing::compile(&zipkin_tracing(0.0)).unwrap().unwrap();
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
        assert_eq!(f.collector.path, "/api/v2/spans");
        let s = &zipkin_view(f);
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
    }

    #[test]
    fn a_new_trace_is_sampled_by_the_configured_share() {
        let (r, mut rx) = reporter();
        let never = Tracing::compile(&zipkin_tracing(0.0)).unwrap().unwrap();
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
        let always = Tracing::compile(&zipkin_tracing(100.0)).unwrap().unwrap();
        assert!(start(&always, &parts(&[]), &r).sampled);
        assert!(!start(&always, &parts(&[("x-b3-sampled", "0")]), &r).sampled);
    }

    #[test]
    fn b3_single_header_and_b3_with_w3c_propagation() {
        let (r, _rx) = reporter();
        let t = Tracing::compile(&zipkin_tracing(0.0)).unwrap().unwrap();
        let trace = "463ac35c9f6413ad48485a3953bb6124";
        let caller = "a2fb4a1d1a96d312";
        // The single `b3` header: context and decision; the multi headers replace it.
        let span = start(&t, &parts(&[("b3", &format!("{trace}-{caller}-1"))]), &r);
        assert!(span.sampled);
        assert_eq!(span.parent, parse_id(caller.as_bytes()));
        let mut h = HeaderMap::new();
        h.insert(B3, HeaderValue::from_static("x"));
        span.inject(&mut h);
        assert_eq!(h["x-b3-traceid"], trace);
        assert!(!h.contains_key("b3") && !h.contains_key("traceparent"));
        assert!(!start(&t, &parts(&[("b3", "0")]), &r).sampled);
        // Zipkin with W3C too: a `traceparent` is read when no B3 came, and both are sent.
        let mut both = zipkin_tracing(0.0);
        if let Some(pb_tracing::Http {
            config_type: Some(pb_tracing::http::ConfigType::TypedConfig(any)),
            ..
        }) = both.provider.as_mut()
        {
            use prost::Message;
            let mut z = ZipkinConfig::decode(any.value.as_slice()).unwrap();
            z.trace_context_option =
                zipkin_config::TraceContextOption::UseB3WithW3cPropagation as i32;
            *any = pack_any(z);
        }
        let t = Tracing::compile(&both).unwrap().unwrap();
        let span = start(
            &t,
            &parts(&[("traceparent", &format!("00-{trace}-{caller}-01"))]),
            &r,
        );
        assert!(span.sampled);
        let mut h = HeaderMap::new();
        span.inject(&mut h);
        assert_eq!(h["x-b3-traceid"], trace);
        assert_eq!(h["x-b3-parentspanid"], caller);
        let tp = h["traceparent"].to_str().unwrap();
        assert!(
            tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"),
            "{tp}"
        );
        assert_eq!(&tp[36..52], h["x-b3-spanid"].to_str().unwrap());
    }

    #[test]
    fn other_tracers_and_what_a_tracer_cannot_run_are_refused() {
        let mut t = zipkin_tracing(1.0);
        if let Some(p) = t.provider.as_mut() {
            p.name = "envoy.tracers.datadog".into();
            p.config_type = None;
        }
        let e = Tracing::compile(&t).unwrap_err();
        assert!(e.contains("envoy.tracers.datadog"), "{e}");
        // OpenTelemetry without a service to export to.
        if let Some(p) = t.provider.as_mut() {
            p.name = OPENTELEMETRY.into();
        }
        let e = Tracing::compile(&t).unwrap_err();
        assert!(e.starts_with("opentelemetry tracer: exactly one of"), "{e}");
        assert!(Tracing::compile(&PbTracing::default()).unwrap().is_none());
    }

    fn otel(grpc: bool) -> PbTracing {
        use envoy_types::pb::envoy::config::core::v3::{
            GrpcService, HttpService, HttpUri, grpc_service, http_uri,
        };
        let cluster = "outbound|4317||otel.observability.svc.cluster.local";
        let config = OpenTelemetryConfig {
            grpc_service: grpc.then(|| GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                    grpc_service::EnvoyGrpc {
                        cluster_name: cluster.into(),
                        authority: "otel.observability.svc.cluster.local".into(),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            http_service: (!grpc).then(|| HttpService {
                http_uri: Some(HttpUri {
                    uri: "otel.observability.svc.cluster.local/v1/traces".into(),
                    http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster.into())),
                    timeout: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 2,
                        nanos: 0,
                    }),
                }),
                ..Default::default()
            }),
            service_name: "productpage.default".into(),
            ..Default::default()
        };
        PbTracing {
            random_sampling: Some(Percent { value: 0.0 }),
            provider: Some(pb_tracing::Http {
                name: OPENTELEMETRY.into(),
                config_type: Some(pb_tracing::http::ConfigType::TypedConfig(pack_any(config))),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn opentelemetry_continues_w3c_context_and_reports_otlp() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let t = Tracing::compile(&otel(true)).unwrap().unwrap();
        assert_eq!(t.collector.format, Format::OtlpGrpc);
        assert_eq!(t.collector.host, "otel.observability.svc.cluster.local");
        let http = Tracing::compile(&otel(false)).unwrap().unwrap();
        assert_eq!(http.collector.format, Format::OtlpHttp);
        assert_eq!(http.collector.path, "/v1/traces");
        assert_eq!(http.collector.host, "otel.observability.svc.cluster.local");
        assert_eq!(http.collector.timeout, Duration::from_secs(2));

        let (r, mut rx) = reporter();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let caller = "00f067aa0ba902b7";
        let req = parts(&[("traceparent", &format!("00-{trace}-{caller}-01"))]);
        let mut span = start(&t, &req, &r);
        span.set_operation("reviews.default.svc.cluster.local:9080/*");
        let mut h = HeaderMap::new();
        span.inject(&mut h);
        let tp = h["traceparent"].to_str().unwrap().to_string();
        assert!(
            tp.starts_with(&format!("00-{trace}-")) && tp.ends_with("-01"),
            "{tp}"
        );
        assert_ne!(&tp[36..52], caller);
        assert!(!h.contains_key("x-b3-traceid"));
        span.finish(Outcome {
            status: 200,
            flags: "-",
            request_bytes: 0,
            response_bytes: 5,
        });
        let f = rx.try_recv().expect("a sampled span");
        let body = encode::otlp(&[f.span], &f.collector.service_name);
        let req = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let rs = &req.resource_spans[0];
        let service = &rs.resource.as_ref().unwrap().attributes[0];
        assert_eq!(service.key, "service.name");
        assert_eq!(
            format!("{:?}", service.value),
            format!(
                "{:?}",
                Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                    value: Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            "productpage.default".into()
                        )
                    ),
                })
            )
        );
        let s = &rs.scope_spans[0].spans[0];
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(&s.trace_id), trace);
        assert_eq!(hex(&s.parent_span_id), caller);
        assert_eq!(hex(&s.span_id), &tp[36..52]);
        assert_eq!(s.name, "reviews.default.svc.cluster.local:9080/*");
        assert_eq!(
            s.kind,
            opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32
        );
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
        assert!(s.attributes.iter().any(|a| a.key == "http.status_code"));
        // A caller that did not sample; a new trace at 0%.
        let no = parts(&[("traceparent", &format!("00-{trace}-{caller}-00"))]);
        assert!(!start(&t, &no, &r).sampled);
        let fresh = start(&t, &parts(&[]), &r);
        let mut h = HeaderMap::new();
        fresh.inject(&mut h);
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(tp.ends_with("-00"), "{tp}");
        // A malformed traceparent starts a new trace.
        let bad = parts(&[("traceparent", "00-zz-00f067aa0ba902b7-01")]);
        assert!(start(&t, &bad, &r).parent.is_none());
        // gRPC frames carry the message's length.
        assert_eq!(&encode::grpc_frame(b"abc")[..], b"\0\0\0\0\x03abc");
    }

    #[test]
    fn the_control_planes_tracing_compiles_to_a_tracer_and_named_routes() {
        use crate::config::listener::{NetworkFilter, compile};
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: zipkin, namespace: istio-system}\nspec:\n  ports: [{name: http, port: 9411}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: ratings, namespace: default}\nspec:\n  selector: {app: ratings}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: ratings-0, namespace: default, labels: {app: ratings}}\nspec: {containers: [{name: ratings}, {name: istio-proxy}]}\nstatus: {podIP: 10.200.0.20}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\nspec:\n  tracing:\n  - providers: [{name: zipkin}]\n";
        let providers = [
            (
                json!({"zipkin": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}),
                "outbound|9411||zipkin.istio-system.svc.cluster.local",
                Format::ZipkinJson,
            ),
            (
                json!({"opentelemetry": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411}}),
                "outbound|9411||zipkin.istio-system.svc.cluster.local",
                Format::OtlpGrpc,
            ),
            (
                json!({"opentelemetry": {"service": "zipkin.istio-system.svc.cluster.local", "port": 9411, "http": {"path": "/v1/traces"}}}),
                "outbound|9411||zipkin.istio-system.svc.cluster.local",
                Format::OtlpHttp,
            ),
        ];
        let mut ctx = None;
        let proxy = isthmus_pilot::proxy::Proxy::from_node(
            "sidecar~10.200.0.20~ratings-0.default~default.svc.cluster.local",
            &isthmus_pilot::proxy::NodeMetadata::default(),
        )
        .unwrap();
        for (provider, cluster, format) in providers {
            let loaded = isthmus_config::Loader::default().load_str("t.yaml", yaml);
            assert!(!loaded.has_errors(), "{:?}", loaded.diagnostics);
            let mut entry = provider;
            entry["name"] = json!("zipkin");
            let mesh: isthmus_config::MeshConfig =
                serde_json::from_value(json!({ "extensionProviders": [entry] })).unwrap();
            let c = isthmus_pilot::context::PushContext::new(
                loaded.resources.into_iter().collect(),
                mesh,
                "cluster.local",
                None,
            );
            let mut traced = 0;
            for l in isthmus_pilot::listener::listeners(&c, &proxy) {
                let l = compile(&l).unwrap();
                for chain in l.chains.iter().chain(&l.default_chain) {
                    if let NetworkFilter::Http(hcm) = &chain.filter {
                        let t = hcm.tracing.as_ref().expect("a tracer");
                        assert_eq!(t.collector.cluster, cluster);
                        assert_eq!(t.collector.format, format);
                        assert_eq!(t.random, 10_000, "Istio's default 1%");
                        traced += 1;
                    }
                }
            }
            assert!(traced >= 2, "outbound and inbound connection managers");
            ctx = Some(c);
        }
        let ctx = ctx.unwrap();
        let routes = isthmus_pilot::route::routes(&ctx, &proxy, &["9080".to_string()]);
        let table = crate::config::route::compile(&routes[0]).unwrap();
        let vh = table
            .virtual_host("ratings.default.svc.cluster.local")
            .unwrap();
        let req = http::Request::get("/").body(()).unwrap().into_parts().0;
        assert_eq!(
            vh.route(&req)
                .unwrap()
                .decorator
                .as_ref()
                .map(|d| d.operation.as_str()),
            Some("ratings.default.svc.cluster.local:9080/*")
        );
    }
}
