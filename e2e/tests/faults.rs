//! Faults end to end: what clients see when a part of the stack breaks, on the real
//! Envoy, registry, token service and skopeo.
//!
//! Covered elsewhere and not repeated here: the consumer down during a push (events are
//! retried by the registry and counted once: `events.rs`), and corrupt, unsigned, invalid
//! and rolled-back bundles (rejected, the previous revision stays active, also after an
//! Envoy restart: `protection.rs`, `rejected_bundles_keep_the_last_good_revision`).

use std::time::{Duration, Instant};

use registry_guard_e2e::{stderr, Options, Stack};

const TRAP: &str = "x-registry-guard-trap";

/// Status, content type and body of a GET through Envoy, with optional token and extra header.
fn get(stack: &Stack, path: &str, bearer: Option<&str>, header: Option<(&str, &str)>) -> (u16, String, String) {
    let mut req = ureq::get(&stack.url(path)).timeout(Duration::from_secs(10));
    if let Some(t) = bearer {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    if let Some((k, v)) = header {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let status = resp.status();
    let ct = resp.header("content-type").unwrap_or_default().to_owned();
    (status, ct, resp.into_string().unwrap_or_default())
}

/// The OCI error code of a JSON error body (`errors[0].code`), or a panic naming the body.
fn oci_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not an OCI error body ({e}): {body:?}"));
    v["errors"][0]["code"].as_str().unwrap_or_else(|| panic!("no errors[0].code in {body}")).to_owned()
}

fn stat(stack: &Stack, name: &str) -> i64 {
    let url = format!("http://127.0.0.1:{}/stats?filter=^{}$", stack.admin_port, name.replace('.', "\\."));
    let text = ureq::get(&url).call().expect("admin stats").into_string().expect("stats body");
    text.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_trapped_filter_fails_closed_and_the_vm_is_reloaded() {
    let stack = Stack::start_with(Options { trap_on_header: Some(TRAP.into()), ..Options::default() });
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
    assert_eq!(get(&stack, "/v2/", Some(&rita), None).0, 200);

    // Two workers (`--concurrency 2`), one VM each; every trapped request is refused with an
    // OCI 503 (Envoy's empty 503, given its body by `local_reply_config`).
    let mut traps = 0;
    for _ in 0..4 {
        let (status, ct, body) = get(&stack, "/v2/", Some(&rita), Some((TRAP, "1")));
        assert_eq!(status, 503, "a trapped request is refused, never passed: {body}");
        assert_eq!(ct, "application/json");
        assert_eq!(oci_code(&body), "UNAVAILABLE", "{body}");
        assert!(body.contains("registry-guard cannot decide this request; refused"), "{body}");
        traps += 1;
    }
    assert!(stack.log("envoy").contains("Uncaught RuntimeError: unreachable"), "a real wasm trap happened");

    // While a VM is down (reload backoff), its requests are refused; the other worker (or the
    // reloaded VM) decides correctly. Nothing is ever let through unauthenticated.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut refused, mut decided, mut streak) = (0, 0, 0);
    while streak < 40 {
        assert!(Instant::now() < deadline, "the plugin did not recover: {refused} refused, {decided} decided");
        let (anon, _, anon_body) = get(&stack, "/v2/acme/web/app/tags/list", None, None);
        let (authed, _, authed_body) = get(&stack, "/v2/", Some(&rita), None);
        assert!(anon == 401 || anon == 503, "unauthenticated request got {anon}: {anon_body}");
        assert!(authed == 200 || authed == 503, "authenticated request got {authed}: {authed_body}");
        for (s, b) in [(anon, &anon_body), (authed, &authed_body)] {
            if s == 503 {
                assert_eq!(oci_code(b), "UNAVAILABLE", "{b}");
                refused += 1;
                streak = 0;
            } else {
                decided += 1;
                streak += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let reloads = stat(&stack, "wasm.registry-guard.vm_reload_success");
    let backoff = stat(&stack, "wasm.registry-guard.vm_reload_backoff");
    eprintln!(
        "{traps} trapped requests; afterwards {refused} refused (503) and {decided} decided before 40 correct in a row; \
         Envoy vm_reload_success {reloads}, vm_reload_backoff {backoff}"
    );
    assert!(reloads >= 1, "Envoy reloaded the trapped VM (FAIL_RELOAD)");
    // The reloaded VM runs the same configuration: a denial is still a denial.
    let (s, _, b) = get(&stack, "/v2/acme/web/app/tags/list", None, None);
    assert_eq!((s, oci_code(&b).as_str()), (401, "UNAUTHORIZED"), "{b}");
}

#[test]
fn registry_down_is_an_oci_503_and_recovers() {
    let mut stack = Stack::start();
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "up").status.success());
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();

    stack.stop_registry();
    let (status, ct, body) = get(&stack, "/v2/acme/web/app/manifests/up", Some(&rita), None);
    eprintln!("registry down: {status} {ct} {body}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(ct, "application/json");
    assert_eq!(oci_code(&body), "UNAVAILABLE", "{body}");
    assert!(body.contains("the registry is unavailable"), "{body}");
    // The filter still decides first: no token, no upstream attempt.
    let (status, _, body) = get(&stack, "/v2/acme/web/app/manifests/up", None, None);
    assert_eq!((status, oci_code(&body).as_str()), (401, "UNAUTHORIZED"), "{body}");
    // skopeo 1.9 fails cleanly; it does not show bodies of 5xx replies, only the status.
    let out = stack.inspect("rita", "rita-pass", "acme/web/app", "up");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("503 Service Unavailable"), "{}", stderr(&out));

    stack.restart_registry();
    let r = stack.request("GET", "/v2/acme/web/app/manifests/up", Some(&rita));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn token_service_down_keeps_issued_tokens_working_and_logins_fail_clearly() {
    let mut stack = Stack::start();
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "kept").status.success());
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
    let host = stack.registry_host();

    stack.stop_token_service();
    // A token issued before the outage: skopeo pulls with it (no token endpoint involved).
    let src = format!("docker://{host}/acme/web/app:kept");
    let out = stack.skopeo(&["inspect", "--tls-verify=false", "--registry-token", &rita, &src]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dst = format!("oci:{}:kept", stack.path("pulled").display());
    let out = stack.skopeo(&["copy", "--src-tls-verify=false", "--src-registry-token", &rita, &src, &dst]);
    assert!(out.status.success(), "{}", stderr(&out));
    // … and is still decided by the filter: no push with a pull token.
    let r = stack.request("PUT", "/v2/acme/web/app/manifests/evil", Some(&rita));
    assert_eq!(r.status, 401, "{}", r.body);

    // A login needs the token service: it fails, and says why.
    let out = stack.skopeo(&["login", "--tls-verify=false", "-u", "rita", "-p", "rita-pass", &host]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    eprintln!("skopeo login with the token service down says: {msg}");
    assert!(msg.contains("/jwt/auth") && msg.contains("connection refused"), "{msg}");
    // So does a pull that needs a new token.
    let out = stack.inspect("rita", "rita-pass", "acme/web/app", "kept");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("connection refused"), "{}", stderr(&out));

    stack.start_token_service();
    let out = stack.skopeo(&["login", "--tls-verify=false", "-u", "rita", "-p", "rita-pass", &host]);
    assert!(out.status.success(), "{}", stderr(&out));
}
