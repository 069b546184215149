//! Key rotation with no failed request (docs/operations.md "Rotating the token signing key"): add a new
//! key (published, not signing) → push the JWKS to the filters → switch signing to the new
//! key → after the token lifetime, retire the old key — while pulls (fresh tokens every few
//! requests) and skopeo pushes go on. Every step is checked on the wire: which key signs,
//! which keys Envoy accepts.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use registry_guard_core::token::claims::{AccessClaim, Audience, RegistryClaims};
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_e2e::{Options, Stack};

const TTL: i64 = 10;
/// The filter's leeway in the harness (`--leeway-seconds 2`).
const LEEWAY: i64 = 2;

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A pull token for rita signed by `key`, valid for an hour: it outlives the rotation, so
/// only the key decides whether Envoy accepts it.
fn long_token(key: &SigningKey) -> String {
    let t = now();
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "rita".into(),
        aud: Audience::One("container_registry".into()),
        jti: format!("rotation-{}", key.kid),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: vec!["pull".into()],
            meta: None,
        }],
        auth_type: Some("password".into()),
        user: None,
        extra: Default::default(),
    };
    sign(key, claims, Validity { issued_at: t, not_before: t, expires_at: t + 3600 }).unwrap()
}

fn header_kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

fn load_key(path: &std::path::Path) -> SigningKey {
    use p256::pkcs8::DecodePrivateKey as _;
    let pem = std::fs::read_to_string(path).unwrap();
    SigningKey::new(p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap())
}

fn write_settings(stack: &Stack, keys: serde_json::Value) {
    let path = stack.config_dir.join("token-service.json");
    let mut settings: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let obj = settings.as_object_mut().unwrap();
    obj.remove("signing_key");
    obj.insert("signing_keys".into(), keys);
    std::fs::write(&path, serde_json::to_string_pretty(&settings).unwrap()).unwrap();
}

fn push_keys(stack: &Stack) {
    let envoy = format!("{}=http://127.0.0.1:{}", stack.ecds_file().display(), stack.admin_port);
    let jwks = format!("http://127.0.0.1:{}/jwks", stack.token_port);
    let out = stack.rgctl(&["push-keys", "--jwks", &jwks, "--envoy", &envoy]);
    eprintln!("$ rgctl push-keys --jwks {jwks} --envoy {envoy}\n{out}");
    assert!(out.contains("config_reload"), "{out}");
}

fn pull_status(stack: &Stack, token: &str) -> u16 {
    stack.request("GET", "/v2/acme/web/app/manifests/base", Some(token)).status
}

#[test]
fn rotating_the_signing_key_fails_no_request() {
    let stack = Arc::new(Stack::start_with(Options {
        token_ttl_seconds: Some(TTL),
        // One loopback client logs in hundreds of times a second here.
        per_client_login_rate: Some((100_000, 6_000_000)),
        ..Options::default()
    }));
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "base").status.success());
    let keys = stack.config_dir.join("keys");
    let old = load_key(&keys.join("signing-key.pem"));
    assert_eq!(stack.jwks_kids(), vec![old.kid.clone()]);
    let by_old = long_token(&old);
    assert_eq!(pull_status(&stack, &by_old), 200);

    // Load: pulls with a fresh token every 5 requests, and skopeo pushes of new tags.
    let stop = Arc::new(AtomicBool::new(false));
    let (pulls, pull_failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (pushes, push_failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let puller = {
        let (stack, stop, ok, failed) = (stack.clone(), stop.clone(), pulls.clone(), pull_failures.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let token = match stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("token request failed during rotation: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                for _ in 0..5 {
                    let r = stack.request("GET", "/v2/acme/web/app/manifests/base", Some(&token));
                    if r.status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("pull failed during rotation: {} {}", r.status, r.body);
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let pusher = {
        let (stack, stop, ok, failed) = (stack.clone(), stop.clone(), pushes.clone(), push_failures.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if stack.push("dev", "dev-pass", "acme/web/app", &format!("rotation-{n}")).status.success() {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // 1. Add the new key to the token service, published but not signing.
    stack.rgctl(&["keygen", "--out", &keys.display().to_string(), "--name", "next"]);
    let new = load_key(&keys.join("next-key.pem"));
    write_settings(
        &stack,
        serde_json::json!([{"path": "keys/signing-key.pem"}, {"path": "keys/next-key.pem", "active": false}]),
    );
    stack.reload_token_service_keys(&[old.kid.clone(), new.kid.clone()]);
    assert_eq!(header_kid(&stack.token("rita", "rita-pass", &[]).unwrap()), old.kid);
    let by_new = long_token(&new);
    assert_eq!(pull_status(&stack, &by_new), 401, "Envoy does not trust the new key yet");

    // 2. Push the published keys to every filter.
    push_keys(&stack);
    assert_eq!(pull_status(&stack, &by_new), 200);
    assert_eq!(pull_status(&stack, &by_old), 200);

    // 3. Switch signing: the newest active key signs.
    write_settings(&stack, serde_json::json!([{"path": "keys/signing-key.pem"}, {"path": "keys/next-key.pem"}]));
    stack.reload_token_service_keys(&[old.kid.clone(), new.kid.clone()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while header_kid(&stack.token("rita", "rita-pass", &[]).unwrap()) != new.kid {
        assert!(std::time::Instant::now() < deadline, "the token service did not switch to the new key");
        std::thread::sleep(Duration::from_millis(50));
    }
    let switched_at = now();

    // 4. Once every token signed by the old key has expired (ttl + leeway), retire it.
    std::thread::sleep(Duration::from_secs((TTL + LEEWAY + 1) as u64));
    assert!(now() >= switched_at + TTL + LEEWAY);
    write_settings(&stack, serde_json::json!([{"path": "keys/next-key.pem"}]));
    stack.reload_token_service_keys(std::slice::from_ref(&new.kid));
    push_keys(&stack);
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    puller.join().unwrap();
    pusher.join().unwrap();
    let (pulls, pull_failures) = (pulls.load(Ordering::Relaxed), pull_failures.load(Ordering::Relaxed));
    let (pushes, push_failures) = (pushes.load(Ordering::Relaxed), push_failures.load(Ordering::Relaxed));
    eprintln!("during the rotation: {pulls} pulls ({pull_failures} failed), {pushes} pushes ({push_failures} failed)");
    assert!(pulls > 100, "the pull loop ran ({pulls} pulls)");
    assert!(pushes >= 3, "the push loop ran ({pushes} pushes)");
    assert_eq!(pull_failures, 0);
    assert_eq!(push_failures, 0);

    // The old key is gone everywhere: a still-unexpired token it signed is refused.
    let r = stack.request("GET", "/v2/acme/web/app/manifests/base", Some(&by_old));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.www_authenticate.unwrap_or_default().contains("invalid_token"));
    assert_eq!(pull_status(&stack, &by_new), 200);
    // And the new key signs what real clients get.
    let out = stack.inspect("rita", "rita-pass", "acme/web/app", "base");
    assert!(out.status.success());
}
