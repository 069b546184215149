//! CI jobs (issue 18): registration and its refusals, job tokens at `/jwt/auth`
//! (`gitlab-ci-token`), job ID tokens and OIDC discovery, ending and expiry, bundle
//! revocations of jobs, and a job registered on one replica used on another.

use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::verify::{decode_unverified, Verifier};
use serde_json::{json, Value};

use crate::helpers::*;

const CI_TOKEN: &str = "ci-system-token";
const OTHER_CI_TOKEN: &str = "other-ci-token";
const PRINCIPALS: &str = include_str!("../../../../policies/example/principals.json");
const BUNDLE: &str = include_str!("../../../../policies/example/bundle.json");

fn settings(rsa: bool) -> String {
    let mut ci_jobs = json!({
        "ci_systems": [
            {"name": "acme-ci", "token_sha256": sha256_hex(CI_TOKEN), "projects": ["acme"]},
            {"name": "other-ci", "token_sha256": sha256_hex(OTHER_CI_TOKEN), "projects": ["other", "acme/web"]}
        ],
        "job_token_ttl_seconds": 600
    });
    if rsa {
        ci_jobs["id_token_rsa_key"] = json!("keys/oidc-rsa-key.pem");
    }
    json!({
        "environment": "example",
        "bundle_keys": "keys/operator-jwks.json",
        "operator_token_sha256": "keys/operator-token.sha256",
        "ci_jobs": ci_jobs
    })
    .to_string()
}

fn bundle(revision: u64, revocations: Value) -> String {
    let mut b: Value = serde_json::from_str(BUNDLE).unwrap();
    b["revision"] = json!(revision);
    b["revocations"] = revocations;
    sign_bundle_value(&b)
}

