//! End to end: real Envoy + registry-guard filter, real registry, real skopeo,
//! tokens from the real token service, all on loopback.

use registry_guard_core::token::claims::{AccessClaim, Audience, RegistryClaims};
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_core::token::testing::es256_key;
use registry_guard_e2e::{stderr, Stack};

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

fn forge(key: &SigningKey, sub: &str, repo: &str, actions: &[&str], validity: Validity) -> String {
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: sub.into(),
        aud: Audience::One("container_registry".into()),
        jti: format!("forged-{sub}"),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: repo.into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            meta: None,
        }],
        auth_type: Some("password".into()),
        user: None,
        extra: Default::default(),
    };
    sign(key, claims, validity).unwrap()
}

#[test]
fn login_push_pull_and_denials_with_skopeo() {
    let stack = Stack::start();
    let host = stack.registry_host();

    // Login: good credentials succeed, wrong ones fail with a clear message.
    let ok = stack.skopeo(&["login", "--tls-verify=false", "-u", "alice", "-p", "alice-pass", &host]);
    assert!(ok.status.success(), "login as alice failed");
    let bad = stack.skopeo(&["login", "--tls-verify=false", "-u", "alice", "-p", "wrong", &host]);
    assert!(!bad.status.success(), "login with a wrong password succeeded");
    assert!(stderr(&bad).contains("invalid username/password"), "unclear login failure: {}", stderr(&bad));
    let _ = stack.skopeo(&["logout", "--all"]);

    // Push as a developer of acme/web, pull back as a reporter of acme.
    let push = stack.push("dev", "dev-pass", "acme/web/app", "v1");
    assert!(push.status.success(), "push as dev failed");
    let inspect = stack.inspect("rita", "rita-pass", "acme/web/app", "v1");
    assert!(inspect.status.success(), "inspect as rita failed");
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("\"Digest\""));
    let back = stack.path("pulled");
    let pull = stack.skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "rita:rita-pass",
        &format!("docker://{host}/acme/web/app:v1"),
        &format!("oci:{}:v1", back.display()),
    ]);
    assert!(pull.status.success(), "pull as rita failed");
    assert!(back.join("index.json").exists());

    // A personal access token works like the password.
    let pat = stack.inspect("dev", "glpat-dev-example-token", "acme/web/app", "v1");
    assert!(pat.status.success(), "inspect with dev's PAT failed");

    // A reporter may not push: a clear denial, not a hang or a 500.
    let denied = stack.push("rita", "rita-pass", "acme/web/app", "v2");
    assert!(!denied.status.success(), "rita pushed");
    let msg = stderr(&denied);
    assert!(msg.contains("denied"), "push denial is unclear: {msg}");
    assert!(!msg.contains("Internal Server Error") && !msg.contains("status 500"), "{msg}");

    // A non-member may not pull from a private group.
    let denied = stack.inspect("olga", "olga-pass", "acme/web/app", "v1");
    assert!(!denied.status.success(), "olga pulled from private acme");
    let msg = stderr(&denied);
    assert!(msg.contains("denied") || msg.contains("unauthorized"), "pull denial is unclear: {msg}");

    // A guest of acme may not pull either; olga may push to her own group.
    assert!(!stack.inspect("gus", "gus-pass", "acme/web/app", "v1").status.success());
    assert!(stack.push("olga", "olga-pass", "other/tools/cli", "1.0").status.success());
    // other is public: any authenticated user may pull it.
    assert!(stack.inspect("dev", "dev-pass", "other/tools/cli", "1.0").status.success());
}

#[test]
fn token_checks_at_the_edge() {
    let stack = Stack::start();
    let key = stack.signing_key();
    let t = now();
    let valid = Validity { issued_at: t, not_before: t, expires_at: t + 300 };

    // No token: 401 with a challenge that tells the client where and what to ask for.
    let r = stack.request("GET", "/v2/acme/web/app/manifests/v1", None);
    assert_eq!(r.status, 401);
    let www = r.www_authenticate.unwrap();
    assert_eq!(
        www,
        format!(
            r#"Bearer realm="{}",service="container_registry",scope="repository:acme/web/app:pull""#,
            stack.realm()
        )
    );
    assert!(r.body.contains(r#""code":"UNAUTHORIZED""#), "{}", r.body);

    // GET /v2/ with any valid token.
    let login = stack.token("mia", "mia-pass", &[]).unwrap();
    assert_eq!(stack.request("GET", "/v2/", Some(&login)).status, 200);

    // Expired token (signed by the right key) → 401 invalid_token.
    let expired = forge(
        &key,
        "dev",
        "acme/web/app",
        &["pull"],
        Validity { issued_at: t - 600, not_before: t - 600, expires_at: t - 60 },
    );
    let r = stack.request("GET", "/v2/acme/web/app/tags/list", Some(&expired));
    assert_eq!(r.status, 401);
    assert!(r.www_authenticate.unwrap().contains(r#"error="invalid_token""#));
    assert!(r.body.contains("expired"), "{}", r.body);

    // A token for repository A is refused on repository B.
    let for_a = stack.token("alice", "alice-pass", &["repository:acme/web/app:pull"]).unwrap();
    assert_eq!(
        stack.request("GET", "/v2/acme/web/app/tags/list", Some(&for_a)).status,
        404,
        "registry answers: not found yet"
    );
    let r = stack.request("GET", "/v2/acme/platform/api/tags/list", Some(&for_a));
    assert_eq!(r.status, 401);
    assert!(r.www_authenticate.unwrap().contains(r#"error="insufficient_scope""#));
    assert!(r.body.contains(r#""code":"DENIED""#));

    // A token signed by an unknown key, even with perfect claims, is refused.
    let stranger = forge(&es256_key(42), "root", "acme/web/app", &["pull", "push"], valid);
    let r = stack.request("GET", "/v2/acme/web/app/tags/list", Some(&stranger));
    assert_eq!(r.status, 401);
    assert!(r.body.contains("unknown key"), "{}", r.body);

    // Garbage and non-Bearer credentials are 401s, not 500s.
    assert_eq!(stack.request("GET", "/v2/", Some("not.a.jwt")).status, 401);

    // _catalog: only for admins.
    let root = stack.token("root", "root-pass", &["registry:catalog:*"]).unwrap();
    let r = stack.request("GET", "/v2/_catalog", Some(&root));
    assert_eq!(r.status, 200, "{}", r.body);
    let alice = stack.token("alice", "alice-pass", &["registry:catalog:*"]).unwrap();
    assert_eq!(stack.request("GET", "/v2/_catalog", Some(&alice)).status, 401);

    // Ambiguous paths are refused before anything else.
    let r = stack.request("GET", "/v2/acme/Web/manifests/v1", Some(&root));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("NAME_INVALID"), "{}", r.body);
}
