//! The proxy's own HTTP ports: Envoy's admin (15000), the agent's merged metrics (15020),
//! readiness (15021) and Envoy's Prometheus endpoint (15090).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;
use crate::config::Cluster;
use crate::config::cluster::Discovery;
use crate::envoy_stats::Kind;
use crate::stats::ReadStat;
use crate::upstream::Address;

/// What the admin pages read.
pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ready: watch::Receiver<bool>,
    pub started: Instant,
    pub quit: watch::Sender<bool>,
    pub log_levels: Option<crate::log_level::LogLevels>,
    /// What `/config_dump` begins with.
    pub bootstrap: crate::bootstrap::Bootstrap,
    /// The xDS client's sessions and the updates they took, shared with it.
    pub xds_link: Arc<isthmus_xds::client::Link>,
    pub xds_updates: Arc<isthmus_xds::client::UpdateCounts>,
    /// The app's metrics to merge on 15020: `http://127.0.0.1:<port><path>`.
    pub app_metrics: Option<(u16, String)>,
    /// Scrapes of the app's metrics, and those that failed.
    pub app_scrapes: AtomicU64,
    pub app_scrape_failures: AtomicU64,
    /// The DNS proxy's counters, when it runs.
    pub dns: Option<Arc<crate::dns::DnsStats>>,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// Serves plain HTTP/1.1 on `tcp` with `handler`, until the process ends.
