//! Analyzers of cluster-level configuration: webhooks and the external control plane, Gateway
//! API CRD versions and selectors, resource conditions, multicluster networks, authentication
//! and authorization policies, telemetry providers and deprecated fields.

use std::collections::{BTreeMap, BTreeSet};

use isthmus_config::k8s_openapi::api::admissionregistration::v1::WebhookClientConfig;
use isthmus_config::resource::GenericObject;
use isthmus_config::{Entry, HasMetadata, Kind, Origin};

use crate::analyzers::injection::label_selector_matches;
use crate::util::{self, selector_matches, selector_string};
use crate::{Analyzer, Arg, Context, ResourceRef, resource_ref};

pub struct ExternalControlPlaneAnalyzer;

/// A webhook URL's problem, or `None` when it names a host. isthmus does not resolve names during
/// analysis (it must work offline), so a syntactically valid hostname is accepted.
fn lint_webhook_url(url: &str) -> Option<&'static str> {
    let rest = match url.split_once("://") {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            rest
        }
        Some(_) => return Some("was provided in an invalid format"),
        None => "",
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Some("is an IP address instead of a hostname");
    }
    if host.is_empty()
        || host
            .split('.')
            .any(|l| !util::is_dns1123_label(&l.to_ascii_lowercase()))
    {
        return Some("cannot be resolved via a DNS lookup");
    }
    None
}

/// Checks one webhook configuration; `false` stops the scan of this kind, as Istio's does after
/// its first finding.
fn check_external_webhooks<T: HasMetadata>(
    ctx: &mut Context<'_>,
    kind: Kind,
    e: &Entry<T>,
    hooks: &[(String, &WebhookClientConfig)],
) -> bool {
    for (name, cc) in hooks {
        if let Some(url) = &cc.url {
            match lint_webhook_url(url) {
                None => return true,
                Some("is an IP address instead of a hostname") => {
                    ctx.report(
                        kind,
                        e,
                        "ExternalControlPlaneAddressIsNotAHostname",
                        vec![url.into(), name.into()],
                    );
                    return false;
                }
                Some(problem) => {
                    ctx.report(
                        kind,
                        e,
                        "InvalidExternalControlPlaneConfig",
                        vec![url.into(), name.into(), problem.into()],
                    );
                    return false;
                }
            }
        } else if cc.service.is_none() {
            ctx.report(
                kind,
                e,
                "InvalidExternalControlPlaneConfig",
                vec!["".into(), name.into(), "is blank".into()],
            );
            return false;
        }
    }
    true
}

impl Analyzer for ExternalControlPlaneAnalyzer {
    fn name(&self) -> String {
        "externalcontrolplane.ExternalControlPlaneAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks that the remote IstioOperator resources reference an external control plane".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for v in &snap.validating_webhooks {
            let name = v.name();
            if name.is_empty()
                || !(name == "istiod-default-validator" || name.starts_with("istio-validator"))
            {
                continue;
            }
            let hooks: Vec<_> = v
                .object
                .webhooks
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), &h.client_config))
                .collect();
            if !check_external_webhooks(ctx, Kind::ValidatingWebhookConfiguration, v, &hooks) {
                break;
            }
        }
        for m in &snap.mutating_webhooks {
            if !m.name().starts_with("istio-sidecar-injector") {
                continue;
            }
            let hooks: Vec<_> = m
                .object
                .webhooks
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), &h.client_config))
                .collect();
            if !check_external_webhooks(ctx, Kind::MutatingWebhookConfiguration, m, &hooks) {
                break;
            }
        }
    }
}

pub struct WebhookAnalyzer;

