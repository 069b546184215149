//! The root (VM) context: one per plugin configuration in each VM. Reads and compiles the
//! configuration ([`GuardRoot::configure`]), defines the metrics, claims this VM's slot and
//! its per-endpoint gauges (a compare-and-swap on shared data), renews them on every tick,
//! and creates the HTTP context of its role ([`crate::registry`] or [`crate::events`]).
//! Every host call goes through [`Host`], so all of it runs natively against a fake host.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use registry_guard_core::decide::audit::{BundleAction, BundleChange};
use registry_guard_core::decide::config::{EventsConfig, PluginConfig, ServedEndpoint};
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::policy::bundle;
use registry_guard_core::policy::follow::{Answer, BundleSource, FetchRequest, Follower, RefusalKind, Settled, Step};

use crate::audit;
use crate::events::EventsHttp;
use crate::host::{dispatch_get, now_ms, random_u32, Host, MetricType, ProxyWasmHost};
use crate::metrics::{Metrics, FLUSH_PERIOD_MS};
use crate::registry::RegistryHttp;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared-data key (per `vm_id`, process-wide) of the number of registry-role VMs that have
/// claimed a worker slot (see [`Vm::slot`]).
pub const VM_SLOTS_KEY: &str = "registry_guard.vm_slots";

/// Attempts at the slot counter's compare-and-swap before giving up (no gauges then).
const SLOT_CAS_ATTEMPTS: usize = 64;

