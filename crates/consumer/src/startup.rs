//! Settings, building the application (keys, secrets, database, listener) and running it,
//! with the retention applied at startup and every [`PRUNE_INTERVAL`] while it runs.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use registry_guard_core::token::jwks::{KeySet, KeySetError};
use tokio::net::TcpListener;

use crate::routes::{self, AppState};
use crate::store::{Database, Retention, Store, StoreError};

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5005";
/// Default `--tolerance-seconds`: a `user` JWT is accepted for a day after its `exp`, because
/// the registry delivers (and retries) events after the request that caused them.
pub const DEFAULT_TOLERANCE_SECONDS: i64 = 86_400;
/// Default `--retention-days`: raw event rows are kept 90 days.
pub const DEFAULT_RETENTION_DAYS: i64 = 90;
/// Default `--max-events`: at most a million raw event rows (the oldest go first).
pub const DEFAULT_MAX_EVENTS: i64 = 1_000_000;
/// How often the retention is applied while running.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const DAY: i64 = 86_400;

/// What the binary is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen; port 0 picks a free port (tests).
    pub listen: SocketAddr,
    /// The SQLite file (created if missing), or a PostgreSQL database shared by replicas.
    pub database: Database,
    /// The token service's JWKS file: the public keys that sign the nested `user` JWTs. With
    /// `jwks_url`, the boot fallback (optional); without it, required.
    pub jwks: Option<PathBuf>,
    /// The token service's `/jwks` URL, refreshed (last known good on failures).
    pub jwks_url: Option<crate::keys::JwksUrl>,
    /// A file holding the bearer secret the registry sends (surrounding whitespace ignored).
    pub secret_file: PathBuf,
    /// A file holding the read credential for `GET /counts` and `GET /events` (a bearer
    /// token; surrounding whitespace ignored; must differ from the registry's secret).
    pub read_token_file: PathBuf,
    /// Seconds a `user` JWT is still accepted after its `exp`.
    pub tolerance_seconds: i64,
    /// Days raw event rows (and the per-period sets of actor ids) are kept; at least 1, and
    /// at least the tolerance (dedupe must outlive every delivery that could still count).
    pub retention_days: i64,
    /// The most raw event rows kept (at least 1).
    pub max_events: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("no verification keys: give --jwks PATH or --jwks-url URL")]
    NoKeySource,
    #[error("--jwks-url {url}: the first fetch failed and there is no --jwks file to start from: {reason}")]
    JwksUrl { url: String, reason: String },
    #[error("--jwks-refresh-seconds must be between 1 and 3600 (got {0})")]
    JwksRefresh(u64),
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
    #[error("{}: cannot read the read token: {error}", path.display())]
    ReadReadToken { path: PathBuf, error: std::io::Error },
    #[error("{}: the read token is not UTF-8 text", path.display())]
    ReadTokenNotText { path: PathBuf },
    #[error("{}: the read token is empty", path.display())]
    EmptyReadToken { path: PathBuf },
    #[error("{}: the read token must differ from the registry's secret (readers must not be able to post events)", path.display())]
    ReadTokenIsSecret { path: PathBuf },
    #[error("--tolerance-seconds must not be negative (got {0})")]
    Tolerance(i64),
    #[error("--retention-days must be at least 1 and cover --tolerance-seconds ({tolerance_seconds}s), got {days}")]
    Retention { days: i64, tolerance_seconds: i64 },
    #[error("--max-events must be at least 1 (got {0})")]
    MaxEvents(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// Facts for the startup line (no secrets).
#[derive(Debug, Clone)]
pub struct Summary {
    /// The SQLite path, or the PostgreSQL URL without its password.
    pub database: String,
    /// Where the keys come from (file path or URL).
    pub jwks: String,
    pub keys: usize,
    pub key_ids: Vec<String>,
    pub tolerance_seconds: i64,
    pub retention_days: i64,
    pub max_events: i64,
    /// Events recorded in the database (after the startup pruning).
    pub events_recorded: i64,
    /// Raw event rows the startup pruning deleted.
    pub events_pruned: usize,
}

/// A bound, configured consumer, ready to run.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: axum::Router,
    summary: Summary,
    state: Arc<AppState>,
    retention: Retention,
    /// `--jwks-url` and the entity tag of the startup fetch.
    refresher: Option<(crate::keys::JwksUrl, Option<String>)>,
}

/// A 304 to a request without `If-None-Match` is not an answer `fetch` gives; kept an error.
fn unreachable_not_modified(url: &str) -> Result<(KeySet, Option<String>), StartupError> {
    Err(StartupError::JwksUrl { url: url.to_owned(), reason: "HTTP 304 to an unconditional request".into() })
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

fn load_read_token(path: &Path) -> Result<String, StartupError> {
    let bytes = std::fs::read(path).map_err(|error| StartupError::ReadReadToken { path: path.into(), error })?;
    let text = String::from_utf8(bytes).map_err(|_| StartupError::ReadTokenNotText { path: path.into() })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StartupError::EmptyReadToken { path: path.into() });
    }
    Ok(token.to_owned())
}

