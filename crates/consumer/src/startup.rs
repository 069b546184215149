//! Settings, building the application (keys, secret, database, listener) and running it.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use registry_guard_core::token::{KeySet, KeySetError};
use tokio::net::TcpListener;

use crate::routes::{self, AppState};
use crate::store::{Store, StoreError};

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5005";
/// Default `--tolerance-seconds`: a `user` JWT is accepted for a day after its `exp`, because
/// the registry delivers (and retries) events after the request that caused them.
pub const DEFAULT_TOLERANCE_SECONDS: i64 = 86_400;

/// What the binary is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// The SQLite file (created if missing).
    pub database: PathBuf,
    /// The token service's JWKS: the public keys that sign the nested `user` JWTs.
    pub jwks: PathBuf,
    /// A file holding the bearer secret the registry sends (surrounding whitespace ignored).
    pub secret_file: PathBuf,
    /// Seconds a `user` JWT is still accepted after its `exp`.
    pub tolerance_seconds: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{}: cannot read the JWKS: {error}", path.display())]
    ReadJwks { path: PathBuf, error: std::io::Error },
    #[error("{}: the JWKS is not JSON: {error}", path.display())]
    JwksJson { path: PathBuf, error: serde_json::Error },
    #[error("{}: {error}", path.display())]
    Jwks { path: PathBuf, error: KeySetError },
    #[error("{}: cannot read the secret: {error}", path.display())]
    ReadSecret { path: PathBuf, error: std::io::Error },
    #[error("{}: the secret is not UTF-8 text", path.display())]
    SecretNotText { path: PathBuf },
    #[error("{}: the secret is empty", path.display())]
    EmptySecret { path: PathBuf },
    #[error("--tolerance-seconds must not be negative (got {0})")]
    Tolerance(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// Facts for the startup line (no secrets).
#[derive(Debug, Clone)]
pub struct Summary {
    pub database: PathBuf,
    pub jwks: PathBuf,
    pub keys: usize,
    pub key_ids: Vec<String>,
    pub tolerance_seconds: i64,
    /// Events already recorded in the database.
    pub events_recorded: i64,
}

/// A bound, configured consumer, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    summary: Summary,
}

fn load_keys(path: &Path) -> Result<KeySet, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|error| StartupError::ReadJwks { path: path.into(), error })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| StartupError::JwksJson { path: path.into(), error })?;
    KeySet::from_jwks(&value).map_err(|error| StartupError::Jwks { path: path.into(), error })
}

fn load_secret(path: &Path) -> Result<String, StartupError> {
    let bytes = std::fs::read(path).map_err(|error| StartupError::ReadSecret { path: path.into(), error })?;
    let text = String::from_utf8(bytes).map_err(|_| StartupError::SecretNotText { path: path.into() })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(StartupError::EmptySecret { path: path.into() });
    }
    Ok(secret.to_owned())
}

impl Application {
    /// Reads the keys and the secret, opens the database, then binds the listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        if settings.tolerance_seconds < 0 {
            return Err(StartupError::Tolerance(settings.tolerance_seconds));
        }
        let keys = load_keys(&settings.jwks)?;
        let secret = load_secret(&settings.secret_file)?;
        let store = Store::open(&settings.database)?;
        let summary = Summary {
            database: settings.database.clone(),
            jwks: settings.jwks.clone(),
            keys: keys.len(),
            key_ids: keys.kids().map(str::to_owned).collect(),
            tolerance_seconds: settings.tolerance_seconds,
            events_recorded: store.event_count()?,
        };
        let state = AppState {
            store: Mutex::new(store),
            keys,
            secret_digest: routes::sha256(secret.as_bytes()),
            tolerance_seconds: settings.tolerance_seconds,
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|error| StartupError::Bind { addr: settings.listen, error })?;
        let local_addr = listener.local_addr().map_err(|error| StartupError::Bind { addr: settings.listen, error })?;
        Ok(Application { listener, local_addr, router: routes::router(Arc::new(state)), summary })
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

    /// The human-readable startup line; never contains the secret.
    pub fn startup_line(&self) -> String {
        let s = &self.summary;
        format!(
            "registry event consumer listening on http://{} (database {}, {} event{} recorded; {} verification key{} from {}; tolerance {}s)",
            self.local_addr,
            s.database.display(),
            s.events_recorded,
            if s.events_recorded == 1 { "" } else { "s" },
            s.keys,
            if s.keys == 1 { "" } else { "s" },
            s.jwks.display(),
            s.tolerance_seconds,
        )
    }

    /// Serves until the process ends.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        axum::serve(self.listener, self.router).await
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests.
    pub async fn run_until<F>(self, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await
    }
}
