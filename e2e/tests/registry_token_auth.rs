//! Defence in depth (docs/operations.md "Defence in depth: the registry verifying the same tokens"): the stock registry runs
//! with `auth: token` and a self-signed certificate of the token signing key as
//! `rootcertbundle`; the token service puts libtrust key ids in token headers. The same
//! tokens pass the filter and the registry; real skopeo pushes and pulls work; the registry
//! itself refuses what it cannot verify and names the principal natively.

use registry_guard_e2e::{Options, Stack};

fn direct(stack: &Stack, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut req = ureq::get(&format!("http://127.0.0.1:{}{path}", stack.registry_port));
    if let Some(t) = bearer {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    match req.call() {
        Ok(r) => (r.status(), String::new()),
        Err(ureq::Error::Status(code, r)) => (code, r.header("www-authenticate").unwrap_or_default().to_owned()),
        Err(e) => panic!("GET {path} on the registry: {e}"),
    }
}

fn header_kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let header = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

#[test]
fn the_registry_verifies_the_same_tokens_itself() {
    let stack = Stack::start_with(Options { registry_token_auth: true, ..Options::default() });
    let key = stack.signing_key();

    // The registry really is in token mode: without a token it challenges, naming our realm.
    let (status, challenge) = direct(&stack, "/v2/", None);
    assert_eq!(status, 401);
    assert!(challenge.contains(&format!("realm=\"{}\"", stack.realm())), "{challenge}");

    // Tokens carry the libtrust key id, and the registry accepts them (straight, no Envoy).
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let kid = header_kid(&dev);
    assert_eq!(kid, key.libtrust_kid());
    assert_eq!(kid.split(':').count(), 12);
    assert_eq!(direct(&stack, "/v2/", Some(&dev)).0, 200);
    // The JWKS names the key both ways; Envoy's filter resolves either.
    assert_eq!(stack.jwks_kids(), vec![key.thumbprint(), key.libtrust_kid()]);

    // The same key under its RFC 7638 kid: the filter would accept it, distribution 2.8 does
    // not know that id and refuses — which is why `kid_format: libtrust` is needed here.
    let rfc7638 = {
        let mut claims = registry_guard_core::token::verify::decode_unverified(&dev).unwrap();
        for time in ["exp", "nbf", "iat"] {
            claims.as_object_mut().unwrap().remove(time);
        }
        let mut claims: registry_guard_core::token::claims::RegistryClaims = serde_json::from_value(claims).unwrap();
        claims.jti = "rfc7638-kid".into();
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        registry_guard_core::token::sign::sign(
            &key,
            claims,
            registry_guard_core::token::sign::Validity { issued_at: t, not_before: t, expires_at: t + 300 },
        )
        .unwrap()
    };
    assert_eq!(header_kid(&rfc7638), key.thumbprint());
    assert_eq!(direct(&stack, "/v2/", Some(&rfc7638)).0, 401);
    // Through Envoy: the filter resolves RFC 7638 ids (core `key_sets_resolve_both_key_id_formats`)
    // and lets it through, and the registry, the second line, still refuses it.
    assert_eq!(stack.request("GET", "/v2/", Some(&rfc7638)).status, 401);
    let untrusted = format!("token signed by untrusted key with ID: \\\"{}\\\"", key.thumbprint());
    assert_eq!(stack.log("registry").matches(&untrusted).count(), 2, "refused by the registry, directly and via Envoy");

    // Real clients through Envoy: push, inspect, pull; the filter's denials are unchanged.
    let out = stack.push("dev", "dev-pass", "acme/web/app", "defence-1");
    assert!(out.status.success(), "push through filter and registry auth");
    assert!(stack.inspect("rita", "rita-pass", "acme/web/app", "defence-1").status.success());
    let dest = stack.path("pulled");
    let src = format!("docker://{}/acme/web/app:defence-1", stack.registry_host());
    let dst = format!("oci:{}:defence-1", dest.display());
    let out = stack.skopeo(&["copy", "--src-tls-verify=false", "--src-creds", "rita:rita-pass", &src, &dst]);
    assert!(out.status.success(), "pull");
    assert!(!stack.push("rita", "rita-pass", "acme/web/app", "defence-2").status.success(), "reporter cannot push");

    // The registry names the principal itself (from the token's `sub`).
    let log = stack.log("registry");
    assert!(log.contains("auth.user.name=dev") || log.contains("auth.user.name=\"dev\""), "registry log lacks dev");
    assert!(log.contains("auth.user.name=rita") || log.contains("auth.user.name=\"rita\""), "registry log lacks rita");
}
