//! The monitoring port (15014): `/ready`, `/metrics` and istiod's debug endpoints.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use isthmus_xds::server::{CLUSTER, Counters, ENDPOINT, LISTENER, PUSH_BUCKETS, ROUTE};
use isthmus_xds::{ProxyState, json};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::generator::{Shared, proxy_of};

#[derive(Clone)]
pub struct State {
    pub proxies: Arc<Mutex<BTreeMap<u64, ProxyState>>>,
    pub counters: Arc<Counters>,
    pub timings: Arc<Timings>,
    pub context: Shared,
    pub version: watch::Receiver<u64>,
}

/// How long a change takes before it is pushed, as istiod measures it.
pub struct Timings {
    /// `pilot_debounce_time`: from the first change event to the end of debouncing.
    pub debounce: Histogram,
    /// `pilot_pushcontext_init_seconds`: re-reading the changed config and building the push
    /// context.
    pub init: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            debounce: Histogram::new(PUSH_BUCKETS),
            init: Histogram::new(PUSH_BUCKETS),
        }
    }
}

pub async fn serve(listener: TcpListener, state: State) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match req.uri().path() {
        "/ready" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => text(StatusCode::OK, metrics(state)),
        "/debug/syncz" => json_response(syncz(state)),
        "/debug/registryz" => json_response(registryz(state)),
        "/debug/configz" => json_response(configz(state)),
        path @ ("/debug/config_dump" | "/debug/ndsz") => match query.get("proxyID") {
            Some(id) => {
                let built = if path == "/debug/ndsz" {
                    ndsz(state, id)
                } else {
                    config_dump(state, id)
                };
                match built {
                    Ok(v) => json_response(v),
                    Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
                }
            }
            None => text(StatusCode::BAD_REQUEST, "proxyID is required\n".into()),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn json_response(v: Value) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::OK,
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
    );
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Prometheus text exposition with istiod's metric names (written directly: OpenMetrics
/// encoders would rename counters with a `_total` suffix that Istio dashboards do not query).
fn metrics(state: &State) -> String {
    let connected = state.proxies.lock().map_or(0, |p| p.len());
    let c = &state.counters;
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register(
        "pilot_proxy_convergence_time",
        "Delay in seconds between the start of a push and a proxy's ACK of it.",
        c.convergence.clone(),
    );
    registry.register(
        "pilot_debounce_time",
        "Delay in seconds between the first config change event and the end of debouncing.",
        state.timings.debounce.clone(),
    );
    registry.register(
        "pilot_pushcontext_init_seconds",
        "Total time in seconds to read the changed config and build the push context.",
        state.timings.init.clone(),
    );
    let mut histograms = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut histograms, &registry).is_err() {
        histograms.clear();
    }
    let counters = format!(
        "# HELP pilot_xds Number of endpoints connected to this pilot using XDS.\n\
         # TYPE pilot_xds gauge\npilot_xds {connected}\n\
         # HELP pilot_xds_pushes Pilot build and send errors for lds, rds, cds and eds.\n\
         # TYPE pilot_xds_pushes counter\npilot_xds_pushes {}\n\
         # HELP pilot_total_xds_rejects Total number of XDS responses from pilot rejected by proxy.\n\
         # TYPE pilot_total_xds_rejects counter\npilot_total_xds_rejects {}\n\
         # HELP pilot_xds_connections_total Connections accepted since start.\n\
         # TYPE pilot_xds_connections_total counter\npilot_xds_connections_total {}\n",
        c.pushes.load(Ordering::Relaxed),
        c.nacks.load(Ordering::Relaxed),
        c.connections.load(Ordering::Relaxed),
    );
    counters + &histograms
}

/// Per proxy: what was sent and acknowledged per type (istiod's `/debug/syncz`).
pub fn syncz(state: &State) -> Value {
    let proxies = state.proxies.lock().map(|p| p.clone()).unwrap_or_default();
    let version = format!("v{}", *state.version.borrow());
    Value::Array(
        proxies
            .values()
            .map(|p| {
                let t = |url: &str| p.types.get(url);
                let sent = |url: &str| t(url).map_or("", |s| s.sent_version.as_str()).to_string();
                let acked = |url: &str| t(url).map_or("", |s| s.acked_version.as_str()).to_string();
                let nacks: BTreeMap<&str, &str> = p
                    .types
                    .iter()
                    .filter_map(|(k, v)| v.nack.as_deref().map(|n| (short(k), n)))
                    .collect();
                json!({
                    "proxy": p.node_id,
                    "cluster_id": p.cluster_id,
                    "istio_version": p.proxy_version,
                    "delta": p.delta,
                    "control_plane_version": version,
                    "cluster_sent": sent(CLUSTER), "cluster_acked": acked(CLUSTER),
                    "endpoint_sent": sent(ENDPOINT), "endpoint_acked": acked(ENDPOINT),
                    "listener_sent": sent(LISTENER), "listener_acked": acked(LISTENER),
                    "route_sent": sent(ROUTE), "route_acked": acked(ROUTE),
                    "nacks": nacks,
                })
            })
            .collect(),
    )
}

