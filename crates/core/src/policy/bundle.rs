//! The policy bundle: one versioned, operator-signed document with the protection rules
//! deploy tokens, revocations and additional claims. Raw serde types → a compiled [`Policy`];
//! every error names the JSON path and the reason.
//!
//! Signing: the bundle is the payload of a compact JWS (ES256, header `typ: rg-bundle+jwt`,
//! `kid` = the operator key's RFC 7638 thumbprint). The signature covers the exact payload
//! bytes, which are the bytes that are parsed: there is no re-serialisation between check
//! and use.

use std::collections::HashSet;

use jwt_compact::alg::Es256;
use jwt_compact::{AlgorithmExt as _, Claims, Header};
use serde::Deserialize;

use crate::policy::protection::{PathPattern, Requirement, Rule, RuleSet};
use crate::request::access::AccessLevel;
use crate::token::jwks::KeySet;
use crate::token::keys::{SigningKey, VerifyingKey};

/// The JWS `typ` of a signed bundle; registry tokens can never pass for bundles.
pub const BUNDLE_TYP: &str = "rg-bundle+jwt";
/// Upper bound on rules, so a bundle cannot exhaust a VM.
pub const MAX_RULES: usize = 200_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundle {
    /// Accepted (for editors' schema support) and ignored, like `description`.
    #[serde(rename = "$schema", default)]
    #[allow(dead_code)]
    schema: Option<String>,
    revision: u64,
    /// The deployment this bundle is for (`production`, `staging`, …); every component
    /// configured with an environment refuses a bundle for another one.
    #[serde(default)]
    environment: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    settings: RawSettings,
    #[serde(default)]
    protection_rules: Vec<RawRule>,
    #[serde(default)]
    deploy_tokens: Vec<crate::policy::deploy::RawDeployToken>,
    #[serde(default)]
    revocations: crate::policy::deploy::RawRevocations,
    /// Operator-defined token claims by group, subgroup and project (GitLab's additional CI/CD job JWT claims).
    #[serde(default)]
    additional_claims: Vec<crate::policy::claims::RawLevel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default = "yes")]
    admins_bypass_protection: bool,
}

impl Default for RawSettings {
    fn default() -> Self {
        RawSettings { admins_bypass_protection: true }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    /// The project or group the rule belongs to (GitLab's `project_id`/`namespace_id` of a protection rule),
    /// as deploy tokens name theirs: `{"project": "acme/web"}` or `{"group": "acme"}`. The
    /// pattern must lie within the owner's path.
    #[serde(default)]
    owner: Option<crate::policy::deploy::Owner>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    repository_path_pattern: String,
    #[serde(default)]
    tag_name_pattern: Option<String>,
    #[serde(default)]
    minimum_access_level_for_push: Option<AccessLevel>,
    #[serde(default)]
    minimum_access_level_for_delete: Option<AccessLevel>,
    #[serde(default)]
    push_protected_up_to_access_level: Option<AccessLevel>,
    #[serde(default)]
    delete_protected_up_to_access_level: Option<AccessLevel>,
    #[serde(default = "yes")]
    enforce: bool,
}

/// Why a bundle was refused: where (JSON path, or `signature`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct BundleError {
    pub path: String,
    pub reason: String,
}

fn error(path: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError { path: path.into(), reason: reason.into() }
}

/// A validated bundle, ready to decide with.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub revision: u64,
    /// The deployment the bundle names (`None`: it names none).
    pub environment: Option<String>,
    pub rules: RuleSet,
    /// Deploy tokens and revocations.
    pub credentials: crate::policy::deploy::Credentials,
    /// Additional token claims by group, subgroup and project.
    pub claims: crate::policy::claims::Claims,
}

impl Policy {
    /// Parses and validates bundle JSON text (unsigned; for `validate`, `explain`, tests).
    pub fn from_json(text: &str) -> Result<Policy, BundleError> {
        let raw: RawBundle = crate::support::de::from_slice(text.as_bytes()).map_err(path_error)?;
        crate::support::json::strict_object_keys(text.as_bytes()).map_err(|e| error("$", e))?;
        compile(raw)
    }
}

fn path_error(e: crate::support::de::PathError) -> BundleError {
    error(e.path, e.reason)
}

