//! Host access behind a small trait, so the glue is testable natively with a fake.

use proxy_wasm::hostcalls;
pub use proxy_wasm::types::MetricType;
use proxy_wasm::types::{BufferType, MapType};

use std::cell::RefCell;
use std::collections::HashMap;

use registry_guard_core::decide::decision::{Decision, DenyKind};
use registry_guard_core::decide::guard::Checked;

use crate::headers::HeaderMap;
use crate::EnvelopeOutcome;

/// The few host calls the filter needs; every one may fail and none panics.
pub trait Host {
    fn request_headers(&mut self) -> Result<HeaderMap, String>;
    fn now_unix_seconds(&mut self) -> Result<i64, String>;
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), String>;
    fn increment(&mut self, metric: u32) -> Result<(), String>;
    fn record(&mut self, metric: u32, value: u64) -> Result<(), String>;
    fn add(&mut self, metric: u32, value: u64) -> Result<(), String>;
    fn request_header(&mut self, name: &str) -> Result<Option<String>, String>;
    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), String>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), String>;
    /// The downstream peer's address (`source.address`).
    fn client_address(&mut self) -> Result<Option<String>, String>;
    fn set_shared(&mut self, key: &str, value: &[u8]) -> Result<(), String>;
    fn get_shared(&mut self, key: &str) -> Result<Option<Vec<u8>>, String>;
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, String>;
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> Result<(), String>;
    /// Defines (or finds) a metric; Envoy shows it as `wasmcustom.<name>`.
    fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, String>;
}

/// The real host: proxy-wasm host calls (not the SDK helpers that `unwrap` host errors).
pub struct ProxyWasmHost;

impl Host for ProxyWasmHost {
    fn request_headers(&mut self) -> Result<HeaderMap, String> {
        raw_request_headers()
    }

    fn now_unix_seconds(&mut self) -> Result<i64, String> {
        let t = hostcalls::get_current_time().map_err(|s| format!("{s:?}"))?;
        let d = t.duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?;
        i64::try_from(d.as_secs()).map_err(|e| e.to_string())
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), String> {
        hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)).map_err(|s| format!("{s:?}"))
    }

    fn increment(&mut self, metric: u32) -> Result<(), String> {
        hostcalls::increment_metric(metric, 1).map_err(|s| format!("{s:?}"))
    }

    fn record(&mut self, metric: u32, value: u64) -> Result<(), String> {
        hostcalls::record_metric(metric, value).map_err(|s| format!("{s:?}"))
    }

    fn add(&mut self, metric: u32, value: u64) -> Result<(), String> {
        let value = i64::try_from(value).map_err(|e| e.to_string())?;
        hostcalls::increment_metric(metric, value).map_err(|s| format!("{s:?}"))
    }

    fn request_header(&mut self, name: &str) -> Result<Option<String>, String> {
        // Bytes, not the SDK's `String` (which `unwrap`s UTF-8): see `headers`.
        let value = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name).map_err(|s| format!("{s:?}"))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), String> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)).map_err(|s| format!("{s:?}"))
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), String> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None).map_err(|s| format!("{s:?}"))
    }

    fn client_address(&mut self) -> Result<Option<String>, String> {
        let bytes = hostcalls::get_property(vec!["source", "address"]).map_err(|s| format!("{s:?}"))?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn set_shared(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        hostcalls::set_shared_data(key, Some(value), None).map_err(|s| format!("{s:?}"))
    }

    fn get_shared(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        hostcalls::get_shared_data(key).map(|(v, _)| v).map_err(|s| format!("{s:?}"))
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, String> {
        Ok(hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map_err(|s| format!("{s:?}"))?
            .unwrap_or_default())
    }

    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> Result<(), String> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, old_size, body).map_err(|s| format!("{s:?}"))
    }

    fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, String> {
        hostcalls::define_metric(kind, name).map_err(|s| format!("{s:?}"))
    }
}

