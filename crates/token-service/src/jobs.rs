//! CI jobs (issue 18): CI systems register jobs and get a **job token** (registry login as
//! `gitlab-ci-token`) and a **job ID token** (an OIDC ID token, GitLab's `CI_JOB_JWT`), and end
//! jobs when they finish. Decisions (who may run jobs, job token grants, job claims under the
//! mutability rules) are the core's (`issue::job`); this module authenticates CI systems,
//! signs, keeps the ended jobs of this replica and serves OIDC discovery.
//!
//! **Stateless across replicas.** A job token is a JWT signed with the registry signing key,
//! addressed to `<service>#job` (so the filter refuses it as a registry bearer token),
//! carrying the whole job: every replica that shares the signing key verifies it, nothing is
//! stored at registration. It expires with the job (`job_token_ttl_seconds`, or the
//! registration's shorter `ttl_seconds`): refused everywhere from then on.
//!
//! **Ending a job** records the job id in this replica's memory until the token's expiry:
//! from then on this replica refuses the job token at once. Other replicas do not learn of
//! it; to end a job fleet-wide at once, revoke it through the bundle (`revocations.jobs` by
//! job, pipeline or project), which every replica and every filter follows (within their
//! follow latency), or send the end to every replica.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jwt_compact::alg::{Rsa, RsaPrivateKey, RsaPublicKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{AlgorithmExt as _, Claims as JwtClaims, Header};
use registry_guard_core::issue::job::{job_claims, job_id_token_built_ins, may_run_jobs, Job, JobRefusal, RefType};
use registry_guard_core::policy::bundle::Policy;
use registry_guard_core::policy::claims::ClaimMap;
use registry_guard_core::policy::deploy::in_subtree;
use registry_guard_core::token;
use registry_guard_core::token::claims::{Audience, JobRef};
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::sign::Validity;
use registry_guard_core::token::verify::Verifier;
use rsa::pkcs8::DecodePrivateKey as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{self, AuthType, Authenticated};
use crate::config::ConfigError;
use crate::issue::{random_hex, NOT_BEFORE_SKEW_SECONDS};
use crate::routes::{now_unix, AppState};

/// The username of a registry login with a job token (GitLab's convention).
pub const JOB_TOKEN_USERNAME: &str = "gitlab-ci-token";
/// The `token_use` claim of a job token.
pub const JOB_TOKEN_USE: &str = "job";
/// Longest job token lifetime accepted in the settings (a day).
pub const MAX_JOB_TOKEN_TTL_SECONDS: i64 = 86_400;
/// Largest accepted registration body.
pub const MAX_REGISTRATION_BYTES: usize = 64 * 1024;

/// Job tokens are addressed to `<service>#job`, never to the registry's service.
pub fn job_audience(service: &str) -> String {
    format!("{service}#job")
}

/// `ci_jobs` of `token-service.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobsSettings {
    #[serde(default)]
    ci_systems: Vec<RawCiSystem>,
    #[serde(default = "default_job_ttl")]
    job_token_ttl_seconds: i64,
    /// The OIDC issuer (`iss` of job ID tokens and of the discovery document): the URL at
    /// which verifiers reach this service. Default: `http://<listen address>`.
    #[serde(default)]
    oidc_issuer: Option<String>,
    /// A PKCS#8 PEM RSA private key: job ID tokens are then RS256; without it they are ES256
    /// with the registry signing key.
    #[serde(default)]
    id_token_rsa_key: Option<PathBuf>,
    /// The other token-service replicas (base URLs): an end received here is forwarded to
    /// each of them, so the job's token is refused on every replica at once.
    #[serde(default)]
    peers: Vec<String>,
}

