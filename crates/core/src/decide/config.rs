//! The filter's configuration: raw serde types → a compiled, checked form.

use serde::Deserialize;

use crate::events::AttributionKey;
use crate::policy::bundle::{self, Policy};
use crate::token::jwks::KeySet;
use crate::token::verify::Verifier;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilterConfig<'a> {
    /// Token endpoint URL clients are sent to (`realm` of the challenge).
    realm: String,
    /// Service name: the challenge's `service` and the required token audience.
    service: String,
    /// Required `iss` of tokens.
    issuer: String,
    #[serde(default = "default_leeway")]
    leeway_seconds: i64,
    /// JWKS document with the trusted verification keys; with `keys_source` the boot
    /// fallback, and optional (absent: every request is refused until the first good JWKS).
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    /// Where the filter fetches its trusted keys itself (a JWKS URL behind an Envoy cluster).
    #[serde(default)]
    keys_source: Option<crate::token::keys_source::KeysSource>,
    #[serde(default)]
    cache: RawCache,
    /// The active policy bundle: a compact JWS signed by an operator key (`rgctl sign`).
    /// Borrowed from the configuration bytes (a JWS has no JSON escapes), so a large bundle
    /// is not copied during activation (`support::de::borrowed_cow_str`).
    #[serde(default, borrow, deserialize_with = "crate::support::de::borrowed_cow_str")]
    bundle: Option<std::borrow::Cow<'a, str>>,
    /// JWKS with the operator keys that may sign bundles; required with `bundle`.
    #[serde(default)]
    bundle_keys: Option<serde_json::Value>,
    /// The deployment this filter serves: a bundle must name exactly this environment
    /// (or none, when this is absent).
    #[serde(default)]
    environment: Option<String>,
    /// `registry` (default) for this role.
    #[serde(default)]
    #[allow(dead_code)]
    role: Option<RegistryRole>,
    /// Where the client's address for its events comes from (see `events`).
    #[serde(default)]
    correlation: RawCorrelation,
    /// The fleet's attribution key (see `events`).
    #[serde(default)]
    attribution: Option<RawAttribution>,
    /// TEST ONLY, off by default: deliberately trap the wasm VM (see [`FaultInjection`]).
    /// Without the `fault-injection` feature the field does not exist, so a configuration
    /// naming it is refused as an unknown field.
    #[cfg(feature = "fault-injection")]
    #[serde(default)]
    fault_injection: Option<RawFaultInjection>,
    /// At most this many bytes of a refused request's body are read (and dropped) before the
    /// refusal is sent; past it the refusal goes out at once and the connection is closed.
    #[serde(default = "default_denied_body_drain_bytes")]
    denied_body_drain_bytes: u64,
    /// Which endpoint this filter guards: `registry` (default) or `dependency-proxy`.
    #[serde(default)]
    endpoint: ServedEndpoint,
    /// Where the filter fetches newer bundles itself (see `follow`); `bundle` is then the
    /// boot fallback.
    #[serde(default)]
    bundle_source: Option<crate::policy::follow::BundleSource>,
}

/// Where clients get tokens: the `realm` and `service` of the Bearer challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeConfig {
    pub realm: String,
    pub service: String,
}

/// The endpoint a registry-role filter guards (its Envoy listener).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServedEndpoint {
    /// The registry API (and, as before, the in-registry dependency proxy route).
    #[default]
    Registry,
    /// The group dependency proxy on its own host, as GitLab serves it: only
    /// `GET /v2/` and pulls of `<group>/dependency_proxy/containers/<image>`; a deploy token
    /// logs in and pulls only if it is a group token with `read_registry` and `write_registry`.
    DependencyProxy,
}

/// Default of `denied_body_drain_bytes`: 8 MiB, twice the manifest size limit of registries
/// (distribution 3, GitLab): every refused manifest `PUT` is read to its end.
pub const DEFAULT_DENIED_BODY_DRAIN_BYTES: u64 = 8 << 20;

fn default_denied_body_drain_bytes() -> u64 {
    DEFAULT_DENIED_BODY_DRAIN_BYTES
}

#[cfg(feature = "fault-injection")]
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFaultInjection {
    #[serde(default)]
    trap_on_header: Option<String>,
    #[serde(default)]
    refuse_configure_after_first: bool,
}

