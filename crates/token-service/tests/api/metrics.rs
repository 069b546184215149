//! `GET /metrics`: Prometheus (OpenMetrics) text from the official client: tokens issued by
//! auth type, failed logins by reason, the active bundle revision; never a username, a
//! password or a token.

use crate::helpers::*;

async fn scrape(app: &TestApp) -> String {
    let resp = app.client.get(format!("{}/metrics", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    resp.text().await.unwrap()
}

/// The value of the series `key` (name and labels as printed), if present.
fn value(text: &str, key: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

#[tokio::test]
async fn metrics_count_issued_tokens_and_failed_logins_without_secrets() {
    let app = spawn_with_bundle(&deploy_bundle(7)).await;
    let scope = "scope=repository:acme/web/app:pull";
    for _ in 0..2 {
        assert_eq!(app.get_token(scope, Some(("alice", ALICE_PASSWORD))).await.status(), 200);
    }
    assert_eq!(app.get_token(scope, Some(("acme-ci", ACME_CI_SECRET))).await.status(), 200);
    assert_eq!(app.get_token(scope, Some(("alice", "not-her-password"))).await.status(), 401);
    assert_eq!(app.get_token(scope, None).await.status(), 401);

    let text = scrape(&app).await;
    assert_eq!(
        value(&text, r#"registry_guard_token_service_tokens_issued_total{auth_type="password"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"registry_guard_token_service_tokens_issued_total{auth_type="deploy_token"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"registry_guard_token_service_failed_logins_total{reason="invalid_credentials"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "registry_guard_token_service_bundle_revision"), Some(7.0), "{text}");
    assert_eq!(value(&text, "registry_guard_token_service_argon2_queue_depth"), Some(0.0), "{text}");
    assert!(text.contains("# TYPE registry_guard_token_service_tokens_issued counter"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    for secret in ["alice", "acme-ci", ALICE_PASSWORD, ACME_CI_SECRET, "not-her-password"] {
        assert!(!text.contains(secret), "`{secret}` in /metrics:\n{text}");
    }
}

/// The token service's audit records (JSON lines on its log) that mention `needle`.
fn audits_with(needle: &str) -> Vec<serde_json::Value> {
    captured_logs()
        .lines()
        .filter_map(|l| l.find(r#"{"audit":"registry-guard-token-service""#).map(|i| &l[i..]))
        .filter(|j| j.contains(needle))
        .map(|j| serde_json::from_str(j).unwrap_or_else(|e| panic!("audit record is not JSON ({e}): {j}")))
        .collect()
}

#[tokio::test]
async fn failed_logins_and_bundle_changes_leave_audit_records_without_secrets() {
    captured_logs();
    let app = spawn_with_bundle(&deploy_bundle(3)).await;
    let scope = "scope=repository:acme/web/app:pull";
    let wrong = "audit-test-wrong-password";
    assert_eq!(app.get_token(scope, Some(("audit-test-user", wrong))).await.status(), 401);
    let failed = audits_with("audit-test-user");
    assert_eq!(failed.len(), 1, "{failed:?}");
    let f = &failed[0];
    assert_eq!((f["event"].as_str(), f["decision"].as_str()), (Some("login_failed"), Some("deny")), "{f}");
    assert_eq!(f["reason"], "invalid_credentials");
    assert!(f["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1")), "{f}");
    assert_eq!(f["event_id"].as_str().map(str::len), Some(32), "{f}");
    assert!(!captured_logs().contains(wrong), "a password reached the log");

    // A bundle push accepted, then an older one refused: one record each, naming the revision.
    let resp = app.put_bundle(sign_bundle_value(&deploy_bundle(41))).await;
    assert_eq!(resp.status(), 200);
    let resp = app.put_bundle(sign_bundle_value(&deploy_bundle(40))).await;
    assert_eq!(resp.status(), 409);
    let changes: Vec<_> = audits_with(r#""event":"bundle""#).into_iter().filter(|a| a["revision"] == 41).collect();
    assert!(
        changes.iter().any(|a| a["decision"] == "allow" && a["action"] == "push" && a["reason"].is_null()),
        "{changes:?}"
    );
    assert!(changes.iter().any(|a| a["decision"] == "deny" && a["reason"].as_str().is_some()), "{changes:?}");
}
