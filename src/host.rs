//! Host access behind a small trait, so the glue is testable natively with a fake.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType};

use crate::{EnvelopeOutcome, Outcome};

/// The few host calls the filter needs; every one may fail and none panics.
pub trait Host {
    fn request_headers(&mut self) -> Result<Vec<(String, String)>, String>;
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
}

/// The real host: proxy-wasm host calls (not the SDK helpers that `unwrap` host errors).
pub struct ProxyWasmHost;

impl Host for ProxyWasmHost {
    fn request_headers(&mut self) -> Result<Vec<(String, String)>, String> {
        hostcalls::get_map(MapType::HttpRequestHeaders).map_err(|s| format!("{s:?}"))
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
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name).map_err(|s| format!("{s:?}"))
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
}

/// Envoy metrics (`wasmcustom.registry_guard.*` in `/stats`).
#[derive(Debug)]
pub struct Metrics {
    allowed: u32,
    denied: u32,
    failed: u32,
    protection_denied: u32,
    protection_would_deny: u32,
    bundle_revision: u32,
    bundle_rejected: u32,
    events_attributed: u32,
    events_unattributed: u32,
    envelopes_rewritten: u32,
    envelopes_oversize: u32,
    envelopes_malformed: u32,
}

impl Metrics {
    pub fn define() -> Result<Metrics, String> {
        let define = |kind, name: &str| hostcalls::define_metric(kind, name).map_err(|s| format!("{s:?}"));
        Ok(Metrics {
            allowed: define(MetricType::Counter, "registry_guard.requests_allowed")?,
            denied: define(MetricType::Counter, "registry_guard.requests_denied")?,
            failed: define(MetricType::Counter, "registry_guard.requests_failed")?,
            protection_denied: define(MetricType::Counter, "registry_guard.protection_denied")?,
            protection_would_deny: define(MetricType::Counter, "registry_guard.protection_would_deny")?,
            bundle_revision: define(MetricType::Gauge, "registry_guard.bundle_revision")?,
            bundle_rejected: define(MetricType::Counter, "registry_guard.bundle_rejected")?,
            events_attributed: define(MetricType::Counter, "registry_guard.events_attributed")?,
            events_unattributed: define(MetricType::Counter, "registry_guard.events_unattributed")?,
            envelopes_rewritten: define(MetricType::Counter, "registry_guard.envelopes_rewritten")?,
            envelopes_oversize: define(MetricType::Counter, "registry_guard.envelopes_oversize")?,
            envelopes_malformed: define(MetricType::Counter, "registry_guard.envelopes_malformed")?,
        })
    }

    pub fn count(&self, host: &mut impl Host, outcome: Outcome) {
        let ids: &[u32] = match outcome {
            Outcome::Allowed => &[self.allowed],
            Outcome::AllowedWouldDeny => &[self.allowed, self.protection_would_deny],
            Outcome::Denied => &[self.denied],
            Outcome::DeniedByRule => &[self.denied, self.protection_denied],
            Outcome::Failed => &[self.failed],
        };
        for id in ids {
            let _ = host.increment(*id);
        }
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
