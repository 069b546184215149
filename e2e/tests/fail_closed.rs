//! Fail closed, always (docs/security.md "Failing closed", docs/failing-closed.md): no policy push,
//! accepted or refused, forced or replayed, before or after an Envoy restart, may let a
//! request reach the registry without the filter's positive decision. Every push here goes
//! through `Stack::push_bundle`, which checks afterwards that anonymous, `alg: none` and
//! forged requests are refused and that the canary rule still denies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::{Duration, Instant};

use registry_guard_e2e::{stderr, Options, Stack};
use serde_json::json;

fn bundle(revision: u64, tag_pattern: &str) -> serde_json::Value {
    json!({
        "revision": revision,
        "protection_rules": [{
            "id": "web-release-tags",
            "owner": {"project": "acme/web"},
            "repository_path_pattern": "acme/web/*",
            "tag_name_pattern": tag_pattern,
            "minimum_access_level_for_push": "maintainer",
        }],
    })
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ecds_bytes(stack: &Stack) -> Vec<u8> {
    std::fs::read(stack.ecds_file()).unwrap()
}

/// Status of `rgctl status` for this stack (exit code, output): non-zero when a worker is not
/// enforcing the reported revision.
fn status(stack: &Stack) -> (bool, String) {
    let out = std::process::Command::new(registry_guard_e2e::root().join("target/release/rgctl"))
        .args(["status", "--envoy-admin", &format!("http://127.0.0.1:{}", stack.admin_port)])
        .output()
        .unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    eprintln!("$ rgctl status\n{text}");
    (out.status.success(), text)
}

/// Waits (heartbeats are renewed every second) until every filter VM of Envoy reports
/// `revision`, and returns the status text.
fn wait_all_workers_on(stack: &Stack, revision: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, text) = status(stack);
        if ok && text.contains(&format!("active revision {revision};")) {
            return text;
        }
        assert!(Instant::now() < deadline, "not every worker enforces revision {revision}:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The canary rule and the bundle's own rule deny a developer's push of a release tag.
fn assert_release_tags_protected(stack: &Stack) {
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    for _ in 0..4 {
        let r = stack.request("PUT", "/v2/acme/web/app/manifests/v1", Some(&dev));
        assert_eq!(r.status, 403, "{}", r.body);
    }
}

#[test]
fn re_pushing_an_older_bundle_that_was_active_keeps_the_gate_shut() {
    let mut stack = Stack::start();
    let r1 = stack.sign_bundle("r1", &bundle(1, "^v[0-9]+"));
    let r2 = stack.sign_bundle("r2", &bundle(2, "^v[0-9]+"));
    assert!(stack.push_bundle(&r1, &[]).status.success());
    assert!(stack.push_bundle(&r2, &[]).status.success());
    wait_all_workers_on(&stack, 2);
    // "Go back to yesterday's bundle": refused before any ECDS file is touched, and by the
    // token service.
    let before = ecds_bytes(&stack);
    let out = stack.push_bundle(&r1, &[]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains("REFUSED revision 1") && text.contains("not newer than the active revision 2"), "{text}");
    assert_eq!(ecds_bytes(&stack), before, "the ECDS file was touched");
    // rgctl stops before delivering anything, the token service is not even asked; ask it.
    let (code, body) = stack
        .put_bundle_raw(std::fs::read(&r1).unwrap().as_slice(), Some(&format!("Bearer {}", stack.operator_token())));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("older than the active revision 2"), "{body}");
    assert_release_tags_protected(&stack);
    wait_all_workers_on(&stack, 2);
    // After a restart Envoy boots on what it was last delivered: revision 2.
    stack.restart_envoy();
    stack.assert_fail_closed();
    wait_all_workers_on(&stack, 2);
    assert_release_tags_protected(&stack);
}

#[test]
fn re_pushing_the_active_bundle_changes_nothing() {
    let mut stack = Stack::start();
    let r3 = stack.sign_bundle("r3", &bundle(3, "^v[0-9]+"));
    assert!(stack.push_bundle(&r3, &[]).status.success());
    let before = ecds_bytes(&stack);
    let out = stack.push_bundle(&r3, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("unchanged"), "{text}");
    assert_eq!(ecds_bytes(&stack), before);
    // The same revision with other content is refused by both.
    let other = stack.sign_bundle("r3-other", &bundle(3, "^release-"));
    let out = stack.push_bundle(&other, &[]);
    assert!(!out.status.success());
    let (code, body) = stack
        .put_bundle_raw(std::fs::read(&other).unwrap().as_slice(), Some(&format!("Bearer {}", stack.operator_token())));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("already active with other content"), "{body}");
    wait_all_workers_on(&stack, 3);
    stack.restart_envoy();
    stack.assert_fail_closed();
    wait_all_workers_on(&stack, 3);
}

