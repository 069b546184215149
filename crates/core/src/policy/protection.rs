//! Push/delete protection rules (GitLab's protected container repositories) and their index.
//!
//! A rule matches a repository path pattern (`*` matches any run of characters, `/` included;
//! anchored at both ends) and optionally a tag name pattern (RE2 syntax), and sets who may
//! push and who may delete, in either reading of GitLab's protected container repositories: `minimum_access_level_for_push`
//! (level ≥ X may) or `push_protected_up_to_access_level` (level ≤ X may not), likewise for
//! delete. Several matching rules: the most restrictive wins.
//!
//! Rules are indexed by their literal part before the first `*` (exact patterns in a hash
//! map, wildcard patterns by literal prefix), so a request looks up one key per distinct
//! prefix length instead of scanning every rule.

use std::collections::HashMap;
use std::fmt;

use crate::request::access::AccessLevel;

/// A compiled repository path pattern: the checked source text only (the literal pieces
/// between `*`s are found by splitting when matching, which allocates nothing; at 100 000
/// rules a stored copy of the pieces was a tenth of the filter's memory).
#[derive(Debug, Clone)]
pub struct PathPattern {
    source: Box<str>,
}

impl PathPattern {
    pub fn parse(p: &str) -> Result<PathPattern, String> {
        if p.is_empty() || p.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        if let Some(c) = p
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | '*')))
        {
            return Err(format!("character {c:?} is not allowed (lowercase repository path characters and `*`)"));
        }
        Ok(PathPattern { source: p.into() })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches `path` itself or some name under it (`path/...`): whether
    /// the rule may govern a repository of the project or group at `path`.
    pub fn may_match_under(&self, path: &str) -> bool {
        if self.matches(path) {
            return true;
        }
        let under = format!("{path}/");
        if !self.has_wildcard() {
            return self.source.starts_with(&under);
        }
        // The first `*` can absorb the rest of `under` (and anything after it), so a name
        // under `path` matches iff the literal prefix and `under` agree where both are defined.
        let prefix = self.literal_prefix();
        prefix.starts_with(&under) || under.starts_with(prefix)
    }

    fn has_wildcard(&self) -> bool {
        self.source.contains('*')
    }

    fn literal_prefix(&self) -> &str {
        self.source.split('*').next().unwrap_or_default()
    }

    /// Anchored glob match.
    pub fn matches(&self, s: &str) -> bool {
        let mut parts = self.source.split('*');
        let Some(mut rest) = s.strip_prefix(parts.next().unwrap_or_default()) else { return false };
        let Some(mut part) = parts.next() else {
            return rest.is_empty(); // no `*` at all
        };
        // Every piece but the last is found leftmost; the last must end the string.
        for next in parts {
            match rest.find(part) {
                Some(i) => rest = rest.get(i + part.len()..).unwrap_or_default(),
                None => return false,
            }
            part = next;
        }
        rest.ends_with(part)
    }
}

/// The level a rule requires for an action, in the reading the operator wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// `minimum_access_level_for_*`: level ≥ X may.
    AtLeast(AccessLevel),
    /// `*_protected_up_to_access_level`: level ≤ X may not.
    Above(AccessLevel),
}

impl Requirement {
    /// The smallest access level number that satisfies the requirement.
    pub fn threshold(self) -> u8 {
        match self {
            Requirement::AtLeast(l) => l.number(),
            Requirement::Above(l) => l.number().saturating_add(1),
        }
    }

