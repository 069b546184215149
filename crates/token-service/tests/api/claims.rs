//! Additional claims in issued tokens: the merged claims of the requested
//! repository's hierarchy; only the claims every repository agrees on when a token covers
//! several; nothing extra without them; a bundle push changes them for the next token.

use serde_json::{json, Value};

use crate::helpers::*;

const BUILT_IN: [&str; 10] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access", "auth_type", "user"];

fn claims_bundle(revision: u64) -> Value {
    let mut bundle = deploy_bundle(revision);
    bundle["additional_claims"] = json!([
        {"group": "acme", "claims": {
            "tenant": {"value": "acme"},
            "cost_center": {"value": "cc-100", "mutable": true}
        }},
        {"project": "acme/web", "claims": {
            "cost_center": {"value": "cc-web"},
            "aws_role": {"value": "arn:aws:iam::123456789012:role/web-pull"}
        }}
    ]);
    bundle
}

async fn claims_of(app: &TestApp, user: &str, password: &str, scope: &str) -> Value {
    let query = scope.split(' ').map(|s| format!("scope={s}")).collect::<Vec<_>>().join("&");
    token_claims(app.get_token(&query, Some((user, password))).await).await
}

fn extra(claims: &Value) -> Value {
    let mut v = claims.clone();
    for name in BUILT_IN {
        v.as_object_mut().unwrap().remove(name);
    }
    v
}

#[tokio::test]
async fn tokens_carry_the_merged_claims_of_their_repository() {
    let app = spawn_with_bundle(&claims_bundle(1)).await;
    let c = claims_of(&app, "alice", ALICE_PASSWORD, "repository:acme/web/app:pull").await;
    assert_eq!(
        extra(&c),
        json!({"tenant": "acme", "cost_center": "cc-web", "aws_role": "arn:aws:iam::123456789012:role/web-pull"})
    );
    // Built-in claims stay the service's own.
    assert_eq!(c["iss"], "registry-guard");
    assert_eq!(c["aud"], "container_registry");
    assert_eq!(c["sub"], "alice");
    let c = claims_of(&app, "alice", ALICE_PASSWORD, "repository:acme/platform/api:pull").await;
    assert_eq!(extra(&c), json!({"tenant": "acme", "cost_center": "cc-100"}));
    // Deploy tokens get the same claims for the same repository.
    let c = claims_of(&app, "acme-ci", ACME_CI_SECRET, "repository:acme/web/app:pull").await;
    assert_eq!(extra(&c)["aws_role"], "arn:aws:iam::123456789012:role/web-pull");
    // The token still verifies with the service's keys.
    let token = app.get_token("scope=repository:acme/web/app:pull", Some(("alice", ALICE_PASSWORD))).await;
    let body: Value = token.json().await.unwrap();
    app.verifier().await.verify(body["token"].as_str().unwrap(), now()).unwrap();
}

#[tokio::test]
async fn several_repositories_share_only_the_claims_they_agree_on() {
    let app = spawn_with_bundle(&claims_bundle(1)).await;
    let c = claims_of(&app, "alice", ALICE_PASSWORD, "repository:acme/web/app:pull repository:acme/platform/api:pull")
        .await;
    assert_eq!(c["access"].as_array().unwrap().len(), 2);
    assert_eq!(extra(&c), json!({"tenant": "acme"}), "cost_center differs, aws_role is only on acme/web");
    // A repository that is not granted does not count: the project deploy token of acme/web
    // asks for acme/platform too, gets only acme/web, and so acme/web's claims.
    let c =
        claims_of(&app, "deploy-token-3", WEB_SECRET, "repository:acme/web/app:pull repository:acme/platform/api:pull")
            .await;
    assert_eq!(c["access"].as_array().unwrap().len(), 1);
    assert_eq!(extra(&c)["cost_center"], "cc-web");
}

#[tokio::test]
async fn without_additional_claims_tokens_carry_only_built_in_claims() {
    // No bundle at all, a bundle without claims, and a login token with no scope.
    let plain = spawn_app().await;
    let with_bundle = spawn_with_bundle(&deploy_bundle(1)).await;
    let with_claims = spawn_with_bundle(&claims_bundle(1)).await;
    for (app, scope) in [
        (&plain, "repository:acme/web/app:pull"),
        (&with_bundle, "repository:acme/web/app:pull"),
        (&with_claims, ""),
        (&with_claims, "repository:other/x:pull"),
    ] {
        let query = if scope.is_empty() { String::new() } else { format!("scope={scope}") };
        let c = token_claims(app.get_token(&query, Some(("alice", ALICE_PASSWORD))).await).await;
        let names: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert!(names.iter().all(|n| BUILT_IN.contains(&n.as_str())), "{scope}: {names:?}");
    }
}

#[tokio::test]
async fn a_new_bundle_changes_the_claims_of_the_next_token() {
    let app = spawn_with_bundle(&claims_bundle(1)).await;
    let mut next = claims_bundle(2);
    next["additional_claims"][0]["claims"]["tenant"]["value"] = json!("acme-2");
    assert_eq!(app.put_bundle(sign_bundle_value(&next)).await.status(), 200);
    let c = claims_of(&app, "alice", ALICE_PASSWORD, "repository:acme/web/app:pull").await;
    assert_eq!(c["tenant"], "acme-2");
    // A violating bundle is refused with level, claim and rule; revision 2 stays active.
    let mut bad = claims_bundle(3);
    bad["additional_claims"][1]["claims"]["tenant"] = json!({"value": "web"});
    let resp = app.put_bundle(sign_raw(&bad, &operator_key())).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["path"], "$.additional_claims[1].claims.tenant");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.starts_with("project `acme/web`: claim `tenant` is immutable"), "{reason}");
    assert_eq!(body["active_revision"], 2);
}
