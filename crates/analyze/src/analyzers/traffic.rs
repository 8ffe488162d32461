//! DestinationRule, ServiceEntry and EnvoyFilter analyzers.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use isthmus_config::istio::networking::ClientTlsSettings;
use isthmus_config::{Kind, Snapshot};

use crate::util::{self, destination_host};
use crate::{Analyzer, Arg, Context};

pub struct CaCertificateAnalyzer;

fn tls_mode(tls: Option<&ClientTlsSettings>) -> &str {
    tls.and_then(|t| t.mode.as_deref()).unwrap_or("DISABLE")
}

impl Analyzer for CaCertificateAnalyzer {
    fn name(&self) -> String {
        "destinationrule.CaCertificateAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks if caCertificates is set when TLS mode is SIMPLE/MUTUAL".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        for dr in &ctx.snapshot.destination_rules {
            let spec = &dr.object.spec;
            let name = format!("{}/{}", dr.namespace(), dr.name());
            let has_selector = spec.workload_selector.is_some();
            let tp = spec.traffic_policy.as_ref();
            // Unverified: SIMPLE or MUTUAL without a CA, unless a workload-scoped credential holds it.
            let unverified = |tls: Option<&ClientTlsSettings>| {
                let mode = tls_mode(tls);
                let t = tls.cloned().unwrap_or_default();
                (mode == "SIMPLE" || mode == "MUTUAL")
                    && t.ca_certificates.is_empty()
                    && (t.credential_name.is_empty() || !has_selector)
            };
            let tls = tp.and_then(|t| t.tls.as_ref());
            if unverified(tls) {
                ctx.report(
                    Kind::DestinationRule,
                    dr,
                    "NoServerCertificateVerificationDestinationLevel",
                    vec![
                        name.clone().into(),
                        dr.namespace().into(),
                        tls_mode(tls).into(),
                        spec.host.clone().into(),
                    ],
                );
            }
            for p in tp
                .map(|t| t.port_level_settings.as_slice())
                .unwrap_or_default()
            {
                let tls = p.tls.as_ref();
                if unverified(tls) {
                    let port = p
                        .port
                        .as_ref()
                        .map(|p| format!("number:{}", p.number))
                        .unwrap_or_default();
                    ctx.report(
                        Kind::DestinationRule,
                        dr,
                        "NoServerCertificateVerificationPortLevel",
                        vec![
                            name.clone().into(),
                            dr.namespace().into(),
                            tls_mode(tls).into(),
                            spec.host.clone().into(),
                            port.into(),
                        ],
                    );
                }
            }
        }
    }
}

pub struct SubsetSelectPodAnalyzer;

/// Labels Istio adds to endpoints from the node a pod runs on.
const TOPOLOGY_LABELS: [&str; 3] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
];

impl Analyzer for SubsetSelectPodAnalyzer {
    fn name(&self) -> String {
        "destinationrule.SubsetSelectPodAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks if pods are selected by subsets in destination rules.".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap: &Snapshot = ctx.snapshot;
        let services = util::service_entry_host_map(snap, ctx.domain);
        let node_labels: BTreeMap<&str, &BTreeMap<String, String>> =
            snap.nodes.iter().map(|n| (n.name(), n.labels())).collect();
        // (destination rule, subset) -> selector
        let mut subsets: Vec<(usize, String, BTreeMap<String, String>)> = Vec::new();
        for (i, dr) in snap.destination_rules.iter().enumerate() {
            let spec = &dr.object.spec;
            let Some(svc) = destination_host(
                dr.namespace(),
                &spec.export_to,
                &spec.host,
                ctx.domain,
                &services,
            ) else {
                ctx.report(
                    Kind::DestinationRule,
                    dr,
                    "UnknownDestinationRuleHost",
                    vec![spec.host.clone().into()],
                );
                continue;
            };
            for s in &spec.subsets {
                let mut sel = svc.workload_selector.clone();
                sel.extend(s.labels.clone());
                subsets.push((i, s.name.clone(), sel));
            }
        }
        // Endpoints carry the node's topology labels and hostname, as the registry adds them.
        let pod_labels: Vec<BTreeMap<String, String>> = snap
            .pods
            .iter()
            .map(|pod| {
                let mut labels = pod.labels().clone();
                if let Some(node) = pod
                    .object
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    && let Some(nl) = node_labels.get(node)
                {
                    for k in TOPOLOGY_LABELS {
                        if let Some(v) = nl.get(k).filter(|v| !v.is_empty()) {
                            labels.insert(k.to_string(), v.clone());
                        }
                    }
                    labels.insert("kubernetes.io/hostname".into(), node.to_string());
                }
                labels
            })
            .collect();
        let pods = util::LabelIndex::new(&pod_labels);
        for (dr, name, sel) in &subsets {
            if pods.matching(sel).next().is_none() {
                let dr = &snap.destination_rules[*dr];
                ctx.report(
                    Kind::DestinationRule,
                    dr,
                    "DestinationRuleSubsetNotSelectPods",
                    vec![name.into()],
                );
            }
        }
    }
}

