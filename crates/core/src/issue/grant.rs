//! What the token service grants: a token request's scopes ∩ what the principal may do —
//! the directory's permissions for a user (minus actions a protection rule of the bundle
//! denies whatever the tag), the token's scopes and owner subtree for a deploy token.
//!
//! These are methods of [`Directory`] and [`DeployToken`] (layer `policy`), defined here
//! because granting is this layer's job: the policy layer describes principals and rules,
//! this one turns them into the scopes of an issued token.

use crate::policy::bundle::Policy;
use crate::policy::deploy::{dependency_proxy_group, DeployToken};
use crate::policy::directory::{Directory, User};
use crate::policy::protection::Actor;
use crate::request::access::{AccessLevel, Action, ActionSet};
use crate::request::scope::{Resource, Scope};

/// One granted scope with the project it belongs to (for `meta.project_path`) and the
/// principal's level on it (for `meta.access_level`; admins get `admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    pub project_path: Option<String>,
    pub access_level: Option<AccessLevel>,
}

impl DeployToken {
    /// Grants for a token request: requested ∩ scopes ∩ owner subtree.
    pub fn grant(&self, requested: &[Scope]) -> Vec<Grant> {
        requested
            .iter()
            .filter_map(|s| {
                let Resource::Repository(repo) = &s.resource else { return None };
                let wanted = if s.actions.contains(Action::All) {
                    ActionSet::of(&[Action::Pull, Action::Push, Action::Delete])
                } else {
                    s.actions
                };
                let mut actions = wanted.intersect(self.actions());
                if dependency_proxy_group(repo).is_some() {
                    actions = actions.intersect(ActionSet::of(&[Action::Pull]));
                }
                let covered = self.allows(repo, ActionSet::EMPTY).is_ok();
                (covered && !actions.is_empty()).then(|| Grant {
                    scope: Scope { resource: s.resource.clone(), actions },
                    project_path: None,
                    access_level: None,
                })
            })
            .collect()
    }
}

impl Directory {
    /// Grants for a token request: requested ∩ permitted, per scope, dropping empty ones.
    pub fn grant(&self, user: &User, requested: &[Scope]) -> Vec<Grant> {
        requested
            .iter()
            .filter_map(|s| {
                if let Some(grant) = self.dependency_proxy_grant(user, s) {
                    return grant;
                }
                let (permitted, project) = self.permitted(user, &s.resource);
                // `*` on a repository (skopeo asks it for deletes) means every action: grant
                // the permitted ones explicitly, never a literal `*`.
                let requested = match s.resource {
                    Resource::Repository(_) if s.actions.contains(Action::All) => {
                        ActionSet::of(&[Action::Pull, Action::Push, Action::Delete])
                    }
                    _ => s.actions,
                };
                let actions = requested.intersect(permitted);
                let actions =
                    if permitted.contains(Action::All) && !s.actions.is_empty() { s.actions } else { actions };
                let access_level = project.map(|p| self.effective_level(user, &p.path));
                (!actions.is_empty()).then(|| Grant {
                    scope: Scope { resource: s.resource.clone(), actions },
                    project_path: project.map(|p| p.path.clone()),
                    access_level,
                })
            })
            .collect()
    }

    /// The group dependency proxy (`<group>/dependency_proxy/containers/<image>`): any
    /// authenticated user gets `pull` on an existing group's proxy, with their level on the
    /// group in `meta.access_level`; the filter decides (reporter or above, else 404, as
    /// GitLab's deploy tokens show). `None` when `s` is not a dependency proxy scope.
    fn dependency_proxy_grant(&self, user: &User, s: &Scope) -> Option<Option<Grant>> {
        let Resource::Repository(repo) = &s.resource else { return None };
        let group = dependency_proxy_group(repo)?;
        if !self.has_group(group) {
            return Some(None);
        }
        let wanted = if s.actions.contains(Action::All) { ActionSet::of(&[Action::Pull]) } else { s.actions };
        let actions = wanted.intersect(ActionSet::of(&[Action::Pull]));
        Some((!actions.is_empty()).then(|| Grant {
            scope: Scope { resource: s.resource.clone(), actions },
            project_path: None,
            access_level: Some(self.effective_level(user, group)),
        }))
    }

    /// Grants for a deploy token: [`DeployToken::grant`] (requested ∩ scopes
    /// ∩ owner subtree), kept only on repositories inside a project — each named with its
    /// project in `meta.project_path`, which the filter requires — or on the dependency proxy
    /// of an existing group. A repository under no project (`acme/rogue` where `acme` is a
    /// group and no project contains it) is granted nothing, as for users.
    pub fn deploy_grant(&self, token: &DeployToken, requested: &[Scope]) -> Vec<Grant> {
        token
            .grant(requested)
            .into_iter()
            .filter_map(|mut g| {
                let Resource::Repository(repo) = &g.scope.resource else { return None };
                if let Some(group) = dependency_proxy_group(repo) {
                    return self.has_group(group).then_some(g);
                }
                let project = self.project_of(repo)?;
                g.project_path = Some(project.path.clone());
                Some(g)
            })
            .collect()
    }

    /// Grants under a policy: like [`Directory::grant`], minus `push`/`delete` on repositories
    /// where a protection rule denies this user whatever the tag, since the filter would
    /// refuse every such request anyway. Tag rules leave the action granted: other tags may
    /// still be pushed. Returns the grants and, per dropped action, the rule that caused it.
    pub fn grant_under(&self, policy: &Policy, user: &User, requested: &[Scope]) -> (Vec<Grant>, Vec<String>) {
        let mut notes = Vec::new();
        let mut grants = self.grant(user, requested);
        for g in &mut grants {
            let Resource::Repository(repo) = &g.scope.resource else { continue };
            let actor =
                Actor { name: &user.username, level: g.access_level.map(AccessLevel::number), admin: user.admin };
            for action in [Action::Push, Action::Delete] {
                if !g.scope.actions.contains(action) {
                    continue;
                }
                if let Some(rule) = policy.rules.denies_untagged(repo, action == Action::Push, actor) {
                    g.scope.actions = g.scope.actions.without(action);
                    notes.push(format!(
                        "{action} on `{repo}` withheld: rule `{rule}` (bundle revision {})",
                        policy.revision
                    ));
                }
            }
        }
        grants.retain(|g| !g.scope.actions.is_empty());
        (grants, notes)
    }
}