pub async fn serve(tcp: TcpListener, handler: Handler) {
    loop {
        let Ok((stream, _)) = tcp.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let h = handler.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=UTF-8", body)
}

fn json_reply(v: &Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(v).unwrap_or_default(),
    )
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // Bytes, not a str slice: what follows `%` may be any UTF-8.
            b'%' if i + 2 < b.len() => match std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(())
            {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl AdminState {
    /// Envoy's server state: its name, and its number in the `server.state` gauge.
    fn state(&self) -> (&'static str, u64) {
        if *self.shared.draining.borrow() {
            ("DRAINING", 1)
        } else if *self.ready.borrow() {
            ("LIVE", 0)
        } else {
            ("PRE_INITIALIZING", 2)
        }
    }

    fn state_name(&self) -> &'static str {
        self.state().0
    }

    /// Envoy's stats that are read where they live: the server's state, the configuration's
    /// size and updates, and per cluster the connections and requests in flight and the
    /// endpoints.
    fn read_stats(&self) -> Vec<ReadStat> {
        let cfg = self.shared.config();
        let (_, state) = self.state();
        let gauge = |name: &str, v: u64| (name.to_string(), v, Kind::Gauge);
        let mut read = vec![
            gauge("server.live", u64::from(state != 1)),
            gauge("server.state", state),
            gauge("server.uptime", self.started.elapsed().as_secs()),
            gauge(
                "server.total_connections",
                self.shared.active_connections() as u64,
            ),
            gauge("cluster_manager.active_clusters", cfg.clusters.len() as u64),
            gauge(
                "listener_manager.total_listeners_active",
                cfg.listeners.len() as u64,
            ),
        ];
        for (prefix, type_url) in [
            ("cluster_manager.cds", isthmus_xds::server::CLUSTER),
            ("listener_manager.lds", isthmus_xds::server::LISTENER),
        ] {
            let n = self.xds_updates.get(type_url);
            read.push((format!("{prefix}.update_success"), n.success, Kind::Counter));
            read.push((
                format!("{prefix}.update_rejected"),
                n.rejected,
                Kind::Counter,
            ));
        }
        // The control plane, as Envoy's `xds-grpc` cluster (one connection, one stream).
        let link = &self.xds_link;
        let connected = u64::from(link.connected());
        read.extend([
            gauge("control_plane.connected_state", connected),
            gauge("cluster.xds-grpc.upstream_cx_active", connected),
            gauge("cluster.xds-grpc.upstream_rq_active", connected),
            (
                "cluster.xds-grpc.upstream_cx_total".into(),
                link.attempts(),
                Kind::Counter,
            ),
            (
                "cluster.xds-grpc.upstream_cx_connect_fail".into(),
                link.connect_failures(),
                Kind::Counter,
            ),
            (
                "cluster.xds-grpc.upstream_rq_total".into(),
                link.streams(),
                Kind::Counter,
            ),
        ]);
        for (name, c) in cfg.clusters.iter() {
            let (mut cx, mut rq, mut healthy) = (0, 0, 0);
            for e in &c.endpoints {
                cx += e.state.cx_active.load(Relaxed) as u64;
                rq += e.state.active.load(Relaxed) as u64;
                healthy += u64::from(e.healthy && !Cluster::is_ejected(&e.state));
            }
            read.push((
                format!("cluster.{name}.upstream_cx_active"),
                cx,
                Kind::Gauge,
            ));
            read.push((
                format!("cluster.{name}.upstream_rq_active"),
                rq,
                Kind::Gauge,
            ));
            read.push((
                format!("cluster.{name}.membership_total"),
                c.endpoints.len() as u64,
                Kind::Gauge,
            ));
            read.push((
                format!("cluster.{name}.membership_healthy"),
                healthy,
                Kind::Gauge,
            ));
        }
        read
    }

    /// What Prometheus scrapes from the proxy: Istio's metrics and the Envoy stats Istio
    /// exports.
    fn prometheus_text(&self) -> String {
        self.shared.stats.prometheus_text(&self.read_stats())
    }

    /// Envoy's admin interface on 15000.
    pub fn admin_handler(self: &Arc<Self>) -> Handler {
        let st = self.clone();
        Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { st.admin(req) })
        })
    }

    fn admin(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let q = query(&req);
        let post = req.method() == Method::POST;
        match req.uri().path() {
            "/config_dump" => self.config_dump(&q),
            "/clusters" if q.get("format").is_some_and(|f| f == "json") => {
                json_reply(&self.clusters_json())
            }
            "/clusters" => text(StatusCode::OK, self.clusters_text()),
            "/stats" if q.get("format").is_some_and(|f| f == "prometheus") => {
                text(StatusCode::OK, self.prometheus_text())
            }
            "/stats" => match q.get("filter").map(|f| regex::Regex::new(f)).transpose() {
                // Envoy's JSON form, which `istioctl x envoy-stats -o json` reads.
                Ok(filter) if q.get("format").is_some_and(|f| f == "json") => {
                    let stats = self
                        .shared
                        .stats
                        .envoy_stats(filter.as_ref(), &self.read_stats());
                    let stats: Vec<Value> = stats
                        .into_iter()
                        .map(|(name, value)| json!({"name": name, "value": value}))
                        .collect();
                    json_reply(&json!({ "stats": stats }))
                }
                Ok(filter) => text(
                    StatusCode::OK,
                    self.shared
                        .stats
                        .envoy_text(filter.as_ref(), &self.read_stats()),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("bad filter: {e}\n")),
            },
            "/stats/prometheus" => text(StatusCode::OK, self.prometheus_text()),
            "/server_info" => json_reply(&json!({
                "version": concat!("isthmus/", env!("CARGO_PKG_VERSION")),
                "state": self.state_name(),
                "uptime_current_epoch": format!("{}s", self.started.elapsed().as_secs()),
                "node": self.bootstrap.node_json(),
            })),
            "/ready" => {
                let s = self.state_name();
                let code = if s == "LIVE" {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(code, format!("{s}\n"))
            }
            "/logging" if post => self.logging(&q),
            "/quitquitquit" if post => {
                self.quit.send_replace(true);
                text(StatusCode::OK, "OK\n")
            }
            "/logging" | "/quitquitquit" => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "This endpoint requires POST\n",
            ),
            "/" | "/help" => text(
                StatusCode::OK,
                "admin commands are:\n  /clusters\n  /config_dump\n  /logging (POST)\n  /quitquitquit (POST)\n  /ready\n  /server_info\n  /stats\n  /stats/prometheus\n",
            ),
            _ => text(StatusCode::NOT_FOUND, "invalid path\n"),
        }
    }

    /// `POST /logging`: sets levels per logger or for all; without parameters, lists them.
    fn logging(&self, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let Some(log) = &self.log_levels else {
            return text(StatusCode::NOT_IMPLEMENTED, "log level is fixed\n");
        };
        match log.post(q) {
            Ok(list) => text(StatusCode::OK, list),
            Err(e) => text(
                StatusCode::BAD_REQUEST,
                format!(
                    "{e}\nusage: POST /logging?level=<level> (every logger), ?<logger>=<level>, or ?paths=<logger>:<level>,...\n"
                ),
            ),
        }
    }

    /// `/config_dump`, with Envoy's `resource=` (one repeated field of the dumps, flattened)
    /// and `mask=` (comma-separated field paths kept in each item).
    fn config_dump(&self, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let cfg = self.shared.config();
        let secrets = self.secrets_dump();
        let bootstrap = self.bootstrap.config_dump();
        let dump = isthmus_xds::json::config_dump(&cfg.xds, Some(&bootstrap), vec![secrets]);
        // The descriptors go back; the dump is rare, the memory they hold is not.
        isthmus_xds::json::unload();
        release_free_memory();
        let mut items: Vec<Value> = match q.get("resource").filter(|r| !r.is_empty()) {
            None => dump["configs"].as_array().cloned().unwrap_or_default(),
            Some(field) => {
                let found: Vec<Value> = dump["configs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        let ty = c["@type"].as_str()?.to_string();
                        let list = c.get(field)?.as_array()?.clone();
                        Some(list.into_iter().map(move |mut v| {
                            if let Value::Object(m) = &mut v {
                                m.insert("@type".into(), Value::String(item_type(&ty, field)));
                            }
                            v
                        }))
                    })
                    .flatten()
                    .collect();
                if found.is_empty()
                    && !dump["configs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c.get(field).is_some())
                {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("no resource {field:?} in the config dump\n"),
                    );
                }
                found
            }
        };
        if let Some(mask) = q.get("mask").filter(|m| !m.is_empty()) {
            let paths: Vec<Vec<&str>> = mask.split(',').map(|p| p.split('.').collect()).collect();
            items = items.iter().map(|v| apply_mask(v, &paths)).collect();
        }
        json_reply(&json!({ "configs": items }))
    }

    /// The workload certificate and roots as Envoy's secrets dump, private key redacted.
    fn secrets_dump(&self) -> Value {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let mut secrets = Vec::new();
        if let Some(identity) = self.shared.pools.identity() {
            let (issued, at) = identity.issued();
            let last_updated = rfc3339(at);
            secrets.push(json!({
                "name": "default",
                "version_info": last_updated,
                "last_updated": last_updated,
                "secret": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                    "name": "default",
                    "tls_certificate": {
                        "certificate_chain": {"inline_bytes": b64(&issued.presented_chain())},
                        "private_key": {"inline_string": "[redacted]"},
                    },
                },
            }));
            secrets.push(json!({
                "name": "ROOTCA",
                "version_info": last_updated,
                "last_updated": last_updated,
                "secret": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                    "name": "ROOTCA",
                    "validation_context": {
                        "trusted_ca": {"inline_bytes": b64(&identity.roots_pem)},
                    },
                },
            }));
        }
        json!({
            "@type": "type.googleapis.com/envoy.admin.v3.SecretsConfigDump",
            "dynamic_active_secrets": secrets,
        })
    }

    /// Envoy's `/clusters?format=json` (what istioctl reads for `proxy-config endpoints`):
    /// per endpoint, its address, counters and gauges, and health.
    fn clusters_json(&self) -> Value {
        let cfg = self.shared.config();
        let mut names: Vec<&String> = cfg.clusters.keys().collect();
        names.sort();
        let statuses: Vec<Value> = names
            .into_iter()
            .map(|name| {
                let c = &cfg.clusters[name];
                let hosts: Vec<Value> = c
                    .endpoints
                    .iter()
                    .filter(|_| c.discovery != Discovery::OriginalDst)
                    .map(|e| {
                        let s = &e.state;
                        let (address, port) = match &e.address {
                            Address::Ip(a) => (a.ip().to_string(), a.port()),
                            Address::Dns(h, p) => (h.clone(), *p),
                        };
                        // Proto3 JSON, as Envoy prints it: counters are the default type, and
                        // a zero value is left out.
                        let stat = |name: &str, value: u64, gauge: bool| {
                            let mut m = serde_json::Map::new();
                            if gauge {
                                m.insert("type".into(), "GAUGE".into());
                            }
                            m.insert("name".into(), name.into());
                            if value > 0 {
                                m.insert("value".into(), value.to_string().into());
                            }
                            Value::Object(m)
                        };
                        let mut health = json!({
                            "eds_health_status": if e.healthy { "HEALTHY" } else { "UNHEALTHY" },
                        });
                        if Cluster::is_ejected(s) {
                            health["failed_outlier_check"] = true.into();
                        }
                        json!({
                            "address": {"socket_address": {"address": address, "port_value": port}},
                            "stats": [
                                stat("cx_connect_fail", s.cx_connect_fail.load(Relaxed), false),
                                stat("cx_total", s.cx_total.load(Relaxed), false),
                                stat("rq_error", s.errors.load(Relaxed), false),
                                stat("rq_total", s.requests.load(Relaxed), false),
                                stat("cx_active", s.cx_active.load(Relaxed) as u64, true),
                                stat("rq_active", s.active.load(Relaxed) as u64, true),
                            ],
                            "health_status": health,
                            "weight": 1,
                            "priority": e.priority,
                        })
                    })
                    .collect();
                json!({
                    "name": name,
                    "added_via_api": true,
                    "host_statuses": hosts,
                })
            })
            .collect();
        json!({ "cluster_statuses": statuses })
    }

    /// Envoy's `/clusters` text: per endpoint, connections and requests (in flight and in
    /// total), health flags.
    fn clusters_text(&self) -> String {
        let cfg = self.shared.config();
        let mut names: Vec<&String> = cfg.clusters.keys().collect();
        names.sort();
        let mut out = String::new();
        for name in names {
            let c = &cfg.clusters[name];
            out.push_str(&format!("{name}::added_via_api::true\n"));
            if c.discovery == Discovery::OriginalDst {
                continue;
            }
            for e in &c.endpoints {
                let a = &e.address;
                let s = &e.state;
                let mut flags = Vec::new();
                if !e.healthy {
                    flags.push("/failed_eds_health");
                }
                if Cluster::is_ejected(s) {
                    flags.push("/failed_outlier_check");
                }
                let health = if flags.is_empty() {
                    "healthy".to_string()
                } else {
                    flags.concat()
                };
                out.push_str(&format!(
                    "{name}::{a}::cx_active::{}\n{name}::{a}::cx_connect_fail::{}\n{name}::{a}::cx_total::{}\n{name}::{a}::rq_active::{}\n{name}::{a}::rq_total::{}\n{name}::{a}::rq_error::{}\n{name}::{a}::health_flags::{health}\n{name}::{a}::weight::1\n{name}::{a}::outlier::ejections::{}\n",
                    s.cx_active.load(Relaxed),
                    s.cx_connect_fail.load(Relaxed),
                    s.cx_total.load(Relaxed),
                    s.active.load(Relaxed),
                    s.requests.load(Relaxed),
                    s.errors.load(Relaxed),
                    s.ejections.load(Relaxed),
                ));
            }
        }
        out
    }

    /// Readiness on 15021 (`/healthz/ready`).
    pub fn health_handler(self: &Arc<Self>) -> Handler {
        let st = self.clone();
        Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move {
                match req.uri().path() {
                    "/healthz/ready" | "/ready" => st.readiness(),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            })
        })
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        if *self.ready.borrow() && !*self.shared.draining.borrow() {
            text(StatusCode::OK, "")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {}\n", self.state_name()),
            )
        }
    }

    /// Envoy's Prometheus endpoint on 15090.
    pub fn prometheus_handler(self: &Arc<Self>) -> Handler {
        let st = self.clone();
        Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move {
                match req.uri().path() {
                    "/stats/prometheus" => text(StatusCode::OK, st.prometheus_text()),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            })
        })
    }

    /// The agent's own metrics (Istio's `istio_agent_*`): its scrapes of the app's metrics,
    /// its DNS proxy's queries, and the time left on the workload certificate, negative once
    /// expired.
    fn agent_metrics(&self) -> String {
        let mut out = format!(
            "# HELP istio_agent_scrapes_total The total number of scrapes.\n\
             # TYPE istio_agent_scrapes_total counter\n\
             istio_agent_scrapes_total {}\n\
             # HELP istio_agent_scrape_failures_total The total number of failed scrapes.\n\
             # TYPE istio_agent_scrape_failures_total counter\n\
             istio_agent_scrape_failures_total{{type=\"application\"}} {}\n",
            self.app_scrapes.load(Relaxed),
            self.app_scrape_failures.load(Relaxed),
        );
        if let Some(dns) = &self.dns {
            for (name, help, value) in [
                (
                    "dns_requests_total",
                    "Total number of DNS requests.",
                    &dns.requests,
                ),
                (
                    "dns_upstream_requests_total",
                    "Total number of DNS requests forwarded to upstream.",
                    &dns.upstream_requests,
                ),
                (
                    "dns_upstream_failures_total",
                    "Total number of DNS failures.",
                    &dns.upstream_failures,
                ),
            ] {
                out.push_str(&format!(
                    "# HELP istio_agent_{name} {help}\n# TYPE istio_agent_{name} counter\nistio_agent_{name} {}\n",
                    value.load(Relaxed)
                ));
            }
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register(
                "istio_agent_dns_upstream_request_duration_seconds",
                "Total time in seconds Istio takes to get DNS response from upstream.",
                dns.upstream_duration.clone(),
            );
            let mut histogram = String::new();
            if prometheus_client::encoding::text::encode_registry(&mut histogram, &registry).is_ok()
            {
                out.push_str(&histogram);
            }
        }
        let Some(identity) = self.shared.pools.identity() else {
            return out;
        };
        let (issued, _) = identity.issued();
        let left = match issued
            .not_after
            .duration_since(std::time::SystemTime::now())
        {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        out.push_str(&format!(
            "# HELP istio_agent_cert_expiry_seconds The time remaining, in seconds, before the certificate chain will expire. A negative value indicates the cert is expired.\n\
             # TYPE istio_agent_cert_expiry_seconds gauge\n\
             istio_agent_cert_expiry_seconds{{resource_name=\"default\"}} {left:.0}\n"
        ));
        out
    }

    /// The agent's port 15020: merged metrics (the proxy's and the app's) and readiness.
    pub fn agent_handler(self: &Arc<Self>) -> Handler {
        let st = self.clone();
        Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move {
                match req.uri().path() {
                    "/stats/prometheus" => {
                        st.app_scrapes.fetch_add(1, Relaxed);
                        let app = match &st.app_metrics {
                            Some((port, path)) => match scrape_app(*port, path).await {
                                Ok(app) => app,
                                Err(e) => {
                                    st.app_scrape_failures.fetch_add(1, Relaxed);
                                    tracing::debug!(error = %e, "scraping the app's metrics");
                                    String::new()
                                }
                            },
                            None => String::new(),
                        };
                        // One exposition: the proxy's, the agent's and the app's, then `# EOF`.
                        let mut body = st.prometheus_text();
                        body.truncate(body.trim_end_matches("# EOF\n").len());
                        body.push_str(&st.agent_metrics());
                        body.push_str(app.trim_end_matches("# EOF\n"));
                        if !body.ends_with('\n') {
                            body.push('\n');
                        }
                        body.push_str("# EOF\n");
                        text(StatusCode::OK, body)
                    }
                    "/healthz/ready" => st.readiness(),
                    _ => text(StatusCode::NOT_FOUND, "not found\n"),
                }
            })
        })
    }
}

