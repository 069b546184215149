//! End to end: the registry's webhook events, enriched by the filter's events role
//! with who caused them, verified and counted by the reference consumer.

use std::time::{Duration, Instant};

use registry_guard_e2e::Stack;
use serde_json::json;

fn deploy_bundle(revision: u64) -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["protection_rules"] = json!([]);
    b
}

/// Polls the consumer until `done(counts)` or 30 s.
fn wait_for(stack: &Stack, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = stack.counts();
        if done(&counts) {
            return counts;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; consumer has {counts:#}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn counter(counts: &serde_json::Value, name: &str) -> u64 {
    counts["counters"][name].as_u64().unwrap_or(0)
}

fn rows<'a>(counts: &'a serde_json::Value, tag: &str) -> Vec<&'a serde_json::Value> {
    counts["events"].as_array().unwrap().iter().filter(|e| e["tag"] == tag).collect()
}

#[test]
fn events_are_attributed_verified_and_counted() {
    let mut stack = Stack::start();
    let b = stack.sign_bundle("deploy", &deploy_bundle(20));
    assert!(stack.push_bundle(&b, &[]).status.success());

    // dev and a deploy token push two tags of the same repository at the same time.
    std::thread::scope(|s| {
        let a = s.spawn(|| stack.push("dev", "dev-pass", "acme/web/app", "dev-1"));
        let b = s.spawn(|| stack.push("acme-ci", "gldt-acme-ci-rw", "acme/web/app", "ci-1"));
        assert!(a.join().unwrap().status.success());
        assert!(b.join().unwrap().status.success());
    });
    let counts = wait_for(&stack, "both tag pushes", |c| {
        counter(c, "i_container_registry_push_tag_user") >= 1
            && counter(c, "i_container_registry_push_tag_deploy_token") >= 1
    });
    let dev = rows(&counts, "dev-1");
    assert_eq!(dev.len(), 1, "{counts:#}");
    assert_eq!((dev[0]["username"].as_str(), dev[0]["token_type"].as_str()), (Some("dev"), Some("password")));
    assert_eq!(dev[0]["user_id"], 4);
    let ci = rows(&counts, "ci-1");
    assert_eq!(ci.len(), 1, "{counts:#}");
    assert_eq!((ci[0]["username"].as_str(), ci[0]["token_type"].as_str()), (Some("acme-ci"), Some("deploy_token")));
    assert_eq!(ci[0]["deploy_token_id"], 1);

    // mia deletes a tag (distribution 2.8 deletes the manifest the tag points at).
    let host = stack.registry_host();
    let del = stack.skopeo(&[
        "delete",
        "--tls-verify=false",
        "--creds",
        "mia:mia-pass",
        &format!("docker://{host}/acme/web/app:dev-1"),
    ]);
    assert!(del.status.success());
    let counts =
        wait_for(&stack, "the delete", |c| c["events"].as_array().unwrap().iter().any(|e| e["action"] == "delete"));
    let delete = counts["events"].as_array().unwrap().iter().find(|e| e["action"] == "delete").unwrap().clone();
    assert_eq!((delete["username"].as_str(), delete["token_type"].as_str()), (Some("mia"), Some("password")));

    // One id traces a request from the edge to the consumer.
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
    let url = stack.url("/v2/acme/web/app/manifests/ci-1");
    let resp = ureq::get(&url)
        .set("Authorization", &format!("Bearer {rita}"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .set("X-Request-Id", "trace-me-0042")
        .call()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let counts = wait_for(&stack, "the traced pull", |c| {
        c["events"].as_array().unwrap().iter().any(|e| e["request_id"] == "trace-me-0042")
    });
    let pull = counts["events"].as_array().unwrap().iter().find(|e| e["request_id"] == "trace-me-0042").unwrap();
    assert_eq!((pull["action"].as_str(), pull["username"].as_str()), (Some("pull"), Some("rita")));

    // A tampered `actor.user` is rejected and never counted as usage.
    let before = stack.counts();
    let real = stack.token("dev", "dev-pass", &[]).unwrap();
    let user_jwt =
        registry_guard_core::token::verify::decode_unverified(&real).unwrap()["user"].as_str().unwrap().to_owned();
    let mut parts: Vec<String> = user_jwt.split('.').map(str::to_owned).collect();
    parts[1] = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        br#"{"exp":4102444800,"iat":0,"nbf":0,"jti":"x","user_info":{"token_type":"pat","username":"root","user_id":1}}"#,
    );
    let forged = json!({"events": [{
        "id": "forged-1", "timestamp": "2026-11-22T00:00:00Z", "action": "push",
        "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "acme/web/app", "tag": "evil"},
        "request": {"id": "x", "addr": "10.1.2.3", "method": "PUT"},
        "actor": {"name": "root", "user_type": "pat", "user": parts.join(".")}
    }]});
    let resp = ureq::post(&format!("http://127.0.0.1:{}/events", stack.events_port))
        .set("Authorization", "Bearer e2e-events-secret")
        .set("Content-Type", "application/vnd.docker.distribution.events.v1+json")
        .send_string(&forged.to_string())
        .unwrap();
    assert_eq!(resp.status(), 200);
    let after = stack.counts();
    assert_eq!(after["rejected"].as_u64(), Some(before["rejected"].as_u64().unwrap_or(0) + 1), "{after:#}");
    assert_eq!(after["counters"], before["counters"], "a forged event counts nothing");

    // The consumer is down during a push: the registry retries, and every event is counted once.
    stack.stop_consumer();
    // What the registry is told meanwhile: Envoy's 503, never a 2xx, so it keeps retrying.
    let probe = ureq::post(&format!("http://127.0.0.1:{}/events", stack.events_port))
        .set("Authorization", "Bearer e2e-events-secret")
        .set("Content-Type", "application/vnd.docker.distribution.events.v1+json")
        .send_string(r#"{"events":[]}"#);
    assert!(matches!(probe, Err(ureq::Error::Status(503, _))), "consumer down must not be acknowledged");
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "while-down").status.success());
    std::thread::sleep(Duration::from_secs(2));
    stack.start_consumer();
    wait_for(&stack, "the retried delivery", |c| rows(c, "while-down").len() == 1);
    std::thread::sleep(Duration::from_secs(2));
    let counts_later = stack.counts();
    assert_eq!(rows(&counts_later, "while-down").len(), 1, "counted once: {counts_later:#}");
    assert_eq!(counter(&counts_later, "i_container_registry_push_tag_user"), 2, "{counts_later:#}");
    assert_eq!(counter(&counts_later, "i_container_registry_push_tag_deploy_token"), 1, "{counts_later:#}");
    // Exactly what happened: three tag pushes (two by dev, one by the deploy token), mia's
    // tag delete (distribution 2.8 reports it as a tag delete plus a manifest delete, which
    // GitLab's mapping counts as `delete_repository`), one repository created; the forged
    // event rejected; nothing unattributed.
    let c = &counts_later["counters"];
    assert_eq!(counter(&counts_later, "i_container_registry_delete_tag_user"), 1, "{c:#}");
    assert_eq!(counter(&counts_later, "i_container_registry_delete_repository_user"), 1, "{c:#}");
    assert_eq!(
        counter(&counts_later, "i_container_registry_create_repository_user")
            + counter(&counts_later, "i_container_registry_create_repository_deploy_token"),
        1,
        "{c:#}"
    );
    assert_eq!(counts_later["rejected"], 1);
    assert_eq!(counts_later["unattributed"], 0);
    eprintln!("consumer counts after the run:\n{:#}", counts_later["counters"]);
    eprintln!(
        "rejected {}, unattributed {}, duplicates {}",
        counts_later["rejected"], counts_later["unattributed"], counts_later["duplicates"]
    );
}