/// TEST ONLY (the e2e fault suite): a request carrying this header makes the filter execute
/// a wasm `unreachable` instruction, a real VM trap, to prove Envoy then fails closed and
/// recovers. Absent from every production configuration (`rgctl filter-config` never writes it),
/// and compiled only with the `fault-injection` feature (the test-only filter build).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultInjection {
    /// Lower-case request header name.
    pub trap_on_header: Option<String>,
    /// The filter accepts this configuration the first time a VM of this Envoy process is
    /// configured with it and refuses it every later time (counted in shared data): Envoy's
    /// main thread checks a configuration first, so its workers refuse what it accepted —
    /// the failure that once let requests pass unfiltered; Envoy's backstop must refuse them.
    pub refuse_configure_after_first: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RegistryRole {
    Registry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCorrelation {
    /// The shared-data ring of earlier versions: accepted and ignored (with a warning), so
    /// an old configuration does not fail an upgrade closed.
    #[serde(default)]
    slots: Option<u32>,
    /// Where the client's address recorded for its events comes from.
    #[serde(default)]
    client_address: ClientAddress,
}

impl RawCorrelation {
    fn warnings(&self) -> Vec<String> {
        match self.slots {
            Some(_) => vec!["`correlation.slots` is ignored: attribution no longer uses a shared-data ring".into()],
            None => Vec::new(),
        }
    }
}

/// `attribution` in both roles' configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribution {
    /// 32 bytes, base64url: the registry role seals with it, the events role opens with it.
    key: String,
    /// Older keys the events role still opens (a key rotation across the fleet).
    #[serde(default)]
    previous_keys: Vec<String>,
    /// Seconds after a token's expiry its events are still attributed (deliveries retried).
    #[serde(default = "default_max_delay")]
    max_delay_seconds: u32,
}

fn default_max_delay() -> u32 {
    DEFAULT_ATTRIBUTION_MAX_DELAY_SECONDS
}

/// Default of `attribution.max_delay_seconds`: a day of delivery retries.
pub const DEFAULT_ATTRIBUTION_MAX_DELAY_SECONDS: u32 = 86_400;

/// The compiled `attribution` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributionConfig {
    /// The current key first, then the previous ones.
    pub keys: Vec<AttributionKey>,
    pub max_delay_seconds: u32,
}

impl AttributionConfig {
    /// The key the registry role seals with.
    pub fn sealing_key(&self) -> Option<&AttributionKey> {
        self.keys.first()
    }
}

fn attribution(raw: Option<RawAttribution>) -> Result<Option<AttributionConfig>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let mut keys = vec![AttributionKey::from_base64url(&raw.key).map_err(|e| error("$.attribution.key", e))?];
    for (i, k) in raw.previous_keys.iter().enumerate() {
        keys.push(
            AttributionKey::from_base64url(k).map_err(|e| error(&format!("$.attribution.previous_keys[{i}]"), e))?,
        );
    }
    if raw.previous_keys.len() > 8 {
        return Err(error("$.attribution.previous_keys", "at most 8 previous keys"));
    }
    if raw.max_delay_seconds > 30 * 86_400 {
        return Err(error("$.attribution.max_delay_seconds", "must be at most 2592000 (30 days)"));
    }
    Ok(Some(AttributionConfig { keys, max_delay_seconds: raw.max_delay_seconds }))
}

/// Where the registry role reads the client's address that the events role restores into
/// each event's `request.addr`, and writes as the registry's `X-Forwarded-For`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddress {
    /// The downstream peer (`source.address`: one property lookup per request).
    #[default]
    Peer,
    /// The last `X-Forwarded-For` entry, which Envoy appends itself when the listener's
    /// connection manager has `use_remote_address: true` (as `envoy/envoy.yaml` does). Free:
    /// the filter already holds the headers. Without `use_remote_address` that entry is
    /// whatever the client sent, so use this only with it. No header: the peer is looked up.
    XForwardedFor,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEventsConfig {
    #[allow(dead_code)]
    role: EventsRole,
    #[serde(default = "default_max_envelope")]
    max_envelope_bytes: usize,
    #[serde(default)]
    correlation: RawCorrelation,
    #[serde(default)]
    attribution: Option<RawAttribution>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum EventsRole {
    Events,
}

fn default_max_envelope() -> usize {
    1 << 20
}

/// The events role: rewrite the registry's notification envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsConfig {
    /// Larger envelopes pass unmodified (and are counted).
    pub max_envelope_bytes: usize,
    /// Keys that open attributions (`None`: no event is attributed).
    pub attribution: Option<AttributionConfig>,
    /// Accepted but ignored settings, for the log.
    pub warnings: Vec<String>,
}

