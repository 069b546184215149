//! Classifying one registry event: which usage metric it counts, and for whom.
//!
//! Every string kept from an event is capped ([`limits`]): the registry copies client input
//! (the `X-Request-Id`, names, tags) into events, and none of it may grow the database
//! beyond a known size per row.
//!
//! Pure: the key set, the time and the tolerance are arguments. The durable part — dedupe on
//! the event id, `create_repository` on the first counted push of a repository, the counters —
//! is [`crate::store`]'s.

use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::user::{verify_user_jwt, UserInfo};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::period;

/// The most bytes kept of each string taken from an event (longer ones are cut at a
/// character boundary; an id is replaced by its digest instead, so dedupe stays exact).
pub mod limits {
    /// `id`: longer ids are stored as `sha256:<hex of the id>` (71 bytes).
    pub const ID: usize = 128;
    pub const ACTION: usize = 32;
    /// `target.repository`: the OCI spec's limit for a name.
    pub const REPOSITORY: usize = 255;
    /// `target.tag`: the OCI spec's limit for a tag.
    pub const TAG: usize = 128;
    /// `target.digest`: room for `sha512:` and 128 hex digits.
    pub const DIGEST: usize = 160;
    /// `target.mediaType`: RFC 6838's 127 + `/` + 127.
    pub const MEDIA_TYPE: usize = 255;
    /// `request.id` (a client's `X-Request-Id` once the filter has rewritten the event).
    pub const REQUEST_ID: usize = 128;
    /// `user_info.username` and `user_info.token_type` of a verified `user` JWT.
    pub const USERNAME: usize = 255;
    pub const TOKEN_TYPE: usize = 32;
    /// The reason an event was ignored or rejected.
    pub const REASON: usize = 512;
}

/// How far after its arrival an event's `timestamp` may lie (registry and consumer clocks).
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 300;

/// Prefix of every usage metric name (GitLab's `EVENT_PREFIX`).
pub const METRIC_PREFIX: &str = "i_container_registry";

/// What a counted event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    PushTag,
    PushRepository,
    DeleteTag,
    DeleteRepository,
    /// Counted, in addition to the push, for the first counted push of a repository.
    CreateRepository,
}

impl Kind {
    pub const ALL: [Kind; 5] =
        [Kind::PushTag, Kind::DeleteTag, Kind::PushRepository, Kind::DeleteRepository, Kind::CreateRepository];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PushTag => "push_tag",
            Kind::PushRepository => "push_repository",
            Kind::DeleteTag => "delete_tag",
            Kind::DeleteRepository => "delete_repository",
            Kind::CreateRepository => "create_repository",
        }
    }

    pub fn is_push(self) -> bool {
        matches!(self, Kind::PushTag | Kind::PushRepository)
    }
}

/// Who a counted event is attributed to: the metric name's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalType {
    /// A user, whatever the credential: `password`, `pat`, `job_token`, or anything else.
    User,
    /// `token_type: deploy_token`.
    DeployToken,
}

impl PrincipalType {
    pub const ALL: [PrincipalType; 2] = [PrincipalType::User, PrincipalType::DeployToken];

    /// `deploy_token` is a deploy token; every other `user_info.token_type` is a user.
    pub fn of(token_type: &str) -> PrincipalType {
        if token_type == "deploy_token" {
            PrincipalType::DeployToken
        } else {
            PrincipalType::User
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalType::User => "user",
            PrincipalType::DeployToken => "deploy_token",
        }
    }
}

/// `i_container_registry_<kind>_<user|deploy_token>`.
pub fn metric_name(kind: Kind, principal: PrincipalType) -> String {
    format!("{METRIC_PREFIX}_{}_{}", kind.as_str(), principal.as_str())
}

/// Every usage metric name, in a fixed order.
pub fn all_metric_names() -> Vec<String> {
    Kind::ALL.iter().flat_map(|k| PrincipalType::ALL.iter().map(move |p| metric_name(*k, *p))).collect()
}

/// The fields of an event kept in its row (all as sent; none of them is trusted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFacts {
    pub id: String,
    pub action: Option<String>,
    pub repository: Option<String>,
    pub tag: Option<String>,
    pub digest: Option<String>,
    pub media_type: Option<String>,
    /// `request.id`: the edge's `X-Request-Id` once the filter has rewritten the event.
    pub request_id: Option<String>,
}

