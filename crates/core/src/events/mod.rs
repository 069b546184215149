//! Layer `events` (a leaf beside the stack): notification enrichment (seeds 000/001),
//! attributing the registry's webhook events to the principal whose request caused them, and
//! rewriting the events envelope. Uses only `support` (nothing, in fact); `decide` uses it
//! for the attribution key of the configuration and the seal cached with a token.
//!
//! **Stateless attribution.** A stock registry (distribution 2.8) copies two request fields
//! into each event it emits: `User-Agent` into `request.useragent` (verbatim) and the first
//! `X-Forwarded-For` entry into `request.addr` (when it parses as an IP address; else
//! `X-Real-Ip`, else the TCP peer); its `request.id` is random and `actor` empty. So
//! everything the events role needs travels in the `User-Agent` the registry role writes on
//! every request it forwards, **always replacing** what the client sent (a client's own
//! marker is neutralised — it is encoded as the original user agent):
//!
//! ```text
//! registry-guard/1 <sealed> <request id> <client address> <original user agent>
//! ```
//!
//! `<sealed>` is the principal — `{name, user_type, user JWT, token expiry}` — sealed with
//! XChaCha20-Poly1305 under the fleet's attribution key ([`AttributionKey`], random 24-byte
//! nonce, the marker as associated data), base64url; it is computed once per verified token
//! and cached with it, so the registry and its logs see no credential and nobody without the
//! key can forge one. The other fields are per request, written by the filter: the edge's
//! `X-Request-Id`, the client's address, the client's `User-Agent` (base64url, at most
//! [`MAX_ORIGINAL_USER_AGENT`] bytes). An absent field is `-`. No table, no ring: any Envoy
//! with the key can attribute any event ([`rewrite_envelope`]). An event whose user agent is
//! not a marker, or whose seal does not open (other key, tampered, expired past the allowed
//! delivery delay), keeps its actor and is counted unattributed, never misattributed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The first word of every user agent the registry role writes (also the seal's associated
/// data, so a seal cannot be carried into another format version).
pub const MARKER: &str = "registry-guard/1";

/// At most this many bytes of the client's `User-Agent` travel (and are restored); longer
/// ones are cut (the registry's header limit and its logs stay bounded).
pub const MAX_ORIGINAL_USER_AGENT: usize = 1024;

/// Length of an XChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 24;

/// A fleet-wide attribution key: 32 bytes, written as base64url (no padding) in the filter
/// configuration of both roles. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AttributionKey([u8; 32]);

impl std::fmt::Debug for AttributionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttributionKey(…)")
    }
}

impl AttributionKey {
    pub fn from_bytes(bytes: [u8; 32]) -> AttributionKey {
        AttributionKey(bytes)
    }

    /// Parses base64url (padding tolerated) of exactly 32 bytes.
    pub fn from_base64url(text: &str) -> Result<AttributionKey, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| "is not base64url (`A-Z a-z 0-9 - _`)".to_owned())?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|b: Vec<u8>| format!("decodes to {} bytes, expected 32", b.len()))?;
        Ok(AttributionKey(bytes))
    }

    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

/// Who made a request, as sealed into its user agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// `sub` of the token: username or deploy token username.
    #[serde(rename = "n")]
    pub name: String,
    /// `auth_type` of the token (`password`, `pat`, `deploy_token`, `job_token`).
    #[serde(rename = "t")]
    pub user_type: String,
    /// The signed `user` JWT from the token, if it had one.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `exp` of the token (Unix seconds): the events role accepts the seal up to its
    /// configured delivery delay after it.
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// [`Attribution`] borrowed from a verified token, for sealing.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttributionRef<'a> {
    #[serde(rename = "n")]
    pub name: &'a str,
    #[serde(rename = "t")]
    pub user_type: &'a str,
    #[serde(rename = "u", skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// Why an event could not be attributed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unattributed {
    /// `request.useragent` is not a registry-guard marker (the request did not pass the
    /// filter, or the event has no request).
    NoMarker,
    /// The marker carries no seal (an anonymous request, or no key configured).
    NotSealed,
    /// The seal is not base64url, too short, or does not open under any configured key
    /// (tampered, or sealed under another key).
    BadSeal,
    /// The token expired longer ago than the allowed delivery delay.
    Expired,
}

