//! Building and signing what the service hands out: registry tokens (with their nested `user`
//! JWT) and refresh tokens. Grants come from the core (`Directory::grant_under` for users,
//! `DeployToken::grant` for deploy tokens); signing is [`crate::signer::Es256Signer`] (ring's
//! P-256, the same compact JWS as the core's `token::sign::sign`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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
use crate::signer::{Es256Signer, SignerError};

/// Lifetime of a refresh token (`offline_token=true` / `access_type=offline`): 30 days.
pub const REFRESH_TOKEN_TTL_SECONDS: i64 = 30 * 24 * 3600;
/// `nbf` is this many seconds before `iat`, for clients whose clock runs a little behind.
pub const NOT_BEFORE_SKEW_SECONDS: i64 = 5;
/// Refresh tokens are addressed to `<service>#refresh`, never to the registry's service, so
/// the filter (which requires `aud` = service) refuses them as bearer tokens.
pub fn refresh_audience(service: &str) -> String {
    format!("{service}#refresh")
}

/// By default a nested `user` JWT is reused for this many seconds by every token issued to
/// the same principal (same `user_info`: token type, username, user or deploy token id, job)
/// with the same key (`user_jwt_reuse_seconds` in token-service.json; 0: a new one per
/// token). It is issued valid this much longer than the registry token, so that it still
/// covers the last token it goes into: `nbf` no later and `exp` no earlier than that token's.
/// Only the signature work is shared: authentication, revocations and grants are decided for
/// every request, and the registry token itself (its own `jti`, times and `access`) is new
/// each time. The `user` JWT grants nothing on its own (it has no `iss`, `aud` or `sub`: the
/// filter refuses it as a bearer token); it is what the event consumer attributes a push to.
pub const DEFAULT_USER_JWT_REUSE_SECONDS: i64 = 60;
/// Longest accepted `user_jwt_reuse_seconds`.
pub const MAX_USER_JWT_REUSE_SECONDS: i64 = 3600;
/// Most principals whose `user` JWT is kept at once; past that, expired entries are dropped,
/// and while none is, further principals get a fresh `user` JWT each time.
pub const USER_JWT_CACHE_ENTRIES: usize = 4096;

/// The `token_use` claim that marks a refresh token.
pub const REFRESH_TOKEN_USE: &str = "refresh";

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no randomness available for a token id: {0}")]
    Random(String),
    #[error(transparent)]
    Sign(#[from] token::sign::SignError),
    #[error(transparent)]
    Signer(#[from] SignerError),
}

/// Signs tokens for one issuer, service and key.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    pub key: SigningKey,
    /// The same key, as the issuance path signs with it.
    signer: Arc<Es256Signer>,
    /// `user` JWTs of this key, reused per principal for `user_jwt_reuse_seconds`.
    user_jwts: Arc<UserJwtCache>,
    pub user_jwt_reuse_seconds: i64,
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

/// A `user` JWT and when it was issued.
#[derive(Debug)]
struct CachedUserJwt {
    jwt: String,
    issued_at: i64,
}

impl CachedUserJwt {
    /// Whether this JWT may go into a registry token issued at `now`: issued no later than
    /// `now` (its `nbf` is then no later than the token's) and at most `reuse` seconds
    /// before (it was issued valid that much longer: its `exp` is no earlier than the token's).
    fn usable_at(&self, now: i64, reuse: i64) -> bool {
        self.issued_at <= now && now <= self.issued_at.saturating_add(reuse)
    }
}

/// The `user` JWTs of one signing key by their `user_info` (as JSON), bounded.
#[derive(Debug, Default)]
struct UserJwtCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: HashMap<String, CachedUserJwt>,
    /// While full: no entry expires before this time, so a new principal is not kept (and
    /// the entries are not scanned again) until then.
    full_until: Option<i64>,
}

