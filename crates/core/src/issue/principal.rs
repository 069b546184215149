//! Who a request is made as, and the token the token service would issue them: a user of
//! the principals file or a deploy token of the bundle, with its grants ([`crate::issue::grant`])
//! as the claims of a verified token. `rgctl explain` and the access review judge that token
//! with the one decision function, so they cannot drift from what the token service issues.

use crate::issue::grant::Grant;
use crate::issue::job::Job;
use crate::policy::bundle::Policy;
use crate::policy::deploy::DeployToken;
use crate::policy::directory::{Directory, User};
use crate::request::scope::{Resource, Scope};
use crate::token::claims::JobRef;
use crate::token::verify::VerifiedToken;

/// Who a request is made as: a user of the principals file or a deploy token of the bundle.
#[derive(Debug, Clone, Copy)]
pub enum Principal<'a> {
    User(&'a User),
    DeployToken(&'a DeployToken),
    /// A CI job's job token: the user who triggered the job, acting through the job.
    Job(&'a User, &'a Job),
}

impl Principal<'_> {
    pub fn name(&self) -> &str {
        match self {
            Principal::User(u) | Principal::Job(u, _) => &u.username,
            Principal::DeployToken(t) => &t.username,
        }
    }
}

/// The user or deploy token named `name` (a deploy token by its username, e.g. `acme-ci` or
/// `deploy-token-2`). A name that is both is refused: which one a login reaches depends on
/// the secret presented.
pub fn principal<'a>(directory: &'a Directory, policy: &'a Policy, name: &str) -> Result<Principal<'a>, String> {
    match (directory.user(name), policy.credentials.by_username(name)) {
        (Some(_), Some(_)) => {
            Err(format!("`{name}` is both a user in the principals and a deploy token in the bundle: rename one"))
        }
        (Some(u), None) => Ok(Principal::User(u)),
        (None, Some(t)) => Ok(Principal::DeployToken(t)),
        (None, None) => Err(format!("no user and no deploy token `{name}` (principals, bundle `deploy_tokens`)")),
    }
}

/// The token the token service would issue to `principal` for `scopes`, with the grant
/// functions it uses (`Directory::grant_under` for users, `Directory::deploy_grant` for
/// deploy tokens), issued at `now`, and its notes on withheld actions. It is minted whether or not the
/// principal may log in at all (revoked users, expired or revoked deploy tokens): the
/// decision function refuses those, with the reason.
pub fn issued_token(
    directory: &Directory,
    policy: &Policy,
    principal: Principal<'_>,
    scopes: &[Scope],
    now: i64,
) -> (VerifiedToken, Vec<String>) {
    let (grants, notes, auth_type, deploy_token_id, job): (Vec<Grant>, _, _, _, _) = match principal {
        Principal::User(user) => {
            let (grants, notes) = directory.grant_under(policy, user, scopes);
            (grants, notes, "password", None, None)
        }
        Principal::DeployToken(t) => (directory.deploy_grant(t, scopes), Vec::new(), "deploy_token", Some(t.id), None),
        Principal::Job(user, job) => {
            let (grants, notes) = directory.job_grant(policy, user, &job.project, scopes);
            let job_ref = JobRef { id: job.id, pipeline_id: job.pipeline_id, project: job.project.clone() };
            (grants, notes, "job_token", None, Some(job_ref))
        }
    };
    let token = VerifiedToken {
        kid: String::new(),
        subject: principal.name().to_owned(),
        jti: String::new(),
        auth_type: Some(auth_type.into()),
        user: None,
        expires_at: i64::MAX,
        not_before: None,
        issued_at: Some(now),
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
        deploy_token_id,
        job,
    };
    (token, notes)
}
