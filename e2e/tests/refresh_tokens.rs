//! Refresh tokens (`offline_token=true` / `access_type=offline`) against the real stack: never
//! usable as a bearer token at Envoy (audience `<service>#refresh`), redeemable at the token
//! service, and revocable through a pushed bundle like any other credential — by `jti`, by
//! user, and by deploy token.

use registry_guard_e2e::Stack;
use serde_json::{json, Value};

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{secret}")))
}

/// `GET /jwt/auth?offline_token=true` → (access token, refresh token).
fn offline_login(stack: &Stack, user: &str, secret: &str) -> (String, String) {
    let resp = ureq::get(&stack.realm())
        .query("service", "container_registry")
        .query("scope", "repository:acme/web/app:pull")
        .query("offline_token", "true")
        .set("Authorization", &basic(user, secret))
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    (v["token"].as_str().unwrap().to_owned(), v["refresh_token"].as_str().unwrap().to_owned())
}

/// `POST /jwt/auth` `grant_type=refresh_token` → status and body.
fn redeem(stack: &Stack, refresh: &str) -> (u16, Value) {
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("service", "container_registry"),
        ("scope", "repository:acme/web/app:pull"),
    ];
    let (status, text) = match ureq::post(&stack.realm()).send_form(&form) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("POST {}: {e}", stack.realm()),
    };
    (status, serde_json::from_str(&text).unwrap())
}

fn jti(token: &str) -> String {
    registry_guard_core::token::verify::decode_unverified(token).unwrap()["jti"].as_str().unwrap().to_owned()
}

fn example_bundle(revision: u64) -> Value {
    let path = registry_guard_e2e::root().join("policies/example/bundle.json");
    let mut b: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    b["revision"] = json!(revision);
    b
}

#[test]
fn refresh_tokens_are_revocable_through_the_bundle() {
    let stack = Stack::start();
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "base").status.success());
    let b1 = stack.sign_bundle("r1", &example_bundle(1));
    assert!(stack.push_bundle(&b1, &[]).status.success());

    let (_, dev_refresh) = offline_login(&stack, "dev", "dev-pass");
    let (_, rita_refresh) = offline_login(&stack, "rita", "rita-pass");
    let (_, ci_refresh) = offline_login(&stack, "acme-ci", "gldt-acme-ci-rw");

    // A refresh token is not a registry token: Envoy refuses it as a bearer.
    let r = stack.request("GET", "/v2/acme/web/app/manifests/base", Some(&dev_refresh));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.www_authenticate.unwrap_or_default().contains("invalid_token"));
    // Redeemed, each gives a token that pulls.
    for refresh in [&dev_refresh, &rita_refresh, &ci_refresh] {
        let (status, body) = redeem(&stack, refresh);
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/base", Some(token)).status, 200);
    }

    // Revision 2 revokes dev's refresh token by jti, all of rita's tokens, and deploy token 1.
    let mut b2 = example_bundle(2);
    b2["revocations"] = json!({"jti": [jti(&dev_refresh)], "users": [{"username": "rita"}], "deploy_tokens": [1]});
    assert!(stack.push_bundle(&stack.sign_bundle("r2", &b2), &[]).status.success());
    let cases = [
        (&dev_refresh, format!("invalid refresh token: token `{}` is revoked", jti(&dev_refresh))),
        (&rita_refresh, "invalid refresh token: tokens of `rita` are revoked".to_owned()),
        (&ci_refresh, "invalid refresh token: its deploy token is revoked".to_owned()),
    ];
    for (refresh, message) in cases {
        let (status, body) = redeem(&stack, refresh);
        assert_eq!(status, 401, "{body}");
        assert_eq!(body, json!({"error": "invalid_grant", "error_description": message}));
    }
    // Only that one token of dev's is revoked: a new login and its refresh token work.
    let (_, fresh) = offline_login(&stack, "dev", "dev-pass");
    assert_eq!(redeem(&stack, &fresh).0, 200);
}
