//! Istio's stats filter (`istio.stats`, `stats.PluginConfig`): a listener reports Istio's
//! standard metrics only where it has one, and its `metrics` overrides drop a metric, remove
//! labels, or add and replace labels with the value of a CEL expression.
//!
//! The expressions this proxy evaluates are the ones Istio's documentation and its users'
//! Telemetry resources use: string literals; `request.host`, `.method`, `.path`, `.url_path`,
//! `.scheme`, `.protocol`, `.useragent`, `.id`, `.headers['name']`; `response.code`;
//! `source.address`, `.port`, `destination.address`, `.port`; each optionally in `string()`.
//! Any other expression gives the label `unknown` (what Istio's filter gives for one that fails
//! to evaluate), with a warning when the configuration arrives.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::google::protobuf::Struct;
use http::HeaderName;
use serde::Deserialize;

/// Istio's standard metrics, in the order of [`METRIC_NAMES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Requests,
    Duration,
    RequestBytes,
    ResponseBytes,
    TcpOpened,
    TcpClosed,
    TcpSent,
    TcpReceived,
    RequestMessages,
    ResponseMessages,
}

/// The stats filter's names of the metrics (`istio_` + this is the Prometheus name).
const METRIC_NAMES: [&str; 10] = [
    "requests_total",
    "request_duration_milliseconds",
    "request_bytes",
    "response_bytes",
    "tcp_connections_opened_total",
    "tcp_connections_closed_total",
    "tcp_sent_bytes_total",
    "tcp_received_bytes_total",
    "request_messages_total",
    "response_messages_total",
];

/// The labels of Istio's standard metrics. TCP metrics have all but the two of
/// [`HTTP_ONLY`].
pub const LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "connection_security_policy",
    "request_protocol",
    "response_flags",
    "response_code",
    "grpc_response_status",
];

/// The labels of [`LABELS`] only request metrics have (its last ones).
pub const HTTP_ONLY: usize = 2;

/// A label's value, as the CEL expression that gives it says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    Literal(Arc<str>),
    Host,
    Method,
    Path,
    UrlPath,
    Scheme,
    Protocol,
    Header(HeaderName),
    ResponseCode,
    SourceAddress,
    SourcePort,
    DestinationAddress,
    DestinationPort,
    /// An expression this proxy does not evaluate: the label is `unknown`.
    Unsupported,
}

impl Expr {
    pub fn parse(text: &str) -> Expr {
        let mut e = text.trim();
        if let Some(inner) = e.strip_prefix("string(").and_then(|r| r.strip_suffix(')')) {
            e = inner.trim();
        }
        if let Some(literal) = quoted(e) {
            return Expr::Literal(literal.into());
        }
        if let Some(name) = e
            .strip_prefix("request.headers[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(quoted)
        {
            return HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_or(Expr::Unsupported, Expr::Header);
        }
        match e {
            "request.host" => Expr::Host,
            "request.method" => Expr::Method,
            "request.path" => Expr::Path,
            "request.url_path" => Expr::UrlPath,
            "request.scheme" => Expr::Scheme,
            "request.protocol" => Expr::Protocol,
            "request.useragent" => Expr::Header(http::header::USER_AGENT),
            "request.id" => Expr::Header(HeaderName::from_static("x-request-id")),
            "response.code" => Expr::ResponseCode,
            "source.address" => Expr::SourceAddress,
            "source.port" => Expr::SourcePort,
            "destination.address" => Expr::DestinationAddress,
            "destination.port" => Expr::DestinationPort,
            _ => Expr::Unsupported,
        }
    }

    /// The value for a request (None on a TCP connection) between `source` and
    /// `destination`; None where the attribute is missing, and for the response's code, which
    /// its end fills in.
    fn value(
        &self,
        req: Option<&http::request::Parts>,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Option<String> {
        let header = |name: &HeaderName| {
            req?.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match self {
            Expr::Literal(s) => Some(s.to_string()),
            Expr::Host => req.and_then(crate::http::authority).map(str::to_string),
            Expr::Method => req.map(|r| r.method.to_string()),
            Expr::Path => req.map(|r| {
                r.uri
                    .path_and_query()
                    .map_or_else(|| r.uri.path().to_string(), ToString::to_string)
            }),
            Expr::UrlPath => req.map(|r| r.uri.path().to_string()),
            Expr::Scheme => req.map(|r| r.uri.scheme_str().unwrap_or("http").to_string()),
            Expr::Protocol => req.map(|r| crate::http::protocol_name(r.version).to_string()),
            Expr::Header(name) => header(name),
            Expr::SourceAddress => Some(source.ip().to_string()),
            Expr::SourcePort => Some(source.port().to_string()),
            Expr::DestinationAddress => Some(destination.ip().to_string()),
            Expr::DestinationPort => Some(destination.port().to_string()),
            Expr::ResponseCode | Expr::Unsupported => None,
        }
    }
}

/// The text between matching single or double quotes.
fn quoted(s: &str) -> Option<&str> {
    ['\'', '"'].into_iter().find_map(|q| {
        s.strip_prefix(q)?
            .strip_suffix(q)
            .filter(|inner| !inner.contains(q))
    })
}

/// What one metric reports: nothing (dropped), or its standard labels less the removed ones,
/// plus the added ones (name, index into [`StatsConfig::exprs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Shape {
    pub drop: bool,
    /// Bit `i` set: [`LABELS`]`[i]` is left out.
    pub removed: u32,
    pub added: Vec<(Arc<str>, usize)>,
}

/// One listener's stats filter, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsConfig {
    pub shapes: [Shape; 10],
    /// The distinct expressions the added labels take their values from.
    pub exprs: Vec<Expr>,
    /// Where the cluster names no service, the request's Host does (Istio's, but for
    /// `disable_host_header_fallback`, which the control plane sets on the server side).
    pub host_fallback: bool,
    /// How often an open TCP connection's bytes are counted (Istio's
    /// `tcp_reporting_duration`, 5 s unless set).
    pub tcp_reporting: Duration,
    /// A hash of the above: requests' series are found by it.
    pub id: u64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            shapes: Default::default(),
            exprs: Vec::new(),
            host_fallback: true,
            tcp_reporting: TCP_REPORTING,
            id: 0,
        }
    }
}

