//! ES256 signing on the issuance path: ring's P-256 (constant-time assembly with a
//! precomputed table of the generator's multiples, hedged random nonces) instead of p256's
//! portable arithmetic, which costs ~10× more per signature and was nearly all of a token's
//! CPU (bench/README.md: token service). The token is the compact JWS the core's
//! `token::sign::sign` writes: the header `{"alg":"ES256","kid":…,"typ":"JWT"}` (encoded
//! once per key), the claims with `exp`, `nbf`, `iat` next to the custom ones, the 64-byte
//! `r‖s` signature; every verifier of the core accepts it (tests below and in routes).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::Validity;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("ring refuses the signing key: {0}")]
    Key(String),
    #[error("cannot serialise the claims: {0}")]
    Claims(String),
    #[error("signing failed (no randomness for the nonce)")]
    Sign,
}

/// Signs compact JWS tokens with one P-256 key.
pub struct Es256Signer {
    key_pair: EcdsaKeyPair,
    rng: SystemRandom,
    /// `base64url(header) "."`, the same for every token of this key.
    header_prefix: String,
}

impl std::fmt::Debug for Es256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Es256Signer({})", self.header_prefix.trim_end_matches('.'))
    }
}

/// The payload: the time claims, then the custom claims (flattened).
#[derive(Serialize)]
struct Payload<'a, T> {
    exp: i64,
    nbf: i64,
    iat: i64,
    #[serde(flatten)]
    custom: &'a T,
}

impl Es256Signer {
    /// The signer of `key`, naming it `key.kid` in token headers. ring checks that the
    /// private scalar and the public point belong together.
    pub fn new(key: &SigningKey) -> Result<Es256Signer, SignerError> {
        let rng = SystemRandom::new();
        let private = key.key.to_bytes();
        let public = key.key.verifying_key().to_encoded_point(false);
        let key_pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &private[..],
            public.as_bytes(),
            &rng,
        )
        .map_err(|e| SignerError::Key(e.to_string()))?;
        let header = serde_json::json!({"alg": "ES256", "kid": key.kid, "typ": "JWT"}).to_string();
        let mut header_prefix = URL_SAFE_NO_PAD.encode(header);
        header_prefix.push('.');
        Ok(Es256Signer { key_pair, rng, header_prefix })
    }

    /// A token of `custom` (a JSON object: its fields sit next to `exp`, `nbf`, `iat`) valid
    /// over `validity`.
    pub fn sign<T: Serialize>(&self, custom: &T, validity: Validity) -> Result<String, SignerError> {
        let payload = Payload { exp: validity.expires_at, nbf: validity.not_before, iat: validity.issued_at, custom };
        let json = serde_json::to_vec(&payload).map_err(|e| SignerError::Claims(e.to_string()))?;
        let mut token = String::with_capacity(self.header_prefix.len() + json.len() * 4 / 3 + 92);
        token.push_str(&self.header_prefix);
        URL_SAFE_NO_PAD.encode_string(&json, &mut token);
        let signature = self.signature(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
        Ok(token)
    }

    /// The 64-byte `r‖s` ES256 signature of `input` (the JWS signing input): what [`sign`]
    /// appends, on its own for the signing micro-benchmark (`rg-sign-bench`).
    ///
    /// [`sign`]: Es256Signer::sign
    pub fn signature(&self, input: &[u8]) -> Result<ring::signature::Signature, SignerError> {
        self.key_pair.sign(&self.rng, input).map_err(|_| SignerError::Sign)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use registry_guard_core::token::claims::{Audience, RegistryClaims};
    use registry_guard_core::token::jwks::KeySet;
    use registry_guard_core::token::testing::{es256_key, jwks};
    use registry_guard_core::token::verify::{TokenError, Verifier};

    fn claims(sub: &str) -> RegistryClaims {
        RegistryClaims {
            iss: "registry-guard".into(),
            sub: sub.into(),
            aud: Audience::One("container_registry".into()),
            jti: "j1".into(),
            access: vec![],
            auth_type: Some("pat".into()),
            user: None,
            extra: [("team".to_owned(), serde_json::json!("web"))].into_iter().collect(),
        }
    }

    fn verifier(keys: &[&SigningKey]) -> Verifier {
        Verifier {
            keys: KeySet::from_jwks(&jwks(keys)).unwrap(),
            issuer: "registry-guard".into(),
            audience: "container_registry".into(),
            leeway_seconds: 0,
        }
    }

    const VALID: Validity = Validity { issued_at: 1_000, not_before: 995, expires_at: 1_300 };

    #[test]
    fn tokens_verify_with_the_core_and_match_its_encoding() {
        let key = es256_key(3);
        let signer = Es256Signer::new(&key).unwrap();
        let token = signer.sign(&claims("alice"), VALID).unwrap();
        let verified = verifier(&[&key]).verify(&token, 1_100).unwrap();
        assert_eq!(verified.subject, "alice");
        assert_eq!(verified.kid, key.kid);
        // Header and payload are what the core's signer writes (only the signature differs:
        // both nonces are random or message-bound).
        let reference = registry_guard_core::token::sign::sign(&key, claims("alice"), VALID).unwrap();
        let parts = |t: &str| t.split('.').map(str::to_owned).collect::<Vec<_>>();
        let (ours, theirs) = (parts(&token), parts(&reference));
        assert_eq!(ours.len(), 3);
        assert_eq!(ours[0], theirs[0]);
        let decode =
            |s: &str| serde_json::from_slice::<serde_json::Value>(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
        assert_eq!(decode(&ours[1]), decode(&theirs[1]));
        assert_eq!(decode(&ours[1])["team"], "web");
        assert_eq!(URL_SAFE_NO_PAD.decode(&ours[2]).unwrap().len(), 64);
        // Two tokens of the same claims differ in their signature only.
        let again = signer.sign(&claims("alice"), VALID).unwrap();
        assert_ne!(again, token);
        assert_eq!(parts(&again)[..2], ours[..2]);
    }

    #[test]
    fn other_keys_times_and_alterations_are_refused() {
        let key = es256_key(3);
        let other = es256_key(4);
        let token = Es256Signer::new(&key).unwrap().sign(&claims("alice"), VALID).unwrap();
        // Expired, not yet valid.
        assert!(verifier(&[&key]).verify(&token, 1_301).is_err());
        assert!(verifier(&[&key]).verify(&token, 990).is_err());
        // Another key under the same kid: the signature does not verify.
        let forged = SigningKey { kid: key.kid.clone(), key: other.key.clone() };
        let forged = Es256Signer::new(&forged).unwrap().sign(&claims("alice"), VALID).unwrap();
        assert!(matches!(verifier(&[&key]).verify(&forged, 1_100), Err(TokenError::BadSignature(_))));
        // A changed payload keeps the signature of the original: refused.
        let parts: Vec<&str> = token.split('.').collect();
        let evil = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({"exp": 1_300, "nbf": 995, "iat": 1_000, "iss": "registry-guard",
                "sub": "root", "aud": "container_registry", "jti": "j1", "access": []}))
            .unwrap(),
        );
        let altered = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert!(verifier(&[&key]).verify(&altered, 1_100).is_err());
    }
}
