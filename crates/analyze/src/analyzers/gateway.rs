//! Gateway analyzers: ports against the gateway workload's Services, credential secrets,
//! conflicting servers, duplicate certificates.

use std::collections::{BTreeMap, HashSet};

use isthmus_config::istio::networking::ServerTlsSettings;
use isthmus_config::k8s_openapi::api::core::v1::Secret;
use isthmus_config::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use isthmus_config::{Kind, Snapshot};

use crate::util::{self, selector_matches, selector_string};
use crate::{Analyzer, Arg, Context};

pub struct IngressGatewayPortAnalyzer;

impl Analyzer for IngressGatewayPortAnalyzer {
    fn name(&self) -> String {
        "gateway.IngressGatewayPortAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks a gateway's ports against the gateway's Kubernetes service ports".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for gw in &snap.gateways {
            let sel = &gw.object.spec.selector;
            let mut matched_pods = 0;
            // Ports (and target ports) of TCP service ports that select a selected pod.
            let mut ports = HashSet::new();
            for pod in snap
                .pods
                .iter()
                .filter(|p| selector_matches(sel, p.labels()))
            {
                matched_pods += 1;
                for svc in snap
                    .services
                    .iter()
                    .filter(|s| s.namespace() == pod.namespace())
                {
                    let Some(spec) = &svc.object.spec else {
                        continue;
                    };
                    let svc_sel = spec.selector.clone().unwrap_or_default();
                    if !selector_matches(&svc_sel, pod.labels()) {
                        continue;
                    }
                    for p in spec.ports.iter().flatten() {
                        if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                            continue;
                        }
                        ports.insert(p.port as u32);
                        if let Some(IntOrString::Int(t)) = &p.target_port {
                            ports.insert(*t as u32);
                        }
                    }
                }
            }
            if matched_pods == 0 {
                ctx.report(
                    Kind::Gateway,
                    gw,
                    "ReferencedResourceNotFound",
                    vec!["selector".into(), selector_string(sel).into()],
                );
                continue;
            }
            for server in &gw.object.spec.servers {
                if let Some(port) = &server.port
                    && !ports.contains(&port.number)
                {
                    ctx.report(
                        Kind::Gateway,
                        gw,
                        "GatewayPortNotDefinedOnService",
                        vec![Arg::Int(port.number.into()), selector_string(sel).into()],
                    );
                }
            }
        }
    }
}

pub struct SecretAnalyzer;

impl Analyzer for SecretAnalyzer {
    fn name(&self) -> String {
        "gateway.SecretAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks a gateway's referenced secrets for correctness".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for gw in &snap.gateways {
            let sel = &gw.object.spec.selector;
            // The secret lives with the gateway workload, not with the Gateway resource.
            let Some(gw_ns) = snap
                .pods
                .iter()
                .find(|p| selector_matches(sel, p.labels()))
                .map(|p| p.namespace().to_string())
            else {
                ctx.report(
                    Kind::Gateway,
                    gw,
                    "ReferencedResourceNotFound",
                    vec!["selector".into(), selector_string(sel).into()],
                );
                continue;
            };
            for server in &gw.object.spec.servers {
                let Some(cn) = server
                    .tls
                    .as_ref()
                    .map(|t| t.credential_name.as_str())
                    .filter(|c| !c.is_empty())
                else {
                    continue;
                };
                let (ns, name) = util::short_or_full_name(&gw_ns, cn);
                match snap
                    .secrets
                    .iter()
                    .find(|s| s.namespace() == ns && s.name() == name)
                {
                    None => ctx.report(
                        Kind::Gateway,
                        gw,
                        "ReferencedResourceNotFound",
                        vec!["credentialName".into(), cn.into()],
                    ),
                    Some(secret) if !valid_credential(&secret.object) => ctx.report(
                        Kind::Gateway,
                        gw,
                        "InvalidGatewayCredential",
                        vec![gw.name().into(), gw_ns.clone().into()],
                    ),
                    Some(_) => {}
                }
            }
        }
    }
}

/// A gateway credential holds a certificate and key (`tls.crt`/`tls.key`, or the generic
/// `cert`/`key`), and the certificate parses and is currently valid.
fn valid_credential(secret: &Secret) -> bool {
    let get = |k: &str| -> Option<Vec<u8>> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(k))
                    .map(|s| s.clone().into_bytes())
            })
            .filter(|v| !v.is_empty())
    };
    let cert = match (get("tls.crt"), get("tls.key"), get("cert"), get("key")) {
        (Some(c), Some(_), _, _) => c,
        (_, _, Some(c), Some(_)) => c,
        _ => return false,
    };
    certificates_currently_valid(&cert)
}

fn certificates_currently_valid(pem_bytes: &[u8]) -> bool {
    let now = x509_parser::time::ASN1Time::now();
    let mut found = false;
    for pem in x509_parser::pem::Pem::iter_from_buffer(pem_bytes) {
        let Ok(pem) = pem else { return false };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&pem.contents) else {
            return false;
        };
        let v = cert.validity();
        if now < v.not_before || now > v.not_after {
            return false;
        }
        found = true;
    }
    found
}

