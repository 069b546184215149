//! The keys that verify the nested `user` JWTs: from a JWKS file read at startup, or from a
//! JWKS URL (the token service's `GET /jwks`) refreshed every `--jwks-refresh-seconds` with
//! conditional requests (`If-None-Match`). A fetch that fails, or a document that does not
//! parse, has no ES256 key, too many keys or too many bytes, keeps the keys in force (last
//! known good); an empty set is never taken. The checks are the filter's
//! (`registry_guard_core::token::keys_source::candidate`).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys_source::{candidate, identity};

/// Largest JWKS accepted from the URL.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys accepted in one JWKS.
pub const MAX_KEYS: usize = 16;

/// `--jwks-url` and its refresh period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    pub url: String,
    pub refresh: Duration,
}

/// The keys in force, swapped as a whole by the refresher.
#[derive(Debug)]
pub struct Keys(RwLock<Arc<KeySet>>);

impl Keys {
    pub fn new(keys: KeySet) -> Keys {
        Keys(RwLock::new(Arc::new(keys)))
    }

    /// The keys in force now.
    pub fn get(&self) -> Arc<KeySet> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn set(&self, keys: KeySet) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
    }
}

/// What one fetch gave.
#[derive(Debug)]
pub enum Fetched {
    NotModified,
    Keys { keys: KeySet, etag: Option<String> },
}

/// One fetch of `url` (with `If-None-Match: etag` when given); the error says what was wrong.
pub async fn fetch(client: &reqwest::Client, url: &str, etag: Option<&str>) -> Result<Fetched, String> {
    let mut request = client.get(url).header("accept", "application/json");
    if let Some(etag) = etag {
        request = request.header("if-none-match", etag);
    }
    let response = request.send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    if status == 304 && etag.is_some() {
        return Ok(Fetched::NotModified);
    }
    if status != 200 {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
        return Err(format!("GET {url}: the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
    }
    let new_etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("GET {url}: the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
        }
    }
    let keys = candidate(&body, MAX_KEYS).map_err(|(_, reason)| format!("GET {url}: {reason}"))?;
    Ok(Fetched::Keys { keys, etag: new_etag })
}

/// An HTTP client for the JWKS URL (timeouts bounded by the refresh period).
pub fn client(source: &JwksUrl) -> reqwest::Client {
    let timeout = source.refresh.clamp(Duration::from_secs(1), Duration::from_secs(10));
    reqwest::Client::builder().timeout(timeout).build().unwrap_or_default()
}

/// Refreshes `keys` from `source` forever; `etag` is that of the startup fetch.
pub async fn refresh_periodically(keys: Arc<Keys>, source: JwksUrl, mut etag: Option<String>) {
    let client = client(&source);
    let mut tick = tokio::time::interval(source.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // immediate; startup has just fetched
    loop {
        tick.tick().await;
        match fetch(&client, &source.url, etag.as_deref()).await {
            Ok(Fetched::NotModified) => {}
            Ok(Fetched::Keys { keys: fetched, etag: new_etag }) => {
                etag = new_etag;
                let current = keys.get();
                if identity(&fetched) != identity(&current) {
                    tracing::info!(
                        "verification keys from {}: {:?} (were {:?})",
                        source.url,
                        fetched.kids().collect::<Vec<_>>(),
                        current.kids().collect::<Vec<_>>()
                    );
                    keys.set(fetched);
                }
            }
            Err(e) => tracing::warn!("refreshing the verification keys failed: {e}; the keys in force stay"),
        }
    }
}
