//! The proxy's side of ADS (delta): subscribe to clusters and listeners, follow them to the
//! endpoints and route configurations they name, keep the latest of each, ACK what decodes and
//! NACK what does not (the previous good resource stays in force), and publish every accepted
//! state on a watch channel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::server::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Everything the proxy has accepted, by name.
#[derive(Debug, Clone, Default)]
pub struct XdsState {
    pub clusters: BTreeMap<String, Cluster>,
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    pub listeners: BTreeMap<String, Listener>,
    pub routes: BTreeMap<String, RouteConfiguration>,
    /// Last accepted system version per type.
    pub versions: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("ADS stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("ADS stream closed by the control plane")]
    Closed,
}

/// Runs one ADS session until the stream ends. `state` carries what was accepted across
/// sessions: the first response of each type in a session replaces that type wholesale, so a
/// reconnect keeps serving the old configuration until the new one has arrived. Every
/// accepted state is compiled by `compile`; a response whose state does not compile is NACKed
/// with the error as detail and leaves `state` as it was. Compiled states go to `out`.
pub async fn run<T, F>(
    channel: tonic::transport::Channel,
    node: Node,
    state: &mut XdsState,
    mut compile: F,
    out: &watch::Sender<Arc<T>>,
) -> Result<(), ClientError>
where
    F: FnMut(&XdsState) -> Result<T, String>,
{
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_RESPONSE_BYTES);
    let (tx, rx) = mpsc::channel(16);
    for type_url in [CLUSTER, LISTENER] {
        let _ = tx
            .send(DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.into(),
                ..Default::default()
            })
            .await;
    }
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut subscribed: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let mut fresh: BTreeSet<String> = BTreeSet::new();
    while let Some(resp) = responses.message().await? {
        let mut next = state.clone();
        let replace = fresh.insert(resp.type_url.clone());
        let outcome = apply(&mut next, &resp, replace).and_then(|follow| {
            let compiled = compile(&next)?;
            Ok((follow, compiled))
        });
        let (nack, follow) = match outcome {
            Ok((follow, compiled)) => {
                next.versions
                    .insert(resp.type_url.clone(), resp.system_version_info.clone());
                *state = next;
                out.send_replace(Arc::new(compiled));
                (None, follow)
            }
            Err(e) => {
                if replace {
                    fresh.remove(&resp.type_url);
                }
                tracing::warn!(type_url = %resp.type_url, error = %e, "rejecting xDS response");
                (Some(e), None)
            }
        };
        let _ = tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail: nack.map(|message| RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: vec![],
                }),
                ..Default::default()
            })
            .await;
        // Clusters name endpoints, listeners name routes: keep those subscriptions in step.
        if let Some((type_url, names)) = follow {
            let had = subscribed.entry(type_url).or_default();
            let subscribe: Vec<String> = names.difference(had).cloned().collect();
            let unsubscribe: Vec<String> = had.difference(&names).cloned().collect();
            if !subscribe.is_empty() || !unsubscribe.is_empty() {
                *had = names;
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: type_url.into(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    Err(ClientError::Closed)
}

/// Applies a response to the state, all or nothing. Returns the dependent subscription the
/// new state implies (EDS names after CDS, RDS names after LDS).
fn apply(
    state: &mut XdsState,
    resp: &DeltaDiscoveryResponse,
    replace: bool,
) -> Result<Option<(&'static str, BTreeSet<String>)>, String> {
    fn decode<T: Message + Default>(
        resp: &DeltaDiscoveryResponse,
    ) -> Result<Vec<(String, T)>, String> {
        resp.resources
            .iter()
            .map(|r| {
                let any = r
                    .resource
                    .as_ref()
                    .ok_or_else(|| format!("resource {:?} has no body", r.name))?;
                if any.type_url != resp.type_url {
                    return Err(format!(
                        "resource {:?} is a {}, not a {}",
                        r.name, any.type_url, resp.type_url
                    ));
                }
                T::decode(any.value.as_slice())
                    .map(|m| (r.name.clone(), m))
                    .map_err(|e| format!("resource {:?} does not decode: {e}", r.name))
            })
            .collect()
    }
    fn merge<T>(
        map: &mut BTreeMap<String, T>,
        new: Vec<(String, T)>,
        removed: &[String],
        replace: bool,
    ) {
        if replace {
            map.clear();
        }
        for n in removed {
            map.remove(n);
        }
        map.extend(new);
    }
    match resp.type_url.as_str() {
        CLUSTER => {
            let new = decode::<Cluster>(resp)?;
            merge(&mut state.clusters, new, &resp.removed_resources, replace);
            let eds = state
                .clusters
                .values()
                .filter_map(|c| {
                    c.eds_cluster_config.as_ref().map(|e| {
                        if e.service_name.is_empty() {
                            c.name.clone()
                        } else {
                            e.service_name.clone()
                        }
                    })
                })
                .collect();
            Ok(Some((ENDPOINT, eds)))
        }
        ENDPOINT => {
            let new = decode::<ClusterLoadAssignment>(resp)?;
            merge(&mut state.endpoints, new, &resp.removed_resources, replace);
            Ok(None)
        }
        LISTENER => {
            let new = decode::<Listener>(resp)?;
            merge(&mut state.listeners, new, &resp.removed_resources, replace);
            let rds = state.listeners.values().flat_map(route_names).collect();
            Ok(Some((ROUTE, rds)))
        }
        ROUTE => {
            let new = decode::<RouteConfiguration>(resp)?;
            merge(&mut state.routes, new, &resp.removed_resources, replace);
            Ok(None)
        }
        other => Err(format!("unexpected type {other}")),
    }
}

/// The RDS route configurations a listener's HTTP connection managers name.
pub fn route_names(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .flat_map(|c| c.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any))
                if any.type_url.ends_with(".HttpConnectionManager") =>
            {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}
