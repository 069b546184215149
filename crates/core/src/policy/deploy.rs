//! Deploy tokens (GitLab's deploy tokens), revocations, and the group dependency proxy.
//!
//! Deploy tokens live in the policy bundle, so the filter enforces the bundle's view of a
//! deploy token on every request — revoked or expired → 401 at once; a repository outside
//! the owner's subtree → 404 `NAME_UNKNOWN` (its existence is not revealed); an action
//! outside the token's scopes → 403 `DENIED` — whatever the JWT itself says.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

use crate::request::access::{AccessLevel, Action, ActionSet};
use crate::request::name::is_repository_name;

/// `<group>/dependency_proxy/containers/<image>`: the group whose pull-through cache serves
/// `<image>`, if `repo` is a dependency proxy path.
pub fn dependency_proxy_group(repo: &str) -> Option<&str> {
    const MARKER: &str = "/dependency_proxy/containers/";
    // The first `/` followed by the marker (what `split_once(MARKER)` finds), by `memchr` on
    // `/`: this runs on every request, and a substring searcher's set-up costs more.
    let at = repo.match_indices('/').map(|(i, _)| i).find(|&i| repo[i..].starts_with(MARKER))?;
    let (group, image) = (&repo[..at], &repo[at + MARKER.len()..]);
    (!group.is_empty() && !image.is_empty()).then_some(group)
}

/// Whether `path` is `owner` or lies under it (component boundary: `acme` covers
/// `acme/platform/api`, not `acme-other/x`).
pub fn in_subtree(owner: &str, path: &str) -> bool {
    path == owner || path.strip_prefix(owner).is_some_and(|rest| rest.starts_with('/'))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployScope {
    ReadRegistry,
    WriteRegistry,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Owner {
    /// A group: covers every subgroup and project under it.
    Group(String),
    /// A project: covers the project's repositories only.
    Project(String),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Group(p) => write!(f, "group `{p}`"),
            Owner::Project(p) => write!(f, "project `{p}`"),
        }
    }
}

impl Owner {
    pub fn path(&self) -> &str {
        match self {
            Owner::Group(p) | Owner::Project(p) => p,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeployToken {
    id: u64,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    name: Option<String>,
    owner: Owner,
    scopes: Vec<DeployScope>,
    /// Lowercase hex SHA-256 of the token secret; the secret itself is never stored.
    sha256: String,
    /// RFC 3339; absent → never expires.
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    revoked: bool,
}

/// A validated deploy token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployToken {
    pub id: u64,
    pub username: String,
    pub name: Option<String>,
    pub owner: Owner,
    pub scopes: HashSet<DeployScope>,
    pub sha256: String,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub revoked: bool,
}

/// Why a deploy token may not do what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployDenial {
    /// 401: revoked, expired or unknown.
    Unusable(String),
    /// 404 `NAME_UNKNOWN`: outside the owner's subtree.
    OutsideOwner(String),
    /// 403 `DENIED`: outside the scopes, or a project token on the dependency proxy.
    Forbidden(String),
}

impl DeployToken {
    pub fn actions(&self) -> ActionSet {
        let mut set = ActionSet::EMPTY;
        if self.scopes.contains(&DeployScope::ReadRegistry) {
            set = set.with(Action::Pull);
        }
        if self.scopes.contains(&DeployScope::WriteRegistry) {
            set = set.with(Action::Push);
        }
        set
    }

    /// Revoked or expired at `now`?
    pub fn usable(&self, now: i64) -> Result<(), DeployDenial> {
        if self.revoked {
            return Err(DeployDenial::Unusable(format!("deploy token {} (`{}`) is revoked", self.id, self.username)));
        }
        if let Some(exp) = self.expires_at {
            if now >= exp {
                return Err(DeployDenial::Unusable(format!(
                    "deploy token {} (`{}`) has expired",
                    self.id, self.username
                )));
            }
        }
        Ok(())
    }

    /// Whether this token may use the dependency proxy on its own endpoint, as GitLab's
    /// `DeployToken#valid_for_dependency_proxy?`: a group token with both registry scopes.
    pub fn valid_for_dependency_proxy(&self) -> Result<(), String> {
        let who = format!("deploy token `{}`", self.username);
        if let Owner::Project(p) = &self.owner {
            return Err(format!(
                "{who} belongs to project `{p}`; the dependency proxy accepts group deploy tokens only"
            ));
        }
        let both =
            self.scopes.contains(&DeployScope::ReadRegistry) && self.scopes.contains(&DeployScope::WriteRegistry);
        if !both {
            return Err(format!(
                "{who} has scopes {}; the dependency proxy needs read_registry and write_registry",
                self.scope_names()
            ));
        }
        Ok(())
    }

