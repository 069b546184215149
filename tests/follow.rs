//! Following a bundle source in the root context, against a fake host: the fetch on the tick,
//! activation of a newer bundle, refusal of older or forged ones (the active bundle stays),
//! failures, staleness failing closed, and a later configuration starting from the bundle
//! this Envoy fetched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::rc::Rc;
use std::time::Duration;

use fake::{bearer_signed_by, registry_config, take_logs, FakeHost, Shared, NOW};
use proxy_wasm::types::Action;
use registry_guard::{GuardRoot, HttpFilter, Vm};
use registry_guard_core::token::testing::{es256_key, jwks};

const OPERATOR: u8 = 7;

fn bundle(revision: u64, key: u8) -> String {
    let json = serde_json::json!({"revision": revision, "protection_rules": []}).to_string();
    registry_guard_core::policy::bundle::sign(&json, &es256_key(key)).unwrap()
}

fn following_config(boot_revision: u64) -> serde_json::Value {
    let mut c = registry_config(1);
    c["bundle"] = bundle(boot_revision, OPERATOR).into();
    c["bundle_keys"] = jwks(&[&es256_key(OPERATOR)]);
    c["bundle_source"] = serde_json::json!({
        "cluster": "token_service", "token": "read-token", "poll_seconds": 10, "max_staleness_seconds": 30,
        "max_bytes": 100000
    });
    c
}

fn configured(shared: &Shared, boot_revision: u64) -> (GuardRoot, FakeHost) {
    let mut host = FakeHost::default().with_configuration(&following_config(boot_revision)).with_shared(shared);
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut host));
    (root, host)
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

fn pull(root: &GuardRoot, host: &mut FakeHost) -> (Action, Option<u16>) {
    host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    host.headers.push(("authorization".into(), bearer_signed_by(1, &["pull"])));
    let HttpFilter::Registry(mut http) = root.http_context(9) else { panic!("events role") };
    let action = http.request_headers(host, true);
    (action, host.replies.first().map(|r| r.0))
}

#[test]
fn fetches_on_the_tick_and_activates_a_newer_bundle() {
    let shared = Shared::default();
    let (root, mut host) = configured(&shared, 1);
    assert!(host.calls.is_empty(), "nothing is dispatched while configuring");
    root.tick(&mut host);
    let (cluster, headers, timeout) = host.calls[0].clone();
    assert_eq!(cluster, "token_service");
    let h = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!((h(":method"), h(":path"), h(":authority")), (Some("GET"), Some("/bundle"), Some("token_service")));
    assert_eq!(h("authorization"), Some("Bearer read-token"));
    assert_eq!(timeout, Duration::from_secs(10));
    root.tick(&mut host);
    assert_eq!(host.calls.len(), 1, "one fetch in flight at a time");

    take_logs();
    answer(&root, &mut host, Some(200), Some("\"e2\""), Some(&bundle(2, OPERATOR)));
    assert_eq!(host.metric("registry_guard.bundle_revision"), 2);
    assert_eq!(host.metric("registry_guard.bundle_fetch.changed"), 1);
    assert!(take_logs().iter().any(|l| l.contains("bundle revision 2 fetched from the source and activated")));
    assert_eq!(pull(&root, &mut host).0, Action::Continue, "decisions go on under the new revision");

    // The next poll is conditional, after the (jittered) period.
    root.tick(&mut host);
    assert_eq!(host.calls.len(), 1);
    advance(&mut host, 13);
    root.tick(&mut host);
    let (_, headers, _) = host.calls[1].clone();
    assert!(headers.contains(&("if-none-match".into(), "\"e2\"".into())), "{headers:?}");
    answer(&root, &mut host, Some(304), Some("\"e2\""), None);
    assert_eq!(host.metric("registry_guard.bundle_fetch.not_modified"), 1);

    // A later configuration of this Envoy (say a key rotation, carrying the boot bundle 1)
    // starts from the fetched revision 2, not from its configured fallback.
    let (_again, host2) = configured(&shared, 1);
    assert_eq!(host2.metric("registry_guard.bundle_revision"), 2);
}

