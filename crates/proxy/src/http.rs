//! `http_connection_manager` and the router: per request, the virtual host by authority, the
//! route, the cluster and endpoint, with Istio's header handling (request id, client
//! certificate details, peer metadata) and telemetry recorded when the response ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Shared;
use crate::access_log::{AccessLog, Entry};
use crate::config::jwt::Failure;
use crate::config::listener::{ForwardClientCert, Hcm, RouteSource};
use crate::config::route::{Action, ClusterEdits, Forward, Redirect, Route, VirtualHost};
use crate::config::{Cluster, DynamicMetadata};
use crate::grpc_frames::{GrpcFrames, is_grpc};
use crate::identity::PeerCert;
use crate::peer;
use crate::serve::ConnInfo;
use crate::stats::{Dimensions, Parties, Reporter, RequestOutcome, Stats};
use crate::trace::{Outcome, Span};
use crate::upstream::{self, Address, Body, EndpointState, Slot};

// Header names the data path uses on every request, as `HeaderName`s: a `&str` is parsed
// again on each lookup.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
const UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const EXPECTED_TIMEOUT: HeaderName = HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
const ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const DECORATOR_OPERATION: HeaderName = HeaderName::from_static("x-envoy-decorator-operation");
/// Fields that never cross a proxy, whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 5] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

