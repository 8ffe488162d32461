//! Sidecar injection analyzers: `injection.Analyzer`, `injection.ImageAnalyzer`,
//! `injection.ImageAutoAnalyzer`.

use std::collections::{BTreeMap, HashMap};

use isthmus_config::Kind;
use isthmus_config::k8s_openapi::api::admissionregistration::v1::MutatingWebhook;
use isthmus_config::k8s_openapi::api::core::v1::{ConfigMap, Container};
use isthmus_config::k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::util::{self, INJECTION_LABEL, ISTIO_PROXY, REVISION_LABEL, SIDECAR_INJECT};
use crate::{Analyzer, Context};

const INJECTOR_CONFIGMAP: &str = "istio-sidecar-injector";

fn injector_configmap_name(revision: &str) -> String {
    if revision.is_empty() || revision == "default" {
        INJECTOR_CONFIGMAP.to_string()
    } else {
        format!("{INJECTOR_CONFIGMAP}-{revision}")
    }
}

fn injector_values(cm: &ConfigMap) -> Option<serde_json::Value> {
    serde_json::from_str(cm.data.as_ref()?.get("values")?).ok()
}

pub struct InjectionAnalyzer;

impl Analyzer for InjectionAnalyzer {
    fn name(&self) -> String {
        "injection.Analyzer".into()
    }
    fn description(&self) -> String {
        "Checks conditions related to Istio sidecar injection".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let mut enabled_by_default = false;
        let mut injected = Vec::new();
        for ns in &snap.namespaces {
            let name = ns.name();
            if name == util::ISTIO_SYSTEM {
                continue;
            }
            let labels = ns.labels();
            let injection = labels.get(INJECTION_LABEL);
            let revision = labels.get(REVISION_LABEL);
            // Labels that each turn on a data plane mode; more than one is ambiguous.
            let mut modes: Vec<String> = injection
                .iter()
                .map(|v| format!("{INJECTION_LABEL}={v}"))
                .collect();
            if injection.is_none_or(|v| v == "enabled") {
                for l in [REVISION_LABEL, util::DATAPLANE_MODE_LABEL] {
                    if let Some(v) = labels.get(l) {
                        modes.push(format!("{l}={v}"));
                    }
                }
            }
            if modes.len() > 1 {
                ctx.report(
                    Kind::Namespace,
                    ns,
                    "NamespaceMultipleInjectionLabels",
                    vec![modes.into()],
                );
            }
            if labels
                .get(util::DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == "ambient")
            {
                continue;
            }
            let label = injection.cloned().unwrap_or_default();
            let cm_name = injector_configmap_name(revision.map(String::as_str).unwrap_or(""));
            if let Some(cm) = snap.config_maps.iter().find(|c| c.name() == cm_name) {
                enabled_by_default = injector_values(&cm.object)
                    .and_then(|v| {
                        v.pointer("/sidecarInjectorWebhook/enableNamespacesByDefault")?
                            .as_bool()
                    })
                    .unwrap_or(false);
            }
            if label.is_empty() && revision.is_none() {
                if enabled_by_default {
                    ctx.report(
                        Kind::Namespace,
                        ns,
                        "NamespaceInjectionEnabledByDefault",
                        vec![],
                    );
                } else {
                    ctx.report(
                        Kind::Namespace,
                        ns,
                        "NamespaceNotInjected",
                        vec![name.into(), name.into()],
                    );
                }
                continue;
            }
            if revision.is_none() && label != "enabled" {
                continue;
            }
            injected.push(name.to_string());
        }
        for pod in &snap.pods {
            if !injected.iter().any(|n| n == pod.namespace()) {
                continue;
            }
            let inject = pod
                .labels()
                .get(SIDECAR_INJECT)
                .or_else(|| pod.annotations().get(SIDECAR_INJECT));
            if inject.is_some_and(|v| v.eq_ignore_ascii_case("false")) {
                continue;
            }
            let Some(spec) = &pod.object.spec else {
                continue;
            };
            if spec.host_network == Some(true) {
                continue;
            }
            let has_proxy = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == ISTIO_PROXY)
                .is_some_and(|c| c.image.as_deref().is_some_and(|i| !i.is_empty()));
            if !has_proxy {
                ctx.report(
                    Kind::Pod,
                    pod,
                    "PodMissingProxy",
                    vec![format!("{}/{}", pod.namespace(), pod.name()).into()],
                );
            }
        }
    }
}

