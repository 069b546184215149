//! Policy bundles: the bundle found at startup, `PUT /bundle`, `GET /bundle/status`, and what
//! the active policy does to grants.

use registry_guard_core::token::testing;
use serde_json::{json, Value};

use crate::helpers::*;

const PLATFORM_PULL_PUSH: &str = "repository:acme/platform/api:pull,push";

fn actions(access: &Value) -> Vec<String> {
    access
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[tokio::test]
async fn startup_bundle_withholds_push_from_protected_principals() {
    let dir = config_with_bundle(Some(&sign_bundle(&platform_bundle(3))));
    let line = build(dir.path()).await.unwrap().startup_line();
    assert!(line.ends_with(", bundle revision 3 (3 rules))"), "{line}");
    let app = spawn_in(dir).await;

    // dev is a developer of acme: the platform rule denies every push, so no push is granted.
    let access = app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await;
    assert_eq!(
        access,
        json!([{"type": "repository", "name": "acme/platform/api", "actions": ["pull"],
                "meta": {"project_path": "acme/platform", "access_level": 30}}])
    );
    // alice (maintainer) is above developer; root is an admin and admins bypass protection.
    assert_eq!(actions(&app.access("alice", ALICE_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);
    let root = app.access("root", ROOT_PASSWORD, "repository:acme/platform/api:pull,push,delete").await;
    assert_eq!(actions(&root), ["pull,push,delete"]);
    assert_eq!(root[0]["meta"]["access_level"], 60);
    // A tag rule leaves push granted (other tags may be pushed), a dry-run rule never withholds.
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, "repository:acme/web/app:pull,push").await), ["pull,push"]);
    assert_eq!(
        actions(&app.access("alice", ALICE_PASSWORD, "repository:acme/web/app:pull,push,delete").await),
        ["pull,push,delete"]
    );
    // The GET flavor decides the same way; asking only for a withheld action gets nothing.
    let resp = app.get_token("scope=repository:acme/platform/api:push", Some(("dev", DEV_PASSWORD))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = registry_guard_core::token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["access"], json!([]));

    let status = app.bundle_status().await;
    assert_eq!(status["active_revision"], 3);
    assert_eq!(status["rules"], 3);
    assert!(status["activated_at"].as_str().unwrap().ends_with('Z'), "{status}");
    assert_eq!(status["last_rejected"], Value::Null);
}

#[tokio::test]
async fn without_a_bundle_the_policy_is_empty() {
    let app = spawn_in(config_with_bundle(None)).await;
    assert_eq!(
        app.bundle_status().await,
        json!({"active_revision": 0, "rules": 0, "activated_at": null, "etag": null, "last_rejected": null})
    );
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);
}

/// What a refused push must answer.
struct Refused<'a> {
    status: u16,
    error: &'a str,
    path: &'a str,
    /// A part of the reason.
    reason: &'a str,
    /// The revision `last_rejected` reports.
    revision: Value,
}

/// Pushes `body`, checks the refusal, and that the status still shows revision `active` and
/// the refusal as `last_rejected`.
async fn assert_refused(app: &TestApp, body: String, want: Refused<'_>, active: u64) {
    let resp = app.put_bundle(body).await;
    assert_eq!(resp.status(), want.status, "{}", want.reason);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["error"], want.error, "{answer}");
    assert_eq!(answer["path"], want.path, "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains(want.reason), "{answer}");
    assert_eq!(answer["active_revision"], active, "{answer}");
    let st = app.bundle_status().await;
    assert_eq!(st["active_revision"], active, "{st}");
    let last = &st["last_rejected"];
    assert_eq!(last["revision"], want.revision, "{st}");
    assert_eq!(last["path"], want.path, "{st}");
    assert_eq!(last["reason"], answer["reason"], "{st}");
    assert!(last["at"].as_str().unwrap().ends_with('Z'), "{st}");
}

fn rejected(path: &'static str, reason: &'static str, revision: Value) -> Refused<'static> {
    Refused { status: 400, error: "bundle_rejected", path, reason, revision }
}

