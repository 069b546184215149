//! Failing closed when the host cannot send a local reply: every refusal — answered at the
//! request headers or held until the request body has been read — goes on at once without
//! the allow header (Envoy's backstop route refuses it, docs/failing-closed.md), and never
//! stays paused with nothing sent (which would hang the client until the route timeout).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::cell::RefCell;
use std::rc::Rc;

use fake::{bearer_signed_by, registry_config, take_logs, FakeHost};
use proxy_wasm::types::Action;
use registry_guard::metrics::Metrics;
use registry_guard::{DeniedBody, HeldReply, LocalReply, RegistryHttp};
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;

fn guard() -> Rc<RefCell<Guard>> {
    Rc::new(RefCell::new(Guard::new(FilterConfig::from_json(registry_config(1).to_string().as_bytes()).unwrap())))
}

/// The requests the filter refuses, and why: (method, path, authorization, refused with).
fn refusals() -> Vec<(&'static str, &'static str, Option<String>, u16)> {
    vec![
        ("GET", "/v2/", None, 401),
        ("PUT", "/v2/acme/web/app/manifests/v1", Some(bearer_signed_by(1, &["pull"])), 401),
        ("GET", "/v2/acme/web/app/manifests/v1", Some("Bearer forged".into()), 401),
        ("GET", "/v2/acme/web/app/../x/manifests/v1", Some(bearer_signed_by(1, &["pull"])), 400),
    ]
}

fn request(method: &str, path: &str, authorization: Option<&str>, fail_reply: bool) -> FakeHost {
    let mut host = FakeHost { fail_reply, ..FakeHost::request(method, path) };
    if let Some(a) = authorization {
        host.headers.push(("authorization".into(), a.into()));
    }
    host
}

#[test]
fn a_refusal_answered_at_the_headers_pauses_only_when_its_reply_was_sent() {
    let guard = guard();
    for (method, path, auth, status) in refusals() {
        // The reply goes out: the request stays stopped (the local reply ends it).
        let mut host = request(method, path, auth.as_deref(), false);
        let mut http = RegistryHttp::new(1, Some(guard.clone()), None);
        assert_eq!(http.request_headers(&mut host, true), Action::Pause, "{method} {path}");
        assert_eq!(host.replies[0].0, status, "{method} {path}");
        // It cannot: on at once, unmarked.
        take_logs();
        let mut host = request(method, path, auth.as_deref(), true);
        let mut http = RegistryHttp::new(1, Some(guard.clone()), None);
        assert_eq!(http.request_headers(&mut host, true), Action::Continue, "{method} {path}");
        assert_eq!(host.header("x-registry-guard-decision"), None, "{method} {path}");
        assert!(!http.holds_refusal());
        let logs = take_logs();
        assert!(
            logs.iter()
                .any(|l| l.contains("cannot send local reply: `proxy_send_local_response` returned InternalFailure")),
            "{logs:?}"
        );
    }
}

#[test]
fn an_internal_error_whose_503_cannot_be_sent_goes_on_unmarked() {
    let mut host = FakeHost { metric_names: Vec::new(), ..FakeHost::default() };
    let metrics = Rc::new(Metrics::define(&mut host).unwrap());
    // Unconfigured, and headers unreadable: both are 503s the host cannot send.
    for (guard, fail_headers) in [(None, false), (Some(guard()), true)] {
        host.new_request("GET", "/v2/");
        host.fail_headers = fail_headers;
        host.fail_reply = true;
        let mut http = RegistryHttp::new(1, guard, Some(metrics.clone()));
        assert_eq!(http.request_headers(&mut host, true), Action::Continue);
        assert_eq!(host.header("x-registry-guard-decision"), None);
    }
    assert_eq!(host.metric("registry_guard.requests_failed_total"), 2);
}

#[test]
fn a_held_refusal_whose_reply_cannot_be_sent_goes_on_at_the_end_of_the_body() {
    let guard = guard();
    for (method, path, auth, _) in refusals() {
        let mut host = request(method, path, auth.as_deref(), true);
        let mut http = RegistryHttp::new(1, Some(guard.clone()), None);
        // The body follows: the refusal is held, nothing sent yet, the request stopped.
        assert_eq!(http.request_headers(&mut host, false), Action::Pause, "{method} {path}");
        assert!(http.holds_refusal());
        host.body = vec![b'x'; 100];
        assert_eq!(http.request_body(&mut host, 100, false), Action::Pause);
        // The body ends; the reply cannot be sent: on at once, unmarked.
        assert_eq!(http.request_body(&mut host, 100, true), Action::Continue, "{method} {path}");
        assert!(!http.holds_refusal());
        assert!(host.replies.is_empty());
        assert_eq!(host.header("x-registry-guard-decision"), None, "{method} {path}");
    }
    // Unconfigured, with a body: the same.
    let mut host = request("PUT", "/v2/acme/web/app/blobs/uploads/x", None, true);
    let mut http = RegistryHttp::new(1, None, None);
    assert_eq!(http.request_headers(&mut host, false), Action::Pause);
    assert_eq!(http.request_body(&mut host, 0, true), Action::Continue);
    assert_eq!(host.header("x-registry-guard-decision"), None);
}

#[test]
fn a_held_refusal_past_its_drain_limit_fails_closed_at_once() {
    // Over the cap the reply goes out before the body ends; if it cannot, the request goes
    // on unmarked right then, not at the end of a body that may never end.
    let reply = LocalReply { status: 401, headers: vec![], body: "{}".into() };
    let mut held = DeniedBody::new(reply.clone(), 10);
    let mut host = FakeHost { fail_reply: true, body: vec![0; 64], ..FakeHost::default() };
    assert_eq!(held.on_body(&mut host, 1, 8, false), HeldReply::Waiting);
    assert_eq!(held.on_body(&mut host, 1, 8, false), HeldReply::Unsent);
    let mut held = DeniedBody::new(reply, 10);
    let mut host = FakeHost { body: vec![0; 64], ..FakeHost::default() };
    assert_eq!(held.on_body(&mut host, 1, 16, false), HeldReply::Sent);
    assert_eq!(host.replies[0].1, vec![("connection".to_owned(), "close".to_owned())]);
}

#[test]
fn an_allowed_request_that_cannot_be_marked_is_refused() {
    // Marking is the positive decision: if the host cannot add the header, the request is
    // refused (503); if even that reply fails, it goes on unmarked.
    let auth = bearer_signed_by(1, &["pull"]);
    for (fail_reply, action) in [(false, Action::Pause), (true, Action::Continue)] {
        let mut host = request("GET", "/v2/acme/web/app/manifests/v1", Some(&auth), fail_reply);
        host.fail_set_header = true;
        let mut http = RegistryHttp::new(1, Some(guard()), None);
        assert_eq!(http.request_headers(&mut host, true), action);
        assert_eq!(host.replies.iter().map(|r| r.0).collect::<Vec<_>>(), if fail_reply { vec![] } else { vec![503] });
        assert_eq!(host.header("x-registry-guard-decision"), None);
    }
}
