//! The principals file: groups, projects, users, their memberships, and what each may do.
//!
//! Permissions follow GitLab: membership of a group applies to everything under it, the
//! highest applicable level wins; pull needs reporter (or a public/internal project), push
//! needs developer, delete needs maintainer; admins may do everything on existing projects
//! and alone may list the catalog.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;

use crate::request::access::{AccessLevel, Action, ActionSet};
use crate::request::name::is_repository_name;
use crate::request::scope::Resource;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    #[default]
    Private,
    /// Any authenticated user may pull.
    Internal,
    /// Anyone may pull; we still require a token, so this behaves like `internal`.
    Public,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    #[serde(default)]
    groups: Vec<RawGroup>,
    #[serde(default)]
    projects: Vec<RawProject>,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    path: String,
    /// Numeric id (`namespace_id` of CI job ID tokens); optional.
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    visibility: Visibility,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    path: String,
    /// Numeric id (`project_id` of CI job ID tokens); optional.
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    visibility: Option<Visibility>,
    /// Projects whose CI job tokens may pull from this one (GitLab's job token allowlist).
    #[serde(default)]
    job_token_allowlist: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    id: u64,
    username: String,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    password_hash: Option<String>,
    #[serde(default)]
    personal_access_tokens: Vec<RawPat>,
    #[serde(default)]
    memberships: Vec<RawMembership>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPat {
    name: String,
    sha256: String,
    #[serde(default)]
    expires_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMembership {
    path: String,
    access_level: AccessLevel,
}

/// A problem in the principals file, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct DirectoryError {
    pub path: String,
    pub reason: String,
}

fn error(path: impl Into<String>, reason: impl Into<String>) -> DirectoryError {
    DirectoryError { path: path.into(), reason: reason.into() }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonalAccessToken {
    pub name: String,
    /// Lowercase hex SHA-256 of the token secret; the secret itself is never stored.
    pub sha256: String,
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: u64,
    pub username: String,
    pub admin: bool,
    /// Argon2id PHC string.
    pub password_hash: Option<String>,
    pub personal_access_tokens: Vec<PersonalAccessToken>,
    /// Path (group or project) → level.
    pub memberships: BTreeMap<String, AccessLevel>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub path: String,
    pub id: Option<u64>,
    pub visibility: Visibility,
    /// Projects whose CI job tokens may pull from this one.
    pub job_token_allowlist: Vec<String>,
}

/// The validated principals file.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    groups: BTreeMap<String, Visibility>,
    group_ids: BTreeMap<String, u64>,
    projects: BTreeMap<String, Project>,
    users: Vec<User>,
    by_username: HashMap<String, usize>,
}

impl Directory {
    /// Parses and validates a principals document; errors name the JSON path and the reason.
    pub fn from_json(text: &str) -> Result<Directory, DirectoryError> {
        let raw: RawDirectory = crate::support::de::from_slice(text.as_bytes()).map_err(|e| error(e.path, e.reason))?;
        Directory::compile(raw)
    }

