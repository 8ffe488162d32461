//! The kinds isthmus reads, their API groups and versions, and a typed snapshot of them.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::istio::common::IstioObject;
use crate::istio::networking::*;
use crate::istio::security::*;
use crate::istio::telemetry::TelemetrySpec;

/// Where a resource was read from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// File path, or `-` for standard input.
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based line where the document starts.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.is_empty() {
            return f.write_str("<built-in>");
        }
        write!(
            f,
            "{}:{} (document {})",
            self.file, self.line, self.document
        )
    }
}

/// Access to Kubernetes object metadata, whatever the object's type.
pub trait HasMetadata {
    fn metadata(&self) -> &ObjectMeta;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
}

/// A resource of type `T` with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry<T> {
    pub origin: Origin,
    pub api_version: String,
    pub object: T,
}

impl<T: HasMetadata> Entry<T> {
    pub fn name(&self) -> &str {
        self.object.metadata().name.as_deref().unwrap_or("")
    }
    /// The namespace, empty for cluster-scoped resources or when none was given.
    pub fn namespace(&self) -> &str {
        self.object.metadata().namespace.as_deref().unwrap_or("")
    }
    pub fn labels(&self) -> &std::collections::BTreeMap<String, String> {
        static EMPTY: std::collections::BTreeMap<String, String> =
            std::collections::BTreeMap::new();
        self.object.metadata().labels.as_ref().unwrap_or(&EMPTY)
    }
    pub fn annotations(&self) -> &std::collections::BTreeMap<String, String> {
        static EMPTY: std::collections::BTreeMap<String, String> =
            std::collections::BTreeMap::new();
        self.object
            .metadata()
            .annotations
            .as_ref()
            .unwrap_or(&EMPTY)
    }
}

