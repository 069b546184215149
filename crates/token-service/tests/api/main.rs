//! Integration tests: the service on 127.0.0.1 port 0 with a temporary config directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod bundle;
mod claims;
mod config_errors;
mod deploy_tokens;
mod distribution;
mod helpers;
mod hostile;
mod jobs;
mod keys;
mod metrics;
mod principals_reload;
mod revocations;
mod token_get;
mod token_post;
