//! The HTTP API: the Docker token endpoint (`GET /jwt/auth`), its OAuth2 form
//! (`POST /jwt/auth`), the JWKS, the policy bundle (`PUT /bundle`, `GET /bundle/status`) and a
//! health check.
//!
//! Handlers only parse, authenticate and render; what a token grants is decided by the core
//! (`Directory::grant_under` the active policy for users, `DeployToken::grant` for the
//! policy's deploy tokens), and every token is signed by the core (`token::sign::sign`). Each token
//! request takes one snapshot of the active policy and decides everything under it: deploy
//! tokens, revocations and grants. `PUT /bundle` requires the operator token (a bearer
//! secret whose SHA-256 is configured) before anything of the body is read; a bundle is then
//! accepted only when signed by an operator key for this environment and newer than the
//! active revision (or byte for byte the active bundle).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, Extensions, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use registry_guard_core::policy::bundle::Policy;
use registry_guard_core::policy::directory::Directory;
use registry_guard_core::request::scope::{Resource, Scope};
use registry_guard_core::support::text::quote;
use registry_guard_core::token;
use registry_guard_core::token::verify::{Verifier, MAX_TOKEN_LEN};
use serde::Serialize;
use serde_json::json;

use crate::auth::{self, AuthError, AuthType, Authenticated, BasicAuth};
use crate::issue::{credential_epoch, IssueError, RefreshClaims, TokenIssuer, REFRESH_TOKEN_USE};
use crate::limits::{LoginGuard, Throttled};
use crate::policy::{PolicyStore, PushError, MAX_BUNDLE_BYTES};

/// The realm of the Basic challenge on a 401 from `GET /jwt/auth`.
pub const BASIC_REALM: &str = "registry-guard";
/// Message of a 401 when no credentials were sent.
pub const AUTH_REQUIRED_MESSAGE: &str =
    "authentication required: use HTTP Basic auth with a username and a password or personal access token";
/// Message of a 401 for wrong credentials, whether or not the user exists.
pub const INVALID_CREDENTIALS_MESSAGE: &str = "invalid username or password";
/// Largest accepted `POST /jwt/auth` body.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

/// What the key ring gives a request: the issuer (newest active key), the verifier of this
/// service's own refresh tokens (every published key) and the JWKS. Replaced as a whole on
/// a key reload, so a request sees one consistent set.
#[derive(Debug)]
pub struct ActiveKeys {
    pub issuer: TokenIssuer,
    /// Verifies this service's own refresh tokens (its public keys, its issuer and service).
    pub refresh_verifier: Verifier,
    pub jwks: serde_json::Value,
}

/// Everything a request handler needs, shared between requests.
#[derive(Debug)]
pub struct AppState {
    /// The principals (`principals.json`), replaced as a whole on SIGHUP.
    pub directory: RwLock<Arc<Directory>>,
    /// The service's `service` (token audience), fixed for its lifetime.
    pub service: String,
    pub keys: RwLock<Arc<ActiveKeys>>,
    /// A real argon2 hash verified for unknown users, so that timing does not reveal them.
    pub decoy_hash: Option<String>,
    /// Login abuse limits: per-client and per-username rate limits, the bounded argon2
    /// queue, and their counters.
    pub login: LoginGuard,
    /// The active policy bundle and the operator keys that may replace it.
    pub policy: PolicyStore,
    /// SHA-256 (hex) of the operator token `PUT /bundle` requires; `None`: no push is accepted.
    pub operator_token_sha256: Option<String>,
    /// SHA-256 (hex) of the token fleet members present to `GET /bundle` (the operator
    /// token is accepted too); with neither configured the bundle is not served.
    pub bundle_read_token_sha256: Option<String>,
    /// The longest `Prefer: wait=N` honoured on `GET /bundle` (below the request timeout).
    pub bundle_max_wait_seconds: u64,
    /// CI jobs (`ci_jobs` in token-service.json): `None` refuses job tokens and the jobs API.
    pub jobs: Option<crate::jobs::JobsState>,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
}

impl AppState {
    /// The key set to use for one request.
    pub fn keys(&self) -> Arc<ActiveKeys> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `keys` the key set of every following request.
    pub fn replace_keys(&self, keys: ActiveKeys) {
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }

    /// The principals to use for one request (one snapshot: a reload in the middle of a
    /// request does not mix two files).
    pub fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes `directory` the principals of every following request.
    pub fn replace_directory(&self, directory: Directory) {
        *self.directory.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(directory);
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/jwt/auth", get(get_token).post(post_token))
        .route("/jwks", get(jwks))
        .route("/healthz", get(healthz))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/bundle/status", get(bundle_status))
        .merge(crate::jobs::routes())
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        // Added after the form limit, so only this route gets the larger one; the operator
        // check runs first, before any of the body is read.
        .route(
            "/bundle",
            get(get_bundle).merge(
                put(put_bundle)
                    .layer(DefaultBodyLimit::max(MAX_BUNDLE_BYTES))
                    .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), require_operator)),
            ),
        )
        .with_state(state)
}