fn compile(raw: RawBundle) -> Result<Policy, BundleError> {
    if raw.protection_rules.len() > MAX_RULES {
        return Err(error("$.protection_rules", format!("more than {MAX_RULES} rules")));
    }
    let mut ids = HashSet::new();
    let mut regex_cache: std::collections::HashMap<String, std::sync::Arc<regex::bytes::Regex>> = Default::default();
    let mut rules = Vec::with_capacity(raw.protection_rules.len());
    for (i, r) in raw.protection_rules.into_iter().enumerate() {
        let at = format!("$.protection_rules[{i}]");
        if r.id.is_empty()
            || r.id.len() > 128
            || !r.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        {
            return Err(error(format!("{at}.id"), format!("rule id `{}` must be 1-128 of [A-Za-z0-9._:-]", r.id)));
        }
        if !ids.insert(r.id.clone()) {
            return Err(error(format!("{at}.id"), format!("duplicate rule id `{}`", r.id)));
        }
        let repository = PathPattern::parse(&r.repository_path_pattern).map_err(|e| {
            error(format!("{at}.repository_path_pattern"), format!("`{}`: {e}", r.repository_path_pattern))
        })?;
        let owner = r.owner.ok_or_else(|| {
            error(
                format!("{at}.owner"),
                "every rule names its owner: add `\"owner\": {\"project\": \"<path>\"}` or `{\"group\": \"<path>\"}`",
            )
        })?;
        if !crate::request::name::is_repository_name(owner.path()) {
            return Err(error(
                format!("{at}.owner"),
                format!("`{}` is not a valid group or project path", owner.path()),
            ));
        }
        if !pattern_within(&r.repository_path_pattern, owner.path()) {
            return Err(error(
                format!("{at}.repository_path_pattern"),
                format!(
                    "`{}` is not within the rule's owner {owner}: the pattern must be `{p}` or start with `{p}/`",
                    r.repository_path_pattern,
                    p = owner.path()
                ),
            ));
        }
        let tag = match &r.tag_name_pattern {
            None => None,
            Some(p) => Some(match regex_cache.get(p) {
                Some(re) => re.clone(),
                None => {
                    let re = std::sync::Arc::new(
                        regex::bytes::RegexBuilder::new(p).unicode(false).size_limit(1 << 20).build().map_err(|e| {
                            error(format!("{at}.tag_name_pattern"), format!("`{p}` is not a valid RE2 pattern: {e}"))
                        })?,
                    );
                    regex_cache.insert(p.clone(), re.clone());
                    re
                }
            }),
        };
        let push = requirement(&at, "push", r.minimum_access_level_for_push, r.push_protected_up_to_access_level)?;
        let delete =
            requirement(&at, "delete", r.minimum_access_level_for_delete, r.delete_protected_up_to_access_level)?;
        if push.is_none() && delete.is_none() {
            return Err(error(
                at,
                "rule protects nothing: set `minimum_access_level_for_push|delete` or `push|delete_protected_up_to_access_level`",
            ));
        }
        rules.push(Rule { id: r.id, owner, repository, tag, push, delete, enforce: r.enforce });
    }
    let credentials = crate::policy::deploy::compile(raw.deploy_tokens, raw.revocations)
        .map_err(|(path, reason)| error(path, reason))?;
    let claims = crate::policy::claims::compile(raw.additional_claims).map_err(|(path, reason)| error(path, reason))?;
    if let Some(env) = &raw.environment {
        if !valid_environment(env) {
            return Err(error("$.environment", format!("`{}` must be 1-64 of [A-Za-z0-9._-]", excerpt(env, 64))));
        }
    }
    Ok(Policy {
        revision: raw.revision,
        environment: raw.environment,
        rules: RuleSet::new(rules, raw.settings.admins_bypass_protection),
        credentials,
        claims,
    })
}

/// Whether every path `pattern` can match lies in `owner`'s subtree: the pattern is the
/// owner's path itself or starts with it and `/` (its literal part then pins the owner).
fn pattern_within(pattern: &str, owner: &str) -> bool {
    pattern == owner || pattern.strip_prefix(owner).is_some_and(|rest| rest.starts_with('/'))
}

fn requirement(
    at: &str,
    action: &str,
    minimum: Option<AccessLevel>,
    up_to: Option<AccessLevel>,
) -> Result<Option<Requirement>, BundleError> {
    match (minimum, up_to) {
        (Some(_), Some(_)) => Err(error(
            format!("{at}.{action}_protected_up_to_access_level"),
            format!(
                "set either `minimum_access_level_for_{action}` or `{action}_protected_up_to_access_level`, not both"
            ),
        )),
        (Some(l), None) => Ok(Some(Requirement::AtLeast(l))),
        (None, Some(l)) => Ok(Some(Requirement::Above(l))),
        (None, None) => Ok(None),
    }
}

