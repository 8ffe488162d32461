//! Analyzers of Kubernetes workloads and services: `deployment.MultiServiceAnalyzer`,
//! `applicationUID.Analyzer`, `service.PortNameAnalyzer`.

use std::collections::BTreeMap;

use isthmus_config::k8s_openapi::api::core::v1::{PodSpec, ServicePort};
use isthmus_config::k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use isthmus_config::{Entry, HasMetadata, Kind};
use isthmus_registry::Protocol;

use crate::util::{self, is_istio_control_plane, is_system_namespace};
use crate::{Analyzer, Arg, Context};

/// The UID the sidecar runs as; an application using it escapes capture.
pub const PROXY_UID: i64 = 1337;

pub struct ServiceAssociationAnalyzer;

impl Analyzer for ServiceAssociationAnalyzer {
    fn name(&self) -> String {
        "deployment.MultiServiceAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks association between services and pods".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for d in &snap.deployments {
            if d.labels()
                .get("gateway.istio.io/managed")
                .map(String::as_str)
                == Some("istio.io-mesh-controller")
            {
                continue;
            }
            let Some(spec) = &d.object.spec else { continue };
            let tmpl_meta = spec.template.metadata.clone().unwrap_or_default();
            let tmpl_labels = tmpl_meta.labels.unwrap_or_default();
            let tmpl_ann = tmpl_meta.annotations.unwrap_or_default();
            let pod = spec.template.spec.clone().unwrap_or_default();
            let containers: Vec<_> = pod.containers.iter().collect();
            if !util::in_mesh(&tmpl_ann, &tmpl_labels, d.namespace(), &containers, snap) {
                continue;
            }
            let matching: Vec<(String, &Vec<ServicePort>)> = snap
                .services
                .iter()
                .filter(|s| s.namespace() == d.namespace())
                .filter_map(|s| {
                    let sp = s.object.spec.as_ref()?;
                    let sel = sp.selector.as_ref().filter(|sel| !sel.is_empty())?;
                    util::selector_matches(sel, &tmpl_labels)
                        .then(|| (format!("{}/{}", s.namespace(), s.name()), sp.ports.as_ref()))
                        .and_then(|(n, p)| Some((n, p?)))
                })
                .collect();

            // port -> protocol -> services
            let mut ports: BTreeMap<i32, BTreeMap<String, Vec<String>>> = BTreeMap::new();
            // targetPort -> port -> service
            let mut targets: BTreeMap<String, BTreeMap<i32, String>> = BTreeMap::new();
            for (name, sports) in &matching {
                for p in sports.iter() {
                    let proto = p
                        .protocol
                        .clone()
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "TCP".into());
                    ports
                        .entry(p.port)
                        .or_default()
                        .entry(proto)
                        .or_default()
                        .push(name.clone());
                    let tp = match &p.target_port {
                        Some(IntOrString::Int(n)) if *n != 0 => n.to_string(),
                        Some(IntOrString::String(s)) if !s.is_empty() && s != "0" => s.clone(),
                        _ => p.port.to_string(),
                    };
                    targets.entry(tp).or_default().insert(p.port, name.clone());
                }
            }
            for (port, protos) in &ports {
                if protos.len() > 1 {
                    let mut names: Vec<String> = protos.values().flatten().cloned().collect();
                    names.sort();
                    ctx.report(
                        Kind::Deployment,
                        d,
                        "DeploymentAssociatedToMultipleServices",
                        vec![d.name().into(), Arg::Int((*port).into()), names.into()],
                    );
                }
            }
            for (tp, by_port) in &targets {
                if by_port.len() > 1 {
                    let mut names: Vec<String> = by_port.values().cloned().collect();
                    names.sort();
                    let ports: Vec<i64> = by_port.keys().map(|p| (*p).into()).collect();
                    ctx.report(
                        Kind::Deployment,
                        d,
                        "DeploymentConflictingPorts",
                        vec![d.name().into(), names.into(), tp.into(), ports.into()],
                    );
                }
            }
        }
    }
}

pub struct ApplicationUidAnalyzer;

impl Analyzer for ApplicationUidAnalyzer {
    fn name(&self) -> String {
        "applicationUID.Analyzer".into()
    }
    fn description(&self) -> String {
        "Checks invalid application UID".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for p in &snap.pods {
            if let Some(spec) = &p.object.spec {
                uid_1337(ctx, Kind::Pod, p, spec);
            }
        }
        for d in &snap.deployments {
            if let Some(spec) = d
                .object
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
            {
                uid_1337(ctx, Kind::Deployment, d, spec);
            }
        }
    }
}

fn uid_1337<T: HasMetadata>(ctx: &mut Context<'_>, kind: Kind, e: &Entry<T>, spec: &PodSpec) {
    if is_istio_control_plane(e.labels()) {
        return;
    }
    if spec.security_context.as_ref().and_then(|s| s.run_as_user) == Some(PROXY_UID) {
        ctx.report(kind, e, "InvalidApplicationUID", vec![]);
    }
    for c in &spec.containers {
        if c.name == util::ISTIO_PROXY || c.name == util::ISTIO_OPERATOR {
            continue;
        }
        if c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(PROXY_UID) {
            ctx.report(kind, e, "InvalidApplicationUID", vec![]);
        }
    }
}

pub struct PortNameAnalyzer;

impl Analyzer for PortNameAnalyzer {
    fn name(&self) -> String {
        "service.PortNameAnalyzer".into()
    }
    fn description(&self) -> String {
        "Checks the port names associated with each service".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        for s in &snap.services {
            if is_system_namespace(s.namespace()) || is_istio_control_plane(s.labels()) {
                continue;
            }
            let Some(spec) = &s.object.spec else { continue };
            let external_name = spec.type_.as_deref() == Some("ExternalName");
            for p in spec.ports.iter().flatten() {
                let name = p.name.clone().unwrap_or_default();
                let proto = Protocol::for_kube_port(
                    u16::try_from(p.port).unwrap_or(0),
                    &name,
                    p.protocol.as_deref(),
                    p.app_protocol.as_deref(),
                );
                if proto != Protocol::Unknown && !(name == "tcp" && external_name) {
                    continue;
                }
                if external_name {
                    ctx.report(
                        Kind::Service,
                        s,
                        "ExternalNameServiceTypeInvalidPortName",
                        vec![],
                    );
                } else {
                    let target = match &p.target_port {
                        Some(IntOrString::Int(n)) => n.to_string(),
                        Some(IntOrString::String(s)) => s.clone(),
                        None => "0".into(),
                    };
                    ctx.report(
                        Kind::Service,
                        s,
                        "PortNameIsNotUnderNamingConvention",
                        vec![name.into(), Arg::Int(p.port.into()), target.into()],
                    );
                }
            }
        }
    }
}
