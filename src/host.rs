//! Host access behind a small trait, so the glue is testable natively with a fake host.
//!
//! Every proxy-wasm host call the filter makes goes through [`Host`]: the request path
//! (headers, body, local replies), the root context (plugin configuration, tick period),
//! shared data (with compare-and-swap) and metrics. Each call returns a [`HostError`] naming
//! the call and the status the host gave; none panics. [`ProxyWasmHost`] is the real host,
//! built on `proxy_wasm::hostcalls` (not the SDK's trait helpers, which `unwrap` host errors).

use std::fmt;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};
pub use proxy_wasm::types::{MetricType, Status};

use crate::headers::HeaderMap;

/// The host call that failed (named as in the proxy-wasm ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCall {
    /// Reading the plugin configuration buffer.
    PluginConfiguration,
    SetTickPeriod,
    CurrentTime,
    RequestHeaders,
    RequestHeader,
    SetRequestHeader,
    RemoveRequestHeader,
    /// Reading `source.address`.
    ClientAddress,
    RequestBody,
    ReplaceRequestBody,
    SendLocalReply,
    GetSharedData,
    SetSharedData,
    DefineMetric,
    IncrementMetric,
    RecordMetric,
    DispatchHttpCall,
    HttpCallResponseHeader,
    HttpCallResponseBody,
}

impl HostCall {
    /// The proxy-wasm ABI function behind the call.
    pub fn abi_name(self) -> &'static str {
        match self {
            HostCall::PluginConfiguration => "proxy_get_buffer_bytes(plugin configuration)",
            HostCall::SetTickPeriod => "proxy_set_tick_period_milliseconds",
            HostCall::CurrentTime => "proxy_get_current_time_nanoseconds",
            HostCall::RequestHeaders => "proxy_get_header_map_pairs",
            HostCall::RequestHeader => "proxy_get_header_map_value",
            HostCall::SetRequestHeader => "proxy_replace_header_map_value",
            HostCall::RemoveRequestHeader => "proxy_remove_header_map_value",
            HostCall::ClientAddress => "proxy_get_property(source.address)",
            HostCall::RequestBody => "proxy_get_buffer_bytes(request body)",
            HostCall::ReplaceRequestBody => "proxy_set_buffer_bytes(request body)",
            HostCall::SendLocalReply => "proxy_send_local_response",
            HostCall::GetSharedData => "proxy_get_shared_data",
            HostCall::SetSharedData => "proxy_set_shared_data",
            HostCall::DefineMetric => "proxy_define_metric",
            HostCall::IncrementMetric => "proxy_increment_metric",
            HostCall::RecordMetric => "proxy_record_metric",
            HostCall::DispatchHttpCall => "proxy_http_call",
            HostCall::HttpCallResponseHeader => "proxy_get_header_map_value(http call response)",
            HostCall::HttpCallResponseBody => "proxy_get_buffer_bytes(http call response body)",
        }
    }
}

/// A failed host call: which call, and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The host returned a status other than `Ok` (`CasMismatch` for a lost compare-and-swap).
    Status { call: HostCall, status: Status },
    /// The host answered, but the answer is unusable (a malformed header map, a time before
    /// 1970, a value out of range).
    Invalid { call: HostCall, reason: String },
}

impl HostError {
    pub fn status(call: HostCall, status: Status) -> HostError {
        HostError::Status { call, status }
    }

    pub fn invalid(call: HostCall, reason: impl Into<String>) -> HostError {
        HostError::Invalid { call, reason: reason.into() }
    }

    pub fn call(&self) -> HostCall {
        match self {
            HostError::Status { call, .. } | HostError::Invalid { call, .. } => *call,
        }
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Status { call, status } => write!(f, "`{}` returned {status:?}", call.abi_name()),
            HostError::Invalid { call, reason } => write!(f, "`{}`: {reason}", call.abi_name()),
        }
    }
}

impl std::error::Error for HostError {}

/// A shared-data value and its compare-and-swap token (`None` when the key is absent).
pub type SharedValue = (Option<Vec<u8>>, Option<u32>);

/// The host calls the filter needs; every one may fail and none panics.
pub trait Host {
    // ---- root context -----------------------------------------------------------------
    /// The plugin configuration bytes (`None`: empty).
    fn plugin_configuration(&mut self) -> Result<Option<Vec<u8>>, HostError>;
    /// Asks for `on_tick` every `period`.
    fn set_tick_period(&mut self, period: Duration) -> Result<(), HostError>;
    /// The host's wall clock, since 1970.
    fn unix_time(&mut self) -> Result<Duration, HostError>;
    fn now_unix_seconds(&mut self) -> Result<i64, HostError> {
        let t = self.unix_time()?;
        i64::try_from(t.as_secs()).map_err(|e| HostError::invalid(HostCall::CurrentTime, e.to_string()))
    }

