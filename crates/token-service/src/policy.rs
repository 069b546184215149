//! The active policy bundle: what token requests decide under, and how an operator replaces it
//! (`PUT /bundle`).
//!
//! The policy is held as an `Arc<Policy>` behind a lock that is only ever held to clone or
//! replace that `Arc`, so a token request takes one snapshot and is decided entirely under
//! one revision, and a new bundle becomes visible to the next request at once. Updates are
//! serialised: verify (on a blocking thread), check the revision, persist the JWS (temporary
//! file + rename), then swap. The file on disk therefore always holds the last accepted
//! bundle, and a restart comes back with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use registry_guard_core::policy::bundle::{self, BundleError, Policy};
use registry_guard_core::token::jwks::KeySet;
use serde::Serialize;

/// Largest accepted `PUT /bundle` body: 32 MiB. A bundle of 100 000 protection rules is
/// some 20 MB of JWS; the example bundle is 3 KB.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

/// A refused bundle push, as `GET /bundle/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The revision the refused bundle claims, read without verifying it (best effort).
    pub revision: Option<u64>,
    /// JSON path of the offending field, or `signature`.
    pub path: String,
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// Why a push was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushError {
    /// No `bundle_keys` configured: no bundle can be verified (409).
    KeysNotConfigured { reason: String, active_revision: u64 },
    /// Signature or content invalid (400).
    Rejected { path: String, reason: String, active_revision: u64 },
    /// Older than the active revision, or the active revision with other content (409).
    Rollback { path: String, reason: String, active_revision: u64 },
    /// Our fault (the bundle could not be written to disk, or verification crashed); the
    /// old policy stays (500).
    Internal { reason: String, active_revision: u64 },
}

/// A push that took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub previous_revision: u64,
    pub revision: u64,
    pub rules: usize,
    /// The pushed bundle is byte for byte the active one: nothing changed.
    pub unchanged: bool,
}

#[derive(Debug)]
struct Active {
    policy: Arc<Policy>,
    /// SHA-256 (hex) of the active JWS text; `None` for the built-in empty policy.
    sha256: Option<String>,
    /// The active JWS text (trimmed), as `GET /bundle` serves it.
    jws: Option<Arc<str>>,
    /// Unix seconds; `None` for the built-in empty policy.
    activated_at: Option<i64>,
}

/// The active bundle as `GET /bundle` serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub jws: Arc<str>,
    /// `"sha256:<hex of the JWS>"`, quoted as an HTTP entity tag.
    pub etag: String,
    pub revision: u64,
}

/// The entity tag of a bundle's JWS text.
pub fn etag_of(sha256_hex: &str) -> String {
    format!("\"sha256:{sha256_hex}\"")
}

/// `GET /bundle/status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    pub active_revision: u64,
    pub rules: usize,
    pub activated_at: Option<String>,
    /// The entity tag `GET /bundle` serves the active bundle under.
    pub etag: Option<String>,
    pub last_rejected: Option<RejectionView>,
    /// Present when this service follows another for its bundle (`bundle_source`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceStatus>,
}

/// How following the bundle source goes (`GET /bundle/status`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SourceStatus {
    pub url: String,
    /// Fetches by result: `changed` (a new bundle, activated), `not_modified`, `refused` (the
    /// fetched bundle was not activated), `failed` (no answer, or an unexpected one).
    pub fetches: BTreeMap<&'static str, u64>,
    /// The last fetch that reached the source and was answered as expected (RFC 3339).
    pub last_success_at: Option<String>,
    /// Seconds since then, at the time of the status request.
    pub seconds_since_success: Option<i64>,
    pub consecutive_failures: u64,
    pub last_error: Option<String>,
    /// Seconds until the next fetch, as last scheduled (backoff shows here).
    pub next_fetch_in_seconds: Option<u64>,
    #[serde(skip)]
    pub last_success_unix: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RejectionView {
    pub revision: Option<u64>,
    pub path: String,
    pub reason: String,
    pub at: String,
}

