//! The filter glue against a fake host: headers in, decision out, local replies recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic, clippy::type_complexity)]

use std::cell::RefCell;

use registry_guard::host::Host;
use registry_guard::metrics::{Metrics, FLUSH_EVERY};
use registry_guard::{on_request_headers, rewrite_request_body, EnvelopeOutcome, Outcome};
use registry_guard_core::decide::config::{EventsConfig, FilterConfig, PluginConfig};
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
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Allowed);
    assert!(host.replies.is_empty());
    // The positive decision Envoy's route requires (the backstop).
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap().as_deref(), Some("allow"));
}

#[test]
fn only_allowed_requests_carry_the_decision() {
    // A client-sent decision header on a denied request: the request is answered locally
    // and never marked (Envoy also strips client copies before the filter runs).
    let mut host = FakeHost::request("GET", "/v2/_catalog").with_header("x-registry-guard-decision", "allow");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
    // Unconfigured: 503, never marked.
    let mut host = FakeHost::request("GET", "/v2/");
    assert_eq!(on_request_headers(&mut host, 1, None, None), Outcome::Failed);
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap(), None);
}

#[test]
fn a_refusal_that_cannot_be_sent_is_left_to_envoys_backstop() {
    // No local reply possible: the request goes on unmarked (Action::Continue), and Envoy's
    // route refuses it, instead of a pause with nothing sent (a hang until a timeout).
    let mut host = FakeHost { fail_reply: true, ..FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1") };
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Unanswered);
    assert_eq!(host.request_header("x-registry-guard-decision").unwrap(), None);
    let mut host = FakeHost { fail_reply: true, ..FakeHost::request("GET", "/v2/") };
    assert_eq!(on_request_headers(&mut host, 1, None, None), Outcome::Unanswered);
}

#[test]
fn missing_token_gets_401_challenge_and_oci_body() {
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Denied);
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
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Denied);
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
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Denied, "{first} + {second}");
        assert_eq!(host.replies[0].0, 400);
    }
    let mut host = FakeHost::request("POST", "/v2/acme/web/app/blobs/uploads/")
        .with_header("authorization", &b)
        .with_header("content-type", "application/octet-stream");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Allowed);
}

#[test]
fn internal_errors_fail_closed() {
    let mut host = FakeHost { fail_headers: true, ..FakeHost::request("GET", "/v2/") };
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
    let mut host = FakeHost::request("GET", "/v2/");
    assert_eq!(on_request_headers(&mut host, 1, None, None), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
}

const KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

fn events_config(key: Option<&str>) -> EventsConfig {
    let mut cfg = serde_json::json!({"role": "events"});
    if let Some(k) = key {
        cfg["attribution"] = serde_json::json!({"key": k});
    }
    match PluginConfig::from_json(cfg.to_string().as_bytes()).unwrap() {
        PluginConfig::Events(e) => e,
        PluginConfig::Registry(_) => panic!("expected the events role"),
    }
}

/// The registry's event for a request the filter forwarded: distribution copies the
/// request's User-Agent and first X-Forwarded-For entry.
fn event_of(host: &mut FakeHost, id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "action": "push", "target": {"repository": "acme/web/app", "tag": "v1"},
        "request": {"id": format!("random-{id}"), "addr": host.request_header("x-forwarded-for").unwrap(), "method": "PUT",
                    "useragent": host.request_header("user-agent").unwrap().unwrap_or_default()},
        "actor": {}})
}

fn deliver(events: Vec<serde_json::Value>, config: &EventsConfig) -> (EnvelopeOutcome, serde_json::Value) {
    let mut host =
        FakeHost { body: serde_json::json!({"events": events}).to_string().into_bytes(), ..FakeHost::default() };
    let size = host.body.len();
    let outcome = rewrite_request_body(&mut host, 2, size, config);
    (outcome, serde_json::from_slice(&host.body).unwrap())
}

