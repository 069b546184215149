//! Decision time per request (`Guard::check`) with a cached token, at 100 and 100 000
//! protection rules (`RG_BENCH_RULES=a,b,…` to change), for a push-like request that consults
//! the rules and for a pull. Inputs come from `bench/src/fixture.rs` (the one generator).
//! `cargo bench -p registry-guard-core --bench guard`; under `cargo test --benches` every
//! benchmark runs once (the smoke check).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

#[path = "../../../bench/src/fixture.rs"]
#[allow(dead_code)]
mod fixture;

fn rule_counts() -> Vec<usize> {
    std::env::var("RG_BENCH_RULES")
        .ok()
        .map(|s| s.split(',').map(|n| n.trim().parse().expect("RG_BENCH_RULES: numbers")).collect())
        .unwrap_or_else(|| vec![100, 100_000])
}

fn decision(c: &mut Criterion) {
    let push = format!("Bearer {}", fixture::token(&["pull", "push"], 40, "push").unwrap());
    let pull = format!("Bearer {}", fixture::token(&["pull"], 40, "pull").unwrap());
    let mut group = c.benchmark_group("guard_check_cached");
    for n in rule_counts() {
        let mut guard = fixture::guard(n).unwrap();
        for (name, method, path, auth) in
            [("push", "PUT", fixture::PUSH_PATH, &push), ("pull", "GET", fixture::PULL_PATH, &pull)]
        {
            assert!(guard.check(method, path, None, &[auth], fixture::NOW).decision.is_allow());
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    let checked = guard.check(black_box(method), black_box(path), None, &[auth], fixture::NOW);
                    assert!(checked.decision.is_allow());
                    checked
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
