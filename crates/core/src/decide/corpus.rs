//! The decision corpus: JSON cases (credential, request → expected status, code, challenge
//! error) replayed by native unit tests, by the wasm tests under V8 and against real Envoy.
//! Test support, but kept in the library so every tier reads the same cases the same way.

use serde::Deserialize;

use crate::decide::decision::Decision;
use crate::token::claims::{AccessClaim, Audience, RegistryClaims};
use crate::token::keys::SigningKey;
use crate::token::sign::{sign, Validity};

/// The corpus shipped with the core.
pub const DECISIONS: &str = include_str!("../../corpus/decisions.json");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corpus {
    pub description: String,
    /// Named policy bundles (unsigned JSON; runners sign them with a test operator key).
    #[serde(default)]
    pub bundles: std::collections::BTreeMap<String, serde_json::Value>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// Name of the bundle in `bundles` active for this case; none → no rules.
    #[serde(default)]
    pub bundle: Option<String>,
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
    /// `auth_type` claim (default `password`).
    #[serde(default)]
    pub auth_type: Option<String>,
    /// `jti` claim (default `corpus-<case name>`).
    #[serde(default)]
    pub jti: Option<String>,
    /// For a deploy token: the id put into the nested `user` JWT's `user_info`, as the
    /// token service issues it (the filter binds deploy-token JWTs to it).
    #[serde(default)]
    pub deploy_token_id: Option<u64>,
    /// For a job token: the CI job put into the nested `user` JWT's `user_info.job`, as the
    /// token service issues it (the filter checks bundle job revocations against it).
    #[serde(default)]
    pub job: Option<crate::token::claims::JobRef>,
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
    /// The protection rule that denied.
    #[serde(default)]
    pub rule: Option<String>,
    /// A dry-run rule that would have denied an allowed request.
    #[serde(default)]
    pub would_deny: Option<String>,
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
                let validity = Validity { issued_at: now, not_before: now + t.nbf, expires_at: now + t.exp };
                let user_info = match (t.deploy_token_id, &t.job) {
                    (Some(id), _) => Some(
                        serde_json::json!({"token_type": "deploy_token", "username": t.sub, "deploy_token_id": id}),
                    ),
                    (None, Some(job)) => Some(
                        serde_json::json!({"token_type": "job_token", "username": t.sub, "user_id": 1, "job": job}),
                    ),
                    (None, None) => None,
                };
                let user = match user_info {
                    Some(user_info) => {
                        let user_claims =
                            serde_json::json!({"jti": format!("corpus-user-{}", self.name), "user_info": user_info});
                        Some(sign(key, user_claims, validity).map_err(|e| e.to_string())?)
                    }
                    None => None,
                };
                let claims = RegistryClaims {
                    iss: t.iss.clone().unwrap_or_else(|| ISSUER.into()),
                    sub: t.sub.clone(),
                    aud: Audience::One(t.aud.clone().unwrap_or_else(|| SERVICE.into())),
                    jti: t.jti.clone().unwrap_or_else(|| format!("corpus-{}", self.name)),
                    access: t.access.clone(),
                    auth_type: Some(t.auth_type.clone().unwrap_or_else(|| "password".into())),
                    user,
                    extra: Default::default(),
                };
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

    /// Checks a core decision, including the deciding rule.
    pub fn check_decision(&self, d: &Decision) -> Result<(), String> {
        let (rule, would_deny) = match d {
            Decision::Allow { would_deny, .. } => (None, would_deny.as_ref().map(|(r, _)| r.clone())),
            Decision::Deny(d) => (d.rule.clone(), None),
        };
        match d {
            Decision::Allow { .. } => self.check(200, None, None)?,
            Decision::Deny(d) => self.check(d.status, Some(d.code), d.www_authenticate.as_deref())?,
        }
        if rule != self.expect.rule {
            return Err(format!("case `{}`: rule {rule:?}, expected {:?}", self.name, self.expect.rule));
        }
        if would_deny != self.expect.would_deny {
            return Err(format!(
                "case `{}`: would_deny {would_deny:?}, expected {:?}",
                self.name, self.expect.would_deny
            ));
        }
        Ok(())
    }
}

impl Corpus {
    /// The filter configuration a case runs under: `trusted` verifies tokens, `operator`
    /// signs the case's bundle.
    pub fn filter_config(&self, case: &Case, trusted: &SigningKey, operator: &SigningKey) -> Result<String, String> {
        let mut cfg = serde_json::json!({
            "realm": "http://127.0.0.1:5001/jwt/auth", "service": SERVICE, "issuer": ISSUER,
            "leeway_seconds": 5, "jwks": crate::token::testing::jwks(&[trusted]),
        });
        if let Some(name) = &case.bundle {
            let bundle = self.bundles.get(name).ok_or_else(|| format!("case `{}`: no bundle `{name}`", case.name))?;
            let jws = crate::policy::bundle::sign(&bundle.to_string(), operator)
                .map_err(|e| format!("bundle `{name}`: {e}"))?;
            if let Some(obj) = cfg.as_object_mut() {
                obj.insert("bundle".into(), jws.into());
                obj.insert("bundle_keys".into(), crate::token::testing::jwks(&[operator]));
            }
        }
        Ok(cfg.to_string())
    }

    /// Replays every case through [`Guard`](crate::decide::guard::Guard) at `now`; returns failures.
    /// Shared by the native and the wasm tests so both tiers run the same code.
    pub fn replay(&self, now: i64) -> Vec<String> {
        use crate::token::testing::es256_key;
        let (trusted, untrusted, operator) = (es256_key(1), es256_key(2), es256_key(7));
        let mut failures = Vec::new();
        for case in &self.cases {
            let result = (|| {
                let cfg = self.filter_config(case, &trusted, &operator)?;
                let cfg = crate::decide::config::FilterConfig::from_json(cfg.as_bytes()).map_err(|e| e.to_string())?;
                let mut guard = crate::decide::guard::Guard::new(cfg);
                let auth = case.authorization(&trusted, &untrusted, now)?;
                let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
                let r = &case.request;
                let checked = guard.check(&r.method, &r.path, r.content_type.as_deref(), &auth, now);
                case.check_decision(&checked.decision)
            })();
            if let Err(e) = result {
                failures.push(e);
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_replays_natively() {
        let corpus = load(DECISIONS).unwrap();
        assert!(corpus.cases.len() >= 40);
        let failures = corpus.replay(1_800_000_000);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