    /// May this token perform `actions` on `repo`? (Owner subtree, then scopes.)
    pub fn allows(&self, repo: &str, actions: ActionSet) -> Result<(), DeployDenial> {
        let who = format!("deploy token `{}`", self.username);
        if let Some(group) = dependency_proxy_group(repo) {
            match &self.owner {
                Owner::Project(_) => {
                    return Err(DeployDenial::Forbidden(format!(
                        "{who} belongs to a project; the dependency proxy needs a group deploy token"
                    )))
                }
                Owner::Group(g) if !in_subtree(g, group) => {
                    return Err(DeployDenial::OutsideOwner(format!("repository `{repo}` is not known")))
                }
                Owner::Group(_) => {}
            }
        } else if !in_subtree(self.owner.path(), repo) {
            return Err(DeployDenial::OutsideOwner(format!("repository `{repo}` is not known")));
        }
        let mut allowed = self.actions();
        if dependency_proxy_group(repo).is_some() {
            // The dependency proxy is a read-only pull-through cache.
            allowed = allowed.intersect(ActionSet::of(&[Action::Pull]));
        }
        if !allowed.covers(actions) {
            let missing = ActionSet::of(&actions.iter().filter(|a| !allowed.contains(*a)).collect::<Vec<_>>());
            return Err(DeployDenial::Forbidden(format!(
                "{who} may not {missing} on `{repo}`: its scopes are {}",
                self.scope_names()
            )));
        }
        Ok(())
    }

    fn scope_names(&self) -> String {
        let mut names: Vec<&str> = self
            .scopes
            .iter()
            .map(|s| match s {
                DeployScope::ReadRegistry => "read_registry",
                DeployScope::WriteRegistry => "write_registry",
            })
            .collect();
        names.sort_unstable();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRevocations {
    #[serde(default)]
    jti: Vec<String>,
    #[serde(default)]
    users: Vec<RawUserRevocation>,
    #[serde(default)]
    deploy_tokens: Vec<u64>,
    #[serde(default)]
    jobs: RawJobRevocations,
}

/// `revocations.jobs`: CI jobs whose job tokens (and every registry token issued through
/// them) are refused, by job id, by pipeline id or by project (every job of that project or
/// of a project under that path).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawJobRevocations {
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    pipelines: Vec<u64>,
    #[serde(default)]
    projects: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserRevocation {
    username: String,
    /// RFC 3339: tokens issued before this instant are revoked; absent → all of them.
    #[serde(default)]
    issued_before: Option<String>,
}

/// Revoked credentials: token ids, users (all tokens, or those issued before an instant).
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    jti: HashSet<String>,
    users: HashMap<String, Option<i64>>,
    job_ids: HashSet<u64>,
    pipelines: HashSet<u64>,
    job_projects: Vec<String>,
}

impl Revocations {
    /// Why a token with these claims is revoked, if it is.
    pub fn check(&self, jti: &str, subject: &str, issued_at: Option<i64>, is_user: bool) -> Option<String> {
        if self.jti.contains(jti) {
            return Some(format!("token `{jti}` is revoked"));
        }
        if !is_user {
            return None;
        }
        match self.users.get(subject) {
            Some(None) => Some(format!("tokens of `{subject}` are revoked")),
            Some(Some(before)) if issued_at.map_or(true, |iat| iat < *before) => {
                Some(format!("tokens of `{subject}` issued before {before} are revoked"))
            }
            _ => None,
        }
    }

    /// Why tokens of CI job `job` are revoked (`revocations.jobs`), if they are.
    pub fn job(&self, job: &crate::token::claims::JobRef) -> Option<String> {
        if self.job_ids.contains(&job.id) {
            return Some(format!("job {} is revoked", job.id));
        }
        if self.pipelines.contains(&job.pipeline_id) {
            return Some(format!("pipeline {} (of job {}) is revoked", job.pipeline_id, job.id));
        }
        self.job_projects
            .iter()
            .find(|p| in_subtree(p, &job.project))
            .map(|p| format!("jobs of `{p}` are revoked (job {} of `{}`)", job.id, job.project))
    }

    /// Whether `username` may get new tokens at `now`.
    pub fn user_blocked(&self, username: &str, now: i64) -> bool {
        match self.users.get(username) {
            Some(None) => true,
            Some(Some(before)) => now < *before,
            None => false,
        }
    }
}

/// The deploy tokens and revocations of a bundle.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    tokens: Vec<DeployToken>,
    by_username: HashMap<String, usize>,
    pub revocations: Revocations,
}

impl Credentials {
    pub fn by_username(&self, username: &str) -> Option<&DeployToken> {
        self.by_username.get(username).and_then(|i| self.tokens.get(*i))
    }