pub struct ProtocolAddressesAnalyzer;

impl Analyzer for ProtocolAddressesAnalyzer {
    fn name(&self) -> String {
        "serviceentry.Analyzer".into()
    }
    fn description(&self) -> String {
        "Checks the validity of ServiceEntry".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let meta = ctx
            .mesh
            .default_config
            .as_ref()
            .map(|d| d.proxy_metadata.clone())
            .unwrap_or_default();
        let is_true = |k: &str| meta.get(k).is_some_and(|v| v == "true");
        let auto_allocated = is_true("ISTIO_META_DNS_CAPTURE")
            && (is_true("ISTIO_META_DNS_AUTO_ALLOCATE") || is_true("PILOT_ENABLE_IP_AUTOALLOCATE"));
        for se in &ctx.snapshot.service_entries {
            let spec = &se.object.spec;
            let status_addresses = se
                .object
                .status
                .as_ref()
                .and_then(|s| s.get("addresses"))
                .and_then(|a| a.as_array())
                .is_some_and(|a| !a.is_empty());
            if !spec.addresses.is_empty() || status_addresses || auto_allocated {
                continue;
            }
            for p in &spec.ports {
                if p.protocol.is_empty() || p.protocol.eq_ignore_ascii_case("TCP") {
                    ctx.report(
                        Kind::ServiceEntry,
                        se,
                        "ServiceEntryAddressesRequired",
                        vec![],
                    );
                }
            }
        }
    }
}

pub struct ConflictingServiceEntryProtocolAnalyzer;

impl Analyzer for ConflictingServiceEntryProtocolAnalyzer {
    fn name(&self) -> String {
        "serviceentry.ConflictingServiceEntryProtocolAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks if multiple ServiceEntries define the same host and port with different protocols"
            .into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        // (scope, host, port) -> [(protocol, service entry)]
        let mut index: BTreeMap<(String, String, u32), Vec<(String, usize)>> = BTreeMap::new();
        for (i, se) in snap.service_entries.iter().enumerate() {
            let spec = &se.object.spec;
            let scopes = util::export_scopes(&spec.export_to, se.namespace());
            for scope in &scopes {
                for h in &spec.hosts {
                    for p in &spec.ports {
                        index
                            .entry((scope.clone(), h.clone(), p.number))
                            .or_default()
                            .push((p.protocol.clone(), i));
                    }
                }
            }
        }
        let mut reported = HashSet::new();
        for ((scope, host, port), entries) in &index {
            let mut entries = entries.clone();
            if scope != "*"
                && let Some(star) = index.get(&("*".to_string(), host.clone(), *port))
            {
                entries.extend(star.iter().cloned());
            }
            let protocols: BTreeSet<String> = entries
                .iter()
                .map(|(p, _)| p.to_ascii_uppercase())
                .collect();
            if protocols.len() < 2 {
                continue;
            }
            let names: BTreeSet<String> = entries
                .iter()
                .map(|(_, i)| {
                    let se = &snap.service_entries[*i];
                    format!("{}/{}", se.namespace(), se.name())
                })
                .collect();
            let names = names.into_iter().collect::<Vec<_>>().join(", ");
            let protocols = protocols.into_iter().collect::<Vec<_>>().join(", ");
            for (_, i) in &entries {
                if !reported.insert(*i) {
                    continue;
                }
                ctx.report(
                    Kind::ServiceEntry,
                    &snap.service_entries[*i],
                    "ConflictingServiceEntryProtocol",
                    vec![
                        names.clone().into(),
                        host.into(),
                        Arg::Int((*port).into()),
                        protocols.clone().into(),
                    ],
                );
            }
        }
    }
}

