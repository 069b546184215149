//! `GET /jwt/auth` (Docker token spec), `/jwks` and `/healthz`.

use registry_guard_core::request::scope::Resource;
use registry_guard_core::token;
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::verify::{TokenError, Verifier};
use serde_json::{json, Value};

use crate::helpers::*;

const SCOPE_WEB_PULL_PUSH: &str = "scope=repository:acme/web/app:pull,push";

#[tokio::test]
async fn password_token_carries_requested_intersect_permitted() {
    let app = spawn_app().await;
    let resp = app
        .get_token(
            &format!("service=container_registry&{SCOPE_WEB_PULL_PUSH}&client_id=docker&account=rita"),
            Some(("rita", RITA_PASSWORD)),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    let jwt = body["token"].as_str().unwrap();
    assert_eq!(body["access_token"], body["token"]);
    assert_eq!(body["expires_in"], 300);
    assert!(body["issued_at"].as_str().unwrap().ends_with('Z'), "{body}");
    assert!(body.get("refresh_token").is_none());

    let claims = token::verify::decode_unverified(jwt).unwrap();
    assert_eq!(claims["iss"], "registry-guard");
    assert_eq!(claims["sub"], "rita");
    assert_eq!(claims["aud"], "container_registry");
    assert_eq!(claims["auth_type"], "password");
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "acme/web/app", "actions": ["pull"],
                "meta": {"project_path": "acme/web", "access_level": 20}}])
    );
    let (iat, nbf, exp) =
        (claims["iat"].as_i64().unwrap(), claims["nbf"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
    assert_eq!(nbf, iat - 5);
    assert_eq!(exp, iat + 300);
    assert!((iat - now()).abs() < 60);

    let verified = app.verifier().await.verify(jwt, now()).unwrap();
    assert_eq!(verified.subject, "rita");
    assert_eq!(verified.granted(&Resource::Repository("acme/web/app".into())).to_string(), "pull");
}

#[tokio::test]
async fn scopes_repeat_and_split_on_spaces() {
    let app = spawn_app().await;
    let query = "scope=repository:acme/web/app:pull&scope=repository:acme/platform/api:pull%20repository:acme/web/app:push,delete&scope=registry:catalog:*";
    let body: Value = app.get_token(query, Some(("alice", ALICE_PASSWORD))).await.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    // alice is maintainer of acme: everything on its projects, but not the catalog.
    assert_eq!(
        claims["access"],
        json!([
            {"type": "repository", "name": "acme/web/app", "actions": ["pull", "push", "delete"],
             "meta": {"project_path": "acme/web", "access_level": 40}},
            {"type": "repository", "name": "acme/platform/api", "actions": ["pull"],
             "meta": {"project_path": "acme/platform", "access_level": 40}}
        ])
    );
    let body: Value =
        app.get_token("scope=registry:catalog:*", Some(("root", ROOT_PASSWORD))).await.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["access"], json!([{"type": "registry", "name": "catalog", "actions": ["*"]}]));
}

#[tokio::test]
async fn login_without_scope_gets_an_empty_access_list() {
    let app = spawn_app().await;
    let resp = app.get_token("service=container_registry&offline_token=true", Some(("alice", ALICE_PASSWORD))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["access"], json!([]));
    let refresh = token::verify::decode_unverified(body["refresh_token"].as_str().unwrap()).unwrap();
    assert_eq!(refresh["token_use"], "refresh");
}

#[tokio::test]
async fn personal_access_token_login() {
    let app = spawn_app().await;
    let resp = app.get_token(SCOPE_WEB_PULL_PUSH, Some(("rita", RITA_PAT))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["auth_type"], "pat");
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]));
    let user = token::verify::decode_unverified(claims["user"].as_str().unwrap()).unwrap();
    assert_eq!(user["user_info"], json!({"token_type": "pat", "username": "rita", "user_id": 2}));

    // Someone else's token, and an expired token, are refused with the same message.
    for (user, secret) in [("alice", RITA_PAT), ("rita", RITA_OLD_PAT)] {
        let resp = app.get_token(SCOPE_WEB_PULL_PUSH, Some((user, secret))).await;
        assert_eq!(resp.status(), 401, "{user}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["errors"][0]["message"], "invalid username or password");
    }
}

#[tokio::test]
async fn nested_user_jwt_carries_user_info() {
    let app = spawn_app().await;
    let body: Value = app.get_token("", Some(("alice", ALICE_PASSWORD))).await.json().await.unwrap();
    let jwt = body["token"].as_str().unwrap();
    let claims = token::verify::decode_unverified(jwt).unwrap();
    let user_jwt = claims["user"].as_str().unwrap();
    let user = token::verify::decode_unverified(user_jwt).unwrap();
    assert_eq!(user["user_info"], json!({"token_type": "password", "username": "alice", "user_id": 1}));
    // Issued with the token, valid `user_jwt_reuse_seconds` (default 60) longer (it may be reused by the
    // principal's next tokens and must cover them).
    let reuse = registry_guard_token_service::issue::DEFAULT_USER_JWT_REUSE_SECONDS;
    let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(user["iat"], claims["iat"]);
    assert_eq!(user["nbf"], claims["nbf"]);
    assert_eq!(user["exp"].as_i64().unwrap() - user["iat"].as_i64().unwrap(), ttl + reuse);
    assert!(user["exp"].as_i64().unwrap() >= claims["exp"].as_i64().unwrap());
    assert_eq!(user["jti"].as_str().unwrap().len(), 32);
    assert_ne!(user["jti"], claims["jti"]);
    // Signed by the same key: its header names the same key id.
    let verified = app.verifier().await.verify(jwt, now()).unwrap();
    assert_eq!(verified.user.as_deref(), Some(user_jwt));
    assert_eq!(header_kid(user_jwt), verified.kid);
    // The next token of the same principal: a new token (own jti) around the same `user` JWT.
    let again: Value = app.get_token("", Some(("alice", ALICE_PASSWORD))).await.json().await.unwrap();
    let again_claims = token::verify::decode_unverified(again["token"].as_str().unwrap()).unwrap();
    assert_ne!(again_claims["jti"], claims["jti"]);
    let again_user = again_claims["user"].as_str().unwrap();
    if again_claims["iat"].as_i64().unwrap() <= user["iat"].as_i64().unwrap() + reuse {
        assert_eq!(again_user, user_jwt);
    }
    let again_user = token::verify::decode_unverified(again_user).unwrap();
    assert!(again_user["exp"].as_i64().unwrap() >= again_claims["exp"].as_i64().unwrap());
    assert!(again_user["nbf"].as_i64().unwrap() <= again_claims["nbf"].as_i64().unwrap());
}

