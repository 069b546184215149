//! The HTTP API: the registry's notification endpoint (`POST /events`), the counts as JSON
//! (`GET /counts`) and as Prometheus text (`GET /metrics`), and a health check.
//!
//! `POST /events` checks, in this order: the bearer secret (401), the media type (415), the
//! body size (413) and the envelope's JSON shape (400). Then every event is classified
//! ([`crate::classify`]) and the envelope recorded in one transaction ([`crate::store`]);
//! 200 once committed, 500 if the database write failed (the registry retries the envelope,
//! and dedupe makes the retry harmless).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use registry_guard_core::token::KeySet;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::classify::{self, all_metric_names, Outcome};
use crate::store::{Recorded, Store, StoreError, Tally};

/// Media types `POST /events` accepts (distribution's v1 and v2 envelopes, plain JSON).
pub const EVENTS_MEDIA_TYPES: [&str; 3] = [
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
    "application/json",
];
/// Largest accepted envelope.
pub const MAX_ENVELOPE_BYTES: usize = 8 * 1024 * 1024;
/// Realm of the `WWW-Authenticate` challenge on a 401.
pub const REALM: &str = "registry-guard-consumer";
/// Prefix of the Prometheus metric names.
pub const PROMETHEUS_PREFIX: &str = "registry_guard_consumer";

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    pub store: Mutex<Store>,
    /// Public keys that sign the nested `user` JWTs.
    pub keys: KeySet,
    /// SHA-256 of the bearer secret (compared in constant time).
    pub secret_digest: [u8; 32],
    /// Seconds a `user` JWT is still accepted after its `exp`.
    pub tolerance_seconds: i64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/events", post(post_events))
        .route("/counts", get(counts))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// Current unix time.
pub fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equal digests, without an early exit.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `Authorization: Bearer <secret>`, scheme case-insensitive.
fn authorized(headers: &HeaderMap, secret_digest: &[u8; 32]) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, token)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && digests_equal(&sha256(token.trim().as_bytes()), secret_digest)
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

async fn post_events(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&headers, &state.secret_digest) {
        let mut response = error(StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer <secret>` is required");
        let challenge = format!("Bearer realm=\"{REALM}\"");
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return response;
    }
    match media_type(&headers) {
        Some(m) if EVENTS_MEDIA_TYPES.contains(&m.as_str()) => {}
        other => {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported media type `{}`; expected one of {}",
                    other.unwrap_or_default(),
                    EVENTS_MEDIA_TYPES.join(", ")
                ),
            )
        }
    }
    let bytes = match axum::body::to_bytes(body, MAX_ENVELOPE_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the envelope (limit {MAX_ENVELOPE_BYTES} bytes): {e}"),
            )
        }
    };
    let mut envelope: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("envelope is not JSON: {e}")),
    };
    let events = match envelope.get_mut("events").map(Value::take) {
        Some(Value::Array(events)) => events,
        _ => return error(StatusCode::BAD_REQUEST, "envelope has no `events` array"),
    };
    let worker = Arc::clone(&state);
    let recorded = tokio::task::spawn_blocking(move || {
        let now = now_unix();
        let batch = events
            .iter()
            .enumerate()
            .map(|(i, e)| classify::assess(i, e, &worker.keys, now, worker.tolerance_seconds))
            .collect();
        worker.store.lock().unwrap_or_else(PoisonError::into_inner).record(batch, now)
    })
    .await;
    let report = match recorded {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => {
            tracing::error!("recording an envelope failed: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the events could not be recorded; retry");
        }
        Err(e) => {
            tracing::error!("recording an envelope failed: {e}");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the events could not be recorded; retry");
        }
    };
    for detail in &report.details {
        match detail {
            Recorded::New { assessment, .. } if assessment.outcome == Outcome::Rejected => tracing::warn!(
                "event {} rejected ({} {}): {}",
                assessment.facts.id,
                assessment.facts.action.as_deref().unwrap_or("-"),
                assessment.facts.repository.as_deref().unwrap_or("-"),
                assessment.reason.as_deref().unwrap_or("-"),
            ),
            Recorded::New { assessment, .. } if assessment.outcome == Outcome::Unattributed => {
                tracing::info!("event {} has no actor.user: unattributed", assessment.facts.id)
            }
            Recorded::New { .. } => {}
            Recorded::Duplicate { id } => tracing::info!("event {id} already recorded: duplicate delivery"),
            Recorded::Invalid(e) => tracing::warn!("{e}: not recorded"),
        }
    }
    tracing::info!(
        "envelope: {} event(s), {} counted, {} rejected, {} unattributed, {} duplicate(s), {} ignored, {} invalid",
        report.events,
        report.counted,
        report.rejected,
        report.unattributed,
        report.duplicates,
        report.ignored,
        report.invalid
    );
    (StatusCode::OK, Json(report)).into_response()
}

/// Runs a read on the store off the async threads.
async fn read<T, F>(state: &Arc<AppState>, f: F) -> Result<T, Response>
where
    T: Send + 'static,
    F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
{
    let worker = Arc::clone(state);
    match tokio::task::spawn_blocking(move || f(&worker.store.lock().unwrap_or_else(PoisonError::into_inner))).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::error!("reading the counts failed: {e}");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the counts could not be read"))
        }
        Err(e) => {
            tracing::error!("reading the counts failed: {e}");
            Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the counts could not be read"))
        }
    }
}

async fn counts(State(state): State<Arc<AppState>>) -> Response {
    match read(&state, Store::counts).await {
        Ok(counts) => Json(counts).into_response(),
        Err(response) => response,
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let totals = match read(&state, Store::totals).await {
        Ok(t) => t,
        Err(response) => return response,
    };
    let mut out = String::new();
    let events = format!("{PROMETHEUS_PREFIX}_events_total");
    let _ = writeln!(out, "# HELP {events} Container-registry usage events counted, by seed-001 event name.");
    let _ = writeln!(out, "# TYPE {events} counter");
    let mut names = all_metric_names();
    names.extend(totals.counters.keys().filter(|k| !names.contains(k)).cloned().collect::<Vec<_>>());
    for name in names {
        let value = totals.counters.get(&name).copied().unwrap_or(0);
        let _ = writeln!(out, "{events}{{event=\"{name}\"}} {value}");
    }
    for tally in Tally::ALL {
        let name = format!("{PROMETHEUS_PREFIX}_{}_total", tally.as_str());
        let help = match tally {
            Tally::Rejected => "Countable events whose actor.user JWT failed verification (never counted as usage).",
            Tally::Unattributed => "Countable events without actor.user (not counted as usage).",
            Tally::Duplicates => "Redelivered events already recorded (counted once).",
            Tally::Ignored => "Events recorded but not usage: blobs, pulls, mounts.",
            Tally::Invalid => "Array elements that are not events with a string id.",
        };
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", totals.tally(tally));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}
