//! The same core, the same corpus, under V8: `make test` runs these with
//! `wasm-bindgen-test-runner` (Node) on `wasm32-unknown-unknown`.

use registry_guard_core::decide::corpus::{self, ISSUER, SERVICE};
use registry_guard_core::policy::bundle;
use registry_guard_core::request::route::classify;
use registry_guard_core::token::claims::{Audience, RegistryClaims};
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_core::token::testing::{es256_key, jwks};
use registry_guard_core::token::verify::{TokenError, Verifier};
use wasm_bindgen_test::wasm_bindgen_test;

const NOW: i64 = 1_800_000_000;

#[wasm_bindgen_test]
fn decision_corpus_replays_in_wasm() {
    let corpus = corpus::load(corpus::DECISIONS).unwrap();
    assert!(corpus.cases.len() >= 40);
    let failures = corpus.replay(NOW);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[wasm_bindgen_test]
fn bundle_signature_and_validation_in_wasm() {
    let operator = es256_key(7);
    let keys = KeySet::from_jwks(&jwks(&[&operator])).unwrap();
    let text = r#"{"revision": 3, "protection_rules": [{"id": "r", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*", "tag_name_pattern": "^v[0-9]+", "minimum_access_level_for_push": "owner"}]}"#;
    let signed = bundle::sign(text, &operator).unwrap();
    assert_eq!(bundle::verify(&signed, &keys).unwrap().revision, 3);
    assert!(bundle::verify(text, &keys).is_err());
    let e = bundle::Policy::from_json(r#"{"revision": 1, "protection_rules": [{"id": "r", "owner": {"group": "a"}, "repository_path_pattern": "a", "tag_name_pattern": "(", "minimum_access_level_for_push": "owner"}]}"#).unwrap_err();
    assert_eq!(e.path, "$.protection_rules[0].tag_name_pattern");
}

#[wasm_bindgen_test]
fn token_verification_in_wasm() {
    let key = es256_key(1);
    let verifier = Verifier {
        keys: KeySet::from_jwks(&jwks(&[&key])).unwrap(),
        issuer: ISSUER.into(),
        audience: SERVICE.into(),
        leeway_seconds: 0,
    };
    let claims = RegistryClaims {
        iss: ISSUER.into(),
        sub: "alice".into(),
        aud: Audience::One(SERVICE.into()),
        jti: "j".into(),
        access: vec![],
        auth_type: None,
        user: None,
        extra: Default::default(),
    };
    let t = sign(&key, claims, Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 10 }).unwrap();
    assert_eq!(verifier.verify(&t, NOW).unwrap().subject, "alice");
    assert_eq!(verifier.verify(&t, NOW + 11), Err(TokenError::Expired(NOW + 10)));
    let mut tampered = t.clone();
    tampered.pop();
    tampered.push(if t.ends_with('A') { 'B' } else { 'A' });
    assert!(verifier.verify(&tampered, NOW).is_err());
}

#[wasm_bindgen_test]
fn route_grammar_in_wasm() {
    let r = classify("POST", "/v2/acme/web/blobs/uploads/?mount=sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa&from=other%2Ftools", None).unwrap();
    let scopes: Vec<String> = r.scopes.iter().map(|s| s.to_string()).collect();
    assert_eq!(scopes, ["repository:acme/web:pull,push", "repository:other/tools:pull"]);
    assert_eq!(classify("GET", "/v2/acme%2fweb/manifests/v1", None).unwrap_err().status, 400);
    assert_eq!(
        classify("GET", "/v2/a/blobs/b/manifests/latest", None).unwrap().endpoint.repository(),
        Some("a/blobs/b")
    );
}

/// Key ids and additional claims behave the same under V8: the libtrust id of a known key,
/// a key set resolving both id formats, and claim inheritance/merging of a bundle.
#[wasm_bindgen_test]
fn key_ids_and_claims_in_wasm() {
    let key = es256_key(1);
    assert_eq!(key.libtrust_kid(), "ZPCH:6X4H:X3PL:IE44:AARF:5Y35:FEQW:M2HZ:NH5C:BWPT:BABH:XCH3");
    let keys = KeySet::from_jwks(&jwks(&[&key])).unwrap();
    assert!(keys.get(&key.libtrust_kid()).is_some());
    assert!(keys.get(&key.thumbprint()).is_some());
    let policy = bundle::Policy::from_json(
        r#"{"revision": 1, "additional_claims": [
            {"group": "acme", "claims": {"tenant": {"value": "acme"}, "cc": {"value": 1, "mutable": true}}},
            {"project": "acme/web", "claims": {"cc": {"value": 2}}}]}"#,
    )
    .unwrap();
    assert_eq!(policy.claims.for_repository("acme/web/app").get("cc"), Some(&serde_json::json!(2)));
    assert_eq!(policy.claims.for_repositories(["acme/web/app", "acme/x"]).len(), 1);
    let refused = bundle::Policy::from_json(
        r#"{"revision": 1, "additional_claims": [{"project": "acme/web", "claims": {"jti": {"value": "x"}}}]}"#,
    )
    .unwrap_err();
    assert_eq!(refused.path, "$.additional_claims[0].claims.jti");
}
