//! `annotations.K8sAnalyzer` and `annotations.AlphaAnalyzer`: Istio annotations that are unknown,
//! misplaced, invalid, deprecated, or alpha.

use std::collections::BTreeMap;

use isthmus_config::{Entry, HasMetadata, Kind};

use crate::{Analyzer, Context, resource_ref};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Alpha,
    Beta,
    Stable,
}

/// Where an annotation may be placed (`Any` for every kind).
const ANY: &str = "Any";

struct AnnotationDef {
    name: &'static str,
    status: Status,
    deprecated: bool,
    resources: &'static [&'static str],
}

macro_rules! ann {
    ($name:literal, $status:ident, [$($r:literal),*]) => {
        AnnotationDef { name: $name, status: Status::$status, deprecated: false, resources: &[$($r),*] }
    };
    ($name:literal, $status:ident, [$($r:literal),*], deprecated) => {
        AnnotationDef { name: $name, status: Status::$status, deprecated: true, resources: &[$($r),*] }
    };
}

/// Istio's annotation catalogue (`istio.io/api/annotation`).
const ANNOTATIONS: &[AnnotationDef] = &[
    ann!(
        "alpha.istio.io/canonical-serviceaccounts",
        Alpha,
        ["Service"],
        deprecated
    ),
    ann!("alpha.istio.io/identity", Alpha, ["Pod"], deprecated),
    ann!(
        "alpha.istio.io/kubernetes-serviceaccounts",
        Alpha,
        ["Service"],
        deprecated
    ),
    ann!("ambient.istio.io/bypass-inbound-capture", Alpha, ["Pod"]),
    ann!("ambient.istio.io/dns-capture", Beta, ["Pod"]),
    ann!("ambient.istio.io/redirection", Beta, ["Pod"]),
    ann!("ambient.istio.io/waypoint-inbound-binding", Alpha, ["Any"]),
    ann!("galley.istio.io/analyze-suppress", Alpha, ["Any"]),
    ann!("gateway.istio.io/controller-version", Beta, ["Any"]),
    ann!("gateway.istio.io/name-override", Alpha, ["Gateway"]),
    ann!("gateway.istio.io/service-account", Alpha, ["Gateway"]),
    ann!("gateway.istio.io/tls-cipher-suites", Alpha, ["Gateway"]),
    ann!("gateway.istio.io/tls-terminate-mode", Alpha, ["Gateway"]),
    ann!("inject.istio.io/templates", Alpha, ["Pod"]),
    ann!("install.operator.istio.io/chart-owner", Alpha, ["Any"]),
    ann!("install.operator.istio.io/owner-generation", Alpha, ["Any"]),
    ann!("install.operator.istio.io/version", Alpha, ["Any"]),
    ann!("istio.io/autoRegistrationGroup", Alpha, ["WorkloadEntry"]),
    ann!("istio.io/connectedAt", Alpha, ["WorkloadEntry"]),
    ann!("istio.io/disconnectedAt", Alpha, ["WorkloadEntry"]),
    ann!("istio.io/dry-run", Alpha, ["AuthorizationPolicy"]),
    ann!("istio.io/rev", Beta, ["Pod"]),
    ann!("istio.io/workloadController", Alpha, ["WorkloadEntry"]),
    ann!("kubernetes.io/ingress.class", Stable, ["Ingress"]),
    ann!("networking.istio.io/address-type", Alpha, ["Gateway"]),
    ann!("networking.istio.io/exportTo", Alpha, ["Service"]),
    ann!("networking.istio.io/service-type", Alpha, ["Gateway"]),
    ann!(
        "networking.istio.io/traffic-distribution",
        Beta,
        ["Service", "ServiceEntry"]
    ),
    ann!("prometheus.istio.io/merge-metrics", Alpha, ["Pod"]),
    ann!("proxy.istio.io/config", Beta, ["Pod"]),
    ann!("proxy.istio.io/overrides", Alpha, ["Pod"]),
    ann!(
        "readiness.status.sidecar.istio.io/applicationPorts",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "readiness.status.sidecar.istio.io/failureThreshold",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "readiness.status.sidecar.istio.io/initialDelaySeconds",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "readiness.status.sidecar.istio.io/periodSeconds",
        Alpha,
        ["Pod"]
    ),
    ann!("sidecar.istio.io/agentLogLevel", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/bootstrapOverride", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/componentLogLevel", Alpha, ["Pod"]),
    ann!(
        "sidecar.istio.io/controlPlaneAuthPolicy",
        Alpha,
        ["Pod"],
        deprecated
    ),
    ann!(
        "sidecar.istio.io/discoveryAddress",
        Alpha,
        ["Pod"],
        deprecated
    ),
    ann!("sidecar.istio.io/enableCoreDump", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/extraStatTags", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/inject", Beta, ["Pod"], deprecated),
    ann!("sidecar.istio.io/interceptionMode", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/logLevel", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/nativeSidecar", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyCPU", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyCPULimit", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyImage", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyImageType", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyMemory", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/proxyMemoryLimit", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/rewriteAppHTTPProbers", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/statsCompression", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/statsFlushInterval", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/statsHistogramBuckets", Alpha, ["Pod"]),
    ann!(
        "sidecar.istio.io/statsInclusionPrefixes",
        Alpha,
        ["Pod"],
        deprecated
    ),
    ann!(
        "sidecar.istio.io/statsInclusionRegexps",
        Alpha,
        ["Pod"],
        deprecated
    ),
    ann!(
        "sidecar.istio.io/statsInclusionSuffixes",
        Alpha,
        ["Pod"],
        deprecated
    ),
    ann!("sidecar.istio.io/status", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/userVolume", Alpha, ["Pod"]),
    ann!("sidecar.istio.io/userVolumeMount", Alpha, ["Pod"]),
    ann!("status.sidecar.istio.io/port", Alpha, ["Pod"]),
    ann!("topology.istio.io/controlPlaneClusters", Alpha, ["Any"]),
    ann!("traffic.istio.io/nodeSelector", Alpha, ["Service"]),
    ann!(
        "traffic.sidecar.istio.io/excludeInboundPorts",
        Alpha,
        ["Pod"]
    ),
    ann!("traffic.sidecar.istio.io/excludeInterfaces", Alpha, ["Pod"]),
    ann!(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "traffic.sidecar.istio.io/includeInboundPorts",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "traffic.sidecar.istio.io/includeOutboundIPRanges",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "traffic.sidecar.istio.io/includeOutboundPorts",
        Alpha,
        ["Pod"]
    ),
    ann!(
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        Alpha,
        ["Pod"]
    ),
];

fn lookup(name: &str) -> Option<&'static AnnotationDef> {
    ANNOTATIONS.iter().find(|a| a.name == name)
}

