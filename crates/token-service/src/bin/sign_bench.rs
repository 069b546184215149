//! `rg-sign-bench [MILLISECONDS]`: the machine's ES256 signing rate natively, beside the
//! token service's issuance work, for `make bench` (bench/README.md: token service). One JSON
//! object per line:
//!
//! - `es256_sign`, `impl` `ring` (what the service signs with, `signer::Es256Signer`) and
//!   `p256` (the core's `token::sign::sign`, what the service used before): one signature
//!   (SHA-256 + ECDSA) of the signing input of a token as the service issues it;
//! - `registry_token`: `TokenIssuer::registry_token` (the nested `user` JWT, the registry JWT,
//!   their claims, serialisation and base64: everything of a token but HTTP, authentication
//!   and the grant decision), `user_jwt` `new` (a new `user` JWT every time: two signatures)
//!   and `reused` (the principal's `user` JWT reused: one signature);
//! - `claims_and_encoding`: `registry_token` (`new`) minus its two signatures.
//!
//! Each figure is the mean over about MILLISECONDS (default 2000) of calls, in CPU time of
//! this (single-threaded) process (`/proc/self/schedstat`; wall-clock time where
//! that is unreadable, `"clock": "wall"`), like `openssl speed` (user CPU time) and the
//! service's CPU per token in the harness: on a shared machine, wall-clock rates measure the
//! neighbours too.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use p256::ecdsa::signature::Signer as _;
use registry_guard_core::issue::grant::Grant;
use registry_guard_core::request::access::AccessLevel;
use registry_guard_core::request::scope::Scope;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_token_service::auth::{AuthType, Authenticated};
use registry_guard_token_service::issue::TokenIssuer;
use registry_guard_token_service::signer::Es256Signer;
use serde_json::json;

fn main() -> ExitCode {
    let millis = std::env::args().nth(1).and_then(|a| a.parse::<u64>().ok()).unwrap_or(2000).max(50);
    match run(Duration::from_millis(millis)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rg-sign-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// CPU time this thread has run, ns (`/proc/self/schedstat`: the main thread's time on a CPU).
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Whether [`cpu_ns`] can be read here.
fn clock() -> &'static str {
    if cpu_ns().is_some() {
        "cpu"
    } else {
        "wall"
    }
}

/// A point in time of [`clock`], ns.
fn now_ns(origin: Instant) -> u64 {
    cpu_ns().unwrap_or_else(|| u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Ns per call of `f` over about `budget` of calls (after a warm-up of a tenth of it): the
/// clock's total over the total calls, as the kernel updates a task's CPU time only every
/// scheduler tick (a few ms), too coarse for one short batch.
fn per_call(budget: Duration, mut f: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let origin = Instant::now();
    let warm = Instant::now();
    while warm.elapsed() < budget / 10 {
        f()?;
    }
    let start = now_ns(origin);
    let wall = Instant::now();
    let mut calls = 0u32;
    while wall.elapsed() < budget || calls < 5 {
        for _ in 0..16 {
            f()?;
        }
        calls += 16;
    }
    Ok(now_ns(origin).saturating_sub(start) as f64 / f64::from(calls))
}

fn run(budget: Duration) -> Result<(), String> {
    let key = SigningKey::new(p256::ecdsa::SigningKey::random(&mut rand_core::OsRng));
    let issuer =
        TokenIssuer::new(key.clone(), "registry-guard", "container_registry", 300).map_err(|e| e.to_string())?;
    // The bench's request: the example user `dev` by personal access token, pull and push on
    // one repository of a project, as a developer.
    let who = Authenticated::user("dev", 2, AuthType::Pat, Some("dev-example".into()));
    let grants = vec![Grant {
        scope: Scope::parse("repository:acme/web/app:pull,push").map_err(|e| e.to_string())?,
        project_path: Some("acme/web".into()),
        access_level: Some(AccessLevel::Developer),
    }];
    let now = 1_800_000_000;
    let token = issuer.registry_token(&who, &grants, Default::default(), now).map_err(|e| e.to_string())?;
    let (input, _) = token.rsplit_once('.').ok_or("the token has no signature")?;
    let input = input.as_bytes().to_vec();

    // The service's own signer (ring), measured on the signature alone.
    let ring_key = Es256Signer::new(&key).map_err(|e| e.to_string())?;
    let ring_ns = per_call(budget, || {
        let signature = ring_key.signature(black_box(&input)).map_err(|e| e.to_string())?;
        black_box(signature.as_ref());
        Ok(())
    })?;
    let p256_ns = per_call(budget, || {
        let s: p256::ecdsa::Signature = key.key.sign(black_box(&input));
        black_box(s);
        Ok(())
    })?;
    let fresh = issuer.clone().with_user_jwt_reuse(0);
    let token_ns = per_call(budget, || {
        fresh
            .registry_token(&who, black_box(&grants), Default::default(), now)
            .map(|t| drop(black_box(t)))
            .map_err(|e| e.to_string())
    })?;
    let reused_ns = per_call(budget, || {
        issuer
            .registry_token(&who, black_box(&grants), Default::default(), now)
            .map(|t| drop(black_box(t)))
            .map_err(|e| e.to_string())
    })?;
    for (name, ns) in [("ring", ring_ns), ("p256", p256_ns)] {
        println!(
            "{}",
            json!({"bench": "es256_sign", "impl": name, "ns": ns, "per_s": 1e9 / ns, "message_bytes": input.len(),
                   "clock": clock()})
        );
    }
    for (user_jwt, ns) in [("new", token_ns), ("reused", reused_ns)] {
        println!(
            "{}",
            json!({"bench": "registry_token", "user_jwt": user_jwt, "ns": ns, "token_bytes": token.len(), "clock": clock()})
        );
    }
    println!("{}", json!({"bench": "claims_and_encoding", "ns": token_ns - 2.0 * ring_ns, "clock": clock()}));
    Ok(())
}
