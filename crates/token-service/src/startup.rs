//! Settings, building the application (config + listener) and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use registry_guard_core::token::jwks::{KeySet, KeySetError};
use registry_guard_core::token::verify::Verifier;
use registry_guard_service::ServerLimits;
use tokio::net::TcpListener;

use crate::config::{load_key_ring, Config, ConfigError, KeyRing};
use crate::issue::TokenIssuer;
use crate::limits::LoginGuard;
use crate::policy::PolicyStore;
use crate::routes::{self, ActiveKeys, AppState};

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5001";
/// Clock skew tolerated when checking this service's own refresh tokens.
pub const REFRESH_LEEWAY_SECONDS: i64 = 30;

/// What the binary is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory holding `token-service.json`, `principals.json`, the signing key and
    /// (optionally) the operator keys and the active bundle.
    pub config_dir: PathBuf,
    /// Where to listen; port 0 picks a free port (tests).
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the signing key's public JWK is unusable: {0}")]
    Jwks(KeySetError),
    #[error("the signing key is unusable for signing: {0}")]
    SigningKey(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Facts for the startup line (no secrets).
#[derive(Debug, Clone)]
pub struct Summary {
    pub issuer: String,
    pub service: String,
    pub key_id: String,
    pub signing_key_path: PathBuf,
    /// Keys published in `/jwks` (the signing key included).
    pub published_keys: usize,
    pub token_ttl_seconds: i64,
    pub users: usize,
    /// Revision and rule count of the active bundle (0 and 0 without one).
    pub bundle_revision: u64,
    pub bundle_rules: usize,
    /// Operator keys file, when `bundle_keys` is configured.
    pub bundle_keys_path: Option<PathBuf>,
}

/// A bound, configured token service, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    server_limits: ServerLimits,
    summary: Summary,
    reloader: KeyReloader,
    state: Arc<AppState>,
    /// The bundle source this service follows, started with the server.
    follow: Option<(Arc<AppState>, crate::config::BundleSource)>,
}

/// The issuer, refresh verifier and JWKS of a key ring.
fn active_keys(
    ring: &KeyRing,
    issuer: &str,
    service: &str,
    ttl_seconds: i64,
    user_jwt_reuse_seconds: i64,
) -> Result<ActiveKeys, StartupError> {
    let jwks = ring.jwks();
    let refresh_verifier = Verifier {
        keys: KeySet::from_jwks(&jwks).map_err(StartupError::Jwks)?,
        issuer: issuer.to_owned(),
        audience: crate::issue::refresh_audience(service),
        leeway_seconds: REFRESH_LEEWAY_SECONDS,
    };
    Ok(ActiveKeys {
        issuer: TokenIssuer::new(ring.signing.clone(), issuer, service, ttl_seconds)
            .map(|i| i.with_user_jwt_reuse(user_jwt_reuse_seconds))
            .map_err(|e| StartupError::SigningKey(e.to_string()))?,
        refresh_verifier,
        jwks,
    })
}

/// Re-reads the key ring of `token-service.json` (`signing_key`/`signing_keys`,
/// `kid_format`) and swaps it in for the following requests; on any error the current keys
/// stay. Other settings are read at startup only.
#[derive(Clone)]
pub struct KeyReloader {
    state: Arc<AppState>,
    config_dir: PathBuf,
    issuer: String,
    service: String,
    ttl_seconds: i64,
    user_jwt_reuse_seconds: i64,
}

impl std::fmt::Debug for KeyReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyReloader({})", self.config_dir.display())
    }
}

impl KeyReloader {
    /// Returns the new signing key id and the number of published keys.
    pub fn reload(&self) -> Result<(String, usize), StartupError> {
        let ring = load_key_ring(&self.config_dir)?;
        let keys = active_keys(&ring, &self.issuer, &self.service, self.ttl_seconds, self.user_jwt_reuse_seconds)?;
        self.state.replace_keys(keys);
        Ok((ring.signing.kid, ring.keys.len()))
    }

    /// Re-reads `principals.json` (users, groups, projects, personal access tokens) and makes
    /// it the principals of every following request; returns the number of users. A file
    /// that does not load (unreadable, not JSON, a bad field or password hash) is refused
    /// with its error and the current principals stay.
    pub fn reload_principals(&self) -> Result<usize, StartupError> {
        let directory = crate::config::load_principals(&self.config_dir.join(crate::config::PRINCIPALS_FILE))?;
        let users = directory.users().len();
        self.state.replace_directory(directory);
        Ok(users)
    }
}

