//! Operator-defined additional token claims (GitLab's additional CI/CD job JWT claims), set in the policy bundle at group,
//! subgroup and project level.
//!
//! Rules, checked when a bundle is validated (a violating bundle is refused, naming the level,
//! the claim and the rule):
//!
//! - every claim is `mutable: false` unless it says `mutable: true`;
//! - claims are inherited down the hierarchy: a repository gets the merged claims of every
//!   level whose path is its name or a component-wise prefix of it (`acme/web/app` ←
//!   `acme`, `acme/web`);
//! - a lower level may add claims, and may redefine a claim set above it only if the nearest
//!   level above that sets it marked it `mutable: true` (the redefinition's own `mutable`
//!   then applies below it); redefining an immutable claim is refused even with the same
//!   value, so what an operator locked stays exactly as locked;
//! - built-in claims ([`BUILT_IN_CLAIMS`]) can never be set at any level;
//! - a project is a leaf: no level may lie below a project level.
//!
//! A token carrying scopes for several repositories gets a claim only when every repository
//! in it has that claim with the same value ([`Claims::for_repositories`]); a claim that is
//! missing on one repository or differs between two is left out. An external service that
//! relies on a claim thus never sees a value that belongs to only some of the repositories.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::policy::deploy::in_subtree;
use crate::request::name::is_repository_name;

/// Claims the token service always sets itself; no level may set any of them.
pub const BUILT_IN_CLAIMS: [&str; 10] =
    ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "access", "auth_type", "user"];

/// Longest claim name accepted.
pub const MAX_CLAIM_NAME_LEN: usize = 256;
/// Upper bound on levels and on claims per level, so a bundle cannot blow up tokens.
pub const MAX_LEVELS: usize = 10_000;
pub const MAX_CLAIMS_PER_LEVEL: usize = 64;
/// Largest serialized value of one claim.
pub const MAX_CLAIM_VALUE_BYTES: usize = 2048;

/// Whether `name` is one of the [`BUILT_IN_CLAIMS`].
pub fn is_built_in(name: &str) -> bool {
    BUILT_IN_CLAIMS.contains(&name)
}

/// One entry of the bundle's `additional_claims`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLevel {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    project: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    claims: BTreeMap<String, RawClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClaim {
    value: serde_json::Value,
    #[serde(default)]
    mutable: bool,
}

/// Whether a level is a group (top-level or subgroup) or a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelKind {
    Group,
    Project,
}

/// A level of the hierarchy that sets claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub kind: LevelKind,
    pub path: String,
    /// Claim name → (value, mutable).
    pub claims: BTreeMap<String, ClaimValue>,
}

impl Level {
    /// `group \`acme\``, `subgroup \`acme/platform\``, `project \`acme/web\``.
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            LevelKind::Project => "project",
            LevelKind::Group if self.path.contains('/') => "subgroup",
            LevelKind::Group => "group",
        };
        format!("{kind} `{}`", self.path)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimValue {
    pub value: serde_json::Value,
    pub mutable: bool,
}

/// The validated `additional_claims` of a bundle.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    /// Sorted by path, so ancestors come before descendants.
    levels: Vec<Level>,
}

/// A claim as a repository inherits it: its value, its mutability and the level (described,
/// e.g. ``group `acme` ``) that set it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedClaim {
    pub value: serde_json::Value,
    pub mutable: bool,
    pub level: String,
}

/// A claim set for one token: name → value.
pub type ClaimMap = BTreeMap<String, serde_json::Value>;

impl Claims {
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// The merged claims of `repository`'s hierarchy (every level whose path is the
    /// repository name or a prefix of it, outermost first, inner levels overriding).
    pub fn for_repository(&self, repository: &str) -> ClaimMap {
        let mut merged = ClaimMap::new();
        for level in self.levels.iter().filter(|l| in_subtree(&l.path, repository)) {
            for (name, claim) in &level.claims {
                merged.insert(name.clone(), claim.value.clone());
            }
        }
        merged
    }

