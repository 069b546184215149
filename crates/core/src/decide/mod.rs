//! Layer `decide`: the filter's request-time decision — its configuration ([`config`]), the
//! one decision function ([`decision`]), the engine with its token cache ([`guard`]) and the
//! audit line of a denial ([`audit`]). The decision corpus (`corpus`) replayed at every
//! tier is test scaffolding (the `testing` feature).
//!
//! May use `support`, `request`, `token` and `policy`, not `issue` (the filter decides, it
//! does not grant). In order, each module may use the ones before it: `config`, `decision`,
//! `guard`, `audit`, `corpus`.

pub mod audit;
pub mod config;
#[cfg(any(test, feature = "testing"))]
pub mod corpus;
pub mod decision;
pub mod guard;