/// A plugin configuration: which role this filter instance plays.
#[derive(Debug, Clone)]
pub enum PluginConfig {
    /// In front of the registry: decide every request.
    Registry(Box<FilterConfig>),
    /// On the notification path: enrich events.
    Events(EventsConfig),
}

impl PluginConfig {
    pub fn from_json(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
        // Only `role` is read here; everything else (the bundle can be megabytes) is skipped
        // without being copied.
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            role: Option<String>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| error("$", format!("not JSON: {e}")))?;
        match probe.role.as_deref() {
            Some("events") => {
                let raw: RawEventsConfig = crate::support::de::from_slice(bytes).map_err(path_error)?;
                if raw.max_envelope_bytes == 0 || raw.max_envelope_bytes > 64 << 20 {
                    return Err(error("$.max_envelope_bytes", "must be between 1 and 67108864"));
                }
                Ok(PluginConfig::Events(EventsConfig {
                    max_envelope_bytes: raw.max_envelope_bytes,
                    warnings: raw.correlation.warnings(),
                    attribution: attribution(raw.attribution)?,
                }))
            }
            None | Some("registry") => Ok(PluginConfig::Registry(Box::new(FilterConfig::from_json(bytes)?))),
            Some(other) => Err(error("$.role", format!("unknown role `{other}` (expected `registry` or `events`)"))),
        }
    }
}

fn path_error(e: crate::support::de::PathError) -> ConfigError {
    ConfigError { field: e.path, reason: e.reason }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "default_cache_entries")]
    max_entries: usize,
    /// Bound on the bytes of cached tokens and their parsed claims (see `guard::TokenCache`).
    #[serde(default = "default_cache_bytes")]
    max_bytes: usize,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache { max_entries: default_cache_entries(), max_bytes: default_cache_bytes() }
    }
}

/// Default byte bound of the token cache: 16 MiB per VM (about 4,000 typical 2 KiB tokens
/// with their claims; about 500 of the largest, 16 KiB, tokens).
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;

fn default_cache_bytes() -> usize {
    DEFAULT_CACHE_BYTES
}

fn default_leeway() -> i64 {
    30
}

fn default_cache_entries() -> usize {
    4096
}

/// The request header the registry role sets on every request it allows, and that Envoy's
/// route requires before it forwards anything to the registry (the backstop: a request the
/// filter did not positively allow — filter absent, unconfigured, failed, bypassed — meets
/// Envoy's own refusal). Envoy removes any client-sent copy before the filter runs and
/// removes the filter's copy before forwarding (`envoy/envoy.yaml`).
pub const DECISION_HEADER: &str = "x-registry-guard-decision";
/// The value of [`DECISION_HEADER`] on an allowed request.
pub const DECISION_ALLOW: &str = "allow";

/// The compiled configuration.
#[derive(Debug, Clone)]
pub struct FilterConfig {
    pub challenge: ChallengeConfig,
    pub verifier: Verifier,
    pub cache_entries: usize,
    /// Byte bound of the token cache (`cache.max_bytes`).
    pub cache_bytes: usize,
    /// The verified bundle (`Policy::default()`, revision 0, when none is configured).
    pub policy: Policy,
    /// The deployment this filter serves (bundles must name it).
    pub environment: Option<String>,
    /// The attribution key (`None`: requests are tagged without a seal, unattributable).
    pub attribution: Option<AttributionConfig>,
    /// Where the client address for event attribution comes from.
    pub client_address: ClientAddress,
    /// Accepted but ignored settings, for the log.
    pub warnings: Vec<String>,
    /// TEST ONLY fault injection; `None` unless the configuration asks for it.
    #[cfg(feature = "fault-injection")]
    pub fault_injection: Option<FaultInjection>,
    /// How much of a refused request's body is read before the refusal (see the raw field).
    pub denied_body_drain_bytes: u64,
    /// The endpoint this filter guards.
    pub endpoint: ServedEndpoint,
    /// Where newer bundles are fetched from, if anywhere.
    pub bundle_source: Option<crate::policy::follow::BundleSource>,
    /// The operator keys that may sign bundles (required with `bundle` or `bundle_source`).
    pub bundle_keys: Option<KeySet>,
    /// Where the trusted token keys are fetched from, if anywhere (`verifier.keys` is then
    /// the boot fallback, possibly empty).
    pub keys_source: Option<crate::token::keys_source::KeysSource>,
}

