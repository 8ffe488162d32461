//! xDS: Envoy's discovery protocol. `json` prints resources as Envoy's config dumps do.

pub mod json;
