//! The events role against a fake host: the registry role seals who made an allowed request
//! into the registry's `User-Agent`; the events role of any Envoy holding the attribution key
//! fills that actor into the registry's notification, leaves an event it cannot attribute
//! alone, and forwards every envelope.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::rc::Rc;

use fake::{bearer_signed_by, registry_config, take_logs, FakeHost, Shared};
use proxy_wasm::types::Action;
use registry_guard::{EventsHttp, GuardRoot, HttpFilter, RegistryHttp, Vm};

/// The fleet's attribution key (32 bytes of 7, base64url).
const KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

fn events_config() -> String {
    serde_json::json!({"role": "events", "max_envelope_bytes": 4096, "attribution": {"key": KEY}}).to_string()
}

fn events_root(host: &mut FakeHost) -> GuardRoot {
    events_root_with(host, &events_config())
}

fn events_root_with(host: &mut FakeHost, config: &str) -> GuardRoot {
    host.configuration = Some(config.as_bytes().to_vec());
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(host));
    root
}

fn events(root: &GuardRoot) -> EventsHttp {
    match root.http_context(9) {
        HttpFilter::Events(http) => http,
        HttpFilter::Registry(_) => panic!("registry role"),
    }
}

fn registry(root: &GuardRoot) -> RegistryHttp {
    match root.http_context(3) {
        HttpFilter::Registry(http) => http,
        HttpFilter::Events(_) => panic!("events role"),
    }
}

/// Posts `envelope` through a fresh events context in two chunks; returns each callback's
/// action and the forwarded body.
fn notify(root: &GuardRoot, host: &mut FakeHost, envelope: &serde_json::Value) -> (Vec<Action>, serde_json::Value) {
    let body = envelope.to_string().into_bytes();
    host.new_request("POST", "/events");
    host.headers.push(("content-length".into(), body.len().to_string()));
    let mut http = events(root);
    let mut actions = vec![http.request_headers(host, false)];
    assert_eq!(host.header("content-length"), None, "Envoy's buffer filter recomputes it");
    host.body = body[..10].to_vec();
    actions.push(http.request_body(host, 10, false));
    host.body = body.clone();
    actions.push(http.request_body(host, body.len(), true));
    (actions, serde_json::from_slice(&host.body).unwrap())
}

/// The registry's envelope for one request: distribution copies its `User-Agent` and first
/// `X-Forwarded-For` entry.
fn envelope(useragent: &str, addr: &str) -> serde_json::Value {
    serde_json::json!({"events": [
        {"id": "e1", "action": "pull", "target": {"repository": "acme/web/app", "tag": "v1"},
         "request": {"id": "registry-id", "addr": addr, "method": "GET", "useragent": useragent}, "actor": {}}
    ]})
}

#[test]
fn an_allowed_requests_event_is_enriched_with_its_actor() {
    // The registry role on Envoy A: an allowed pull, tagged.
    let mut config = registry_config(1);
    config["attribution"] = serde_json::json!({"key": KEY});
    let mut front = FakeHost::default().with_shared(&Shared::default()).with_configuration(&config);
    let mut registry_root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(registry_root.configure(&mut front));
    front.new_request("GET", "/v2/acme/web/app/manifests/v1");
    front.headers.push(("authorization".into(), bearer_signed_by(1, &["pull"])));
    front.headers.push(("x-request-id".into(), "edge-7".into()));
    front.headers.push(("user-agent".into(), "containerd/2.0.0".into()));
    assert_eq!(registry(&registry_root).request_headers(&mut front, true), Action::Continue);
    let (ua, addr) =
        (front.header("user-agent").unwrap().to_owned(), front.header("x-forwarded-for").unwrap().to_owned());
    assert!(front.shared.0.borrow().keys().all(|k| !k.contains("correlation")), "no shared-data record");
    // The registry's notification for it reaches Envoy C's events role: nothing shared but
    // the key.
    let mut back = FakeHost::default().with_shared(&Shared::default());
    let root = events_root(&mut back);
    let (actions, out) = notify(&root, &mut back, &envelope(&ua, &addr));
    assert_eq!(actions, [Action::Continue, Action::Pause, Action::Continue]);
    let event = &out["events"][0];
    assert_eq!(event["actor"]["name"], "dev");
    assert_eq!(event["actor"]["user_type"], "password");
    assert_eq!(event["request"]["id"], "edge-7");
    assert_eq!(event["request"]["addr"], "127.0.0.1:40000");
    assert_eq!(event["request"]["useragent"], "containerd/2.0.0");
    assert_eq!(back.metric("registry_guard.envelopes_rewritten_total"), 1);
    assert_eq!(back.metric("registry_guard.events_attributed_total"), 1);
    assert_eq!(back.metric("registry_guard.events_unattributed_total"), 0);
}