#[test]
fn allowed_requests_are_tagged_and_their_events_attributed() {
    let guard = guard_with(serde_json::json!({"attribution": {"key": KEY}}));
    let token = bearer(&["pull", "push"]);
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &token)
        .with_header("x-request-id", "edge-1")
        .with_header("user-agent", "skopeo/1.9.3")
        .with_header("x-forwarded-for", "6.6.6.6");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard), None), Outcome::Allowed);
    let ua = host.request_header("user-agent").unwrap().unwrap();
    assert!(ua.starts_with("registry-guard/1 "), "{ua}");
    assert!(!ua.contains(token.trim_start_matches("Bearer ")), "the registry never sees the token");
    assert!(!ua.contains("skopeo") && !ua.contains("dev"), "sealed and encoded: {ua}");
    assert_eq!(
        host.request_header("x-forwarded-for").unwrap().as_deref(),
        Some("127.0.0.1"),
        "the client's first X-Forwarded-For entry never reaches the registry"
    );
    // The seal is cached with the token: the next request carries the same one (no crypto).
    let mut again = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &token)
        .with_header("x-request-id", "edge-2");
    assert_eq!(on_request_headers(&mut again, 1, Some(&guard), None), Outcome::Allowed);
    let ua2 = again.request_header("user-agent").unwrap().unwrap();
    assert_eq!(ua.split(' ').nth(1), ua2.split(' ').nth(1));
    assert_eq!(guard.borrow().cache.hits, 1);
    // Another Envoy's events role (only the key in common) attributes both events.
    let (outcome, out) =
        deliver(vec![event_of(&mut host, "e1"), event_of(&mut again, "e2")], &events_config(Some(KEY)));
    assert_eq!(outcome, EnvelopeOutcome::Rewritten { attributed: 2, unattributed: 0 });
    assert_eq!(out["events"][0]["actor"]["name"], "dev");
    assert_eq!(out["events"][0]["actor"]["user_type"], "password");
    assert_eq!(out["events"][0]["request"]["id"], "edge-1");
    assert_eq!(out["events"][0]["request"]["registry_request_id"], "random-e1");
    assert_eq!(out["events"][0]["request"]["addr"], "127.0.0.1:40000");
    assert_eq!(out["events"][0]["request"]["useragent"], "skopeo/1.9.3");
    assert_eq!(out["events"][1]["request"]["id"], "edge-2");
    assert_eq!(out["events"][1]["request"]["useragent"], "");
    // Without the key, or with another, nothing is attributed (never misattributed).
    let other = "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg";
    for config in [events_config(None), events_config(Some(other))] {
        let (outcome, out) = deliver(vec![event_of(&mut host, "e1")], &config);
        assert_eq!(outcome, EnvelopeOutcome::Rewritten { attributed: 0, unattributed: 1 });
        assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
        assert_eq!(out["events"][0]["request"]["useragent"], "skopeo/1.9.3", "filter-written fields are restored");
    }
}

fn bearer_as(sub: &str, auth_type: &str, user: Option<&str>) -> String {
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: sub.into(),
        aud: Audience::One("container_registry".into()),
        jti: format!("j-{sub}"),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: vec!["pull".into()],
            meta: None,
        }],
        auth_type: Some(auth_type.into()),
        user: user.map(str::to_owned),
        extra: Default::default(),
    };
    let t = sign(&es256_key(1), claims, Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 60 }).unwrap();
    format!("Bearer {t}")
}

#[test]
fn a_client_cannot_inject_or_forge_an_attribution() {
    let guard = guard_with(serde_json::json!({"attribution": {"key": KEY}}));
    let user_jwt = "eyJhbGciOiJFUzI1NiJ9.eyJ1c2VyX2luZm8iOnt9fQ.c2lnbmF0dXJl";
    // A genuine marker (for example copied from the registry's log) ...
    let mut victim = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &bearer_as("admin", "pat", Some(user_jwt)));
    assert_eq!(on_request_headers(&mut victim, 1, Some(&guard), None), Outcome::Allowed);
    let stolen = victim.request_header("user-agent").unwrap().unwrap();
    assert!(!stolen.contains(user_jwt) && !stolen.contains("admin"), "no credential in the registry's view: {stolen}");
    // ... sent by another principal as its User-Agent is replaced: the stolen marker only
    // travels (encoded) as the client's user agent, and the event is Mallory's.
    let mut mallory = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &bearer_as("mallory", "pat", None))
        .with_header("user-agent", &stolen);
    assert_eq!(on_request_headers(&mut mallory, 1, Some(&guard), None), Outcome::Allowed);
    let written = mallory.request_header("user-agent").unwrap().unwrap();
    assert_ne!(written.split(' ').nth(1), stolen.split(' ').nth(1));
    let (outcome, out) =
        deliver(vec![event_of(&mut victim, "v"), event_of(&mut mallory, "m")], &events_config(Some(KEY)));
    assert_eq!(outcome, EnvelopeOutcome::Rewritten { attributed: 2, unattributed: 0 });
    assert_eq!(out["events"][0]["actor"]["name"], "admin");
    assert_eq!(out["events"][0]["actor"]["user"], user_jwt);
    assert_eq!(out["events"][1]["actor"]["name"], "mallory", "attributed to the token that made it");
    assert_eq!(out["events"][1]["actor"]["user_type"], "pat");
    assert_eq!(out["events"][1]["request"]["useragent"], stolen.as_str());
}

#[test]
fn without_a_key_requests_are_still_neutralised() {
    let guard = guard();
    let mut host = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &bearer(&["pull"]))
        .with_header("user-agent", "registry-guard/1 forged - - -");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard), None), Outcome::Allowed);
    let ua = host.request_header("user-agent").unwrap().unwrap();
    assert!(ua.starts_with("registry-guard/1 - - 127.0.0.1:40000 "), "{ua}");
    let (outcome, _) = deliver(vec![event_of(&mut host, "e")], &events_config(Some(KEY)));
    assert_eq!(outcome, EnvelopeOutcome::Rewritten { attributed: 0, unattributed: 1 });
}