    pub fn allows(self, level: Option<u8>) -> bool {
        level.is_some_and(|l| l >= self.threshold())
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::AtLeast(l) => write!(f, "{} or above", l.name()),
            Requirement::Above(l) => write!(f, "above {}", l.name()),
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    /// The project or group the rule belongs to; its pattern lies within the owner's path.
    pub owner: crate::policy::deploy::Owner,
    pub repository: PathPattern,
    /// Shared between rules with the same pattern (compiled once per bundle).
    pub tag: Option<std::sync::Arc<regex::bytes::Regex>>,
    pub push: Option<Requirement>,
    pub delete: Option<Requirement>,
    /// `false`: dry run — never denies, records "would deny".
    pub enforce: bool,
}

/// What a request does to a repository, as far as protection is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// Blob uploads, and manifest PUT by digest (`tag: None`); manifest PUT by tag.
    Push { tag: Option<&'a str> },
    /// Manifest DELETE by tag.
    DeleteTag { tag: &'a str },
    /// Manifest DELETE by digest and blob DELETE: the filter cannot know which tags point at
    /// the content, so every tag rule of the repository applies (conservative).
    DeleteContent,
}

impl Operation<'_> {
    fn is_push(&self) -> bool {
        matches!(self, Operation::Push { .. })
    }

    fn verb(&self) -> &'static str {
        if self.is_push() {
            "push"
        } else {
            "delete"
        }
    }
}

/// Who is asking, as the token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor<'a> {
    pub name: &'a str,
    /// Access level number on the repository's project (from the token), if the principal
    /// is a user (or a CI job acting for one); deploy tokens have none.
    pub level: Option<u8>,
    pub admin: bool,
}

/// The outcome of the protection rules for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// No rule applies, or every applicable rule is satisfied.
    Allowed,
    /// An enforced rule denies; `rule` is the most restrictive one.
    Denied { rule: String, message: String },
    /// Only dry-run rules would deny: the request goes through, the decision is recorded.
    WouldDeny { rule: String, message: String },
}

impl Protection {
    /// `self` if `keep`, else `Allowed`.
    pub fn filter_denied(self, keep: bool) -> Protection {
        match self {
            Protection::Denied { .. } if !keep => Protection::Allowed,
            other => other,
        }
    }
}