/// Istio's default `tcp_reporting_duration`.
const TCP_REPORTING: Duration = Duration::from_secs(5);

impl StatsConfig {
    pub fn shape(&self, m: Metric) -> &Shape {
        &self.shapes[m as usize]
    }

    /// The added labels' values for a request (None: a TCP connection) between `source` and
    /// `destination`, by expression; `unknown` where an attribute is missing.
    pub fn values(
        &self,
        req: Option<&http::request::Parts>,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Vec<String> {
        self.exprs
            .iter()
            .map(|e| {
                e.value(req, source, destination)
                    .unwrap_or_else(|| "unknown".to_string())
            })
            .collect()
    }

    /// From the filter's `TypedStruct` value. Metric names this proxy does not report (custom
    /// metrics) are accepted and have no effect.
    pub fn compile(config: &Struct) -> Result<StatsConfig, String> {
        let json = crate::bootstrap::struct_json(config);
        let plugin: PluginConfig =
            serde_json::from_value(json).map_err(|e| format!("istio.stats: {e}"))?;
        let mut shapes: [Shape; 10] = Default::default();
        let mut exprs: Vec<Expr> = Vec::new();
        for m in &plugin.metrics {
            let targets: Vec<usize> = if m.name.is_empty() {
                (0..METRIC_NAMES.len()).collect()
            } else {
                METRIC_NAMES
                    .iter()
                    .position(|n| *n == m.name)
                    .into_iter()
                    .collect()
            };
            for i in targets {
                let shape = &mut shapes[i];
                shape.drop |= m.drop;
                for (name, text) in &m.dimensions {
                    let expr = Expr::parse(text);
                    if expr == Expr::Unsupported {
                        tracing::warn!(label = %name, expression = %text, "istio.stats: expression not supported; the label is \"unknown\"");
                    }
                    let at = exprs.iter().position(|e| *e == expr).unwrap_or_else(|| {
                        exprs.push(expr);
                        exprs.len() - 1
                    });
                    // A dimension named as a standard label replaces it.
                    if let Some(std) = LABELS.iter().position(|l| l == name) {
                        shape.removed |= 1 << std;
                    }
                    shape.added.retain(|(n, _)| **n != **name);
                    shape.added.push((name.as_str().into(), at));
                }
                for name in &m.tags_to_remove {
                    if let Some(std) = LABELS.iter().position(|l| l == name) {
                        shape.removed |= 1 << std;
                    }
                    shape.added.retain(|(n, _)| **n != **name);
                }
            }
        }
        let tcp_reporting = match &plugin.tcp_reporting_duration {
            None => TCP_REPORTING,
            Some(text) => text
                .strip_suffix('s')
                .and_then(|secs| secs.parse::<f64>().ok())
                .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    format!(
                        "istio.stats: tcp_reporting_duration {text:?} is not a positive duration"
                    )
                })?,
        };
        let mut hasher = std::hash::DefaultHasher::new();
        shapes.hash(&mut hasher);
        exprs.hash(&mut hasher);
        Ok(StatsConfig {
            shapes,
            exprs,
            host_fallback: !plugin.disable_host_header_fallback,
            tcp_reporting,
            id: hasher.finish(),
        })
    }
}

