//! `explain`: what the filter would decide for a principal and a request under a bundle, and
//! why. It mints (in memory) the token the token service would issue for the request's
//! scopes and runs the one decision function on it, so the explanation cannot drift from
//! what the filter and the token service do.

use crate::bundle::Policy;
use crate::decision::{decide, ChallengeConfig, Credential, Decision};
use crate::directory::Directory;
use crate::route::classify;
use crate::scope::Resource;
use crate::token::VerifiedToken;

/// The decision and every fact it rests on, printable.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    pub lines: Vec<String>,
}

pub fn explain(
    directory: &Directory,
    policy: &Policy,
    username: &str,
    method: &str,
    path: &str,
) -> Result<Explanation, String> {
    let user = directory.user(username).ok_or_else(|| format!("no user `{username}` in the principals"))?;
    let challenge = ChallengeConfig { realm: "(token service)".into(), service: "(service)".into() };
    let mut lines = vec![format!("bundle revision {} ({} protection rules)", policy.revision, policy.rules.len())];
    let route = classify(method, path, None);
    let route = match route {
        Ok(r) => r,
        Err(e) => {
            let decision = decide(Err(&e), Credential::Missing, &challenge, policy, 0);
            lines.push(format!("request: refused by the route grammar: {e}"));
            return Ok(Explanation { decision, lines });
        }
    };
    let needs = route.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ");
    lines.push(format!(
        "request: {method} {path} needs {}",
        if needs.is_empty() { "a valid token".into() } else { needs }
    ));
    for scope in &route.scopes {
        if let Resource::Repository(repo) = &scope.resource {
            match directory.project_of(repo) {
                Some(p) => lines.push(format!(
                    "principal: `{username}` is {} on project `{}` (visibility {:?}){}",
                    directory.effective_level(user, &p.path),
                    p.path,
                    p.visibility,
                    if user.admin { ", admin" } else { "" }
                )),
                None => lines.push(format!("principal: `{repo}` belongs to no project: nothing is granted on it")),
            }
        }
    }
    let (grants, notes) = directory.grant_under(policy, user, &route.scopes);
    let granted = grants.iter().map(|g| g.scope.to_string()).collect::<Vec<_>>().join(" ");
    lines.push(format!("token service would grant: {}", if granted.is_empty() { "nothing".into() } else { granted }));
    lines.extend(notes.into_iter().map(|n| format!("token service: {n}")));
    let token = VerifiedToken {
        kid: String::new(),
        subject: username.to_owned(),
        jti: String::new(),
        auth_type: Some("password".into()),
        user: None,
        expires_at: i64::MAX,
        not_before: None,
        issued_at: None,
        access_levels: grants
            .iter()
            .filter_map(|g| match &g.scope.resource {
                Resource::Repository(r) => Some((r.clone(), g.access_level?.number())),
                Resource::Catalog => None,
            })
            .collect(),
        project_paths: grants
            .iter()
            .filter_map(|g| match &g.scope.resource {
                Resource::Repository(r) => Some((r.clone(), g.project_path.clone()?)),
                Resource::Catalog => None,
            })
            .collect(),
        grants: grants.into_iter().map(|g| g.scope).collect(),
        deploy_token_id: None,
    };
    let decision = decide(Ok(&route), Credential::Valid(&token), &challenge, policy, 0);
    Ok(Explanation { decision, lines })
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

    const PRINCIPALS: &str = include_str!("../../../policies/example/principals.json");
    const BUNDLE: &str = include_str!("../../../policies/example/bundle.json");

    fn run(user: &str, method: &str, path: &str) -> Explanation {
        let dir = Directory::from_json(PRINCIPALS).unwrap();
        let policy = Policy::from_json(BUNDLE).unwrap();
        explain(&dir, &policy, user, method, path).unwrap()
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
        assert!(
            explain(&Directory::from_json(PRINCIPALS).unwrap(), &Policy::default(), "nobody", "GET", "/v2/").is_err()
        );
    }
}
