//! Following a bundle source: a token-service replica fetches the signed bundle from the
//! service operators push to (its `GET /bundle`), so one authenticated push reaches every
//! replica. Each fetch is conditional (`If-None-Match` with the entity tag of the last bundle
//! fetched) and, with `wait_seconds`, a long poll (`Prefer: wait=N`); a fetched bundle goes
//! through the same checks as a push (operator signature, environment, strictly newer
//! revision), so a hostile or stale source cannot roll the replica back. On any failure the
//! active bundle stays (last known good) and the next fetch backs off exponentially, with
//! jitter, up to five minutes. `GET /bundle/status` shows how it goes.
//!
//! With `oci`, the source is an OCI registry holding the bundle as an artifact (core
//! `policy::oci`): the manifest is asked for conditionally (`If-None-Match` with the last
//! manifest's entity tag; 304 while the tag points at the same manifest), checked (media
//! types, one layer, declared size), then the blob is fetched by digest and must hash to it
//! before the bundle inside goes through the same checks as a push.

use std::sync::Arc;
use std::time::Duration;

use rand_core::RngCore as _;
use reqwest::header::{AUTHORIZATION, ETAG, IF_NONE_MATCH};
use reqwest::StatusCode;

use crate::config::BundleSource;
use crate::policy::{PushError, MAX_BUNDLE_BYTES};
use crate::routes::{now_unix, AppState};

/// The longest pause between fetches after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What one fetch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// A newer bundle was fetched and activated.
    Changed { revision: u64 },
    /// The source has nothing newer (304, or the active bundle again).
    NotModified,
    /// The source answered with a bundle that was not activated (signature, environment,
    /// older revision): the active one stays.
    Refused(String),
    /// No usable answer (unreachable, timeout, unexpected status, too large).
    Failed(String),
}

impl Fetch {
    fn label(&self) -> &'static str {
        match self {
            Fetch::Changed { .. } => "changed",
            Fetch::NotModified => "not_modified",
            Fetch::Refused(_) => "refused",
            Fetch::Failed(_) => "failed",
        }
    }
}

/// Starts following `source` for `state`'s policy; runs until the runtime stops.
pub fn spawn(state: Arc<AppState>, source: BundleSource) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { follow(state, source).await })
}

async fn follow(state: Arc<AppState>, source: BundleSource) {
    let described = describe(&source);
    let client = match reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("bundle source {}: cannot build an HTTP client: {e}; not following", described);
            return;
        }
    };
    state.policy.update_source(|s| s.url.clone_from(&described));
    tracing::info!(
        "following the bundle source {} ({})",
        described,
        if source.wait_seconds > 0 {
            format!("long polling, wait {} s", source.wait_seconds)
        } else {
            format!("polling every {} s", source.poll_seconds)
        }
    );
    // The entity tag of the last bundle fetched, activated or not: asking again for the same
    // refused bundle would only repeat the refusal.
    let mut last_seen = state.policy.published().map(|p| p.etag);
    let mut failures: u32 = 0;
    loop {
        let (fetch, etag) = if source.oci.is_some() {
            fetch_oci(&client, &state, &source, last_seen.as_deref()).await
        } else {
            fetch_once(&client, &state, &source, last_seen.as_deref()).await
        };
        if etag.is_some() {
            last_seen = etag;
        }
        let poll = Duration::from_secs(source.poll_seconds);
        let delay = match &fetch {
            Fetch::Failed(_) => {
                failures = failures.saturating_add(1);
                backoff(poll, failures)
            }
            // A long poll that answered goes straight back to waiting on the source.
            Fetch::Changed { .. } | Fetch::NotModified if source.wait_seconds > 0 => {
                failures = 0;
                Duration::ZERO
            }
            _ => {
                failures = 0;
                jitter(poll)
            }
        };
        record(&state, &fetch, failures, delay);
        match &fetch {
            Fetch::Changed { revision } => {
                tracing::info!("bundle source {}: revision {revision} activated", described);
                crate::audit::bundle("follow", *revision, None);
            }
            Fetch::NotModified => tracing::debug!("bundle source {}: not modified", described),
            Fetch::Refused(why) => {
                tracing::warn!("bundle source {}: fetched bundle refused: {why}", described);
                crate::audit::bundle("follow", state.policy.snapshot().revision, Some(why));
            }
            Fetch::Failed(why) => tracing::warn!(
                "bundle source {}: fetch failed ({failures} in a row, next in {} s): {why}; the active bundle stays",
                described,
                delay.as_secs()
            ),
        }
        tokio::time::sleep(delay).await;
    }
}

