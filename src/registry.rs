//! The **registry** role: the HTTP filter in front of the registry (and the dependency
//! proxy). Reads the request headers, asks core [`Guard::check`], and either marks the
//! request allowed (`x-registry-guard-decision: allow`, which Envoy's route requires) —
//! tagging it for its events ([`tag_for_events`]) — or refuses it with the local reply the
//! core decided. A refusal of a request with a body is held until the body has
//! been read ([`DeniedBody`]).
//!
//! **Failing closed.** An internal error is a 503. A refusal whose local reply cannot be
//! sent goes on at once (`Action::Continue`) *without* the allow header, so Envoy's backstop
//! route refuses it (docs/failing-closed.md) — never a pause with nothing sent, which would
//! hang the client until the route timeout.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use registry_guard_core::decide::audit::{self, RequestInfo};
use registry_guard_core::decide::config::{ClientAddress, DECISION_ALLOW, DECISION_HEADER};
use registry_guard_core::decide::decision::Decision;
use registry_guard_core::decide::guard::Checked;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::events::{
    seal, user_agent_after, AttributionKey, AttributionRef, RequestFields, UserAgentPrefix, NONCE_LEN,
};

use crate::host::{Host, HostError, ProxyWasmHost};
use crate::metrics::Metrics;

/// One registry request.
pub struct RegistryHttp {
    context_id: u32,
    guard: Option<Rc<RefCell<Guard>>>,
    metrics: Option<Rc<Metrics>>,
    /// A refused request whose body is still arriving: its reply waits for the body's end.
    denied_body: Option<DeniedBody>,
}

impl Context for RegistryHttp {}

impl HttpContext for RegistryHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.request_headers(&mut ProxyWasmHost, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_body(&mut ProxyWasmHost, body_size, end_of_stream)
    }
}

impl RegistryHttp {
    /// `guard`: `None` when the filter is not configured (every request is refused).
    pub fn new(context_id: u32, guard: Option<Rc<RefCell<Guard>>>, metrics: Option<Rc<Metrics>>) -> RegistryHttp {
        RegistryHttp { context_id, guard, metrics, denied_body: None }
    }

