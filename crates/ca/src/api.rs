//! Istio's CA API (`istio.v1.auth.IstioCertificateService`), wire-compatible with Istio's
//! `security/proto/istioca.proto`: the same package, service, method and field numbers, so
//! pilot-agent and ztunnel can use this CA unchanged.

/// A certificate request: a PEM CSR and the lifetime asked for, in seconds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    #[prost(string, tag = "1")]
    pub csr: String,
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    /// Optional: `ImpersonatedIdentity` for node agents signing for others (not honoured).
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// The signed chain, PEM, leaf first and root last.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

include!(concat!(
    env!("OUT_DIR"),
    "/istio.v1.auth.IstioCertificateService.rs"
));
