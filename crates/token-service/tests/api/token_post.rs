//! `POST /jwt/auth` (OAuth2 form): password and refresh_token grants.

use registry_guard_core::token;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn password_grant_offline_then_refresh_token_grant() {
    let app = spawn_app().await;
    let resp = app
        .post_token(&[
            ("grant_type", "password"),
            ("username", "rita"),
            ("password", RITA_PASSWORD),
            ("service", "container_registry"),
            ("client_id", "docker"),
            ("access_type", "offline"),
            ("scope", "repository:acme/web/app:pull,push repository:acme/platform/api:pull"),
        ])
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["sub"], "rita");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "acme/web/app", "actions": ["pull"],
                "meta": {"project_path": "acme/web", "access_level": 20}}])
    );
    let refresh = body["refresh_token"].as_str().unwrap();
    let refresh_claims = token::verify::decode_unverified(refresh).unwrap();
    assert_eq!(refresh_claims["token_use"], "refresh");
    assert_eq!(refresh_claims["auth_type"], "password");
    assert_eq!(refresh_claims["aud"], "container_registry#refresh");
    // The filter's verifier (audience = the registry service) refuses a refresh token as a
    // bearer token: it is only good at the token endpoint.
    assert!(matches!(app.verifier().await.verify(refresh, now()), Err(token::verify::TokenError::Audience(_))));
    assert_eq!(refresh_claims["exp"].as_i64().unwrap() - refresh_claims["iat"].as_i64().unwrap(), 30 * 24 * 3600);

    let resp = app
        .post_token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("service", "container_registry"),
            ("client_id", "docker"),
            ("scope", "repository:acme/web/app:pull"),
        ])
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("refresh_token").is_none());
    let jwt = body["token"].as_str().unwrap();
    let verified = app.verifier().await.verify(jwt, now()).unwrap();
    assert_eq!(verified.subject, "rita");
    assert_eq!(verified.auth_type.as_deref(), Some("password"));
    let claims = token::verify::decode_unverified(jwt).unwrap();
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]));
}

#[tokio::test]
async fn refresh_grant_refuses_access_tokens_and_garbage() {
    let app = spawn_app().await;
    let body: Value = app
        .post_token(&[("grant_type", "password"), ("username", "alice"), ("password", ALICE_PASSWORD)])
        .await
        .json()
        .await
        .unwrap();
    assert!(body.get("refresh_token").is_none());
    let access_token = body["access_token"].as_str().unwrap();
    for candidate in [access_token, "not.a.jwt", "x"] {
        let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", candidate)]).await;
        assert_eq!(resp.status(), 401, "{candidate}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_grant");
    }
    // A refresh token from another instance (another key) is refused too.
    let other = spawn_app().await;
    let body: Value = other
        .post_token(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", ALICE_PASSWORD),
            ("access_type", "offline"),
        ])
        .await
        .json()
        .await
        .unwrap();
    let foreign = body["refresh_token"].as_str().unwrap();
    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", foreign)]).await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn pat_refresh_token_follows_the_pat() {
    let app = spawn_app().await;
    let body: Value = app
        .post_token(&[
            ("grant_type", "password"),
            ("username", "rita"),
            ("password", RITA_PAT),
            ("access_type", "offline"),
        ])
        .await
        .json()
        .await
        .unwrap();
    let refresh = body["refresh_token"].as_str().unwrap();
    let claims = token::verify::decode_unverified(refresh).unwrap();
    assert_eq!(claims["auth_type"], "pat");
    assert_eq!(claims["pat_name"], "ci");
    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", refresh)]).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["auth_type"], "pat");
}

#[tokio::test]
async fn wrong_credentials_are_invalid_grant() {
    let app = spawn_app().await;
    for (user, password) in [("alice", "wrong"), ("ghost", "x")] {
        let resp = app.post_token(&[("grant_type", "password"), ("username", user), ("password", password)]).await;
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"error": "invalid_grant", "error_description": "invalid username or password"}));
    }
}

#[tokio::test]
async fn unsupported_grant_type_and_bad_forms_are_400() {
    let app = spawn_app().await;
    let resp = app.post_token(&[("grant_type", "client_credentials")]).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_grant_type");

    let cases: [&[(&str, &str)]; 4] = [
        &[("username", "alice")],
        &[("grant_type", "password"), ("username", "alice")],
        &[("grant_type", "password"), ("username", "alice"), ("password", ALICE_PASSWORD), ("service", "nope")],
        &[("grant_type", "refresh_token")],
    ];
    for form in cases {
        let resp = app.post_token(form).await;
        assert_eq!(resp.status(), 400, "{form:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{form:?}");
    }
    let resp = app
        .post_token(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", ALICE_PASSWORD),
            ("scope", "repository:acme:fly"),
        ])
        .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope");

    let resp = app
        .client
        .post(format!("{}/jwt/auth", app.address))
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"password"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}