impl<S> HasMetadata for IstioObject<S> {
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

macro_rules! k8s_has_metadata {
    ($($t:ty),*) => {$(
        impl HasMetadata for $t {
            fn metadata(&self) -> &ObjectMeta { &self.metadata }
            fn metadata_mut(&mut self) -> &mut ObjectMeta { &mut self.metadata }
        }
    )*};
}
k8s_has_metadata!(
    Namespace,
    Node,
    Ingress,
    Service,
    Pod,
    ConfigMap,
    Secret,
    ServiceAccount,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    EndpointSlice,
    MutatingWebhookConfiguration,
    ValidatingWebhookConfiguration
);

pub type VirtualService = IstioObject<VirtualServiceSpec>;
pub type DestinationRule = IstioObject<DestinationRuleSpec>;
pub type Gateway = IstioObject<GatewaySpec>;
pub type ServiceEntry = IstioObject<ServiceEntrySpec>;
pub type Sidecar = IstioObject<SidecarSpec>;
pub type WorkloadEntry = IstioObject<WorkloadEntrySpec>;
pub type WorkloadGroup = IstioObject<WorkloadGroupSpec>;
pub type EnvoyFilter = IstioObject<EnvoyFilterSpec>;
pub type ProxyConfigResource = IstioObject<ProxyConfigSpec>;
pub type PeerAuthentication = IstioObject<PeerAuthenticationSpec>;
pub type RequestAuthentication = IstioObject<RequestAuthenticationSpec>;
pub type AuthorizationPolicy = IstioObject<AuthorizationPolicySpec>;
pub type Telemetry = IstioObject<TelemetrySpec>;
/// Kinds isthmus reads without interpreting the spec (Gateway API, WasmPlugin, CRDs).
pub type GenericObject = IstioObject<Value>;

const CORE: &str = "";
const APPS: &str = "apps";
const BATCH: &str = "batch";
const DISCOVERY: &str = "discovery.k8s.io";
const ADMISSION: &str = "admissionregistration.k8s.io";
const APIEXT: &str = "apiextensions.k8s.io";
const NETWORKING: &str = "networking.istio.io";
const SECURITY: &str = "security.istio.io";
const TELEMETRY: &str = "telemetry.istio.io";
const EXTENSIONS: &str = "extensions.istio.io";
const GATEWAY_API: &str = "gateway.networking.k8s.io";

macro_rules! kinds {
    ($( $variant:ident : $ty:ty => $field:ident, $group:expr, $kind:literal, [$($ver:literal),+], $namespaced:literal; )*) => {
        /// Every kind isthmus reads.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind { $($variant),* }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            /// The `kind` field's value.
            pub fn name(self) -> &'static str {
                match self { $(Kind::$variant => $kind),* }
            }
            /// The API group, empty for the core group.
            pub fn group(self) -> &'static str {
                match self { $(Kind::$variant => $group),* }
            }
            /// The versions served for this kind, preferred first.
            pub fn versions(self) -> &'static [&'static str] {
                match self { $(Kind::$variant => &[$($ver),+]),* }
            }
            pub fn namespaced(self) -> bool {
                match self { $(Kind::$variant => $namespaced),* }
            }
            /// The kind for an apiVersion group and kind name.
            pub fn lookup(group: &str, kind: &str) -> Option<Kind> {
                $(if group == $group && kind == $kind { return Some(Kind::$variant); })*
                None
            }
        }

        /// One typed resource of any kind.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Object { $($variant(Box<$ty>)),* }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self { $(Object::$variant(_) => Kind::$variant),* }
            }
            pub fn metadata(&self) -> &ObjectMeta {
                match self { $(Object::$variant(o) => o.metadata()),* }
            }
            pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
                match self { $(Object::$variant(o) => o.metadata_mut()),* }
            }
            /// The object as JSON, as `kubectl get -o json` would show it.
            pub fn to_json(&self) -> Value {
                match self { $(Object::$variant(o) => serde_json::to_value(o).unwrap_or(Value::Null)),* }
            }
        }

        /// Every resource read, by kind, in the order read.
        #[derive(Debug, Clone, Default, PartialEq)]
        pub struct Snapshot {
            $(pub $field: Vec<Arc<Entry<$ty>>>,)*
        }

        impl Snapshot {
            /// Adds a resource to its kind's list.
            pub fn push(&mut self, r: Resource) {
                let Resource { origin, api_version, object } = r;
                match object {
                    $(Object::$variant(o) => self.$field.push(Arc::new(Entry { origin, api_version, object: *o })),)*
                }
            }
            /// Adds every resource of `other`, shared rather than copied.
            pub fn extend_shared(&mut self, other: &Snapshot) {
                $(self.$field.extend(other.$field.iter().cloned());)*
            }
            /// Whether both hold the same resources, leaving out the kinds in `skip`.
            pub fn same_except(&self, other: &Snapshot, skip: &[Kind]) -> bool {
                true $(&& (skip.contains(&Kind::$variant) || self.$field == other.$field))*
            }
            /// Number of resources of all kinds.
            pub fn len(&self) -> usize {
                0 $(+ self.$field.len())*
            }
            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
            /// Every resource as `(kind, origin, metadata)`, kind by kind.
            pub fn all_metadata(&self) -> Vec<(Kind, &Origin, &ObjectMeta)> {
                let mut out = Vec::with_capacity(self.len());
                $(out.extend(self.$field.iter().map(|e| (Kind::$variant, &e.origin, e.object.metadata())));)*
                out
            }
            /// The resources of one kind, cloned back into [`Resource`]s.
            pub fn of_kind(&self, kind: Kind) -> Vec<Resource> {
                match kind {
                    $(Kind::$variant => self.$field.iter().map(|e| Resource {
                        origin: e.origin.clone(),
                        api_version: e.api_version.clone(),
                        object: Object::$variant(Box::new(e.object.clone())),
                    }).collect(),)*
                }
            }
        }

        pub(crate) fn decode_object<'de, D: serde::Deserializer<'de>>(
            kind: Kind,
            d: D,
        ) -> Result<Object, D::Error> {
            use serde::Deserialize;
            Ok(match kind {
                $(Kind::$variant => Object::$variant(Box::new(<$ty>::deserialize(d)?)),)*
            })
        }
    };
}

