//! The CA API server: authenticates the caller by its token and signs its CSR for the identity
//! the token proves; and the client the proxy uses to ask for a certificate.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::api::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::api::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::api::{IstioCertificateRequest, IstioCertificateResponse};
use crate::authority::Authority;
use crate::identity::SpiffeId;
use crate::token::TokenAuthority;

/// Largest CSR accepted (a P-256 CSR is under 1 KiB, RSA 4096 about 2 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Istio's CA API backed by an [`Authority`] and a [`TokenAuthority`].
pub struct CaService {
    authority: Arc<Authority>,
    tokens: Arc<TokenAuthority>,
}

impl CaService {
    pub fn new(authority: Arc<Authority>, tokens: Arc<TokenAuthority>) -> Self {
        CaService { authority, tokens }
    }

    /// The tonic service, to add to a server's router.
    pub fn into_server(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(64 * 1024)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = bearer(request.metadata())?;
        let account = self.tokens.verify(token).map_err(|e| {
            tracing::warn!(error = %e, "CA request refused");
            Status::unauthenticated(e.to_string())
        })?;
        let req = request.into_inner();
        if req.csr.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!(
                "CSR of {} bytes exceeds {MAX_CSR_BYTES}",
                req.csr.len()
            )));
        }
        // The identity comes from the token, never from the CSR.
        let identity = SpiffeId::new(
            &self.authority.options.trust_domain,
            &account.namespace,
            &account.name,
        );
        let ttl = u64::try_from(req.validity_duration)
            .ok()
            .map(Duration::from_secs);
        let chain = self
            .authority
            .sign_csr(&req.csr, &identity, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%identity, "issued workload certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The token of an `authorization: Bearer …` header.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("no authorization token"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization header is not text"))?;
    value
        .strip_prefix("Bearer ")
        .ok_or_else(|| Status::unauthenticated("authorization is not a Bearer token"))
}

/// Asks the CA at `channel` to sign `csr_pem`, authenticating with `token`.
pub async fn request_certificate(
    channel: tonic::transport::Channel,
    token: &str,
    csr_pem: &str,
    ttl: Duration,
) -> Result<Vec<String>, Status> {
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut req = Request::new(IstioCertificateRequest {
        csr: csr_pem.to_string(),
        validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: None,
    });
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::invalid_argument("token is not valid header text"))?;
    req.metadata_mut().insert("authorization", value);
    Ok(client
        .create_certificate(req)
        .await?
        .into_inner()
        .cert_chain)
}