fn config(rsa: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let principals: Value = serde_json::from_str(PRINCIPALS).unwrap();
    write_config(dir.path(), &principals, Some(&settings(rsa)));
    write_operator_keys(dir.path());
    std::fs::write(dir.path().join("bundle.jws"), bundle(1, json!({}))).unwrap();
    if rsa {
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
            .arg(dir.path().join("keys/oidc-rsa-key.pem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

fn registration(user: &str, job_id: u64) -> Value {
    json!({"project": "acme/web", "user": user, "pipeline_id": 30, "job_id": job_id, "ref": "v1",
           "ref_type": "tag", "ref_protected": true, "aud": "sts.amazonaws.com",
           "claims": {"deploy_env": "prod"}})
}

impl TestApp {
    async fn register(&self, ci_token: Option<&str>, body: &Value) -> (u16, Value) {
        let mut req = self.client.post(format!("{}/jobs", self.address)).json(body);
        if let Some(t) = ci_token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn end_job(&self, ci_token: &str, job_token: &str) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}/jobs/end", self.address))
            .bearer_auth(ci_token)
            .json(&json!({"job_token": job_token}))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// A registry token for the job token (or why not).
    async fn job_login(&self, job_token: &str, scope: &str) -> Result<Value, (u16, String)> {
        let resp = self
            .get_token(&format!("service=container_registry&scope={scope}"), Some(("gitlab-ci-token", job_token)))
            .await;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        if status != 200 {
            return Err((status, body["errors"][0]["message"].as_str().unwrap_or_default().to_owned()));
        }
        Ok(decode_unverified(body["token"].as_str().unwrap()).unwrap())
    }
}

#[tokio::test]
async fn registration_errors_name_the_level_the_claim_and_the_rule() {
    let app = spawn_in(config(false)).await;
    let (status, body) = app.register(None, &registration("mia", 1)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthorized")));
    let (status, _) = app.register(Some("wrong"), &registration("mia", 1)).await;
    assert_eq!(status, 401);

    let cases = [
        // The CI system does not cover the project.
        (OTHER_CI_TOKEN, json!({"project": "acme/platform/api", "user": "alice"}), 403, "ci_system_scope", "project `acme/platform/api`", Value::Null,
         "CI system `other-ci` may not register jobs for project `acme/platform/api`"),
        // The user may not run jobs there (reporter).
        (CI_TOKEN, json!({"user": "rita"}), 403, "may_not_run_jobs", "project `acme/web`", Value::Null,
         "user `rita` may not run jobs in project `acme/web`: running a job needs developer or above, `rita` has reporter (20)"),
        (CI_TOKEN, json!({"user": "nobody"}), 422, "unknown_user", "project `acme/web`", Value::Null, "no user `nobody`"),
        (CI_TOKEN, json!({"project": "acme"}), 403, "not_a_project", "project `acme`", Value::Null, "jobs run in projects"),
        // Seed 004: an immutable operator claim (group level, and re-locked by the project).
        (CI_TOKEN, json!({"claims": {"tenant": "evil"}}), 422, "immutable_claim", "group `acme`", json!("tenant"),
         "job claim `tenant` is immutable: group `acme` sets it with `mutable: false` (the default), so a job may not change or redefine it"),
        (CI_TOKEN, json!({"claims": {"cost_center": "cc-2040"}}), 422, "immutable_claim", "project `acme/web`", json!("cost_center"),
         "(even to the same value)"),
        // Built-ins, `aud` among them.
        (CI_TOKEN, json!({"claims": {"aud": "sts.amazonaws.com"}}), 422, "built_in_claim", "built-in", json!("aud"),
         "job claim `aud` is a built-in claim of the job ID token"),
        (CI_TOKEN, json!({"claims": {"project_path": "other/tools"}}), 422, "built_in_claim", "built-in", json!("project_path"), "never set"),
        (CI_TOKEN, json!({"claims": {"x": null}}), 422, "invalid_claim", "job", json!("x"), "non-null"),
        (CI_TOKEN, json!({"colour": "blue"}), 400, "invalid_request", "job", Value::Null, "unknown field `colour`"),
        (CI_TOKEN, json!({"ttl_seconds": 100000}), 400, "invalid_request", "job", Value::Null, "`ttl_seconds` must be between 1 and 600"),
    ];
    for (token, patch, status, rule, level, claim, message) in cases {
        let mut body = registration("mia", 2);
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (got, answer) = app.register(Some(token), &body).await;
        assert_eq!(got, status, "{patch}: {answer}");
        assert_eq!(answer["error"], "job_refused", "{answer}");
        assert_eq!(answer["rule"], rule, "{answer}");
        assert_eq!(answer["level"], level, "{answer}");
        assert_eq!(answer["claim"], claim, "{answer}");
        assert!(answer["message"].as_str().unwrap().contains(message), "{answer}");
    }
}

#[tokio::test]
async fn a_job_token_logs_in_as_gitlab_ci_token_with_the_users_level_in_its_project() {
    let app = spawn_in(config(false)).await;
    let (status, job) = app.register(Some(CI_TOKEN), &registration("mia", 7)).await;
    assert_eq!(status, 201, "{job}");
    let job_token = job["job_token"].as_str().unwrap();
    assert_eq!(job["expires_in"], 600);

    let claims = app.job_login(job_token, "repository:acme/web/app:pull,push,delete").await.unwrap();
    assert_eq!(claims["sub"], "mia");
    assert_eq!(claims["auth_type"], "job_token");
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "acme/web/app", "actions": ["pull", "push"],
                "meta": {"project_path": "acme/web", "access_level": 40}}])
    );
    let user = decode_unverified(claims["user"].as_str().unwrap()).unwrap();
    assert_eq!(
        user["user_info"],
        json!({"token_type": "job_token", "username": "mia", "user_id": 3,
               "job": {"id": 7, "pipeline_id": 30, "project": "acme/web"}})
    );
    // The registry token verifies as any other (the filter's view).
    let verified = app.verifier().await.verify(claims_token(&app, job_token).await.as_str(), now()).unwrap();
    assert_eq!(verified.job.as_ref().map(|j| j.id), Some(7));

    // Pull only on a project that allowlists acme/web, nothing on others.
    let claims = app.job_login(job_token, "repository:other/tools/x:pull,push").await.unwrap();
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]));
    let claims = app.job_login(job_token, "repository:acme/platform/api:pull").await.unwrap();
    assert_eq!(claims["access"], json!([]));
    // No refresh token for a job.
    let resp = app
        .get_token(
            "service=container_registry&offline_token=true&scope=repository:acme/web/app:pull",
            Some(("gitlab-ci-token", job_token)),
        )
        .await;
    let body: Value = resp.json().await.unwrap();
    assert!(body["token"].is_string() && body.get("refresh_token").is_none(), "{body}");

    // The job token itself is no registry token; a forged one and other usernames are refused.
    assert!(app.verifier().await.verify(job_token, now()).is_err());
    let (status, _) = app.job_login("eyJhbGciOiJFUzI1NiJ9.e30.c2ln", "repository:acme/web/app:pull").await.unwrap_err();
    assert_eq!(status, 401);
    let forged =
        app.get_token("service=container_registry&scope=repository:acme/web/app:pull", Some(("mia", job_token))).await;
    assert_eq!(forged.status(), 401);
    let anonymous = app.get_token("service=container_registry&scope=repository:acme/web/app:pull", None).await;
    assert_eq!(anonymous.status(), 401);
}