#[tokio::test]
async fn put_bundle_activates_persists_and_refuses() {
    let app = spawn_in(config_with_bundle(None)).await;
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);

    // A valid bundle: active for the very next token request, and persisted.
    let jws = sign_bundle(&platform_bundle(2));
    let resp = app.put_bundle(jws.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"active_revision": 2, "rules": 3, "unchanged": false}));
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull"]);
    assert_eq!(std::fs::read_to_string(app.dir.path().join("bundle.jws")).unwrap(), jws);
    let status = app.bundle_status().await;
    assert_eq!((status["active_revision"].clone(), status["rules"].clone()), (json!(2), json!(3)));
    assert!(status["activated_at"].is_string(), "{status}");
    assert_eq!(status["last_rejected"], Value::Null);

    // Unsigned JSON. Nothing of an unverified body is parsed: no revision is reported.
    assert_refused(&app, platform_bundle(5), rejected("signature", "not signed", Value::Null), 2).await;
    // Signed by a key that is not an operator key.
    let stranger = registry_guard_core::policy::bundle::sign(&platform_bundle(6), &testing::es256_key(8)).unwrap();
    assert_refused(&app, stranger, rejected("signature", "unknown operator key", Value::Null), 2).await;
    // Not a JWS at all.
    assert_refused(&app, "junk".into(), rejected("signature", "not a compact JWS", Value::Null), 2).await;
    // Signed, but semantically invalid: the JSON path of the fault.
    let invalid = sign_raw(
        &json!({"revision": 7, "protection_rules": [{"id": "t", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*",
                "tag_name_pattern": "v(", "minimum_access_level_for_push": "owner"}]}),
        &operator_key(),
    );
    let want = rejected("$.protection_rules[0].tag_name_pattern", "not a valid RE2 pattern", Value::Null);
    assert_refused(&app, invalid, want, 2).await;
    // Older than the active revision: rollback refused, naming both revisions.
    let want = Refused {
        status: 409,
        error: "bundle_rollback",
        path: "$.revision",
        reason: "revision 1 is older than the active revision 2",
        revision: json!(1),
    };
    assert_refused(&app, sign_bundle(&platform_bundle(1)), want, 2).await;
    // Every refusal kept the old policy.
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull"]);
    assert_eq!(std::fs::read_to_string(app.dir.path().join("bundle.jws")).unwrap(), jws);

    // The same bundle again, byte for byte, is accepted and changes nothing; the same
    // revision with other content is refused.
    let resp = app.put_bundle(jws.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["unchanged"], true);
    let want = Refused {
        status: 409,
        error: "bundle_rollback",
        path: "$.revision",
        reason: "revision 2 is already active with other content",
        revision: json!(2),
    };
    let other = platform_bundle(2).replace("acme/platform/*", "acme/platform/x/*");
    assert_refused(&app, sign_bundle(&other), want, 2).await;

    // A restart comes back with the last accepted bundle.
    let app = app.restart().await;
    let status = app.bundle_status().await;
    assert_eq!((status["active_revision"].clone(), status["rules"].clone()), (json!(2), json!(3)));
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull"]);

    // A newer bundle without the rule gives the push back, and survives a restart too.
    let resp = app.put_bundle(sign_bundle(r#"{"revision": 9}"#)).await;
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"active_revision": 9, "rules": 0, "unchanged": false}));
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);
    let app = app.restart().await;
    assert_eq!(app.bundle_status().await["active_revision"], 9);
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);
}

#[tokio::test]
async fn bundle_path_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let settings = r#"{"bundle_keys": "keys/operator-jwks.json", "bundle": "policy/active.jws",
                       "operator_token_sha256": "keys/operator-token.sha256"}"#;
    write_config(dir.path(), &principals(), Some(settings));
    write_operator_keys(dir.path());
    let app = spawn_in(dir).await;
    let jws = sign_bundle(&platform_bundle(4));
    assert_eq!(app.put_bundle(jws.clone()).await.status(), 200);
    assert_eq!(std::fs::read_to_string(app.dir.path().join("policy/active.jws")).unwrap(), jws);
    assert!(!app.dir.path().join("bundle.jws").exists());
    let app = app.restart().await;
    assert_eq!(app.bundle_status().await["active_revision"], 4);
}

