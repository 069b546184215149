//! Who is asking: HTTP Basic credentials, deploy tokens (from the active policy bundle),
//! personal access tokens and argon2id passwords.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
use argon2::Argon2;
use axum::http::{header, HeaderMap};
use base64::Engine as _;
use registry_guard_core::policy::deploy::{self, DeployToken};
use registry_guard_core::policy::directory::Directory;
use sha2::{Digest as _, Sha256};

use crate::limits::{LoginGuard, Throttled};

/// How a user proved who they are; also the `token_type` of the nested `user` JWT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    /// The user's argon2id password.
    Password,
    /// One of the user's personal access tokens.
    Pat,
    /// A deploy token of the active policy bundle (not a user).
    DeployToken,
    /// A CI job's job token (`gitlab-ci-token`): the user who triggered the job, through it.
    JobToken,
}

impl AuthType {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Password => "password",
            AuthType::Pat => "pat",
            AuthType::DeployToken => "deploy_token",
            AuthType::JobToken => "job_token",
        }
    }

    pub fn parse(s: &str) -> Option<AuthType> {
        match s {
            "password" => Some(AuthType::Password),
            "pat" => Some(AuthType::Pat),
            "deploy_token" => Some(AuthType::DeployToken),
            "job_token" => Some(AuthType::JobToken),
            _ => None,
        }
    }
}

/// An authenticated principal: a user (by password or personal access token) or a deploy
/// token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The user's username, or the deploy token's username (`deploy-token-<id>` by default).
    pub username: String,
    pub auth_type: AuthType,
    /// The user's id; `None` for a deploy token.
    pub user_id: Option<u64>,
    /// The name of the personal access token used, for `AuthType::Pat`.
    pub pat_name: Option<String>,
    /// The deploy token's id, for `AuthType::DeployToken`.
    pub deploy_token_id: Option<u64>,
    /// The CI job, for `AuthType::JobToken`.
    pub job: Option<registry_guard_core::issue::job::Job>,
}

impl Authenticated {
    /// A user who proved their identity with `auth_type` (`Password` or `Pat`).
    pub fn user(username: &str, user_id: u64, auth_type: AuthType, pat_name: Option<String>) -> Authenticated {
        Authenticated {
            username: username.to_owned(),
            auth_type,
            user_id: Some(user_id),
            pat_name,
            deploy_token_id: None,
            job: None,
        }
    }

    /// A deploy token.
    pub fn deploy_token(token: &DeployToken) -> Authenticated {
        Authenticated {
            username: token.username.clone(),
            auth_type: AuthType::DeployToken,
            user_id: None,
            pat_name: None,
            deploy_token_id: Some(token.id),
            job: None,
        }
    }

    pub fn is_deploy_token(&self) -> bool {
        self.auth_type == AuthType::DeployToken
    }
}

/// A username and a secret (password or personal access token). `Debug` hides the secret.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub secret: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, <secret>)", self.username)
    }
}

/// What the `Authorization` header holds.
#[derive(Debug)]
pub enum BasicAuth {
    /// No header, or another scheme than Basic.
    Missing,
    /// A Basic header that is not base64 of `user:secret` with both parts non-empty.
    Malformed,
    Present(Credentials),
}

/// Reads HTTP Basic credentials from the request headers.
pub fn basic_credentials(headers: &HeaderMap) -> BasicAuth {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return BasicAuth::Missing;
    };
    let Ok(value) = value.to_str() else {
        return BasicAuth::Malformed;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return BasicAuth::Missing;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return BasicAuth::Missing;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return BasicAuth::Malformed;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return BasicAuth::Malformed;
    };
    match decoded.split_once(':') {
        Some((user, secret)) if !user.is_empty() && !secret.is_empty() => {
            BasicAuth::Present(Credentials { username: user.to_owned(), secret: secret.to_owned() })
        }
        _ => BasicAuth::Malformed,
    }
}

/// Lowercase hex SHA-256, the form in which `principals.json` and bundles store token
/// digests.
pub fn sha256_hex(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Both nibbles are below 16: `from_digit` always gives a (lowercase) digit.
        out.extend(char::from_digit(u32::from(b >> 4), 16));
        out.extend(char::from_digit(u32::from(b & 15), 16));
    }
    out
}

/// Compares two byte strings in time that depends only on their lengths (digests have a
/// fixed length), so a digest comparison does not leak how many leading characters match.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The core's explanation of a deploy token denial (for logs).
pub fn denial_reason(denial: deploy::DeployDenial) -> String {
    match denial {
        deploy::DeployDenial::Unusable(why)
        | deploy::DeployDenial::OutsideOwner(why)
        | deploy::DeployDenial::Forbidden(why) => why,
    }
}

/// Why a deploy token whose secret was right may not log in (the secret was right, so it is
/// fine to say which).
pub fn deploy_token_refusal(token: &DeployToken) -> String {
    let why = if token.revoked { "is revoked" } else { "has expired" };
    format!("HTTP Basic: Access denied: deploy token {why}")
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong username, password or token; deliberately one case whatever the cause.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// The deploy token's secret was right, but the token is revoked or expired; the text
    /// ([`deploy_token_refusal`]) is safe to show, `detail` (the core's reason) is for logs.
    #[error("{message}")]
    DeployTokenUnusable { message: String, detail: String },
    /// Too many password verifications waiting (the bounded argon2 queue).
    #[error("{}", .0.message)]
    Throttled(Throttled),
    #[error("password verification failed: {0}")]
    Internal(String),
}