fn default_job_ttl() -> i64 {
    3600
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCiSystem {
    name: String,
    /// SHA-256 (hex) of the CI system's bearer token (`rgctl hash-token`).
    token_sha256: String,
    /// Groups or projects (their subtrees) the CI system may register jobs for.
    projects: Vec<String>,
}

/// A CI system allowed to register jobs.
#[derive(Debug, Clone)]
pub struct CiSystem {
    pub name: String,
    pub token_sha256: String,
    pub projects: Vec<String>,
}

/// How job ID tokens are signed.
#[derive(Clone)]
pub enum IdTokenKey {
    /// RS256 with this key, published under `kid`.
    Rs256 { key: Box<RsaPrivateKey>, kid: String },
    /// ES256 with the registry signing key (its JWKS entries are published).
    Es256,
}

impl std::fmt::Debug for IdTokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdTokenKey::Rs256 { kid, .. } => write!(f, "Rs256({kid})"),
            IdTokenKey::Es256 => f.write_str("Es256"),
        }
    }
}

/// The checked `ci_jobs` settings.
#[derive(Debug, Clone)]
pub struct JobsSettings {
    pub ci_systems: Vec<CiSystem>,
    pub job_token_ttl_seconds: i64,
    pub oidc_issuer: Option<String>,
    pub id_token_key: IdTokenKey,
    /// Base URLs of the other replicas that ends are forwarded to.
    pub peers: Vec<String>,
}

fn rsa_kid(public: &RsaPublicKey) -> String {
    registry_guard_core::token::keys::thumbprint(&JsonWebKey::from(public))
}

impl JobsSettings {
    /// Checks `raw` (`$.ci_jobs` of `settings_path`), reading the RSA key relative to `dir`.
    pub fn load(dir: &Path, settings_path: &Path, raw: RawJobsSettings) -> Result<JobsSettings, ConfigError> {
        let err = |field: String, reason: String| ConfigError::new(settings_path, Some(field), reason);
        let mut ci_systems = Vec::new();
        for (i, c) in raw.ci_systems.into_iter().enumerate() {
            let at = format!("$.ci_jobs.ci_systems[{i}]");
            if c.name.trim().is_empty() {
                return Err(err(format!("{at}.name"), "must not be empty".into()));
            }
            let digest = c.token_sha256.trim().to_ascii_lowercase();
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(
                    format!("{at}.token_sha256"),
                    "must be the SHA-256 of the CI system's token as 64 hex digits (`rgctl hash-token`)".into(),
                ));
            }
            if ci_systems.iter().any(|s: &CiSystem| s.token_sha256 == digest) {
                return Err(err(format!("{at}.token_sha256"), "the same token digest appears twice".into()));
            }
            if c.projects.is_empty() {
                return Err(err(format!("{at}.projects"), "names no group or project".into()));
            }
            for (j, p) in c.projects.iter().enumerate() {
                if !registry_guard_core::request::name::is_repository_name(p) {
                    return Err(err(
                        format!("{at}.projects[{j}]"),
                        format!("`{p}` is not a valid group or project path"),
                    ));
                }
            }
            ci_systems.push(CiSystem { name: c.name, token_sha256: digest, projects: c.projects });
        }
        if !(60..=MAX_JOB_TOKEN_TTL_SECONDS).contains(&raw.job_token_ttl_seconds) {
            return Err(err(
                "$.ci_jobs.job_token_ttl_seconds".into(),
                format!("must be between 60 and {MAX_JOB_TOKEN_TTL_SECONDS}, got {}", raw.job_token_ttl_seconds),
            ));
        }
        if let Some(iss) = &raw.oidc_issuer {
            let ok = (iss.starts_with("https://") || iss.starts_with("http://")) && !iss.ends_with('/');
            if !ok {
                return Err(err(
                    "$.ci_jobs.oidc_issuer".into(),
                    format!("must be an http(s) URL without a trailing `/`, got {iss:?}"),
                ));
            }
        }
        let id_token_key = match raw.id_token_rsa_key {
            None => IdTokenKey::Es256,
            Some(p) => {
                let path = dir.join(p);
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError::new(&path, None, format!("cannot read the job ID token RSA key: {e}")))?;
                let key = RsaPrivateKey::from_pkcs8_pem(pem.trim()).map_err(|e| {
                    ConfigError::new(
                        &path,
                        None,
                        format!("is not a PKCS#8 PEM RSA private key (`rgctl keygen --rsa` writes one): {e}"),
                    )
                })?;
                let kid = rsa_kid(&key.to_public_key());
                IdTokenKey::Rs256 { key: Box::new(key), kid }
            }
        };
        for (i, peer) in raw.peers.iter().enumerate() {
            let ok = (peer.starts_with("https://") || peer.starts_with("http://"))
                && !peer.ends_with('/')
                && peer.split("://").nth(1).is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
            if !ok {
                return Err(err(
                    format!("$.ci_jobs.peers[{i}]"),
                    format!("must be a replica's base URL (http(s)://host:port, no trailing `/`), got {peer:?}"),
                ));
            }
        }
        Ok(JobsSettings {
            ci_systems,
            job_token_ttl_seconds: raw.job_token_ttl_seconds,
            oidc_issuer: raw.oidc_issuer,
            id_token_key,
            peers: raw.peers,
        })
    }
}