async fn claims_token(app: &TestApp, job_token: &str) -> String {
    let resp = app
        .get_token(
            "service=container_registry&scope=repository:acme/web/app:pull",
            Some(("gitlab-ci-token", job_token)),
        )
        .await;
    let body: Value = resp.json().await.unwrap();
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn ended_and_expired_jobs_are_refused_at_once() {
    let app = spawn_in(config(false)).await;
    let (_, job) = app.register(Some(CI_TOKEN), &registration("dev", 8)).await;
    let job_token = job["job_token"].as_str().unwrap().to_owned();
    assert!(app.job_login(&job_token, "repository:acme/web/app:pull").await.is_ok());
    // Only the CI system that registered it may end it.
    let (status, body) = app.end_job(OTHER_CI_TOKEN, &job_token).await;
    assert_eq!((status, body["rule"].as_str()), (403, Some("ci_system_scope")), "{body}");
    let (status, body) = app.end_job(CI_TOKEN, &job_token).await;
    assert_eq!(status, 200, "{body}");
    let (status, message) = app.job_login(&job_token, "repository:acme/web/app:pull").await.unwrap_err();
    assert_eq!((status, message.as_str()), (401, "HTTP Basic: Access denied: job 8 has ended"));
    let (status, body) = app.register(Some(CI_TOKEN), &registration("dev", 8)).await;
    assert_eq!((status, body["rule"].as_str()), (409, Some("job_ended")));

    let mut short = registration("dev", 9);
    short["ttl_seconds"] = json!(1);
    let (_, job) = app.register(Some(CI_TOKEN), &short).await;
    let job_token = job["job_token"].as_str().unwrap();
    assert!(app.job_login(job_token, "repository:acme/web/app:pull").await.is_ok());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, message) = app.job_login(job_token, "repository:acme/web/app:pull").await.unwrap_err();
    assert_eq!(status, 401);
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn bundle_revocations_of_jobs_and_other_replicas() {
    let dir = config(false);
    // A second replica on a copy of the configuration (same signing key, same bundle).
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let a = spawn_in(dir).await;
    let b = spawn_in(copy).await;
    let (_, job) = a.register(Some(CI_TOKEN), &registration("mia", 10)).await;
    let job_token = job["job_token"].as_str().unwrap().to_owned();
    // Registered on A, usable on B: the token is self-contained.
    assert!(b.job_login(&job_token, "repository:acme/web/app:pull").await.is_ok());
    // Ended on A: refused on A at once; B does not know (documented), until the bundle says so.
    assert_eq!(a.end_job(CI_TOKEN, &job_token).await.0, 200);
    assert!(a.job_login(&job_token, "repository:acme/web/app:pull").await.is_err());
    assert!(b.job_login(&job_token, "repository:acme/web/app:pull").await.is_ok());
    let resp = b.put_bundle(bundle(2, json!({"jobs": {"pipelines": [30]}}))).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let (status, message) = b.job_login(&job_token, "repository:acme/web/app:pull").await.unwrap_err();
    assert_eq!((status, message.as_str()), (401, "HTTP Basic: Access denied: pipeline 30 (of job 10) is revoked"));
    let (status, body) = b.register(Some(CI_TOKEN), &registration("mia", 11)).await;
    assert_eq!((status, body["rule"].as_str()), (403, Some("job_revoked")), "{body}");
    // Anonymous and forged requests are still refused after the bundle change.
    assert_eq!(b.get_token("service=container_registry&scope=repository:acme/web/app:pull", None).await.status(), 401);
    assert_eq!(
        b.get_token(
            "service=container_registry&scope=repository:acme/web/app:pull",
            Some(("gitlab-ci-token", "forged"))
        )
        .await
        .status(),
        401
    );
    assert_eq!(b.register(Some("forged"), &registration("mia", 12)).await.0, 401);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn job_id_tokens_are_rs256_oidc_tokens_with_merged_claims() {
    let app = spawn_in(config(true)).await;
    let discovery: Value = app
        .client
        .get(format!("{}/.well-known/openid-configuration", app.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], app.address);
    assert_eq!(discovery["jwks_uri"], format!("{}/oidc/jwks", app.address));
    assert_eq!(discovery["id_token_signing_alg_values_supported"], json!(["RS256"]));
    let jwks: Value =
        app.client.get(discovery["jwks_uri"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "RSA");

    let (status, job) = app.register(Some(CI_TOKEN), &registration("mia", 20)).await;
    assert_eq!(status, 201, "{job}");
    let id_token = job["id_token"].as_str().unwrap();
    let verifier = Verifier {
        keys: KeySet::from_jwks(&jwks).unwrap(),
        issuer: app.address.clone(),
        audience: "sts.amazonaws.com".into(),
        leeway_seconds: 0,
    };
    verifier.verify(id_token, now()).unwrap();
    let claims = decode_unverified(id_token).unwrap();
    for (name, value) in [
        ("iss", json!(app.address)),
        ("aud", json!("sts.amazonaws.com")),
        ("sub", json!("project_path:acme/web:ref_type:tag:ref:v1")),
        ("namespace_id", json!("10")),
        ("namespace_path", json!("acme")),
        ("project_id", json!("100")),
        ("project_path", json!("acme/web")),
        ("user_id", json!("3")),
        ("user_login", json!("mia")),
        ("pipeline_id", json!("30")),
        ("job_id", json!("20")),
        ("ref", json!("v1")),
        ("ref_type", json!("tag")),
        ("ref_protected", json!("true")),
        // Inherited operator claims and the job's own.
        ("tenant", json!("acme")),
        ("cost_center", json!("cc-2040")),
        ("aws_role_arn", json!("arn:aws:iam::123456789012:role/acme-web-deploy")),
        ("deploy_env", json!("prod")),
    ] {
        assert_eq!(claims[name], value, "{name}: {claims}");
    }
    assert!(claims["jti"].is_string() && claims["exp"].is_i64() && claims["iat"].is_i64());
    // Several audiences.
    let mut body = registration("mia", 21);
    body["aud"] = json!(["sts.amazonaws.com", "vault"]);
    let (_, job) = app.register(Some(CI_TOKEN), &body).await;
    assert_eq!(
        decode_unverified(job["id_token"].as_str().unwrap()).unwrap()["aud"],
        json!(["sts.amazonaws.com", "vault"])
    );
}

#[tokio::test]
async fn ci_jobs_settings_errors_name_the_field() {
    for (ci_jobs, field) in [
        (
            json!({"ci_systems": [{"name": "x", "token_sha256": "abc", "projects": ["acme"]}]}),
            "$.ci_jobs.ci_systems[0].token_sha256",
        ),
        (
            json!({"ci_systems": [{"name": "x", "token_sha256": sha256_hex("a"), "projects": []}]}),
            "$.ci_jobs.ci_systems[0].projects",
        ),
        (json!({"job_token_ttl_seconds": 5}), "$.ci_jobs.job_token_ttl_seconds"),
        (json!({"oidc_issuer": "example.com/"}), "$.ci_jobs.oidc_issuer"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let principals: Value = serde_json::from_str(PRINCIPALS).unwrap();
        write_config(dir.path(), &principals, Some(&json!({"ci_jobs": ci_jobs}).to_string()));
        let e = build(dir.path()).await.err().unwrap().to_string();
        assert!(e.contains(field), "{e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let principals: Value = serde_json::from_str(PRINCIPALS).unwrap();
    write_config(dir.path(), &principals, Some(r#"{"ci_jobs": {"id_token_rsa_key": "keys/signing-key.pem"}}"#));
    let e = build(dir.path()).await.err().unwrap().to_string();
    assert!(e.contains("is not a PKCS#8 PEM RSA private key"), "{e}");
}

/// Starts the service on `port` (chosen before, so that replicas can name each other).
async fn spawn_on(dir: tempfile::TempDir, port: u16) -> TestApp {
    let app = registry_guard_token_service::Application::build(registry_guard_token_service::Settings {
        config_dir: dir.path().to_path_buf(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    })
    .await
    .unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));
    TestApp::attach(address, dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `ci_jobs.peers`: a replica forwards an end to its peers, so the job token is refused on
/// every replica at once; a peer that cannot confirm makes the end answer 502 (retry), and
/// the end is idempotent. Bad peer URLs are refused naming the field.
#[tokio::test]
async fn an_end_reaches_every_peer_replica_at_once() {
    let (pa, pb, dead) = (free_port(), free_port(), free_port());
    let with_peers = |peers: Value| {
        let dir = config(false);
        let mut s: Value = serde_json::from_str(&settings(false)).unwrap();
        s["ci_jobs"]["peers"] = peers;
        std::fs::write(dir.path().join("token-service.json"), s.to_string()).unwrap();
        dir
    };
    let a = spawn_on(with_peers(json!([format!("http://127.0.0.1:{pb}")])), pa).await;
    let b_dir = with_peers(json!([format!("http://127.0.0.1:{pa}"), format!("http://127.0.0.1:{dead}")]));
    // B shares A's signing key (replicas do).
    std::fs::copy(a.dir.path().join("keys/signing-key.pem"), b_dir.path().join("keys/signing-key.pem")).unwrap();
    let b = spawn_on(b_dir, pb).await;
    let scope = "repository:acme/web/app:pull";

    // Ended on A: refused on A and on B at once.
    let (_, job) = a.register(Some(CI_TOKEN), &registration("mia", 40)).await;
    let job_token = job["job_token"].as_str().unwrap().to_owned();
    assert!(b.job_login(&job_token, scope).await.is_ok());
    let (status, body) = a.end_job(CI_TOKEN, &job_token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["peers"][0]["ended"], true, "{body}");
    assert_eq!(a.job_login(&job_token, scope).await.unwrap_err().1, "HTTP Basic: Access denied: job 40 has ended");
    assert_eq!(b.job_login(&job_token, scope).await.unwrap_err().1, "HTTP Basic: Access denied: job 40 has ended");

    // Ended on B, one of whose peers is down: ended on B and A, 502 naming the peer; again: same.
    let (_, job) = b.register(Some(CI_TOKEN), &registration("mia", 41)).await;
    let job_token = job["job_token"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let (status, body) = b.end_job(CI_TOKEN, &job_token).await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"], "job_end_not_propagated", "{body}");
        assert_eq!(body["peers"][0]["ended"], true, "{body}");
        assert_eq!(body["peers"][1]["ended"], false, "{body}");
        assert!(body["peers"][1]["error"].as_str().unwrap().contains(&dead.to_string()), "{body}");
        assert!(!body.to_string().contains(CI_TOKEN));
    }
    assert!(a.job_login(&job_token, scope).await.is_err());
    assert!(b.job_login(&job_token, scope).await.is_err());

    // A forwarded end is authenticated like any other: a wrong CI token ends nothing anywhere.
    let (_, job) = a.register(Some(CI_TOKEN), &registration("mia", 42)).await;
    let job_token = job["job_token"].as_str().unwrap().to_owned();
    assert_eq!(a.end_job("forged", &job_token).await.0, 401);
    assert!(a.job_login(&job_token, scope).await.is_ok());
    assert!(b.job_login(&job_token, scope).await.is_ok());
    // Anonymous and forged logins are refused on both.
    for app in [&a, &b] {
        assert_eq!(app.get_token(&format!("service=container_registry&scope={scope}"), None).await.status(), 401);
        assert!(app.job_login("forged", scope).await.is_err());
    }

    // Bad peer URLs are refused at start, naming the field.
    for bad in ["127.0.0.1:5001", "http://h:1/", "ftp://h", "http://"] {
        let dir = with_peers(json!([bad]));
        let e = build(dir.path()).await.err().unwrap().to_string();
        assert!(e.contains("$.ci_jobs.peers[0]"), "{bad}: {e}");
    }
}
