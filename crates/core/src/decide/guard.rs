//! The request-time engine: configuration + a bounded cache of verified tokens + `decide`.
//! The filter's HTTP context calls [`Guard::check`] once per request and maps the result.

use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::decide::config::FilterConfig;
use crate::decide::decision::{bearer_candidate, decide_at, is_b64token, Credential, Decision, Denial, DenyKind};
use crate::request::route::classify;
use crate::token::verify::{TokenError, VerifiedToken};

/// Verified tokens, bounded in entries and in bytes (oldest evicted first) and by each
/// token's expiry. Only successful verifications are cached; time claims are rechecked on
/// every hit. An entry costs the token's length plus its parsed claims
/// ([`VerifiedToken::approx_bytes`]) plus a fixed overhead; an entry larger than the whole
/// byte budget is not cached (it is verified on every use).
///
/// Keys are whole tokens compared byte for byte; the hash is foldhash (SipHash over a 1 kB
/// token was a sixth of a cached decision). Flooding is not a concern: only tokens whose
/// signature verified are ever inserted.
#[derive(Debug)]
pub struct TokenCache {
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    entries: HashMap<Rc<str>, (Rc<VerifiedToken>, SealSlot, usize), foldhash::fast::RandomState>,
    order: VecDeque<Rc<str>>,
    pub hits: u64,
    pub misses: u64,
}

/// A value derived from a verified token once and cached with it: the start of the filter's
/// user agent holding the token's sealed attribution (core `events`), so the cached allow
/// path does no crypto and checks no seal.
pub type SealSlot = Rc<OnceCell<crate::events::UserAgentPrefix>>;

/// Fixed cost of a cache entry besides the token and its claims (hash slot, order slot,
/// `Rc` headers), in bytes.
const ENTRY_OVERHEAD: usize = 96;

