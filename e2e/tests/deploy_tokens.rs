//! End to end: deploy tokens (group and project scopes, read/write), instant
//! revocation through a bundle push, and the group dependency proxy (GitLab's access table),
//! with real skopeo through real Envoy to a real pull-through cache.

use registry_guard_e2e::{client_error_status, stderr, Stack};
use serde_json::json;

/// The example bundle's deploy tokens, without protection rules (deploy tokens hold no
/// access level, so every applicable rule would deny them).
fn deploy_bundle(revision: u64, revocations: serde_json::Value) -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["protection_rules"] = json!([]);
    b["revocations"] = revocations;
    b
}

const DP: &str = "acme/dependency_proxy/containers/alpine";

struct Row {
    who: &'static str,
    secret: &'static str,
    repo: &'static str,
    expect: &'static str,
}

#[test]
fn dependency_proxy_matrix_and_group_scopes() {
    let stack = Stack::start();
    stack.seed_hub("alpine", "latest");
    let b = stack.sign_bundle("deploy", &deploy_bundle(10, json!({})));
    assert!(stack.push_bundle(&b, &[]).status.success());

    let rows = [
        Row { who: "acme-ci", secret: "gldt-acme-ci-rw", repo: DP, expect: "pull works" },
        Row {
            who: "acme-ci",
            secret: "gldt-acme-ci-rw",
            repo: "acme/platform/dependency_proxy/containers/alpine",
            expect: "pull works",
        },
        Row {
            who: "acme-ci",
            secret: "gldt-acme-ci-rw",
            repo: "other/dependency_proxy/containers/alpine",
            expect: "404",
        },
        Row { who: "deploy-token-6", secret: "gldt-acme-wo", repo: DP, expect: "403" },
        Row { who: "deploy-token-4", secret: "gldt-expired", repo: DP, expect: "401" },
        Row { who: "deploy-token-5", secret: "gldt-revoked", repo: DP, expect: "401" },
        Row { who: "deploy-token-3", secret: "gldt-web-deploy", repo: DP, expect: "403" },
        Row { who: "rita", secret: "rita-pass", repo: DP, expect: "pull works" },
        Row { who: "alice", secret: "alice-pass", repo: DP, expect: "pull works" },
        Row { who: "gus", secret: "gus-pass", repo: DP, expect: "404" },
        Row { who: "olga", secret: "olga-pass", repo: DP, expect: "404" },
        Row { who: "dev", secret: "dev-pass", repo: "other/dependency_proxy/containers/alpine", expect: "404" },
    ];
    let mut table = vec![format!("| {:<16} | {:<50} | {:<10} | {:<10} |", "principal", "image", "expected", "got")];
    let mut failures = Vec::new();
    for row in &rows {
        let out = stack.inspect(row.who, row.secret, row.repo, "latest");
        let err = stderr(&out);
        let got = if out.status.success() {
            "pull works"
        } else {
            match client_error_status(&err) {
                Some(404) => "404",
                Some(403) => "403",
                Some(401) => "401",
                _ => "?",
            }
        };
        table.push(format!("| {:<16} | {:<50} | {:<10} | {:<10} |", row.who, row.repo, row.expect, got));
        if got != row.expect {
            failures.push(format!("{} on {}: expected {}, got {got}: {err}", row.who, row.repo, row.expect));
        }
    }
    eprintln!("dependency proxy matrix, as run:\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The 404 and 403 replies come from the filter, with GitLab's codes.
    let t = stack.token("acme-ci", "gldt-acme-ci-rw", &[]).unwrap();
    let r = stack.request("GET", "/v2/other/dependency_proxy/containers/alpine/manifests/latest", Some(&t));
    assert_eq!((r.status, r.body.contains("NAME_UNKNOWN")), (404, true), "{}", r.body);
    let t = stack.token("deploy-token-3", "gldt-web-deploy", &[]).unwrap();
    let r = stack.request("GET", &format!("/v2/{DP}/manifests/latest"), Some(&t));
    assert_eq!((r.status, r.body.contains("DENIED")), (403, true), "{}", r.body);

    // Login outcomes: a group token logs in; expired and revoked ones are refused.
    let host = stack.registry_host();
    assert!(stack
        .skopeo(&["login", "--tls-verify=false", "-u", "acme-ci", "-p", "gldt-acme-ci-rw", &host])
        .status
        .success());
    assert!(!stack
        .skopeo(&["login", "--tls-verify=false", "-u", "deploy-token-4", "-p", "gldt-expired", &host])
        .status
        .success());
    assert!(!stack
        .skopeo(&["login", "--tls-verify=false", "-u", "deploy-token-5", "-p", "gldt-revoked", &host])
        .status
        .success());
    let _ = stack.skopeo(&["logout", "--all"]);

    // The same group scoping on the normal registry paths.
    assert!(stack.push("acme-ci", "gldt-acme-ci-rw", "acme/platform/api", "ci-1").status.success());
    let denied = stack.push("acme-ci", "gldt-acme-ci-rw", "other/tools", "ci-1");
    assert!(!denied.status.success());
    let denied = stack.push("deploy-token-2", "gldt-acme-ro", "acme/platform/api", "ro-1");
    assert!(!denied.status.success(), "read-only deploy token pushed");
    assert!(stack.inspect("deploy-token-2", "gldt-acme-ro", "acme/platform/api", "ci-1").status.success());
    assert!(stack.push("deploy-token-3", "gldt-web-deploy", "acme/web/app", "deploy-1").status.success());
    assert!(!stack.push("deploy-token-3", "gldt-web-deploy", "acme/platform/api", "deploy-1").status.success());
}

#[test]
fn revocation_applies_to_still_valid_jwts_at_the_next_push() {
    let stack = Stack::start();
    let b = stack.sign_bundle("deploy", &deploy_bundle(10, json!({})));
    assert!(stack.push_bundle(&b, &[]).status.success());
    assert!(stack.push("acme-ci", "gldt-acme-ci-rw", "acme/web/app", "r1").status.success());

    let ro = stack.token("deploy-token-2", "gldt-acme-ro", &["repository:acme/web/app:pull"]).unwrap();
    let mia = stack.token("mia", "mia-pass", &["repository:acme/web/app:pull"]).unwrap();
    let mia_jti =
        registry_guard_core::token::verify::decode_unverified(&mia).unwrap()["jti"].as_str().unwrap().to_owned();
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull"]).unwrap();
    for t in [&ro, &mia, &dev] {
        assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/r1", Some(t)).status, 200);
    }

    // One push revokes a deploy token, a token by jti and a user; the JWTs are still
    // unexpired, and are refused on the very next request.
    let b = stack.sign_bundle(
        "revoke",
        &deploy_bundle(11, json!({"deploy_tokens": [2], "jti": [mia_jti], "users": [{"username": "dev"}]})),
    );
    assert!(stack.push_bundle(&b, &[]).status.success());
    for (who, t) in [("deploy token 2", &ro), ("mia's jti", &mia), ("user dev", &dev)] {
        let r = stack.request("GET", "/v2/acme/web/app/manifests/r1", Some(t));
        assert_eq!(r.status, 401, "{who}: {}", r.body);
        assert!(r.body.contains("revoked"), "{who}: {}", r.body);
    }
    // New credentials: the deploy token and the user are refused at the token service;
    // mia (only one token revoked) gets a fresh token that works.
    assert!(stack.token("deploy-token-2", "gldt-acme-ro", &[]).is_err());
    assert!(stack.token("dev", "dev-pass", &[]).is_err());
    let fresh = stack.token("mia", "mia-pass", &["repository:acme/web/app:pull"]).unwrap();
    assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/r1", Some(&fresh)).status, 200);
}