#[tokio::test]
async fn put_bundle_without_operator_keys_is_409() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), Some(r#"{"operator_token_sha256": "keys/operator-token.sha256"}"#));
    write_operator_keys(dir.path());
    std::fs::remove_file(dir.path().join("keys/operator-jwks.json")).unwrap();
    let app = spawn_in(dir).await;
    let resp = app.put_bundle(sign_bundle(&platform_bundle(2))).await;
    assert_eq!(resp.status(), 409);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "bundle_keys_not_configured");
    assert!(body["reason"].as_str().unwrap().contains("bundle_keys"), "{body}");
    assert_eq!(body["active_revision"], 0);
    let status = app.bundle_status().await;
    assert_eq!(status["active_revision"], 0);
    // Nothing of an unverified bundle is parsed: its claimed revision is not reported.
    assert_eq!(status["last_rejected"]["revision"], Value::Null);
    assert!(!app.dir.path().join("bundle.jws").exists());
}

#[tokio::test]
async fn put_bundle_needs_the_operator_token_before_the_body_is_read() {
    let app = spawn_in(config_with_bundle(None)).await;
    let jws = sign_bundle(&platform_bundle(2));
    for auth in [None, Some("Bearer nope"), Some("Basic ZGV2OmRldg=="), Some("Bearer")] {
        let resp = app.put_bundle_as(auth, jws.clone()).await;
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], r#"Bearer realm="registry-guard-operator""#);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized", "{body}");
    }
    assert_eq!(app.bundle_status().await["active_revision"], 0);
    assert_eq!(app.put_bundle(jws).await.status(), 200);
}

#[tokio::test]
async fn without_an_operator_token_configured_no_push_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), Some(r#"{"bundle_keys": "keys/operator-jwks.json"}"#));
    write_operator_keys(dir.path());
    let app = spawn_in(dir).await;
    let resp = app.put_bundle(sign_bundle(&platform_bundle(2))).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["reason"].as_str().unwrap().contains("operator_token_sha256"), "{body}");
}

#[tokio::test]
async fn a_bundle_for_another_environment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &principals(),
        Some(
            r#"{"bundle_keys": "keys/operator-jwks.json", "operator_token_sha256": "keys/operator-token.sha256",
                 "environment": "production"}"#,
        ),
    );
    write_operator_keys(dir.path());
    let app = spawn_in(dir).await;
    let mut staging: Value = serde_json::from_str(&platform_bundle(2)).unwrap();
    staging["environment"] = "staging".into();
    let resp = app.put_bundle(sign_bundle(&staging.to_string())).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "$.environment", "{body}");
    staging["environment"] = "production".into();
    assert_eq!(app.put_bundle(sign_bundle(&staging.to_string())).await.status(), 200);
}

#[tokio::test]
async fn a_bundle_of_100k_rules_fits() {
    let rules: Vec<Value> = (0..100_000)
        .map(|i| {
            json!({"id": format!("rule-{i}"), "owner": {"group": format!("team-{i}")},
                   "repository_path_pattern": format!("team-{i}/project/*"),
                   "description": "protected up to developer, older notation",
                   "push_protected_up_to_access_level": "developer"})
        })
        .collect();
    let text = json!({"revision": 5, "protection_rules": rules}).to_string();
    let jws = sign_bundle(&text);
    assert!(jws.len() > 2 * 1024 * 1024, "{}", jws.len());
    let app = spawn_in(config_with_bundle(None)).await;
    let resp = app.put_bundle(jws).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"active_revision": 5, "rules": 100_000, "unchanged": false})
    );
    assert_eq!(actions(&app.access("dev", DEV_PASSWORD, PLATFORM_PULL_PUSH).await), ["pull,push"]);
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let app = spawn_in(config_with_bundle(None)).await;
    let body = vec![b'a'; registry_guard_token_service::policy::MAX_BUNDLE_BYTES + 1];
    let resp = app.put_bundle(body).await;
    assert_eq!(resp.status(), 413);
    let status = app.bundle_status().await;
    assert_eq!(status["active_revision"], 0);
    assert_eq!(status["last_rejected"]["path"], "$");
}
