//! Helpers shared by analyzers, mirroring Istio's analyzer utilities: label selectors, host
//! scoping, the service lookup used for destination hosts, and mesh membership.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use isthmus_config::k8s_openapi::api::core::v1::{Container, PodSpec};
use isthmus_config::{Entry, HasMetadata, Snapshot};
use isthmus_registry::host::hosts_intersect;

pub const ISTIO_SYSTEM: &str = "istio-system";
pub const INJECTION_LABEL: &str = "istio-injection";
pub const REVISION_LABEL: &str = "istio.io/rev";
pub const SIDECAR_INJECT: &str = "sidecar.istio.io/inject";
pub const ISTIO_PROXY: &str = "istio-proxy";
pub const ISTIO_OPERATOR: &str = "istio-operator";
pub const MESH_GATEWAY: &str = "mesh";
pub const AMBIENT_REDIRECTION: &str = "ambient.istio.io/redirection";
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Kubernetes namespaces that injection ignores.
pub fn is_system_namespace(ns: &str) -> bool {
    matches!(
        ns,
        "kube-system" | "kube-public" | "kube-node-lease" | "local-path-storage"
    )
}

/// Istio control-plane resources carry an `istio` label or `release: istio`.
pub fn is_istio_control_plane(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key("istio") || labels.get("release").is_some_and(|r| r == "istio")
}

/// Equality selector (`labels.SelectorFromSet`): every key present with the same value. An empty
/// selector matches everything.
/// Label sets indexed by `key=value`, so that finding the sets a selector matches costs the
/// candidates of its rarest pair instead of a scan of every set.
pub struct LabelIndex<'a> {
    sets: Vec<&'a BTreeMap<String, String>>,
    by_pair: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> LabelIndex<'a> {
    pub fn new(sets: impl IntoIterator<Item = &'a BTreeMap<String, String>>) -> Self {
        let sets: Vec<_> = sets.into_iter().collect();
        let mut by_pair: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, labels) in sets.iter().enumerate() {
            for (k, v) in labels.iter() {
                by_pair.entry((k, v)).or_default().push(i);
            }
        }
        LabelIndex { sets, by_pair }
    }

    /// Indices of the label sets that `selector` matches (all of them for an empty selector).
    pub fn matching<'s>(
        &'s self,
        selector: &'s BTreeMap<String, String>,
    ) -> Box<dyn Iterator<Item = usize> + 's> {
        if selector.is_empty() {
            return Box::new(0..self.sets.len());
        }
        let rarest = selector
            .iter()
            .map(|(k, v)| {
                self.by_pair
                    .get(&(k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or(&[]);
        Box::new(
            rarest
                .iter()
                .copied()
                .filter(move |&i| selector_matches(selector, self.sets[i])),
        )
    }
}

pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// A selector rendered as Kubernetes does: `k1=v1,k2=v2`, keys sorted.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `ConvertHostToFQDN`: a short name becomes `name.ns.svc.<domain>`; wildcards and dotted names
/// stay as they are.
pub fn host_to_fqdn(namespace: &str, host: &str, domain: &str) -> String {
    if !host.starts_with('*') && !host.contains('.') {
        format!("{host}.{namespace}.svc.{domain}")
    } else {
        host.to_string()
    }
}

/// A host scoped to the namespaces that can see it: `scope/fqdn`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopedFqdn {
    pub scope: String,
    pub fqdn: String,
}

impl ScopedFqdn {
    pub fn new(scope: &str, namespace: &str, host: &str, domain: &str) -> ScopedFqdn {
        ScopedFqdn {
            scope: scope.to_string(),
            fqdn: host_to_fqdn(namespace, host, domain),
        }
    }
}

impl std::fmt::Display for ScopedFqdn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.scope, self.fqdn)
    }
}

/// `IsExportToAllNamespaces`: no exportTo, or one containing `*`.
pub fn export_to_all(export_to: &[String]) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*")
}

/// The namespaces a resource in `namespace` is visible to: `{"*"}` when exported to all, else
/// its `exportTo` with `.` resolved to its own namespace.
pub fn export_scopes(export_to: &[String], namespace: &str) -> BTreeSet<String> {
    if export_to_all(export_to) {
        return ["*".to_string()].into();
    }
    export_to
        .iter()
        .map(|e| {
            if e == "." {
                namespace.to_string()
            } else {
                e.clone()
            }
        })
        .collect()
}

