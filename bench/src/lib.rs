//! registry-guard benchmark helpers: the deterministic input generator ([`fixture`]) and small
//! timing utilities for `rg-bench`, which runs natively and as a wasm32-wasip1 command.

pub mod fixture;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::Instant;

use registry_guard_core::decide::config::PluginConfig;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting live and peak heap bytes (for activation memory: live
/// after activation vs the peak during it; a wasm VM's linear memory never shrinks, so its
/// footprint is at least the peak).
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grew(new_size);
        }
        p
    }
}

/// Live heap bytes now (with [`CountingAlloc`] as the global allocator).
pub fn heap_live() -> usize {
    LIVE.load(Relaxed)
}

/// Peak heap bytes since the last [`reset_heap_peak`].
pub fn heap_peak() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak measurement from the current live bytes.
pub fn reset_heap_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// The median of `values` (0 for none).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values.get(n / 2).copied().unwrap_or_default(),
        n => {
            (values.get(n / 2 - 1).copied().unwrap_or_default() + values.get(n / 2).copied().unwrap_or_default()) / 2.0
        }
    }
}

/// Size of this instance's linear memory in bytes (wasm), or the peak resident set size of
/// the process (native, Linux `VmHWM`), or `None`.
pub fn memory_bytes() -> Option<u64> {
    #[cfg(target_arch = "wasm32")]
    {
        Some(core::arch::wasm32::memory_size::<0>() as u64 * 65536)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

/// Times `PluginConfig::from_json` of a filter configuration file `reps` times (what the
/// filter's `on_configure` runs) and reports memory: linear memory (wasm) or peak RSS
/// (native), and heap peak/live bytes when [`CountingAlloc`] is the global allocator
/// (`rg-bench-heap`).
pub fn activate(file: &str, reps: usize, target: &str) -> Result<serde_json::Value, String> {
    let before = memory_bytes();
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read `{file}`: {e}"))?;
    let after_read = memory_bytes();
    let mut times = Vec::new();
    let mut probe = Vec::new();
    let mut peak_after_first = None;
    let mut heap = None;
    let mut rules = 0;
    for _ in 0..reps {
        let live_before = heap_live();
        reset_heap_peak();
        let t = Instant::now();
        let config = PluginConfig::from_json(black_box(&bytes)).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if let PluginConfig::Registry(c) = &config {
            rules = c.policy.rules.len();
        }
        if peak_after_first.is_none() {
            peak_after_first = memory_bytes();
            heap = Some((heap_peak().saturating_sub(live_before), heap_live().saturating_sub(live_before)));
        }
        drop(config);
        // The role probe alone (PluginConfig parses the whole document into a Value first).
        let t = Instant::now();
        let v: serde_json::Value = serde_json::from_slice(black_box(&bytes)).map_err(|e| e.to_string())?;
        probe.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(v);
    }
    let counted = heap_peak() > 0;
    Ok(json!({"bench": "activate", "target": target, "file": file, "bytes": bytes.len(), "rules": rules,
               "activate_ms_first": times.first().copied(), "activate_ms": median(&mut times),
               "activate_ms_min": times.iter().copied().fold(f64::INFINITY, f64::min),
               "probe_parse_ms": median(&mut probe), "memory_before": before, "memory_after_read": after_read,
               "memory_after_activation": peak_after_first, "memory_end": memory_bytes(),
               "heap_peak_during_activation": heap.filter(|_| counted).map(|h| h.0),
               "heap_live_after_activation": heap.filter(|_| counted).map(|h| h.1)}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_guard_core::policy::bundle::Policy;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn generated_bundles_are_valid_and_the_request_is_allowed_after_consulting_rules() {
        for n in [0, 1, 3, 10, 1000] {
            let p = Policy::from_json(&fixture::bundle_json(n, 1)).unwrap();
            assert_eq!(p.rules.len(), n);
        }
        let p = Policy::from_json(&fixture::bundle_json(1000, 1)).unwrap();
        assert_eq!(p.rules.matching(fixture::REPO).len(), 3);
        let mut g = fixture::guard(1000).unwrap();
        let push = format!("Bearer {}", fixture::token(&["pull", "push"], 40, "t1").unwrap());
        let c = g.check("PUT", fixture::PUSH_PATH, None, &[&push], fixture::NOW);
        assert!(c.decision.is_allow(), "{:?}", c.decision);
        // A developer (30) is denied by the release-tag rule: the rules are really consulted.
        let dev = format!("Bearer {}", fixture::token(&["pull", "push"], 30, "t2").unwrap());
        let c = g.check("PUT", fixture::PUSH_PATH, None, &[&dev], fixture::NOW);
        assert_eq!(c.decision.status(), 403);
        let pull = format!("Bearer {}", fixture::token(&["pull"], 40, "t3").unwrap());
        assert!(g.check("GET", fixture::PULL_PATH, None, &[&pull], fixture::NOW).decision.is_allow());
    }

    #[test]
    fn envelopes_are_fully_attributed() {
        let (body, keys) = fixture::envelope(10).unwrap();
        let (_, stats) = registry_guard_core::events::rewrite_envelope(&body, &fixture::opener(&keys)).unwrap();
        assert_eq!((stats.events, stats.attributed), (10, 10));
    }
}