fn record(state: &AppState, fetch: &Fetch, failures: u32, delay: Duration) {
    let now = now_unix();
    state.policy.update_source(|s| {
        *s.fetches.entry(fetch.label()).or_insert(0) += 1;
        s.consecutive_failures = u64::from(failures);
        s.next_fetch_in_seconds = Some(delay.as_secs());
        match fetch {
            Fetch::Failed(why) => s.last_error = Some(why.clone()),
            Fetch::Refused(why) => {
                s.last_error = Some(why.clone());
                s.last_success_unix = Some(now);
                s.last_success_at = Some(crate::policy::rfc3339(now));
            }
            _ => {
                s.last_success_unix = Some(now);
                s.last_success_at = Some(crate::policy::rfc3339(now));
            }
        }
    });
}

/// One conditional fetch; returns the outcome and the entity tag of the bundle it saw.
async fn fetch_once(
    client: &reqwest::Client,
    state: &AppState,
    source: &BundleSource,
    if_none_match: Option<&str>,
) -> (Fetch, Option<String>) {
    let mut request = client.get(&source.url).timeout(Duration::from_secs(source.wait_seconds + 10));
    if let Some(token) = &source.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(etag) = if_none_match {
        request = request.header(IF_NONE_MATCH, etag);
    }
    if source.wait_seconds > 0 {
        request = request.header("prefer", format!("wait={}", source.wait_seconds));
    }
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => return (Fetch::Failed(format!("request failed: {e}")), None),
    };
    let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match response.status() {
        StatusCode::NOT_MODIFIED => return (Fetch::NotModified, etag),
        StatusCode::OK => {}
        other => return (Fetch::Failed(format!("the source answered {other}")), None),
    }
    if response.content_length().is_some_and(|n| n > MAX_BUNDLE_BYTES as u64) {
        return (Fetch::Failed(format!("the bundle is larger than {MAX_BUNDLE_BYTES} bytes")), None);
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BUNDLE_BYTES {
                    return (Fetch::Failed(format!("the bundle is larger than {MAX_BUNDLE_BYTES} bytes")), None);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return (Fetch::Failed(format!("reading the bundle failed: {e}")), None),
        }
    }
    let Ok(text) = String::from_utf8(body) else {
        return (Fetch::Refused("the bundle is not UTF-8 text (expected a compact JWS)".into()), etag);
    };
    (activate(state, text).await, etag)
}

/// The source as shown in logs and `GET /bundle/status`.
fn describe(source: &BundleSource) -> String {
    match &source.oci {
        Some(a) => format!("oci:{}/{}:{}", source.url, a.repository, a.reference),
        None => source.url.clone(),
    }
}

/// Reads a body of at most `max` bytes.
async fn read_capped(mut response: reqwest::Response, max: usize, what: &str) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("the {what} is larger than {max} bytes"));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(format!("the {what} is larger than {max} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(format!("reading the {what} failed: {e}")),
        }
    }
}

