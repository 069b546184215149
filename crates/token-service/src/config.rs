//! The configuration directory: `token-service.json`, `principals.json`, the signing key and,
//! optionally, the operator keys and the active signed policy bundle.
//!
//! Two steps, as everywhere in registry-guard: raw serde types with `deny_unknown_fields`,
//! then a checked [`Config`]. Every error names the file and, where there is one, the JSON
//! path of the offending field.

use std::fmt;
use std::path::{Path, PathBuf};

use argon2::password_hash::PasswordHash;
use registry_guard_core::policy::bundle::{self, Policy};
use registry_guard_core::policy::directory::Directory;
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys::{KidFormat, SigningKey};
use serde::Deserialize;

use crate::keys;
use crate::limits::LoginLimits;
use registry_guard_service::ServerLimits;

/// The service's own settings file, optional; every field has a default.
pub const SETTINGS_FILE: &str = "token-service.json";
/// The principals file, required; parsed by the core's [`Directory::from_json`].
pub const PRINCIPALS_FILE: &str = "principals.json";

/// Default path of the active signed bundle, relative to the configuration directory.
pub const DEFAULT_BUNDLE_FILE: &str = "bundle.jws";

/// Longest accepted registry token lifetime (a day).
pub const MAX_TOKEN_TTL_SECONDS: i64 = 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    issuer: String,
    service: String,
    token_ttl_seconds: i64,
    /// Seconds a principal's nested `user` JWT is reused by its next tokens (0: a new one
    /// per token); see `issue::DEFAULT_USER_JWT_REUSE_SECONDS`.
    user_jwt_reuse_seconds: i64,
    /// The one signing key (shorthand for `signing_keys: [{"path": …}]`).
    signing_key: Option<PathBuf>,
    /// Every key of the ring, oldest first: all are published in `/jwks`; the newest with
    /// `active: true` signs (key rotation).
    signing_keys: Option<Vec<RawKeyEntry>>,
    /// Key id in token headers: `rfc7638` (default) or `libtrust` (for a registry verifying
    /// tokens itself with `auth: token`).
    kid_format: KidFormat,
    /// JWKS of the operator keys that sign policy bundles; without it no bundle is accepted.
    bundle_keys: Option<PathBuf>,
    /// Where the active signed bundle lives (read at startup, written on `PUT /bundle`).
    bundle: PathBuf,
    /// The deployment this service serves: a bundle must name exactly this environment.
    environment: Option<String>,
    /// A file holding the SHA-256 (hex) of the operator token that `PUT /bundle` requires
    /// (`rgctl operator-token`); without it no bundle can be pushed over HTTP.
    operator_token_sha256: Option<PathBuf>,
    /// A file holding the SHA-256 (hex) of the token fleet members present to `GET /bundle`
    /// (`rgctl operator-token --name bundle-read`); the operator token is accepted too. Without
    /// either, the bundle is not served.
    bundle_read_token_sha256: Option<PathBuf>,
    /// Another place this service follows for its bundle (a token-service replica following the
    /// one operators push to); see `follow`.
    bundle_source: Option<RawBundleSource>,
    /// Login abuse limits on `/jwt/auth` (see `limits`).
    login_limits: LoginLimits,
    /// Connection limits and timeouts of the HTTP server (see `server`).
    server: ServerLimits,
    /// CI jobs: CI systems, job token lifetime, OIDC issuer and job ID token key (see `jobs`).
    ci_jobs: Option<crate::jobs::RawJobsSettings>,
}

impl Default for RawSettings {
    fn default() -> Self {
        RawSettings {
            issuer: "registry-guard".into(),
            service: "container_registry".into(),
            token_ttl_seconds: 300,
            user_jwt_reuse_seconds: crate::issue::DEFAULT_USER_JWT_REUSE_SECONDS,
            signing_key: None,
            signing_keys: None,
            kid_format: KidFormat::default(),
            bundle_keys: None,
            bundle: PathBuf::from(DEFAULT_BUNDLE_FILE),
            environment: None,
            operator_token_sha256: None,
            bundle_read_token_sha256: None,
            bundle_source: None,
            login_limits: LoginLimits::default(),
            server: ServerLimits::default(),
            ci_jobs: None,
        }
    }
}

