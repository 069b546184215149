//! End to end: signed bundles pushed live to real Envoy (ECDS file) and the token
//! service; protection rules enforced on real skopeo pushes and deletes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use registry_guard_e2e::{stderr, Stack};
use serde_json::json;

fn rules(revision: u64, rules: serde_json::Value) -> serde_json::Value {
    json!({"revision": revision, "protection_rules": rules})
}

fn release_tags(revision: u64) -> serde_json::Value {
    rules(
        revision,
        json!([{"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "tag_name_pattern": "^v[0-9]+",
                "minimum_access_level_for_push": "maintainer", "minimum_access_level_for_delete": "owner"}]),
    )
}

fn digest_of(stack: &Stack, repo: &str, tag: &str) -> String {
    let out = stack.inspect("alice", "alice-pass", repo, tag);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_owned()
}

#[test]
fn protection_rules_on_real_pushes_and_deletes() {
    let stack = Stack::start();
    // Before any rule: dev pushes a release tag, and keeps the token he got for it.
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "v1").status.success());
    let old_token = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();

    let b1 = stack.sign_bundle("b1", &release_tags(1));
    assert!(stack.push_bundle(&b1, &[]).status.success());
    assert!(stack.status().contains("active revision 1"));

    // A developer may not overwrite v1 …
    let denied = stack.push("dev", "dev-pass", "acme/web/app", "v1");
    assert!(!denied.status.success());
    let msg = stderr(&denied);
    assert!(msg.contains("container protected; you are not allowed to push tag `v1` of `acme/web/app`"), "{msg}");
    assert!(msg.contains("rule `web-release-tags`"), "{msg}");
    // … but dev-123 is fine, and a maintainer may move v1.
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "dev-123").status.success());
    assert!(stack.push("mia", "mia-pass", "acme/web/app", "v1").status.success());

    // The token issued before the rule existed is refused by the filter on the next request.
    let r = stack.request("PUT", "/v2/acme/web/app/manifests/v2", Some(&old_token));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("web-release-tags"), "{}", r.body);

    // Deletes below owner: by tag, and by the tag's digest (skopeo deletes by digest).
    let mia = stack.token("mia", "mia-pass", &["repository:acme/web/app:delete"]).unwrap();
    let r = stack.request("DELETE", "/v2/acme/web/app/manifests/v1", Some(&mia));
    assert_eq!(r.status, 403, "{}", r.body);
    let digest = digest_of(&stack, "acme/web/app", "v1");
    let r = stack.request("DELETE", &format!("/v2/acme/web/app/manifests/{digest}"), Some(&mia));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("deleting by digest counts as deleting protected tags"), "{}", r.body);
    let host = stack.registry_host();
    let del = stack.skopeo(&[
        "delete",
        "--tls-verify=false",
        "--creds",
        "mia:mia-pass",
        &format!("docker://{host}/acme/web/app:v1"),
    ]);
    assert!(!del.status.success() && stderr(&del).contains("container protected"), "{}", stderr(&del));
    // The owner may.
    let del = stack.skopeo(&[
        "delete",
        "--tls-verify=false",
        "--creds",
        "alice:alice-pass",
        &format!("docker://{host}/acme/web/app:v1"),
    ]);
    assert!(del.status.success());

    // Seed 003's reading, "protected up to developer", on the whole path: the token service
    // withholds push from dev, and the client shows the rule, not a bare "denied".
    let b2 = stack.sign_bundle(
        "b2",
        &rules(2, json!([{"id": "web-up-to-developer", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "push_protected_up_to_access_level": "developer"}])),
    );
    assert!(stack.push_bundle(&b2, &[]).status.success());
    let t = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let claims = registry_guard_core::token::verify::decode_unverified(&t).unwrap();
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]), "push withheld: {claims}");
    let denied = stack.push("dev", "dev-pass", "acme/web/app", "dev-124");
    assert!(!denied.status.success());
    assert!(stderr(&denied).contains("rule `web-up-to-developer`"), "{}", stderr(&denied));
    assert!(stack.push("mia", "mia-pass", "acme/web/app", "dev-124").status.success());
}

