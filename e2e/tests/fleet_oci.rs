//! The bundle source as an OCI artifact in the registry registry-guard guards (issue 17,
//! 2(b)): `rgctl push --oci` through Envoy and the filter (token auth as `root`) stores the
//! signed bundle as `registry-guard/policy:prod`; two Envoys (following it through their
//! `registry` cluster) and a token-service replica (following the registry directly)
//! converge on it; a tampered blob, a bundle signed by another key and an older revision are
//! refused everywhere and the previous revision stays; anonymous and forged requests are
//! refused throughout.

use std::path::Path;
use std::time::{Duration, Instant};

use registry_guard_e2e::fleet::{envoy_stats, token_service_revision, vm_revisions, Envoy, TokenService};
use registry_guard_e2e::{Options, Stack};

const REPO: &str = "acme/web/app";
const TAG: &str = "oci-1";
const ARTIFACT: &str = "registry-guard/policy";

fn pull(port: u16, bearer: Option<&str>) -> u16 {
    let mut req = ureq::get(&format!("http://127.0.0.1:{port}/v2/{REPO}/manifests/{TAG}"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .timeout(Duration::from_secs(10));
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("pull through :{port}: {e}"),
    }
}

fn assert_closed(port: u16, forged: &str, when: &str) {
    assert_eq!(pull(port, None), 401, "{when}: anonymous pull through :{port}");
    assert_eq!(pull(port, Some(forged)), 401, "{when}: forged token through :{port}");
}

fn forge(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').expect("jws");
    let flipped: String = sig.chars().rev().collect();
    format!("{rest}.{flipped}")
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

fn bundle(revision: u64, revoke_dev: bool) -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    if revoke_dev {
        b["revocations"] = serde_json::json!({"users": [{"username": "dev"}]});
    }
    b
}

fn fetch_stat(admin: u16, what: &str) -> i64 {
    envoy_stats(admin).get(&format!("wasmcustom.registry_guard.bundle_fetch.{what}")).copied().unwrap_or(0)
}

fn rejected_stat(admin: u16, why: &str) -> i64 {
    envoy_stats(admin).get(&format!("wasmcustom.registry_guard.bundle_fetch_rejected.{why}")).copied().unwrap_or(0)
}

fn replica_status(port: u16) -> serde_json::Value {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/bundle/status")).call().unwrap().into_string().unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `rgctl push FILE --oci 127.0.0.1:<envoy>/registry-guard/policy:<tag>` as root, through
/// Envoy and the filter.
fn push_oci(stack: &Stack, file: &Path, tag: &str) -> String {
    let password = stack.path("root-password");
    std::fs::write(&password, "root-pass").unwrap();
    let target = format!("127.0.0.1:{}/{ARTIFACT}:{tag}", stack.envoy_port);
    stack.rgctl(&[
        "push",
        &file.display().to_string(),
        "--oci",
        &target,
        "--insecure",
        "--username",
        "root",
        "--password-file",
        &password.display().to_string(),
    ])
}

#[test]
fn an_oci_artifact_pushed_through_envoy_reaches_two_envoys_and_a_replica() {
    let stack = Stack::start_with(Options {
        bundle_source: Some("oci"),
        per_client_login_rate: Some((1000, 60_000)),
        ..Options::default()
    });
    let b = Envoy::start(&stack, "envoy-b", stack.token_port, "oci");
    let replica = TokenService::start_following(
        &stack,
        "token-service-oci",
        serde_json::json!({
            "url": format!("http://127.0.0.1:{}", stack.registry_port), "poll_seconds": 1,
            "oci": {"repository": ARTIFACT, "reference": "prod"},
        }),
    );
    let envoys = [("envoy-a", stack.envoy_port, stack.admin_port), ("envoy-b", b.listen_port, b.admin_port)];

    // Anonymous and forged pushes of the artifact are refused by the filter.
    let r0 = token_service_revision(stack.token_port) as u64 + 1;
    let first = stack.sign_bundle("oci-r0", &bundle(r0, false));
    let anonymous = std::process::Command::new(registry_guard_e2e::artifact("target/release/rgctl"))
        .args(["push", &first.display().to_string(), "--insecure", "--oci"])
        .arg(format!("127.0.0.1:{}/{ARTIFACT}:prod", stack.envoy_port))
        .output()
        .unwrap();
    assert!(!anonymous.status.success(), "an anonymous push of the artifact must fail");
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(err.contains("requires a login"), "{err}");

    // The first artifact; everyone converges on it (they were backing off from 404s).
    let out = push_oci(&stack, &first, "prod");
    println!("$ rgctl push oci-r0.jws --oci 127.0.0.1:<envoy>/{ARTIFACT}:prod --insecure --username root …\n{out}");
    assert!(out.contains("stored as sha256:"), "{out}");
    wait_until("the replica converges", Duration::from_secs(60), || token_service_revision(replica.port) == r0 as i64);
    for (name, _, admin) in envoys {
        wait_until(name, Duration::from_secs(90), || {
            let v = vm_revisions(admin);
            !v.is_empty() && v.iter().all(|r| *r == r0 as i64)
        });
    }
    let pushed = stack.push("dev", "dev-pass", REPO, TAG);
    assert!(pushed.status.success(), "{}", registry_guard_e2e::stderr(&pushed));
    let dev = stack.token("dev", "dev-pass", &[&format!("repository:{REPO}:pull")]).unwrap();
    let mia = stack.token("mia", "mia-pass", &[&format!("repository:{REPO}:pull")]).unwrap();
    let forged = forge(&mia);
    for (name, port, _) in envoys {
        assert_eq!(pull(port, Some(&dev)), 200, "{name}: dev pulls before the revocation");
        assert_closed(port, &forged, "before the push");
    }

    // One push of the artifact, revoking dev: convergence time of each component.
    let r1 = r0 + 1;
    let revoke = stack.sign_bundle("oci-r1", &bundle(r1, true));
    let t0 = Instant::now();
    push_oci(&stack, &revoke, "prod");
    let mut refused_at = [None; 2];
    let mut converged_at = [None; 2];
    let mut replica_at = None;
    while refused_at.iter().chain(converged_at.iter()).any(Option::is_none) || replica_at.is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no convergence: {refused_at:?} {converged_at:?} {replica_at:?}"
        );
        for (i, (_, port, admin)) in envoys.iter().enumerate() {
            if refused_at[i].is_none() && pull(*port, Some(&dev)) == 401 {
                refused_at[i] = Some(t0.elapsed());
            }
            if converged_at[i].is_none() {
                let v = vm_revisions(*admin);
                if !v.is_empty() && v.iter().all(|r| *r == r1 as i64) {
                    converged_at[i] = Some(t0.elapsed());
                }
            }
        }
        if replica_at.is_none() && token_service_revision(replica.port) == r1 as i64 {
            replica_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("fleet (OCI artifact, plain polling every 2 s for Envoys, 1 s for the replica): revision {r0} -> {r1}");
    for (i, (name, _, _)) in envoys.iter().enumerate() {
        println!(
            "  {name}: every filter VM on revision {r1} after {} ms; dev's token refused after {} ms",
            converged_at[i].unwrap().as_millis(),
            refused_at[i].unwrap().as_millis()
        );
    }
    println!("  token-service replica: revision {r1} after {} ms", replica_at.unwrap().as_millis());
    for (name, port, admin) in envoys {
        assert_eq!(pull(port, Some(&mia)), 200, "{name}: mia still pulls");
        assert_closed(port, &forged, "after the push");
        assert!(fetch_stat(admin, "not_modified") >= 1, "{name}: conditional manifest requests answered 304");
    }

    // Hostile artifacts: each is refused by every follower and revision r1 stays.
    // (a) A blob that does not match its digest: the artifact pushed under another tag, its
    // blob overwritten in the registry's storage, then the manifest tagged `prod` (rgctl
    // finds the blob present and only puts the manifest).
    let r2 = r1 + 1;
    let tampered = stack.sign_bundle("oci-r2-tampered", &bundle(r2, false));
    push_oci(&stack, &tampered, "staging");
    let bytes = std::fs::read(&tampered).unwrap();
    let hex = registry_guard_core::policy::oci::sha256_digest(&bytes).trim_start_matches("sha256:").to_owned();
    let data = stack.path(&format!("storage/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut evil = bytes.clone();
    let at = evil.len() / 2;
    evil[at] = if evil[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&data, &evil).unwrap();
    // (b) A bundle signed by another key; (c) an older revision.
    let other_key = registry_guard_core::token::testing::es256_key(99);
    let foreign = registry_guard_core::token::sign::sign_jws_unchecked(
        &other_key,
        &registry_guard_e2e::with_canary(&bundle(r2, false)),
        registry_guard_core::policy::bundle::BUNDLE_TYP,
    )
    .unwrap();
    let foreign_file = stack.path("oci-foreign.jws");
    std::fs::write(&foreign_file, foreign).unwrap();
    let older = stack.sign_bundle("oci-older", &bundle(r0, false));
    for (what, file, envoy_reason, replica_reason) in [
        ("tampered blob", tampered.as_path(), "artifact", "tampered"),
        ("signed by another key", foreign_file.as_path(), "signature", "signature"),
        ("older revision", older.as_path(), "revision", "older than the active revision"),
    ] {
        let before: Vec<i64> = envoys.iter().map(|(_, _, a)| rejected_stat(*a, envoy_reason)).collect();
        let replica_before = replica_status(replica.port)["source"]["fetches"]["refused"].as_u64().unwrap_or(0);
        push_oci(&stack, file, "prod");
        for (i, (name, _, admin)) in envoys.iter().enumerate() {
            wait_until(&format!("{name} refuses the {what}"), Duration::from_secs(30), || {
                rejected_stat(*admin, envoy_reason) > before[i]
            });
        }
        wait_until(&format!("the replica refuses the {what}"), Duration::from_secs(30), || {
            replica_status(replica.port)["source"]["fetches"]["refused"].as_u64().unwrap_or(0) > replica_before
        });
        let status = replica_status(replica.port);
        assert!(status["source"]["last_error"].as_str().unwrap_or("").contains(replica_reason), "{what}: {status}");
        assert_eq!(status["active_revision"], r1, "{what}: the replica keeps revision {r1}");
        for (name, port, admin) in envoys {
            let v = vm_revisions(admin);
            assert!(!v.is_empty() && v.iter().all(|r| *r == r1 as i64), "{name}: {what}: revision {r1} stays: {v:?}");
            assert_eq!(pull(port, Some(&dev)), 401, "{name}: {what}: the revocation stays");
            assert_eq!(pull(port, Some(&mia)), 200, "{name}: {what}: decisions go on");
            assert_closed(port, &forged, what);
        }
        println!("  {what}: refused by both Envoys (rejected.{envoy_reason}) and the replica; revision {r1} stays");
    }

    // A good newer artifact still gets through after all that.
    let r3 = r2 + 1;
    let good = stack.sign_bundle("oci-r3", &bundle(r3, false));
    let t0 = Instant::now();
    push_oci(&stack, &good, "prod");
    for (name, _, admin) in envoys {
        wait_until(name, Duration::from_secs(30), || {
            let v = vm_revisions(admin);
            !v.is_empty() && v.iter().all(|r| *r == r3 as i64)
        });
    }
    wait_until("replica", Duration::from_secs(30), || token_service_revision(replica.port) == r3 as i64);
    println!("  a good revision {r3} after the hostile ones: fleet converged after {} ms", t0.elapsed().as_millis());
    for (name, port, _) in envoys {
        assert_eq!(pull(port, Some(&dev)), 200, "{name}: dev no longer revoked under {r3}");
        assert_closed(port, &forged, "after recovery");
    }
    // `rgctl status` shows the source.
    let fleet = stack.path("fleet.txt");
    std::fs::write(
        &fleet,
        format!(
            "envoy http://127.0.0.1:{}\nenvoy http://127.0.0.1:{}\ntoken-service http://127.0.0.1:{}\n",
            stack.admin_port, b.admin_port, replica.port
        ),
    )
    .unwrap();
    let status = stack.rgctl(&["status", "--fleet", &fleet.display().to_string()]);
    println!("$ rgctl status --fleet fleet.txt\n{status}");
    assert!(status.contains(&format!("oci:http://127.0.0.1:{}/{ARTIFACT}:prod", stack.registry_port)), "{status}");
    assert!(status.contains(&format!("all on revision {r3}")), "{status}");
    assert!(status.contains("(cluster `registry`, OCI artifact registry-guard/policy:prod)"), "{status}");
}
