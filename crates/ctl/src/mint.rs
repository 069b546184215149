//! `rgctl mint`: sign registry tokens offline with a PEM key, one per line, for load
//! generators and benchmarks (`bench/`). The tokens have the token service's shape: `iss`,
//! `sub`, `aud`, `exp`, `nbf`, `iat`, a unique `jti`, `access` with `meta.access_level`,
//! `auth_type` and a nested, separately signed `user` JWT.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use registry_guard_core::request::scope::Scope;
use registry_guard_core::token;
use registry_guard_core::token::claims::{AccessClaim, AccessMeta, Audience, RegistryClaims};
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::Validity;

/// What to mint.
pub struct Mint {
    pub key: SigningKey,
    pub count: usize,
    pub subject: String,
    pub issuer: String,
    pub audience: String,
    pub scopes: Vec<String>,
    pub access_level: Option<u8>,
    pub auth_type: String,
    pub ttl_seconds: i64,
    pub out: Option<PathBuf>,
}

/// Signs `count` tokens (each with its own `jti`) and writes them one per line.
pub fn mint(m: &Mint) -> Result<()> {
    if m.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(1..=86_400 * 7).contains(&m.ttl_seconds) {
        bail!("--ttl-seconds must be between 1 and 604800");
    }
    let mut access = Vec::new();
    for s in &m.scopes {
        let scope = Scope::parse(s).map_err(|e| anyhow::anyhow!("--scope `{s}`: {e}"))?;
        access.push(AccessClaim {
            resource_type: scope.resource.type_str().to_owned(),
            name: scope.resource.name().to_owned(),
            actions: scope.actions.to_vec(),
            meta: m.access_level.map(|l| AccessMeta { project_path: None, access_level: Some(l) }),
        });
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let now = i64::try_from(now).context("system clock out of range")?;
    let validity = Validity { issued_at: now, not_before: now - 5, expires_at: now + m.ttl_seconds };
    let mut text = String::with_capacity(m.count * 1200);
    for i in 0..m.count {
        let jti = format!("bench-{now}-{i}");
        let user = token::sign::sign(
            &m.key,
            serde_json::json!({
                "jti": format!("{jti}-user"),
                "user_info": {"token_type": m.auth_type, "username": m.subject, "user_id": 1},
            }),
            validity,
        )?;
        let claims = RegistryClaims {
            iss: m.issuer.clone(),
            sub: m.subject.clone(),
            aud: Audience::One(m.audience.clone()),
            jti,
            access: access.clone(),
            auth_type: Some(m.auth_type.clone()),
            user: Some(user),
            extra: Default::default(),
        };
        text.push_str(&token::sign::sign(&m.key, claims, validity)?);
        text.push('\n');
    }
    match &m.out {
        Some(path) => write(path, text.as_bytes())?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    eprintln!("minted {} token(s) for `{}` valid until {}", m.count, m.subject, validity.expires_at);
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).with_context(|| format!("cannot write `{}`", path.display()))
}