pub async fn serve<S>(io: S, hcm: Arc<Hcm>, info: Arc<ConnInfo>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let hcm_prefix = hcm.stat_prefix.clone();
    let _counted = shared
        .stats
        .downstream_connection(format_args!("http.{hcm_prefix}"));
    let idle_timeout = hcm.idle_timeout;
    let conn_info = info.clone();
    let svc = {
        let shared = shared.clone();
        hyper::service::service_fn(move |req| {
            let (hcm, info, shared) = (hcm.clone(), info.clone(), shared.clone());
            async move {
                let mut resp = handle(req, &hcm, &info, &shared).await;
                hcm.server.apply(resp.headers_mut());
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let activity = crate::idle::Activity::default();
    let io = crate::idle::Watched::new(io, activity.clone());
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut drain = shared.draining.clone();
    let draining = async move {
        let _ = drain.wait_for(|d| *d).await;
    };
    tokio::select! {
        r = conn.as_mut() => {
            // Bytes that are not HTTP on an HTTP port: hyper answers 400 and closes; say why.
            if let Err(e) = r
                && e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse())
            {
                tracing::warn!(
                    listener = %conn_info.listener.name,
                    source = %conn_info.source,
                    destination = %conn_info.destination,
                    error = %e,
                    "connection to an HTTP port did not speak HTTP; closed"
                );
                shared.stats.inc(format_args!("http.{}.downstream_cx_protocol_error", hcm_prefix));
            }
        }
        () = draining => {
            // Finish what is in flight, accept nothing new on this connection.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        () = activity.expired(idle_timeout) => {
            shared.stats.inc(format_args!("http.{}.downstream_cx_idle_timeout", hcm_prefix));
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The request's authority: `Host`, else the URI's (HTTP/2 `:authority`).
pub fn authority(req: &Parts) -> Option<&str> {
    req.headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response made by the proxy itself, with Envoy's text and response flag.
fn local_reply(status: u16, text: &str) -> Response<Body> {
    let mut r = Response::new(if text.is_empty() {
        empty()
    } else {
        Full::new(Bytes::from(text.to_string()))
            .map_err(|never| match never {})
            .boxed()
    });
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if !text.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// RFC 9110 §7.6.1: connection-specific fields do not cross a proxy. An upgrade keeps its
/// `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names says so, where a removal
    // per field would look each up.
    let found = |k: &HeaderName| {
        HOP_BY_HOP.contains(k) || k == header::CONNECTION || k == header::TE || k == header::UPGRADE
    };
    if !h.keys().any(found) {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// A request's protocol as Envoy's `%PROTOCOL%` and trace tags write it.
pub(crate) fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut buf).as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Envoy's `x-forwarded-client-cert` handling for this connection.
fn client_cert_header(h: &mut HeaderMap, hcm: &Hcm, info: &ConnInfo, shared: &Shared) {
    let Some(peer) = &info.peer else {
        if hcm.forward_client_cert != ForwardClientCert::AlwaysForwardOnly {
            h.remove(XFCC);
        }
        return;
    };
    let current = || {
        info.xfcc
            .get_or_init(|| {
                let mut current = format!("By={};Hash={}", shared.me.principal_uri, peer.hash);
                if hcm.xfcc_subject {
                    current.push_str(";Subject=\"\"");
                }
                if hcm.xfcc_uri
                    && let Some(id) = &peer.identity
                {
                    use std::fmt::Write;
                    let _ = write!(current, ";URI={id}");
                }
                HeaderValue::from_str(&current).ok()
            })
            .clone()
    };
    let value = match hcm.forward_client_cert {
        ForwardClientCert::Sanitize => None,
        ForwardClientCert::ForwardOnly | ForwardClientCert::AlwaysForwardOnly => return,
        ForwardClientCert::SanitizeSet => current(),
        ForwardClientCert::AppendForward => {
            match h
                .get(XFCC)
                .and_then(|v| v.to_str().ok())
                .filter(|p| !p.is_empty())
            {
                Some(prev) => current().and_then(|c| {
                    let c = c.to_str().ok()?;
                    HeaderValue::from_str(&format!("{prev},{c}")).ok()
                }),
                None => current(),
            }
        }
    };
    h.remove(XFCC);
    if let Some(v) = value {
        h.insert(XFCC, v);
    }
}

async fn handle(
    mut req: Request<Incoming>,
    hcm: &Hcm,
    info: &Arc<ConnInfo>,
    shared: &Arc<Shared>,
) -> Response<Body> {
    let start = Instant::now();
    let stats = &shared.stats;
    let counters = &hcm.counters;
    counters.downstream_rq_total.inc(
        stats,
        format_args!("http.{}.downstream_rq_total", hcm.stat_prefix),
    );
    let cfg = shared.config();
    let table = match &hcm.routes {
        RouteSource::Inline(t) => Some(t.clone()),
        RouteSource::Rds(name) => cfg.routes.get(name).cloned(),
    };
    let upgrade = is_upgrade(req.version(), req.headers());
    let down_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // As Envoy's connection manager: the request id first, then the span, which records it.
    if hcm.generate_request_id && !parts.headers.contains_key(REQUEST_ID) {
        parts.headers.insert(REQUEST_ID, request_id());
    }
    // The labels Istio's stats filter adds from the request, as the client sent it.
    let mut dimensions = hcm.stats.as_ref().map(|config| Dimensions {
        config: config.clone(),
        values: config.values(Some(&parts), info.source, info.destination),
    });
    let mut span = hcm.tracing.as_ref().map(|t| {
        t.start(
            &parts,
            crate::trace::SpanStart {
                inbound: info.inbound(),
                tls: info.peer.is_some(),
                peer: info.source,
                node_id: shared.me.node_id.to_str().unwrap_or_default(),
                local: &shared.span_endpoint,
                reporter: &shared.spans,
            },
        )
    });
    // A policy's refusal, before routing: recorded, logged and traced as the proxy's answer.
    let mut deny = |parts: &Parts, status: u16, flags: &'static str| {
        let pending = Pending::local(
            start,
            upgrade,
            LogCtx::new(hcm, parts, info, ""),
            span.take(),
            dimensions.take(),
        );
        refuse(
            shared,
            info,
            caller(hcm, parts, shared),
            pending,
            status,
            flags,
        );
    };
    let mut metadata = DynamicMetadata::new();
    if let Some(jwt) = &hcm.jwt {
        if let Err(failure) = jwt.verify(&mut parts, &mut metadata) {
            counters.jwt_denied.inc(
                stats,
                format_args!("http.{}.jwt_authn.denied", hcm.stat_prefix),
            );
            tracing::debug!(reason = failure.text(), "JWT rejected");
            deny(&parts, 401, "-");
            return jwt_reply(&parts, failure);
        }
        counters.jwt_allowed.inc(
            stats,
            format_args!("http.{}.jwt_authn.allowed", hcm.stat_prefix),
        );
    }
    if !hcm.rbac.is_empty() {
        let principal = info.principal();
        let input = crate::config::rbac::Input {
            principal: principal.as_deref(),
            source: info.source,
            destination: info.destination,
            server_name: None,
            request: Some(&parts),
            metadata: Some(&metadata),
        };
        if !crate::config::rbac::allowed(&hcm.rbac, &input) {
            counters
                .rbac_denied
                .inc(stats, format_args!("http.{}.rbac.denied", hcm.stat_prefix));
            deny(&parts, 403, "RBAC");
            return local_reply(403, "RBAC: access denied");
        }
        counters
            .rbac_allowed
            .inc(stats, format_args!("http.{}.rbac.allowed", hcm.stat_prefix));
    }
    let host = authority(&parts).unwrap_or_default();
    let selected = table.as_ref().and_then(|t| {
        let vh = t.virtual_host(host)?;
        Some((vh, vh.route(&parts)?))
    });
    let Some((vh, route)) = selected else {
        stats.inc(format_args!("http.{}.no_route", hcm.stat_prefix));
        end_span(span, 404, "NR");
        return local_reply(404, "");
    };
    // The span's name: on the way in, what the caller's proxy said; else the route's.
    if let Some(s) = span.as_mut() {
        let told = info
            .inbound()
            .then(|| parts.headers.get(DECORATOR_OPERATION)?.to_str().ok())
            .flatten();
        if let Some(op) = told.or(route.decorator.as_ref().map(|d| d.operation.as_str())) {
            s.set_operation(op);
        }
    }
    match &route.action {
        Action::Direct { status, body } => {
            end_span(span, *status, "-");
            let mut r = local_reply(*status, body);
            route.headers.apply_response(r.headers_mut());
            vh.headers.apply_response(r.headers_mut());
            r
        }
        Action::Redirect(rd) => {
            let r = redirect(rd, &parts, host);
            end_span(span, r.status().as_u16(), "-");
            r
        }
        Action::Forward(fwd) => {
            let log = LogCtx::new(hcm, &parts, info, &route.name);
            // Fault injection: delay, then maybe answer in the upstream's place.
            if let Some(fault) = route.fault.as_ref().or(hcm.fault.as_ref()) {
                if let Some((delay, ppm)) = fault.delay
                    && crate::config::route::roll(ppm)
                {
                    stats.inc(format_args!(
                        "http.{}.fault.delays_injected",
                        hcm.stat_prefix
                    ));
                    tokio::time::sleep(delay).await;
                }
                if let Some((status, ppm)) = fault.abort
                    && crate::config::route::roll(ppm)
                {
                    stats.inc(format_args!(
                        "http.{}.fault.aborts_injected",
                        hcm.stat_prefix
                    ));
                    refuse(
                        shared,
                        info,
                        caller(hcm, &parts, shared),
                        Pending::local(start, upgrade, log, span.take(), dimensions.take()),
                        status,
                        "FI",
                    );
                    return local_reply(status, "fault filter abort");
                }
            }
            // CORS, after the fault filter as in Istio's chain: a preflight may be the
            // proxy's to answer; an allowed origin is said back on the response.
            let cors = hcm.cors.then_some(route.cors.as_deref()).flatten();
            let mut verdict = cors.and_then(|c| c.request(&parts));
            if let Some(v) = &verdict {
                let valid = if v.allowed.is_some() {
                    "valid"
                } else {
                    "invalid"
                };
                stats.inc(format_args!("http.{}.cors.origin_{valid}", hcm.stat_prefix));
            }
            if let Some(answer) = verdict.as_mut().and_then(|v| v.answer.take()) {
                refuse(
                    shared,
                    info,
                    caller(hcm, &parts, shared),
                    Pending::local(start, upgrade, log, span.take(), dimensions.take()),
                    200,
                    "-",
                );
                let mut r = local_reply(200, "");
                r.headers_mut().extend(answer);
                return r;
            }
            let allowed = verdict.and_then(|v| v.allowed.filter(|_| v.enforced));
            let (cluster, cluster_edits) = fwd.clusters.pick();
            prepare_request(
                &mut parts,
                hcm,
                info,
                shared,
                (vh, route, cluster_edits),
                fwd,
                upgrade,
            );
            if let Some(s) = &span {
                s.inject(&mut parts.headers);
                // Envoy tells the upstream the operation it traced the request as.
                if !info.inbound()
                    && let Some(d) = route.decorator.as_ref().filter(|d| d.propagate)
                    && let Ok(v) = HeaderValue::from_str(&d.operation)
                {
                    parts.headers.insert(DECORATOR_OPERATION, v);
                }
            }
            let request_bytes = Arc::new(AtomicU64::new(0));
            // gRPC's messages are counted where Istio's metrics are reported.
            let request_messages = (dimensions.is_some() && is_grpc(&parts.headers))
                .then(|| Arc::new(AtomicU64::new(0)));
            let body = Counted {
                inner: body,
                bytes: request_bytes.clone(),
                messages: request_messages
                    .clone()
                    .map(|count| (GrpcFrames::default(), count)),
            };
            let router = RouterHeaders {
                debug: hcm.envoy_headers,
                attempt_count: vh.attempt_count,
                attempt_count_in_response: vh.attempt_count_in_response,
            };
            let mut resp = forward(
                parts,
                body,
                fwd,
                cluster,
                hcm,
                router,
                &cfg.clusters,
                info,
                shared,
                Pending {
                    start,
                    request_bytes,
                    request_messages,
                    upgrade,
                    log,
                    span,
                    dimensions,
                },
            )
            .await;
            if let Some(e) = cluster_edits {
                e.headers.apply_response(resp.headers_mut());
            }
            route.headers.apply_response(resp.headers_mut());
            vh.headers.apply_response(resp.headers_mut());
            if let (Some(c), Some(origin)) = (cors, allowed) {
                c.respond(origin, resp.headers_mut());
            }
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(down) = down_upgrade
            {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(d), Ok(u)) = (down.await, up.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(d),
                            &mut TokioIo::new(u),
                        )
                        .await;
                    }
                });
            }
            resp
        }
    }
}

/// Envoy's redirect: the scheme, host and port the route names, else the request's; the
/// request's port goes when the route names a port or a host, or changes the scheme away from
/// the one whose default port it is (`http://web:80` to `https://web`).
fn redirect(rd: &Redirect, parts: &Parts, host: &str) -> Response<Body> {
    let proto = parts
        .headers
        .get(FORWARDED_PROTO)
        .and_then(|v| v.to_str().ok())
        .or(parts.uri.scheme_str())
        .unwrap_or("http");
    let scheme = rd
        .scheme
        .as_deref()
        .or(parts.uri.scheme_str())
        .unwrap_or("http");
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    };
    let default_port = matches!((proto, port), ("http", Some("80")) | ("https", Some("443")));
    let authority = match (&rd.host, rd.port, port) {
        (Some(h), Some(p), _) => format!("{h}:{p}"),
        (Some(h), None, _) => h.clone(),
        (None, Some(p), _) => format!("{name}:{p}"),
        (None, None, Some(p)) if !(scheme != proto && default_port) => format!("{name}:{p}"),
        (None, None, _) => name.to_string(),
    };
    // The route's path keeps the request's query unless it has one of its own.
    let path = match (&rd.path, parts.uri.query()) {
        (Some(p), Some(q)) if !p.contains('?') => format!("{p}?{q}"),
        (Some(p), _) => p.clone(),
        (None, _) => parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
    };
    let mut r = local_reply(rd.status, "");
    if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{authority}{path}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The request as it leaves for the upstream: hop-by-hop headers off, the proxy's own on,
/// the header edits of the picked cluster, then of the route, then of the virtual host (the
/// most specific first, as Envoy), and the host and path rewrites.
fn prepare_request(
    parts: &mut Parts,
    hcm: &Hcm,
    info: &ConnInfo,
    shared: &Shared,
    (vh, route, cluster): (&VirtualHost, &Route, Option<&ClusterEdits>),
    fwd: &Forward,
    upgrade: bool,
) {
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrade);
    client_cert_header(h, hcm, info, shared);
    if !h.contains_key(FORWARDED_PROTO) {
        let proto = if info.peer.is_some() { "https" } else { "http" };
        h.insert(FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    // The logical host travels as `Host`: the upstream URI carries the endpoint address.
    if !h.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        h.insert(header::HOST, v);
    }
    if let Some(c) = cluster {
        c.headers.apply_request(h);
    }
    route.headers.apply_request(h);
    vh.headers.apply_request(h);
    let host_rewrite = cluster.and_then(|c| c.host_rewrite.as_ref());
    if let Some(host) = host_rewrite.or(fwd.host_rewrite.as_ref())
        && let Ok(v) = HeaderValue::from_str(host)
    {
        h.insert(header::HOST, v);
    }
    let rewrite = |pq: &str| -> Option<String> {
        if let Some(prefix) = &fwd.prefix_rewrite {
            // Replace the part the route matched: for a prefix route, its prefix.
            let rest = pq.strip_prefix(route.prefix().unwrap_or("")).unwrap_or(pq);
            Some(if prefix.ends_with('/') && rest.starts_with('/') {
                format!("{prefix}{}", &rest[1..])
            } else {
                format!("{prefix}{rest}")
            })
        } else if let Some((re, with)) = &fwd.regex_rewrite {
            // The path's matches replaced; the query stays.
            let (path, query) = pq.split_at(pq.find('?').unwrap_or(pq.len()));
            Some(format!("{}{query}", re.replace_all(path, with.as_str())))
        } else {
            None
        }
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let rewritten = rewrite(pq).map(|new| (pq.to_string(), new));
    if let Some((pq, new)) = rewritten
        && let Ok(u) = new.parse()
    {
        parts.uri = u;
        // Envoy's record of the path before the rewrite, for the upstream and its logs.
        if hcm.envoy_headers
            && let Ok(v) = HeaderValue::from_str(&pq)
        {
            parts.headers.insert(ORIGINAL_PATH, v);
        }
    }
}

/// The most the proxy reads of the answer to a request of its own (a mirror, a span report).
const ANSWER_MAX: usize = 64 * 1024;
/// Request bodies up to this declared length are buffered before forwarding.
const BUFFER_BODY_MAX: u64 = 16 * 1024;
/// How long a buffered request body may take to arrive.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

enum RequestBody {
    Streaming(Option<Counted<Incoming>>),
    Buffered(Bytes),
}

/// What the response still needs to finish the request's telemetry.
struct Pending {
    start: Instant,
    request_bytes: Arc<AtomicU64>,
    /// gRPC messages of the request body, when they are counted.
    request_messages: Option<Arc<AtomicU64>>,
    upgrade: bool,
    /// The request as the access logs will describe it (when any is configured).
    log: Option<LogCtx>,
    span: Option<Span>,
    /// Istio's metrics of the request, when the connection manager has the stats filter.
    dimensions: Option<Dimensions>,
}

impl Pending {
    /// A request answered before any body was read.
    fn local(
        start: Instant,
        upgrade: bool,
        log: Option<LogCtx>,
        span: Option<Span>,
        dimensions: Option<Dimensions>,
    ) -> Pending {
        Pending {
            start,
            request_bytes: Arc::new(AtomicU64::new(0)),
            request_messages: None,
            upgrade,
            log,
            span,
            dimensions,
        }
    }
}

/// Ends the span of a request answered without an upstream or a body read.
fn end_span(span: Option<Span>, status: u16, flags: &str) {
    if let Some(s) = span {
        s.finish(Outcome {
            status,
            flags,
            request_bytes: 0,
            response_bytes: 0,
        });
    }
}

struct LogCtx {
    logs: Vec<Arc<AccessLog>>,
    entry: Entry,
}

impl LogCtx {
    /// The request's head, before it is changed for the upstream.
    fn new(hcm: &Hcm, parts: &Parts, info: &ConnInfo, route: &str) -> Option<LogCtx> {
        if hcm.access_logs.is_empty() {
            return None;
        }
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        Some(LogCtx {
            logs: hcm.access_logs.clone(),
            entry: Entry {
                start: Some(std::time::SystemTime::now()),
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string(),
                protocol: protocol_name(parts.version).to_string(),
                authority: authority(parts).unwrap_or_default().to_string(),
                user_agent: h("user-agent"),
                request_id: h(REQUEST_ID.as_str()),
                forwarded_for: h("x-forwarded-for"),
                downstream_local: Some(info.destination),
                downstream_remote: Some(info.source),
                route_name: route.to_string(),
                ..Default::default()
            },
        })
    }

    fn write(mut self, status: u16, flags: &str, start: Instant, received: u64, sent: u64) {
        let e = &mut self.entry;
        e.status = status;
        e.flags = flags.to_string();
        e.duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        e.bytes_received = received;
        e.bytes_sent = sent;
        for l in &self.logs {
            l.write(&self.entry);
        }
    }
}

/// A slot for one more retry in flight, or None (counted) when the cluster's `max_retries` or
/// retry budget is spent: the answer in hand is then the answer.
fn retry_slot(
    cluster: &Arc<Cluster>,
    stats: &crate::stats::Stats,
) -> Option<crate::upstream::Slot> {
    let slot = cluster
        .state
        .acquire(crate::upstream::Counter::Retries, cluster.retry_limit());
    if slot.is_none() {
        stats.inc(format_args!(
            "cluster.{}.upstream_rq_retry_overflow",
            cluster.name
        ));
    }
    slot
}

/// Envoy's shadow host: `-shadow` after the host name, before any port.
fn shadow_host(host: &str) -> String {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{h}-shadow:{port}")
        }
        _ => format!("{host}-shadow"),
    }
}

/// Sends a copy of a request to `cluster` and drops the answer (fire and forget), bounded by
/// the route's timeout.
fn mirror(
    cluster: &Arc<Cluster>,
    parts: &Parts,
    path: Option<&http::uri::PathAndQuery>,
    body: Bytes,
    timeout: Option<std::time::Duration>,
    stats: &Arc<crate::stats::Stats>,
) {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .version(parts.version);
    if let Some(p) = path {
        b = b.uri(p.clone());
    }
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
        if let Some(host) = authority(parts).map(shadow_host)
            && let Ok(v) = HeaderValue::from_str(&host)
        {
            h.insert(header::HOST, v);
        }
    }
    let Ok(req) = b.body(body) else {
        return;
    };
    stats.inc(format_args!(
        "cluster.{}.upstream_rq_mirrored",
        cluster.name
    ));
    let (cluster, stats) = (cluster.clone(), stats.clone());
    let limit = timeout.unwrap_or(std::time::Duration::from_secs(15));
    tokio::spawn(async move {
        send_to_cluster(&cluster, req, limit, &stats).await;
    });
}

/// One request of the proxy's own (a mirror's copy, a span report) to an endpoint of
/// `cluster` over its pool, the answer read whole within `limit`: its status and its header
/// fields with its trailers, or None when it could not be sent or did not finish in time.
/// `req` carries the path as its URI; its version chooses the pool as a downstream request's
/// would.
pub(crate) async fn send_to_cluster(
    cluster: &Cluster,
    req: Request<Bytes>,
    limit: std::time::Duration,
    stats: &Stats,
) -> Option<(u16, HeaderMap)> {
    let Ok(pick) = cluster.pick(None, &[], None) else {
        stats.inc(format_args!(
            "cluster.{}.upstream_cx_none_healthy",
            cluster.name
        ));
        return None;
    };
    let (mut head, body) = req.into_parts();
    head.uri = pick
        .authority
        .as_ref()
        .and_then(|a| upstream::uri(a, head.uri.path_and_query()))?;
    let pool = pick.transport.http(head.version, false).clone();
    head.version = Version::HTTP_11;
    let req = Request::from_parts(
        head,
        Full::new(body).map_err(|never| match never {}).boxed(),
    );
    cluster.count_request(stats);
    let send = async {
        let (r, _) = pool.send(&pick.address, pick.state, req).await.ok()?;
        let (head, body) = r.into_parts();
        // Only the status and trailers matter; a larger answer is a failure, not a buffer.
        let body = Limited::new(body, ANSWER_MAX).collect().await.ok()?;
        let mut fields = head.headers;
        if let Some(t) = body.trailers() {
            fields.extend(t.clone());
        }
        Some((head.status.as_u16(), fields))
    };
    tokio::time::timeout(limit, send).await.ok().flatten()
}

/// A count as a header value; the small ones most requests carry (attempt 1, a service time
/// of a few milliseconds) without an allocation.
fn number(n: u64) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

/// The headers the router adds to one request and its response.
#[derive(Clone, Copy)]
struct RouterHeaders {
    /// `x-envoy-upstream-service-time` and `x-envoy-expected-rq-timeout-ms`.
    debug: bool,
    attempt_count: bool,
    attempt_count_in_response: bool,
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    parts: Parts,
    body: Counted<Incoming>,
    fwd: &Forward,
    cluster_name: &str,
    hcm: &Hcm,
    router: RouterHeaders,
    clusters: &crate::config::ByName<Arc<Cluster>>,
    info: &Arc<ConnInfo>,
    shared: &Arc<Shared>,
    mut pending: Pending,
) -> Response<Body> {
    let stats = &shared.stats;
    let reporter = if info.inbound() {
        Reporter::Destination
    } else {
        Reporter::Source
    };
    let protocol = if is_grpc(&parts.headers) {
        "grpc"
    } else {
        "http"
    };
    let source_peer = caller(hcm, &parts, shared);
    let Some(cluster) = clusters.get(cluster_name).cloned() else {
        stats.inc(format_args!("http.{}.no_cluster", hcm.stat_prefix));
        let parties = shared.parties(info, None, source_peer, None, None, None);
        finish_local(stats, reporter, &parties, protocol, 503, "NC", pending);
        return local_reply(503, "");
    };
    // The Host names the destination service where the cluster does not (passthrough).
    let fallback_host = pending
        .dimensions
        .as_ref()
        .filter(|d| d.config.host_fallback)
        .filter(|_| cluster.service.as_ref().is_none_or(|s| s.host.is_empty()))
        .and_then(|_| authority(&parts))
        .map(str::to_string);
    let parties_of = |source, destination, upstream: Option<&PeerCert>| {
        shared.parties(
            info,
            Some(&cluster),
            source,
            destination,
            upstream,
            fallback_host.as_deref(),
        )
    };
    let mut parts = parts;
    // Peer metadata, as the connection manager's filter says: the caller's was read and goes
    // no further; this workload's goes to the upstream, unless that is outside the mesh.
    let exchange = hcm.exchange;
    if exchange.downstream_discovery {
        parts.headers.remove(peer::METADATA);
        parts.headers.remove(peer::METADATA_ID);
    }
    if exchange.upstream_propagation
        && !cluster.no_metadata_exchange
        && !(exchange.skip_external && cluster.external)
    {
        parts
            .headers
            .insert(peer::METADATA, shared.me.metadata.clone());
        parts
            .headers
            .insert(peer::METADATA_ID, shared.me.node_id.clone());
    }
    // Small bodies of declared length are read whole first: they leave with their headers in
    // one write, and a retry can send them again.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = match declared {
        Some(n) if n <= BUFFER_BODY_MAX && !pending.upgrade => {
            let read = Limited::new(body, BUFFER_BODY_MAX as usize).collect();
            match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
                Ok(Ok(b)) => RequestBody::Buffered(b.to_bytes()),
                _ => {
                    stats.inc(format_args!(
                        "http.{}.downstream_rq_rx_reset",
                        hcm.stat_prefix
                    ));
                    return local_reply(408, "request body not received");
                }
            }
        }
        _ => RequestBody::Streaming(Some(body)),
    };
    let replayable = match &body {
        RequestBody::Buffered(_) => true,
        RequestBody::Streaming(b) => b.as_ref().is_some_and(|b| b.inner.is_end_stream()),
    };
    let retry = fwd
        .retry
        .as_ref()
        .filter(|_| replayable && !pending.upgrade);
    let attempts = 1 + retry.map_or(0, |r| r.attempts);
    let per_try = retry.and_then(|r| r.per_try_timeout).or(fwd.timeout);
    let mut failed: Vec<Address> = Vec::new();
    let path = parts.uri.path_and_query().cloned();
    if let Some(l) = pending.log.as_mut() {
        l.entry.upstream_cluster = cluster.name.clone();
    }
    if let Some(s) = pending.span.as_mut() {
        s.set_upstream_cluster(&cluster.name);
    }
    // Mirroring: requests whose body is in hand (none, or buffered) are copied; a streamed
    // body can be read only once, so those go unmirrored and are counted.
    if !fwd.mirrors.is_empty() {
        let copy = match &body {
            RequestBody::Buffered(b) => Some(b.clone()),
            RequestBody::Streaming(b) if b.as_ref().is_some_and(|b| b.inner.is_end_stream()) => {
                Some(Bytes::new())
            }
            RequestBody::Streaming(_) => None,
        };
        for (name, share) in &fwd.mirrors {
            let Some(target) = clusters.get(name) else {
                stats.inc(format_args!("http.{}.no_cluster", hcm.stat_prefix));
                continue;
            };
            match &copy {
                Some(b) if crate::config::route::roll(*share) => {
                    mirror(target, &parts, path.as_ref(), b.clone(), fwd.timeout, stats);
                }
                Some(_) => {}
                None => stats.inc(format_args!("cluster.{name}.upstream_rq_mirror_skipped")),
            }
        }
    }
    // Circuit breaker: too many requests in flight to this cluster answer at once (UO).
    let Some(slot) = cluster
        .state
        .acquire(crate::upstream::Counter::Requests, cluster.max_requests)
    else {
        stats.inc(format_args!(
            "cluster.{}.upstream_rq_pending_overflow",
            cluster.name
        ));
        let parties = parties_of(source_peer, None, None);
        finish_local(stats, reporter, &parties, protocol, 503, "UO", pending);
        let mut r = local_reply(
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        );
        r.headers_mut()
            .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        return r;
    };
    let mut slot = Some(slot);
    // The consistent-hash key: the first of the route's hash policies the request has; else,
    // as Envoy does, a new value for a cookie policy with a TTL, sent back as that cookie.
    let mut set_cookie = None;
    let hash = fwd
        .hash
        .iter()
        .find_map(|k| k.value(&parts, info.source.ip()))
        .map(|v| crate::config::cluster::hash_key(v.as_ref()))
        .or_else(|| {
            fwd.hash.iter().find_map(|k| match k {
                crate::config::route::HashKey::Cookie {
                    name,
                    ttl: Some(ttl),
                    path,
                } => {
                    let value = format!("{:016x}", rand::random::<u64>());
                    let path = if path.is_empty() { "/" } else { path };
                    set_cookie = HeaderValue::from_str(&format!(
                        "{name}={value}; Max-Age={}; Path={path}; HttpOnly",
                        ttl.as_secs()
                    ))
                    .ok();
                    Some(crate::config::cluster::hash_key(value.as_str()))
                }
                _ => None,
            })
        });
    // The retry in flight holds a slot of the cluster's retry limit until the next attempt
    // ends.
    let mut _retrying: Option<crate::upstream::Slot> = None;
    // The answer when no attempt returns one; made only then (most requests never need it).
    let mut last: Option<Response<Body>> = None;
    let mut last_flags = "UH";
    let deadline = fwd.timeout.map(|t| pending.start + t);
    // The request is in hand (Envoy's "downstream request complete"): upstream service time
    // counts from here.
    let sent = Instant::now();
    let mut tried = 0;
    for attempt in 0..attempts {
        tried = attempt + 1;
        let pick = match cluster.pick(Some(info.destination), &failed, hash) {
            Ok(p) => p,
            Err(_) => {
                stats.inc(format_args!(
                    "cluster.{}.upstream_cx_none_healthy",
                    cluster.name
                ));
                break;
            }
        };
        let Some(uri) = pick
            .authority
            .as_ref()
            .and_then(|a| upstream::uri(a, path.as_ref()))
        else {
            last = Some(local_reply(400, ""));
            last_flags = "DPE";
            break;
        };
        let limit = match (per_try, deadline) {
            (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(Instant::now()))),
            (t, None) => t,
            (None, Some(d)) => Some(d.saturating_duration_since(Instant::now())),
        };
        let mut b = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(Version::HTTP_11);
        if let Some(h) = b.headers_mut() {
            *h = parts.headers.clone();
            if router.attempt_count {
                h.insert(ATTEMPT_COUNT, number(u64::from(attempt) + 1));
            }
            // What is left of the timeout, for the upstream to plan by; none without one.
            if router.debug
                && let Some(ms) = limit.map(|l| l.as_millis()).filter(|ms| *ms > 0)
            {
                h.insert(
                    EXPECTED_TIMEOUT,
                    number(u64::try_from(ms).unwrap_or(u64::MAX)),
                );
            }
        }
        let up_body: Body = match &mut body {
            RequestBody::Buffered(b) => {
                Full::new(b.clone()).map_err(|never| match never {}).boxed()
            }
            RequestBody::Streaming(b) => match b.take() {
                Some(b) if attempt == 0 => b.boxed(),
                _ => empty(),
            },
        };
        let Ok(up_req) = b.body(up_body) else {
            last = Some(local_reply(400, ""));
            last_flags = "DPE";
            break;
        };
        let transport = info.transport(pick.transport);
        let pool = transport.http(parts.version, pending.upgrade);
        if let Some(l) = pending.log.as_mut() {
            l.entry.upstream_host = pick.address.to_string();
        }
        let active = pick.state.map(|s| ActiveGuard::new(s.clone()));
        cluster.count_request(stats);
        let call = pool.send(&pick.address, pick.state, up_req);
        let result = match limit {
            Some(t) => tokio::time::timeout(t, call).await.map_err(|_| ()),
            None => Ok(call.await),
        };
        let more = attempt + 1 < attempts;
        match result {
            Ok(Ok((mut resp, upstream_peer))) => {
                let status = resp.status().as_u16();
                if let Some(s) = pick.state {
                    cluster.record(s, Some(status));
                }
                cluster.count_response(stats, status);
                if more
                    && retry.is_some_and(|r| r.on_status(status))
                    && let Some(s) = retry_slot(&cluster, stats)
                {
                    _retrying = Some(s);
                    stats.inc(format_args!("cluster.{}.upstream_rq_retry", cluster.name));
                    failed.push(pick.address.clone());
                    continue;
                }
                strip_hop_by_hop(resp.headers_mut(), status == 101);
                if router.debug {
                    let ms = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX);
                    resp.headers_mut().insert(UPSTREAM_SERVICE_TIME, number(ms));
                    if let Some(l) = pending.log.as_mut() {
                        l.entry.upstream_service_time = Some(ms);
                    }
                }
                if router.attempt_count_in_response {
                    resp.headers_mut()
                        .insert(ATTEMPT_COUNT, number(u64::from(attempt) + 1));
                }
                if let Some(c) = set_cookie.take() {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                // Who answered: its peer metadata, else what the control plane said of the
                // endpoint, as Istio's client side falls back.
                let dest_peer = if exchange.upstream_discovery {
                    resp.headers_mut().remove(peer::METADATA_ID);
                    resp.headers_mut()
                        .remove(peer::METADATA)
                        .and_then(|v| shared.peers.decode(v.as_bytes()))
                } else {
                    None
                }
                .or_else(|| pick.workload.cloned());
                if exchange.downstream_propagation {
                    resp.headers_mut()
                        .insert(peer::METADATA, shared.me.metadata.clone());
                    resp.headers_mut()
                        .insert(peer::METADATA_ID, shared.me.node_id.clone());
                }
                let parties = parties_of(source_peer, dest_peer, upstream_peer.as_deref());
                let grpc_status = resp
                    .headers()
                    .get(GRPC_STATUS)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let (head, body) = resp.into_parts();
                let observed = Observed {
                    inner: body,
                    bytes: 0,
                    messages: pending
                        .request_messages
                        .is_some()
                        .then(|| (GrpcFrames::default(), 0)),
                    telemetry: Some(Telemetry {
                        stats: shared.stats.clone(),
                        reporter,
                        parties,
                        protocol,
                        status,
                        grpc_status,
                        start: pending.start,
                        request_bytes: pending.request_bytes.clone(),
                        log: pending.log.take(),
                        span: pending.span.take(),
                        dimensions: pending.dimensions.take(),
                        request_messages: pending.request_messages.take(),
                        _slot: slot.take(),
                        _active: active,
                    }),
                };
                return Response::from_parts(head, observed.boxed());
            }
            Ok(Err(e)) => {
                if let Some(s) = pick.state {
                    cluster.record(s, None);
                }
                let connect = e.is_connect();
                let reason = source_chain(&e);
                tracing::debug!(cluster = %cluster.name, address = %pick.address, error = %reason, "upstream request failed");
                // Connection failures are the pool's to count, once per connection.
                if !connect {
                    stats.inc(format_args!(
                        "cluster.{}.upstream_rq_rx_reset",
                        cluster.name
                    ));
                }
                failed.push(pick.address.clone());
                last = Some(local_reply(
                    503,
                    &format!(
                        "upstream connect error or disconnect/reset before headers. reset reason: {}",
                        if connect {
                            format!("connection failure, transport failure reason: {reason}")
                        } else {
                            "connection termination".to_string()
                        }
                    ),
                ));
                last_flags = if connect { "UF" } else { "UC" };
                let retriable = retry.is_some_and(|r| {
                    (connect && r.connect_failure) || (!connect && (r.reset || r.refused_stream))
                });
                if more
                    && retriable
                    && let Some(s) = retry_slot(&cluster, stats)
                {
                    _retrying = Some(s);
                    stats.inc(format_args!("cluster.{}.upstream_rq_retry", cluster.name));
                    continue;
                }
                if more && retry.is_some() {
                    last_flags = "URX";
                }
                break;
            }
            Err(()) => {
                stats.inc(format_args!("cluster.{}.upstream_rq_timeout", cluster.name));
                if let Some(s) = pick.state {
                    cluster.record(s, Some(504));
                }
                last = Some(local_reply(504, "upstream request timeout"));
                last_flags = "UT";
                let overall_left = deadline.is_none_or(|d| Instant::now() < d);
                if more && overall_left {
                    failed.push(pick.address.clone());
                    continue;
                }
                break;
            }
        }
    }
    let mut last = last.unwrap_or_else(|| local_reply(503, "no healthy upstream"));
    if router.attempt_count_in_response && tried > 0 {
        last.headers_mut()
            .insert(ATTEMPT_COUNT, number(u64::from(tried)));
    }
    let parties = parties_of(source_peer, None, None);
    finish_local(
        stats,
        reporter,
        &parties,
        protocol,
        last.status().as_u16(),
        last_flags,
        pending,
    );
    last
}

