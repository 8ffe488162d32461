//! xDS: Envoy's discovery protocol. `server` is the ADS server (state of the world and delta),
//! `client` the proxy's delta ADS client;
//! `json` prints resources as Envoy's config dumps do; `nds` is Istio's name table.

pub mod client;
pub mod json;
pub mod nds;
pub mod server;
pub mod typed_struct;
pub mod wire;

pub use server::{AdsServer, Generator, ProxyState};