/// All rules of a bundle, indexed.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    exact: HashMap<String, Vec<u32>>,
    by_prefix: HashMap<String, Vec<u32>>,
    prefix_lengths: Vec<usize>,
    pub admins_bypass: bool,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>, admins_bypass: bool) -> RuleSet {
        let mut set = RuleSet { admins_bypass, ..RuleSet::default() };
        for (i, rule) in rules.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            if rule.repository.has_wildcard() {
                set.by_prefix.entry(rule.repository.literal_prefix().to_owned()).or_default().push(idx);
            } else {
                set.exact.entry(rule.repository.as_str().to_owned()).or_default().push(idx);
            }
        }
        let mut lengths: Vec<usize> = set.by_prefix.keys().map(String::len).collect();
        lengths.sort_unstable();
        lengths.dedup();
        set.prefix_lengths = lengths;
        set.rules = rules;
        set
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rules whose repository pattern matches `repo`, in bundle order.
    pub fn matching<'s>(&'s self, repo: &'s str) -> Vec<&'s Rule> {
        let mut idx: Vec<u32> = self.exact.get(repo).cloned().unwrap_or_default();
        for &len in &self.prefix_lengths {
            if len > repo.len() {
                break;
            }
            if let Some(prefix) = repo.get(..len) {
                if let Some(ids) = self.by_prefix.get(prefix) {
                    idx.extend(ids.iter().filter(|i| self.rule(**i).is_some_and(|r| r.repository.matches(repo))));
                }
            }
        }
        idx.sort_unstable();
        idx.iter().filter_map(|i| self.rule(*i)).collect()
    }

    fn rule(&self, i: u32) -> Option<&Rule> {
        self.rules.get(usize::try_from(i).ok()?)
    }

    /// Every rule, in bundle order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules matching `repo` (enforced or dry run, with or without a tag pattern) whose
    /// push (`push = true`) or delete requirement `actor` does not meet, with that
    /// requirement, in bundle order. Empty for admins when admins bypass protection.
    pub fn unmet<'s>(&'s self, repo: &'s str, push: bool, actor: Actor<'_>) -> Vec<(&'s Rule, Requirement)> {
        self.unmet_among(self.matching(repo), push, actor)
    }

    /// [`RuleSet::unmet`] for every repository of the project or group at `path`: the rules
    /// that may match one of them ([`PathPattern::may_match_under`]).
    pub fn unmet_under<'s>(&'s self, path: &str, push: bool, actor: Actor<'_>) -> Vec<(&'s Rule, Requirement)> {
        self.unmet_among(self.rules.iter().filter(|r| r.repository.may_match_under(path)).collect(), push, actor)
    }

    fn unmet_among<'s>(&self, rules: Vec<&'s Rule>, push: bool, actor: Actor<'_>) -> Vec<(&'s Rule, Requirement)> {
        if actor.admin && self.admins_bypass {
            return Vec::new();
        }
        rules
            .into_iter()
            .filter_map(|r| Some((r, if push { r.push? } else { r.delete? })))
            .filter(|(_, req)| !req.allows(actor.level))
            .collect()
    }

    /// The id of an enforced rule without a tag pattern that denies `actor` every push
    /// (`push = true`) or delete on `repo`, if any: such an action can never succeed.
    pub fn denies_untagged(&self, repo: &str, push: bool, actor: Actor<'_>) -> Option<String> {
        self.unmet(repo, push, actor)
            .into_iter()
            .filter(|(r, _)| r.enforce && r.tag.is_none())
            .max_by_key(|(_, req)| req.threshold())
            .map(|(r, _)| r.id.clone())
    }

    /// Applies the rules to one operation by one actor.
    pub fn evaluate(&self, repo: &str, op: Operation<'_>, actor: Actor<'_>) -> Protection {
        let mut strictest_enforced: Option<(&Rule, Requirement)> = None;
        let mut strictest_dry: Option<(&Rule, Requirement)> = None;
        for rule in self.matching(repo) {
            let applies = match (&rule.tag, op) {
                (None, _) => true,
                (Some(re), Operation::Push { tag: Some(t) }) | (Some(re), Operation::DeleteTag { tag: t }) => {
                    re.is_match(t.as_bytes())
                }
                (Some(_), Operation::Push { tag: None }) => false,
                (Some(_), Operation::DeleteContent) => true,
            };
            let requirement = if op.is_push() { rule.push } else { rule.delete };
            let (true, Some(req)) = (applies, requirement) else { continue };
            let slot = if rule.enforce { &mut strictest_enforced } else { &mut strictest_dry };
            if slot.map_or(true, |(_, r)| req.threshold() > r.threshold()) {
                *slot = Some((rule, req));
            }
        }
        let bypass = actor.admin && self.admins_bypass;
        let denies = |(_, req): (&Rule, Requirement)| !bypass && !req.allows(actor.level);
        if let Some(found) = strictest_enforced.filter(|f| denies(*f)) {
            return Protection::Denied { rule: found.0.id.clone(), message: message(repo, op, actor, found) };
        }
        if let Some(found) = strictest_dry.filter(|f| denies(*f)) {
            return Protection::WouldDeny { rule: found.0.id.clone(), message: message(repo, op, actor, found) };
        }
        Protection::Allowed
    }
}

