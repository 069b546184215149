//! The one decision function: a classified request plus the presented credential → allow, or
//! the exact local reply (status, OCI error body, `WWW-Authenticate` challenge) and why.

use std::fmt::Write as _;

use crate::decide::config::{ChallengeConfig, ServedEndpoint};
use crate::policy::bundle::Policy;
use crate::policy::deploy::{dependency_proxy_group, DeployDenial, DEPENDENCY_PROXY_LEVEL};
use crate::policy::protection::{Actor, Operation, Protection};
use crate::request::access::{AccessLevel, ActionSet};
use crate::request::name::is_tag;
use crate::request::route::{Endpoint, Method, Route, RouteError};
use crate::request::scope::Scope;
use crate::support::text::quote;
use crate::token::verify::{TokenError, VerifiedToken};

/// What the request presented in `Authorization`.
#[derive(Debug, Clone, PartialEq)]
pub enum Credential<'a> {
    /// No `Authorization` header.
    Missing,
    /// A header that is not a single `Bearer <token>`.
    NotBearer(&'static str),
    /// A bearer token that failed verification.
    Invalid(&'a TokenError),
    /// A verified, currently valid token.
    Valid(&'a VerifiedToken),
}

/// Extracts the bearer token from the `Authorization` header values of a request. Exactly
/// one header with scheme `Bearer` (case-insensitive) is accepted.
pub fn bearer_token<'a>(values: &[&'a str]) -> Result<Option<&'a str>, &'static str> {
    match bearer_candidate(values)? {
        Some(token) if !is_b64token(token) => Err(NOT_BEARER),
        t => Ok(t),
    }
}

/// Why a header is not a bearer token.
pub const NOT_BEARER: &str = "`Authorization` header is not `Bearer <token>`";

/// [`bearer_token`] without the byte check of the token ([`is_b64token`]): the guard runs that
/// check only for tokens not already in its cache of verified tokens.
pub fn bearer_candidate<'a>(values: &[&'a str]) -> Result<Option<&'a str>, &'static str> {
    match values {
        [] => Ok(None),
        [one] => {
            let (scheme, rest) = one.trim().split_once(' ').ok_or(NOT_BEARER)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err("only `Bearer` tokens are accepted on the registry API");
            }
            let token = rest.trim();
            if token.is_empty() {
                return Err(NOT_BEARER);
            }
            Ok(Some(token))
        }
        _ => Err("more than one `Authorization` header"),
    }
}

/// Whether `token` is RFC 6750 `b64token` (a JWT is base64url segments joined by `.`): checked
/// as bytes, so whitespace, control and non-ASCII characters are all refused.
pub fn is_b64token(token: &str) -> bool {
    token.bytes().all(is_b64token_byte)
}

/// A byte of RFC 6750's `b64token`: `ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/"`, and `=` (its padding).
fn is_b64token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// A decision with its reason, for logs and `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward. `would_deny`: a dry-run rule that would have denied (rule id, message).
    Allow {
        would_deny: Option<(String, String)>,
    },
    Deny(Denial),
}

/// A local reply to send instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: u16,
    /// OCI error code (`UNAUTHORIZED`, `DENIED`, `NAME_INVALID`, ...).
    pub code: &'static str,
    /// Message shown to the client.
    pub message: String,
    /// `WWW-Authenticate` value for 401s.
    pub www_authenticate: Option<String>,
    /// Why, for operators (never contains a token).
    pub reason: String,
    /// The protection rule that decided, if one did.
    pub rule: Option<String>,
    /// Why, as a fixed label (metrics and audit lines).
    pub kind: DenyKind,
}