impl Analyzer for WebhookAnalyzer {
    fn name(&self) -> String {
        "webhook.Analyzer".into()
    }
    fn description(&self) -> String {
        "Checks the validity of Istio webhooks".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut hooks = Vec::new(); // (config index, webhook)
        let mut revisions = BTreeSet::new();
        for (i, m) in snap.mutating_webhooks.iter().enumerate() {
            let whs = m.object.webhooks.clone().unwrap_or_default();
            let mut revs: BTreeSet<String> = m
                .labels()
                .get(util::REVISION_LABEL)
                .cloned()
                .into_iter()
                .collect();
            for w in &whs {
                for sel in [&w.namespace_selector, &w.object_selector]
                    .into_iter()
                    .flatten()
                {
                    if let Some(r) = sel
                        .match_labels
                        .as_ref()
                        .and_then(|l| l.get(util::REVISION_LABEL))
                    {
                        revs.insert(r.clone());
                    }
                    for e in sel
                        .match_expressions
                        .iter()
                        .flatten()
                        .filter(|e| e.key == util::REVISION_LABEL)
                    {
                        revs.extend(e.values.iter().flatten().cloned());
                    }
                }
            }
            if revs.is_empty() && !whs.iter().any(|w| w.name.ends_with("istio.io")) {
                continue;
            }
            revisions.extend(revs);
            for w in whs {
                hooks.push((i, w));
            }
        }
        let base_ns: Vec<BTreeMap<String, String>> = vec![
            BTreeMap::new(),
            [(util::INJECTION_LABEL.to_string(), "enabled".to_string())].into(),
            [(util::INJECTION_LABEL.to_string(), "disabled".to_string())].into(),
        ];
        let base_obj: Vec<BTreeMap<String, String>> = vec![
            BTreeMap::new(),
            [(util::SIDECAR_INJECT.to_string(), "true".to_string())].into(),
            [(util::SIDECAR_INJECT.to_string(), "false".to_string())].into(),
        ];
        let with_revisions = |base: &[BTreeMap<String, String>]| {
            let mut all = base.to_vec();
            for rev in &revisions {
                for b in base {
                    let mut l = b.clone();
                    l.insert(util::REVISION_LABEL.to_string(), rev.clone());
                    all.push(l);
                }
            }
            all
        };
        let hook_id = |(i, w): &(usize, _)| {
            let m = &snap.mutating_webhooks[*i];
            let w: &isthmus_config::k8s_openapi::api::admissionregistration::v1::MutatingWebhook =
                w;
            format!("{}/{}", m.name(), w.name)
        };
        for nl in with_revisions(&base_ns) {
            for ol in with_revisions(&base_obj) {
                let matches: BTreeSet<usize> = hooks
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, w))| {
                        label_selector_matches(w.namespace_selector.as_ref(), &nl)
                            && label_selector_matches(w.object_selector.as_ref(), &ol)
                    })
                    .map(|(k, _)| k)
                    .collect();
                if matches.len() < 2 {
                    continue;
                }
                for &k in &matches {
                    let others: Vec<String> = matches
                        .iter()
                        .filter(|&&o| o != k)
                        .map(|&o| hook_id(&hooks[o]))
                        .collect();
                    ctx.report(
                        Kind::MutatingWebhookConfiguration,
                        &snap.mutating_webhooks[hooks[k].0],
                        "InvalidWebhook",
                        vec![format!("Webhook overlaps with others: [{}]. This may cause injection to occur twice.", others.join(" ")).into()],
                    );
                }
            }
        }
        for (i, w) in &hooks {
            let Some(svc) = &w.client_config.service else {
                continue;
            };
            let exists = snap
                .services
                .iter()
                .any(|s| s.namespace() == svc.namespace && s.name() == svc.name);
            if !exists {
                ctx.report(
                    Kind::MutatingWebhookConfiguration,
                    &snap.mutating_webhooks[*i],
                    "InvalidWebhook",
                    vec![format!("Injector refers to a control plane service that does not exist: {}/{}.", svc.namespace, svc.name).into()],
                );
            }
        }
    }
}

