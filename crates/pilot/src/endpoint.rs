//! EDS: one ClusterLoadAssignment per EDS cluster, endpoints grouped by locality, with weight,
//! health and the `tlsMode` metadata auto mTLS matches on.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality as EnvoyLocality, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use isthmus_registry::{Address, Port, Service, TargetPort, Workload};

use crate::cluster::{Discovery, discovery, outbound_clusters};
use crate::cluster::{TLS_MODE_KEY, socket, string, strukt};
use crate::context::{PushContext, selector_matches};
use crate::proxy::Proxy;

/// The assignments for the requested EDS clusters (all of the proxy's when `names` is empty),
/// sorted by name.
pub fn endpoints(ctx: &PushContext, proxy: &Proxy, names: &[String]) -> Vec<ClusterLoadAssignment> {
    assignments(ctx, proxy)
        .iter()
        .filter(|a| names.is_empty() || names.contains(&a.name))
        .map(Assignment::build)
        .collect()
}

/// One EDS cluster of a proxy, before its assignment is built.
pub struct Assignment<'a> {
    pub name: String,
    svc: &'a Service,
    port: u16,
    subset: Option<&'a BTreeMap<String, String>>,
}

impl Assignment<'_> {
    pub fn build(&self) -> ClusterLoadAssignment {
        load_assignment(self.svc, self.port, self.subset, &self.name)
    }

    /// A hash of everything [`Assignment::build`] reads: equal keys build equal assignments,
    /// so a generator can keep what it built for a key across push contexts.
    pub fn key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.name.hash(&mut h);
        for e in selected(self.svc, self.port, self.subset) {
            (
                &e.address,
                e.port,
                &e.locality,
                e.weight,
                e.healthy,
                e.sidecar,
            )
                .hash(&mut h);
        }
        h.finish()
    }
}

/// The EDS clusters of `proxy`, sorted by name.
pub fn assignments<'a>(ctx: &'a PushContext, proxy: &Proxy) -> Vec<Assignment<'a>> {
    let mut out: Vec<Assignment<'a>> = outbound_clusters(ctx, proxy)
        .iter()
        .filter(|o| discovery(o.svc) == Discovery::Eds)
        .map(|o| Assignment {
            name: o.name(),
            svc: o.svc,
            port: o.port,
            subset: o.subset.map(|s| &s.labels),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The endpoints of `port` an assignment holds, in their order: the subset's, by address.
fn selected<'a>(
    svc: &'a Service,
    port: u16,
    subset: Option<&'a BTreeMap<String, String>>,
) -> Vec<&'a isthmus_registry::Endpoint> {
    let mut eps: Vec<_> = svc
        .endpoints_for(port)
        .filter(|e| subset.is_none_or(|sel| selector_matches(sel, &e.labels)))
        .collect();
    eps.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
    eps
}

/// The assignment of one cluster: the service's endpoints for `port`, filtered by subset labels.
/// What it reads of each endpoint is what [`Assignment::key`] hashes.
pub fn load_assignment(
    svc: &Service,
    port: u16,
    subset: Option<&BTreeMap<String, String>>,
    cluster_name: &str,
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(String, String, String), Vec<LbEndpoint>> = BTreeMap::new();
    for e in selected(svc, port, subset) {
        let addr = match &e.address {
            Address::Ip(ip) => ip.to_string(),
            Address::Dns(h) => h.clone(),
        };
        let md = Metadata {
            filter_metadata: crate::maps::map_of(e.sidecar.then(|| {
                (
                    "envoy.transport_socket_match".to_string(),
                    strukt([(TLS_MODE_KEY, string("istio"))]),
                )
            })),
            ..Default::default()
        };
        let lb = LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint {
                address: Some(socket(&addr, e.port)),
                ..Default::default()
            })),
            health_status: if e.healthy {
                HealthStatus::Healthy
            } else {
                HealthStatus::Unhealthy
            } as i32,
            load_balancing_weight: Some(UInt32Value {
                value: e.weight.max(1),
            }),
            metadata: Some(md),
        };
        by_locality
            .entry((
                e.locality.region.clone(),
                e.locality.zone.clone(),
                e.locality.subzone.clone(),
            ))
            .or_default()
            .push(lb);
    }
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(
                |((region, zone, sub_zone), lb_endpoints)| LocalityLbEndpoints {
                    locality: Some(EnvoyLocality {
                        region,
                        zone,
                        sub_zone,
                    }),
                    load_balancing_weight: Some(UInt32Value {
                        value: lb_endpoints
                            .iter()
                            .map(|e| e.load_balancing_weight.as_ref().map_or(1, |w| w.value))
                            .sum(),
                    }),
                    lb_endpoints,
                    ..Default::default()
                },
            )
            .collect(),
        ..Default::default()
    }
}

/// The container port a service port reaches on `workload` (named target ports resolved).
pub fn target_port(p: &Port, workload: &Workload) -> Option<u16> {
    match &p.target {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => workload.named_ports.get(name).copied(),
    }
}
