//! The cached allow path's host calls, counted against the fake host: what each request in
//! front of the registry costs besides the decision itself (bench/README.md, "per-host-call
//! method": a host call costs 1–3 µs in Envoy, the cached decision about 5 µs in V8).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::cell::RefCell;
use std::time::Duration;

use registry_guard::host::HostCall;

use registry_guard::metrics::{Metrics, DECISION_TIME_SAMPLE_EVERY};
use registry_guard::{on_request_headers, Outcome};
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;

mod fake;

use fake::FakeHost;

const KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

/// The filter as shipped (`rgctl filter-config`): attribution sealed, client address from
/// `X-Forwarded-For`.
fn shipped_guard() -> RefCell<Guard> {
    let mut cfg = fake::registry_config(1);
    cfg["attribution"] = serde_json::json!({"key": KEY});
    cfg["correlation"] = serde_json::json!({"client_address": "x-forwarded-for"});
    RefCell::new(Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap()))
}

/// A request as Envoy hands it to the filter (`use_remote_address: true` appended the peer).
fn request(method: &str, path: &str, token: &str, xff: &str) -> FakeHost {
    FakeHost::request(method, path)
        .with_header(":authority", "registry.example")
        .with_header("authorization", token)
        .with_header("user-agent", "containerd/1.7.24")
        .with_header("accept", "application/vnd.oci.image.manifest.v1+json")
        .with_header("x-forwarded-for", xff)
        .with_header("x-forwarded-proto", "http")
        .with_header("x-request-id", "4b1a8f0e-5d0c-4a57-9a8e-7f1f0c0f1a2b")
}

/// The host calls of the second (cached) request of a token, after the first has sealed the
/// attribution and filled the token cache.
fn cached_calls(method: &str, path: &str, actions: &[&str], xff: &str) -> (Outcome, Vec<HostCall>, FakeHost) {
    let guard = shipped_guard();
    let token = fake::bearer_signed_by(1, actions);
    let mut setup = FakeHost::default();
    let metrics = Metrics::define(&mut setup).unwrap();
    let mut first = request(method, path, &token, xff);
    assert_eq!(on_request_headers(&mut first, 1, Some(&guard), Some(&metrics)), Outcome::Allowed);
    let mut host = request(method, path, &token, xff);
    let outcome = on_request_headers(&mut host, 2, Some(&guard), Some(&metrics));
    assert_eq!(guard.borrow().cache.hits, 1, "the second request is a cache hit");
    (outcome, std::mem::take(&mut host.host_calls), host)
}

#[test]
fn a_cached_pull_reads_the_headers_and_the_clock_and_writes_two_headers() {
    // The client sent no X-Forwarded-For: Envoy's (the peer alone) is what the registry must
    // see, so it is left as it is.
    let (outcome, calls, host) = cached_calls(
        "GET",
        "/v2/acme/web/app/blobs/sha256:4c7e0f1a0b6b7c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b",
        &["pull"],
        "10.1.2.3",
    );
    assert_eq!(outcome, Outcome::Allowed);
    assert_eq!(
        calls,
        [HostCall::CurrentTime, HostCall::RequestHeaders, HostCall::SetRequestHeader, HostCall::SetRequestHeader]
    );
    assert_eq!(host.header("x-forwarded-for"), Some("10.1.2.3"));
    assert_eq!(host.header("x-registry-guard-decision"), Some("allow"));
    assert!(host.header("user-agent").unwrap().starts_with("registry-guard/1 "));
}

#[test]
fn a_client_sent_forwarded_for_still_costs_its_rewrite() {
    let (outcome, calls, host) = cached_calls("GET", "/v2/acme/web/app/manifests/v1", &["pull"], "6.6.6.6, 10.1.2.3");
    assert_eq!(outcome, Outcome::Allowed);
    assert_eq!(calls.iter().filter(|c| **c == HostCall::SetRequestHeader).count(), 3, "{calls:?}");
    assert_eq!(host.header("x-forwarded-for"), Some("10.1.2.3"), "the client's entry never reaches the registry");
}