#[test]
fn older_forged_or_broken_bundles_are_refused_and_the_active_one_stays() {
    let (root, mut host) = configured(&Shared::default(), 5);
    let mut t = 0;
    for (body, status, label) in [
        (Some(bundle(4, OPERATOR)), 200, "revision"),
        (Some(bundle(9, 99)), 200, "signature"),
        (Some("not a jws".to_owned()), 200, "signature"),
        (None, 500, "status"),
    ] {
        t += 400;
        advance(&mut host, t);
        root.tick(&mut host);
        take_logs();
        answer(&root, &mut host, Some(status), Some("\"x\""), body.as_deref());
        assert!(host.metric(&format!("registry_guard.bundle_fetch_rejected.{label}")) >= 1, "{label}");
        assert_eq!(host.metric("registry_guard.bundle_revision"), 5, "{label}: the active bundle stays");
        assert!(take_logs().iter().any(|l| l.contains("the active bundle stays")), "{label}");
    }
    // Oversized: the body is not even read.
    advance(&mut host, 400);
    root.tick(&mut host);
    host.call_response_headers = vec![(":status".into(), "200".into())];
    host.call_response_body = None;
    let token = host.calls.len() as u32;
    root.fetched(&mut host, token, 100_001);
    assert_eq!(host.metric("registry_guard.bundle_fetch_rejected.size"), 1);
    // An answer to a call this root did not make is ignored.
    root.fetched(&mut host, 9999, 0);
    assert_eq!(host.metric("registry_guard.bundle_revision"), 5);
}

#[test]
fn a_silent_source_past_max_staleness_fails_closed_until_it_answers() {
    let (root, mut host) = configured(&Shared::default(), 1);
    root.tick(&mut host);
    answer(&root, &mut host, None, None, None); // the call failed: no headers
    assert_eq!(host.metric("registry_guard.bundle_fetch.failed"), 1);
    assert_eq!(host.metric("registry_guard.bundle_fetch_rejected.unreachable"), 1);
    assert_eq!(pull(&root, &mut host).0, Action::Continue, "within max_staleness decisions go on");

    // 31 s without a successful fetch: every request is refused (503), never marked allowed.
    advance(&mut host, 31);
    take_logs();
    root.tick(&mut host);
    assert!(take_logs().iter().any(|l| l.contains("policy stale")));
    assert_eq!(host.metric("registry_guard.bundle_fetch.stale"), 1);
    let (action, status) = pull(&root, &mut host);
    assert_eq!((action, status), (Action::Pause, Some(503)));
    assert_eq!(host.header("x-registry-guard-decision"), None);
    assert!(host.replies[0].2.contains("UNAVAILABLE"), "{:?}", host.replies[0]);

    // The retry went out on that tick (after the backoff); the source answers again:
    // decisions resume at the next tick.
    assert_eq!(host.calls.len(), 2, "a retry is due after the backoff");
    answer(&root, &mut host, Some(304), None, None);
    root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.bundle_fetch.stale"), 0);
    assert_eq!(pull(&root, &mut host).0, Action::Continue);
}

#[test]
fn a_dispatch_that_cannot_start_is_a_failed_fetch() {
    let (root, mut host) = configured(&Shared::default(), 1);
    host.fail_dispatch = true;
    take_logs();
    root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.bundle_fetch.failed"), 1);
    assert!(take_logs().iter().any(|l| l.contains("is `token_service` an Envoy cluster?")));
}

#[test]
fn bundle_source_needs_bundle_keys_and_sane_settings() {
    let mut c = following_config(1);
    c.as_object_mut().unwrap().remove("bundle");
    c.as_object_mut().unwrap().remove("bundle_keys");
    let mut host = FakeHost::default().with_configuration(&c);
    take_logs();
    assert!(!GuardRoot::new(Rc::new(Vm::default())).configure(&mut host));
    assert!(take_logs().iter().any(|l| l.contains("$.bundle_keys: required when `bundle_source` is set")));
    let mut c = following_config(1);
    c["bundle_source"]["max_staleness_seconds"] = 2.into();
    let mut host = FakeHost::default().with_configuration(&c);
    assert!(!GuardRoot::new(Rc::new(Vm::default())).configure(&mut host));
    assert!(take_logs().iter().any(|l| l.contains("$.bundle_source.max_staleness_seconds")));
}

fn bundle_for(revision: u64, key: u8, environment: &str) -> String {
    let json =
        serde_json::json!({"revision": revision, "environment": environment, "protection_rules": []}).to_string();
    registry_guard_core::policy::bundle::sign(&json, &es256_key(key)).unwrap()
}