/// The class of a denial: one Envoy counter each (`registry_guard.denied_total.<label>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyKind {
    /// The route grammar refused the request (bad name, unknown endpoint, …).
    BadRequest,
    /// No credentials: the first 401 of every docker login.
    NoCredentials,
    /// A credential that is not a valid bearer token (bad signature, expired, malformed, …).
    InvalidToken,
    /// The token, its user or its deploy token is revoked by the bundle.
    Revoked,
    /// A deploy token the bundle does not know, or that expired or was revoked there.
    DeployTokenUnusable,
    /// The token does not grant the action (`insufficient_scope`).
    InsufficientScope,
    /// A deploy token used outside its scopes.
    Forbidden,
    /// Outside a deploy token's owner, or the dependency proxy of a group the user is not in.
    NotFound,
    /// An enforced protection rule.
    Protected,
    /// The filter follows a bundle source and has not heard from it for longer than its
    /// `max_staleness_seconds`: every request is refused (503) until it does.
    StalePolicy,
}

impl DenyKind {
    pub const ALL: [DenyKind; 10] = [
        DenyKind::BadRequest,
        DenyKind::NoCredentials,
        DenyKind::InvalidToken,
        DenyKind::Revoked,
        DenyKind::DeployTokenUnusable,
        DenyKind::InsufficientScope,
        DenyKind::Forbidden,
        DenyKind::NotFound,
        DenyKind::Protected,
        DenyKind::StalePolicy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DenyKind::BadRequest => "bad_request",
            DenyKind::NoCredentials => "no_credentials",
            DenyKind::InvalidToken => "invalid_token",
            DenyKind::Revoked => "revoked",
            DenyKind::DeployTokenUnusable => "deploy_token_unusable",
            DenyKind::InsufficientScope => "insufficient_scope",
            DenyKind::Forbidden => "forbidden",
            DenyKind::NotFound => "not_found",
            DenyKind::Protected => "protected",
            DenyKind::StalePolicy => "stale_policy",
        }
    }
}

impl Denial {
    /// The OCI JSON error body.
    pub fn body(&self) -> String {
        serde_json::json!({ "errors": [{ "code": self.code, "message": self.message, "detail": null }] }).to_string()
    }
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    pub fn status(&self) -> u16 {
        match self {
            Decision::Allow { .. } => 200,
            Decision::Deny(d) => d.status,
        }
    }
}

/// [`decide`] for the endpoint a filter guards. On the dependency-proxy endpoint (as GitLab serves it,
/// GitLab's own host): only `GET|HEAD /v2/` and pulls (manifests, blobs, tag lists) of
/// `<group>/dependency_proxy/containers/<image>` exist (anything else: 404, or 405 for
/// writes to a proxy path); a deploy token that passes every registry check must also be
/// valid for the dependency proxy — a group token with `read_registry` and `write_registry`
/// (GitLab's `valid_for_dependency_proxy?`) — or its login and pulls get 403.
pub fn decide_at(
    endpoint: ServedEndpoint,
    route: Result<&Route, &RouteError>,
    credential: Credential<'_>,
    challenge: &ChallengeConfig,
    policy: &Policy,
    now: i64,
) -> Decision {
    if endpoint == ServedEndpoint::Registry {
        return decide(route, credential, challenge, policy, now);
    }
    if let Ok(r) = route {
        if let Some(denial) = dependency_proxy_route(r, policy) {
            return Decision::Deny(denial);
        }
    }
    let deploy_token = match &credential {
        Credential::Valid(t) if is_deploy_token(t) => Some(t.subject.clone()),
        _ => None,
    };
    let decision = decide(route, credential, challenge, policy, now);
    if let (Decision::Allow { .. }, Some(username)) = (&decision, deploy_token) {
        if let Some(dt) = policy.credentials.by_username(&username) {
            if let Err(why) = dt.valid_for_dependency_proxy() {
                return Decision::Deny(forbidden(why, policy));
            }
        }
    }
    decision
}

