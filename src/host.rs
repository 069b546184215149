//! Host access behind a small trait, so the glue is testable natively with a fake.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MapType, MetricType};

use crate::Outcome;

/// The few host calls the filter needs; every one may fail and none panics.
pub trait Host {
    fn request_headers(&mut self) -> Result<Vec<(String, String)>, String>;
    fn now_unix_seconds(&mut self) -> Result<i64, String>;
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), String>;
    fn increment(&mut self, metric: u32) -> Result<(), String>;
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
}

/// Envoy counters (`registry_guard.*` in `/stats`).
#[derive(Debug)]
pub struct Metrics {
    allowed: u32,
    denied: u32,
    failed: u32,
}

impl Metrics {
    pub fn define() -> Result<Metrics, String> {
        let define = |name: &str| hostcalls::define_metric(MetricType::Counter, name).map_err(|s| format!("{s:?}"));
        Ok(Metrics {
            allowed: define("registry_guard.requests_allowed")?,
            denied: define("registry_guard.requests_denied")?,
            failed: define("registry_guard.requests_failed")?,
        })
    }

    pub fn count(&self, host: &mut impl Host, outcome: Outcome) {
        let id = match outcome {
            Outcome::Allowed => self.allowed,
            Outcome::Denied => self.denied,
            Outcome::Failed => self.failed,
        };
        let _ = host.increment(id);
    }
}
