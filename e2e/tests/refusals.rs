//! Refusals every client can read. A refused request with a body (manifest `PUT`,
//! upload `PATCH`/`PUT`) is answered only once its body has been read, so clients that write
//! the body while reading the answer (containerd's pusher) get the denial instead of a hang
//! or a broken pipe. Real clients from Debian: containerd's `ctr`, skopeo, podman. Plus the
//! OCI conformance answers for invalid references and digests, through Envoy.

use std::time::Duration;

use registry_guard_e2e::clients::{run_with_deadline, Containerd, Podman, Run};
use registry_guard_e2e::Stack;
use serde_json::json;

/// A client must finish (with the product's message) well within this.
const WITHIN: Duration = Duration::from_secs(20);
/// …and is killed (the test fails as a hang) at this.
const DEADLINE: Duration = Duration::from_secs(60);

fn bundle() -> serde_json::Value {
    json!({"revision": 1, "protection_rules": [
        {"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*",
         "tag_name_pattern": "^v[0-9]+",
         "minimum_access_level_for_push": "maintainer", "minimum_access_level_for_delete": "maintainer"},
        {"id": "web-locked", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/locked",
         "minimum_access_level_for_push": "owner"}
    ]})
}

fn stack_with_rules() -> Stack {
    let stack = Stack::start();
    let b = stack.sign_bundle("rules", &bundle());
    assert!(stack.push_bundle(&b, &[]).status.success());
    stack
}

/// The three refusals every client is tried with: (user, repository, tag, what its output must say).
const CASES: &[(&str, &str, &str, &str)] = &[
    // A protected tag: refused at the manifest PUT (the body is the manifest).
    ("dev", "acme/web/app", "v1", "container protected; you are not allowed to push tag `v1`"),
    // A reporter: refused at upload start (the token grants pull only).
    ("rita", "acme/web/app", "r1", "`rita` (reporter) may not push on repository `acme/web/app`"),
    // A rule refusing every push to the repository: refused at upload start.
    ("mia", "acme/web/locked", "m1", "container protected"),
];

fn assert_ended_with(run: &Run, expect: &str, client: &str) {
    assert!(!run.hung(), "{client} hung (killed after {DEADLINE:?}): {}", run.output());
    assert!(!run.success(), "{client} push should have been refused: {}", run.output());
    assert!(run.elapsed < WITHIN, "{client} took {:?} to give up: {}", run.elapsed, run.output());
    assert!(run.output().contains(expect), "{client} output lacks `{expect}`: {}", run.output());
}

#[test]
fn containerd_pushes_end_with_the_refusal() {
    let stack = stack_with_rules();
    let Some(containerd) = Containerd::start(&stack.path("containerd")) else { return };
    let host = stack.registry_host();
    // Control: an allowed push goes through.
    let ok = format!("{host}/acme/web/app:dev-1");
    containerd.import_demo_image(&stack, &ok, "ctr ok");
    let run = containerd.push(&ok, "dev", "dev-pass", DEADLINE);
    assert!(run.success(), "allowed ctr push failed: {}", run.output());
    for (user, repo, tag, expect) in CASES {
        let reference = format!("{host}/{repo}:{tag}");
        containerd.import_demo_image(&stack, &reference, &format!("ctr {user}"));
        let secret = format!("{user}-pass");
        // Four times: the hang was intermittent in nothing, but the broken pipe was random.
        for _ in 0..4 {
            let run = containerd.push(&reference, user, &secret, DEADLINE);
            // ctr 1.6 prints the status line (or the challenge's error), not the OCI body.
            let status = if *user == "rita" { "insufficient_scope" } else { "403 Forbidden" };
            assert_ended_with(&run, status, "ctr");
            assert!(!run.output().contains("closed pipe"), "ctr saw a broken pipe: {}", run.output());
        }
        let _ = expect;
    }
}

#[test]
fn skopeo_and_podman_pushes_end_with_the_refusal() {
    let stack = stack_with_rules();
    let host = stack.registry_host();
    for (user, repo, tag, expect) in CASES {
        let started = std::time::Instant::now();
        let out = stack.push(user, &format!("{user}-pass"), repo, tag);
        let run = Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: started.elapsed(),
        };
        assert_ended_with(&run, expect, "skopeo");
    }
    let Some(podman) = Podman::new(&stack.path("podman")) else { return };
    for (user, repo, tag, expect) in CASES {
        let layout = stack.path(&format!("podman-layout-{user}"));
        let src = stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", user]);
        let image = podman.load(src.trim());
        let run = podman.push(&image, &format!("{host}/{repo}:{tag}"), user, &format!("{user}-pass"), DEADLINE);
        assert_ended_with(&run, expect, "podman");
    }
}

/// The refused request's body is read to its end before the answer: a raw client that
/// writes a whole 2 MiB manifest body, then reads, gets the 403 and its OCI body, and the
/// connection stays usable; a body past the drain cap (8 MiB) ends promptly too.
#[test]
fn refused_bodies_are_drained_then_answered() {
    let stack = stack_with_rules();
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(20)).build();
    for size in [0usize, 100, 2 << 20] {
        let resp = agent
            .put(&stack.url("/v2/acme/web/app/manifests/v1"))
            .set("Authorization", &format!("Bearer {dev}"))
            .set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .send_bytes(&vec![b' '; size]);
        let (status, body) = match resp {
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            other => panic!("{size} bytes: {other:?}"),
        };
        assert_eq!(status, 403, "{size} bytes: {body}");
        assert!(body.contains("container protected"), "{body}");
    }
    // Past the cap: answered (or closed) at once, never a hang.
    let started = std::time::Instant::now();
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "--data-binary", "@-"])
        .arg("-H")
        .arg(format!("Authorization: Bearer {dev}"))
        .arg(stack.url("/v2/acme/web/app/manifests/v1"));
    let big = stack.path("big-body");
    std::fs::write(&big, vec![b' '; 20 << 20]).unwrap();
    cmd.args(["--data-binary", &format!("@{}", big.display())]);
    let run = run_with_deadline(&mut cmd, stack.dir.path(), "curl-big", DEADLINE);
    assert!(!run.hung() && started.elapsed() < WITHIN, "{run:?}");
    // Anonymous and forged requests are still refused afterwards.
    assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/v1", None).status, 401);
    assert_eq!(stack.request("GET", "/v2/acme/web/app/manifests/v1", Some("e30.e30.e30")).status, 401);
}

/// OCI conformance through Envoy: an invalid manifest reference and a blob path that is not
/// a digest get 404 with an OCI error body (as the spec and distribution answer); a digest-
/// shaped invalid manifest reference keeps the filter's clean 400 (distribution: 500).
#[test]
fn conformance_answers_for_invalid_references() {
    let stack = Stack::start();
    let token = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("GET", "/v2/acme/web/app/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/acme/web/app/manifests/.INVALID_MANIFEST_NAME", 404, ""),
        ("GET", "/v2/acme/web/app/blobs/.INVALID_DIGEST", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/acme/web/app/manifests/sha256:totallywrong", 400, "MANIFEST_INVALID"),
    ];
    for (method, path, status, code) in cases {
        for bearer in [None, Some(token.as_str())] {
            let r = stack.request(method, path, bearer);
            assert_eq!(r.status, *status, "{method} {path}: {}", r.body);
            if !code.is_empty() {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(v["errors"][0]["code"], *code, "{}", r.body);
            }
        }
    }
}
