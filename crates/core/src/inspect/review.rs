//! Access review: who may pull, push and delete a repository and which protection rules apply
//! to it, or what one principal may do on every project.
//!
//! Nothing here decides on its own. Each principal gets the token the token service would
//! issue ([`crate::issue::principal::issued_token`]: `Directory::grant_under` for users,
//! `Directory::deploy_grant` for deploy tokens), and the one decision function judges a pull,
//! an untagged push and a delete with it, without the protection rules; the rules then come
//! from [`RuleSet::unmet`], the function `denies_untagged` (the token service's withholding)
//! is built on. Tag rules cannot be judged for every tag, so they make an action "some
//! tags". Job scopes ([`JobScope`]) say which CI jobs' job tokens reach the repository: the
//! project's own jobs (pull, push) and the jobs of projects its job token allowlist names
//! (pull), each limited to what the user who triggered the job may do.

use std::fmt;

use crate::decide::decision::{decide, Credential};
use crate::inspect::explain::{challenge, deploy_token_standing, describe_level};
use crate::issue::principal::{issued_token, Principal};
use crate::policy::bundle::Policy;
use crate::policy::directory::Directory;
use crate::policy::protection::{Actor, Rule, RuleSet};
use crate::request::access::{AccessLevel, Action, ActionSet};
use crate::request::name::is_repository_name;
use crate::request::route::classify;
use crate::request::scope::Scope;

/// Which CI jobs' job tokens reach a repository (`issue::job`): the jobs of `project`, with
/// `actions`, as the user who triggered each job may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobScope {
    pub project: String,
    pub actions: &'static str,
}

fn job_scopes(directory: &Directory, repository: &str) -> Vec<JobScope> {
    let Some(project) = directory.project_of(repository) else { return Vec::new() };
    let mut scopes = vec![JobScope { project: project.path.clone(), actions: "pull, push" }];
    scopes.extend(project.job_token_allowlist.iter().map(|p| JobScope { project: p.clone(), actions: "pull" }));
    scopes
}

fn describe_job_scopes(scopes: &[JobScope]) -> String {
    if scopes.is_empty() {
        return "none".to_owned();
    }
    let list: Vec<String> = scopes.iter().map(|s| format!("jobs of {} ({})", s.project, s.actions)).collect();
    format!("{}, as the user who triggered the job may", list.join("; "))
}

/// May the principal perform an action?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Yes,
    No,
    /// Allowed, except where an enforced rule with a tag pattern (or, for a whole project,
    /// a rule on some of its repositories) denies it.
    Some,
}

/// One action of one principal: the verdict, the enforced rules that make it `No` or
/// `Some`, and the dry-run rules that would deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub verdict: Verdict,
    pub rules: Vec<String>,
    pub dry_run: Vec<String>,
}

impl Cell {
    fn no() -> Cell {
        Cell { verdict: Verdict::No, rules: Vec::new(), dry_run: Vec::new() }
    }

    fn yes() -> Cell {
        Cell { verdict: Verdict::Yes, rules: Vec::new(), dry_run: Vec::new() }
    }

    /// `yes`, `no`, `no (rule a)`, `some tags (rule a)`, `yes (dry run: b would deny)`;
    /// `some` is worded `some tags` for a repository and `some` for a project.
    fn text(&self, some: &str) -> String {
        let rules = |ids: &[String]| ids.iter().map(|r| format!("rule {r}")).collect::<Vec<_>>().join(", ");
        let mut out = match (self.verdict, self.rules.is_empty()) {
            (Verdict::Yes, _) => "yes".to_owned(),
            (Verdict::No, true) => "no".to_owned(),
            (Verdict::No, false) => format!("no ({})", rules(&self.rules)),
            (Verdict::Some, _) => format!("{some} ({})", rules(&self.rules)),
        };
        if !self.dry_run.is_empty() && self.verdict != Verdict::No {
            out.push_str(&format!(" [dry run: {} would deny]", self.dry_run.join(", ")));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let verdict = match self.verdict {
            Verdict::Yes => "yes",
            Verdict::No => "no",
            Verdict::Some => "some",
        };
        serde_json::json!({ "verdict": verdict, "rules": self.rules, "dry_run": self.dry_run })
    }

    pub fn is_no(&self) -> bool {
        self.verdict == Verdict::No
    }
}

/// A user or a deploy token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    DeployToken,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::DeployToken => "deploy token",
        }
    }
}