/// Istio's `stats.PluginConfig`, in protobuf's JSON (either name of each field).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PluginConfig {
    metrics: Vec<MetricConfig>,
    #[serde(alias = "disableHostHeaderFallback")]
    disable_host_header_fallback: bool,
    #[serde(alias = "tcpReportingDuration")]
    tcp_reporting_duration: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct MetricConfig {
    name: String,
    dimensions: BTreeMap<String, String>,
    #[serde(alias = "tagsToRemove")]
    tags_to_remove: Vec<String>,
    drop: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(v: serde_json::Value) -> Result<StatsConfig, String> {
        StatsConfig::compile(&isthmus_xds::json::from_json(v).unwrap())
    }

    #[test]
    fn overrides_drop_remove_and_add_labels_per_metric() {
        let requests_total = serde_json::json!({"name": "requests_total", "dimensions": {
            "request_host": "request.host",
            "destination_port": "string(destination.port)",
            "source_app": "'frontend'",
        }, "tags_to_remove": ["grpc_response_status"]});
        let c = compile(serde_json::json!({
            "disable_host_header_fallback": true,
            "metrics": [
                requests_total,
                {"name": "request_bytes", "drop": true},
                {"tagsToRemove": ["response_flags"]},
                {"name": "custom_total", "drop": true},
            ],
        }))
        .unwrap();
        let requests = c.shape(Metric::Requests);
        assert!(!requests.drop);
        let bit = |l: &str| 1u32 << LABELS.iter().position(|x| *x == l).unwrap();
        assert_eq!(
            requests.removed,
            bit("grpc_response_status") | bit("source_app") | bit("response_flags")
        );
        let added: Vec<(&str, &Expr)> = requests
            .added
            .iter()
            .map(|(n, i)| (&**n, &c.exprs[*i]))
            .collect();
        assert_eq!(
            added,
            [
                ("destination_port", &Expr::DestinationPort),
                ("request_host", &Expr::Host),
                ("source_app", &Expr::Literal("frontend".into())),
            ]
        );
        assert!(c.shape(Metric::RequestBytes).drop);
        assert_eq!(c.shape(Metric::TcpOpened).removed, bit("response_flags"));
        assert!(c.shape(Metric::TcpOpened).added.is_empty());
        // The same configuration is the same series key; another is not.
        let again = compile(serde_json::json!({"metrics": [
            requests_total,
            {"name": "request_bytes", "drop": true},
            {"tags_to_remove": ["response_flags"]},
        ]}))
        .unwrap();
        assert_eq!(again.id, c.id);
        assert_ne!(compile(serde_json::json!({})).unwrap().id, c.id);
        // TCP bytes are counted every 5 s, or as often as the filter says.
        assert_eq!(c.tcp_reporting, Duration::from_secs(5));
        assert!(!c.host_fallback);
        let every = |d: &str| {
            compile(serde_json::json!({"tcpReportingDuration": d})).map(|c| c.tcp_reporting)
        };
        assert_eq!(every("0.2s"), Ok(Duration::from_millis(200)));
        assert_eq!(
            every("0s"),
            Err("istio.stats: tcp_reporting_duration \"0s\" is not a positive duration".into())
        );
    }

    #[test]
    fn expressions_istio_users_write() {
        assert_eq!(
            Expr::parse("request.headers['X-Tenant']"),
            Expr::Header(HeaderName::from_static("x-tenant"))
        );
        assert_eq!(
            Expr::parse("request.headers[\"user-agent\"]"),
            Expr::Header(http::header::USER_AGENT)
        );
        assert_eq!(Expr::parse(" string(response.code) "), Expr::ResponseCode);
        assert_eq!(Expr::parse("\"v1\""), Expr::Literal("v1".into()));
        assert_eq!(
            Expr::parse("upstream_peer.labels['app'].value"),
            Expr::Unsupported
        );
        assert_eq!(Expr::parse("'a' + 'b'"), Expr::Unsupported);
        let req = http::Request::get("http://reviews:9080/r/1?x=y")
            .header("x-tenant", "acme")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let exprs = [
            "request.host",
            "request.method",
            "request.path",
            "request.url_path",
            "request.protocol",
            "request.headers['x-tenant']",
            "request.headers['x-missing']",
            "destination.port",
            "source.address",
            "'lit'",
            "response.code",
            "xds.cluster_name",
        ];
        let c = StatsConfig {
            exprs: exprs.iter().map(|e| Expr::parse(e)).collect(),
            ..StatsConfig::default()
        };
        let (src, dst) = (
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:9080".parse().unwrap(),
        );
        assert_eq!(
            c.values(Some(&req), src, dst),
            [
                "reviews:9080",
                "GET",
                "/r/1?x=y",
                "/r/1",
                "HTTP/1.1",
                "acme",
                "unknown",
                "9080",
                "10.0.0.1",
                "lit",
                "unknown",
                "unknown"
            ]
        );
        // A TCP connection has no request.
        assert_eq!(c.values(None, src, dst)[..2], ["unknown", "unknown"]);
        assert_eq!(
            compile(serde_json::json!({"metrics": {"name": "x"}})).map(|_| ()),
            Err("istio.stats: invalid type: map, expected a sequence".to_string())
        );
    }
}
