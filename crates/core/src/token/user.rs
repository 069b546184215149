//! The nested `user` JWT (seeds 000/001): who a registry token was issued to, as the event
//! consumer verifies it.

use jwt_compact::{Claims, UntrustedToken};
use serde::{Deserialize, Serialize};

pub use crate::token::claims::JobRef;
use crate::token::jwks::KeySet;
use crate::token::verify::{check_strict_json, shown, token_error, TokenError, MAX_TOKEN_LEN};

/// `user_info` of the nested `user` JWT (seeds 000/001).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub token_type: String,
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_token_id: Option<u64>,
    /// For `token_type: job_token`: the CI job the token was issued through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRef>,
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