/// What one principal may do on one repository (or on the repositories of one project).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub kind: Kind,
    pub name: String,
    /// The principal's path (repository or project) for a principal review; its level (users)
    /// or owner, scopes and state (deploy tokens).
    pub path: String,
    pub standing: String,
    pub pull: Cell,
    pub push: Cell,
    pub delete: Cell,
}

impl Access {
    pub fn none(&self) -> bool {
        self.pull.is_no() && self.push.is_no() && self.delete.is_no()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind.as_str(), "name": self.name, "path": self.path, "standing": self.standing,
            "pull": self.pull.json(), "push": self.push.json(), "delete": self.delete.json(),
        })
    }
}

/// A protection rule as the review lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleView {
    pub id: String,
    pub owner: String,
    pub pattern: String,
    pub tag: Option<String>,
    pub push: Option<String>,
    pub delete: Option<String>,
    pub enforced: bool,
}

impl RuleView {
    fn of(r: &Rule) -> RuleView {
        RuleView {
            id: r.id.clone(),
            owner: r.owner.to_string().replace('`', ""),
            pattern: r.repository.as_str().to_owned(),
            tag: r.tag.as_ref().map(|t| t.as_str().to_owned()),
            push: r.push.map(|q| q.to_string()),
            delete: r.delete.map(|q| q.to_string()),
            enforced: r.enforce,
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "owner": self.owner, "repository_path_pattern": self.pattern,
            "tag_name_pattern": self.tag, "push": self.push, "delete": self.delete, "enforced": self.enforced,
        })
    }
}

/// `rgctl access --repository`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryReview {
    pub repository: String,
    /// The project the repository belongs to (none: nothing is granted on it).
    pub project: Option<String>,
    pub revision: u64,
    /// Every user, then every deploy token, in file order.
    pub access: Vec<Access>,
    /// The rules whose pattern matches the repository, in bundle order.
    pub rules: Vec<RuleView>,
    /// Which CI jobs' job tokens reach the repository.
    pub job_scopes: Vec<JobScope>,
}

/// `rgctl access --principal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalReview {
    pub name: String,
    pub kind: Kind,
    pub revision: u64,
    /// One row per project of the principals file, in path order.
    pub access: Vec<Access>,
    /// The rules that make a row `no` or `some` (or would deny, dry run), in bundle order.
    pub rules: Vec<RuleView>,
}

/// The protection operation each action is judged by: a pull; an untagged push (blob upload,
/// which asks `pull,push` as every push does); a delete by digest.
fn request(action: Action, repo: &str) -> (&'static str, String) {
    match action {
        Action::Push => ("POST", format!("/v2/{repo}/blobs/uploads/")),
        Action::Delete => ("DELETE", format!("/v2/{repo}/manifests/sha256:{}", "0".repeat(64))),
        Action::Pull | Action::All => ("GET", format!("/v2/{repo}/manifests/latest")),
    }
}

/// The rules of one action for one actor, as the filter would apply them.
enum RuleScope<'a> {
    /// One repository: the rules matching it.
    Repository(&'a str),
    /// Every repository of a project: the rules that may match one of them.
    Under(&'a str),
}

struct Reviewer<'a> {
    directory: &'a Directory,
    policy: &'a Policy,
    /// `policy` without protection rules: grants and principal checks only.
    unprotected: Policy,
    now: i64,
}