fn oci_root(shared: &Shared, boot_revision: u64) -> (GuardRoot, FakeHost) {
    let mut c = following_config(boot_revision);
    c["environment"] = "prod".into();
    c["bundle"] = bundle_for(boot_revision, OPERATOR, "prod").into();
    c["bundle_source"] = serde_json::json!({
        "cluster": "registry_direct", "authority": "registry", "poll_seconds": 10, "max_bytes": 100000,
        "oci": {"repository": "registry-guard/policy", "reference": "prod"}
    });
    let mut host = FakeHost::default().with_configuration(&c).with_shared(shared);
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut host), "{:?}", take_logs());
    (root, host)
}

fn header<'a>(call: &'a (String, Vec<(String, String)>, Duration), name: &str) -> Option<&'a str> {
    call.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// One OCI fetch: the tick sends the manifest request, the manifest answer leads to the blob
/// request, and `blob` answers it. Returns the number of calls made.
fn oci_fetch(root: &GuardRoot, host: &mut FakeHost, bundle: &str, blob: &[u8], etag: &str) -> usize {
    let before = host.calls.len();
    root.tick(host);
    assert_eq!(host.calls.len(), before + 1, "the manifest request is due");
    let call = host.calls.last().unwrap().clone();
    assert_eq!(call.0, "registry_direct");
    assert_eq!(header(&call, ":path"), Some("/v2/registry-guard/policy/manifests/prod"));
    assert_eq!(header(&call, ":authority"), Some("registry"));
    assert_eq!(header(&call, "accept"), Some("application/vnd.oci.image.manifest.v1+json"));
    let manifest = registry_guard_core::policy::oci::manifest_for(bundle.as_bytes(), "bundle.jws").to_string();
    answer(root, host, Some(200), Some(etag), Some(&manifest));
    if host.calls.len() == before + 2 {
        let call = host.calls.last().unwrap().clone();
        let digest = registry_guard_core::policy::oci::sha256_digest(bundle.as_bytes());
        assert_eq!(header(&call, ":path"), Some(format!("/v2/registry-guard/policy/blobs/{digest}").as_str()));
        host.call_response_headers = vec![(":status".into(), "200".into())];
        host.call_response_body = Some(blob.to_vec());
        let token = host.calls.len() as u32;
        root.fetched(host, token, blob.len());
    }
    host.calls.len() - before
}

#[test]
fn follows_an_oci_artifact_manifest_then_blob_then_304() {
    let shared = Shared::default();
    let (root, mut host) = oci_root(&shared, 1);
    let b2 = bundle_for(2, OPERATOR, "prod");
    take_logs();
    assert_eq!(oci_fetch(&root, &mut host, &b2, b2.as_bytes(), "\"sha256:m2\""), 2);
    assert_eq!(host.metric("registry_guard.bundle_revision"), 2);
    assert_eq!(host.metric("registry_guard.bundle_fetch.changed"), 1);
    assert!(take_logs().iter().any(|l| l.contains("bundle revision 2 fetched from the source and activated")));
    assert_eq!(pull(&root, &mut host).0, Action::Continue);
    // Unchanged tag: one conditional manifest request, 304, no blob request.
    advance(&mut host, 13);
    root.tick(&mut host);
    assert_eq!(header(host.calls.last().unwrap(), "if-none-match"), Some("\"sha256:m2\""));
    let n = host.calls.len();
    answer(&root, &mut host, Some(304), None, None);
    assert_eq!(host.calls.len(), n, "no blob request after a 304");
    assert_eq!(host.metric("registry_guard.bundle_fetch.not_modified"), 1);
    // A later configuration starts from the fetched bundle.
    let (_again, host2) = oci_root(&shared, 1);
    assert_eq!(host2.metric("registry_guard.bundle_revision"), 2);
}