    // ---- shared data (process-wide, per `vm_id`) --------------------------------------
    /// A value and its CAS token.
    fn get_shared(&mut self, key: &str) -> Result<SharedValue, HostError>;
    /// Sets `key`; with `cas`, only if nobody set it since that token was read (else
    /// [`Status::CasMismatch`]).
    fn set_shared(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError>;

    // ---- metrics (Envoy shows them as `wasmcustom.<name>`) ----------------------------
    /// Defines (or finds) a metric.
    fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, HostError>;
    fn increment(&mut self, metric: u32) -> Result<(), HostError>;
    fn add(&mut self, metric: u32, value: u64) -> Result<(), HostError>;
    fn record(&mut self, metric: u32, value: u64) -> Result<(), HostError>;

    // ---- outgoing calls (the bundle source) -------------------------------------------
    /// Starts an HTTP call to `cluster`; the answer arrives in the root context's
    /// `on_http_call_response` with the returned token.
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, HostError>;
    /// One header of the call's answer (`:status`, `etag`), inside `on_http_call_response`.
    fn http_call_response_header(&mut self, name: &str) -> Result<Option<String>, HostError>;
    /// The call's answer body, inside `on_http_call_response`.
    fn http_call_response_body(&mut self, size: usize) -> Result<Option<Vec<u8>>, HostError>;

    // ---- the request ------------------------------------------------------------------
    fn request_headers(&mut self) -> Result<HeaderMap, HostError>;
    fn request_header(&mut self, name: &str) -> Result<Option<String>, HostError>;
    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError>;
    /// The downstream peer's address (`source.address`).
    fn client_address(&mut self) -> Result<Option<String>, HostError>;
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError>;
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> Result<(), HostError>;
    /// Sends a local reply (the request is not forwarded).
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError>;
}

/// The real host: proxy-wasm host calls.
pub struct ProxyWasmHost;

fn status(call: HostCall) -> impl Fn(Status) -> HostError {
    move |s| HostError::status(call, s)
}

impl Host for ProxyWasmHost {
    fn plugin_configuration(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .map_err(status(HostCall::PluginConfiguration))
    }

    fn set_tick_period(&mut self, period: Duration) -> Result<(), HostError> {
        hostcalls::set_tick_period(period).map_err(status(HostCall::SetTickPeriod))
    }

    fn unix_time(&mut self) -> Result<Duration, HostError> {
        let t = hostcalls::get_current_time().map_err(status(HostCall::CurrentTime))?;
        t.duration_since(std::time::UNIX_EPOCH).map_err(|e| HostError::invalid(HostCall::CurrentTime, e.to_string()))
    }

    fn get_shared(&mut self, key: &str) -> Result<SharedValue, HostError> {
        hostcalls::get_shared_data(key).map_err(status(HostCall::GetSharedData))
    }

    fn set_shared(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(status(HostCall::SetSharedData))
    }

    fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, HostError> {
        hostcalls::define_metric(kind, name).map_err(status(HostCall::DefineMetric))
    }

    fn increment(&mut self, metric: u32) -> Result<(), HostError> {
        hostcalls::increment_metric(metric, 1).map_err(status(HostCall::IncrementMetric))
    }

    fn add(&mut self, metric: u32, value: u64) -> Result<(), HostError> {
        let value = i64::try_from(value).map_err(|e| HostError::invalid(HostCall::IncrementMetric, e.to_string()))?;
        hostcalls::increment_metric(metric, value).map_err(status(HostCall::IncrementMetric))
    }

