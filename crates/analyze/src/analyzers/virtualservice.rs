//! VirtualService analyzers: conflicting mesh hosts, destination hosts and subsets, gateways,
//! and JWT claim routes.

use std::collections::{BTreeMap, HashMap, HashSet};

use isthmus_config::Kind;
use isthmus_config::istio::networking::Destination;
use isthmus_config::resource::VirtualService;

use crate::util::{
    self, ScopedFqdn, destination_host, hosts_match, names_for_namespace, short_or_full_name,
};
use crate::{Analyzer, Context};

/// A destination inside a VirtualService, with where it sits.
struct RouteDestination<'a> {
    mirror: bool,
    destination: &'a Destination,
}

fn route_destinations(vs: &VirtualService) -> Vec<RouteDestination<'_>> {
    let spec = &vs.spec;
    let mut out = Vec::new();
    for r in &spec.tcp {
        out.extend(r.route.iter().map(|d| RouteDestination {
            mirror: false,
            destination: &d.destination,
        }));
    }
    for r in &spec.tls {
        out.extend(r.route.iter().map(|d| RouteDestination {
            mirror: false,
            destination: &d.destination,
        }));
    }
    for r in &spec.http {
        out.extend(r.route.iter().map(|d| RouteDestination {
            mirror: false,
            destination: &d.destination,
        }));
    }
    out
}

fn mirror_destinations(vs: &VirtualService) -> Vec<RouteDestination<'_>> {
    let mut out = Vec::new();
    for r in &vs.spec.http {
        if let Some(m) = &r.mirror {
            out.push(RouteDestination {
                mirror: true,
                destination: m,
            });
        }
        out.extend(r.mirrors.iter().map(|m| RouteDestination {
            mirror: true,
            destination: &m.destination,
        }));
    }
    out
}

pub struct ConflictingMeshGatewayHostsAnalyzer;

impl Analyzer for ConflictingMeshGatewayHostsAnalyzer {
    fn name(&self) -> String {
        "virtualservice.ConflictingMeshGatewayHostsAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks if multiple virtual services associated with the mesh gateway have conflicting hosts".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut hosts: BTreeMap<ScopedFqdn, Vec<usize>> = BTreeMap::new();
        for (i, vs) in snap.virtual_services.iter().enumerate() {
            let spec = &vs.object.spec;
            let on_mesh =
                spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == util::MESH_GATEWAY);
            if !on_mesh {
                continue;
            }
            let scopes = util::export_scopes(&spec.export_to, vs.namespace());
            for scope in &scopes {
                for h in &spec.hosts {
                    hosts
                        .entry(ScopedFqdn::new(scope, vs.namespace(), h, ctx.domain))
                        .or_default()
                        .push(i);
                }
            }
        }
        let mut reported = HashSet::new();
        for (scoped, list) in &hosts {
            let mut list = list.clone();
            if scoped.scope != "*" {
                for (other, vss) in &hosts {
                    if other.scope == "*" && hosts_match(&scoped.fqdn, &other.fqdn) {
                        list.extend(vss);
                    }
                }
            }
            if list.len() < 2 {
                continue;
            }
            let names = list
                .iter()
                .map(|&i| {
                    let v = &snap.virtual_services[i];
                    format!("{}/{}", v.namespace(), v.name())
                })
                .collect::<Vec<_>>()
                .join(",");
            for &i in &list {
                if !reported.insert(i) {
                    continue;
                }
                let vs = &snap.virtual_services[i];
                ctx.report(
                    Kind::VirtualService,
                    vs,
                    "ConflictingMeshGatewayVirtualServiceHosts",
                    vec![names.clone().into(), scoped.to_string().into()],
                );
            }
        }
    }
}

pub struct DestinationHostAnalyzer;

