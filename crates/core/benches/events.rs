//! Notification rewrite cost: `registry_guard_core::events::rewrite_envelope` for envelopes
//! of 1, 100 and 1 000 events, each with its own sealed attribution opened as the filter's
//! events role does. Inputs come from `bench/src/fixture.rs`.
//! `cargo bench -p registry-guard-core --bench events`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use registry_guard_core::events::rewrite_envelope;

#[path = "../../../bench/src/fixture.rs"]
#[allow(dead_code)]
mod fixture;

fn rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("rewrite_envelope");
    for n in [1usize, 100, 1000] {
        let (body, keys) = fixture::envelope(n).unwrap();
        let opener = fixture::opener(&keys);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let (out, stats) = rewrite_envelope(black_box(&body), &opener).unwrap();
                assert_eq!(stats.attributed as usize, n);
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, rewrite);
criterion_main!(benches);
