//! CI jobs as principals (GitLab's CI job token and `CI_JOB_JWT`): who may run a job in a
//! project, what a job token grants, and the claims of a job ID token.
//!
//! - **Running a job** needs developer or above on the job's project (or admin), as pushing
//!   does: a job acts as the user who triggered it.
//! - **Job token grants**: the triggering user's grants under the policy
//!   ([`Directory::grant_under`]), kept on the job's own project (pull, push; never delete)
//!   and, pull only, on projects whose `job_token_allowlist` names the job's project.
//!   Anything else (other projects, the catalog, the dependency proxy) is granted nothing.
//!   Tokens carry the user's access level, so protection rules apply to the person behind
//!   the job.
//! - **Job claims** (seed 004): a job may add claims; it may change an operator claim only
//!   when the nearest level setting it marked it `mutable: true`; it may never set a
//!   built-in claim of the job ID token ([`JOB_ID_TOKEN_BUILT_IN`]), `aud` included (the
//!   audience is a field of the registration). A violation refuses the registration: the
//!   job fails.

use serde::{Deserialize, Serialize};

use crate::issue::grant::Grant;
use crate::policy::bundle::Policy;
use crate::policy::claims::{ClaimMap, Claims, MAX_CLAIMS_PER_LEVEL, MAX_CLAIM_NAME_LEN, MAX_CLAIM_VALUE_BYTES};
use crate::policy::directory::{Directory, User};
use crate::request::access::{AccessLevel, Action, ActionSet};
use crate::request::scope::{Resource, Scope};

/// Claims of a job ID token the token service always sets itself; neither an operator
/// level nor a job can set them (an operator claim of one of these names is left out of job
/// ID tokens, a job claim is refused).
pub const JOB_ID_TOKEN_BUILT_IN: [&str; 18] = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "namespace_id",
    "namespace_path",
    "project_id",
    "project_path",
    "user_id",
    "user_login",
    "pipeline_id",
    "job_id",
    "ref",
    "ref_type",
    "ref_protected",
];

/// The level needed to run jobs in a project.
pub const JOB_LEVEL: AccessLevel = AccessLevel::Developer;

/// Whether the job's ref is a branch or a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefType {
    Branch,
    Tag,
}

impl RefType {
    pub fn as_str(self) -> &'static str {
        match self {
            RefType::Branch => "branch",
            RefType::Tag => "tag",
        }
    }
}

/// A registered CI job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub pipeline_id: u64,
    /// The project path (`acme/web`).
    pub project: String,
    /// The username of the user who triggered the job.
    pub user: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub ref_type: RefType,
    pub ref_protected: bool,
}

/// Why a job may not be registered: the level (``project `acme/web` ``, ``group `acme` ``,
/// `job`), the claim when one is at fault, the rule, and a sentence naming all three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobRefusal {
    pub level: String,
    pub claim: Option<String>,
    /// `built_in_claim`, `immutable_claim`, `invalid_claim`, `not_a_project`, `may_not_run_jobs`.
    pub rule: &'static str,
    pub message: String,
}

fn refusal(level: impl Into<String>, claim: Option<&str>, rule: &'static str, message: String) -> JobRefusal {
    JobRefusal { level: level.into(), claim: claim.map(str::to_owned), rule, message }
}

/// Whether `user` may run jobs in project `project`: it must be a project of the directory
/// and the user developer or above on it (or admin).
pub fn may_run_jobs(directory: &Directory, user: &User, project: &str) -> Result<(), JobRefusal> {
    if directory.project(project).is_none() {
        return Err(refusal(
            format!("project `{project}`"),
            None,
            "not_a_project",
            format!("`{project}` is not a project of the principals file: jobs run in projects"),
        ));
    }
    let level = directory.effective_level(user, project);
    if user.admin || level >= JOB_LEVEL {
        return Ok(());
    }
    Err(refusal(
        format!("project `{project}`"),
        None,
        "may_not_run_jobs",
        format!(
            "user `{}` may not run jobs in project `{project}`: running a job needs {} or above, `{}` has {} ({})",
            user.username,
            JOB_LEVEL.name(),
            user.username,
            level.name(),
            level.number()
        ),
    ))
}