/// What a VM keeps across the plugin configurations (root contexts) it serves: a VM lives on
/// one thread and outlives its configurations.
#[derive(Debug, Default)]
pub struct Vm {
    /// This VM's index among the VMs of its `vm_id`, claimed once.
    slot: Cell<Option<u32>>,
    /// Configurations of this VM so far, and the newest one per endpoint: while Envoy swaps
    /// configurations, the old plugin's root context lives on for a while; only the newest
    /// beats for its endpoint.
    generation: Cell<u64>,
    newest: RefCell<Vec<(&'static str, u64)>>,
    /// The bundle revision this VM last activated per endpoint (any configuration): the
    /// `revision_old` of the next bundle audit record.
    active: RefCell<Vec<(&'static str, u64)>>,
}

thread_local! {
    static THIS_VM: Rc<Vm> = Rc::new(Vm::default());
}

impl Vm {
    /// The state of the VM running on this thread.
    pub fn this_vm() -> Rc<Vm> {
        THIS_VM.with(Rc::clone)
    }

    /// This VM's slot number, claimed on first use by a compare-and-swap on [`VM_SLOTS_KEY`]:
    /// `registry_guard.vm.<slot>.<endpoint>.revision` and `.heartbeat` are its own gauges, so
    /// `rgctl status` can tell when a worker does not enforce the revision the others report.
    /// `None` if the shared counter cannot be read or the swap keeps losing.
    pub fn slot(&self, host: &mut impl Host) -> Option<u32> {
        if let Some(slot) = self.slot.get() {
            return Some(slot);
        }
        for _ in 0..SLOT_CAS_ATTEMPTS {
            let (current, cas) = match host.get_shared(VM_SLOTS_KEY) {
                Ok((Some(bytes), cas)) => {
                    (std::str::from_utf8(&bytes).ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0), cas)
                }
                Ok((None, cas)) => (0, cas),
                Err(e) => {
                    log::warn!("registry-guard: cannot read the VM slot counter: {e}; no per-VM gauges");
                    return None;
                }
            };
            let next = current.saturating_add(1).to_string();
            if host.set_shared(VM_SLOTS_KEY, next.as_bytes(), cas).is_ok() {
                self.slot.set(Some(current));
                return Some(current);
            }
        }
        log::warn!(
            "registry-guard: cannot claim a VM slot ({SLOT_CAS_ATTEMPTS} lost compare-and-swaps); no per-VM gauges"
        );
        None
    }

    /// A new configuration for `endpoint`: from now on only it beats there.
    /// The bundle revision this VM last activated for `endpoint`, if any.
    fn active_revision(&self, endpoint: &str) -> Option<u64> {
        self.active.borrow().iter().find(|(e, _)| *e == endpoint).map(|(_, r)| *r)
    }

    /// Notes that this VM now enforces `revision` for `endpoint`; whether it changed.
    fn set_active_revision(&self, endpoint: &'static str, revision: u64) -> bool {
        let mut active = self.active.borrow_mut();
        match active.iter_mut().find(|(e, _)| *e == endpoint) {
            Some((_, r)) if *r == revision => false,
            Some((_, r)) => {
                *r = revision;
                true
            }
            None => {
                active.push((endpoint, revision));
                true
            }
        }
    }

    fn newest_for(&self, endpoint: &'static str) -> u64 {
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        let mut newest = self.newest.borrow_mut();
        newest.retain(|(e, _)| *e != endpoint);
        newest.push((endpoint, generation));
        generation
    }

    fn is_newest(&self, endpoint: &str, generation: u64) -> bool {
        self.newest.borrow().iter().any(|(e, g)| *e == endpoint && *g == generation)
    }
}

enum Role {
    Registry(Rc<RefCell<Guard>>),
    Events(EventsConfig),
}

/// Root context: the role's configuration, per-VM token cache, metric ids, worker gauges.
pub struct GuardRoot {
    vm: Rc<Vm>,
    role: Option<Role>,
    metrics: Option<Rc<Metrics>>,
    worker: Option<WorkerGauges>,
    /// Fetching newer bundles from the configured source (`bundle_source`).
    following: Option<Following>,
    /// Fetching the trusted token keys from the configured source (`keys_source`).
    keys: Option<crate::keys_follow::KeysFollowing>,
}

/// The HTTP context of a root's role (`Registry` with no guard when unconfigured).
pub enum HttpFilter {
    Registry(RegistryHttp),
    Events(EventsHttp),
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
    bundle_revision: Cell<u64>,
    endpoint: &'static str,
    generation: u64,
}

impl WorkerGauges {
    fn define(host: &mut impl Host, vm: &Vm, endpoint: &'static str, bundle_revision: u64) -> Option<WorkerGauges> {
        let slot = vm.slot(host)?;
        let gauge = |host: &mut _, what: &str| {
            let name = format!("registry_guard.vm.{slot}.{endpoint}.{what}");
            Host::define_metric(host, MetricType::Gauge, &name)
                .map_err(|e| log::warn!("registry-guard: cannot define the worker gauge `{name}`: {e}"))
                .ok()
        };
        let generation = vm.newest_for(endpoint);
        let w = WorkerGauges {
            revision: gauge(host, "revision")?,
            heartbeat: gauge(host, "heartbeat")?,
            serving_gauge: gauge(host, "serving")?,
            serving: Cell::new(false),
            bundle_revision: Cell::new(bundle_revision),
            endpoint,
            generation,
        };
        w.beat(host, vm);
        Some(w)
    }

    fn beat(&self, host: &mut impl Host, vm: &Vm) {
        if !vm.is_newest(self.endpoint, self.generation) {
            return;
        }
        let now = host.now_unix_seconds().ok().and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
        let _ = host.record(self.revision, self.bundle_revision.get());
        let _ = host.record(self.serving_gauge, u64::from(self.serving.get()));
        let _ = host.record(self.heartbeat, now);
    }
}

impl GuardRoot {
    /// A root context of `vm` (in the filter: [`Vm::this_vm`]).
    pub fn new(vm: Rc<Vm>) -> GuardRoot {
        GuardRoot { vm, role: None, metrics: None, worker: None, following: None, keys: None }
    }

