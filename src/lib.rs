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
use registry_guard_core::decide::audit::{self, RequestInfo};
use registry_guard_core::decide::config::{ClientAddress, EventsConfig, PluginConfig, DECISION_ALLOW, DECISION_HEADER};
use registry_guard_core::decide::decision::Decision;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::events::{correlation_address, rewrite_envelope, slot_of, Attribution, AttributionRecord};

use crate::host::{Host, Metrics, ProxyWasmHost, FLUSH_PERIOD_MS};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared-data key (per `vm_id`, process-wide) of the number of registry-role VMs that have
/// claimed a worker slot (see [`vm_slot`]).
const VM_SLOTS_KEY: &str = "registry_guard.vm_slots";

thread_local! {
    /// This VM's slot: its index among the VMs of this `vm_id` (a VM lives on one thread and
    /// outlives the plugin configurations it serves, so the slot is claimed once).
    static VM_SLOT: Cell<Option<u32>> = const { Cell::new(None) };
    /// Configurations of this VM so far, and the newest one per endpoint: while Envoy swaps
    /// configurations, the old plugin's root context lives on for a while; only the newest
    /// beats for its endpoint.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    static NEWEST: RefCell<Vec<(&'static str, u64)>> = const { RefCell::new(Vec::new()) };
}

/// This VM's slot number, claimed on first use by a compare-and-swap on [`VM_SLOTS_KEY`]:
/// `registry_guard.vm.<slot>.revision` and `.heartbeat` are its own gauges, so `rgctl
/// status` can tell when a worker does not enforce the revision the others report.
fn vm_slot() -> Option<u32> {
    if let Some(slot) = VM_SLOT.with(Cell::get) {
        return Some(slot);
    }
    for _ in 0..64 {
        let (current, cas) = match proxy_wasm::hostcalls::get_shared_data(VM_SLOTS_KEY) {
            Ok((Some(bytes), cas)) => {
                (std::str::from_utf8(&bytes).ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0), cas)
            }
            Ok((None, cas)) => (0, cas),
            Err(_) => return None,
        };
        let next = current.saturating_add(1).to_string();
        if proxy_wasm::hostcalls::set_shared_data(VM_SLOTS_KEY, Some(next.as_bytes()), cas).is_ok() {
            VM_SLOT.with(|s| s.set(Some(current)));
            return Some(current);
        }
    }
    None
}

/// Shared-data key of a correlation slot. The table is a bounded ring of `slots` keys:
/// proxy-wasm shared data has no eviction, so records overwrite older ones in place.
fn slot_key(slot: u32) -> String {
    format!("registry_guard.correlation.{slot}")
}

