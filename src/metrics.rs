//! The filter's Envoy metrics (`wasmcustom.registry_guard.*` in `/stats`,
//! `wasmcustom_registry_guard_*` in `/stats/prometheus`): defined once per root context,
//! counters batched in the VM and handed to the host in bulk. Counters end in `_total`
//! (Prometheus' convention; Envoy renders names as they are, and `envoy/envoy.yaml`'s
//! `stats_tags` turn the kind, rule and VM parts into labels); the decision-time histogram
//! is in microseconds and sampled ([`DECISION_TIME_SAMPLE_EVERY`]). Uses only [`Host`].

use std::cell::RefCell;
use std::collections::HashMap;

use registry_guard_core::decide::decision::{Decision, DenyKind};
use registry_guard_core::decide::guard::Checked;

use crate::host::{Host, HostError, MetricType};

/// Per-rule counters are defined when a rule first decides something; at most this many
/// rules get their own counters (a bundle may hold 200 000), the rest count in
/// `registry_guard.rule_metrics_overflow`.
pub const MAX_RULE_METRICS: usize = 1024;

/// What happened to an events envelope (the events role, `crate::events`), as counted.
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

/// The filter's metric ids, and the counts not yet handed to the host.
#[derive(Debug)]
pub struct Metrics {
    allowed: u32,
    denied: u32,
    failed: u32,
    /// `registry_guard.denied.<kind>`, in [`DenyKind::ALL`] order.
    denied_by_kind: Vec<(DenyKind, u32)>,
    protection_denied: u32,
    protection_would_deny: u32,
    cache_hits: u32,
    cache_misses: u32,
    rule_overflow: u32,
    /// `registry_guard.rule.<id>.denied_total|would_deny_total`, defined on first use.
    by_rule: RefCell<HashMap<(String, bool), u32>>,
    bundle_revision: u32,
    bundle_rejected: u32,
    events_attributed: u32,
    events_unattributed: u32,
    envelopes_rewritten: u32,
    envelopes_oversize: u32,
    envelopes_malformed: u32,
    /// `registry_guard.decision_time_microseconds`, a histogram of sampled requests.
    decision_time: u32,
    /// Decided requests since the last sampled one.
    since_sample: std::cell::Cell<u32>,
    /// Counts not yet handed to the host, by metric id (see [`Metrics::flush`]).
    pending: RefCell<Pending>,
}

/// Counter increments kept in the VM and handed to Envoy in batches: a host call costs about
/// as much as the whole cached decision, and every request counts two or more.
#[derive(Debug, Default)]
struct Pending {
    counts: Vec<(u32, u64)>,
    total: u64,
}

/// Pending increments handed to the host at once when this many accumulate; the root
/// context also flushes every [`FLUSH_PERIOD_MS`], so a counter is at most that late.
pub const FLUSH_EVERY: u64 = 64;
pub const FLUSH_PERIOD_MS: u64 = 1000;

/// One decided request in this many is timed into `registry_guard.decision_time_microseconds`.
pub const DECISION_TIME_SAMPLE_EVERY: u32 = 16;

impl Metrics {
    pub fn define(host: &mut impl Host) -> Result<Metrics, HostError> {
        let mut define = |kind, name: &str| host.define_metric(kind, name);
        let mut denied_by_kind = Vec::new();
        for kind in DenyKind::ALL {
            denied_by_kind
                .push((kind, define(MetricType::Counter, &format!("registry_guard.denied_total.{}", kind.label()))?));
        }
        Ok(Metrics {
            allowed: define(MetricType::Counter, "registry_guard.requests_allowed_total")?,
            denied: define(MetricType::Counter, "registry_guard.requests_denied_total")?,
            failed: define(MetricType::Counter, "registry_guard.requests_failed_total")?,
            denied_by_kind,
            protection_denied: define(MetricType::Counter, "registry_guard.protection_denied_total")?,
            protection_would_deny: define(MetricType::Counter, "registry_guard.protection_would_deny_total")?,
            cache_hits: define(MetricType::Counter, "registry_guard.token_cache_hits_total")?,
            cache_misses: define(MetricType::Counter, "registry_guard.token_cache_misses_total")?,
            rule_overflow: define(MetricType::Counter, "registry_guard.rule_metrics_overflow_total")?,
            by_rule: RefCell::new(HashMap::new()),
            bundle_revision: define(MetricType::Gauge, "registry_guard.bundle_revision")?,
            bundle_rejected: define(MetricType::Counter, "registry_guard.bundle_rejected_total")?,
            events_attributed: define(MetricType::Counter, "registry_guard.events_attributed_total")?,
            events_unattributed: define(MetricType::Counter, "registry_guard.events_unattributed_total")?,
            envelopes_rewritten: define(MetricType::Counter, "registry_guard.envelopes_rewritten_total")?,
            envelopes_oversize: define(MetricType::Counter, "registry_guard.envelopes_oversize_total")?,
            envelopes_malformed: define(MetricType::Counter, "registry_guard.envelopes_malformed_total")?,
            decision_time: define(MetricType::Histogram, "registry_guard.decision_time_microseconds")?,
            since_sample: std::cell::Cell::new(0),
            pending: RefCell::new(Pending::default()),
        })
    }