    fn compile(raw: RawDirectory) -> Result<Directory, DirectoryError> {
        let mut dir = Directory::default();
        for (i, g) in raw.groups.iter().enumerate() {
            let at = format!("$.groups[{i}].path");
            check_path(&at, &g.path)?;
            if dir.groups.insert(g.path.clone(), g.visibility).is_some() {
                return Err(error(at, format!("duplicate group `{}`", g.path)));
            }
            if let Some(id) = g.id {
                dir.group_ids.insert(g.path.clone(), id);
            }
        }
        for (i, g) in raw.groups.iter().enumerate() {
            if let Some((parent, _)) = g.path.rsplit_once('/') {
                if !dir.groups.contains_key(parent) {
                    return Err(error(
                        format!("$.groups[{i}].path"),
                        format!("parent group `{parent}` is not defined"),
                    ));
                }
            }
        }
        for (i, p) in raw.projects.iter().enumerate() {
            let at = format!("$.projects[{i}].path");
            check_path(&at, &p.path)?;
            let Some((parent, _)) = p.path.rsplit_once('/') else {
                return Err(error(at, format!("project `{}` must live in a group (`group/project`)", p.path)));
            };
            if !dir.groups.contains_key(parent) {
                return Err(error(at, format!("group `{parent}` is not defined")));
            }
            if dir.groups.contains_key(&p.path) {
                return Err(error(at, format!("`{}` is already a group", p.path)));
            }
            let visibility = p.visibility.unwrap_or_else(|| dir.inherited_visibility(parent));
            let project = Project {
                path: p.path.clone(),
                id: p.id,
                visibility,
                job_token_allowlist: p.job_token_allowlist.clone(),
            };
            if dir.projects.insert(p.path.clone(), project).is_some() {
                return Err(error(at, format!("duplicate project `{}`", p.path)));
            }
        }
        for (i, p) in raw.projects.iter().enumerate() {
            for (j, allowed) in p.job_token_allowlist.iter().enumerate() {
                if !dir.projects.contains_key(allowed) {
                    return Err(error(
                        format!("$.projects[{i}].job_token_allowlist[{j}]"),
                        format!("no project `{allowed}` (a job token allowlist names projects)"),
                    ));
                }
            }
        }
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, u) in raw.users.into_iter().enumerate() {
            let at = format!("$.users[{i}]");
            if u.username.is_empty() || !u.username.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return Err(error(format!("{at}.username"), format!("invalid username `{}`", u.username)));
            }
            if dir.by_username.contains_key(&u.username) {
                return Err(error(format!("{at}.username"), format!("duplicate user `{}`", u.username)));
            }
            if !ids.insert(u.id) {
                return Err(error(format!("{at}.id"), format!("duplicate user id {}", u.id)));
            }
            if let Some(h) = &u.password_hash {
                if !h.starts_with("$argon2id$") {
                    return Err(error(format!("{at}.password_hash"), "not an argon2id PHC string (`$argon2id$...`)"));
                }
            }
            let mut pats = Vec::new();
            for (j, p) in u.personal_access_tokens.into_iter().enumerate() {
                let pat_at = format!("{at}.personal_access_tokens[{j}].sha256");
                if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(error(pat_at, "must be 64 lowercase hex characters (SHA-256 of the token)"));
                }
                if !digests.insert(p.sha256.clone()) {
                    return Err(error(pat_at, "the same token digest appears twice"));
                }
                pats.push(PersonalAccessToken { name: p.name, sha256: p.sha256, expires_at: p.expires_at });
            }
            let mut memberships = BTreeMap::new();
            for (j, m) in u.memberships.iter().enumerate() {
                let m_at = format!("{at}.memberships[{j}]");
                if !dir.groups.contains_key(&m.path) && !dir.projects.contains_key(&m.path) {
                    return Err(error(format!("{m_at}.path"), format!("no group or project `{}`", m.path)));
                }
                if m.access_level == AccessLevel::Admin || m.access_level == AccessLevel::NoAccess {
                    return Err(error(
                        format!("{m_at}.access_level"),
                        "membership level must be between minimal_access and owner (admin is the user's `admin` flag)",
                    ));
                }
                if memberships.insert(m.path.clone(), m.access_level).is_some() {
                    return Err(error(format!("{m_at}.path"), format!("duplicate membership of `{}`", m.path)));
                }
            }
            dir.by_username.insert(u.username.clone(), dir.users.len());
            dir.users.push(User {
                id: u.id,
                username: u.username,
                admin: u.admin,
                password_hash: u.password_hash,
                personal_access_tokens: pats,
                memberships,
            });
        }
        Ok(dir)
    }

    fn inherited_visibility(&self, group: &str) -> Visibility {
        self.groups.get(group).copied().unwrap_or_default()
    }

    pub fn user(&self, username: &str) -> Option<&User> {
        self.by_username.get(username).and_then(|i| self.users.get(*i))
    }

    pub fn users(&self) -> &[User] {
        &self.users
    }

    /// Every project, in path order.
    pub fn projects(&self) -> impl Iterator<Item = &Project> {
        self.projects.values()
    }

    /// The user owning the personal access token with this SHA-256 digest.
    pub fn user_by_pat_digest(&self, sha256_hex: &str) -> Option<(&User, &PersonalAccessToken)> {
        self.users.iter().find_map(|u| u.personal_access_tokens.iter().find(|p| p.sha256 == sha256_hex).map(|p| (u, p)))
    }

    /// The project a repository belongs to: the project whose path is the repository name
    /// or its longest prefix ending at a `/`.
    pub fn project_of(&self, repository: &str) -> Option<&Project> {
        let mut candidate = repository;
        loop {
            if let Some(p) = self.projects.get(candidate) {
                return Some(p);
            }
            candidate = candidate.rsplit_once('/')?.0;
        }
    }

    /// The user's effective level on `path`: the highest membership on it or an ancestor.
    pub fn access_level(&self, user: &User, path: &str) -> AccessLevel {
        let mut best = AccessLevel::NoAccess;
        let mut candidate = path;
        loop {
            if let Some(l) = user.memberships.get(candidate) {
                best = best.max(*l);
            }
            match candidate.rsplit_once('/') {
                Some((parent, _)) => candidate = parent,
                None => return best,
            }
        }
    }

    /// Actions `user` may perform on `resource`, with the project it belongs to.
    pub fn permitted(&self, user: &User, resource: &Resource) -> (ActionSet, Option<&Project>) {
        let name = match resource {
            Resource::Catalog => {
                let all = if user.admin { ActionSet::of(&[Action::All]) } else { ActionSet::EMPTY };
                return (all, None);
            }
            Resource::Repository(name) => name,
        };
        let Some(project) = self.project_of(name) else {
            return (ActionSet::EMPTY, None);
        };
        if user.admin {
            return (ActionSet::of(&[Action::Pull, Action::Push, Action::Delete]), Some(project));
        }
        let level = self.access_level(user, &project.path);
        (level.registry_actions(project.visibility != Visibility::Private), Some(project))
    }

    /// The level stated in tokens: `admin` for admins, else the membership level.
    pub fn effective_level(&self, user: &User, path: &str) -> AccessLevel {
        if user.admin {
            AccessLevel::Admin
        } else {
            self.access_level(user, path)
        }
    }

    /// The numeric id of group `path`, when the principals file gives one.
    pub fn group_id(&self, path: &str) -> Option<u64> {
        self.group_ids.get(path).copied()
    }

    /// The project at exactly `path`.
    pub fn project(&self, path: &str) -> Option<&Project> {
        self.projects.get(path)
    }

    /// Whether `path` is a group of the directory.
    pub fn has_group(&self, path: &str) -> bool {
        self.groups.contains_key(path)
    }
}

