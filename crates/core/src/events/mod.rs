//! Layer `events` (a leaf beside the stack): notification enrichment (seeds 000/001),
//! attributing the registry's webhook events to the principal whose request caused them, and
//! rewriting the events envelope. Uses nothing else of the core.
//!
//! **Correlation.** A stock registry (distribution 2.8) puts a fresh random `request.id` in
//! its events and ignores `X-Request-Id`, but it copies `X-Forwarded-For` into
//! `request.addr` when the value parses as an IP address. So the filter gives every request
//! it forwards a unique IPv6 *correlation address* (`fd00::/8`, unique-local: never a real
//! client) in `X-Forwarded-For`, and records `address → attribution` in proxy-wasm shared
//! data. The events filter reads `request.addr` of each event, looks the address up and
//! fills `actor`. The address is unique per request (a random per-VM prefix and a per-VM
//! counter), so two principals pushing the same image concurrently can never be mixed up;
//! the record stores the full address, so a slot overwritten by a newer request (the table is
//! a bounded ring) is detected and the event left unattributed and counted, never
//! misattributed.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What the events filter writes into an event, and what it restores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// The correlation address this record belongs to (checked on lookup).
    pub addr: String,
    /// `sub` of the token: username or deploy token username.
    pub name: String,
    /// `auth_type` of the token (`password`, `pat`, `deploy_token`, `job_token`).
    pub user_type: String,
    /// The signed `user` JWT from the token, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The edge's `X-Request-Id` for the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client's address as Envoy saw it (restored into `request.addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
}

/// An [`Attribution`] borrowed from the request and its verified token, as the registry role
/// writes it: the same JSON, without copying the nested `user` JWT on every request.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttributionRecord<'a> {
    pub addr: &'a str,
    pub name: &'a str,
    pub user_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<&'a str>,
}

/// The correlation address for request number `counter` of a VM whose random prefix is
/// `vm_prefix` (48 bits used): `fdPP:PPPP:PPPP:PPCC:CCCC:CCCC:CCCC:CCCC` in hex groups.
pub fn correlation_address(vm_prefix: u64, counter: u64) -> String {
    let p = vm_prefix & 0xffff_ffff_ffff;
    let groups = [
        0xfd00 | ((p >> 40) & 0xff) as u16,
        ((p >> 24) & 0xffff) as u16,
        ((p >> 8) & 0xffff) as u16,
        (((p & 0xff) << 8) as u16) | ((counter >> 56) & 0xff) as u16,
        ((counter >> 40) & 0xffff) as u16,
        ((counter >> 24) & 0xffff) as u16,
        ((counter >> 8) & 0xffff) as u16,
        ((counter & 0xff) << 8) as u16,
    ];
    let mut out = String::with_capacity(39);
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{g:x}");
    }
    out
}

/// Shared-data slot of an address in a table of `slots` entries (FNV-1a).
pub fn slot_of(addr: &str, slots: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in addr.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % slots.max(1)
}

/// Counts of one envelope rewrite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    pub events: u32,
    pub attributed: u32,
    /// Events whose request could not be attributed with certainty (actor left unchanged).
    pub unattributed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not JSON: {0}")]
    NotJson(String),
    #[error("envelope has no `events` array")]
    NoEvents,
}