#[test]
fn hostile_oci_artifacts_are_refused_and_the_active_bundle_stays() {
    let (root, mut host) = oci_root(&Shared::default(), 5);
    let good = bundle_for(6, OPERATOR, "prod");
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (good.clone(), tampered, "artifact"),
        (good.clone(), good.as_bytes()[..good.len() - 10].to_vec(), "artifact"),
        (bundle_for(4, OPERATOR, "prod"), bundle_for(4, OPERATOR, "prod").into_bytes(), "revision"),
        (bundle_for(7, 99, "prod"), bundle_for(7, 99, "prod").into_bytes(), "signature"),
        (bundle_for(8, OPERATOR, "staging"), bundle_for(8, OPERATOR, "staging").into_bytes(), "environment"),
    ];
    for (i, (declared, blob, label)) in cases.into_iter().enumerate() {
        advance(&mut host, 13); // a refusal is polled again at the normal pace (≤ 12 s)
        take_logs();
        oci_fetch(&root, &mut host, &declared, &blob, &format!("\"sha256:m{i}\""));
        assert_eq!(
            host.metric(&format!("registry_guard.bundle_fetch_rejected.{label}")),
            if label == "artifact" { i as u64 + 1 } else { 1 },
            "{label}"
        );
        assert_eq!(host.metric("registry_guard.bundle_revision"), 5, "{label}: the active bundle stays");
        assert!(take_logs().iter().any(|l| l.contains("the active bundle stays")), "{label}");
        assert_eq!(pull(&root, &mut host).0, Action::Continue, "{label}: decisions go on");
    }
    assert_eq!(host.metric("registry_guard.bundle_fetch.refused"), 5);
    assert_eq!(host.metric("registry_guard.bundle_fetch.changed"), 0);
    // Fail closed throughout: a request without a token is still refused.
    host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    let HttpFilter::Registry(mut http) = root.http_context(10) else { panic!("events role") };
    assert_eq!(http.request_headers(&mut host, true), Action::Pause);
    assert_eq!(host.replies.first().map(|r| r.0), Some(401));
}

#[test]
fn a_wrong_artifact_type_is_refused_before_any_blob_is_fetched() {
    let (root, mut host) = oci_root(&Shared::default(), 1);
    root.tick(&mut host);
    let mut m = registry_guard_core::policy::oci::manifest_for(b"x", "b");
    m["artifactType"] = "application/vnd.cncf.helm.config.v1+json".into();
    take_logs();
    answer(&root, &mut host, Some(200), Some("\"h\""), Some(&m.to_string()));
    assert_eq!(host.calls.len(), 1, "no blob request");
    assert_eq!(host.metric("registry_guard.bundle_fetch_rejected.artifact"), 1);
    assert!(take_logs().iter().any(|l| l.contains("application/vnd.cncf.helm.config.v1+json")));
}

#[test]
fn a_token_service_source_that_truncates_is_slow_or_names_another_environment_is_refused() {
    let mut c = following_config(3);
    c["environment"] = "prod".into();
    c["bundle"] = bundle_for(3, OPERATOR, "prod").into();
    let mut host = FakeHost::default().with_configuration(&c);
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut host));
    let next = bundle_for(4, OPERATOR, "prod");
    let staging = bundle_for(4, OPERATOR, "staging");
    for (body, label) in [(&next[..next.len() - 7], "signature"), (staging.as_str(), "environment")] {
        advance(&mut host, 400);
        root.tick(&mut host);
        answer(&root, &mut host, Some(200), None, Some(body));
        assert_eq!(host.metric(&format!("registry_guard.bundle_fetch_rejected.{label}")), 1, "{label}");
        assert_eq!(host.metric("registry_guard.bundle_revision"), 3, "{label}");
    }
    // Slow: the call is bounded by timeout_seconds and Envoy delivers a timed-out call without
    // headers; it counts as unreachable and the active bundle stays.
    advance(&mut host, 400);
    root.tick(&mut host);
    assert_eq!(host.calls.last().unwrap().2, Duration::from_secs(10));
    answer(&root, &mut host, None, None, None);
    assert_eq!(host.metric("registry_guard.bundle_fetch_rejected.unreachable"), 1);
    assert_eq!(host.metric("registry_guard.bundle_revision"), 3);
}