pub struct ImageAnalyzer;

impl Analyzer for ImageAnalyzer {
    fn name(&self) -> String {
        "injection.ImageAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the image of auto-injection configured with the running proxies on pods".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let images: HashMap<&str, String> = snap
            .config_maps
            .iter()
            .filter(|c| c.name().starts_with(INJECTOR_CONFIGMAP))
            .map(|c| (c.name(), proxy_image(&c.object)))
            .collect();
        if images.is_empty() {
            return;
        }
        let mut injected: HashMap<&str, String> = HashMap::new();
        for ns in &snap.namespaces {
            let labels = ns.labels();
            if let Some(rev) = labels.get(REVISION_LABEL) {
                injected.insert(ns.name(), rev.clone());
            } else if labels.get(INJECTION_LABEL).is_some_and(|v| v == "enabled") {
                injected.insert(ns.name(), "default".into());
            }
        }
        let resolver = ImageTypeResolver::new(ctx);
        let mut mismatched: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pod in &snap.pods {
            let Some(rev) = injected.get(pod.namespace()) else {
                continue;
            };
            if pod
                .annotations()
                .get("sidecar.istio.io/proxyImage")
                .is_some_and(|v| !v.is_empty())
            {
                continue;
            }
            let Some(spec) = &pod.object.spec else {
                continue;
            };
            let variant = resolver.image_type(pod.namespace(), pod.labels(), pod.annotations());
            let Some(expected) = images.get(injector_configmap_name(rev).as_str()) else {
                continue;
            };
            let proxies = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .filter(|c| c.name == ISTIO_PROXY);
            for c in proxies {
                let image = c.image.clone().unwrap_or_default();
                if &image != expected && image != format!("{expected}-{variant}") {
                    mismatched
                        .entry(pod.namespace().to_string())
                        .or_default()
                        .push(pod.name().to_string());
                }
            }
        }
        for (ns, pods) in mismatched {
            if let Some(entry) = snap.namespaces.iter().find(|n| n.name() == ns) {
                ctx.report(
                    Kind::Namespace,
                    entry,
                    "PodsIstioProxyImageMismatchInNamespace",
                    vec![pods.into()],
                );
            }
        }
    }
}

/// The proxy image the injector configuration names: `global.proxy.image`, qualified with the
/// hub and tag unless it is already a full reference.
fn proxy_image(cm: &ConfigMap) -> String {
    let Some(v) = injector_values(cm) else {
        return String::new();
    };
    let get = |p: &str| {
        v.pointer(p)
            .and_then(|x| x.as_str())
            .unwrap_or("")
            .to_string()
    };
    let image = get("/global/proxy/image");
    if image.contains('/') {
        image
    } else {
        format!("{}/{}:{}", get("/global/hub"), image, get("/global/tag"))
    }
}

/// The effective proxy image type (`distroless`, `debug`) for a pod: MeshConfig, then root,
/// namespace and workload ProxyConfigs, then the pod's `proxy.istio.io/config` annotation.
struct ImageTypeResolver<'a> {
    mesh: String,
    root: Option<String>,
    namespace: HashMap<&'a str, Option<String>>,
    workload: Vec<(&'a str, &'a BTreeMap<String, String>, Option<String>)>,
}