/// Authenticates `credentials` at `now` (unix seconds), with the deploy tokens of one policy
/// snapshot (`deploy_tokens`).
///
/// When a deploy token has the Basic username and the secret's SHA-256 equals its digest
/// (constant-time comparison), this is that deploy token, provided it is usable at `now`
/// (else [`AuthError::DeployTokenUnusable`]). Otherwise (no such deploy token, or a wrong
/// secret) the user path follows, so a wrong deploy token secret gets the same answer as a
/// wrong password. The secret is first looked up as a personal access token (by SHA-256 digest; the owner
/// must be the Basic username and the token unexpired), then checked as the user's argon2id
/// password on a blocking thread. An unknown user still costs one argon2 verification (against
/// `decoy_hash`), so timing does not tell which usernames exist. Argon2 verifications run in
/// `login`'s slots behind a bounded queue ([`LoginGuard::argon2_slot`]); a full queue is
/// [`AuthError::Throttled`].
pub async fn authenticate(
    directory: &Directory,
    deploy_tokens: &deploy::Credentials,
    decoy_hash: Option<&str>,
    login: &LoginGuard,
    credentials: &Credentials,
    now: i64,
) -> Result<Authenticated, AuthError> {
    let digest = sha256_hex(&credentials.secret);
    if let Some(token) = deploy_tokens.by_username(&credentials.username) {
        if constant_time_eq(digest.as_bytes(), token.sha256.as_bytes()) {
            return match token.usable(now) {
                Ok(()) => Ok(Authenticated::deploy_token(token)),
                Err(denial) => Err(AuthError::DeployTokenUnusable {
                    message: deploy_token_refusal(token),
                    detail: denial_reason(denial),
                }),
            };
        }
    }
    if let Some((user, pat)) = directory.user_by_pat_digest(&digest) {
        let expired = pat.expires_at.is_some_and(|at| now >= at);
        if user.username == credentials.username && !expired {
            return Ok(Authenticated::user(&user.username, user.id, AuthType::Pat, Some(pat.name.clone())));
        }
    }
    let user = directory.user(&credentials.username);
    let own_hash = user.and_then(|u| u.password_hash.clone());
    let Some(hash) = own_hash.clone().or_else(|| decoy_hash.map(str::to_owned)) else {
        return Err(AuthError::InvalidCredentials);
    };
    let secret = credentials.secret.clone();
    // Bounds concurrent argon2 runs (each may take tens of MiB) and the requests waiting for
    // one, however many come in. Each run uses the slot's own memory, allocated once and
    // reused: allocating tens of MiB per run on ever new blocking threads kept hundreds of
    // MiB resident in the allocator's per-thread arenas.
    let slot = login.argon2_slot().await.map_err(AuthError::Throttled)?;
    let mut memory = login.take_memory();
    let (matches, memory) = tokio::task::spawn_blocking(move || {
        let matches = verify_password_with(&hash, &secret, &mut memory);
        (matches, memory)
    })
    .await
    .map_err(|e| AuthError::Internal(e.to_string()))?;
    login.return_memory(memory);
    drop(slot);
    match user {
        Some(user) if own_hash.is_some() && matches => {
            Ok(Authenticated::user(&user.username, user.id, AuthType::Password, None))
        }
        _ => Err(AuthError::InvalidCredentials),
    }
}

/// True when `secret` matches the argon2 PHC string `hash` (parameters come from the string).
pub fn verify_password(hash: &str, secret: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(secret.as_bytes(), &parsed).is_ok())
}

/// [`verify_password`] computing the hash in `memory` (resized to the hash's `m` blocks and
/// kept by the caller for the next run), compared in constant time.
pub fn verify_password_with(hash: &str, secret: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Ok(params), Ok(algorithm)) =
        (argon2::Params::try_from(&parsed), argon2::Algorithm::try_from(parsed.algorithm))
    else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    memory.resize(params.block_count(), argon2::Block::default());
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    argon.hash_password_into_with_memory(secret.as_bytes(), salt, &mut out, memory.as_mut_slice()).is_ok()
        && constant_time_eq(&out, expected.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn basic_header_forms() {
        let ok = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        match basic_credentials(&headers(&format!("Basic {ok}"))) {
            BasicAuth::Present(c) => {
                assert_eq!(c.username, "alice");
                assert_eq!(c.secret, "s3:cret");
                assert!(!format!("{c:?}").contains("s3"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(basic_credentials(&HeaderMap::new()), BasicAuth::Missing));
        assert!(matches!(basic_credentials(&headers("Bearer abc")), BasicAuth::Missing));
        assert!(matches!(basic_credentials(&headers("Basic !!!")), BasicAuth::Malformed));
        let no_secret = base64::engine::general_purpose::STANDARD.encode("alice:");
        assert!(matches!(basic_credentials(&headers(&format!("basic {no_secret}"))), BasicAuth::Malformed));
    }

    #[test]
    fn digest_is_lowercase_hex() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn verification_with_reused_memory_matches_the_library() {
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let params = argon2::Params::new(512, 2, 1, None).unwrap();
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let hash =
            argon.hash_password(b"right", &SaltString::encode_b64(b"0123456789abcdef").unwrap()).unwrap().to_string();
        let mut memory = Vec::new();
        assert!(verify_password_with(&hash, "right", &mut memory));
        assert!(!verify_password_with(&hash, "wrong", &mut memory));
        assert_eq!(memory.len(), 512);
        assert!(verify_password(&hash, "right") && !verify_password(&hash, "wrong"));
        assert!(!verify_password_with("not a hash", "right", &mut memory));
    }

    #[test]
    fn auth_types_round_trip() {
        for t in [AuthType::Password, AuthType::Pat, AuthType::DeployToken, AuthType::JobToken] {
            assert_eq!(AuthType::parse(t.as_str()), Some(t));
        }
        assert_eq!(AuthType::parse("oauth"), None);
    }
}
