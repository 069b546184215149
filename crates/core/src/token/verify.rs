//! Registry JWTs: the key set, verification (signature, header, claims) and issuance.
//!
//! The algorithm is pinned by the key: a key set entry is an ES256, RS256 or EdDSA key, and a
//! token whose header names another algorithm is rejected by jwt-compact before any
//! signature check. Time is an argument (`now`, unix seconds); nothing here reads a clock.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use jwt_compact::alg::{Ed25519, Es256, Rsa, RsaPublicKey, StrongKey};

use crate::es256::{Es256Key, Es256Tables};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt as _, Claims, Header, UntrustedToken};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::access::{Action, ActionSet};
use crate::scope::{Resource, Scope};

/// Tokens longer than this are refused before parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A public key the filter trusts, with the one algorithm it may be used with.
#[derive(Clone)]
pub enum VerifyingKey {
    /// P-256, verified with precomputed tables (`crate::es256`).
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

impl VerifyingKey {
    /// Checks `token`'s signature with this key — and so with this key's one algorithm:
    /// jwt-compact refuses a header naming another before looking at the signature — and
    /// deserializes its claims.
    pub fn validate<T: serde::de::DeserializeOwned, H: Clone>(
        &self,
        token: &UntrustedToken<'_, H>,
    ) -> Result<Claims<T>, jwt_compact::ValidationError> {
        let validated = match self {
            VerifyingKey::Es256(k) => Es256Tables.validator::<T>(k).validate(token),
            VerifyingKey::Rs256(k) => Rsa::rs256().validator::<T>(k).validate(token),
            VerifyingKey::EdDsa(k) => Ed25519.validator::<T>(k).validate(token),
        }?;
        Ok(validated.into_parts().1)
    }
}

fn token_error(e: jwt_compact::ValidationError) -> TokenError {
    match e {
        jwt_compact::ValidationError::MalformedClaims(e) => TokenError::BadClaims(e.to_string()),
        other => TokenError::BadSignature(other.to_string()),
    }
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.algorithm())
    }
}

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
                Some(kid) => format!("key `{}`", crate::text::quote(kid)),
                None => "key without `kid`".to_owned(),
            };
            let jwk: JsonWebKey<'_> =
                serde_json::from_value(raw.clone()).map_err(|e| err(format!("not a JSON web key ({named}): {e}")))?;
            let key = match &jwk {
                JsonWebKey::EllipticCurve { curve, .. } if curve != "P-256" => {
                    return Err(err(format!(
                        "{named}: curve `{}` is not supported (only P-256 for ES256)",
                        crate::text::quote(curve)
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

/// RFC 7638 thumbprint (SHA-256, base64url without padding) of a key's public part.
pub fn thumbprint(jwk: &JsonWebKey<'_>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jwk.thumbprint::<Sha256>())
}

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

/// `meta` of an access entry, as GitLab issues it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    /// The principal's access level number on the project when the token was issued (users
    /// only); protection rules are checked against it at request time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_level: Option<u8>,
}

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaim {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<AccessMeta>,
}

/// The registry token's claims besides `exp`, `nbf` and `iat` (which jwt-compact holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    /// The nested, separately signed `user` JWT (seed 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Operator-defined extra claims; never one of the names above.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// JWK members that only a private key has (RFC 7518 §6.2.2, §6.3.2; `k` of `oct` keys).
const PRIVATE_JWK_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Header fields we refuse to honour, by presence (even `null`): keys must come from
/// configuration, never from the token, and no extension may be critical.
const FORBIDDEN_HEADERS: [&str; 5] = ["jku", "x5u", "jwk", "x5c", "crit"];

/// Checks what serde alone does not: header and claims are each exactly one JSON object with
/// no repeated key at any depth (no "last wins"), and no forbidden header field is present.
/// `token` has already parsed as a compact JWS.
fn check_strict_json(token: &str) -> Result<(), TokenError> {
    let mut segments = token.split('.');
    let mut decode = |what: &str| {
        let segment = segments.next().ok_or_else(|| TokenError::Malformed(format!("missing {what}")))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(segment)
            .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header = decode("header")?;
    let claims = decode("claims")?;
    let header_keys =
        crate::json::strict_object_keys(&header).map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    if let Some(name) = FORBIDDEN_HEADERS.iter().find(|f| header_keys.iter().any(|k| k == *f)) {
        return Err(TokenError::ForbiddenHeader(name));
    }
    crate::json::strict_object_keys(&claims).map_err(TokenError::BadClaims)?;
    Ok(())
}

/// What the verifier checks besides the signature.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub keys: KeySet,
    pub issuer: String,
    pub audience: String,
    pub leeway_seconds: i64,
}

/// Why a token was refused. Messages never contain the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token is not a compact JWS: {0}")]
    Malformed(String),
    #[error("token header field `{0}` is not accepted")]
    ForbiddenHeader(&'static str),
    #[error("token header has no `kid`")]
    MissingKid,
    #[error("token is signed by unknown key `{0}`")]
    UnknownKey(String),
    #[error("token signature is invalid: {0}")]
    BadSignature(String),
    #[error("token claims are invalid: {0}")]
    BadClaims(String),
    #[error("token issuer `{0}` is not trusted")]
    Issuer(String),
    #[error("token audience does not include `{0}`")]
    Audience(String),
    #[error("token has no `exp` claim")]
    NoExpiry,
    #[error("token expired at {0}")]
    Expired(i64),
    #[error("token is not valid before {0}")]
    NotYetValid(i64),
}

/// Token text quoted in an error (and so in logs): control characters escaped, at most 64
/// characters, so a hostile `kid` cannot forge log lines or flood them.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().nth(64).is_some() {
        out.push('…');
    }
    out
}

/// A token whose signature and issuer/audience were checked; time is checked on every use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VerifiedToken {
    pub kid: String,
    pub subject: String,
    pub jti: String,
    pub auth_type: Option<String>,
    pub user: Option<String>,
    pub expires_at: i64,
    pub not_before: Option<i64>,
    pub issued_at: Option<i64>,
    pub grants: Vec<Scope>,
    /// `meta.access_level` per repository, as issued.
    pub access_levels: Vec<(String, u8)>,
    /// `meta.project_path` per repository, as issued (the project the token service found
    /// the repository in).
    pub project_paths: Vec<(String, String)>,
    /// `user_info.deploy_token_id` of the nested `user` JWT: which deploy token (not only
    /// which username) the token was issued to. The `user` JWT is covered by this token's
    /// signature, so its payload is read without a second verification.
    pub deploy_token_id: Option<u64>,
}

impl VerifiedToken {
    /// Checks `exp` and `nbf` against `now` with `leeway` seconds of tolerance.
    pub fn check_time(&self, now: i64, leeway: i64) -> Result<(), TokenError> {
        if now > self.expires_at.saturating_add(leeway) {
            return Err(TokenError::Expired(self.expires_at));
        }
        if let Some(nbf) = self.not_before {
            if now < nbf.saturating_sub(leeway) {
                return Err(TokenError::NotYetValid(nbf));
            }
        }
        Ok(())
    }

    /// Approximate heap bytes of this entry (strings and vectors), for the cache's byte bound.
    pub fn approx_bytes(&self) -> usize {
        let strings = self.kid.len()
            + self.subject.len()
            + self.jti.len()
            + self.auth_type.as_ref().map_or(0, String::len)
            + self.user.as_ref().map_or(0, String::len);
        let grants: usize = self.grants.iter().map(|g| std::mem::size_of::<Scope>() + g.resource.name().len()).sum();
        let levels: usize = self.access_levels.iter().map(|(r, _)| 32 + r.len()).sum();
        let projects: usize = self.project_paths.iter().map(|(r, p)| 48 + r.len() + p.len()).sum();
        std::mem::size_of::<VerifiedToken>() + strings + grants + levels + projects
    }

    /// The project the token service placed `repository` in (`meta.project_path`), if any.
    pub fn project_path(&self, repository: &str) -> Option<&str> {
        self.project_paths.iter().find(|(r, _)| r == repository).map(|(_, p)| p.as_str())
    }

    /// The access level the token states for `repository`, if any.
    pub fn access_level(&self, repository: &str) -> Option<u8> {
        self.access_levels.iter().find(|(r, _)| r == repository).map(|(_, l)| *l)
    }

    /// Actions this token grants on repository `name`.
    pub fn granted_repository(&self, name: &str) -> ActionSet {
        self.grants
            .iter()
            .filter(|g| matches!(&g.resource, Resource::Repository(r) if r == name))
            .fold(ActionSet::EMPTY, |acc, g| acc.union(g.actions))
    }

    /// Actions this token grants on `resource`.
    pub fn granted(&self, resource: &Resource) -> ActionSet {
        self.grants.iter().filter(|g| &g.resource == resource).fold(ActionSet::EMPTY, |acc, g| acc.union(g.actions))
    }
}

impl Verifier {
    /// Verifies signature, header, issuer, audience and time. `now` is unix seconds.
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedToken, TokenError> {
        let verified = self.verify_signature_and_claims(token)?;
        verified.check_time(now, self.leeway_seconds)?;
        Ok(verified)
    }

    /// Everything but time: the part worth caching.
    pub fn verify_signature_and_claims(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let untrusted = UntrustedToken::new(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        check_strict_json(token)?;
        let header = untrusted.header();
        let kid = header.key_id.clone().ok_or(TokenError::MissingKid)?;
        let key = self.keys.get(&kid).ok_or_else(|| TokenError::UnknownKey(shown(&kid)))?;
        let claims: Claims<RegistryClaims> = key.validate(&untrusted).map_err(token_error)?;
        let custom = claims.custom;
        if custom.iss != self.issuer {
            return Err(TokenError::Issuer(shown(&custom.iss)));
        }
        if !custom.aud.contains(&self.audience) {
            return Err(TokenError::Audience(self.audience.clone()));
        }
        let expires_at = claims.expiration.ok_or(TokenError::NoExpiry)?.timestamp();
        let grants = custom.access.iter().filter_map(grant_of).collect();
        let access_levels = custom
            .access
            .iter()
            .filter(|a| a.resource_type == "repository")
            .filter_map(|a| Some((a.name.clone(), a.meta.as_ref()?.access_level?)))
            .collect();
        let project_paths = custom
            .access
            .iter()
            .filter(|a| a.resource_type == "repository")
            .filter_map(|a| Some((a.name.clone(), a.meta.as_ref()?.project_path.clone()?)))
            .collect();
        let deploy_token_id = custom.user.as_deref().and_then(nested_deploy_token_id);
        Ok(VerifiedToken {
            kid,
            subject: custom.sub,
            jti: custom.jti,
            auth_type: custom.auth_type,
            user: custom.user,
            expires_at,
            not_before: claims.not_before.map(|t| t.timestamp()),
            issued_at: claims.issued_at.map(|t| t.timestamp()),
            grants,
            access_levels,
            project_paths,
            deploy_token_id,
        })
    }
}

/// `user_info.deploy_token_id` of a nested `user` JWT, read from its payload (the outer
/// token's signature covers it). `None` when absent or unreadable.
fn nested_deploy_token_id(user: &str) -> Option<u64> {
    let payload = user.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?.get("user_info")?.get("deploy_token_id")?.as_u64()
}

/// Converts one `access` entry to a grant; unknown types and actions grant nothing.
fn grant_of(a: &AccessClaim) -> Option<Scope> {
    let actions = a.actions.iter().filter_map(|s| Action::parse(s)).fold(ActionSet::EMPTY, ActionSet::with);
    let resource = match (a.resource_type.as_str(), a.name.as_str()) {
        ("repository", name) => Resource::Repository(name.to_owned()),
        ("registry", "catalog") => Resource::Catalog,
        _ => return None,
    };
    Some(Scope { resource, actions })
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

#[derive(Debug, thiserror::Error)]
#[error("cannot sign token: {0}")]
pub struct SignError(String);

/// Time claims of an issued token, unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub issued_at: i64,
    pub not_before: i64,
    pub expires_at: i64,
}

fn timestamp(t: i64) -> Result<DateTime<Utc>, SignError> {
    DateTime::from_timestamp(t, 0).ok_or_else(|| SignError(format!("timestamp {t} out of range")))
}

/// Signs any claims object (`T` is flattened next to `exp`, `nbf`, `iat`) with ES256.
pub fn sign<T: Serialize>(key: &SigningKey, custom: T, validity: Validity) -> Result<String, SignError> {
    let mut claims = Claims::new(custom);
    claims.expiration = Some(timestamp(validity.expires_at)?);
    claims.not_before = Some(timestamp(validity.not_before)?);
    claims.issued_at = Some(timestamp(validity.issued_at)?);
    let header = Header::empty().with_key_id(key.kid.clone()).with_token_type("JWT");
    Es256.token(&header, &claims, &key.key).map_err(|e| SignError(e.to_string()))
}

/// `user_info` of the nested `user` JWT (seeds 000/001).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub token_type: String,
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_token_id: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
struct UserClaims {
    jti: String,
    user_info: UserInfo,
}

/// A verified `user` JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedUser {
    pub jti: String,
    pub expires_at: i64,
    pub user_info: UserInfo,
}

/// Verifies a nested `user` JWT (as a consumer of registry events does): signature by a key
/// of `keys` (algorithm pinned by the key), `exp` with `tolerance` seconds — events are
/// delivered, and retried, after the request — and the `user_info` shape.
pub fn verify_user_jwt(token: &str, keys: &KeySet, now: i64, tolerance: i64) -> Result<VerifiedUser, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let untrusted = UntrustedToken::new(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    check_strict_json(token)?;
    let kid = untrusted.header().key_id.clone().ok_or(TokenError::MissingKid)?;
    let key = keys.get(&kid).ok_or_else(|| TokenError::UnknownKey(shown(&kid)))?;
    let claims: Claims<UserClaims> = key.validate(&untrusted).map_err(token_error)?;
    let expires_at = claims.expiration.ok_or(TokenError::NoExpiry)?.timestamp();
    if now > expires_at.saturating_add(tolerance) {
        return Err(TokenError::Expired(expires_at));
    }
    Ok(VerifiedUser { jti: claims.custom.jti, expires_at, user_info: claims.custom.user_info })
}

/// Signs an arbitrary JSON payload as a compact JWS with header `typ` (for tools and tests
/// that must produce what validation would refuse).
pub fn sign_jws_unchecked(key: &SigningKey, payload: &serde_json::Value, typ: &str) -> Result<String, SignError> {
    let header = Header::empty().with_key_id(key.kid.clone()).with_token_type(typ);
    Es256.token(&header, &Claims::new(payload.clone()), &key.key).map_err(|e| SignError(e.to_string()))
}

/// Decodes the claims of a JWT without verifying it (for tools and tests only).
pub fn decode_unverified(token: &str) -> Result<serde_json::Value, TokenError> {
    let untrusted: UntrustedToken<'_> = UntrustedToken::new(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    let claims = untrusted
        .deserialize_claims_unchecked::<serde_json::Value>()
        .map_err(|e| TokenError::BadClaims(e.to_string()))?;
    let mut v = claims.custom;
    if let Some(obj) = v.as_object_mut() {
        for (k, t) in [("exp", claims.expiration), ("nbf", claims.not_before), ("iat", claims.issued_at)] {
            if let Some(t) = t {
                obj.insert(k.into(), t.timestamp().into());
            }
        }
    }
    Ok(v)
}

/// Fixed signing keys for tests at every tier (native, wasm, e2e helpers).
pub mod testing {
    use super::*;

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
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn claims(access: Vec<AccessClaim>) -> RegistryClaims {
        RegistryClaims {
            iss: "issuer".into(),
            sub: "alice".into(),
            aud: Audience::One("container_registry".into()),
            jti: "j1".into(),
            access,
            auth_type: Some("password".into()),
            user: None,
            extra: BTreeMap::new(),
        }
    }

    fn verifier(keys: &[&SigningKey]) -> Verifier {
        Verifier {
            keys: KeySet::from_jwks(&jwks(keys)).unwrap(),
            issuer: "issuer".into(),
            audience: "container_registry".into(),
            leeway_seconds: 5,
        }
    }

    const NOW: i64 = 1_800_000_000;

    fn validity() -> Validity {
        Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 300 }
    }

    #[test]
    fn round_trip_with_grants() {
        let k = es256_key(1);
        let access = vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: vec!["pull".into(), "push".into(), "fly".into()],
            meta: Some(AccessMeta { project_path: Some("acme/web".into()), access_level: Some(30) }),
        }];
        let t = sign(&k, claims(access), validity()).unwrap();
        let v = verifier(&[&k]).verify(&t, NOW + 10).unwrap();
        assert_eq!(v.subject, "alice");
        assert_eq!(v.granted(&Resource::Repository("acme/web/app".into())).to_string(), "pull,push");
        assert!(v.granted(&Resource::Repository("acme/web".into())).is_empty());
    }

    #[test]
    fn time_edges_use_leeway() {
        let k = es256_key(1);
        let t = sign(&k, claims(vec![]), validity()).unwrap();
        let ver = verifier(&[&k]);
        assert!(ver.verify(&t, NOW + 305).is_ok());
        assert_eq!(ver.verify(&t, NOW + 306), Err(TokenError::Expired(NOW + 300)));
        assert!(ver.verify(&t, NOW - 5).is_ok());
        assert_eq!(ver.verify(&t, NOW - 6), Err(TokenError::NotYetValid(NOW)));
    }

    #[test]
    fn unknown_key_wrong_issuer_and_audience() {
        let k1 = es256_key(1);
        let k2 = es256_key(2);
        let t = sign(&k2, claims(vec![]), validity()).unwrap();
        assert!(matches!(verifier(&[&k1]).verify(&t, NOW), Err(TokenError::UnknownKey(_))));
        let mut c = claims(vec![]);
        c.iss = "evil".into();
        let t = sign(&k1, c, validity()).unwrap();
        assert_eq!(verifier(&[&k1]).verify(&t, NOW), Err(TokenError::Issuer("evil".into())));
        let mut c = claims(vec![]);
        c.aud = Audience::Many(vec!["x".into(), "container_registry".into()]);
        assert!(verifier(&[&k1]).verify(&sign(&k1, c, validity()).unwrap(), NOW).is_ok());
        let mut c = claims(vec![]);
        c.aud = Audience::One("x".into());
        assert!(matches!(
            verifier(&[&k1]).verify(&sign(&k1, c, validity()).unwrap(), NOW),
            Err(TokenError::Audience(_))
        ));
    }

    #[test]
    fn tampered_and_alg_none_tokens_are_rejected() {
        let k = es256_key(1);
        let t = sign(&k, claims(vec![]), validity()).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        let evil_claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"issuer","sub":"root","aud":"container_registry","jti":"x","exp":1900000000}"#);
        parts[1] = &evil_claims;
        let tampered = parts.join(".");
        assert!(matches!(verifier(&[&k]).verify(&tampered, NOW), Err(TokenError::BadSignature(_))));
        let header =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, k.kid));
        let none = format!("{header}.{evil_claims}.");
        assert!(verifier(&[&k]).verify(&none, NOW).is_err());
        assert!(matches!(verifier(&[&k]).verify("abc", NOW), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn eddsa_keys_verify_and_pin_their_algorithm() {
        let kp = ed25519_compact::KeyPair::generate();
        let jwk = JsonWebKey::from(&kp.pk);
        let mut jv = serde_json::to_value(&jwk).unwrap();
        jv["kid"] = "ed".into();
        let ver = Verifier {
            keys: KeySet::from_jwks(&serde_json::json!({"keys": [jv]})).unwrap(),
            issuer: "issuer".into(),
            audience: "container_registry".into(),
            leeway_seconds: 0,
        };
        let mut c = Claims::new(claims(vec![]));
        c.expiration = DateTime::from_timestamp(NOW + 60, 0);
        let t = Ed25519.token(&Header::empty().with_key_id("ed"), &c, &kp.sk).unwrap();
        assert_eq!(ver.verify(&t, NOW).unwrap().subject, "alice");
        // Same key id, but the header claims ES256: refused before any signature check.
        let es = es256_key(1);
        let t = Es256.token(&Header::empty().with_key_id("ed"), &c, &es.key).unwrap();
        assert!(matches!(ver.verify(&t, NOW), Err(TokenError::BadSignature(m)) if m.contains("lgorithm")));
    }

    #[test]
    fn key_set_errors_name_the_key() {
        let bad = serde_json::json!({"keys": [{"kty": "oct", "k": "AAAA"}]});
        assert!(matches!(KeySet::from_jwks(&bad), Err(KeySetError::Key { index: 0, .. })));
        let k = es256_key(1);
        let mut jwk = k.public_jwk();
        jwk["alg"] = "RS256".into();
        assert!(matches!(KeySet::from_jwks(&serde_json::json!({"keys": [jwk]})), Err(KeySetError::Key { .. })));
        assert_eq!(KeySet::from_jwks(&serde_json::json!({"keys": []})).unwrap_err(), KeySetError::Empty);
        let dup = jwks(&[&k, &k]);
        assert!(matches!(KeySet::from_jwks(&dup), Err(KeySetError::DuplicateKid { index: 1, .. })));
    }

    #[test]
    fn private_weak_and_unsupported_keys_are_refused_by_kid() {
        let k = es256_key(1);
        let refused =
            |jwk: serde_json::Value| KeySet::from_jwks(&serde_json::json!({"keys": [jwk]})).unwrap_err().to_string();
        // Private material.
        let mut private = k.public_jwk_as("signing-1");
        private["d"] = "AAAA".into();
        let e = refused(private);
        assert!(e.contains("key `signing-1` carries private key material (`d`)"), "{e}");
        // Small-order Ed25519 points (order 4: y = 0; order 1: the identity).
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut identity = [0u8; 32];
        identity[0] = 1;
        for (kid, x) in [("zero", [0u8; 32]), ("identity", identity)] {
            let e = refused(serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&x)}));
            assert!(e.contains(&format!("key `{kid}`")) && e.contains("weak or invalid Ed25519"), "{e}");
        }
        // Other curves.
        let e = refused(
            serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": b64(&[1; 48]), "y": b64(&[2; 48])}),
        );
        assert!(e.contains("key `p384`: curve `P-384` is not supported"), "{e}");
        let e = refused(
            serde_json::json!({"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": b64(&[1; 32]), "y": b64(&[2; 32])}),
        );
        assert!(e.contains("key `k1`"), "{e}");
        // A generated Ed25519 key is fine.
        let kp = ed25519_compact::KeyPair::generate();
        let mut ok = serde_json::to_value(JsonWebKey::from(&kp.pk)).unwrap();
        ok["kid"] = "ed".into();
        assert!(KeySet::from_jwks(&serde_json::json!({"keys": [ok]})).is_ok());
    }

    #[test]
    fn user_jwts_verify_with_delivery_tolerance() {
        let k = es256_key(1);
        let keys = KeySet::from_jwks(&jwks(&[&k])).unwrap();
        let claims = serde_json::json!({"jti": "u1", "user_info": {"token_type": "deploy_token", "username": "acme-ci", "deploy_token_id": 1}});
        let t = sign(&k, claims, validity()).unwrap();
        let v = verify_user_jwt(&t, &keys, NOW + 300 + 3600, 3600).unwrap();
        assert_eq!(v.user_info.deploy_token_id, Some(1));
        assert_eq!(v.user_info.user_id, None);
        assert!(matches!(verify_user_jwt(&t, &keys, NOW + 300 + 3601, 3600), Err(TokenError::Expired(_))));
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"jti":"u1","exp":1900000000,"user_info":{"token_type":"pat","username":"root","user_id":1}}"#);
        assert!(matches!(verify_user_jwt(&parts.join("."), &keys, NOW, 0), Err(TokenError::BadSignature(_))));
        let stranger = sign(
            &es256_key(2),
            serde_json::json!({"jti": "x", "user_info": {"token_type": "pat", "username": "x"}}),
            validity(),
        )
        .unwrap();
        assert!(matches!(verify_user_jwt(&stranger, &keys, NOW, 0), Err(TokenError::UnknownKey(_))));
    }

    #[test]
    fn token_text_in_errors_is_escaped_and_bounded() {
        // Regression (issue 7): an unknown `kid` with control characters reached the error
        // message, and so the logs, verbatim.
        assert_eq!(shown("a\nb\0"), "a\\nb\\0");
        assert_eq!(shown(&"k".repeat(100)), format!("{}…", "k".repeat(64)));
        let k = es256_key(1);
        let h = Header::empty().with_key_id("x\nINFO forged");
        let mut c = Claims::new(claims(vec![]));
        c.expiration = DateTime::from_timestamp(NOW + 60, 0);
        let t = Es256.token(&h, &c, &k.key).unwrap();
        let e = verifier(&[&k]).verify(&t, NOW).unwrap_err().to_string();
        assert!(!e.contains('\n') && e.contains("x\\nINFO"), "{e}");
    }

    #[test]
    fn null_crit_and_repeated_unknown_keys_are_refused() {
        // Regressions (issue 7): `"crit": null` deserialised to `None` and was accepted, and
        // repeated keys outside serde's known fields were "last wins".
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use p256::ecdsa::signature::Signer as _;
        let k = es256_key(1);
        let raw = |header: String, claims: &str| {
            let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
            let sig: p256::ecdsa::Signature = k.key.sign(input.as_bytes());
            format!("{input}.{}", B64.encode(sig.to_bytes()))
        };
        let claims = r#"{"iss":"issuer","sub":"alice","aud":"container_registry","jti":"j","exp":1800000060}"#;
        let ok = raw(format!(r#"{{"alg":"ES256","kid":"{}"}}"#, k.kid), claims);
        assert!(verifier(&[&k]).verify(&ok, NOW).is_ok());
        let t = raw(format!(r#"{{"alg":"ES256","kid":"{}","crit":null}}"#, k.kid), claims);
        assert_eq!(verifier(&[&k]).verify(&t, NOW), Err(TokenError::ForbiddenHeader("crit")));
        let t = raw(format!(r#"{{"alg":"ES256","kid":"{}","x":1,"x":2}}"#, k.kid), claims);
        assert!(
            matches!(verifier(&[&k]).verify(&t, NOW), Err(TokenError::Malformed(m)) if m.contains("duplicate key `x`"))
        );
        let dup = claims.replace(r#""jti":"j""#, r#""jti":"j","x":{"a":1,"a":2}"#);
        let t = raw(format!(r#"{{"alg":"ES256","kid":"{}"}}"#, k.kid), &dup);
        assert!(
            matches!(verifier(&[&k]).verify(&t, NOW), Err(TokenError::BadClaims(m)) if m.contains("duplicate key `a`"))
        );
    }

    #[test]
    fn forbidden_headers_are_refused() {
        let k = es256_key(1);
        let mut c = Claims::new(claims(vec![]));
        c.expiration = DateTime::from_timestamp(NOW + 60, 0);
        let h = Header::empty().with_key_id(k.kid.clone()).with_key_set_url("http://evil/jwks");
        let t = Es256.token(&h, &c, &k.key).unwrap();
        assert_eq!(verifier(&[&k]).verify(&t, NOW), Err(TokenError::ForbiddenHeader("jku")));
    }
}

#[cfg(test)]
mod kid_tests {
    use super::testing::*;
    use super::*;

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