/// Gateway API CRDs Istio needs at a minimum bundle version.
const MINIMUM_CRD_VERSIONS: [(&str, (u64, u64, u64)); 3] = [
    ("grpcroutes.gateway.networking.k8s.io", (1, 1, 0)),
    ("backendtlspolicies.gateway.networking.k8s.io", (1, 4, 0)),
    ("tlsroutes.gateway.networking.k8s.io", (1, 5, 0)),
];

/// Parses `v1.4.1`, `1.4`, `1.4.1-rc.1` (the prerelease is dropped) into a version triple.
fn parse_semver(s: &str) -> Option<(u64, u64, u64)> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let core = s.split(['-', '+']).next()?;
    let mut it = core.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    let patch = it.next().map(str::parse).transpose().ok()?.unwrap_or(0);
    it.next().is_none().then_some((major, minor, patch))
}

pub struct CrdVersionAnalyzer;

impl Analyzer for CrdVersionAnalyzer {
    fn name(&self) -> String {
        "k8sgateway.CRDVersionAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks Gateway API CRDs are at the minimum version required by this Istio version".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        for crd in &ctx.snapshot.custom_resource_definitions {
            let Some((_, min)) = MINIMUM_CRD_VERSIONS.iter().find(|(n, _)| *n == crd.name()) else {
                continue;
            };
            let Some(bv) = crd
                .annotations()
                .get("gateway.networking.k8s.io/bundle-version")
            else {
                continue;
            };
            let Some(installed) = parse_semver(bv) else {
                continue;
            };
            if installed < *min {
                let show = |v: (u64, u64, u64)| format!("{}.{}.{}", v.0, v.1, v.2);
                let full = bv.strip_prefix('v').unwrap_or(bv).to_string();
                ctx.report(
                    Kind::CustomResourceDefinition,
                    crd,
                    "GatewayAPICRDVersionBelowMinimum",
                    vec![crd.name().into(), full.into(), show(*min).into()],
                );
            }
        }
    }
}

pub struct K8sGatewaySelectorAnalyzer;

/// A policy's reference, namespace, selector, and whether it targets a resource by reference.
type Policy = (ResourceRef, String, Option<BTreeMap<String, String>>, bool);

impl Analyzer for K8sGatewaySelectorAnalyzer {
    fn name(&self) -> String {
        "k8sgateway.SelectorAnalyzer".into()
    }
    fn description(&self) -> String {
        "Check that selectors are effective for Kubernetes gateway".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut gateway_pods: BTreeMap<&str, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
        for p in &snap.pods {
            if p.labels().contains_key(util::GATEWAY_NAME_LABEL) {
                gateway_pods
                    .entry(p.namespace())
                    .or_default()
                    .push(p.labels());
            }
        }
        let mut policies: Vec<Policy> = Vec::new();
        for a in &snap.authorization_policies {
            let s = &a.object.spec;
            let targeted = s.target_ref.is_some() || !s.target_refs.is_empty();
            policies.push((
                resource_ref(Kind::AuthorizationPolicy, a),
                a.namespace().into(),
                s.selector.as_ref().map(|x| x.match_labels.clone()),
                targeted,
            ));
        }
        for r in &snap.request_authentications {
            let s = &r.object.spec;
            let targeted = s.target_ref.is_some() || !s.target_refs.is_empty();
            policies.push((
                resource_ref(Kind::RequestAuthentication, r),
                r.namespace().into(),
                s.selector.as_ref().map(|x| x.match_labels.clone()),
                targeted,
            ));
        }
        for t in &snap.telemetries {
            let s = &t.object.spec;
            let targeted = s.target_ref.is_some() || !s.target_refs.is_empty();
            policies.push((
                resource_ref(Kind::Telemetry, t),
                t.namespace().into(),
                s.selector.as_ref().map(|x| x.match_labels.clone()),
                targeted,
            ));
        }
        for w in &snap.wasm_plugins {
            let (sel, targeted) = generic_selector(w);
            policies.push((
                resource_ref(Kind::WasmPlugin, w),
                w.namespace().into(),
                sel,
                targeted,
            ));
        }
        for (r, ns, sel, targeted) in policies {
            let Some(sel) = sel.filter(|_| !targeted) else {
                continue;
            };
            for labels in gateway_pods.get(ns.as_str()).into_iter().flatten() {
                if util::map_contains(labels, &sel) {
                    let gw = labels
                        .get(util::GATEWAY_NAME_LABEL)
                        .cloned()
                        .unwrap_or_default();
                    ctx.report_ref(r.clone(), "IneffectiveSelector", vec![gw.into()]);
                }
            }
        }
    }
}

