//! registry-guard token service: issues Docker-registry JWTs (Docker token spec `GET` and
//! OAuth2 `POST` on `/jwt/auth`) for the principals of a configuration directory, using the
//! same core as the filter for every decision (grants, scopes, signing, protection rules of
//! the operator-signed policy bundle).

pub mod audit;
pub mod auth;
pub mod config;
pub mod follow;
pub mod issue;
pub mod jobs;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod routes;
pub mod signer;
pub mod startup;

pub use config::{Config, ConfigError};
pub use keys::{generate_signing_key_pem, signing_key_from_pem};
/// The `server` section of `token-service.json` and the HTTP loop that applies it.
pub use registry_guard_service::ServerLimits;
pub use startup::{Application, KeyReloader, Settings, StartupError, DEFAULT_LISTEN};