/// `bundle_source` of `token-service.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundleSource {
    /// `http://host:port/bundle` of the service to follow; with `oci`, the registry's
    /// `http://host:port`.
    url: String,
    /// The bundle is an OCI artifact in the registry at `url`.
    #[serde(default)]
    oci: Option<registry_guard_core::policy::oci::OciArtifact>,
    /// A file holding the bearer token for that service (its bundle read token).
    token_file: Option<PathBuf>,
    /// Seconds between polls (jittered), and the base of the backoff after a failure.
    #[serde(default = "default_poll_seconds")]
    poll_seconds: u64,
    /// Long polling: ask the source to hold the request up to this many seconds until the
    /// bundle changes (`Prefer: wait=N`); 0 polls plainly.
    #[serde(default)]
    wait_seconds: u64,
}

fn default_poll_seconds() -> u64 {
    10
}

/// Where a replica fetches its bundle from (checked `bundle_source`).
#[derive(Clone, PartialEq, Eq)]
pub struct BundleSource {
    pub url: String,
    /// The bundle is an OCI artifact in the registry at `url`.
    pub oci: Option<registry_guard_core::policy::oci::OciArtifact>,
    /// The bearer token to present; never logged.
    pub token: Option<String>,
    pub poll_seconds: u64,
    pub wait_seconds: u64,
}

impl fmt::Debug for BundleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleSource")
            .field("url", &self.url)
            .field("oci", &self.oci)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("poll_seconds", &self.poll_seconds)
            .field("wait_seconds", &self.wait_seconds)
            .finish()
    }
}

/// Default path of the signing key, relative to the configuration directory.
pub const DEFAULT_SIGNING_KEY: &str = "keys/signing-key.pem";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyEntry {
    path: PathBuf,
    #[serde(default = "yes")]
    active: bool,
}

fn yes() -> bool {
    true
}

/// The token signing keys: the one that signs and every key that is published.
#[derive(Debug, Clone)]
pub struct KeyRing {
    /// The newest active key; its `kid` is in the configured format.
    pub signing: SigningKey,
    pub signing_path: PathBuf,
    /// Every key of the ring (the signing key included), oldest first, with its path.
    pub keys: Vec<(PathBuf, SigningKey)>,
    pub kid_format: KidFormat,
}

impl KeyRing {
    /// The JWKS to publish: every key under its RFC 7638 thumbprint and, with
    /// `kid_format: libtrust`, also under its libtrust key id (for verifiers that look keys
    /// up by the header's `kid` literally).
    pub fn jwks(&self) -> serde_json::Value {
        let mut keys = Vec::new();
        for (_, key) in &self.keys {
            keys.push(key.public_jwk_as(&key.thumbprint()));
            if self.kid_format == KidFormat::Libtrust {
                keys.push(key.public_jwk_as(&key.libtrust_kid()));
            }
        }
        serde_json::json!({ "keys": keys })
    }
}

/// Reads the key ring named by `token-service.json` in `dir` (at startup and on reload).
pub fn load_key_ring(dir: &Path) -> Result<KeyRing, ConfigError> {
    let settings_path = dir.join(SETTINGS_FILE);
    let raw = read_settings(&settings_path)?;
    key_ring(dir, &settings_path, raw.signing_key, raw.signing_keys, raw.kid_format)
}

fn key_ring(
    dir: &Path,
    settings_path: &Path,
    signing_key: Option<PathBuf>,
    signing_keys: Option<Vec<RawKeyEntry>>,
    kid_format: KidFormat,
) -> Result<KeyRing, ConfigError> {
    let entries = match (signing_key, signing_keys) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                settings_path,
                Some("$.signing_keys".into()),
                "set either `signing_key` or `signing_keys`, not both",
            ))
        }
        (Some(path), None) => vec![RawKeyEntry { path, active: true }],
        (None, Some(entries)) => entries,
        (None, None) => vec![RawKeyEntry { path: PathBuf::from(DEFAULT_SIGNING_KEY), active: true }],
    };
    if entries.is_empty() {
        return Err(ConfigError::new(settings_path, Some("$.signing_keys".into()), "must list at least one key"));
    }
    let mut keys: Vec<(PathBuf, SigningKey)> = Vec::with_capacity(entries.len());
    let mut signing = None;
    for (i, entry) in entries.into_iter().enumerate() {
        let path = dir.join(&entry.path);
        let key = load_signing_key(&path)?.with_kid_format(kid_format);
        if let Some((other, _)) = keys.iter().find(|(_, k)| k.thumbprint() == key.thumbprint()) {
            return Err(ConfigError::new(
                settings_path,
                Some(format!("$.signing_keys[{i}].path")),
                format!("`{}` is the same key as `{}`", path.display(), other.display()),
            ));
        }
        if entry.active {
            signing = Some((path.clone(), key.clone()));
        }
        keys.push((path, key));
    }
    let (signing_path, signing) = signing.ok_or_else(|| {
        ConfigError::new(
            settings_path,
            Some("$.signing_keys".into()),
            "no key is `active`: at least one key must sign (the newest active key does)",
        )
    })?;
    Ok(KeyRing { signing, signing_path, keys, kid_format })
}

