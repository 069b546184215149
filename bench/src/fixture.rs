//! Deterministic benchmark inputs: generated protection-rule bundles, a configured
//! [`Guard`] with a signed bundle, registry tokens and notification envelopes.
//!
//! This file is the one generator: it is the `fixture` module of the `registry-guard-bench`
//! crate (`rg-bench bundle N` writes the bundles Envoy loads) and is included by path in the
//! criterion benches of `registry-guard-core` (`crates/core/benches/`). It uses only
//! `registry_guard_core`, `serde_json` and `std`.
//!
//! Rules. The first three always govern the benchmark request `PUT
//! /v2/acme/web/app/manifests/v1` (a tagless rule on `acme/*` that only restricts deletes, a
//! tag rule on `acme/web/*` for `^v[0-9]+` that needs maintainer to push, and an exact rule
//! on `acme/web/app` that needs developer to push); a token with `pull,push` and access level
//! 40 (maintainer) passes all three, so the request is allowed after the rules are consulted.
//! The others are filler that a real instance would have: other groups' repositories, four
//! shapes in turn (exact path; `team-N/*`; `team-N/app-*` with one of eight tag patterns;
//! `org-M/team-N/*` delete-only), none matching `acme/web/app`.

use registry_guard_core::decide::guard::Guard;
use registry_guard_core::events::{seal, user_agent, AttributionKey, AttributionRef, Opener, RequestFields, NONCE_LEN};
use registry_guard_core::token;
use registry_guard_core::token::claims::{AccessClaim, AccessMeta, Audience, RegistryClaims};
use registry_guard_core::token::sign::Validity;
use registry_guard_core::token::testing;
use serde_json::{json, Value};

/// The repository of the benchmark requests.
pub const REPO: &str = "acme/web/app";
/// A push-like request that consults the protection rules (manifest PUT by tag).
pub const PUSH_PATH: &str = "/v2/acme/web/app/manifests/v1";
/// A pull (never governed by rules).
pub const PULL_PATH: &str = "/v2/acme/web/app/manifests/v1";
/// The fixed "now" of in-process fixtures (unix seconds).
pub const NOW: i64 = 1_800_000_000;

const TAG_PATTERNS: [&str; 8] =
    ["^v[0-9]+", "^release-", "^prod$", "^stable", "^[0-9]+\\.[0-9]+\\.[0-9]+$", "^latest$", "^rc-[0-9]+$", "^lts-"];

/// The `protection_rules` array of a bundle with `n` rules.
pub fn rules(n: usize) -> Vec<Value> {
    let fixed = [
        json!({"id": "acme-delete", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*",
               "minimum_access_level_for_delete": "maintainer"}),
        json!({"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "tag_name_pattern": "^v[0-9]+",
               "minimum_access_level_for_push": "maintainer", "minimum_access_level_for_delete": "maintainer"}),
        json!({"id": "web-app-push", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/app",
               "minimum_access_level_for_push": "developer"}),
    ];
    let mut out: Vec<Value> = fixed.into_iter().take(n).collect();
    for i in out.len()..n {
        let id = format!("rule-{i}");
        let rule = match i % 4 {
            0 => {
                json!({"id": id, "owner": {"group": format!("team-{i}")}, "repository_path_pattern": format!("team-{i}/svc-{}", i % 97),
                        "minimum_access_level_for_push": "maintainer"})
            }
            1 => {
                json!({"id": id, "owner": {"group": format!("team-{i}")}, "repository_path_pattern": format!("team-{i}/*"),
                        "minimum_access_level_for_push": "developer", "minimum_access_level_for_delete": "maintainer"})
            }
            2 => {
                json!({"id": id, "owner": {"group": format!("team-{i}")}, "repository_path_pattern": format!("team-{i}/app-*"),
                        "tag_name_pattern": TAG_PATTERNS.get(i % TAG_PATTERNS.len()).copied().unwrap_or("^v"),
                        "minimum_access_level_for_push": "maintainer"})
            }
            _ => {
                json!({"id": id, "owner": {"group": format!("org-{}", i / 100)}, "repository_path_pattern": format!("org-{}/team-{i}/*", i / 100),
                        "delete_protected_up_to_access_level": "developer"})
            }
        };
        out.push(rule);
    }
    out
}

/// A bundle (unsigned JSON text) with `n` generated rules.
pub fn bundle_json(n: usize, revision: u64) -> String {
    json!({
        "revision": revision,
        "description": format!("registry-guard benchmark: {n} generated protection rules (bench/src/fixture.rs)"),
        "protection_rules": rules(n),
    })
    .to_string()
}

