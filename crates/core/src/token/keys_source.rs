//! Following a JWKS URL (the token service's `GET /jwks`) for the trusted token-signing keys:
//! when to fetch, what to ask, whether an answer is a usable key set, and whether to swap.
//! Pure: the glue passes the time (milliseconds), a random number for jitter and the HTTP
//! answer; it makes the call and swaps the verifier's keys when told to.
//!
//! Refreshed every `refresh_seconds` (jittered ±20 %), conditional (`If-None-Match` with the
//! entity tag of the last answer, 304 when unchanged); after a failure the wait doubles from
//! `refresh_seconds` up to five minutes. A document that does not parse, holds more than
//! `max_keys` keys or no ES256 key, or is larger than `max_bytes` is refused and the active
//! set stays (last known good); an empty set is never taken.

use serde::Deserialize;

use crate::token::jwks::KeySet;
use crate::token::keys::VerifyingKey;

/// The longest wait between fetches after failures.
pub const MAX_BACKOFF_MS: u64 = 300_000;

/// `keys_source` of the filter configuration: where the filter fetches its trusted keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSource {
    /// The Envoy cluster of the source (e.g. the token service).
    pub cluster: String,
    /// Request path (default `/jwks`).
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the request (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Seconds between fetches, and the base of the backoff (default 30).
    #[serde(default = "default_refresh_seconds")]
    pub refresh_seconds: u64,
    /// Time allowed for an answer (default 5).
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Largest JWKS accepted, in bytes (default 65536).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Most keys accepted in one JWKS (default 16).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_path() -> String {
    "/jwks".into()
}
fn default_refresh_seconds() -> u64 {
    30
}
fn default_timeout_seconds() -> u64 {
    5
}
fn default_max_bytes() -> usize {
    64 * 1024
}
fn default_max_keys() -> usize {
    16
}

impl KeysSource {
    /// Checks ranges; the error is (JSON path, reason).
    pub fn check(&self) -> Result<(), (String, String)> {
        let field = |f: &str| format!("$.keys_source.{f}");
        if self.cluster.trim().is_empty() {
            return Err((field("cluster"), "must name an Envoy cluster".into()));
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err((field("path"), format!("must be an absolute path, got {:?}", self.path)));
        }
        if let Some(a) = &self.authority {
            if a.is_empty() || !a.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((field("authority"), "must be a host[:port] of printable ASCII".into()));
            }
        }
        if !(1..=3600).contains(&self.refresh_seconds) {
            return Err((field("refresh_seconds"), "must be between 1 and 3600".into()));
        }
        if !(1..=60).contains(&self.timeout_seconds) {
            return Err((field("timeout_seconds"), "must be between 1 and 60".into()));
        }
        if !(2..=1 << 20).contains(&self.max_bytes) {
            return Err((field("max_bytes"), "must be between 2 and 1048576".into()));
        }
        if !(1..=256).contains(&self.max_keys) {
            return Err((field("max_keys"), "must be between 1 and 256".into()));
        }
        Ok(())
    }
}

/// Why a fetch did not give a key set (metric label `registry_guard.keys_fetch_rejected.<label>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeysRefusal {
    /// Not JSON, not `{"keys": [...]}`, or a key that is invalid (private material, weak…).
    Parse,
    /// No ES256 key in the set.
    NoUsableKey,
    /// More than `max_keys` keys.
    TooMany,
    /// Larger than `max_bytes`.
    Size,
    /// An HTTP status other than 200 or 304.
    Status,
    /// No answer (connection, timeout, no healthy upstream, dispatch refused).
    Unreachable,
}

pub const KEYS_REFUSALS: [KeysRefusal; 6] = [
    KeysRefusal::Parse,
    KeysRefusal::NoUsableKey,
    KeysRefusal::TooMany,
    KeysRefusal::Size,
    KeysRefusal::Status,
    KeysRefusal::Unreachable,
];

