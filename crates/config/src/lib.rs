//! Kubernetes and Istio resource model, loading and validation.
//!
//! Kubernetes kinds are `k8s-openapi`'s types; Istio's kinds are typed here after Istio's API
//! (`networking.istio.io` v1/v1beta1/v1alpha3, `security.istio.io` v1/v1beta1,
//! `telemetry.istio.io`). [`load::Loader`] reads YAML/JSON into a [`resource::Snapshot`].

#![forbid(unsafe_code)]

pub mod istio;
pub mod load;
pub mod mesh;
pub mod resource;
pub mod validate;

pub use k8s_openapi;
pub use load::{Diagnostic, Loaded, Loader, Severity};
pub use mesh::MeshConfig;
pub use resource::{Entry, HasMetadata, Kind, Object, Origin, Resource, Snapshot};