/// Untrusted text quoted in an error or a log line: at most `max` characters, control and
/// non-ASCII characters escaped, so a hostile bundle can neither forge log lines nor flood them.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).flat_map(char::escape_default).collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Whether `name` is a usable environment name: 1-64 of `[A-Za-z0-9._-]`.
pub fn valid_environment(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Policy {
    /// Refuses a policy signed for another deployment: a component configured with an
    /// environment accepts only bundles naming exactly that environment, and a component
    /// configured without one only bundles that name none.
    pub fn check_environment(&self, expected: Option<&str>) -> Result<(), BundleError> {
        match (expected, self.environment.as_deref()) {
            (Some(want), Some(got)) if want == got => Ok(()),
            (None, None) => Ok(()),
            (Some(want), Some(got)) => {
                Err(error("$.environment", format!("bundle is for environment `{got}`; this deployment is `{want}`")))
            }
            (Some(want), None) => Err(error(
                "$.environment",
                format!("bundle names no environment; this deployment accepts only bundles for `{want}`"),
            )),
            (None, Some(got)) => Err(error(
                "$.environment",
                format!("bundle is for environment `{got}`; this deployment has no environment configured"),
            )),
        }
    }
}

/// Checks bundle text the way `rgctl validate` does and returns its revision and rule count.
pub fn validate(text: &str) -> Result<(u64, usize), BundleError> {
    let p = Policy::from_json(text)?;
    Ok((p.revision, p.rules.len()))
}

/// Signs bundle JSON text (validated first) with the operator key.
pub fn sign(text: &str, key: &SigningKey) -> Result<String, BundleError> {
    Policy::from_json(text)?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| error("$", e.to_string()))?;
    let header = Header::empty().with_key_id(key.kid.clone()).with_token_type(BUNDLE_TYP);
    Es256.token(&header, &Claims::new(value), &key.key).map_err(|e| error("signature", e.to_string()))
}

