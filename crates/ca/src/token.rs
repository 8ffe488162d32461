//! Workload tokens: the credential a proxy presents to the CA.
//!
//! In the local runtime the runtime issues each pod a JWT, as Kubernetes projects a service
//! account token: `sub` = `system:serviceaccount:<ns>:<sa>`, audience `istio-ca`, ES256-signed
//! by a key kept beside the CA (`token-key.pem`). The CA trusts that key only.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};

use crate::authority::CaError;

pub const TOKEN_KEY: &str = "token-key.pem";
pub const CA_AUDIENCE: &str = "istio-ca";
const ISSUER: &str = "isthmus";

/// The service account a token was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Vec<String>,
    iat: u64,
    exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token subject {0:?} is not system:serviceaccount:<namespace>:<name>")]
    Subject(String),
}

/// Signs and verifies workload tokens.
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl TokenAuthority {
    /// Loads the signing key from `dir`, creating it (mode 0600) on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(TOKEN_KEY);
        let key = if path.exists() {
            let pem = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
                path: path.clone(),
                source,
            })?;
            KeyPair::from_pem(&pem).map_err(|e| CaError::BadFile {
                path: path.clone(),
                message: e.to_string(),
            })?
        } else {
            std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let key = KeyPair::generate()?;
            crate::authority::write_private(&path, &key.serialize_pem())?;
            key
        };
        Ok(Self::from_key(&key))
    }

    fn from_key(key: &KeyPair) -> Self {
        TokenAuthority {
            encoding: EncodingKey::from_ec_der(&key.serialize_der()),
            decoding: DecodingKey::from_ec_der(key.public_key_raw()),
        }
    }

    /// A token for `namespace/name`, valid for `ttl`.
    pub fn issue(&self, namespace: &str, name: &str, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            aud: vec![CA_AUDIENCE.into()],
            iat: now,
            exp: now + ttl.as_secs(),
        };
        // Signing with a valid P-256 key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Verifies signature, expiry, issuer and audience; returns the service account.
    pub fn verify(&self, token: &str) -> Result<ServiceAccount, TokenError> {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[CA_AUDIENCE]);
        v.set_issuer(&[ISSUER]);
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let sub = data.claims.sub;
        match sub
            .strip_prefix("system:serviceaccount:")
            .map(|r| r.split(':').collect::<Vec<_>>())
        {
            Some(parts) if parts.len() == 2 && !parts[0].is_empty() && !parts[1].is_empty() => {
                Ok(ServiceAccount {
                    namespace: parts[0].to_string(),
                    name: parts[1].to_string(),
                })
            }
            _ => Err(TokenError::Subject(sub)),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ta = TokenAuthority::load_or_create(dir.path()).unwrap();
        let t = ta.issue("default", "sleep", Duration::from_secs(60));
        assert_eq!(
            ta.verify(&t).unwrap(),
            ServiceAccount {
                namespace: "default".into(),
                name: "sleep".into()
            }
        );
        // Same key after reload.
        let again = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert!(again.verify(&t).is_ok());
        // Another key does not verify it.
        let other = tempfile::tempdir().unwrap();
        let other = TokenAuthority::load_or_create(other.path()).unwrap();
        assert!(other.verify(&t).is_err());
        // Tampered and expired tokens fail.
        let mut bad = t.clone();
        bad.pop();
        assert!(ta.verify(&bad).is_err());
        let expired = ta.issue("default", "sleep", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(ta.verify(&expired).is_err());
    }
}
