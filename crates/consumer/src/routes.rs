//! The HTTP API: the registry's notification endpoint (`POST /events`); the aggregates as JSON
//! (`GET /counts?period=week|month&at=YYYY-MM-DD`) and the recorded events a page at a time
//! (`GET /events?after=SEQ&limit=N`), both behind the read credential; the aggregates as
//! OpenMetrics text (`GET /metrics`, open: numbers only, under fixed label sets) and a health
//! check (`GET /healthz`, open).
//!
//! `POST /events` checks, in this order: the bearer secret (401), the media type (415), the
//! body size (413) and the envelope's JSON shape (400). Then every event is classified
//! ([`crate::classify`]) and the envelope recorded in one transaction ([`crate::store`]);
//! 200 once committed, 500 if the database write failed (the registry retries the envelope,
//! and dedupe makes the retry harmless).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::classify::{self, all_metric_names, Outcome};
use crate::period::{self, Period, PeriodKind};
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
/// `GET /events`: rows per page when `limit` is not given, and the most a page may hold.
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;
/// Content type of `GET /metrics` (what `prometheus-client` encodes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything a handler needs.
#[derive(Debug)]
pub struct AppState {
    pub store: Mutex<Store>,
    /// Public keys that sign the nested `user` JWTs (swapped by the `--jwks-url` refresher).
    pub keys: Arc<crate::keys::Keys>,
    /// SHA-256 of the bearer secret the registry sends (compared in constant time).
    pub secret_digest: [u8; 32],
    /// SHA-256 of the read credential for `GET /counts` and `GET /events`.
    pub read_token_digest: [u8; 32],
    /// Seconds a `user` JWT is still accepted after its `exp`.
    pub tolerance_seconds: i64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/events", post(post_events).get(get_events))
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

/// 401 with a `WWW-Authenticate: Bearer` challenge.
fn unauthorized(what: &str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, format!("a valid `Authorization: Bearer <{what}>` is required"));
    let challenge = format!("Bearer realm=\"{REALM}\"");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// The query string's `name=value` pairs; any name not in `known`, or given twice, is an error.
fn query_params<'a>(uri: &'a Uri, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for pair in uri.query().unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !known.contains(&name) {
            let shown = classify::capped(name, 64);
            return Err(format!("unknown query parameter `{shown}`; expected {}", known.join(", ")));
        }
        if pairs.iter().any(|(n, _)| *n == name) {
            return Err(format!("query parameter `{name}` given twice"));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

fn param<'a>(pairs: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

async fn post_events(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&headers, &state.secret_digest) {
        return unauthorized("secret");
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
        let keys = worker.keys.get();
        let batch = events
            .iter()
            .enumerate()
            .map(|(i, e)| classify::assess(i, e, &keys, now, worker.tolerance_seconds))
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
    F: FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
{
    let worker = Arc::clone(state);
    match tokio::task::spawn_blocking(move || f(&mut worker.store.lock().unwrap_or_else(PoisonError::into_inner))).await
    {
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

/// `GET /counts?period=week|month&at=YYYY-MM-DD`: the unique actors of every usage metric in
/// the week or month holding `at` (default: this week, today UTC), with the lifetime counters
/// and tallies. Bounded: ten unique counts, at most ten counters, five tallies.
async fn counts(State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&headers, &state.read_token_digest) {
        return unauthorized("read token");
    }
    let pairs = match query_params(&uri, &["period", "at"]) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let kind = match param(&pairs, "period") {
        None => PeriodKind::Week,
        Some(p) => match PeriodKind::parse(p) {
            Some(k) => k,
            None => {
                let shown = classify::capped(p, 64);
                return error(StatusCode::BAD_REQUEST, format!("`period` must be `week` or `month`, not `{shown}`"));
            }
        },
    };
    let day = match param(&pairs, "at") {
        None => period::day_of(now_unix()),
        Some(at) => match period::parse_day(at) {
            Some(d) => d,
            None => {
                let shown = classify::capped(at, 64);
                return error(StatusCode::BAD_REQUEST, format!("`at` must be a date YYYY-MM-DD, not `{shown}`"));
            }
        },
    };
    let period = Period::containing(kind, day);
    let at = day.to_string();
    match read(&state, move |store| Ok((store.period_counts(&period)?, store.totals()?))).await {
        Ok((period, totals)) => {
            let mut body = json!({
                "period": period.period, "at": at, "key": period.key, "from": period.from, "to": period.to,
                "unique": period.unique,
            });
            if let (Some(b), Ok(Value::Object(t))) = (body.as_object_mut(), serde_json::to_value(&totals)) {
                b.extend(t);
            }
            Json(body).into_response()
        }
        Err(response) => response,
    }
}

/// `GET /events?after=SEQ&limit=N`: recorded events (within the retention) in arrival order,
/// at most `limit` (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]) with `seq > after`.
async fn get_events(State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&headers, &state.read_token_digest) {
        return unauthorized("read token");
    }
    let pairs = match query_params(&uri, &["after", "limit"]) {
        Ok(p) => p,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let after = match param(&pairs, "after").map(str::parse::<i64>) {
        None => 0,
        Some(Ok(a)) if a >= 0 => a,
        Some(_) => return error(StatusCode::BAD_REQUEST, "`after` must be a non-negative integer (a `seq`)"),
    };
    let limit = match param(&pairs, "limit").map(str::parse::<u32>) {
        None => DEFAULT_PAGE,
        Some(Ok(l)) if (1..=MAX_PAGE).contains(&l) => l,
        Some(_) => return error(StatusCode::BAD_REQUEST, format!("`limit` must be an integer from 1 to {MAX_PAGE}")),
    };
    match read(&state, move |store| store.events_page(after, limit)).await {
        Ok(page) => Json(page).into_response(),
        Err(response) => response,
    }
}

type EventLabels = Vec<(&'static str, String)>;

/// `GET /metrics`: the lifetime counters and tallies, and the unique actors of the current
/// ISO week and calendar month (UTC), encoded by `prometheus-client`.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let now = now_unix();
    let current: Vec<Period> = PeriodKind::ALL.into_iter().map(|k| Period::at_unix(k, now)).collect();
    let (totals, periods) = match read(&state, move |store| {
        let periods = current.iter().map(|p| store.period_counts(p)).collect::<Result<Vec<_>, _>>()?;
        Ok((store.totals()?, periods))
    })
    .await
    {
        Ok(t) => t,
        Err(response) => return response,
    };
    let mut registry = Registry::with_prefix(PROMETHEUS_PREFIX);
    let events = Family::<EventLabels, Counter>::default();
    registry.register(
        "events",
        "Container-registry usage events counted (lifetime), by usage event name (`i_container_registry_…`)",
        events.clone(),
    );
    let mut names = all_metric_names();
    names.extend(totals.counters.keys().filter(|k| !names.contains(k)).cloned().collect::<Vec<_>>());
    for name in names {
        let value = totals.counters.get(&name).copied().unwrap_or(0);
        events.get_or_create(&vec![("event", name)]).inc_by(u64::try_from(value).unwrap_or(0));
    }
    let unique = Family::<EventLabels, Gauge>::default();
    registry.register(
        "unique_actors",
        "Distinct user ids (event …_user) or deploy-token ids (…_deploy_token) with the usage event in the current ISO week or calendar month (UTC)",
        unique.clone(),
    );
    for p in &periods {
        for (name, value) in &p.unique {
            unique.get_or_create(&vec![("event", name.clone()), ("period", p.period.to_owned())]).set(*value);
        }
    }
    for tally in Tally::ALL {
        let help = match tally {
            Tally::Rejected => "Countable events whose actor.user JWT failed verification (never counted as usage)",
            Tally::Unattributed => "Countable events without actor.user (not counted as usage)",
            Tally::Duplicates => "Redelivered events already recorded (counted once)",
            Tally::Ignored => "Events recorded but not usage: blobs, pulls, mounts",
            Tally::Invalid => "Array elements that are not events with a string id",
        };
        let counter = Counter::<u64>::default();
        counter.inc_by(u64::try_from(totals.tally(tally)).unwrap_or(0));
        registry.register(tally.as_str(), help, counter);
    }
    let mut out = String::new();
    if let Err(e) = encode(&mut out, &registry) {
        tracing::error!("encoding the metrics failed: {e}");
        return error(StatusCode::INTERNAL_SERVER_ERROR, "the metrics could not be encoded");
    }
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], out).into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}
