//! Following a keys source (`keys_source`, a JWKS URL) in the root context, against a fake
//! host: no inline keys → every request refused until the first good JWKS; the fetch on the
//! tick, conditional with the ETag; a bad, oversized, empty or unreachable answer keeps the
//! keys in force; a new set swaps at once, cached tokens of a removed key included; a later
//! configuration starts from the keys this Envoy fetched; forged and anonymous requests are
//! refused throughout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::rc::Rc;
use std::time::Duration;

use fake::{bearer_signed_by, registry_config, FakeHost, Shared, NOW};
use registry_guard::keys_follow::fetched_jwks_key;
use registry_guard::{GuardRoot, HttpFilter, Vm};
use registry_guard_core::token::testing::{es256_key, jwks};

fn keys_config(inline: bool) -> serde_json::Value {
    let mut c = registry_config(1);
    if !inline {
        c.as_object_mut().unwrap().remove("jwks");
    }
    c["keys_source"] = serde_json::json!({"cluster": "token_service", "refresh_seconds": 5, "max_bytes": 2000});
    c
}

fn configured(shared: &Shared, config: &serde_json::Value) -> (GuardRoot, FakeHost) {
    let mut host = FakeHost::default().with_configuration(config).with_shared(shared);
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut host));
    (root, host)
}

fn doc(keys: &[u8]) -> String {
    let ks: Vec<_> = keys.iter().map(|k| es256_key(*k)).collect();
    jwks(&ks.iter().collect::<Vec<_>>()).to_string()
}

/// Delivers an answer to the last dispatched call.
fn answer(root: &GuardRoot, host: &mut FakeHost, status: Option<u16>, etag: Option<&str>, body: Option<&str>) {
    host.call_response_headers.clear();
    if let Some(s) = status {
        host.call_response_headers.push((":status".into(), s.to_string()));
    }
    if let Some(e) = etag {
        host.call_response_headers.push(("etag".into(), e.into()));
    }
    host.call_response_body = body.map(|b| b.as_bytes().to_vec());
    let token = host.calls.len() as u32;
    root.fetched(host, token, body.map_or(0, str::len));
}

fn advance(host: &mut FakeHost, seconds: u64) {
    let now = host.clock.unwrap_or(Duration::from_secs(NOW as u64));
    host.clock = Some(now + Duration::from_secs(seconds));
}

/// Status of a pull with `authorization` (200: allowed).
fn pull(root: &GuardRoot, host: &mut FakeHost, authorization: Option<String>) -> u16 {
    host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    if let Some(a) = authorization {
        host.headers.push(("authorization".into(), a));
    }
    let HttpFilter::Registry(mut http) = root.http_context(9) else { panic!("events role") };
    let _ = http.request_headers(host, true);
    host.replies.first().map_or(200, |r| r.0)
}

/// Allowed with key `k`'s token; forged (key 9) and anonymous refused.
fn trusts(root: &GuardRoot, host: &mut FakeHost, k: u8) -> bool {
    assert_ne!(pull(root, host, Some(bearer_signed_by(9, &["pull"]))), 200, "forged token allowed");
    assert_ne!(pull(root, host, None), 200, "anonymous pull allowed");
    pull(root, host, Some(bearer_signed_by(k, &["pull"]))) == 200
}

