//! Following a keys source (`keys_source`: a JWKS URL behind an Envoy cluster, normally the
//! token service's `/jwks`) in a registry-role root context: on the tick a conditional fetch
//! with `dispatch_http_call` when one is due ([`KeysFollower`] decides), and on the answer a
//! swap of the guard's trusted keys when the set changed — which empties the token cache, so
//! a token signed by a removed key stops passing at once. A refused or failed fetch keeps
//! the keys in force (last known good); an empty set is never taken.
//!
//! Every worker VM fetches for itself (like the bundle follower). A set taken is kept in
//! shared data (`registry_guard.fetched_jwks.<endpoint>`), so a later configuration of this
//! Envoy (and a worker configured later) starts from it instead of the inline boot keys.
//!
//! Metrics: `registry_guard.keys_fetch.<changed|not_modified|refused|failed>`, rejections by
//! reason `registry_guard.keys_fetch_rejected.<reason>`, gauges `registry_guard.keys.count`,
//! `registry_guard.keys_fetch.seconds_since_success` (since the start until the first good
//! answer) and this VM's `registry_guard.vm.<slot>.<endpoint>.keys` (its key count).

use std::cell::{Cell, RefCell};

use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::token::keys_source::{
    candidate, KeysAnswer, KeysFollower, KeysRefusal, KeysSource, KeysStep, KEYS_REFUSALS,
};

use crate::host::{dispatch_get, now_ms, random_u32, Host, MetricType};

/// Shared-data key (process-wide) of the newest JWKS taken from the keys source.
pub fn fetched_jwks_key(endpoint: &str) -> String {
    format!("registry_guard.fetched_jwks.{endpoint}")
}

const RESULTS: [&str; 4] = ["changed", "not_modified", "refused", "failed"];

struct Ids {
    results: Vec<(&'static str, u32)>,
    rejected: Vec<(KeysRefusal, u32)>,
    count: u32,
    seconds_since_success: u32,
    vm_keys: Option<u32>,
}

/// The keys source of one root context.
pub struct KeysFollowing {
    follower: RefCell<KeysFollower>,
    in_flight: Cell<Option<u32>>,
    endpoint: &'static str,
    started_ms: u64,
    ids: Option<Ids>,
}

impl KeysFollowing {
    /// Starts following `source` for `config` (not yet a guard); `slot` is this VM's worker
    /// slot (for its per-VM gauge). If this Envoy took a key set from the source before,
    /// `config` starts from it instead of its inline keys.
    pub fn start(
        host: &mut impl Host,
        slot: Option<u32>,
        source: KeysSource,
        endpoint: &'static str,
        config: &mut FilterConfig,
    ) -> KeysFollowing {
        log::info!(
            "registry-guard: trusted keys from the keys source {}{} (every {} s); {} inline boot key(s)",
            source.cluster,
            source.path,
            source.refresh_seconds,
            config.verifier.keys.len()
        );
        if let Ok((Some(jwks), _)) = host.get_shared(&fetched_jwks_key(endpoint)) {
            match candidate(&jwks, source.max_keys) {
                Ok(keys) => {
                    log::info!(
                        "registry-guard: starting from the {} key(s) this Envoy took from the keys source before: {:?}",
                        keys.len(),
                        keys.kids().collect::<Vec<_>>()
                    );
                    config.verifier.keys = keys;
                }
                Err((_, reason)) => log::warn!("registry-guard: the keys kept from the source are unusable: {reason}"),
            }
        }
        let now = now_ms(host);
        let follower = KeysFollower::new(source, &config.verifier.keys, now);
        let ids = define(host, slot, endpoint)
            .map_err(|e| log::warn!("registry-guard: cannot define the keys fetch metrics: {e}"))
            .ok();
        let f = KeysFollowing {
            follower: RefCell::new(follower),
            in_flight: Cell::new(None),
            endpoint,
            started_ms: now,
            ids,
        };
        f.gauges(host, config.verifier.keys.len());
        f
    }

    /// On the tick: gauges, and a fetch when one is due.
    pub fn tick(&self, host: &mut impl Host, guard: &RefCell<Guard>) {
        if let Ok(g) = guard.try_borrow() {
            self.gauges(host, g.config.verifier.keys.len());
        }
        let now = now_ms(host);
        let Some(request) = self.follower.borrow_mut().due(now) else { return };
        let cluster = self.follower.borrow().source().cluster.clone();
        match dispatch_get(host, &cluster, &request.path, &request.authority, &request.headers, request.timeout_ms) {
            Ok(token) => self.in_flight.set(Some(token)),
            Err(e) => {
                log::warn!(
                    "registry-guard: keys source: cannot dispatch the fetch: {e} (is `{cluster}` an Envoy cluster?)"
                );
                let answer = KeysAnswer { status: None, etag: None, body_size: 0, body: None };
                let step = self.follower.borrow_mut().answer(now, random_u32(), answer);
                self.settle(host, guard, step);
            }
        }
    }