impl KeysRefusal {
    pub fn label(self) -> &'static str {
        match self {
            KeysRefusal::Parse => "parse",
            KeysRefusal::NoUsableKey => "no_usable_key",
            KeysRefusal::TooMany => "too_many",
            KeysRefusal::Size => "size",
            KeysRefusal::Status => "status",
            KeysRefusal::Unreachable => "unreachable",
        }
    }
}

/// A JWKS document checked as a candidate key set: parses, at most `max_keys` keys, each a
/// valid public key (as [`KeySet::from_jwks`] requires), at least one ES256 key.
pub fn candidate(body: &[u8], max_keys: usize) -> Result<KeySet, (KeysRefusal, String)> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| (KeysRefusal::Parse, format!("the JWKS is not JSON: {e}")))?;
    let count = value.get("keys").and_then(serde_json::Value::as_array).map(Vec::len);
    if let Some(n) = count {
        if n > max_keys {
            return Err((KeysRefusal::TooMany, format!("the JWKS lists {n} keys, more than max_keys {max_keys}")));
        }
    }
    let set = KeySet::from_jwks(&value).map_err(|e| match e {
        crate::token::jwks::KeySetError::Empty => (KeysRefusal::NoUsableKey, "the JWKS has no key".to_owned()),
        e => (KeysRefusal::Parse, e.to_string()),
    })?;
    if !set.iter().any(|(_, k)| matches!(k, VerifyingKey::Es256(_))) {
        return Err((KeysRefusal::NoUsableKey, "the JWKS has no ES256 (P-256) key".into()));
    }
    Ok(set)
}

/// The identity of a key set: its (kid, RFC 7638 thumbprint) pairs, sorted. Two sets with
/// the same identity verify the same tokens.
pub fn identity(set: &KeySet) -> Vec<(String, String)> {
    let mut id: Vec<(String, String)> = set.iter().map(|(kid, k)| (kid.to_owned(), k.thumbprint())).collect();
    id.sort();
    id
}

/// One fetch to make: headers besides `:method`, `:path`, `:authority`, and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysFetch {
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
}

/// What the glue got back for a fetch: `None` status for no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysAnswer<'a> {
    pub status: Option<u16>,
    pub etag: Option<&'a str>,
    pub body_size: usize,
    pub body: Option<&'a [u8]>,
}

/// What to do with an answer.
#[derive(Debug)]
pub enum KeysStep {
    /// The source's set is the active one (304, or the same keys again).
    Unchanged,
    /// A different, valid key set: swap the verifier to it. `jwks` is the document (for
    /// later configurations).
    Swap { keys: KeySet, jwks: Vec<u8> },
    /// Refused or failed: the active set stays.
    Refused { kind: KeysRefusal, reason: String },
}

/// Fetches by result, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeysCounters {
    pub changed: u64,
    pub not_modified: u64,
    pub refused: u64,
    pub failed: u64,
}

/// The keys follower's state in one VM.
#[derive(Debug, Clone)]
pub struct KeysFollower {
    source: KeysSource,
    etag: Option<String>,
    /// Identity of the active set (empty: no keys yet).
    active: Vec<(String, String)>,
    failures: u32,
    next_fetch_ms: u64,
    in_flight: bool,
    last_success_ms: Option<u64>,
    pub counters: KeysCounters,
    pub last_error: Option<String>,
}

impl KeysFollower {
    /// Starts following at `now_ms` with `active` the keys in force (possibly empty): the first
    /// fetch is due at once.
    pub fn new(source: KeysSource, active: &KeySet, now_ms: u64) -> KeysFollower {
        KeysFollower {
            source,
            etag: None,
            active: identity(active),
            failures: 0,
            next_fetch_ms: now_ms,
            in_flight: false,
            last_success_ms: None,
            counters: KeysCounters::default(),
            last_error: None,
        }
    }

    pub fn source(&self) -> &KeysSource {
        &self.source
    }