kinds! {
    Namespace: Namespace => namespaces, CORE, "Namespace", ["v1"], false;
    Node: Node => nodes, CORE, "Node", ["v1"], false;
    Service: Service => services, CORE, "Service", ["v1"], true;
    Pod: Pod => pods, CORE, "Pod", ["v1"], true;
    ConfigMap: ConfigMap => config_maps, CORE, "ConfigMap", ["v1"], true;
    Secret: Secret => secrets, CORE, "Secret", ["v1"], true;
    ServiceAccount: ServiceAccount => service_accounts, CORE, "ServiceAccount", ["v1"], true;
    Deployment: Deployment => deployments, APPS, "Deployment", ["v1"], true;
    StatefulSet: StatefulSet => stateful_sets, APPS, "StatefulSet", ["v1"], true;
    DaemonSet: DaemonSet => daemon_sets, APPS, "DaemonSet", ["v1"], true;
    ReplicaSet: ReplicaSet => replica_sets, APPS, "ReplicaSet", ["v1"], true;
    Job: Job => jobs, BATCH, "Job", ["v1"], true;
    Ingress: Ingress => ingresses, "networking.k8s.io", "Ingress", ["v1"], true;
    EndpointSlice: EndpointSlice => endpoint_slices, DISCOVERY, "EndpointSlice", ["v1"], true;
    MutatingWebhookConfiguration: MutatingWebhookConfiguration => mutating_webhooks, ADMISSION, "MutatingWebhookConfiguration", ["v1"], false;
    ValidatingWebhookConfiguration: ValidatingWebhookConfiguration => validating_webhooks, ADMISSION, "ValidatingWebhookConfiguration", ["v1"], false;
    CustomResourceDefinition: GenericObject => custom_resource_definitions, APIEXT, "CustomResourceDefinition", ["v1"], false;
    VirtualService: VirtualService => virtual_services, NETWORKING, "VirtualService", ["v1", "v1beta1", "v1alpha3"], true;
    DestinationRule: DestinationRule => destination_rules, NETWORKING, "DestinationRule", ["v1", "v1beta1", "v1alpha3"], true;
    Gateway: Gateway => gateways, NETWORKING, "Gateway", ["v1", "v1beta1", "v1alpha3"], true;
    ServiceEntry: ServiceEntry => service_entries, NETWORKING, "ServiceEntry", ["v1", "v1beta1", "v1alpha3"], true;
    Sidecar: Sidecar => sidecars, NETWORKING, "Sidecar", ["v1", "v1beta1", "v1alpha3"], true;
    WorkloadEntry: WorkloadEntry => workload_entries, NETWORKING, "WorkloadEntry", ["v1", "v1beta1", "v1alpha3"], true;
    WorkloadGroup: WorkloadGroup => workload_groups, NETWORKING, "WorkloadGroup", ["v1", "v1beta1", "v1alpha3"], true;
    EnvoyFilter: EnvoyFilter => envoy_filters, NETWORKING, "EnvoyFilter", ["v1alpha3"], true;
    ProxyConfig: ProxyConfigResource => proxy_configs, NETWORKING, "ProxyConfig", ["v1beta1"], true;
    PeerAuthentication: PeerAuthentication => peer_authentications, SECURITY, "PeerAuthentication", ["v1", "v1beta1"], true;
    RequestAuthentication: RequestAuthentication => request_authentications, SECURITY, "RequestAuthentication", ["v1", "v1beta1"], true;
    AuthorizationPolicy: AuthorizationPolicy => authorization_policies, SECURITY, "AuthorizationPolicy", ["v1", "v1beta1"], true;
    Telemetry: Telemetry => telemetries, TELEMETRY, "Telemetry", ["v1", "v1alpha1"], true;
    WasmPlugin: GenericObject => wasm_plugins, EXTENSIONS, "WasmPlugin", ["v1alpha1"], true;
    KubernetesGateway: GenericObject => kubernetes_gateways, GATEWAY_API, "Gateway", ["v1", "v1beta1", "v1alpha2"], true;
    GatewayClass: GenericObject => gateway_classes, GATEWAY_API, "GatewayClass", ["v1", "v1beta1", "v1alpha2"], false;
    HttpRoute: GenericObject => http_routes, GATEWAY_API, "HTTPRoute", ["v1", "v1beta1", "v1alpha2"], true;
    GrpcRoute: GenericObject => grpc_routes, GATEWAY_API, "GRPCRoute", ["v1", "v1alpha2"], true;
    TcpRoute: GenericObject => tcp_routes, GATEWAY_API, "TCPRoute", ["v1alpha2"], true;
    TlsRoute: GenericObject => tls_routes, GATEWAY_API, "TLSRoute", ["v1", "v1alpha2"], true;
    UdpRoute: GenericObject => udp_routes, GATEWAY_API, "UDPRoute", ["v1alpha2"], true;
    ReferenceGrant: GenericObject => reference_grants, GATEWAY_API, "ReferenceGrant", ["v1", "v1beta1", "v1alpha2"], true;
    BackendTlsPolicy: GenericObject => backend_tls_policies, GATEWAY_API, "BackendTLSPolicy", ["v1", "v1alpha3"], true;
}

impl Kind {
    /// `group/version` for this kind's preferred version (`v1` for the core group).
    pub fn api_version(self) -> String {
        let v = self.versions()[0];
        if self.group().is_empty() {
            v.to_string()
        } else {
            format!("{}/{v}", self.group())
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One resource as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub origin: Origin,
    pub api_version: String,
    pub object: Object,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        self.object.kind()
    }
    pub fn name(&self) -> &str {
        self.object.metadata().name.as_deref().unwrap_or("")
    }
    pub fn namespace(&self) -> &str {
        self.object.metadata().namespace.as_deref().unwrap_or("")
    }
}

impl FromIterator<Resource> for Snapshot {
    fn from_iter<I: IntoIterator<Item = Resource>>(iter: I) -> Self {
        let mut s = Snapshot::default();
        for r in iter {
            s.push(r);
        }
        s
    }
}

/// Splits `group/version` into its parts (`v1` is the core group).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}