#[test]
fn rejected_bundles_keep_the_last_good_revision() {
    let mut stack = Stack::start();
    let good = stack.sign_bundle("good", &release_tags(3));
    assert!(stack.push_bundle(&good, &[]).status.success());

    // Unsigned JSON, delivered anyway: both components refuse it.
    let unsigned = stack.path("unsigned.json");
    std::fs::write(&unsigned, release_tags(4).to_string()).unwrap();
    let out = stack.push_bundle(&unsigned, &["--force"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("envoy") && said.contains("REJECTED"), "{said}");
    assert!(said.contains("bundle is not signed"), "{said}");

    // A signed bundle with an invalid rule: refused locally with its JSON path …
    let bad = stack.sign_bundle_unchecked(
        "bad",
        &rules(5, json!([{"id": "x", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*", "tag_name_pattern": "v(", "minimum_access_level_for_push": "owner"}])),
    );
    let out = stack.push_bundle(&bad, &[]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("$.protection_rules[0].tag_name_pattern"), "{said}");
    // … and by the components themselves when forced through.
    let out = stack.push_bundle(&bad, &["--force"]);
    assert!(!out.status.success());
    // An older revision (rollback) is refused too, by rgctl before any component is touched.
    let old = stack.sign_bundle("old", &release_tags(2));
    let out = stack.push_bundle(&old, &[]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("REFUSED revision 2") && said.contains("not newer than the active revision 3"), "{said}");

    let status = stack.status();
    assert!(status.contains("envoy") && status.contains("active revision 3;"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("envoy") && !l.contains("rejected updates 0")), "{status}");
    assert!(status.contains("token service") && status.contains("active revision 3 ("), "{status}");
    // The token service's last refusal is the forced invalid bundle (the rollback never
    // reached it); nothing of a bundle that failed verification is reported but the reason.
    assert!(status.contains("$.protection_rules[0].tag_name_pattern"), "{status}");
    assert!(stack.log("envoy").contains("rejected configuration"), "the filter says why in Envoy's log");

    // The rule of revision 3 still holds, and a restarted Envoy comes back with it.
    assert!(!stack.push("dev", "dev-pass", "acme/web/app", "v7").status.success());
    stack.restart_envoy();
    assert!(stack.status().contains("active revision 3;"));
    assert!(!stack.push("dev", "dev-pass", "acme/web/app", "v7").status.success());
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "dev-7").status.success());
}

#[test]
fn live_pushes_drop_no_requests_and_apply_to_the_next_request() {
    let stack = Arc::new(Stack::start());
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "base").status.success());

    // A push in progress: an upload session is open when the rule arrives.
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let r = stack.request("POST", "/v2/acme/web/app/blobs/uploads/", Some(&dev));
    assert_eq!(r.status, 202);

    // Pulls in a loop while bundles are pushed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loader = {
        let (stack, stop, ok, failed) = (stack.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let r = stack.request("GET", "/v2/acme/web/app/manifests/base", Some(&rita));
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("pull failed during bundle pushes: {} {}", r.status, r.body);
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    for revision in 1..=4 {
        let b = stack.sign_bundle(&format!("live{revision}"), &release_tags(revision));
        assert!(stack.push_bundle(&b, &[]).status.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let block = stack.sign_bundle(
        "block",
        &rules(5, json!([{"id": "freeze-web", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "minimum_access_level_for_push": "owner"}])),
    );
    assert!(stack.push_bundle(&block, &[]).status.success());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("pulls during 5 bundle pushes: {ok} ok, {failed} failed");
    assert!(ok > 50, "the load loop ran ({ok} pulls)");
    assert_eq!(failed, 0);

    // The open upload's next request is decided under the new revision: no restart, same token.
    let r = stack.request("GET", "/v2/acme/web/app/blobs/uploads/00000000-0000-0000-0000-000000000000", Some(&dev));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("freeze-web"), "{}", r.body);
}
