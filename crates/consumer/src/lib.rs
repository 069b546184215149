//! registry-guard consumer: the reference consumer of the registry's webhook notifications.
//! It receives the event envelopes that the filter has attributed (`actor.name`,
//! `actor.user_type` and the signed `actor.user` JWT), verifies each `user` JWT against the
//! token service's public keys, and counts container-registry usage per principal type
//! (`i_container_registry_<kind>_<user|deploy_token>`) in an SQLite file, or in a PostgreSQL
//! database shared by several replicas (`--database postgres://…`, docs/consumer.md),
//! deduplicated on the event id.

pub mod classify;
pub mod keys;
pub mod period;
pub mod routes;
pub mod startup;
pub mod store;

pub use startup::{
    Application, Settings, StartupError, DEFAULT_LISTEN, DEFAULT_MAX_EVENTS, DEFAULT_RETENTION_DAYS,
    DEFAULT_TOLERANCE_SECONDS,
};
