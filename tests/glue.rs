//! The filter glue against a fake host: headers in, decision out, local replies recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic, clippy::type_complexity)]

use std::cell::RefCell;

use registry_guard::host::Host;
use registry_guard::metrics::{Metrics, FLUSH_EVERY};
use registry_guard::{on_request_headers, rewrite_request_body, Correlation, EnvelopeOutcome, Outcome};
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::token::claims::{AccessClaim, Audience, RegistryClaims};
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_core::token::testing::{es256_key, jwks};

mod fake;

use fake::{FakeHost, NOW};

fn guard() -> RefCell<Guard> {
    guard_with(serde_json::json!({}))
}

fn guard_with(extra: serde_json::Value) -> RefCell<Guard> {
    let mut cfg = serde_json::json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
        "issuer": "registry-guard", "jwks": jwks(&[&es256_key(1)]),
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    RefCell::new(Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap()))
}

fn bearer(actions: &[&str]) -> String {
    fake::bearer_signed_by(1, actions)
}

#[test]
fn allowed_request_continues_without_a_reply() {
    let mut host =
        FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Allowed);
    assert!(host.replies.is_empty());
    // The positive decision Envoy's route requires (the backstop).
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap().as_deref(), Some("allow"));
}

#[test]
fn only_allowed_requests_carry_the_decision() {
    // A client-sent decision header on a denied request: the request is answered locally
    // and never marked (Envoy also strips client copies before the filter runs).
    let mut host = FakeHost::request("GET", "/v2/_catalog").with_header("x-registry-guard-decision", "allow");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
    // Unconfigured: 503, never marked.
    let mut host = FakeHost::request("GET", "/v2/");
    assert_eq!(on_request_headers(&mut host, 1, None, None, None), Outcome::Failed);
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap(), None);
}

#[test]
fn a_refusal_that_cannot_be_sent_is_left_to_envoys_backstop() {
    // No local reply possible: the request goes on unmarked (Action::Continue), and Envoy's
    // route refuses it, instead of a pause with nothing sent (a hang until a timeout).
    let mut host = FakeHost { fail_reply: true, ..FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1") };
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Unanswered);
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap(), None);
    let mut host = FakeHost { fail_reply: true, ..FakeHost::request("GET", "/v2/") };
    assert_eq!(on_request_headers(&mut host, 1, None, None, None), Outcome::Unanswered);
}

#[test]
fn missing_token_gets_401_challenge_and_oci_body() {
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Denied);
    let (status, headers, body) = &host.replies[0];
    assert_eq!(*status, 401);
    let www = headers.iter().find(|(k, _)| k == "www-authenticate").unwrap();
    assert!(www.1.contains(r#"scope="repository:acme/web/app:pull,push""#));
    assert!(body.contains(r#""code":"UNAUTHORIZED""#));
}

#[test]
fn two_authorization_headers_are_refused() {
    let b = bearer(&["pull"]);
    let mut host = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &b)
        .with_header("authorization", &b);
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
}

#[test]
fn a_form_body_behind_a_second_content_type_is_refused() {
    // Regression: the glue kept only the last Content-Type, so a form type first
    // (which distribution's `r.FormValue` reads, `from` included) hid behind a second one.
    let b = bearer(&["pull", "push"]);
    for (first, second) in [
        ("application/x-www-form-urlencoded", "application/octet-stream"),
        ("application/octet-stream", "multipart/form-data; boundary=x"),
    ] {
        let mut host = FakeHost::request("POST", "/v2/acme/web/app/blobs/uploads/")
            .with_header("authorization", &b)
            .with_header("content-type", first)
            .with_header("content-type", second);
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Denied, "{first} + {second}");
        assert_eq!(host.replies[0].0, 400);
    }
    let mut host = FakeHost::request("POST", "/v2/acme/web/app/blobs/uploads/")
        .with_header("authorization", &b)
        .with_header("content-type", "application/octet-stream");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Allowed);
}