/// What the dependency-proxy endpoint refuses by shape, before any credential.
fn dependency_proxy_route(route: &Route, policy: &Policy) -> Option<Denial> {
    let not_here = |what: &str| Denial {
        status: 404,
        code: "NAME_UNKNOWN",
        message: format!(
            "{what} is not served here: the dependency proxy serves `<group>/dependency_proxy/containers/<image>` only"
        ),
        www_authenticate: None,
        reason: format!(
            "dependency-proxy endpoint: {what} is not a dependency proxy pull (bundle revision {})",
            policy.revision
        ),
        rule: None,
        kind: DenyKind::BadRequest,
    };
    match (&route.endpoint, route.method) {
        (Endpoint::Base, _) => None,
        (
            Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } | Endpoint::TagsList { name },
            Method::Get | Method::Head,
        ) if dependency_proxy_group(name).is_some() => None,
        (endpoint, _) => match endpoint.repository() {
            Some(name) if dependency_proxy_group(name).is_some() => Some(Denial {
                status: 405,
                code: "UNSUPPORTED",
                message: format!("the dependency proxy is a read-only pull-through cache: `{name}` can only be pulled"),
                www_authenticate: None,
                reason: format!(
                    "dependency-proxy endpoint: write or listing on `{name}` (bundle revision {})",
                    policy.revision
                ),
                rule: None,
                kind: DenyKind::BadRequest,
            }),
            Some(name) => Some(not_here(&format!("repository `{name}`"))),
            None => Some(not_here("the catalog")),
        },
    }
}

/// Decides one request under `policy` (the active bundle; `Policy::default()` has no rules).
pub fn decide(
    route: Result<&Route, &RouteError>,
    credential: Credential<'_>,
    challenge: &ChallengeConfig,
    policy: &Policy,
    now: i64,
) -> Decision {
    let route = match route {
        Ok(r) => r,
        Err(e) => {
            return Decision::Deny(Denial {
                status: e.status,
                code: e.code,
                message: e.message.clone(),
                www_authenticate: None,
                reason: format!("request refused by the route grammar: {}", e.message),
                rule: None,
                kind: DenyKind::BadRequest,
            })
        }
    };
    let unauthorized = |error: Option<&str>, message: String, reason: String| {
        Decision::Deny(Denial {
            status: 401,
            code: "UNAUTHORIZED",
            message,
            www_authenticate: Some(www_authenticate(challenge, &route.scopes, error)),
            reason,
            rule: None,
            kind: if error.is_some() { DenyKind::InvalidToken } else { DenyKind::NoCredentials },
        })
    };
    let token = match credential {
        Credential::Missing => {
            return unauthorized(None, "authentication required".into(), "no credentials presented".into())
        }
        Credential::NotBearer(why) => {
            return unauthorized(Some("invalid_token"), format!("authentication required: {why}"), why.into())
        }
        Credential::Invalid(e) => {
            return unauthorized(Some("invalid_token"), format!("authentication required: {e}"), e.to_string())
        }
        Credential::Valid(t) => t,
    };
    if let Some(denial) = principal_check(route, token, challenge, policy, now) {
        return Decision::Deny(denial);
    }
    // What the request needs and the token lacks, split by whose it is: the principal's own
    // level (stated in the token) permits it — only the token is short, a new token helps —
    // or not: the person may not, and no token would help.
    let mut missing = Vec::new();
    let mut token_lacks = Vec::new();
    let mut may_not = Vec::new();
    for needed in &route.scopes {
        let granted = token.granted(&needed.resource);
        if !granted.covers(needed.actions) {
            let granted_text = if granted.is_empty() { "nothing".to_owned() } else { granted.to_string() };
            let lacking = granted.iter().fold(needed.actions, ActionSet::without);
            let what = format!("{} `{}`", needed.resource.type_str(), quote(needed.resource.name()));
            missing.push(format!("{} on {what} (granted: {granted_text})", needed.actions));
            let level = match &needed.resource {
                crate::request::scope::Resource::Repository(repo) if !is_deploy_token(token) => {
                    token.access_level(repo)
                }
                _ => None,
            };
            match level.and_then(AccessLevel::from_number) {
                // Pull of a public project is not level-bound: only push/delete are judged.
                Some(l) if !l.registry_actions(true).covers(lacking) => {
                    may_not.push(format!("`{}` ({}) may not {lacking} on {what}", quote(&token.subject), l.name()));
                }
                _ => token_lacks
                    .push(format!("this token does not grant {lacking} on {what} (it grants: {granted_text})")),
            }
        }
    }
    let protection = protect(route, token, policy);
    // A rule denial is final even when the token also lacks the action (a new token would
    // not help, so say why) — but only when the token speaks for the principal on this
    // repository; a token with no grant there just needs the right scope first.
    let knows_repository = operation(route).is_some_and(|(repo, _)| token.access_level(repo).is_some());
    let protection = protection.filter_denied(missing.is_empty() || knows_repository);
    if let Protection::Denied { rule, message } = &protection {
        // Whether or not the token holds the action: a new token would not help, so say why.
        return Decision::Deny(Denial {
            status: 403,
            code: "DENIED",
            message: message.clone(),
            www_authenticate: None,
            reason: format!("rule `{rule}` (bundle revision {}): {message}", policy.revision),
            rule: Some(rule.clone()),
            kind: DenyKind::Protected,
        });
    }
    if missing.is_empty() {
        let would_deny = match protection {
            Protection::WouldDeny { rule, message } => Some((rule, message)),
            _ => None,
        };
        return Decision::Allow { would_deny };
    }
    let missing = missing.join(", ");
    let message = if may_not.is_empty() {
        let wanted = route.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ");
        format!(
            "requested access to the resource is denied: {}; request a new token with scope `{wanted}`",
            token_lacks.join(", ")
        )
    } else {
        format!("requested access to the resource is denied: {}", may_not.join(", "))
    };
    Decision::Deny(Denial {
        status: 401,
        code: "DENIED",
        message,
        www_authenticate: Some(www_authenticate(challenge, &route.scopes, Some("insufficient_scope"))),
        reason: format!("token of `{}` lacks {missing}", quote(&token.subject)),
        rule: None,
        kind: DenyKind::InsufficientScope,
    })
}