    /// `on_configure`: reads and compiles the plugin configuration. On any error it logs
    /// the precise reason and returns `false`, and this root keeps what it had (Envoy keeps
    /// serving the previous plugin, or refuses to start).
    pub fn configure(&mut self, host: &mut impl Host) -> bool {
        let bytes = match host.plugin_configuration() {
            Ok(Some(b)) => b,
            Ok(None) => {
                log::error!("registry-guard: plugin configuration is empty; expected the filter configuration JSON");
                return false;
            }
            Err(e) => {
                log::error!("registry-guard: cannot read plugin configuration: {e}");
                return false;
            }
        };
        if self.metrics.is_none() {
            match Metrics::define(host) {
                Ok(m) => self.metrics = Some(Rc::new(m)),
                Err(e) => log::warn!("registry-guard: cannot define metrics: {e}"),
            }
            // Batched counters are flushed on this tick (see `Metrics::flush`).
            if let Err(e) = host.set_tick_period(Duration::from_millis(FLUSH_PERIOD_MS)) {
                log::warn!("registry-guard: cannot set the metrics tick: {e}");
            }
        }
        let config = match PluginConfig::from_json(&bytes) {
            Ok(PluginConfig::Events(events)) => {
                log::info!(
                    "registry-guard configured (events role): max envelope {} bytes, attribution keys {}",
                    events.max_envelope_bytes,
                    events.attribution.as_ref().map_or(0, |a| a.keys.len())
                );
                if events.attribution.is_none() {
                    log::warn!("registry-guard: no `attribution.key`: no event will be attributed");
                }
                for w in &events.warnings {
                    log::warn!("registry-guard: {w}");
                }
                self.role = Some(Role::Events(events));
                return true;
            }
            Ok(PluginConfig::Registry(config)) => config,
            Err(e) => {
                log::error!("registry-guard: rejected configuration: {e}");
                if let Some(m) = &self.metrics {
                    m.bundle_rejected(host);
                }
                // The configuration carries the bundle: its refusal is a bundle refusal too
                // (the endpoint, and so the revision that stays, cannot be told from it).
                let reason = e.to_string();
                audit::bundle(
                    host,
                    BundleChange {
                        action: BundleAction::Configure,
                        source: "configuration",
                        endpoint: None,
                        revision_old: None,
                        revision_new: None,
                        refused: Some(&reason),
                        event_id: None,
                    },
                );
                return false;
            }
        };
        #[cfg(feature = "fault-injection")]
        if config.fault_injection.as_ref().is_some_and(|f| f.refuse_configure_after_first)
            && !crate::fault::first_configure(host, &bytes)
        {
            log::error!("registry-guard: TEST ONLY fault injection: refusing a configuration accepted before");
            return false;
        }
        // Whether to accept depends on the configuration alone: Envoy validates it on the main
        // thread and then configures every worker with the same bytes, so a decision that
        // read anything else (shared data, time) could refuse on a worker what the main
        // thread accepted, and leave that worker without a filter (docs/failing-closed.md).
        // Rollback protection lives in the delivery tools and the token service.
        let mut config = config;
        let endpoint = endpoint_label(config.endpoint);
        // Keys from the keys source (`keys_source`), if named: may replace the inline boot keys
        // with a set this Envoy fetched before. Acceptance above never depends on it.
        if let Some(source) = config.keys_source.clone() {
            let slot = self.vm.slot(host);
            self.keys = Some(crate::keys_follow::KeysFollowing::start(host, slot, source, endpoint, &mut config));
        }
        let revision = config.policy.revision;
        let kids: Vec<&str> = config.verifier.keys.kids().collect();
        log::info!(
            "registry-guard configured: bundle revision {revision} ({} protection rules, {} deploy tokens), issuer={} service={} realm={} keys={:?} cache={} attribution={}",
            config.policy.rules.len(),
            config.policy.credentials.tokens().len(),
            config.verifier.issuer,
            config.challenge.service,
            config.challenge.realm,
            kids,
            config.cache_entries,
            if config.attribution.is_some() { "sealed" } else { "off (no `attribution.key`)" },
        );
        for w in &config.warnings {
            log::warn!("registry-guard: {w}");
        }
        if let Some(m) = &self.metrics {
            m.bundle_activated(host, revision);
        }
        self.worker = WorkerGauges::define(host, &self.vm, endpoint, revision);
        self.following = config.bundle_source.clone().map(|source| {
            log::info!(
                "registry-guard: following the bundle source {}{} ({})",
                source.cluster,
                source.oci.as_ref().map_or_else(
                    || source.path.clone(),
                    |a| format!(" (OCI artifact {}:{})", a.repository, a.reference)
                ),
                if source.wait_seconds > 0 {
                    format!("long polling, wait {} s", source.wait_seconds)
                } else {
                    format!("polling every {} s", source.poll_seconds)
                }
            );
            Following::new(host, source)
        });
        let guard = Rc::new(RefCell::new(Guard::new(*config)));
        let mut active = (revision, "configuration");
        if self.following.is_some() {
            // A bundle this Envoy fetched before (under an earlier configuration, or in
            // another worker) and newer than the configured one: this configuration starts
            // from it instead of going back to the configured (boot fallback) bundle.
            // Acceptance above never depends on it.
            if let Ok((Some(jws), _)) = host.get_shared(&fetched_key(endpoint)) {
                if let Ok(jws) = std::str::from_utf8(&jws) {
                    if let Settled::Activated { revision: r } = verify_and_activate(&guard, jws).settled {
                        log::info!("registry-guard: starting from bundle revision {r}, fetched earlier by this Envoy");
                        active = (r, "fetched_earlier");
                        if let Some(m) = &self.metrics {
                            m.bundle_activated(host, r);
                        }
                        if let Some(w) = &self.worker {
                            w.bundle_revision.set(r);
                        }
                    }
                }
            }
        }
        // One record when this VM's revision for the endpoint changes (not for a configuration
        // that leaves it as it was).
        let revision_old = self.vm.active_revision(endpoint);
        if self.vm.set_active_revision(endpoint, active.0) {
            audit::bundle(
                host,
                BundleChange {
                    action: BundleAction::Configure,
                    source: active.1,
                    endpoint: Some(endpoint),
                    revision_old,
                    revision_new: Some(active.0),
                    refused: None,
                    event_id: None,
                },
            );
        }
        self.role = Some(Role::Registry(guard));
        true
    }

