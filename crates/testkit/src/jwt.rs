//! A JWT issuer for tests: an ES256 key, its JWKS, and tokens with any claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;
use serde_json::{Value, json};

pub struct Issuer {
    pub iss: String,
    pub kid: String,
    key: KeyPair,
}

impl Issuer {
    /// A new key for issuer `iss`, published under key id `kid`.
    pub fn new(iss: &str, kid: &str) -> Issuer {
        Issuer {
            iss: iss.to_string(),
            kid: kid.to_string(),
            key: KeyPair::generate().expect("P-256 key generation"),
        }
    }

    /// The public key as a JWKS document.
    pub fn jwks(&self) -> String {
        // An uncompressed P-256 point: 0x04, then X and Y of 32 bytes each.
        let raw = self.key.public_key_raw();
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        }]})
        .to_string()
    }

    /// A token with `iss` and an `exp` an hour ahead, then `claims` (which may override both).
    pub fn token(&self, claims: Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut all = json!({"iss": self.iss, "iat": now, "exp": now + 3600});
        if let (Some(all), Value::Object(extra)) = (all.as_object_mut(), claims) {
            all.extend(extra);
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, &all, &key).expect("ES256 signing")
    }
}
