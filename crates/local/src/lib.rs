//! The local mesh runtime (`isthmus up`): pods as network namespaces on one machine.
//!
//! - [`plan`] turns manifests into pods and services with addresses (the controllers' part).
//! - [`net`] builds the namespaces, the bridge and the service rules (the CNI's and
//!   kube-proxy's part).
//! - [`runtime`] runs the control plane, the sidecars and the apps, and tears it all down
//!   (the kubelet's and the injector's part).
//! - [`sockets`] reads what a pod listens on, for the LocalhostListener precheck.

pub mod net;
pub mod plan;
pub mod runtime;
pub mod sockets;
