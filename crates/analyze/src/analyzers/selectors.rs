//! Selector analyzers of Sidecars and Telemetries: selectors that match no pod, overlapping
//! selectors, several resources without a selector in one namespace, and policies made moot by
//! ambient mode.

use std::collections::{BTreeMap, HashSet};

use isthmus_config::{Entry, HasMetadata, Kind};

use crate::util::{self, selector_matches, selector_string};
use crate::{Analyzer, Context, ResourceRef, resource_ref};

/// A selector-bearing resource, reduced to what the selector analyzers need.
struct Selecting {
    r: ResourceRef,
    namespace: String,
    name: String,
    /// `None`: no selector field at all; `Some(empty)`: a selector with no labels.
    selector: Option<BTreeMap<String, String>>,
}

fn selecting<T: HasMetadata>(
    kind: Kind,
    e: &Entry<T>,
    selector: Option<BTreeMap<String, String>>,
) -> Selecting {
    Selecting {
        r: resource_ref(kind, e),
        namespace: e.namespace().to_string(),
        name: e.name().to_string(),
        selector,
    }
}

/// Resources whose non-empty selector matches no pod in their namespace are reported as
/// `ReferencedResourceNotFound`; returns pod index → selecting resources.
fn match_pods(ctx: &mut Context<'_>, items: &[Selecting]) -> BTreeMap<usize, Vec<usize>> {
    let mut pods_to: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, it) in items.iter().enumerate() {
        let Some(sel) = it.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let mut found = false;
        for (pi, pod) in ctx.snapshot.pods.iter().enumerate() {
            if pod.namespace() == it.namespace && selector_matches(sel, pod.labels()) {
                found = true;
                pods_to.entry(pi).or_default().push(i);
            }
        }
        if !found {
            ctx.report_ref(
                it.r.clone(),
                "ReferencedResourceNotFound",
                vec!["selector".into(), selector_string(sel).into()],
            );
        }
    }
    pods_to
}

fn names(items: &[Selecting], idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| items[i].name.clone()).collect()
}

pub struct SidecarSelectorAnalyzer;

impl Analyzer for SidecarSelectorAnalyzer {
    fn name(&self) -> String {
        "sidecar.SelectorAnalyzer".into()
    }
    fn description(&self) -> String {
        "Validates that sidecars that define a workload selector match at least one pod, and that there aren't multiple sidecar resources that select overlapping pods".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let snap = ctx.snapshot;
        let items: Vec<Selecting> = snap
            .sidecars
            .iter()
            .map(|s| {
                selecting(
                    Kind::Sidecar,
                    s,
                    s.object
                        .spec
                        .workload_selector
                        .as_ref()
                        .map(|w| w.labels.clone()),
                )
            })
            .collect();
        let pods_to = match_pods(ctx, &items);
        let mut reported = HashSet::new();
        for (pi, list) in &pods_to {
            let pod = &snap.pods[*pi];
            let ambient = util::pod_in_ambient(pod.annotations());
            if list.len() == 1 && !ambient {
                continue;
            }
            let sidecar_names = names(&items, list);
            for &i in list {
                if ambient {
                    if reported.insert(i) {
                        ctx.report_ref(
                            items[i].r.clone(),
                            "IneffectivePolicy",
                            vec![
                                "selected workload is in ambient mode, the policy has no impact"
                                    .into(),
                            ],
                        );
                    }
                    continue;
                }
                ctx.report_ref(
                    items[i].r.clone(),
                    "ConflictingSidecarWorkloadSelectors",
                    vec![
                        sidecar_names.clone().into(),
                        pod.namespace().into(),
                        pod.name().into(),
                    ],
                );
            }
        }
        // Namespace-wide sidecars: no selector, or one with no labels.
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            if it.selector.as_ref().is_none_or(|s| s.is_empty()) {
                by_ns.entry(&it.namespace).or_default().push(i);
            }
        }
        for (ns, list) in by_ns {
            let ns_entry = snap
                .namespaces
                .iter()
                .map(|n| &**n)
                .find(|n| n.name() == ns);
            if util::namespace_in_ambient(ns_entry) {
                for &i in &list {
                    if reported.insert(i) {
                        ctx.report_ref(
                            items[i].r.clone(),
                            "IneffectivePolicy",
                            vec!["namespace is in ambient mode, the policy has no impact".into()],
                        );
                    }
                }
                continue;
            }
            if list.len() > 1 {
                let sidecar_names = names(&items, &list);
                for &i in &list {
                    ctx.report_ref(
                        items[i].r.clone(),
                        "MultipleSidecarsWithoutWorkloadSelectors",
                        vec![sidecar_names.clone().into(), ns.into()],
                    );
                }
            }
        }
    }
}

fn telemetry_items(ctx: &Context<'_>) -> Vec<Selecting> {
    ctx.snapshot
        .telemetries
        .iter()
        .map(|t| {
            selecting(
                Kind::Telemetry,
                t,
                t.object
                    .spec
                    .selector
                    .as_ref()
                    .map(|s| s.match_labels.clone()),
            )
        })
        .collect()
}

pub struct TelemetrySelectorAnalyzer;

impl Analyzer for TelemetrySelectorAnalyzer {
    fn name(&self) -> String {
        "telemetry.SelectorAnalyzer".into()
    }
    fn description(&self) -> String {
        "Validates that telemetries that define a selector match at least one pod, and that there aren't multiple telemetry resources that select overlapping pods".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let items = telemetry_items(ctx);
        let pods_to = match_pods(ctx, &items);
        for (pi, list) in &pods_to {
            if list.len() < 2 {
                continue;
            }
            let pod = &ctx.snapshot.pods[*pi];
            let tel_names = names(&items, list);
            for &i in list {
                ctx.report_ref(
                    items[i].r.clone(),
                    "ConflictingTelemetryWorkloadSelectors",
                    vec![
                        tel_names.clone().into(),
                        pod.namespace().into(),
                        pod.name().into(),
                    ],
                );
            }
        }
    }
}

pub struct TelemetryDefaultSelectorAnalyzer;

impl Analyzer for TelemetryDefaultSelectorAnalyzer {
    fn name(&self) -> String {
        "telemetry.DefaultSelectorAnalyzer".into()
    }
    fn description(&self) -> String {
        "Validates that there aren't multiple telemetry resources that have no selector".into()
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        let items = telemetry_items(ctx);
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            if it.selector.is_none() {
                by_ns.entry(&it.namespace).or_default().push(i);
            }
        }
        for (ns, list) in by_ns {
            if list.len() > 1 {
                let tel_names = names(&items, &list);
                for &i in &list {
                    ctx.report_ref(
                        items[i].r.clone(),
                        "MultipleTelemetriesWithoutWorkloadSelectors",
                        vec![tel_names.clone().into(), ns.into()],
                    );
                }
            }
        }
    }
}
