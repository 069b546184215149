//! Token scopes: `repository:<name>:<action>[,<action>]` and `registry:catalog:*`.

use std::fmt;

use crate::request::access::{Action, ActionSet};
use crate::request::name::is_repository_name;
use crate::support::text::quote;

/// Most scopes one token request may name (after splitting space-separated lists; ignored
/// scopes of unknown resource types count too). A registry client asks for one to three.
pub const MAX_SCOPES_PER_REQUEST: usize = 64;

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
    #[error("{0} scopes requested; at most {MAX_SCOPES_PER_REQUEST} are accepted in one token request")]
    TooMany(usize),
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
    /// Scope text in an error is quoted (bounded, escaped): see `crate::support::text`.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let shown = || quote(s).into_owned();
        let (ty, rest) = s.split_once(':').ok_or_else(|| ScopeError::Shape(shown()))?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(|| ScopeError::Shape(shown()))?;
        let resource = match ty {
            "repository" => {
                if !is_repository_name(name) {
                    return Err(ScopeError::Name(shown()));
                }
                Resource::Repository(name.to_owned())
            }
            "registry" if name == "catalog" => Resource::Catalog,
            _ => return Err(ScopeError::ResourceType(shown())),
        };
        let mut set = ActionSet::EMPTY;
        for a in actions.split(',').filter(|a| !a.is_empty()) {
            let action =
                Action::parse(a).ok_or_else(|| ScopeError::Action { scope: shown(), action: quote(a).into_owned() })?;
            set = set.with(action);
        }
        Ok(Scope { resource, actions: set })
    }

    /// Parses every scope of a list of `scope` parameters, each possibly space-separated
    /// (the OAuth2 form), merging actions asked for the same resource. A scope of an unknown
    /// resource type (`repository(plugin):x:pull`, `foo:bar:pull`, `registry:other:*`) is
    /// ignored — it is granted nothing, as the Docker token spec implies — rather than
    /// failing the whole request. More than [`MAX_SCOPES_PER_REQUEST`] scopes is an error.
    pub fn parse_all<'a>(params: impl IntoIterator<Item = &'a str>) -> Result<Vec<Scope>, ScopeError> {
        let mut out: Vec<Scope> = Vec::new();
        let mut seen = 0usize;
        for param in params {
            for s in param.split(' ').filter(|s| !s.is_empty()) {
                seen += 1;
                if seen > MAX_SCOPES_PER_REQUEST {
                    return Err(ScopeError::TooMany(seen));
                }
                let scope = match Scope::parse(s) {
                    Ok(scope) => scope,
                    Err(ScopeError::ResourceType(_)) => continue,
                    Err(e) => return Err(e),
                };
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
    fn unknown_resource_types_are_ignored_not_fatal() {
        let all =
            Scope::parse_all(["repository(plugin):x:pull", "foo:bar:pull registry:other:* repository:a:pull"]).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].to_string(), "repository:a:pull");
        assert!(Scope::parse_all(["foo:bar:fly"]).unwrap().is_empty());
        // Malformed scopes and invalid names are still errors.
        assert!(matches!(Scope::parse_all(["nope"]), Err(ScopeError::Shape(_))));
        assert!(matches!(Scope::parse_all(["repository:A:pull"]), Err(ScopeError::Name(_))));
    }

    #[test]
    fn scopes_per_request_are_capped() {
        let many: Vec<String> = (0..MAX_SCOPES_PER_REQUEST).map(|i| format!("repository:a/p{i}:pull")).collect();
        assert_eq!(Scope::parse_all(many.iter().map(String::as_str)).unwrap().len(), MAX_SCOPES_PER_REQUEST);
        let one_more = format!("{} foo:bar:pull", many.join(" "));
        assert!(matches!(Scope::parse_all([one_more.as_str()]), Err(ScopeError::TooMany(_))));
        // Error text quotes client input, bounded.
        let e = Scope::parse(&format!("{}:x", "a".repeat(10_000))).unwrap_err().to_string();
        assert!(e.len() < 400, "{}", e.len());
    }

    #[test]
    fn parse_all_merges_and_splits() {
        let all = Scope::parse_all(["repository:a:pull repository:b:pull", "repository:a:push"]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].to_string(), "repository:a:pull,push");
    }
}
