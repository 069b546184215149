//! The **events** role (on the registry's notification path): buffers each envelope, has
//! core [`rewrite_envelope`] fill every event's actor from the sealed attribution the
//! registry role wrote into the request's user agent (any Envoy of the fleet holding the
//! attribution key can do it: no shared state), and forwards it (Envoy's buffer filter after this one recomputes
//! `Content-Length`). Anything unexpected forwards the envelope unchanged: events are never
//! dropped here.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use registry_guard_core::decide::config::EventsConfig;
use registry_guard_core::events::{rewrite_envelope, Opener};

use crate::host::{Host, ProxyWasmHost};
pub use crate::metrics::EnvelopeOutcome;
use crate::metrics::Metrics;

/// One notification envelope from the registry.
pub struct EventsHttp {
    context_id: u32,
    config: EventsConfig,
    metrics: Option<Rc<Metrics>>,
    /// Forward unmodified (too large, or Content-Length could not be removed).
    passthrough: bool,
}

impl Context for EventsHttp {}

impl HttpContext for EventsHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.request_headers(&mut ProxyWasmHost, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_body(&mut ProxyWasmHost, body_size, end_of_stream)
    }
}

impl EventsHttp {
    pub fn new(context_id: u32, config: EventsConfig, metrics: Option<Rc<Metrics>>) -> EventsHttp {
        EventsHttp { context_id, config, metrics, passthrough: false }
    }

    /// The request headers, over any [`Host`].
    pub fn request_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Action {
        if end_of_stream {
            return Action::Continue;
        }
        let length = host.request_header("content-length").ok().flatten().and_then(|v| v.parse::<usize>().ok());
        if length.is_some_and(|l| l > self.config.max_envelope_bytes) {
            self.pass_oversize(host, length.unwrap_or_default());
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

    /// A request body callback, over any [`Host`]: buffered until its end, then rewritten.
    pub fn request_body(&mut self, host: &mut impl Host, body_size: usize, end_of_stream: bool) -> Action {
        if self.passthrough {
            return Action::Continue;
        }
        if body_size > self.config.max_envelope_bytes {
            self.pass_oversize(host, body_size);
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let outcome = rewrite_request_body(host, self.context_id, body_size, &self.config);
        if let Some(m) = &self.metrics {
            m.envelope(host, outcome);
        }
        Action::Continue
    }

    fn pass_oversize(&mut self, host: &mut impl Host, size: usize) {
        self.passthrough = true;
        log::warn!(
            "[{}] events envelope of {size} bytes exceeds {} bytes; forwarded unmodified",
            self.context_id,
            self.config.max_envelope_bytes
        );
        if let Some(m) = &self.metrics {
            m.envelope(host, EnvelopeOutcome::Oversize);
        }
    }
}

/// Rewrites the buffered envelope in place; anything unexpected forwards it unchanged.
pub fn rewrite_request_body(
    host: &mut impl Host,
    context_id: u32,
    body_size: usize,
    config: &EventsConfig,
) -> EnvelopeOutcome {
    let body = match host.request_body(body_size) {
        Ok(b) => b,
        Err(e) => {
            log::error!("[{context_id}] cannot read events envelope: {e}; forwarded unchanged");
            return EnvelopeOutcome::Malformed;
        }
    };
    let now = match host.now_unix_seconds() {
        Ok(t) => t,
        Err(e) => {
            log::error!("[{context_id}] cannot read host time: {e}; events envelope forwarded unchanged");
            return EnvelopeOutcome::Malformed;
        }
    };
    let (keys, max_delay) = match &config.attribution {
        Some(a) => (a.keys.as_slice(), i64::from(a.max_delay_seconds)),
        None => (&[][..], 0),
    };
    let (rewritten, stats) = match rewrite_envelope(&body, &Opener { keys, now, max_delay }) {
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
            "[{context_id}] events envelope: {} of {} events could not be attributed with certainty (first: {:?}); actor left unchanged",
            stats.unattributed,
            stats.events,
            stats.first_reason
        );
    }
    EnvelopeOutcome::Rewritten { attributed: stats.attributed, unattributed: stats.unattributed }
}