/// Current unix time; the core takes time as an argument, the service reads the clock.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A token endpoint answer (both flavors).
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: i64,
    pub issued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl TokenResponse {
    /// The JSON body, as `serde_json` writes it: the token (twice) is escaped once, and a
    /// compact JWS (base64url and dots: nothing to escape) is copied as it is.
    pub fn to_json(&self) -> String {
        fn string(out: &mut String, s: &str) {
            if is_jws_text(s) {
                out.push('"');
                out.push_str(s);
                out.push('"');
            } else {
                out.push_str(&serde_json::Value::from(s).to_string());
            }
        }
        let mut token = String::with_capacity(self.token.len() + 2);
        string(&mut token, &self.token);
        let mut out = String::with_capacity(2 * token.len() + self.refresh_token.as_ref().map_or(0, String::len) + 128);
        out.push_str("{\"token\":");
        out.push_str(&token);
        out.push_str(",\"access_token\":");
        if self.access_token == self.token {
            out.push_str(&token);
        } else {
            string(&mut out, &self.access_token);
        }
        out.push_str(&format!(",\"expires_in\":{},\"issued_at\":", self.expires_in));
        string(&mut out, &self.issued_at);
        if let Some(refresh) = &self.refresh_token {
            out.push_str(",\"refresh_token\":");
            string(&mut out, refresh);
        }
        out.push('}');
        out
    }
}

/// Whether `s` holds only base64url characters and dots (a compact JWS: nothing to escape in
/// JSON). Checked 64 bytes at a time without stopping early inside a block, which the
/// compiler turns into vector compares (a token is a kilobyte or more, checked per request).
fn is_jws_text(s: &str) -> bool {
    fn allowed(b: u8) -> bool {
        b.is_ascii_lowercase() || b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    }
    s.as_bytes().chunks(64).all(|block| block.iter().fold(true, |ok, &b| ok & allowed(b)))
}

impl IntoResponse for TokenResponse {
    fn into_response(self) -> Response {
        let content_type = HeaderValue::from_static("application/json");
        let mut response = ([(header::CONTENT_TYPE, content_type)], self.to_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        response
    }
}

/// Why a token request failed; rendered as Docker (`GET`) or OAuth2 (`POST`) errors.
#[derive(Debug)]
enum Problem {
    InvalidRequest(String),
    InvalidScope(String),
    /// No credentials at all (GET only).
    AuthenticationRequired,
    /// Wrong credentials or an unusable refresh token; the text is safe to show.
    InvalidCredentials(String),
    UnsupportedGrantType(String),
    /// Over a login limit: 429 `TOOMANYREQUESTS` with `Retry-After`.
    Throttled(Throttled),
    /// Our fault; the detail is logged, never sent.
    Internal(String),
}

impl From<IssueError> for Problem {
    fn from(e: IssueError) -> Self {
        Problem::Internal(e.to_string())
    }
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidCredentials => Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into()),
            AuthError::DeployTokenUnusable { message, .. } => Problem::InvalidCredentials(message),
            AuthError::Throttled(t) => Problem::Throttled(t),
            AuthError::Internal(detail) => Problem::Internal(detail),
        }
    }
}

impl Problem {
    fn log_internal(&self) {
        if let Problem::Internal(detail) = self {
            tracing::error!("token request failed: {detail}");
        }
    }

    /// 429 `TOOMANYREQUESTS` (the OCI/Docker error code) with `Retry-After`; the body also
    /// carries OAuth2's `error` fields, so both kinds of client read it.
    fn throttled_response(t: Throttled) -> Response {
        let body = json!({
            "errors": [{"code": "TOOMANYREQUESTS", "message": t.message}],
            "error": "too_many_requests",
            "error_description": t.message,
        });
        let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(t.retry_after_seconds()));
        response
    }

    /// `{"errors":[{"code","message"}]}` as the Docker token spec and OCI use.
    fn docker_response(self) -> Response {
        self.log_internal();
        let (status, code, message) = match self {
            Problem::Throttled(t) => return Problem::throttled_response(t),
            Problem::InvalidRequest(m) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST", m),
            Problem::InvalidScope(m) => (StatusCode::BAD_REQUEST, "INVALID_SCOPE", m),
            Problem::UnsupportedGrantType(m) => (StatusCode::BAD_REQUEST, "UNSUPPORTED", m),
            Problem::AuthenticationRequired => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", AUTH_REQUIRED_MESSAGE.into()),
            Problem::InvalidCredentials(m) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m),
            Problem::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "internal error".into()),
        };
        let mut response = (status, Json(json!({"errors": [{"code": code, "message": message}]}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{BASIC_REALM}\"")) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        response
    }

    /// `{"error","error_description"}` as OAuth2 (RFC 6749 §5.2) uses.
    fn oauth_response(self) -> Response {
        self.log_internal();
        let (status, error, description) = match self {
            Problem::Throttled(t) => return Problem::throttled_response(t),
            Problem::InvalidRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m),
            Problem::InvalidScope(m) => (StatusCode::BAD_REQUEST, "invalid_scope", m),
            Problem::UnsupportedGrantType(m) => (StatusCode::BAD_REQUEST, "unsupported_grant_type", m),
            Problem::AuthenticationRequired => {
                (StatusCode::UNAUTHORIZED, "invalid_grant", AUTH_REQUIRED_MESSAGE.into())
            }
            Problem::InvalidCredentials(m) => (StatusCode::UNAUTHORIZED, "invalid_grant", m),
            Problem::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal error".into()),
        };
        (status, Json(json!({"error": error, "error_description": description}))).into_response()
    }
}

/// Query or form parameters: `scope` may repeat, every other parameter may appear once.
#[derive(Debug, Default)]
struct Params {
    values: BTreeMap<String, String>,
    scopes: Vec<String>,
}