#[test]
fn internal_errors_fail_closed() {
    let mut host = FakeHost { fail_headers: true, ..FakeHost::request("GET", "/v2/") };
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
    let mut host = FakeHost::request("GET", "/v2/");
    assert_eq!(on_request_headers(&mut host, 1, None, None, None), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
}

#[test]
fn allowed_requests_are_tagged_and_their_events_attributed() {
    let guard = guard();
    let correlation = Correlation::new(64, 0xfeed);
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &bearer(&["pull", "push"]))
        .with_header("x-request-id", "edge-1")
        .with_header("x-forwarded-for", "6.6.6.6");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard), Some(&correlation), None), Outcome::Allowed);
    let addr = host.request_header("x-forwarded-for").unwrap().unwrap();
    assert!(addr.starts_with("fd"), "client-supplied X-Forwarded-For is replaced: {addr}");
    // The registry's event for that request comes back on the events path.
    let envelope = serde_json::json!({"events": [
        {"id": "e1", "action": "push", "target": {"repository": "acme/web/app", "tag": "v1"},
         "request": {"id": "random", "addr": addr, "method": "PUT"}, "actor": {}},
        {"id": "e2", "action": "pull", "target": {"repository": "acme/web/app"},
         "request": {"id": "random2", "addr": "fd00::1", "method": "GET"}, "actor": {}}
    ]});
    let mut events =
        FakeHost { shared: host.shared.clone(), body: envelope.to_string().into_bytes(), ..FakeHost::default() };
    let size = events.body.len();
    let outcome = rewrite_request_body(&mut events, 2, size, 64);
    assert_eq!(outcome, EnvelopeOutcome::Rewritten { attributed: 1, unattributed: 1 });
    let out: serde_json::Value = serde_json::from_slice(&events.body).unwrap();
    assert_eq!(out["events"][0]["actor"]["name"], "dev");
    assert_eq!(out["events"][0]["actor"]["user_type"], "password");
    assert_eq!(out["events"][0]["request"]["id"], "edge-1");
    assert_eq!(out["events"][0]["request"]["addr"], "127.0.0.1:40000");
    assert_eq!(out["events"][1]["actor"], serde_json::json!({}));
}

#[test]
fn the_client_address_comes_from_the_peer_or_the_last_forwarded_for_entry() {
    // (mode, X-Forwarded-For as Envoy passes it, the address restored into the event)
    let cases = [
        ("peer", Some("6.6.6.6, 10.9.8.7"), "127.0.0.1:40000"),
        ("x-forwarded-for", Some("6.6.6.6, 10.9.8.7"), "10.9.8.7"),
        ("x-forwarded-for", Some("10.9.8.7"), "10.9.8.7"),
        ("x-forwarded-for", None, "127.0.0.1:40000"),
        ("x-forwarded-for", Some(" , "), "127.0.0.1:40000"),
    ];
    for (mode, xff, want) in cases {
        let guard = guard_with(serde_json::json!({"correlation": {"client_address": mode}}));
        let correlation = Correlation::new(64, 7);
        let mut host =
            FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
        if let Some(v) = xff {
            host = host.with_header("x-forwarded-for", v);
        }
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard), Some(&correlation), None), Outcome::Allowed);
        let addr = host.request_header("x-forwarded-for").unwrap().unwrap();
        let record = host.shared.0.borrow().values().next().unwrap().0.clone();
        let record: registry_guard_core::events::Attribution = serde_json::from_slice(&record).unwrap();
        assert_eq!(
            (record.addr.as_str(), record.client_addr.as_deref()),
            (addr.as_str(), Some(want)),
            "{mode} {xff:?}"
        );
    }
    let bad = serde_json::json!({"realm": "http://x/", "issuer": "i", "jwks": jwks(&[&es256_key(1)]),
        "correlation": {"client_address": "header"}});
    let err = FilterConfig::from_json(bad.to_string().as_bytes()).unwrap_err().to_string();
    assert!(err.contains("client_address") || err.contains("header"), "{err}");
}

#[test]
fn denied_requests_are_not_tagged_and_malformed_envelopes_pass() {
    let guard = guard();
    let correlation = Correlation::new(64, 1);
    let mut host =
        FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard), Some(&correlation), None), Outcome::Denied);
    assert!(host.shared.0.borrow().is_empty());
    let mut events = FakeHost { body: b"not json".to_vec(), ..FakeHost::default() };
    assert_eq!(rewrite_request_body(&mut events, 2, 8, 64), EnvelopeOutcome::Malformed);
    assert_eq!(events.body, b"not json");
}