/// Returns the allocator's free pages to the system (glibc keeps them otherwise, in every
/// arena that took part).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that is already free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The dump item type for a `resource=` field (`dynamic_active_clusters` →
/// `ClustersConfigDump.DynamicCluster`).
fn item_type(dump_type: &str, field: &str) -> String {
    let inner = match field {
        "dynamic_active_clusters" | "dynamic_warming_clusters" => "DynamicCluster",
        "dynamic_listeners" => "DynamicListener",
        "dynamic_route_configs" => "DynamicRouteConfig",
        "dynamic_endpoint_configs" => "DynamicEndpointConfig",
        "dynamic_active_secrets" => "DynamicSecret",
        "static_clusters" => "StaticCluster",
        "static_listeners" => "StaticListener",
        "static_route_configs" => "StaticRouteConfig",
        _ => "Item",
    };
    format!("{dump_type}.{inner}")
}

/// Keeps only the masked paths of `v` (and `@type`).
fn apply_mask(v: &Value, paths: &[Vec<&str>]) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(t) = v.get("@type") {
        out.insert("@type".into(), t.clone());
    }
    for path in paths {
        let Some((first, rest)) = path.split_first() else {
            continue;
        };
        let Some(child) = v.get(*first) else { continue };
        let kept = if rest.is_empty() {
            child.clone()
        } else {
            apply_mask(child, &[rest.to_vec()])
        };
        match (out.get_mut(*first), kept) {
            (Some(Value::Object(existing)), Value::Object(more)) => existing.extend(more),
            (_, kept) => {
                out.insert((*first).to_string(), kept);
            }
        }
    }
    Value::Object(out)
}

/// RFC 3339 in UTC without a date crate.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Bound on the app's metrics page.
const MAX_APP_METRICS: usize = 4 * 1024 * 1024;

async fn scrape_app(port: u16, path: &str) -> Result<String, String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, format!("127.0.0.1:{port}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_APP_METRICS)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_only_named_paths() {
        let v = json!({"@type": "t", "cluster": {"name": "a", "type": "EDS"}, "version_info": "1"});
        let paths = vec![vec!["cluster", "name"]];
        assert_eq!(
            apply_mask(&v, &paths),
            json!({"@type": "t", "cluster": {"name": "a"}})
        );
    }

    #[test]
    fn formats_rfc3339() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(percent_decode("a%2Cb+c"), "a,b c");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
