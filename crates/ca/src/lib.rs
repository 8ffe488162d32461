//! Mesh identity: the certificate authority (`authority`), Istio's CA API over gRPC (`api`,
//! `service`), workload tokens (`token`), SPIFFE identities (`identity`) and the rustls
//! verifiers that check them on every mTLS connection (`verify`).

pub mod api;
pub mod authority;
pub mod identity;
pub mod service;
pub mod tls;
pub mod token;
pub mod workload;

pub use authority::{Authority, CaError, CaOptions};
pub use identity::SpiffeId;
pub use token::{ServiceAccount, TokenAuthority};
