//! Telemetry resources (`telemetry.istio.io`) as they apply to a proxy: the root namespace's,
//! then its namespace's, then the one selecting its workload, each overriding what it sets, per
//! side of a request (`match.mode`). [`crate::trace`] and [`crate::access_log`] read them.

use isthmus_config::istio::telemetry::TelemetrySpec;
use serde_json::Value;

use crate::context::{PushContext, selector_matches};
use crate::proxy::Proxy;

/// Which side of a request a listener is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Outbound listeners: the caller.
    Client,
    /// Inbound: the called workload.
    Server,
}

/// The Telemetry resources that apply to `proxy`, root namespace first, then its namespace's
/// selector-less one, then the oldest one selecting it.
pub fn applicable<'a>(ctx: &'a PushContext, proxy: &'a Proxy) -> Vec<&'a TelemetrySpec> {
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
    out.into_iter().map(|t| &t.object.spec).collect()
}

/// Whether an entry with this `match` (`mode`: CLIENT, SERVER, CLIENT_AND_SERVER, the default)
/// applies to `side`.
pub fn applies(match_: Option<&Value>, side: Side) -> bool {
    let mode = match_
        .and_then(|m| m.get("mode"))
        .and_then(Value::as_str)
        .unwrap_or("CLIENT_AND_SERVER");
    match side {
        Side::Client => mode != "SERVER",
        Side::Server => mode != "CLIENT",
    }
}