/// The active policy, the operator keys that may replace it and where it is persisted.
#[derive(Debug)]
pub struct PolicyStore {
    keys: Option<Arc<KeySet>>,
    /// The deployment bundles must name.
    environment: Option<String>,
    path: PathBuf,
    active: RwLock<Active>,
    last_rejected: Mutex<Option<Rejection>>,
    /// Serialises pushes: verify, compare, persist and swap happen one bundle at a time.
    update: tokio::sync::Mutex<()>,
    /// Bumped on every activation: what `GET /bundle` long polls wait on.
    changes: tokio::sync::watch::Sender<u64>,
    /// Following a bundle source, when configured.
    source: Mutex<Option<SourceStatus>>,
}

impl PolicyStore {
    /// `active` is the policy found at startup with its JWS text (trimmed) and when it became
    /// active, `None` for the default (empty) policy.
    pub fn new(
        policy: Policy,
        active: Option<(String, i64)>,
        keys: Option<KeySet>,
        environment: Option<String>,
        path: PathBuf,
    ) -> PolicyStore {
        let (jws, activated_at) = active.map_or((None, None), |(text, t)| (Some(text), Some(t)));
        let sha256 = jws.as_deref().map(crate::auth::sha256_hex);
        PolicyStore {
            keys: keys.map(Arc::new),
            environment,
            path,
            active: RwLock::new(Active { policy: Arc::new(policy), sha256, jws: jws.map(Arc::from), activated_at }),
            last_rejected: Mutex::new(None),
            update: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
            source: Mutex::new(None),
        }
    }

    /// The active bundle as served to the fleet; `None` while only the built-in empty policy
    /// is active (nothing was ever pushed).
    pub fn published(&self) -> Option<Published> {
        let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
        let (jws, sha256) = (active.jws.as_ref()?, active.sha256.as_deref()?);
        Some(Published { jws: Arc::clone(jws), etag: etag_of(sha256), revision: active.policy.revision })
    }

