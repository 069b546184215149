//! The dependency proxy on its own endpoint (its own Envoy listener, as
//! GitLab serves it from its own host). GitLab's table, row by row, with real skopeo:
//! `skopeo login` to the endpoint (`GET /v2/`), then a pull (`skopeo inspect`) of
//! `<group>/dependency_proxy/containers/alpine:latest` from the real pull-through cache.

use registry_guard_e2e::{client_error_status, stderr, Stack};
use serde_json::json;

/// The example bundle's deploy tokens (no protection rules: deploy tokens hold no level).
fn deploy_bundle() -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = 10.into();
    b["protection_rules"] = json!([]);
    b
}

const ACME: &str = "acme/dependency_proxy/containers/alpine";
const OTHER: &str = "other/dependency_proxy/containers/alpine";

/// One row of GitLab's dependency-proxy table ("feature flag enabled"): who, with which secret, what login and pull give.
struct Row {
    seed: &'static str,
    who: &'static str,
    secret: &'static str,
    login: &'static str,
    image: &'static str,
    pull: &'static str,
}

fn classify(ok: bool, err: &str) -> &'static str {
    match (ok, client_error_status(err)) {
        (true, _) => "ok",
        (false, Some(403)) => "403",
        (false, Some(404)) => "404",
        (false, Some(401)) => "401",
        _ => "?",
    }
}

#[test]
fn seed_002_login_and_pull_table() {
    let stack = Stack::start();
    stack.seed_hub("alpine", "latest");
    let b = stack.sign_bundle("deploy", &deploy_bundle());
    assert!(stack.push_bundle(&b, &[]).status.success());
    let host = stack.dependency_proxy_host();

    #[rustfmt::skip]
    let rows = [
        Row { seed: "group deploy token", who: "acme-ci", secret: "gldt-acme-ci-rw", login: "ok", image: ACME, pull: "ok" },
        Row { seed: "group deploy token, other (public) group", who: "acme-ci", secret: "gldt-acme-ci-rw", login: "ok", image: OTHER, pull: "404" },
        Row { seed: "group deploy token, incorrect scopes (read only)", who: "deploy-token-2", secret: "gldt-acme-ro", login: "403", image: ACME, pull: "403" },
        Row { seed: "group deploy token, incorrect scopes (write only)", who: "deploy-token-6", secret: "gldt-acme-wo", login: "403", image: ACME, pull: "403" },
        Row { seed: "expired group deploy token", who: "deploy-token-4", secret: "gldt-expired", login: "401", image: ACME, pull: "401" },
        Row { seed: "revoked group deploy token", who: "deploy-token-5", secret: "gldt-revoked", login: "401", image: ACME, pull: "401" },
        Row { seed: "project deploy token", who: "deploy-token-3", secret: "gldt-web-deploy", login: "403", image: ACME, pull: "403" },
        Row { seed: "user, public group, not a member", who: "rita", secret: "rita-pass", login: "ok", image: OTHER, pull: "404" },
        Row { seed: "user, private group, not a member", who: "olga", secret: "olga-pass", login: "ok", image: ACME, pull: "404" },
        Row { seed: "user, guest of the group", who: "gus", secret: "gus-pass", login: "ok", image: ACME, pull: "404" },
        Row { seed: "user, reporter of the group", who: "rita", secret: "rita-pass", login: "ok", image: ACME, pull: "ok" },
        Row { seed: "PAT, public group, not a member", who: "dev", secret: "glpat-dev-example-token", login: "ok", image: OTHER, pull: "404" },
        Row { seed: "PAT, private group, not a member", who: "dev", secret: "glpat-dev-example-token", login: "ok", image: ACME, pull: "404" },
    ];
    let mut table = vec![format!(
        "| {:<50} | {:<15} | {:<6} | {:<6} | {:<42} | {:<6} | {:<6} |",
        "table row", "principal", "login", "(want)", "image", "pull", "(want)"
    )];
    let mut failures = Vec::new();
    for row in &rows {
        let _ = stack.skopeo(&["logout", "--all"]);
        let login = stack.skopeo(&["login", "--tls-verify=false", "-u", row.who, "-p", row.secret, &host]);
        let login_got = classify(login.status.success(), &stderr(&login));
        let src = format!("docker://{host}/{}:latest", row.image);
        let creds = format!("{}:{}", row.who, row.secret);
        let pull = stack.skopeo(&["inspect", "--tls-verify=false", "--creds", &creds, &src]);
        let pull_got = classify(pull.status.success(), &stderr(&pull));
        table.push(format!(
            "| {:<50} | {:<15} | {:<6} | {:<6} | {:<42} | {:<6} | {:<6} |",
            row.seed, row.who, login_got, row.login, row.image, pull_got, row.pull
        ));
        if login_got != row.login || pull_got != row.pull {
            failures.push(format!(
                "{}: login {login_got} (want {}), pull {pull_got} (want {}): {}{}",
                row.seed,
                row.login,
                row.pull,
                stderr(&login),
                stderr(&pull)
            ));
        }
    }
    eprintln!("the dependency-proxy table on the endpoint {host}, as run:\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The 403 at login is the filter's, with an OCI error body naming why.
    let t = stack.token("deploy-token-3", "gldt-web-deploy", &[]).unwrap();
    let url = format!("http://{host}/v2/");
    let r = ureq::get(&url).set("Authorization", &format!("Bearer {t}")).call();
    match r {
        Err(ureq::Error::Status(403, resp)) => {
            let body = resp.into_string().unwrap();
            assert!(body.contains("DENIED") && body.contains("group deploy tokens only"), "{body}");
        }
        other => panic!("project deploy token login: {other:?}"),
    }
    // Only proxy pulls exist there: registry paths are unknown, writes are refused.
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
    for (method, path, status) in [
        ("GET", "/v2/acme/web/app/manifests/v1", 404),
        ("GET", "/v2/_catalog", 404),
        ("PUT", "/v2/acme/dependency_proxy/containers/alpine/manifests/latest", 405),
    ] {
        let r = ureq::request(method, &format!("http://{host}{path}"))
            .set("Authorization", &format!("Bearer {rita}"))
            .call();
        let got = match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        assert_eq!(got, status, "{method} {path}");
    }
    // The registry endpoint keeps its behaviour: a project deploy token still logs in there.
    let login = stack.skopeo(&[
        "login",
        "--tls-verify=false",
        "-u",
        "deploy-token-3",
        "-p",
        "gldt-web-deploy",
        &stack.registry_host(),
    ]);
    assert!(login.status.success(), "{}", stderr(&login));
    // Anonymous and forged requests are still refused on both endpoints.
    for base in [format!("http://{host}"), stack.url("")] {
        let r = ureq::get(&format!("{base}/v2/{ACME}/manifests/latest")).call();
        assert!(matches!(r, Err(ureq::Error::Status(401, _))), "anonymous on {base}");
        let r =
            ureq::get(&format!("{base}/v2/{ACME}/manifests/latest")).set("Authorization", "Bearer e30.e30.e30").call();
        assert!(matches!(r, Err(ureq::Error::Status(401, _))), "forged on {base}");
    }
}