    /// `on_http_call_response`: `true` if the call was this follower's.
    pub fn fetched(&self, host: &mut impl Host, token_id: u32, body_size: usize, guard: &RefCell<Guard>) -> bool {
        if self.in_flight.get() != Some(token_id) {
            return false;
        }
        self.in_flight.set(None);
        let max_bytes = self.follower.borrow().source().max_bytes;
        // Envoy delivers a failed call (reset, timeout, no healthy host) with no headers.
        let status =
            host.http_call_response_header(":status").ok().flatten().and_then(|s| s.trim().parse::<u16>().ok());
        let etag = host.http_call_response_header("etag").ok().flatten();
        let body = match status {
            Some(200) if body_size <= max_bytes => host.http_call_response_body(body_size).ok().flatten(),
            _ => None,
        };
        let answer = KeysAnswer { status, etag: etag.as_deref(), body_size, body: body.as_deref() };
        let step = self.follower.borrow_mut().answer(now_ms(host), random_u32(), answer);
        self.settle(host, guard, step);
        true
    }

    fn settle(&self, host: &mut impl Host, guard: &RefCell<Guard>, step: KeysStep) {
        match step {
            KeysStep::Unchanged => self.count(host, "not_modified", None),
            KeysStep::Refused { kind, reason } => {
                log::warn!("registry-guard: keys source {}: {reason}", self.follower.borrow().source().cluster);
                let result =
                    if matches!(kind, KeysRefusal::Unreachable | KeysRefusal::Status) { "failed" } else { "refused" };
                self.count(host, result, Some(kind));
            }
            KeysStep::Swap { keys, jwks } => {
                let Ok(mut g) = guard.try_borrow_mut() else {
                    // Not reachable in a single-threaded VM; the next fetch swaps.
                    log::warn!("registry-guard: keys source: the guard is busy; the keys swap on the next fetch");
                    self.follower.borrow_mut().forget();
                    return;
                };
                let kids: Vec<String> = keys.kids().map(str::to_owned).collect();
                let before: Vec<String> = g.config.verifier.keys.kids().map(str::to_owned).collect();
                let count = keys.len();
                g.replace_keys(keys);
                drop(g);
                log::info!("registry-guard: trusted keys from the keys source: {kids:?} (were {before:?})");
                if let Err(e) = host.set_shared(&fetched_jwks_key(self.endpoint), &jwks, None) {
                    log::warn!("registry-guard: cannot keep the fetched keys for later configurations: {e}");
                }
                self.count(host, "changed", None);
                self.gauges(host, count);
            }
        }
    }

    fn count(&self, host: &mut impl Host, result: &str, refusal: Option<KeysRefusal>) {
        let Some(ids) = &self.ids else { return };
        if let Some((_, id)) = ids.results.iter().find(|(r, _)| *r == result) {
            let _ = host.increment(*id);
        }
        if let Some((_, id)) = refusal.and_then(|k| ids.rejected.iter().find(|(r, _)| *r == k)) {
            let _ = host.increment(*id);
        }
    }

    fn gauges(&self, host: &mut impl Host, count: usize) {
        let Some(ids) = &self.ids else { return };
        let now = now_ms(host);
        let since =
            self.follower.borrow().seconds_since_success(now).unwrap_or(now.saturating_sub(self.started_ms) / 1000);
        let _ = host.record(ids.count, count as u64);
        let _ = host.record(ids.seconds_since_success, since);
        if let Some(id) = ids.vm_keys {
            let _ = host.record(id, count as u64);
        }
    }
}

fn define(host: &mut impl Host, slot: Option<u32>, endpoint: &str) -> Result<Ids, crate::host::HostError> {
    let mut results = Vec::new();
    for r in RESULTS {
        results.push((r, host.define_metric(MetricType::Counter, &format!("registry_guard.keys_fetch.{r}"))?));
    }
    let mut rejected = Vec::new();
    for k in KEYS_REFUSALS {
        let name = format!("registry_guard.keys_fetch_rejected.{}", k.label());
        rejected.push((k, host.define_metric(MetricType::Counter, &name)?));
    }
    let vm_keys = match slot {
        Some(slot) => {
            Some(host.define_metric(MetricType::Gauge, &format!("registry_guard.vm.{slot}.{endpoint}.keys"))?)
        }
        None => None,
    };
    Ok(Ids {
        results,
        rejected,
        count: host.define_metric(MetricType::Gauge, "registry_guard.keys.count")?,
        seconds_since_success: host
            .define_metric(MetricType::Gauge, "registry_guard.keys_fetch.seconds_since_success")?,
        vm_keys,
    })
}
