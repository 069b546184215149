//! The configuration directory: `token-service.json`, `principals.json` and the signing key.
//!
//! Two steps, as everywhere in registry-guard: raw serde types with `deny_unknown_fields`,
//! then a checked [`Config`]. Every error names the file and, where there is one, the JSON
//! path of the offending field.

use std::fmt;
use std::path::{Path, PathBuf};

use argon2::password_hash::PasswordHash;
use registry_guard_core::directory::Directory;
use registry_guard_core::token::SigningKey;
use serde::Deserialize;

use crate::keys;

/// The service's own settings file, optional; every field has a default.
pub const SETTINGS_FILE: &str = "token-service.json";
/// The principals file, required; parsed by the core's [`Directory::from_json`].
pub const PRINCIPALS_FILE: &str = "principals.json";

/// Longest accepted registry token lifetime (a day).
pub const MAX_TOKEN_TTL_SECONDS: i64 = 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSettings {
    issuer: String,
    service: String,
    token_ttl_seconds: i64,
    signing_key: PathBuf,
}

impl Default for RawSettings {
    fn default() -> Self {
        RawSettings {
            issuer: "registry-guard".into(),
            service: "container_registry".into(),
            token_ttl_seconds: 300,
            signing_key: PathBuf::from("keys/signing-key.pem"),
        }
    }
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
    fn new(file: &Path, field: Option<String>, reason: impl Into<String>) -> ConfigError {
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
    pub signing_key: SigningKey,
    /// Where the signing key was read from (for the startup line).
    pub signing_key_path: PathBuf,
    pub directory: Directory,
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
        let signing_key_path = dir.join(&raw.signing_key);
        let signing_key = load_signing_key(&signing_key_path)?;
        let directory = load_principals(&dir.join(PRINCIPALS_FILE))?;
        Ok(Config {
            issuer: raw.issuer,
            service: raw.service,
            token_ttl_seconds: raw.token_ttl_seconds,
            signing_key,
            signing_key_path,
            directory,
        })
    }
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
        ConfigError::new(path, None, format!("cannot read the signing key (`$.signing_key` of {SETTINGS_FILE}): {e}"))
    })?;
    keys::signing_key_from_pem(&pem).map_err(|e| ConfigError::new(path, None, e.to_string()))
}

fn load_principals(path: &Path) -> Result<Directory, ConfigError> {
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