/// `spec.selector.matchLabels` and whether `spec.targetRef(s)` is set, for kinds kept as JSON.
fn generic_selector(e: &Entry<GenericObject>) -> (Option<BTreeMap<String, String>>, bool) {
    let spec = &e.object.spec;
    let targeted = spec.get("targetRef").is_some_and(|t| !t.is_null())
        || spec
            .get("targetRefs")
            .and_then(|t| t.as_array())
            .is_some_and(|t| !t.is_empty());
    let sel = spec.get("selector").filter(|s| !s.is_null()).map(|s| {
        s.get("matchLabels")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    });
    (sel, targeted)
}

pub struct ConditionAnalyzer;

/// A status condition, whatever resource it came from.
struct Condition {
    type_: String,
    status: String,
    reason: String,
    message: String,
}

fn conditions_from_json(list: Option<&serde_json::Value>) -> Vec<Condition> {
    let s = |c: &serde_json::Value, k: &str| {
        c.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
    };
    list.and_then(|l| l.as_array())
        .into_iter()
        .flatten()
        .map(|c| Condition {
            type_: s(c, "type"),
            status: s(c, "status"),
            reason: s(c, "reason"),
            message: s(c, "message"),
        })
        .collect()
}

impl Analyzer for ConditionAnalyzer {
    fn name(&self) -> String {
        "conditions.ConditionAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks for negative status conditions on resources".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut found: Vec<(ResourceRef, Vec<Condition>, &[&str], bool)> = Vec::new();
        const WAYPOINT: &[&str] = &["istio.io/WaypointBound"];
        const GATEWAY: &[&str] = &["Accepted", "Programmed", "ResolvedRefs"];
        for s in &snap.services {
            let conds = s
                .object
                .status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .into_iter()
                .flatten()
                .map(|c| Condition {
                    type_: c.type_.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                })
                .collect();
            found.push((resource_ref(Kind::Service, s), conds, WAYPOINT, false));
        }
        for se in &snap.service_entries {
            found.push((
                resource_ref(Kind::ServiceEntry, se),
                conditions_from_json(se.object.status.as_ref().and_then(|s| s.get("conditions"))),
                WAYPOINT,
                false,
            ));
        }
        for a in &snap.authorization_policies {
            found.push((
                resource_ref(Kind::AuthorizationPolicy, a),
                conditions_from_json(a.object.status.as_ref().and_then(|s| s.get("conditions"))),
                &["ZtunnelAccepted", "WaypointAccepted"],
                true,
            ));
        }
        for g in &snap.kubernetes_gateways {
            found.push((
                resource_ref(Kind::KubernetesGateway, g),
                conditions_from_json(g.object.status.as_ref().and_then(|s| s.get("conditions"))),
                GATEWAY,
                false,
            ));
        }
        for (kind, routes) in [
            (Kind::HttpRoute, &snap.http_routes),
            (Kind::GrpcRoute, &snap.grpc_routes),
        ] {
            for r in routes {
                let parents = r
                    .object
                    .status
                    .as_ref()
                    .and_then(|s| s.get("parents"))
                    .and_then(|p| p.as_array())
                    .cloned()
                    .unwrap_or_default();
                let conds = parents
                    .iter()
                    .flat_map(|p| conditions_from_json(p.get("conditions")))
                    .collect();
                found.push((resource_ref(kind, r), conds, GATEWAY, false));
            }
        }
        for (r, conds, negative_types, is_authz) in found {
            for c in conds {
                if negative_types.contains(&c.type_.as_str()) && c.status == "False" {
                    ctx.report_ref(
                        r.clone(),
                        "NegativeConditionStatus",
                        vec![
                            c.type_.clone().into(),
                            c.reason.clone().into(),
                            c.message.clone().into(),
                        ],
                    );
                }
                if is_authz && c.type_ == "WaypointAccepted" && c.reason == "PartiallyInvalid" {
                    ctx.report_ref(
                        r.clone(),
                        "NegativeConditionStatus",
                        vec![c.type_.into(), c.reason.into(), c.message.into()],
                    );
                }
            }
        }
    }
}

