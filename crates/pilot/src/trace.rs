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

use envoy_types::pb::envoy::config::trace::v3::{ZipkinConfig, tracing as pb_tracing, zipkin_config};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;
use envoy_types::pb::envoy::r#type::tracing::v3::{CustomTag, custom_tag};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use isthmus_config::istio::telemetry::TelemetrySpec;
use serde_json::Value;

use crate::context::{PushContext, selector_matches};
use crate::names::outbound_cluster;
use crate::proxy::Proxy;

/// Istio's `PILOT_TRACE_SAMPLING` default: 1% of new traces.
const DEFAULT_SAMPLING: f64 = 1.0;
const ZIPKIN: &str = "envoy.tracers.zipkin";

/// Which side of a request a connection manager is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Outbound listeners: the caller's span.
    Client,
    /// Inbound: the called workload's span.
    Server,
}

/// What Telemetry resources say for one side, merged from root namespace to workload.
#[derive(Debug, Default, Clone)]
struct Spec {
    provider: Option<String>,
    sampling: Option<f64>,
    disabled: bool,
    custom_tags: BTreeMap<String, Value>,
    istio_tags: Option<bool>,
}

/// The Telemetry resources that apply to `proxy`, root namespace first, then its namespace's
/// selector-less one, then the oldest one selecting it.
fn telemetries<'a>(
    ctx: &'a PushContext,
    proxy: &'a Proxy,
) -> Vec<(&'a str, &'a str, &'a TelemetrySpec)> {
    let labels = ctx.proxy_labels(proxy);
    let all = &ctx.snapshot.telemetries;
    let root = ctx.root_namespace();
    let plain = |ns: &str| {
        all.iter()
            .find(|t| t.namespace() == ns && t.object.spec.selector.is_none())
    };
    let mut out = Vec::new();
    out.extend(plain(root));
    if proxy.namespace != root {
        out.extend(plain(&proxy.namespace));
    }
    out.extend(all.iter().find(|t| {
        t.namespace() == proxy.namespace
            && t.object
                .spec
                .selector
                .as_ref()
                .is_some_and(|s| selector_matches(&s.match_labels, labels))
    }));
    out.into_iter()
        .map(|t| (t.namespace(), t.name(), &t.object.spec))
        .collect()
}

