//! The events role against a fake host: the registry role records who made an allowed
//! request; the events role fills that actor into the registry's notification, leaves an
//! event it cannot attribute alone, and forwards every envelope.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::rc::Rc;

use fake::{bearer_signed_by, registry_config, take_logs, FakeHost, Shared};
use proxy_wasm::types::Action;
use registry_guard::{EventsHttp, GuardRoot, HttpFilter, RegistryHttp, Vm};

const EVENTS_CONFIG: &str = r#"{"role": "events", "max_envelope_bytes": 4096}"#;

fn events_root(host: &mut FakeHost) -> GuardRoot {
    host.configuration = Some(EVENTS_CONFIG.as_bytes().to_vec());
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

fn envelope(addr: &str) -> serde_json::Value {
    serde_json::json!({"events": [
        {"id": "e1", "action": "pull", "target": {"repository": "acme/web/app", "tag": "v1"},
         "request": {"id": "registry-id", "addr": addr, "method": "GET"}, "actor": {}}
    ]})
}

#[test]
fn an_allowed_requests_event_is_enriched_with_its_actor() {
    let shared = Shared::default();
    // The registry role (another VM, same Envoy): an allowed pull, tagged and recorded.
    let mut front = FakeHost::default().with_shared(&shared).with_configuration(&registry_config(1));
    let mut registry_root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(registry_root.configure(&mut front));
    front.new_request("GET", "/v2/acme/web/app/manifests/v1");
    front.headers.push(("authorization".into(), bearer_signed_by(1, &["pull"])));
    front.headers.push(("x-request-id".into(), "edge-7".into()));
    assert_eq!(registry(&registry_root).request_headers(&mut front, true), Action::Continue);
    let addr = front.header("x-forwarded-for").unwrap().to_owned();
    // The registry's notification for it, on the events path.
    let mut back = FakeHost::default().with_shared(&shared);
    let root = events_root(&mut back);
    let (actions, out) = notify(&root, &mut back, &envelope(&addr));
    assert_eq!(actions, [Action::Continue, Action::Pause, Action::Continue]);
    let event = &out["events"][0];
    assert_eq!(event["actor"]["name"], "dev");
    assert_eq!(event["actor"]["user_type"], "password");
    assert_eq!(event["request"]["id"], "edge-7");
    assert_eq!(event["request"]["addr"], "127.0.0.1:40000");
    assert_eq!(back.metric("registry_guard.envelopes_rewritten"), 1);
    assert_eq!(back.metric("registry_guard.events_attributed"), 1);
    assert_eq!(back.metric("registry_guard.events_unattributed"), 0);
}

#[test]
fn an_unattributable_event_is_forwarded_with_its_actor_unchanged() {
    take_logs();
    let mut host = FakeHost::default();
    let root = events_root(&mut host);
    // An address no registry-role request was tagged with (e.g. its record was overwritten).
    let (actions, out) = notify(&root, &mut host, &envelope("fd00::1"));
    assert_eq!(actions, [Action::Continue, Action::Pause, Action::Continue]);
    assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
    assert_eq!(out["events"][0]["request"]["id"], "registry-id");
    assert_eq!(host.metric("registry_guard.envelopes_rewritten"), 1);
    assert_eq!(host.metric("registry_guard.events_unattributed"), 1);
    let logs = take_logs();
    assert!(logs.iter().any(|l| l.contains("1 of 1 events could not be attributed")), "{logs:?}");
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
    assert_eq!(host.metric("registry_guard.envelopes_oversize"), 1);
    // Not an envelope.
    host.new_request("POST", "/events");
    let mut http = events(&root);
    assert_eq!(http.request_headers(&mut host, false), Action::Continue);
    host.body = b"not json".to_vec();
    assert_eq!(http.request_body(&mut host, 8, true), Action::Continue);
    assert_eq!(host.body, b"not json");
    assert_eq!(host.metric("registry_guard.envelopes_malformed"), 1);
}
