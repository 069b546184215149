//! Key rotation through the JWKS URL (docs/operations.md "Rotating the token signing key",
//! docs/fleet.md): two Envoys whose filters fetch their trusted keys from the token service's
//! `/jwks` (`keys_source`, refreshed every second). Add a new key (published, not signing) →
//! wait until every filter VM of both Envoys holds it → switch signing → after the token
//! lifetime, retire the old key — with no `rgctl push-keys` anywhere, while pulls (fresh
//! tokens every few requests) and skopeo pushes go on through both Envoys: zero failed
//! requests. Afterwards a token signed by the retired key is refused; anonymous and forged
//! requests are refused throughout; with the token service down, the last known good keys
//! keep deciding. The figures (requests, failures, time until each Envoy picked up each
//! change) are printed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_guard_core::token::claims::{AccessClaim, Audience, RegistryClaims};
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_e2e::fleet::{envoy_stats, Envoy};
use registry_guard_e2e::{Options, Stack};

const TTL: i64 = 10;
/// The filter's leeway in the harness (`--leeway-seconds 2`).
const LEEWAY: i64 = 2;
const REFRESH: &str = "1";
const REPO: &str = "acme/web/app";

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A pull token for rita signed by `key`, valid for an hour: only the key decides.
fn long_token(key: &SigningKey) -> String {
    let t = now();
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "rita".into(),
        aud: Audience::One("container_registry".into()),
        jti: format!("jwks-rotation-{}", key.kid),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: REPO.into(),
            actions: vec!["pull".into()],
            meta: None,
        }],
        auth_type: Some("password".into()),
        user: None,
        extra: Default::default(),
    };
    sign(key, claims, Validity { issued_at: t, not_before: t, expires_at: t + 3600 }).unwrap()
}