/// All request headers in one host call, as the host serialised them (no copy per header).
#[cfg(target_arch = "wasm32")]
fn raw_request_headers() -> Result<HeaderMap, String> {
    use proxy_wasm::types::Status;
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_pairs(map_type: MapType, data: *mut *mut u8, size: *mut usize) -> Status;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer to `size` bytes it allocated through this module's
    // `proxy_on_memory_allocate` (the SDK's allocator: a boxed slice of exactly `size`
    // bytes), which this function then owns — as the SDK's own `get_map` does.
    unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if data.is_null() => Ok(HeaderMap::default()),
            Status::Ok => Ok(HeaderMap::from_serialized(Vec::from_raw_parts(data, size, size))),
            status => Err(format!("{status:?}")),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn raw_request_headers() -> Result<HeaderMap, String> {
    Err("proxy-wasm host calls exist only in wasm".into())
}

/// Per-rule counters are defined when a rule first decides something; at most this many
/// rules get their own counters (a bundle may hold 200 000), the rest count in
/// `registry_guard.rule_metrics_overflow`.
pub const MAX_RULE_METRICS: usize = 1024;

/// Envoy metrics (`wasmcustom.registry_guard.*` in `/stats`, `wasmcustom_registry_guard_*`
/// in `/stats/prometheus`).
#[derive(Debug)]
pub struct Metrics {
    allowed: u32,
    denied: u32,
    failed: u32,
    /// `registry_guard.denied.<kind>`, in [`DenyKind::ALL`] order.
    denied_by_kind: Vec<(DenyKind, u32)>,
    protection_denied: u32,
    protection_would_deny: u32,
    cache_hits: u32,
    cache_misses: u32,
    rule_overflow: u32,
    /// `registry_guard.rule.<id>.denied|would_deny`, defined on first use.
    by_rule: RefCell<HashMap<(String, bool), u32>>,
    bundle_revision: u32,
    bundle_rejected: u32,
    events_attributed: u32,
    events_unattributed: u32,
    envelopes_rewritten: u32,
    envelopes_oversize: u32,
    envelopes_malformed: u32,
    /// Counts not yet handed to the host, by metric id (see [`Metrics::flush`]).
    pending: RefCell<Pending>,
}

/// Counter increments kept in the VM and handed to Envoy in batches: a host call costs about
/// as much as the whole cached decision, and every request counts two or more.
#[derive(Debug, Default)]
struct Pending {
    counts: Vec<(u32, u64)>,
    total: u64,
}

/// Pending increments handed to the host at once when this many accumulate; the root
/// context also flushes every [`FLUSH_PERIOD_MS`], so a counter is at most that late.
pub const FLUSH_EVERY: u64 = 64;
pub const FLUSH_PERIOD_MS: u64 = 1000;

impl Metrics {
    pub fn define(host: &mut impl Host) -> Result<Metrics, String> {
        let mut define = |kind, name: &str| host.define_metric(kind, name);
        let mut denied_by_kind = Vec::new();
        for kind in DenyKind::ALL {
            denied_by_kind
                .push((kind, define(MetricType::Counter, &format!("registry_guard.denied.{}", kind.label()))?));
        }
        Ok(Metrics {
            allowed: define(MetricType::Counter, "registry_guard.requests_allowed")?,
            denied: define(MetricType::Counter, "registry_guard.requests_denied")?,
            failed: define(MetricType::Counter, "registry_guard.requests_failed")?,
            denied_by_kind,
            protection_denied: define(MetricType::Counter, "registry_guard.protection_denied")?,
            protection_would_deny: define(MetricType::Counter, "registry_guard.protection_would_deny")?,
            cache_hits: define(MetricType::Counter, "registry_guard.token_cache_hits")?,
            cache_misses: define(MetricType::Counter, "registry_guard.token_cache_misses")?,
            rule_overflow: define(MetricType::Counter, "registry_guard.rule_metrics_overflow")?,
            by_rule: RefCell::new(HashMap::new()),
            bundle_revision: define(MetricType::Gauge, "registry_guard.bundle_revision")?,
            bundle_rejected: define(MetricType::Counter, "registry_guard.bundle_rejected")?,
            events_attributed: define(MetricType::Counter, "registry_guard.events_attributed")?,
            events_unattributed: define(MetricType::Counter, "registry_guard.events_unattributed")?,
            envelopes_rewritten: define(MetricType::Counter, "registry_guard.envelopes_rewritten")?,
            envelopes_oversize: define(MetricType::Counter, "registry_guard.envelopes_oversize")?,
            envelopes_malformed: define(MetricType::Counter, "registry_guard.envelopes_malformed")?,
            pending: RefCell::new(Pending::default()),
        })
    }

    /// Counts `n` on counter `id`, handing the batch to the host when it is full.
    fn count(&self, host: &mut impl Host, id: u32, n: u64) {
        let full = {
            let Ok(mut p) = self.pending.try_borrow_mut() else {
                let _ = host.add(id, n);
                return;
            };
            match p.counts.iter_mut().find(|(i, _)| *i == id) {
                Some((_, c)) => *c += n,
                None => p.counts.push((id, n)),
            }
            p.total += 1;
            p.total >= FLUSH_EVERY
        };
        if full {
            self.flush(host);
        }
    }

    /// Hands every pending count to the host (on a full batch, and from the root's tick).
    pub fn flush(&self, host: &mut impl Host) {
        let Ok(mut p) = self.pending.try_borrow_mut() else { return };
        for (id, n) in p.counts.iter_mut() {
            if *n > 0 {
                let _ = host.add(*id, *n);
                *n = 0;
            }
        }
        p.total = 0;
    }

    /// Counts one decided request: allowed/denied, the denial's kind, the deciding rule
    /// (enforced or dry run) and the token cache.
    pub fn decided(&self, host: &mut impl Host, checked: &Checked) {
        match checked.cache_hit {
            Some(true) => {
                self.count(host, self.cache_hits, 1);
            }
            Some(false) => {
                self.count(host, self.cache_misses, 1);
            }
            None => {}
        }
        match &checked.decision {
            Decision::Allow { would_deny, .. } => {
                self.count(host, self.allowed, 1);
                if let Some((rule, _)) = would_deny {
                    self.count(host, self.protection_would_deny, 1);
                    self.rule(host, rule, false);
                }
            }
            Decision::Deny(d) => {
                self.count(host, self.denied, 1);
                if let Some((_, id)) = self.denied_by_kind.iter().find(|(k, _)| *k == d.kind) {
                    self.count(host, *id, 1);
                }
                if let Some(rule) = &d.rule {
                    self.count(host, self.protection_denied, 1);
                    self.rule(host, rule, true);
                }
            }
        }
    }

    fn rule(&self, host: &mut impl Host, rule: &str, enforced: bool) {
        let Ok(mut by_rule) = self.by_rule.try_borrow_mut() else { return };
        let key = (rule.to_owned(), enforced);
        let id = match by_rule.get(&key) {
            Some(id) => Some(*id),
            None if by_rule.len() < MAX_RULE_METRICS => {
                let name = format!("registry_guard.rule.{rule}.{}", if enforced { "denied" } else { "would_deny" });
                let id = host.define_metric(MetricType::Counter, &name).ok();
                if let Some(id) = id {
                    by_rule.insert(key, id);
                }
                id
            }
            None => None,
        };
        self.count(host, id.unwrap_or(self.rule_overflow), 1);
    }

    pub fn failed(&self, host: &mut impl Host) {
        let _ = host.increment(self.failed);
    }

    pub fn bundle_activated(&self, host: &mut impl Host, revision: u64) {
        let _ = host.record(self.bundle_revision, revision);
    }

    pub fn bundle_rejected(&self, host: &mut impl Host) {
        let _ = host.increment(self.bundle_rejected);
    }

    pub fn envelope(&self, host: &mut impl Host, outcome: EnvelopeOutcome) {
        match outcome {
            EnvelopeOutcome::Rewritten { attributed, unattributed } => {
                let _ = host.increment(self.envelopes_rewritten);
                let _ = host.add(self.events_attributed, u64::from(attributed));
                let _ = host.add(self.events_unattributed, u64::from(unattributed));
            }
            EnvelopeOutcome::Oversize => {
                let _ = host.increment(self.envelopes_oversize);
            }
            EnvelopeOutcome::Malformed => {
                let _ = host.increment(self.envelopes_malformed);
            }
        }
    }
}
