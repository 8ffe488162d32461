//! EDS: one ClusterLoadAssignment per EDS cluster, endpoints grouped by locality, with weight,
//! health, the `tlsMode` metadata auto mTLS matches on, and Istio's `istio.workload` metadata
//! by which a client's telemetry names an endpoint's workload without asking it.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{HealthStatus, Locality as EnvoyLocality, Metadata};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use isthmus_registry::{Address, Locality, Port, Service, TargetPort, Workload};

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
    /// The proxy's locality, when localities are prioritized for it (locality failover).
    failover_from: Option<Locality>,
    /// The registry's workloads, which endpoints refer to.
    workloads: &'a [Workload],
}

impl Assignment<'_> {
    pub fn build(&self) -> ClusterLoadAssignment {
        let mut a = load_assignment(self.svc, self.port, self.subset, &self.name, self.workloads);
        if let Some(from) = &self.failover_from {
            for l in &mut a.endpoints {
                l.priority = failover_priority(from, l.locality.as_ref());
            }
        }
        a
    }

    /// A hash of everything [`Assignment::build`] reads: equal keys build equal assignments,
    /// so a generator can keep what it built for a key across push contexts (hashing with the
    /// same `state` each time).
    pub fn key(&self, state: &impl std::hash::BuildHasher) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = state.build_hasher();
        self.name.hash(&mut h);
        self.failover_from.hash(&mut h);
        for e in selected(self.svc, self.port, self.subset) {
            (
                &e.address,
                e.port,
                &e.locality,
                e.weight,
                e.healthy,
                e.sidecar,
                telemetry(e, self.workloads),
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
            failover_from: locality_failover(ctx, o.policy)
                .then(|| ctx.proxy_locality(proxy))
                .flatten(),
            workloads: &ctx.registry.workloads,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether endpoints are prioritized by locality for a cluster, as Istio does: when its
/// DestinationRule has outlier detection (which takes a failing locality out) and locality load
/// balancing is not turned off (DestinationRule, then MeshConfig; on by default).
fn locality_failover(
    ctx: &PushContext,
    policy: Option<&isthmus_config::istio::networking::TrafficPolicy>,
) -> bool {
    let Some(p) = policy.filter(|p| p.outlier_detection.is_some()) else {
        return false;
    };
    let enabled = p
        .load_balancer
        .as_ref()
        .and_then(|l| l.locality_lb_setting.as_ref())
        .or(ctx.mesh.locality_lb_setting.as_ref())
        .and_then(|s| s.enabled);
    enabled != Some(false)
}

/// Istio's failover priority of an endpoint locality seen from `from`: 0 when region, zone and
/// subzone match, 1 for region and zone, 2 for region, 3 otherwise.
fn failover_priority(from: &Locality, to: Option<&EnvoyLocality>) -> u32 {
    let Some(to) = to else { return 3 };
    if from.region != to.region {
        3
    } else if from.zone != to.zone {
        2
    } else if from.subzone != to.sub_zone {
        1
    } else {
        0
    }
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

/// What Istio's `istio.workload` endpoint metadata says of an endpoint that is one of
/// `workloads`: its workload name, namespace, canonical service and canonical revision.
fn telemetry<'a>(
    e: &isthmus_registry::Endpoint,
    workloads: &'a [Workload],
) -> Option<[&'a str; 4]> {
    let w = workloads.get(e.workload?)?;
    let name = w.workload_name();
    Some([
        name,
        &w.namespace,
        isthmus_registry::canonical_service(&w.labels).unwrap_or(name),
        isthmus_registry::canonical_revision(&w.labels).unwrap_or("latest"),
    ])
}

/// The cluster every workload of this control plane's registry is in (Istio's default id).
const CLUSTER_ID: &str = "Kubernetes";

/// The assignment of one cluster: the service's endpoints for `port`, filtered by subset labels.
/// What it reads of each endpoint is what [`Assignment::key`] hashes.
pub fn load_assignment(
    svc: &Service,
    port: u16,
    subset: Option<&BTreeMap<String, String>>,
    cluster_name: &str,
    workloads: &[Workload],
) -> ClusterLoadAssignment {
    let mut by_locality: BTreeMap<(String, String, String), Vec<LbEndpoint>> = BTreeMap::new();
    for e in selected(svc, port, subset) {
        let addr = match &e.address {
            Address::Ip(ip) => ip.to_string(),
            Address::Dns(h) => h.clone(),
        };
        let tls = e.sidecar.then(|| {
            (
                "envoy.transport_socket_match".to_string(),
                strukt([(TLS_MODE_KEY, string("istio"))]),
            )
        });
        // `<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>`
        let workload = telemetry(e, workloads).map(|parts| {
            let label = format!("{};{CLUSTER_ID}", parts.join(";"));
            ("istio".to_string(), strukt([("workload", string(&label))]))
        });
        let md = Metadata {
            filter_metadata: crate::maps::map_of(tls.into_iter().chain(workload)),
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