#[test]
fn the_client_address_comes_from_the_peer_or_the_last_forwarded_for_entry() {
    // (mode, X-Forwarded-For as Envoy passes it, the address restored into the event, the
    // registry's X-Forwarded-For)
    let cases = [
        ("peer", Some("6.6.6.6, 10.9.8.7"), "127.0.0.1:40000", "127.0.0.1"),
        ("x-forwarded-for", Some("6.6.6.6, 10.9.8.7"), "10.9.8.7", "10.9.8.7"),
        ("x-forwarded-for", Some("10.9.8.7"), "10.9.8.7", "10.9.8.7"),
        ("x-forwarded-for", Some("6.6.6.6, 2001:db8::1"), "2001:db8::1", "2001:db8::1"),
        ("x-forwarded-for", None, "127.0.0.1:40000", "127.0.0.1"),
        ("x-forwarded-for", Some(" , "), "127.0.0.1:40000", "127.0.0.1"),
    ];
    for (mode, xff, want, registry_sees) in cases {
        let guard =
            guard_with(serde_json::json!({"correlation": {"client_address": mode}, "attribution": {"key": KEY}}));
        let mut host =
            FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
        if let Some(v) = xff {
            host = host.with_header("x-forwarded-for", v);
        }
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard), None), Outcome::Allowed);
        assert_eq!(host.request_header("x-forwarded-for").unwrap().as_deref(), Some(registry_sees), "{mode} {xff:?}");
        let (_, out) = deliver(vec![event_of(&mut host, "e")], &events_config(Some(KEY)));
        assert_eq!(out["events"][0]["request"]["addr"], want, "{mode} {xff:?}");
    }
    let bad = serde_json::json!({"realm": "http://x/", "issuer": "i", "jwks": jwks(&[&es256_key(1)]),
        "correlation": {"client_address": "header"}});
    let err = FilterConfig::from_json(bad.to_string().as_bytes()).unwrap_err().to_string();
    assert!(err.contains("client_address") || err.contains("header"), "{err}");
}

#[test]
fn denied_requests_are_not_tagged_and_malformed_envelopes_pass() {
    let guard = guard_with(serde_json::json!({"attribution": {"key": KEY}}));
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &bearer(&["pull"]))
        .with_header("user-agent", "skopeo");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard), None), Outcome::Denied);
    assert_eq!(host.request_header("user-agent").unwrap().as_deref(), Some("skopeo"));
    let mut events = FakeHost { body: b"not json".to_vec(), ..FakeHost::default() };
    assert_eq!(rewrite_request_body(&mut events, 2, 8, &events_config(Some(KEY))), EnvelopeOutcome::Malformed);
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
        on_request_headers(host, 1, Some(&guard), Some(&metrics))
    };
    let put_v1 = "/v2/acme/web/app/manifests/v1";
    assert_eq!(run(&mut host, "GET", "/v2/", None), Outcome::Denied);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&developer)), Outcome::DeniedByRule);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&developer)), Outcome::DeniedByRule);
    assert_eq!(run(&mut host, "PUT", put_v1, Some(&maintainer)), Outcome::AllowedWouldDeny);
    assert_eq!(run(&mut host, "GET", put_v1, Some("Bearer not-a-token")), Outcome::Denied);
    assert_eq!(run(&mut host, "GET", "/v2/acme/web/app/../x/manifests/v1", Some(&maintainer)), Outcome::Denied);
    // Counts are batched in the VM until a full batch or the root's tick flushes them.
    assert_eq!(host.metric("registry_guard.requests_denied_total"), 0, "not flushed yet");
    metrics.flush(&mut host);
    for (name, want) in [
        ("registry_guard.requests_allowed_total", 1),
        ("registry_guard.requests_denied_total", 5),
        ("registry_guard.denied_total.no_credentials", 1),
        ("registry_guard.denied_total.protected", 2),
        ("registry_guard.denied_total.invalid_token", 1),
        ("registry_guard.denied_total.bad_request", 1),
        ("registry_guard.denied_total.insufficient_scope", 0),
        ("registry_guard.protection_denied_total", 2),
        ("registry_guard.protection_would_deny_total", 1),
        ("registry_guard.rule.web-release-tags.denied_total", 2),
        ("registry_guard.rule.dry-delete.would_deny_total", 1),
        ("registry_guard.token_cache_misses_total", 3),
        ("registry_guard.token_cache_hits_total", 2),
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
        assert_eq!(on_request_headers(&mut host, 1, Some(&guard), Some(&metrics)), Outcome::Denied);
    }
    assert_eq!(host.metric("registry_guard.requests_denied_total"), requests);
    assert_eq!(host.metric("registry_guard.denied_total.no_credentials"), requests);
}

#[test]
fn header_values_that_are_not_utf8_are_decided_not_trapped() {
    // obs-text (`\xff`) is legal in a header value and Envoy forwards it; the SDK's `get_map`
    // panicked on it (a VM trap). The value is judged as text with U+FFFD instead.
    let mut host = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1");
    host.raw_headers.push(("x-latin1".into(), b"caf\xe9".to_vec()));
    host.raw_headers.push(("authorization".into(), [bearer(&["pull"]).as_bytes(), b"\xff"].concat()));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
    let mut host =
        FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
    host.raw_headers.push(("x-latin1".into(), b"caf\xe9".to_vec()));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard()), None), Outcome::Allowed);
}