#[test]
fn an_unattributable_event_is_forwarded_with_its_actor_unchanged() {
    take_logs();
    let mut host = FakeHost::default();
    let root = events_root(&mut host);
    // A request that did not pass the filter (no marker in its user agent).
    let (actions, out) = notify(&root, &mut host, &envelope("skopeo/1.9", "10.0.0.1"));
    assert_eq!(actions, [Action::Continue, Action::Pause, Action::Continue]);
    assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
    assert_eq!(out["events"][0]["request"]["id"], "registry-id");
    assert_eq!(host.metric("registry_guard.envelopes_rewritten_total"), 1);
    assert_eq!(host.metric("registry_guard.events_unattributed_total"), 1);
    let logs = take_logs();
    assert!(logs.iter().any(|l| l.contains("1 of 1 events could not be attributed")), "{logs:?}");
    // A marker sealed under another fleet's key: restored fields, actor unchanged, counted.
    let foreign = registry_guard_core::events::AttributionKey::from_bytes([9; 32]);
    let who = registry_guard_core::events::AttributionRef {
        name: "mallory",
        user_type: "pat",
        user: None,
        expires_at: i64::MAX / 2,
    };
    let sealed = registry_guard_core::events::seal(&foreign, &who, &[1; 24]).unwrap();
    let ua = format!("registry-guard/1 {sealed} rid-1 10.1.1.1 -");
    let (_, out) = notify(&root, &mut host, &envelope(&ua, "10.1.1.1"));
    assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
    assert_eq!(out["events"][0]["request"]["id"], "rid-1");
    assert_eq!(out["events"][0]["request"]["useragent"], "");
    assert_eq!(host.metric("registry_guard.events_unattributed_total"), 2);
}

#[test]
fn an_old_configuration_naming_the_ring_is_accepted_with_a_warning() {
    take_logs();
    let mut host = FakeHost::default();
    let old = r#"{"role": "events", "correlation": {"slots": 4096}}"#;
    let _root = events_root_with(&mut host, old);
    let logs = take_logs();
    assert!(logs.iter().any(|l| l.contains("`correlation.slots` is ignored")), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains("no event will be attributed")), "{logs:?}");
    let mut registry_host = FakeHost::default();
    let mut config = registry_config(1);
    config["correlation"] = serde_json::json!({"slots": 16});
    registry_host.configuration = Some(config.to_string().into_bytes());
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut registry_host), "an upgrade must not fail closed on an old setting");
    // Still failing closed for anonymous and forged requests.
    registry_host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    assert_eq!(registry(&root).request_headers(&mut registry_host, true), Action::Pause);
    registry_host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    registry_host.headers.push(("authorization".into(), bearer_signed_by(2, &["pull"])));
    assert_eq!(registry(&root).request_headers(&mut registry_host, true), Action::Pause);
    assert_eq!(registry_host.header("x-registry-guard-decision"), None);
}

#[test]
fn oversize_and_malformed_envelopes_pass_unchanged() {
    let mut host = FakeHost::default();
    let root = events_root(&mut host);
    // Announced too large: not buffered, not touched.
    host.new_request("POST", "/events");
    host.headers.push(("content-length".into(), "5000".into()));
    let mut http = events(&root);
    assert_eq!(http.request_headers(&mut host, false), Action::Continue);
    assert_eq!(host.header("content-length"), Some("5000"));
    host.body = b"{}".to_vec();
    assert_eq!(http.request_body(&mut host, 2, true), Action::Continue);
    assert_eq!(host.body, b"{}");
    assert_eq!(host.metric("registry_guard.envelopes_oversize_total"), 1);
    // Not an envelope.
    host.new_request("POST", "/events");
    let mut http = events(&root);
    assert_eq!(http.request_headers(&mut host, false), Action::Continue);
    host.body = b"not json".to_vec();
    assert_eq!(http.request_body(&mut host, 8, true), Action::Continue);
    assert_eq!(host.body, b"not json");
    assert_eq!(host.metric("registry_guard.envelopes_malformed_total"), 1);
}
