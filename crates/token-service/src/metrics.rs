//! `GET /metrics`: the token service's Prometheus metrics, through the official Rust client
//! (`prometheus-client`, OpenMetrics text). Counted as things happen: tokens issued by
//! `auth_type`, failed logins by reason; read at scrape time: the active bundle revision, the
//! argon2 queue and the login limiters' counters. No label ever carries a username, a client
//! address or a secret (bounded cardinality).

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::routes::AppState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthTypeLabel {
    pub auth_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// The service's metrics (one per process, in [`AppState`]).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    issued: Family<AuthTypeLabel, Counter>,
    failed_logins: Family<ReasonLabel, Counter>,
    bundle_revision: Gauge,
    argon2_waiting: Gauge,
    throttled_client: Counter,
    throttled_username: Counter,
    argon2_queue_full: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The reasons a login fails, as counted (anything else is `other`).
const REASONS: &[&str] = &[
    "invalid_credentials",
    "deploy_token_unusable",
    "job_token_refused",
    "refresh_token_invalid",
    "refresh_token_ended",
];

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("registry_guard_token_service");
        let issued = Family::<AuthTypeLabel, Counter>::default();
        registry.register("tokens_issued", "Registry tokens issued, by how the client authenticated", issued.clone());
        let failed_logins = Family::<ReasonLabel, Counter>::default();
        registry.register("failed_logins", "Failed logins, by reason", failed_logins.clone());
        let bundle_revision = Gauge::default();
        registry.register("bundle_revision", "Revision of the active policy bundle (0: none)", bundle_revision.clone());
        let argon2_waiting = Gauge::default();
        registry.register(
            "argon2_queue_depth",
            "Password verifications waiting for an argon2 slot",
            argon2_waiting.clone(),
        );
        let throttled_client = Counter::default();
        registry.register(
            "throttled_client",
            "Token requests refused by the per-client limit",
            throttled_client.clone(),
        );
        let throttled_username = Counter::default();
        registry.register(
            "throttled_username",
            "Logins refused by the per-username limit of failed logins",
            throttled_username.clone(),
        );
        let argon2_queue_full = Counter::default();
        registry.register(
            "argon2_queue_full",
            "Password logins refused because the argon2 queue was full",
            argon2_queue_full.clone(),
        );
        Metrics {
            registry,
            issued,
            failed_logins,
            bundle_revision,
            argon2_waiting,
            throttled_client,
            throttled_username,
            argon2_queue_full,
        }
    }

    /// A registry token was issued to a client that authenticated with `auth_type`.
    pub fn issued(&self, auth_type: &'static str) {
        self.issued.get_or_create(&AuthTypeLabel { auth_type }).inc();
    }

    /// A login failed for `reason` (one of a fixed set; others are counted as `other`).
    pub fn failed_login(&self, reason: &str) {
        let reason = REASONS.iter().copied().find(|r| *r == reason).unwrap_or("other");
        self.failed_logins.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// The OpenMetrics text, with the scrape-time values read from `state`.
    pub fn render(&self, state: &AppState) -> Result<String, std::fmt::Error> {
        self.bundle_revision.set(i64::try_from(state.policy.snapshot().revision).unwrap_or(i64::MAX));
        self.argon2_waiting.set(i64::try_from(state.login.waiting()).unwrap_or(i64::MAX));
        let s = &state.login.stats;
        // The limiter keeps its own atomics (also on `/stats`): bring these counters up to them.
        for (counter, total) in [
            (&self.throttled_client, s.throttled_client.load(Relaxed)),
            (&self.throttled_username, s.throttled_username.load(Relaxed)),
            (&self.argon2_queue_full, s.argon2_queue_full.load(Relaxed)),
        ] {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