pub struct MeshNetworksAnalyzer;

/// Service registries Istio knows without a remote secret.
const KNOWN_REGISTRIES: [&str; 3] = ["Mock", "Kubernetes", "External"];

impl Analyzer for MeshNetworksAnalyzer {
    fn name(&self) -> String {
        "meshnetworks.MeshNetworksAnalyzer".into()
    }
    fn description(&self) -> String {
        "Check the validity of MeshNetworks in the cluster".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let Some(mn) = ctx.mesh_networks else { return };
        let mut registries: BTreeSet<String> =
            KNOWN_REGISTRIES.iter().map(|s| s.to_string()).collect();
        for s in &ctx.snapshot.secrets {
            if s.labels()
                .get("istio/multiCluster")
                .is_some_and(|v| v == "true")
            {
                registries.extend(s.object.data.iter().flat_map(|d| d.keys().cloned()));
                registries.extend(s.object.string_data.iter().flat_map(|d| d.keys().cloned()));
            }
        }
        let r = ResourceRef {
            kind: "MeshNetworks".into(),
            namespace: util::ISTIO_SYSTEM.into(),
            name: "meshnetworks".into(),
            origin: Origin::default(),
        };
        for (net, n) in &mn.networks {
            for e in &n.endpoints {
                if !e.from_registry.is_empty() && !registries.contains(&e.from_registry) {
                    ctx.report_ref(
                        r.clone(),
                        "UnknownMeshNetworksServiceRegistry",
                        vec![e.from_registry.clone().into(), net.into()],
                    );
                }
            }
        }
    }
}

pub struct BlockedCidrsAnalyzer;

impl Analyzer for BlockedCidrsAnalyzer {
    fn name(&self) -> String {
        "authn.BlockedCIDRsAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks that BLOCKED_CIDRS_IN_JWKS_URIS is configured on istiod when RequestAuthentication resources exist".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let names: Vec<String> = snap
            .request_authentications
            .iter()
            .map(|r| format!("{}/{}", r.namespace(), r.name()))
            .collect();
        if names.is_empty() {
            return;
        }
        let shown = if names.len() <= 5 {
            names.join(", ")
        } else {
            format!("{}, and {} more", names[..5].join(", "), names.len() - 5)
        };
        for d in &snap.deployments {
            if d.labels().get("app").map(String::as_str) != Some("istiod") {
                continue;
            }
            let configured = d
                .object
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .is_some_and(|p| {
                    p.containers.iter().any(|c| {
                        c.env.iter().flatten().any(|e| {
                            e.name == "BLOCKED_CIDRS_IN_JWKS_URIS"
                                && e.value.as_deref().is_some_and(|v| !v.is_empty())
                        })
                    })
                });
            if !configured {
                ctx.report(
                    Kind::Deployment,
                    d,
                    "JwksUriFetchUnrestricted",
                    vec![Arg::Int(names.len() as i64), shown.clone().into()],
                );
            }
        }
    }
}

pub struct AuthorizationPoliciesAnalyzer;

