//! A fake proxy-wasm host for the glue tests: every host call of [`Host`] recorded or
//! answered from fields, any of them made to fail; and a logger that keeps each test
//! thread's log lines.
#![allow(dead_code, clippy::type_complexity)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use registry_guard::headers::HeaderMap;
use registry_guard::host::{Host, HostCall, HostError, MetricType, SharedValue, Status};

pub const NOW: i64 = 1_800_000_000;

/// Shared data as Envoy keeps it (process-wide): value and CAS token per key. Cloned
/// `FakeHost`s of different "VMs" share one through the `Rc`.
#[derive(Default, Clone)]
pub struct Shared(pub Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>);

impl Shared {
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.0.borrow().get(key).map(|(v, _)| v.clone())
    }
    pub fn text(&self, key: &str) -> Option<String> {
        self.get(key).map(|v| String::from_utf8(v).unwrap())
    }
    pub fn set(&self, key: &str, value: &[u8]) {
        let mut map = self.0.borrow_mut();
        let cas = map.get(key).map_or(1, |(_, c)| c + 1);
        map.insert(key.into(), (value.to_vec(), cas));
    }
}

#[derive(Default)]
pub struct FakeHost {
    pub headers: Vec<(String, String)>,
    /// Raw header values (bytes that are not UTF-8), sent after `headers`.
    pub raw_headers: Vec<(String, Vec<u8>)>,
    pub fail_headers: bool,
    /// `set_request_header` fails.
    pub fail_set_header: bool,
    /// `send_response` fails (the host cannot send a local reply).
    pub fail_reply: bool,
    pub replies: Vec<(u16, Vec<(String, String)>, String)>,
    pub shared: Shared,
    /// Shared-data reads and writes fail.
    pub fail_shared: bool,
    /// Before each of the next this-many compare-and-swaps, another VM changes the key.
    pub lose_cas: u32,
    pub body: Vec<u8>,
    pub metric_names: Vec<String>,
    pub metric_kinds: Vec<MetricType>,
    pub metric_values: HashMap<u32, u64>,
    /// The plugin configuration (`None`: empty).
    pub configuration: Option<Vec<u8>>,
    pub tick_period: Option<Duration>,
    /// The clock, when a test moves it (default: [`NOW`]).
    pub clock: Option<Duration>,
    /// Outgoing calls dispatched: cluster, headers, timeout.
    pub calls: Vec<(String, Vec<(String, String)>, Duration)>,
    pub fail_dispatch: bool,
    /// The answer of the call being delivered: headers and body.
    pub call_response_headers: Vec<(String, String)>,
    pub call_response_body: Option<Vec<u8>>,
    /// Every host call made, in order (the hot-path tests count them).
    pub host_calls: Vec<HostCall>,
    /// How far the clock moves at each read after the first (default: it stands still).
    pub clock_step: Duration,
    pub clock_reads: u32,
    /// Every `record` (gauges and histograms): metric id and value.
    pub records: Vec<(u32, u64)>,
}