    /// Ends every waiting long poll now (they answer 304): the server is shutting down and
    /// must not wait for them.
    pub fn release_waiters(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every later activation (long polling).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records how following the bundle source goes (see `follow`).
    pub fn update_source(&self, update: impl FnOnce(&mut SourceStatus)) {
        let mut source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        update(source.get_or_insert_with(SourceStatus::default));
    }

    /// The policy to decide one request with.
    pub fn snapshot(&self) -> Arc<Policy> {
        Arc::clone(&self.active.read().unwrap_or_else(PoisonError::into_inner).policy)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> Status {
        let (revision, rules, activated_at, etag) = {
            let active = self.active.read().unwrap_or_else(PoisonError::into_inner);
            (
                active.policy.revision,
                active.policy.rules.len(),
                active.activated_at,
                active.sha256.as_deref().map(etag_of),
            )
        };
        let last_rejected = self.last_rejected.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner).clone().map(|mut s| {
            s.seconds_since_success = s.last_success_unix.map(|t| (crate::routes::now_unix() - t).max(0));
            s
        });
        Status {
            active_revision: revision,
            rules,
            activated_at: activated_at.map(rfc3339),
            etag,
            source,
            last_rejected: last_rejected.map(|r| RejectionView {
                revision: r.revision,
                path: r.path,
                reason: r.reason,
                at: rfc3339(r.at),
            }),
        }
    }

    /// Remembers a refusal. `revision` is known only for a bundle whose signature checked:
    /// nothing of an unverified payload is parsed or shown.
    fn reject(&self, revision: Option<u64>, path: &str, reason: &str, now: i64) {
        let rejection = Rejection { revision, path: path.to_owned(), reason: reason.to_owned(), at: now };
        *self.last_rejected.lock().unwrap_or_else(PoisonError::into_inner) = Some(rejection);
    }

    /// Records a push whose body could not even be read (too large, not UTF-8); returns the
    /// active revision, which stays.
    pub fn refuse_unread(&self, path: &str, reason: &str, now: i64) -> u64 {
        let active_revision = self.snapshot().revision;
        let rejection = Rejection { revision: None, path: path.to_owned(), reason: reason.to_owned(), at: now };
        *self.last_rejected.lock().unwrap_or_else(PoisonError::into_inner) = Some(rejection);
        tracing::warn!("bundle rejected: {path}: {reason}; active revision {active_revision} stays");
        active_revision
    }

    /// Verifies `text` (a compact JWS, from an authenticated operator) and, if it is valid,
    /// for this environment and newer than the active revision, persists it and makes it the
    /// active policy. The active revision again is accepted only byte for byte (nothing
    /// changes); anything else at or below it is refused. Every refusal is remembered for
    /// [`PolicyStore::status`] and logged.
    pub async fn push(&self, text: String, now: i64) -> Result<Accepted, PushError> {
        let _serial = self.update.lock().await;
        let active_revision = self.snapshot().revision;
        let Some(keys) = self.keys.clone() else {
            let reason = format!(
                "no operator keys are configured: set `bundle_keys` in {} to accept signed bundles",
                crate::config::SETTINGS_FILE
            );
            self.reject(None, "signature", &reason, now);
            tracing::warn!("bundle rejected: {reason}; active revision {active_revision} stays");
            return Err(PushError::KeysNotConfigured { reason, active_revision });
        };
        let environment = self.environment.clone();
        let (text, verified) = tokio::task::spawn_blocking(move || {
            let verified = bundle::verify_for(&text, &keys, environment.as_deref());
            (text, verified)
        })
        .await
        .map_err(|e| {
            let reason = format!("bundle verification did not complete: {e}");
            tracing::error!("{reason}");
            PushError::Internal { reason, active_revision }
        })?;
        let policy = match verified {
            Ok(policy) => policy,
            Err(BundleError { path, reason }) => {
                self.reject(None, &path, &reason, now);
                tracing::warn!("bundle rejected: {path}: {reason}; active revision {active_revision} stays");
                return Err(PushError::Rejected { path, reason, active_revision });
            }
        };
        let digest = crate::auth::sha256_hex(text.trim());
        let active_digest = self.active.read().unwrap_or_else(PoisonError::into_inner).sha256.clone();
        if policy.revision == active_revision && active_digest.as_deref() == Some(digest.as_str()) {
            tracing::info!("bundle revision {active_revision} pushed again, byte for byte: unchanged");
            return Ok(Accepted {
                previous_revision: active_revision,
                revision: active_revision,
                rules: policy.rules.len(),
                unchanged: true,
            });
        }
        if policy.revision <= active_revision {
            let path = "$.revision".to_owned();
            let reason = if policy.revision == active_revision {
                format!(
                    "revision {active_revision} is already active with other content: a changed bundle needs a \
                     new revision (sign it with a revision above {active_revision})"
                )
            } else {
                format!(
                    "revision {} is older than the active revision {active_revision}: rollback refused \
                     (to go back, sign the old content again with a revision above {active_revision})",
                    policy.revision
                )
            };
            self.reject(Some(policy.revision), &path, &reason, now);
            tracing::warn!("bundle rejected (revision {}): {path}: {reason}", policy.revision);
            return Err(PushError::Rollback { path, reason, active_revision });
        }
        let target = self.path.clone();
        let text_for_serving = text.trim().to_owned();
        let persisted = tokio::task::spawn_blocking(move || write_atomically(&target, text.as_bytes()))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        if let Err(e) = persisted {
            let reason = format!("cannot persist the bundle to {}: {e}", self.path.display());
            tracing::error!("bundle revision {} not activated: {reason}", policy.revision);
            return Err(PushError::Internal { reason, active_revision });
        }
        let accepted = Accepted {
            previous_revision: active_revision,
            revision: policy.revision,
            rules: policy.rules.len(),
            unchanged: false,
        };
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = Active {
            policy: Arc::new(policy),
            sha256: Some(digest),
            jws: Some(Arc::from(text_for_serving.as_str())),
            activated_at: Some(now),
        };
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        tracing::info!(
            "bundle revision {} accepted ({} rule{}), replacing revision {}; persisted to {}",
            accepted.revision,
            accepted.rules,
            if accepted.rules == 1 { "" } else { "s" },
            accepted.previous_revision,
            self.path.display(),
        );
        Ok(accepted)
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content: a
/// temporary file in the same directory, flushed to disk, then renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "bundle".into());
    let suffix = crate::issue::random_hex(8).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{name}.{suffix}.tmp"));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable where directories can be opened (Unix).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use registry_guard_core::token::testing::{es256_key, jwks};

    const BUNDLE: &str = r#"{"revision": 4, "protection_rules": [
        {"id": "p", "owner": {"group": "acme"}, "repository_path_pattern": "acme/*", "minimum_access_level_for_push": "owner"}]}"#;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/bundle.jws");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn push_checks_signature_and_revision() {
        let dir = tempfile::tempdir().unwrap();
        let key = es256_key(7);
        let keys = KeySet::from_jwks(&jwks(&[&key])).unwrap();
        let store = PolicyStore::new(Policy::default(), None, Some(keys), None, dir.path().join("bundle.jws"));
        assert_eq!(store.status().active_revision, 0);
        let signed = bundle::sign(BUNDLE, &key).unwrap();
        let ok = store.push(signed.clone(), 100).await.unwrap();
        assert_eq!((ok.previous_revision, ok.revision, ok.rules, ok.unchanged), (0, 4, 1, false));
        assert_eq!(store.snapshot().revision, 4);
        assert_eq!(std::fs::read_to_string(dir.path().join("bundle.jws")).unwrap(), signed);
        // The same bytes again: accepted, nothing changes.
        let again = store.push(signed, 101).await.unwrap();
        assert!(again.unchanged);
        assert_eq!(store.status().activated_at.as_deref(), Some("1970-01-01T00:01:40Z"));
        // The same revision with other content: refused.
        let other = bundle::sign(&BUNDLE.replace("acme/*", "acme/web/*"), &key).unwrap();
        let err = store.push(other, 102).await.unwrap_err();
        assert!(
            matches!(&err, PushError::Rollback { active_revision: 4, reason, .. } if reason.contains("already active"))
        );
        // Older: refused and remembered.
        let old = bundle::sign(&BUNDLE.replace("\"revision\": 4", "\"revision\": 3"), &key).unwrap();
        let err = store.push(old, 103).await.unwrap_err();
        assert!(
            matches!(&err, PushError::Rollback { active_revision: 4, reason, .. } if reason.contains("revision 3"))
        );
        let status = store.status();
        assert_eq!(status.active_revision, 4);
        let rejected = status.last_rejected.unwrap();
        assert_eq!((rejected.revision, rejected.path.as_str()), (Some(3), "$.revision"));
    }

    #[tokio::test]
    async fn push_checks_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let key = es256_key(7);
        let keys = KeySet::from_jwks(&jwks(&[&key])).unwrap();
        let store = PolicyStore::new(
            Policy::default(),
            None,
            Some(keys),
            Some("production".into()),
            dir.path().join("bundle.jws"),
        );
        let staging =
            bundle::sign(&BUNDLE.replace("{\"revision\"", "{\"environment\": \"staging\", \"revision\""), &key)
                .unwrap();
        let err = store.push(staging, 1).await.unwrap_err();
        assert!(
            matches!(&err, PushError::Rejected { path, reason, .. }
            if path == "$.environment" && reason.contains("`staging`") && reason.contains("`production`")),
            "{err:?}"
        );
        let none = bundle::sign(BUNDLE, &key).unwrap();
        assert!(matches!(store.push(none, 2).await, Err(PushError::Rejected { .. })));
        let production =
            bundle::sign(&BUNDLE.replace("{\"revision\"", "{\"environment\": \"production\", \"revision\""), &key)
                .unwrap();
        assert_eq!(store.push(production, 3).await.unwrap().revision, 4);
        assert!(
            !dir.path().join("bundle.jws").exists() || store.snapshot().environment.as_deref() == Some("production")
        );
    }

    #[tokio::test]
    async fn unverified_payloads_are_never_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeySet::from_jwks(&jwks(&[&es256_key(7)])).unwrap();
        let store = PolicyStore::new(Policy::default(), None, Some(keys), None, dir.path().join("bundle.jws"));
        // Signed by an unknown key, claiming a revision: the claim is not reported.
        let forged = bundle::sign(BUNDLE, &es256_key(9)).unwrap();
        assert!(matches!(store.push(forged, 1).await, Err(PushError::Rejected { .. })));
        assert_eq!(store.status().last_rejected.unwrap().revision, None);
    }

    #[tokio::test]
    async fn push_without_keys_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::new(Policy::default(), None, None, None, dir.path().join("bundle.jws"));
        let signed = bundle::sign(BUNDLE, &es256_key(7)).unwrap();
        assert!(matches!(store.push(signed, 1).await, Err(PushError::KeysNotConfigured { .. })));
        assert!(!dir.path().join("bundle.jws").exists());
    }
}
