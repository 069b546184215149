//! The registry token's claims as GitLab issues them: `aud`, the `access` entries with their
//! `meta`, and the rest of the payload besides the time claims.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `aud` may be one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

/// `meta` of an access entry, as GitLab issues it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    /// The principal's access level number on the project when the token was issued (users
    /// only); protection rules are checked against it at request time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_level: Option<u8>,
}

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaim {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<AccessMeta>,
}

/// The registry token's claims besides `exp`, `nbf` and `iat` (which jwt-compact holds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Audience,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    /// The nested, separately signed `user` JWT (GitLab's `user` claim for registry notifications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Operator-defined extra claims; never one of the names above.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The CI job behind a job token: its id, its pipeline's id and its project. Bundle
/// revocations name jobs by any of the three (`revocations.jobs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub id: u64,
    pub pipeline_id: u64,
    pub project: String,
}
