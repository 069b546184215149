//! A hostile token-service source (issue 17): an Envoy whose filter follows a tiny HTTP server
//! written here instead of a token service. After a good bundle, the server answers with a
//! truncated bundle, an oversized one and not at all (slow); each is refused, the previous
//! revision stays, and anonymous and forged requests are refused throughout.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry_guard_e2e::fleet::{envoy_stats, vm_revisions, Envoy};
use registry_guard_e2e::Stack;

#[derive(Clone)]
enum Mode {
    Serve(Vec<u8>),
    Silent,
}

/// Requests the source has held without answering.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// Answers every request with what `mode` says (`Silent`: reads it and never answers).
fn hostile_source(mode: Arc<Mutex<Mode>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mode = mode.lock().unwrap().clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
                    head.push(byte[0]);
                }
                match mode {
                    Mode::Serve(body) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = conn.write_all(&body);
                    }
                    Mode::Silent => {
                        HELD.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
            });
        }
    });
    port
}

/// A counter of the filter, or the sum of several (`a|b`).
fn stat(admin: u16, names: &str) -> i64 {
    let stats = envoy_stats(admin);
    names.split('|').map(|n| stats.get(&format!("wasmcustom.registry_guard.{n}")).copied().unwrap_or(0)).sum()
}

fn pull(port: u16, bearer: Option<&str>) -> u16 {
    let mut req =
        ureq::get(&format!("http://127.0.0.1:{port}/v2/acme/web/app/manifests/none")).timeout(Duration::from_secs(10));
    if let Some(b) = bearer {
        req = req.set("Authorization", &format!("Bearer {b}"));
    }
    match req.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("pull through :{port}: {e}"),
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn a_truncated_oversized_or_slow_source_is_refused_and_the_revision_stays() {
    let stack = Stack::start();
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: serde_json::Value = serde_json::from_str(&text).unwrap();
    let r0 = b["revision"].as_u64().unwrap() + 1;
    b["revision"] = r0.into();
    let good = std::fs::read(stack.sign_bundle("hostile-good", &b)).unwrap();
    let mode = Arc::new(Mutex::new(Mode::Serve(good.clone())));
    let port = hostile_source(mode.clone());
    let envoy = Envoy::start(&stack, "envoy-hostile", port, "poll");
    wait_until("the good bundle is activated", Duration::from_secs(60), || {
        let v = vm_revisions(envoy.admin_port);
        !v.is_empty() && v.iter().all(|r| *r == r0 as i64)
    });
    let mia = stack.token("mia", "mia-pass", &["repository:acme/web/app:pull"]).unwrap();
    let (rest, sig) = mia.rsplit_once('.').unwrap();
    let forged = format!("{rest}.{}", sig.chars().rev().collect::<String>());

    b["revision"] = (r0 + 1).into();
    let next = std::fs::read(stack.sign_bundle("hostile-next", &b)).unwrap();
    let truncated = next[..next.len() / 2].to_vec();
    // Larger than the filter's max_bytes (32 MiB): refused unread (`size`), or, as Envoy 1.40
    // does here, failed by Envoy's HTTP call itself before the filter sees a body
    // (`unreachable`); either way never read, and never a VM panic.
    let mut oversized = next.clone();
    oversized.resize(33 * 1024 * 1024, b'A');
    for (what, m, counter) in [
        ("truncated", Mode::Serve(truncated), "bundle_fetch.refused"),
        ("oversized", Mode::Serve(oversized), "bundle_fetch_rejected.size|bundle_fetch_rejected.unreachable"),
        // Envoy ends the held call at the timeout with a 504 of its own (`status`).
        ("slow", Mode::Silent, "bundle_fetch_rejected.status|bundle_fetch_rejected.unreachable"),
    ] {
        let silent = matches!(m, Mode::Silent);
        *mode.lock().unwrap() = m;
        if silent {
            // Counted from the first held request on: the refusal must be its timeout.
            wait_until("a held request", Duration::from_secs(60), || HELD.load(Ordering::SeqCst) > 0);
        }
        let before = stat(envoy.admin_port, counter);
        let took = wait_until(what, Duration::from_secs(90), || stat(envoy.admin_port, counter) > before);
        let v = vm_revisions(envoy.admin_port);
        assert!(v.iter().all(|r| *r == r0 as i64), "{what}: revision {r0} stays: {v:?}");
        assert_eq!(pull(envoy.listen_port, None), 401, "{what}: anonymous");
        assert_eq!(pull(envoy.listen_port, Some(&forged)), 401, "{what}: forged");
        assert_ne!(pull(envoy.listen_port, Some(&mia)), 401, "{what}: decisions go on");
        let log = std::fs::read_to_string(&envoy.member.log).unwrap_or_default();
        assert!(!log.contains("panicked"), "{what}: a filter VM panicked");
        println!("  {what} source: counted in {counter} after {} ms; revision {r0} stays", took.as_millis());
    }
    // The source recovers: the next revision gets through.
    *mode.lock().unwrap() = Mode::Serve(next);
    wait_until("recovery", Duration::from_secs(120), || {
        let v = vm_revisions(envoy.admin_port);
        !v.is_empty() && v.iter().all(|r| *r == r0 as i64 + 1)
    });
}
