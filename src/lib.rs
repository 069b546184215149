//! registry-guard, the proxy-wasm filter: thin glue over `registry_guard_core`.
//!
//! One wasm module, two roles chosen by the plugin configuration:
//! - **registry** (in front of the registry): the root context owns the compiled
//!   configuration and the token cache (one per VM); the HTTP context reads the request
//!   headers, asks [`Guard::check`] and either continues — tagging the request with a
//!   correlation address for its events — or sends the local reply the core decided;
//! - **events** (on the registry's notification path): buffers each envelope, has
//!   [`rewrite_envelope`] fill every event's actor from the correlation records, and
//!   forwards it (Envoy's buffer filter after this one recomputes `Content-Length`).
//!
//! No policy logic lives here.

pub mod headers;
pub mod host;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use registry_guard_core::audit::{self, RequestInfo};
use registry_guard_core::config::{ClientAddress, EventsConfig, PluginConfig};
use registry_guard_core::decision::Decision;
use registry_guard_core::events::{correlation_address, rewrite_envelope, slot_of, Attribution, AttributionRecord};
use registry_guard_core::guard::Guard;

use crate::host::{Host, Metrics, ProxyWasmHost, FLUSH_PERIOD_MS};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared-data key (per `vm_id`, process-wide, survives VM re-creation on reconfiguration)
/// holding the highest bundle revision activated: a configuration carrying an older bundle
/// is refused (rollback protection; Envoy then keeps the running configuration).
const HIGHEST_REVISION_KEY: &str = "registry_guard.highest_bundle_revision";

/// Shared-data key of a correlation slot. The table is a bounded ring of `slots` keys:
/// proxy-wasm shared data has no eviction, so records overwrite older ones in place.
fn slot_key(slot: u32) -> String {
    format!("registry_guard.correlation.{slot}")
}

fn highest_revision() -> (u64, Option<u32>) {
    match proxy_wasm::hostcalls::get_shared_data(HIGHEST_REVISION_KEY) {
        Ok((Some(bytes), cas)) => {
            let n = std::str::from_utf8(&bytes).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            (n, cas)
        }
        Ok((None, cas)) => (0, cas),
        Err(_) => (0, None),
    }
}

fn record_highest_revision(revision: u64, cas: Option<u32>) {
    let value = revision.to_string();
    if let Err(e) = proxy_wasm::hostcalls::set_shared_data(HIGHEST_REVISION_KEY, Some(value.as_bytes()), cas) {
        log::warn!("registry-guard: cannot record bundle revision {revision} in shared data: {e:?}");
    }
}

/// A random 48-bit prefix per VM for correlation addresses (WASI `random_get`; the host
/// clock as a fallback), so addresses from different worker VMs never collide.
fn vm_prefix() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    let now = proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    now.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GuardRoot::default()) });
}}

enum Role {
    Registry(Rc<RefCell<Guard>>),
    Events(EventsConfig),
}

/// Where correlation addresses come from in this VM.
pub struct Correlation {
    pub slots: u32,
    prefix: u64,
    counter: Cell<u64>,
}

impl Correlation {
    pub fn new(slots: u32, prefix: u64) -> Correlation {
        Correlation { slots, prefix, counter: Cell::new(0) }
    }

    fn next_address(&self) -> String {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        correlation_address(self.prefix, n)
    }
}