/// The protected header of a signed bundle (other members are ignored).
#[derive(Deserialize)]
struct JwsHeader {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

/// [`verify`], then refuses a bundle signed for another environment (see
/// [`Policy::check_environment`]).
pub fn verify_for(jws: &str, keys: &KeySet, environment: Option<&str>) -> Result<Policy, BundleError> {
    let policy = verify(jws, keys)?;
    policy.check_environment(environment)?;
    Ok(policy)
}

/// Verifies a signed bundle against the operator keys, then parses and validates it.
///
/// The signature is checked over the compact serialisation's signing input, then the
/// payload bytes are deserialised straight into the bundle's types (no intermediate JSON
/// tree: at 100 000 rules that tree was the largest allocation of a filter's activation).
pub fn verify(jws: &str, keys: &KeySet) -> Result<Policy, BundleError> {
    use base64::Engine as _;
    use p256::ecdsa::signature::Verifier as _;

    let jws = jws.trim();
    if jws.starts_with('{') {
        return Err(error("signature", "bundle is not signed (got JSON; sign it with `rgctl sign`)"));
    }
    let (signing_input, signature) =
        jws.rsplit_once('.').ok_or_else(|| error("signature", "not a compact JWS: no `.`"))?;
    let payload_b64 = {
        let (_, payload) =
            signing_input.split_once('.').ok_or_else(|| error("signature", "not a compact JWS: expected 3 parts"))?;
        if payload.contains('.') {
            return Err(error("signature", "not a compact JWS: expected 3 parts"));
        }
        payload
    };
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: JwsHeader = signing_input
        .split('.')
        .next()
        .and_then(|h| engine.decode(h).ok())
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| error("signature", "not a compact JWS: the header is not base64url JSON"))?;
    if header.typ.as_deref() != Some(BUNDLE_TYP) {
        return Err(error("signature", format!("JWS `typ` is not `{BUNDLE_TYP}`")));
    }
    if header.alg != "ES256" {
        return Err(error(
            "signature",
            format!("JWS `alg` is `{}`; bundles are signed with ES256", excerpt(&header.alg, 16)),
        ));
    }
    if header.crit.is_some() {
        return Err(error("signature", "JWS header has `crit` extensions, which are not supported"));
    }
    let kid = header.kid.ok_or_else(|| error("signature", "JWS header has no `kid`"))?;
    let key = keys
        .get(&kid)
        .ok_or_else(|| error("signature", format!("signed by unknown operator key `{}`", excerpt(&kid, 64))))?;
    let VerifyingKey::Es256(key) = key else {
        return Err(error("signature", format!("operator key `{}` is not a P-256 (ES256) key", excerpt(&kid, 64))));
    };
    let signature = engine
        .decode(signature)
        .ok()
        .and_then(|bytes| p256::ecdsa::Signature::from_slice(&bytes).ok())
        .ok_or_else(|| error("signature", "invalid signature: not a 64-byte ES256 signature"))?;
    // p256's own verification: once per activation, so no table for the operator key.
    p256::ecdsa::VerifyingKey::verify(key, signing_input.as_bytes(), &signature)
        .map_err(|_| error("signature", "invalid signature: does not match the payload"))?;
    let payload =
        engine.decode(payload_b64).map_err(|e| error("signature", format!("payload is not base64url: {e}")))?;
    // Signed, but still refused if any object repeats a key (a map would keep the last one).
    crate::support::json::strict_object_keys(&payload).map_err(|e| error("$", e))?;
    let raw: RawBundle = crate::support::de::from_slice(&payload).map_err(path_error)?;
    drop(payload);
    compile(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::testing::{es256_key, jwks};

    const EXAMPLE: &str = include_str!("../../../../policies/example/bundle.json");

    #[test]
    fn a_bundle_is_for_one_environment() {
        let key = es256_key(3);
        let keys = KeySet::from_jwks(&jwks(&[&key])).unwrap();
        let staging = sign(r#"{"revision": 1, "environment": "staging"}"#, &key).unwrap();
        let none = sign(r#"{"revision": 1}"#, &key).unwrap();
        assert_eq!(verify_for(&staging, &keys, Some("staging")).unwrap().environment.as_deref(), Some("staging"));
        let e = verify_for(&staging, &keys, Some("production")).unwrap_err();
        assert_eq!(e.path, "$.environment");
        assert!(e.reason.contains("`staging`") && e.reason.contains("`production`"), "{e}");
        assert!(verify_for(&none, &keys, Some("production")).unwrap_err().reason.contains("names no environment"));
        assert!(verify_for(&staging, &keys, None).is_err());
        assert!(verify_for(&none, &keys, None).is_ok());
        let bad = Policy::from_json(r#"{"revision": 1, "environment": "a b\n"}"#).unwrap_err();
        assert_eq!(bad.path, "$.environment");
        assert!(!bad.reason.contains('\n'), "{bad}");
    }

    #[test]
    fn refusals_quote_hostile_header_text_escaped_and_bounded() {
        let keys = KeySet::from_jwks(&jwks(&[&es256_key(3)])).unwrap();
        let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let kid = format!("evil\n{}", "k".repeat(5000));
        let header = serde_json::json!({"alg": "ES256", "typ": BUNDLE_TYP, "kid": kid}).to_string();
        let jws = format!(
            "{}.{}.{}",
            base64::Engine::encode(engine, header),
            base64::Engine::encode(engine, "{}"),
            base64::Engine::encode(engine, [0u8; 64])
        );
        let e = verify(&jws, &keys).unwrap_err();
        assert!(e.reason.contains("unknown operator key"), "{e}");
        assert!(!e.reason.contains('\n') && e.reason.len() < 200, "{e}");
    }

    #[test]
    fn example_bundle_is_valid() {
        let p = Policy::from_json(EXAMPLE).unwrap();
        assert!(p.revision >= 1);
        assert!(!p.rules.is_empty());
    }

    #[test]
    fn repeated_keys_are_refused_signed_or_not() {
        // Regression (issue 7): `serde_json::Value` and flattened maps kept the last value.
        let text = r#"{"revision": 2, "revision": 1}"#;
        assert!(Policy::from_json(text).unwrap_err().reason.contains("duplicate"));
        let mut b: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        b["revision"] = 7.into();
        let text = b.to_string().replacen(r#""revision":7"#, r#""revision":7,"revision":8"#, 1);
        assert!(text.contains(r#""revision":8"#));
        let k = es256_key(3);
        let jws = crate::token::sign::sign_jws_unchecked(&k, &serde_json::Value::Null, BUNDLE_TYP).unwrap();
        // Re-sign the raw text (sign_jws_unchecked would re-serialise and drop the repeat).
        use base64::Engine as _;
        use p256::ecdsa::signature::Signer as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = jws.split('.').next().unwrap();
        let input = format!("{header}.{}", b64.encode(&text));
        let sig: p256::ecdsa::Signature = k.key.sign(input.as_bytes());
        let raw = format!("{input}.{}", b64.encode(sig.to_bytes()));
        let e = verify(&raw, &KeySet::from_jwks(&jwks(&[&k])).unwrap()).unwrap_err();
        assert!(e.reason.contains("duplicate key `revision`"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_place() {
        let cases = [
            (r#"{"revision": 1, "protection_rulez": []}"#, "$.protection_rulez", "unknown field"),
            (r#"{"revision": "one"}"#, "$.revision", "invalid type"),
            (r#"{}"#, "$", "missing field `revision`"),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x", "minimum_access_level_for_push": "boss"}]}"#,
                "$.protection_rules[0].minimum_access_level_for_push",
                "unknown variant `boss`",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "repository_path_pattern": "X", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].repository_path_pattern",
                "not allowed",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x", "tag_name_pattern": "v(", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].tag_name_pattern",
                "not a valid RE2 pattern",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x", "minimum_access_level_for_push": "owner"}, {"id": "a", "owner": {"group": "y"}, "repository_path_pattern": "y", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[1].id",
                "duplicate rule id `a`",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x"}]}"#,
                "$.protection_rules[0]",
                "protects nothing",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x", "minimum_access_level_for_push": "owner", "push_protected_up_to_access_level": "developer"}]}"#,
                "$.protection_rules[0].push_protected_up_to_access_level",
                "not both",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "x"}, "repository_path_pattern": "x", "minimum_access_level_for_push": "owner", "colour": 1}]}"#,
                "$.protection_rules[0].colour",
                "unknown field",
            ),
        ];
        let owner_cases = [
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "repository_path_pattern": "acme/web/*", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].owner",
                "every rule names its owner",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"project": "acme/web"}, "repository_path_pattern": "*", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].repository_path_pattern",
                "not within the rule's owner project `acme/web`",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "acme"}, "repository_path_pattern": "acme*", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].repository_path_pattern",
                "must be `acme` or start with `acme/`",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"group": "acme"}, "repository_path_pattern": "other/tools", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].repository_path_pattern",
                "not within",
            ),
            (
                r#"{"revision": 1, "protection_rules": [{"id": "a", "owner": {"team": "acme"}, "repository_path_pattern": "acme", "minimum_access_level_for_push": "owner"}]}"#,
                "$.protection_rules[0].owner",
                "unknown variant",
            ),
        ];
        for (text, path, reason) in owner_cases {
            let e = Policy::from_json(text).unwrap_err();
            assert_eq!(e.path, path, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
        for ok in [
            r#"{"group": "acme"}, "repository_path_pattern": "acme/*""#,
            r#"{"project": "acme/web"}, "repository_path_pattern": "acme/web""#,
        ] {
            let text = format!(
                r#"{{"revision": 1, "protection_rules": [{{"id": "a", "owner": {ok}, "minimum_access_level_for_push": "owner"}}]}}"#
            );
            assert!(Policy::from_json(&text).is_ok(), "{text}");
        }
        for (text, path, reason) in cases {
            let e = Policy::from_json(text).unwrap_err();
            assert_eq!(e.path, path, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
    }

    #[test]
    fn signatures_are_checked() {
        let operator = es256_key(7);
        let keys = KeySet::from_jwks(&jwks(&[&operator])).unwrap();
        let signed = sign(EXAMPLE, &operator).unwrap();
        assert_eq!(verify(&signed, &keys).unwrap().revision, Policy::from_json(EXAMPLE).unwrap().revision);
        // Unsigned JSON, a stranger's signature, a tampered payload, a registry token.
        assert!(verify(EXAMPLE, &keys).unwrap_err().reason.contains("not signed"));
        let stranger = sign(EXAMPLE, &es256_key(8)).unwrap();
        assert!(verify(&stranger, &keys).unwrap_err().reason.contains("unknown operator key"));
        let mut parts: Vec<String> = signed.split('.').map(str::to_owned).collect();
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            br#"{"revision": 999, "protection_rules": []}"#,
        );
        assert!(verify(&parts.join("."), &keys).unwrap_err().reason.contains("invalid signature"));
        let claims = crate::token::claims::RegistryClaims {
            iss: "x".into(),
            sub: "x".into(),
            aud: crate::token::claims::Audience::One("x".into()),
            jti: "x".into(),
            access: vec![],
            auth_type: None,
            user: None,
            extra: Default::default(),
        };
        let token = crate::token::sign::sign(
            &operator,
            claims,
            crate::token::sign::Validity { issued_at: 0, not_before: 0, expires_at: 1 },
        )
        .unwrap();
        assert!(verify(&token, &keys).unwrap_err().reason.contains("typ"));
        // A signed but semantically invalid bundle is refused with its path.
        let bad = Es256
            .token(
                &Header::empty().with_key_id(operator.kid.clone()).with_token_type(BUNDLE_TYP),
                &Claims::new(serde_json::json!({"revision": 2, "protection_rules": [{"id": "a"}]})),
                &operator.key,
            )
            .unwrap();
        let e = verify(&bad, &keys).unwrap_err();
        assert!(e.path.starts_with("$.protection_rules[0]"), "{e}");
    }
}
