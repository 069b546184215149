//! Deploy tokens: authentication from the active bundle, grants (requested ∩
//! scopes ∩ owner subtree), claims, refresh tokens, and revocation by a new bundle.

use registry_guard_core::decide::config::ChallengeConfig;
use registry_guard_core::decide::decision::{self, Credential};
use registry_guard_core::request::route;
use registry_guard_core::token;
use serde_json::{json, Value};

use crate::helpers::*;

/// `GET /jwt/auth` for `user`/`secret` asking for `scope` (space-separated, URL-encoded here).
async fn access(app: &TestApp, user: &str, secret: &str, scope: &str) -> Value {
    let query = format!("service=container_registry&scope={}", scope.replace(' ', "%20"));
    token_claims(app.get_token(&query, Some((user, secret))).await).await["access"].clone()
}

/// A granted repository; deploy tokens reach projects only, and each grant names its project
/// (`acme/web`, `acme/platform` in the test principals); the dependency proxy names none.
fn repo(name: &str, actions: &[&str]) -> Value {
    if name.contains("/dependency_proxy/containers/") {
        return json!({"type": "repository", "name": name, "actions": actions});
    }
    let project = name.split('/').take(2).collect::<Vec<_>>().join("/");
    json!({"type": "repository", "name": name, "actions": actions, "meta": {"project_path": project}})
}

#[tokio::test]
async fn group_token_gets_requested_intersect_scopes_intersect_subtree() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let got = access(
        &app,
        "acme-ci",
        ACME_CI_SECRET,
        "repository:acme/platform/api:pull,push repository:other/tools:pull,push repository:acme-other/x:pull",
    )
    .await;
    // `meta` names the project only: deploy tokens hold no access level.
    assert_eq!(got, json!([repo("acme/platform/api", &["pull", "push"])]));
    // Never delete (no deploy token scope allows it); `*` is expanded to what the scopes allow.
    let got = access(&app, "acme-ci", ACME_CI_SECRET, "repository:acme/web/app:pull,push,delete").await;
    assert_eq!(got, json!([repo("acme/web/app", &["pull", "push"])]));
    let got = access(&app, "acme-ci", ACME_CI_SECRET, "repository:acme/web/app:*").await;
    assert_eq!(got, json!([repo("acme/web/app", &["pull", "push"])]));
    // The catalog is not for deploy tokens.
    assert_eq!(access(&app, "acme-ci", ACME_CI_SECRET, "registry:catalog:*").await, json!([]));
    // The read-only token asking for pull,push gets pull.
    let got = access(&app, "deploy-token-2", ACME_READ_SECRET, "repository:acme/platform/api:pull,push").await;
    assert_eq!(got, json!([repo("acme/platform/api", &["pull"])]));
}

#[tokio::test]
async fn project_token_stays_in_its_project_and_off_the_dependency_proxy() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let got = access(
        &app,
        "deploy-token-3",
        WEB_SECRET,
        "repository:acme/web/app:pull,push repository:acme/web:pull repository:acme/webapp:pull \
         repository:acme/platform/api:pull",
    )
    .await;
    assert_eq!(got, json!([repo("acme/web/app", &["pull", "push"]), repo("acme/web", &["pull"])]));
    let proxy = "repository:acme/dependency_proxy/containers/alpine:pull";
    assert_eq!(access(&app, "deploy-token-3", WEB_SECRET, proxy).await, json!([]));
    // A group token with read_registry pulls through its group's dependency proxy.
    let got = access(&app, "deploy-token-2", ACME_READ_SECRET, proxy).await;
    assert_eq!(got, json!([repo("acme/dependency_proxy/containers/alpine", &["pull"])]));
    let other = "repository:other/dependency_proxy/containers/alpine:pull";
    assert_eq!(access(&app, "deploy-token-2", ACME_READ_SECRET, other).await, json!([]));
}

#[tokio::test]
async fn claims_name_the_deploy_token() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let resp = app.get_token("scope=repository:acme/web/app:pull", Some(("acme-ci", ACME_CI_SECRET))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let jwt = body["token"].as_str().unwrap();
    let claims = token::verify::decode_unverified(jwt).unwrap();
    assert_eq!(claims["auth_type"], "deploy_token");
    assert_eq!(claims["sub"], "acme-ci");
    assert_eq!(claims["aud"], "container_registry");
    assert_eq!(claims["access"], json!([repo("acme/web/app", &["pull"])]));
    let user = token::verify::decode_unverified(claims["user"].as_str().unwrap()).unwrap();
    assert_eq!(
        user["user_info"],
        json!({"token_type": "deploy_token", "username": "acme-ci", "deploy_token_id": 1}),
        "no user_id for a deploy token"
    );
    let verified = app.verifier().await.verify(jwt, now()).unwrap();
    assert_eq!(verified.subject, "acme-ci");
    assert_eq!(verified.auth_type.as_deref(), Some("deploy_token"));

    // The default username, and the OAuth2 password grant.
    let resp = app
        .post_token(&[
            ("grant_type", "password"),
            ("username", "deploy-token-2"),
            ("password", ACME_READ_SECRET),
            ("scope", "repository:acme/web/app:pull"),
        ])
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["sub"], "deploy-token-2");
    let user = token::verify::decode_unverified(claims["user"].as_str().unwrap()).unwrap();
    assert_eq!(
        user["user_info"],
        json!({"token_type": "deploy_token", "username": "deploy-token-2", "deploy_token_id": 2})
    );
}