    pub fn by_digest(&self, sha256_hex: &str) -> Option<&DeployToken> {
        self.tokens.iter().find(|t| t.sha256 == sha256_hex)
    }

    pub fn tokens(&self) -> &[DeployToken] {
        &self.tokens
    }
}

fn rfc3339(at: &str, s: &str) -> Result<i64, (String, String)> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|e| (at.to_owned(), format!("`{s}` is not an RFC 3339 time: {e}")))
}

/// Validates the raw sections; errors are (JSON path, reason).
pub(crate) fn compile(
    tokens: Vec<RawDeployToken>,
    revocations: RawRevocations,
) -> Result<Credentials, (String, String)> {
    let mut creds = Credentials::default();
    let mut ids = HashSet::new();
    let mut digests = HashSet::new();
    for (i, t) in tokens.into_iter().enumerate() {
        let at = format!("$.deploy_tokens[{i}]");
        if !ids.insert(t.id) {
            return Err((format!("{at}.id"), format!("duplicate deploy token id {}", t.id)));
        }
        let username = t.username.unwrap_or_else(|| format!("deploy-token-{}", t.id));
        if username.is_empty() || !username.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
            return Err((format!("{at}.username"), format!("invalid username `{username}`")));
        }
        if creds.by_username.contains_key(&username) {
            return Err((format!("{at}.username"), format!("duplicate deploy token username `{username}`")));
        }
        if !is_repository_name(t.owner.path()) {
            return Err((format!("{at}.owner"), format!("`{}` is not a valid group or project path", t.owner.path())));
        }
        if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err((format!("{at}.sha256"), "must be 64 lowercase hex characters (SHA-256 of the token)".into()));
        }
        if !digests.insert(t.sha256.clone()) {
            return Err((format!("{at}.sha256"), "the same token digest appears twice".into()));
        }
        let expires_at = t.expires_at.as_deref().map(|s| rfc3339(&format!("{at}.expires_at"), s)).transpose()?;
        creds.by_username.insert(username.clone(), creds.tokens.len());
        creds.tokens.push(DeployToken {
            id: t.id,
            username,
            name: t.name,
            owner: t.owner,
            scopes: t.scopes.into_iter().collect(),
            sha256: t.sha256,
            expires_at,
            revoked: t.revoked,
        });
    }
    for (i, id) in revocations.deploy_tokens.iter().enumerate() {
        match creds.tokens.iter_mut().find(|t| t.id == *id) {
            Some(t) => t.revoked = true,
            None => return Err((format!("$.revocations.deploy_tokens[{i}]"), format!("no deploy token with id {id}"))),
        }
    }
    creds.revocations.jti = revocations.jti.into_iter().collect();
    for (i, u) in revocations.users.into_iter().enumerate() {
        let before = u
            .issued_before
            .as_deref()
            .map(|s| rfc3339(&format!("$.revocations.users[{i}].issued_before"), s))
            .transpose()?;
        creds.revocations.users.insert(u.username, before);
    }
    let jobs = revocations.jobs;
    for (i, p) in jobs.projects.iter().enumerate() {
        if !is_repository_name(p) {
            return Err((
                format!("$.revocations.jobs.projects[{i}]"),
                format!("`{p}` is not a valid group or project path"),
            ));
        }
    }
    creds.revocations.job_ids = jobs.ids.into_iter().collect();
    creds.revocations.pipelines = jobs.pipelines.into_iter().collect();
    creds.revocations.job_projects = jobs.projects;
    Ok(creds)
}