#[test]
fn a_cached_push_by_tag_adds_only_its_audit_line() {
    fake::take_logs();
    let (outcome, calls, _) = cached_calls("PUT", "/v2/acme/web/app/manifests/v1", &["pull", "push"], "10.1.2.3");
    assert_eq!(outcome, Outcome::Allowed);
    // An allowed write is audited: one log line (a host call of its own in Envoy) naming the
    // downstream peer (`source.address`, one property read); its id needs no host call.
    assert_eq!(
        calls,
        [
            HostCall::CurrentTime,
            HostCall::RequestHeaders,
            HostCall::ClientAddress,
            HostCall::SetRequestHeader,
            HostCall::SetRequestHeader
        ]
    );
    let logs = fake::take_logs();
    let audits: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| l.strip_prefix("WARN "))
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|a: &serde_json::Value| a["audit"] == "registry-guard")
        .collect();
    assert_eq!(audits.len(), 2, "one audit line per allowed write: {logs:?}");
    assert_eq!(audits[1]["client"], "127.0.0.1:40000");
    // Event ids from the per-VM generator: 128 bits of hex, never repeated.
    let ids: Vec<&str> = audits.iter().map(|a| a["event_id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn one_request_in_sixteen_is_timed_into_the_decision_time_histogram() {
    let guard = shipped_guard();
    let token = fake::bearer_signed_by(1, &["pull"]);
    let mut setup = FakeHost::default();
    let metrics = Metrics::define(&mut setup).unwrap();
    let histogram = setup.metric_names.iter().position(|n| n == "registry_guard.decision_time_microseconds").unwrap();
    assert_eq!(setup.metric_kinds[histogram], registry_guard::host::MetricType::Histogram);
    let mut timed = 0;
    let n = 3 * DECISION_TIME_SAMPLE_EVERY as usize;
    for i in 0..n {
        let path = if i % 2 == 0 { "/v2/acme/web/app/manifests/v1" } else { "/v2/other/repo/manifests/v1" };
        let mut host = request("GET", path, &token, "10.1.2.3");
        // The clock moves 7 µs while the filter works on a timed request.
        host.clock_step = Duration::from_micros(7);
        on_request_headers(&mut host, i as u32, Some(&guard), Some(&metrics));
        let records: Vec<_> = host.records.iter().filter(|(id, _)| *id as usize == histogram).collect();
        let reads = host.host_calls.iter().filter(|c| **c == HostCall::CurrentTime).count();
        if i % DECISION_TIME_SAMPLE_EVERY as usize == 0 {
            assert_eq!((records.len(), reads), (1, 2), "request {i} is timed (allowed and denied alike)");
            assert_eq!(records[0].1, 7, "microseconds");
            timed += 1;
        } else {
            assert_eq!((records.len(), reads), (0, 1), "request {i} is not timed");
        }
    }
    assert_eq!(timed, 3);
}

/// For instruction counts of the glue (no host), e.g.
/// `RG_HOT_PATH_N=20000 valgrind --tool=callgrind target/debug/deps/hot_path-… --ignored --exact cached_pull_loop`,
/// run twice with different `RG_HOT_PATH_N`: the difference divided by the difference of N
/// is the cost of one cached request.
#[test]
#[ignore]
fn cached_pull_loop() {
    let n: usize = std::env::var("RG_HOT_PATH_N").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let guard = shipped_guard();
    let token = fake::bearer_signed_by(1, &["pull"]);
    let mut setup = FakeHost::default();
    let metrics = Metrics::define(&mut setup).unwrap();
    let template = request(
        "GET",
        "/v2/acme/web/app/blobs/sha256:4c7e0f1a0b6b7c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b",
        &token,
        "10.1.2.3",
    );
    for i in 0..n {
        let mut host = FakeHost { headers: template.headers.clone(), ..FakeHost::default() };
        assert_eq!(on_request_headers(&mut host, i as u32, Some(&guard), Some(&metrics)), Outcome::Allowed);
    }
}