/// Annotations Istio analyzes: `kubernetes.io/ingress.class` and anything under `*istio.io/`.
fn is_istio_annotation(ann: &str) -> bool {
    ann == "kubernetes.io/ingress.class"
        || ann
            .split('/')
            .next()
            .is_some_and(|p| p.ends_with("istio.io"))
}

/// The injector's validation of annotation values.
fn validate(name: &str, value: &str) -> Result<(), String> {
    match name {
        "sidecar.istio.io/interceptionMode" => match value {
            "REDIRECT" | "TPROXY" | "NONE" => Ok(()),
            _ => Err(format!(
                "interceptionMode invalid, use REDIRECT,TPROXY,NONE: {value}"
            )),
        },
        "sidecar.istio.io/enableCoreDump" | "prometheus.istio.io/merge-metrics" => match value {
            "1" | "t" | "T" | "TRUE" | "true" | "True" | "0" | "f" | "F" | "FALSE" | "false"
            | "False" => Ok(()),
            _ => Err(format!(
                "strconv.ParseBool: parsing {value:?}: invalid syntax"
            )),
        },
        "status.sidecar.istio.io/port" => match value.parse::<i64>() {
            Ok(p) if (0..=65535).contains(&p) => Ok(()),
            Ok(p) => Err(format!("port number {p} must be in the range 1..65535")),
            Err(_) => Err(format!("strconv.Atoi: parsing {value:?}: invalid syntax")),
        },
        "readiness.status.sidecar.istio.io/initialDelaySeconds"
        | "readiness.status.sidecar.istio.io/periodSeconds"
        | "readiness.status.sidecar.istio.io/failureThreshold" => value
            .parse::<u32>()
            .map(|_| ())
            .map_err(|_| format!("strconv.ParseUint: parsing {value:?}: invalid syntax")),
        "traffic.sidecar.istio.io/includeOutboundIPRanges" => {
            if value == "*" {
                Ok(())
            } else {
                validate_cidrs(value)
            }
        }
        "traffic.sidecar.istio.io/excludeOutboundIPRanges" => validate_cidrs(value),
        "traffic.sidecar.istio.io/includeInboundPorts" => {
            if value == "*" {
                Ok(())
            } else {
                validate_ports(value)
            }
        }
        "traffic.sidecar.istio.io/excludeInboundPorts"
        | "traffic.sidecar.istio.io/excludeOutboundPorts"
        | "traffic.sidecar.istio.io/includeOutboundPorts" => validate_ports(value),
        "proxy.istio.io/config" => {
            serde_saphyr::from_str::<isthmus_config::mesh::ProxyConfig>(value)
                .map(|_| ())
                .map_err(|e| format!("failed to unmarshal proxy config: {e}"))
        }
        _ => Ok(()),
    }
}

fn validate_cidrs(value: &str) -> Result<(), String> {
    for cidr in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if cidr.parse::<ipnet::IpNet>().is_err() {
            return Err(format!("failed parsing cidr '{cidr}'"));
        }
    }
    Ok(())
}

