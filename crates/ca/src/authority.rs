//! The mesh certificate authority: its signing key and certificate, persisted in Istio's file
//! layout, and the signing of workload CSRs.
//!
//! Files in the CA directory (Istio's plug-in CA names):
//! - `ca-cert.pem`, `ca-key.pem`: the signing certificate and key;
//! - `root-cert.pem`: the trust bundle workloads verify against (one or more roots);
//! - `cert-chain.pem`: the signing certificate's chain up to the root.
//!
//! When they are absent a self-signed root is generated and written there, so a restart keeps
//! the same root. Private keys are written with mode 0600.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::identity::SpiffeId;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// Istio's defaults: workload certificates live 24 h; the self-signed root ten years.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Issued certificates start a little in the past so a peer whose clock is slightly behind
/// accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("plug-in CA in {dir} is incomplete: {missing} is missing")]
    Incomplete { dir: PathBuf, missing: &'static str },
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// Settings of the CA.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    pub workload_ttl: Duration,
    pub max_workload_ttl: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        CaOptions {
            trust_domain: "cluster.local".into(),
            workload_ttl: DEFAULT_WORKLOAD_TTL,
            max_workload_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        }
    }
}

/// A signing CA.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the signing certificate and its chain up to (excluding) the root.
    chain: Vec<String>,
    /// PEM of each root of the trust bundle.
    roots: Vec<String>,
    pub options: CaOptions,
}

impl Authority {
    /// Loads the CA from `dir`, or creates a self-signed root there when the directory holds no
    /// CA files.
    pub fn load_or_create(dir: &Path, options: CaOptions) -> Result<Self, CaError> {
        if dir.join(CA_CERT).exists() || dir.join(CA_KEY).exists() {
            return Self::load(dir, options);
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate()?;
        let cert = root_params(&options.trust_domain).self_signed(&key)?;
        let pem = cert.pem();
        write_private(&dir.join(CA_KEY), &key.serialize_pem())?;
        write_file(&dir.join(CA_CERT), &pem, false)?;
        write_file(&dir.join(ROOT_CERT), &pem, false)?;
        write_file(&dir.join(CERT_CHAIN), &pem, false)?;
        Self::load(dir, options)
    }

    /// Loads a CA (self-signed root or plug-in intermediate) from Istio's file layout.
    pub fn load(dir: &Path, options: CaOptions) -> Result<Self, CaError> {
        let read = |name: &'static str| -> Result<String, CaError> {
            let path = dir.join(name);
            if !path.exists() {
                return Err(CaError::Incomplete {
                    dir: dir.to_path_buf(),
                    missing: name,
                });
            }
            fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
        };
        let bad = |name: &str, message: String| CaError::BadFile {
            path: dir.join(name),
            message,
        };
        let key_pem = read(CA_KEY)?;
        let cert_pem = read(CA_CERT)?;
        let roots = split_pem(&read(ROOT_CERT)?);
        if roots.is_empty() {
            return Err(bad(ROOT_CERT, "no certificate".into()));
        }
        let chain_text = if dir.join(CERT_CHAIN).exists() {
            read(CERT_CHAIN)?
        } else {
            cert_pem.clone()
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(CA_KEY, e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(CA_CERT, e.to_string()))?;
        // The chain sent to workloads: signing cert and intermediates, never a root twice.
        let mut chain: Vec<String> = split_pem(&chain_text)
            .into_iter()
            .filter(|c| !roots.contains(c))
            .collect();
        let signing = split_pem(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| bad(CA_CERT, "no certificate".into()))?;
        if !roots.contains(&signing) && !chain.contains(&signing) {
            chain.insert(0, signing);
        }
        Ok(Authority {
            issuer,
            chain,
            roots,
            options,
        })
    }

    /// The trust bundle, PEM (every root).
    pub fn root_pem(&self) -> String {
        self.roots.concat()
    }

    /// The roots as DER, for verifiers.
    pub fn roots_der(&self) -> Vec<CertificateDer<'static>> {
        self.roots
            .iter()
            .filter_map(|p| CertificateDer::from_pem_slice(p.as_bytes()).ok())
            .collect()
    }

    /// Signs a PKCS#10 CSR for `identity`. Only the CSR's public key is used: subject, SANs and
    /// extensions it asks for are ignored, so a workload cannot obtain another identity. The
    /// lifetime is `requested` (or the default), capped at the maximum. Returns the chain:
    /// leaf first, root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Vec<String>, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let ttl = requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.options.workload_ttl)
            .min(self.options.max_workload_ttl);
        let params = workload_params(identity, ttl)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let mut out = Vec::with_capacity(self.chain.len() + 2);
        out.push(cert.pem());
        out.extend(self.chain.iter().cloned());
        out.extend(self.roots.first().cloned());
        Ok(out)
    }

    /// A certificate for a server of the mesh itself (the control plane's 15012), with DNS names
    /// instead of a SPIFFE identity. Returns the chain (leaf first) and the new key, PEM.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(ttl);
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| {
                n.clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| CaError::BadCsr(format!("DNS name {n:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

fn root_params(trust_domain: &str) -> CertificateParams {
    ca_params(trust_domain, ROOT_TTL)
}

fn ca_params(trust_domain: &str, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Istio's self-signed root names its organization after the trust domain.
    dn.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    params
}

impl Authority {
    /// An intermediate CA signed by this one, as Istio's plug-in CA files expect it (for
    /// another cluster or a later CA). Returns its chain (intermediate first, root last) and
    /// key, PEM.
    pub fn issue_intermediate(&self, ttl: Duration) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(&self.options.trust_domain, ttl);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        chain.extend(self.roots.first().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

fn leaf_params(ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ttl).into();
    // Positive 128-bit serials, as RFC 5280 asks.
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params
}

fn workload_params(identity: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut params = leaf_params(ttl);
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::BadCsr(format!("identity {identity}: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// Splits concatenated PEM certificates into one PEM string each.
pub fn split_pem(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            break;
        };
        let stop = start + end + END.len();
        out.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    out
}

/// Writes a private key readable by its owner only.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    write_file(path, contents, true)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    f.write_all(contents.as_bytes())
        .map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })
}
