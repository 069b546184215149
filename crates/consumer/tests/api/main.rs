//! Integration tests: the consumer on 127.0.0.1 port 0 with a temporary directory holding the
//! JWKS, the secret and the SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod access;
mod analytics;
mod cli;
mod events;
mod helpers;
mod http;
mod jwks_url;
mod persistence;
mod postgres;