    /// Fetches from the bundle source when a fetch is due, and keeps the guard's staleness
    /// in step with the follower's (called on every tick).
    fn follow(&self, host: &mut impl Host) {
        let (Some(f), Some(Role::Registry(guard))) = (&self.following, &self.role) else { return };
        let now_ms = now_ms(host);
        {
            let follower = f.follower.borrow();
            let stale = follower.stale(now_ms).then(|| {
                format!(
                    "no bundle from the source {} for {} s (max_staleness_seconds {}): refusing every request; last error: {}",
                    follower.source().cluster,
                    follower.seconds_since_success(now_ms),
                    follower.source().max_staleness_seconds.unwrap_or(0),
                    follower.last_error.as_deref().unwrap_or("none"),
                )
            });
            if let Ok(mut g) = guard.try_borrow_mut() {
                match (&g.stale, &stale) {
                    (None, Some(why)) => log::error!("registry-guard: policy stale: {why}"),
                    (Some(_), None) => log::warn!("registry-guard: policy current again: requests are decided"),
                    _ => {}
                }
                g.stale = stale;
            }
            f.gauges(host, &follower, now_ms, guard);
        }
        let request = f.follower.borrow_mut().due(now_ms);
        if let Some(request) = request {
            f.dispatch(host, &request, now_ms);
        }
    }