impl Params {
    fn parse(input: &[u8]) -> Result<Params, Problem> {
        let mut params = Params::default();
        for (key, value) in form_urlencoded::parse(input) {
            if key == "scope" {
                params.scopes.push(value.into_owned());
            } else if params.values.insert(key.clone().into_owned(), value.into_owned()).is_some() {
                return Err(Problem::InvalidRequest(format!("parameter `{}` is given more than once", quote(&key))));
            }
        }
        Ok(params)
    }

    /// A parameter's value; an empty value counts as absent.
    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn require(&self, key: &str) -> Result<&str, Problem> {
        self.get(key).ok_or_else(|| Problem::InvalidRequest(format!("missing parameter `{}`", quote(key))))
    }

    /// Checks `service` (if given) and parses every `scope`.
    fn service_and_scopes(&self, state: &AppState) -> Result<Vec<Scope>, Problem> {
        if let Some(service) = self.get("service") {
            if service != state.service {
                return Err(Problem::InvalidRequest(format!(
                    "unknown service `{}`; this token service issues tokens for `{}`",
                    quote(service),
                    state.service
                )));
            }
        }
        Scope::parse_all(self.scopes.iter().map(String::as_str)).map_err(|e| Problem::InvalidScope(e.to_string()))
    }
}

/// The 401 message for a user whose tokens are revoked (`revocations.users`).
pub fn access_revoked_message(username: &str) -> String {
    format!("access revoked for `{username}`")
}

/// Grants and signs the answer, all under `policy` (the request's one snapshot).
///
/// Users: requested ∩ permitted, minus what the policy's protection rules can never allow
/// (`Directory::grant_under`); a user the policy's revocations block at `now` gets nothing
/// (401 "access revoked for `<username>`"). Deploy tokens: requested ∩ scopes ∩ owner subtree
/// (`DeployToken::grant`); protection rules are left to the filter, which denies deploy tokens
/// wherever a rule applies (they hold no access level).
fn issue(
    state: &AppState,
    policy: &Policy,
    who: &Authenticated,
    scopes: &[Scope],
    offline: bool,
    now: i64,
) -> Result<TokenResponse, Problem> {
    let directory = state.directory();
    let (grants, withheld) = if let Some(job) = who.job.as_ref().filter(|_| who.auth_type == AuthType::JobToken) {
        let user = directory
            .user(&who.username)
            .ok_or_else(|| Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into()))?;
        if policy.credentials.revocations.user_blocked(&user.username, now) {
            return Err(Problem::InvalidCredentials(access_revoked_message(&user.username)));
        }
        directory.job_grant(policy, user, &job.project, scopes)
    } else if who.auth_type == AuthType::JobToken {
        return Err(Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into()));
    } else if who.is_deploy_token() {
        let deploy_token = policy
            .credentials
            .by_username(&who.username)
            .filter(|t| Some(t.id) == who.deploy_token_id)
            .ok_or_else(|| Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into()))?;
        (directory.deploy_grant(deploy_token, scopes), Vec::new())
    } else {
        let user = directory
            .user(&who.username)
            .ok_or_else(|| Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into()))?;
        if policy.credentials.revocations.user_blocked(&user.username, now) {
            tracing::info!(
                "token refused: access of {:?} is revoked (bundle revision {})",
                user.username,
                policy.revision
            );
            return Err(Problem::InvalidCredentials(access_revoked_message(&user.username)));
        }
        directory.grant_under(policy, user, scopes)
    };
    // Additional claims: those every granted repository's hierarchy agrees on.
    let claims = policy.claims.for_repositories(grants.iter().filter_map(|g| match &g.scope.resource {
        Resource::Repository(name) => Some(name.as_str()),
        Resource::Catalog => None,
    }));
    // Logged below; the names only (the values are the bundle's, not secrets, but long).
    let claim_names: Vec<String> = claims.keys().cloned().collect();
    let keys = state.keys();
    let token = keys.issuer.registry_token(who, &grants, claims, now)?;
    state.metrics.issued(who.auth_type.as_str());
    if token.len() > MAX_TOKEN_LEN {
        // The filter refuses tokens longer than this before parsing them: never issue one.
        tracing::info!(
            "token refused: sub={:?} would get a {} byte token for {} grants (the registry accepts {MAX_TOKEN_LEN})",
            quote(&who.username),
            token.len(),
            grants.len()
        );
        return Err(Problem::InvalidScope(format!(
            "the token for these {} scopes would be {} bytes, more than the {MAX_TOKEN_LEN} bytes the registry \
             accepts; request fewer scopes",
            scopes.len(),
            token.len()
        )));
    }
    // A job token gets no refresh token: it must not outlive the job.
    let refresh_token = if offline && who.auth_type != AuthType::JobToken {
        let epoch = credential_epoch_of(state, policy, who)
            .ok_or_else(|| Problem::Internal(format!("no credential epoch for {:?}", who.username)))?;
        Some(keys.issuer.refresh_token(who, &epoch, now)?)
    } else {
        None
    };
    tracing::info!(
        "{}",
        issued_line(who, scopes, &grants, &withheld, &claim_names, policy.revision, refresh_token.is_some())
    );
    Ok(TokenResponse {
        access_token: token.clone(),
        token,
        expires_in: keys.issuer.ttl_seconds,
        issued_at: rfc3339(now),
        refresh_token,
    })
}

