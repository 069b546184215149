//! The decision corpus: JSON cases (credential, request → expected status, code, challenge
//! error) replayed by native unit tests, by the wasm tests under V8 and against real Envoy.
//! Test support, but kept in the library so every tier reads the same cases the same way.

use serde::Deserialize;

use crate::decision::Decision;
use crate::token::{sign, AccessClaim, Audience, RegistryClaims, SigningKey, Validity};

/// The corpus shipped with the core.
pub const DECISIONS: &str = include_str!("../corpus/decisions.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corpus {
    pub description: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// A token to mint for the case; absent → no `Authorization` header.
    #[serde(default)]
    pub token: Option<CaseToken>,
    /// Raw `Authorization` values instead of (or beside, with `{token}`) the minted token.
    #[serde(default)]
    pub authorization: Option<Vec<String>>,
    pub request: CaseRequest,
    pub expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseToken {
    pub sub: String,
    #[serde(default)]
    pub access: Vec<AccessClaim>,
    /// Signed by the trusted key (`trusted`, default) or a key the verifier does not know.
    #[serde(default = "trusted")]
    pub key: String,
    /// `exp` relative to now, seconds (default 300).
    #[serde(default = "default_exp")]
    pub exp: i64,
    /// `nbf` relative to now, seconds (default 0).
    #[serde(default)]
    pub nbf: i64,
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub aud: Option<String>,
}

fn trusted() -> String {
    "trusted".into()
}

fn default_exp() -> i64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// 200 means "allowed" (forwarded).
    pub status: u16,
    #[serde(default)]
    pub code: Option<String>,
    /// `error=` of the challenge (`invalid_token`, `insufficient_scope`), or `none`.
    #[serde(default)]
    pub challenge_error: Option<String>,
}

/// Issuer and service every corpus case assumes unless it overrides them.
pub const ISSUER: &str = "registry-guard";
pub const SERVICE: &str = "container_registry";

pub fn load(text: &str) -> Result<Corpus, String> {
    serde_json::from_str(text).map_err(|e| format!("corpus: {e}"))
}

impl Case {
    /// The `Authorization` header values for this case at `now`.
    pub fn authorization(&self, trusted: &SigningKey, untrusted: &SigningKey, now: i64) -> Result<Vec<String>, String> {
        let token = match &self.token {
            None => None,
            Some(t) => {
                let key = match t.key.as_str() {
                    "trusted" => trusted,
                    "unknown" => untrusted,
                    other => return Err(format!("case `{}`: unknown key `{other}`", self.name)),
                };
                let claims = RegistryClaims {
                    iss: t.iss.clone().unwrap_or_else(|| ISSUER.into()),
                    sub: t.sub.clone(),
                    aud: Audience::One(t.aud.clone().unwrap_or_else(|| SERVICE.into())),
                    jti: format!("corpus-{}", self.name),
                    access: t.access.clone(),
                    auth_type: Some("password".into()),
                    user: None,
                    extra: Default::default(),
                };
                let validity = Validity { issued_at: now, not_before: now + t.nbf, expires_at: now + t.exp };
                Some(sign(key, claims, validity).map_err(|e| e.to_string())?)
            }
        };
        Ok(match (&self.authorization, token) {
            (Some(raw), token) => {
                raw.iter().map(|v| v.replace("{token}", token.as_deref().unwrap_or_default())).collect()
            }
            (None, Some(t)) => vec![format!("Bearer {t}")],
            (None, None) => Vec::new(),
        })
    }

    /// Compares an observed outcome with the expectation.
    pub fn check(&self, status: u16, code: Option<&str>, www_authenticate: Option<&str>) -> Result<(), String> {
        let e = &self.expect;
        let mut problems = Vec::new();
        if status != e.status {
            problems.push(format!("status {status}, expected {}", e.status));
        }
        if let Some(want) = &e.code {
            if code != Some(want.as_str()) {
                problems.push(format!("code {code:?}, expected {want}"));
            }
        }
        if let Some(want) = &e.challenge_error {
            let got = www_authenticate.and_then(|w| w.split("error=\"").nth(1)).and_then(|r| r.split('"').next());
            let ok = if want == "none" { got.is_none() } else { got == Some(want.as_str()) };
            if !ok {
                problems.push(format!("challenge error {got:?}, expected {want}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("case `{}`: {}", self.name, problems.join("; ")))
        }
    }

    /// Checks a core decision.
    pub fn check_decision(&self, d: &Decision) -> Result<(), String> {
        match d {
            Decision::Allow { .. } => self.check(200, None, None),
            Decision::Deny(d) => self.check(d.status, Some(d.code), d.www_authenticate.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterConfig;
    use crate::guard::Guard;
    use crate::token::testing::{es256_key, jwks};

    #[test]
    fn corpus_replays_natively() {
        let corpus = load(DECISIONS).unwrap();
        assert!(corpus.cases.len() >= 20);
        let trusted = es256_key(1);
        let untrusted = es256_key(2);
        let cfg = serde_json::json!({
            "realm": "http://127.0.0.1:5001/jwt/auth", "service": SERVICE, "issuer": ISSUER,
            "leeway_seconds": 5, "jwks": jwks(&[&trusted]),
        });
        let mut guard = Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap());
        let now = 1_800_000_000;
        let mut failures = Vec::new();
        for case in &corpus.cases {
            let auth = case.authorization(&trusted, &untrusted, now).unwrap();
            let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
            let r = &case.request;
            let checked = guard.check(&r.method, &r.path, r.content_type.as_deref(), &auth, now);
            if let Err(e) = case.check_decision(&checked.decision) {
                failures.push(e);
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
