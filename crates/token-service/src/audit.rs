//! The token service's audit records: one JSON line (`{"audit": "registry-guard-token-service",
//! …}`, tracing target `audit`, on the service's log) for every failed login and every bundle
//! change (a push accepted or refused, a fetched bundle activated or refused). The same fields
//! as the filter's records where they apply (docs/observability.md); never a secret: a
//! username is quoted and bounded, a reason is redacted of anything shaped like a token.

use registry_guard_core::decide::audit::redact;
use registry_guard_core::support::text::{bounded, quote_max, MAX_REASON_CHARS};
use serde_json::{json, Value};

/// Longest username written (a hostile one is cut).
const MAX_USERNAME_CHARS: usize = 128;

fn event_id() -> String {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn emit(fields: Value) {
    // The marker first, so that a log shipper can pick the records out by prefix.
    let mut record = serde_json::Map::new();
    record.insert("audit".into(), "registry-guard-token-service".into());
    record.insert("event_id".into(), event_id().into());
    record.insert("time".into(), crate::policy::rfc3339(crate::routes::now_unix()).into());
    if let Value::Object(o) = fields {
        record.extend(o);
    }
    let line = Value::Object(record).to_string();
    tracing::warn!(target: "audit", "{line}");
}

/// A failed login: `username` as given (quoted, bounded), the client address, the grant and
/// the reason (`invalid_credentials`, `deploy_token_unusable`, …).
pub fn login_failed(username: &str, client: &str, grant: &str, reason: &str) {
    emit(json!({
        "event": "login_failed",
        "decision": "deny",
        "principal": quote_max(username, MAX_USERNAME_CHARS),
        "client": quote_max(client, 64),
        "grant": grant,
        "reason": reason,
    }));
}

/// A bundle change: `how` is `push` or `follow`; `revision` the active revision afterwards;
/// `error` why a bundle was refused (`None`: activated).
pub fn bundle(how: &str, revision: u64, error: Option<&str>) {
    emit(json!({
        "event": "bundle",
        "action": how,
        "decision": if error.is_some() { "deny" } else { "allow" },
        "revision": revision,
        "reason": error.map(|e| redact(&bounded(e, MAX_REASON_CHARS))),
    }));
}