/// The Telemetry resource selecting `proxy`'s workload, if any: proxies of one scope share it.
pub fn workload_telemetry(ctx: &PushContext, proxy: &Proxy) -> Option<(String, String)> {
    telemetries(ctx, proxy)
        .into_iter()
        .find(|(_, _, t)| t.selector.is_some())
        .map(|(ns, name, _)| (ns.to_string(), name.to_string()))
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
    for (_, _, t) in telemetries(ctx, proxy) {
        for tr in &t.tracing {
            let mode = tr
                .match_
                .as_ref()
                .and_then(|m| m.get("mode"))
                .and_then(Value::as_str)
                .unwrap_or("CLIENT_AND_SERVER");
            let applies = match side {
                Side::Client => mode != "SERVER",
                Side::Server => mode != "CLIENT",
            };
            if !applies {
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

/// `defaultConfig.tracing`, Istio's older tracing settings.
fn legacy(ctx: &PushContext) -> Option<&Value> {
    ctx.mesh
        .default_config
        .as_ref()
        .and_then(|c| c.tracing.as_ref())
}

/// `defaultConfig.tracing.sampling`, else Istio's default; values above 100 mean 1, as in
/// istiod.
fn legacy_sampling(ctx: &PushContext) -> f64 {
    match legacy(ctx)
        .and_then(|t| t.get("sampling"))
        .and_then(Value::as_f64)
    {
        Some(s) if s > 100.0 => 1.0,
        Some(s) if s != 0.0 => s,
        _ => DEFAULT_SAMPLING,
    }
}

/// A Zipkin collector: its service and port, and how spans are sent there.
struct Zipkin {
    service: String,
    port: u16,
    path: String,
    trace_id_128bit: bool,
    max_tag_length: Option<u32>,
}

fn zipkin_provider(ctx: &PushContext, name: &str) -> Option<Zipkin> {
    let p = ctx
        .mesh
        .extension_providers
        .iter()
        .find(|p| p.name == name)?;
    let Some(z) = p.provider.get("zipkin") else {
        tracing::warn!(provider = name, kind = ?p.kind(), "tracing provider is not zipkin; not traced");
        return None;
    };
    Some(Zipkin {
        service: z.get("service")?.as_str()?.to_string(),
        port: u16::try_from(z.get("port")?.as_u64()?).ok()?,
        path: z
            .get("path")
            .and_then(Value::as_str)
            .unwrap_or("/api/v2/spans")
            .to_string(),
        trace_id_128bit: !z
            .get("enable64bitTraceId")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_tag_length: z
            .get("maxTagLength")
            .and_then(Value::as_u64)
            .and_then(|l| u32::try_from(l).ok())
            .filter(|l| *l != 0),
    })
}

/// `defaultConfig.tracing.zipkin.address` (`host:port`) as a collector.
fn legacy_zipkin(ctx: &PushContext) -> Option<Zipkin> {
    let address = legacy(ctx)?.get("zipkin")?.get("address")?.as_str()?;
    let (host, port) = address.rsplit_once(':')?;
    Some(Zipkin {
        service: host.to_string(),
        port: port.parse().ok()?,
        path: "/api/v2/spans".into(),
        trace_id_128bit: true,
        max_tag_length: None,
    })
}

/// The tracer's configuration, sent to the collector service's outbound cluster; None (with
/// a warning) when the service is not in the registry, as istiod leaves such a proxy untraced.
fn zipkin_tracer(ctx: &PushContext, z: &Zipkin) -> Option<pb_tracing::Http> {
    let name = z
        .service
        .rsplit_once('/')
        .map_or(z.service.as_str(), |(_, h)| h);
    let Some(svc) = ctx.registry.resolve(name, ctx.root_namespace()) else {
        tracing::warn!(service = %z.service, "tracing collector service not found; not traced");
        return None;
    };
    Some(pb_tracing::Http {
        name: ZIPKIN.into(),
        config_type: Some(pb_tracing::http::ConfigType::TypedConfig(pack_any(
            ZipkinConfig {
                collector_cluster: outbound_cluster(z.port, "", &svc.hostname),
                collector_endpoint: z.path.clone(),
                collector_hostname: svc.hostname.clone(),
                collector_endpoint_version: zipkin_config::CollectorEndpointVersion::HttpJson
                    as i32,
                trace_id_128bit: z.trace_id_128bit,
                shared_span_context: Some(BoolValue { value: false }),
                ..Default::default()
            },
        ))),
    })
}

/// Istio's tags on every span: the workload's canonical service and revision, mesh,
/// namespace and cluster.
fn istio_tags(ctx: &PushContext, proxy: &Proxy) -> Vec<CustomTag> {
    let labels = ctx.proxy_labels(proxy);
    let first = |keys: &[&str], default: &str| {
        keys.iter()
            .find_map(|k| labels.get(*k))
            .map_or_else(|| default.to_string(), String::clone)
    };
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
            first(
                &[
                    "service.istio.io/canonical-revision",
                    "app.kubernetes.io/version",
                    "version",
                ],
                "latest",
            ),
        ),
        (
            "istio.canonical_service",
            first(
                &[
                    "service.istio.io/canonical-name",
                    "app.kubernetes.io/name",
                    "app",
                ],
                "unknown",
            ),
        ),
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
            let z = zipkin_provider(ctx, spec.provider.as_deref()?)?;
            (
                zipkin_tracer(ctx, &z)?,
                spec.sampling.unwrap_or_else(|| legacy_sampling(ctx)),
                spec.custom_tags,
                spec.istio_tags.unwrap_or(true),
                z.max_tag_length,
            )
        }
        None => {
            if ctx.mesh.enable_tracing == Some(false) {
                return None;
            }
            let t = legacy(ctx)?;
            let tags = t
                .get("customTags")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            (
                zipkin_tracer(ctx, &legacy_zipkin(ctx)?)?,
                legacy_sampling(ctx),
                tags,
                t.get("enableIstioTags")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                t.get("maxPathTagLength")
                    .and_then(Value::as_u64)
                    .and_then(|l| u32::try_from(l).ok())
                    .filter(|l| *l != 0),
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