/// The `issued token` log line: `sub="…" auth_type=… [deploy_token_id=…] requested=[…]
/// granted=[…] withheld=[…] [claims=[…]] bundle_revision=… refresh_token=…`, strings and
/// lists as `{:?}` writes them, built in one buffer (no string per scope).
fn issued_line(
    who: &Authenticated,
    scopes: &[Scope],
    grants: &[registry_guard_core::issue::grant::Grant],
    withheld: &[String],
    claim_names: &[String],
    revision: u64,
    refresh_token: bool,
) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(256);
    let mut scratch = String::new();
    line.push_str("issued token: sub=");
    push_debug_str(&mut line, &who.username);
    line.push_str(" auth_type=");
    line.push_str(who.auth_type.as_str());
    if let Some(id) = who.deploy_token_id {
        let _ = write!(line, " deploy_token_id={id}");
    }
    let mut list = |line: &mut String, name: &str, items: &mut dyn Iterator<Item = &dyn std::fmt::Display>| {
        line.push_str(name);
        line.push('[');
        for (i, item) in items.enumerate() {
            if i > 0 {
                line.push_str(", ");
            }
            scratch.clear();
            let _ = write!(scratch, "{item}");
            push_debug_str(line, &scratch);
        }
        line.push(']');
    };
    list(&mut line, " requested=", &mut scopes.iter().map(|s| s as &dyn std::fmt::Display));
    list(&mut line, " granted=", &mut grants.iter().map(|g| &g.scope as &dyn std::fmt::Display));
    list(&mut line, " withheld=", &mut withheld.iter().map(|w| w as &dyn std::fmt::Display));
    if !claim_names.is_empty() {
        list(&mut line, " claims=", &mut claim_names.iter().map(|c| c as &dyn std::fmt::Display));
    }
    let _ = write!(line, " bundle_revision={revision} refresh_token={refresh_token}");
    line
}

/// Appends `s` as `{:?}` writes it: quoted, printable ASCII other than `"` and `\` as it is
/// (the common case, without formatting machinery), anything else escaped by `Debug`.
fn push_debug_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        use std::fmt::Write as _;
        let _ = write!(out, "{s:?}");
    }
}

/// The client address a request came from (the peer), the key of the per-client limit.
fn client_of(extensions: &Extensions) -> String {
    extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |ConnectInfo(addr)| addr.ip().to_string())
}

/// Counts and logs one failed login: username (quoted, bounded), client, grant and reason;
/// never the secret.
fn login_failed(state: &AppState, username: &str, client: &str, grant: &str, reason: &str) {
    let total = state.login.login_failed();
    state.metrics.failed_login(reason);
    crate::audit::login_failed(username, client, grant, reason);
    tracing::info!(
        "login failed: username=\"{}\" client={client} grant={grant} reason={reason} failed_logins_total={total}",
        quote(username)
    );
}

/// Authenticates Basic or password-grant credentials under the per-username limit of
/// failed logins (a success gives its reservation back).
async fn authenticate(
    state: &AppState,
    policy: &Policy,
    credentials: &auth::Credentials,
    client: &str,
    grant: &str,
    now: i64,
) -> Result<Authenticated, Problem> {
    // Job tokens: every job logs in as `gitlab-ci-token`, so no per-username limit (one
    // client's bad job tokens must not throttle every job); verifying one is a signature
    // check, bounded by the per-client limit like every token request.
    if credentials.username == crate::jobs::JOB_TOKEN_USERNAME {
        return crate::jobs::authenticate(state, policy, &credentials.secret, now).map_err(|why| {
            login_failed(state, &credentials.username, client, grant, "job_token_refused");
            tracing::info!("job token refused: {why} (bundle revision {})", policy.revision);
            Problem::InvalidCredentials(format!("HTTP Basic: Access denied: {why}"))
        });
    }
    if let Err(t) = state.login.login_attempt(&credentials.username) {
        tracing::info!(
            "login throttled: username=\"{}\" client={client} grant={grant} retry_after={}s",
            quote(&credentials.username),
            t.retry_after_seconds()
        );
        return Err(Problem::Throttled(t));
    }
    let directory = state.directory();
    let result = auth::authenticate(
        &directory,
        &policy.credentials,
        state.decoy_hash.as_deref(),
        &state.login,
        credentials,
        now,
    )
    .await;
    match &result {
        Ok(_) => state.login.login_succeeded(&credentials.username),
        Err(AuthError::InvalidCredentials) => {
            login_failed(state, &credentials.username, client, grant, "invalid_credentials");
        }
        Err(AuthError::DeployTokenUnusable { detail, .. }) => {
            login_failed(state, &credentials.username, client, grant, "deploy_token_unusable");
            tracing::info!("authentication refused: {detail} (bundle revision {})", policy.revision);
        }
        // Not the client's fault: the reservation is given back.
        Err(AuthError::Throttled(_) | AuthError::Internal(_)) => state.login.login_succeeded(&credentials.username),
    }
    result.map_err(Problem::from)
}

/// `GET /jwt/auth?service=&scope=&account=&client_id=&offline_token=` with Basic auth. The
/// request is taken whole (a GET has no body to read) and its headers, query and peer
/// address read in place, rather than extracted as copies.
async fn get_token(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    let client = client_of(request.extensions());
    let query = request.uri().query().unwrap_or("");
    match get_token_inner(&state, &client, request.headers(), query).await {
        Ok(answer) => answer.into_response(),
        Err(problem) => problem.docker_response(),
    }
}