    /// The merged claims of `repository`'s hierarchy with, per claim, whether it may still be
    /// changed below and the level that set it last (the nearest one): what a CI job of a
    /// project in this hierarchy may and may not override ([`crate::policy::claims`] rules).
    pub fn resolved(&self, repository: &str) -> BTreeMap<String, ResolvedClaim> {
        let mut merged = BTreeMap::new();
        for level in self.levels.iter().filter(|l| in_subtree(&l.path, repository)) {
            for (name, claim) in &level.claims {
                merged.insert(
                    name.clone(),
                    ResolvedClaim { value: claim.value.clone(), mutable: claim.mutable, level: level.describe() },
                );
            }
        }
        merged
    }

    /// The claims of a token for these repositories: those every repository has with the
    /// same value. No repository → no claims.
    pub fn for_repositories<'a>(&self, repositories: impl IntoIterator<Item = &'a str>) -> ClaimMap {
        let mut repositories = repositories.into_iter();
        let Some(first) = repositories.next() else { return ClaimMap::new() };
        let mut common = self.for_repository(first);
        for repository in repositories {
            if common.is_empty() {
                break;
            }
            let other = self.for_repository(repository);
            common.retain(|name, value| other.get(name) == Some(value));
        }
        common
    }
}

fn level_error(at: &str, level: &str, reason: impl std::fmt::Display) -> (String, String) {
    (at.to_owned(), format!("{level}: {reason}"))
}

