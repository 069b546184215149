//! One JSON audit record per denial, per dry-run would-deny and per **allowed write** (push
//! or delete: `PUT`, `POST`, `PATCH`, `DELETE`): an event id, who, what (action, path,
//! scopes), which rule, which bundle revision, why, the client and the W3C trace id. Never a
//! token: the line is built from the decision, and anything in the free-text reason that
//! looks like a compact JWS is redacted. And one record per **bundle change** in a filter VM
//! ([`bundle_line`]: a bundle activated or refused, from the configuration or the bundle
//! source). Schema: docs/observability.md.

use serde_json::json;

use crate::decide::decision::Decision;
use crate::decide::guard::Checked;
use crate::support::text::{bounded, quote, quote_max, MAX_AUDIT_PATH_CHARS, MAX_REASON_CHARS};

/// What the glue knows about the request besides the decision.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// The request path; the query is dropped.
    pub path: &'a str,
    /// The request's `X-Request-Id`; only an id that [`crate::support::text::request_id`] accepts
    /// is written (a hostile one is left out, however long).
    pub request_id: Option<&'a str>,
    /// The downstream peer.
    pub client: Option<&'a str>,
    /// The request's W3C `traceparent` header, if any (only a well-formed one yields a
    /// `trace_id`).
    pub traceparent: Option<&'a str>,
    /// A unique id for this record (the glue makes it; `None`: left out).
    pub event_id: Option<&'a str>,
}

/// Whether `method` writes (a push or a delete): allowed requests with it are audited too.
pub fn is_write(method: &str) -> bool {
    matches!(method, "PUT" | "POST" | "PATCH" | "DELETE")
}

/// The action a request method stands for in audit records.
fn action(method: &str) -> &'static str {
    match method {
        "GET" | "HEAD" => "pull",
        "PUT" | "POST" | "PATCH" => "push",
        "DELETE" => "delete",
        _ => "other",
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed and
/// not all zeros.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && (version != "00" || parts.next().is_none());
    ok.then_some(trace)
}

/// Whether `checked` (for a request with `method`) gets an audit record.
pub fn is_audited(checked: &Checked, method: &str) -> bool {
    checked.is_audited() || is_write(method)
}

/// The audit line of `checked` at unix time `now`, or `None` for an allowed read.
pub fn line(checked: &Checked, request: RequestInfo<'_>, now: i64) -> Option<String> {
    let (decision, status, kind, rule, reason) = match &checked.decision {
        Decision::Deny(d) => ("deny", Some(d.status), d.kind.label(), d.rule.as_deref(), d.reason.as_str()),
        Decision::Allow { would_deny: Some((rule, message)), .. } => {
            ("would_deny", None, "protected", Some(rule.as_str()), message.as_str())
        }
        Decision::Allow { would_deny: None, .. } if is_write(request.method) => ("allow", None, "allowed", None, ""),
        Decision::Allow { would_deny: None, .. } => return None,
    };
    let time = rfc3339(now);
    // Every field a client controls is bounded and escaped (see `crate::support::text`): one audit
    // line stays under ~2 KiB whatever the request carried.
    let path = request.path.split('?').next().unwrap_or_default();
    let line = json!({
        "audit": "registry-guard",
        "event_id": request.event_id,
        "time": time,
        "request_id": request.request_id.and_then(crate::support::text::request_id),
        "trace_id": request.traceparent.and_then(trace_id),
        "decision": decision,
        "status": status,
        "kind": kind,
        "rule": rule,
        "revision": checked.revision,
        "principal": checked.subject().map(quote),
        "auth_type": checked.auth_type().map(quote),
        "action": action(request.method),
        "method": quote(request.method),
        "path": quote_max(path, MAX_AUDIT_PATH_CHARS),
        "scopes": checked.scopes.as_deref().map(|s| quote_max(s, MAX_AUDIT_PATH_CHARS)),
        "client": request.client.map(quote),
        "reason": redact(&bounded(reason, MAX_REASON_CHARS)),
    });
    Some(line.to_string())
}