    /// `on_http_call_response`: the keys source or the bundle source answered (or the call
    /// failed).
    pub fn fetched(&self, host: &mut impl Host, token_id: u32, body_size: usize) {
        if let (Some(k), Some(Role::Registry(guard))) = (&self.keys, &self.role) {
            if k.fetched(host, token_id, body_size, guard) {
                return;
            }
        }
        let (Some(f), Some(Role::Registry(guard))) = (&self.following, &self.role) else { return };
        if f.in_flight.get() != Some(token_id) {
            return;
        }
        f.in_flight.set(None);
        let now_ms = now_ms(host);
        let rand = random_u32();
        let max_bytes = f.follower.borrow().read_limit();
        // Envoy delivers a failed call (reset, timeout, no healthy host) with no headers.
        let status =
            host.http_call_response_header(":status").ok().flatten().and_then(|s| s.trim().parse::<u16>().ok());
        let etag = host.http_call_response_header("etag").ok().flatten();
        let content_type = host.http_call_response_header("content-type").ok().flatten();
        let body = match status {
            Some(200) if body_size <= max_bytes => host.http_call_response_body(body_size).ok().flatten(),
            _ => None,
        };
        let answer = match status {
            None => Answer::Failed("the call failed (connection, timeout or no healthy upstream)".into()),
            Some(status) => Answer::Http {
                status,
                etag: etag.as_deref(),
                content_type: content_type.as_deref(),
                body_size,
                body: body.as_deref(),
            },
        };
        let step = f.follower.borrow_mut().answer(now_ms, rand, answer);
        match step {
            Step::NotModified => f.count(host, "not_modified", None),
            // OCI: the manifest passed its checks; its blob is the second half of the fetch.
            Step::Fetch(request) => f.dispatch(host, &request, now_ms),
            Step::Refused(reason) => {
                log::warn!("registry-guard: bundle source: artifact refused: {reason}; the active bundle stays");
                let kind = f.follower.borrow().last_refusal;
                f.count(host, "refused", kind);
                let (endpoint, active) = guard
                    .try_borrow()
                    .map(|g| (Some(endpoint_label(g.config.endpoint)), Some(g.config.policy.revision)))
                    .unwrap_or((None, None));
                let source = audit::source_label(f.follower.borrow().source());
                audit::bundle(
                    host,
                    BundleChange {
                        action: BundleAction::Follow,
                        source: &source,
                        endpoint,
                        revision_old: active,
                        revision_new: None,
                        refused: Some(&format!("artifact refused: {reason}")),
                        event_id: None,
                    },
                );
            }
            Step::Failed(reason) => {
                log::warn!("registry-guard: bundle source: {reason}; the active bundle stays");
                let kind = f.follower.borrow().last_refusal;
                f.count(host, "failed", kind);
            }
            Step::Verify(jws) => {
                let Activation { settled, old, offered } = verify_and_activate(guard, &jws);
                f.follower.borrow_mut().settle(now_ms, rand, &settled);
                let endpoint = guard.try_borrow().map(|g| endpoint_label(g.config.endpoint)).ok();
                let source = audit::source_label(f.follower.borrow().source());
                let change = BundleChange {
                    action: BundleAction::Follow,
                    source: &source,
                    endpoint,
                    revision_old: old,
                    revision_new: offered,
                    refused: None,
                    event_id: None,
                };
                match &settled {
                    Settled::Activated { revision } => {
                        log::info!("registry-guard: bundle revision {revision} fetched from the source and activated");
                        audit::bundle(host, change);
                        let endpoint = endpoint.unwrap_or("registry");
                        self.vm.set_active_revision(endpoint, *revision);
                        if let Err(e) = host.set_shared(&fetched_key(endpoint), jws.as_bytes(), None) {
                            log::warn!("registry-guard: cannot keep the fetched bundle for later configurations: {e}");
                        }
                        if let Some(m) = &self.metrics {
                            m.bundle_activated(host, *revision);
                        }
                        if let Some(w) = &self.worker {
                            w.bundle_revision.set(*revision);
                            w.beat(host, &self.vm);
                        }
                        f.count(host, "changed", None);
                    }
                    Settled::Unchanged => f.count(host, "not_modified", None),
                    Settled::Refused { kind, reason } => {
                        log::warn!("registry-guard: bundle from the source refused: {reason}; the active bundle stays");
                        audit::bundle(host, BundleChange { refused: Some(reason), ..change });
                        f.count(host, "refused", Some(*kind));
                    }
                }
            }
        }
    }

    /// `on_tick`: flushes batched counters, renews this VM's gauges and follows the bundle
    /// source.
    pub fn tick(&self, host: &mut impl Host) {
        if let Some(m) = &self.metrics {
            m.flush(host);
        }
        if let Some(w) = &self.worker {
            w.beat(host, &self.vm);
        }
        self.follow(host);
        if let (Some(k), Some(Role::Registry(guard))) = (&self.keys, &self.role) {
            k.tick(host, guard);
        }
    }

