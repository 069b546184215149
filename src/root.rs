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
use registry_guard_core::config::{EventsConfig, PluginConfig, ServedEndpoint};
use registry_guard_core::guard::Guard;

use crate::correlation::Correlation;
use crate::events::EventsHttp;
use crate::host::{Host, MetricType, ProxyWasmHost};
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

/// A random 48-bit prefix per VM for correlation addresses (WASI `random_get`; the host
/// clock as a fallback), so addresses from different worker VMs never collide.
fn vm_prefix(host: &mut impl Host) -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return u64::from_le_bytes(bytes);
    }
    let now = host.unix_time().map_or(0, |d| d.as_nanos() as u64);
    now.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}

enum Role {
    Registry(Rc<RefCell<Guard>>),
    Events(EventsConfig),
}

/// Root context: the role's configuration, per-VM token cache, metric ids, worker gauges.
pub struct GuardRoot {
    vm: Rc<Vm>,
    role: Option<Role>,
    correlation: Option<Rc<Correlation>>,
    metrics: Option<Rc<Metrics>>,
    worker: Option<WorkerGauges>,
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
    bundle_revision: u64,
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
            bundle_revision,
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
        let _ = host.record(self.revision, self.bundle_revision);
        let _ = host.record(self.serving_gauge, u64::from(self.serving.get()));
        let _ = host.record(self.heartbeat, now);
    }
}

impl GuardRoot {
    /// A root context of `vm` (in the filter: [`Vm::this_vm`]).
    pub fn new(vm: Rc<Vm>) -> GuardRoot {
        GuardRoot { vm, role: None, correlation: None, metrics: None, worker: None }
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
                    m.bundle_rejected(host);
                }
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
            m.bundle_activated(host, revision);
        }
        let endpoint = match config.endpoint {
            ServedEndpoint::Registry => "registry",
            ServedEndpoint::DependencyProxy => "dependency_proxy",
        };
        self.worker = WorkerGauges::define(host, &self.vm, endpoint, revision);
        let slots = config.correlation_slots;
        self.correlation = (slots > 0).then(|| Rc::new(Correlation::new(slots, vm_prefix(host))));
        self.role = Some(Role::Registry(Rc::new(RefCell::new(Guard::new(*config)))));
        true
    }

    /// `on_tick`: flushes batched counters and renews this VM's gauges.
    pub fn tick(&self, host: &mut impl Host) {
        if let Some(m) = &self.metrics {
            m.flush(host);
        }
        if let Some(w) = &self.worker {
            w.beat(host, &self.vm);
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
                HttpFilter::Registry(RegistryHttp::new(
                    context_id,
                    Some(guard.clone()),
                    self.correlation.clone(),
                    self.metrics.clone(),
                ))
            }
            None => HttpFilter::Registry(RegistryHttp::new(context_id, None, None, self.metrics.clone())),
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