/// Root context: the role's configuration, per-VM token cache, metric ids.
#[derive(Default)]
pub struct GuardRoot {
    role: Option<Role>,
    correlation: Option<Rc<Correlation>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for GuardRoot {
    /// The plugin is going away (a new configuration replaces it): hand over pending counts.
    fn on_done(&mut self) -> bool {
        if let Some(m) = &self.metrics {
            m.flush(&mut ProxyWasmHost);
        }
        true
    }
}

impl RootContext for GuardRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("registry-guard {VERSION} VM started");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match proxy_wasm::hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(b)) => b,
            Ok(None) => {
                log::error!("registry-guard: plugin configuration is empty; expected the filter configuration JSON");
                return false;
            }
            Err(status) => {
                log::error!("registry-guard: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        let mut host = ProxyWasmHost;
        if self.metrics.is_none() {
            match Metrics::define(&mut host) {
                Ok(m) => self.metrics = Some(Rc::new(m)),
                Err(e) => log::warn!("registry-guard: cannot define metrics: {e}"),
            }
            // Batched counters are flushed on this tick (see `Metrics::flush`).
            let period = std::time::Duration::from_millis(FLUSH_PERIOD_MS);
            if let Err(e) = proxy_wasm::hostcalls::set_tick_period(period) {
                log::warn!("registry-guard: cannot set the metrics tick: {e:?}");
            }
        }
        let config = match PluginConfig::from_json(&bytes) {
            Ok(PluginConfig::Events(events)) => {
                log::info!(
                    "registry-guard configured (events role): max envelope {} bytes, {} correlation slots",
                    events.max_envelope_bytes,
                    events.correlation_slots
                );
                self.role = Some(Role::Events(events));
                return true;
            }
            Ok(PluginConfig::Registry(config)) => config,
            Err(e) => {
                log::error!("registry-guard: rejected configuration: {e}");
                if let Some(m) = &self.metrics {
                    m.bundle_rejected(&mut host);
                }
                return false;
            }
        };
        let revision = config.policy.revision;
        let (highest, cas) = highest_revision();
        if revision < highest {
            log::error!(
                "registry-guard: rejected configuration: bundle revision {revision} is older than the active revision {highest}"
            );
            if let Some(m) = &self.metrics {
                m.bundle_rejected(&mut host);
            }
            return false;
        }
        if revision > highest {
            record_highest_revision(revision, cas);
        }
        let kids: Vec<&str> = config.verifier.keys.kids().collect();
        log::info!(
            "registry-guard configured: bundle revision {revision} ({} protection rules, {} deploy tokens), issuer={} service={} realm={} keys={:?} cache={} correlation slots={}",
            config.policy.rules.len(),
            config.policy.credentials.tokens().len(),
            config.verifier.issuer,
            config.challenge.service,
            config.challenge.realm,
            kids,
            config.cache_entries,
            config.correlation_slots,
        );
        if let Some(m) = &self.metrics {
            m.bundle_activated(&mut host, revision);
        }
        let slots = config.correlation_slots;
        self.correlation = (slots > 0).then(|| Rc::new(Correlation::new(slots, vm_prefix())));
        self.role = Some(Role::Registry(Rc::new(RefCell::new(Guard::new(*config)))));
        true
    }

    fn on_tick(&mut self) {
        if let Some(m) = &self.metrics {
            m.flush(&mut ProxyWasmHost);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.role {
            Some(Role::Events(config)) => Some(Box::new(EventsHttp {
                context_id,
                config: config.clone(),
                metrics: self.metrics.clone(),
                passthrough: false,
            })),
            Some(Role::Registry(guard)) => Some(Box::new(GuardHttp {
                context_id,
                guard: Some(guard.clone()),
                correlation: self.correlation.clone(),
                metrics: self.metrics.clone(),
            })),
            None => {
                Some(Box::new(GuardHttp { context_id, guard: None, correlation: None, metrics: self.metrics.clone() }))
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One registry request.
pub struct GuardHttp {
    context_id: u32,
    guard: Option<Rc<RefCell<Guard>>>,
    correlation: Option<Rc<Correlation>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for GuardHttp {}

impl HttpContext for GuardHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut host = ProxyWasmHost;
        trap_if_injected(&mut host, self.guard.as_deref());
        let outcome = on_request_headers(
            &mut host,
            self.context_id,
            self.guard.as_deref(),
            self.correlation.as_deref(),
            self.metrics.as_deref(),
        );
        match outcome {
            Outcome::Allowed | Outcome::AllowedWouldDeny => Action::Continue,
            Outcome::Denied | Outcome::DeniedByRule | Outcome::Failed => Action::Pause,
        }
    }
}

/// What happened to a request, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// Allowed, but a dry-run protection rule would have denied it.
    AllowedWouldDeny,
    Denied,
    /// Denied by an enforced protection rule.
    DeniedByRule,
    /// Internal error: the request was refused (fail closed).
    Failed,
}

/// The request-headers step, over any [`Host`]: read, decide, count, audit, then reply or
/// tag the request for correlation.
pub fn on_request_headers(
    host: &mut impl Host,
    context_id: u32,
    guard: Option<&RefCell<Guard>>,
    correlation: Option<&Correlation>,
    metrics: Option<&Metrics>,
) -> Outcome {
    let outcome = decide_request(host, context_id, guard, correlation, metrics);
    if outcome == Outcome::Failed {
        if let Some(m) = metrics {
            m.failed(host);
        }
    }
    outcome
}

fn decide_request(
    host: &mut impl Host,
    context_id: u32,
    guard: Option<&RefCell<Guard>>,
    correlation: Option<&Correlation>,
    metrics: Option<&Metrics>,
) -> Outcome {
    let Some(guard) = guard else {
        return fail(host, context_id, "filter is not configured");
    };
    let headers = match host.request_headers() {
        Ok(h) => h,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}")),
    };
    let pairs = match headers.pairs() {
        Ok(p) => p,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}")),
    };
    let now = match host.now_unix_seconds() {
        Ok(t) => t,
        Err(e) => return fail(host, context_id, &format!("cannot read host time: {e}")),
    };
    // Values are bytes (obs-text is legal in HTTP); as text, invalid UTF-8 becomes U+FFFD,
    // which no route, token or media type accepts.
    fn text(v: &[u8]) -> Cow<'_, str> {
        String::from_utf8_lossy(v)
    }
    let mut method = None;
    let mut path = None;
    let mut content_types: Vec<Cow<str>> = Vec::new();
    let mut request_id = None;
    let mut authorization: Vec<Cow<str>> = Vec::new();
    let mut forwarded_for = None;
    for (name, value) in pairs {
        match name {
            b":method" => method = Some(text(value)),
            b":path" => path = Some(text(value)),
            b"content-type" => content_types.push(text(value)),
            b"x-request-id" => request_id = Some(text(value)),
            b"authorization" => authorization.push(text(value)),
            b"x-forwarded-for" => forwarded_for = Some(value),
            _ => {}
        }
    }
    let authorization: Vec<&str> = authorization.iter().map(|a| a.as_ref()).collect();
    // Client-controlled: kept (audited, stored for correlation, copied into events) only
    // when short and of safe characters; a hostile id is dropped (core `text::request_id`).
    let request_id = request_id.as_deref().and_then(registry_guard_core::text::request_id);
    // A repeated Content-Type is judged on all its values (the registry reads the first).
    let content_type = (!content_types.is_empty()).then(|| content_types.join(","));
    let content_type = content_type.as_deref();
    let (Some(method), Some(path)) = (method.as_deref(), path.as_deref()) else {
        return fail(host, context_id, "request has no :method or :path");
    };
    let Ok(mut guard) = guard.try_borrow_mut() else {
        return fail(host, context_id, "guard state is busy");
    };
    let checked = guard.check(method, path, content_type, &authorization, now);
    let client_from = guard.config.client_address;
    drop(guard);
    if let Some(m) = metrics {
        m.decided(host, &checked);
    }
    if checked.is_audited() {
        // One JSON line per denial or dry-run would-deny (never a token); see core `audit`.
        let client = host.client_address().ok().flatten();
        let info = RequestInfo { method, path, request_id, client: client.as_deref() };
        if let Some(line) = audit::line(&checked, info, now) {
            log::warn!("{line}");
        }
    }
    let allowed = match checked.decision {
        Decision::Allow { would_deny: None, .. } => Outcome::Allowed,
        Decision::Allow { would_deny: Some(_), .. } => Outcome::AllowedWouldDeny,
        Decision::Deny(d) => {
            let mut headers = vec![
                ("content-type", "application/json"),
                ("docker-distribution-api-version", "registry/2.0"),
                // Tells operators (and the e2e corpus replay) the reply came from the filter.
                ("x-registry-guard", "denied"),
            ];
            if let Some(w) = d.www_authenticate.as_deref() {
                headers.push(("www-authenticate", w));
            }
            let body = d.body();
            return match host.send_response(d.status, &headers, body.as_bytes()) {
                Ok(()) if d.rule.is_some() => Outcome::DeniedByRule,
                Ok(()) => Outcome::Denied,
                Err(e) => {
                    log::error!("[{context_id}] cannot send local reply: {e}");
                    Outcome::Failed
                }
            };
        }
    };
    if let (Some(correlation), Some(subject)) = (correlation, checked.subject()) {
        // Tag the forwarded request so its events can be attributed (see core `events`).
        let addr = correlation.next_address();
        let client = match (client_from, forwarded_for.and_then(last_forwarded_for)) {
            (ClientAddress::XForwardedFor, Some(last)) => Some(last),
            _ => host.client_address().ok().flatten(),
        };
        let record = AttributionRecord {
            addr: &addr,
            name: subject,
            user_type: checked.auth_type().unwrap_or("unknown"),
            user: checked.user(),
            request_id,
            client_addr: client.as_deref(),
        };
        let stored = serde_json::to_vec(&record)
            .map_err(|e| e.to_string())
            .and_then(|record| host.set_shared(&slot_key(slot_of(&addr, correlation.slots)), &record));
        if let Err(e) = stored.and_then(|()| host.set_request_header("x-forwarded-for", &addr)) {
            // Attribution is best effort; the request itself was allowed.
            log::warn!("[{context_id}] cannot record the request for event attribution: {e}");
        }
    }
    allowed
}