#[tokio::test]
async fn without_reuse_every_token_gets_its_own_user_jwt() {
    let app = spawn_app_with(&principals(), Some(r#"{"user_jwt_reuse_seconds": 0}"#)).await;
    let mut users = vec![];
    for _ in 0..2 {
        let body: Value = app.get_token("", Some(("alice", ALICE_PASSWORD))).await.json().await.unwrap();
        let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
        let user_jwt = claims["user"].as_str().unwrap().to_owned();
        let user = token::verify::decode_unverified(&user_jwt).unwrap();
        for field in ["exp", "iat", "nbf"] {
            assert_eq!(user[field], claims[field], "{field}");
        }
        users.push(user_jwt);
    }
    assert_ne!(users[0], users[1]);
}

fn header_kid(jwt: &str) -> String {
    use base64::Engine as _;
    let header = jwt.split('.').next().unwrap();
    let header: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_one_message() {
    let app = spawn_app().await;
    for (user, secret) in [("alice", "wrong"), ("nobody", "whatever"), ("nopassword", "x")] {
        let resp = app.get_token(SCOPE_WEB_PULL_PUSH, Some((user, secret))).await;
        assert_eq!(resp.status(), 401, "{user}");
        assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"registry-guard\"");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body, json!({"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]}));
    }
}

#[tokio::test]
async fn missing_credentials_get_a_basic_challenge() {
    let app = spawn_app().await;
    let resp = app.get_token(SCOPE_WEB_PULL_PUSH, None).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"registry-guard\"");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required: use HTTP Basic auth with a username and a password or personal access token"}]})
    );
}

#[tokio::test]
async fn bad_requests_are_400_with_json() {
    let app = spawn_app().await;
    let creds = Some(("alice", ALICE_PASSWORD));
    let resp = app.get_token("scope=repository:Acme/Web:pull", creds).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "INVALID_SCOPE");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("`repository:Acme/Web:pull`"), "{body}");

    let resp = app.get_token("service=other_registry&scope=repository:acme/web/app:pull", creds).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("`other_registry`"), "{body}");

    let resp = app.get_token("service=container_registry&service=container_registry", creds).await;
    assert_eq!(resp.status(), 400);
    let resp = app.get_token("account=rita", creds).await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn jwks_verifies_issued_tokens_and_only_those() {
    let app = spawn_app().await;
    let jwks: Value = app.client.get(format!("{}/jwks", app.address)).send().await.unwrap().json().await.unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["alg"], "ES256");
    assert!(key.get("d").is_none(), "private part leaked");
    let body: Value = app.get_token(SCOPE_WEB_PULL_PUSH, Some(("alice", ALICE_PASSWORD))).await.json().await.unwrap();
    let jwt = body["token"].as_str().unwrap();
    assert_eq!(header_kid(jwt), key["kid"].as_str().unwrap());
    assert!(app.verifier().await.verify(jwt, now()).is_ok());

    // Another service's key set does not verify it.
    let other = spawn_app().await;
    let err = other.verifier().await.verify(jwt, now()).unwrap_err();
    assert!(matches!(err, TokenError::UnknownKey(_)), "{err:?}");
    let wrong_audience = Verifier {
        keys: KeySet::from_jwks(&jwks).unwrap(),
        issuer: "registry-guard".into(),
        audience: "elsewhere".into(),
        leeway_seconds: 0,
    };
    assert!(matches!(wrong_audience.verify(jwt, now()), Err(TokenError::Audience(_))));
}

#[tokio::test]
async fn healthz_is_ok() {
    let app = spawn_app().await;
    let resp = app.client.get(format!("{}/healthz", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn settings_file_changes_issuer_service_and_ttl() {
    let settings = r#"{"issuer": "acme-auth", "service": "acme_registry", "token_ttl_seconds": 60}"#;
    let app = spawn_app_with(&principals(), Some(settings)).await;
    let resp = app.get_token("service=acme_registry", Some(("alice", ALICE_PASSWORD))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["expires_in"], 60);
    let claims = token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["iss"], "acme-auth");
    assert_eq!(claims["aud"], "acme_registry");
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 60);
    let resp = app.get_token("service=container_registry", Some(("alice", ALICE_PASSWORD))).await;
    assert_eq!(resp.status(), 400);
}
