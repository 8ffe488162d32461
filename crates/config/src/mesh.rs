//! MeshConfig (`istio.mesh.v1alpha1`): mesh-wide settings, read from `--meshConfigFile` or from
//! the `istio` ConfigMap's `mesh` key, as istiod does.
//!
//! The settings isthmus acts on are typed; the long tail of MeshConfig is kept as JSON so that a
//! file written for Istio loads without complaint and round-trips.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::istio::common::Duration;
use crate::istio::networking::{LocalityLbSetting, TcpKeepalive};

/// Istio's defaults for fields whose absence means "the default".
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
pub const DEFAULT_INGRESS_SERVICE: &str = "istio-ingressgateway";
pub const DEFAULT_INGRESS_SELECTOR: &str = "ingressgateway";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_listen_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_inbound_listen_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_http_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_detection_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ingress_class: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ingress_service: String,
    /// UNSPECIFIED, OFF, DEFAULT, STRICT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress_controller_mode: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ingress_selector: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_tracing: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub access_log_file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub access_log_format: String,
    /// TEXT or JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log_encoding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_envoy_access_log_service: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_envoy_listener_log: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_config: Option<ProxyConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<TrafficPolicyMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_traffic_policy: Option<TrafficPolicyMode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub config_sources: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_auto_mtls: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trust_domain: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domain_aliases: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default_service_export_to: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default_virtual_service_export_to: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub default_destination_rule_export_to: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub root_namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_refresh_rate: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h2_upgrade_policy: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub inbound_cluster_stat_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub outbound_cluster_stat_name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_settings: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_prometheus_merge: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_certificate_at_client: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_providers: Option<DefaultProviders>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discovery_selectors: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_normalization: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_http_retry_policy: Option<Value>,
    #[serde(rename = "meshMTLS", skip_serializing_if = "Option::is_none")]
    pub mesh_mtls: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_defaults: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_scope_configs: Vec<Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sds_uds_path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicyMode {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// An extension provider: a name and one provider kind (`zipkin`, `envoyFileAccessLog`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExtensionProvider {
    pub name: String,
    #[serde(flatten)]
    pub provider: BTreeMap<String, Value>,
}

impl ExtensionProvider {
    /// The provider kind (`zipkin`, `lightstep`, `envoyFileAccessLog`, ...), if one is set.
    pub fn kind(&self) -> Option<&str> {
        self.provider.keys().next().map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DefaultProviders {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<String>,
}

/// ProxyConfig (`meshConfig.defaultConfig` and the `proxy.istio.io/config` annotation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyConfig {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub config_path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub binary_path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub service_cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_duration: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_shutdown_duration: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_drain_duration: Option<Duration>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub discovery_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discovery_refresh_delay: Option<Duration>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zipkin_address: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub statsd_udp_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_admin_port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane_auth_policy: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub custom_config_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stat_name_length: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<i32>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub proxy_bootstrap_template_path: String,
    /// REDIRECT, TPROXY, NONE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interception_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sds: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_access_log_service: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_metrics_service: Option<Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy_metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_port: Option<i32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_stat_tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_topology: Option<Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub mesh_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_stats_matcher: Option<ProxyStatsMatcher>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_application_until_proxy_starts: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates_pem: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ProxyImage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_provider: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_headers: Option<ProxyHeaders>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_flush_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_flush_min_size_kb: Option<u32>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tracing_service_name: String,
}

/// ProxyConfig `proxyStatsMatcher`: Envoy stats exported beyond Istio's own list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyStatsMatcher {
    pub inclusion_prefixes: Vec<String>,
    pub inclusion_suffixes: Vec<String>,
    pub inclusion_regexps: Vec<String>,
}