    /// `on_done` (a new configuration replaces this plugin): hands over pending counts.
    pub fn done(&self, host: &mut impl Host) {
        if let Some(m) = &self.metrics {
            m.flush(host);
        }
    }

    /// The HTTP context for a new request, by role; unconfigured, a registry context that
    /// refuses every request.
    pub fn http_context(&self, context_id: u32) -> HttpFilter {
        match &self.role {
            Some(Role::Events(config)) => {
                HttpFilter::Events(EventsHttp::new(context_id, config.clone(), self.metrics.clone()))
            }
            Some(Role::Registry(guard)) => {
                if let Some(w) = &self.worker {
                    w.serving.set(true);
                }
                HttpFilter::Registry(RegistryHttp::new(context_id, Some(guard.clone()), self.metrics.clone()))
            }
            None => HttpFilter::Registry(RegistryHttp::new(context_id, None, self.metrics.clone())),
        }
    }

    /// The metric ids (after the first configuration).
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_deref()
    }
}

impl Context for GuardRoot {
    fn on_done(&mut self) -> bool {
        self.done(&mut ProxyWasmHost);
        true
    }

    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        self.fetched(&mut ProxyWasmHost, token_id, body_size);
    }
}

/// Following the bundle source in this root: the pure follower, the call in flight, and the
/// metrics of fetches (`registry_guard.bundle_fetch.<result>`, rejections by reason
/// `registry_guard.bundle_fetch_rejected.<reason>`, and gauges of the followed revision and
/// the seconds since the last successful fetch).
struct Following {
    follower: RefCell<Follower>,
    in_flight: Cell<Option<u32>>,
    ids: Option<FollowMetrics>,
}

struct FollowMetrics {
    results: Vec<(&'static str, u32)>,
    rejected: Vec<(RefusalKind, u32)>,
    seconds_since_success: u32,
    stale: u32,
}

const FETCH_RESULTS: [&str; 4] = ["changed", "not_modified", "refused", "failed"];
const REFUSAL_KINDS: [RefusalKind; 8] = [
    RefusalKind::Signature,
    RefusalKind::Environment,
    RefusalKind::Revision,
    RefusalKind::Content,
    RefusalKind::Size,
    RefusalKind::Status,
    RefusalKind::Unreachable,
    RefusalKind::Artifact,
];

impl Following {
    fn new(host: &mut impl Host, source: BundleSource) -> Following {
        let now = now_ms(host);
        let ids = (|| -> Result<FollowMetrics, crate::host::HostError> {
            let mut results = Vec::new();
            for r in FETCH_RESULTS {
                results
                    .push((r, host.define_metric(MetricType::Counter, &format!("registry_guard.bundle_fetch.{r}"))?));
            }
            let mut rejected = Vec::new();
            for k in REFUSAL_KINDS {
                let name = format!("registry_guard.bundle_fetch_rejected.{}", k.label());
                rejected.push((k, host.define_metric(MetricType::Counter, &name)?));
            }
            Ok(FollowMetrics {
                results,
                rejected,
                seconds_since_success: host
                    .define_metric(MetricType::Gauge, "registry_guard.bundle_fetch.seconds_since_success")?,
                stale: host.define_metric(MetricType::Gauge, "registry_guard.bundle_fetch.stale")?,
            })
        })()
        .map_err(|e| log::warn!("registry-guard: cannot define the bundle fetch metrics: {e}"))
        .ok();
        Following { follower: RefCell::new(Follower::new(source, now)), in_flight: Cell::new(None), ids }
    }

    /// Dispatches a fetch the follower asked for; a failed dispatch is recorded as a failed
    /// fetch.
    fn dispatch(&self, host: &mut impl Host, request: &FetchRequest, now_ms: u64) {
        let cluster = self.follower.borrow().source().cluster.clone();
        match dispatch_get(host, &cluster, &request.path, &request.authority, &request.headers, request.timeout_ms) {
            Ok(token) => self.in_flight.set(Some(token)),
            Err(e) => {
                let mut follower = self.follower.borrow_mut();
                follower.dispatch_failed(now_ms, random_u32(), &format!("{e} (is `{cluster}` an Envoy cluster?)"));
                log::warn!(
                    "registry-guard: bundle source: {}",
                    follower.last_error.as_deref().unwrap_or("dispatch failed")
                );
                self.count(host, "failed", follower.last_refusal);
            }
        }
    }