impl Analyzer for AuthorizationPoliciesAnalyzer {
    fn name(&self) -> String {
        "auth.AuthorizationPoliciesAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the validity of authorization policies".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        // In-mesh pods' labels, by namespace (every namespace with a pod has an entry).
        let mut pods: BTreeMap<&str, Vec<&BTreeMap<String, String>>> = BTreeMap::new();
        for p in &snap.pods {
            let list = pods.entry(p.namespace()).or_default();
            let containers: Vec<_> = p
                .object
                .spec
                .iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .collect();
            if util::in_mesh(
                p.annotations(),
                p.labels(),
                p.namespace(),
                &containers,
                snap,
            ) {
                list.push(p.labels());
            }
            if util::pod_in_ambient(p.annotations()) {
                list.push(p.labels());
            }
        }
        let root = ctx.mesh.root_namespace().to_string();
        for ap in &snap.authorization_policies {
            let spec = &ap.object.spec;
            let ns = ap.namespace();
            let sel = spec.selector.as_ref().map(|s| &s.match_labels);
            if ns == root {
                if let Some(sel) = sel
                    && !pods.values().flatten().any(|l| selector_matches(sel, l))
                {
                    ctx.report(
                        Kind::AuthorizationPolicy,
                        ap,
                        "NoMatchingWorkloadsFound",
                        vec![selector_string(sel).into()],
                    );
                }
            } else {
                match sel {
                    None => {
                        if pods.get(ns).is_none_or(|l| l.is_empty()) {
                            ctx.report(
                                Kind::AuthorizationPolicy,
                                ap,
                                "NoMatchingWorkloadsFound",
                                vec!["".into()],
                            );
                        }
                    }
                    Some(sel) => {
                        if !pods
                            .get(ns)
                            .into_iter()
                            .flatten()
                            .any(|l| selector_matches(sel, l))
                        {
                            ctx.report(
                                Kind::AuthorizationPolicy,
                                ap,
                                "NoMatchingWorkloadsFound",
                                vec![selector_string(sel).into()],
                            );
                        }
                    }
                }
            }
            for rule in &spec.rules {
                for from in &rule.from {
                    let Some(src) = &from.source else { continue };
                    for exp in src.namespaces.iter().chain(&src.not_namespaces) {
                        if !snap
                            .namespaces
                            .iter()
                            .any(|n| namespace_matches(n.name(), exp))
                        {
                            ctx.report(
                                Kind::AuthorizationPolicy,
                                ap,
                                "ReferencedResourceNotFound",
                                vec!["namespace".into(), exp.into()],
                            );
                        }
                    }
                }
            }
        }
    }
}

fn namespace_matches(ns: &str, exp: &str) -> bool {
    if exp == "*" {
        return true;
    }
    if let Some(suffix) = exp.strip_prefix('*') {
        return ns.ends_with(suffix);
    }
    if let Some(prefix) = exp.strip_suffix('*') {
        return ns.starts_with(prefix);
    }
    ns.eq_ignore_ascii_case(exp)
}

pub struct TelemetryProviderAnalyzer;

impl Analyzer for TelemetryProviderAnalyzer {
    fn name(&self) -> String {
        "telemetry.ProviderAnalyzer".into()
    }
    fn description(&self) -> String {
        "Validates that providers in telemetry resource is valid".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let defaults = ctx
            .mesh
            .default_providers
            .as_ref()
            .is_some_and(|d| !d.access_logging.is_empty());
        if defaults {
            return;
        }
        for t in &ctx.snapshot.telemetries {
            for l in &t.object.spec.access_logging {
                if l.disabled == Some(true) {
                    continue;
                }
                if l.providers.is_empty() {
                    ctx.report(
                        Kind::Telemetry,
                        t,
                        "InvalidTelemetryProvider",
                        vec![t.name().into(), t.namespace().into()],
                    );
                }
            }
        }
    }
}