impl UserJwtCache {
    fn get(&self, user_info: &str, now: i64, reuse: i64) -> Option<String> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.entries.get(user_info).filter(|e| e.usable_at(now, reuse)).map(|e| e.jwt.clone())
    }

    fn put(&self, user_info: String, jwt: String, now: i64, reuse: i64) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.entries.len() >= USER_JWT_CACHE_ENTRIES && !inner.entries.contains_key(&user_info) {
            // Only efficiency depends on this (a principal not kept gets a fresh JWT): `get`
            // checks every entry's time itself.
            if inner.full_until.is_some_and(|until| now <= until) {
                return;
            }
            inner.entries.retain(|_, e| e.usable_at(now, reuse));
            inner.full_until = None;
            if inner.entries.len() >= USER_JWT_CACHE_ENTRIES {
                inner.full_until = inner.entries.values().map(|e| e.issued_at.saturating_add(reuse)).min();
                return;
            }
        }
        inner.entries.insert(user_info, CachedUserJwt { jwt, issued_at: now });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }
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

/// Random bytes read from the operating system ([`rand_core::OsRng`]) per thread, this many
/// at a time: one `getrandom` call serves many token ids instead of one each. Every byte is
/// the kernel's, used once.
const RANDOM_BATCH: usize = 1024;

struct RandomBatch {
    bytes: [u8; RANDOM_BATCH],
    /// Bytes of `bytes` already handed out.
    used: usize,
}

thread_local! {
    static RANDOM: std::cell::RefCell<RandomBatch> =
        const { std::cell::RefCell::new(RandomBatch { bytes: [0; RANDOM_BATCH], used: RANDOM_BATCH }) };
}