/// The last entry of an `X-Forwarded-For` value: the address Envoy appended when it has
/// `use_remote_address: true` (see `ClientAddress::XForwardedFor`).
/// Only text shaped like an IP address is taken (at most 45 bytes of hex digits, `.` and
/// `:`), since it is stored and restored into events; anything else is dropped. (A byte
/// check, not `IpAddr` parsing, which costs the filter kilobytes of code.)
fn last_forwarded_for(value: &[u8]) -> Option<String> {
    let last = value.rsplit(|&b| b == b',').next()?;
    let last = std::str::from_utf8(last).ok()?.trim();
    let shaped =
        !last.is_empty() && last.len() <= 45 && last.bytes().all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':');
    shaped.then(|| last.to_owned())
}

/// TEST ONLY (`fault_injection.trap_on_header`, absent unless configured): a request carrying
/// the header executes wasm `unreachable`, a real VM trap (the e2e fault suite).
fn trap_if_injected(host: &mut impl Host, guard: Option<&RefCell<Guard>>) {
    let header =
        guard.and_then(|g| g.try_borrow().ok()?.config.fault_injection.as_ref().map(|f| f.trap_on_header.clone()));
    if let Some(h) = header {
        if matches!(host.request_header(&h), Ok(Some(_))) {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
    }
}

/// Fail closed: 503 with an OCI error body.
fn fail(host: &mut impl Host, context_id: u32, why: &str) -> Outcome {
    log::error!("[{context_id}] registry-guard internal error, refusing request: {why}");
    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"registry-guard cannot decide this request; refused","detail":null}]}"#;
    let _ = host.send_response(503, &[("content-type", "application/json")], body.as_bytes());
    Outcome::Failed
}