    fn count(&self, host: &mut impl Host, result: &str, refusal: Option<RefusalKind>) {
        let Some(ids) = &self.ids else { return };
        if let Some((_, id)) = ids.results.iter().find(|(r, _)| *r == result) {
            let _ = host.increment(*id);
        }
        if let Some((_, id)) = refusal.and_then(|k| ids.rejected.iter().find(|(r, _)| *r == k)) {
            let _ = host.increment(*id);
        }
    }

    fn gauges(&self, host: &mut impl Host, follower: &Follower, now_ms: u64, guard: &RefCell<Guard>) {
        let Some(ids) = &self.ids else { return };
        let _ = host.record(ids.seconds_since_success, follower.seconds_since_success(now_ms));
        let stale = guard.try_borrow().map(|g| g.stale.is_some()).unwrap_or(false);
        let _ = host.record(ids.stale, u64::from(stale));
    }
}

/// What [`verify_and_activate`] settled, with the revisions its audit record names.
struct Activation {
    settled: Settled,
    /// The revision active before (`None`: the guard was busy).
    old: Option<u64>,
    /// The offered bundle's revision, once its signature was verified.
    offered: Option<u64>,
}

/// Verifies a fetched bundle with the configuration's operator keys and environment and,
/// if it is newer than the active one, activates it in this VM.
fn verify_and_activate(guard: &RefCell<Guard>, jws: &str) -> Activation {
    let Ok(mut g) = guard.try_borrow_mut() else {
        let settled =
            Settled::Refused { kind: RefusalKind::Content, reason: "the guard is busy (retried later)".into() };
        return Activation { settled, old: None, offered: None };
    };
    let active = g.config.policy.revision;
    let refused = |settled| Activation { settled, old: Some(active), offered: None };
    let Some(keys) = &g.config.bundle_keys else {
        return refused(Settled::Refused {
            kind: RefusalKind::Signature,
            reason: "no `bundle_keys` to verify with".into(),
        });
    };
    let policy = match bundle::verify_for(jws, keys, g.config.environment.as_deref()) {
        Ok(policy) => policy,
        Err(e) => {
            return refused(Settled::Refused {
                kind: RefusalKind::of_bundle_error(&e.path),
                reason: format!("{}: {}", e.path, e.reason),
            })
        }
    };
    let offered = Some(policy.revision);
    if policy.revision == active {
        return Activation { settled: Settled::Unchanged, old: Some(active), offered };
    }
    if policy.revision < active {
        let settled = Settled::Refused {
            kind: RefusalKind::Revision,
            reason: format!(
                "$.revision: revision {} is older than the active revision {active}: rollback refused",
                policy.revision
            ),
        };
        return Activation { settled, old: Some(active), offered };
    }
    let revision = policy.revision;
    g.activate(policy);
    Activation { settled: Settled::Activated { revision }, old: Some(active), offered }
}

fn endpoint_label(endpoint: ServedEndpoint) -> &'static str {
    match endpoint {
        ServedEndpoint::Registry => "registry",
        ServedEndpoint::DependencyProxy => "dependency_proxy",
    }
}

/// Shared-data key (process-wide) of the newest bundle fetched for an endpoint.
pub fn fetched_key(endpoint: &str) -> String {
    format!("registry_guard.fetched_bundle.{endpoint}")
}

impl RootContext for GuardRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        log::info!("registry-guard {VERSION} VM started");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.configure(&mut ProxyWasmHost)
    }

    fn on_tick(&mut self) {
        self.tick(&mut ProxyWasmHost);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(match self.http_context(context_id) {
            HttpFilter::Registry(http) => Box::new(http),
            HttpFilter::Events(http) => Box::new(http),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