impl<'a> ImageTypeResolver<'a> {
    fn new(ctx: &Context<'a>) -> Self {
        let root_ns = ctx.mesh.root_namespace();
        let mut r = ImageTypeResolver {
            mesh: ctx
                .mesh
                .default_config
                .as_ref()
                .and_then(|d| d.image.as_ref())
                .map(|i| i.image_type.clone())
                .unwrap_or_default(),
            root: None,
            namespace: HashMap::new(),
            workload: Vec::new(),
        };
        for pc in &ctx.snapshot.proxy_configs {
            let t = pc
                .object
                .spec
                .image
                .as_ref()
                .and_then(|i| i.get("imageType"))
                .and_then(|t| t.as_str())
                .map(str::to_string);
            if pc.namespace() == root_ns {
                r.root = t;
            } else if let Some(sel) = &pc.object.spec.selector {
                r.workload.push((pc.namespace(), &sel.match_labels, t));
            } else {
                r.namespace.insert(pc.namespace(), t);
            }
        }
        r
    }

    fn image_type(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) -> String {
        let mut variant = self.mesh.clone();
        let mut take = |t: &Option<String>| {
            if let Some(t) = t.as_ref().filter(|t| !t.is_empty()) {
                variant = t.clone();
            }
        };
        take(&self.root);
        if let Some(t) = self.namespace.get(ns) {
            take(t);
        }
        for (wns, sel, t) in &self.workload {
            if wns.starts_with(ns) && util::map_contains(sel, labels) {
                take(t);
            }
        }
        if let Some(pc) = annotations
            .get("proxy.istio.io/config")
            .and_then(|a| serde_saphyr::from_str::<isthmus_config::mesh::ProxyConfig>(a).ok())
        {
            take(&pc.image.map(|i| i.image_type));
        }
        if variant == "default" {
            String::new()
        } else {
            variant
        }
    }
}

pub struct ImageAutoAnalyzer;

impl Analyzer for ImageAutoAnalyzer {
    fn name(&self) -> String {
        "injection.ImageAutoAnalyzer".into()
    }
    fn description(&self) -> String {
        "Makes sure that Pods and Deployments with `image: auto` are going to be injected".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let webhooks: Vec<&MutatingWebhook> = snap
            .mutating_webhooks
            .iter()
            .flat_map(|w| w.object.webhooks.iter().flatten())
            .filter(|w| w.name.ends_with("istio.io"))
            .collect();
        for pod in &snap.pods {
            if pod
                .object
                .spec
                .as_ref()
                .is_some_and(|s| has_auto_image(&s.containers))
            {
                ctx.report(
                    Kind::Pod,
                    pod,
                    "ImageAutoWithoutInjectionError",
                    vec!["Pod".into(), pod.name().into()],
                );
            }
        }
        for d in &snap.deployments {
            let Some(spec) = &d.object.spec else { continue };
            let Some(pod) = &spec.template.spec else {
                continue;
            };
            if !has_auto_image(&pod.containers) {
                continue;
            }
            let ns_name = if d.namespace().is_empty() {
                "default"
            } else {
                d.namespace()
            };
            let ns_labels = snap
                .namespaces
                .iter()
                .find(|n| n.name() == ns_name)
                .map(|n| n.labels().clone())
                .unwrap_or_default();
            let pod_labels = spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default();
            let matched = webhooks.iter().any(|w| {
                label_selector_matches(w.namespace_selector.as_ref(), &ns_labels)
                    && label_selector_matches(w.object_selector.as_ref(), &pod_labels)
            });
            if !matched {
                ctx.report(
                    Kind::Deployment,
                    d,
                    "ImageAutoWithoutInjectionWarning",
                    vec!["Deployment".into(), d.name().into()],
                );
            }
        }
    }
}

fn has_auto_image(containers: &[Container]) -> bool {
    containers
        .iter()
        .any(|c| c.name == ISTIO_PROXY && c.image.as_deref() == Some("auto"))
}

/// A Kubernetes `LabelSelector` (matchLabels and matchExpressions); absent matches everything.
pub fn label_selector_matches(
    sel: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(sel) = sel else { return true };
    if let Some(ml) = &sel.match_labels
        && !util::selector_matches(ml, labels)
    {
        return false;
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}