async fn get_token_inner(
    state: &AppState,
    client: &str,
    headers: &HeaderMap,
    query: &str,
) -> Result<TokenResponse, Problem> {
    state.login.client_request(client).map_err(Problem::Throttled)?;
    let params = Params::parse(query.as_bytes())?;
    let scopes = params.service_and_scopes(state)?;
    let offline = params.get("offline_token").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let credentials = match auth::basic_credentials(headers) {
        BasicAuth::Missing => return Err(Problem::AuthenticationRequired),
        BasicAuth::Malformed => return Err(Problem::InvalidCredentials(INVALID_CREDENTIALS_MESSAGE.into())),
        BasicAuth::Present(c) => c,
    };
    if let Some(account) = params.get("account") {
        if account != credentials.username {
            return Err(Problem::InvalidRequest(format!(
                "`account` `{}` does not match the username of the Basic credentials",
                quote(account)
            )));
        }
    }
    let now = now_unix();
    let policy = state.policy.snapshot();
    let who = authenticate(state, &policy, &credentials, client, "basic", now).await?;
    issue(state, &policy, &who, &scopes, offline, now)
}

/// `POST /jwt/auth`, OAuth2 form: `grant_type=password` or `grant_type=refresh_token`.
async fn post_token(
    State(state): State<Arc<AppState>>,
    extensions: Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = client_of(&extensions);
    match post_token_inner(&state, &client, &headers, &body).await {
        Ok(answer) => answer.into_response(),
        Err(problem) => problem.oauth_response(),
    }
}

async fn post_token_inner(
    state: &AppState,
    client: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<TokenResponse, Problem> {
    state.login.client_request(client).map_err(Problem::Throttled)?;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(Problem::InvalidRequest("the body must be `application/x-www-form-urlencoded`".into()));
    }
    let params = Params::parse(body)?;
    let grant_type = params.require("grant_type")?;
    if grant_type != "password" && grant_type != "refresh_token" {
        return Err(Problem::UnsupportedGrantType(format!(
            "grant_type `{}` is not supported (use `password` or `refresh_token`)",
            quote(grant_type)
        )));
    }
    let scopes = params.service_and_scopes(state)?;
    let now = now_unix();
    let policy = state.policy.snapshot();
    if grant_type == "password" {
        let credentials = auth::Credentials {
            username: params.require("username")?.to_owned(),
            secret: params.require("password")?.to_owned(),
        };
        let offline = params.get("access_type") == Some("offline");
        let who = authenticate(state, &policy, &credentials, client, "password", now).await?;
        issue(state, &policy, &who, &scopes, offline, now)
    } else {
        let who = redeem_refresh_token(state, &policy, params.require("refresh_token")?, client, now)?;
        issue(state, &policy, &who, &scopes, false, now)
    }
}

/// The credential epoch of `who` now (see [`credential_epoch`]): what a refresh token is
/// bound to. Password: the user's current password hash; personal access token: that
/// token's digest; deploy token: its id and digest; each with the user id or deploy token
/// id. A password change, a removed or replaced token, a replaced deploy token or a deleted
/// (or re-created) user changes it, and every refresh token issued before ends.
fn credential_epoch_of(state: &AppState, policy: &Policy, who: &Authenticated) -> Option<String> {
    let directory = state.directory();
    match who.auth_type {
        AuthType::DeployToken => {
            let t = policy.credentials.by_username(&who.username).filter(|t| Some(t.id) == who.deploy_token_id)?;
            Some(credential_epoch(who.auth_type, &who.username, t.id, &t.sha256))
        }
        AuthType::Password => {
            let user = directory.user(&who.username).filter(|u| Some(u.id) == who.user_id)?;
            Some(credential_epoch(who.auth_type, &user.username, user.id, user.password_hash.as_deref()?))
        }
        AuthType::Pat => {
            let user = directory.user(&who.username).filter(|u| Some(u.id) == who.user_id)?;
            let pat = user.personal_access_tokens.iter().find(|p| Some(&p.name) == who.pat_name.as_ref())?;
            Some(credential_epoch(who.auth_type, &user.username, user.id, &pat.sha256))
        }
        // Job tokens get no refresh token.
        AuthType::JobToken => None,
    }
}

/// Checks a refresh token issued by this service, that `policy` does not revoke it (its `jti`,
/// or its user's tokens issued before a cutoff), and that what it stood for still holds.
fn redeem_refresh_token(
    state: &AppState,
    policy: &Policy,
    refresh_token: &str,
    client: &str,
    now: i64,
) -> Result<Authenticated, Problem> {
    let verified = state.keys().refresh_verifier.verify(refresh_token, now).map_err(|e| {
        login_failed(state, "", client, "refresh_token", "refresh_token_invalid");
        tracing::info!("refresh token refused: {e}");
        Problem::InvalidCredentials("invalid refresh token: it is not a valid token from this service".into())
    })?;
    // The subject is known (the signature verified): the per-username limit of failures.
    state.login.login_attempt(&verified.subject).map_err(Problem::Throttled)?;
    let result = redeem_verified_refresh_token(state, policy, refresh_token, &verified, now);
    match &result {
        Ok(_) => state.login.login_succeeded(&verified.subject),
        Err(_) => login_failed(state, &verified.subject, client, "refresh_token", "refresh_token_ended"),
    }
    result
}

