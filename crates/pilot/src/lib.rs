//! Pilot: the mesh translated into Envoy v3 resources for one proxy, in Istio's names and
//! shapes. `context` holds the mesh at one moment, `proxy` who asks; `cluster` (CDS) and
//! `endpoint` (EDS), `listener` (LDS) and `route` (RDS) build the resources; `authn` turns
//! RequestAuthentications into the inbound chains' JWT filter and `authz` AuthorizationPolicies
//! into their RBAC filters; `telemetry` finds the Telemetry resources of a proxy, from which
//! `trace`, `access_log` and `metrics` configure its connection managers and TCP proxies;
//! `nds` is the name table its agent answers DNS from.

pub mod access_log;
pub mod authn;
pub mod authz;
pub mod cluster;
pub mod context;
pub mod endpoint;
pub mod headers;
pub mod listener;
pub mod maps;
pub mod metrics;
pub mod names;
pub mod nds;
pub mod proxy;
pub mod route;
pub mod telemetry;
pub mod trace;

pub use context::{InboundMode, MtlsMode, PushContext, Scope};
pub use proxy::{NodeMetadata, Proxy};