#[test]
fn decisions_are_counted_by_kind_rule_and_cache() {
    let operator = es256_key(7);
    let bundle = serde_json::json!({"revision": 3, "protection_rules": [
        {"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "tag_name_pattern": "^v",
         "minimum_access_level_for_push": "maintainer"},
        {"id": "dry-delete", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/app", "minimum_access_level_for_push": "owner",
         "enforce": false},
    ]});
    let cfg = serde_json::json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
        "issuer": "registry-guard", "jwks": jwks(&[&es256_key(1)]),
        "bundle_keys": jwks(&[&operator]),
        "bundle": registry_guard_core::policy::bundle::sign(&bundle.to_string(), &operator).unwrap(),
    });
    let guard = RefCell::new(Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap()));
    let mut host = FakeHost::default();
    let metrics = Metrics::define(&mut host).unwrap();
    let claims = |level: u8| RegistryClaims {
        iss: "registry-guard".into(),
        sub: "dev".into(),
        aud: Audience::One("container_registry".into()),
        jti: format!("j{level}"),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: vec!["pull".into(), "push".into()],
            meta: Some(registry_guard_core::token::claims::AccessMeta {
                project_path: None,
                access_level: Some(level),
            }),
        }],
        auth_type: Some("pat".into()),
        user: None,
        extra: Default::default(),
    };
    let validity = Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 60 };
    let developer = format!("Bearer {}", sign(&es256_key(1), claims(30), validity).unwrap());
    let maintainer = format!("Bearer {}", sign(&es256_key(1), claims(40), validity).unwrap());
    let run = |host: &mut FakeHost, method: &str, path: &str, auth: Option<&str>| {
        host.headers = vec![(":method".into(), method.into()), (":path".into(), path.into())];
        if let Some(a) = auth {
            host.headers.push(("authorization".into(), a.into()));
        }
        on_request_headers(host, 1, Some(&guard), None, Some(&metrics))
    };
    let put_v1 = "/v2/acme/web/app/manifests/v1";
    assert_eq!(run(&mut host, "GET", "/v2/", None), Outcome::Denied);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&developer)), Outcome::DeniedByRule);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&developer)), Outcome::DeniedByRule);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&maintainer)), Outcome::AllowedWouldDeny);
    assert_eq!(run(&mut host, "GET", put_v1, Some("Bearer not-a-token")), Outcome::Denied);
    assert_eq!(run(&mut host, "GET", "/v2/acme/web/app/../x/manifests/v1", Some(&maintainer)), Outcome::Denied);
    // Counts are batched in the VM until a full batch or the root's tick flushes them.
    assert_eq!(host.metric("registry_guard.requests_denied"), 0, "not flushed yet");
    metrics.flush(&mut host);
    for (name, want) in [
        ("registry_guard.requests_allowed", 1),
        ("registry_guard.requests_denied", 5),
        ("registry_guard.denied.no_credentials", 1),
        ("registry_guard.denied.protected", 2),
        ("registry_guard.denied.invalid_token", 1),
        ("registry_guard.denied.bad_request", 1),
        ("registry_guard.denied.insufficient_scope", 0),
        ("registry_guard.protection_denied", 2),
        ("registry_guard.protection_would_deny", 1),
        ("registry_guard.rule.web-release-tags.denied", 2),
        ("registry_guard.rule.dry-delete.would_deny", 1),
        ("registry_guard.token_cache_misses", 3),
        ("registry_guard.token_cache_hits", 2),
    ] {
        assert_eq!(host.metric(name), want, "{name}");
    }
}

#[test]
fn a_full_batch_of_counts_is_flushed_without_waiting_for_the_tick() {
    let mut host = FakeHost::default();
    let metrics = Metrics::define(&mut host).unwrap();
    let guard = guard();
    // One count per unauthenticated request (allowed/denied + kind = 2 per request).
    let requests = FLUSH_EVERY / 2;
    for _ in 0..requests {
        host.headers = vec![(":method".into(), "GET".into()), (":path".into(), "/v2/".into())];
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard), None, Some(&metrics)), Outcome::Denied);
    }
    assert_eq!(host.metric("registry_guard.requests_denied"), requests);
    assert_eq!(host.metric("registry_guard.denied.no_credentials"), requests);
}

#[test]
fn header_values_that_are_not_utf8_are_decided_not_trapped() {
    // obs-text (`\xff`) is legal in a header value and Envoy forwards it; the SDK's `get_map`
    // panicked on it (a VM trap). The value is judged as text with U+FFFD instead.
    let mut host = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1");
    host.raw_headers.push(("x-latin1".into(), b"caf\xe9".to_vec()));
    host.raw_headers.push(("authorization".into(), [bearer(&["pull"]).as_bytes(), b"\xff"].concat()));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
    let mut host =
        FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
    host.raw_headers.push(("x-latin1".into(), b"caf\xe9".to_vec()));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None, None), Outcome::Allowed);
}