fn redeem_verified_refresh_token(
    state: &AppState,
    policy: &Policy,
    refresh_token: &str,
    verified: &token::verify::VerifiedToken,
    now: i64,
) -> Result<Authenticated, Problem> {
    let invalid = |why: &str| Problem::InvalidCredentials(format!("invalid refresh token: {why}"));
    let directory = state.directory();
    let claims: RefreshClaims = token::verify::decode_unverified(refresh_token)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or_else(|| invalid("it is not a refresh token"))?;
    if claims.token_use != REFRESH_TOKEN_USE {
        return Err(invalid("it is not a refresh token"));
    }
    let auth_type = AuthType::parse(&claims.auth_type).ok_or_else(|| invalid("unknown auth_type"))?;
    let is_user = auth_type != AuthType::DeployToken;
    if let Some(why) =
        policy.credentials.revocations.check(&verified.jti, &verified.subject, verified.issued_at, is_user)
    {
        tracing::info!("refresh token of {:?} refused: {why} (bundle revision {})", verified.subject, policy.revision);
        return Err(invalid(&why));
    }
    if auth_type == AuthType::DeployToken {
        let deploy_token = policy
            .credentials
            .by_username(&claims.sub)
            .filter(|t| claims.deploy_token_id == Some(t.id))
            .ok_or_else(|| invalid("its deploy token no longer exists"))?;
        if let Err(denial) = deploy_token.usable(now) {
            tracing::info!(
                "refresh token refused: {} (bundle revision {})",
                auth::denial_reason(denial),
                policy.revision
            );
            let why = if deploy_token.revoked { "its deploy token is revoked" } else { "its deploy token has expired" };
            return Err(invalid(why));
        }
        let who = Authenticated::deploy_token(deploy_token);
        check_epoch(state, policy, &who, &claims)?;
        return Ok(who);
    }
    let user = directory.user(&claims.sub).ok_or_else(|| invalid("its user no longer exists"))?;
    let still_valid = match auth_type {
        AuthType::Password => user.password_hash.is_some(),
        AuthType::Pat => user
            .personal_access_tokens
            .iter()
            .any(|p| Some(&p.name) == claims.pat_name.as_ref() && p.expires_at.map_or(true, |at| now < at)),
        AuthType::DeployToken | AuthType::JobToken => false,
    };
    if !still_valid {
        return Err(invalid("the credential it was issued for is gone or expired"));
    }
    let who = Authenticated::user(&user.username, user.id, auth_type, claims.pat_name.clone());
    check_epoch(state, policy, &who, &claims)?;
    Ok(who)
}

/// The refresh token's credential epoch must be the credential's current one: a password
/// change, a replaced token or a re-created user ends it.
fn check_epoch(state: &AppState, policy: &Policy, who: &Authenticated, claims: &RefreshClaims) -> Result<(), Problem> {
    let current = credential_epoch_of(state, policy, who);
    let matches = match (current.as_deref(), claims.epoch.as_deref()) {
        (Some(now), Some(then)) => auth::constant_time_eq(now.as_bytes(), then.as_bytes()),
        _ => false,
    };
    if matches {
        return Ok(());
    }
    tracing::info!(
        "refresh token of {:?} refused: its credential changed since it was issued (auth_type={})",
        quote(&who.username),
        who.auth_type.as_str()
    );
    Err(Problem::InvalidCredentials(
        "invalid refresh token: the credential it was issued for has changed since; log in again".into(),
    ))
}

/// `GET /jwks`: every public key of the ring (the signing key and the others published for
/// rotation), with an entity tag (the document's SHA-256): `If-None-Match` naming it gets a
/// 304, so filters and consumers following this URL poll cheaply.
async fn jwks(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let body = state.keys().jwks.to_string();
    let etag = format!("\"jwks-sha256:{}\"", crate::auth::sha256_hex(&body));
    let mut response = if if_none_match(&headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn healthz() -> &'static str {
    "ok"
}

/// The Bearer challenge on a 401 from `PUT /bundle`.
pub const OPERATOR_CHALLENGE: &str = "Bearer realm=\"registry-guard-operator\"";

/// Lets a request through only with `Authorization: Bearer <operator token>` and a body
/// announced within the limit; anything else is a 401 (413) before the body is read
/// (registry clients, who can reach this service to log in, cannot push or replay bundles).
async fn require_operator(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let refused = |reason: &str| {
        tracing::warn!("PUT /bundle refused before reading the body: {reason}");
        let challenge = HeaderValue::from_static(OPERATOR_CHALLENGE);
        let body = json!({"error": "unauthorized", "path": "authorization", "reason": reason,
                          "active_revision": state.policy.snapshot().revision});
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)], Json(body)).into_response()
    };
    let Some(expected) = state.operator_token_sha256.as_deref() else {
        return refused("no operator token is configured (`operator_token_sha256` in token-service.json): bundle pushes are disabled");
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(presented) = presented.filter(|t| !t.is_empty()) else {
        return refused("operator authentication required: `Authorization: Bearer <operator token>`");
    };
    if !auth::constant_time_eq(auth::sha256_hex(presented).as_bytes(), expected.as_bytes()) {
        return refused("the operator token is not valid");
    }
    // A body announced over the limit is refused from its length, before it is read.
    let announced =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BUNDLE_BYTES as u64) {
        let reason = format!("the bundle is larger than {MAX_BUNDLE_BYTES} bytes");
        let active_revision = state.policy.refuse_unread("$", &reason, now_unix());
        let body =
            json!({"error": "bundle_rejected", "path": "$", "reason": reason, "active_revision": active_revision});
        return (StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response();
    }
    next.run(request).await
}

