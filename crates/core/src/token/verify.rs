//! Verification of registry JWTs: size, strict JSON, header, signature (the algorithm is
//! pinned by the key: a token whose header names another algorithm is rejected by
//! jwt-compact before any signature check), issuer, audience and the `access` grants. Time is
//! an argument (`now`, unix seconds); nothing here reads a clock.

use base64::Engine as _;
use jwt_compact::alg::{Ed25519, Rsa};
use jwt_compact::{AlgorithmExt as _, Claims, UntrustedToken};

use crate::request::access::{Action, ActionSet};
use crate::request::scope::{Resource, Scope};
use crate::token::claims::{AccessClaim, RegistryClaims};
use crate::token::es256::Es256Tables;
use crate::token::jwks::KeySet;
use crate::token::keys::VerifyingKey;

/// Tokens longer than this are refused before parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

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

pub(crate) fn token_error(e: jwt_compact::ValidationError) -> TokenError {
    match e {
        jwt_compact::ValidationError::MalformedClaims(e) => TokenError::BadClaims(e.to_string()),
        other => TokenError::BadSignature(other.to_string()),
    }
}

/// Header fields we refuse to honour, by presence (even `null`): keys must come from
/// configuration, never from the token, and no extension may be critical.
const FORBIDDEN_HEADERS: [&str; 5] = ["jku", "x5u", "jwk", "x5c", "crit"];

/// Checks what serde alone does not: header and claims are each exactly one JSON object with
/// no repeated key at any depth (no "last wins"), and no forbidden header field is present.
/// `token` has already parsed as a compact JWS.
pub(crate) fn check_strict_json(token: &str) -> Result<(), TokenError> {
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
        crate::support::json::strict_object_keys(&header).map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    if let Some(name) = FORBIDDEN_HEADERS.iter().find(|f| header_keys.iter().any(|k| k == *f)) {
        return Err(TokenError::ForbiddenHeader(name));
    }
    crate::support::json::strict_object_keys(&claims).map_err(TokenError::BadClaims)?;
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
pub(crate) fn shown(s: &str) -> String {
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
    /// `user_info.job` of the nested `user` JWT: the CI job behind a job token (read like
    /// `deploy_token_id`), so bundle revocations of jobs reach tokens already issued.
    pub job: Option<crate::token::claims::JobRef>,
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
            + self.user.as_ref().map_or(0, String::len)
            + self.job.as_ref().map_or(0, |j| 16 + j.project.len());
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
        let job = custom.user.as_deref().and_then(nested_job);
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
            job,
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

/// `user_info.job` of a nested `user` JWT, read from its payload as [`nested_deploy_token_id`].
fn nested_job(user: &str) -> Option<crate::token::claims::JobRef> {
    let payload = user.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let value = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?;
    serde_json::from_value(value.get("user_info")?.get("job")?.clone()).ok()
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

/// Decodes the claims of a JWT without verifying it. Not test scaffolding: the token service
/// reads the extra claims of a refresh token it has already verified with this, and `rgctl`
/// reads the revision a bundle claims; tests use it to look inside issued tokens.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use chrono::DateTime;
    use jwt_compact::alg::Es256;
    use jwt_compact::jwk::JsonWebKey;
    use jwt_compact::Header;

    use crate::token::claims::{AccessMeta, Audience};
    use crate::token::jwks::KeySetError;
    use crate::token::keys::SigningKey;
    use crate::token::sign::{sign, Validity};
    use crate::token::testing::*;
    use crate::token::user::verify_user_jwt;

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
