//! Key rotation and key ids: the newest active key signs, every key of the ring is
//! published, a reload switches keys without a restart, and `kid_format: libtrust` puts the
//! libtrust key id in token headers.

use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_token_service::{generate_signing_key_pem, signing_key_from_pem, KeyReloader};
use serde_json::{json, Value};

use crate::helpers::*;

struct Ring {
    app: TestApp,
    reloader: KeyReloader,
    old: SigningKey,
    new: SigningKey,
}

/// A service whose directory holds `keys/signing-key.pem` (old) and `keys/next-key.pem`
/// (new), configured with `settings`.
async fn ring_app(settings: &Value) -> Ring {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), Some(&settings.to_string()));
    let next = generate_signing_key_pem();
    std::fs::write(dir.path().join("keys/next-key.pem"), &next).unwrap();
    let old = signing_key_from_pem(&std::fs::read_to_string(dir.path().join("keys/signing-key.pem")).unwrap()).unwrap();
    let new = signing_key_from_pem(&next).unwrap();
    let app = build(dir.path()).await.unwrap();
    let reloader = app.key_reloader();
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));
    let app = TestApp::attach(address, dir);
    Ring { app, reloader, old, new }
}

fn set_settings(app: &TestApp, settings: &Value) {
    std::fs::write(app.dir.path().join("token-service.json"), settings.to_string()).unwrap();
}

async fn jwks(app: &TestApp) -> Value {
    app.client.get(format!("{}/jwks", app.address)).send().await.unwrap().json().await.unwrap()
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

async fn token_kid(app: &TestApp) -> String {
    let resp = app.get_token("scope=repository:acme/web/app:pull", Some(("alice", ALICE_PASSWORD))).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    // Every token verifies against the published JWKS.
    let keys = KeySet::from_jwks(&jwks(app).await).unwrap();
    let verifier = registry_guard_core::token::verify::Verifier {
        keys,
        issuer: "registry-guard".into(),
        audience: "container_registry".into(),
        leeway_seconds: 5,
    };
    verifier.verify(&token, now()).unwrap().kid
}

#[tokio::test]
async fn rotation_publishes_then_switches_then_retires() {
    // 1. The new key is added, not yet active: published, not used.
    let step1 = json!({"signing_keys": [
        {"path": "keys/signing-key.pem"},
        {"path": "keys/next-key.pem", "active": false}
    ]});
    let Ring { app, reloader, old, new } = ring_app(&step1).await;
    assert_eq!(kids(&jwks(&app).await), vec![old.kid.clone(), new.kid.clone()]);
    assert_eq!(token_kid(&app).await, old.kid);
    let refresh_by_old = {
        let form = [
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", ALICE_PASSWORD),
            ("access_type", "offline"),
        ];
        let body: Value = app.post_token(&form).await.json().await.unwrap();
        body["refresh_token"].as_str().unwrap().to_owned()
    };
    // 3. Switch signing (both active: the newest signs), reloaded without a restart.
    set_settings(
        &app,
        &json!({"signing_keys": [
            {"path": "keys/signing-key.pem"},
            {"path": "keys/next-key.pem"}
        ]}),
    );
    assert_eq!(reloader.reload().unwrap(), (new.kid.clone(), 2));
    assert_eq!(token_kid(&app).await, new.kid);
    assert_eq!(kids(&jwks(&app).await), vec![old.kid.clone(), new.kid.clone()]);
    // A refresh token signed by the old key is still redeemed while the old key is published.
    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &refresh_by_old)]).await;
    assert_eq!(resp.status(), 200);
    // A broken ring is refused and the current keys stay.
    set_settings(&app, &json!({"signing_keys": [{"path": "keys/missing.pem"}]}));
    let e = reloader.reload().unwrap_err().to_string();
    assert!(e.contains("missing.pem"), "{e}");
    assert_eq!(token_kid(&app).await, new.kid);
    // 4. Retire the old key: no longer published, and what it signed is no longer accepted.
    set_settings(&app, &json!({"signing_keys": [{"path": "keys/next-key.pem"}]}));
    reloader.reload().unwrap();
    assert_eq!(kids(&jwks(&app).await), vec![new.kid.clone()]);
    assert_eq!(token_kid(&app).await, new.kid);
    let resp = app.post_token(&[("grant_type", "refresh_token"), ("refresh_token", &refresh_by_old)]).await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn libtrust_key_ids_in_headers_and_both_ids_in_the_jwks() {
    let Ring { app, old, .. } = ring_app(&json!({"kid_format": "libtrust"})).await;
    let libtrust = old.libtrust_kid();
    assert_eq!(libtrust.split(':').count(), 12);
    assert_eq!(token_kid(&app).await, libtrust);
    let resp = app.get_token("scope=repository:acme/web/app:pull", Some(("alice", ALICE_PASSWORD))).await;
    let body: Value = resp.json().await.unwrap();
    let header = body["token"].as_str().unwrap().split('.').next().unwrap().to_owned();
    let header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    assert_eq!(header, json!({"alg": "ES256", "kid": libtrust, "typ": "JWT"}));
    assert_eq!(kids(&jwks(&app).await), vec![old.thumbprint(), libtrust]);
}

#[tokio::test]
async fn bad_key_rings_are_refused_at_startup() {
    let cases = [
        (
            json!({"signing_key": "keys/signing-key.pem", "signing_keys": [{"path": "keys/signing-key.pem"}]}),
            "$.signing_keys: set either `signing_key` or `signing_keys`, not both",
        ),
        (json!({"signing_keys": []}), "$.signing_keys: must list at least one key"),
        (json!({"signing_keys": [{"path": "keys/signing-key.pem", "active": false}]}), "no key is `active`"),
        (
            json!({"signing_keys": [{"path": "keys/signing-key.pem"}, {"path": "keys/../keys/signing-key.pem"}]}),
            "$.signing_keys[1].path: ",
        ),
        (json!({"kid_format": "x5t"}), "$.kid_format: unknown variant `x5t`"),
    ];
    for (settings, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &principals(), Some(&settings.to_string()));
        let e = build(dir.path()).await.err().unwrap().to_string();
        assert!(e.contains(expected), "{settings}: {e}");
    }
}

/// `GET /jwks` carries an entity tag; `If-None-Match` with it is a 304 until the published
/// keys change (a reload that adds a key), then a 200 with a new tag.
#[tokio::test]
async fn jwks_has_an_etag_that_changes_with_the_published_keys() {
    let step1 = json!({"signing_keys": [{"path": "keys/signing-key.pem"}]});
    let Ring { app, reloader, old, new } = ring_app(&step1).await;
    let get = |etag: Option<String>| {
        let mut r = app.client.get(format!("{}/jwks", app.address));
        if let Some(e) = etag {
            r = r.header("if-none-match", e);
        }
        r.send()
    };
    let first = get(None).await.unwrap();
    assert_eq!(first.status(), 200);
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(kids(&first.json().await.unwrap()), vec![old.kid.clone()]);
    let again = get(Some(etag.clone())).await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(get(Some("\"other\"".into())).await.unwrap().status(), 200);
    set_settings(
        &app,
        &json!({"signing_keys": [{"path": "keys/signing-key.pem"}, {"path": "keys/next-key.pem", "active": false}]}),
    );
    reloader.reload().unwrap();
    let changed = get(Some(etag.clone())).await.unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(kids(&changed.json().await.unwrap()), vec![old.kid, new.kid]);
}