/// `GET /stats`: counters of the login limits (no usernames, no secrets).
/// `GET /metrics`: Prometheus (OpenMetrics text); no secret, no username in any label.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.render(&state) {
        Ok(text) => {
            ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                .into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &state.login.stats;
    Json(json!({
        "failed_logins": s.failed_logins.load(Relaxed),
        "throttled_client": s.throttled_client.load(Relaxed),
        "throttled_username": s.throttled_username.load(Relaxed),
        "argon2_queue_full": s.argon2_queue_full.load(Relaxed),
        "tracked_clients": state.login.per_client.len(),
        "tracked_usernames": state.login.per_username.len(),
    }))
}

/// `PUT /bundle`: the body is a compact JWS as written by `rgctl sign`.
async fn put_bundle(State(state): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let now = now_unix();
    let (status, reason) = match body {
        Err(rejection) => (rejection.status(), format!("cannot read the request body: {}", rejection.body_text())),
        Ok(bytes) => match String::from_utf8(Vec::from(bytes)) {
            Ok(text) => return push_bundle(&state, text, now).await,
            Err(_) => (StatusCode::BAD_REQUEST, "the body is not UTF-8 text (expected a compact JWS)".to_owned()),
        },
    };
    // The body never reached verification (too large, unreadable): refused all the same.
    let active_revision = state.policy.refuse_unread("$", &reason, now);
    crate::audit::bundle("push", active_revision, Some(&reason));
    let body = json!({"error": "bundle_rejected", "path": "$", "reason": reason, "active_revision": active_revision});
    (status, Json(body)).into_response()
}

async fn push_bundle(state: &AppState, text: String, now: i64) -> Response {
    let result = state.policy.push(text, now).await;
    match &result {
        Ok(a) if !a.unchanged => crate::audit::bundle("push", a.revision, None),
        Ok(_) => {}
        Err(
            PushError::KeysNotConfigured { reason, active_revision }
            | PushError::Rejected { reason, active_revision, .. }
            | PushError::Rollback { reason, active_revision, .. }
            | PushError::Internal { reason, active_revision },
        ) => crate::audit::bundle("push", *active_revision, Some(reason)),
    }
    match result {
        Ok(accepted) => (
            StatusCode::OK,
            Json(
                json!({"active_revision": accepted.revision, "rules": accepted.rules, "unchanged": accepted.unchanged}),
            ),
        )
            .into_response(),
        Err(PushError::KeysNotConfigured { reason, active_revision }) => (
            StatusCode::CONFLICT,
            Json(json!({"error": "bundle_keys_not_configured", "path": "signature", "reason": reason,
                        "active_revision": active_revision})),
        )
            .into_response(),
        Err(PushError::Rejected { path, reason, active_revision }) => (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "bundle_rejected", "path": path, "reason": reason, "active_revision": active_revision}),
            ),
        )
            .into_response(),
        Err(PushError::Rollback { path, reason, active_revision }) => (
            StatusCode::CONFLICT,
            Json(
                json!({"error": "bundle_rollback", "path": path, "reason": reason, "active_revision": active_revision}),
            ),
        )
            .into_response(),
        Err(PushError::Internal { reason, active_revision }) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "bundle_not_activated", "reason": reason, "active_revision": active_revision})),
        )
            .into_response(),
    }
}

/// The Bearer challenge on a 401 from `GET /bundle`.
pub const BUNDLE_READ_CHALLENGE: &str = "Bearer realm=\"registry-guard-bundle\"";
/// Media type of a compact JWS (RFC 7515).
pub const JOSE_MEDIA_TYPE: &str = "application/jose";
/// Header naming the revision of the bundle in a `GET /bundle` answer.
pub const REVISION_HEADER: &str = "x-registry-guard-revision";

/// `GET /bundle`: the active signed bundle, for the fleet (Envoys running the filter,
/// token-service replicas). Needs the bundle read token or the operator token. Conditional
/// (`If-None-Match` with the `ETag` of an earlier answer → 304) and, with `Prefer: wait=N`,
/// long polling: an unchanged bundle holds the request up to N seconds (capped) and answers
/// as soon as a new bundle is activated, or 304 when the time is up.
async fn get_bundle(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let refused = |reason: &str| {
        tracing::warn!("GET /bundle refused: {reason}");
        let challenge = HeaderValue::from_static(BUNDLE_READ_CHALLENGE);
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            Json(json!({"error": "unauthorized", "reason": reason})),
        )
            .into_response()
    };
    if state.bundle_read_token_sha256.is_none() && state.operator_token_sha256.is_none() {
        return refused(
            "bundle distribution is disabled: set `bundle_read_token_sha256` (or `operator_token_sha256`) in token-service.json",
        );
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(presented) = presented else {
        return refused("authentication required: `Authorization: Bearer <bundle read token>`");
    };
    let digest = auth::sha256_hex(presented);
    let matches = |expected: &Option<String>| {
        expected.as_deref().is_some_and(|e| auth::constant_time_eq(digest.as_bytes(), e.as_bytes()))
    };
    // Both compared, always: the time taken does not say which token was close.
    let (read_ok, operator_ok) = (matches(&state.bundle_read_token_sha256), matches(&state.operator_token_sha256));
    if !(read_ok || operator_ok) {
        return refused("the bundle read token is not valid");
    }
    let wanted_wait = headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).find_map(prefer_wait);
    let wait = wanted_wait.map(|w| w.min(state.bundle_max_wait_seconds));
    // Subscribe before reading the active bundle, so an activation in between is not missed.
    let mut changes = state.policy.subscribe();
    changes.borrow_and_update();
    let mut published = state.policy.published();
    let unchanged = |p: &Option<crate::policy::Published>| p.as_ref().is_some_and(|p| if_none_match(&headers, &p.etag));
    if unchanged(&published) {
        if let Some(wait) = wait.filter(|w| *w > 0) {
            // Long poll: until the next activation or the end of the wait.
            if tokio::time::timeout(std::time::Duration::from_secs(wait), changes.changed()).await.is_ok() {
                published = state.policy.published();
            }
        }
    }
    let Some(p) = published else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no_bundle", "reason": "no bundle has been pushed to this service yet"})),
        )
            .into_response();
    };
    let etag = HeaderValue::from_str(&p.etag).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    let revision = HeaderValue::from(p.revision);
    let mut response = if if_none_match(&headers, &p.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static(JOSE_MEDIA_TYPE))], p.jws.to_string())
            .into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, etag);
    h.insert(REVISION_HEADER, revision);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(wait) = wait {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={wait}")) {
            h.insert("preference-applied", v);
        }
    }
    response
}

