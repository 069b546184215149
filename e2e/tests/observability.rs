//! Operators' view of decisions through real Envoy: per-decision counters in
//! `/stats/prometheus`, labelled by denial kind and rule (the `stats_tags` of
//! `envoy/envoy.yaml`), and one JSON audit line per denial, allowed write and bundle change
//! in Envoy's log, never a token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use registry_guard_e2e::Stack;

/// The value of the Prometheus series `key` (name and labels exactly as Envoy prints them,
/// e.g. `registry_guard_denied_total{kind="protected"}`, `registry_guard_requests_allowed_total{}`).
fn series(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn decisions_show_up_as_prometheus_counters_and_audit_lines() {
    let stack = Stack::start();
    // The example bundle: `web-release-tags` needs maintainer to push `v*` tags of acme/web/*.
    let example: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap(),
    )
    .unwrap();
    let bundle = stack.sign_bundle("example", &example);
    assert!(stack.push_bundle(&bundle, &[]).status.success());
    // The push's fail-closed check made requests of its own: count from here on (counters
    // are flushed every second).
    let admin = format!("http://127.0.0.1:{}/stats/prometheus", stack.admin_port);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let baseline = ureq::get(&admin).call().unwrap().into_string().unwrap();
    let delta = |text: &str, suffix: &str| -> f64 {
        series(text, suffix).unwrap_or(0.0) - series(&baseline, suffix).unwrap_or(0.0)
    };
    let push = ["repository:acme/web/app:pull,push"];
    let dev = stack.token("dev", "dev-pass", &push).unwrap();
    let mia = stack.token("mia", "mia-pass", &push).unwrap();

    // dev (developer) may not push release tags: rule `web-release-tags`.
    let r = stack.request("PUT", "/v2/acme/web/app/manifests/v1", Some(&dev));
    assert_eq!(r.status, 403, "{}", r.body);
    // The same token again (a cache hit when the same worker VM takes it).
    assert_eq!(stack.request("PUT", "/v2/acme/web/app/manifests/v2", Some(&dev)).status, 403);
    // mia (maintainer): allowed, forwarded to the registry.
    assert_eq!(stack.request("GET", "/v2/", Some(&mia)).status, 200);
    // mia writes (allowed; the registry refuses the empty manifest, but the filter let it
    // through): one `allow` audit record with the trace id of the request's `traceparent`.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let written = ureq::put(&stack.url("/v2/acme/web/app/manifests/audited"))
        .set("Authorization", &format!("Bearer {mia}"))
        .set("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))
        .set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        .send_string("{}");
    let status = match written {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, r)) => {
            assert_ne!(r.header("x-registry-guard"), Some("denied"), "the filter allowed mia's write");
            code
        }
        Err(e) => panic!("{e}"),
    };
    assert!(status >= 200, "{status}");
    // No credentials; a forged token.
    assert_eq!(stack.request("GET", "/v2/", None).status, 401);
    let forged = format!("{}.{}", &dev[..dev.rfind('.').unwrap()], "AAAA");
    assert_eq!(stack.request("GET", "/v2/acme/web/app/tags/list", Some(&forged)).status, 401);

    // Request counters are batched in each VM and flushed every second (`Metrics::flush`).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = ureq::get(&admin).call().unwrap().into_string().unwrap();
        let counted = delta(&text, "registry_guard_token_cache_hits_total{}")
            + delta(&text, "registry_guard_token_cache_misses_total{}");
        if counted >= 5.0 && delta(&text, r#"registry_guard_denied_total{kind="protected"}"#) == 2.0
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for (suffix, want) in [
        (r#"registry_guard_denied_total{kind="protected"}"#, 2.0),
        (r#"registry_guard_rule_denied_total{rule="web-release-tags"}"#, 2.0),
        ("registry_guard_protection_denied_total{}", 2.0),
        (r#"registry_guard_denied_total{kind="invalid_token"}"#, 1.0),
    ] {
        assert_eq!(delta(&text, suffix), want, "{suffix} in:\n{}", grep(&text, "registry_guard"));
    }
    // Five requests carried a bearer token; each worker VM has its own cache.
    let hits = delta(&text, "registry_guard_token_cache_hits_total{}");
    let misses = delta(&text, "registry_guard_token_cache_misses_total{}");
    assert_eq!(hits + misses, 5.0, "hits {hits}, misses {misses}");
    assert!(misses >= 3.0, "dev, mia and the forged token are each verified at least once");
    assert!(series(&text, r#"registry_guard_denied_total{kind="no_credentials"}"#).unwrap() >= 1.0);
    assert!(series(&text, "registry_guard_requests_allowed_total{}").unwrap() >= 1.0);
    assert!(series(&text, "registry_guard_bundle_revision{}").unwrap() >= 1.0);
    // No rule-specific metric names: the rule is a label, beside the harness's canary rule.
    assert!(!text.contains("registry_guard_rule_web_release_tags"), "{}", grep(&text, "registry_guard_rule"));
    assert!(
        text.contains(&format!(r#"registry_guard_rule_denied_total{{rule="{}"}}"#, registry_guard_e2e::CANARY_RULE))
    );
    // The decision-time histogram (sampled: the first decided request of each VM is timed),
    // in microseconds, with the buckets of `envoy.yaml`; Envoy merges worker histograms on its
    // stats flush (every 5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let text = ureq::get(&admin).call().unwrap().into_string().unwrap();
        if series(&text, "registry_guard_decision_time_microseconds_count{}").is_some_and(|n| n >= 1.0)
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let timed = series(&text, "registry_guard_decision_time_microseconds_count{}");
    assert!(timed.is_some_and(|n| n >= 1.0), "{}", grep(&text, "decision_time"));
    assert!(
        text.contains(r#"registry_guard_decision_time_microseconds_bucket{le="20"}"#),
        "{}",
        grep(&text, "decision_time")
    );

    // One audit line per denial; parseable JSON; the rule, revision and principal; no token.
    let log = stack.log("envoy");
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.find(r#"{"audit":"registry-guard""#).map(|i| &l[i..]))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {j}")))
        .collect();
    // Every record has its own event id.
    let ids: std::collections::HashSet<&str> = records.iter().filter_map(|a| a["event_id"].as_str()).collect();
    assert_eq!(ids.len(), records.len(), "{records:#?}");
    // The bundle records: the push of the example bundle reached every filter VM as a new
    // configuration (ECDS), on both endpoints; each VM that took it wrote one record.
    let (bundles, audits): (Vec<serde_json::Value>, Vec<serde_json::Value>) =
        records.into_iter().partition(|a| a["event"] == "bundle");
    let revision = example["revision"].as_u64().unwrap();
    for endpoint in ["registry", "dependency_proxy"] {
        let activated: Vec<_> = bundles
            .iter()
            .filter(|b| b["endpoint"] == endpoint && b["revision_new"].as_u64() == Some(revision))
            .collect();
        assert!(!activated.is_empty(), "{endpoint}: no record of revision {revision}: {bundles:#?}");
        for b in activated {
            assert_eq!((b["decision"].as_str(), b["action"].as_str()), (Some("allow"), Some("configure")), "{b}");
            assert_eq!((b["source"].as_str(), b["revision"].as_u64()), (Some("configuration"), Some(revision)), "{b}");
            assert_ne!(b["revision_old"].as_u64(), Some(revision), "{b}");
            assert!(b["reason"].is_null() && b["time"].is_string(), "{b}");
        }
    }
    println!("bundle record: {}", bundles.last().unwrap());
    // (The harness's canary rule denies too, after every push: not counted here.)
    let protected: Vec<_> =
        audits.iter().filter(|a| a["kind"] == "protected" && a["rule"] != registry_guard_e2e::CANARY_RULE).collect();
    assert_eq!(protected.len(), 2, "{audits:#?}");
    let a = protected[0];
    assert_eq!(a["decision"], "deny");
    assert_eq!(a["status"], 403);
    assert_eq!(a["rule"], "web-release-tags");
    assert_eq!(a["principal"], "dev");
    assert_eq!(a["path"], "/v2/acme/web/app/manifests/v1");
    assert_eq!(a["scopes"], "repository:acme/web/app:pull,push");
    assert!(a["revision"].as_u64().unwrap() >= 1);
    assert!(a["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{a}");
    assert!(audits.iter().any(|a| a["kind"] == "invalid_token"), "{audits:#?}");
    assert_eq!(a["action"], "push");
    let allowed: Vec<_> = audits.iter().filter(|a| a["decision"] == "allow").collect();
    assert_eq!(allowed.len(), 1, "one allowed write: {audits:#?}");
    let w = allowed[0];
    assert_eq!((w["principal"].as_str(), w["action"].as_str()), (Some("mia"), Some("push")), "{w}");
    assert_eq!(w["path"], "/v2/acme/web/app/manifests/audited");
    assert_eq!(w["trace_id"], trace);
    assert!(w["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1")), "{w}");
    println!("allowed write: {w}");
    let signature = dev.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token signature reached Envoy's log");
    assert!(!log.contains(&forged));
    println!("audit lines: {}; e.g. {}", audits.len(), protected[0]);

    // The token service's own records, on its log: a failed login (the secret never written)
    // and the bundle push.
    assert_eq!(stack.token("dev", "not-the-password", &push).map_err(|e| e.0), Err(401));
    let log = stack.log("token-service");
    let records: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.find(r#"{"audit":"registry-guard-token-service""#).map(|i| &l[i..]))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {j}")))
        .collect();
    let failed: Vec<_> = records.iter().filter(|r| r["event"] == "login_failed").collect();
    assert_eq!(failed.len(), 1, "{records:#?}");
    let f = failed[0];
    assert_eq!((f["decision"].as_str(), f["principal"].as_str()), (Some("deny"), Some("dev")), "{f}");
    assert_eq!(f["reason"], "invalid_credentials", "{f}");
    assert!(f["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1")), "{f}");
    assert!(!log.contains("not-the-password"), "a password reached the token service's log");
    let pushed = records.iter().find(|r| r["event"] == "bundle" && r["action"] == "push").expect("a push record");
    assert_eq!((pushed["decision"].as_str(), pushed["revision"].as_u64()), (Some("allow"), Some(revision)), "{pushed}");
    println!("failed login: {f}");
    println!("bundle push: {pushed}");
}

fn grep(text: &str, needle: &str) -> String {
    text.lines().filter(|l| l.contains(needle)).collect::<Vec<_>>().join("\n")
}