fn check_path(at: &str, path: &str) -> Result<(), DirectoryError> {
    if is_repository_name(path) {
        Ok(())
    } else {
        Err(error(at, format!("`{path}` is not a valid path (lowercase OCI name components separated by `/`)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::bundle::Policy;
    use crate::request::scope::Scope;

    const EXAMPLE: &str = include_str!("../../../../policies/example/principals.json");

    fn can(dir: &Directory, user: &str, repo: &str) -> String {
        let u = dir.user(user).unwrap();
        dir.permitted(u, &Resource::Repository(repo.into())).0.to_string()
    }

    /// The README's table of example principals, checked against the example file.
    #[test]
    fn example_world_permissions() {
        let dir = Directory::from_json(EXAMPLE).unwrap();
        let table = [
            ("root", "acme/web/app", "pull,push,delete"),
            ("alice", "acme/platform/api", "pull,push,delete"),
            ("alice", "acme/web", "pull,push,delete"),
            ("mia", "acme/web/app", "pull,push,delete"),
            ("mia", "acme/platform/api", ""),
            ("dev", "acme/web/app", "pull,push"),
            ("dev", "acme/platform/api", ""),
            ("rita", "acme/web/app", "pull"),
            ("rita", "acme/platform/api/x", "pull"),
            ("gus", "acme/web/app", ""),
            ("olga", "acme/web/app", ""),
            ("olga", "other/tools/x", "pull,push"),
            ("dev", "other/tools", "pull"),
            ("root", "nowhere/at/all", ""),
        ];
        for (user, repo, want) in table {
            assert_eq!(can(&dir, user, repo), want, "{user} on {repo}");
        }
        let root = dir.user("root").unwrap();
        assert_eq!(dir.permitted(root, &Resource::Catalog).0.to_string(), "*");
        let alice = dir.user("alice").unwrap();
        assert!(dir.permitted(alice, &Resource::Catalog).0.is_empty());
    }

    #[test]
    fn grants_are_requested_intersect_permitted() {
        let dir = Directory::from_json(EXAMPLE).unwrap();
        let rita = dir.user("rita").unwrap();
        let req = Scope::parse_all(["repository:acme/web/app:pull,push repository:other/tools:push"]).unwrap();
        let g = dir.grant(rita, &req);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].scope.to_string(), "repository:acme/web/app:pull");
        assert_eq!(g[0].project_path.as_deref(), Some("acme/web"));
        let root = dir.user("root").unwrap();
        let g = dir.grant(root, &[Scope::catalog()]);
        assert_eq!(g[0].scope.to_string(), "registry:catalog:*");
        // `*` on a repository is expanded to the permitted actions.
        let mia = dir.user("mia").unwrap();
        let g = dir.grant(mia, &Scope::parse_all(["repository:acme/web/app:*"]).unwrap());
        assert_eq!(g[0].scope.to_string(), "repository:acme/web/app:pull,push,delete");
        let g = dir.grant(rita, &Scope::parse_all(["repository:acme/web/app:*"]).unwrap());
        assert_eq!(g[0].scope.to_string(), "repository:acme/web/app:pull");
        // The dependency proxy: pull for anyone on an existing group, with the group level.
        let olga = dir.user("olga").unwrap();
        let req = Scope::parse_all(["repository:acme/dependency_proxy/containers/alpine:pull,push"]).unwrap();
        let g = dir.grant(olga, &req);
        assert_eq!(g[0].scope.to_string(), "repository:acme/dependency_proxy/containers/alpine:pull");
        assert_eq!(g[0].access_level, Some(AccessLevel::NoAccess));
        assert_eq!(dir.grant(rita, &req)[0].access_level, Some(AccessLevel::Reporter));
        let nowhere = Scope::parse_all(["repository:nogroup/dependency_proxy/containers/alpine:pull"]).unwrap();
        assert!(dir.grant(rita, &nowhere).is_empty());
    }

    #[test]
    fn deploy_tokens_are_granted_only_inside_projects() {
        let dir = Directory::from_json(EXAMPLE).unwrap();
        let policy = Policy::from_json(include_str!("../../../../policies/example/bundle.json")).unwrap();
        let acme_ci = policy.credentials.by_username("acme-ci").unwrap();
        let req = Scope::parse_all([
            "repository:acme/web/app:pull,push repository:acme/rogue:pull,push repository:acme:pull \
             repository:acme/dependency_proxy/containers/alpine:pull repository:nogroup/dependency_proxy/containers/x:pull",
        ])
        .unwrap();
        let g = dir.deploy_grant(acme_ci, &req);
        let granted: Vec<String> = g.iter().map(|g| g.scope.to_string()).collect();
        assert_eq!(
            granted,
            ["repository:acme/web/app:pull,push", "repository:acme/dependency_proxy/containers/alpine:pull"]
        );
        assert_eq!(g[0].project_path.as_deref(), Some("acme/web"));
        assert_eq!(g[1].project_path, None);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"groups": [{"path": "a", "visibilty": "public"}]}"#, "$.groups[0]"),
            (r#"{"groups": [{"path": "A"}]}"#, "$.groups[0].path"),
            (r#"{"groups": [{"path": "a"}, {"path": "a"}]}"#, "$.groups[1].path"),
            (r#"{"groups": [{"path": "a/b"}]}"#, "$.groups[0].path"),
            (r#"{"groups": [{"path": "a"}], "projects": [{"path": "b/c"}]}"#, "$.projects[0].path"),
            (r#"{"users": [{"id": 1, "username": "x"}, {"id": 1, "username": "y"}]}"#, "$.users[1].id"),
            (r#"{"users": [{"id": 1, "username": "x"}, {"id": 2, "username": "x"}]}"#, "$.users[1].username"),
            (r#"{"users": [{"id": 1, "username": "x", "password_hash": "md5"}]}"#, "$.users[0].password_hash"),
            (
                r#"{"users": [{"id": 1, "username": "x", "memberships": [{"path": "nope", "access_level": "guest"}]}]}"#,
                "$.users[0].memberships[0].path",
            ),
            (
                r#"{"groups": [{"path": "a"}], "users": [{"id": 1, "username": "x", "memberships": [{"path": "a", "access_level": "boss"}]}]}"#,
                "$.users[0].memberships[0].access_level",
            ),
            (
                r#"{"users": [{"id": 1, "username": "x", "personal_access_tokens": [{"name": "t", "sha256": "abc"}]}]}"#,
                "$.users[0].personal_access_tokens[0].sha256",
            ),
        ];
        for (text, path) in cases {
            let e = Directory::from_json(text).unwrap_err();
            assert!(e.path.starts_with(path), "{text}: got {e}");
        }
    }
}