/// Rewrites an events envelope: for every event whose `request.addr` resolves through
/// `lookup`, sets `actor.name`, `actor.user_type`, `actor.user`, replaces `request.id` by the
/// edge's `X-Request-Id` (keeping the registry's own as `request.registry_request_id`) and
/// restores `request.addr` to the client's address. Everything else — unknown fields, key
/// order, event ids and order — is kept. Malformed envelopes are an error (the caller
/// forwards them unchanged).
pub fn rewrite_envelope(
    body: &[u8],
    mut lookup: impl FnMut(&str) -> Option<Attribution>,
) -> Result<(Vec<u8>, RewriteStats), EnvelopeError> {
    let mut envelope: Value = serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    let events = envelope.get_mut("events").and_then(Value::as_array_mut).ok_or(EnvelopeError::NoEvents)?;
    let mut stats = RewriteStats::default();
    for event in events.iter_mut() {
        stats.events += 1;
        let Some(event) = event.as_object_mut() else {
            stats.unattributed += 1;
            continue;
        };
        let addr = event.get("request").and_then(|r| r.get("addr")).and_then(Value::as_str).map(str::to_owned);
        let Some(attribution) = addr.as_deref().and_then(&mut lookup).filter(|a| Some(&a.addr) == addr.as_ref()) else {
            stats.unattributed += 1;
            continue;
        };
        stats.attributed += 1;
        let actor = event.entry("actor").or_insert_with(|| Value::Object(Map::new()));
        if !actor.is_object() {
            *actor = Value::Object(Map::new());
        }
        if let Some(actor) = actor.as_object_mut() {
            actor.insert("name".into(), attribution.name.into());
            actor.insert("user_type".into(), attribution.user_type.into());
            if let Some(user) = attribution.user {
                actor.insert("user".into(), user.into());
            }
        }
        if let Some(request) = event.get_mut("request").and_then(Value::as_object_mut) {
            if let Some(id) = attribution.request_id {
                if let Some(original) = request.insert("id".into(), id.into()) {
                    request.insert("registry_request_id".into(), original);
                }
            }
            if let Some(client) = attribution.client_addr {
                request.insert("addr".into(), client.into());
            }
        }
    }
    let out = serde_json::to_vec(&envelope).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn attribution(addr: &str, name: &str, user_type: &str) -> Attribution {
        Attribution {
            addr: addr.into(),
            name: name.into(),
            user_type: user_type.into(),
            user: Some(format!("jwt-of-{name}")),
            request_id: Some(format!("rid-{name}")),
            client_addr: Some("127.0.0.1:4242".into()),
        }
    }

    fn event(id: &str, addr: &str) -> Value {
        serde_json::json!({
            "id": id, "timestamp": "2026-11-22T01:00:00Z", "action": "push",
            "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": "acme/web/app", "tag": "v1"},
            "request": {"id": "registry-random", "addr": addr, "method": "PUT", "useragent": "skopeo"},
            "actor": {}, "source": {"addr": "127.0.0.1:5002", "instanceID": "x"}, "zz_unknown": [1, 2]
        })
    }

    #[test]
    fn addresses_are_unique_valid_ipv6_in_fd00() {
        let a = correlation_address(0xabcdef123456, 1);
        let b = correlation_address(0xabcdef123456, 2);
        let c = correlation_address(0xabcdef123457, 1);
        assert!(a.starts_with("fd"));
        assert!(a != b && a != c && b != c);
        assert!(a.parse::<std::net::Ipv6Addr>().is_ok(), "{a}");
        assert!(correlation_address(u64::MAX, u64::MAX).parse::<std::net::Ipv6Addr>().is_ok());
        let mut seen = std::collections::HashSet::new();
        for n in 0..10_000 {
            assert!(seen.insert(correlation_address(7, n)));
        }
        assert!(slot_of(&a, 4096) < 4096);
    }

    #[test]
    fn borrowed_records_read_back_as_attributions() {
        let full = attribution("fd00::1", "dev", "pat");
        let record = AttributionRecord {
            addr: &full.addr,
            name: &full.name,
            user_type: &full.user_type,
            user: full.user.as_deref(),
            request_id: full.request_id.as_deref(),
            client_addr: full.client_addr.as_deref(),
        };
        let back: Attribution = serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(back, full);
        let bare = AttributionRecord { user: None, request_id: None, client_addr: None, ..record };
        let text = serde_json::to_string(&bare).unwrap();
        assert_eq!(text, r#"{"addr":"fd00::1","name":"dev","user_type":"pat"}"#);
        assert_eq!(serde_json::from_str::<Attribution>(&text).unwrap().user, None);
    }

    #[test]
    fn concurrent_principals_are_never_mixed_up() {
        // Two principals push the same image at the same time: their events interleave.
        let (a, b) = (correlation_address(1, 10), correlation_address(2, 10));
        let table: HashMap<String, Attribution> =
            [(a.clone(), attribution(&a, "dev", "password")), (b.clone(), attribution(&b, "acme-ci", "deploy_token"))]
                .into();
        let env = serde_json::json!({"events": [event("e1", &a), event("e2", &b), event("e3", &a), event("e4", &b)]});
        let (out, stats) = rewrite_envelope(env.to_string().as_bytes(), |addr| table.get(addr).cloned()).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> =
            out["events"].as_array().unwrap().iter().map(|e| e["actor"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["dev", "acme-ci", "dev", "acme-ci"]);
        let ids: Vec<&str> = out["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["e1", "e2", "e3", "e4"], "event ids and order are kept");
        assert_eq!(stats, RewriteStats { events: 4, attributed: 4, unattributed: 0 });
        let e = &out["events"][1];
        assert_eq!(e["actor"]["user_type"], "deploy_token");
        assert_eq!(e["actor"]["user"], "jwt-of-acme-ci");
        assert_eq!(e["request"]["id"], "rid-acme-ci");
        assert_eq!(e["request"]["registry_request_id"], "registry-random");
        assert_eq!(e["request"]["addr"], "127.0.0.1:4242");
        assert_eq!(e["zz_unknown"], serde_json::json!([1, 2]), "unknown fields are kept");
    }

    #[test]
    fn overwritten_or_unknown_slots_leave_the_actor_unchanged() {
        let a = correlation_address(1, 1);
        let other = correlation_address(1, 2);
        // The slot now holds a newer request's record: it must not be used.
        let env = serde_json::json!({"events": [event("e1", &a), event("e2", "10.0.0.1")]});
        let (out, stats) =
            rewrite_envelope(env.to_string().as_bytes(), |_| Some(attribution(&other, "mallory", "password"))).unwrap();
        let out: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(out["events"][0]["actor"], serde_json::json!({}));
        assert_eq!(out["events"][0]["request"]["id"], "registry-random");
        assert_eq!(stats.unattributed, 2);
    }

    #[test]
    fn malformed_envelopes_are_errors_for_the_caller_to_pass_through() {
        assert!(matches!(rewrite_envelope(b"{nope", |_| None), Err(EnvelopeError::NotJson(_))));
        assert_eq!(rewrite_envelope(b"{\"x\": 1}", |_| None).unwrap_err(), EnvelopeError::NoEvents);
        let (out, stats) = rewrite_envelope(br#"{"events": [], "extra": true}"#, |_| None).unwrap();
        assert_eq!(stats.events, 0);
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["extra"], true);
    }

    #[test]
    fn many_events_in_one_envelope() {
        let a = correlation_address(9, 9);
        let events: Vec<Value> = (0..1000).map(|i| event(&format!("e{i}"), &a)).collect();
        let env = serde_json::json!({"events": events});
        let (_, stats) = rewrite_envelope(env.to_string().as_bytes(), |_| Some(attribution(&a, "dev", "pat"))).unwrap();
        assert_eq!(stats.attributed, 1000);
    }
}