/// An error and its causes, each once: an error's message often ends with its cause's.
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cause = c.to_string();
        if !s.ends_with(&cause) {
            s.push_str(": ");
            s.push_str(&cause);
        }
        cur = c.source();
    }
    s
}

/// The caller's workload from its peer metadata headers, where the connection manager's peer
/// metadata filter reads them.
fn caller(hcm: &Hcm, parts: &Parts, shared: &Shared) -> Option<Arc<peer::Workload>> {
    if !hcm.exchange.downstream_discovery {
        return None;
    }
    parts
        .headers
        .get(peer::METADATA)
        .and_then(|v| shared.peers.decode(v.as_bytes()))
}

/// Records a request the proxy answered itself (a policy or an injected fault said no, or a
/// CORS preflight).
fn refuse(
    shared: &Shared,
    info: &ConnInfo,
    source_peer: Option<Arc<peer::Workload>>,
    pending: Pending,
    status: u16,
    flags: &'static str,
) {
    let reporter = if info.inbound() {
        Reporter::Destination
    } else {
        Reporter::Source
    };
    let parties = shared.parties(info, None, source_peer, None, None, None);
    finish_local(
        &shared.stats,
        reporter,
        &parties,
        "http",
        status,
        flags,
        pending,
    );
}

/// Envoy's answer to a token that failed: 401 with the reason and a `WWW-Authenticate`
/// challenge naming the resource.
fn jwt_reply(parts: &Parts, failure: Failure) -> Response<Body> {
    let mut r = local_reply(401, failure.text());
    let realm = format!(
        "http://{}{}",
        authority(parts).unwrap_or_default(),
        parts.uri.path()
    );
    let challenge = if failure == Failure::Missing {
        format!("Bearer realm=\"{realm}\"")
    } else {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn finish_local(
    stats: &Stats,
    reporter: Reporter,
    parties: &Parties,
    protocol: &'static str,
    status: u16,
    flags: &'static str,
    pending: Pending,
) {
    let received = pending.request_bytes.load(Ordering::Relaxed);
    if let Some(log) = pending.log {
        log.write(status, flags, pending.start, received, 0);
    }
    if let Some(span) = pending.span {
        span.finish(Outcome {
            status,
            flags,
            request_bytes: received,
            response_bytes: 0,
        });
    }
    if let Some(dimensions) = &pending.dimensions {
        stats.record_request(RequestOutcome {
            reporter,
            parties,
            dimensions,
            protocol,
            status,
            grpc_status: None,
            flags,
            duration_ms: pending.start.elapsed().as_secs_f64() * 1000.0,
            request_bytes: received,
            response_bytes: 0,
            messages: (messages(pending.request_messages.as_ref()), 0),
        });
    }
}

/// Counts an endpoint's request in flight until the response ends.
struct ActiveGuard(Arc<EndpointState>);

impl ActiveGuard {
    fn new(s: Arc<EndpointState>) -> Self {
        s.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(s)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request body that counts its bytes, and its gRPC messages when asked.
struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    messages: Option<(GrpcFrames, Arc<AtomicU64>)>,
}

/// The gRPC messages counted so far, 0 where they are not counted.
fn messages(count: Option<&Arc<AtomicU64>>) -> u64 {
    count.map_or(0, |c| c.load(Ordering::Relaxed))
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &p
            && let Some(d) = f.data_ref()
        {
            self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            if let Some((frames, count)) = &mut self.messages {
                count.fetch_add(frames.feed(d), Ordering::Relaxed);
            }
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Telemetry of one request, recorded when its response ends (or is abandoned).
struct Telemetry {
    stats: Arc<Stats>,
    reporter: Reporter,
    parties: Parties,
    protocol: &'static str,
    status: u16,
    grpc_status: Option<String>,
    start: Instant,
    request_bytes: Arc<AtomicU64>,
    log: Option<LogCtx>,
    span: Option<Span>,
    dimensions: Option<Dimensions>,
    request_messages: Option<Arc<AtomicU64>>,
    /// The cluster's circuit-breaker slot, held until the response ends.
    _slot: Option<Slot>,
    _active: Option<ActiveGuard>,
}

/// A response body that finishes its request's telemetry at its end.
struct Observed {
    inner: crate::pool::PooledBody,
    bytes: u64,
    /// The response's gRPC messages, when they are counted.
    messages: Option<(GrpcFrames, u64)>,
    telemetry: Option<Telemetry>,
}

impl Observed {
    fn finish(&mut self) {
        if let Some(mut t) = self.telemetry.take() {
            let received = t.request_bytes.load(Ordering::Relaxed);
            if let Some(log) = t.log.take() {
                log.write(t.status, "-", t.start, received, self.bytes);
            }
            if let Some(span) = t.span.take() {
                span.finish(Outcome {
                    status: t.status,
                    flags: "-",
                    request_bytes: received,
                    response_bytes: self.bytes,
                });
            }
            if let Some(dimensions) = &t.dimensions {
                t.stats.record_request(RequestOutcome {
                    reporter: t.reporter,
                    parties: &t.parties,
                    dimensions,
                    protocol: t.protocol,
                    status: t.status,
                    grpc_status: t.grpc_status,
                    flags: "-",
                    duration_ms: t.start.elapsed().as_secs_f64() * 1000.0,
                    request_bytes: received,
                    response_bytes: self.bytes,
                    messages: (
                        messages(t.request_messages.as_ref()),
                        self.messages.as_ref().map_or(0, |m| m.1),
                    ),
                });
            }
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        match &p {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                    if let Some((frames, count)) = &mut self.messages {
                        *count += frames.feed(d);
                    }
                } else if let Some(t) = f.trailers_ref()
                    && let Some(g) = t.get(GRPC_STATUS).and_then(|v| v.to_str().ok())
                    && let Some(tel) = self.telemetry.as_mut()
                {
                    tel.grpc_status = Some(g.to_string());
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_keep_or_drop_the_request_port_as_envoy() {
        let location = |rd: Redirect, host: &str| {
            let parts = Request::get("/a?b=1").body(()).unwrap().into_parts().0;
            redirect(&rd, &parts, host).headers()[header::LOCATION]
                .to_str()
                .unwrap()
                .to_string()
        };
        let to = |scheme: Option<&str>, host: Option<&str>, port: Option<u32>| Redirect {
            status: 301,
            host: host.map(str::to_string),
            port,
            path: None,
            scheme: scheme.map(str::to_string),
        };
        // To https: http's default port goes, another stays.
        assert_eq!(
            location(to(Some("https"), None, None), "web:80"),
            "https://web/a?b=1"
        );
        assert_eq!(
            location(to(Some("https"), None, None), "web:8080"),
            "https://web:8080/a?b=1"
        );
        // A port or a host of the route's replaces the request's.
        assert_eq!(
            location(to(Some("https"), None, Some(8443)), "web:80"),
            "https://web:8443/a?b=1"
        );
        assert_eq!(
            location(to(None, Some("new.example"), None), "web:8080"),
            "http://new.example/a?b=1"
        );
        // Same scheme: the port stays.
        assert_eq!(
            location(to(None, None, None), "web:80"),
            "http://web:80/a?b=1"
        );
        // The route's path takes the request's query, unless it has its own.
        let path = |p: &str| Redirect {
            path: Some(p.into()),
            ..to(None, None, None)
        };
        assert_eq!(location(path("/new"), "web"), "http://web/new?b=1");
        assert_eq!(location(path("/new?c=2"), "web"), "http://web/new?c=2");
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 3, "{h:?}");
        // Each on its own, with no `Connection` field naming it.
        let each = [header::CONNECTION, header::TE, header::UPGRADE];
        for name in HOP_BY_HOP.into_iter().chain(each) {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
        }
    }

    #[test]
    fn an_error_reads_with_each_cause_once() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let e = crate::pool::PoolError::Connect(upstream::ConnectError::Io(refused));
        assert_eq!(source_chain(&e), "connection failure: connection refused");
    }

    #[test]
    fn numbers_are_decimal_header_values() {
        for n in [0, 1, 9, 10, 42, 12_345, u64::MAX] {
            assert_eq!(number(n), n.to_string().as_str());
        }
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36, "{s}");
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
    }
}
