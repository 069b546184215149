//! Stateless attribution across a fleet (issue 17, item 4): requests go through Envoys A and
//! B, the registry's notifications are delivered to Envoy C's events listener, which never
//! saw those requests — only the fleet's attribution key is shared. Concurrent pushes by
//! different principals (users and a deploy token) are each attributed to the right one; a
//! pull flood of thousands of manifest GETs beside a push does not make the push
//! unattributable (the old shared-data ring of 4,096 records did); the registry's log holds
//! neither a bearer token nor a nested `user` JWT. The attribution counts of the run are
//! printed. Anonymous and forged requests are refused on every Envoy afterwards.

use std::process::Output;
use std::time::{Duration, Instant};

use registry_guard_e2e::fleet::{envoy_stats, token_service_revision, vm_revisions, Envoy};
use registry_guard_e2e::{Options, Stack};

const REPO: &str = "acme/web/app";
/// Manifest GETs of the flood (more than the old ring's 4,096 records).
const FLOOD: usize = 5000;
const FLOOD_THREADS: usize = 8;

fn bundle(revision: i64) -> serde_json::Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["protection_rules"] = serde_json::json!([]);
    b
}

/// Pushes a generated image to `REPO:tag` through the Envoy on `port` as `user:secret`.
fn push_via(stack: &Stack, port: u16, user: &str, secret: &str, tag: &str, salt: &str) -> Output {
    let layout = stack.path(&format!("layout-{tag}-{user}"));
    let src = stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", salt]);
    let dst = format!("docker://127.0.0.1:{port}/{REPO}:{tag}");
    stack.skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", &format!("{user}:{secret}"), src.trim(), &dst])
}

fn get(port: u16, path: &str, bearer: Option<&str>) -> u16 {
    let mut req = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .timeout(Duration::from_secs(10));
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => {
            let status = r.status();
            let _ = r.into_string();
            status
        }
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("GET {path} through :{port}: {e}"),
    }
}