/// Validates the raw section; errors are (JSON path, reason), the reason naming the level,
/// the claim and the rule.
pub(crate) fn compile(raw: Vec<RawLevel>) -> Result<Claims, (String, String)> {
    if raw.len() > MAX_LEVELS {
        return Err(("$.additional_claims".into(), format!("more than {MAX_LEVELS} levels")));
    }
    let mut levels: Vec<(usize, Level)> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("$.additional_claims[{i}]");
        let (kind, path) = match (r.group, r.project) {
            (Some(g), None) => (LevelKind::Group, g),
            (None, Some(p)) => (LevelKind::Project, p),
            _ => return Err((at, "set exactly one of `group` or `project`".into())),
        };
        let field = if kind == LevelKind::Group { "group" } else { "project" };
        if !is_repository_name(&path) {
            return Err((
                format!("{at}.{field}"),
                format!("`{path}` is not a valid path (lowercase OCI name components separated by `/`)"),
            ));
        }
        let mut level = Level { kind, path, claims: BTreeMap::new() };
        let described = level.describe();
        if let Some((j, other)) = levels.iter().find(|(_, l)| l.path == level.path) {
            return Err(level_error(
                &format!("{at}.{field}"),
                &described,
                format!("defined twice (also `$.additional_claims[{j}]`, {})", other.describe()),
            ));
        }
        if r.claims.len() > MAX_CLAIMS_PER_LEVEL {
            return Err(level_error(
                &format!("{at}.claims"),
                &described,
                format!("more than {MAX_CLAIMS_PER_LEVEL} claims"),
            ));
        }
        for (name, claim) in r.claims {
            let cat = format!("{at}.claims.{name}");
            if is_built_in(&name) {
                return Err(level_error(
                    &cat,
                    &described,
                    format!(
                        "claim `{name}` is a built-in claim and can never be set at any level (built-in: {})",
                        BUILT_IN_CLAIMS.join(", ")
                    ),
                ));
            }
            if name.is_empty()
                || name.len() > MAX_CLAIM_NAME_LEN
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                return Err(level_error(
                    &cat,
                    &described,
                    format!("claim name `{name}` must be 1-{MAX_CLAIM_NAME_LEN} printable ASCII characters without quotes or backslashes"),
                ));
            }
            if claim.value.is_null() {
                return Err(level_error(
                    &format!("{cat}.value"),
                    &described,
                    format!("claim `{name}` has no value (`null` is not a claim value)"),
                ));
            }
            let size = serde_json::to_string(&claim.value).map_or(usize::MAX, |s| s.len());
            if size > MAX_CLAIM_VALUE_BYTES {
                return Err(level_error(
                    &format!("{cat}.value"),
                    &described,
                    format!("claim `{name}` value is {size} bytes of JSON, more than {MAX_CLAIM_VALUE_BYTES}"),
                ));
            }
            level.claims.insert(name, ClaimValue { value: claim.value, mutable: claim.mutable });
        }
        levels.push((i, level));
    }
    // Ancestors before descendants: a path sorts before every path under it.
    levels.sort_by(|(_, a), (_, b)| a.path.cmp(&b.path));
    for (n, (i, level)) in levels.iter().enumerate() {
        let at = format!("$.additional_claims[{i}]");
        let ancestors: Vec<&(usize, Level)> =
            levels.iter().take(n).filter(|(_, a)| a.path != level.path && in_subtree(&a.path, &level.path)).collect();
        if let Some((j, project)) = ancestors.iter().find(|(_, a)| a.kind == LevelKind::Project) {
            return Err(level_error(
                &at,
                &level.describe(),
                format!(
                    "lies below {} (`$.additional_claims[{j}]`), and a project is the lowest level: nothing can be defined below it",
                    project.describe()
                ),
            ));
        }
        for (name, claim) in &level.claims {
            // The nearest ancestor that sets this claim decides whether it may change.
            let nearest = ancestors.iter().rev().find_map(|(j, a)| a.claims.get(name).map(|c| (j, a, c)));
            if let Some((j, above, inherited)) = nearest {
                if !inherited.mutable {
                    return Err(level_error(
                        &format!("{at}.claims.{name}"),
                        &level.describe(),
                        format!(
                            "claim `{name}` is immutable: {} (`$.additional_claims[{j}]`) sets it with `mutable: false` \
                             (the default), so no lower level may change or redefine it{}",
                            above.describe(),
                            if inherited.value == claim.value { " (even to the same value)" } else { "" }
                        ),
                    ));
                }
            }
        }
    }
    Ok(Claims { levels: levels.into_iter().map(|(_, l)| l).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::bundle::Policy;
    use serde_json::json;

    fn bundle(levels: serde_json::Value) -> String {
        json!({"revision": 1, "additional_claims": levels}).to_string()
    }

    fn policy(levels: serde_json::Value) -> Policy {
        Policy::from_json(&bundle(levels)).unwrap()
    }

    fn refused(levels: serde_json::Value) -> crate::policy::bundle::BundleError {
        Policy::from_json(&bundle(levels)).unwrap_err()
    }

    /// Seed 004 "success" 1: no additional claims → nothing but built-in claims.
    #[test]
    fn no_additional_claims_means_no_extra_claims() {
        let p = Policy::from_json(r#"{"revision": 1}"#).unwrap();
        assert!(p.claims.is_empty());
        assert!(p.claims.for_repository("acme/web/app").is_empty());
        assert!(p.claims.for_repositories(["acme/web/app", "other/x"]).is_empty());
        // Levels elsewhere add nothing to unrelated repositories.
        let p = policy(json!([{"group": "acme", "claims": {"tenant": {"value": "acme"}}}]));
        assert!(p.claims.for_repository("other/tools").is_empty());
        assert!(p.claims.for_repository("acme-other/x").is_empty(), "component boundary");
    }

    /// Seed 004 "success" 2: modifying a `mutable: false` claim fails the whole bundle, at
    /// every pair of levels (group → subgroup, group → project, subgroup → project).
    #[test]
    fn immutable_claims_cannot_be_changed_below() {
        let cases = [
            (json!({"group": "acme"}), json!({"group": "acme/platform"}), "subgroup `acme/platform`", "group `acme`"),
            (json!({"group": "acme"}), json!({"project": "acme/web"}), "project `acme/web`", "group `acme`"),
            (
                json!({"group": "acme/platform"}),
                json!({"project": "acme/platform/api"}),
                "project `acme/platform/api`",
                "subgroup `acme/platform`",
            ),
        ];
        for (upper, lower, lower_name, upper_name) in cases {
            for (upper_claim, lower_claim) in [
                (json!({"value": "a"}), json!({"value": "b"})), // default mutable: false
                (json!({"value": "a", "mutable": false}), json!({"value": "b"})), // explicit
                (json!({"value": "a"}), json!({"value": "a"})), // same value: still refused
                (json!({"value": "a"}), json!({"value": "b", "mutable": true})), // cannot unlock it
            ] {
                let mut up = upper.clone();
                up["claims"] = json!({"tenant": upper_claim});
                let mut low = lower.clone();
                low["claims"] = json!({"tenant": lower_claim});
                // Order in the bundle does not matter.
                for levels in [json!([up.clone(), low.clone()]), json!([low.clone(), up.clone()])] {
                    let e = Policy::from_json(&bundle(levels.clone())).unwrap_err();
                    assert!(e.path.starts_with("$.additional_claims["), "{e}");
                    assert!(e.path.ends_with("].claims.tenant"), "{e}");
                    assert!(e.reason.starts_with(lower_name), "{e}");
                    assert!(e.reason.contains("claim `tenant` is immutable"), "{e}");
                    assert!(e.reason.contains(upper_name), "{e}");
                    assert!(e.reason.contains("mutable: false"), "{e}");
                }
            }
        }
        // Through an intermediate level that does not mention the claim.
        let e = refused(json!([
            {"group": "acme", "claims": {"tenant": {"value": "a"}}},
            {"group": "acme/platform", "claims": {"team": {"value": "p"}}},
            {"project": "acme/platform/api", "claims": {"tenant": {"value": "b"}}}
        ]));
        assert_eq!(e.path, "$.additional_claims[2].claims.tenant");
        assert!(e.reason.contains("group `acme`"), "{e}");
    }

    /// Seed 004 "success" 2, built-in part: every built-in claim is refused at every level.
    #[test]
    fn built_in_claims_can_never_be_set() {
        for name in BUILT_IN_CLAIMS {
            for (level, described) in [
                (json!({"group": "acme"}), "group `acme`"),
                (json!({"group": "acme/platform"}), "subgroup `acme/platform`"),
                (json!({"project": "acme/web"}), "project `acme/web`"),
            ] {
                for mutable in [false, true] {
                    let mut l = level.clone();
                    l["claims"] = json!({ name: {"value": "x", "mutable": mutable} });
                    let e = refused(json!([l]));
                    assert_eq!(e.path, format!("$.additional_claims[0].claims.{name}"));
                    assert!(e.reason.starts_with(described), "{e}");
                    assert!(e.reason.contains(&format!("claim `{name}` is a built-in claim")), "{e}");
                    assert!(e.reason.contains("can never be set"), "{e}");
                }
            }
        }
    }

    /// Seed 004 "success" 3: the token's claims are those inherited from the hierarchy plus
    /// those each level adds; mutable claims may be changed below, and lock again there.
    #[test]
    fn claims_are_inherited_added_and_overridden_when_mutable() {
        let p = policy(json!([
            {"project": "acme/platform/api", "claims": {
                "cost_center": {"value": "cc-api"},
                "deploy_env": {"value": ["prod", "staging"]}
            }},
            {"group": "acme", "claims": {
                "tenant": {"value": "acme"},
                "cost_center": {"value": "cc-100", "mutable": true},
                "tier": {"value": 1, "mutable": true}
            }},
            {"group": "acme/platform", "claims": {
                "team": {"value": "platform"},
                "tier": {"value": 2, "mutable": true}
            }}
        ]));
        assert_eq!(
            serde_json::to_value(p.claims.for_repository("acme/platform/api/prod")).unwrap(),
            json!({"tenant": "acme", "cost_center": "cc-api", "tier": 2, "team": "platform",
                   "deploy_env": ["prod", "staging"]})
        );
        assert_eq!(
            serde_json::to_value(p.claims.for_repository("acme/platform/other")).unwrap(),
            json!({"tenant": "acme", "cost_center": "cc-100", "tier": 2, "team": "platform"})
        );
        assert_eq!(
            serde_json::to_value(p.claims.for_repository("acme/web/app")).unwrap(),
            json!({"tenant": "acme", "cost_center": "cc-100", "tier": 1})
        );
        // The project's redefinition of `cost_center` is immutable below it by default: a
        // further level would be refused, but nothing may lie below a project anyway.
        let e = refused(json!([
            {"project": "acme/web", "claims": {}},
            {"project": "acme/web/app", "claims": {"x": {"value": 1}}}
        ]));
        assert_eq!(e.path, "$.additional_claims[1]");
        assert!(e.reason.contains("a project is the lowest level"), "{e}");
        // Re-locking: a subgroup redefines a mutable claim without `mutable`, so its
        // project may no longer change it.
        let e = refused(json!([
            {"group": "acme", "claims": {"cost_center": {"value": "a", "mutable": true}}},
            {"group": "acme/platform", "claims": {"cost_center": {"value": "b"}}},
            {"project": "acme/platform/api", "claims": {"cost_center": {"value": "c"}}}
        ]));
        assert_eq!(e.path, "$.additional_claims[2].claims.cost_center");
        assert!(e.reason.contains("subgroup `acme/platform`"), "{e}");
        // ... and a mutable redefinition keeps it open.
        let p = policy(json!([
            {"group": "acme", "claims": {"cost_center": {"value": "a", "mutable": true}}},
            {"group": "acme/platform", "claims": {"cost_center": {"value": "b", "mutable": true}}},
            {"project": "acme/platform/api", "claims": {"cost_center": {"value": "c"}}}
        ]));
        assert_eq!(p.claims.for_repository("acme/platform/api")["cost_center"], json!("c"));
    }

    /// Several repositories in one token: only claims on which all agree.
    #[test]
    fn a_token_for_several_repositories_gets_only_common_claims() {
        let p = policy(json!([
            {"group": "acme", "claims": {"tenant": {"value": "acme"}, "cost_center": {"value": "cc-1", "mutable": true}}},
            {"project": "acme/web", "claims": {"cost_center": {"value": "cc-web"}, "owner": {"value": "web"}}},
            {"project": "acme/platform/api", "claims": {"owner": {"value": "web"}}}
        ]));
        let c = p.claims.for_repositories(["acme/web/app", "acme/platform/api/prod"]);
        // tenant: same; cost_center: differs; owner: same value in both projects.
        assert_eq!(serde_json::to_value(&c).unwrap(), json!({"tenant": "acme", "owner": "web"}));
        let c = p.claims.for_repositories(["acme/web/app", "acme/web/other"]);
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"tenant": "acme", "cost_center": "cc-web", "owner": "web"})
        );
        // A repository without the claim removes it.
        let c = p.claims.for_repositories(["acme/web/app", "other/tools"]);
        assert!(c.is_empty(), "{c:?}");
        assert!(p.claims.for_repositories([]).is_empty());
    }

    #[test]
    fn malformed_levels_are_refused_with_their_path() {
        let cases = [
            (json!([{"claims": {}}]), "$.additional_claims[0]", "exactly one of `group` or `project`"),
            (json!([{"group": "a", "project": "a/b", "claims": {}}]), "$.additional_claims[0]", "exactly one"),
            (json!([{"group": "Acme", "claims": {}}]), "$.additional_claims[0].group", "not a valid path"),
            (
                json!([{"group": "acme", "claims": {}}, {"project": "acme", "claims": {}}]),
                "$.additional_claims[1].project",
                "defined twice",
            ),
            (
                json!([{"group": "acme", "claims": {"x": {"value": null}}}]),
                "$.additional_claims[0].claims.x.value",
                "has no value",
            ),
            (
                json!([{"group": "acme", "claims": {"a b": {"value": 1}}}]),
                "$.additional_claims[0].claims.a b",
                "printable ASCII",
            ),
            (
                json!([{"group": "acme", "claims": {"x": {"value": "a".repeat(3000)}}}]),
                "$.additional_claims[0].claims.x.value",
                "more than 2048",
            ),
            (
                json!([{"group": "acme", "claims": {"x": {"value": 1, "mutible": true}}}]),
                "$.additional_claims[0].claims.x.mutible",
                "unknown field",
            ),
            (
                json!([{"group": "acme", "claims": {"x": {"mutable": true}}}]),
                "$.additional_claims[0].claims.x",
                "missing field `value`",
            ),
        ];
        for (levels, path, reason) in cases {
            let e = refused(levels.clone());
            assert_eq!(e.path, path, "{levels}: {e}");
            assert!(e.reason.contains(reason), "{levels}: {e}");
        }
    }
}