fn is_deploy_token(token: &VerifiedToken) -> bool {
    token.auth_type.as_deref() == Some("deploy_token")
}

/// The bundle's view of the principal, before the token's grants: revocations; deploy
/// tokens (revoked/expired → 401, outside the owner → 404, outside the scopes → 403); and
/// the dependency proxy, which users reach only as reporter or above of the group (else 404).
fn principal_check(
    route: &Route,
    token: &VerifiedToken,
    challenge: &ChallengeConfig,
    policy: &Policy,
    now: i64,
) -> Option<Denial> {
    let creds = &policy.credentials;
    let is_deploy = token.auth_type.as_deref() == Some("deploy_token");
    let unauthorized = |why: String, kind: DenyKind| Denial {
        status: 401,
        code: "UNAUTHORIZED",
        message: format!("authentication required: {why}"),
        www_authenticate: Some(www_authenticate(challenge, &route.scopes, Some("invalid_token"))),
        reason: format!("{why} (bundle revision {})", policy.revision),
        rule: None,
        kind,
    };
    if let Some(why) = creds.revocations.check(&token.jti, &token.subject, token.issued_at, !is_deploy) {
        return Some(unauthorized(why, DenyKind::Revoked));
    }
    // A job token's registry token names its CI job (nested `user_info.job`): the bundle's
    // job revocations (by job, pipeline or project) end it at once. One without a job is
    // not a token the token service issues: refused.
    if token.auth_type.as_deref() == Some("job_token") {
        let Some(job) = &token.job else {
            return Some(unauthorized(
                format!("job token of `{}` names no CI job", quote(&token.subject)),
                DenyKind::Revoked,
            ));
        };
        if let Some(why) = creds.revocations.job(job) {
            return Some(unauthorized(why, DenyKind::Revoked));
        }
    }
    let repositories = || {
        route.scopes.iter().filter_map(|s| match &s.resource {
            crate::request::scope::Resource::Repository(r) => Some((r.as_str(), s.actions)),
            crate::request::scope::Resource::Catalog => None,
        })
    };
    if is_deploy {
        let Some(dt) = creds.by_username(&token.subject) else {
            return Some(unauthorized(
                format!("deploy token `{}` is not known", quote(&token.subject)),
                DenyKind::DeployTokenUnusable,
            ));
        };
        // Bound to the deploy token's id, not only its username: a JWT of a replaced deploy
        // token (same username, new id) ends with the replacement.
        if token.deploy_token_id != Some(dt.id) {
            let why = match token.deploy_token_id {
                Some(id) => format!("deploy token {id} (`{}`) was replaced by deploy token {}", dt.username, dt.id),
                None => format!("token of deploy token `{}` does not name its deploy token id", dt.username),
            };
            return Some(unauthorized(why, DenyKind::DeployTokenUnusable));
        }
        if let Err(DeployDenial::Unusable(why)) = dt.usable(now) {
            return Some(unauthorized(why, DenyKind::DeployTokenUnusable));
        }
        if route.endpoint == Endpoint::Base && dt.actions().is_empty() {
            return Some(forbidden(format!("deploy token `{}` has no registry scopes", dt.username), policy));
        }
        for (repo, actions) in repositories() {
            match dt.allows(repo, actions) {
                Ok(()) => {}
                Err(DeployDenial::OutsideOwner(why)) => return Some(name_unknown(repo, why, policy)),
                Err(DeployDenial::Forbidden(why)) => return Some(forbidden(why, policy)),
                Err(DeployDenial::Unusable(why)) => return Some(unauthorized(why, DenyKind::DeployTokenUnusable)),
            }
            // Deploy tokens only inside projects, as users: a grant on a repository must name
            // the project the token service found it in (`meta.project_path`), else the
            // repository belongs to no project (`acme/rogue` under group `acme`) and no owner
            // could manage it. The dependency proxy belongs to its group.
            if dependency_proxy_group(repo).is_none() && !token.granted_repository(repo).is_empty() {
                let in_project = token.project_path(repo).is_some_and(|p| crate::policy::deploy::in_subtree(p, repo));
                if !in_project {
                    let why = format!("repository `{repo}` belongs to no project; deploy tokens only reach projects");
                    return Some(name_unknown(repo, why, policy));
                }
            }
        }
        return None;
    }
    for (repo, _) in repositories() {
        if let Some(group) = dependency_proxy_group(repo) {
            let level = token.access_level(repo).unwrap_or(0);
            if level < DEPENDENCY_PROXY_LEVEL.number() {
                let why = format!(
                    "`{}` is not a reporter or above of group `{group}` (dependency proxy needs {})",
                    quote(&token.subject),
                    DEPENDENCY_PROXY_LEVEL.name()
                );
                return Some(name_unknown(repo, why, policy));
            }
        }
    }
    None
}

