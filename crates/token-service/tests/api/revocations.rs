//! Revocations of the active bundle at issuance: revoked users get no token, revoked refresh
//! tokens (by `jti`, or by their user's cutoff) are refused.

use registry_guard_core::token;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn a_revoked_user_cannot_log_in() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let message = "access revoked for `rita`";
    // Password and personal access token alike, on both flavors.
    for secret in [RITA_PASSWORD, RITA_PAT] {
        let resp = app.get_token("scope=repository:acme/web/app:pull", Some(("rita", secret))).await;
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"registry-guard\"");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}));
        let resp = app.post_token(&[("grant_type", "password"), ("username", "rita"), ("password", secret)]).await;
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"error": "invalid_grant", "error_description": message}));
    }
    // A wrong password still gets the generic answer: revocation is not revealed to strangers.
    let resp = app.get_token("", Some(("rita", "wrong"))).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "invalid username or password");
    // Others are unaffected.
    assert_eq!(app.get_token("", Some(("alice", ALICE_PASSWORD))).await.status(), 200);
}

#[tokio::test]
async fn a_user_revoked_before_a_past_instant_can_log_in_again() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    // dev's tokens issued before 2020 are revoked; a login now is after the cutoff.
    let claims =
        token_claims(app.get_token("scope=repository:acme/web/app:pull", Some(("dev", DEV_PASSWORD))).await).await;
    assert_eq!(claims["sub"], "dev");
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]));
}

/// `password` grant with `access_type=offline`: the refresh token.
async fn refresh_token_of(app: &TestApp, user: &str, password: &str) -> String {
    let resp = app
        .post_token(&[
            ("grant_type", "password"),
            ("username", user),
            ("password", password),
            ("access_type", "offline"),
        ])
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["refresh_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn revoked_refresh_tokens_are_invalid_grant() {
    let app = spawn_with_bundle(&deploy_bundle(1)).await;
    let alice = refresh_token_of(&app, "alice", ALICE_PASSWORD).await;
    let alice_jti = token::verify::decode_unverified(&alice).unwrap()["jti"].as_str().unwrap().to_owned();
    let dev = refresh_token_of(&app, "dev", DEV_PASSWORD).await;
    for refresh in [&alice, &dev] {
        let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", refresh)]).await;
        assert_eq!(resp.status(), 200);
    }

    // Revision 2 revokes alice's refresh token by `jti`, and dev's tokens issued before an
    // instant an hour from now (so dev's refresh token, and a new login, are refused too).
    let mut bundle = deploy_bundle(2);
    bundle["revocations"]["jti"] = json!([alice_jti]);
    let cutoff = chrono::DateTime::from_timestamp(now() + 3600, 0).unwrap().to_rfc3339();
    bundle["revocations"]["users"][1]["issued_before"] = json!(cutoff);
    assert_eq!(app.put_bundle(sign_bundle_value(&bundle)).await.status(), 200);

    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &alice)]).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_description"], format!("invalid refresh token: token `{alice_jti}` is revoked"));
    // alice herself may still log in (only that token is revoked), and gets a fresh refresh token.
    let fresh = refresh_token_of(&app, "alice", ALICE_PASSWORD).await;
    assert_eq!(app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &fresh)]).await.status(), 200);

    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &dev)]).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert!(body["error_description"].as_str().unwrap().contains("tokens of `dev` issued before"), "{body}");
    let resp = app.get_token("", Some(("dev", DEV_PASSWORD))).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "access revoked for `dev`");
}

#[tokio::test]
async fn a_refresh_token_of_a_user_revoked_later_is_refused() {
    let app = spawn_in(config_with_bundle(None)).await;
    let rita = refresh_token_of(&app, "rita", RITA_PASSWORD).await;
    assert_eq!(app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &rita)]).await.status(), 200);
    assert_eq!(app.put_bundle(sign_bundle_value(&deploy_bundle(1))).await.status(), 200);
    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &rita)]).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "invalid refresh token: tokens of `rita` are revoked"})
    );
}