/// Seals `who` under `key` with `nonce` (random, never reused: 24 bytes from the host's
/// random source): base64url of `nonce ‖ ciphertext`.
pub fn seal(key: &AttributionKey, who: &AttributionRef<'_>, nonce: &[u8; NONCE_LEN]) -> Result<String, String> {
    let plain = serde_json::to_vec(who).map_err(|e| e.to_string())?;
    let cipher = XChaCha20Poly1305::new(&key.0.into());
    let sealed = cipher
        .encrypt(&XNonce::from(*nonce), Payload { msg: &plain, aad: MARKER.as_bytes() })
        .map_err(|_| "sealing failed".to_owned())?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(URL_SAFE_NO_PAD.encode(out))
}

/// Opens a seal with the first of `keys` that authenticates it; refuses it when `now` is
/// more than `max_delay` seconds past the token's expiry.
pub fn open(keys: &[AttributionKey], sealed: &str, now: i64, max_delay: i64) -> Result<Attribution, Unattributed> {
    let bytes = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| Unattributed::BadSeal)?;
    let (nonce, body) = bytes.split_at_checked(NONCE_LEN).ok_or(Unattributed::BadSeal)?;
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Unattributed::BadSeal)?;
    let nonce = XNonce::from(nonce);
    let plain = keys
        .iter()
        .find_map(|k| {
            XChaCha20Poly1305::new(&k.0.into()).decrypt(&nonce, Payload { msg: body, aad: MARKER.as_bytes() }).ok()
        })
        .ok_or(Unattributed::BadSeal)?;
    let who: Attribution = serde_json::from_slice(&plain).map_err(|_| Unattributed::BadSeal)?;
    if now > who.expires_at.saturating_add(max_delay) {
        return Err(Unattributed::Expired);
    }
    Ok(who)
}

/// The per-request fields of a marker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFields<'a> {
    /// The edge's `X-Request-Id` (already checked by `support::text::request_id`; it has no
    /// space).
    pub request_id: Option<&'a str>,
    /// The client's address (`ip` or `ip:port`; no space).
    pub client_addr: Option<&'a str>,
    /// The client's `User-Agent` bytes (cut to [`MAX_ORIGINAL_USER_AGENT`]).
    pub user_agent: Option<&'a [u8]>,
}

fn field_ok(v: &str) -> bool {
    // ASCII whitespace and controls are exactly the bytes up to 0x20, and DEL.
    !v.is_empty() && v != "-" && !v.bytes().any(|b| b <= b' ' || b == 0x7f)
}

/// The user agent the registry role writes: [`MARKER`], the seal (or `-`), then the
/// per-request fields. One allocation.
pub fn user_agent(sealed: Option<&str>, fields: &RequestFields<'_>) -> String {
    user_agent_after(Some(&UserAgentPrefix::new(sealed)), fields)
}

/// The start of a user agent, [`MARKER`] and the seal (or `-`), checked once: the filter keeps
/// it with the cached token, so a request copies it instead of re-checking ~650 bytes of seal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAgentPrefix(Box<str>);

/// The prefix of a request with no seal (no token, or no attribution key).
pub const UNSEALED_PREFIX: &str = "registry-guard/1 -";

