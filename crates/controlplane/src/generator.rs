//! Pilot as an xDS generator: the Envoy node becomes a [`Proxy`], the current push context
//! answers for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Any, Struct, value};
use envoy_types::util::pack_any;
use isthmus_pilot::{NodeMetadata, Proxy, PushContext};
use isthmus_xds::Generator;
use isthmus_xds::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// The push context being served, swapped whole on every accepted change.
pub type Shared = Arc<RwLock<Arc<PushContext>>>;

pub struct PilotGenerator {
    pub context: Shared,
}

impl PilotGenerator {
    pub fn current(&self) -> Arc<PushContext> {
        self.context
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Generator for PilotGenerator {
    fn generate(
        &self,
        node: &Node,
        type_url: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Any>, String> {
        let proxy = proxy_of(node)?;
        let ctx = self.current();
        Ok(match type_url {
            CLUSTER => isthmus_pilot::cluster::clusters(&ctx, &proxy)
                .into_iter()
                .map(|c| (c.name.clone(), pack_any(c)))
                .collect(),
            ENDPOINT => {
                let names: Vec<String> = names.iter().cloned().collect();
                isthmus_pilot::endpoint::endpoints(&ctx, &proxy, &names)
                    .into_iter()
                    .map(|e| (e.cluster_name.clone(), pack_any(e)))
                    .collect()
            }
            LISTENER => isthmus_pilot::listener::listeners(&ctx, &proxy)
                .into_iter()
                .map(|l| (l.name.clone(), pack_any(l)))
                .collect(),
            ROUTE => {
                let names: Vec<String> = names.iter().cloned().collect();
                isthmus_pilot::route::routes(&ctx, &proxy, &names)
                    .into_iter()
                    .map(|r| (r.name.clone(), pack_any(r)))
                    .collect()
            }
            // Secrets come with the proxy's SDS.
            _ => BTreeMap::new(),
        })
    }
}

/// The proxy behind an Envoy node (Istio's node id and `ISTIO_META_*` metadata).
pub fn proxy_of(node: &Node) -> Result<Proxy, String> {
    Proxy::from_node(&node.id, &metadata(node.metadata.as_ref())).map_err(|e| e.to_string())
}

fn metadata(md: Option<&Struct>) -> NodeMetadata {
    let Some(md) = md else {
        return NodeMetadata::default();
    };
    let string = |k: &str| match md.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    };
    let labels = match md.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(value::Kind::StructValue(s)) => s
            .fields
            .iter()
            .filter_map(|(k, v)| match &v.kind {
                Some(value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    NodeMetadata {
        namespace: string("NAMESPACE"),
        labels,
        instance_ips: string("INSTANCE_IPS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect(),
        service_account: string("SERVICE_ACCOUNT"),
        cluster_id: string("CLUSTER_ID"),
        interception_mode: string("INTERCEPTION_MODE"),
        istio_version: string("ISTIO_VERSION"),
        name: string("NAME"),
    }
}