/// TEST ONLY (`fault_injection.refuse_configure_after_first`): whether this is the first
/// time any VM of this Envoy process is configured with `bytes` (a shared-data flag per
/// configuration digest).
fn first_configure(bytes: &[u8]) -> bool {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let key = format!("registry_guard.fault.configured.{:016x}", h.finish());
    match proxy_wasm::hostcalls::get_shared_data(&key) {
        Ok((Some(_), _)) => false,
        _ => {
            let _ = proxy_wasm::hostcalls::set_shared_data(&key, Some(b"1"), None);
            true
        }
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
    worker: Option<WorkerGauges>,
}

/// This VM's own gauges per endpoint, `registry_guard.vm.<slot>.<endpoint>.revision` (the
/// bundle revision its filter enforces there) and `.heartbeat` (unix seconds, renewed every
/// tick by the newest configuration): a worker whose filter is not configured stops beating,
/// one left on an older configuration reports its revision, and `rgctl status` names both.
struct WorkerGauges {
    revision: u32,
    heartbeat: u32,
    /// 1 once this configuration has served a request (workers do; Envoy's main thread,
    /// which keeps a VM of its own, never does).
    serving_gauge: u32,
    serving: Cell<bool>,
    bundle_revision: u64,
    endpoint: &'static str,
    generation: u64,
}

impl WorkerGauges {
    fn define(host: &mut impl Host, endpoint: &'static str, bundle_revision: u64) -> Option<WorkerGauges> {
        let slot = vm_slot()?;
        let gauge = |host: &mut _, what: &str| {
            let name = format!("registry_guard.vm.{slot}.{endpoint}.{what}");
            Host::define_metric(host, proxy_wasm::types::MetricType::Gauge, &name)
                .map_err(|e| log::warn!("registry-guard: cannot define the worker gauge `{name}`: {e}"))
                .ok()
        };
        let generation = GENERATION.with(|g| {
            g.set(g.get().wrapping_add(1));
            g.get()
        });
        NEWEST.with(|n| {
            let mut n = n.borrow_mut();
            n.retain(|(e, _)| *e != endpoint);
            n.push((endpoint, generation));
        });
        let w = WorkerGauges {
            revision: gauge(host, "revision")?,
            heartbeat: gauge(host, "heartbeat")?,
            serving_gauge: gauge(host, "serving")?,
            serving: Cell::new(false),
            bundle_revision,
            endpoint,
            generation,
        };
        w.beat(host);
        Some(w)
    }

    fn beat(&self, host: &mut impl Host) {
        let newest = NEWEST.with(|n| n.borrow().iter().any(|(e, g)| *e == self.endpoint && *g == self.generation));
        if !newest {
            return;
        }
        let now = host.now_unix_seconds().ok().and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
        let _ = host.record(self.revision, self.bundle_revision);
        let _ = host.record(self.serving_gauge, u64::from(self.serving.get()));
        let _ = host.record(self.heartbeat, now);
    }
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
        if config.fault_injection.as_ref().is_some_and(|f| f.refuse_configure_after_first) && !first_configure(&bytes) {
            log::error!("registry-guard: TEST ONLY fault injection: refusing a configuration accepted before");
            return false;
        }
        // Whether to accept depends on the configuration alone: Envoy validates it on the main
        // thread and then configures every worker with the same bytes, so a decision that
        // read anything else (shared data, time) could refuse on a worker what the main
        // thread accepted, and leave that worker without a filter (docs/failing-closed.md).
        // Rollback protection lives in the delivery tools and the token service.
        let revision = config.policy.revision;
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
        let endpoint = match config.endpoint {
            registry_guard_core::decide::config::ServedEndpoint::Registry => "registry",
            registry_guard_core::decide::config::ServedEndpoint::DependencyProxy => "dependency_proxy",
        };
        self.worker = WorkerGauges::define(&mut host, endpoint, revision);
        let slots = config.correlation_slots;
        self.correlation = (slots > 0).then(|| Rc::new(Correlation::new(slots, vm_prefix())));
        self.role = Some(Role::Registry(Rc::new(RefCell::new(Guard::new(*config)))));
        true
    }

    fn on_tick(&mut self) {
        if let Some(m) = &self.metrics {
            m.flush(&mut ProxyWasmHost);
        }
        if let Some(w) = &self.worker {
            w.beat(&mut ProxyWasmHost);
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
                guard: {
                    if let Some(w) = &self.worker {
                        w.serving.set(true);
                    }
                    Some(guard.clone())
                },
                correlation: self.correlation.clone(),
                metrics: self.metrics.clone(),
                denied_body: None,
            })),
            None => Some(Box::new(GuardHttp {
                context_id,
                guard: None,
                correlation: None,
                metrics: self.metrics.clone(),
                denied_body: None,
            })),
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
    /// A refused request whose body is still arriving: its reply waits for the body's end.
    denied_body: Option<DeniedBody>,
}

impl Context for GuardHttp {}

impl HttpContext for GuardHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let mut host = ProxyWasmHost;
        trap_if_injected(&mut host, self.guard.as_deref());
        let outcome = if end_of_stream {
            on_request_headers(
                &mut host,
                self.context_id,
                self.guard.as_deref(),
                self.correlation.as_deref(),
                self.metrics.as_deref(),
            )
        } else {
            // A body follows: a refusal is held until the body has been read (and dropped),
            // so the client is not cut off while still sending it (see `DeniedBody`).
            let cap = self
                .guard
                .as_deref()
                .and_then(|g| g.try_borrow().ok().map(|g| g.config.denied_body_drain_bytes))
                .unwrap_or(DEFAULT_DENIED_BODY_DRAIN_BYTES);
            let (outcome, held) = on_request_headers_before_body(
                &mut host,
                self.context_id,
                self.guard.as_deref(),
                self.correlation.as_deref(),
                self.metrics.as_deref(),
            );
            self.denied_body = held.map(|reply| DeniedBody::new(reply, cap));
            outcome
        };
        match outcome {
            // Marked allowed: the route forwards it.
            Outcome::Allowed | Outcome::AllowedWouldDeny => Action::Continue,
            // A local reply was sent, or is held until the body has been read: Envoy's
            // `allow_on_headers_stop_iteration` (set by `rgctl filter-resource`) turns this
            // into StopIteration, so the body still reaches `on_http_request_body`.
            Outcome::Denied | Outcome::DeniedByRule | Outcome::Failed => Action::Pause,
            // No reply could be sent: the request goes on unmarked, and Envoy's backstop
            // route refuses it.
            Outcome::Unanswered => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(held) = self.denied_body.as_mut() else {
            return Action::Continue;
        };
        match held.on_body(&mut ProxyWasmHost, self.context_id, body_size, end_of_stream) {
            HeldReply::Waiting => Action::Pause,
            HeldReply::Sent => {
                self.denied_body = None;
                Action::Pause
            }
            // Unmarked, the request meets Envoy's backstop route (503), never the registry.
            HeldReply::Unsent => {
                self.denied_body = None;
                Action::Continue
            }
        }
    }
}