/// A problem in the configuration directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault, as given (the configuration directory joined with its name).
    pub file: PathBuf,
    /// JSON path of the field at fault (`$.users[2].password_hash`), when there is one.
    pub field: Option<String>,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(file: &Path, field: Option<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError { file: file.to_path_buf(), field, reason: reason.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The checked configuration the service runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub issuer: String,
    pub service: String,
    pub token_ttl_seconds: i64,
    /// Seconds a principal's nested `user` JWT is reused (0: never).
    pub user_jwt_reuse_seconds: i64,
    /// The signing key and every published key.
    pub keys: KeyRing,
    pub directory: Directory,
    /// Operator keys that may sign bundles (`bundle_keys`), if configured.
    pub bundle_keys: Option<KeySet>,
    /// Where the operator keys were read from.
    pub bundle_keys_path: Option<PathBuf>,
    /// Where the active bundle is read from and persisted to.
    pub bundle_path: PathBuf,
    /// The policy of the bundle found at startup, or the empty policy (revision 0).
    pub policy: Policy,
    /// Whether `policy` came from a bundle file (rather than being the default).
    pub bundle_loaded: bool,
    /// SHA-256 (hex) of that bundle's JWS text (trimmed), when one was loaded.
    pub bundle_sha256: Option<String>,
    /// That bundle's JWS text (trimmed), served by `GET /bundle`.
    pub bundle_jws: Option<String>,
    /// The deployment bundles must name (`environment`), if configured.
    pub environment: Option<String>,
    /// SHA-256 (hex, lower case) of the operator token `PUT /bundle` requires, if configured.
    pub operator_token_sha256: Option<String>,
    /// SHA-256 (hex) of the token `GET /bundle` accepts besides the operator token.
    pub bundle_read_token_sha256: Option<String>,
    /// The service this one follows for its bundle, if any.
    pub bundle_source: Option<BundleSource>,
    pub login_limits: LoginLimits,
    pub server: ServerLimits,
    /// CI jobs, when `ci_jobs` is configured.
    pub ci_jobs: Option<crate::jobs::JobsSettings>,
}

impl Config {
    /// Reads and checks everything under `dir`.
    pub fn load(dir: &Path) -> Result<Config, ConfigError> {
        let settings_path = dir.join(SETTINGS_FILE);
        let raw = read_settings(&settings_path)?;
        let field = |name: &str| Some(format!("$.{name}"));
        if raw.issuer.trim().is_empty() {
            return Err(ConfigError::new(&settings_path, field("issuer"), "must not be empty"));
        }
        if raw.service.trim().is_empty() {
            return Err(ConfigError::new(&settings_path, field("service"), "must not be empty"));
        }
        if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&raw.token_ttl_seconds) {
            return Err(ConfigError::new(
                &settings_path,
                field("token_ttl_seconds"),
                format!("must be between 1 and {MAX_TOKEN_TTL_SECONDS}, got {}", raw.token_ttl_seconds),
            ));
        }
        if !(0..=crate::issue::MAX_USER_JWT_REUSE_SECONDS).contains(&raw.user_jwt_reuse_seconds) {
            return Err(ConfigError::new(
                &settings_path,
                field("user_jwt_reuse_seconds"),
                format!(
                    "must be between 0 and {}, got {}",
                    crate::issue::MAX_USER_JWT_REUSE_SECONDS,
                    raw.user_jwt_reuse_seconds
                ),
            ));
        }
        raw.login_limits.check().map_err(|(f, reason)| ConfigError::new(&settings_path, Some(f), reason))?;
        raw.server.check().map_err(|(f, reason)| ConfigError::new(&settings_path, Some(f), reason))?;
        let keys = key_ring(dir, &settings_path, raw.signing_key, raw.signing_keys, raw.kid_format)?;
        let directory = load_principals(&dir.join(PRINCIPALS_FILE))?;
        if raw.bundle.as_os_str().is_empty() {
            return Err(ConfigError::new(&settings_path, field("bundle"), "must not be empty"));
        }
        if raw.bundle_keys.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::new(&settings_path, field("bundle_keys"), "must not be empty"));
        }
        let bundle_keys_path = raw.bundle_keys.map(|p| dir.join(p));
        let bundle_keys = bundle_keys_path.as_deref().map(load_bundle_keys).transpose()?;
        if let Some(env) = &raw.environment {
            if !bundle::valid_environment(env) {
                return Err(ConfigError::new(&settings_path, field("environment"), "must be 1-64 of [A-Za-z0-9._-]"));
            }
        }
        let operator_token_sha256 = match raw.operator_token_sha256 {
            None => None,
            Some(p) if p.as_os_str().is_empty() => {
                return Err(ConfigError::new(&settings_path, field("operator_token_sha256"), "must not be empty"))
            }
            Some(p) => Some(load_token_digest(&dir.join(p), "operator_token_sha256")?),
        };
        let bundle_read_token_sha256 = match raw.bundle_read_token_sha256 {
            None => None,
            Some(p) if p.as_os_str().is_empty() => {
                return Err(ConfigError::new(&settings_path, field("bundle_read_token_sha256"), "must not be empty"))
            }
            Some(p) => Some(load_token_digest(&dir.join(p), "bundle_read_token_sha256")?),
        };
        let bundle_source = raw.bundle_source.map(|s| bundle_source(dir, &settings_path, s)).transpose()?;
        if bundle_source.is_some() && bundle_keys.is_none() {
            return Err(ConfigError::new(
                &settings_path,
                field("bundle_source"),
                "following a bundle source needs `bundle_keys` to verify what it fetches",
            ));
        }
        let bundle_path = dir.join(&raw.bundle);
        let (policy, bundle_sha256, bundle_jws) =
            match load_bundle(&bundle_path, bundle_keys.as_ref(), raw.environment.as_deref())? {
                Some((policy, digest, text)) => (policy, Some(digest), Some(text)),
                None => (Policy::default(), None, None),
            };
        let bundle_loaded = bundle_sha256.is_some();
        let ci_jobs = raw.ci_jobs.map(|j| crate::jobs::JobsSettings::load(dir, &settings_path, j)).transpose()?;
        Ok(Config {
            issuer: raw.issuer,
            service: raw.service,
            token_ttl_seconds: raw.token_ttl_seconds,
            user_jwt_reuse_seconds: raw.user_jwt_reuse_seconds,
            keys,
            directory,
            bundle_keys,
            bundle_keys_path,
            bundle_path,
            policy,
            bundle_loaded,
            bundle_sha256,
            bundle_jws,
            environment: raw.environment,
            operator_token_sha256,
            bundle_read_token_sha256,
            bundle_source,
            login_limits: raw.login_limits,
            server: raw.server,
            ci_jobs,
        })
    }
}

