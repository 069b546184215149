//! Key types and key ids: the public keys a verifier trusts ([`VerifyingKey`]), the ES256 key
//! the token service signs with ([`SigningKey`]), and the names a key goes by — its RFC 7638
//! thumbprint and its libtrust key id.

use base64::Engine as _;
use jwt_compact::alg::RsaPublicKey;
use jwt_compact::jwk::JsonWebKey;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::token::es256::Es256Key;

/// A public key the filter trusts, with the one algorithm it may be used with.
#[derive(Clone)]
pub enum VerifyingKey {
    /// P-256, verified with precomputed tables (`crate::token::es256`).
    Es256(Es256Key),
    Rs256(RsaPublicKey),
    EdDsa(ed25519_compact::PublicKey),
}

impl VerifyingKey {
    pub fn algorithm(&self) -> &'static str {
        match self {
            VerifyingKey::Es256(_) => "ES256",
            VerifyingKey::Rs256(_) => "RS256",
            VerifyingKey::EdDsa(_) => "EdDSA",
        }
    }
}

/// DER `SubjectPublicKeyInfo` prefix of an uncompressed P-256 point (id-ecPublicKey,
/// prime256v1, BIT STRING of 66 bytes); the 65-byte point follows.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER `SubjectPublicKeyInfo` prefix of an Ed25519 key (RFC 8410); the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

impl VerifyingKey {
    /// The DER `SubjectPublicKeyInfo` of the key (what Go's `x509.MarshalPKIXPublicKey`
    /// produces), or `None` if it cannot be encoded.
    pub fn spki_der(&self) -> Option<Vec<u8>> {
        match self {
            VerifyingKey::Es256(k) => {
                let point = k.to_encoded_point(false);
                Some([P256_SPKI_PREFIX.as_slice(), point.as_bytes()].concat())
            }
            VerifyingKey::Rs256(k) => {
                use rsa::pkcs8::EncodePublicKey as _;
                k.to_public_key_der().ok().map(|d| d.as_bytes().to_vec())
            }
            VerifyingKey::EdDsa(k) => Some([ED25519_SPKI_PREFIX.as_slice(), k.as_ref()].concat()),
        }
    }

    /// The libtrust key id of the key (what distribution 2.8 looks a token's `kid` up by).
    pub fn libtrust_kid(&self) -> Option<String> {
        self.spki_der().map(|der| libtrust_kid(&der))
    }

    /// The RFC 7638 thumbprint of the key.
    pub fn thumbprint(&self) -> String {
        let jwk = match self {
            VerifyingKey::Es256(k) => JsonWebKey::from(&**k),
            VerifyingKey::Rs256(k) => JsonWebKey::from(k),
            VerifyingKey::EdDsa(k) => JsonWebKey::from(k),
        };
        thumbprint(&jwk)
    }
}

/// The libtrust key id (docker/libtrust `keyIDFromCryptoKey`, which distribution 2.8 uses
/// for a token's `kid`): SHA-256 of the DER `SubjectPublicKeyInfo`, first 240 bits, base32
/// (RFC 4648 alphabet, no padding: 48 characters), in 12 groups of 4 joined by `:`.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = Sha256::digest(spki_der);
    let encoded = base32(digest.get(..30).unwrap_or_default());
    let groups: Vec<&str> = (0..encoded.len()).step_by(4).filter_map(|i| encoded.get(i..i + 4)).collect();
    groups.join(":")
}

/// RFC 4648 base32 without padding.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.extend(ALPHABET.get(((buffer >> bits) & 31) as usize).map(|&c| char::from(c)));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.extend(ALPHABET.get(((buffer << (5 - bits)) & 31) as usize).map(|&c| char::from(c)));
    }
    out
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.algorithm())
    }
}

/// RFC 7638 thumbprint (SHA-256, base64url without padding) of a key's public part.
pub fn thumbprint(jwk: &JsonWebKey<'_>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jwk.thumbprint::<Sha256>())
}

/// An ES256 signing key with its key id.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub key: p256::ecdsa::SigningKey,
}

/// Which key id a signing key puts in token headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KidFormat {
    /// RFC 7638 thumbprint (SHA-256, base64url).
    #[default]
    Rfc7638,
    /// The libtrust key id distribution 2.8 requires when it verifies tokens itself.
    Libtrust,
}

impl SigningKey {
    /// Uses the RFC 7638 thumbprint of the public key as key id.
    pub fn new(key: p256::ecdsa::SigningKey) -> SigningKey {
        let kid = thumbprint(&JsonWebKey::from(key.verifying_key()));
        SigningKey { kid, key }
    }

    /// The same key, naming itself in token headers with `format`.
    pub fn with_kid_format(self, format: KidFormat) -> SigningKey {
        let kid = match format {
            KidFormat::Rfc7638 => self.thumbprint(),
            KidFormat::Libtrust => self.libtrust_kid(),
        };
        SigningKey { kid, key: self.key }
    }

