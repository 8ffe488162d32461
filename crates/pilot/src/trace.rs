//! Tracing: the `tracing` of a sidecar's HTTP connection managers, from Telemetry resources and
//! MeshConfig as istiod resolves them.
//!
//! Telemetry `tracing` applies from the root namespace, then the proxy's namespace, then one
//! selecting its workload, each overriding what it sets, per side (`match.mode`: outbound
//! listeners are the client side, inbound the server side); MeshConfig
//! `defaultProviders.tracing` names the provider when none does. The provider is a Zipkin
//! extension provider, sent to its service's outbound cluster. Without Telemetry or default
//! providers, Istio's older settings apply: `enableTracing` with
//! `defaultConfig.tracing.zipkin.address` (which istiod leaves to the proxy's bootstrap and
//! isthmus puts in the connection manager, to the same effect).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as PbHeaderValue, HeaderValueOption as PbHeaderValueOption,
};
use envoy_types::pb::envoy::config::trace::v3::{
    OpenTelemetryConfig, ZipkinConfig, tracing as pb_tracing, zipkin_config,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag, custom_tag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use serde_json::Value;

use crate::context::PushContext;
use crate::names::outbound_cluster;
use crate::proxy::Proxy;
use crate::telemetry::Side;

/// Istio's `PILOT_TRACE_SAMPLING` default: 1% of new traces.
const DEFAULT_SAMPLING: f64 = 1.0;
const ZIPKIN: &str = "envoy.tracers.zipkin";
const OPENTELEMETRY: &str = "envoy.tracers.opentelemetry";

/// What Telemetry resources say for one side, merged from root namespace to workload.
#[derive(Debug, Default, Clone)]
struct Spec {
    provider: Option<String>,
    sampling: Option<f64>,
    disabled: bool,
    custom_tags: BTreeMap<String, Value>,
    istio_tags: Option<bool>,
}

/// The merged Telemetry spec of one side; None when no Telemetry (nor the mesh's default
/// providers) names a provider.
fn telemetry_spec(ctx: &PushContext, proxy: &Proxy, side: Side) -> Option<Spec> {
    let mut spec = Spec {
        provider: ctx
            .mesh
            .default_providers
            .as_ref()
            .and_then(|d| d.tracing.first().cloned()),
        ..Default::default()
    };
    for t in crate::telemetry::applicable(ctx, proxy) {
        for tr in &t.tracing {
            if !crate::telemetry::applies(tr.match_.as_ref(), side) {
                continue;
            }
            if let Some(p) = tr.providers.first() {
                spec.provider = Some(p.name.clone());
            }
            if let Some(s) = tr.random_sampling_percentage {
                spec.sampling = Some(s);
            }
            if let Some(d) = tr.disable_span_reporting {
                spec.disabled = d;
            }
            if let Some(e) = tr.enable_istio_tags {
                spec.istio_tags = Some(e);
            }
            spec.custom_tags
                .extend(tr.custom_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    spec.provider.is_some().then_some(spec)
}

/// ProxyConfig `tracing`, Istio's older tracing settings: the pod's own (its
/// `proxy.istio.io/config`, which the injector merges with the mesh's), else the mesh's
/// `defaultConfig.tracing`.
fn legacy<'a>(ctx: &'a PushContext, proxy: &'a Proxy) -> Option<&'a Value> {
    if let Some(own) = &proxy.tracing {
        return Some(own);
    }
    ctx.mesh
        .default_config
        .as_ref()
        .and_then(|c| c.tracing.as_ref())
}

/// `defaultConfig.tracing.sampling`, else Istio's default; values above 100 mean 1, as in
/// istiod.
fn legacy_sampling(ctx: &PushContext, proxy: &Proxy) -> f64 {
    match legacy(ctx, proxy)
        .and_then(|t| t.get("sampling"))
        .and_then(Value::as_f64)
    {
        Some(s) if s > 100.0 => 1.0,
        Some(s) if s != 0.0 => s,
        _ => DEFAULT_SAMPLING,
    }
}

/// A tracing extension provider this control plane configures.
enum Provider {
    Zipkin {
        path: String,
        trace_id_128bit: bool,
        /// `traceContextOption: USE_B3_WITH_W3C_PROPAGATION`.
        w3c: bool,
    },
    /// OTLP over gRPC, or over HTTP when `http` is set.
    OpenTelemetry {
        http: Option<OtlpHttp>,
        grpc_timeout: Option<PbDuration>,
        grpc_metadata: Vec<PbHeaderValue>,
    },
}

struct OtlpHttp {
    path: String,
    timeout: Option<PbDuration>,
    headers: Vec<PbHeaderValue>,
}

/// A provider and the collector service it sends to.
struct Collector {
    service: String,
    port: u16,
    max_tag_length: Option<u32>,
    provider: Provider,
}

fn u32_of(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .and_then(|l| u32::try_from(l).ok())
        .filter(|l| *l != 0)
}

/// A MeshConfig `Duration` (`"5s"`, `"0.5s"`).
fn duration_of(v: Option<&Value>) -> Option<PbDuration> {
    let secs: f64 = v?.as_str()?.strip_suffix('s')?.parse().ok()?;
    Some(crate::cluster::duration(
        std::time::Duration::try_from_secs_f64(secs).ok()?,
    ))
}

/// Extension provider headers: `{name, value}` or `{name, envName}` (read where the control
/// plane runs, as istiod does).
fn headers_of(v: Option<&Value>) -> Vec<PbHeaderValue> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|h| {
            let key = h.get("name")?.as_str()?.to_string();
            let value = match h.get("value").and_then(Value::as_str) {
                Some(v) => v.to_string(),
                None => std::env::var(h.get("envName")?.as_str()?).unwrap_or_default(),
            };
            Some(PbHeaderValue {
                key,
                value,
                ..Default::default()
            })
        })
        .collect()
}

fn provider(ctx: &PushContext, name: &str) -> Option<Collector> {
    let p = ctx
        .mesh
        .extension_providers
        .iter()
        .find(|p| p.name == name)?;
    let (kind, c) = (p.kind()?, p.provider.values().next()?);
    let provider = match kind {
        "zipkin" => Provider::Zipkin {
            path: c
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("/api/v2/spans")
                .to_string(),
            trace_id_128bit: !c
                .get("enable64bitTraceId")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            w3c: c.get("traceContextOption").and_then(Value::as_str)
                == Some("USE_B3_WITH_W3C_PROPAGATION"),
        },
        "opentelemetry" => {
            let grpc = c.get("grpc");
            Provider::OpenTelemetry {
                http: c.get("http").map(|h| OtlpHttp {
                    path: h
                        .get("path")
                        .and_then(Value::as_str)
                        .unwrap_or("/v1/traces")
                        .to_string(),
                    timeout: duration_of(h.get("timeout")),
                    headers: headers_of(h.get("headers")),
                }),
                grpc_timeout: duration_of(grpc.and_then(|g| g.get("timeout"))),
                grpc_metadata: headers_of(grpc.and_then(|g| g.get("initialMetadata"))),
            }
        }
        other => {
            tracing::warn!(
                provider = name,
                kind = other,
                "tracing provider kind is not supported; not traced"
            );
            return None;
        }
    };
    Some(Collector {
        service: c.get("service")?.as_str()?.to_string(),
        port: u16::try_from(c.get("port")?.as_u64()?).ok()?,
        max_tag_length: u32_of(c.get("maxTagLength")),
        provider,
    })
}

/// `defaultConfig.tracing.zipkin.address` (`host:port`) as a collector.
fn legacy_zipkin(ctx: &PushContext, proxy: &Proxy) -> Option<Collector> {
    let address = legacy(ctx, proxy)?
        .get("zipkin")?
        .get("address")?
        .as_str()?;
    let (host, port) = address.rsplit_once(':')?;
    Some(Collector {
        service: host.to_string(),
        port: port.parse().ok()?,
        max_tag_length: None,
        provider: Provider::Zipkin {
            path: "/api/v2/spans".into(),
            trace_id_128bit: true,
            w3c: false,
        },
    })
}

/// The tracer's configuration, sent to the collector service's outbound cluster; None (with
/// a warning) when the service is not in the registry, as istiod leaves such a proxy untraced.
fn tracer(ctx: &PushContext, proxy: &Proxy, c: Collector) -> Option<pb_tracing::Http> {
    use envoy_types::pb::envoy::config::core::v3::{
        GrpcService, HttpService, HttpUri, grpc_service, http_uri,
    };
    let name = c
        .service
        .rsplit_once('/')
        .map_or(c.service.as_str(), |(_, h)| h);
    let Some(svc) = ctx.registry.resolve(name, ctx.root_namespace()) else {
        tracing::warn!(service = %c.service, "tracing collector service not found; not traced");
        return None;
    };
    let cluster = outbound_cluster(c.port, "", &svc.hostname);
    let host = svc.hostname.clone();
    let (name, config) = match c.provider {
        Provider::Zipkin {
            path,
            trace_id_128bit,
            w3c,
        } => (
            ZIPKIN,
            pack_any(ZipkinConfig {
                collector_cluster: cluster,
                collector_endpoint: path,
                collector_hostname: host,
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                    as i32,
                trace_id_128bit,
                shared_span_context: Some(BoolValue { value: false }),
                trace_context_option: if w3c {
                    zipkin_config::TraceContextOption::UseB3WithW3cPropagation as i32
                } else {
                    zipkin_config::TraceContextOption::UseB3 as i32
                },
                ..Default::default()
            }),
        ),
        Provider::OpenTelemetry {
            http,
            grpc_timeout,
            grpc_metadata,
        } => {
            let mut config = OpenTelemetryConfig {
                // The span's service: the workload, as istiod names it by the node's cluster.
                service_name: format!("{}.{}", canonical_service(ctx, proxy), proxy.namespace),
                ..Default::default()
            };
            match http {
                Some(h) => {
                    config.http_service = Some(HttpService {
                        http_uri: Some(HttpUri {
                            uri: format!("{host}{}", h.path),
                            http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster(cluster)),
                            timeout: h.timeout,
                        }),
                        request_headers_to_add: h
                            .headers
                            .into_iter()
                            .map(|header| PbHeaderValueOption {
                                header: Some(header),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    });
                }
                None => {
                    config.grpc_service = Some(GrpcService {
                        timeout: grpc_timeout,
                        initial_metadata: grpc_metadata,
                        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                            grpc_service::EnvoyGrpc {
                                cluster_name: cluster,
                                authority: host,
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    });
                }
            }
            (OPENTELEMETRY, pack_any(config))
        }
    };
    Some(pb_tracing::Http {
        name: name.into(),
        config_type: Some(pb_tracing::http::ConfigType::TypedConfig(config)),
    })
}

/// The workload's canonical service, from its labels as Istio's injector derives it.
fn canonical_service(ctx: &PushContext, proxy: &Proxy) -> String {
    isthmus_registry::canonical_service(ctx.proxy_labels(proxy))
        .unwrap_or("unknown")
        .to_string()
}

/// Istio's tags on every span: the workload's canonical service and revision, mesh,
/// namespace and cluster.
fn istio_tags(ctx: &PushContext, proxy: &Proxy) -> Vec<CustomTag> {
    let mesh_id = ctx
        .mesh
        .default_config
        .as_ref()
        .map(|c| c.mesh_id.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| ctx.mesh.trust_domain().to_string());
    let or = |v: &str, d: &str| {
        if v.is_empty() {
            d.to_string()
        } else {
            v.to_string()
        }
    };
    [
        (
            "istio.canonical_revision",
            isthmus_registry::canonical_revision(ctx.proxy_labels(proxy))
                .unwrap_or("latest")
                .to_string(),
        ),
        ("istio.canonical_service", canonical_service(ctx, proxy)),
        ("istio.cluster_id", or(&proxy.cluster_id, "unknown")),
        ("istio.mesh_id", mesh_id),
        ("istio.namespace", or(&proxy.namespace, "default")),
    ]
    .into_iter()
    .map(|(tag, value)| CustomTag {
        tag: tag.into(),
        r#type: Some(custom_tag::Type::Literal(custom_tag::Literal { value })),
    })
    .collect()
}

/// A Telemetry or ProxyConfig custom tag (`literal`, `environment` or `header`).
fn custom(tag: &str, v: &Value) -> Option<CustomTag> {
    let s = |o: &Value, k: &str| {
        o.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let r#type = if let Some(l) = v.get("literal") {
        custom_tag::Type::Literal(custom_tag::Literal {
            value: s(l, "value"),
        })
    } else if let Some(e) = v.get("environment") {
        custom_tag::Type::Environment(custom_tag::Environment {
            name: s(e, "name"),
            default_value: s(e, "defaultValue"),
        })
    } else if let Some(h) = v.get("header") {
        custom_tag::Type::RequestHeader(custom_tag::Header {
            name: s(h, "name"),
            default_value: s(h, "defaultValue"),
        })
    } else {
        return None;
    };
    Some(CustomTag {
        tag: tag.into(),
        r#type: Some(r#type),
    })
}

/// The `tracing` of `proxy`'s connection managers on `side`; None when it is not traced.
pub fn hcm_tracing(ctx: &PushContext, proxy: &Proxy, side: Side) -> Option<Tracing> {
    let (tracer, sampling, tags, istio, max_path) = match telemetry_spec(ctx, proxy, side) {
        Some(spec) => {
            if spec.disabled {
                return None;
            }
            let c = provider(ctx, spec.provider.as_deref()?)?;
            let max_tag_length = c.max_tag_length;
            (
                tracer(ctx, proxy, c)?,
                spec.sampling.unwrap_or_else(|| legacy_sampling(ctx, proxy)),
                spec.custom_tags,
                spec.istio_tags.unwrap_or(true),
                max_tag_length,
            )
        }
        None => {
            if ctx.mesh.enable_tracing == Some(false) {
                return None;
            }
            let t = legacy(ctx, proxy)?;
            let tags = t
                .get("customTags")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            (
                tracer(ctx, proxy, legacy_zipkin(ctx, proxy)?)?,
                legacy_sampling(ctx, proxy),
                tags,
                t.get("enableIstioTags")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                u32_of(t.get("maxPathTagLength")),
            )
        }
    };
    let mut custom_tags = if istio {
        istio_tags(ctx, proxy)
    } else {
        Vec::new()
    };
    custom_tags.extend(tags.iter().filter_map(|(k, v)| custom(k, v)));
    custom_tags.sort_by(|a, b| a.tag.cmp(&b.tag));
    Some(Tracing {
        client_sampling: Some(Percent { value: 100.0 }),
        random_sampling: Some(Percent { value: sampling }),
        overall_sampling: Some(Percent { value: 100.0 }),
        custom_tags,
        provider: Some(tracer),
        max_path_tag_length: max_path.map(|value| UInt32Value { value }),
        ..Default::default()
    })
}
