//! Token scopes: `repository:<name>:<action>[,<action>]` and `registry:catalog:*`.

use std::fmt;

use crate::access::{Action, ActionSet};
use crate::name::is_repository_name;

/// The resource a scope or grant is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Repository(String),
    Catalog,
}

impl Resource {
    pub fn type_str(&self) -> &'static str {
        match self {
            Resource::Repository(_) => "repository",
            Resource::Catalog => "registry",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::Repository(name) => name,
            Resource::Catalog => "catalog",
        }
    }
}

/// A resource together with the actions asked for (a scope) or granted (a grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub resource: Resource,
    pub actions: ActionSet,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope `{0}` is not of the form `type:name:actions`")]
    Shape(String),
    #[error("scope `{0}` names an unknown resource type (expected `repository` or `registry`)")]
    ResourceType(String),
    #[error("scope `{0}` has an invalid repository name")]
    Name(String),
    #[error("scope `{scope}` has an unknown action `{action}`")]
    Action { scope: String, action: String },
}

impl Scope {
    pub fn repository(name: impl Into<String>, actions: ActionSet) -> Scope {
        Scope { resource: Resource::Repository(name.into()), actions }
    }

    pub fn catalog() -> Scope {
        Scope { resource: Resource::Catalog, actions: ActionSet::of(&[Action::All]) }
    }

    /// Parses one scope. The name may itself contain `:` only in the registry grammar's
    /// absence of it, so the type is before the first `:` and the actions after the last.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let (ty, rest) = s.split_once(':').ok_or_else(|| ScopeError::Shape(s.to_owned()))?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(|| ScopeError::Shape(s.to_owned()))?;
        let mut set = ActionSet::EMPTY;
        for a in actions.split(',').filter(|a| !a.is_empty()) {
            let action =
                Action::parse(a).ok_or_else(|| ScopeError::Action { scope: s.to_owned(), action: a.to_owned() })?;
            set = set.with(action);
        }
        let resource = match ty {
            "repository" => {
                if !is_repository_name(name) {
                    return Err(ScopeError::Name(s.to_owned()));
                }
                Resource::Repository(name.to_owned())
            }
            "registry" if name == "catalog" => Resource::Catalog,
            _ => return Err(ScopeError::ResourceType(s.to_owned())),
        };
        Ok(Scope { resource, actions: set })
    }

    /// Parses every scope of a list of `scope` parameters, each possibly space-separated
    /// (the OAuth2 form), merging actions asked for the same resource.
    pub fn parse_all<'a>(params: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>, ScopeError> {
        let mut out: Vec<Scope> = Vec::new();
        for param in params {
            for s in param.split(' ').filter(|s| !s.is_empty()) {
                let scope = Scope::parse(s)?;
                match out.iter_mut().find(|o| o.resource == scope.resource) {
                    Some(existing) => existing.actions = existing.actions.union(scope.actions),
                    None => out.push(scope),
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.resource.type_str(), self.resource.name(), self.actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let s = Scope::parse("repository:acme/web/app:push,pull").unwrap();
        assert_eq!(s.to_string(), "repository:acme/web/app:pull,push");
        assert_eq!(Scope::parse("registry:catalog:*").unwrap(), Scope::catalog());
        assert!(matches!(Scope::parse("repository:Acme:pull"), Err(ScopeError::Name(_))));
        assert!(matches!(Scope::parse("repository:acme:fly"), Err(ScopeError::Action { .. })));
        assert!(matches!(Scope::parse("nope"), Err(ScopeError::Shape(_))));
        assert!(matches!(Scope::parse("registry:other:*"), Err(ScopeError::ResourceType(_))));
    }

    #[test]
    fn parse_all_merges_and_splits() {
        let all = Scope::parse_all(["repository:a:pull repository:b:pull", "repository:a:push"]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].to_string(), "repository:a:pull,push");
    }
}