    /// The request headers, over any [`Host`].
    pub fn request_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Action {
        #[cfg(feature = "fault-injection")]
        crate::fault::trap_if_injected(host, self.guard.as_deref());
        let outcome = if end_of_stream {
            on_request_headers(host, self.context_id, self.guard.as_deref(), self.metrics.as_deref())
        } else {
            // A body follows: a refusal is held until the body has been read (and dropped),
            // so the client is not cut off while still sending it (see `DeniedBody`).
            let cap = self
                .guard
                .as_deref()
                .and_then(|g| g.try_borrow().ok().map(|g| g.config.denied_body_drain_bytes))
                .unwrap_or(DEFAULT_DENIED_BODY_DRAIN_BYTES);
            let (outcome, held) =
                on_request_headers_before_body(host, self.context_id, self.guard.as_deref(), self.metrics.as_deref());
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

    /// A request body callback, over any [`Host`]: drains the body of a held refusal.
    pub fn request_body(&mut self, host: &mut impl Host, body_size: usize, end_of_stream: bool) -> Action {
        let Some(held) = self.denied_body.as_mut() else {
            return Action::Continue;
        };
        match held.on_body(host, self.context_id, body_size, end_of_stream) {
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

    /// Whether a refusal is held until the request body ends.
    pub fn holds_refusal(&self) -> bool {
        self.denied_body.is_some()
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
    fn send(&self, host: &mut impl Host, extra: &[(&'static str, &str)]) -> Result<(), HostError> {
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
/// tag the request for its events.
pub fn on_request_headers(
    host: &mut impl Host,
    context_id: u32,
    guard: Option<&RefCell<Guard>>,
    metrics: Option<&Metrics>,
) -> Outcome {
    let outcome = decide_request(host, context_id, guard, metrics, None);
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
    metrics: Option<&Metrics>,
) -> (Outcome, Option<LocalReply>) {
    let mut held = None;
    let outcome = decide_request(host, context_id, guard, metrics, Some(&mut held));
    if matches!(outcome, Outcome::Failed | Outcome::Unanswered) {
        if let Some(m) = metrics {
            m.failed(host);
        }
    }
    (outcome, held)
}

/// Sends `reply` now, or hands it to `hold` when the request body is still to come.
fn reply_or_hold(
    host: &mut impl Host,
    reply: LocalReply,
    hold: Option<&mut Option<LocalReply>>,
) -> Result<(), HostError> {
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
    metrics: Option<&Metrics>,
    hold: Option<&mut Option<LocalReply>>,
) -> Outcome {
    let Some(guard) = guard else {
        return fail(host, context_id, "filter is not configured", hold);
    };
    let started = match host.unix_time() {
        Ok(t) => t,
        Err(e) => return fail(host, context_id, &format!("cannot read host time: {e}"), hold),
    };
    let Ok(now) = i64::try_from(started.as_secs()) else {
        return fail(host, context_id, "host time out of range", hold);
    };
    // One decided request in `DECISION_TIME_SAMPLE_EVERY` is timed (`Metrics::sample`).
    let timed = metrics.filter(|m| m.sample()).map(|m| (m, started));
    let headers = match host.request_headers() {
        Ok(h) => h,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}"), hold),
    };
    let pairs = match headers.pairs() {
        Ok(p) => p,
        Err(e) => return fail(host, context_id, &format!("cannot read request headers: {e}"), hold),
    };
    // Values are bytes (obs-text is legal in HTTP); as text, invalid UTF-8 becomes U+FFFD,
    // which no route, token or media type accepts. `from_utf8` first: its ASCII fast path is
    // several times cheaper than `from_utf8_lossy`'s chunk iterator on the 1 kB token
    // (issue 20: callgrind of the cached path).
    fn text(v: &[u8]) -> Cow<'_, str> {
        match std::str::from_utf8(v) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(v),
        }
    }
    let mut method = None;
    let mut path = None;
    let mut content_types: Vec<Cow<str>> = Vec::new();
    let mut request_id = None;
    let mut authorization: Vec<Cow<str>> = Vec::new();
    let mut forwarded_for = None;
    let mut forwarded_for_headers = 0usize;
    let mut client_user_agent: Option<&[u8]> = None;
    let mut traceparent = None;
    for (name, value) in pairs {
        match name {
            b":method" => method = Some(text(value)),
            b":path" => path = Some(text(value)),
            b"content-type" => content_types.push(text(value)),
            b"x-request-id" => request_id = Some(text(value)),
            b"authorization" => authorization.push(text(value)),
            b"x-forwarded-for" => {
                forwarded_for = Some(value);
                forwarded_for_headers += 1;
            }
            b"traceparent" => traceparent = Some(text(value)),
            // The first, as the registry reads it (Go's `Header.Get`).
            b"user-agent" if client_user_agent.is_none() => client_user_agent = Some(value),
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
    let key = guard.config.attribution.as_ref().and_then(|a| a.sealing_key()).cloned();
    drop(guard);
    if let Some(m) = metrics {
        m.decided(host, &checked);
    }
    // The downstream peer (`source.address`), read at most once and only when a request needs
    // it: for its audit record, or for its events when not taken from X-Forwarded-For.
    let mut peer: Option<Option<String>> = None;
    let mut peer_address = |host: &mut _| -> Option<String> {
        peer.get_or_insert_with(|| Host::client_address(host).ok().flatten()).clone()
    };
    if audit::is_audited(&checked, method) {
        // One JSON record per denial, dry-run would-deny or allowed write (never a token); see
        // core `audit`.
        let client = peer_address(host);
        let event_id = crate::audit::event_id();
        let info = RequestInfo {
            method,
            path,
            request_id,
            client: client.as_deref(),
            traceparent: traceparent.as_deref(),
            event_id: event_id.as_deref(),
        };
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
            let outcome = match reply_or_hold(host, reply, hold) {
                Ok(()) if d.rule.is_some() => Outcome::DeniedByRule,
                Ok(()) => Outcome::Denied,
                Err(e) => {
                    log::error!("[{context_id}] cannot send local reply: {e}; Envoy's backstop refuses the request");
                    Outcome::Unanswered
                }
            };
            record_decision_time(host, timed);
            return outcome;
        }
    };
    // Tag the forwarded request so any Envoy's events role can attribute its events (core
    // `events`); the client's own User-Agent is always replaced.
    let client = match (client_from, forwarded_for.and_then(last_forwarded_for)) {
        (ClientAddress::XForwardedFor, Some(last)) => Some(last),
        _ => peer_address(host),
    };
    let sealed = sealed_attribution(&checked, key.as_ref(), context_id);
    let fields = RequestFields { request_id, client_addr: client.as_deref(), user_agent: client_user_agent };
    let forwarded = match (forwarded_for_headers, forwarded_for) {
        (0, _) => Forwarded::Absent,
        (1, Some(value)) => Forwarded::One(value),
        _ => Forwarded::Several,
    };
    if let Err(e) = tag_for_events_with(host, sealed, &fields, forwarded) {
        // The registry must not see the client's own User-Agent or X-Forwarded-For.
        return fail(host, context_id, &format!("cannot tag the request for its events: {e}"), hold);
    }
    // The positive decision Envoy's route requires before forwarding (core `DECISION_HEADER`).
    if let Err(e) = host.set_request_header(DECISION_HEADER, DECISION_ALLOW) {
        return fail(host, context_id, &format!("cannot mark the request as allowed: {e}"), hold);
    }
    record_decision_time(host, timed);
    allowed
}

/// Records the time since `started` in the decision-time histogram, for a sampled request.
fn record_decision_time(host: &mut impl Host, timed: Option<(&Metrics, std::time::Duration)>) {
    let Some((metrics, started)) = timed else { return };
    if let Ok(now) = host.unix_time() {
        metrics.decision_time(host, now.saturating_sub(started));
    }
}

/// The token's sealed attribution, as the start of the user agent: sealed on the token's first
/// allowed request and kept with it in the token cache, so later requests do no crypto and
/// check no seal. `None` without a token, a key, or randomness (the request then reaches the
/// registry unattributable).
fn sealed_attribution<'c>(
    checked: &'c Checked,
    key: Option<&AttributionKey>,
    context_id: u32,
) -> Option<&'c UserAgentPrefix> {
    let (token, slot) = (checked.token.as_deref()?, checked.sealed.as_deref()?);
    if let Some(sealed) = slot.get() {
        return Some(sealed);
    }
    let key = key?;
    let mut nonce = [0u8; NONCE_LEN];
    // A random nonce from WASI `random_get`; never a clock-derived one.
    if let Err(e) = getrandom::getrandom(&mut nonce) {
        log::warn!(
            "[{context_id}] no randomness for the attribution seal ({e}); events of this request stay unattributed"
        );
        return None;
    }
    let who = AttributionRef {
        name: &token.subject,
        user_type: token.auth_type.as_deref().unwrap_or("unknown"),
        user: token.user.as_deref(),
        expires_at: token.expires_at,
    };
    match seal(key, &who, &nonce) {
        Ok(sealed) => Some(slot.get_or_init(|| UserAgentPrefix::new(Some(&sealed)))),
        Err(e) => {
            log::warn!("[{context_id}] cannot seal the attribution: {e}");
            None
        }
    }
}

/// Writes what the events role needs into the request towards the registry: `User-Agent`
/// (always replaced: marker, seal, request id, client address, the client's user agent
/// encoded) and `X-Forwarded-For` (the client's IP alone, as the registry logs and copies
/// it; removed when unknown, so a client-sent first entry never reaches the registry).
pub fn tag_for_events(
    host: &mut impl Host,
    sealed: Option<&UserAgentPrefix>,
    fields: &RequestFields<'_>,
) -> Result<(), HostError> {
    tag_for_events_with(host, sealed, fields, Forwarded::Several)
}

/// The request's `X-Forwarded-For` headers as the filter received them.
#[derive(Debug, Clone, Copy)]
enum Forwarded<'a> {
    Absent,
    One(&'a [u8]),
    /// Several headers, or not known.
    Several,
}

/// [`tag_for_events`], knowing the request's `X-Forwarded-For`: one header that already is
/// the client's IP alone (Envoy's own entry: the client sent none), or no header and no
/// address to write, is left as it is — a host call saved per request, the registry sees
/// the same headers.
fn tag_for_events_with(
    host: &mut impl Host,
    sealed: Option<&UserAgentPrefix>,
    fields: &RequestFields<'_>,
    forwarded: Forwarded<'_>,
) -> Result<(), HostError> {
    host.set_request_header("user-agent", &user_agent_after(sealed, fields))?;
    match (fields.client_addr.map(client_ip), forwarded) {
        (Some(ip), Forwarded::One(value)) if value == ip.as_bytes() => Ok(()),
        (Some(ip), _) => host.set_request_header("x-forwarded-for", ip),
        (None, Forwarded::Absent) => Ok(()),
        (None, _) => host.remove_request_header("x-forwarded-for"),
    }
}

/// The IP of `ip`, `ip:port`, or `[ipv6]:port`.
fn client_ip(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.split_once(':') {
        Some((ip, port)) if !port.contains(':') => ip,
        _ => addr,
    }
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