impl FakeHost {
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn request(method: &str, path: &str) -> Self {
        FakeHost::default().with_header(":method", method).with_header(":path", path)
    }
    pub fn with_configuration(mut self, json: &serde_json::Value) -> Self {
        self.configuration = Some(json.to_string().into_bytes());
        self
    }
    pub fn with_shared(mut self, shared: &Shared) -> Self {
        self.shared = shared.clone();
        self
    }
    /// Replaces the request (headers, replies) and keeps everything else.
    pub fn new_request(&mut self, method: &str, path: &str) {
        self.headers = vec![(":method".into(), method.into()), (":path".into(), path.into())];
        self.raw_headers.clear();
        self.replies.clear();
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub fn metric(&self, name: &str) -> u64 {
        let id = self.metric_names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no metric {name}"));
        self.metric_values.get(&(id as u32)).copied().unwrap_or(0)
    }
    pub fn has_metric(&self, name: &str) -> bool {
        self.metric_names.iter().any(|n| n == name)
    }
}

fn fail(call: HostCall) -> HostError {
    HostError::status(call, Status::InternalFailure)
}

impl Host for FakeHost {
    fn plugin_configuration(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        self.host_calls.push(HostCall::PluginConfiguration);
        Ok(self.configuration.clone())
    }
    fn set_tick_period(&mut self, period: Duration) -> Result<(), HostError> {
        self.host_calls.push(HostCall::SetTickPeriod);
        self.tick_period = Some(period);
        Ok(())
    }
    fn unix_time(&mut self) -> Result<Duration, HostError> {
        self.host_calls.push(HostCall::CurrentTime);
        let moved = self.clock_step * self.clock_reads;
        self.clock_reads += 1;
        Ok(self.clock.unwrap_or(Duration::from_secs(NOW as u64)) + moved)
    }
    fn dispatch_http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        self.host_calls.push(HostCall::DispatchHttpCall);
        if self.fail_dispatch {
            return Err(HostError::status(HostCall::DispatchHttpCall, Status::BadArgument));
        }
        let h = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.calls.push((cluster.to_owned(), h, timeout));
        Ok(self.calls.len() as u32)
    }
    fn http_call_response_header(&mut self, name: &str) -> Result<Option<String>, HostError> {
        self.host_calls.push(HostCall::HttpCallResponseHeader);
        Ok(self.call_response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }
    fn http_call_response_body(&mut self, size: usize) -> Result<Option<Vec<u8>>, HostError> {
        self.host_calls.push(HostCall::HttpCallResponseBody);
        Ok(self.call_response_body.as_ref().map(|b| b[..size.min(b.len())].to_vec()))
    }
    fn get_shared(&mut self, key: &str) -> Result<SharedValue, HostError> {
        self.host_calls.push(HostCall::GetSharedData);
        if self.fail_shared {
            return Err(fail(HostCall::GetSharedData));
        }
        Ok(match self.shared.0.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }
    fn set_shared(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        self.host_calls.push(HostCall::SetSharedData);
        if self.fail_shared {
            return Err(fail(HostCall::SetSharedData));
        }
        if cas.is_some() && self.lose_cas > 0 {
            // Another VM got there first: it bumped the value.
            self.lose_cas -= 1;
            let theirs = self.shared.text(key).and_then(|t| t.parse::<u32>().ok()).unwrap_or(0) + 1;
            self.shared.set(key, theirs.to_string().as_bytes());
        }
        let current = self.shared.0.borrow().get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(HostError::status(HostCall::SetSharedData, Status::CasMismatch));
            }
        }
        self.shared.set(key, value);
        Ok(())
    }
    fn define_metric(&mut self, kind: MetricType, name: &str) -> Result<u32, HostError> {
        self.host_calls.push(HostCall::DefineMetric);
        if let Some(i) = self.metric_names.iter().position(|n| n == name) {
            return Ok(i as u32);
        }
        self.metric_names.push(name.to_owned());
        self.metric_kinds.push(kind);
        Ok(self.metric_names.len() as u32 - 1)
    }
    fn increment(&mut self, metric: u32) -> Result<(), HostError> {
        self.host_calls.push(HostCall::IncrementMetric);
        *self.metric_values.entry(metric).or_default() += 1;
        Ok(())
    }
    fn add(&mut self, metric: u32, value: u64) -> Result<(), HostError> {
        self.host_calls.push(HostCall::IncrementMetric);
        *self.metric_values.entry(metric).or_default() += value;
        Ok(())
    }
    fn record(&mut self, metric: u32, value: u64) -> Result<(), HostError> {
        self.host_calls.push(HostCall::RecordMetric);
        self.records.push((metric, value));
        self.metric_values.insert(metric, value);
        Ok(())
    }
    fn request_headers(&mut self) -> Result<HeaderMap, HostError> {
        self.host_calls.push(HostCall::RequestHeaders);
        if self.fail_headers {
            return Err(fail(HostCall::RequestHeaders));
        }
        let text = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        let raw = self.raw_headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        Ok(HeaderMap::from_pairs(text.chain(raw)))
    }
    fn request_header(&mut self, name: &str) -> Result<Option<String>, HostError> {
        self.host_calls.push(HostCall::RequestHeader);
        Ok(self.header(name).map(str::to_owned))
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        self.host_calls.push(HostCall::SetRequestHeader);
        if self.fail_set_header {
            return Err(HostError::status(HostCall::SetRequestHeader, Status::BadArgument));
        }
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.into(), value.into()));
        Ok(())
    }
    fn remove_request_header(&mut self, name: &str) -> Result<(), HostError> {
        self.host_calls.push(HostCall::RemoveRequestHeader);
        self.headers.retain(|(k, _)| k != name);
        Ok(())
    }
    fn client_address(&mut self) -> Result<Option<String>, HostError> {
        self.host_calls.push(HostCall::ClientAddress);
        Ok(Some("127.0.0.1:40000".into()))
    }
    fn request_body(&mut self, size: usize) -> Result<Vec<u8>, HostError> {
        self.host_calls.push(HostCall::RequestBody);
        Ok(self.body[..size.min(self.body.len())].to_vec())
    }
    fn replace_request_body(&mut self, old_size: usize, body: &[u8]) -> Result<(), HostError> {
        self.host_calls.push(HostCall::ReplaceRequestBody);
        let old = old_size.min(self.body.len());
        self.body.splice(..old, body.iter().copied());
        Ok(())
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
        self.host_calls.push(HostCall::SendLocalReply);
        if self.fail_reply {
            return Err(fail(HostCall::SendLocalReply));
        }
        let h = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.replies.push((status, h, String::from_utf8_lossy(body).into_owned()));
        Ok(())
    }
}

thread_local! {
    static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct ThreadLogger;

impl log::Log for ThreadLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        LINES.with(|l| l.borrow_mut().push(format!("{} {}", record.level(), record.args())));
    }
    fn flush(&self) {}
}

/// Starts keeping log lines (per test thread); returns and clears this thread's lines so far.
pub fn take_logs() -> Vec<String> {
    static LOGGER: ThreadLogger = ThreadLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    LINES.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

/// A registry-role filter configuration trusting token key `key` (`es256_key(key)`).
pub fn registry_config(key: u8) -> serde_json::Value {
    use registry_guard_core::token::testing::{es256_key, jwks};
    serde_json::json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
        "issuer": "registry-guard", "jwks": jwks(&[&es256_key(key)]),
    })
}

/// `Bearer <token>` for `dev` on `acme/web/app`, signed with `es256_key(key)`, valid at [`NOW`].
pub fn bearer_signed_by(key: u8, actions: &[&str]) -> String {
    use registry_guard_core::token::claims::AccessClaim;
    use registry_guard_core::token::claims::Audience;
    use registry_guard_core::token::claims::RegistryClaims;
    use registry_guard_core::token::sign::sign;
    use registry_guard_core::token::sign::Validity;
    use registry_guard_core::token::testing::es256_key;
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "dev".into(),
        aud: Audience::One("container_registry".into()),
        jti: "j".into(),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            meta: None,
        }],
        auth_type: Some("password".into()),
        user: None,
        extra: Default::default(),
    };
    let t = sign(&es256_key(key), claims, Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 60 }).unwrap();
    format!("Bearer {t}")
}