/// Default of `denied_body_drain_bytes` (the filter configuration's, when unreadable here).
const DEFAULT_DENIED_BODY_DRAIN_BYTES: u64 = registry_guard_core::decide::config::DEFAULT_DENIED_BODY_DRAIN_BYTES;

/// A local reply decided at the request headers and held until the request body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl LocalReply {
    fn send(&self, host: &mut impl Host, extra: &[(&'static str, &str)]) -> Result<(), String> {
        let mut headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        headers.extend_from_slice(extra);
        host.send_response(self.status, &headers, self.body.as_bytes())
    }
}

/// The body of a refused request. HTTP/1.1 clients that write a body while reading the
/// answer (containerd's pusher, BuildKit) break or hang when the server answers and closes
/// before the body is read, so the refusal is sent only once the body has ended. Each chunk
/// is dropped from Envoy's buffer as it arrives (memory: one chunk), and at most `cap` bytes
/// are read: past that the reply goes out at once and Envoy closes the connection.
#[derive(Debug)]
pub struct DeniedBody {
    reply: LocalReply,
    drained: u64,
    cap: u64,
}

impl DeniedBody {
    pub fn new(reply: LocalReply, cap: u64) -> DeniedBody {
        DeniedBody { reply, drained: 0, cap }
    }

    /// Bytes of the body read and dropped so far.
    pub fn drained(&self) -> u64 {
        self.drained
    }

    /// One body callback: whether the refusal is still waiting for the body, was sent, or
    /// could not be sent (then the request must go on unmarked, to Envoy's backstop).
    pub fn on_body(
        &mut self,
        host: &mut impl Host,
        context_id: u32,
        body_size: usize,
        end_of_stream: bool,
    ) -> HeldReply {
        self.drained = self.drained.saturating_add(body_size as u64);
        if body_size > 0 {
            if let Err(e) = host.replace_request_body(body_size, &[]) {
                // Envoy's own buffer limit still bounds what it keeps.
                log::warn!("[{context_id}] cannot drop the body of a refused request: {e}");
            }
        }
        let over = self.drained > self.cap;
        if !end_of_stream && !over {
            return HeldReply::Waiting;
        }
        let extra: &[(&str, &str)] = if over { &[("connection", "close")] } else { &[] };
        if over {
            log::info!(
                "[{context_id}] refused request's body exceeds {} bytes: replying now and closing the connection",
                self.cap
            );
        }
        match self.reply.send(host, extra) {
            Ok(()) => HeldReply::Sent,
            Err(e) => {
                log::error!("[{context_id}] cannot send local reply: {e}; Envoy's backstop refuses the request");
                HeldReply::Unsent
            }
        }
    }
}

/// Where a held refusal stands after a body callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReply {
    /// The body has not ended yet.
    Waiting,
    Sent,
    /// The local reply could not be sent.
    Unsent,
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
    /// Refused, but the local reply could not be sent: left unmarked for Envoy's backstop.
    Unanswered,
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
    let outcome = decide_request(host, context_id, guard, correlation, metrics, None);
    if matches!(outcome, Outcome::Failed | Outcome::Unanswered) {
        if let Some(m) = metrics {
            m.failed(host);
        }
    }
    outcome
}

