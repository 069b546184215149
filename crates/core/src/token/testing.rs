//! Fixed signing keys for tests at every tier (native, wasm, e2e helpers). Test scaffolding:
//! compiled only for the core's own tests and with the `testing` feature.

use crate::token::keys::SigningKey;

/// A deterministic P-256 key derived from `seed` (never use outside tests).
pub fn es256_key(seed: u8) -> SigningKey {
    let mut bytes = [seed.max(1); 32];
    bytes[0] = 0x11;
    #[allow(clippy::expect_used)]
    let key = p256::ecdsa::SigningKey::from_slice(&bytes).expect("valid scalar");
    SigningKey::new(key)
}

/// A JWKS document holding the public parts of `keys`.
pub fn jwks(keys: &[&SigningKey]) -> serde_json::Value {
    serde_json::json!({ "keys": keys.iter().map(|k| k.public_jwk()).collect::<Vec<_>>() })
}