/// `now` (unix seconds) as RFC 3339 (seconds, UTC); `None` before 1970.
fn rfc3339(now: i64) -> Option<String> {
    u64::try_from(now).ok().map(|secs| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
    })
}

/// How a filter VM came to a bundle (the record's `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleAction {
    /// A plugin configuration (`on_configure`) carried it; with a bundle source, possibly
    /// replaced at once by a newer bundle this Envoy had fetched earlier (`source` says which).
    Configure,
    /// Fetched from the bundle source (`bundle_source`).
    Follow,
}

impl BundleAction {
    pub fn label(self) -> &'static str {
        match self {
            BundleAction::Configure => "configure",
            BundleAction::Follow => "follow",
        }
    }
}

/// A bundle a filter VM activated or refused, for [`bundle_line`].
#[derive(Debug, Clone, Copy)]
pub struct BundleChange<'a> {
    pub action: BundleAction,
    /// Where the bundle came from: `configuration`, `fetched_earlier` (the copy this Envoy kept
    /// of a bundle it fetched before), or the bundle source (`<cluster><path>`, or
    /// `<cluster> oci <repository>:<reference>`).
    pub source: &'a str,
    /// The endpoint the filter serves (`registry`, `dependency_proxy`); `None` when a refused
    /// configuration cannot tell.
    pub endpoint: Option<&'a str>,
    /// The revision this VM enforced before (`None`: none yet, or cannot tell).
    pub revision_old: Option<u64>,
    /// The revision of the bundle offered, once its signature was verified (`None` for a bundle
    /// refused before that: its content is not trusted, so its revision is not written).
    pub revision_new: Option<u64>,
    /// Why it was refused; `None`: activated.
    pub refused: Option<&'a str>,
    /// A unique id for this record (the glue makes it; `None`: left out).
    pub event_id: Option<&'a str>,
}

/// The audit line of a bundle change in a filter VM at unix time `now`: the same family as
/// the request records (`"audit":"registry-guard"`, `event_id`, `time`, `decision`,
/// `revision`, `reason`) and as the token service's bundle records (`"event":"bundle"`,
/// `action`), plus `source`, `endpoint`, `revision_old` and `revision_new`. `revision` is the
/// revision active afterwards (the new one if activated, the old one if refused). The reason
/// is bounded and redacted like a request record's.
pub fn bundle_line(change: BundleChange<'_>, now: i64) -> String {
    let activated = change.refused.is_none();
    let line = json!({
        "audit": "registry-guard",
        "event_id": change.event_id,
        "time": rfc3339(now),
        "event": "bundle",
        "decision": if activated { "allow" } else { "deny" },
        "action": change.action.label(),
        "source": quote_max(change.source, MAX_AUDIT_PATH_CHARS),
        "endpoint": change.endpoint,
        "revision": if activated { change.revision_new } else { change.revision_old },
        "revision_old": change.revision_old,
        "revision_new": change.revision_new,
        "reason": change.refused.map(|r| redact(&bounded(r, MAX_REASON_CHARS))),
    });
    line.to_string()
}