impl Application {
    /// Reads the keys and the secret, opens the database, then binds the listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        if settings.tolerance_seconds < 0 {
            return Err(StartupError::Tolerance(settings.tolerance_seconds));
        }
        if settings.retention_days < 1 || settings.retention_days.saturating_mul(DAY) < settings.tolerance_seconds {
            return Err(StartupError::Retention {
                days: settings.retention_days,
                tolerance_seconds: settings.tolerance_seconds,
            });
        }
        if settings.max_events < 1 {
            return Err(StartupError::MaxEvents(settings.max_events));
        }
        let retention =
            Retention { seconds: settings.retention_days.saturating_mul(DAY), max_events: settings.max_events };
        let file_keys = settings.jwks.as_deref().map(load_keys).transpose()?;
        let (keys, etag) = match (&settings.jwks_url, file_keys) {
            (None, None) => return Err(StartupError::NoKeySource),
            (None, Some(keys)) => (keys, None),
            (Some(source), file_keys) => {
                let secs = source.refresh.as_secs();
                if !(1..=3600).contains(&secs) {
                    return Err(StartupError::JwksRefresh(secs));
                }
                match crate::keys::fetch(&crate::keys::client(source), &source.url, None).await {
                    Ok(crate::keys::Fetched::Keys { keys, etag }) => (keys, etag),
                    Ok(crate::keys::Fetched::NotModified) => unreachable_not_modified(&source.url)?,
                    Err(reason) => match file_keys {
                        Some(keys) => {
                            tracing::warn!("{reason}; starting from the keys of the --jwks file");
                            (keys, None)
                        }
                        None => return Err(StartupError::JwksUrl { url: source.url.clone(), reason }),
                    },
                }
            }
        };
        let secret = load_secret(&settings.secret_file)?;
        let read_token = load_read_token(&settings.read_token_file)?;
        if read_token == secret {
            return Err(StartupError::ReadTokenIsSecret { path: settings.read_token_file.clone() });
        }
        // Blocking (the PostgreSQL client runs its own runtime): off the async threads.
        let database = settings.database.clone();
        let (store, pruned, events_recorded) = tokio::task::spawn_blocking(move || {
            let mut store = Store::connect(&database)?;
            let pruned = store.prune(routes::now_unix(), retention)?;
            let events_recorded = store.event_count()?;
            Ok::<_, StoreError>((store, pruned, events_recorded))
        })
        .await
        .map_err(|e| StoreError::Worker(e.to_string()))??;
        let summary = Summary {
            database: settings.database.display(),
            jwks: match (&settings.jwks_url, &settings.jwks) {
                (Some(u), _) => format!("{} (refreshed every {} s)", u.url, u.refresh.as_secs()),
                (None, Some(p)) => p.display().to_string(),
                (None, None) => String::new(),
            },
            keys: keys.len(),
            key_ids: keys.kids().map(str::to_owned).collect(),
            tolerance_seconds: settings.tolerance_seconds,
            retention_days: settings.retention_days,
            max_events: settings.max_events,
            events_recorded,
            events_pruned: pruned.events,
        };
        let keys = Arc::new(crate::keys::Keys::new(keys));
        let refresher = settings.jwks_url.clone().map(|source| (source, etag));
        let state = Arc::new(AppState {
            store: Mutex::new(store),
            keys,
            secret_digest: routes::sha256(secret.as_bytes()),
            read_token_digest: routes::sha256(read_token.as_bytes()),
            tolerance_seconds: settings.tolerance_seconds,
        });
        let (listener, local_addr) = registry_guard_service::bind(settings.listen)
            .await
            .map_err(|error| StartupError::Bind { addr: settings.listen, error })?;
        let router = routes::router(Arc::clone(&state));
        Ok(Application { listener, local_addr, router, summary, state, retention, refresher })
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
            "registry event consumer listening on http://{} (database {}, {} event{} recorded, {} pruned; retention {} days, at most {} events; {} verification key{} from {}; tolerance {}s)",
            self.local_addr,
            s.database,
            s.events_recorded,
            if s.events_recorded == 1 { "" } else { "s" },
            s.events_pruned,
            s.retention_days,
            s.max_events,
            s.keys,
            if s.keys == 1 { "" } else { "s" },
            s.jwks,
            s.tolerance_seconds,
        )
    }

    /// Serves until the process ends.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes, then finishes in-flight requests. Applies the
    /// retention every [`PRUNE_INTERVAL`] meanwhile.
    pub async fn run_until<F>(self, shutdown: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let pruner = tokio::spawn(prune_periodically(Arc::clone(&self.state), self.retention));
        let refresher = self.refresher.map(|(source, etag)| {
            tokio::spawn(crate::keys::refresh_periodically(Arc::clone(&self.state.keys), source, etag))
        });
        let served = axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await;
        pruner.abort();
        if let Some(r) = refresher {
            r.abort();
        }
        served
    }
}

/// Applies the retention every [`PRUNE_INTERVAL`] (off the async threads).
async fn prune_periodically(state: Arc<AppState>, retention: Retention) {
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; startup has just pruned
    loop {
        tick.tick().await;
        let worker = Arc::clone(&state);
        let pruned = tokio::task::spawn_blocking(move || {
            worker.store.lock().unwrap_or_else(PoisonError::into_inner).prune(routes::now_unix(), retention)
        })
        .await;
        match pruned {
            Ok(Ok(p)) if p.events > 0 || p.actor_ids > 0 => {
                tracing::info!("retention: deleted {} event row(s) and {} expired actor id(s)", p.events, p.actor_ids)
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("applying the retention failed: {e}"),
            Err(e) => tracing::error!("applying the retention failed: {e}"),
        }
    }
}
