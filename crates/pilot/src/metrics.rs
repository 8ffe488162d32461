//! Istio's standard metrics of a sidecar's listeners, as istiod configures them: Telemetry
//! `metrics` (providers; overrides per metric and side that drop a metric or set and remove
//! its labels; `reportingInterval`, how often open TCP connections' bytes are counted)
//! applied from the root namespace to the workload over MeshConfig
//! `defaultProviders.metrics` (Istio's default: `prometheus`). Where metrics are reported, every
//! connection manager and TCP proxy gets Istio's stats filter (`istio.stats`), with a
//! `stats.PluginConfig` carrying the overrides.

use std::collections::BTreeMap;

use envoy_types::pb::google::protobuf::{Struct, Value};
use isthmus_config::istio::telemetry::MetricsOverrides;
use serde_json::json;

use crate::cluster::{boolean, list_value, string, struct_value, strukt};
use crate::context::PushContext;
use crate::proxy::Proxy;
use crate::telemetry::Side;

/// Istio's metric names (Telemetry `match.metric`) and the stats filter's names for them.
const METRICS: &[(&str, &str)] = &[
    ("REQUEST_COUNT", "requests_total"),
    ("REQUEST_DURATION", "request_duration_milliseconds"),
    ("REQUEST_SIZE", "request_bytes"),
    ("RESPONSE_SIZE", "response_bytes"),
    ("TCP_OPENED_CONNECTIONS", "tcp_connections_opened_total"),
    ("TCP_CLOSED_CONNECTIONS", "tcp_connections_closed_total"),
    ("TCP_SENT_BYTES", "tcp_sent_bytes_total"),
    ("TCP_RECEIVED_BYTES", "tcp_received_bytes_total"),
    ("GRPC_REQUEST_MESSAGES", "request_messages_total"),
    ("GRPC_RESPONSE_MESSAGES", "response_messages_total"),
];

/// What the overrides of one metric come to: dropped or not, labels set (Some: to a CEL
/// expression) or removed (None).
#[derive(Default)]
struct Override {
    disabled: Option<bool>,
    tags: BTreeMap<String, Option<String>>,
}

/// Whether the provider `name` is a Prometheus one: the built-in `prometheus` or an extension
/// provider of that kind. Other kinds (Stackdriver, ...) are not run by this mesh's proxies.
fn is_prometheus(ctx: &PushContext, name: &str) -> bool {
    match ctx.mesh.extension_providers.iter().find(|p| p.name == name) {
        Some(p) => p.kind() == Some("prometheus"),
        None => name == "prometheus",
    }
}

/// The configuration of the stats filter on `proxy`'s listeners of `side`, None where no
/// metrics are reported (no Prometheus provider, or every metric disabled).
pub fn stats_config(ctx: &PushContext, proxy: &Proxy, side: Side) -> Option<Struct> {
    let defaults = ctx
        .mesh
        .default_providers
        .as_ref()
        .map(|d| d.metrics.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| vec!["prometheus".to_string()]);
    let telemetries = crate::telemetry::applicable(ctx, proxy);
    let entries: Vec<_> = telemetries.iter().flat_map(|t| &t.metrics).collect();
    // The most specific entry naming providers decides which are in scope; an entry without
    // providers inherits the one before it.
    let names = |e: &isthmus_config::istio::telemetry::Metrics| -> Vec<String> {
        e.providers.iter().map(|p| p.name.clone()).collect()
    };
    let in_scope = entries
        .iter()
        .map(|e| names(e))
        .rfind(|n| !n.is_empty())
        .unwrap_or_else(|| defaults.clone());
    let prometheus = |n: &str| in_scope.iter().any(|s| s == n) && is_prometheus(ctx, n);
    if !in_scope.iter().any(|n| prometheus(n)) {
        for n in in_scope.iter().filter(|n| !is_prometheus(ctx, n)) {
            tracing::debug!(provider = %n, "metrics provider is not a Prometheus one; not run");
        }
        return None;
    }
    let mut overrides: BTreeMap<&str, Override> = BTreeMap::new();
    let mut all_disabled = false;
    let mut interval = None;
    let mut parent = defaults;
    for e in entries {
        let mut providers = names(e);
        if providers.is_empty() {
            providers.clone_from(&parent);
        }
        parent.clone_from(&providers);
        if !providers.iter().any(|n| prometheus(n)) {
            continue;
        }
        if let Some(d) = &e.reporting_interval {
            interval = Some(d.as_std()).filter(|d| !d.is_zero());
        }
        for o in &e.overrides {
            apply(o, side, &mut overrides, &mut all_disabled);
        }
    }
    if all_disabled {
        return None;
    }
    let metrics: Vec<Value> = overrides
        .iter()
        .map(|(name, o)| {
            let mut fields = vec![("name", string(name))];
            let dimensions: Vec<(&str, Value)> = o
                .tags
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), string(v.as_deref()?))))
                .collect();
            if !dimensions.is_empty() {
                fields.push(("dimensions", struct_value(strukt(dimensions))));
            }
            let removed: Vec<Value> = o
                .tags
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| string(k))
                .collect();
            if !removed.is_empty() {
                fields.push(("tags_to_remove", list_value(removed)));
            }
            if o.disabled == Some(true) {
                fields.push(("drop", boolean(true)));
            }
            struct_value(strukt(fields))
        })
        .collect();
    let mut config = Vec::new();
    // Istio's: only the client side names an unknown destination service by the Host header;
    // on the server side the caller chose it, and the inbound cluster names the service.
    if side == Side::Server {
        config.push(("disable_host_header_fallback", boolean(true)));
    }
    // How often a TCP connection's bytes are counted while it lasts.
    let interval = interval.map(|d| format!("{}s", d.as_secs_f64()));
    if let Some(d) = &interval {
        config.push(("tcp_reporting_duration", string(d)));
    }
    if !metrics.is_empty() {
        config.push(("metrics", list_value(metrics)));
    }
    Some(strukt(config))
}

/// One override, where it applies to `side`: Istio's order, later ones over earlier ones.
fn apply(
    o: &MetricsOverrides,
    side: Side,
    overrides: &mut BTreeMap<&'static str, Override>,
    all_disabled: &mut bool,
) {
    let m = o.match_.clone().unwrap_or_default();
    let mode = m.mode.as_deref().map(|mode| json!({ "mode": mode }));
    if !crate::telemetry::applies(mode.as_ref(), side) {
        return;
    }
    let all = m.custom_metric.is_none() && m.metric.as_deref().is_none_or(|x| x == "ALL_METRICS");
    // Disabling every metric drops the filter; a later override brings it back (a namespace
    // turning on what the root namespace turned off).
    if all && m.metric.is_some() && o.disabled == Some(true) {
        *all_disabled = true;
        return;
    }
    *all_disabled = false;
    let targets: Vec<&'static str> = if all {
        METRICS.iter().map(|(_, n)| *n).collect()
    } else if let Some(metric) = &m.metric {
        match METRICS.iter().find(|(k, _)| k == metric) {
            Some((_, n)) => vec![*n],
            None => return,
        }
    } else {
        // Custom metrics need definitions this mesh's proxies do not take.
        tracing::warn!(metric = ?m.custom_metric, "custom metrics are not supported; override ignored");
        return;
    };
    for name in targets {
        let entry = overrides.entry(name).or_default();
        if o.disabled.is_some() {
            entry.disabled = o.disabled;
        }
        for (tag, t) in &o.tag_overrides {
            let value = (!t.removes()).then(|| t.value.clone());
            entry.tags.insert(tag.clone(), value);
        }
    }
}
