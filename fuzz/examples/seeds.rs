//! Writes the committed seed corpora under `fuzz/seeds/<target>/` from real inputs: tokens
//! signed by the fuzz targets' trusted test key, every request of the decision corpus
//! (`crates/core/corpus/decisions.json`), the example bundle and the corpus bundles (plain
//! and signed), and envelopes shaped like distribution 2.8.2's. Run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.

use std::fs;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use registry_guard_core::policy::bundle;
use registry_guard_core::events::{seal, user_agent, AttributionKey, AttributionRef, RequestFields};
use registry_guard_core::token::testing::es256_key;
use registry_guard_core::token::claims::{AccessClaim, AccessMeta, Audience, RegistryClaims};
use registry_guard_core::token::sign::{sign, sign_jws_unchecked, Validity};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn write(dir: &Path, name: &str, data: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let seeds = root.join("fuzz/seeds");
    let _ = fs::remove_dir_all(&seeds);

    // --- tokens ---
    let key = es256_key(1);
    let dir = seeds.join("token");
    let claims = |aud: Audience, access: Vec<AccessClaim>, user: Option<String>| RegistryClaims {
        iss: "registry-guard".into(),
        sub: "alice".into(),
        aud,
        jti: "j1".into(),
        access,
        auth_type: Some("password".into()),
        user,
        extra: Default::default(),
    };
    let pull = AccessClaim {
        resource_type: "repository".into(),
        name: "acme/web".into(),
        actions: vec!["pull".into()],
        meta: Some(AccessMeta { project_path: Some("acme/web".into()), access_level: Some(30) }),
    };
    let validity = Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 300 };
    let user = sign(
        &key,
        json!({"jti": "u1", "user_info": {"token_type": "pat", "username": "alice", "user_id": 2}}),
        validity,
    )
    .unwrap();
    let tokens = [
        ("plain", sign(&key, claims(Audience::One("container_registry".into()), vec![pull.clone()], None), validity)),
        (
            "aud-array",
            sign(
                &key,
                claims(Audience::Many(vec!["x".into(), "container_registry".into()]), vec![pull.clone()], None),
                validity,
            ),
        ),
        (
            "with-user",
            sign(&key, claims(Audience::One("container_registry".into()), vec![pull], Some(user.clone())), validity),
        ),
        ("catalog", {
            let access = vec![AccessClaim {
                resource_type: "registry".into(),
                name: "catalog".into(),
                actions: vec!["*".into()],
                meta: None,
            }];
            sign(&key, claims(Audience::One("container_registry".into()), access, None), validity)
        }),
        ("user-jwt", Ok(user)),
    ];
    for (name, t) in tokens {
        write(&dir, name, t.unwrap().as_bytes());
    }
    let header = |h: Value| URL_SAFE_NO_PAD.encode(h.to_string());
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"iss": "registry-guard", "sub": "a", "aud": "container_registry", "jti": "j", "exp": NOW + 60})
            .to_string(),
    );
    write(&dir, "alg-none", format!("{}.{payload}.", header(json!({"alg": "none", "kid": key.kid}))).as_bytes());
    write(
        &dir,
        "jku",
        format!("{}.{payload}.AAAA", header(json!({"alg": "ES256", "kid": key.kid, "jku": "http://x"}))).as_bytes(),
    );

    // --- routes: every request of the decision corpus ---
    let corpus: Value =
        serde_json::from_str(&fs::read_to_string(root.join("crates/core/corpus/decisions.json")).unwrap()).unwrap();
    let dir = seeds.join("route");
    for (i, case) in corpus["cases"].as_array().unwrap().iter().enumerate() {
        let r = &case["request"];
        let mut text = format!("{}\n{}", r["method"].as_str().unwrap(), r["path"].as_str().unwrap());
        if let Some(ct) = r["content_type"].as_str() {
            text.push('\n');
            text.push_str(ct);
        }
        write(&dir, &format!("corpus-{i:03}"), text.as_bytes());
    }
    let d = format!("sha256:{}", "a".repeat(64));
    for (name, text) in [
        ("mount", format!("POST\n/v2/acme/web/blobs/uploads/?mount={d}&from=other%2Ftools")),
        ("upload", "PATCH\n/v2/acme/web/blobs/uploads/0e0b2c3a-1d2e-4f5a?_state=abc".into()),
        ("names", "GET\n/v2/a/blobs/b/manifests/latest".into()),
        ("form", "POST\n/v2/a/blobs/uploads/\napplication/x-www-form-urlencoded".into()),
    ] {
        write(&dir, name, text.as_bytes());
    }

    // --- bundles: the example and the corpus bundles, plain and signed by es256_key(2) ---
    let dir = seeds.join("bundle");
    let operator = es256_key(2);
    let mut bundles =
        vec![("example".to_owned(), fs::read_to_string(root.join("policies/example/bundle.json")).unwrap())];
    for (name, b) in corpus["bundles"].as_object().unwrap() {
        bundles.push((format!("corpus-{name}"), serde_json::to_string_pretty(b).unwrap()));
    }
    for (name, text) in bundles {
        write(&dir, &format!("{name}.json"), text.as_bytes());
        if let Ok(jws) = bundle::sign(&text, &operator) {
            write(&dir, &format!("{name}.jws"), jws.as_bytes());
        }
    }
    let unsigned = sign_jws_unchecked(&operator, &json!({"revision": 1}), "JWT").unwrap();
    write(&dir, "wrong-typ.jws", unsigned.as_bytes());

    // --- envelopes, shaped like distribution 2.8.2's ---
    let dir = seeds.join("envelope");
    let event = |id: &str, action: &str, useragent: &str, tag: Option<&str>| {
        let mut target = json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 528, "digest": d, "length": 528,
            "repository": "acme/web/app", "url": format!("http://127.0.0.1:5002/v2/acme/web/app/manifests/{d}"),
        });
        if let Some(t) = tag {
            target["tag"] = t.into();
        }
        json!({
            "id": id, "timestamp": "2026-11-22T01:00:00.123456789Z", "action": action, "target": target,
            "request": {"id": "5f1c2d3e-aaaa-bbbb-cccc-000000000001", "addr": "127.0.0.1", "host": "127.0.0.1:5000",
                        "method": if action == "push" { "PUT" } else { "GET" }, "useragent": useragent},
            "actor": {}, "source": {"addr": "localhost:5002", "instanceID": "0b7c5c5e-1111-2222-3333-444455556666"},
        })
    };
    // User agents as the registry role writes them, sealed with the fuzz target's key.
    let key = AttributionKey::from_bytes([7; 32]);
    let who = AttributionRef { name: "alice", user_type: "password", user: Some("u.s.er"), expires_at: 1_790_000_300 };
    let sealed = seal(&key, &who, &[1; 24]).expect("seal");
    let fields = |rid| RequestFields { request_id: Some(rid), client_addr: Some("127.0.0.1:4242"), user_agent: Some(b"skopeo/1.9.3") };
    let a1 = user_agent(Some(&sealed), &fields("edge-1"));
    let a2 = user_agent(None, &fields("edge-2"));
    let envelopes = [
        ("push", json!({"events": [event("e1", "push", &a1, None), event("e2", "push", &a1, Some("v1"))]})),
        ("pull", json!({"events": [event("e3", "pull", &a2, None)]})),
        ("unknown-addr", json!({"events": [event("e4", "delete", "skopeo/1.9.3", None)]})),
        ("empty", json!({"events": []})),
        ("odd", json!({"events": [1, null, {"request": {"addr": 5}}, {"actor": "x", "request": {"useragent": a1}}]})),
    ];
    for (name, e) in envelopes {
        write(&dir, name, e.to_string().as_bytes());
    }
    eprintln!("seeds written to {}", seeds.display());
}