/// One notification envelope from the registry.
pub struct EventsHttp {
    context_id: u32,
    config: EventsConfig,
    metrics: Option<Rc<Metrics>>,
    /// Forward unmodified (too large).
    passthrough: bool,
}

impl Context for EventsHttp {}

impl HttpContext for EventsHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if end_of_stream {
            return Action::Continue;
        }
        let mut host = ProxyWasmHost;
        let length = host.request_header("content-length").ok().flatten().and_then(|v| v.parse::<usize>().ok());
        if length.is_some_and(|l| l > self.config.max_envelope_bytes) {
            self.pass_oversize(length.unwrap_or_default());
            return Action::Continue;
        }
        // Proxy-Wasm cannot hold headers while reading the body (a paused header phase gets
        // no body callbacks), so the length goes now, and Envoy's buffer filter after this
        // one recomputes Content-Length from the rewritten body.
        if let Err(e) = host.remove_request_header("content-length") {
            log::warn!("[{}] cannot remove Content-Length: {e}; envelope forwarded unchanged", self.context_id);
            self.passthrough = true;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.passthrough {
            return Action::Continue;
        }
        if body_size > self.config.max_envelope_bytes {
            self.pass_oversize(body_size);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let mut host = ProxyWasmHost;
        let outcome = rewrite_request_body(&mut host, self.context_id, body_size, self.config.correlation_slots);
        if let Some(m) = &self.metrics {
            m.envelope(&mut host, outcome);
        }
        Action::Continue
    }
}

impl EventsHttp {
    fn pass_oversize(&mut self, size: usize) {
        self.passthrough = true;
        log::warn!(
            "[{}] events envelope of {size} bytes exceeds {} bytes; forwarded unmodified",
            self.context_id,
            self.config.max_envelope_bytes
        );
        if let Some(m) = &self.metrics {
            m.envelope(&mut ProxyWasmHost, EnvelopeOutcome::Oversize);
        }
    }
}

/// What happened to an events envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeOutcome {
    Rewritten {
        attributed: u32,
        unattributed: u32,
    },
    Oversize,
    /// Not an events envelope (or unreadable): forwarded unchanged.
    Malformed,
}

/// Rewrites the buffered envelope in place; anything unexpected forwards it unchanged.
pub fn rewrite_request_body(host: &mut impl Host, context_id: u32, body_size: usize, slots: u32) -> EnvelopeOutcome {
    let body = match host.request_body(body_size) {
        Ok(b) => b,
        Err(e) => {
            log::error!("[{context_id}] cannot read events envelope: {e}; forwarded unchanged");
            return EnvelopeOutcome::Malformed;
        }
    };
    let lookup = |addr: &str| -> Option<Attribution> {
        let record = host.get_shared(&slot_key(slot_of(addr, slots))).ok().flatten()?;
        serde_json::from_slice(&record).ok()
    };
    let (rewritten, stats) = match rewrite_envelope(&body, lookup) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("[{context_id}] events envelope not rewritten ({e}); forwarded unchanged");
            return EnvelopeOutcome::Malformed;
        }
    };
    if let Err(e) = host.replace_request_body(body_size, &rewritten) {
        log::error!("[{context_id}] cannot replace events envelope: {e}");
        return EnvelopeOutcome::Malformed;
    }
    if stats.unattributed > 0 {
        log::info!(
            "[{context_id}] events envelope: {} of {} events could not be attributed with certainty; actor left unchanged",
            stats.unattributed,
            stats.events
        );
    }
    EnvelopeOutcome::Rewritten { attributed: stats.attributed, unattributed: stats.unattributed }
}