#[test]
fn no_inline_keys_refuses_everything_until_the_first_good_jwks() {
    let shared = Shared::default();
    let (root, mut host) = configured(&shared, &keys_config(false));
    assert_eq!(pull(&root, &mut host, Some(bearer_signed_by(1, &["pull"]))), 503);
    assert_eq!(pull(&root, &mut host, None), 503);
    root.tick(&mut host);
    let (cluster, headers, timeout) = host.calls[0].clone();
    assert_eq!(cluster, "token_service");
    let h = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!((h(":path").as_deref(), h(":authority").as_deref()), (Some("/jwks"), Some("token_service")));
    assert_eq!(timeout, Duration::from_secs(5));
    // Refused answers never give keys: still everything refused.
    answer(&root, &mut host, Some(200), None, Some(r#"{"keys": []}"#));
    assert_eq!(host.metric("registry_guard.keys_fetch_rejected.no_usable_key"), 1);
    assert_eq!(pull(&root, &mut host, Some(bearer_signed_by(1, &["pull"]))), 503);
    advance(&mut host, 6);
    root.tick(&mut host);
    answer(&root, &mut host, Some(200), Some("\"v1\""), Some(&doc(&[1])));
    assert!(trusts(&root, &mut host, 1));
    assert_eq!(host.metric("registry_guard.keys_fetch.changed"), 1);
    assert_eq!(host.metric("registry_guard.keys.count"), 1);
    assert_eq!(shared.text(&fetched_jwks_key("registry")).as_deref(), Some(doc(&[1]).as_str()));
}

#[test]
fn rotation_last_known_good_and_later_configurations() {
    let shared = Shared::default();
    let (root, mut host) = configured(&shared, &keys_config(true));
    assert!(trusts(&root, &mut host, 1), "the inline boot keys decide before the first fetch");
    assert!(!trusts(&root, &mut host, 2));
    root.tick(&mut host);
    answer(&root, &mut host, Some(200), Some("\"a\""), Some(&doc(&[1])));
    assert_eq!(host.metric("registry_guard.keys_fetch.not_modified"), 1, "the same keys: nothing swapped");
    // Not due before refresh_seconds (5, jittered ±20 %).
    advance(&mut host, 3);
    root.tick(&mut host);
    assert_eq!(host.calls.len(), 1);
    advance(&mut host, 3);
    root.tick(&mut host);
    assert_eq!(host.calls.len(), 2);
    assert!(host.calls[1].1.contains(&("if-none-match".into(), "\"a\"".into())));
    answer(&root, &mut host, Some(304), Some("\"a\""), None);
    assert_eq!(host.metric("registry_guard.keys_fetch.not_modified"), 2);
    // Add key 2 (overlap): both keys trusted.
    advance(&mut host, 6);
    root.tick(&mut host);
    answer(&root, &mut host, Some(200), Some("\"b\""), Some(&doc(&[1, 2])));
    assert!(trusts(&root, &mut host, 1) && trusts(&root, &mut host, 2));
    assert_eq!(host.metric("registry_guard.keys.count"), 2);
    // Bad answers: refused by reason, the keys in force stay.
    let oversized = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(3000));
    let too_many = doc(&[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
    let cases: [(Option<u16>, Option<&str>, &str); 5] = [
        (Some(200), Some("<html>"), "registry_guard.keys_fetch_rejected.parse"),
        (Some(200), Some(oversized.as_str()), "registry_guard.keys_fetch_rejected.size"),
        // 17 keys: over max_keys (16), and over max_bytes here too, which is checked first.
        (Some(200), Some(too_many.as_str()), "registry_guard.keys_fetch_rejected.size"),
        (Some(503), None, "registry_guard.keys_fetch_rejected.status"),
        (None, None, "registry_guard.keys_fetch_rejected.unreachable"),
    ];
    for (status, body, metric) in cases {
        let before = host.metric(metric);
        // The backoff grows: tick until the next fetch is due, then answer it (tokens are valid
        // until NOW + 60: answers and pulls happen at NOW + 30).
        let calls = host.calls.len();
        for _ in 0..400 {
            advance(&mut host, 1);
            root.tick(&mut host);
            if host.calls.len() > calls {
                break;
            }
        }
        host.clock = Some(Duration::from_secs(NOW as u64 + 30));
        answer(&root, &mut host, status, None, body);
        assert_eq!(host.metric(metric), before + 1, "{metric}");
        assert!(trusts(&root, &mut host, 1) && trusts(&root, &mut host, 2), "{metric}: last known good");
    }
    assert_eq!(host.metric("registry_guard.keys_fetch.refused"), 3);
    assert_eq!(host.metric("registry_guard.keys_fetch.failed"), 2);
    // Retire key 1: its token is refused at once, though it is in the token cache.
    for _ in 0..400 {
        let calls = host.calls.len();
        advance(&mut host, 1);
        root.tick(&mut host);
        if host.calls.len() > calls {
            break;
        }
    }
    host.clock = Some(Duration::from_secs(NOW as u64 + 30));
    answer(&root, &mut host, Some(200), Some("\"c\""), Some(&doc(&[2])));
    assert!(!trusts(&root, &mut host, 1));
    assert!(trusts(&root, &mut host, 2));
    // A later configuration of this Envoy (same inline key 1) starts from the fetched set.
    let (later, mut host2) = configured(&shared, &keys_config(true));
    assert!(trusts(&later, &mut host2, 2));
    assert!(!trusts(&later, &mut host2, 1));
}