/// What an event amounts to, before dedupe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Usage of `kind` by a verified principal of type `principal`.
    Usage { kind: Kind, principal: PrincipalType },
    /// Seen but not usage: a blob, a pull, a mount, an event without repository.
    Ignored,
    /// A countable event whose `actor.user` failed verification: never usage.
    Rejected,
    /// A countable event without `actor.user`: not usage.
    Unattributed,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Usage { .. } => "counted",
            Outcome::Ignored => "ignored",
            Outcome::Rejected => "rejected",
            Outcome::Unattributed => "unattributed",
        }
    }
}

/// One classified event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub facts: EventFacts,
    /// The verified `user_info`, when `actor.user` verified.
    pub user: Option<UserInfo>,
    pub outcome: Outcome,
    /// Why the event is ignored or rejected (no token material in it).
    pub reason: Option<String>,
    /// Unix seconds the event happened (see [`occurred_at`]): its week and month.
    pub occurred_at: i64,
}

impl Assessment {
    /// The id the unique counts are kept by: the user id for a user, the deploy token's id
    /// for a deploy token; `None` for anything not usage, or a `user_info` without that id.
    pub fn actor_id(&self) -> Option<i64> {
        let (Outcome::Usage { principal, .. }, Some(user)) = (&self.outcome, &self.user) else {
            return None;
        };
        let id = match principal {
            PrincipalType::User => user.user_id,
            PrincipalType::DeployToken => user.deploy_token_id,
        };
        id.and_then(|i| i64::try_from(i).ok())
    }
}