/// The claims a job's ID token gets besides its built-ins: the operator claims inherited
/// down `project`'s hierarchy, then the job's own `requested` claims under the mutability
/// rules. Operator claims named like a built-in are left out.
pub fn job_claims(claims: &Claims, project: &str, requested: &ClaimMap) -> Result<ClaimMap, JobRefusal> {
    let inherited = claims.resolved(project);
    if requested.len() > MAX_CLAIMS_PER_LEVEL {
        return Err(refusal("job", None, "invalid_claim", format!("job: more than {MAX_CLAIMS_PER_LEVEL} job claims")));
    }
    for (name, value) in requested {
        if JOB_ID_TOKEN_BUILT_IN.contains(&name.as_str()) {
            let hint = if name == "aud" { " (give the audience as the registration's `aud`)" } else { "" };
            return Err(refusal(
                "built-in",
                Some(name),
                "built_in_claim",
                format!(
                    "job claim `{name}` is a built-in claim of the job ID token: a job may never set or change it{hint}"
                ),
            ));
        }
        if name.is_empty()
            || name.len() > MAX_CLAIM_NAME_LEN
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(refusal(
                "job",
                Some(name),
                "invalid_claim",
                format!("job claim name `{name}` must be 1-{MAX_CLAIM_NAME_LEN} printable ASCII characters without quotes or backslashes"),
            ));
        }
        let size = serde_json::to_string(value).map_or(usize::MAX, |s| s.len());
        if value.is_null() || size > MAX_CLAIM_VALUE_BYTES {
            return Err(refusal(
                "job",
                Some(name),
                "invalid_claim",
                format!(
                    "job claim `{name}` must have a non-null value of at most {MAX_CLAIM_VALUE_BYTES} bytes of JSON"
                ),
            ));
        }
        if let Some(set) = inherited.get(name) {
            if !set.mutable {
                let same = if &set.value == value { " (even to the same value)" } else { "" };
                return Err(refusal(
                    set.level.clone(),
                    Some(name),
                    "immutable_claim",
                    format!(
                        "job claim `{name}` is immutable: {} sets it with `mutable: false` (the default), so a job may not change or redefine it{same}",
                        set.level
                    ),
                ));
            }
        }
    }
    let mut merged: ClaimMap = inherited
        .into_iter()
        .filter(|(name, _)| !JOB_ID_TOKEN_BUILT_IN.contains(&name.as_str()))
        .map(|(name, c)| (name, c.value))
        .collect();
    merged.extend(requested.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(merged)
}

/// The built-in claims of a job's ID token besides `iss`, `aud`, `exp`, `nbf`, `iat` and
/// `jti` (which the signer sets): GitLab's `sub` (`project_path:<p>:ref_type:<t>:ref:<r>`),
/// namespace and project ids (when the principals file gives them) and paths, the user,
/// the pipeline and job ids and the ref.
pub fn job_id_token_built_ins(directory: &Directory, job: &Job, user: &User) -> ClaimMap {
    let namespace = job.project.rsplit_once('/').map_or(job.project.as_str(), |(ns, _)| ns);
    let mut c = ClaimMap::new();
    c.insert(
        "sub".into(),
        format!("project_path:{}:ref_type:{}:ref:{}", job.project, job.ref_type.as_str(), job.ref_name).into(),
    );
    if let Some(id) = directory.group_id(namespace) {
        c.insert("namespace_id".into(), id.to_string().into());
    }
    c.insert("namespace_path".into(), namespace.into());
    if let Some(id) = directory.project(&job.project).and_then(|p| p.id) {
        c.insert("project_id".into(), id.to_string().into());
    }
    c.insert("project_path".into(), job.project.clone().into());
    c.insert("user_id".into(), user.id.to_string().into());
    c.insert("user_login".into(), user.username.clone().into());
    c.insert("pipeline_id".into(), job.pipeline_id.to_string().into());
    c.insert("job_id".into(), job.id.to_string().into());
    c.insert("ref".into(), job.ref_name.clone().into());
    c.insert("ref_type".into(), job.ref_type.as_str().into());
    c.insert("ref_protected".into(), job.ref_protected.to_string().into());
    c
}