/// What the service keeps for CI jobs: the settings, the OIDC issuer and the jobs ended on
/// this replica (job id → the job token's expiry, after which the entry is dropped).
#[derive(Debug)]
pub struct JobsState {
    pub settings: JobsSettings,
    pub oidc_issuer: String,
    ended: Mutex<HashMap<u64, i64>>,
}

impl JobsState {
    pub fn new(settings: JobsSettings, default_issuer: String) -> JobsState {
        let oidc_issuer = settings.oidc_issuer.clone().unwrap_or(default_issuer);
        JobsState { settings, oidc_issuer, ended: Mutex::new(HashMap::new()) }
    }

    fn ended(&self, job_id: u64) -> bool {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&job_id)
    }

    fn end(&self, job_id: u64, expires_at: i64, now: i64) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ended.retain(|_, exp| *exp >= now);
        ended.insert(job_id, expires_at);
    }

    fn ci_system(&self, headers: &HeaderMap) -> Option<&CiSystem> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())?;
        let digest = auth::sha256_hex(presented);
        // Every digest compared, so timing does not tell which one was close.
        let mut found = None;
        for s in &self.settings.ci_systems {
            if auth::constant_time_eq(digest.as_bytes(), s.token_sha256.as_bytes()) && found.is_none() {
                found = Some(s);
            }
        }
        found
    }
}

/// Claims of a job token besides `exp`, `nbf`, `iat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JobTokenClaims {
    iss: String,
    sub: String,
    aud: Audience,
    jti: String,
    token_use: String,
    user_id: u64,
    /// The CI system that registered the job.
    ci_system: String,
    job: Job,
}

/// A job's registration (`POST /jobs`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    project: String,
    /// Username of the user who triggered the job.
    user: String,
    pipeline_id: u64,
    job_id: u64,
    #[serde(rename = "ref")]
    ref_name: String,
    #[serde(default = "branch")]
    ref_type: RefType,
    #[serde(default)]
    ref_protected: bool,
    /// `aud` of the job ID token: one string or several; default the OIDC issuer.
    #[serde(default)]
    aud: Option<Audience>,
    /// The job's own claims for its ID token (seed 004's `jwt_claims`).
    #[serde(default)]
    claims: ClaimMap,
    /// A lifetime shorter than `job_token_ttl_seconds` (the job's timeout).
    #[serde(default)]
    ttl_seconds: Option<i64>,
}

fn branch() -> RefType {
    RefType::Branch
}

/// `POST /jobs/end` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndRequest {
    job_token: String,
}

/// A refusal of the jobs API: status and JSON body naming level, claim and rule.
fn refused(status: StatusCode, level: &str, claim: Option<&str>, rule: &str, message: String) -> Response {
    tracing::info!("job refused: {message}");
    let body = json!({"error": "job_refused", "level": level, "claim": claim, "rule": rule, "message": message});
    (status, Json(body)).into_response()
}

fn from_core(status: StatusCode, r: JobRefusal) -> Response {
    refused(status, &r.level, r.claim.as_deref(), r.rule, r.message)
}

fn unauthorized(reason: &str) -> Response {
    tracing::info!("jobs API refused: {reason}");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"registry-guard-ci\"")],
        Json(json!({"error": "unauthorized", "message": reason})),
    )
        .into_response()
}

