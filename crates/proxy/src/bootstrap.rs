//! The proxy's bootstrap as Envoy's config dump shows it (`istioctl proxy-config bootstrap`):
//! the node it presents, where its xDS comes from, the admin port, the stats configuration in
//! force, and, as Istio's bootstrap declares them, the Prometheus (15090) and health (15021)
//! listeners and the clusters behind them, which this process serves itself.

use std::net::IpAddr;
use std::time::SystemTime;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use serde_json::{Value, json};

use crate::agent::Options;

const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
/// The control plane's cluster, named as in Istio's bootstrap.
pub const XDS_CLUSTER: &str = "xds-grpc";

fn socket(address: &str, port: u16) -> Value {
    json!({ "socket_address": { "address": address, "port_value": port } })
}

fn static_cluster(name: &str, kind: &str, address: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": kind,
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket(address, port) } }] }],
        },
    })
}

/// A listener whose one route sends `prefix` to `cluster` (Istio's 15090 and 15021).
fn static_listener(
    bind: IpAddr,
    port: u16,
    stat_prefix: &str,
    prefix: &str,
    cluster: &str,
) -> Value {
    json!({
        "name": format!("{bind}_{port}"),
        "address": socket(&bind.to_string(), port),
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE,
                "stat_prefix": stat_prefix,
                "route_config": { "virtual_hosts": [{
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [{ "match": { "prefix": prefix }, "route": { "cluster": cluster } }],
                }] },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                }],
            },
        }] }],
    })
}

/// The control plane as a cluster: its address, and the TLS that reaches it when the mesh
/// roots are given.
fn xds_cluster(opts: &Options) -> Option<Value> {
    let (host, port) = opts.discovery_address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let kind = if host.parse::<IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let mut c = static_cluster(XDS_CLUSTER, kind, host, port.parse().ok()?);
    c["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": { "http2_protocol_options": {} },
        },
    });
    if let Some(roots) = &opts.root_cert {
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": opts.discovery_san,
                "common_tls_context": { "validation_context": {
                    "trusted_ca": { "filename": roots.display().to_string() },
                    "match_typed_subject_alt_names": [
                        { "san_type": "DNS", "matcher": { "exact": opts.discovery_san } },
                    ],
                } },
            },
        });
    }
    Some(c)
}

/// What the bootstrap is made of, kept to build it when a config dump asks: the rendering
/// needs Envoy's descriptors, which a sidecar does not keep loaded.
#[derive(Debug)]
pub struct Bootstrap {
    pub opts: Options,
    pub node: Node,
    pub at: SystemTime,
}

impl Bootstrap {
    /// The node as Envoy's admin prints it (`/server_info`, the bootstrap).
    pub fn node_json(&self) -> Value {
        let n = &self.node;
        json!({
            "id": n.id,
            "cluster": n.cluster,
            "metadata": n.metadata.as_ref().map_or(json!({}), struct_json),
        })
    }

    /// Envoy's `BootstrapConfigDump`.
    pub fn config_dump(&self) -> Value {
        config_dump(&self.opts, self.node_json(), self.at)
    }
}

/// protobuf's JSON of a `google.protobuf.Struct`.
pub(crate) fn struct_json(s: &Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

/// protobuf's JSON of a `google.protobuf.Value`.
fn value_json(v: &PbValue) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::StructValue(s)) => struct_json(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_json).collect()),
    }
}

