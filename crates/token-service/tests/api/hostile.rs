//! Hostile clients: login rate limits and the bounded argon2 queue (429
//! `TOOMANYREQUESTS` with `Retry-After`), failed logins counted and logged without secrets,
//! scope and token size caps, unknown resource types ignored, refresh tokens bound to a
//! credential epoch, deploy tokens only inside projects, server timeouts and the connection
//! limit, and JWKS entries with private or weak keys refused by `kid`.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::*;

fn settings(extra: Value) -> String {
    extra.to_string()
}

async fn assert_throttled(resp: reqwest::Response) -> Value {
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS", "{body}");
    body
}

#[tokio::test]
async fn failed_logins_per_username_are_limited_and_successes_do_not_count() {
    let limits = json!({"login_limits": {"per_username": {"burst": 3, "per_minute": 1}}});
    let app = spawn_app_with(&principals(), Some(&settings(limits))).await;
    // Successful logins never use up the budget.
    for _ in 0..10 {
        assert_eq!(app.get_token("service=container_registry", Some(("alice", ALICE_PASSWORD))).await.status(), 200);
    }
    for _ in 0..3 {
        let resp = app.get_token("service=container_registry", Some(("alice", "guess-1"))).await;
        assert_eq!(resp.status(), 401);
    }
    // The fourth wrong password, and now also the right one, wait (no argon2 run).
    assert_throttled(app.get_token("service=container_registry", Some(("alice", "guess-4"))).await).await;
    let body =
        assert_throttled(app.get_token("service=container_registry", Some(("alice", ALICE_PASSWORD))).await).await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("failed logins"), "{body}");
    // POST (password grant) gets the same 429, readable as OAuth2 too.
    let form = [("grant_type", "password"), ("username", "alice"), ("password", ALICE_PASSWORD)];
    let body = assert_throttled(app.post_token(&form).await).await;
    assert_eq!(body["error"], "too_many_requests");
    // Another user is not affected.
    assert_eq!(app.get_token("service=container_registry", Some(("dev", DEV_PASSWORD))).await.status(), 200);
    // Counted, and logged with username, client and reason; never the secret.
    let stats: Value = app.client.get(format!("{}/stats", app.address)).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["failed_logins"], 3, "{stats}");
    assert!(stats["throttled_username"].as_u64().unwrap() >= 3, "{stats}");
    let logs = captured_logs();
    assert!(
        logs.contains("login failed: username=\"alice\" client=127.0.0.1 grant=basic reason=invalid_credentials"),
        "{logs}"
    );
    assert!(!logs.contains("guess-1") && !logs.contains(ALICE_PASSWORD));
}

#[tokio::test]
async fn deploy_token_and_pat_guesses_are_limited_too() {
    let dir = config_with_bundle(Some(&sign_bundle_value(&deploy_bundle(1))));
    let limits = json!({"bundle_keys": "keys/operator-jwks.json", "login_limits": {"per_username": {"burst": 2, "per_minute": 1}}});
    std::fs::write(dir.path().join("token-service.json"), limits.to_string()).unwrap();
    let app = spawn_in(dir).await;
    for _ in 0..2 {
        assert_eq!(app.get_token("service=container_registry", Some(("acme-ci", "wrong"))).await.status(), 401);
    }
    assert_throttled(app.get_token("service=container_registry", Some(("acme-ci", ACME_CI_SECRET))).await).await;
    for _ in 0..2 {
        assert_eq!(app.get_token("service=container_registry", Some(("rita", "glpat-wrong"))).await.status(), 401);
    }
    assert_throttled(app.get_token("service=container_registry", Some(("rita", RITA_PAT))).await).await;
}

#[tokio::test]
async fn requests_per_client_are_limited() {
    let limits = json!({"login_limits": {"per_client": {"burst": 5, "per_minute": 1}}});
    let app = spawn_app_with(&principals(), Some(&settings(limits))).await;
    for _ in 0..5 {
        assert_eq!(app.get_token("service=container_registry", Some(("alice", ALICE_PASSWORD))).await.status(), 200);
    }
    let body =
        assert_throttled(app.get_token("service=container_registry", Some(("alice", ALICE_PASSWORD))).await).await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("this client"), "{body}");
    // Refresh grants count against the client as well.
    let form = [("grant_type", "refresh_token"), ("refresh_token", "x.y.z")];
    assert_throttled(app.post_token(&form).await).await;
}

/// A user whose argon2 hash is expensive (about 0.1–0.5 s here), first in the file so that it
/// is also the decoy hash unknown users are checked against.
fn principals_with_slow_hash() -> Value {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(8 * 1024, 2, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"slow-salt-16byte").unwrap();
    let hash = argon.hash_password(b"slow-password", &salt).unwrap().to_string();
    let mut p = principals();
    p["users"].as_array_mut().unwrap().insert(0, json!({"id": 9, "username": "slow", "password_hash": hash}));
    p
}