fn internal(detail: &str) -> Response {
    tracing::error!("jobs API failed: {detail}");
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": "internal", "message": "internal error"}))).into_response()
}

/// The routes of CI jobs and OIDC discovery (merged into the service's router).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/jobs", post(register))
        .route("/jobs/end", post(end))
        .route("/.well-known/openid-configuration", get(openid_configuration))
        .route("/oidc/jwks", get(oidc_jwks))
}

// The error is the handler's finished answer, returned once per request: boxing buys nothing.
#[allow(clippy::result_large_err)]
fn jobs_of(state: &AppState) -> Result<&JobsState, Response> {
    state.jobs.as_ref().ok_or_else(|| {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "ci_jobs_disabled", "message": "CI jobs are not configured (`ci_jobs` in token-service.json)"})),
        )
            .into_response()
    })
}

/// `POST /jobs`: a CI system (bearer token) registers a job; 201 with the job token and the
/// job ID token.
async fn register(State(state): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let jobs = match jobs_of(&state) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Some(ci) = jobs.ci_system(&headers) else {
        return unauthorized("a CI system's token is required: `Authorization: Bearer <CI token>`");
    };
    if body.len() > MAX_REGISTRATION_BYTES {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "job",
            None,
            "invalid_request",
            format!("the registration is larger than {MAX_REGISTRATION_BYTES} bytes"),
        );
    }
    let reg: Registration = match registry_guard_core::support::de::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "job",
                None,
                "invalid_request",
                format!("invalid registration: {}: {}", e.path, e.reason),
            )
        }
    };
    let now = now_unix();
    let policy = state.policy.snapshot();
    match register_inner(&state, jobs, ci, &policy, reg, now) {
        Ok(v) => (StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(v)).into_response(),
        Err(r) => r,
    }
}