impl UserAgentPrefix {
    pub fn new(sealed: Option<&str>) -> UserAgentPrefix {
        let sealed = sealed.filter(|v| field_ok(v)).unwrap_or("-");
        let mut out = String::with_capacity(MARKER.len() + 1 + sealed.len());
        out.push_str(MARKER);
        out.push(' ');
        out.push_str(sealed);
        UserAgentPrefix(out.into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// [`user_agent`] from a prefix kept with the token ([`UserAgentPrefix::new`]); `None`: no
/// seal ([`UNSEALED_PREFIX`]).
pub fn user_agent_after(prefix: Option<&UserAgentPrefix>, fields: &RequestFields<'_>) -> String {
    let prefix = prefix.map_or(UNSEALED_PREFIX, UserAgentPrefix::as_str);
    let ua = fields.user_agent.filter(|u| !u.is_empty()).map(|u| u.get(..MAX_ORIGINAL_USER_AGENT).unwrap_or(u));
    let mut out = String::with_capacity(
        prefix.len()
            + 3
            + fields.request_id.map_or(1, str::len)
            + fields.client_addr.map_or(1, str::len)
            + ua.map_or(1, |u| u.len().div_ceil(3) * 4),
    );
    out.push_str(prefix);
    for v in [fields.request_id, fields.client_addr] {
        out.push(' ');
        out.push_str(v.filter(|v| field_ok(v)).unwrap_or("-"));
    }
    out.push(' ');
    match ua {
        Some(u) => URL_SAFE_NO_PAD.encode_string(u, &mut out),
        None => out.push('-'),
    }
    out
}

/// A marker read back from an event's `request.useragent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker<'a> {
    pub sealed: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub client_addr: Option<&'a str>,
    /// The client's user agent (invalid UTF-8 replaced), `""` when it sent none.
    pub user_agent: String,
}

/// Parses a user agent written by [`user_agent`]; `None` for anything else.
pub fn parse_user_agent(text: &str) -> Option<Marker<'_>> {
    let rest = text.strip_prefix(MARKER)?.strip_prefix(' ')?;
    let mut parts = rest.split(' ');
    let mut next = || parts.next().map(|p| (p != "-").then_some(p));
    let (sealed, request_id, client_addr, ua) = (next()?, next()?, next()?, next()?);
    if parts.next().is_some() {
        return None;
    }
    let user_agent = match ua {
        None => String::new(),
        Some(b64) => String::from_utf8_lossy(&URL_SAFE_NO_PAD.decode(b64).ok()?).into_owned(),
    };
    Some(Marker { sealed, request_id, client_addr, user_agent })
}

/// How the events role opens seals.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    /// The current key first, then any previous keys still accepted.
    pub keys: &'a [AttributionKey],
    pub now: i64,
    /// Seconds after the token's expiry a seal is still accepted (deliveries are retried).
    pub max_delay: i64,
}

/// Counts of one envelope rewrite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    pub events: u32,
    pub attributed: u32,
    /// Events whose request could not be attributed with certainty (actor left unchanged).
    pub unattributed: u32,
    /// The reason of the first unattributed event, for the log.
    pub first_reason: Option<Unattributed>,
}