/// The filter's counter `name` on the Envoy with admin port `admin` (summed over its VMs).
fn counter(admin: u16, name: &str) -> i64 {
    envoy_stats(admin).iter().filter(|(k, _)| k.ends_with(&format!("registry_guard.{name}"))).map(|(_, v)| *v).sum()
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn rows(counts: &serde_json::Value, pred: impl Fn(&serde_json::Value) -> bool) -> Vec<&serde_json::Value> {
    counts["events"].as_array().unwrap().iter().filter(|e| pred(e)).collect()
}

fn who(row: &serde_json::Value) -> (Option<&str>, Option<&str>) {
    (row["username"].as_str(), row["token_type"].as_str())
}

#[test]
fn events_of_requests_through_a_and_b_are_attributed_by_c() {
    let mut stack = Stack::start_with(Options {
        bundle_source: Some("long-poll"),
        per_client_login_rate: Some((1000, 60_000)),
        ..Options::default()
    });
    let a = Envoy::start(&stack, "envoy-a", stack.token_port, "long-poll");
    let b = Envoy::start(&stack, "envoy-b", stack.token_port, "long-poll");
    let c = Envoy::start(&stack, "envoy-c", stack.token_port, "long-poll");
    let envoys = [("envoy-a", &a), ("envoy-b", &b), ("envoy-c", &c)];
    let revision = token_service_revision(stack.token_port) + 1;
    let jws = std::fs::read(stack.sign_bundle("attribution", &bundle(revision))).unwrap();
    let (status, body) = stack.put_bundle_raw(&jws, Some(&format!("Bearer {}", stack.operator_token())));
    assert_eq!(status, 200, "PUT /bundle: {body}");
    for (name, e) in envoys {
        wait_for(name, Duration::from_secs(90), || {
            let v = vm_revisions(e.admin_port);
            !v.is_empty() && v.iter().all(|r| *r == revision)
        });
    }
    // The registry now notifies Envoy C only.
    stack.point_notifications_at(c.events_port);

    // Concurrent pushes by three principals through A and B; two push the same image.
    let pushes = [
        (a.listen_port, "dev", "dev-pass", "a-dev", REPO),
        (b.listen_port, "acme-ci", "gldt-acme-ci-rw", "b-ci", REPO),
        (b.listen_port, "mia", "mia-pass", "b-mia", "mia's own"),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = pushes
            .iter()
            .map(|(port, user, secret, tag, salt)| {
                let stack = &stack;
                s.spawn(move || (tag, push_via(stack, *port, user, secret, tag, salt)))
            })
            .collect();
        for h in handles {
            let (tag, out) = h.join().unwrap();
            assert!(out.status.success(), "push of {tag}: {}", registry_guard_e2e::stderr(&out));
        }
    });
    let counts = {
        let mut counts = stack.counts();
        wait_for("the three tag pushes at the consumer", Duration::from_secs(60), || {
            counts = stack.counts();
            ["a-dev", "b-ci", "b-mia"].iter().all(|t| !rows(&counts, |e| e["tag"] == *t).is_empty())
        });
        counts
    };
    let expected = [("a-dev", "dev", "password"), ("b-ci", "acme-ci", "deploy_token"), ("b-mia", "mia", "password")];
    for (tag, user, kind) in expected {
        let r = rows(&counts, |e| e["tag"] == tag);
        assert_eq!(r.len(), 1, "{tag}: {counts:#}");
        assert_eq!(who(r[0]), (Some(user), Some(kind)), "{tag} attributed to the principal that pushed it");
    }

    // A pull flood through A and B beside a push through B.
    let rita = stack.token("rita", "rita-pass", &[&format!("repository:{REPO}:pull")]).unwrap();
    let rita_user_jwt =
        registry_guard_core::token::verify::decode_unverified(&rita).unwrap()["user"].as_str().unwrap().to_owned();
    let path = format!("/v2/{REPO}/manifests/b-ci");
    let flood_started = Instant::now();
    let flood_push = std::thread::scope(|s| {
        let floods: Vec<_> = (0..FLOOD_THREADS)
            .map(|t| {
                let (rita, path) = (&rita, &path);
                let port = if t % 2 == 0 { a.listen_port } else { b.listen_port };
                s.spawn(move || (0..FLOOD / FLOOD_THREADS).filter(|_| get(port, path, Some(rita)) == 200).count())
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let push = push_via(&stack, b.listen_port, "dev", "dev-pass", "during-flood", "during the flood");
        let pulled: usize = floods.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(pulled, FLOOD, "every flood pull succeeds");
        push
    });
    let flood_elapsed = flood_started.elapsed();
    assert!(flood_push.status.success(), "{}", registry_guard_e2e::stderr(&flood_push));
    let mut counts = stack.counts();
    wait_for("every flood pull and the push at the consumer", Duration::from_secs(180), || {
        counts = stack.counts();
        let pulls = rows(&counts, |e| e["action"] == "pull" && e["username"] == "rita").len();
        pulls >= FLOOD && !rows(&counts, |e| e["tag"] == "during-flood").is_empty()
    });
    let during = rows(&counts, |e| e["tag"] == "during-flood");
    assert_eq!(during.len(), 1, "{:#}", counts["counters"]);
    assert_eq!(who(during[0]), (Some("dev"), Some("password")), "the push beside the flood is attributed");
    let rita_pulls = rows(&counts, |e| e["action"] == "pull" && e["username"] == "rita");
    assert_eq!(rita_pulls.len(), FLOOD);
    assert!(rita_pulls.iter().all(|e| e["token_type"] == "password"));
    assert_eq!(counts["unattributed"], 0, "the consumer saw no event without an actor");
    assert_eq!(counts["rejected"], 0);

    // C attributed everything; A and B's events listeners got nothing.
    std::thread::sleep(Duration::from_secs(2)); // the filter flushes its counters on a tick
    let mut figures = Vec::new();
    for (name, e) in envoys {
        let f = (
            counter(e.admin_port, "envelopes_rewritten_total"),
            counter(e.admin_port, "events_attributed_total"),
            counter(e.admin_port, "events_unattributed_total"),
        );
        figures.push((name, f));
    }
    println!("attribution across three Envoys (requests through A and B, notifications to C):");
    for (name, (envelopes, attributed, unattributed)) in &figures {
        println!("  {name}: envelopes {envelopes}, events attributed {attributed}, unattributed {unattributed}");
    }
    println!(
        "  flood: {FLOOD} manifest GETs by rita through A and B in {} ms beside dev's push `during-flood`",
        flood_elapsed.as_millis()
    );
    println!(
        "  consumer: {} events stored, unattributed {}, rejected {}",
        counts["events"].as_array().map_or(0, Vec::len),
        counts["unattributed"],
        counts["rejected"]
    );
    let (_, (c_envelopes, c_attributed, c_unattributed)) = figures[2];
    assert!(c_envelopes > 0);
    assert!(c_attributed >= FLOOD as i64 + 4, "C attributed {c_attributed}");
    assert_eq!(c_unattributed, 0, "nothing unattributable on C");
    for (name, (envelopes, _, _)) in &figures[..2] {
        assert_eq!(*envelopes, 0, "{name} received no notification");
    }

    // The registry's log: the filter's user agent, never a credential.
    let log = stack.log("registry");
    assert!(log.contains("registry-guard/1 "), "the registry logs the filter-written user agent");
    assert!(!log.contains(&rita), "the bearer token reached the registry's log");
    assert!(!log.contains(&rita_user_jwt), "the nested user JWT reached the registry's log");

    // Still closed on every Envoy after the reconfiguration.
    let forged = {
        let (rest, sig) = rita.rsplit_once('.').unwrap();
        format!("{rest}.{}", sig.chars().rev().collect::<String>())
    };
    for (name, e) in envoys {
        assert_eq!(get(e.listen_port, &path, None), 401, "{name}: anonymous");
        assert_eq!(get(e.listen_port, &path, Some(&forged)), 401, "{name}: forged");
    }
}