// The error is the handler's finished answer, returned once per request: boxing buys nothing.
#[allow(clippy::result_large_err)]
fn register_inner(
    state: &AppState,
    jobs: &JobsState,
    ci: &CiSystem,
    policy: &Policy,
    reg: Registration,
    now: i64,
) -> Result<serde_json::Value, Response> {
    let directory = state.directory();
    let project_level = format!("project `{}`", reg.project);
    if !ci.projects.iter().any(|p| in_subtree(p, &reg.project)) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            &project_level,
            None,
            "ci_system_scope",
            format!(
                "CI system `{}` may not register jobs for project `{}`: it covers {}",
                ci.name,
                reg.project,
                ci.projects.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let Some(user) = directory.user(&reg.user) else {
        return Err(refused(
            StatusCode::UNPROCESSABLE_ENTITY,
            &project_level,
            None,
            "unknown_user",
            format!("no user `{}` in the principals: a job runs as the user who triggered it", reg.user),
        ));
    };
    if policy.credentials.revocations.user_blocked(&user.username, now) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            &project_level,
            None,
            "user_revoked",
            format!("access of `{}` is revoked (bundle revision {})", user.username, policy.revision),
        ));
    }
    may_run_jobs(&directory, user, &reg.project).map_err(|r| from_core(StatusCode::FORBIDDEN, r))?;
    let job = Job {
        id: reg.job_id,
        pipeline_id: reg.pipeline_id,
        project: reg.project.clone(),
        user: user.username.clone(),
        ref_name: reg.ref_name.clone(),
        ref_type: reg.ref_type,
        ref_protected: reg.ref_protected,
    };
    if reg.ref_name.is_empty() || reg.ref_name.len() > 255 {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "job",
            None,
            "invalid_request",
            "`ref` must be 1-255 characters".into(),
        ));
    }
    if let Some(why) = policy.credentials.revocations.job(&job_ref(&job)) {
        return Err(refused(StatusCode::FORBIDDEN, &project_level, None, "job_revoked", why));
    }
    if jobs.ended(job.id) {
        return Err(refused(
            StatusCode::CONFLICT,
            "job",
            None,
            "job_ended",
            format!("job {} has ended: register a new job", job.id),
        ));
    }
    let extra = job_claims(&policy.claims, &job.project, &reg.claims)
        .map_err(|r| from_core(StatusCode::UNPROCESSABLE_ENTITY, r))?;
    let ttl = match reg.ttl_seconds {
        None => jobs.settings.job_token_ttl_seconds,
        Some(t) if (1..=jobs.settings.job_token_ttl_seconds).contains(&t) => t,
        Some(t) => {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "job",
                None,
                "invalid_request",
                format!("`ttl_seconds` must be between 1 and {}, got {t}", jobs.settings.job_token_ttl_seconds),
            ))
        }
    };
    let aud = reg.aud.unwrap_or_else(|| Audience::One(jobs.oidc_issuer.clone()));
    let validity = Validity {
        issued_at: now,
        not_before: now.saturating_sub(NOT_BEFORE_SKEW_SECONDS),
        expires_at: now.saturating_add(ttl),
    };
    let keys = state.keys();
    let job_token = token::sign::sign(
        &keys.issuer.key,
        JobTokenClaims {
            iss: keys.issuer.issuer.clone(),
            sub: user.username.clone(),
            aud: Audience::One(job_audience(&state.service)),
            jti: random_hex(16).map_err(|e| internal(&e.to_string()))?,
            token_use: JOB_TOKEN_USE.into(),
            user_id: user.id,
            ci_system: ci.name.clone(),
            job: job.clone(),
        },
        validity,
    )
    .map_err(|e| internal(&e.to_string()))?;
    let mut id_claims = extra;
    id_claims.extend(job_id_token_built_ins(&directory, &job, user));
    id_claims.insert("iss".into(), jobs.oidc_issuer.clone().into());
    id_claims.insert("aud".into(), serde_json::to_value(&aud).unwrap_or_default());
    id_claims.insert("jti".into(), random_hex(16).map_err(|e| internal(&e.to_string()))?.into());
    let id_token =
        sign_id_token(&keys.issuer.key, &jobs.settings.id_token_key, id_claims, validity).map_err(|e| internal(&e))?;
    tracing::info!(
        "job registered: ci_system={:?} job_id={} pipeline_id={} project={:?} user={:?} ref={:?} ref_protected={} \
         expires_in={ttl}s bundle_revision={}",
        ci.name,
        job.id,
        job.pipeline_id,
        job.project,
        job.user,
        job.ref_name,
        job.ref_protected,
        policy.revision
    );
    Ok(json!({
        "job_id": job.id,
        "job_token": job_token,
        "id_token": id_token,
        "expires_in": ttl,
        "expires_at": validity.expires_at,
    }))
}

fn job_ref(job: &Job) -> JobRef {
    JobRef { id: job.id, pipeline_id: job.pipeline_id, project: job.project.clone() }
}

/// Signs a job ID token: RS256 with the configured RSA key, else ES256 with the registry key.
fn sign_id_token(
    es256: &registry_guard_core::token::keys::SigningKey,
    key: &IdTokenKey,
    claims: ClaimMap,
    validity: Validity,
) -> Result<String, String> {
    match key {
        IdTokenKey::Es256 => token::sign::sign(es256, claims, validity).map_err(|e| e.to_string()),
        IdTokenKey::Rs256 { key, kid } => {
            let at =
                |t: i64| chrono::DateTime::from_timestamp(t, 0).ok_or_else(|| format!("timestamp {t} out of range"));
            let mut c = JwtClaims::new(claims);
            c.expiration = Some(at(validity.expires_at)?);
            c.not_before = Some(at(validity.not_before)?);
            c.issued_at = Some(at(validity.issued_at)?);
            let header = Header::empty().with_key_id(kid.clone()).with_token_type("JWT");
            Rsa::rs256().token(&header, &c, key).map_err(|e| e.to_string())
        }
    }
}