impl Application {
    /// Loads and checks the configuration directory, then binds the listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let config = Config::load(&settings.config_dir)?;
        let keys = active_keys(
            &config.keys,
            &config.issuer,
            &config.service,
            config.token_ttl_seconds,
            config.user_jwt_reuse_seconds,
        )?;
        let summary = Summary {
            issuer: config.issuer.clone(),
            service: config.service.clone(),
            key_id: config.keys.signing.kid.clone(),
            signing_key_path: config.keys.signing_path.clone(),
            published_keys: config.keys.keys.len(),
            token_ttl_seconds: config.token_ttl_seconds,
            users: config.directory.users().len(),
            bundle_revision: config.policy.revision,
            bundle_rules: config.policy.rules.len(),
            bundle_keys_path: config.bundle_keys_path.clone(),
        };
        let active = config.bundle_jws.map(|text| (text, routes::now_unix()));
        let policy =
            PolicyStore::new(config.policy, active, config.bundle_keys, config.environment.clone(), config.bundle_path);
        let decoy_hash = config.directory.users().iter().find_map(|u| u.password_hash.clone());
        let (listener, local_addr) = registry_guard_service::bind(settings.listen)
            .await
            .map_err(|source| StartupError::Bind { addr: settings.listen, source })?;
        let jobs = config.ci_jobs.map(|j| crate::jobs::JobsState::new(j, format!("http://{local_addr}")));
        let state = Arc::new(AppState {
            service: config.service.clone(),
            keys: RwLock::new(Arc::new(keys)),
            directory: std::sync::RwLock::new(Arc::new(config.directory)),
            decoy_hash,
            login: LoginGuard::new(config.login_limits.clone()),
            policy,
            operator_token_sha256: config.operator_token_sha256,
            bundle_read_token_sha256: config.bundle_read_token_sha256,
            // Long polls end well within the server's request timeout.
            bundle_max_wait_seconds: (config.server.request_timeout_ms / 1000).saturating_sub(5).min(120),
            jobs,
            metrics: crate::metrics::Metrics::new(),
        });
        let reloader = KeyReloader {
            state: Arc::clone(&state),
            config_dir: settings.config_dir.clone(),
            issuer: config.issuer,
            service: config.service,
            ttl_seconds: config.token_ttl_seconds,
            user_jwt_reuse_seconds: config.user_jwt_reuse_seconds,
        };
        let follow = config.bundle_source.clone().map(|source| (Arc::clone(&state), source));
        Ok(Application {
            state: Arc::clone(&state),
            follow,
            listener,
            local_addr,
            router: routes::router(state),
            server_limits: config.server.clone(),
            summary,
            reloader,
        })
    }

    /// A handle that re-reads the key ring and the principals (`main` calls it on SIGHUP).
    pub fn key_reloader(&self) -> KeyReloader {
        self.reloader.clone()
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The human-readable startup line; never contains a secret.
    pub fn startup_line(&self) -> String {
        let s = &self.summary;
        format!(
            "token service listening on http://{} (issuer={}, service={}, key id={}, {} published key{}, {} user{}, token ttl {}s, signing key {}, bundle revision {} ({} rule{}))",
            self.local_addr,
            s.issuer,
            s.service,
            s.key_id,
            s.published_keys,
            if s.published_keys == 1 { "" } else { "s" },
            s.users,
            if s.users == 1 { "" } else { "s" },
            s.token_ttl_seconds,
            s.signing_key_path.display(),
            s.bundle_revision,
            s.bundle_rules,
            if s.bundle_rules == 1 { "" } else { "s" },
        )
    }

    /// Serves until the process ends.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let _follower = self.follow.map(|(state, source)| crate::follow::spawn(state, source));
        // (runs as long as the process)
        registry_guard_service::serve(self.listener, self.router, self.server_limits, std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until<F>(self, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let follower = self.follow.map(|(state, source)| crate::follow::spawn(state, source));
        // Shutting down ends waiting long polls at once instead of waiting for them.
        let state = Arc::clone(&self.state);
        let shutdown = async move {
            shutdown.await;
            state.policy.release_waiters();
        };
        let served = registry_guard_service::serve(self.listener, self.router, self.server_limits, shutdown).await;
        if let Some(follower) = follower {
            follower.abort();
        }
        served
    }
}
