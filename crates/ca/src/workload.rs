//! The workload side of identity: a fresh key and CSR, the certificate fetched from the CA, and
//! when to renew it (Istio's agent: at half the lifetime, `SECRET_GRACE_PERIOD_RATIO=0.5`, with
//! ±1 % jitter so a fleet issued together does not renew together).

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::authority::CaError;
use crate::identity::SpiffeId;

pub const GRACE_PERIOD_RATIO: f64 = 0.5;
const JITTER: f64 = 0.01;

/// A certificate with its key, as the workload keeps it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM, leaf first and root last, as the CA returned it.
    pub chain: Vec<String>,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Issued {
    /// The chain without its root: what the workload presents to peers.
    pub fn presented_chain(&self) -> String {
        let n = self.chain.len().saturating_sub(1).max(1);
        self.chain.iter().take(n).cloned().collect()
    }

    /// The root the CA returned last in the chain.
    pub fn root(&self) -> Option<&str> {
        self.chain.last().map(String::as_str)
    }
}

/// A new ECDSA P-256 key and a CSR for it. The CSR names the identity the workload believes it
/// has (as Istio's agent does), but the CA decides from the token alone.
pub fn new_key_and_csr(identity: &SpiffeId) -> Result<(String, String), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::BadCsr(e.to_string()))?,
    )];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Reads the validity period of the leaf of a PEM chain.
pub fn validity(chain: &[String]) -> Result<(SystemTime, SystemTime), CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |m: String| CaError::BadCsr(format!("issued certificate unreadable: {m}"));
    let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
    let der = CertificateDer::from_pem_slice(leaf.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| bad(e.to_string()))?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((
        to_time(cert.validity().not_before),
        to_time(cert.validity().not_after),
    ))
}

/// How long from `now` until the certificate should be renewed.
pub fn renewal_delay(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let jitter = 1.0 + (rand::random::<f64>() * 2.0 - 1.0) * JITTER;
    let at = not_before + lifetime.mul_f64(GRACE_PERIOD_RATIO * jitter);
    at.duration_since(now).unwrap_or_default()
}

/// Asks the CA for a certificate for this workload.
pub async fn fetch(
    channel: tonic::transport::Channel,
    token: &str,
    identity: &SpiffeId,
    ttl: Duration,
) -> Result<Issued, FetchError> {
    let (key_pem, csr) = new_key_and_csr(identity)?;
    let chain = crate::service::request_certificate(channel, token, &csr, ttl).await?;
    let (not_before, not_after) = validity(&chain)?;
    Ok(Issued {
        chain,
        key_pem,
        not_before,
        not_after,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("CA refused: {}", .0.message())]
    Status(#[from] tonic::Status),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life_with_small_jitter() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let na = nb + Duration::from_secs(24 * 3600);
        for _ in 0..100 {
            let d = renewal_delay(nb, na, nb).as_secs_f64();
            assert!((d - 43_200.0).abs() <= 432.0 + 1.0, "{d}");
        }
        assert_eq!(renewal_delay(nb, na, na), Duration::ZERO);
    }
}
