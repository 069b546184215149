//! `explain`: what the filter would decide for a principal and a request under a bundle, and
//! why. It mints (in memory) the token the token service would issue for the request's
//! scopes and runs the one decision function on it, so the explanation cannot drift from
//! what the filter and the token service do.

use crate::decide::config::ChallengeConfig;
use crate::decide::decision::{decide, Credential, Decision};
use crate::issue::job::{may_run_jobs, Job};
use crate::issue::principal::{issued_token, principal, Principal};
use crate::policy::bundle::Policy;
use crate::policy::deploy::DeployToken;
use crate::policy::directory::Directory;
use crate::request::access::AccessLevel;
use crate::request::route::classify;
use crate::request::scope::Resource;

/// The decision and every fact it rests on, printable.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    pub lines: Vec<String>,
}

/// Placeholder challenge: `explain` and the access review show decisions, not challenges.
pub(crate) fn challenge() -> ChallengeConfig {
    ChallengeConfig { realm: "(token service)".into(), service: "(service)".into() }
}

/// What the filter would decide for `name` (a user or a deploy token's username) making
/// `method path` at `now` (unix seconds: deploy token expiry, user revocations).
pub fn explain(
    directory: &Directory,
    policy: &Policy,
    name: &str,
    method: &str,
    path: &str,
    now: i64,
) -> Result<Explanation, String> {
    let principal = principal(directory, policy, name)?;
    Ok(explain_principal(directory, policy, principal, method, path, now))
}

/// [`explain`] for the job token of CI job `job` (triggered by its `user`, who must exist):
/// what the token service would grant the job for the request, and the decision.
pub fn explain_job(
    directory: &Directory,
    policy: &Policy,
    job: &Job,
    method: &str,
    path: &str,
    now: i64,
) -> Result<Explanation, String> {
    let user = directory.user(&job.user).ok_or_else(|| format!("no user `{}` in the principals", job.user))?;
    let mut explanation = explain_principal(directory, policy, Principal::Job(user, job), method, path, now);
    let mut note = format!(
        "principal: job token of job {} (pipeline {}) of project `{}`, triggered by `{}`",
        job.id, job.pipeline_id, job.project, job.user
    );
    if let Err(refusal) = may_run_jobs(directory, user, &job.project) {
        note.push_str(&format!("; the token service would refuse to register it: {refusal}"));
    }
    explanation.lines.insert(1, note);
    Ok(explanation)
}

fn explain_principal(
    directory: &Directory,
    policy: &Policy,
    principal: Principal<'_>,
    method: &str,
    path: &str,
    now: i64,
) -> Explanation {
    let name = principal.name().to_owned();
    let challenge = challenge();
    let mut lines = vec![format!("bundle revision {} ({} protection rules)", policy.revision, policy.rules.len())];
    let route = classify(method, path, None);
    let route = match route {
        Ok(r) => r,
        Err(e) => {
            let decision = decide(Err(&e), Credential::Missing, &challenge, policy, now);
            lines.push(format!("request: refused by the route grammar: {e}"));
            return Explanation { decision, lines };
        }
    };
    let needs = route.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ");
    lines.push(format!(
        "request: {method} {path} needs {}",
        if needs.is_empty() { "a valid token".into() } else { needs }
    ));
    if let Principal::DeployToken(t) = principal {
        lines.push(format!("principal: `{name}` is {}", describe_deploy_token(t, now)));
    }
    for scope in &route.scopes {
        if let Resource::Repository(repo) = &scope.resource {
            match (principal, directory.project_of(repo)) {
                (Principal::User(user) | Principal::Job(user, _), Some(p)) => lines.push(format!(
                    "principal: `{name}` is {} on project `{}` (visibility {:?}){}",
                    directory.effective_level(user, &p.path),
                    p.path,
                    p.visibility,
                    if user.admin { ", admin" } else { "" }
                )),
                (Principal::DeployToken(_), Some(p)) => {
                    lines.push(format!("`{repo}` belongs to project `{}` (visibility {:?})", p.path, p.visibility))
                }
                (_, None) => lines.push(format!("principal: `{repo}` belongs to no project: nothing is granted on it")),
            }
        }
    }
    let (token, notes) = issued_token(directory, policy, principal, &route.scopes, now);
    let granted = token.grants.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(" ");
    lines.push(format!("token service would grant: {}", if granted.is_empty() { "nothing".into() } else { granted }));
    lines.extend(notes.into_iter().map(|n| format!("token service: {n}")));
    let decision = decide(Ok(&route), Credential::Valid(&token), &challenge, policy, now);
    Explanation { decision, lines }
}

/// `deploy token 1 of group `acme` (read_registry, write_registry)`, with its state at `now`.
pub fn describe_deploy_token(t: &DeployToken, now: i64) -> String {
    format!("deploy token {} of {} ({}){}, no access level", t.id, t.owner, deploy_token_scopes(t), state(t, now))
}

/// `group acme: read_registry, write_registry`, with its state at `now` (`, expired`).
pub fn deploy_token_standing(t: &DeployToken, now: i64) -> String {
    format!("{}: {}{}", t.owner.to_string().replace('`', ""), deploy_token_scopes(t), state(t, now))
}