/// The level a user's token must state on a dependency proxy group (reporter, as GitLab's dependency proxy requires).
pub const DEPENDENCY_PROXY_LEVEL: AccessLevel = AccessLevel::Reporter;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::scope::Scope;

    fn token(owner: Owner, scopes: &[DeployScope]) -> DeployToken {
        DeployToken {
            id: 1,
            username: "deploy-token-1".into(),
            name: None,
            owner,
            scopes: scopes.iter().copied().collect(),
            sha256: "0".repeat(64),
            expires_at: Some(1000),
            revoked: false,
        }
    }

    use DeployScope::*;

    #[test]
    fn subtrees_stop_at_component_boundaries() {
        assert!(in_subtree("acme", "acme/platform/api"));
        assert!(in_subtree("acme", "acme"));
        assert!(!in_subtree("acme", "acme-other/x"));
        assert!(!in_subtree("acme/web", "acme/webapp"));
        assert_eq!(dependency_proxy_group("acme/platform/dependency_proxy/containers/alpine"), Some("acme/platform"));
        assert_eq!(dependency_proxy_group("acme/dependency_proxy/containers/"), None);
        assert_eq!(dependency_proxy_group("acme/web/app"), None);
        assert_eq!(dependency_proxy_group("dependency_proxy/containers/alpine"), None);
        assert_eq!(dependency_proxy_group("/dependency_proxy/containers/alpine"), None);
        assert_eq!(
            dependency_proxy_group("a/dependency_proxy/containers/b/dependency_proxy/containers/c"),
            Some("a"),
            "the first marker, like split_once"
        );
        assert_eq!(dependency_proxy_group("a/dependency_proxy/containersx/b"), None);
    }

    #[test]
    fn table_of_deploy_token_decisions() {
        let pull = ActionSet::of(&[Action::Pull]);
        let pull_push = ActionSet::of(&[Action::Pull, Action::Push]);
        let delete = ActionSet::of(&[Action::Delete]);
        let group_rw = token(Owner::Group("acme".into()), &[ReadRegistry, WriteRegistry]);
        let group_w = token(Owner::Group("acme".into()), &[WriteRegistry]);
        let project_r = token(Owner::Project("acme/web".into()), &[ReadRegistry]);
        let cases: &[(&DeployToken, &str, ActionSet, &str)] = &[
            (&group_rw, "acme/platform/api", pull_push, "ok"),
            (&group_rw, "acme/platform/api", delete, "403"),
            (&group_rw, "other/tools", pull, "404"),
            (&group_rw, "acme-other/x", pull, "404"),
            (&group_rw, "acme/dependency_proxy/containers/alpine", pull, "ok"),
            (&group_rw, "acme/platform/dependency_proxy/containers/alpine", pull, "ok"),
            (&group_rw, "other/dependency_proxy/containers/alpine", pull, "404"),
            (&group_w, "acme/dependency_proxy/containers/alpine", pull, "403"),
            (&group_rw, "acme/dependency_proxy/containers/alpine", pull_push, "403"),
            (&project_r, "acme/dependency_proxy/containers/alpine", pull, "403"),
            (&project_r, "acme/web/app", pull, "ok"),
            (&project_r, "acme/web/app", pull_push, "403"),
            (&project_r, "acme/platform/api", pull, "404"),
        ];
        for (t, repo, actions, want) in cases {
            let got = match t.allows(repo, *actions) {
                Ok(()) => "ok",
                Err(DeployDenial::OutsideOwner(_)) => "404",
                Err(DeployDenial::Forbidden(_)) => "403",
                Err(DeployDenial::Unusable(_)) => "401",
            };
            assert_eq!(got, *want, "{:?} {repo} {actions}", t.owner);
        }
    }

    #[test]
    fn expiry_and_revocation_with_injected_time() {
        let mut t = token(Owner::Group("acme".into()), &[ReadRegistry]);
        assert!(t.usable(999).is_ok());
        assert!(matches!(t.usable(1000), Err(DeployDenial::Unusable(m)) if m.contains("expired")));
        t.revoked = true;
        assert!(matches!(t.usable(0), Err(DeployDenial::Unusable(m)) if m.contains("revoked")));
    }

    #[test]
    fn grants_are_requested_intersect_scopes_intersect_subtree() {
        let t = token(Owner::Group("acme".into()), &[ReadRegistry]);
        let req = Scope::parse_all(["repository:acme/web/app:pull,push repository:other/tools:pull"]).unwrap();
        let g = t.grant(&req);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].scope.to_string(), "repository:acme/web/app:pull");
    }

    #[test]
    fn revocations_by_jti_and_user() {
        let creds = compile(
            vec![],
            serde_json::from_value(serde_json::json!({
                "jti": ["abc"],
                "users": [{"username": "dev"}, {"username": "mia", "issued_before": "2027-01-15T08:00:01Z"}]
            }))
            .unwrap(),
        )
        .unwrap();
        let r = &creds.revocations;
        let before = 1_800_000_000; // 2027-01-15T08:00:00Z
        assert!(r.check("abc", "alice", Some(0), true).is_some());
        assert!(r.check("x", "dev", Some(0), true).is_some());
        assert!(r.check("x", "mia", Some(before), true).is_some());
        assert!(r.check("x", "mia", Some(1_900_000_000), true).is_none());
        assert!(r.check("x", "dev", Some(0), false).is_none(), "a deploy token named like a user is not the user");
        assert!(r.user_blocked("dev", 0) && r.user_blocked("mia", before) && !r.user_blocked("mia", 1_900_000_000));
    }
}