fn message(repo: &str, op: Operation<'_>, actor: Actor<'_>, (rule, req): (&Rule, Requirement)) -> String {
    let what = match op {
        Operation::Push { tag: Some(t) } | Operation::DeleteTag { tag: t } => format!("tag `{t}` of `{repo}`"),
        Operation::Push { tag: None } | Operation::DeleteContent => format!("`{repo}`"),
    };
    let level = match actor.level {
        Some(n) => format!("access level {n}"),
        None => "no access level (deploy token)".to_owned(),
    };
    let digest_note = if op == Operation::DeleteContent && rule.tag.is_some() {
        "; deleting by digest counts as deleting protected tags"
    } else {
        ""
    };
    format!(
        "container protected; you are not allowed to {} {what}: rule `{}` of {} requires {} to {}, `{}` has {level}{digest_note}",
        op.verb(),
        rule.id,
        rule.owner,
        req,
        op.verb(),
        actor.name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, repo: &str, tag: Option<&str>, push: Option<Requirement>, delete: Option<Requirement>) -> Rule {
        Rule {
            id: id.into(),
            owner: crate::policy::deploy::Owner::Group(
                repo.split('/').next().unwrap_or_default().trim_end_matches('*').into(),
            ),
            repository: PathPattern::parse(repo).unwrap(),
            tag: tag.map(|t| std::sync::Arc::new(regex::bytes::RegexBuilder::new(t).unicode(false).build().unwrap())),
            push,
            delete,
            enforce: true,
        }
    }

    fn actor(level: Option<AccessLevel>) -> Actor<'static> {
        Actor { name: "someone", level: level.map(AccessLevel::number), admin: false }
    }

    use AccessLevel::*;
    use Requirement::*;

    #[test]
    fn glob_patterns_are_anchored() {
        let cases = [
            ("acme/web", "acme/web", true),
            ("acme/web", "acme/web/app", false),
            ("acme/web/*", "acme/web/app", true),
            ("acme/web/*", "acme/web/a/b", true),
            ("acme/web/*", "acme/web", false),
            ("acme/*/api", "acme/platform/api", true),
            ("acme/*/api", "acme/platform/api/x", false),
            ("*", "anything/at/all", true),
            ("*-prod", "acme/web-prod", true),
            ("*-prod", "acme/web-prod/x", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("a**", "a", true),
        ];
        for (p, s, want) in cases {
            assert_eq!(PathPattern::parse(p).unwrap().matches(s), want, "{p} ~ {s}");
        }
        let under = [
            ("acme/web/*", "acme/web", true),
            ("acme/web/*", "acme", true),
            ("acme/web/*", "acme/platform", false),
            ("acme/platform/api/prod", "acme/platform/api", true),
            ("acme/platform/api/prod", "acme/web", false),
            ("acme/web", "acme/web", true),
            ("acme/web", "acme/webapp", false),
            ("acme/w*", "acme/web", true),
            ("acme/w*", "acme/platform", false),
            ("*-prod", "other/tools", true),
            ("other/*", "other/tools", true),
        ];
        for (p, path, want) in under {
            assert_eq!(PathPattern::parse(p).unwrap().may_match_under(path), want, "{p} under {path}");
        }
        assert!(PathPattern::parse("Acme").is_err());
        assert!(PathPattern::parse("").is_err());
        assert!(PathPattern::parse("a?b").is_err());
    }

    #[test]
    fn both_readings_of_seed_003() {
        assert!(!AtLeast(Maintainer).allows(Some(30)) && AtLeast(Maintainer).allows(Some(40)));
        // "protected up to developer": developer denied, maintainer allowed.
        assert!(!Above(Developer).allows(Some(30)) && Above(Developer).allows(Some(40)));
        assert!(!Above(Developer).allows(None), "no level (deploy token) never satisfies a rule");
    }

    #[test]
    fn table_of_protection_decisions() {
        let set = RuleSet::new(
            vec![
                rule("web-push", "acme/web/*", None, Some(AtLeast(Maintainer)), None),
                rule("web-release-tags", "acme/web/*", Some("^v[0-9]+"), Some(AtLeast(Owner)), Some(Above(Maintainer))),
                rule("everything-delete", "*", None, None, Some(AtLeast(Developer))),
                rule("platform", "acme/platform/api", None, Some(Above(Reporter)), None),
            ],
            true,
        );
        let cases: &[(&str, Operation<'_>, Option<AccessLevel>, Option<&str>)] = &[
            ("acme/web/app", Operation::Push { tag: None }, Some(Developer), Some("web-push")),
            ("acme/web/app", Operation::Push { tag: None }, Some(Maintainer), None),
            ("acme/web/app", Operation::Push { tag: Some("dev-123") }, Some(Maintainer), None),
            ("acme/web/app", Operation::Push { tag: Some("v1") }, Some(Maintainer), Some("web-release-tags")),
            ("acme/web/app", Operation::Push { tag: Some("v1") }, Some(Owner), None),
            ("acme/web/app", Operation::DeleteTag { tag: "v1" }, Some(Maintainer), Some("web-release-tags")),
            ("acme/web/app", Operation::DeleteTag { tag: "dev-1" }, Some(Developer), None),
            ("acme/web/app", Operation::DeleteContent, Some(Maintainer), Some("web-release-tags")),
            ("acme/web/app", Operation::DeleteContent, Some(Owner), None),
            ("other/tools", Operation::DeleteContent, Some(Reporter), Some("everything-delete")),
            ("acme/platform/api", Operation::Push { tag: None }, Some(Reporter), Some("platform")),
            ("acme/platform/api", Operation::Push { tag: None }, Some(Developer), None),
            ("acme/platform/api", Operation::Push { tag: None }, None, Some("platform")),
            ("acme/platform/api/x", Operation::Push { tag: None }, None, None),
        ];
        for (repo, op, level, want) in cases {
            let got = match set.evaluate(repo, *op, actor(*level)) {
                Protection::Denied { rule, .. } => Some(rule),
                Protection::Allowed => None,
                Protection::WouldDeny { .. } => panic!("no dry-run rules here"),
            };
            assert_eq!(got.as_deref(), *want, "{repo} {op:?} {level:?}");
        }
    }

    #[test]
    fn most_restrictive_wins_and_message_names_it() {
        let set = RuleSet::new(
            vec![
                rule("lenient", "acme/*", None, Some(AtLeast(Developer)), None),
                rule("strict", "acme/web/*", None, Some(AtLeast(Owner)), None),
            ],
            true,
        );
        let Protection::Denied { rule, message } =
            set.evaluate("acme/web/app", Operation::Push { tag: None }, actor(Some(Maintainer)))
        else {
            panic!()
        };
        assert_eq!(rule, "strict");
        assert!(message.starts_with("container protected; you are not allowed to push `acme/web/app`"), "{message}");
        assert!(message.contains("rule `strict` of group `acme` requires owner or above"), "{message}");
    }

    #[test]
    fn dry_run_rules_only_record_and_admins_bypass_when_set() {
        let mut dry = rule("dry", "acme/*", None, Some(AtLeast(Owner)), None);
        dry.enforce = false;
        let set = RuleSet::new(vec![dry.clone()], true);
        assert!(matches!(
            set.evaluate("acme/web", Operation::Push { tag: None }, actor(Some(Developer))),
            Protection::WouldDeny { rule, .. } if rule == "dry"
        ));
        let strict = rule("strict", "acme/*", None, Some(AtLeast(Admin)), None);
        let admin = Actor { name: "root", level: Some(60), admin: true };
        let low_admin = Actor { name: "root", level: Some(0), admin: true };
        assert_eq!(
            RuleSet::new(vec![strict.clone()], true).evaluate("acme/x", Operation::Push { tag: None }, low_admin),
            Protection::Allowed
        );
        assert!(matches!(
            RuleSet::new(vec![strict.clone()], false).evaluate("acme/x", Operation::Push { tag: None }, low_admin),
            Protection::Denied { .. }
        ));
        assert_eq!(
            RuleSet::new(vec![strict], false).evaluate("acme/x", Operation::Push { tag: None }, admin),
            Protection::Allowed
        );
    }

    #[test]
    fn index_finds_the_same_rules_as_a_scan() {
        let patterns = ["a/*", "a/b/*", "a/b/c", "*", "a/*/c", "b/*", "a/b", "a/bc*", "x*y"];
        let rules: Vec<Rule> = patterns
            .iter()
            .enumerate()
            .map(|(i, p)| rule(&format!("r{i}"), p, None, Some(AtLeast(Owner)), None))
            .collect();
        let set = RuleSet::new(rules.clone(), false);
        for repo in ["a/b/c", "a/b", "a/bcd", "b/x", "xy", "x/y", "c", "a/q/c"] {
            let indexed: Vec<&str> = set.matching(repo).iter().map(|r| r.id.as_str()).collect();
            let scanned: Vec<&str> =
                rules.iter().filter(|r| r.repository.matches(repo)).map(|r| r.id.as_str()).collect();
            assert_eq!(indexed, scanned, "{repo}");
        }
    }
}