#[tokio::test]
async fn the_argon2_queue_is_bounded() {
    let limits = json!({"login_limits": {
        "argon2_slots": 1, "argon2_queue": 2, "argon2_queue_timeout_ms": 20000,
        "per_username": {"burst": 1000, "per_minute": 1000}, "per_client": {"burst": 1000, "per_minute": 1000}
    }});
    let app = spawn_app_with(&principals_with_slow_hash(), Some(&settings(limits))).await;
    let started = Instant::now();
    let requests = (0..12).map(|i| {
        let app = &app;
        async move {
            let user = format!("nobody-{i}");
            app.get_token("service=container_registry", Some((&user, "wrong"))).await.status().as_u16()
        }
    });
    let statuses: Vec<u16> = futures_join_all(requests).await;
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    let refused = statuses.iter().filter(|s| **s == 401).count();
    // One runs, two wait, the rest are refused at once.
    assert!(throttled >= 6, "{statuses:?}");
    assert_eq!(throttled + refused, 12, "{statuses:?}");
    let stats: Value = app.client.get(format!("{}/stats", app.address)).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["argon2_queue_full"].as_u64().unwrap() as usize, throttled, "{stats}");
    eprintln!("12 concurrent slow logins: {statuses:?} in {:?}", started.elapsed());
}

/// `join_all` without a futures dependency: polls the futures on one task.
async fn futures_join_all<F: std::future::Future<Output = u16>>(futures: impl Iterator<Item = F>) -> Vec<u16> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut out = vec![0; handles.len()];
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> = handles.into_iter().enumerate().collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                out[*i] = v;
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out
}

#[tokio::test]
async fn scopes_per_request_and_token_size_are_capped() {
    // A project and 64 long repository names under it; root (admin) is granted all of them.
    let mut p = principals();
    p["projects"].as_array_mut().unwrap().push(json!({"path": "acme/big"}));
    let app = spawn_app_with(&p, None).await;
    let long = |i: usize| format!("acme/big/{}-{i}", "r".repeat(200));
    let many: Vec<String> = (0..64).map(|i| format!("repository:{}:pull,push,delete", long(i))).collect();
    let form = [("grant_type", "password"), ("username", "root"), ("password", ROOT_PASSWORD)];
    let mut with_scopes = form.to_vec();
    let joined = many.join(" ");
    with_scopes.push(("scope", &joined));
    let resp = app.post_token(&with_scopes).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_scope", "{body}");
    let text = body["error_description"].as_str().unwrap();
    assert!(text.contains("more than the 16384 bytes the registry accepts"), "{text}");
    // One scope more than the cap is refused before anything is granted.
    let sixty_five = format!("{joined} repository:acme/web/app:pull");
    let mut over = form.to_vec();
    over.push(("scope", &sixty_five));
    let resp = app.post_token(&over).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error_description"].as_str().unwrap().contains("at most 64"), "{body}");
    // GET: Docker error body.
    let query: String = many.iter().take(64).map(|s| format!("scope={s}&")).collect();
    let resp = app.get_token(&format!("{query}service=container_registry"), Some(("root", ROOT_PASSWORD))).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "INVALID_SCOPE", "{body}");
    // A few of them fit.
    let few = many[..4].join(" ");
    let claims = app.access("root", ROOT_PASSWORD, &few).await;
    assert_eq!(claims.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn unknown_resource_types_are_ignored() {
    let app = spawn_app().await;
    let resp = app
        .get_token(
            "service=container_registry&scope=repository(plugin):acme/web/app:pull&scope=foo:bar:pull&scope=repository:acme/web/app:pull",
            Some(("alice", ALICE_PASSWORD)),
        )
        .await;
    let claims = token_claims(resp).await;
    let access = claims["access"].as_array().unwrap();
    assert_eq!(access.len(), 1, "{claims}");
    assert_eq!(access[0]["name"], "acme/web/app");
}

async fn refresh_token_for(app: &TestApp, form: &[(&str, &str)]) -> String {
    let resp = app.post_token(form).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["refresh_token"].as_str().unwrap().to_owned()
}

async fn redeem(app: &TestApp, refresh: &str) -> reqwest::Response {
    app.post_token(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("scope", "repository:acme/web/app:pull"),
    ])
    .await
}

#[tokio::test]
async fn a_password_reset_ends_refresh_tokens() {
    let app = spawn_app().await;
    let form =
        [("grant_type", "password"), ("username", "alice"), ("password", ALICE_PASSWORD), ("access_type", "offline")];
    let refresh = refresh_token_for(&app, &form).await;
    assert_eq!(redeem(&app, &refresh).await.status(), 200);
    // Restarted with the same principals: still valid.
    let app = app.restart().await;
    assert_eq!(redeem(&app, &refresh).await.status(), 200);
    // alice's password is reset.
    let mut p = principals();
    p["users"][0]["password_hash"] = hash_password("alice-new-password").into();
    std::fs::write(app.dir.path().join("principals.json"), p.to_string()).unwrap();
    let app = app.restart().await;
    let resp = redeem(&app, &refresh).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error_description"].as_str().unwrap().contains("has changed"), "{body}");
}