/// Envoy's `BootstrapConfigDump` of a proxy started with `opts`, presenting `node`.
fn config_dump(opts: &Options, node: Value, at: SystemTime) -> Value {
    let ports = &opts.ports;
    let mut clusters = vec![
        static_cluster("prometheus_stats", "STATIC", "127.0.0.1", ports.admin),
        static_cluster("agent", "STATIC", "127.0.0.1", ports.agent),
    ];
    clusters.extend(xds_cluster(opts));
    let ads = json!({ "ads": {}, "resource_api_version": "V3" });
    let bootstrap = json!({
        "node": node,
        "static_resources": {
            "listeners": [
                static_listener(opts.bind, ports.prometheus, "stats", "/stats/prometheus", "prometheus_stats"),
                static_listener(opts.bind, ports.health, "agent", "/healthz/ready", "agent"),
            ],
            "clusters": clusters,
        },
        "dynamic_resources": {
            "lds_config": ads,
            "cds_config": ads,
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": XDS_CLUSTER } }],
            },
        },
        "admin": { "address": socket("127.0.0.1", ports.admin) },
        "stats_config": opts.stats_inclusions.stats_config(),
    });
    // Envoy's own rendering of it: what a field of the wrong name or shape would not survive.
    let bootstrap =
        isthmus_xds::json::normalize(BOOTSTRAP, bootstrap.clone()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the bootstrap dump is not Envoy's shape");
            bootstrap
        });
    json!({
        "@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
        "bootstrap": bootstrap,
        "last_updated": crate::admin::rfc3339(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_is_envoys_shape_and_names_what_the_proxy_serves() {
        let opts = Options {
            discovery_address: "10.9.0.1:15012".into(),
            root_cert: Some("/var/run/roots.pem".into()),
            discovery_san: "istiod.istio-system.svc".into(),
            token_path: "/var/run/token".into(),
            pod_name: "a".into(),
            namespace: "b".into(),
            ips: vec![],
            service_account: "default".into(),
            cluster_id: "Kubernetes".into(),
            trust_domain: "cluster.local".into(),
            domain: "cluster.local".into(),
            labels: Default::default(),
            tproxy: false,
            ports: crate::agent::Ports::default(),
            bind: "0.0.0.0".parse().unwrap(),
            drain_duration: std::time::Duration::from_secs(5),
            cert_ttl: std::time::Duration::from_secs(3600),
            app_metrics: None,
            proxy_config: None,
            stats_inclusions: Default::default(),
            dns_capture: false,
            resolv_conf: "/etc/resolv.conf".into(),
            metadata: Default::default(),
        };
        let text = |s: &str| PbValue {
            kind: Some(Kind::StringValue(s.into())),
        };
        let labels = Struct {
            fields: [("app".to_string(), text("a"))].into_iter().collect(),
        };
        let node = Node {
            id: "sidecar~10.1.0.5~a.b~b.svc.cluster.local".into(),
            metadata: Some(Struct {
                fields: [(
                    "LABELS".to_string(),
                    PbValue {
                        kind: Some(Kind::StructValue(labels)),
                    },
                )]
                .into_iter()
                .collect(),
            }),
            ..Default::default()
        };
        let bootstrap = Bootstrap {
            opts,
            node,
            at: SystemTime::UNIX_EPOCH,
        };
        // Every field survives Envoy's schema: none is misnamed.
        let dump = bootstrap.config_dump();
        let raw = isthmus_xds::json::normalize(BOOTSTRAP, dump["bootstrap"].clone());
        assert!(raw.is_ok(), "{raw:?}");
        let b = &dump["bootstrap"];
        assert_eq!(b["node"]["id"], "sidecar~10.1.0.5~a.b~b.svc.cluster.local");
        assert_eq!(b["node"]["metadata"]["LABELS"]["app"], "a");
        let clusters = b["static_resources"]["clusters"].as_array().unwrap();
        let xds = clusters.iter().find(|c| c["name"] == XDS_CLUSTER).unwrap();
        assert_eq!(
            xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"],
            json!({"address": "10.9.0.1", "port_value": 15012})
        );
        assert_eq!(
            xds["transport_socket"]["typed_config"]["sni"],
            "istiod.istio-system.svc"
        );
        let listeners: Vec<&str> = b["static_resources"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["name"].as_str())
            .collect();
        assert_eq!(listeners, ["0.0.0.0_15090", "0.0.0.0_15021"]);
        let patterns = &b["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"];
        assert!(
            patterns
                .as_array()
                .unwrap()
                .contains(&json!({"prefix": "cluster.xds-grpc"})),
            "{patterns}"
        );
        assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 15000);
        assert_eq!(dump["last_updated"], "1970-01-01T00:00:00Z");
    }
}