    /// Whether to time this request: one in [`DECISION_TIME_SAMPLE_EVERY`] (the first of each
    /// run), as timing costs a second clock read and a histogram record, both host calls.
    pub fn sample(&self) -> bool {
        let n = self.since_sample.get();
        self.since_sample.set(if n + 1 >= DECISION_TIME_SAMPLE_EVERY { 0 } else { n + 1 });
        n == 0
    }

    /// Records one sampled request's time in the filter (headers read to decision applied).
    pub fn decision_time(&self, host: &mut impl Host, elapsed: std::time::Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let _ = host.record(self.decision_time, micros);
    }

    /// Counts `n` on counter `id`, handing the batch to the host when it is full.
    fn count(&self, host: &mut impl Host, id: u32, n: u64) {
        let full = {
            let Ok(mut p) = self.pending.try_borrow_mut() else {
                let _ = host.add(id, n);
                return;
            };
            match p.counts.iter_mut().find(|(i, _)| *i == id) {
                Some((_, c)) => *c += n,
                None => p.counts.push((id, n)),
            }
            p.total += 1;
            p.total >= FLUSH_EVERY
        };
        if full {
            self.flush(host);
        }
    }

    /// Hands every pending count to the host (on a full batch, and from the root's tick).
    pub fn flush(&self, host: &mut impl Host) {
        let Ok(mut p) = self.pending.try_borrow_mut() else { return };
        for (id, n) in p.counts.iter_mut() {
            if *n > 0 {
                let _ = host.add(*id, *n);
                *n = 0;
            }
        }
        p.total = 0;
    }

    /// Counts one decided request: allowed/denied, the denial's kind, the deciding rule
    /// (enforced or dry run) and the token cache.
    pub fn decided(&self, host: &mut impl Host, checked: &Checked) {
        match checked.cache_hit {
            Some(true) => {
                self.count(host, self.cache_hits, 1);
            }
            Some(false) => {
                self.count(host, self.cache_misses, 1);
            }
            None => {}
        }
        match &checked.decision {
            Decision::Allow { would_deny, .. } => {
                self.count(host, self.allowed, 1);
                if let Some((rule, _)) = would_deny {
                    self.count(host, self.protection_would_deny, 1);
                    self.rule(host, rule, false);
                }
            }
            Decision::Deny(d) => {
                self.count(host, self.denied, 1);
                if let Some((_, id)) = self.denied_by_kind.iter().find(|(k, _)| *k == d.kind) {
                    self.count(host, *id, 1);
                }
                if let Some(rule) = &d.rule {
                    self.count(host, self.protection_denied, 1);
                    self.rule(host, rule, true);
                }
            }
        }
    }

    fn rule(&self, host: &mut impl Host, rule: &str, enforced: bool) {
        let Ok(mut by_rule) = self.by_rule.try_borrow_mut() else { return };
        let key = (rule.to_owned(), enforced);
        let id = match by_rule.get(&key) {
            Some(id) => Some(*id),
            None if by_rule.len() < MAX_RULE_METRICS => {
                let name = format!(
                    "registry_guard.rule.{rule}.{}",
                    if enforced { "denied_total" } else { "would_deny_total" }
                );
                let id = host.define_metric(MetricType::Counter, &name).ok();
                if let Some(id) = id {
                    by_rule.insert(key, id);
                }
                id
            }
            None => None,
        };
        self.count(host, id.unwrap_or(self.rule_overflow), 1);
    }

    pub fn failed(&self, host: &mut impl Host) {
        let _ = host.increment(self.failed);
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