/// A configuration error naming the field (JSON path) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn error(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_owned(), reason: reason.into() }
}

impl FilterConfig {
    pub fn from_json(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        let raw: RawFilterConfig = crate::support::de::from_slice(bytes).map_err(path_error)?;
        if !(raw.realm.starts_with("http://") || raw.realm.starts_with("https://")) {
            return Err(error("$.realm", format!("`{}` is not an http(s) URL", raw.realm)));
        }
        if raw.realm.contains('"') || raw.service.contains('"') {
            return Err(error("$.realm", "must not contain `\"`"));
        }
        if raw.service.is_empty() {
            return Err(error("$.service", "must not be empty"));
        }
        if raw.issuer.is_empty() {
            return Err(error("$.issuer", "must not be empty"));
        }
        if !(0..=300).contains(&raw.leeway_seconds) {
            return Err(error("$.leeway_seconds", "must be between 0 and 300"));
        }
        if raw.cache.max_entries == 0 || raw.cache.max_entries > 1_000_000 {
            return Err(error("$.cache.max_entries", "must be between 1 and 1000000"));
        }
        if raw.denied_body_drain_bytes > 1 << 30 {
            return Err(error("$.denied_body_drain_bytes", "must be at most 1073741824"));
        }
        if raw.cache.max_bytes < 64 * 1024 || raw.cache.max_bytes > 1 << 30 {
            return Err(error("$.cache.max_bytes", "must be between 65536 and 1073741824"));
        }
        #[cfg(feature = "fault-injection")]
        let fault_injection = match raw.fault_injection {
            None => None,
            Some(f) => {
                let header = f.trap_on_header.map(|h| h.to_ascii_lowercase());
                if header
                    .as_ref()
                    .is_some_and(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
                {
                    return Err(error("$.fault_injection.trap_on_header", "must be a header name ([A-Za-z0-9-]+)"));
                }
                Some(FaultInjection {
                    trap_on_header: header,
                    refuse_configure_after_first: f.refuse_configure_after_first,
                })
            }
        };
        if let Some(source) = &raw.keys_source {
            source.check().map_err(|(field, reason)| ConfigError { field, reason })?;
        }
        let keys = match (&raw.jwks, &raw.keys_source) {
            (Some(jwks), _) => KeySet::from_jwks(jwks).map_err(|e| error("$.jwks", e.to_string()))?,
            (None, Some(_)) => KeySet::default(),
            (None, None) => return Err(error("$.jwks", "required unless `keys_source` names where keys come from")),
        };
        if let Some(env) = &raw.environment {
            if !bundle::valid_environment(env) {
                return Err(error(
                    "$.environment",
                    format!("`{}` must be 1-64 of [A-Za-z0-9._-]", bundle::excerpt(env, 64)),
                ));
            }
        }
        let bundle_keys = match &raw.bundle_keys {
            None if raw.bundle.is_some() => return Err(error("$.bundle_keys", "required when `bundle` is set")),
            None if raw.bundle_source.is_some() => {
                return Err(error("$.bundle_keys", "required when `bundle_source` is set"))
            }
            None => None,
            Some(keys) => Some(KeySet::from_jwks(keys).map_err(|e| error("$.bundle_keys", e.to_string()))?),
        };
        if let Some(source) = &raw.bundle_source {
            source.check().map_err(|(field, reason)| ConfigError { field, reason })?;
        }
        let policy = match (&raw.bundle, &bundle_keys) {
            (Some(jws), Some(keys)) => bundle::verify_for(jws, keys, raw.environment.as_deref())
                .map_err(|e| error("$.bundle", format!("bundle rejected: {e}")))?,
            _ => Policy::default(),
        };
        Ok(FilterConfig {
            challenge: ChallengeConfig { realm: raw.realm, service: raw.service.clone() },
            verifier: Verifier { keys, issuer: raw.issuer, audience: raw.service, leeway_seconds: raw.leeway_seconds },
            cache_entries: raw.cache.max_entries,
            cache_bytes: raw.cache.max_bytes,
            policy,
            environment: raw.environment,
            warnings: raw.correlation.warnings(),
            attribution: attribution(raw.attribution)?,
            client_address: raw.correlation.client_address,
            #[cfg(feature = "fault-injection")]
            fault_injection,
            denied_body_drain_bytes: raw.denied_body_drain_bytes,
            endpoint: raw.endpoint,
            bundle_source: raw.bundle_source,
            bundle_keys,
            keys_source: raw.keys_source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::testing::{es256_key, jwks};

    fn config(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "realm": "http://127.0.0.1:5001/jwt/auth",
            "service": "container_registry",
            "issuer": "registry-guard",
            "jwks": jwks(&[&es256_key(1)]),
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    #[test]
    fn inline_keys_are_optional_only_with_a_keys_source() {
        let mut c = config(serde_json::json!({}));
        c.as_object_mut().unwrap().remove("jwks");
        let e = FilterConfig::from_json(c.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, "$.jwks");
        c["keys_source"] = serde_json::json!({"cluster": "token_service", "refresh_seconds": 5});
        let f = FilterConfig::from_json(c.to_string().as_bytes()).unwrap();
        assert!(f.verifier.keys.is_empty());
        assert_eq!(f.keys_source.unwrap().refresh_seconds, 5);
        c["keys_source"]["refresh_seconds"] = 0.into();
        let e = FilterConfig::from_json(c.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.field, "$.keys_source.refresh_seconds");
        c["keys_source"] = serde_json::json!({"cluster": "token_service", "url": "http://x"});
        let e = FilterConfig::from_json(c.to_string().as_bytes()).unwrap_err();
        assert!(e.field.starts_with("$.keys_source"), "{e}");
    }

    #[test]
    fn the_bundle_is_borrowed_from_the_configuration_bytes() {
        // Activation memory at 100,000 rules (issue 20): the JWS is most of the bytes.
        let bytes = config(serde_json::json!({"bundle": "eyJh.eyJi.c2ln"})).to_string();
        let raw: RawFilterConfig = crate::support::de::from_slice(bytes.as_bytes()).unwrap();
        assert!(matches!(raw.bundle, Some(std::borrow::Cow::Borrowed("eyJh.eyJi.c2ln"))));
        let bytes = config(serde_json::json!({})).to_string();
        let raw: RawFilterConfig = crate::support::de::from_slice(bytes.as_bytes()).unwrap();
        assert!(raw.bundle.is_none());
    }

    #[test]
    fn valid_config_compiles() {
        let c = FilterConfig::from_json(config(serde_json::json!({})).to_string().as_bytes()).unwrap();
        assert_eq!(c.verifier.leeway_seconds, 30);
        assert_eq!(c.cache_entries, 4096);
        assert_eq!(c.verifier.keys.len(), 1);
        #[cfg(feature = "fault-injection")]
        assert_eq!(c.fault_injection, None, "fault injection is off by default");
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn fault_injection_is_an_unknown_field_without_the_feature() {
        // The release filter cannot be told to trap: the field is refused like any typo.
        let e = FilterConfig::from_json(
            config(serde_json::json!({"fault_injection": {"trap_on_header": "x-registry-guard-trap"}}))
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `fault_injection`"), "{e}");
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn fault_injection_is_explicit() {
        let c = FilterConfig::from_json(
            config(serde_json::json!({"fault_injection": {"trap_on_header": "X-Registry-Guard-Trap"}}))
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            c.fault_injection,
            Some(FaultInjection {
                trap_on_header: Some("x-registry-guard-trap".into()),
                refuse_configure_after_first: false
            })
        );
        for bad in [
            serde_json::json!({"trap_on_header": ""}),
            serde_json::json!({"trap_on_header": "a b"}),
            serde_json::json!({"header": "x"}),
            serde_json::json!({"refuse_configure_after_first": "yes"}),
        ] {
            let e = FilterConfig::from_json(config(serde_json::json!({"fault_injection": bad})).to_string().as_bytes())
                .unwrap_err();
            assert!(e.field.starts_with("$.fault_injection"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (serde_json::json!({"leeway": 3}), "$.leeway"),
            (serde_json::json!({"realm": "ftp://x"}), "$.realm"),
            (serde_json::json!({"leeway_seconds": "3"}), "$.leeway_seconds"),
            (serde_json::json!({"leeway_seconds": 1000}), "$.leeway_seconds"),
            (serde_json::json!({"jwks": {"keys": []}}), "$.jwks"),
            (serde_json::json!({"cache": {"max_entries": 0}}), "$.cache.max_entries"),
            (serde_json::json!({"cache": {"size": 1}}), "$.cache.size"),
        ];
        for (extra, field) in cases {
            let e = FilterConfig::from_json(config(extra.clone()).to_string().as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        assert_eq!(FilterConfig::from_json(b"nope").unwrap_err().field, "$");
    }

    #[test]
    fn endpoint_and_drain_settings() {
        let c = FilterConfig::from_json(config(serde_json::json!({})).to_string().as_bytes()).unwrap();
        assert_eq!((c.endpoint, c.denied_body_drain_bytes), (ServedEndpoint::Registry, 8 << 20));
        let c = FilterConfig::from_json(
            config(serde_json::json!({"endpoint": "dependency-proxy", "denied_body_drain_bytes": 1024}))
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!((c.endpoint, c.denied_body_drain_bytes), (ServedEndpoint::DependencyProxy, 1024));
        for (bad, field) in [
            (serde_json::json!({"endpoint": "proxy"}), "$.endpoint"),
            (serde_json::json!({"denied_body_drain_bytes": 2u64 << 30}), "$.denied_body_drain_bytes"),
        ] {
            let e = FilterConfig::from_json(config(bad).to_string().as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn roles() {
        let reg =
            PluginConfig::from_json(config(serde_json::json!({"role": "registry"})).to_string().as_bytes()).unwrap();
        assert!(matches!(reg, PluginConfig::Registry(c) if c.attribution.is_none() && c.warnings.is_empty()));
        let ev = PluginConfig::from_json(br#"{"role": "events", "max_envelope_bytes": 1000}"#).unwrap();
        assert_eq!(ev_config(ev), EventsConfig { max_envelope_bytes: 1000, attribution: None, warnings: vec![] });
        assert_eq!(PluginConfig::from_json(br#"{"role": "events", "jwks": {}}"#).unwrap_err().field, "$.jwks");
        assert_eq!(PluginConfig::from_json(br#"{"role": "both"}"#).unwrap_err().field, "$.role");
    }

    fn ev_config(c: PluginConfig) -> EventsConfig {
        match c {
            PluginConfig::Events(e) => e,
            PluginConfig::Registry(_) => panic!("expected events"),
        }
    }

    #[test]
    fn attribution_keys_and_the_old_ring_setting() {
        let key = AttributionKey::from_bytes([7; 32]);
        let old = AttributionKey::from_bytes([6; 32]);
        let ev = PluginConfig::from_json(
            serde_json::json!({"role": "events", "correlation": {"slots": 4096},
                "attribution": {"key": key.to_base64url(), "previous_keys": [old.to_base64url()], "max_delay_seconds": 60}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let ev = ev_config(ev);
        assert_eq!(ev.attribution, Some(AttributionConfig { keys: vec![key.clone(), old], max_delay_seconds: 60 }));
        assert_eq!(ev.warnings.len(), 1, "an old `correlation.slots` is accepted, with a warning");
        let reg = FilterConfig::from_json(
            config(serde_json::json!({"correlation": {"slots": 0, "client_address": "x-forwarded-for"},
                "attribution": {"key": key.to_base64url()}}))
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(reg.attribution.as_ref().and_then(AttributionConfig::sealing_key), Some(&key));
        assert_eq!(reg.attribution.map(|a| a.max_delay_seconds), Some(DEFAULT_ATTRIBUTION_MAX_DELAY_SECONDS));
        assert_eq!((reg.client_address, reg.warnings.len()), (ClientAddress::XForwardedFor, 1));
        for (bad, field) in [
            (serde_json::json!({"attribution": {"key": "short"}}), "$.attribution.key"),
            (serde_json::json!({"attribution": {}}), "$.attribution"),
            (
                serde_json::json!({"attribution": {"key": key.to_base64url(), "previous_keys": ["x"]}}),
                "$.attribution.previous_keys[0]",
            ),
            (
                serde_json::json!({"attribution": {"key": key.to_base64url(), "max_delay_seconds": 99_999_999}}),
                "$.attribution.max_delay_seconds",
            ),
            (serde_json::json!({"attribution": {"key": key.to_base64url(), "nope": 1}}), "$.attribution"),
        ] {
            let e = FilterConfig::from_json(config(bad.clone()).to_string().as_bytes()).unwrap_err();
            assert!(e.field.starts_with(field), "{bad}: {e}");
            assert!(!e.to_string().contains(&key.to_base64url()), "the key is never echoed: {e}");
        }
    }
}