impl TokenCache {
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache::with_limits(capacity, usize::MAX)
    }

    /// A cache of at most `capacity` entries and about `max_bytes` bytes.
    pub fn with_limits(capacity: usize, max_bytes: usize) -> TokenCache {
        TokenCache {
            capacity: capacity.max(1),
            max_bytes,
            bytes: 0,
            entries: HashMap::default(),
            order: VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes accounted to the cached entries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, key: &str) {
        if let Some((_, _, cost)) = self.entries.remove(key) {
            self.bytes = self.bytes.saturating_sub(cost);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached verification of `token` if it has not expired; an expired entry is dropped.
    fn live(&mut self, token: &str, now: i64, leeway: i64) -> Option<(Rc<VerifiedToken>, SealSlot)> {
        match self.entries.get(token) {
            None => return None,
            Some((v, seal, _)) if now <= v.expires_at.saturating_add(leeway) => return Some((v.clone(), seal.clone())),
            Some(_) => {}
        }
        self.remove(token);
        self.order.retain(|k| &**k != token);
        None
    }

    /// Inserts a verified token (evicting the oldest while over the entry or byte bound)
    /// and returns the entry. An entry larger than the byte bound is returned uncached.
    fn insert(&mut self, token: &str, verified: VerifiedToken) -> (Rc<VerifiedToken>, SealSlot) {
        let cost = token.len() + verified.approx_bytes() + sealed_bytes(&verified) + ENTRY_OVERHEAD;
        let verified = Rc::new(verified);
        let seal = SealSlot::default();
        if cost > self.max_bytes {
            return (verified, seal);
        }
        while self.entries.len() >= self.capacity || self.bytes.saturating_add(cost) > self.max_bytes {
            match self.order.pop_front() {
                Some(oldest) => self.remove(&oldest),
                None => break,
            }
        }
        let key: Rc<str> = Rc::from(token);
        self.order.push_back(key.clone());
        self.bytes = self.bytes.saturating_add(cost);
        if let Some((_, _, old)) = self.entries.insert(key, (verified.clone(), seal.clone(), cost)) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        (verified, seal)
    }
}

/// About the size of a token's sealed attribution (base64url of nonce, tag and a short JSON
/// of name, type, `user` JWT and expiry), accounted to its cache entry up front.
fn sealed_bytes(v: &VerifiedToken) -> usize {
    (v.subject.len() + v.auth_type.as_deref().map_or(0, str::len) + v.user.as_deref().map_or(0, str::len) + 96) * 4 / 3
}

/// One filter instance's state: compiled configuration and token cache.
#[derive(Debug)]
pub struct Guard {
    pub config: FilterConfig,
    pub cache: TokenCache,
    /// Set while the bundle source has been silent longer than allowed (the reason): every
    /// request is refused.
    pub stale: Option<String>,
}

/// A decision plus who asked, for logging.
#[derive(Debug)]
pub struct Checked {
    pub decision: Decision,
    /// The verified token, if one was presented and verified (shared with the cache).
    pub token: Option<Rc<VerifiedToken>>,
    /// Revision of the bundle the request was decided under.
    pub revision: u64,
    /// Where the token's sealed attribution is kept (with the cached token; `None` without
    /// a verified token).
    pub sealed: Option<SealSlot>,
    /// Whether the token was found in the cache (`None`: no bearer token presented).
    pub cache_hit: Option<bool>,
    /// The scopes the request needs (`repository:acme/web:pull,push` …), filled only for
    /// denials and dry-run would-denies, for the audit line.
    pub scopes: Option<String>,
}

impl Checked {
    fn new(decision: Decision, revision: u64) -> Checked {
        Checked { decision, token: None, sealed: None, revision, cache_hit: None, scopes: None }
    }

    /// `sub` of the verified token.
    pub fn subject(&self) -> Option<&str> {
        self.token.as_deref().map(|t| t.subject.as_str())
    }

    /// `auth_type` of the verified token (`password`, `pat`, `deploy_token`, …).
    pub fn auth_type(&self) -> Option<&str> {
        self.token.as_deref()?.auth_type.as_deref()
    }

    /// The nested `user` JWT of the verified token (for event attribution).
    pub fn user(&self) -> Option<&str> {
        self.token.as_deref()?.user.as_deref()
    }

    /// Whether this request gets an audit line: a denial, or a dry-run rule that would deny.
    pub fn is_audited(&self) -> bool {
        matches!(self.decision, Decision::Deny(_) | Decision::Allow { would_deny: Some(_), .. })
    }
}

impl Guard {
    pub fn new(config: FilterConfig) -> Guard {
        let cache = TokenCache::with_limits(config.cache_entries, config.cache_bytes);
        Guard { config, cache, stale: None }
    }

    /// Makes `policy` (a verified bundle, newer than the active one) the policy of every
    /// following decision. Cached tokens stay: they hold verified signatures, and every
    /// decision is taken afresh under the policy.
    pub fn activate(&mut self, policy: crate::policy::bundle::Policy) {
        self.config.policy = policy;
    }

    /// Makes `keys` the trusted token keys of every following decision (fetched from the keys
    /// source). The token cache is emptied: a cached token signed by a key no longer trusted
    /// must not keep passing.
    pub fn replace_keys(&mut self, keys: crate::token::jwks::KeySet) {
        self.config.verifier.keys = keys;
        self.cache = TokenCache::with_limits(self.config.cache_entries, self.config.cache_bytes);
    }

    /// Decides one request at time `now` (unix seconds).
    pub fn check(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        authorization: &[&str],
        now: i64,
    ) -> Checked {
        if let Some(why) = &self.stale {
            let denial = Denial {
                status: 503,
                code: "UNAVAILABLE",
                message: "registry-guard cannot confirm its policy is current; try again later".into(),
                www_authenticate: None,
                reason: why.clone(),
                rule: None,
                kind: DenyKind::StalePolicy,
            };
            return Checked::new(Decision::Deny(denial), self.config.policy.revision);
        }
        if self.config.verifier.keys.is_empty() {
            // Only with a keys source and no inline keys: nothing is decided before the first
            // good JWKS (fail closed; not even anonymous requests).
            let denial = Denial {
                status: 503,
                code: "UNAVAILABLE",
                message: "registry-guard has no trusted token keys yet; try again later".into(),
                www_authenticate: None,
                reason: "no trusted token keys yet: waiting for the first good JWKS from the keys source".into(),
                rule: None,
                kind: DenyKind::StalePolicy,
            };
            return Checked::new(Decision::Deny(denial), self.config.policy.revision);
        }
        let route = classify(method, path, content_type);
        let mut checked = self.check_route(route.as_ref(), authorization, now);
        if checked.is_audited() {
            if let Ok(route) = &route {
                checked.scopes = Some(route.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" "));
            }
        }
        checked
    }

    fn check_route(
        &mut self,
        route: Result<&crate::request::route::Route, &crate::request::route::RouteError>,
        authorization: &[&str],
        now: i64,
    ) -> Checked {
        let challenge = &self.config.challenge;
        let revision = self.config.policy.revision;
        let endpoint = self.config.endpoint;
        let token = match bearer_candidate(authorization) {
            Err(why) => {
                let decision =
                    decide_at(endpoint, route, Credential::NotBearer(why), challenge, &self.config.policy, now);
                return Checked::new(decision, revision);
            }
            Ok(None) => {
                let decision = decide_at(endpoint, route, Credential::Missing, challenge, &self.config.policy, now);
                return Checked::new(decision, revision);
            }
            Ok(Some(t)) => t,
        };
        let leeway = self.config.verifier.leeway_seconds;
        let cached = self.cache.live(token, now, leeway);
        let hit = cached.is_some();
        let (verified, sealed) = match cached {
            Some(v) => {
                self.cache.hits += 1;
                v
            }
            None => {
                // The byte-level check runs before verification; a cached token passed it
                // when it was inserted (the cache compares whole tokens), so a hit skips it.
                if !is_b64token(token) {
                    let why = crate::decide::decision::NOT_BEARER;
                    let decision =
                        decide_at(endpoint, route, Credential::NotBearer(why), challenge, &self.config.policy, now);
                    return Checked::new(decision, revision);
                }
                self.cache.misses += 1;
                match self.config.verifier.verify_signature_and_claims(token) {
                    Ok(v) => self.cache.insert(token, v),
                    Err(e) => return invalid(endpoint, route, &e, challenge, revision, hit),
                }
            }
        };
        if let Err(e) = verified.check_time(now, leeway) {
            return invalid(endpoint, route, &e, challenge, revision, hit);
        }
        let decision = decide_at(endpoint, route, Credential::Valid(&verified), challenge, &self.config.policy, now);
        Checked { decision, token: Some(verified), sealed: Some(sealed), revision, cache_hit: Some(hit), scopes: None }
    }
}

fn invalid(
    endpoint: crate::decide::config::ServedEndpoint,
    route: Result<&crate::request::route::Route, &crate::request::route::RouteError>,
    e: &TokenError,
    challenge: &crate::decide::config::ChallengeConfig,
    revision: u64,
    cache_hit: bool,
) -> Checked {
    let decision =
        decide_at(endpoint, route, Credential::Invalid(e), challenge, &crate::policy::bundle::Policy::default(), 0);
    Checked { cache_hit: Some(cache_hit), ..Checked::new(decision, revision) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::scope::Scope;
    use crate::token::claims::{AccessClaim, Audience, RegistryClaims};
    use crate::token::sign::{sign, Validity};
    use crate::token::testing::es256_key;

    const NOW: i64 = 1_800_000_000;

    fn guard(cap: usize) -> Guard {
        let cfg = serde_json::json!({
            "realm": "http://127.0.0.1:5001/jwt/auth",
            "service": "container_registry",
            "issuer": "registry-guard",
            "leeway_seconds": 0,
            "jwks": crate::token::testing::jwks(&[&es256_key(1)]),
            "cache": {"max_entries": cap},
        });
        Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap())
    }

    fn token(sub: &str, exp: i64) -> String {
        let claims = RegistryClaims {
            iss: "registry-guard".into(),
            sub: sub.into(),
            aud: Audience::One("container_registry".into()),
            jti: sub.into(),
            access: vec![AccessClaim {
                resource_type: "repository".into(),
                name: "acme/web".into(),
                actions: vec!["pull".into()],
                meta: None,
            }],
            auth_type: None,
            user: None,
            extra: Default::default(),
        };
        sign(&es256_key(1), claims, Validity { issued_at: NOW, not_before: NOW, expires_at: exp }).unwrap()
    }

    #[test]
    fn replaced_keys_take_effect_at_once_even_for_cached_tokens() {
        use crate::token::jwks::KeySet;
        use crate::token::testing::jwks;
        let mut g = guard(8);
        let t = token("rita", NOW + 600);
        let path = "/v2/acme/web/manifests/v1";
        let status = |g: &mut Guard, auth: &[&str]| match g.check("GET", path, None, auth, NOW).decision {
            Decision::Deny(d) => d.status,
            Decision::Allow { .. } => 200,
        };
        let bearer = format!("Bearer {t}");
        assert_eq!(status(&mut g, &[&bearer]), 200);
        assert_eq!(g.cache.len(), 1);
        // Key 1 retired (key 2 only): the cached token is refused.
        g.replace_keys(KeySet::from_jwks(&jwks(&[&es256_key(2)])).unwrap());
        assert_eq!(g.cache.len(), 0);
        assert_eq!(status(&mut g, &[&bearer]), 401);
        // No keys at all (a keys source not yet answered): everything is refused, anonymous too.
        g.replace_keys(KeySet::default());
        assert_eq!(status(&mut g, &[&bearer]), 503);
        assert_eq!(status(&mut g, &[]), 503);
        g.replace_keys(KeySet::from_jwks(&jwks(&[&es256_key(1), &es256_key(2)])).unwrap());
        assert_eq!(status(&mut g, &[&bearer]), 200);
        assert_eq!(status(&mut g, &[]), 401);
    }

    #[test]
    fn cache_hits_are_bounded_and_recheck_expiry() {
        let mut g = guard(2);
        let t1 = format!("Bearer {}", token("a", NOW + 10));
        let t2 = format!("Bearer {}", token("b", NOW + 10));
        let t3 = format!("Bearer {}", token("c", NOW + 10));
        for t in [&t1, &t1, &t2, &t3] {
            let c = g.check("GET", "/v2/acme/web/manifests/v1", None, &[t], NOW);
            assert!(c.decision.is_allow());
        }
        assert_eq!((g.cache.hits, g.cache.misses, g.cache.len()), (1, 3, 2));
        // t1 was evicted (oldest): verifying it again is a miss.
        assert!(g.check("GET", "/v2/", None, &[&t1], NOW).decision.is_allow());
        assert_eq!(g.cache.misses, 4);
        // A cached token past its expiry is refused and dropped.
        let c = g.check("GET", "/v2/", None, &[&t1], NOW + 11);
        assert_eq!(c.decision.status(), 401);
        assert!(g.cache.len() <= 2);
    }

    #[test]
    fn cache_is_bounded_in_bytes() {
        // Issue 14: 4,400 valid ~15 KB tokens grew Envoy by hundreds of MiB; the cache is now
        // bounded in bytes as well as entries.
        let mut c = TokenCache::with_limits(1000, 64 * 1024);
        let big = |sub: &str| VerifiedToken {
            subject: sub.into(),
            expires_at: NOW + 100,
            grants: (0..100).map(|i| Scope::parse(&format!("repository:acme/p{i}:pull")).unwrap()).collect(),
            ..Default::default()
        };
        for i in 0..200 {
            let token = format!("{i}-{}", "t".repeat(15_000));
            c.insert(&token, big("dev"));
            assert!(c.bytes() <= 64 * 1024, "{}", c.bytes());
        }
        assert!(c.len() >= 2 && c.len() <= 4, "{}", c.len());
        // An entry larger than the whole budget is not cached.
        let mut small = TokenCache::with_limits(1000, 1024);
        small.insert(&"t".repeat(2000), big("dev"));
        assert_eq!((small.len(), small.bytes()), (0, 0));
        // Expiry removes the bytes too.
        let mut c = TokenCache::with_limits(10, 1 << 20);
        c.insert("a", VerifiedToken { expires_at: NOW, ..Default::default() });
        assert!(c.bytes() > 0);
        assert!(c.live("a", NOW + 1, 0).is_none());
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn wrong_repository_is_denied_with_insufficient_scope() {
        let mut g = guard(8);
        let t = format!("Bearer {}", token("a", NOW + 10));
        let c = g.check("GET", "/v2/other/tools/manifests/v1", None, &[&t], NOW);
        let Decision::Deny(d) = c.decision else { panic!() };
        assert_eq!(d.code, "DENIED");
    }
}
