//! One JSON audit line per denial (and per dry-run would-deny): who, what, which rule, which
//! bundle revision, why. Never a token: the line is built from the decision, and anything in
//! the free-text reason that looks like a compact JWS is redacted.

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
}

/// The audit line of `checked` at unix time `now`, or `None` for a plain allow.
pub fn line(checked: &Checked, request: RequestInfo<'_>, now: i64) -> Option<String> {
    let (decision, status, kind, rule, reason) = match &checked.decision {
        Decision::Deny(d) => ("deny", d.status, d.kind.label(), d.rule.as_deref(), d.reason.as_str()),
        Decision::Allow { would_deny: Some((rule, message)), .. } => {
            ("would_deny", 200, "protected", Some(rule.as_str()), message.as_str())
        }
        Decision::Allow { would_deny: None, .. } => return None,
    };
    let time = u64::try_from(now).ok().map(|secs| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
    });
    // Every field a client controls is bounded and escaped (see `crate::support::text`): one audit
    // line stays under ~2 KiB whatever the request carried.
    let path = request.path.split('?').next().unwrap_or_default();
    let line = json!({
        "audit": "registry-guard",
        "time": time,
        "request_id": request.request_id.and_then(crate::support::text::request_id),
        "decision": decision,
        "status": status,
        "kind": kind,
        "rule": rule,
        "revision": checked.revision,
        "principal": checked.subject().map(quote),
        "auth_type": checked.auth_type().map(quote),
        "method": quote(request.method),
        "path": quote_max(path, MAX_AUDIT_PATH_CHARS),
        "scopes": checked.scopes.as_deref().map(|s| quote_max(s, MAX_AUDIT_PATH_CHARS)),
        "client": request.client.map(quote),
        "reason": redact(&bounded(reason, MAX_REASON_CHARS)),
    });
    Some(line.to_string())
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
        let info = RequestInfo { method: "GET", path: &huge_path, request_id: Some(&huge_id), client: None };
        let text = line(&c, info, 0).unwrap();
        assert!(text.len() < 2048, "{} bytes", text.len());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["request_id"].is_null());
        assert!(v["path"].as_str().unwrap().contains("bytes)"), "{}", v["path"]);
        // A request id with a newline or quotes is dropped, not stored.
        let info = RequestInfo { request_id: Some("a\nb"), ..info };
        assert!(serde_json::from_str::<serde_json::Value>(&line(&c, info, 0).unwrap()).unwrap()["request_id"].is_null());
        let c = denial(&"reason ".repeat(10_000));
        assert!(line(&c, RequestInfo::default(), 0).unwrap().len() < 2048);
    }

    #[test]
    fn plain_allows_have_no_line() {
        let c = Checked { decision: Decision::Allow { would_deny: None }, ..denial("") };
        assert!(line(&c, RequestInfo::default(), 0).is_none());
    }
}