/// One conditional fetch from an OCI registry: the manifest, then (when it changed and
/// passes its checks) the blob by digest, verified against it, then the bundle.
async fn fetch_oci(
    client: &reqwest::Client,
    state: &AppState,
    source: &BundleSource,
    if_none_match: Option<&str>,
) -> (Fetch, Option<String>) {
    use registry_guard_core::policy::oci;
    let Some(artifact) = &source.oci else { return (Fetch::Failed("not an OCI source".into()), None) };
    let label = format!("{}:{}", artifact.repository, artifact.reference);
    let timeout = Duration::from_secs(10);
    let mut request = client
        .get(format!("{}{}", source.url, artifact.manifest_path()))
        .timeout(timeout)
        .header(reqwest::header::ACCEPT, oci::MANIFEST_MEDIA_TYPE);
    if let Some(token) = &source.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    if let Some(etag) = if_none_match {
        request = request.header(IF_NONE_MATCH, etag);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return (Fetch::Failed(format!("manifest request failed: {e}")), None),
    };
    let etag = response.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type =
        response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match response.status() {
        StatusCode::NOT_MODIFIED => return (Fetch::NotModified, etag),
        StatusCode::OK => {}
        other => return (Fetch::Failed(format!("the registry answered {other} for the manifest {label}")), None),
    }
    let manifest = match read_capped(response, oci::MAX_MANIFEST_BYTES, "manifest").await {
        Ok(m) => m,
        Err(e) => return (Fetch::Failed(e), None),
    };
    let etag = Some(etag.unwrap_or_else(|| format!("\"{}\"", oci::sha256_digest(&manifest))));
    let layer = match oci::check_manifest(&manifest, content_type.as_deref(), MAX_BUNDLE_BYTES) {
        Ok(layer) => layer,
        Err(e) => return (Fetch::Refused(format!("manifest {label}: {}", e.reason())), etag),
    };
    let mut request = client.get(format!("{}{}", source.url, artifact.blob_path(&layer.digest))).timeout(timeout);
    if let Some(token) = &source.token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = match request.send().await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            return (Fetch::Failed(format!("the registry answered {} for the blob {}", r.status(), layer.digest)), None)
        }
        Err(e) => return (Fetch::Failed(format!("blob request failed: {e}")), None),
    };
    let blob = match read_capped(response, layer.size, "blob").await {
        Ok(b) => b,
        Err(e) => return (Fetch::Refused(format!("blob of {label}: {e} (declared {} bytes)", layer.size)), etag),
    };
    if let Err(e) = oci::check_blob(&layer, &blob) {
        return (Fetch::Refused(format!("blob of {label}: {}", e.reason())), etag);
    }
    let Ok(text) = String::from_utf8(blob) else {
        return (Fetch::Refused("the bundle is not UTF-8 text (expected a compact JWS)".into()), etag);
    };
    (activate(state, text.trim().to_owned()).await, etag)
}

/// Verifies a fetched bundle as a push is verified and activates it if newer.
async fn activate(state: &AppState, text: String) -> Fetch {
    match state.policy.push(text, now_unix()).await {
        Ok(accepted) if accepted.unchanged => Fetch::NotModified,
        Ok(accepted) => Fetch::Changed { revision: accepted.revision },
        Err(PushError::Rejected { path, reason, .. }) | Err(PushError::Rollback { path, reason, .. }) => {
            Fetch::Refused(format!("{path}: {reason}"))
        }
        Err(PushError::KeysNotConfigured { reason, .. }) | Err(PushError::Internal { reason, .. }) => {
            Fetch::Failed(reason)
        }
    }
}

/// `poll · 2^(failures-1)`, at most [`MAX_BACKOFF`], jittered.
pub fn backoff(poll: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
    jitter(poll.saturating_mul(factor).min(MAX_BACKOFF))
}

/// `d` scaled by a random factor in [0.8, 1.2), so a fleet does not fetch in step.
pub fn jitter(d: Duration) -> Duration {
    let r = f64::from(rand_core::OsRng.next_u32()) / f64::from(u32::MAX);
    d.mul_f64(0.8 + 0.4 * r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let poll = Duration::from_secs(2);
        for (failures, base) in [(1u32, 2u64), (2, 4), (3, 8), (8, 256), (9, 300), (40, 300)] {
            let d = backoff(poll, failures).as_secs_f64();
            let base = base as f64;
            assert!(d >= base * 0.8 - 1e-9 && d < base * 1.2 + 1e-9, "failures {failures}: {d} vs {base}");
        }
    }
}