    fn record(&mut self, metric: u32, value: u64) -> Result<(), HostError> {
        hostcalls::record_metric(metric, value).map_err(status(HostCall::RecordMetric))
    }

    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], timeout)
            .map_err(status(HostCall::DispatchHttpCall))
    }

    fn http_call_response_header(&mut self, name: &str) -> Result<Option<String>, HostError> {
        // Not the SDK's `get_map_value_bytes`, which panics on a status other than Ok or
        // NotFound (Envoy answers so for a call it failed, e.g. an oversized answer).
        let value = raw_map_value(MapType::HttpCallResponseHeaders, name, HostCall::HttpCallResponseHeader)?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn http_call_response_body(&mut self, size: usize) -> Result<Option<Vec<u8>>, HostError> {
        raw_buffer(BufferType::HttpCallResponseBody, size, HostCall::HttpCallResponseBody)
    }

    fn request_headers(&mut self) -> Result<HeaderMap, HostError> {
        raw_request_headers()
    }

    fn request_header(&mut self, name: &str) -> Result<Option<String>, HostError> {
        // Bytes, not the SDK's `String` (which `unwrap`s UTF-8): see `headers`.
        let value = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            .map_err(status(HostCall::RequestHeader))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            .map_err(status(HostCall::SetRequestHeader))
    }

    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None).map_err(status(HostCall::RemoveRequestHeader))
    }

    fn client_address(&mut self) -> Result<Option<String>, HostError> {
        let bytes = hostcalls::get_property(vec!["source", "address"]).map_err(status(HostCall::ClientAddress))?;
        Ok(bytes.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        Ok(hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .map_err(status(HostCall::RequestBody))?
            .unwrap_or_default())
    }

    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> Result<(), HostError> {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, old_size, body)
            .map_err(status(HostCall::ReplaceRequestBody))
    }

    fn send_response(&mut self, status_code: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
        hostcalls::send_http_response(u32::from(status_code), headers.to_vec(), Some(body))
            .map_err(status(HostCall::SendLocalReply))
    }
}

/// All request headers in one host call, as the host serialised them (no copy per header).
#[cfg(target_arch = "wasm32")]
fn raw_request_headers() -> Result<HeaderMap, HostError> {
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
            s => Err(HostError::status(HostCall::RequestHeaders, s)),
        }
    }
}

/// One header of a map; any status but Ok and NotFound is an error (never a panic).
#[cfg(target_arch = "wasm32")]
fn raw_map_value(map: MapType, key: &str, call: HostCall) -> Result<Option<Vec<u8>>, HostError> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_value(
            map_type: MapType,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> Status;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `raw_request_headers`: the host hands over `size` bytes it allocated
    // through this module's allocator, which this function then owns.
    unsafe {
        match proxy_get_header_map_value(map, key.as_ptr(), key.len(), &mut data, &mut size) {
            Status::Ok if data.is_null() => Ok(Some(Vec::new())),
            Status::Ok => Ok(Some(Vec::from_raw_parts(data, size, size))),
            Status::NotFound => Ok(None),
            s => Err(HostError::status(call, s)),
        }
    }
}

/// Up to `size` bytes of a buffer from its start; any status but Ok and NotFound is an error.
#[cfg(target_arch = "wasm32")]
fn raw_buffer(buffer: BufferType, size: usize, call: HostCall) -> Result<Option<Vec<u8>>, HostError> {
    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_buffer_bytes(
            buffer_type: BufferType,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> Status;
    }
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut got: usize = 0;
    // SAFETY: as in `raw_map_value`.
    unsafe {
        match proxy_get_buffer_bytes(buffer, 0, size, &mut data, &mut got) {
            Status::Ok if data.is_null() => Ok(None),
            Status::Ok => Ok(Some(Vec::from_raw_parts(data, got, got))),
            Status::NotFound => Ok(None),
            s => Err(HostError::status(call, s)),
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn raw_map_value(_: MapType, _: &str, call: HostCall) -> Result<Option<Vec<u8>>, HostError> {
    Err(HostError::invalid(call, "proxy-wasm host calls exist only in wasm"))
}

#[cfg(not(target_arch = "wasm32"))]
fn raw_buffer(_: BufferType, _: usize, call: HostCall) -> Result<Option<Vec<u8>>, HostError> {
    Err(HostError::invalid(call, "proxy-wasm host calls exist only in wasm"))
}

#[cfg(not(target_arch = "wasm32"))]
fn raw_request_headers() -> Result<HeaderMap, HostError> {
    Err(HostError::invalid(HostCall::RequestHeaders, "proxy-wasm host calls exist only in wasm"))
}

/// The host's time in milliseconds (0 if it cannot be read): the followers' clock.
pub fn now_ms(host: &mut impl Host) -> u64 {
    host.unix_time().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Jitter for the followers (WASI `random_get`; a fixed middle value without it).
pub fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes),
        Err(_) => 1 << 31,
    }
}

/// A follower's `GET path` to `cluster` with `authority` and `extra` headers (conditional
/// and long-poll headers, credentials), answered in `on_http_call_response`.
pub fn dispatch_get(
    host: &mut impl Host,
    cluster: &str,
    path: &str,
    authority: &str,
    extra: &[(String, String)],
    timeout_ms: u64,
) -> Result<u32, HostError> {
    let mut headers: Vec<(&str, &str)> = vec![(":method", "GET"), (":path", path), (":authority", authority)];
    headers.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    host.dispatch_http_call(cluster, &headers, Duration::from_millis(timeout_ms))
}
