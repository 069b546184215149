//! registry-guard, the proxy-wasm filter: thin glue over `registry_guard_core`.
//!
//! The root context owns the compiled configuration and the token cache (one per VM); the
//! HTTP context reads the request headers, asks [`Guard::check`] and either continues or sends
//! the local reply the core decided. No policy logic lives here.

pub mod host;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use registry_guard_core::config::FilterConfig;
use registry_guard_core::decision::Decision;
use registry_guard_core::guard::Guard;

use crate::host::{Host, Metrics, ProxyWasmHost};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Shared-data key (per `vm_id`, process-wide, survives VM re-creation on reconfiguration)
/// holding the highest bundle revision activated: a configuration carrying an older bundle
/// is refused (rollback protection; Envoy then keeps the running configuration).
const HIGHEST_REVISION_KEY: &str = "registry_guard.highest_bundle_revision";

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

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GuardRoot::default()) });
}}

/// Root context: configuration, per-VM token cache, metric ids.
#[derive(Default)]
pub struct GuardRoot {
    guard: Option<Rc<RefCell<Guard>>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for GuardRoot {}

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
        if self.metrics.is_none() {
            self.metrics = Metrics::define().ok().map(Rc::new);
        }
        let mut host = ProxyWasmHost;
        let config = match FilterConfig::from_json(&bytes) {
            Ok(config) => config,
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
            "registry-guard configured: bundle revision {revision} ({} protection rules), issuer={} service={} realm={} keys={:?} cache={}",
            config.policy.rules.len(),
            config.verifier.issuer,
            config.challenge.service,
            config.challenge.realm,
            kids,
            config.cache_entries
        );
        if let Some(m) = &self.metrics {
            m.bundle_activated(&mut host, revision);
        }
        self.guard = Some(Rc::new(RefCell::new(Guard::new(config))));
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(GuardHttp { context_id, guard: self.guard.clone(), metrics: self.metrics.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
pub struct GuardHttp {
    context_id: u32,
    guard: Option<Rc<RefCell<Guard>>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for GuardHttp {}

impl HttpContext for GuardHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut host = ProxyWasmHost;
        let outcome = on_request_headers(&mut host, self.context_id, self.guard.as_deref());
        if let Some(m) = &self.metrics {
            m.count(&mut host, outcome);
        }
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

/// The request-headers step, over any [`Host`]: read, decide, reply.
pub fn on_request_headers(host: &mut impl Host, context_id: u32, guard: Option<&RefCell<Guard>>) -> Outcome {
    let Some(guard) = guard else {
        return fail(host, context_id, "filter is not configured");
    };
    let headers = match host.request_headers() {
        Ok(h) => h,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}")),
    };
    let now = match host.now_unix_seconds() {
        Ok(t) => t,
        Err(e) => return fail(host, context_id, &format!("cannot read host time: {e}")),
    };
    let mut method = None;
    let mut path = None;
    let mut content_type = None;
    let mut authorization: Vec<&str> = Vec::new();
    for (name, value) in &headers {
        match name.as_str() {
            ":method" => method = Some(value.as_str()),
            ":path" => path = Some(value.as_str()),
            "content-type" => content_type = Some(value.as_str()),
            "authorization" => authorization.push(value),
            _ => {}
        }
    }
    let (Some(method), Some(path)) = (method, path) else {
        return fail(host, context_id, "request has no :method or :path");
    };
    let Ok(mut guard) = guard.try_borrow_mut() else {
        return fail(host, context_id, "guard state is busy");
    };
    let checked = guard.check(method, path, content_type, &authorization, now);
    drop(guard);
    match checked.decision {
        Decision::Allow { would_deny: None, .. } => Outcome::Allowed,
        Decision::Allow { would_deny: Some((rule, message)), subject, .. } => {
            log::info!(
                "[{context_id}] would deny (dry run) {method} {} subject={subject} rule={rule} revision={}: {message}",
                path.split('?').next().unwrap_or_default(),
                checked.revision
            );
            Outcome::AllowedWouldDeny
        }
        Decision::Deny(d) => {
            log::info!(
                "[{context_id}] deny {} {method} {} subject={} revision={}: {}",
                d.status,
                path.split('?').next().unwrap_or_default(),
                checked.subject.as_deref().unwrap_or("-"),
                checked.revision,
                d.reason
            );
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
            match host.send_response(d.status, &headers, body.as_bytes()) {
                Ok(()) if d.rule.is_some() => Outcome::DeniedByRule,
                Ok(()) => Outcome::Denied,
                Err(e) => {
                    log::error!("[{context_id}] cannot send local reply: {e}");
                    Outcome::Failed
                }
            }
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