/// The same claims with a tampered signature.
fn forge(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').unwrap();
    format!("{rest}.{}", sig.chars().rev().collect::<String>())
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

/// Status of a manifest pull through the Envoy on `port`.
fn pull(port: u16, bearer: Option<&str>) -> u16 {
    let mut req = ureq::get(&format!("http://127.0.0.1:{port}/v2/{REPO}/manifests/base"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .timeout(Duration::from_secs(10));
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("pull through :{port}: {e}"),
    }
}

fn assert_closed(ports: &[u16], forged: &str, when: &str) {
    for &port in ports {
        assert_eq!(pull(port, None), 401, "{when}: anonymous pull through :{port}");
        assert_eq!(pull(port, Some(forged)), 401, "{when}: forged token through :{port}");
    }
}

/// The key count of each live filter VM of the registry endpoint (its heartbeat at most 5 s
/// old: a VM Envoy only configured to validate a configuration never beats).
fn vm_key_counts(admin: u16) -> Vec<i64> {
    let stats = envoy_stats(admin);
    stats
        .iter()
        .filter_map(|(k, v)| {
            let slot = k.strip_prefix("wasmcustom.registry_guard.vm.")?.strip_suffix(".registry.keys")?;
            let beat = stats.get(&format!("wasmcustom.registry_guard.vm.{slot}.registry.heartbeat"))?;
            (now() - beat <= 5).then_some(*v)
        })
        .collect()
}

/// Waits until every live VM of every Envoy holds `count` keys; the time each Envoy took.
fn wait_for_keys(admins: &[(&str, u16)], count: i64) -> Vec<(String, Duration)> {
    let started = Instant::now();
    let mut took = Vec::new();
    for (name, admin) in admins {
        loop {
            let counts = vm_key_counts(*admin);
            if !counts.is_empty() && counts.iter().all(|c| *c == count) {
                took.push((name.to_string(), started.elapsed()));
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{name}: VMs hold {counts:?} keys, not {count}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    took
}

fn fetch_stat(admin: u16, what: &str) -> i64 {
    envoy_stats(admin).get(&format!("wasmcustom.registry_guard.keys_fetch.{what}")).copied().unwrap_or(0)
}

/// skopeo copy of a fresh image to `REPO:tag` through the Envoy on `port`.
fn push_via(stack: &Stack, port: u16, tag: &str) -> bool {
    let layout = stack.path(&format!("layout-jwks-{port}-{tag}"));
    let src = stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", tag]);
    let dst = format!("docker://127.0.0.1:{port}/{REPO}:{tag}");
    let ok = stack
        .skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", "dev:dev-pass", src.trim(), &dst])
        .status
        .success();
    let _ = std::fs::remove_dir_all(&layout);
    ok
}

#[test]
fn rotating_through_the_jwks_url_fails_no_request_on_two_envoys() {
    let stack = Stack::start_with(Options {
        token_ttl_seconds: Some(TTL),
        per_client_login_rate: Some((100_000, 6_000_000)),
        keys_refresh_seconds: Some(1),
        ..Options::default()
    });
    let b = Envoy::start_with(
        &stack,
        "envoy-b",
        stack.token_port,
        "poll",
        &["--keys-source", "token-service", "--keys-refresh-seconds", REFRESH],
    );
    let ports = [stack.envoy_port, b.listen_port];
    let admins = [("envoy-a", stack.admin_port), ("envoy-b", b.admin_port)];
    assert!(stack.push("dev", "dev-pass", REPO, "base").status.success());
    let keys = stack.config_dir.join("keys");
    let old = load_key(&keys.join("signing-key.pem"));
    let by_old = long_token(&old);
    let forged = forge(&by_old);
    wait_for_keys(&admins, 1);
    for port in ports {
        assert_eq!(pull(port, Some(&by_old)), 200);
    }
    assert_closed(&ports, &forged, "before the rotation");
    // The filters poll the JWKS: the same keys again (304 or the same set) on both Envoys.
    let deadline = Instant::now() + Duration::from_secs(15);
    while admins.iter().any(|(_, a)| fetch_stat(*a, "not_modified") < 1) {
        assert!(Instant::now() < deadline, "the filters do not poll the JWKS");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Load through both Envoys: pulls with a fresh token every 5 requests, and skopeo pushes.
    let stack = Arc::new(stack);
    let stop = Arc::new(AtomicBool::new(false));
    let (pulls, pull_failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (pushes, push_failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let puller = {
        let (stack, stop, ok, failed) = (stack.clone(), stop.clone(), pulls.clone(), pull_failures.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
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
                    i += 1;
                    let port = ports[i % 2];
                    let status = pull(port, Some(&token));
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("pull through :{port} failed during rotation: {status} (kid {})", header_kid(&token));
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
                if push_via(&stack, ports[n % 2], &format!("jwks-{n}")) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("push {n} through :{} failed during rotation", ports[n % 2]);
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // 1. Add the new key to the token service, published but not signing. The filters have
    //    never seen it: a token it signs is refused until they fetch the JWKS.
    stack.rgctl(&["keygen", "--out", &keys.display().to_string(), "--name", "next"]);
    let new = load_key(&keys.join("next-key.pem"));
    let by_new = long_token(&new);
    for port in ports {
        assert_eq!(pull(port, Some(&by_new)), 401, "the filters do not trust the new key yet");
    }
    write_settings(
        &stack,
        serde_json::json!([{"path": "keys/signing-key.pem"}, {"path": "keys/next-key.pem", "active": false}]),
    );
    stack.reload_token_service_keys(&[old.kid.clone(), new.kid.clone()]);
    assert_eq!(header_kid(&stack.token("rita", "rita-pass", &[]).unwrap()), old.kid);
    // 2. No push-keys: every filter VM of both Envoys fetches the new JWKS by itself.
    let picked_up = wait_for_keys(&admins, 2);
    for port in ports {
        assert_eq!(pull(port, Some(&by_new)), 200);
        assert_eq!(pull(port, Some(&by_old)), 200);
    }
    assert_closed(&ports, &forged, "with both keys");

    // 3. Switch signing: the newest active key signs.
    write_settings(&stack, serde_json::json!([{"path": "keys/signing-key.pem"}, {"path": "keys/next-key.pem"}]));
    stack.reload_token_service_keys(&[old.kid.clone(), new.kid.clone()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while header_kid(&stack.token("rita", "rita-pass", &[]).unwrap()) != new.kid {
        assert!(Instant::now() < deadline, "the token service did not switch to the new key");
        std::thread::sleep(Duration::from_millis(50));
    }
    let switched_at = now();

    // 4. Once every token signed by the old key has expired (ttl + leeway), retire it.
    std::thread::sleep(Duration::from_secs((TTL + LEEWAY + 1) as u64));
    assert!(now() >= switched_at + TTL + LEEWAY);
    write_settings(&stack, serde_json::json!([{"path": "keys/next-key.pem"}]));
    stack.reload_token_service_keys(std::slice::from_ref(&new.kid));
    let retired = wait_for_keys(&admins, 1);
    std::thread::sleep(Duration::from_secs(1));

    stop.store(true, Ordering::Relaxed);
    puller.join().unwrap();
    pusher.join().unwrap();
    let (pulls, pull_failures) = (pulls.load(Ordering::Relaxed), pull_failures.load(Ordering::Relaxed));
    let (pushes, push_failures) = (pushes.load(Ordering::Relaxed), push_failures.load(Ordering::Relaxed));
    let ms = |v: &[(String, Duration)]| {
        v.iter().map(|(n, d)| format!("{n} {} ms", d.as_millis())).collect::<Vec<_>>().join(", ")
    };
    eprintln!(
        "jwks rotation on two Envoys (refresh {REFRESH} s): {pulls} pulls ({pull_failures} failed), {pushes} pushes \
         ({push_failures} failed); new key picked up by every VM: {}; old key dropped by every VM: {}",
        ms(&picked_up),
        ms(&retired)
    );
    assert!(pulls > 100, "the pull loop ran ({pulls} pulls)");
    assert!(pushes >= 3, "the push loop ran ({pushes} pushes)");
    assert_eq!(pull_failures, 0);
    assert_eq!(push_failures, 0);

    // The old key is gone from both Envoys: a still-unexpired token it signed is refused.
    for port in ports {
        assert_eq!(pull(port, Some(&by_old)), 401, "retired key through :{port}");
        assert_eq!(pull(port, Some(&by_new)), 200);
    }
    assert_closed(&ports, &forge(&by_new), "after the rotation");

    // 5. The JWKS source down: the last known good keys keep deciding, failures are counted.
    let mut stack = Arc::try_unwrap(stack).unwrap_or_else(|_| panic!("load threads still hold the stack"));
    let failed_before: Vec<i64> = admins.iter().map(|(_, a)| fetch_stat(*a, "failed")).collect();
    stack.stop_token_service();
    let down = Instant::now();
    while admins.iter().zip(&failed_before).any(|((_, a), before)| fetch_stat(*a, "failed") < before + 2) {
        assert!(down.elapsed() < Duration::from_secs(30), "the filters did not notice the source down");
        std::thread::sleep(Duration::from_millis(100));
    }
    for port in ports {
        assert_eq!(pull(port, Some(&by_new)), 200, "last known good through :{port}");
        assert_eq!(pull(port, Some(&by_old)), 401, "retired key through :{port}, source down");
    }
    assert_closed(&ports, &forge(&by_new), "source down");
    // Envoy answers a call to a cluster with no live host itself (503), or the call fails.
    let refused: Vec<i64> = admins
        .iter()
        .map(|(_, a)| {
            let stats = envoy_stats(*a);
            ["unreachable", "status"]
                .iter()
                .map(|r| stats.get(&format!("wasmcustom.registry_guard.keys_fetch_rejected.{r}")).copied().unwrap_or(0))
                .sum::<i64>()
        })
        .collect();
    assert!(refused.iter().all(|n| *n >= 2), "failed fetches counted by reason: {refused:?}");
    eprintln!("source down for {} ms: both Envoys decide on the last known good keys", down.elapsed().as_millis());
}
