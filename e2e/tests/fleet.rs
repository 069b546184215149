//! A fleet on loopback: three Envoys with the filter in front of one registry, two token
//! services (the second a replica following the first's bundle). One authenticated push to
//! the first token service reaches every component; the figures (convergence, time from a
//! revocation push to the first refusal on each Envoy) are printed. The source going down
//! leaves decisions going on (last known good, backoff visible), an Envoy restarted meanwhile
//! boots on its configured bundle and converges when the source returns. Anonymous and
//! forged requests are refused on every Envoy throughout.

use std::time::{Duration, Instant};

use registry_guard_e2e::fleet::{
    envoy_stats, token_service_revision, vm_revisions, vm_revisions_on, Envoy, TokenService,
};
use registry_guard_e2e::{Options, Stack};

const REPO: &str = "acme/web/app";
const TAG: &str = "fleet-1";

/// Status of a manifest pull through the Envoy on `port` with `bearer`.
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

/// Anonymous and forged requests are refused (401) through the Envoy on `port`.
fn assert_closed(port: u16, forged: &str, when: &str) {
    assert_eq!(pull(port, None), 401, "{when}: anonymous pull through :{port}");
    assert_eq!(pull(port, Some(forged)), 401, "{when}: forged token through :{port}");
}

/// A token with a tampered signature (same claims).
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

/// The example bundle at `revision`, optionally revoking every token of `dev`.
fn bundle(revision: u64, revoke_dev: bool) -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    if revoke_dev {
        b["revocations"] = serde_json::json!({"users": [{"username": "dev"}]});
    }
    b
}