/// Claims of a registry token for [`REPO`] as the token service issues them (with a nested
/// `user` JWT), with a unique `jti`.
pub fn token(actions: &[&str], access_level: u8, jti: &str) -> Result<String, String> {
    let key = testing::es256_key(1);
    let validity = Validity { issued_at: NOW, not_before: NOW - 5, expires_at: NOW + 3600 };
    let user = token::sign::sign(
        &key,
        json!({"jti": format!("{jti}-user"), "user_info": {"token_type": "pat", "username": "bench", "user_id": 1}}),
        validity,
    )
    .map_err(|e| e.to_string())?;
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "bench".into(),
        aud: Audience::One("container_registry".into()),
        jti: jti.into(),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: REPO.into(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            meta: Some(AccessMeta { project_path: None, access_level: Some(access_level) }),
        }],
        auth_type: Some("pat".into()),
        user: Some(user),
        extra: Default::default(),
    };
    token::sign::sign(&key, claims, validity).map_err(|e| e.to_string())
}

/// The filter configuration JSON (as `rgctl filter-config` writes it) with a bundle of
/// `n_rules` generated rules signed by the test operator key.
pub fn filter_config_json(n_rules: usize) -> Result<String, String> {
    let operator = testing::es256_key(7);
    let signing = testing::es256_key(1);
    let jws =
        registry_guard_core::policy::bundle::sign(&bundle_json(n_rules, 1), &operator).map_err(|e| e.to_string())?;
    Ok(json!({
        "realm": "http://127.0.0.1:5001/jwt/auth",
        "service": "container_registry",
        "issuer": "registry-guard",
        "leeway_seconds": 30,
        "jwks": testing::jwks(&[&signing]),
        "bundle": jws,
        "bundle_keys": testing::jwks(&[&operator]),
    })
    .to_string())
}

/// A guard configured like the filter (via `PluginConfig::from_json`) with `n_rules` rules.
pub fn guard(n_rules: usize) -> Result<Guard, String> {
    let text = filter_config_json(n_rules)?;
    match registry_guard_core::decide::config::PluginConfig::from_json(text.as_bytes()).map_err(|e| e.to_string())? {
        registry_guard_core::decide::config::PluginConfig::Registry(config) => Ok(Guard::new(*config)),
        registry_guard_core::decide::config::PluginConfig::Events(_) => Err("expected the registry role".into()),
    }
}

/// The fleet's attribution key of the fixtures.
pub fn attribution_key() -> AttributionKey {
    AttributionKey::from_bytes([0x42; 32])
}

/// How the events role of the fixtures opens seals (at [`NOW`]).
pub fn opener(keys: &[AttributionKey]) -> Opener<'_> {
    Opener { keys, now: NOW, max_delay: 86_400 }
}

/// A notification envelope of `n` events (distribution 2.8's shape), each from its own
/// request: a user agent as the registry role writes it (a seal of its own, request id,
/// client address, the client's user agent), opened with [`attribution_key`].
pub fn envelope(n: usize) -> Result<(Vec<u8>, Vec<AttributionKey>), String> {
    let user = token(&["pull"], 30, "envelope-user")?;
    let key = attribution_key();
    let mut events = Vec::with_capacity(n);
    for i in 0..n {
        let digest = format!("sha256:{:064x}", i + 1);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.iter_mut().zip((i as u64).to_le_bytes()).for_each(|(n, b)| *n = b);
        let who = AttributionRef { name: "bench", user_type: "pat", user: Some(&user), expires_at: NOW + 3600 };
        let sealed = seal(&key, &who, &nonce)?;
        let rid = format!("edge-{i}");
        let fields = RequestFields {
            request_id: Some(&rid),
            client_addr: Some("127.0.0.1:40000"),
            user_agent: Some(b"skopeo/1.9.3"),
        };
        let useragent = user_agent(Some(&sealed), &fields);
        events.push(json!({
            "id": format!("6f7a1b3c-0000-4000-8000-{i:012}"),
            "timestamp": "2026-11-22T01:00:00.000000000Z",
            "action": "push",
            "target": {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "size": 2_812_345 + i, "digest": digest, "length": 2_812_345 + i,
                "repository": REPO, "url": format!("http://127.0.0.1:5002/v2/{REPO}/blobs/{digest}"),
            },
            "request": {"id": format!("0b2f3c4d-1111-4222-8333-{i:012}"), "addr": "127.0.0.1",
                        "host": "127.0.0.1:5002", "method": "PUT", "useragent": useragent},
            "actor": {},
            "source": {"addr": "127.0.0.1:5002", "instanceID": "5b1c0e3e-4f40-4bd4-a6d0-0f4f1c2d3e4f"},
        }));
    }
    let body = serde_json::to_vec(&json!({ "events": events })).map_err(|e| e.to_string())?;
    Ok((body, vec![key]))
}