/// [`on_request_headers`] for a request whose body is still to come: a refusal is returned
/// instead of sent, to be sent when the body has ended ([`DeniedBody`]).
pub fn on_request_headers_before_body(
    host: &mut impl Host,
    context_id: u32,
    guard: Option<&RefCell<Guard>>,
    correlation: Option<&Correlation>,
    metrics: Option<&Metrics>,
) -> (Outcome, Option<LocalReply>) {
    let mut held = None;
    let outcome = decide_request(host, context_id, guard, correlation, metrics, Some(&mut held));
    if matches!(outcome, Outcome::Failed | Outcome::Unanswered) {
        if let Some(m) = metrics {
            m.failed(host);
        }
    }
    (outcome, held)
}

/// Sends `reply` now, or hands it to `hold` when the request body is still to come.
fn reply_or_hold(host: &mut impl Host, reply: LocalReply, hold: Option<&mut Option<LocalReply>>) -> Result<(), String> {
    match hold {
        Some(slot) => {
            *slot = Some(reply);
            Ok(())
        }
        None => reply.send(host, &[]),
    }
}

fn decide_request(
    host: &mut impl Host,
    context_id: u32,
    guard: Option<&RefCell<Guard>>,
    correlation: Option<&Correlation>,
    metrics: Option<&Metrics>,
    hold: Option<&mut Option<LocalReply>>,
) -> Outcome {
    let Some(guard) = guard else {
        return fail(host, context_id, "filter is not configured", hold);
    };
    let headers = match host.request_headers() {
        Ok(h) => h,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}"), hold),
    };
    let pairs = match headers.pairs() {
        Ok(p) => p,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}"), hold),
    };
    let now = match host.now_unix_seconds() {
        Ok(t) => t,
        Err(e) => return fail(host, context_id, &format!("cannot read host time: {e}"), hold),
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
    let request_id = request_id.as_deref().and_then(registry_guard_core::support::text::request_id);
    // A repeated Content-Type is judged on all its values (the registry reads the first).
    let content_type = (!content_types.is_empty()).then(|| content_types.join(","));
    let content_type = content_type.as_deref();
    let (Some(method), Some(path)) = (method.as_deref(), path.as_deref()) else {
        return fail(host, context_id, "request has no :method or :path", hold);
    };
    let Ok(mut guard) = guard.try_borrow_mut() else {
        return fail(host, context_id, "guard state is busy", hold);
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
                ("content-type", "application/json".to_owned()),
                ("docker-distribution-api-version", "registry/2.0".to_owned()),
                // Tells operators (and the e2e corpus replay) the reply came from the filter.
                ("x-registry-guard", "denied".to_owned()),
            ];
            if let Some(w) = d.www_authenticate.as_deref() {
                headers.push(("www-authenticate", w.to_owned()));
            }
            let reply = LocalReply { status: d.status, headers, body: d.body() };
            return match reply_or_hold(host, reply, hold) {
                Ok(()) if d.rule.is_some() => Outcome::DeniedByRule,
                Ok(()) => Outcome::Denied,
                Err(e) => {
                    log::error!("[{context_id}] cannot send local reply: {e}; Envoy's backstop refuses the request");
                    Outcome::Unanswered
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
    // The positive decision Envoy's route requires before forwarding (core `DECISION_HEADER`).
    if let Err(e) = host.set_request_header(DECISION_HEADER, DECISION_ALLOW) {
        return fail(host, context_id, &format!("cannot mark the request as allowed: {e}"), hold);
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
        guard.and_then(|g| g.try_borrow().ok()?.config.fault_injection.as_ref().and_then(|f| f.trap_on_header.clone()));
    if let Some(h) = header {
        if matches!(host.request_header(&h), Ok(Some(_))) {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
    }
}

/// Fail closed: 503 with an OCI error body (sent now, or held until the body has been read).
/// If even that reply cannot be sent, the request goes on unmarked and Envoy's backstop route
/// refuses it (never a pause with nothing sent, which would hang the client until a timeout).
fn fail(host: &mut impl Host, context_id: u32, why: &str, hold: Option<&mut Option<LocalReply>>) -> Outcome {
    log::error!("[{context_id}] registry-guard internal error, refusing request: {why}");
    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"registry-guard cannot decide this request; refused","detail":null}]}"#;
    let reply = LocalReply {
        status: 503,
        headers: vec![("content-type", "application/json".to_owned())],
        body: body.to_owned(),
    };
    match reply_or_hold(host, reply, hold) {
        Ok(()) => Outcome::Failed,
        Err(e) => {
            log::error!("[{context_id}] cannot send local reply: {e}; Envoy's backstop refuses the request");
            Outcome::Unanswered
        }
    }
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