/// `POST /jobs/end`: the CI system that registered a job ends it (body `{"job_token"}`).
async fn end(State(state): State<Arc<AppState>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let jobs = match jobs_of(&state) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Some(ci) = jobs.ci_system(&headers) else {
        return unauthorized("a CI system's token is required: `Authorization: Bearer <CI token>`");
    };
    let req: EndRequest = match registry_guard_core::support::de::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "job",
                None,
                "invalid_request",
                format!("invalid end request: {}: {}", e.path, e.reason),
            )
        }
    };
    let now = now_unix();
    // An expired token's job has ended anyway; verify everything but the time.
    let (claims, expires_at) = match verify_job_token(&state, &req.job_token, None) {
        Ok(v) => v,
        Err(why) => return refused(StatusCode::BAD_REQUEST, "job", None, "invalid_job_token", why),
    };
    if claims.ci_system != ci.name {
        return refused(
            StatusCode::FORBIDDEN,
            &format!("project `{}`", claims.job.project),
            None,
            "ci_system_scope",
            format!("job {} was registered by CI system `{}`, not `{}`", claims.job.id, claims.ci_system, ci.name),
        );
    }
    jobs.end(claims.job.id, expires_at, now);
    tracing::info!("job ended: ci_system={:?} job_id={} project={:?}", ci.name, claims.job.id, claims.job.project);
    // An end forwarded by a peer is not forwarded again (no loops between replicas).
    if headers.contains_key(FORWARDED_END_HEADER) || jobs.settings.peers.is_empty() {
        return Json(json!({"job_id": claims.job.id, "ended": true})).into_response();
    }
    let authorization = headers.get(header::AUTHORIZATION).cloned();
    // All peers at once; each bounded by its timeout.
    let handles: Vec<_> = jobs
        .settings
        .peers
        .iter()
        .map(|peer| tokio::spawn(forward_end(peer.clone(), authorization.clone(), body.clone())))
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(h.await.unwrap_or_else(|e| Err(format!("forwarding failed: {e}"))));
    }
    let unconfirmed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    let peers: Vec<serde_json::Value> = jobs
        .settings
        .peers
        .iter()
        .zip(&results)
        .map(|(peer, r)| match r {
            Ok(()) => json!({"peer": peer, "ended": true}),
            Err(why) => json!({"peer": peer, "ended": false, "error": why}),
        })
        .collect();
    if unconfirmed.is_empty() {
        return Json(json!({"job_id": claims.job.id, "ended": true, "peers": peers})).into_response();
    }
    tracing::warn!("job {} ended here but not confirmed by every peer: {}", claims.job.id, unconfirmed.join("; "));
    (
        StatusCode::BAD_GATEWAY,
        Json(json!({
            "job_id": claims.job.id,
            "ended": true,
            "peers": peers,
            "error": "job_end_not_propagated",
            "message": format!(
                "job {} has ended on this replica, but {} of {} peers did not confirm it (their job token stays valid there until they do): retry the end",
                claims.job.id, unconfirmed.len(), jobs.settings.peers.len()
            ),
        })),
    )
        .into_response()
}

/// Marks an end forwarded by a peer replica.
const FORWARDED_END_HEADER: &str = "x-registry-guard-forwarded-end";

/// Forwards an end to one peer with the CI system's own credential; `Err` says why it is
/// not confirmed (safe to show: never the credential).
async fn forward_end(
    peer: String,
    authorization: Option<axum::http::HeaderValue>,
    body: axum::body::Bytes,
) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("{peer}: {e}"))?;
    let mut request = client
        .post(format!("{peer}/jobs/end"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(FORWARDED_END_HEADER, "1")
        .body(body.to_vec());
    if let Some(a) = authorization.as_ref().and_then(|a| a.to_str().ok()) {
        request = request.header(reqwest::header::AUTHORIZATION, a);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("{peer}: answered {}", r.status().as_u16())),
        Err(e) => {
            Err(format!("{peer}: {}", if e.is_timeout() { "timed out".to_owned() } else { "unreachable".to_owned() }))
        }
    }
}