#[tokio::test]
async fn expired_and_revoked_tokens_are_refused_and_wrong_secrets_are_generic() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let cases = [
        ("deploy-token-4", EXPIRED_SECRET, "HTTP Basic: Access denied: deploy token has expired"),
        ("deploy-token-5", REVOKED_SECRET, "HTTP Basic: Access denied: deploy token is revoked"),
        ("deploy-token-6", REVOKED_LATER_SECRET, "HTTP Basic: Access denied: deploy token is revoked"),
        ("acme-ci", "wrong-secret", "invalid username or password"),
        ("deploy-token-2", ACME_CI_SECRET, "invalid username or password"),
        ("alice", ACME_CI_SECRET, "invalid username or password"),
        ("deploy-token-99", "anything", "invalid username or password"),
    ];
    for (user, secret, message) in cases {
        let resp = app.get_token("scope=repository:acme/web/app:pull", Some((user, secret))).await;
        assert_eq!(resp.status(), 401, "{user}");
        assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"registry-guard\"");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}), "{user}");

        let resp = app.post_token(&[("grant_type", "password"), ("username", user), ("password", secret)]).await;
        assert_eq!(resp.status(), 401, "{user}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"error": "invalid_grant", "error_description": message}), "{user}");
    }
}

/// `grant_type=refresh_token` asking for `scope`.
async fn refresh_with(app: &TestApp, refresh: &str, scope: &str) -> reqwest::Response {
    app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", refresh), ("scope", scope)]).await
}

#[tokio::test]
async fn deploy_token_refresh_tokens_follow_the_bundle() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let resp =
        app.get_token("offline_token=true&scope=repository:acme/web/app:pull", Some(("acme-ci", ACME_CI_SECRET))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let refresh = body["refresh_token"].as_str().unwrap().to_owned();
    let refresh_claims = token::verify::decode_unverified(&refresh).unwrap();
    assert_eq!(refresh_claims["auth_type"], "deploy_token");
    assert_eq!(refresh_claims["sub"], "acme-ci");
    assert_eq!(refresh_claims["deploy_token_id"], 1);

    // Refreshing re-grants under the deploy token's scopes and subtree.
    let resp =
        refresh_with(&app, &refresh, "repository:acme/platform/api:pull,push,delete repository:other/tools:pull").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("refresh_token").is_none());
    let claims = token::verify::decode_unverified(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["auth_type"], "deploy_token");
    assert_eq!(claims["sub"], "acme-ci");
    assert_eq!(claims["access"], json!([repo("acme/platform/api", &["pull", "push"])]));

    // A new bundle revokes acme-ci: the very next requests are refused, without a restart.
    let mut bundle = deploy_bundle(2);
    bundle["revocations"]["deploy_tokens"] = json!([6, 1]);
    assert_eq!(app.put_bundle(sign_bundle_value(&bundle)).await.status(), 200);
    let resp = app.get_token("scope=repository:acme/web/app:pull", Some(("acme-ci", ACME_CI_SECRET))).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "HTTP Basic: Access denied: deploy token is revoked");
    let resp = refresh_with(&app, &refresh, "repository:acme/web/app:pull").await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "invalid refresh token: its deploy token is revoked"})
    );
    // Other deploy tokens are unaffected.
    let got = access(&app, "deploy-token-2", ACME_READ_SECRET, "repository:acme/web/app:pull").await;
    assert_eq!(got, json!([repo("acme/web/app", &["pull"])]));

    // A bundle without the token at all: its refresh token names a deploy token that is gone.
    let mut bundle = deploy_bundle(3);
    bundle["deploy_tokens"].as_array_mut().unwrap().remove(0);
    assert_eq!(app.put_bundle(sign_bundle_value(&bundle)).await.status(), 200);
    let resp = refresh_with(&app, &refresh, "repository:acme/web/app:pull").await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error_description"], "invalid refresh token: its deploy token no longer exists");
    let resp = app.get_token("", Some(("acme-ci", ACME_CI_SECRET))).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "invalid username or password");
}

