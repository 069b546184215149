//! `rg-bench`: times the core natively or as a wasm32-wasip1 command (run under Node's V8 by
//! `bench/wasm/run.mjs`, the engine family of Envoy's `envoy.wasm.runtime.v8`). Every result
//! is one JSON object per line on stdout.
//!
//! ```text
//! rg-bench bundle N                    bundle JSON with N generated rules (for Envoy)
//! rg-bench decide N[,N…] [ITERS]       Guard::check per request: cached push (rules consulted),
//!                                      cached pull, and uncached (signature verified) pull
//! rg-bench activate FILE [REPS]        PluginConfig::from_json of a filter configuration file
//!                                      (what the filter's on_configure does), and the memory;
//!                                      `rg-bench-heap activate …` adds heap peak/live bytes
//! rg-bench rewrite N[,N…] [ITERS]      rewrite_envelope of N events
//! ```

use std::hint::black_box;
use std::time::Instant;

use registry_guard_bench::{fixture, median};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let result = match (arg(0), arg(1)) {
        (Some("bundle"), Some(n)) => {
            n.parse().map_err(|e| format!("N: {e}")).map(|n| print!("{}", fixture::bundle_json(n, 1)))
        }
        (Some("decide"), Some(ns)) => list(ns).and_then(|ns| decide(&ns, count(arg(2), 20_000))),
        (Some("activate"), Some(file)) => activate(file, count(arg(2), 3)),
        (Some("rewrite"), Some(ns)) => list(ns).and_then(|ns| rewrite(&ns, count(arg(2), 20))),
        _ => {
            Err("usage: rg-bench bundle N | decide N[,N…] [ITERS] | activate FILE [REPS] | rewrite N[,N…] [ITERS]"
                .into())
        }
    };
    if result.is_ok() && args.first().map(String::as_str) != Some("bundle") {
        // Completion marker (see bench/wasm/run.mjs).
        println!("{}", serde_json::json!({"bench": "done"}));
    }
    if let Err(e) = result {
        eprintln!("rg-bench: {e}");
        std::process::exit(1);
    }
}

fn target() -> &'static str {
    if cfg!(target_arch = "wasm32") {
        "wasm32-wasip1"
    } else {
        "native"
    }
}

fn list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',').map(|n| n.parse().map_err(|e| format!("`{n}`: {e}"))).collect()
}

fn count(s: Option<&str>, default: usize) -> usize {
    s.and_then(|s| s.parse().ok()).unwrap_or(default).max(1)
}

/// Runs `batches` batches of `iters` calls of `f` and returns the median ns per call.
fn per_call(batches: usize, iters: usize, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let mut samples = Vec::with_capacity(batches);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        samples.push(t.elapsed().as_nanos() as f64 / iters as f64);
    }
    Ok(median(&mut samples))
}

fn decide(ns: &[usize], iters: usize) -> Result<(), String> {
    for &n in ns {
        let mut guard = fixture::guard(n)?;
        let push = format!("Bearer {}", fixture::token(&["pull", "push"], 40, "push")?);
        let pull = format!("Bearer {}", fixture::token(&["pull"], 40, "pull")?);
        let mut check = |method: &str, path: &str, auth: &str| -> Result<(), String> {
            let c = guard.check(black_box(method), black_box(path), None, &[auth], fixture::NOW);
            if c.decision.is_allow() {
                Ok(())
            } else {
                Err(format!("{method} {path} was not allowed: {:?}", c.decision))
            }
        };
        // Warm the cache and the engine's tiers, then measure.
        per_call(1, iters.min(2000), || check("PUT", fixture::PUSH_PATH, &push))?;
        let push_ns = per_call(7, iters, || check("PUT", fixture::PUSH_PATH, &push))?;
        per_call(1, iters.min(2000), || check("GET", fixture::PULL_PATH, &pull))?;
        let pull_ns = per_call(7, iters, || check("GET", fixture::PULL_PATH, &pull))?;
        println!(
            "{}",
            json!({"bench": "decide", "target": target(), "rules": n, "cached_push_ns": push_ns,
                   "cached_pull_ns": pull_ns, "request": format!("PUT {}", fixture::PUSH_PATH)})
        );
    }
    // Uncached: every request carries a token never seen before (signature verified).
    let mut guard = fixture::guard(ns.first().copied().unwrap_or(10))?;
    let k = if cfg!(target_arch = "wasm32") { 200 } else { 1000 };
    let tokens: Vec<String> = (0..k)
        .map(|i| fixture::token(&["pull"], 40, &format!("u{i}")).map(|t| format!("Bearer {t}")))
        .collect::<Result<_, _>>()?;
    let warm = format!("Bearer {}", fixture::token(&["pull"], 40, "first")?);
    // The first verification with a key also builds its table (`core::es256`): timed apart.
    let t = Instant::now();
    let first = guard.check("GET", fixture::PULL_PATH, None, &[warm.as_str()], fixture::NOW);
    let first_ns = t.elapsed().as_nanos() as f64;
    if !first.decision.is_allow() {
        return Err(format!("uncached pull not allowed: {:?}", first.decision));
    }
    let t = Instant::now();
    for tok in &tokens {
        let c = guard.check("GET", fixture::PULL_PATH, None, &[tok.as_str()], fixture::NOW);
        if !c.decision.is_allow() {
            return Err(format!("uncached pull not allowed: {:?}", c.decision));
        }
    }
    let uncached = t.elapsed().as_nanos() as f64 / k as f64;
    if guard.cache.hits != 0 {
        return Err("uncached run hit the cache".into());
    }
    println!(
        "{}",
        json!({"bench": "decide_uncached", "target": target(), "tokens": k, "uncached_pull_ns": uncached,
               "first_with_key_ns": first_ns})
    );
    Ok(())
}

fn activate(file: &str, reps: usize) -> Result<(), String> {
    println!("{}", registry_guard_bench::activate(file, reps, target())?);
    Ok(())
}

fn rewrite(ns: &[usize], iters: usize) -> Result<(), String> {
    for &n in ns {
        let (body, keys) = fixture::envelope(n)?;
        let opener = fixture::opener(&keys);
        let mut run = || -> Result<(), String> {
            let (out, stats) =
                registry_guard_core::events::rewrite_envelope(black_box(&body), &opener).map_err(|e| e.to_string())?;
            black_box(out);
            if stats.attributed as usize == n {
                Ok(())
            } else {
                Err(format!("{} of {n} events attributed", stats.attributed))
            }
        };
        run()?;
        let ns_per = per_call(5, iters, &mut run)?;
        println!("{}", json!({"bench": "rewrite", "target": target(), "events": n, "bytes": body.len(), "ns": ns_per}));
    }
    Ok(())
}