/// ProxyConfig `proxyHeaders`: which headers the proxies add or pass on. Fields this mesh does
/// not act on are accepted and ignored, as an older Istio ignores newer ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyHeaders {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded_client_cert: Option<ForwardClientCert>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_current_client_cert_details: Option<ClientCertDetails>,
    /// The `server` response header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerHeader>,
    /// `x-request-id`, added where missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Disabled>,
    /// `x-envoy-attempt-count` on requests to the upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_count: Option<Disabled>,
    /// `x-envoy-upstream-service-time`, `x-envoy-expected-rq-timeout-ms` and the like.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envoy_debug_headers: Option<Disabled>,
    /// Where the peer metadata headers (`x-envoy-peer-metadata`) go.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata_exchange_headers: Option<MetadataExchangeHeaders>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MetadataExchangeHeaders {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<MetadataExchangeMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MetadataExchangeMode {
    /// Istio's default: to every upstream.
    Undefined,
    /// Not to services outside the mesh (`MESH_EXTERNAL` ServiceEntries, passthrough).
    InMesh,
}

/// How `x-forwarded-client-cert` is handled (Envoy's `forward_client_cert_details`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ForwardClientCert {
    /// Istio's default for the mesh: APPEND_FORWARD.
    Undefined,
    Sanitize,
    ForwardOnly,
    AppendForward,
    SanitizeSet,
    AlwaysForwardOnly,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerHeader {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Disabled {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
}

impl Disabled {
    /// Whether an optional setting turns the header off.
    pub fn is_set(d: &Option<Disabled>) -> bool {
        d.as_ref().and_then(|d| d.disabled) == Some(true)
    }
}

/// Which parts of the client certificate go into `x-forwarded-client-cert` (`cert` and
/// `chain` are not among them here: the proxy sends names, not certificates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientCertDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyImage {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub image_type: String,
}

impl MeshConfig {
    pub fn trust_domain(&self) -> &str {
        non_empty(&self.trust_domain).unwrap_or(DEFAULT_TRUST_DOMAIN)
    }
    pub fn root_namespace(&self) -> &str {
        non_empty(&self.root_namespace).unwrap_or(DEFAULT_ROOT_NAMESPACE)
    }
    pub fn ingress_service(&self) -> &str {
        non_empty(&self.ingress_service).unwrap_or(DEFAULT_INGRESS_SERVICE)
    }
    pub fn ingress_selector(&self) -> &str {
        non_empty(&self.ingress_selector).unwrap_or(DEFAULT_INGRESS_SELECTOR)
    }
    /// ALLOW_ANY unless REGISTRY_ONLY is set (Istio's default).
    pub fn outbound_allow_any(&self) -> bool {
        self.outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode.as_deref())
            != Some("REGISTRY_ONLY")
    }
    /// True when inbound traffic goes to localhost (pre-1.10 behaviour), false for PASSTHROUGH.
    pub fn inbound_localhost(&self) -> bool {
        self.inbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode.as_deref())
            == Some("LOCALHOST")
    }
    /// HTTP/1.1 between sidecars is upgraded to HTTP/2 only when set to UPGRADE (Istio's
    /// default is DO_NOT_UPGRADE).
    pub fn h2_upgrade(&self) -> bool {
        self.h2_upgrade_policy.as_deref() == Some("UPGRADE")
    }
    /// Auto mTLS is on unless explicitly disabled.
    pub fn auto_mtls(&self) -> bool {
        self.enable_auto_mtls != Some(false)
    }
    pub fn default_config(&self) -> ProxyConfig {
        self.default_config.clone().unwrap_or_default()
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// MeshNetworks (`istio.mesh.v1alpha1.MeshNetworks`), the multi-network topology.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshNetworks {
    pub networks: BTreeMap<String, Network>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Network {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<NetworkEndpoints>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<NetworkGateway>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkEndpoints {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub from_cidr: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub from_registry: String,
}

/// Istio's own test data writes `registry_service_name` in snake case; protobuf JSON accepts both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkGateway {
    #[serde(
        alias = "registry_service_name",
        skip_serializing_if = "String::is_empty"
    )]
    pub registry_service_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub address: String,
    pub port: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locality: String,
}
