//! Issuing registry JWTs: any claims object signed with ES256 under the key's `kid`.

use chrono::{DateTime, Utc};
use jwt_compact::alg::Es256;
use jwt_compact::{AlgorithmExt as _, Claims, Header};
use serde::Serialize;

use crate::token::keys::SigningKey;

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

/// Signs an arbitrary JSON payload as a compact JWS with header `typ`, for tests that must
/// produce what validation would refuse (test scaffolding: the `testing` feature).
#[cfg(any(test, feature = "testing"))]
pub fn sign_jws_unchecked(key: &SigningKey, payload: &serde_json::Value, typ: &str) -> Result<String, SignError> {
    let header = Header::empty().with_key_id(key.kid.clone()).with_token_type(typ);
    Es256.token(&header, &Claims::new(payload.clone()), &key.key).map_err(|e| SignError(e.to_string()))
}