impl<'a> Reviewer<'a> {
    fn new(directory: &'a Directory, policy: &'a Policy, now: i64) -> Reviewer<'a> {
        let unprotected = Policy { rules: RuleSet::new(Vec::new(), policy.rules.admins_bypass), ..policy.clone() };
        Reviewer { directory, policy, unprotected, now }
    }

    /// `principal` on `repo` (a repository, or a project's path standing for its
    /// repositories), with the rules of `scope`.
    fn access(&self, principal: Principal<'_>, repo: &str, scope: RuleScope<'_>) -> Access {
        let all = ActionSet::of(&[Action::Pull, Action::Push, Action::Delete]);
        // The grants without the rules (the token service withholds what an untagged rule
        // denies; the rules are judged below, so that they can be named as the reason).
        let (token, _) = issued_token(
            self.directory,
            &self.unprotected,
            principal,
            &[Scope::repository(repo.to_owned(), all)],
            self.now,
        );
        let project = self.directory.project_of(repo);
        let (kind, standing, actor) = match principal {
            Principal::User(u) | Principal::Job(u, _) => {
                let level = project.map_or(AccessLevel::NoAccess, |p| self.directory.effective_level(u, &p.path));
                let standing = if project.is_some() { describe_level(level) } else { "no project".to_owned() };
                // As the filter reads it from the token: `admin` is level 60.
                (Kind::User, standing, Actor { name: &u.username, level: Some(level.number()), admin: u.admin })
            }
            Principal::DeployToken(t) => (
                Kind::DeployToken,
                deploy_token_standing(t, self.now),
                Actor { name: &t.username, level: None, admin: false },
            ),
        };
        let cell = |action: Action| {
            let (method, path) = request(action, repo);
            let granted = classify(method, &path, None).is_ok_and(|route| {
                decide(Ok(&route), Credential::Valid(&token), &challenge(), &self.unprotected, self.now).is_allow()
            });
            let push = match action {
                Action::Push => true,
                Action::Delete => false,
                Action::Pull | Action::All => return if granted { Cell::yes() } else { Cell::no() },
            };
            let rules = &self.policy.rules;
            let unmet = match scope {
                RuleScope::Repository(r) => rules.unmet(r, push, actor),
                RuleScope::Under(p) => rules.unmet_under(p, push, actor),
            };
            let ids = |keep: &dyn Fn(&Rule) -> bool| -> Vec<String> {
                unmet.iter().filter(|(r, _)| keep(r)).map(|(r, _)| r.id.clone()).collect()
            };
            let untagged = match scope {
                RuleScope::Repository(r) => rules.denies_untagged(r, push, actor),
                RuleScope::Under(_) => None,
            };
            let dry_run = ids(&|r| !r.enforce);
            match (granted, untagged) {
                (false, _) => Cell::no(),
                (true, Some(rule)) => Cell { verdict: Verdict::No, rules: vec![rule], dry_run: Vec::new() },
                (true, None) => {
                    let enforced = ids(&|r| r.enforce);
                    let verdict = if enforced.is_empty() { Verdict::Yes } else { Verdict::Some };
                    Cell { verdict, rules: enforced, dry_run }
                }
            }
        };
        Access {
            kind,
            name: principal.name().to_owned(),
            path: repo.to_owned(),
            standing,
            pull: cell(Action::Pull),
            push: cell(Action::Push),
            delete: cell(Action::Delete),
        }
    }
}

/// Every user and deploy token on `repository`, and the rules that apply to it, at `now`.
pub fn review_repository(
    directory: &Directory,
    policy: &Policy,
    repository: &str,
    now: i64,
) -> Result<RepositoryReview, String> {
    if !is_repository_name(repository) {
        return Err(format!("`{repository}` is not a repository name"));
    }
    let reviewer = Reviewer::new(directory, policy, now);
    let principals = directory
        .users()
        .iter()
        .map(Principal::User)
        .chain(policy.credentials.tokens().iter().map(Principal::DeployToken));
    let access = principals.map(|p| reviewer.access(p, repository, RuleScope::Repository(repository))).collect();
    Ok(RepositoryReview {
        repository: repository.to_owned(),
        project: directory.project_of(repository).map(|p| p.path.clone()),
        revision: policy.revision,
        access,
        rules: policy.rules.matching(repository).into_iter().map(RuleView::of).collect(),
        job_scopes: job_scopes(directory, repository),
    })
}