/// `n` random bytes as lowercase hex (a token id).
pub fn random_hex(n: usize) -> Result<String, IssueError> {
    if n > 64 {
        return Err(IssueError::Random(format!("{n} bytes asked, 64 at most")));
    }
    RANDOM.with(|batch| {
        let mut batch = batch.borrow_mut();
        if batch.used + n > RANDOM_BATCH {
            rand_core::OsRng.try_fill_bytes(&mut batch.bytes).map_err(|e| IssueError::Random(e.to_string()))?;
            batch.used = 0;
        }
        let start = batch.used;
        let fresh = batch.bytes.get_mut(start..start + n).ok_or_else(|| IssueError::Random("batch overrun".into()))?;
        let hex = crate::auth::hex(fresh);
        // Handed out once: cleared, so nothing in memory repeats a past id's bytes.
        fresh.fill(0);
        batch.used = start + n;
        Ok(hex)
    })
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
    /// An issuer signing with `key` (refused if ring refuses the key).
    pub fn new(key: SigningKey, issuer: &str, service: &str, ttl_seconds: i64) -> Result<TokenIssuer, SignerError> {
        let signer = Arc::new(Es256Signer::new(&key)?);
        Ok(TokenIssuer {
            key,
            signer,
            user_jwts: Arc::default(),
            user_jwt_reuse_seconds: DEFAULT_USER_JWT_REUSE_SECONDS,
            issuer: issuer.to_owned(),
            service: service.to_owned(),
            ttl_seconds,
        })
    }

    /// The same issuer reusing `user` JWTs for `seconds` (0: a new one per token).
    pub fn with_user_jwt_reuse(self, seconds: i64) -> TokenIssuer {
        TokenIssuer { user_jwt_reuse_seconds: seconds.max(0), ..self }
    }

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
        let user = self.user_jwt(who, now)?;
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
        Ok(self.signer.sign(&claims, validity)?)
    }

    /// The nested `user` JWT for a registry token issued to `who` at `now`: the principal's
    /// kept one while `user_jwt_reuse_seconds` allow, else a new one (valid from `now` for
    /// the token lifetime plus `user_jwt_reuse_seconds`).
    pub fn user_jwt(&self, who: &Authenticated, now: i64) -> Result<String, IssueError> {
        let user_info = UserInfo {
            token_type: who.auth_type.as_str(),
            username: &who.username,
            user_id: who.user_id,
            deploy_token_id: who.deploy_token_id,
            job: who.job.as_ref().map(|j| JobRef { id: j.id, pipeline_id: j.pipeline_id, project: j.project.clone() }),
        };
        let reuse = self.user_jwt_reuse_seconds;
        let cache_key = if reuse > 0 {
            let key = serde_json::to_string(&user_info).map_err(|e| SignerError::Claims(e.to_string()))?;
            if let Some(jwt) = self.user_jwts.get(&key, now, reuse) {
                return Ok(jwt);
            }
            Some(key)
        } else {
            None
        };
        let validity = self.validity(now, self.ttl_seconds.saturating_add(reuse));
        let jwt = self.signer.sign(&UserClaims { jti: random_hex(16)?, user_info }, validity)?;
        if let Some(key) = cache_key {
            self.user_jwts.put(key, jwt.clone(), now, reuse);
        }
        Ok(jwt)
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
        Ok(self.signer.sign(&claims, self.validity(now, REFRESH_TOKEN_TTL_SECONDS))?)
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

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(registry_guard_core::token::testing::es256_key(5), "registry-guard", "container_registry", 300)
            .unwrap()
    }

    fn verifier() -> registry_guard_core::token::verify::Verifier {
        use registry_guard_core::token::testing::{es256_key, jwks};
        registry_guard_core::token::verify::Verifier {
            keys: registry_guard_core::token::jwks::KeySet::from_jwks(&jwks(&[&es256_key(5)])).unwrap(),
            issuer: "registry-guard".into(),
            audience: "container_registry".into(),
            leeway_seconds: 0,
        }
    }

    fn payload(jwt: &str) -> serde_json::Value {
        registry_guard_core::token::verify::decode_unverified(jwt).unwrap()
    }

    fn pull_grant() -> Vec<Grant> {
        vec![Grant {
            scope: Scope::parse("repository:acme/web/app:pull").unwrap(),
            project_path: Some("acme/web".into()),
            access_level: Some(AccessLevel::Developer),
        }]
    }

    #[test]
    fn user_jwts_are_reused_per_principal_within_the_window_and_cover_each_token() {
        let issuer = issuer();
        let alice = Authenticated::user("alice", 7, AuthType::Pat, Some("ci".into()));
        let t0 = 1_800_000_000;
        let first = issuer.registry_token(&alice, &pull_grant(), ClaimMap::default(), t0).unwrap();
        let mut users = vec![];
        for dt in [0, 1, 30, DEFAULT_USER_JWT_REUSE_SECONDS] {
            let token = issuer.registry_token(&alice, &pull_grant(), ClaimMap::default(), t0 + dt).unwrap();
            let verified = verifier().verify(&token, t0 + dt).unwrap();
            let user = verified.user.clone().unwrap();
            let (outer, inner) = (payload(&token), payload(&user));
            // The nested JWT covers the token it is in: nbf no later, exp no earlier.
            assert!(inner["nbf"].as_i64().unwrap() <= outer["nbf"].as_i64().unwrap(), "{dt}");
            assert!(inner["exp"].as_i64().unwrap() >= outer["exp"].as_i64().unwrap(), "{dt}");
            assert_eq!(inner["user_info"], serde_json::json!({"token_type": "pat", "username": "alice", "user_id": 7}));
            // Every registry token is new all the same.
            assert_ne!(outer["jti"], payload(&first)["jti"]);
            users.push(user);
        }
        assert!(users.iter().all(|u| *u == users[0]), "one user JWT within the window");
        assert_eq!(verifier().verify(&first, t0).unwrap().user.as_ref(), Some(&users[0]));
        // Past the window, or with the clock turned back: a new one.
        let later =
            issuer.registry_token(&alice, &pull_grant(), ClaimMap::default(), t0 + DEFAULT_USER_JWT_REUSE_SECONDS + 1);
        let later = verifier().verify(&later.unwrap(), t0 + DEFAULT_USER_JWT_REUSE_SECONDS + 1).unwrap().user.unwrap();
        assert_ne!(later, users[0]);
        let earlier = issuer.user_jwt(&alice, t0 - 1).unwrap();
        assert!(earlier != users[0] && earlier != later);
        // Another principal, or the same name with another id or credential kind: its own.
        let others = [
            Authenticated::user("bob", 8, AuthType::Pat, None),
            Authenticated::user("alice", 9, AuthType::Pat, Some("ci".into())),
            Authenticated::user("alice", 7, AuthType::Password, None),
        ];
        for who in &others {
            let user = issuer.user_jwt(who, t0).unwrap();
            assert_ne!(user, users[0], "{who:?}");
            assert_eq!(payload(&user)["user_info"]["username"], who.username.as_str());
            assert_eq!(payload(&user)["user_info"]["user_id"], who.user_id.unwrap());
        }
        // Another key (a reload builds a new issuer): its own user JWTs.
        let rotated = TokenIssuer::new(
            registry_guard_core::token::testing::es256_key(6),
            "registry-guard",
            "container_registry",
            300,
        )
        .unwrap();
        assert_ne!(rotated.user_jwt(&alice, t0).unwrap(), users[0]);
    }

    #[test]
    fn no_reuse_makes_a_user_jwt_per_token() {
        let issuer = issuer().with_user_jwt_reuse(0);
        let alice = Authenticated::user("alice", 7, AuthType::Pat, None);
        let t0 = 1_800_000_000;
        let (a, b) = (issuer.user_jwt(&alice, t0).unwrap(), issuer.user_jwt(&alice, t0).unwrap());
        assert_ne!(a, b);
        // Valid exactly as long as the token then.
        assert_eq!(payload(&a)["exp"].as_i64().unwrap(), t0 + 300);
        assert_eq!(issuer.user_jwts.len(), 0);
    }

    #[test]
    fn the_user_jwt_cache_is_bounded() {
        let issuer = issuer();
        let t0 = 1_800_000_000;
        let n = USER_JWT_CACHE_ENTRIES + 10;
        for i in 0..n {
            issuer.user_jwt(&Authenticated::user(&format!("u{i}"), i as u64, AuthType::Pat, None), t0).unwrap();
        }
        let len = || issuer.user_jwts.len();
        assert_eq!(len(), USER_JWT_CACHE_ENTRIES);
        // A principal past the bound still gets (fresh) user JWTs.
        let late = Authenticated::user("late", 1, AuthType::Pat, None);
        let (a, b) = (issuer.user_jwt(&late, t0).unwrap(), issuer.user_jwt(&late, t0).unwrap());
        assert_ne!(a, b);
        assert_eq!(payload(&a)["user_info"]["username"], "late");
        // Once the kept ones expire, they make room.
        issuer.user_jwt(&late, t0 + DEFAULT_USER_JWT_REUSE_SECONDS + 1).unwrap();
        assert_eq!(len(), 1);
    }

    #[test]
    fn random_hex_has_the_right_length() {
        let a = random_hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16).unwrap());
        assert!(random_hex(65).is_err());
    }

    #[test]
    fn batched_token_ids_are_distinct_across_refills() {
        // Several batches' worth, odd sizes included: every id has its length and none repeats.
        let mut seen = std::collections::HashSet::new();
        for i in 0..(3 * RANDOM_BATCH / 16) {
            let n = if i % 7 == 0 { 13 } else { 16 };
            let id = random_hex(n).unwrap();
            assert_eq!(id.len(), 2 * n);
            assert!(seen.insert(id), "a token id repeated");
        }
        assert!(random_hex(64).unwrap().len() == 128);
    }
}
