//! `schema.ValidationAnalyzer.<Kind>`: Istio's validation webhook rules as analyzers.

use isthmus_config::Kind;
use isthmus_config::validate::{Reachability, validate};

use crate::{Analyzer, Context, ResourceRef};

/// The Istio kinds with validation rules, in Istio's collection order.
pub const VALIDATED_KINDS: [Kind; 14] = [
    Kind::AuthorizationPolicy,
    Kind::DestinationRule,
    Kind::EnvoyFilter,
    Kind::Gateway,
    Kind::PeerAuthentication,
    Kind::ProxyConfig,
    Kind::RequestAuthentication,
    Kind::ServiceEntry,
    Kind::Sidecar,
    Kind::Telemetry,
    Kind::VirtualService,
    Kind::WasmPlugin,
    Kind::WorkloadEntry,
    Kind::WorkloadGroup,
];

pub struct ValidationAnalyzer(pub Kind);

impl Analyzer for ValidationAnalyzer {
    fn name(&self) -> String {
        format!("schema.ValidationAnalyzer.{}", self.0.name())
    }
    fn description(&self) -> String {
        format!(
            "Runs schema validation as an analyzer on '{}' resources",
            self.0.name()
        )
    }
    fn analyze(&self, ctx: &mut Context<'_>) {
        for res in ctx.snapshot.of_kind(self.0) {
            let r = ResourceRef {
                kind: self.0.name().to_string(),
                namespace: res.namespace().to_string(),
                name: res.name().to_string(),
                origin: res.origin.clone(),
            };
            let report = validate(&res.object);
            for e in report.errors {
                ctx.report_ref(r.clone(), "SchemaValidationError", vec![e.into()]);
            }
            for w in report.warnings {
                ctx.report_ref(r.clone(), "SchemaWarning", vec![w.into()]);
            }
            for f in report.reachability {
                match f {
                    Reachability::UnreachableRule { rule, reason } => {
                        ctx.report_ref(
                            r.clone(),
                            "VirtualServiceUnreachableRule",
                            vec![rule.into(), reason.into()],
                        );
                    }
                    Reachability::IneffectiveMatch {
                        rule,
                        matched,
                        duplicate_of,
                    } => ctx.report_ref(
                        r.clone(),
                        "VirtualServiceIneffectiveMatch",
                        vec![rule.into(), matched.into(), duplicate_of.into()],
                    ),
                }
            }
        }
    }
}