    /// The fetch to dispatch now, if one is due and none is in flight; marks it in flight.
    pub fn due(&mut self, now_ms: u64) -> Option<KeysFetch> {
        if self.in_flight || now_ms < self.next_fetch_ms {
            return None;
        }
        self.in_flight = true;
        let mut headers = vec![("accept".to_owned(), "application/json".to_owned())];
        if let Some(etag) = &self.etag {
            headers.push(("if-none-match".to_owned(), etag.clone()));
        }
        Some(KeysFetch {
            path: self.source.path.clone(),
            authority: self.source.authority.clone().unwrap_or_else(|| self.source.cluster.clone()),
            headers,
            timeout_ms: self.source.timeout_seconds * 1000,
        })
    }

    /// Reads an answer (or the failure to dispatch one: `status: None`).
    pub fn answer(&mut self, now_ms: u64, rand: u32, answer: KeysAnswer<'_>) -> KeysStep {
        self.in_flight = false;
        let result = match answer.status {
            None => Err((KeysRefusal::Unreachable, format!("no answer from cluster {}", self.source.cluster))),
            Some(304) if self.etag.is_some() => Ok(None),
            Some(200) if answer.body_size > self.source.max_bytes => Err((
                KeysRefusal::Size,
                format!("the JWKS is {} bytes, more than max_bytes {}", answer.body_size, self.source.max_bytes),
            )),
            Some(200) => match answer.body {
                None => Err((KeysRefusal::Parse, "the answer has no body".to_owned())),
                Some(body) => candidate(body, self.source.max_keys).map(|keys| Some((keys, body.to_vec()))),
            },
            Some(status) => Err((KeysRefusal::Status, format!("the source answered HTTP {status}"))),
        };
        match result {
            Ok(None) => {
                self.succeed(now_ms, rand);
                self.counters.not_modified += 1;
                KeysStep::Unchanged
            }
            Ok(Some((keys, jwks))) => {
                self.etag = answer.etag.map(str::to_owned);
                self.succeed(now_ms, rand);
                let id = identity(&keys);
                if id == self.active {
                    self.counters.not_modified += 1;
                    return KeysStep::Unchanged;
                }
                self.active = id;
                self.counters.changed += 1;
                KeysStep::Swap { keys, jwks }
            }
            Err((kind, reason)) => {
                let reason = format!("{reason}; the active keys stay");
                self.failures = self.failures.saturating_add(1);
                if kind == KeysRefusal::Unreachable || kind == KeysRefusal::Status {
                    self.counters.failed += 1;
                } else {
                    self.counters.refused += 1;
                }
                self.last_error = Some(reason.clone());
                self.next_fetch_ms = now_ms + backoff_ms(self.source.refresh_seconds * 1000, self.failures, rand);
                KeysStep::Refused { kind, reason }
            }
        }
    }

    /// The keys in force changed by other means (a later configuration starting from keys
    /// fetched before): remembered so the same set is not swapped in again.
    pub fn adopted(&mut self, keys: &KeySet) {
        self.active = identity(keys);
    }

    /// A swap the glue could not make: the next answer is taken in full (no `If-None-Match`)
    /// and swapped whatever it holds.
    pub fn forget(&mut self) {
        self.etag = None;
        self.active.clear();
    }