/// What the user or deploy token `name` may do on the repositories of every project.
pub fn review_principal(
    directory: &Directory,
    policy: &Policy,
    name: &str,
    now: i64,
) -> Result<PrincipalReview, String> {
    let principal = crate::issue::principal::principal(directory, policy, name)?;
    let reviewer = Reviewer::new(directory, policy, now);
    let access: Vec<Access> =
        directory.projects().map(|p| reviewer.access(principal, &p.path, RuleScope::Under(&p.path))).collect();
    let named: std::collections::BTreeSet<String> = access
        .iter()
        .flat_map(|a| [&a.push, &a.delete])
        .flat_map(|c| c.rules.iter().chain(&c.dry_run))
        .cloned()
        .collect();
    Ok(PrincipalReview {
        name: name.to_owned(),
        kind: match principal {
            Principal::User(_) | Principal::Job(..) => Kind::User,
            Principal::DeployToken(_) => Kind::DeployToken,
        },
        revision: policy.revision,
        access,
        rules: policy.rules.rules().iter().filter(|r| named.contains(&r.id)).map(RuleView::of).collect(),
    })
}

impl RepositoryReview {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "repository": self.repository, "project": self.project, "bundle_revision": self.revision,
            "principals": self.access.iter().map(Access::json).collect::<Vec<_>>(),
            "job_scopes": self.job_scopes.iter().map(|s| serde_json::json!({"project": s.project, "actions": s.actions})).collect::<Vec<_>>(),
            "rules": self.rules.iter().map(RuleView::json).collect::<Vec<_>>(),
        })
    }
}

impl PrincipalReview {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "principal": self.name, "kind": self.kind.as_str(), "bundle_revision": self.revision,
            "projects": self.access.iter().map(Access::json).collect::<Vec<_>>(),
            "rules": self.rules.iter().map(RuleView::json).collect::<Vec<_>>(),
        })
    }
}

/// Left-aligned columns, two spaces apart, no trailing blanks.
fn table(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(cell.chars().count()),
                None => widths.push(cell.chars().count()),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn rules_table(f: &mut fmt::Formatter<'_>, rules: &[RuleView]) -> fmt::Result {
    let mut rows = vec![["ID", "OWNER", "PATTERN", "TAG", "PUSH", "DELETE", "MODE"].map(String::from).to_vec()];
    let dash = || "-".to_owned();
    rows.extend(rules.iter().map(|r| {
        vec![
            r.id.clone(),
            r.owner.clone(),
            r.pattern.clone(),
            r.tag.clone().unwrap_or_else(dash),
            r.push.clone().unwrap_or_else(dash),
            r.delete.clone().unwrap_or_else(dash),
            if r.enforced { "enforced" } else { "dry run" }.to_owned(),
        ]
    }));
    write!(f, "{}", table(&rows))
}

fn access_rows(access: &[&Access], first: &str, some: &str, by_path: bool) -> Vec<Vec<String>> {
    let mut rows = vec![[first, "STANDING", "PULL", "PUSH", "DELETE"].map(String::from).to_vec()];
    rows.extend(access.iter().map(|a| {
        let head = if by_path { a.path.clone() } else { format!("{} {}", a.kind.as_str(), a.name) };
        vec![head, a.standing.clone(), a.pull.text(some), a.push.text(some), a.delete.text(some)]
    }));
    rows
}

impl fmt::Display for RepositoryReview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.project {
            Some(p) => {
                writeln!(f, "repository {} (project {}), bundle revision {}", self.repository, p, self.revision)?
            }
            None => writeln!(
                f,
                "repository {} belongs to no project: nothing is granted on it (bundle revision {})",
                self.repository, self.revision
            )?,
        }
        let (some, none): (Vec<&Access>, Vec<&Access>) = self.access.iter().partition(|a| !a.none());
        writeln!(f)?;
        write!(f, "{}", table(&access_rows(&some, "PRINCIPAL", "some tags", false)))?;
        writeln!(f, "job scopes: {}", describe_job_scopes(&self.job_scopes))?;
        let none: Vec<String> = none.iter().map(|a| format!("{} ({})", a.name, a.standing)).collect();
        writeln!(f, "no access: {}", if none.is_empty() { "nobody".to_owned() } else { none.join("; ") })?;
        writeln!(f)?;
        if self.rules.is_empty() {
            return writeln!(f, "no protection rule applies");
        }
        writeln!(f, "protection rules that apply:")?;
        rules_table(f, &self.rules)?;
        if self.access.iter().any(|a| [&a.push, &a.delete].iter().any(|c| c.verdict == Verdict::Some)) {
            writeln!(f, "some tags: refused for the tags a rule's tag pattern matches, and for deletes by digest")?;
        }
        Ok(())
    }
}