/// An array element that cannot be recorded: not an object, or no string `id` to dedupe on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event #{index}: {reason}")]
pub struct InvalidEvent {
    pub index: usize,
    pub reason: String,
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn capped(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// The id as stored: itself up to [`limits::ID`] bytes, else `sha256:<hex>` of it.
pub fn stored_id(id: &str) -> String {
    if id.len() <= limits::ID {
        return id.to_owned();
    }
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn string_at(value: Option<&Value>, key: &str, max: usize) -> Option<String> {
    value.and_then(|v| v.get(key)).and_then(Value::as_str).filter(|s| !s.is_empty()).map(|s| capped(s, max))
}

/// When the event happened, for the weekly and monthly counts: its `timestamp` (RFC 3339) when
/// that lies between `now - tolerance` (the oldest delivery a `user` JWT survives) and
/// `now + MAX_CLOCK_SKEW_SECONDS`; otherwise `now`, its arrival.
pub fn occurred_at(event: &Value, now: i64, tolerance: i64) -> i64 {
    event
        .get("timestamp")
        .and_then(Value::as_str)
        .and_then(period::parse_rfc3339)
        .filter(|t| *t >= now.saturating_sub(tolerance) && *t <= now.saturating_add(MAX_CLOCK_SKEW_SECONDS))
        .unwrap_or(now)
}

fn capped_user(mut u: UserInfo) -> UserInfo {
    u.username = capped(&u.username, limits::USERNAME);
    u.token_type = capped(&u.token_type, limits::TOKEN_TYPE);
    u
}

/// A manifest or an index (tag list, image index): what GitLab's usage metrics count. Delete events carry
/// no `mediaType` in distribution 2.8, so an event without one is not a blob.
pub fn is_manifest_media_type(media_type: Option<&str>) -> bool {
    media_type.map_or(true, |m| {
        let m = m.to_ascii_lowercase();
        m.contains("manifest") || m.contains("index")
    })
}

/// Classifies event number `index` of an envelope. `now` is unix seconds; a `user` JWT is
/// accepted up to `tolerance` seconds after its `exp`.
pub fn assess(
    index: usize,
    event: &Value,
    keys: &KeySet,
    now: i64,
    tolerance: i64,
) -> Result<Assessment, InvalidEvent> {
    let invalid = |reason: &str| InvalidEvent { index, reason: reason.to_owned() };
    if !event.is_object() {
        return Err(invalid("not a JSON object"));
    }
    let id = event
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(stored_id)
        .ok_or_else(|| invalid("no string `id` to deduplicate on"))?;
    let target = event.get("target");
    let facts = EventFacts {
        id,
        action: string_at(Some(event), "action", limits::ACTION),
        repository: string_at(target, "repository", limits::REPOSITORY),
        tag: string_at(target, "tag", limits::TAG),
        digest: string_at(target, "digest", limits::DIGEST),
        media_type: string_at(target, "mediaType", limits::MEDIA_TYPE),
        request_id: string_at(event.get("request"), "id", limits::REQUEST_ID),
    };
    let verified = match event.get("actor").and_then(|a| a.get("user")) {
        None | Some(Value::Null) => None,
        Some(Value::String(token)) => {
            Some(verify_user_jwt(token, keys, now, tolerance).map_err(|e| format!("actor.user: {e}")))
        }
        Some(_) => Some(Err("actor.user: not a string".to_owned())),
    };
    let kind = match (facts.action.as_deref(), facts.tag.is_some()) {
        (Some("push"), true) => Some(Kind::PushTag),
        (Some("push"), false) => Some(Kind::PushRepository),
        (Some("delete"), true) => Some(Kind::DeleteTag),
        (Some("delete"), false) => Some(Kind::DeleteRepository),
        _ => None,
    };
    let not_counted = if !is_manifest_media_type(facts.media_type.as_deref()) {
        Some(format!("blob event ({})", facts.media_type.as_deref().unwrap_or_default()))
    } else if kind.is_none() {
        Some(format!("action `{}` is not counted", facts.action.as_deref().unwrap_or_default()))
    } else if facts.repository.is_none() {
        Some("no target.repository".to_owned())
    } else {
        None
    };
    let (user, outcome, reason) = match (not_counted, kind, verified) {
        // Not usage whoever did it; a valid `user` still says who, a bad one is noted.
        (Some(why), _, Some(Ok(v))) => (Some(v.user_info), Outcome::Ignored, Some(why)),
        (Some(why), _, Some(Err(e))) => (None, Outcome::Ignored, Some(format!("{why}; {e}"))),
        (Some(why), _, None) => (None, Outcome::Ignored, Some(why)),
        (None, _, None) => (None, Outcome::Unattributed, None),
        (None, _, Some(Err(e))) => (None, Outcome::Rejected, Some(e)),
        (None, None, Some(Ok(v))) => (Some(v.user_info), Outcome::Ignored, None),
        (None, Some(kind), Some(Ok(v))) => {
            let principal = PrincipalType::of(&v.user_info.token_type);
            (Some(v.user_info), Outcome::Usage { kind, principal }, None)
        }
    };
    let user = user.map(capped_user);
    let reason = reason.map(|r| capped(&r, limits::REASON));
    let occurred_at = occurred_at(event, now, tolerance);
    Ok(Assessment { facts, user, outcome, reason, occurred_at })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

    use super::*;
    use registry_guard_core::token::sign::{sign, Validity};
    use registry_guard_core::token::testing::{es256_key, jwks};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn keys() -> KeySet {
        KeySet::from_jwks(&jwks(&[&es256_key(1)])).unwrap()
    }

    fn user_jwt(token_type: &str, expires_at: i64) -> String {
        sign(
            &es256_key(1),
            json!({"jti": "u", "user_info": {"token_type": token_type, "username": "dev", "user_id": 5}}),
            Validity { issued_at: expires_at - 300, not_before: expires_at - 300, expires_at },
        )
        .unwrap()
    }

    fn event(action: &str, media_type: Option<&str>, tag: Option<&str>, user: Option<String>) -> Value {
        let mut e = json!({
            "id": "e1", "action": action,
            "target": {"repository": "acme/web/app", "digest": "sha256:abc"},
            "request": {"id": "rid-1"}, "actor": {"name": "dev"}
        });
        if let Some(m) = media_type {
            e["target"]["mediaType"] = m.into();
        }
        if let Some(t) = tag {
            e["target"]["tag"] = t.into();
        }
        if let Some(u) = user {
            e["actor"]["user"] = u.into();
        }
        e
    }

    const MANIFEST: Option<&str> = Some("application/vnd.oci.image.manifest.v1+json");

    fn outcome(e: &Value) -> Outcome {
        assess(0, e, &keys(), NOW, 60).unwrap().outcome
    }

    #[test]
    fn metric_names_follow_seed_001() {
        assert_eq!(
            metric_name(Kind::PushTag, PrincipalType::DeployToken),
            "i_container_registry_push_tag_deploy_token"
        );
        assert_eq!(metric_name(Kind::DeleteTag, PrincipalType::User), "i_container_registry_delete_tag_user");
        assert_eq!(all_metric_names().len(), 10);
    }

    #[test]
    fn actions_tags_and_principals() {
        let u = || Some(user_jwt("pat", NOW + 60));
        let usage = |kind, principal| Outcome::Usage { kind, principal };
        assert_eq!(outcome(&event("push", MANIFEST, Some("v1"), u())), usage(Kind::PushTag, PrincipalType::User));
        assert_eq!(outcome(&event("push", MANIFEST, None, u())), usage(Kind::PushRepository, PrincipalType::User));
        assert_eq!(outcome(&event("delete", None, Some("v1"), u())), usage(Kind::DeleteTag, PrincipalType::User));
        assert_eq!(outcome(&event("delete", None, None, u())), usage(Kind::DeleteRepository, PrincipalType::User));
        let index = Some("application/vnd.oci.image.index.v1+json");
        let dt = Some(user_jwt("deploy_token", NOW + 60));
        assert_eq!(outcome(&event("push", index, Some("v1"), dt)), usage(Kind::PushTag, PrincipalType::DeployToken));
        for t in ["password", "job_token", "something-new"] {
            let e = event("push", MANIFEST, Some("v1"), Some(user_jwt(t, NOW + 60)));
            assert_eq!(outcome(&e), usage(Kind::PushTag, PrincipalType::User), "{t}");
        }
    }

    #[test]
    fn blobs_pulls_and_mounts_are_ignored_even_when_attributed() {
        let u = || Some(user_jwt("pat", NOW + 60));
        let a = assess(0, &event("push", Some("application/octet-stream"), None, u()), &keys(), NOW, 60).unwrap();
        assert_eq!(a.outcome, Outcome::Ignored);
        assert_eq!(a.user.unwrap().username, "dev");
        assert!(a.reason.unwrap().starts_with("blob event"));
        assert_eq!(outcome(&event("pull", MANIFEST, Some("v1"), u())), Outcome::Ignored);
        assert_eq!(outcome(&event("mount", None, None, u())), Outcome::Ignored);
        // A blob with a bad `user` is still only ignored, the reason says why.
        let a = assess(0, &event("push", Some("application/octet-stream"), None, Some("x".into())), &keys(), NOW, 0)
            .unwrap();
        assert_eq!(a.outcome, Outcome::Ignored);
        assert!(a.reason.unwrap().contains("actor.user: token is not a compact JWS"));
    }

    #[test]
    fn bad_or_missing_users_are_never_usage() {
        assert_eq!(outcome(&event("push", MANIFEST, Some("v1"), None)), Outcome::Unattributed);
        let mut e = event("push", MANIFEST, Some("v1"), None);
        e["actor"]["user"] = json!(42);
        assert_eq!(outcome(&e), Outcome::Rejected);
        // Expired beyond the tolerance, and just within it.
        let late = event("push", MANIFEST, Some("v1"), Some(user_jwt("pat", NOW - 61)));
        let a = assess(0, &late, &keys(), NOW, 60).unwrap();
        assert_eq!(a.outcome, Outcome::Rejected);
        assert!(a.reason.unwrap().contains("expired"), "reason names the check");
        assert!(a.user.is_none());
        let in_time = event("push", MANIFEST, Some("v1"), Some(user_jwt("pat", NOW - 60)));
        assert!(matches!(outcome(&in_time), Outcome::Usage { .. }));
        // Signed by a key we do not trust.
        let stranger = sign(
            &es256_key(2),
            json!({"jti": "x", "user_info": {"token_type": "pat", "username": "root", "user_id": 1}}),
            Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 60 },
        )
        .unwrap();
        assert_eq!(outcome(&event("push", MANIFEST, Some("v1"), Some(stranger))), Outcome::Rejected);
    }

    #[test]
    fn events_without_an_id_are_invalid() {
        assert!(assess(3, &json!("x"), &keys(), NOW, 0).unwrap_err().to_string().starts_with("event #3: "));
        let mut e = event("push", MANIFEST, None, None);
        e["id"] = json!(7);
        assert!(assess(0, &e, &keys(), NOW, 0).is_err());
    }

    #[test]
    fn facts_are_copied() {
        let a = assess(0, &event("push", MANIFEST, Some("v1"), None), &keys(), NOW, 0).unwrap();
        assert_eq!(
            a.facts,
            EventFacts {
                id: "e1".into(),
                action: Some("push".into()),
                repository: Some("acme/web/app".into()),
                tag: Some("v1".into()),
                digest: Some("sha256:abc".into()),
                media_type: MANIFEST.map(str::to_owned),
                request_id: Some("rid-1".into()),
            }
        );
    }

    #[test]
    fn stored_strings_are_capped_and_long_ids_digested() {
        let mut e = event("push", MANIFEST, Some(&"t".repeat(5000)), Some(user_jwt("pat", NOW + 60)));
        e["id"] = json!("i".repeat(100_000));
        e["request"]["id"] = json!("r".repeat(60_000));
        e["target"]["repository"] = json!("é".repeat(1000));
        e["action"] = json!("push");
        let a = assess(0, &e, &keys(), NOW, 60).unwrap();
        assert_eq!(a.facts.id, stored_id(&"i".repeat(100_000)));
        assert!(a.facts.id.starts_with("sha256:") && a.facts.id.len() == 71, "{}", a.facts.id);
        assert_ne!(stored_id(&"i".repeat(129)), stored_id(&"i".repeat(130)), "dedupe stays exact");
        assert_eq!(stored_id("short-id"), "short-id");
        assert_eq!(a.facts.request_id.unwrap().len(), limits::REQUEST_ID);
        assert_eq!(a.facts.tag.unwrap().len(), limits::TAG);
        let repository = a.facts.repository.unwrap();
        assert!(
            repository.len() <= limits::REPOSITORY && repository.chars().all(|c| c == 'é'),
            "cut at a char boundary"
        );
        // A hostile action name ends up in the reason: capped too.
        let mut e = event("x", MANIFEST, None, None);
        e["action"] = json!("a".repeat(10_000));
        let a = assess(0, &e, &keys(), NOW, 60).unwrap();
        assert_eq!(a.facts.action.unwrap().len(), limits::ACTION);
        assert!(a.reason.unwrap().len() <= limits::REASON);
    }

    #[test]
    fn the_event_timestamp_places_it_in_a_period_within_the_tolerance() {
        let at = |ts: &str| {
            let mut e = event("push", MANIFEST, Some("v1"), Some(user_jwt("pat", NOW + 60)));
            e["timestamp"] = json!(ts);
            assess(0, &e, &keys(), NOW, 3600).unwrap().occurred_at
        };
        let iso = |t: i64| chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
        assert_eq!(at(&iso(NOW - 3600)), NOW - 3600, "a late delivery keeps its time");
        assert_eq!(at(&iso(NOW + 300)), NOW + 300, "clock skew");
        assert_eq!(at(&iso(NOW - 3601)), NOW, "older than the tolerance: its arrival");
        assert_eq!(at(&iso(NOW + 301)), NOW, "from the future: its arrival");
        assert_eq!(at("not a time"), NOW);
        let mut e = event("push", MANIFEST, Some("v1"), None);
        e.as_object_mut().unwrap().remove("timestamp");
        assert_eq!(assess(0, &e, &keys(), NOW, 3600).unwrap().occurred_at, NOW);
    }

    #[test]
    fn the_actor_is_the_user_id_or_the_deploy_token_id() {
        let a = assess(0, &event("push", MANIFEST, Some("v1"), Some(user_jwt("pat", NOW + 60))), &keys(), NOW, 60);
        assert_eq!(a.unwrap().actor_id(), Some(5));
        let dt = sign(
            &es256_key(1),
            json!({"jti": "d", "user_info": {"token_type": "deploy_token", "username": "ci", "deploy_token_id": 9}}),
            Validity { issued_at: NOW - 300, not_before: NOW - 300, expires_at: NOW + 60 },
        )
        .unwrap();
        let a = assess(0, &event("push", MANIFEST, Some("v1"), Some(dt)), &keys(), NOW, 60).unwrap();
        assert_eq!(a.actor_id(), Some(9));
        let blob = assess(
            0,
            &event("push", Some("application/octet-stream"), None, Some(user_jwt("pat", NOW + 60))),
            &keys(),
            NOW,
            60,
        );
        assert_eq!(blob.unwrap().actor_id(), None, "not usage: no actor");
    }
}