#[tokio::test]
async fn a_replaced_personal_access_token_ends_its_refresh_tokens() {
    let app = spawn_app().await;
    let form = [("grant_type", "password"), ("username", "rita"), ("password", RITA_PAT), ("access_type", "offline")];
    let refresh = refresh_token_for(&app, &form).await;
    assert_eq!(redeem(&app, &refresh).await.status(), 200);
    // The PAT named `ci` is replaced by a new one with the same name.
    let mut p = principals();
    p["users"][1]["personal_access_tokens"][0]["sha256"] = sha256_hex("glpat-rita-new").into();
    std::fs::write(app.dir.path().join("principals.json"), p.to_string()).unwrap();
    let app = app.restart().await;
    assert_eq!(redeem(&app, &refresh).await.status(), 401);
}

#[tokio::test]
async fn a_re_created_user_does_not_inherit_refresh_tokens() {
    let app = spawn_app().await;
    let form =
        [("grant_type", "password"), ("username", "alice"), ("password", ALICE_PASSWORD), ("access_type", "offline")];
    let refresh = refresh_token_for(&app, &form).await;
    let mut p = principals();
    p["users"][0]["id"] = 100.into();
    std::fs::write(app.dir.path().join("principals.json"), p.to_string()).unwrap();
    let app = app.restart().await;
    assert_eq!(redeem(&app, &refresh).await.status(), 401);
}

#[tokio::test]
async fn a_replaced_deploy_token_ends_its_refresh_tokens_and_grants_stay_inside_projects() {
    // `acme-ci` is renamed `ci-replaced` here, so the shared log other tests read is not
    // mixed with this test's issuance lines.
    let mut bundle = deploy_bundle(1);
    bundle["deploy_tokens"][0]["username"] = "ci-replaced".into();
    let app = spawn_with_bundle(&bundle).await;
    let form = [
        ("grant_type", "password"),
        ("username", "ci-replaced"),
        ("password", ACME_CI_SECRET),
        ("access_type", "offline"),
    ];
    let refresh = refresh_token_for(&app, &form).await;
    assert_eq!(redeem(&app, &refresh).await.status(), 200);
    // Deploy tokens only inside projects: `acme/rogue` belongs to no project.
    let claims = app
        .access("ci-replaced", ACME_CI_SECRET, "repository:acme/rogue:pull,push repository:acme/web/app:pull,push")
        .await;
    assert_eq!(
        claims,
        json!([{"type": "repository", "name": "acme/web/app", "actions": ["pull", "push"], "meta": {"project_path": "acme/web"}}])
    );
    // The JWT names the deploy token's id.
    let resp = app.get_token("service=container_registry", Some(("ci-replaced", ACME_CI_SECRET))).await;
    let user = token_claims(resp).await["user"].as_str().unwrap().to_owned();
    let user = registry_guard_core::token::verify::decode_unverified(&user).unwrap();
    assert_eq!(user["user_info"]["deploy_token_id"], 1);
    // Replaced: same username, new id and secret.
    let mut bundle = deploy_bundle(2);
    bundle["deploy_tokens"][0]["username"] = "ci-replaced".into();
    bundle["deploy_tokens"][0]["id"] = 11.into();
    bundle["deploy_tokens"][0]["sha256"] = sha256_hex("gldt-acme-ci-new").into();
    assert_eq!(app.put_bundle(sign_bundle_value(&bundle)).await.status(), 200);
    assert_eq!(redeem(&app, &refresh).await.status(), 401);
    assert_eq!(
        app.get_token("service=container_registry", Some(("ci-replaced", "gldt-acme-ci-new"))).await.status(),
        200
    );
}

// Multi-threaded: the test blocks on std sockets while the server runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_cut_and_connections_are_limited() {
    let limits = json!({"server": {"header_read_timeout_ms": 500, "max_connections": 3}});
    let app = spawn_app_with(&principals(), Some(&settings(limits))).await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    // A slow client sends half a header and stops: closed after the header timeout.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(4), "{waited:?}");
    assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    // Connection limit: three idle connections are held, a fourth is closed at once.
    let held: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut fourth = std::net::TcpStream::connect(&addr).unwrap();
    fourth.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = fourth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let started = Instant::now();
    let n = fourth.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(held);
    // Idle connections are closed by the same timeout, and then the service answers again.
    std::thread::sleep(Duration::from_millis(800));
    let resp = app.client.get(format!("{}/healthz", app.address)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn operator_keys_with_private_material_are_refused_naming_the_key() {
    let dir = config_with_bundle(None);
    let mut jwk = operator_key().public_jwk_as("operator-2026");
    jwk["d"] = "c2VjcmV0".into();
    std::fs::write(dir.path().join("keys/operator-jwks.json"), json!({"keys": [jwk]}).to_string()).unwrap();
    let err = build(dir.path()).await.err().unwrap().to_string();
    assert!(err.contains("key `operator-2026` carries private key material (`d`)"), "{err}");
}