fn push_to_token_service(stack: &Stack, name: &str, b: &serde_json::Value) {
    let jws = std::fs::read(stack.sign_bundle(name, b)).unwrap();
    let (status, body) = stack.put_bundle_raw(&jws, Some(&format!("Bearer {}", stack.operator_token())));
    assert_eq!(status, 200, "PUT /bundle: {body}");
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

#[test]
fn one_push_reaches_three_envoys_and_two_token_services() {
    let stack = Stack::start_with(Options {
        bundle_source: Some("long-poll"),
        per_client_login_rate: Some((1000, 60_000)),
        ..Options::default()
    });
    let replica = TokenService::start_replica(&stack, "token-service-2", stack.token_port, 20);
    let b = Envoy::start(&stack, "envoy-b", stack.token_port, "long-poll");
    let c = Envoy::start(&stack, "envoy-c", replica.port, "long-poll");
    let envoys = [
        ("envoy-a", stack.envoy_port, stack.admin_port),
        ("envoy-b", b.listen_port, b.admin_port),
        ("envoy-c", c.listen_port, c.admin_port),
    ];

    // The first token service gets its first bundle; everyone converges on it (the replica
    // and the Envoys started with none, and were backing off from its 404s).
    let r0 = token_service_revision(stack.token_port) + 1;
    push_to_token_service(&stack, "fleet-start", &bundle(r0 as u64, false));
    wait_until("the replica converges", Duration::from_secs(30), || token_service_revision(replica.port) == r0);
    for (name, _, admin) in envoys {
        wait_until(name, Duration::from_secs(90), || {
            let v = vm_revisions(admin);
            !v.is_empty() && v.iter().all(|r| *r == r0)
        });
    }
    let failed_before: Vec<i64> = envoys.iter().map(|(_, _, a)| fetch_stat(*a, "failed")).collect();
    let pushed = stack.push("dev", "dev-pass", REPO, TAG);
    assert!(pushed.status.success(), "{}", registry_guard_e2e::stderr(&pushed));
    let dev = stack.token("dev", "dev-pass", &[&format!("repository:{REPO}:pull")]).unwrap();
    let mia = stack.token("mia", "mia-pass", &[&format!("repository:{REPO}:pull")]).unwrap();
    let forged = forge(&mia);
    for (name, port, _) in envoys {
        assert_eq!(pull(port, Some(&dev)), 200, "{name}: dev pulls before the revocation");
        assert_closed(port, &forged, "before the push");
    }

    // One push, to the first token service only: revoke every token of dev.
    let r1 = r0 as u64 + 1;
    let t0 = Instant::now();
    push_to_token_service(&stack, "fleet-revoke-dev", &bundle(r1, true));
    let mut refused_at = [None; 3];
    let mut converged_at = [None; 3];
    while refused_at.iter().chain(converged_at.iter()).any(Option::is_none) {
        if t0.elapsed() > Duration::from_secs(60) {
            let gauges: Vec<_> = envoys.iter().map(|(n, _, a)| (n, vm_revisions(*a))).collect();
            panic!("no convergence within 60 s: refused {refused_at:?}, converged {converged_at:?}, VM revisions {gauges:?}");
        }
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
        std::thread::sleep(Duration::from_millis(10));
    }
    let replica_rev = token_service_revision(replica.port);
    println!("fleet (long polling): one push to token service 1 (revision {r0} -> {r1}, revoking dev):");
    for (i, (name, _, _)) in envoys.iter().enumerate() {
        let via = if i == 2 { " (following token service 2, which follows 1)" } else { "" };
        println!(
            "  {name}{via}: every filter VM on revision {r1} after {} ms; dev's token refused after {} ms",
            ms(converged_at[i].unwrap()),
            ms(refused_at[i].unwrap())
        );
    }
    assert_eq!(replica_rev, r1 as i64, "token service 2 follows");
    for (i, (name, port, admin)) in envoys.iter().enumerate() {
        assert_eq!(pull(*port, Some(&mia)), 200, "{name}: mia still pulls");
        assert_closed(*port, &forged, "after the push");
        // (failures before the first push: the token service had no bundle yet, 404)
        assert_eq!(fetch_stat(*admin, "failed"), failed_before[i], "{name}: no failed fetch once converged");
        assert!(fetch_stat(*admin, "changed") >= 2, "{name}");
    }
    // The replica refuses dev at login too (it decides under the same revision).
    assert_eq!(stack_token_at(replica.port, "dev", "dev-pass"), 401);
    // The fleet as `rgctl status` sees it.
    let fleet = stack.path("fleet.txt");
    let mut list: String = envoys.iter().map(|(_, _, admin)| format!("envoy http://127.0.0.1:{admin}\n")).collect();
    list += &format!(
        "token-service http://127.0.0.1:{}\ntoken-service http://127.0.0.1:{}\n",
        stack.token_port, replica.port
    );
    std::fs::write(&fleet, list).unwrap();
    let status = stack.rgctl(&["status", "--fleet", &fleet.display().to_string()]);
    println!("$ rgctl status --fleet fleet.txt\n{status}");
    assert!(status.contains(&format!("fleet: 5 components, all on revision {r1}")), "{status}");

    // The first token service goes down: Envoys A and B go on deciding under revision r1,
    // and back off (failed fetches, seconds since success growing).
    let mut stack = stack;
    stack.stop_token_service();
    std::thread::sleep(Duration::from_secs(6));
    for (name, port, admin) in &envoys[..2] {
        assert_eq!(pull(*port, Some(&mia)), 200, "{name}: decisions go on without the source");
        assert_eq!(pull(*port, Some(&dev)), 401, "{name}: the revocation stays (last known good)");
        assert_closed(*port, &forged, "source down");
        let failed = fetch_stat(*admin, "failed") - failed_before[if *name == "envoy-a" { 0 } else { 1 }];
        let since = fetch_stat(*admin, "seconds_since_success");
        println!("  {name} with the source down 6 s: {failed} failed fetches, {since} s since the last success");
        assert!(failed >= 1 && since >= 3, "{name}: backoff not visible: failed {failed}, since {since}");
    }
    // Envoy B restarts meanwhile: it boots on its configured (fallback) bundle ...
    drop(b);
    let b2 = Envoy::start(&stack, "envoy-b2", stack.token_port, "long-poll");
    // (this stack configures no bundle in the ECDS file: its fallback is the empty revision 0)
    let fallback = vm_revisions(b2.admin_port);
    println!("  envoy-b restarted while the source is down: boots on its configured bundle, revision(s) {fallback:?}");
    assert!(!fallback.is_empty() && fallback.iter().all(|r| *r == 0), "boots on its configured bundle: {fallback:?}");
    assert_closed(b2.listen_port, &forged, "restarted without the source");
    // ... and converges once the source is back.
    stack.start_token_service();
    let back = wait_until("envoy-b2 re-converges", Duration::from_secs(60), || {
        let v = vm_revisions(b2.admin_port);
        !v.is_empty() && v.iter().all(|r| *r == r1 as i64)
    });
    println!("  the source back: envoy-b2 on revision {r1} after {} ms", ms(back));
    assert_eq!(pull(b2.listen_port, Some(&dev)), 401);
    assert_eq!(pull(b2.listen_port, Some(&mia)), 200);
    assert_closed(b2.listen_port, &forged, "re-converged");
}

/// `registry_guard.bundle_fetch.<what>` of an Envoy (summed over its VMs).
fn fetch_stat(admin: u16, what: &str) -> i64 {
    envoy_stats(admin).get(&format!("wasmcustom.registry_guard.bundle_fetch.{what}")).copied().unwrap_or(0)
}

fn stack_token_at(port: u16, user: &str, secret: &str) -> u16 {
    let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{secret}"));
    match ureq::get(&format!(
        "http://127.0.0.1:{port}/jwt/auth?service=container_registry&scope=repository:{REPO}:pull"
    ))
    .set("Authorization", &format!("Basic {basic}"))
    .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("token service :{port}: {e}"),
    }
}

