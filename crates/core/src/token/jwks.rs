//! JWKS documents → the [`KeySet`] a verifier accepts: public keys only, algorithm pinned by
//! the key type, each key found by its listed `kid` and by its other names.

use jwt_compact::alg::{RsaPublicKey, StrongKey};
use jwt_compact::jwk::JsonWebKey;

use crate::token::es256::Es256Key;
use crate::token::keys::{thumbprint, VerifyingKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    #[error("key set is not JSON of the form {{\"keys\": [...]}}: {0}")]
    Shape(String),
    #[error("keys[{index}]: {reason}")]
    Key { index: usize, reason: String },
    #[error("keys[{index}]: duplicate key id `{kid}`")]
    DuplicateKid { index: usize, kid: String },
    #[error("key set is empty: at least one verification key is required")]
    Empty,
}

/// The keys a verifier accepts, by key id. Several keys at once allow rotation.
///
/// Each key is found by the `kid` it is listed under and also by its other names: its RFC
/// 7638 thumbprint and its libtrust key id. So tokens whose header carries either format
/// verify against the same JWKS; the listed `kid` wins over another key's other name.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<(String, VerifyingKey)>,
    /// (other name, index into `keys`).
    aliases: Vec<(String, usize)>,
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`). Each key needs `kty` (and `crv`); `kid`
    /// defaults to the RFC 7638 thumbprint; `alg`, if present, must match the key type. A key
    /// with private members (`d`, RSA `p`/`q`/…), an EC key on another curve than P-256, an
    /// RSA key shorter than 2048 bits and a small-order or non-canonical Ed25519 key are
    /// refused, and the error names the key's `kid`.
    pub fn from_jwks(value: &serde_json::Value) -> Result<KeySet, KeySetError> {
        let keys = value
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| KeySetError::Shape("missing array `keys`".into()))?;
        let mut set = KeySet::default();
        for (index, raw) in keys.iter().enumerate() {
            let err = |reason: String| KeySetError::Key { index, reason };
            // Every refusal below names the key (its `kid`, quoted), so an operator can find it.
            let named = match raw.get("kid").and_then(serde_json::Value::as_str) {
                Some(kid) => format!("key `{}`", crate::support::text::quote(kid)),
                None => "key without `kid`".to_owned(),
            };
            let jwk: JsonWebKey<'_> =
                serde_json::from_value(raw.clone()).map_err(|e| err(format!("not a JSON web key ({named}): {e}")))?;
            let key = match &jwk {
                JsonWebKey::EllipticCurve { curve, .. } if curve != "P-256" => {
                    return Err(err(format!(
                        "{named}: curve `{}` is not supported (only P-256 for ES256)",
                        crate::support::text::quote(curve)
                    )))
                }
                JsonWebKey::EllipticCurve { .. } => VerifyingKey::Es256(Es256Key::new(
                    p256::ecdsa::VerifyingKey::try_from(&jwk)
                        .map_err(|e| err(format!("bad P-256 key ({named}): {e}")))?,
                )),
                JsonWebKey::Rsa { .. } => {
                    let k = RsaPublicKey::try_from(&jwk).map_err(|e| err(format!("bad RSA key ({named}): {e}")))?;
                    let strong =
                        StrongKey::try_from(k).map_err(|_| err(format!("{named}: RSA key shorter than 2048 bits")))?;
                    VerifyingKey::Rs256(strong.into_inner())
                }
                JsonWebKey::KeyPair { .. } => {
                    let k = ed25519_compact::PublicKey::try_from(&jwk)
                        .map_err(|e| err(format!("bad Ed25519 key ({named}): {e}")))?;
                    // Small-order (and non-canonical) points verify forged signatures for
                    // some messages: refused at configuration.
                    k.validate().map_err(|e| err(format!("{named}: weak or invalid Ed25519 public key: {e}")))?;
                    VerifyingKey::EdDsa(k)
                }
                JsonWebKey::Symmetric { .. } => {
                    return Err(err("symmetric keys are not accepted; use ES256, RS256 or EdDSA".into()))
                }
                _ => return Err(err(format!("{named}: unsupported key type"))),
            };
            // A verification key set holds public keys only: a private member means someone
            // published (or is about to publish) a signing key.
            if let Some(member) = PRIVATE_JWK_MEMBERS.iter().find(|m| raw.get(**m).is_some()) {
                return Err(err(format!(
                    "{named} carries private key material (`{member}`); list only the public part"
                )));
            }
            if let Some(alg) = raw.get("alg") {
                if alg.as_str() != Some(key.algorithm()) {
                    return Err(err(format!(
                        "`alg` {alg} does not match the key type (expected `{}`)",
                        key.algorithm()
                    )));
                }
            }
            let kid = match raw.get("kid") {
                Some(serde_json::Value::String(kid)) if !kid.is_empty() => kid.clone(),
                Some(_) => return Err(err("`kid` must be a non-empty string".into())),
                None => thumbprint(&jwk),
            };
            if set.keys.iter().any(|(k, _)| *k == kid) {
                return Err(KeySetError::DuplicateKid { index, kid });
            }
            let position = set.keys.len();
            for alias in [Some(key.thumbprint()), key.libtrust_kid()].into_iter().flatten() {
                if alias != kid {
                    set.aliases.push((alias, position));
                }
            }
            set.keys.push((kid, key));
        }
        if set.keys.is_empty() {
            return Err(KeySetError::Empty);
        }
        Ok(set)
    }

    /// The key listed under `kid`, else the key whose thumbprint or libtrust key id is `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == kid).map(|(_, key)| key).or_else(|| {
            self.aliases.iter().find(|(a, _)| a == kid).and_then(|(_, i)| self.keys.get(*i)).map(|(_, key)| key)
        })
    }

    /// Each key with the `kid` it is listed under.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &VerifyingKey)> {
        self.keys.iter().map(|(k, key)| (k.as_str(), key))
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2; `k` of `oct` keys).
const PRIVATE_JWK_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
