//! Building and signing what the service hands out: registry tokens (with their nested `user`
//! JWT) and refresh tokens. Grants come from the core (`Directory::grant_under` for users,
//! `DeployToken::grant` for deploy tokens); signing is the core's `token::sign::sign`.

use rand_core::RngCore as _;
use registry_guard_core::issue::grant::Grant;
use registry_guard_core::policy::claims::{is_built_in, ClaimMap};
use registry_guard_core::request::access::AccessLevel;
use registry_guard_core::token;
use registry_guard_core::token::claims::{AccessClaim, AccessMeta, Audience, JobRef, RegistryClaims};
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::Validity;
use serde::{Deserialize, Serialize};

use crate::auth::{AuthType, Authenticated};

/// Lifetime of a refresh token (`offline_token=true` / `access_type=offline`): 30 days.
pub const REFRESH_TOKEN_TTL_SECONDS: i64 = 30 * 24 * 3600;
/// `nbf` is this many seconds before `iat`, for clients whose clock runs a little behind.
pub const NOT_BEFORE_SKEW_SECONDS: i64 = 5;
/// Refresh tokens are addressed to `<service>#refresh`, never to the registry's service, so
/// the filter (which requires `aud` = service) refuses them as bearer tokens.
pub fn refresh_audience(service: &str) -> String {
    format!("{service}#refresh")
}

/// The `token_use` claim that marks a refresh token.
pub const REFRESH_TOKEN_USE: &str = "refresh";

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no randomness available for a token id: {0}")]
    Random(String),
    #[error(transparent)]
    Sign(#[from] token::sign::SignError),
}

/// Signs tokens for one issuer, service and key.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    pub key: SigningKey,
    pub issuer: String,
    pub service: String,
    pub ttl_seconds: i64,
}

/// Claims of the nested `user` JWT: `{exp, iat, jti, nbf, user_info}`; for a deploy
/// token `user_info` names the deploy token instead of a user id.
#[derive(Debug, Serialize)]
struct UserClaims<'a> {
    jti: String,
    user_info: UserInfo<'a>,
}

#[derive(Debug, Serialize)]
struct UserInfo<'a> {
    /// `password`, `pat`, `deploy_token` or `job_token`.
    token_type: &'static str,
    username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deploy_token_id: Option<u64>,
    /// For a job token: the job (id, pipeline id, project), which the filter checks against
    /// the bundle's job revocations.
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<JobRef>,
}

/// Claims of a refresh token, besides `exp`, `nbf`, `iat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub jti: String,
    pub token_use: String,
    pub auth_type: String,
    /// For `auth_type = pat`: the token's name, so that a refresh stops working once that
    /// personal access token is removed or expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pat_name: Option<String>,
    /// For `auth_type = deploy_token`: the deploy token's id, so that a refresh stops working
    /// once that deploy token is gone (or its username names another one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_token_id: Option<u64>,
    /// The credential epoch ([`credential_epoch`]) the token was issued under: it stops
    /// working when the password, the personal access token or the deploy token behind it
    /// changes, or the user is deleted. A refresh token without one is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// The credential epoch of a principal: the first 128 bits (hex) of SHA-256 over a fixed