/// Replaces every word that looks like a compact JWS/JWT (three or more base64url segments
/// joined by dots, 20+ characters) with `[redacted]`.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if looks_like_jws(word) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=') {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn looks_like_jws(word: &str) -> bool {
    word.len() >= 20 && word.split('.').filter(|s| !s.is_empty()).count() >= 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decision::{Denial, DenyKind};

    fn denial(reason: &str) -> Checked {
        Checked {
            sealed: None,
            decision: Decision::Deny(Denial {
                status: 403,
                code: "DENIED",
                message: "no".into(),
                www_authenticate: None,
                reason: reason.into(),
                rule: Some("web-release-tags".into()),
                kind: DenyKind::Protected,
            }),
            token: Some(std::rc::Rc::new(crate::token::verify::VerifiedToken {
                kid: "k1".into(),
                subject: "dev".into(),
                jti: "j1".into(),
                auth_type: Some("pat".into()),
                user: Some("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkZXYifQ.c2lnbmF0dXJlLWJ5dGVz".into()),
                expires_at: i64::MAX,
                not_before: None,
                issued_at: None,
                grants: Vec::new(),
                access_levels: Vec::new(),
                ..Default::default()
            })),
            revision: 7,
            cache_hit: Some(true),
            scopes: Some("repository:acme/web/app:pull,push".into()),
        }
    }

    #[test]
    fn denial_line_has_every_field_and_no_token() {
        let c = denial("rule `web-release-tags` (bundle revision 7): no");
        let info = RequestInfo {
            method: "PUT",
            path: "/v2/acme/web/app/manifests/v1?x=eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkZXYifQ.c2ln",
            request_id: Some("req-1"),
            client: Some("127.0.0.1:5555"),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            event_id: Some("e-1"),
        };
        let text = line(&c, info, 1_800_000_000).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["status"], 403);
        assert_eq!(v["kind"], "protected");
        assert_eq!(v["rule"], "web-release-tags");
        assert_eq!(v["revision"], 7);
        assert_eq!(v["principal"], "dev");
        assert_eq!(v["path"], "/v2/acme/web/app/manifests/v1");
        assert_eq!(v["scopes"], "repository:acme/web/app:pull,push");
        assert_eq!(v["request_id"], "req-1");
        assert_eq!(v["event_id"], "e-1");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v["action"], "push");
        assert_eq!(v["client"], "127.0.0.1:5555");
        assert!(!text.contains("eyJ"), "{text}");
        assert!(!text.contains('\n'));
    }

    #[test]
    fn token_like_words_in_reasons_are_redacted() {
        let c = denial("token eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.AAAA is bad; keep `a.b.c` and v1.2.3");
        let text = line(&c, RequestInfo::default(), 0).unwrap();
        assert!(text.contains("token [redacted] is bad"), "{text}");
        assert!(text.contains("`a.b.c` and v1.2.3"), "{text}");
    }

    #[test]
    fn hostile_request_ids_and_paths_are_bounded() {
        // Issue 14: a 59 KB X-Request-Id and a huge path wrote an 85 KB audit line.
        let c = denial("no");
        let huge_id = "x".repeat(59 * 1024);
        let huge_path = format!("/v2/{}/manifests/v1", "a".repeat(60_000));
        let huge_trace = format!("00-{}-00f067aa0ba902b7-01", "a".repeat(60_000));
        let info = RequestInfo {
            method: "GET",
            path: &huge_path,
            request_id: Some(&huge_id),
            traceparent: Some(&huge_trace),
            ..RequestInfo::default()
        };
        let text = line(&c, info, 0).unwrap();
        assert!(text.len() < 2048, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["request_id"].is_null());
        assert!(v["trace_id"].is_null());
        assert!(v["path"].as_str().unwrap().contains("bytes)"), "{}", v["path"]);
        // A request id with a newline or quotes is dropped, not stored.
        let info = RequestInfo { request_id: Some("a\nb"), ..info };
        assert!(serde_json::from_str::<serde_json::Value>(&line(&c, info, 0).unwrap()).unwrap()["request_id"].is_null());
        let c = denial(&"reason ".repeat(10_000));
        assert!(line(&c, RequestInfo::default(), 0).unwrap().len() < 2048);
    }

    #[test]
    fn allowed_reads_have_no_line_and_allowed_writes_have_one() {
        let c = Checked { decision: Decision::Allow { would_deny: None }, ..denial("") };
        for method in ["GET", "HEAD"] {
            assert!(!is_audited(&c, method));
            assert!(line(&c, RequestInfo { method, ..RequestInfo::default() }, 0).is_none());
        }
        for (method, action) in [("PUT", "push"), ("POST", "push"), ("PATCH", "push"), ("DELETE", "delete")] {
            assert!(is_audited(&c, method));
            let path = "/v2/acme/web/app/manifests/dev-1";
            let text = line(&c, RequestInfo { method, path, ..RequestInfo::default() }, 0).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!((v["decision"].as_str(), v["kind"].as_str()), (Some("allow"), Some("allowed")), "{text}");
            assert_eq!(v["action"], action);
            assert_eq!(v["principal"], "dev");
            assert!(v["status"].is_null() && v["rule"].is_null(), "{text}");
        }
    }

    #[test]
    fn bundle_lines_say_what_changed_and_never_carry_a_token() {
        let activated = BundleChange {
            action: BundleAction::Follow,
            source: "token_service/bundle",
            endpoint: Some("registry"),
            revision_old: Some(3),
            revision_new: Some(4),
            refused: None,
            event_id: Some("e-2"),
        };
        let v: serde_json::Value = serde_json::from_str(&bundle_line(activated, 1_800_000_000)).unwrap();
        assert_eq!(v["audit"], "registry-guard");
        assert_eq!(v["event"], "bundle");
        assert_eq!(v["event_id"], "e-2");
        assert_eq!(v["time"], "2027-01-15T08:00:00Z");
        assert_eq!((v["decision"].as_str(), v["action"].as_str()), (Some("allow"), Some("follow")));
        assert_eq!((v["source"].as_str(), v["endpoint"].as_str()), (Some("token_service/bundle"), Some("registry")));
        assert_eq!(
            (v["revision"].as_u64(), v["revision_old"].as_u64(), v["revision_new"].as_u64()),
            (Some(4), Some(3), Some(4))
        );
        assert!(v["reason"].is_null(), "{v}");

        // Refused: the old revision stays active; the reason is bounded and redacted.
        let reason =
            format!("$: bad signature on eyJhbGciOiJFUzI1NiJ9.eyJyZXZpc2lvbiI6OX0.c2lnbmF0dXJl {}", "x".repeat(5000));
        let refused = BundleChange {
            action: BundleAction::Configure,
            source: "configuration",
            revision_new: None,
            refused: Some(&reason),
            ..activated
        };
        let text = bundle_line(refused, 0);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!((v["decision"].as_str(), v["action"].as_str()), (Some("deny"), Some("configure")));
        assert_eq!((v["revision"].as_u64(), v["revision_old"].as_u64()), (Some(3), Some(3)));
        assert!(v["revision_new"].is_null(), "{v}");
        assert!(v["reason"].as_str().unwrap().starts_with("$: bad signature on [redacted]"), "{v}");
        assert!(!text.contains("eyJ") && !text.contains('\n'), "{text}");
        assert!(text.len() < 2048, "{} bytes", text.len());

        // A first activation has no old revision; a hostile source name is quoted and bounded.
        let source = format!("evil\"\n{}", "s".repeat(10_000));
        let first = BundleChange { revision_old: None, source: &source, endpoint: None, ..activated };
        let v: serde_json::Value = serde_json::from_str(&bundle_line(first, 0)).unwrap();
        assert!(v["revision_old"].is_null() && v["endpoint"].is_null(), "{v}");
        assert_eq!(v["revision"], 4);
        assert!(v["source"].as_str().unwrap().len() < 1024, "{v}");
    }

    #[test]
    fn trace_ids_come_only_from_well_formed_traceparents() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        assert_eq!(trace_id(&format!("01-{id}-00f067aa0ba902b7-01-future")), Some(id));
        for bad in [
            "".to_owned(),
            format!("00-{id}-00f067aa0ba902b7-01-extra"),
            format!("ff-{id}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase()),
            format!("00-{id}-00f067aa0ba902b-01"),
            format!("00-{id}\n-00f067aa0ba902b7-01"),
            "00-\"x\"-y-z".to_owned(),
        ] {
            assert_eq!(trace_id(&bad), None, "{bad}");
        }
    }
}