/// Reads the operator token digest file: 64 hex digits (surrounding whitespace ignored).
/// Reads a token digest file named by the setting `field` (`operator_token_sha256`,
/// `bundle_read_token_sha256`).
fn load_token_digest(path: &Path, field: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(path, None, format!("cannot read the token digest (`$.{field}` of {SETTINGS_FILE}): {e}"))
    })?;
    let digest = text.trim().to_ascii_lowercase();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::new(
            path,
            None,
            format!(
                "`$.{field}`: expected the SHA-256 of the token as 64 hex digits (`rgctl operator-token` writes it)"
            ),
        ));
    }
    Ok(digest)
}

/// Checks `bundle_source`: an `http://` URL, a readable token file, sane periods.
fn bundle_source(dir: &Path, settings_path: &Path, raw: RawBundleSource) -> Result<BundleSource, ConfigError> {
    let field = |name: &str| Some(format!("$.bundle_source.{name}"));
    let url = raw.url.trim().to_owned();
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(ConfigError::new(
            settings_path,
            field("url"),
            format!("must be an http:// URL (reach a remote source through a local proxy or sidecar), got {url:?}"),
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ConfigError::new(settings_path, field("url"), format!("has no host: {url:?}")));
    }
    if !(1..=3600).contains(&raw.poll_seconds) {
        return Err(ConfigError::new(settings_path, field("poll_seconds"), "must be between 1 and 3600"));
    }
    if raw.wait_seconds > 300 {
        return Err(ConfigError::new(settings_path, field("wait_seconds"), "must be between 0 and 300"));
    }
    if let Some(artifact) = &raw.oci {
        if let Err((f, reason)) = artifact.check() {
            return Err(ConfigError::new(settings_path, field(&format!("oci.{f}")), reason));
        }
        if raw.wait_seconds != 0 {
            return Err(ConfigError::new(
                settings_path,
                field("wait_seconds"),
                "must be 0 with `oci`: registries do not long-poll",
            ));
        }
        if rest.contains('/') {
            return Err(ConfigError::new(
                settings_path,
                field("url"),
                format!("with `oci`, must be the registry's http://host:port only, got {url:?}"),
            ));
        }
    }
    let token = match raw.token_file {
        None => None,
        Some(p) => {
            let path = dir.join(p);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::new(settings_path, field("token_file"), format!("cannot read {}: {e}", path.display()))
            })?;
            let token = text.trim().to_owned();
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    settings_path,
                    field("token_file"),
                    format!("{} must hold one token of printable ASCII", path.display()),
                ));
            }
            Some(token)
        }
    };
    Ok(BundleSource { url, oci: raw.oci, token, poll_seconds: raw.poll_seconds, wait_seconds: raw.wait_seconds })
}