/// What a destination host resolves to: the service's ports and, for ServiceEntries, its
/// workload selector (Kubernetes services are looked up without one, as Istio does).
#[derive(Debug, Clone, Default)]
pub struct ServiceInfo {
    pub ports: Vec<u32>,
    pub workload_selector: BTreeMap<String, String>,
}

/// Istio's `InitServiceEntryHostMap`: every ServiceEntry host and Kubernetes Service, keyed by the
/// namespaces that can see it.
pub fn service_entry_host_map(snap: &Snapshot, domain: &str) -> HashMap<ScopedFqdn, ServiceInfo> {
    let mut out = HashMap::new();
    for se in &snap.service_entries {
        let spec = &se.object.spec;
        let ns = se.namespace();
        let info = ServiceInfo {
            ports: spec.ports.iter().map(|p| p.number).collect(),
            workload_selector: spec
                .workload_selector
                .as_ref()
                .map(|s| s.labels.clone())
                .unwrap_or_default(),
        };
        let mut exports_to_all = false;
        for h in &spec.hosts {
            if spec.export_to.is_empty() || exports_to_all {
                out.insert(ScopedFqdn::new("*", ns, h, domain), info.clone());
                continue;
            }
            for e in &spec.export_to {
                match e.as_str() {
                    "*" => {
                        out.insert(ScopedFqdn::new("*", ns, h, domain), info.clone());
                        exports_to_all = true;
                    }
                    "." => {
                        out.insert(ScopedFqdn::new(ns, ns, h, domain), info.clone());
                    }
                    other => {
                        out.insert(ScopedFqdn::new(other, ns, h, domain), info.clone());
                    }
                }
                if exports_to_all {
                    break;
                }
            }
        }
    }
    for s in &snap.services {
        let ns = s.namespace();
        let ports = s
            .object
            .spec
            .as_ref()
            .and_then(|sp| sp.ports.as_ref())
            .map(|ps| ps.iter().map(|p| p.port as u32).collect())
            .unwrap_or_default();
        let info = ServiceInfo {
            ports,
            workload_selector: BTreeMap::new(),
        };
        let export: Vec<String> = s
            .annotations()
            .get(isthmus_registry::EXPORT_TO_ANNOTATION)
            .map(|a| {
                a.split(',')
                    .filter(|e| !e.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        let scopes = export_scopes(&export, ns);
        for scope in scopes {
            out.insert(ScopedFqdn::new(&scope, ns, s.name(), domain), info.clone());
        }
    }
    out
}

/// Istio's `GetDestinationHost`: the service a host written in `source_ns` refers to.
pub fn destination_host<'a>(
    source_ns: &str,
    export_to: &[String],
    host: &str,
    domain: &str,
    map: &'a HashMap<ScopedFqdn, ServiceInfo>,
) -> Option<&'a ServiceInfo> {
    if let Some(s) = map.get(&ScopedFqdn::new("*", source_ns, host, domain)) {
        return Some(s);
    }
    if export_to.is_empty() {
        if let Some(s) = map.get(&ScopedFqdn::new(source_ns, source_ns, host, domain)) {
            return Some(s);
        }
    } else {
        for e in export_to {
            let scope = if e == "." { source_ns } else { e.as_str() };
            if let Some(s) = map.get(&ScopedFqdn::new(scope, source_ns, host, domain)) {
                return Some(s);
            }
        }
    }
    // Wildcard ServiceEntry hosts, visible to this namespace.
    let host_tail = host.strip_prefix('*').unwrap_or(host);
    let mut candidates: Vec<(&ScopedFqdn, &ServiceInfo)> = map
        .iter()
        .filter(|(k, _)| k.fqdn.starts_with('*') && (k.scope == "*" || k.scope == source_ns))
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    candidates
        .into_iter()
        .find(|(k, _)| host_tail.ends_with(&k.fqdn[1..]))
        .map(|(_, v)| v)
}

/// `host.NamesForNamespace`: gateway `ns/host` entries visible to `namespace`, namespace stripped.
pub fn names_for_namespace(hosts: &[String], namespace: &str) -> Vec<String> {
    hosts
        .iter()
        .filter_map(|h| match h.split_once('/') {
            Some((ns, host)) if ns == namespace || ns == "*" => Some(host.to_string()),
            Some(_) => None,
            None => Some(h.clone()),
        })
        .collect()
}

/// Istio's `host.Name.Matches`: the hosts overlap, wildcards considered.
pub fn hosts_match(a: &str, b: &str) -> bool {
    hosts_intersect(a, b)
}

/// `resource.NewShortOrFullName`: `ns/name` or a name in `default_ns`.
pub fn short_or_full_name(default_ns: &str, name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (default_ns.to_string(), name.to_string()),
    }
}