    /// RFC 7638 thumbprint of the public key.
    pub fn thumbprint(&self) -> String {
        thumbprint(&JsonWebKey::from(self.key.verifying_key()))
    }

    /// libtrust key id of the public key.
    pub fn libtrust_kid(&self) -> String {
        let point = self.key.verifying_key().to_encoded_point(false);
        libtrust_kid(&[P256_SPKI_PREFIX.as_slice(), point.as_bytes()].concat())
    }

    /// The public JWK listed under `kid` (for a JWKS that names the key both ways).
    pub fn public_jwk_as(&self, kid: &str) -> serde_json::Value {
        let mut v = self.public_jwk();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("kid".into(), kid.into());
        }
        v
    }

    /// The public JWK (with `kid`, `alg`, `use`) for a JWKS document.
    pub fn public_jwk(&self) -> serde_json::Value {
        let jwk = JsonWebKey::from(self.key.verifying_key());
        let mut v = serde_json::to_value(&jwk).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("kid".into(), self.kid.clone().into());
            obj.insert("alg".into(), "ES256".into());
            obj.insert("use".into(), "sig".into());
        }
        v
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(ES256, kid={})", self.kid)
    }
}

#[cfg(test)]
mod kid_tests {
    use super::*;
    use crate::token::claims::{Audience, RegistryClaims};
    use crate::token::jwks::KeySet;
    use crate::token::sign::{sign, Validity};
    use crate::token::testing::*;
    use crate::token::verify::{TokenError, Verifier};

    #[test]
    fn base32_matches_rfc_4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32(input.as_bytes()), expected, "{input}");
        }
    }

    /// Checked independently: `openssl pkey -pubin -outform DER` re-encodes the same DER, and
    /// base32(sha256(der)[:30]) in 4-character groups gives this id.
    #[test]
    fn libtrust_kid_of_a_known_key() {
        let key = es256_key(1);
        assert_eq!(key.libtrust_kid(), "ZPCH:6X4H:X3PL:IE44:AARF:5Y35:FEQW:M2HZ:NH5C:BWPT:BABH:XCH3");
        let der = VerifyingKey::Es256(Es256Key::new(*key.key.verifying_key())).spki_der().unwrap();
        use base64::Engine as _;
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(&der),
            "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEe19lbSzPgE9L3OuHKfVK0fhkiqxH4lf3gnnmudhDC7W9cTJcrmvfPoLXaKXSi8gwsd2E5MdSTMSBllTg1w/AaQ=="
        );
        let kid = key.libtrust_kid();
        assert_eq!(kid.len(), 12 * 4 + 11);
        assert!(kid
            .split(':')
            .all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))));
        assert_ne!(es256_key(2).libtrust_kid(), kid);
    }

    #[test]
    fn key_sets_resolve_both_key_id_formats() {
        let a = es256_key(1);
        let b = es256_key(2);
        let keys = KeySet::from_jwks(&jwks(&[&a, &b])).unwrap();
        for key in [&a, &b] {
            for kid in [key.thumbprint(), key.libtrust_kid()] {
                let found = keys.get(&kid).unwrap();
                assert_eq!(found.thumbprint(), key.thumbprint(), "{kid}");
            }
        }
        assert!(keys.get("ZPCH:6X4H:X3PL:IE44:AARF:5Y35:FEQW:M2HZ:NH5C:BWPT:BABH:XCH4").is_none());
        // A token whose header names the libtrust id verifies against the same JWKS.
        let libtrust = a.clone().with_kid_format(KidFormat::Libtrust);
        assert_eq!(libtrust.kid, a.libtrust_kid());
        let claims = || RegistryClaims {
            iss: "i".into(),
            sub: "s".into(),
            aud: Audience::One("a".into()),
            jti: "j".into(),
            access: vec![],
            auth_type: None,
            user: None,
            extra: Default::default(),
        };
        let token = sign(&libtrust, claims(), Validity { issued_at: 100, not_before: 100, expires_at: 200 }).unwrap();
        let verifier = Verifier { keys, issuer: "i".into(), audience: "a".into(), leeway_seconds: 0 };
        let verified = verifier.verify(&token, 150).unwrap();
        assert_eq!(verified.kid, a.libtrust_kid());
        // Signed by b but naming a's libtrust id: the signature check fails.
        let forged = b.clone().with_kid_format(KidFormat::Libtrust);
        let forged = SigningKey { kid: a.libtrust_kid(), key: forged.key };
        let token = sign(&forged, claims(), Validity { issued_at: 100, not_before: 100, expires_at: 200 }).unwrap();
        assert!(matches!(verifier.verify(&token, 150), Err(TokenError::BadSignature(_))));
        // A JWKS listing the same key under both ids is accepted too.
        let both = serde_json::json!({"keys": [a.public_jwk(), a.public_jwk_as(&a.libtrust_kid())]});
        assert_eq!(KeySet::from_jwks(&both).unwrap().len(), 2);
    }
}