/// Verifies a job token (signature by a published registry key, issuer, audience
/// `<service>#job`, `token_use`; and `exp`/`nbf` at `now` when given). Returns its claims and
/// expiry, or why not (safe to show).
fn verify_job_token(state: &AppState, token: &str, now: Option<i64>) -> Result<(JobTokenClaims, i64), String> {
    let keys = state.keys();
    let verifier = Verifier {
        keys: KeySet::from_jwks(&keys.jwks).map_err(|e| format!("keys: {e}"))?,
        issuer: keys.issuer.issuer.clone(),
        audience: job_audience(&state.service),
        // No leeway: an expired job's token is refused at once (replicas sign and check
        // with the same clock source; `nbf` already allows a few seconds of skew).
        leeway_seconds: 0,
    };
    let verified = match now {
        Some(now) => verifier.verify(token, now),
        None => verifier.verify_signature_and_claims(token),
    }
    .map_err(|e| format!("invalid job token: {e}"))?;
    let claims: JobTokenClaims = token::verify::decode_unverified(token)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .filter(|c: &JobTokenClaims| c.token_use == JOB_TOKEN_USE)
        .ok_or_else(|| "invalid job token: it is not a job token".to_owned())?;
    Ok((claims, verified.expires_at))
}

/// Authenticates a registry login as `gitlab-ci-token` with a job token: valid, unexpired,
/// not ended on this replica, its job not revoked by the bundle, its user still existing
/// and not revoked. Every refusal is a 401 with a message naming the cause.
pub fn authenticate(state: &AppState, policy: &Policy, secret: &str, now: i64) -> Result<Authenticated, String> {
    let directory = state.directory();
    let jobs = state.jobs.as_ref().ok_or_else(|| "job tokens are not accepted here (no `ci_jobs`)".to_owned())?;
    let (claims, _) = verify_job_token(state, secret, Some(now))?;
    if jobs.ended(claims.job.id) {
        return Err(format!("job {} has ended", claims.job.id));
    }
    if let Some(why) = policy.credentials.revocations.job(&job_ref(&claims.job)) {
        return Err(why);
    }
    let user = directory
        .user(&claims.sub)
        .filter(|u| u.id == claims.user_id)
        .ok_or_else(|| format!("the user of job {} no longer exists", claims.job.id))?;
    Ok(Authenticated {
        username: user.username.clone(),
        auth_type: AuthType::JobToken,
        user_id: Some(user.id),
        pat_name: None,
        deploy_token_id: None,
        job: Some(claims.job),
    })
}

/// `GET /.well-known/openid-configuration`: OIDC discovery for job ID token verifiers.
async fn openid_configuration(State(state): State<Arc<AppState>>) -> Response {
    let jobs = match jobs_of(&state) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let alg = match jobs.settings.id_token_key {
        IdTokenKey::Rs256 { .. } => "RS256",
        IdTokenKey::Es256 => "ES256",
    };
    let mut claims: Vec<&str> = registry_guard_core::issue::job::JOB_ID_TOKEN_BUILT_IN.to_vec();
    claims.sort_unstable();
    Json(json!({
        "issuer": jobs.oidc_issuer,
        "jwks_uri": format!("{}/oidc/jwks", jobs.oidc_issuer),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": [alg],
        "scopes_supported": ["openid"],
        "claims_supported": claims,
    }))
    .into_response()
}

/// `GET /oidc/jwks`: the keys that sign job ID tokens.
async fn oidc_jwks(State(state): State<Arc<AppState>>) -> Response {
    let jobs = match jobs_of(&state) {
        Ok(j) => j,
        Err(r) => return r,
    };
    match &jobs.settings.id_token_key {
        IdTokenKey::Es256 => Json(state.keys().jwks.clone()).into_response(),
        IdTokenKey::Rs256 { key, kid } => {
            let public = key.to_public_key();
            let mut jwk = serde_json::to_value(JsonWebKey::from(&public)).unwrap_or_default();
            if let Some(o) = jwk.as_object_mut() {
                o.insert("kid".into(), kid.clone().into());
                o.insert("alg".into(), "RS256".into());
                o.insert("use".into(), "sig".into());
            }
            Json(json!({"keys": [jwk]})).into_response()
        }
    }
}