#[test]
fn plain_polling_converges_and_then_only_sees_not_modified() {
    let stack = Stack::start_with(Options { bundle_source: Some("poll"), ..Options::default() });
    let b = Envoy::start(&stack, "envoy-b", stack.token_port, "poll");
    let envoys = [("envoy-a", stack.admin_port), ("envoy-b", b.admin_port)];
    let r0 = token_service_revision(stack.token_port) + 1;
    push_to_token_service(&stack, "fleet-start", &bundle(r0 as u64, false));
    for (name, admin) in envoys {
        wait_until(name, Duration::from_secs(60), || {
            let v = vm_revisions(admin);
            !v.is_empty() && v.iter().all(|r| *r == r0)
        });
    }
    let r1 = r0 as u64 + 1;
    let t0 = Instant::now();
    push_to_token_service(&stack, "fleet-poll", &bundle(r1, false));
    println!("fleet (plain polling every 2 s, jittered): one push to the token service (revision {r0} -> {r1}):");
    for (name, admin) in envoys {
        let d = wait_until(
            &format!("{name} (VM revisions now {:?})", vm_revisions(admin)),
            Duration::from_secs(30),
            || {
                let v = vm_revisions(admin);
                !v.is_empty() && v.iter().all(|r| *r == r1 as i64)
            },
        );
        println!("  {name}: every filter VM on revision {r1} after {} ms", ms(t0.elapsed().max(d)));
    }
    // The dependency-proxy endpoint's filter VMs follow the same source and count in the same
    // fetch counters: the fleet has converged when they have too.
    for (name, admin) in envoys {
        wait_until(&format!("{name} dependency-proxy VMs"), Duration::from_secs(30), || {
            vm_revisions_on(admin, "dependency_proxy").iter().all(|r| *r == r1 as i64)
        });
    }
    // Converged: further fetches are conditional and answered 304.
    let before: Vec<_> = envoys.iter().map(|(_, a)| envoy_stats(*a)).collect();
    std::thread::sleep(Duration::from_secs(6));
    for (i, (name, admin)) in envoys.iter().enumerate() {
        let after = envoy_stats(*admin);
        let delta = |k: &str| {
            let k = format!("wasmcustom.registry_guard.bundle_fetch.{k}");
            after.get(&k).copied().unwrap_or(0) - before[i].get(&k).copied().unwrap_or(0)
        };
        println!(
            "  {name} over 6 s after convergence: {} not modified, {} changed, {} failed",
            delta("not_modified"),
            delta("changed"),
            delta("failed")
        );
        assert!(delta("not_modified") >= 2, "{name}: polling goes on");
        assert_eq!((delta("changed"), delta("failed"), delta("refused")), (0, 0, 0), "{name}");
    }
}
