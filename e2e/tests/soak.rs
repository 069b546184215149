//! Soak: mixed traffic through the real stack while signed bundles are pushed every
//! few seconds; fails on any request decided contrary to the active bundle, any unexpected
//! 5xx, or Envoy memory growing beyond the stated bound.
//!
//! `#[ignore]`d so `cargo test` skips it; run by `make soak` (`SOAK_SECONDS`, default 600)
//! and `make soak-smoke` (45 s, part of `make test`):
//! `SOAK_SECONDS=60 cargo test -p registry-guard-e2e --test soak -- --ignored --nocapture`.
//!
//! Traffic (all concurrent):
//! - **wrk** (load generator, two processes): valid pulls (`GET manifests/base`, a reporter's
//!   token: must all be 200) and pulls with a forged token (must all be 401, checked per
//!   response by a Lua script);
//! - **classifying client** (Rust, one request at a time, round robin): valid pull → 200;
//!   garbage token → 401 `invalid_token`; a push with a pull-only token → 401
//!   `insufficient_scope`; no token → 401; and the **flip probe** (below);
//! - **skopeo**: pushes of new tags (dev) and pulls of them (rita), which must all succeed;
//! - **bundle pusher**: `rgctl push` every `SOAK_PUSH_SECONDS` (default 3), revisions 1, 2, …;
//!   odd revisions carry rule `web-release-tags` (push of `v*` tags of `acme/web/*` needs
//!   maintainer), even revisions no rule.
//!
//! - **hostile client** (one request at a time): a guest's `GET /v2/` with a 59 KB
//!   `X-Request-Id` → 200; a fresh valid ~15 KB token (many scopes, a new one every time, so
//!   each is verified and cached) → 200; and once a second a wrong password for a new unknown
//!   user at the token service → 401 or 429. The token service's RSS is sampled too and may
//!   not exceed `SOAK_TOKEN_SERVICE_RSS_MIB` (default 128 MiB); Envoy's RSS bound below
//!   covers this class as well.
//!
//! **Which bundle was active.** The pusher bumps an epoch counter before it writes the ECDS
//! file (odd: push in flight) and again after `rgctl push` has confirmed the new revision in
//! Envoy's stats (even: stable), storing the confirmed revision in between. The flip probe
//! (dev's token, granted push before any rule, `PUT manifests/v1`) reads the epoch before and
//! after each request: if both are the same even value the request was decided entirely under
//! that confirmed revision and must be 403 naming `web-release-tags` (odd revision) or be
//! forwarded to the registry, which refuses the empty manifest with 400 (even revision).
//! Requests that overlapped a push may get either of the two, and are counted separately.
//! Every other class has the same expected outcome under every pushed bundle.
//!
//! **Memory.** Envoy's RSS (`/proc/PID/status` `VmRSS`) is sampled every second. After a
//! warm-up (20 % of the run, at least 10 s), RSS may grow by at most
//! `SOAK_RSS_GROWTH_MIB` (default 32 MiB) above its value at the end of the warm-up, and the
//! number of live wasm VMs (`wasm.envoy.wasm.runtime.v8.active`) at the end must not exceed
//! its maximum during the warm-up (old VMs are freed after each push).

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use registry_guard_e2e::{Options, Stack};
use serde_json::json;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bundle(revision: u64) -> serde_json::Value {
    let rules = if revision % 2 == 1 {
        json!([{"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "tag_name_pattern": "^v[0-9]+",
                "minimum_access_level_for_push": "maintainer"}])
    } else {
        json!([])
    };
    json!({"revision": revision, "protection_rules": rules})
}

#[derive(Default)]
struct Counts {
    by_class: std::collections::BTreeMap<&'static str, u64>,
    violations: Vec<String>,
}

impl Counts {
    fn ok(&mut self, class: &'static str) {
        *self.by_class.entry(class).or_default() += 1;
    }
    fn violation(&mut self, what: String) {
        if self.violations.len() < 50 {
            eprintln!("VIOLATION: {what}");
        }
        self.violations.push(what);
    }
}

struct Reply {
    status: u16,
    www: String,
    guard: bool,
    body: String,
}