#[test]
fn forced_older_bundles_and_garbage_never_open_the_gate() {
    let mut stack = Stack::start();
    let r1 = stack.sign_bundle("r1", &bundle(1, "^v[0-9]+"));
    let r2 = stack.sign_bundle("r2", &bundle(2, "^v[0-9]+"));
    assert!(stack.push_bundle(&r1, &[]).status.success());
    assert!(stack.push_bundle(&r2, &[]).status.success());
    // An explicit rollback of Envoy (--force): delivered and enforced on every worker; the
    // token service keeps its own rollback protection.
    let out = stack.push_bundle(&r1, &["--force"]);
    let text = stdout(&out);
    assert!(text.contains("envoy") && text.contains("active revision 1"), "{text}");
    assert!(text.contains("token service") && text.contains("REJECTED"), "{text}");
    wait_all_workers_on(&stack, 1);
    stack.restart_envoy();
    stack.assert_fail_closed();
    wait_all_workers_on(&stack, 1);

    // The sequence that once left workers without a filter: a new revision, a bundle signed
    // by an unknown key (forced), the previous revision freshly re-signed (forced).
    let r4 = stack.sign_bundle("r4", &bundle(4, "^v[0-9]+"));
    assert!(stack.push_bundle(&r4, &[]).status.success());
    wait_all_workers_on(&stack, 4);
    let unknown = {
        let mut b = bundle(5, "^v[0-9]+");
        b["environment"] = registry_guard_e2e::ENVIRONMENT.into();
        let key = registry_guard_core::token::testing::es256_key(42);
        let jws =
            registry_guard_core::policy::bundle::sign(&registry_guard_e2e::with_canary(&b).to_string(), &key).unwrap();
        let path = stack.path("unknown-key.jws");
        std::fs::write(&path, jws).unwrap();
        path
    };
    let out = stack.push_bundle(&unknown, &["--force"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("Envoy rejected the configuration"), "{}", stdout(&out));
    let r3 = stack.sign_bundle("r3-resigned", &bundle(3, "^v[0-9]+"));
    stack.push_bundle(&r3, &["--force"]);
    wait_all_workers_on(&stack, 3);
    // Every later revision reaches every worker.
    let r6 = stack.sign_bundle("r6", &bundle(6, "^(v[0-9]+|release-.*)$"));
    let out = stack.push_bundle(&r6, &[]);
    assert!(out.status.success(), "{}", stdout(&out));
    wait_all_workers_on(&stack, 6);
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    for _ in 0..6 {
        assert_eq!(stack.request("PUT", "/v2/acme/web/app/manifests/release-1", Some(&dev)).status, 403);
    }

    // Garbage, forced: refused by the filter on Envoy's main thread, the file restored.
    let garbage = stack.path("garbage.jws");
    std::fs::write(&garbage, "not.a.bundle").unwrap();
    let before = ecds_bytes(&stack);
    let out = stack.push_bundle(&garbage, &["--force"]);
    assert!(!out.status.success());
    assert_eq!(ecds_bytes(&stack), before, "the last good configuration is back on disk");
    // A signed bundle the filter refuses (a rule that protects nothing), forced.
    let invalid = stack.sign_bundle_unchecked(
        "invalid",
        &json!({"revision": 7, "protection_rules": [
            {"id": "x", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*"}]}),
    );
    assert!(!stack.push_bundle(&invalid, &["--force"]).status.success());
    wait_all_workers_on(&stack, 6);
    stack.restart_envoy();
    stack.assert_fail_closed();
    wait_all_workers_on(&stack, 6);
}

#[test]
fn bundle_intake_needs_the_operator_and_the_right_environment() {
    let mut stack = Stack::start();
    let r2 = stack.sign_bundle("r2", &bundle(2, "^v[0-9]+"));
    assert!(stack.push_bundle(&r2, &[]).status.success());
    let jws = std::fs::read(&r2).unwrap();
    // A replay by anyone who can reach the token service: 401, before the body is read.
    for auth in [None, Some("Bearer wrong"), Some("Basic YWxpY2U6YWxpY2UtcGFzcw=="), Some("Bearer ")] {
        let (code, body) = stack.put_bundle_raw(&jws, auth);
        assert_eq!(code, 401, "{auth:?}: {body}");
        assert!(body.contains("operator"), "{body}");
    }
    // A 40 MB body announced without credentials: 401 before a byte of it is sent.
    let rss_before = rss_kib(stack.pid("token-service").unwrap());
    let started = Instant::now();
    let reply = announce_body(stack.token_port, 40 << 20, None);
    eprintln!("40 MB PUT /bundle without credentials, body not sent: {:?}: {}", started.elapsed(), first_line(&reply));
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // With the operator token, a body over the 32 MiB limit: 413 from its announced length.
    let reply = announce_body(stack.token_port, 40 << 20, Some(&stack.operator_token()));
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // And 40 MB actually sent without credentials: refused, and the service does not grow.
    let big = vec![b'a'; 40 << 20];
    let (code, _) = stack.put_bundle_raw(&big, None);
    assert!(code == 401 || code == 0, "{code} (0: the service answered 401 and closed while the body was sent)");
    let rss_after = rss_kib(stack.pid("token-service").unwrap());
    eprintln!("token service RSS {rss_before} KiB before, {rss_after} KiB after 40 MB unauthenticated bodies");
    assert!(rss_after < rss_before + 16 * 1024, "token service grew from {rss_before} to {rss_after} KiB");
    // The same bytes with the operator token: accepted, nothing changes.
    let (code, body) = stack.put_bundle_raw(&jws, Some(&format!("Bearer {}", stack.operator_token())));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"unchanged\":true"), "{body}");

    // A bundle signed for staging: refused locally, and by every component when forced.
    let mut staging = bundle(9, "^v[0-9]+");
    staging["environment"] = "staging".into();
    let staging = stack.sign_bundle("staging", &staging);
    let out = stack.push_bundle(&staging, &[]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("environment `staging`"), "{}", stdout(&out));
    let before = ecds_bytes(&stack);
    let out = stack.push_bundle(&staging, &["--force"]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains("Envoy rejected the configuration"), "{text}");
    assert!(text.contains("$.environment"), "{text}");
    assert_eq!(ecds_bytes(&stack), before);
    wait_all_workers_on(&stack, 2);
    stack.restart_envoy();
    stack.assert_fail_closed();
    wait_all_workers_on(&stack, 2);
}

/// Sends the head of a `PUT /bundle` announcing `length` bytes, but no body, and returns
/// what the service answers (it must answer without waiting for the body).
fn announce_body(port: u16, length: usize, operator_token: Option<&str>) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = operator_token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "PUT /bundle HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {length}\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The backstop: Envoy refuses, by itself, every request that no filter decided.
#[test]
fn envoy_refuses_what_no_filter_decided() {
    // 1. Workers without a filter: the filter refuses its configuration on every VM but the
    //    first (Envoy's main thread) — how unfiltered requests once reached the registry.
    let stack = Stack::start_with(Options { refuse_configure_after_first: true, ..Options::default() });
    let key = stack.signing_key();
    let owner = registry_guard_e2e::mint_token(&key, "alice", "acme/web/app", &["pull", "push"], Some(50));
    for (method, path, bearer) in [
        ("GET", "/v2/", None),
        ("GET", "/v2/_catalog", None),
        ("PUT", "/v2/acme/web/app/manifests/v1", None),
        ("GET", "/v2/acme/web/app/tags/list", Some(owner.as_str())),
        ("GET", "/v2/acme/dependency_proxy/containers/alpine/manifests/latest", Some(owner.as_str())),
    ] {
        for _ in 0..3 {
            let r = stack.request(method, path, bearer);
            assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
            assert!(r.body.contains("\"UNAVAILABLE\"") && r.body.contains("cannot decide"), "{}", r.body);
        }
    }
    // A client claiming the decision itself gets the same.
    let r = raw_with_decision(&stack, "GET /v2/_catalog");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    let (ok, text) = status(&stack);
    assert!(!ok && text.contains("WARNING"), "rgctl status must flag workers without a filter:\n{text}");
    let stats = ureq::get(&format!("http://127.0.0.1:{}/stats?filter=rq_direct_response", stack.admin_port))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    eprintln!("{stats}");
    assert!(stats.contains("http.registry.rq_direct_response: "), "{stats}");
    drop(stack);

    // 2. The filter absent from the chain (a configuration mistake): the same refusal, and a
    //    client-sent decision header does not get through.
    let mut stack = Stack::start();
    let yaml = std::fs::read_to_string(stack.path("envoy.yaml")).unwrap();
    let start =
        yaml.find("          - name: registry-guard\n            config_discovery:").expect("ECDS filter block");
    let end = start + yaml[start..].find("          - name: envoy.filters.http.router").expect("router");
    let without = format!("{}{}", &yaml[..start], &yaml[end..]);
    std::fs::write(stack.path("envoy.yaml"), without).unwrap();
    stack.restart_envoy();
    for (method, path) in [("GET", "/v2/"), ("GET", "/v2/_catalog"), ("PUT", "/v2/acme/web/app/manifests/v1")] {
        let r = stack.request(method, path, None);
        assert_eq!(r.status, 503, "{method} {path}: {}", r.body);
    }
    let r = raw_with_decision(&stack, "GET /v2/_catalog");
    assert!(r.starts_with("HTTP/1.1 503"), "a client-sent decision header passed: {r}");
}

/// `REQUEST_LINE` through Envoy with a forged `x-registry-guard-decision: allow`.
fn raw_with_decision(stack: &Stack, request_line: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", stack.envoy_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{request_line} HTTP/1.1\r\nHost: x\r\nx-registry-guard-decision: allow\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
