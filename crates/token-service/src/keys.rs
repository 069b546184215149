//! The ES256 signing key: PKCS#8 PEM in, PKCS#8 PEM out.

use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use registry_guard_core::token::keys::SigningKey;

/// Why a PEM document is not a usable signing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is a SEC1 `EC PRIVATE KEY`; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`")]
    Sec1,
    #[error("is an encrypted private key; the token service needs an unencrypted PKCS#8 key")]
    Encrypted,
    #[error("is not a PKCS#8 PEM P-256 private key (`-----BEGIN PRIVATE KEY-----`): {0}")]
    Invalid(String),
}

/// Parses a PKCS#8 PEM P-256 private key; the key id is its RFC 7638 thumbprint.
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, KeyError> {
    if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
        return Err(KeyError::Sec1);
    }
    if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        return Err(KeyError::Encrypted);
    }
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| KeyError::Invalid(e.to_string()))?;
    Ok(SigningKey::new(key))
}

/// A fresh random P-256 private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
pub fn generate_signing_key_pem() -> String {
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    // Encoding a valid P-256 scalar as PKCS#8 only allocates: it cannot fail.
    #[allow(clippy::expect_used)]
    let pem = key.to_pkcs8_pem(LineEnding::LF).expect("a P-256 key always encodes as PKCS#8");
    pem.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_and_differ() {
        let a = generate_signing_key_pem();
        assert!(a.starts_with("-----BEGIN PRIVATE KEY-----"));
        let ka = signing_key_from_pem(&a).unwrap();
        let kb = signing_key_from_pem(&generate_signing_key_pem()).unwrap();
        assert_ne!(ka.kid, kb.kid);
        assert_eq!(signing_key_from_pem(&a).unwrap().kid, ka.kid);
    }

    #[test]
    fn bad_pem_is_explained() {
        assert!(matches!(signing_key_from_pem("nope"), Err(KeyError::Invalid(_))));
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
        assert!(matches!(signing_key_from_pem(sec1), Err(KeyError::Sec1)));
    }
}