impl Directory {
    /// Grants of a job token of a job in `job_project` triggered by `user`: the user's
    /// grants under the policy, kept on `job_project` (pull, push) and, pull only, on
    /// projects whose job token allowlist names `job_project`. Returns the grants and the
    /// notes of [`Directory::grant_under`] plus one per scope dropped for the job.
    pub fn job_grant(
        &self,
        policy: &Policy,
        user: &User,
        job_project: &str,
        requested: &[Scope],
    ) -> (Vec<Grant>, Vec<String>) {
        let (grants, mut notes) = self.grant_under(policy, user, requested);
        let mut kept = Vec::new();
        for mut g in grants {
            let Resource::Repository(repo) = &g.scope.resource else {
                notes.push(format!("`{}` withheld: job tokens reach repositories only", g.scope));
                continue;
            };
            let project = g.project_path.clone().filter(|_| self.project_of(repo).is_some());
            let allowed = match project.as_deref() {
                Some(p) if p == job_project => ActionSet::of(&[Action::Pull, Action::Push]),
                Some(p) if self.project(p).is_some_and(|p| p.job_token_allowlist.iter().any(|a| a == job_project)) => {
                    ActionSet::of(&[Action::Pull])
                }
                _ => ActionSet::EMPTY,
            };
            let actions = g.scope.actions.intersect(allowed);
            if actions != g.scope.actions {
                let dropped =
                    g.scope.actions.iter().filter(|a| !actions.contains(*a)).fold(ActionSet::EMPTY, ActionSet::with);
                notes.push(format!(
                    "{dropped} on `{repo}` withheld: a job token of project `{job_project}` reaches {}",
                    match project.as_deref() {
                        Some(p) if p == job_project => "its own project with pull and push only".to_owned(),
                        Some(p) => format!("`{p}` with pull only, and only if `{p}` allowlists `{job_project}`"),
                        None => "projects only".to_owned(),
                    }
                ));
            }
            g.scope.actions = actions;
            if !actions.is_empty() {
                kept.push(g);
            }
        }
        (kept, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::claims::JobRef;
    use serde_json::json;

    const PRINCIPALS: &str = include_str!("../../../../policies/example/principals.json");
    const BUNDLE: &str = include_str!("../../../../policies/example/bundle.json");

    fn world() -> (Directory, Policy) {
        (Directory::from_json(PRINCIPALS).unwrap(), Policy::from_json(BUNDLE).unwrap())
    }

    fn granted(dir: &Directory, policy: &Policy, user: &str, project: &str, scopes: &str) -> Vec<String> {
        let user = dir.user(user).unwrap();
        let (grants, _) = dir.job_grant(policy, user, project, &Scope::parse_all([scopes]).unwrap());
        grants.iter().map(|g| g.scope.to_string()).collect()
    }

    #[test]
    fn only_developers_and_above_run_jobs_in_projects() {
        let (dir, _) = world();
        for user in ["mia", "dev", "alice", "root"] {
            assert!(may_run_jobs(&dir, dir.user(user).unwrap(), "acme/web").is_ok(), "{user}");
        }
        let e = may_run_jobs(&dir, dir.user("rita").unwrap(), "acme/web").unwrap_err();
        assert_eq!((e.rule, e.level.as_str()), ("may_not_run_jobs", "project `acme/web`"));
        assert!(e.message.contains("needs developer or above, `rita` has reporter (20)"), "{e}");
        let e = may_run_jobs(&dir, dir.user("dev").unwrap(), "acme/platform/api").unwrap_err();
        assert!(e.message.contains("`dev` has no_access (0)"), "{e}");
        let e = may_run_jobs(&dir, dir.user("alice").unwrap(), "acme").unwrap_err();
        assert_eq!(e.rule, "not_a_project");
    }

    #[test]
    fn job_tokens_reach_the_own_project_and_allowlisting_projects_only() {
        let (dir, policy) = world();
        // Own project: the user's pull and push, never delete (mia could delete).
        assert_eq!(
            granted(&dir, &policy, "mia", "acme/web", "repository:acme/web/app:pull,push,delete"),
            ["repository:acme/web/app:pull,push"]
        );
        // Limited by the user: rita (reporter) would get pull only, dev push too.
        assert_eq!(
            granted(&dir, &policy, "dev", "acme/web", "repository:acme/web/app:pull,push"),
            ["repository:acme/web/app:pull,push"]
        );
        // Another project the user may push to: nothing (alice owns acme).
        assert!(granted(&dir, &policy, "alice", "acme/web", "repository:acme/platform/api:pull,push").is_empty());
        // A project that allowlists the job's project: pull only, even for olga's developer
        // rights there... (olga is no member of acme; alice pulls the public project).
        assert_eq!(
            granted(&dir, &policy, "alice", "acme/web", "repository:other/tools/x:pull,push"),
            ["repository:other/tools/x:pull"]
        );
        // Allowlisting is per job project: a job of acme/platform/api gets nothing there.
        assert!(granted(&dir, &policy, "alice", "acme/platform/api", "repository:other/tools/x:pull").is_empty());
        // The user's permissions still bound it: gus (guest) runs no jobs, and a job grants
        // no more than the user has.
        assert!(granted(&dir, &policy, "gus", "acme/web", "repository:acme/web/app:pull,push").is_empty());
        // No catalog, no dependency proxy, no repository outside projects.
        assert!(granted(&dir, &policy, "root", "acme/web", "registry:catalog:*").is_empty());
        assert!(granted(&dir, &policy, "mia", "acme/web", "repository:acme/dependency_proxy/containers/alpine:pull")
            .is_empty());
        assert!(granted(&dir, &policy, "root", "acme/web", "repository:acme/rogue:pull").is_empty());
    }

    #[test]
    fn job_tokens_carry_the_users_level_so_protection_rules_apply() {
        use crate::decide::config::ChallengeConfig;
        use crate::decide::decision::{decide, Credential};
        use crate::issue::principal::{issued_token, Principal};
        use crate::request::route::classify;
        let (dir, policy) = world();
        let challenge =
            ChallengeConfig { realm: "http://127.0.0.1:5001/jwt/auth".into(), service: "container_registry".into() };
        let job = |user: &str| Job {
            id: 7,
            pipeline_id: 3,
            project: "acme/web".into(),
            user: user.into(),
            ref_name: "v1".into(),
            ref_type: RefType::Tag,
            ref_protected: true,
        };
        for (user, status) in [("mia", 0), ("dev", 403)] {
            let job = job(user);
            let u = dir.user(user).unwrap();
            let route = classify("PUT", "/v2/acme/web/app/manifests/v1", None).unwrap();
            let (token, _) = issued_token(&dir, &policy, Principal::Job(u, &job), &route.scopes, 0);
            assert_eq!(token.auth_type.as_deref(), Some("job_token"));
            assert_eq!(token.job, Some(JobRef { id: 7, pipeline_id: 3, project: "acme/web".into() }));
            let d = decide(Ok(&route), Credential::Valid(&token), &challenge, &policy, 0);
            match d {
                crate::decide::decision::Decision::Allow { .. } => assert_eq!(status, 0, "{user}"),
                crate::decide::decision::Decision::Deny(denial) => {
                    assert_eq!(denial.status, status, "{user}: {denial:?}");
                    assert_eq!(denial.rule.as_deref(), Some("web-release-tags"));
                }
            }
        }
    }

    #[test]
    fn bundle_revocations_of_jobs_reach_their_tokens() {
        use crate::decide::config::ChallengeConfig;
        use crate::decide::decision::{decide, Credential, Decision};
        use crate::issue::principal::{issued_token, Principal};
        use crate::request::route::classify;
        let dir = Directory::from_json(PRINCIPALS).unwrap();
        let challenge =
            ChallengeConfig { realm: "http://127.0.0.1:5001/jwt/auth".into(), service: "container_registry".into() };
        let job = Job {
            id: 7,
            pipeline_id: 3,
            project: "acme/web".into(),
            user: "dev".into(),
            ref_name: "main".into(),
            ref_type: RefType::Branch,
            ref_protected: false,
        };
        let dev = dir.user("dev").unwrap();
        let route = classify("GET", "/v2/acme/web/app/manifests/dev-1", None).unwrap();
        let with = |jobs: serde_json::Value| {
            let policy = Policy::from_json(&json!({"revision": 2, "revocations": {"jobs": jobs}}).to_string()).unwrap();
            let (token, _) = issued_token(&dir, &policy, Principal::Job(dev, &job), &route.scopes, 0);
            decide(Ok(&route), Credential::Valid(&token), &challenge, &policy, 0)
        };
        assert!(with(json!({})).is_allow());
        assert!(with(json!({"ids": [8], "pipelines": [4], "projects": ["acme/platform", "acme/we"]})).is_allow());
        for (jobs, why) in [
            (json!({"ids": [7]}), "job 7 is revoked"),
            (json!({"pipelines": [3]}), "pipeline 3 (of job 7) is revoked"),
            (json!({"projects": ["acme/web"]}), "jobs of `acme/web` are revoked"),
            (json!({"projects": ["acme"]}), "jobs of `acme` are revoked"),
        ] {
            let Decision::Deny(d) = with(jobs.clone()) else { panic!("{jobs}: allowed") };
            assert_eq!(d.status, 401, "{jobs}");
            assert!(d.reason.contains(why), "{jobs}: {}", d.reason);
        }
        // A job token that names no job is refused whatever the bundle.
        let policy = Policy::from_json(r#"{"revision": 1}"#).unwrap();
        let (mut token, _) = issued_token(&dir, &policy, Principal::Job(dev, &job), &route.scopes, 0);
        token.job = None;
        assert!(!decide(Ok(&route), Credential::Valid(&token), &challenge, &policy, 0).is_allow());
        // Bad project paths in the bundle are refused with their path.
        let e = Policy::from_json(r#"{"revision": 1, "revocations": {"jobs": {"projects": ["Acme"]}}}"#).unwrap_err();
        assert_eq!(e.path, "$.revocations.jobs.projects[0]");
    }

    fn claims_of(project: &str, job: serde_json::Value) -> Result<serde_json::Value, JobRefusal> {
        let (_, policy) = world();
        let requested: ClaimMap = serde_json::from_value(job).unwrap();
        job_claims(&policy.claims, project, &requested).map(|c| serde_json::to_value(c).unwrap())
    }

    /// Seed 004: inherited operator claims, job claims added, mutable ones changed.
    #[test]
    fn job_claims_merge_with_operator_claims() {
        assert_eq!(
            claims_of("acme/web", json!({})).unwrap(),
            json!({"tenant": "acme", "cost_center": "cc-2040",
                   "aws_role_arn": "arn:aws:iam::123456789012:role/acme-web-deploy"})
        );
        assert_eq!(claims_of("acme/web", json!({"deploy_env": "prod"})).unwrap()["deploy_env"], json!("prod"));
        // `cost_center` is mutable at group `acme`, and acme/platform/api does not redefine it.
        let c = claims_of("acme/platform/api", json!({"cost_center": "cc-job"})).unwrap();
        assert_eq!(c["cost_center"], json!("cc-job"));
        assert_eq!(c["tenant"], json!("acme"));
        assert_eq!(c["k8s_deployer"], json!("platform-prod"));
        assert_eq!(claims_of("other/tools", json!({"x": 1})).unwrap(), json!({"x": 1}));
    }

    /// Seed 004: a job may not change an immutable claim (the nearest level decides), nor
    /// any built-in; the refusal names the level, the claim and the rule.
    #[test]
    fn job_claims_break_no_mutability_rule() {
        for (project, claim, level) in [
            ("acme/web", "tenant", "group `acme`"),
            ("acme/web", "cost_center", "project `acme/web`"), // re-locked by the project
            ("acme/web", "aws_role_arn", "project `acme/web`"),
            ("acme/platform/api", "k8s_deployer", "subgroup `acme/platform`"),
        ] {
            for value in [json!("other"), json!("acme"), json!("cc-2040"), json!("platform-prod")] {
                let e = claims_of(project, json!({ claim: value })).unwrap_err();
                assert_eq!((e.rule, e.level.as_str(), e.claim.as_deref()), ("immutable_claim", level, Some(claim)));
                assert!(e.message.contains(&format!("job claim `{claim}` is immutable: {level} sets it")), "{e}");
            }
        }
        for name in JOB_ID_TOKEN_BUILT_IN {
            for project in ["acme/web", "other/tools"] {
                let e = claims_of(project, json!({ name: "x" })).unwrap_err();
                assert_eq!((e.rule, e.claim.as_deref()), ("built_in_claim", Some(name)), "{name}");
                assert!(e.message.contains("built-in claim of the job ID token"), "{e}");
            }
        }
        let e = claims_of("acme/web", json!({"aud": "sts.amazonaws.com"})).unwrap_err();
        assert!(e.message.contains("registration's `aud`"), "{e}");
        for bad in [json!({"a b": 1}), json!({"x": null}), json!({"x": "a".repeat(3000)})] {
            assert_eq!(claims_of("acme/web", bad.clone()).unwrap_err().rule, "invalid_claim", "{bad}");
        }
    }

    #[test]
    fn id_token_built_ins_name_the_job() {
        let (dir, _) = world();
        let job = Job {
            id: 7,
            pipeline_id: 3,
            project: "acme/web".into(),
            user: "mia".into(),
            ref_name: "v1".into(),
            ref_type: RefType::Tag,
            ref_protected: true,
        };
        let c = job_id_token_built_ins(&dir, &job, dir.user("mia").unwrap());
        assert_eq!(
            serde_json::to_value(c).unwrap(),
            json!({"sub": "project_path:acme/web:ref_type:tag:ref:v1", "namespace_id": "10",
                   "namespace_path": "acme", "project_id": "100", "project_path": "acme/web",
                   "user_id": "3", "user_login": "mia", "pipeline_id": "3", "job_id": "7",
                   "ref": "v1", "ref_type": "tag", "ref_protected": "true"})
        );
    }
}