pub struct EnvoyPatchAnalyzer;

impl Analyzer for EnvoyPatchAnalyzer {
    fn name(&self) -> String {
        "envoyfilter.EnvoyPatchAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks an envoyFilters ".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        // Filter names patched by an earlier patch that also set a proxyVersion.
        let mut versioned_names: Vec<String> = Vec::new();
        for ef in &ctx.snapshot.envoy_filters {
            let spec = &ef.object.spec;
            for cp in &spec.config_patches {
                let Some(patch) = &cp.patch else { break };
                let instance = match patch.value.as_ref().and_then(|v| v.as_object()) {
                    Some(obj) => match obj.get("name") {
                        Some(n) => n.to_string(),
                        None => cp
                            .match_
                            .as_ref()
                            .and_then(|m| m.listener.as_ref())
                            .and_then(|l| l.filter_chain.as_ref())
                            .map(|fc| {
                                fc.filter
                                    .as_ref()
                                    .map(|f| f.name.clone())
                                    .unwrap_or_default()
                            })
                            .unwrap_or_default(),
                    },
                    None => String::new(),
                };
                let apply_to = cp.apply_to.as_deref().unwrap_or("INVALID");
                let route_level = apply_to == "ROUTE_CONFIGURATION" || apply_to == "HTTP_ROUTE";
                let relative = |ctx: &mut Context<'_>| {
                    if spec.priority == 0 {
                        let msg = if versioned_names.contains(&instance) {
                            "EnvoyFilterUsesRelativeOperationWithProxyVersion"
                        } else {
                            "EnvoyFilterUsesRelativeOperation"
                        };
                        ctx.report(Kind::EnvoyFilter, ef, msg, vec![]);
                    }
                };
                match patch.operation.as_deref() {
                    Some("ADD") if route_level => {
                        ctx.report(
                            Kind::EnvoyFilter,
                            ef,
                            "EnvoyFilterUsesAddOperationIncorrectly",
                            vec![],
                        );
                    }
                    Some("REMOVE") if route_level => {
                        ctx.report(
                            Kind::EnvoyFilter,
                            ef,
                            "EnvoyFilterUsesRemoveOperationIncorrectly",
                            vec![],
                        );
                    }
                    Some("REPLACE")
                        if !matches!(
                            apply_to,
                            "NETWORK_FILTER" | "HTTP_FILTER" | "VIRTUAL_HOST"
                        ) =>
                    {
                        ctx.report(
                            Kind::EnvoyFilter,
                            ef,
                            "EnvoyFilterUsesReplaceOperationIncorrectly",
                            vec![],
                        );
                    }
                    Some("REMOVE" | "REPLACE" | "INSERT_BEFORE" | "INSERT_AFTER" | "MERGE") => {
                        relative(ctx)
                    }
                    _ => {}
                }
                if cp
                    .match_
                    .as_ref()
                    .and_then(|m| m.proxy.as_ref())
                    .is_some_and(|p| !p.proxy_version.is_empty())
                {
                    versioned_names.push(instance);
                }
            }
        }
    }
}