/// Reads the operator JWKS (`bundle_keys`).
fn load_bundle_keys(path: &Path) -> Result<KeySet, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(path, None, format!("cannot read the operator keys (`$.bundle_keys` of {SETTINGS_FILE}): {e}"))
    })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ConfigError::new(path, None, format!("not a JWKS JSON document: {e}")))?;
    KeySet::from_jwks(&value).map_err(|e| ConfigError::new(path, None, e.to_string()))
}

/// Reads and verifies the active bundle, if there is one. A bundle without operator keys to
/// check it with is an error: it would otherwise be ignored silently.
fn load_bundle(
    path: &Path,
    keys: Option<&KeySet>,
    environment: Option<&str>,
) -> Result<Option<(Policy, String, String)>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError::new(path, None, format!("cannot read the policy bundle: {e}"))),
    };
    let Some(keys) = keys else {
        return Err(ConfigError::new(
            path,
            None,
            format!(
                "a policy bundle is present but no operator keys are configured to verify it \
                 (set `bundle_keys` in {SETTINGS_FILE}, or remove the bundle)"
            ),
        ));
    };
    let policy =
        bundle::verify_for(&text, keys, environment).map_err(|e| ConfigError::new(path, Some(e.path), e.reason))?;
    let text = text.trim().to_owned();
    Ok(Some((policy, crate::auth::sha256_hex(&text), text)))
}

fn read_settings(path: &Path) -> Result<RawSettings, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RawSettings::default()),
        Err(e) => return Err(ConfigError::new(path, None, format!("cannot read: {e}"))),
    };
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        let field = if at == "." { "$".to_owned() } else { format!("$.{at}") };
        ConfigError::new(path, Some(field), e.into_inner().to_string())
    })
}

fn load_signing_key(path: &Path) -> Result<SigningKey, ConfigError> {
    let pem = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            path,
            None,
            format!("cannot read the signing key (`$.signing_key` or `$.signing_keys` of {SETTINGS_FILE}): {e}"),
        )
    })?;
    keys::signing_key_from_pem(&pem).map_err(|e| ConfigError::new(path, None, e.to_string()))
}

/// Reads and checks `principals.json` (at start, and again on SIGHUP).
pub(crate) fn load_principals(path: &Path) -> Result<Directory, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
    let directory =
        Directory::from_json(&text).map_err(|e| ConfigError::new(path, Some(e.path.clone()), e.reason.clone()))?;
    for (i, user) in directory.users().iter().enumerate() {
        if let Some(hash) = &user.password_hash {
            check_password_hash(hash)
                .map_err(|reason| ConfigError::new(path, Some(format!("$.users[{i}].password_hash")), reason))?;
        }
    }
    Ok(directory)
}

/// Checks that `hash` is an argon2id PHC string the verifier can use: parameters in range,
/// salt and hash present.
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a valid argon2 PHC string: {e}"))?;
    if parsed.algorithm != argon2::ARGON2ID_IDENT {
        return Err(format!("algorithm `{}` is not argon2id", parsed.algorithm));
    }
    argon2::Params::try_from(&parsed).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    if parsed.salt.is_none() {
        return Err("the PHC string has no salt".into());
    }
    if parsed.hash.is_none() {
        return Err("the PHC string has no hash output".into());
    }
    Ok(())
}