pub struct LightstepAnalyzer;

impl Analyzer for LightstepAnalyzer {
    fn name(&self) -> String {
        "telemetry.LightstepAnalyzer".into()
    }
    fn description(&self) -> String {
        "Validates that lightstep provider is still used".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let lightstep: BTreeSet<&str> = ctx
            .mesh
            .extension_providers
            .iter()
            .filter(|p| p.kind() == Some("lightstep"))
            .map(|p| p.name.as_str())
            .collect();
        if lightstep.is_empty() {
            return;
        }
        for t in &ctx.snapshot.telemetries {
            for tr in &t.object.spec.tracing {
                for p in &tr.providers {
                    if lightstep.contains(p.name.as_str()) {
                        ctx.report(
                            Kind::Telemetry,
                            t,
                            "Deprecated",
                            vec![format!("The Lightstep provider {} is deprecated, please migrate to OpenTelemetry provider.", p.name).into()],
                        );
                    }
                }
            }
        }
    }
}

pub struct DeprecationAnalyzer;

/// Istio CRDs that have been removed.
const REMOVED_CRDS: [(&str, &str); 4] = [
    ("rbac.istio.io", "ClusterRbacConfig"),
    ("rbac.istio.io", "RbacConfig"),
    ("rbac.istio.io", "ServiceRole"),
    ("rbac.istio.io", "ServiceRoleBinding"),
];

impl Analyzer for DeprecationAnalyzer {
    fn name(&self) -> String {
        "deprecation.DeprecationAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks for deprecated Istio types and fields".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for vs in &snap.virtual_services {
            for h in &vs.object.spec.http {
                if h.fault
                    .as_ref()
                    .and_then(|f| f.delay.as_ref())
                    .and_then(|d| d.percent)
                    .is_some_and(|p| p > 0)
                {
                    ctx.report(
                        Kind::VirtualService,
                        vs,
                        "Deprecated",
                        vec!["HTTPRoute.fault.delay.percent is deprecated; use HTTPRoute.fault.delay.percentage".into()],
                    );
                }
            }
        }
        for sc in &snap.sidecars {
            if sc
                .object
                .spec
                .outbound_traffic_policy
                .as_ref()
                .is_some_and(|o| o.egress_proxy.is_some())
            {
                ctx.report(
                    Kind::Sidecar,
                    sc,
                    "Deprecated",
                    vec!["OutboundTrafficPolicy.EgressProxy ignored".into()],
                );
            }
        }
        for crd in &snap.custom_resource_definitions {
            let spec = &crd.object.spec;
            let group = spec.get("group").and_then(|g| g.as_str()).unwrap_or("");
            let kind = spec
                .pointer("/names/kind")
                .and_then(|k| k.as_str())
                .unwrap_or("");
            if REMOVED_CRDS.contains(&(group, kind)) {
                ctx.report(
                    Kind::CustomResourceDefinition,
                    crd,
                    "Deprecated",
                    vec![format!("Custom resource type {group} {kind} is removed").into()],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        assert_eq!(lint_webhook_url("https://test.com:15017/validate"), None);
        assert_eq!(
            lint_webhook_url("https://10.0.0.1:15017/inject"),
            Some("is an IP address instead of a hostname")
        );
        assert_eq!(
            lint_webhook_url("https://[::1]/x"),
            Some("is an IP address instead of a hostname")
        );
    }

    #[test]
    fn semver() {
        assert_eq!(parse_semver("v1.4.1"), Some((1, 4, 1)));
        assert_eq!(parse_semver("v1.5.0-rc.1"), Some((1, 5, 0)));
        assert!(parse_semver("x").is_none());
    }

    #[test]
    fn namespace_patterns() {
        assert!(namespace_matches("foo-bar", "foo*"));
        assert!(namespace_matches("foo-bar", "*bar"));
        assert!(!namespace_matches("foo", "bar"));
    }
}