impl Analyzer for DestinationHostAnalyzer {
    fn name(&self) -> String {
        "virtualservice.DestinationHostAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the destination hosts associated with each virtual service".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let services = util::service_entry_host_map(snap, ctx.domain);
        // Virtual services whose routes name a subset of one of their own hosts.
        let mut with_subsets: Vec<(String, Vec<&Destination>)> = Vec::new();
        for vs in &snap.virtual_services {
            let dests: Vec<&Destination> = vs
                .object
                .spec
                .http
                .iter()
                .flat_map(|r| r.route.iter())
                .map(|d| &d.destination)
                .filter(|d| !d.subset.is_empty() && vs.object.spec.hosts.contains(&d.host))
                .collect();
            if !dests.is_empty() {
                with_subsets.push((format!("{}/{}", vs.namespace(), vs.name()), dests));
            }
        }
        for vs in &snap.virtual_services {
            let spec = &vs.object.spec;
            for d in route_destinations(&vs.object)
                .into_iter()
                .chain(mirror_destinations(&vs.object))
            {
                let host = &d.destination.host;
                let Some(svc) =
                    destination_host(vs.namespace(), &spec.export_to, host, ctx.domain, &services)
                else {
                    let what = if d.mirror { "mirror host" } else { "host" };
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "ReferencedResourceNotFound",
                        vec![what.into(), host.into()],
                    );
                    continue;
                };
                match &d.destination.port {
                    None if svc.ports.len() > 1 => {
                        let ports: Vec<i64> = svc.ports.iter().map(|p| (*p).into()).collect();
                        ctx.report(
                            Kind::VirtualService,
                            vs,
                            "VirtualServiceDestinationPortSelectorRequired",
                            vec![host.into(), ports.into()],
                        );
                    }
                    None => {}
                    Some(p) if !svc.ports.contains(&p.number) => {
                        ctx.report(
                            Kind::VirtualService,
                            vs,
                            "ReferencedResourceNotFound",
                            vec!["host:port".into(), format!("{host}:{}", p.number).into()],
                        );
                    }
                    Some(_) => {}
                }
            }
            // Routes from a gateway without a subset are not affected by subsets elsewhere.
            if spec.gateways.is_empty() {
                continue;
            }
            let me = format!("{}/{}", vs.namespace(), vs.name());
            for r in &spec.http {
                for d in &r.route {
                    if !d.destination.subset.is_empty() {
                        continue;
                    }
                    for (other, dests) in &with_subsets {
                        for od in dests {
                            if od.host == d.destination.host {
                                ctx.report(
                                    Kind::VirtualService,
                                    vs,
                                    "IngressRouteRulesNotAffected",
                                    vec![other.into(), me.clone().into()],
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `GetResourceNameFromHost`: `(namespace, name)` from `name.ns.svc.<domain>`, else the host as a
/// short name in `default_ns`.
fn resource_name_from_host(default_ns: &str, host: &str, domain: &str) -> (String, String) {
    let suffix = format!(".svc.{domain}");
    if let Some(rest) = host.strip_suffix(&suffix)
        && let Some((name, ns)) = rest.rsplit_once('.')
        && !name.is_empty()
        && !ns.is_empty()
    {
        return (ns.to_string(), name.to_string());
    }
    (default_ns.to_string(), host.to_string())
}

pub struct DestinationRuleAnalyzer;

impl Analyzer for DestinationRuleAnalyzer {
    fn name(&self) -> String {
        "virtualservice.DestinationRuleAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the destination rules associated with each virtual service".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut subsets = HashSet::new();
        for dr in &snap.destination_rules {
            let host = util::host_to_fqdn(dr.namespace(), &dr.object.spec.host, ctx.domain);
            let name = resource_name_from_host(dr.namespace(), &host, ctx.domain);
            for s in &dr.object.spec.subsets {
                subsets.insert((name.clone(), s.name.clone()));
            }
        }
        for vs in &snap.virtual_services {
            for d in route_destinations(&vs.object)
                .into_iter()
                .chain(mirror_destinations(&vs.object))
            {
                let dest = d.destination;
                if dest.subset.is_empty() {
                    continue;
                }
                let name = resource_name_from_host(vs.namespace(), &dest.host, ctx.domain);
                if !subsets.contains(&(name, dest.subset.clone())) {
                    let what = if d.mirror {
                        "mirror+subset in destinationrule"
                    } else {
                        "host+subset in destinationrule"
                    };
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "ReferencedResourceNotFound",
                        vec![what.into(), format!("{}+{}", dest.host, dest.subset).into()],
                    );
                }
            }
        }
    }
}

/// Gateways generated for Kubernetes Gateways carry this marker in their names.
const INTERNAL_GATEWAY_MARKER: &str = "~istio-autogenerated-k8s-gateway";

pub struct GatewayAnalyzer;

impl Analyzer for GatewayAnalyzer {
    fn name(&self) -> String {
        "virtualservice.GatewayAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the gateways associated with each virtual service".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for vs in &snap.virtual_services {
            let spec = &vs.object.spec;
            let vs_name = format!("{}/{}", vs.namespace(), vs.name());
            for gw in &spec.gateways {
                if gw == util::MESH_GATEWAY {
                    continue;
                }
                if gw
                    .split_once('/')
                    .is_some_and(|(_, n)| n.contains(INTERNAL_GATEWAY_MARKER))
                {
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "ReferencedInternalGateway",
                        vec![vs_name.clone().into(), gw.into()],
                    );
                    continue;
                }
                let (ns, name) = short_or_full_name(vs.namespace(), gw);
                let istio_gw = snap
                    .gateways
                    .iter()
                    .find(|g| g.namespace() == ns && g.name() == name);
                let kube_gw = snap
                    .kubernetes_gateways
                    .iter()
                    .find(|g| g.namespace() == ns && g.name() == name);
                if istio_gw.is_none() && kube_gw.is_none() {
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "ReferencedResourceNotFound",
                        vec!["gateway".into(), gw.into()],
                    );
                }
                let matched = match (istio_gw, kube_gw) {
                    (None, Some(k)) => kube_gateway_hosts_match(&k.object.spec, &spec.hosts),
                    _ => {
                        let mut gw_hosts = Vec::new();
                        for g in snap
                            .gateways
                            .iter()
                            .filter(|g| g.namespace() == ns && g.name() == name)
                        {
                            for s in &g.object.spec.servers {
                                gw_hosts.extend(sanitize_server_hosts(&s.hosts, g.namespace()));
                            }
                        }
                        names_for_namespace(&gw_hosts, vs.namespace())
                            .iter()
                            .any(|gh| spec.hosts.iter().any(|vh| hosts_match(gh, vh)))
                    }
                };
                if !matched {
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "VirtualServiceHostNotFoundInGateway",
                        vec![
                            spec.hosts.clone().into(),
                            vs_name.clone().into(),
                            format!("{ns}/{name}").into(),
                        ],
                    );
                }
            }
        }
    }
}

/// `./host` becomes `ns/host`, `*/host` becomes `host`, and `*/*` makes the server match all.
fn sanitize_server_hosts(hosts: &[String], ns: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(hosts.len());
    for h in hosts {
        match h.split_once('/') {
            Some((".", host)) => out.push(format!("{ns}/{host}")),
            Some(("*", "*")) => return vec!["*".into()],
            Some(("*", host)) => out.push(host.to_string()),
            _ => out.push(h.clone()),
        }
    }
    out
}

fn kube_gateway_hosts_match(spec: &serde_json::Value, vs_hosts: &[String]) -> bool {
    let listeners = spec
        .get("listeners")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default();
    let mut hosts = Vec::new();
    for l in &listeners {
        match l.get("hostname").and_then(|h| h.as_str()) {
            None | Some("") => return true,
            Some(h) => hosts.push(h.to_string()),
        }
    }
    hosts
        .iter()
        .any(|gh| vs_hosts.iter().any(|vh| hosts_match(gh, vh)))
}

/// Header prefix Istio uses for JWT claim routing (`@request.auth.claims.`).
const JWT_CLAIM_PREFIX: &str = "@request.auth.claims";

pub struct JwtClaimRouteAnalyzer;

impl Analyzer for JwtClaimRouteAnalyzer {
    fn name(&self) -> String {
        "virtualservice.JWTClaimRouteAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the VirtualService using JWT claim based routing has corresponding RequestAuthentication".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut ra_by_ns: HashMap<&str, Vec<BTreeMap<String, String>>> = HashMap::new();
        for ra in &snap.request_authentications {
            ra_by_ns.entry(ra.namespace()).or_default().push(
                ra.object
                    .spec
                    .selector
                    .as_ref()
                    .map(|s| s.match_labels.clone())
                    .unwrap_or_default(),
            );
        }
        for vs in &snap.virtual_services {
            let Some(key) = jwt_claim_key(&vs.object) else {
                continue;
            };
            for gw in &vs.object.spec.gateways {
                if gw == util::MESH_GATEWAY {
                    continue;
                }
                let (ns, name) = short_or_full_name(vs.namespace(), gw);
                let Some(g) = snap
                    .gateways
                    .iter()
                    .find(|g| g.namespace() == ns && g.name() == name)
                else {
                    continue;
                };
                for pod in &snap.pods {
                    if !util::selector_matches(&g.object.spec.selector, pod.labels()) {
                        continue;
                    }
                    let selectors = ra_by_ns
                        .get(util::ISTIO_SYSTEM)
                        .into_iter()
                        .flatten()
                        .chain(ra_by_ns.get(pod.namespace()).into_iter().flatten());
                    let covered = selectors
                        .clone()
                        .any(|s| util::selector_matches(s, pod.labels()));
                    if !covered {
                        ctx.report(
                            Kind::VirtualService,
                            vs,
                            "JwtClaimBasedRoutingWithoutRequestAuthN",
                            vec![
                                key.clone().into(),
                                format!("{ns}/{name}").into(),
                                pod.name().into(),
                            ],
                        );
                    }
                }
            }
        }
    }
}

fn jwt_claim_key(vs: &VirtualService) -> Option<String> {
    vs.spec
        .http
        .iter()
        .flat_map(|r| r.matches.iter())
        .flat_map(|m| m.headers.keys().chain(m.without_headers.keys()))
        .find(|k| k.starts_with(JWT_CLAIM_PREFIX))
        .cloned()
}