    /// Seconds since the last good answer, `None` before the first.
    pub fn seconds_since_success(&self, now_ms: u64) -> Option<u64> {
        self.last_success_ms.map(|t| now_ms.saturating_sub(t) / 1000)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    pub fn next_fetch_ms(&self) -> u64 {
        self.next_fetch_ms
    }

    fn succeed(&mut self, now_ms: u64, rand: u32) {
        self.failures = 0;
        self.last_error = None;
        self.last_success_ms = Some(now_ms);
        self.next_fetch_ms = now_ms + jitter_ms(self.source.refresh_seconds * 1000, rand);
    }
}

/// `base · 2^(failures-1)`, at most [`MAX_BACKOFF_MS`], jittered.
pub fn backoff_ms(base_ms: u64, failures: u32, rand: u32) -> u64 {
    let factor = 1u64 << failures.saturating_sub(1).min(20);
    jitter_ms(base_ms.saturating_mul(factor).min(MAX_BACKOFF_MS), rand)
}

/// `ms` scaled by a factor in [0.8, 1.2) chosen by `rand`, so a fleet does not fetch in step.
pub fn jitter_ms(ms: u64, rand: u32) -> u64 {
    let scaled = u128::from(ms) * (4 * (1u128 << 32) + 2 * u128::from(rand)) / (5 * (1u128 << 32));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
    use super::*;
    use crate::token::testing::{es256_key, jwks};

    const MID: u32 = 1 << 31;

    fn source() -> KeysSource {
        serde_json::from_value(serde_json::json!({"cluster": "token_service", "max_bytes": 4000, "max_keys": 3}))
            .unwrap()
    }

    fn ok<'a>(etag: Option<&'a str>, body: &'a [u8]) -> KeysAnswer<'a> {
        KeysAnswer { status: Some(200), etag, body_size: body.len(), body: Some(body) }
    }

    fn doc(keys: &[u8]) -> Vec<u8> {
        let ks: Vec<_> = keys.iter().map(|k| es256_key(*k)).collect();
        serde_json::to_vec(&jwks(&ks.iter().collect::<Vec<_>>())).unwrap()
    }

    #[test]
    fn defaults_and_ranges() {
        let s = source();
        assert_eq!((s.path.as_str(), s.refresh_seconds, s.timeout_seconds), ("/jwks", 30, 5));
        assert!(s.check().is_ok());
        for (field, bad) in [
            ("cluster", serde_json::json!(" ")),
            ("path", serde_json::json!("jwks")),
            ("refresh_seconds", serde_json::json!(0)),
            ("timeout_seconds", serde_json::json!(61)),
            ("max_bytes", serde_json::json!(0)),
            ("max_keys", serde_json::json!(0)),
        ] {
            let mut v = serde_json::json!({"cluster": "token_service"});
            v[field] = bad;
            let s: KeysSource = serde_json::from_value(v).unwrap();
            assert_eq!(s.check().unwrap_err().0, format!("$.keys_source.{field}"));
        }
        assert!(serde_json::from_value::<KeysSource>(serde_json::json!({"cluster": "t", "refresh": 1})).is_err());
    }

    #[test]
    fn swaps_to_a_new_set_and_keeps_it_on_refusals() {
        let boot = KeySet::from_jwks(&jwks(&[&es256_key(1)])).unwrap();
        let mut f = KeysFollower::new(source(), &boot, 0);
        let req = f.due(0).unwrap();
        assert_eq!((req.path.as_str(), req.authority.as_str(), req.timeout_ms), ("/jwks", "token_service", 5000));
        assert!(!req.headers.iter().any(|(k, _)| k == "if-none-match"));
        assert!(f.due(0).is_none(), "one fetch in flight");
        // The same key again: nothing to swap.
        assert!(matches!(f.answer(0, MID, ok(Some("\"a\""), &doc(&[1]))), KeysStep::Unchanged));
        assert_eq!(f.seconds_since_success(5000), Some(5));
        assert!(f.due(29_999).is_none());
        let req = f.due(30_000).unwrap();
        assert!(req.headers.contains(&("if-none-match".into(), "\"a\"".into())));
        // A 304 keeps everything.
        let not_modified = KeysAnswer { status: Some(304), etag: Some("\"a\""), body_size: 0, body: None };
        assert!(matches!(f.answer(30_000, MID, not_modified), KeysStep::Unchanged));
        // Old and new key: swap.
        f.due(60_000).unwrap();
        let KeysStep::Swap { keys, .. } = f.answer(60_000, MID, ok(Some("\"b\""), &doc(&[1, 2]))) else {
            panic!("expected a swap")
        };
        assert_eq!(keys.len(), 2);
        assert_eq!(f.counters, KeysCounters { changed: 1, not_modified: 2, refused: 0, failed: 0 });
        // Each bad answer is refused with its reason, and the backoff grows.
        let big = vec![b' '; 5000];
        let private = {
            let mut v = jwks(&[&es256_key(3)]);
            v["keys"][0]["d"] = "AAAA".into();
            serde_json::to_vec(&v).unwrap()
        };
        let rsa_only = br#"{"keys": []}"#.to_vec();
        let cases: Vec<(KeysAnswer<'_>, KeysRefusal)> = vec![
            (ok(None, b"<html>"), KeysRefusal::Parse),
            (ok(None, br#"{"kys": []}"#), KeysRefusal::Parse),
            (ok(None, &private), KeysRefusal::Parse),
            (ok(None, &rsa_only), KeysRefusal::NoUsableKey),
            (ok(None, &big), KeysRefusal::Size),
            (KeysAnswer { status: Some(503), etag: None, body_size: 0, body: None }, KeysRefusal::Status),
            (KeysAnswer { status: None, etag: None, body_size: 0, body: None }, KeysRefusal::Unreachable),
        ];
        let mut now = 90_000;
        for (i, (answer, expected)) in cases.into_iter().enumerate() {
            f.due(now).unwrap();
            match f.answer(now, MID, answer) {
                KeysStep::Refused { kind, reason } => {
                    assert_eq!(kind, expected, "{reason}");
                    assert!(reason.ends_with("the active keys stay"), "{reason}");
                }
                other => panic!("case {i}: {other:?}"),
            }
            assert_eq!(f.consecutive_failures(), i as u32 + 1);
            assert_eq!(f.next_fetch_ms(), now + backoff_ms(30_000, i as u32 + 1, MID));
            now = f.next_fetch_ms();
        }
        assert_eq!((f.counters.refused, f.counters.failed), (5, 2));
        // Too many keys.
        f.due(now).unwrap();
        assert!(matches!(
            f.answer(now, MID, ok(None, &doc(&[1, 2, 3, 4]))),
            KeysStep::Refused { kind: KeysRefusal::TooMany, .. }
        ));
        // Back to a good answer: the new key only is a swap; the backoff resets.
        now = f.next_fetch_ms();
        f.due(now).unwrap();
        assert!(matches!(f.answer(now, MID, ok(None, &doc(&[2]))), KeysStep::Swap { .. }));
        assert_eq!(f.consecutive_failures(), 0);
        assert!(f.last_error.is_none());
    }

    #[test]
    fn a_304_without_an_etag_sent_is_not_taken_as_unchanged() {
        let mut f = KeysFollower::new(source(), &KeySet::default(), 0);
        f.due(0).unwrap();
        let answer = KeysAnswer { status: Some(304), etag: None, body_size: 0, body: None };
        assert!(matches!(f.answer(0, MID, answer), KeysStep::Refused { kind: KeysRefusal::Status, .. }));
        assert_eq!(f.seconds_since_success(10_000), None);
    }

    #[test]
    fn with_no_keys_the_first_good_set_swaps_in() {
        let mut f = KeysFollower::new(source(), &KeySet::default(), 0);
        f.due(0).unwrap();
        assert!(matches!(f.answer(0, MID, ok(None, &doc(&[1]))), KeysStep::Swap { .. }));
    }

    #[test]
    fn other_key_types_are_kept_beside_an_es256_key() {
        let mut v = jwks(&[&es256_key(1)]);
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        v["keys"].as_array_mut().unwrap().push(ed.clone());
        assert_eq!(candidate(&serde_json::to_vec(&v).unwrap(), 16).unwrap().len(), 2);
        let only_ed = serde_json::json!({"keys": [ed]});
        assert_eq!(candidate(&serde_json::to_vec(&only_ed).unwrap(), 16).unwrap_err().0, KeysRefusal::NoUsableKey);
    }
}