fn short(type_url: &str) -> &str {
    match type_url {
        CLUSTER => "CDS",
        ENDPOINT => "EDS",
        LISTENER => "LDS",
        ROUTE => "RDS",
        other => other,
    }
}

fn current(state: &State) -> Arc<isthmus_pilot::PushContext> {
    state
        .context
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

fn registryz(state: &State) -> Value {
    let ctx = current(state);
    Value::Array(
        ctx.registry
            .services
            .iter()
            .map(|s| {
                json!({
                    "hostname": s.hostname,
                    "namespace": s.namespace,
                    "addresses": s.vips.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                    "headless": s.headless,
                    "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol.as_str()})).collect::<Vec<_>>(),
                    "endpoints": s.endpoints.iter().map(|e| format!("{}:{}", e.address, e.port)).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn configz(state: &State) -> Value {
    let ctx = current(state);
    Value::Array(
        ctx.snapshot
            .all_metadata()
            .into_iter()
            .map(|(kind, origin, meta)| {
                json!({
                    "kind": kind.name(),
                    "namespace": meta.namespace.clone().unwrap_or_default(),
                    "name": meta.name.clone().unwrap_or_default(),
                    "origin": format!("{}:{}", origin.file, origin.line),
                })
            })
            .collect(),
    )
}

/// Envoy's config dump (clusters, endpoints, listeners, routes) for a proxy named by node id or `pod.namespace`.
/// The connected proxy `id` names (its node id, or `<pod>.<namespace>`), as its node and
/// metadata make it.
fn connected(state: &State, id: &str) -> Result<isthmus_pilot::Proxy, String> {
    let node = {
        let proxies = state.proxies.lock().unwrap_or_else(|p| p.into_inner());
        proxies
            .values()
            .find(|p| p.node_id == id || p.node_id.split('~').nth(2) == Some(id))
            .map(|p| match &p.node {
                Some(n) => (**n).clone(),
                None => envoy_types::pb::envoy::config::core::v3::Node {
                    id: p.node_id.clone(),
                    ..Default::default()
                },
            })
            .ok_or_else(|| format!("proxy {id:?} is not connected"))?
    };
    proxy_of(&node)
}

/// Istio's `/debug/ndsz`: the name table the proxy's agent answers DNS from.
fn ndsz(state: &State, id: &str) -> Result<Value, String> {
    let proxy = connected(state, id)?;
    let table = isthmus_pilot::nds::name_table(&current(state), &proxy);
    let entries: serde_json::Map<String, Value> = table
        .table
        .into_iter()
        .map(|(host, i)| {
            let mut info = serde_json::Map::new();
            info.insert("ips".into(), serde_json::json!(i.ips));
            for (k, v) in [
                ("registry", i.registry),
                ("shortname", i.shortname),
                ("namespace", i.namespace),
            ] {
                // As protobuf's JSON: fields left empty are left out.
                if !v.is_empty() {
                    info.insert(k.into(), Value::String(v));
                }
            }
            (host, Value::Object(info))
        })
        .collect();
    Ok(serde_json::json!({ "table": entries }))
}

fn config_dump(state: &State, id: &str) -> Result<Value, String> {
    let proxy = connected(state, id)?;
    let ctx = current(state);
    let version = format!("v{}", *state.version.borrow());
    let dump = isthmus_xds::client::XdsState {
        clusters: isthmus_pilot::cluster::clusters(&ctx, &proxy)
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(c.into())))
            .collect(),
        endpoints: isthmus_pilot::endpoint::endpoints(&ctx, &proxy, &[])
            .into_iter()
            .map(|e| (e.cluster_name.clone(), Arc::new(e.into())))
            .collect(),
        listeners: isthmus_pilot::listener::listeners(&ctx, &proxy)
            .into_iter()
            .map(|l| (l.name.clone(), Arc::new(l.into())))
            .collect(),
        routes: isthmus_pilot::route::routes(&ctx, &proxy, &[])
            .into_iter()
            .map(|r| (r.name.clone(), Arc::new(r.into())))
            .collect(),
        versions: [CLUSTER, ENDPOINT, LISTENER, ROUTE]
            .into_iter()
            .map(|t| (t.to_string(), version.clone()))
            .collect(),
        ..Default::default()
    };
    Ok(json::config_dump(&dump, None, Vec::new()))
}