pub struct ConflictingGatewayAnalyzer;

impl Analyzer for ConflictingGatewayAnalyzer {
    fn name(&self) -> String {
        "gateway.ConflictingGatewayAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks a gateway's selector, port number and hosts".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        // (selector, port) -> gateway -> host -> bind
        let mut by_key: BTreeMap<(String, u32), BTreeMap<String, BTreeMap<String, String>>> =
            BTreeMap::new();
        for gw in &snap.gateways {
            let sel = selector_string(&gw.object.spec.selector);
            for s in &gw.object.spec.servers {
                let port = s.port.as_ref().map(|p| p.number).unwrap_or(0);
                let hosts = s
                    .hosts
                    .iter()
                    .map(|h| (h.clone(), s.bind.clone()))
                    .collect();
                by_key
                    .entry((sel.clone(), port))
                    .or_default()
                    .insert(full_name(gw.namespace(), gw.name()), hosts);
            }
        }
        for gw in &snap.gateways {
            let selector = &gw.object.spec.selector;
            let sel = selector_string(selector);
            let me = full_name(gw.namespace(), gw.name());
            // Gateways with the same selector, or with overlapping ones that select a common pod.
            let same_workload: Vec<&(String, u32)> = by_key
                .keys()
                .filter(|(other_sel, _)| {
                    other_sel == &sel
                        || ((other_sel.contains(&sel) || sel.contains(other_sel.as_str()))
                            && snap.pods.iter().any(|p| {
                                selector_matches(selector, p.labels())
                                    && selector_matches(&parse_selector(other_sel), p.labels())
                            }))
                })
                .collect();
            if !sel.is_empty() && same_workload.is_empty() {
                ctx.report(
                    Kind::Gateway,
                    gw,
                    "ReferencedResourceNotFound",
                    vec!["selector".into(), sel.into()],
                );
                continue;
            }
            for s in &gw.object.spec.servers {
                let Some(port) = s.port.as_ref().map(|p| p.number) else {
                    continue;
                };
                let mut conflicts: Vec<String> = Vec::new();
                for key in same_workload.iter().filter(|k| k.1 == port) {
                    for (other, known) in &by_key[*key] {
                        // Istio's CheckDuplicates: the same host text bound to the same address.
                        let dup = s.hosts.iter().any(|h| known.get(h) == Some(&s.bind));
                        if other != &me && dup {
                            conflicts.push(other.clone());
                        }
                    }
                }
                if !conflicts.is_empty() {
                    conflicts.sort();
                    ctx.report(
                        Kind::Gateway,
                        gw,
                        "ConflictingGateways",
                        vec![
                            conflicts.join(",").into(),
                            sel.clone().into(),
                            port.to_string().into(),
                            s.hosts.join(",").into(),
                        ],
                    );
                }
            }
        }
    }
}

fn parse_selector(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `resource.FullName.String()`: `ns/name`, or `name` without a namespace.
fn full_name(ns: &str, name: &str) -> String {
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

pub struct CertificateAnalyzer;

impl Analyzer for CertificateAnalyzer {
    fn name(&self) -> String {
        "gateway.CertificateAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks a gateway certificate".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap: &Snapshot = ctx.snapshot;
        for gw in &snap.gateways {
            let sel = &gw.object.spec.selector;
            let me = full_name(gw.namespace(), gw.name());
            for other in &snap.gateways {
                // Gateways are scoped to their namespace (PILOT_SCOPE_GATEWAY_TO_NAMESPACE off by
                // default), so every gateway whose selector is a superset is a candidate.
                if !(sel.is_empty() || selector_subset(sel, &other.object.spec.selector)) {
                    continue;
                }
                let them = full_name(other.namespace(), other.name());
                if them == me {
                    continue;
                }
                for cs in &gw.object.spec.servers {
                    for os in &other.object.spec.servers {
                        if let (Some(a), Some(b)) = (&cs.tls, &os.tls)
                            && same_certificate(a, b)
                        {
                            ctx.report(
                                Kind::Gateway,
                                gw,
                                "GatewayDuplicateCertificate",
                                vec![vec![me.clone(), them.clone()].into()],
                            );
                        }
                    }
                }
            }
        }
    }
}

fn selector_subset(x: &BTreeMap<String, String>, y: &BTreeMap<String, String>) -> bool {
    x.iter().all(|(k, v)| y.get(k) == Some(v))
}

fn same_certificate(a: &ServerTlsSettings, b: &ServerTlsSettings) -> bool {
    if !a.credential_name.is_empty() && !b.credential_name.is_empty() {
        return a.credential_name == b.credential_name;
    }
    a.credential_name.is_empty()
        && b.credential_name.is_empty()
        && !a.server_certificate.is_empty()
        && a.server_certificate == b.server_certificate
        && !a.private_key.is_empty()
        && a.private_key == b.private_key
}
