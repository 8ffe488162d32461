//! The analyzers, grouped by what they inspect.

pub mod annotations;
pub mod cluster;
pub mod gateway;
pub mod injection;
pub mod selectors;
pub mod traffic;
pub mod virtualservice;
pub mod workloads;

use crate::Analyzer;
use crate::validation::{VALIDATED_KINDS, ValidationAnalyzer};

/// Every analyzer, with whether `istioctl analyze` runs it by default (the alpha-annotation
/// analyzer is opt-in, as in Istio).
pub fn all() -> Vec<(Box<dyn Analyzer>, bool)> {
    let mut v: Vec<(Box<dyn Analyzer>, bool)> = vec![
        (Box::new(annotations::K8sAnalyzer), true),
        (Box::new(annotations::AlphaAnalyzer), false),
        (Box::new(cluster::AuthorizationPoliciesAnalyzer), true),
        (Box::new(cluster::BlockedCidrsAnalyzer), true),
        (Box::new(cluster::ConditionAnalyzer), true),
        (Box::new(workloads::ServiceAssociationAnalyzer), true),
        (Box::new(workloads::ApplicationUidAnalyzer), true),
        (Box::new(cluster::DeprecationAnalyzer), true),
        (Box::new(traffic::CaCertificateAnalyzer), true),
        (Box::new(traffic::SubsetSelectPodAnalyzer), true),
        (Box::new(traffic::EnvoyPatchAnalyzer), true),
        (Box::new(cluster::ExternalControlPlaneAnalyzer), true),
        (Box::new(gateway::IngressGatewayPortAnalyzer), true),
        (Box::new(gateway::CertificateAnalyzer), true),
        (Box::new(gateway::SecretAnalyzer), true),
        (Box::new(gateway::ConflictingGatewayAnalyzer), true),
        (Box::new(injection::InjectionAnalyzer), true),
        (Box::new(injection::ImageAnalyzer), true),
        (Box::new(injection::ImageAutoAnalyzer), true),
        (Box::new(cluster::CrdVersionAnalyzer), true),
        (Box::new(cluster::K8sGatewaySelectorAnalyzer), true),
        (Box::new(cluster::MeshNetworksAnalyzer), true),
        (Box::new(workloads::PortNameAnalyzer), true),
        (Box::new(traffic::ProtocolAddressesAnalyzer), true),
        (
            Box::new(traffic::ConflictingServiceEntryProtocolAnalyzer),
            true,
        ),
        (Box::new(selectors::SidecarSelectorAnalyzer), true),
        (
            Box::new(virtualservice::ConflictingMeshGatewayHostsAnalyzer),
            true,
        ),
        (Box::new(virtualservice::DestinationHostAnalyzer), true),
        (Box::new(virtualservice::DestinationRuleAnalyzer), true),
        (Box::new(virtualservice::GatewayAnalyzer), true),
        (Box::new(virtualservice::JwtClaimRouteAnalyzer), true),
        (Box::new(cluster::WebhookAnalyzer), true),
        (Box::new(cluster::TelemetryProviderAnalyzer), true),
        (Box::new(selectors::TelemetrySelectorAnalyzer), true),
        (Box::new(selectors::TelemetryDefaultSelectorAnalyzer), true),
        (Box::new(cluster::LightstepAnalyzer), true),
    ];
    for k in VALIDATED_KINDS {
        v.push((Box::new(ValidationAnalyzer(k)), true));
    }
    v
}