/// The pod template (or pod spec) of a workload-carrying resource.
pub fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers.iter()
}

/// Whether a pod with these annotations, labels and containers is in the mesh (has a sidecar or
/// will be injected), as Istio's `inMesh` decides.
pub fn in_mesh(
    annotations: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
    namespace: &str,
    containers: &[&Container],
    snap: &Snapshot,
) -> bool {
    if containers
        .iter()
        .any(|c| c.name == ISTIO_PROXY && c.image.as_deref().is_some_and(|i| !i.is_empty()))
    {
        return true;
    }
    if let Some(v) = labels.get(SIDECAR_INJECT) {
        return v == "true";
    }
    if let Some(v) = annotations.get(SIDECAR_INJECT) {
        return v == "true";
    }
    if let Some(ns) = snap.namespaces.iter().find(|n| n.name() == namespace) {
        return ns
            .labels()
            .get(INJECTION_LABEL)
            .is_some_and(|v| v == "enabled");
    }
    false
}

/// `PodInAmbientMode`.
pub fn pod_in_ambient(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(AMBIENT_REDIRECTION)
        .is_some_and(|v| v == "enabled")
}

/// `NamespaceInAmbientMode`.
pub fn namespace_in_ambient<T: HasMetadata>(ns: Option<&Entry<T>>) -> bool {
    let Some(ns) = ns else { return false };
    let labels = ns.labels();
    if labels.get(INJECTION_LABEL).is_some_and(|v| v == "enabled") {
        return false;
    }
    if labels.get(REVISION_LABEL).is_some_and(|v| !v.is_empty()) {
        return false;
    }
    labels
        .get(DATAPLANE_MODE_LABEL)
        .is_some_and(|v| v == "ambient")
}

/// `maps.Contains(superset, subset)`: every entry of `subset` is in `superset`.
pub fn map_contains(
    superset: &BTreeMap<String, String>,
    subset: &BTreeMap<String, String>,
) -> bool {
    subset.iter().all(|(k, v)| superset.get(k) == Some(v))
}

/// DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric, ≤ 63.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 label, or `*`, or a label starting with `*` (`*foo`) as Istio allows in hosts.
pub fn is_wildcard_dns1123_label(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    match s.strip_prefix('*') {
        Some(rest) => {
            !rest.is_empty()
                && rest.len() <= 62
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !rest.ends_with('-')
        }
        None => is_dns1123_label(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_conversion() {
        assert_eq!(
            host_to_fqdn("ns", "a", "cluster.local"),
            "a.ns.svc.cluster.local"
        );
        assert_eq!(host_to_fqdn("ns", "a.b", "cluster.local"), "a.b");
        assert_eq!(host_to_fqdn("ns", "*", "cluster.local"), "*");
    }

    #[test]
    fn gateway_host_namespaces() {
        let hosts = vec![
            "foo/a.com".to_string(),
            "*/b.com".into(),
            "c.com".into(),
            "bar/d.com".into(),
        ];
        assert_eq!(
            names_for_namespace(&hosts, "foo"),
            vec!["a.com", "b.com", "c.com"]
        );
    }

    #[test]
    fn dns_labels() {
        assert!(is_dns1123_label("abc-1"));
        assert!(!is_dns1123_label("Abc"));
        assert!(!is_dns1123_label("-a"));
        assert!(is_wildcard_dns1123_label("*"));
        assert!(is_wildcard_dns1123_label("*foo"));
    }
}