/// label, the auth type, the username, the user or deploy token id and the credential's
/// stored form (the argon2 PHC string, or the SHA-256 digest of a token). It reveals
/// nothing usable about the credential and changes whenever the credential does.
pub fn credential_epoch(auth_type: AuthType, username: &str, id: u64, stored_credential: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in ["registry-guard refresh epoch v1", auth_type.as_str(), username, &id.to_string(), stored_credential] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> Result<String, IssueError> {
    let mut bytes = vec![0u8; n];
    rand_core::OsRng.try_fill_bytes(&mut bytes).map_err(|e| IssueError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The `access` claim for a list of grants, actions in canonical order. `meta` carries the
/// project path and the principal's access level number on it (what the filter checks
/// protection rules against); it is left out when both are unknown.
pub fn access_claims(grants: &[Grant]) -> Vec<AccessClaim> {
    grants
        .iter()
        .map(|g| {
            let meta = AccessMeta {
                project_path: g.project_path.clone(),
                access_level: g.access_level.map(AccessLevel::number),
            };
            AccessClaim {
                resource_type: g.scope.resource.type_str().to_owned(),
                name: g.scope.resource.name().to_owned(),
                actions: g.scope.actions.to_vec(),
                meta: (meta.project_path.is_some() || meta.access_level.is_some()).then_some(meta),
            }
        })
        .collect()
}

impl TokenIssuer {
    fn validity(&self, now: i64, ttl: i64) -> Validity {
        Validity {
            issued_at: now,
            not_before: now.saturating_sub(NOT_BEFORE_SKEW_SECONDS),
            expires_at: now.saturating_add(ttl),
        }
    }

    /// A registry token for `who` carrying `grants` and the bundle's additional claims for
    /// them (`extra`, from `Claims::for_repositories`), issued at `now`. Built-in claims are
    /// always the service's own: an `extra` entry naming one is dropped (bundle validation
    /// already refuses them).
    pub fn registry_token(
        &self,
        who: &Authenticated,
        grants: &[Grant],
        extra: ClaimMap,
        now: i64,
    ) -> Result<String, IssueError> {
        let validity = self.validity(now, self.ttl_seconds);
        let user_claims = UserClaims {
            jti: random_hex(16)?,
            user_info: UserInfo {
                token_type: who.auth_type.as_str(),
                username: &who.username,
                user_id: who.user_id,
                deploy_token_id: who.deploy_token_id,
                job: who.job.as_ref().map(|j| JobRef {
                    id: j.id,
                    pipeline_id: j.pipeline_id,
                    project: j.project.clone(),
                }),
            },
        };
        let user = token::sign::sign(&self.key, user_claims, validity)?;
        let claims = RegistryClaims {
            iss: self.issuer.clone(),
            sub: who.username.clone(),
            aud: Audience::One(self.service.clone()),
            jti: random_hex(16)?,
            access: access_claims(grants),
            auth_type: Some(who.auth_type.as_str().to_owned()),
            user: Some(user),
            extra: extra.into_iter().filter(|(name, _)| !is_built_in(name)).collect(),
        };
        Ok(token::sign::sign(&self.key, claims, validity)?)
    }

    /// A refresh token for `who` under credential `epoch`, valid for
    /// [`REFRESH_TOKEN_TTL_SECONDS`].
    pub fn refresh_token(&self, who: &Authenticated, epoch: &str, now: i64) -> Result<String, IssueError> {
        let claims = RefreshClaims {
            iss: self.issuer.clone(),
            sub: who.username.clone(),
            aud: Audience::One(refresh_audience(&self.service)),
            jti: random_hex(16)?,
            token_use: REFRESH_TOKEN_USE.to_owned(),
            auth_type: who.auth_type.as_str().to_owned(),
            pat_name: match who.auth_type {
                AuthType::Pat => who.pat_name.clone(),
                AuthType::Password | AuthType::DeployToken | AuthType::JobToken => None,
            },
            deploy_token_id: match who.auth_type {
                AuthType::DeployToken => who.deploy_token_id,
                AuthType::Password | AuthType::Pat | AuthType::JobToken => None,
            },
            epoch: Some(epoch.to_owned()),
        };
        Ok(token::sign::sign(&self.key, claims, self.validity(now, REFRESH_TOKEN_TTL_SECONDS))?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use registry_guard_core::request::scope::Scope;

    #[test]
    fn access_claims_keep_canonical_order_and_meta() {
        let grants = vec![
            Grant {
                scope: Scope::parse("repository:acme/web/app:push,pull").unwrap(),
                project_path: Some("acme/web".into()),
                access_level: Some(AccessLevel::Developer),
            },
            Grant {
                scope: Scope::parse("repository:acme/web/app:pull").unwrap(),
                project_path: None,
                access_level: Some(AccessLevel::Admin),
            },
            Grant { scope: Scope::catalog(), project_path: None, access_level: None },
        ];
        let v = serde_json::to_value(access_claims(&grants)).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"type": "repository", "name": "acme/web/app", "actions": ["pull", "push"],
                 "meta": {"project_path": "acme/web", "access_level": 30}},
                {"type": "repository", "name": "acme/web/app", "actions": ["pull"], "meta": {"access_level": 60}},
                {"type": "registry", "name": "catalog", "actions": ["*"]}
            ])
        );
    }

    #[test]
    fn credential_epochs_change_with_the_credential() {
        let a = credential_epoch(AuthType::Password, "alice", 1, "$argon2id$v=19$m=256,t=1,p=1$c2FsdA$aGFzaA");
        assert_eq!(a.len(), 32);
        assert_eq!(a, credential_epoch(AuthType::Password, "alice", 1, "$argon2id$v=19$m=256,t=1,p=1$c2FsdA$aGFzaA"));
        assert_ne!(a, credential_epoch(AuthType::Password, "alice", 1, "$argon2id$v=19$m=256,t=1,p=1$c2FsdA$bmV3"));
        assert_ne!(a, credential_epoch(AuthType::Password, "alice", 2, "$argon2id$v=19$m=256,t=1,p=1$c2FsdA$aGFzaA"));
        assert_ne!(a, credential_epoch(AuthType::Pat, "alice", 1, "$argon2id$v=19$m=256,t=1,p=1$c2FsdA$aGFzaA"));
    }

    #[test]
    fn random_hex_has_the_right_length() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16).unwrap());
    }
}
