//! End to end (issue 18): CI jobs with real skopeo through real Envoy. A CI system registers
//! jobs at the token service; the jobs log in as `gitlab-ci-token` with their job token;
//! protection rules judge the person behind the job; job tokens reach their own project and
//! allowlisting projects only; ended and bundle-revoked jobs are refused (the filter too);
//! the consumer counts a job's push as a user event; a job ID token is verified by PyJWT
//! (an off-the-shelf OIDC verifier) from the discovery document.

use std::process::Command;
use std::time::{Duration, Instant};

use registry_guard_e2e::{root, stderr, Stack};
use serde_json::{json, Value};

/// The CI system of the example world (`ci_jobs.ci_systems` of token-service.json).
const CI_TOKEN: &str = "example-ci-token";

fn example_bundle(revision: u64, revocations: Value) -> Value {
    let text = std::fs::read_to_string(root().join("policies/example/bundle.json")).unwrap();
    let mut b: Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["revocations"] = revocations;
    b
}

fn token_service(stack: &Stack, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", stack.token_port)
}

/// Registers a job of `acme/web` triggered by `user`; returns (status, body).
fn register(stack: &Stack, user: &str, job_id: u64, pipeline_id: u64, claims: Value) -> (u16, Value) {
    let body = json!({"project": "acme/web", "user": user, "pipeline_id": pipeline_id, "job_id": job_id,
                      "ref": "v1", "ref_type": "tag", "ref_protected": true,
                      "aud": "sts.amazonaws.com", "claims": claims});
    let resp = ureq::post(&token_service(stack, "/jobs"))
        .set("Authorization", &format!("Bearer {CI_TOKEN}"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string());
    match resp {
        Ok(r) => (r.status(), serde_json::from_str(&r.into_string().unwrap()).unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            (code, serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or(Value::Null))
        }
        Err(e) => panic!("register: {e}"),
    }
}

fn job_token(stack: &Stack, user: &str, job_id: u64, pipeline_id: u64) -> (String, String) {
    let (status, body) = register(stack, user, job_id, pipeline_id, json!({"deploy_env": "prod"}));
    assert_eq!(status, 201, "{body}");
    (body["job_token"].as_str().unwrap().to_owned(), body["id_token"].as_str().unwrap().to_owned())
}

fn wait_for_counts(stack: &Stack, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = stack.counts();
        if done(&counts) {
            return counts;
        }
        assert!(Instant::now() < deadline, "timed out; consumer has {counts:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// PyJWT, driven by the discovery document: fetch it, take `jwks_uri`, let `PyJWKClient`
/// pick the key by `kid`, and decode with the expected audience and issuer.
const VERIFY_PY: &str = r#"
import json, sys, urllib.request
import jwt
issuer, token, audience = sys.argv[1], sys.argv[2], sys.argv[3]
conf = json.load(urllib.request.urlopen(issuer + "/.well-known/openid-configuration"))
client = jwt.PyJWKClient(conf["jwks_uri"])
key = client.get_signing_key_from_jwt(token)
claims = jwt.decode(token, key.key, algorithms=conf["id_token_signing_alg_values_supported"],
                    audience=audience, issuer=conf["issuer"], options={"require": ["exp", "iat", "iss", "aud", "sub"]})
print(json.dumps({"alg": jwt.get_unverified_header(token)["alg"], "claims": claims}))
"#;

fn pyjwt_verify(stack: &Stack, id_token: &str, audience: &str) -> Result<Value, String> {
    let out = Command::new(root().join(".venv/bin/python"))
        .args(["-c", VERIFY_PY, &token_service(stack, ""), id_token, audience])
        .output()
        .expect("run .venv/bin/python (make deps installs PyJWT)");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("python json"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn ci_jobs_push_pull_end_and_oidc() {
    let stack = Stack::start();
    let b = stack.sign_bundle("jobs", &example_bundle(10, json!({})));
    assert!(stack.push_bundle(&b, &[]).status.success());

    // A job triggered by a maintainer pushes a protected release tag.
    let (mia_job, mia_id_token) = job_token(&stack, "mia", 101, 1);
    let out = stack.push("gitlab-ci-token", &mia_job, "acme/web/app", "v1");
    assert!(out.status.success(), "{}", stderr(&out));
    // The same job triggered by a developer is refused by the rule.
    let (dev_job, _) = job_token(&stack, "dev", 102, 2);
    let out = stack.push("gitlab-ci-token", &dev_job, "acme/web/app", "v2");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("rule `web-release-tags`") && err.contains("`dev` has access level 30"), "{err}");
    // ... while the developer's job may push an unprotected tag.
    let out = stack.push("gitlab-ci-token", &dev_job, "acme/web/app", "dev-2");
    assert!(out.status.success(), "{}", stderr(&out));

    // A job cannot push to another project, even when its user could (alice owns acme).
    assert!(stack.push("alice", "alice-pass", "acme/platform/api/svc", "p1").status.success());
    let (alice_job, _) = job_token(&stack, "alice", 103, 3);
    let out = stack.push("gitlab-ci-token", &alice_job, "acme/platform/api/svc", "p2");
    assert!(!out.status.success());
    assert!(!stack.inspect("gitlab-ci-token", &alice_job, "acme/platform/api/svc", "p1").status.success());
    // It can pull from a project that allowlists acme/web (other/tools), not push there.
    assert!(stack.push("olga", "olga-pass", "other/tools/base", "1").status.success());
    let out = stack.inspect("gitlab-ci-token", &alice_job, "other/tools/base", "1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stack.push("gitlab-ci-token", &alice_job, "other/tools/base", "2").status.success());

    // The consumer counts the job's push as a user event of mia (user id 3).
    let counts = wait_for_counts(&stack, |c| {
        c["events"].as_array().is_some_and(|e| e.iter().any(|e| e["tag"] == "v1" && e["action"] == "push"))
    });
    let v1 = counts["events"].as_array().unwrap().iter().find(|e| e["tag"] == "v1").unwrap();
    assert_eq!(
        (v1["username"].as_str(), v1["token_type"].as_str(), v1["user_id"].as_u64()),
        (Some("mia"), Some("job_token"), Some(3)),
        "{v1}"
    );
    assert!(counts["counters"]["i_container_registry_push_tag_user"].as_u64().unwrap_or(0) >= 1, "{counts:#}");

    // The job ID token, verified by PyJWT through the discovery document, with the job's
    // audience, carrying built-in, inherited operator and job claims.
    let verified = pyjwt_verify(&stack, &mia_id_token, "sts.amazonaws.com").unwrap();
    eprintln!("PyJWT verified: {verified:#}");
    assert_eq!(verified["alg"], "RS256");
    let claims = &verified["claims"];
    for (name, value) in [
        ("sub", json!("project_path:acme/web:ref_type:tag:ref:v1")),
        ("project_path", json!("acme/web")),
        ("user_login", json!("mia")),
        ("user_id", json!("3")),
        ("job_id", json!("101")),
        ("ref_protected", json!("true")),
        ("tenant", json!("acme")),
        ("cost_center", json!("cc-2040")),
        ("deploy_env", json!("prod")),
    ] {
        assert_eq!(claims[name], value, "{name}: {claims}");
    }
    let wrong = pyjwt_verify(&stack, &mia_id_token, "someone-else").unwrap_err();
    assert!(wrong.contains("InvalidAudienceError"), "{wrong}");
    // A job claim that breaks an immutable operator claim fails the registration.
    let (status, body) = register(&stack, "mia", 104, 4, json!({"tenant": "evil"}));
    eprintln!("refused registration: {status} {body}");
    assert_eq!(
        (status, body["rule"].as_str(), body["level"].as_str()),
        (422, Some("immutable_claim"), Some("group `acme`"))
    );

    // Ending the job: its token is refused at once.
    assert!(stack.inspect("gitlab-ci-token", &mia_job, "acme/web/app", "v1").status.success());
    let ended = ureq::post(&token_service(&stack, "/jobs/end"))
        .set("Authorization", &format!("Bearer {CI_TOKEN}"))
        .set("Content-Type", "application/json")
        .send_string(&json!({"job_token": mia_job}).to_string())
        .unwrap();
    assert_eq!(ended.status(), 200);
    assert!(!stack.inspect("gitlab-ci-token", &mia_job, "acme/web/app", "v1").status.success());
    let (status, body) = stack.token("gitlab-ci-token", &mia_job, &["repository:acme/web/app:pull"]).unwrap_err();
    assert_eq!(status, 401);
    assert!(body.contains("job 101 has ended"), "{body}");

    // Revoking a pipeline through the bundle ends its jobs everywhere, the registry tokens
    // already issued included (the filter reads the job from the nested `user` JWT).
    let issued = stack.token("gitlab-ci-token", &dev_job, &["repository:acme/web/app:pull"]).unwrap();
    assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/dev-2", Some(&issued)).status, 200);
    let b = stack.sign_bundle("jobs-revoked", &example_bundle(11, json!({"jobs": {"pipelines": [2]}})));
    assert!(stack.push_bundle(&b, &[]).status.success());
    std::thread::sleep(Duration::from_millis(500));
    let r = stack.request("GET", "/v2/acme/web/app/manifests/dev-2", Some(&issued));
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("pipeline 2 (of job 102) is revoked"), "{}", r.body);
    assert!(!stack.inspect("gitlab-ci-token", &dev_job, "acme/web/app", "dev-2").status.success());
    // Other jobs are untouched; anonymous and forged requests are still refused.
    assert!(stack.inspect("gitlab-ci-token", &alice_job, "other/tools/base", "1").status.success());
    stack.assert_fail_closed();
}