fn validate_ports(value: &str) -> Result<(), String> {
    for p in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => {}
            _ => return Err(format!("port {p} is invalid")),
        }
    }
    Ok(())
}

pub struct K8sAnalyzer;

impl Analyzer for K8sAnalyzer {
    fn name(&self) -> String {
        "annotations.K8sAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks for misplaced and invalid Istio annotations in Kubernetes resources".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for e in &snap.namespaces {
            check(ctx, Kind::Namespace, e);
        }
        for e in &snap.services {
            check(ctx, Kind::Service, e);
        }
        for e in &snap.pods {
            check(ctx, Kind::Pod, e);
        }
        for e in &snap.deployments {
            check(ctx, Kind::Deployment, e);
        }
    }
}

fn check<T: HasMetadata>(ctx: &mut Context<'_>, kind: Kind, e: &Entry<T>) {
    let annotations: &BTreeMap<String, String> = e.annotations();
    for (ann, value) in annotations {
        if !is_istio_annotation(ann) {
            continue;
        }
        let Some(def) = lookup(ann) else {
            ctx.report(kind, e, "UnknownAnnotation", vec![ann.into()]);
            continue;
        };
        if def.deprecated {
            let has_label = e.labels().contains_key("sidecar.istio.io/inject");
            if !(has_label && ann == "sidecar.istio.io/inject") {
                let extra = if ann == "sidecar.istio.io/inject" {
                    " in favor of the \"sidecar.istio.io/inject\" label"
                } else {
                    ""
                };
                ctx.report(
                    kind,
                    e,
                    "DeprecatedAnnotation",
                    vec![ann.into(), extra.into()],
                );
            }
        }
        if def.resources.contains(&ANY) {
            continue;
        }
        if !def.resources.contains(&kind.name()) {
            ctx.report(
                kind,
                e,
                "MisplacedAnnotation",
                vec![ann.into(), def.resources.join(", ").into()],
            );
            continue;
        }
        if let Err(err) = validate(ann, value) {
            ctx.report(kind, e, "InvalidAnnotation", vec![ann.into(), err.into()]);
        }
    }
}

pub struct AlphaAnalyzer;

/// Annotations the CNI plugin sets by default: not the user's doing, so not reported.
const CNI_DEFAULTS: [&str; 4] = [
    "sidecar.istio.io/interceptionMode",
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
];

impl Analyzer for AlphaAnalyzer {
    fn name(&self) -> String {
        "annotations.AlphaAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks for alpha Istio annotations in Kubernetes resources".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for e in &snap.namespaces {
            alpha(ctx, Kind::Namespace, e, false);
        }
        for e in &snap.services {
            alpha(ctx, Kind::Service, e, false);
        }
        for e in &snap.pods {
            // Without an istio-init container the CNI plugin set up capture, and its annotations.
            let cni = !e
                .object
                .spec
                .as_ref()
                .and_then(|s| s.init_containers.as_ref())
                .is_some_and(|ics| ics.iter().any(|c| c.name == "istio-init"));
            alpha(ctx, Kind::Pod, e, cni);
        }
        for e in &snap.deployments {
            alpha(ctx, Kind::Deployment, e, false);
        }
    }
}

fn alpha<T: HasMetadata>(ctx: &mut Context<'_>, kind: Kind, e: &Entry<T>, skip_cni_defaults: bool) {
    for ann in e.annotations().keys() {
        if !is_istio_annotation(ann) {
            continue;
        }
        let Some(def) = lookup(ann) else { continue };
        if def.status != Status::Alpha || def.name == "sidecar.istio.io/status" {
            continue;
        }
        if skip_cni_defaults && CNI_DEFAULTS.contains(&def.name) {
            continue;
        }
        ctx.report_ref(resource_ref(kind, e), "AlphaAnnotation", vec![ann.into()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_validation() {
        assert!(validate("readiness.status.sidecar.istio.io/periodSeconds", "10").is_ok());
        assert!(validate("readiness.status.sidecar.istio.io/periodSeconds", "bar").is_err());
        assert!(validate("traffic.sidecar.istio.io/includeOutboundIPRanges", "*").is_ok());
        assert!(
            validate(
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/8,x"
            )
            .is_err()
        );
        assert!(validate("sidecar.istio.io/interceptionMode", "TPROXY").is_ok());
        assert!(validate("proxy.istio.io/config", "{}").is_ok());
        assert!(
            validate(
                "proxy.istio.io/config",
                "holdApplicationUntilProxyStarts: true"
            )
            .is_ok()
        );
    }

    #[test]
    fn istio_annotations() {
        assert!(is_istio_annotation("sidecar.istio.io/inject"));
        assert!(is_istio_annotation("networking.istio.io/exportTo"));
        assert!(is_istio_annotation("kubernetes.io/ingress.class"));
        assert!(!is_istio_annotation("kubernetes.io/psp"));
    }
}