fn name_unknown(repo: &str, why: String, policy: &Policy) -> Denial {
    Denial {
        status: 404,
        code: "NAME_UNKNOWN",
        message: format!("repository name not known to registry: `{repo}`"),
        www_authenticate: None,
        reason: format!("{why} (bundle revision {})", policy.revision),
        rule: None,
        kind: DenyKind::NotFound,
    }
}

fn forbidden(why: String, policy: &Policy) -> Denial {
    Denial {
        status: 403,
        code: "DENIED",
        message: format!("requested access to the resource is denied: {why}"),
        www_authenticate: None,
        reason: format!("{why} (bundle revision {})", policy.revision),
        rule: None,
        kind: DenyKind::Forbidden,
    }
}

/// The protection operation a route performs, on which repository.
pub fn operation(route: &Route) -> Option<(&str, Operation<'_>)> {
    match (&route.endpoint, route.method) {
        (Endpoint::UploadStart { name, .. } | Endpoint::Upload { name, .. }, _) => {
            Some((name, Operation::Push { tag: None }))
        }
        (Endpoint::Manifest { name, reference }, Method::Put) => {
            Some((name, Operation::Push { tag: is_tag(reference).then_some(reference.as_str()) }))
        }
        (Endpoint::Manifest { name, reference }, Method::Delete) if is_tag(reference) => {
            Some((name, Operation::DeleteTag { tag: reference }))
        }
        (Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. }, Method::Delete) => {
            Some((name, Operation::DeleteContent))
        }
        _ => None,
    }
}