/// The bundle audit records among `logs`, parsed.
fn bundle_records(logs: &[String]) -> Vec<serde_json::Value> {
    logs.iter()
        .filter_map(|l| l.find(r#"{"audit":"registry-guard""#).map(|i| &l[i..]))
        .map(|j| serde_json::from_str::<serde_json::Value>(j).unwrap_or_else(|e| panic!("not JSON ({e}): {j}")))
        .filter(|v| v["event"] == "bundle")
        .collect()
}

/// A bundle record's (decision, action, source, revision, revision_old, revision_new).
type RecordFields = (String, String, String, Option<u64>, Option<u64>, Option<u64>);

/// The one bundle record among `logs`, and its fields.
fn one_record(logs: &[String]) -> (serde_json::Value, RecordFields) {
    let records = bundle_records(logs);
    assert_eq!(records.len(), 1, "one bundle record: {logs:#?}");
    let r = records[0].clone();
    assert!(r["event_id"].as_str().is_some_and(|id| id.len() == 32), "{r}");
    assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    let fields = (
        s("decision"),
        s("action"),
        s("source"),
        r["revision"].as_u64(),
        r["revision_old"].as_u64(),
        r["revision_new"].as_u64(),
    );
    (r, fields)
}

fn text(s: &str) -> String {
    s.to_owned()
}

#[test]
fn every_bundle_activated_or_refused_writes_one_audit_record() {
    let shared = Shared::default();
    let vm = Rc::new(Vm::default());
    let configure = |vm: &Rc<Vm>, config: &serde_json::Value| {
        let mut host = FakeHost::default().with_configuration(config).with_shared(&shared);
        let mut root = GuardRoot::new(Rc::clone(vm));
        let ok = root.configure(&mut host);
        (root, host, ok)
    };
    take_logs();
    let (root, mut host, ok) = configure(&vm, &following_config(1));
    assert!(ok);
    let (r, fields) = one_record(&take_logs());
    assert_eq!(fields, (text("allow"), text("configure"), text("configuration"), Some(1), None, Some(1)), "{r}");
    assert_eq!(r["endpoint"], "registry");
    assert!(r["reason"].is_null(), "{r}");

    // Fetched from the source: activated, then an older and a forged one refused.
    root.tick(&mut host);
    answer(&root, &mut host, Some(200), Some("\"e2\""), Some(&bundle(2, OPERATOR)));
    let (r, fields) = one_record(&take_logs());
    assert_eq!(fields, (text("allow"), text("follow"), text("token_service/bundle"), Some(2), Some(1), Some(2)), "{r}");
    advance(&mut host, 400);
    root.tick(&mut host);
    answer(&root, &mut host, Some(200), Some("\"e1\""), Some(&bundle(1, OPERATOR)));
    let (r, fields) = one_record(&take_logs());
    assert_eq!(fields, (text("deny"), text("follow"), text("token_service/bundle"), Some(2), Some(2), Some(1)), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("rollback refused"), "{r}");
    advance(&mut host, 400);
    root.tick(&mut host);
    let forged = bundle(9, 99);
    answer(&root, &mut host, Some(200), Some("\"e9\""), Some(&forged));
    let logs = take_logs();
    let (r, fields) = one_record(&logs);
    // A bundle refused before its signature is verified: its revision is not trusted, not written.
    assert_eq!(fields, (text("deny"), text("follow"), text("token_service/bundle"), Some(2), Some(2), None), "{r}");
    assert!(!r["reason"].as_str().unwrap().is_empty(), "{r}");
    assert!(!logs.iter().any(|l| l.contains(&forged[..40])), "the bundle itself is never logged");
    println!("forged bundle refused: {r}");
    // Unchanged (304, or the same revision again) and failed fetches are not bundle changes.
    advance(&mut host, 400);
    root.tick(&mut host);
    answer(&root, &mut host, Some(304), Some("\"e2\""), None);
    advance(&mut host, 400);
    root.tick(&mut host);
    answer(&root, &mut host, None, None, None);
    assert!(bundle_records(&take_logs()).is_empty());

    // A later configuration of this VM that starts from the revision it enforces: no record.
    let (_again, _, ok) = configure(&vm, &following_config(1));
    assert!(ok);
    assert!(bundle_records(&take_logs()).is_empty());
    // Another VM of this Envoy starts from the bundle fetched earlier.
    let (_other, _, ok) = configure(&Rc::new(Vm::default()), &following_config(1));
    assert!(ok);
    let (r, fields) = one_record(&take_logs());
    assert_eq!(fields, (text("allow"), text("configure"), text("fetched_earlier"), Some(2), None, Some(2)), "{r}");
    // A refused configuration: a refused bundle; what stays cannot be told from it.
    let mut bad = following_config(3);
    bad["bundle"] = bundle(3, 99).into();
    let (_refused, _, ok) = configure(&vm, &bad);
    assert!(!ok);
    let (r, fields) = one_record(&take_logs());
    assert_eq!(fields, (text("deny"), text("configure"), text("configuration"), None, None, None), "{r}");
    assert!(r["reason"].as_str().unwrap().contains("bundle"), "{r}");
    assert!(r["endpoint"].is_null(), "{r}");
}