impl fmt::Display for PrincipalReview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {}, bundle revision {}", self.kind.as_str(), self.name, self.revision)?;
        let (some, none): (Vec<&Access>, Vec<&Access>) = self.access.iter().partition(|a| !a.none());
        writeln!(f)?;
        if some.is_empty() {
            writeln!(f, "no access to any project")?;
        } else {
            write!(f, "{}", table(&access_rows(&some, "PROJECT", "some", true)))?;
        }
        let none: Vec<&str> = none.iter().map(|a| a.path.as_str()).collect();
        writeln!(f, "no access: {}", if none.is_empty() { "none".to_owned() } else { none.join(", ") })?;
        writeln!(f)?;
        if self.rules.is_empty() {
            return writeln!(f, "no protection rule restricts it");
        }
        writeln!(f, "protection rules that restrict it:")?;
        rules_table(f, &self.rules)?;
        writeln!(f, "some: refused on the repositories and tags the rule's patterns match (rgctl access --repository)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRINCIPALS: &str = include_str!("../../../../policies/example/principals.json");
    const BUNDLE: &str = include_str!("../../../../policies/example/bundle.json");
    /// 2027-01-15T08:00:00Z: after the example's expired deploy token expired.
    const NOW: i64 = 1_800_000_000;

    fn world() -> (Directory, Policy) {
        (Directory::from_json(PRINCIPALS).unwrap(), Policy::from_json(BUNDLE).unwrap())
    }

    fn row(a: &Access) -> [String; 3] {
        [a.pull.text("some"), a.push.text("some"), a.delete.text("some")]
    }

    /// The example world's answer for `acme/web/app`: every user and deploy token.
    #[test]
    fn who_may_pull_push_delete_acme_web_app() {
        let (dir, policy) = world();
        let r = review_repository(&dir, &policy, "acme/web/app", NOW).unwrap();
        let some = "some (rule web-release-tags)";
        let want: &[(&str, [&str; 3])] = &[
            ("root", ["yes", "yes", "yes"]),
            ("alice", ["yes", "yes", "yes"]),
            ("mia", ["yes", "yes", "yes"]),
            // Developers may push, not release tags; delete needs maintainer.
            ("dev", ["yes", some, "no"]),
            ("rita", ["yes", "no", "no"]),
            ("gus", ["no", "no", "no"]),
            ("olga", ["no", "no", "no"]),
            // Deploy tokens hold no access level: every rule that applies denies them.
            ("acme-ci", ["yes", some, "no"]),
            ("deploy-token-2", ["yes", "no", "no"]),
            ("deploy-token-3", ["yes", some, "no"]),
            ("deploy-token-4", ["no", "no", "no"]), // expired
            ("deploy-token-5", ["no", "no", "no"]), // revoked
            // write_registry alone: every push asks `pull,push`, which its scopes do not cover.
            ("deploy-token-6", ["no", "no", "no"]),
        ];
        let got: Vec<(&str, [String; 3])> = r.access.iter().map(|a| (a.name.as_str(), row(a))).collect();
        assert_eq!(got.len(), want.len());
        for ((name, cells), (want_name, want_cells)) in got.iter().zip(want) {
            assert_eq!((name, cells.clone().map(|c| c)), (want_name, want_cells.map(String::from)));
        }
        assert_eq!(r.project.as_deref(), Some("acme/web"));
        assert_eq!(r.rules.len(), 1);
        let rule = &r.rules[0];
        assert_eq!(
            (rule.id.as_str(), rule.owner.as_str(), rule.pattern.as_str(), rule.tag.as_deref(), rule.enforced),
            ("web-release-tags", "project acme/web", "acme/web/*", Some("^v[0-9]+"), true)
        );
        assert_eq!(rule.push.as_deref(), Some("maintainer or above"));
        let text = r.to_string();
        assert!(text.contains("some tags (rule web-release-tags)"), "{text}");
        assert!(
            text.contains("job scopes: jobs of acme/web (pull, push), as the user who triggered the job may"),
            "{text}"
        );
    }

    #[test]
    fn untagged_rules_dry_runs_and_principals() {
        let (dir, policy) = world();
        let r = review_repository(&dir, &policy, "acme/platform/api/prod", NOW).unwrap();
        let of = |name: &str| row(r.access.iter().find(|a| a.name == name).unwrap());
        let no = "no (rule api-prod-maintainers)";
        assert_eq!(of("alice"), ["yes", "yes", "yes"]);
        assert_eq!(of("rita"), ["yes", "no", "no"], "a reporter may not push anyway");
        assert_eq!(of("acme-ci"), ["yes", no, "no"], "no deploy token scope grants delete");
        assert_eq!(of("deploy-token-3"), ["no", "no", "no"]);
        let r = review_repository(&dir, &policy, "other/tools", NOW).unwrap();
        let olga = r.access.iter().find(|a| a.name == "olga").unwrap();
        assert_eq!(olga.push.dry_run, ["other-push-dry-run"]);
        assert_eq!(olga.push.verdict, Verdict::Yes);
        let r = review_repository(&dir, &policy, "acme/rogue", NOW).unwrap();
        assert!(r.project.is_none() && r.access.iter().all(Access::none));
        assert!(review_repository(&dir, &policy, "Bad", NOW).is_err());

        let p = review_principal(&dir, &policy, "acme-ci", NOW).unwrap();
        let rows: Vec<(&str, [String; 3])> = p.access.iter().map(|a| (a.path.as_str(), row(a))).collect();
        assert_eq!(
            rows,
            [
                ("acme/platform/api", ["yes", "some (rule api-prod-maintainers)", "no"].map(String::from)),
                ("acme/web", ["yes", "some (rule web-release-tags)", "no"].map(String::from)),
                ("other/tools", ["no", "no", "no"].map(String::from)),
                ("registry-guard/policy", ["no", "no", "no"].map(String::from)),
            ]
        );
        let ids: Vec<&str> = p.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["web-release-tags", "api-prod-maintainers"]);
        let p = review_principal(&dir, &policy, "alice", NOW).unwrap();
        assert!(p.rules.is_empty() && p.access.iter().filter(|a| !a.none()).count() == 3, "{p}");
        assert!(review_principal(&dir, &policy, "nobody", NOW).is_err());
    }

    /// The review agrees with `explain` (the filter's decision on the token the token
    /// service would issue) on concrete requests, for every principal of the example world.
    #[test]
    fn agrees_with_explain_on_concrete_requests() {
        let (dir, policy) = world();
        for repo in ["acme/web/app", "acme/platform/api/prod", "acme/platform/api", "other/tools"] {
            let r = review_repository(&dir, &policy, repo, NOW).unwrap();
            for a in &r.access {
                let allowed = |method: &str, path: String| {
                    crate::inspect::explain::explain(&dir, &policy, &a.name, method, &path, NOW)
                        .unwrap()
                        .decision
                        .is_allow()
                };
                let at = |what: &str| format!("/v2/{repo}/{what}");
                let ctx = format!("{} on {repo}", a.name);
                assert_eq!(allowed("GET", at("manifests/v1")), a.pull.verdict == Verdict::Yes, "pull: {ctx}");
                // v1 matches web-release-tags' tag pattern, dev-1 does not.
                let (upload, plain, release) = (
                    allowed("POST", at("blobs/uploads/")),
                    allowed("PUT", at("manifests/dev-1")),
                    allowed("PUT", at("manifests/v1")),
                );
                let want = match a.push.verdict {
                    Verdict::Yes => (true, true, true),
                    Verdict::No => (false, false, false),
                    Verdict::Some => (true, true, false),
                };
                assert_eq!((upload, plain, release), want, "push: {ctx}");
                let (plain, release) =
                    (allowed("DELETE", at("manifests/dev-1")), allowed("DELETE", at("manifests/v1")));
                let want = match a.delete.verdict {
                    Verdict::Yes => (true, true),
                    Verdict::No => (false, false),
                    Verdict::Some => (true, false),
                };
                assert_eq!((plain, release), want, "delete: {ctx}");
            }
        }
    }
}