/// Applies the policy's protection rules with the access level the token states.
fn protect(route: &Route, token: &VerifiedToken, policy: &Policy) -> Protection {
    let Some((repo, op)) = operation(route) else { return Protection::Allowed };
    if policy.rules.is_empty() {
        return Protection::Allowed;
    }
    let level = token.access_level(repo);
    let actor = Actor { name: &token.subject, level, admin: level == Some(AccessLevel::Admin.number()) };
    policy.rules.evaluate(repo, op, actor)
}

/// `Bearer realm="…",service="…"[,scope="…"][,error="…"]`.
pub fn www_authenticate(challenge: &ChallengeConfig, scopes: &[Scope], error: Option<&str>) -> String {
    let mut out = format!("Bearer realm=\"{}\",service=\"{}\"", challenge.realm, challenge.service);
    if !scopes.is_empty() {
        let joined = scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ");
        let _ = write!(out, ",scope=\"{joined}\"");
    }
    if let Some(e) = error {
        let _ = write!(out, ",error=\"{e}\"");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::access::{Action, ActionSet};
    use crate::request::route::classify;

    fn challenge() -> ChallengeConfig {
        ChallengeConfig { realm: "http://127.0.0.1:5001/jwt/auth".into(), service: "container_registry".into() }
    }

    fn token(grants: &[&str]) -> VerifiedToken {
        VerifiedToken {
            kid: "k".into(),
            subject: "dev".into(),
            jti: "j".into(),
            auth_type: None,
            user: None,
            expires_at: 0,
            not_before: None,
            issued_at: None,
            grants: grants.iter().map(|g| Scope::parse(g).unwrap()).collect(),
            access_levels: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn bearer_extraction() {
        assert_eq!(bearer_token(&[]), Ok(None));
        assert_eq!(bearer_token(&["Bearer abc"]), Ok(Some("abc")));
        assert_eq!(bearer_token(&["bearer  abc "]), Ok(Some("abc")));
        assert!(bearer_token(&["Basic abc"]).is_err());
        assert!(bearer_token(&["Bearer a b"]).is_err());
        // Only RFC 6750 b64token bytes: no control, non-ASCII whitespace or other characters.
        assert_eq!(bearer_token(&["Bearer aZ09-._~+/=="]), Ok(Some("aZ09-._~+/==")));
        for bad in ["Bearer a\u{a0}b", "Bearer a\tb", "Bearer a\u{0}b", "Bearer a,b", "Bearer a\"b", "Bearer é"] {
            assert!(bearer_token(&[bad]).is_err(), "{bad:?}");
        }
        assert!(bearer_token(&["Bearer a", "Bearer a"]).is_err());
        assert!(bearer_token(&["Bearer"]).is_err());
    }

    #[test]
    fn missing_token_gets_a_challenge_with_scope() {
        let r = classify("PUT", "/v2/acme/web/manifests/v1", None).unwrap();
        let Decision::Deny(d) = decide(Ok(&r), Credential::Missing, &challenge(), &Policy::default(), 0) else {
            panic!()
        };
        assert_eq!(d.status, 401);
        assert_eq!(
            d.www_authenticate.as_deref(),
            Some(
                r#"Bearer realm="http://127.0.0.1:5001/jwt/auth",service="container_registry",scope="repository:acme/web:pull,push""#
            )
        );
        let body: serde_json::Value = serde_json::from_str(&d.body()).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    }

    #[test]
    fn insufficient_scope_names_what_is_missing() {
        let r = classify("PUT", "/v2/acme/web/manifests/v1", None).unwrap();
        let t = token(&["repository:acme/web:pull"]);
        let Decision::Deny(d) = decide(Ok(&r), Credential::Valid(&t), &challenge(), &Policy::default(), 0) else {
            panic!()
        };
        assert_eq!((d.status, d.code), (401, "DENIED"));
        assert!(d.www_authenticate.unwrap().ends_with(r#"error="insufficient_scope""#));
        assert!(
            d.message.contains("this token does not grant push on repository `acme/web` (it grants: pull)"),
            "{}",
            d.message
        );
        assert!(d.message.ends_with("request a new token with scope `repository:acme/web:pull,push`"), "{}", d.message);
        assert!(d.reason.contains("lacks pull,push on repository `acme/web` (granted: pull)"), "{}", d.reason);
    }

    #[test]
    fn token_short_versus_person_may_not() {
        // The token states the principal's level on the repository (`meta.access_level`).
        let with_level = |level: u8, actions: &[&str]| {
            let mut t = token(&[&format!("repository:acme/web:{}", actions.join(","))]);
            t.access_levels = vec![("acme/web".into(), level)];
            t
        };
        let del = classify("DELETE", "/v2/acme/web/manifests/v1", None).unwrap();
        // mia is a maintainer (40): she may delete, her pull-only token does not grant it.
        let t = with_level(40, &["pull"]);
        let Decision::Deny(d) = decide(Ok(&del), Credential::Valid(&t), &challenge(), &Policy::default(), 0) else {
            panic!()
        };
        assert!(d.message.contains("this token does not grant delete on repository `acme/web`"), "{}", d.message);
        assert!(d.message.contains("request a new token"), "{}", d.message);
        // A reporter (20) may not delete, whatever the token.
        let t = with_level(20, &["pull"]);
        let Decision::Deny(d) = decide(Ok(&del), Credential::Valid(&t), &challenge(), &Policy::default(), 0) else {
            panic!()
        };
        assert!(d.message.contains("`dev` (reporter) may not delete on repository `acme/web`"), "{}", d.message);
        assert!(!d.message.contains("new token"), "{}", d.message);
        let push = classify("PUT", "/v2/acme/web/manifests/v1", None).unwrap();
        let t = with_level(20, &["pull"]);
        let Decision::Deny(d) = decide(Ok(&push), Credential::Valid(&t), &challenge(), &Policy::default(), 0) else {
            panic!()
        };
        assert!(d.message.contains("`dev` (reporter) may not push on repository `acme/web`"), "{}", d.message);
    }

    #[test]
    fn mount_needs_pull_on_from() {
        let d = "sha256:".to_owned() + &"a".repeat(64);
        let r = classify("POST", &format!("/v2/acme/web/blobs/uploads/?mount={d}&from=acme/secret"), None).unwrap();
        let t = token(&["repository:acme/web:pull,push"]);
        assert!(!decide(Ok(&r), Credential::Valid(&t), &challenge(), &Policy::default(), 0).is_allow());
        let t = token(&["repository:acme/web:pull,push", "repository:acme/secret:pull"]);
        assert!(decide(Ok(&r), Credential::Valid(&t), &challenge(), &Policy::default(), 0).is_allow());
    }

    #[test]
    fn base_needs_any_valid_token_and_catalog_needs_star() {
        let base = classify("GET", "/v2/", None).unwrap();
        assert!(decide(Ok(&base), Credential::Valid(&token(&[])), &challenge(), &Policy::default(), 0).is_allow());
        let cat = classify("GET", "/v2/_catalog", None).unwrap();
        assert!(!decide(Ok(&cat), Credential::Valid(&token(&[])), &challenge(), &Policy::default(), 0).is_allow());
        assert!(decide(
            Ok(&cat),
            Credential::Valid(&token(&["registry:catalog:*"])),
            &challenge(),
            &Policy::default(),
            0
        )
        .is_allow());
        let _ = ActionSet::of(&[Action::Pull]);
    }
}