/// Whether `If-None-Match` names `etag` (or `*`).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

/// The `wait=N` preference of one `Prefer` header value (RFC 7240), in seconds.
fn prefer_wait(value: &str) -> Option<u64> {
    value.split(',').map(str::trim).find_map(|p| {
        let (name, v) = p.split_once('=')?;
        name.trim().eq_ignore_ascii_case("wait").then(|| v.trim().trim_matches('"').parse().ok()).flatten()
    })
}

/// `GET /bundle/status`: the active revision and the last refused push.
async fn bundle_status(State(state): State<Arc<AppState>>) -> Json<crate::policy::Status> {
    Json(state.policy.status())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn debug_strings_are_what_debug_writes() {
        for s in ["dev", "a b/c:d,e", "", "quote\"d", "back\\slash", "tab\t", "é", "\u{7f}", "\u{1}"] {
            let mut out = String::new();
            push_debug_str(&mut out, s);
            assert_eq!(out, format!("{s:?}"));
        }
    }

    #[test]
    fn the_issued_line_is_what_the_debug_format_wrote() {
        use registry_guard_core::issue::grant::Grant;
        let scopes = Scope::parse_all(["repository:acme/web/app:pull,push", "registry:catalog:*"]).unwrap();
        let grants = vec![Grant { scope: scopes[0].clone(), project_path: None, access_level: None }];
        let withheld = vec!["push on `acme/web/app` withheld: rule `x` (bundle revision 3)".to_owned()];
        let claims = ["cost_center".to_owned(), "tenant".to_owned()];
        for (who, claims) in [
            (Authenticated::user("dev \"q\"", 7, AuthType::Pat, Some("ci".into())), &claims[..]),
            (
                Authenticated {
                    username: "deploy-token-1".into(),
                    auth_type: AuthType::DeployToken,
                    user_id: None,
                    pat_name: None,
                    deploy_token_id: Some(1),
                    job: None,
                },
                &[][..],
            ),
        ] {
            let requested: Vec<String> = scopes.iter().map(ToString::to_string).collect();
            let granted: Vec<String> = grants.iter().map(|g| g.scope.to_string()).collect();
            let deploy_token = who.deploy_token_id.map(|id| format!(" deploy_token_id={id}")).unwrap_or_default();
            let claims_log = if claims.is_empty() { String::new() } else { format!(" claims={claims:?}") };
            let expected = format!(
                "issued token: sub={:?} auth_type={}{deploy_token} requested={requested:?} granted={granted:?} \
                 withheld={withheld:?}{claims_log} bundle_revision={} refresh_token={}",
                who.username,
                who.auth_type.as_str(),
                3,
                true,
            );
            assert_eq!(issued_line(&who, &scopes, &grants, &withheld, claims, 3, true), expected);
        }
    }

    #[test]
    fn jws_text_is_base64url_and_dots_only() {
        let long = "eyJhbGciOiJFUzI1NiJ9.".repeat(100);
        assert!(is_jws_text(&long) && is_jws_text(""));
        for bad in ["\"", "\\", " ", "+", "/", "=", "\n", "é", "\u{0}"] {
            // Anywhere in a block, in the first block or a later one.
            for at in [0, 63, 64, 1000, long.len()] {
                let mut s = long.clone();
                s.insert_str(at, bad);
                assert!(!is_jws_text(&s), "{bad:?} at {at}");
            }
        }
    }

    #[test]
    fn token_responses_are_what_serde_json_writes() {
        let jws = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln-_Q";
        let cases = [
            TokenResponse {
                token: jws.into(),
                access_token: jws.into(),
                expires_in: 300,
                issued_at: "2026-11-30T10:00:00Z".into(),
                refresh_token: None,
            },
            TokenResponse {
                token: jws.into(),
                access_token: jws.into(),
                expires_in: 60,
                issued_at: String::new(),
                refresh_token: Some(format!("{jws}x")),
            },
            // Not a JWS: escaped like serde_json escapes it.
            TokenResponse {
                token: "a\"b\\c\n\u{1}é".into(),
                access_token: "other \"one\"".into(),
                expires_in: -1,
                issued_at: "\u{7f}".into(),
                refresh_token: Some("\t".into()),
            },
        ];
        for case in cases {
            assert_eq!(case.to_json(), serde_json::to_string(&case).unwrap());
        }
    }
}