impl RewriteStats {
    fn miss(&mut self, why: Unattributed) {
        self.unattributed += 1;
        self.first_reason.get_or_insert(why);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not JSON: {0}")]
    NotJson(String),
    #[error("envelope has no `events` array")]
    NoEvents,
}

/// Rewrites an events envelope. For every event whose `request.useragent` is a marker:
/// restores `request.useragent` to the client's, `request.addr` to the client's address,
/// replaces `request.id` by the edge's `X-Request-Id` (keeping the registry's own as
/// `request.registry_request_id`); and when its seal opens, sets `actor.name`,
/// `actor.user_type` and `actor.user`. Everything else — unknown fields, key order, event
/// ids and order — is kept. Malformed envelopes are an error (the caller forwards them
/// unchanged).
pub fn rewrite_envelope(body: &[u8], opener: &Opener<'_>) -> Result<(Vec<u8>, RewriteStats), EnvelopeError> {
    let mut envelope: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let events = envelope.get_mut("events").and_then(Value::as_array_mut).ok_or(EnvelopeError::NoEvents)?;
    let mut stats = RewriteStats::default();
    for event in events.iter_mut() {
        stats.events += 1;
        let Some(event) = event.as_object_mut() else {
            stats.miss(Unattributed::NoMarker);
            continue;
        };
        let Some(request) = event.get_mut("request").and_then(Value::as_object_mut) else {
            stats.miss(Unattributed::NoMarker);
            continue;
        };
        let ua = request.get("useragent").and_then(Value::as_str).unwrap_or_default();
        let Some(marker) = parse_user_agent(ua) else {
            stats.miss(Unattributed::NoMarker);
            continue;
        };
        let who = match marker.sealed {
            None => Err(Unattributed::NotSealed),
            Some(s) => open(opener.keys, s, opener.now, opener.max_delay),
        };
        // The per-request fields were written by the filter (it replaces every client's user
        // agent), so they are restored whether or not the seal opens.
        let (request_id, client_addr) = (marker.request_id.map(str::to_owned), marker.client_addr.map(str::to_owned));
        request.insert("useragent".into(), marker.user_agent.into());
        if let Some(client) = client_addr {
            request.insert("addr".into(), client.into());
        }
        if let Some(id) = request_id {
            if let Some(original) = request.insert("id".into(), id.into()) {
                request.insert("registry_request_id".into(), original);
            }
        }
        let who = match who {
            Ok(who) => who,
            Err(why) => {
                stats.miss(why);
                continue;
            }
        };
        stats.attributed += 1;
        let actor = event.entry("actor").or_insert_with(|| Value::Object(Map::new()));
        if !actor.is_object() {
            *actor = Value::Object(Map::new());
        }
        if let Some(actor) = actor.as_object_mut() {
            actor.insert("name".into(), who.name.into());
            actor.insert("user_type".into(), who.user_type.into());
            if let Some(user) = who.user {
                actor.insert("user".into(), user.into());
            }
        }
    }
    let out = serde_json::to_vec(&envelope).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    fn key(b: u8) -> AttributionKey {
        AttributionKey::from_bytes([b; 32])
    }

    fn who(name: &str, user_type: &str) -> Attribution {
        Attribution {
            name: name.into(),
            user_type: user_type.into(),
            user: Some(format!("jwt-of-{name}")),
            expires_at: NOW + 300,
        }
    }

    fn sealed(k: &AttributionKey, w: &Attribution, n: u8) -> String {
        let r = AttributionRef {
            name: &w.name,
            user_type: &w.user_type,
            user: w.user.as_deref(),
            expires_at: w.expires_at,
        };
        seal(k, &r, &[n; NONCE_LEN]).unwrap()
    }

    fn ua_for(sealed: Option<&str>, rid: &str, ua: &[u8]) -> String {
        user_agent(
            sealed,
            &RequestFields { request_id: Some(rid), client_addr: Some("192.0.2.7:4242"), user_agent: Some(ua) },
        )
    }

    fn event(id: &str, useragent: &str) -> Value {
        serde_json::json!({
            "id": id, "timestamp": "2026-11-22T01:00:00Z", "action": "push",
            "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "acme/web/app", "tag": "v1"},
            "request": {"id": "registry-random", "addr": "127.0.0.1", "method": "PUT", "useragent": useragent},
            "actor": {}, "source": {"addr": "127.0.0.1:5002", "instanceID": "x"}, "zz_unknown": [1, 2]
        })
    }

    fn rewrite(env: &Value, keys: &[AttributionKey], now: i64) -> (Value, RewriteStats) {
        let opener = Opener { keys, now, max_delay: 3600 };
        let (out, stats) = rewrite_envelope(env.to_string().as_bytes(), &opener).unwrap();
        (serde_json::from_slice(&out).unwrap(), stats)
    }

    #[test]
    fn seals_round_trip_and_hide_the_credential() {
        let k = key(1);
        let w = who("dev", "pat");
        let s = sealed(&k, &w, 7);
        assert!(!s.contains("jwt-of") && !s.contains("dev"), "{s}");
        assert_eq!(open(std::slice::from_ref(&k), &s, NOW, 0), Ok(w.clone()));
        // Another nonce, another seal of the same principal.
        assert_ne!(s, sealed(&k, &w, 8));
        let bare = Attribution { user: None, ..w };
        assert_eq!(open(std::slice::from_ref(&k), &sealed(&k, &bare, 9), NOW, 0).unwrap().user, None);
    }

    #[test]
    fn tampered_wrong_key_and_expired_seals_do_not_open() {
        let (k, other) = (key(1), key(2));
        let s = sealed(&k, &who("dev", "pat"), 7);
        assert_eq!(open(std::slice::from_ref(&other), &s, NOW, 0), Err(Unattributed::BadSeal));
        // A previous key still listed opens it (rotation).
        assert!(open(&[other, k.clone()], &s, NOW, 0).is_ok());
        let mut bytes = URL_SAFE_NO_PAD.decode(&s).unwrap();
        for i in [0, NONCE_LEN, bytes.len() - 1] {
            let mut t = bytes.clone();
            t[i] ^= 1;
            assert_eq!(
                open(std::slice::from_ref(&k), &URL_SAFE_NO_PAD.encode(&t), NOW, 0),
                Err(Unattributed::BadSeal),
                "byte {i}"
            );
        }
        bytes.truncate(NONCE_LEN + 3);
        assert_eq!(open(std::slice::from_ref(&k), &URL_SAFE_NO_PAD.encode(&bytes), NOW, 0), Err(Unattributed::BadSeal));
        assert_eq!(open(std::slice::from_ref(&k), "", NOW, 0), Err(Unattributed::BadSeal));
        assert_eq!(open(std::slice::from_ref(&k), "not base64!", NOW, 0), Err(Unattributed::BadSeal));
        // Expiry: the token's exp plus the allowed delivery delay.
        assert!(open(std::slice::from_ref(&k), &s, NOW + 300 + 60, 60).is_ok());
        assert_eq!(open(&[k], &s, NOW + 300 + 61, 60), Err(Unattributed::Expired));
    }

    #[test]
    fn keys_parse_from_base64url_only_at_32_bytes() {
        let k = key(0xfe);
        let text = k.to_base64url();
        assert_eq!(AttributionKey::from_base64url(&text).unwrap(), k);
        assert_eq!(AttributionKey::from_base64url(&format!("{text}=")).unwrap(), k);
        assert!(AttributionKey::from_base64url("AAAA").unwrap_err().contains("3 bytes"));
        assert!(AttributionKey::from_base64url("a+b/").unwrap_err().contains("base64url"));
        assert_eq!(format!("{k:?}"), "AttributionKey(…)", "never printed");
    }

    #[test]
    fn a_prefix_kept_with_the_token_makes_the_same_user_agent() {
        let fields =
            RequestFields { request_id: Some("req-1"), client_addr: Some("10.0.0.7"), user_agent: Some(b"skopeo") };
        assert_eq!(UserAgentPrefix::new(None).as_str(), UNSEALED_PREFIX);
        assert_eq!(user_agent_after(None, &fields), user_agent(None, &fields));
        for sealed in ["c2VhbGVk", "has space", "", "-", "ctl\u{7f}"] {
            let prefix = UserAgentPrefix::new(Some(sealed));
            assert_eq!(user_agent_after(Some(&prefix), &fields), user_agent(Some(sealed), &fields), "{sealed:?}");
        }
        // A seal that is not a field is dropped once, at the prefix: never split the marker.
        assert_eq!(UserAgentPrefix::new(Some("has space")).as_str(), UNSEALED_PREFIX);
        let text = user_agent(Some("c2VhbGVk"), &fields);
        let m = parse_user_agent(&text).unwrap();
        assert_eq!((m.sealed, m.request_id, m.client_addr), (Some("c2VhbGVk"), Some("req-1"), Some("10.0.0.7")));
    }

    #[test]
    fn odd_user_agents_travel_and_come_back() {
        let long = "x".repeat(100_000);
        let cases: Vec<(&[u8], String)> = vec![
            (b"", String::new()),
            (b"skopeo/1.9.3", "skopeo/1.9.3".into()),
            ("containerd/2.0 (ünïcode ✓)".as_bytes(), "containerd/2.0 (ünïcode ✓)".into()),
            (b"has spaces - and - dashes", "has spaces - and - dashes".into()),
            (MARKER.as_bytes(), MARKER.into()),
            (b"\xff\xfe raw", "\u{fffd}\u{fffd} raw".into()),
            (long.as_bytes(), "x".repeat(MAX_ORIGINAL_USER_AGENT)),
        ];
        for (ua, back) in cases {
            let text = ua_for(Some("c2VhbA"), "rid-1", ua);
            assert!(text.starts_with("registry-guard/1 c2VhbA rid-1 192.0.2.7:4242 "), "{text}");
            assert!(text.len() < 1500, "bounded: {}", text.len());
            let m = parse_user_agent(&text).unwrap();
            assert_eq!(
                (m.sealed, m.request_id, m.client_addr),
                (Some("c2VhbA"), Some("rid-1"), Some("192.0.2.7:4242"))
            );
            assert_eq!(m.user_agent, back);
        }
        // Absent fields are `-`; a field that could break the format is dropped, not written.
        let text = user_agent(None, &RequestFields { request_id: Some("a b"), client_addr: None, user_agent: None });
        assert_eq!(text, "registry-guard/1 - - - -");
        let m = parse_user_agent(&text).unwrap();
        assert_eq!(m, Marker { sealed: None, request_id: None, client_addr: None, user_agent: String::new() });
        for bad in [
            "registry-guard/1",
            "registry-guard/1 a b c",
            "registry-guard/1 a b c d e",
            "registry-guard/10 a b c d",
            "skopeo",
            "registry-guard/1 a b c %%",
        ] {
            assert_eq!(parse_user_agent(bad), None, "{bad}");
        }
    }

    #[test]
    fn concurrent_principals_are_never_mixed_up_and_fields_are_restored() {
        let k = key(1);
        let (a, b) = (sealed(&k, &who("dev", "password"), 1), sealed(&k, &who("acme-ci", "deploy_token"), 2));
        let env = serde_json::json!({"events": [
            event("e1", &ua_for(Some(&a), "rid-dev", b"skopeo/1.9")),
            event("e2", &ua_for(Some(&b), "rid-ci", b"podman/5")),
            event("e3", &ua_for(Some(&a), "rid-dev", b"skopeo/1.9")),
            event("e4", &ua_for(Some(&b), "rid-ci", b"podman/5")),
        ]});
        let (out, stats) = rewrite(&env, &[k], NOW);
        let names: Vec<&str> =
            out["events"].as_array().unwrap().iter().map(|e| e["actor"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["dev", "acme-ci", "dev", "acme-ci"]);
        let ids: Vec<&str> = out["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["e1", "e2", "e3", "e4"], "event ids and order are kept");
        assert_eq!(stats, RewriteStats { events: 4, attributed: 4, unattributed: 0, first_reason: None });
        let e = &out["events"][1];
        assert_eq!(e["actor"]["user_type"], "deploy_token");
        assert_eq!(e["actor"]["user"], "jwt-of-acme-ci");
        assert_eq!(e["request"]["id"], "rid-ci");
        assert_eq!(e["request"]["registry_request_id"], "registry-random");
        assert_eq!(e["request"]["addr"], "192.0.2.7:4242");
        assert_eq!(e["request"]["useragent"], "podman/5");
        assert_eq!(e["zz_unknown"], serde_json::json!([1, 2]), "unknown fields are kept");
    }

    #[test]
    fn what_cannot_be_attributed_keeps_its_actor_and_is_counted() {
        let k = key(1);
        let good = sealed(&k, &who("dev", "pat"), 1);
        let foreign = sealed(&key(9), &who("mallory", "pat"), 1);
        let env = serde_json::json!({"events": [
            event("plain", "skopeo/1.9"),
            event("forged-marker", &format!("{MARKER} {good}x rid 10.0.0.1 -")),
            event("other-key", &ua_for(Some(&foreign), "rid", b"x")),
            event("anonymous", &ua_for(None, "rid", b"x")),
            event("late", &ua_for(Some(&good), "rid", b"x")),
            "not an object",
        ]});
        let (out, stats) = rewrite(&env, std::slice::from_ref(&k), NOW);
        assert_eq!((stats.attributed, stats.unattributed), (1, 5), "only the genuine seal opens");
        assert_eq!(out["events"][4]["actor"]["name"], "dev");
        assert_eq!(out["events"][2]["actor"], serde_json::json!({}), "another key's seal is never used");
        let (out_late, stats) = rewrite(&env, &[k], NOW + 300 + 3601);
        assert_eq!((stats.attributed, stats.unattributed, stats.events), (0, 6, 6));
        assert_eq!(stats.first_reason, Some(Unattributed::NoMarker));
        for e in out_late["events"].as_array().unwrap().iter().filter(|e| e.is_object()) {
            assert_eq!(e["actor"], serde_json::json!({}), "{e}");
        }
        // Without a marker the event is untouched; a filter-written marker's fields are restored.
        assert_eq!(out_late["events"][0]["request"]["useragent"], "skopeo/1.9");
        assert_eq!(out_late["events"][0]["request"]["id"], "registry-random");
        assert_eq!(out_late["events"][3]["request"]["useragent"], "x");
        assert_eq!(out_late["events"][3]["request"]["id"], "rid");
    }

    #[test]
    fn a_client_sending_the_marker_is_neutralised() {
        // The filter always replaces the client's user agent: a client-sent marker (even one
        // with a genuine seal copied from a log) becomes the *original* user agent field.
        let k = key(1);
        let stolen = format!("{MARKER} {} rid 10.0.0.1 -", sealed(&k, &who("admin", "pat"), 3));
        let written = ua_for(None, "rid-mallory", stolen.as_bytes());
        let (out, stats) = rewrite(&serde_json::json!({"events": [event("e", &written)]}), &[k], NOW);
        assert_eq!((stats.attributed, stats.first_reason), (0, Some(Unattributed::NotSealed)));
        assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
        assert_eq!(out["events"][0]["request"]["useragent"], stolen.as_str());
    }

    #[test]
    fn malformed_envelopes_are_errors_for_the_caller_to_pass_through() {
        let opener = Opener { keys: &[], now: NOW, max_delay: 0 };
        assert!(matches!(rewrite_envelope(b"{nope", &opener), Err(EnvelopeError::NotJson(_))));
        assert_eq!(rewrite_envelope(b"{\"x\": 1}", &opener).unwrap_err(), EnvelopeError::NoEvents);
        let (out, stats) = rewrite_envelope(br#"{"events": [], "extra": true}"#, &opener).unwrap();
        assert_eq!(stats.events, 0);
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["extra"], true);
    }

    #[test]
    fn many_events_in_one_envelope() {
        let k = key(3);
        let ua = ua_for(Some(&sealed(&k, &who("dev", "pat"), 4)), "r", b"skopeo");
        let events: Vec<Value> = (0..1000).map(|i| event(&format!("e{i}"), &ua)).collect();
        let (_, stats) = rewrite(&serde_json::json!({"events": events}), &[k], NOW);
        assert_eq!(stats.attributed, 1000);
    }
}