fn call(stack: &Stack, method: &str, path: &str, bearer: Option<&str>) -> Result<Reply, String> {
    let mut req = ureq::request(method, &stack.url(path)).timeout(Duration::from_secs(30)).set(
        "Accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
    );
    if method == "PUT" {
        req = req.set("Content-Type", "application/vnd.oci.image.manifest.v1+json");
    }
    if let Some(t) = bearer {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let resp = match if method == "PUT" { req.send_string("") } else { req.call() } {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(format!("{method} {path}: {e}")),
    };
    Ok(Reply {
        status: resp.status(),
        www: resp.header("www-authenticate").unwrap_or_default().to_owned(),
        guard: resp.header("x-registry-guard").is_some(),
        body: resp.into_string().unwrap_or_default(),
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn stat(stack: &Stack, name: &str) -> i64 {
    let url = format!("http://127.0.0.1:{}/stats?filter=^{}$", stack.admin_port, name.replace('.', "\\."));
    ureq::get(&url)
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))?.trim().parse().ok()))
        .unwrap_or(0)
}

/// wrk with a Lua script; returns (requests, bad responses) parsed from its output.
fn wrk(seconds: u64, url: &str, token: &str, expect: u16, script_path: &std::path::Path) -> (u64, u64, String) {
    let script = format!(
        r#"wrk.headers["Authorization"] = "Bearer {token}"
wrk.headers["Accept"] = "application/vnd.oci.image.manifest.v1+json"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= {expect} then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("wrk: unexpected status " .. status .. "\n") end
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  io.write(string.format("SOAK requests=%d bad=%d errors=%d\n", summary.requests, b,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"#
    );
    std::fs::write(script_path, script).expect("write wrk script");
    let out = Command::new("nice")
        .args(["-n", "5", "wrk", "-t1", "-c2", "--timeout", "10s"])
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(script_path)
        .arg(url)
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text.lines().find(|l| l.starts_with("SOAK ")).unwrap_or_default().to_owned();
    let field =
        |k: &str| -> u64 { line.split_whitespace().find_map(|f| f.strip_prefix(k)?.parse().ok()).unwrap_or(u64::MAX) };
    let (requests, bad, errors) = (field("requests="), field("bad="), field("errors="));
    (requests, bad.saturating_add(errors), text)
}

#[test]
#[ignore = "long: run by `make soak` / `make soak-smoke`"]
fn soak() {
    let seconds = env_u64("SOAK_SECONDS", 600);
    let push_every = Duration::from_secs(env_u64("SOAK_PUSH_SECONDS", 3));
    let rss_bound_mib = env_u64("SOAK_RSS_GROWTH_MIB", 32);
    let warmup = Duration::from_secs((seconds / 5).max(10));
    eprintln!("soak: {seconds} s, bundle push every {push_every:?}, RSS growth bound {rss_bound_mib} MiB after {warmup:?} warm-up");

    let stack = Arc::new(Stack::start_with(Options {
        token_ttl_seconds: Some(seconds as i64 + 600),
        per_client_login_rate: Some((100_000, 6_000_000)),
        ..Options::default()
    }));
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "base").status.success());
    let rita = stack.token("rita", "rita-pass", &["repository:acme/web/app:pull"]).unwrap();
    let dev = stack.token("dev", "dev-pass", &["repository:acme/web/app:pull,push"]).unwrap();
    let forged = {
        let mut parts: Vec<String> = rita.split('.').map(str::to_owned).collect();
        parts[2] = parts[2].chars().rev().collect();
        parts.join(".")
    };
    let envoy_pid = stack.pid("envoy").expect("envoy pid");
    let token_service_pid = stack.pid("token-service").expect("token service pid");
    let token_service_rss_bound_mib = env_u64("SOAK_TOKEN_SERVICE_RSS_MIB", 128);
    let guest = stack.token("gus", "gus-pass", &[]).unwrap();

    // The hostile class's large tokens fill the filter's token caches up to their byte bound
    // (16 MiB per VM); fill them before the run, so the warm-up baseline includes them.
    for n in 0..1_200 {
        let t = stack.large_token("dev", 1_000_000 + n, 15 * 1024);
        assert_eq!(call(&stack, "GET", "/v2/", Some(&t)).map(|r| r.status).unwrap_or(0), 200, "cache fill {n}");
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Arc::new(AtomicU64::new(0));
    let revision = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut handles = Vec::new();

    // Bundle pusher.
    let pushes = Arc::new(AtomicU64::new(0));
    {
        let (stack, stop, epoch, revision, counts, pushes) =
            (stack.clone(), stop.clone(), epoch.clone(), revision.clone(), counts.clone(), pushes.clone());
        handles.push(std::thread::spawn(move || {
            let mut next = 1;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(push_every);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let jws = stack.sign_bundle(&format!("soak-{next}"), &bundle(next));
                epoch.fetch_add(1, Ordering::SeqCst); // odd: in flight
                let envoy = format!("{}=http://127.0.0.1:{}", stack.ecds_file().display(), stack.admin_port);
                let ts = format!("http://127.0.0.1:{}", stack.token_port);
                let token = stack.config_dir.join("keys/operator-token");
                let out = Command::new(registry_guard_e2e::root().join("target/release/rgctl"))
                    .args(["push"])
                    .arg(&jws)
                    .args(["--envoy", &envoy, "--token-service", &ts, "--operator-token-file"])
                    .arg(&token)
                    .output()
                    .expect("rgctl push");
                let said = String::from_utf8_lossy(&out.stdout).into_owned();
                if out.status.success() && said.contains(&format!("active revision {next} ")) {
                    revision.store(next, Ordering::SeqCst);
                    epoch.fetch_add(1, Ordering::SeqCst); // even: confirmed
                    pushes.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.lock().unwrap().violation(format!(
                        "bundle push of revision {next} not confirmed: {said}{}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                    epoch.fetch_add(1, Ordering::SeqCst);
                }
                std::fs::remove_file(&jws).ok();
                next += 1;
            }
        }));
    }

    // Classifying client.
    let transitions = Arc::new(AtomicU64::new(0));
    {
        let (stack, stop, epoch, revision, counts, transitions) =
            (stack.clone(), stop.clone(), epoch.clone(), revision.clone(), counts.clone(), transitions.clone());
        let (rita, dev, forged) = (rita.clone(), dev.clone(), forged.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (class, method, path, token): (&'static str, &str, &str, Option<&str>) = match i % 5 {
                    0 => ("valid pull", "GET", "/v2/acme/web/app/manifests/base", Some(&rita)),
                    1 => ("invalid token", "GET", "/v2/acme/web/app/manifests/base", Some(&forged)),
                    2 => ("denied (scope)", "PUT", "/v2/acme/web/app/manifests/x1", Some(&rita)),
                    3 => ("no token", "GET", "/v2/acme/web/app/tags/list", None),
                    _ => ("flip probe", "PUT", "/v2/acme/web/app/manifests/v1", Some(&dev)),
                };
                let (e1, rev) = (epoch.load(Ordering::SeqCst), revision.load(Ordering::SeqCst));
                let r = match call(&stack, method, path, token) {
                    Ok(r) => r,
                    Err(e) => {
                        counts.lock().unwrap().violation(format!("{class}: transport error {e}"));
                        continue;
                    }
                };
                let e2 = epoch.load(Ordering::SeqCst);
                let rule_denied = r.status == 403 && r.guard && r.body.contains("web-release-tags");
                let forwarded = r.status == 400 && !r.guard;
                let ok = match class {
                    "valid pull" => r.status == 200,
                    "invalid token" => r.status == 401 && r.www.contains("invalid_token"),
                    "denied (scope)" => r.status == 401 && r.www.contains("insufficient_scope"),
                    "no token" => r.status == 401 && r.guard,
                    _ if e1 == e2 && e1 % 2 == 0 => {
                        if rev % 2 == 1 {
                            rule_denied
                        } else {
                            forwarded
                        }
                    }
                    _ => {
                        transitions.fetch_add(1, Ordering::Relaxed);
                        rule_denied || forwarded
                    }
                };
                let mut c = counts.lock().unwrap();
                if ok {
                    c.ok(class);
                } else {
                    let c5 = if r.status >= 500 { "unexpected 5xx: " } else { "" };
                    c.violation(format!(
                        "{c5}{class} {method} {path} under revision {rev} (epoch {e1}->{e2}): {} guard={} www={:?} {}",
                        r.status, r.guard, r.www, r.body
                    ));
                }
            }
        }));
    }

    // Hostile client: huge request ids, many large valid tokens, wrong passwords.
    {
        let (stack, stop, counts, guest) = (stack.clone(), stop.clone(), counts.clone(), guest.clone());
        handles.push(std::thread::spawn(move || {
            let huge_id = "r".repeat(59_000);
            let mut n = 0u64;
            let mut last_login = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (class, ok) = if n.is_multiple_of(2) {
                    let r = ureq::get(&stack.url("/v2/"))
                        .timeout(Duration::from_secs(30))
                        .set("Authorization", &format!("Bearer {guest}"))
                        .set("X-Request-Id", &format!("{n}-{huge_id}"))
                        .call();
                    ("hostile: 59 KB request id", matches!(r, Ok(ref r) if r.status() == 200))
                } else {
                    let t = stack.large_token("dev", n, 15 * 1024);
                    let r = call(&stack, "GET", "/v2/", Some(&t));
                    ("hostile: new 15 KB token", matches!(r, Ok(ref r) if r.status == 200))
                };
                let mut c = counts.lock().unwrap();
                if ok {
                    c.ok(class);
                } else {
                    c.violation(format!("{class}: request {n} not answered 200"));
                }
                drop(c);
                if last_login.elapsed() >= Duration::from_secs(1) {
                    last_login = Instant::now();
                    let status = match stack.token(&format!("hostile-{n}"), "wrong-password", &[]) {
                        Ok(_) => 200,
                        Err((status, _)) => status,
                    };
                    let mut c = counts.lock().unwrap();
                    if status == 401 || status == 429 {
                        c.ok("hostile: bad login");
                    } else {
                        c.violation(format!("hostile: a wrong password was answered {status}"));
                    }
                }
            }
        }));
    }

    // skopeo pushes and pulls.
    let skopeo_runs = Arc::new(AtomicU64::new(0));
    {
        let (stack, stop, counts, skopeo_runs) = (stack.clone(), stop.clone(), counts.clone(), skopeo_runs.clone());
        handles.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let tag = format!("soak-{n}");
                let pushed = stack.push("dev", "dev-pass", "acme/web/app", &tag);
                let pulled = stack.inspect("rita", "rita-pass", "acme/web/app", &tag);
                let mut c = counts.lock().unwrap();
                for (what, out) in [("skopeo push", pushed), ("skopeo pull", pulled)] {
                    if out.status.success() {
                        c.ok(what);
                    } else {
                        c.violation(format!("{what} of {tag} failed: {}", registry_guard_e2e::stderr(&out)));
                    }
                }
                skopeo_runs.fetch_add(1, Ordering::Relaxed);
                drop(c);
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }

    // Memory sampler.
    let samples = Arc::new(Mutex::new(Vec::<(Duration, u64, i64)>::new()));
    let token_service_rss_max = Arc::new(AtomicU64::new(0));
    {
        let (stack, stop, samples, ts_max) =
            (stack.clone(), stop.clone(), samples.clone(), token_service_rss_max.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let vms = stat(&stack, "wasm.envoy.wasm.runtime.v8.active");
                samples.lock().unwrap().push((start.elapsed(), rss_kib(envoy_pid), vms));
                ts_max.fetch_max(rss_kib(token_service_pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }

    // Load generator: two wrk processes for the whole run (in this thread's scope).
    let wrk_seconds = seconds.saturating_sub(2).max(1);
    let url = stack.url("/v2/acme/web/app/manifests/base");
    let (valid, invalid) = std::thread::scope(|s| {
        let v = s.spawn(|| wrk(wrk_seconds, &url, &rita, 200, &stack.path("wrk-valid.lua")));
        let i = s.spawn(|| wrk(wrk_seconds, &url, &forged, 401, &stack.path("wrk-invalid.lua")));
        (v.join().unwrap(), i.join().unwrap())
    });
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }

    // Summary.
    let mut counts = counts.lock().unwrap();
    for (name, (requests, bad, text)) in
        [("wrk valid pulls (expect 200)", &valid), ("wrk forged token (expect 401)", &invalid)]
    {
        if *requests == u64::MAX || *bad != 0 {
            counts.violation(format!("{name}: {requests} requests, {bad} unexpected or failed\n{text}"));
        }
    }
    let samples = samples.lock().unwrap();
    let warm: Vec<_> = samples.iter().filter(|(t, ..)| *t <= warmup).collect();
    let after: Vec<_> = samples.iter().filter(|(t, ..)| *t > warmup).collect();
    let rss_at_warmup = warm.last().map_or(0, |s| s.1);
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let rss_max_after = after.iter().map(|s| s.1).max().unwrap_or(rss_at_warmup);
    let rss_end = samples.last().map_or(0, |s| s.1);
    let vms_warm_max = warm.iter().map(|s| s.2).max().unwrap_or(0);
    let vms_end = samples.last().map_or(0, |s| s.2);
    let vms_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let growth_kib = rss_max_after.saturating_sub(rss_at_warmup);
    if growth_kib > rss_bound_mib * 1024 {
        counts.violation(format!(
            "Envoy RSS grew by {} MiB after warm-up (bound {rss_bound_mib} MiB): {} → max {} MiB",
            growth_kib / 1024,
            rss_at_warmup / 1024,
            rss_max_after / 1024
        ));
    }
    let ts_rss_max = token_service_rss_max.load(Ordering::Relaxed);
    if ts_rss_max > token_service_rss_bound_mib * 1024 {
        counts.violation(format!(
            "token service RSS reached {} MiB (bound {token_service_rss_bound_mib} MiB)",
            ts_rss_max / 1024
        ));
    }
    if vms_end > vms_warm_max {
        counts.violation(format!("live wasm VMs grew: {vms_end} at the end, at most {vms_warm_max} during warm-up"));
    }
    let pushes = pushes.load(Ordering::Relaxed);
    if pushes < seconds / push_every.as_secs().max(1) / 2 {
        counts.violation(format!("only {pushes} bundle pushes confirmed"));
    }
    let fivexx = counts.violations.iter().filter(|v| v.contains("5xx")).count();
    eprintln!("\n===== soak summary ({:.0} s) =====", start.elapsed().as_secs_f64());
    eprintln!("bundle pushes confirmed: {pushes} (last revision {})", revision.load(Ordering::SeqCst));
    for (class, n) in &counts.by_class {
        eprintln!("  {class:<16} {n:>8} as expected");
    }
    eprintln!("  flip probes overlapping a push (either outcome accepted): {}", transitions.load(Ordering::Relaxed));
    eprintln!("  skopeo rounds: {}", skopeo_runs.load(Ordering::Relaxed));
    eprintln!("  wrk valid pulls: {} requests, {} not 200", valid.0, valid.1);
    eprintln!("  wrk forged token: {} requests, {} not 401", invalid.0, invalid.1);
    eprintln!(
        "Envoy RSS: {} MiB at end of warm-up, max {} MiB after (growth {} MiB, bound {rss_bound_mib}), {} MiB at end; max overall {} MiB",
        rss_at_warmup / 1024,
        rss_max_after / 1024,
        growth_kib / 1024,
        rss_end / 1024,
        rss_max / 1024
    );
    eprintln!("live wasm VMs: max {vms_warm_max} during warm-up, max {vms_max} overall, {vms_end} at end");
    eprintln!("token service RSS: max {} MiB (bound {token_service_rss_bound_mib})", ts_rss_max / 1024);
    eprintln!("violations: {} (unexpected 5xx: {fivexx})", counts.violations.len());
    assert!(
        counts.violations.is_empty(),
        "{} violations; first: {:#?}",
        counts.violations.len(),
        &counts.violations[..counts.violations.len().min(10)]
    );
}