#[tokio::test]
async fn a_refresh_token_listed_in_revocations_jti_is_refused() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let resp = app.get_token("offline_token=true", Some(("deploy-token-2", ACME_READ_SECRET))).await;
    let body: Value = resp.json().await.unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();
    let jti = token::verify::decode_unverified(refresh).unwrap()["jti"].as_str().unwrap().to_owned();
    let form = [("grant_type", "refresh_token"), ("refresh_token", refresh)];
    assert_eq!(app.post_token(&form).await.status(), 200);
    let mut bundle = deploy_bundle(2);
    bundle["revocations"]["jti"] = json!([jti]);
    assert_eq!(app.put_bundle(sign_bundle_value(&bundle)).await.status(), 200);
    let resp = app.post_token(&form).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert!(body["error_description"].as_str().unwrap().contains(&format!("token `{jti}` is revoked")), "{body}");
    // The deploy token itself still logs in.
    assert_eq!(app.get_token("", Some(("deploy-token-2", ACME_READ_SECRET))).await.status(), 200);
}

#[tokio::test]
async fn a_deploy_token_named_like_a_user_needs_its_own_secret() {
    let mut bundle = deploy_bundle(1);
    bundle["deploy_tokens"].as_array_mut().unwrap().push(json!({
        "id": 7, "username": "alice", "owner": {"project": "acme/web"}, "scopes": ["read_registry"],
        "sha256": sha256_hex("gldt-alice-named")
    }));
    let app = spawn_with_bundle(&bundle).await;
    // alice's password: the deploy token's digest does not match, so alice the user logs in.
    let claims =
        token_claims(app.get_token("scope=repository:acme/platform/api:pull", Some(("alice", ALICE_PASSWORD))).await)
            .await;
    assert_eq!(claims["auth_type"], "password");
    assert_eq!(claims["access"][0]["meta"]["access_level"], 40);
    // The deploy token's secret: the deploy token, with its own (narrower) grants.
    let claims = token_claims(
        app.get_token("scope=repository:acme/platform/api:pull", Some(("alice", "gldt-alice-named"))).await,
    )
    .await;
    assert_eq!(claims["auth_type"], "deploy_token");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["access"], json!([]));
}

/// What the token service issues and what the filter decides agree: the core's `decide`
/// allows the issued deploy token's push under the bundle it was issued under, and refuses
/// it (401) under a bundle that revokes the deploy token.
#[tokio::test]
async fn issued_deploy_tokens_pass_the_filter_decision_until_revoked() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let resp = app.get_token("scope=repository:acme/platform/api:pull,push", Some(("acme-ci", ACME_CI_SECRET))).await;
    let body: Value = resp.json().await.unwrap();
    let verified = app.verifier().await.verify(body["token"].as_str().unwrap(), now()).unwrap();
    let challenge = ChallengeConfig { realm: "http://127.0.0.1/jwt/auth".into(), service: "container_registry".into() };
    let decide = |bundle: &Value, path: &str| {
        let policy = registry_guard_core::policy::bundle::Policy::from_json(&bundle.to_string()).unwrap();
        let route = route::classify("PUT", path, Some("application/vnd.oci.image.manifest.v1+json"));
        decision::decide(route.as_ref(), Credential::Valid(&verified), &challenge, &policy, now())
    };
    let push = "/v2/acme/platform/api/manifests/v1";
    let allowed = decide(&deploy_bundle(1), push);
    assert!(allowed.is_allow(), "{allowed:?}");
    let mut revoked = deploy_bundle(2);
    revoked["revocations"]["deploy_tokens"] = json!([6, 1]);
    assert_eq!(decide(&revoked, push).status(), 401);
}

#[tokio::test]
async fn logs_name_the_deploy_token_never_its_secret() {
    captured_logs();
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let resp = app.get_token("scope=repository:acme/platform/api:push", Some(("acme-ci", ACME_CI_SECRET))).await;
    assert_eq!(resp.status(), 200);
    let resp = app.get_token("", Some(("deploy-token-5", REVOKED_SECRET))).await;
    assert_eq!(resp.status(), 401);
    let logs = captured_logs();
    let issued = logs
        .lines()
        // This test's line (other tests issue acme-ci tokens too, into the same shared log).
        .find(|l| {
            l.contains("issued token: sub=\"acme-ci\"") && l.contains("granted=[\"repository:acme/platform/api:push\"]")
        })
        .unwrap_or_else(|| panic!("no issued-token line in {logs}"));
    assert!(issued.contains("auth_type=deploy_token deploy_token_id=1 "), "{issued}");
    assert!(issued.contains("granted=[\"repository:acme/platform/api:push\"]"), "{issued}");
    assert!(logs.contains("deploy token 5 (`deploy-token-5`) is revoked"), "{logs}");
    for secret in [ACME_CI_SECRET, REVOKED_SECRET] {
        assert!(!logs.contains(secret), "a secret was logged");
    }
}