fn deploy_token_scopes(t: &DeployToken) -> String {
    let mut scopes: Vec<&str> = t
        .scopes
        .iter()
        .map(|s| match s {
            crate::policy::deploy::DeployScope::ReadRegistry => "read_registry",
            crate::policy::deploy::DeployScope::WriteRegistry => "write_registry",
        })
        .collect();
    scopes.sort_unstable();
    if scopes.is_empty() {
        "no scopes".to_owned()
    } else {
        scopes.join(", ")
    }
}

fn state(t: &DeployToken, now: i64) -> &'static str {
    match t.usable(now) {
        Ok(()) => "",
        Err(_) if t.revoked => ", revoked",
        Err(_) => ", expired",
    }
}

/// `owner (50)`, `admin`, or `not a member`: a user's standing on a project.
pub fn describe_level(level: AccessLevel) -> String {
    match level {
        AccessLevel::NoAccess => "not a member".to_owned(),
        AccessLevel::Admin => "admin".to_owned(),
        l => format!("{} ({})", l.name(), l.number()),
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.decision {
            Decision::Allow { would_deny } => {
                writeln!(f, "decision: ALLOW (the token grants what the request needs)")?;
                if let Some((rule, message)) = would_deny {
                    writeln!(f, "dry run: rule `{rule}` would deny: {message}")?;
                }
            }
            Decision::Deny(d) => {
                writeln!(f, "decision: DENY {} {}", d.status, d.code)?;
                if let Some(rule) = &d.rule {
                    writeln!(f, "rule: {rule}")?;
                }
                writeln!(f, "message: {}", d.message)?;
            }
        }
        for l in &self.lines {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRINCIPALS: &str = include_str!("../../../../policies/example/principals.json");
    const BUNDLE: &str = include_str!("../../../../policies/example/bundle.json");

    /// 2027-01-15T08:00:00Z: after the example's expired deploy token expired.
    const NOW: i64 = 1_800_000_000;

    fn run(user: &str, method: &str, path: &str) -> Explanation {
        let dir = Directory::from_json(PRINCIPALS).unwrap();
        let policy = Policy::from_json(BUNDLE).unwrap();
        explain(&dir, &policy, user, method, path, NOW).unwrap()
    }

    #[test]
    fn explains_rule_denials_and_allows() {
        let e = run("dev", "PUT", "/v2/acme/web/app/manifests/v1");
        let text = e.to_string();
        assert!(text.starts_with("decision: DENY 403 DENIED\nrule: web-release-tags\n"), "{text}");
        assert!(text.contains("developer (30) on project `acme/web`"), "{text}");
        let e = run("dev", "PUT", "/v2/acme/web/app/manifests/dev-1");
        assert!(e.decision.is_allow(), "{e}");
        let e = run("mia", "PUT", "/v2/acme/web/app/manifests/v1");
        assert!(e.decision.is_allow(), "{e}");
        // api-prod-maintainers: protected up to developer on acme/platform/api/prod,
        // the token service withholds push, and the filter names the rule.
        let e = run("alice", "PUT", "/v2/acme/platform/api/manifests/x");
        assert!(e.decision.is_allow(), "{e}");
        let e = run("rita", "PUT", "/v2/acme/web/app/manifests/x");
        assert_eq!(e.decision.status(), 401, "{e}");
        let e = run("olga", "PUT", "/v2/other/tools/manifests/x");
        assert!(e.decision.is_allow(), "{e}");
        assert!(e.to_string().contains("dry run: rule `other-push-dry-run` would deny"), "{e}");
        assert!(explain(&Directory::from_json(PRINCIPALS).unwrap(), &Policy::default(), "nobody", "GET", "/v2/", NOW)
            .is_err());
    }

    #[test]
    fn explains_deploy_tokens_as_the_filter_decides() {
        // acme-ci: group `acme`, read_registry + write_registry, no access level.
        let e = run("acme-ci", "PUT", "/v2/acme/web/app/manifests/dev-1");
        assert!(e.decision.is_allow(), "{e}");
        let text = e.to_string();
        assert!(text.contains("`acme-ci` is deploy token 1 of group `acme`"), "{text}");
        assert!(text.contains("token service would grant: repository:acme/web/app:pull,push"), "{text}");
        // A release tag: web-release-tags requires maintainer, a deploy token has no level.
        let e = run("acme-ci", "PUT", "/v2/acme/web/app/manifests/v1");
        assert_eq!(e.decision.status(), 403, "{e}");
        assert!(e.to_string().contains("rule: web-release-tags"), "{e}");
        let e = run("acme-ci", "DELETE", "/v2/acme/web/app/manifests/dev-1");
        assert_eq!(e.decision.status(), 403, "{e}");
        let e = run("acme-ci", "GET", "/v2/other/tools/manifests/x");
        assert_eq!(e.decision.status(), 404, "{e}");
        let e = run("deploy-token-2", "GET", "/v2/acme/web/app/manifests/x");
        assert!(e.decision.is_allow(), "{e}");
        let e = run("deploy-token-2", "PUT", "/v2/acme/web/app/manifests/x");
        assert_eq!(e.decision.status(), 403, "{e}");
        let e = run("deploy-token-4", "GET", "/v2/acme/web/app/manifests/x");
        assert_eq!(e.decision.status(), 401, "{e}");
        assert!(e.to_string().contains("expired"), "{e}");
        let e = run("deploy-token-5", "GET", "/v2/acme/web/app/manifests/x");
        assert_eq!(e.decision.status(), 401, "{e}");
        assert!(e.to_string().contains("revoked"), "{e}");
    }
}
