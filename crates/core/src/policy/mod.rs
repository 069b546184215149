//! Layer `policy`: what operators decide — the signed policy bundle ([`bundle`]) with its
//! protection rules ([`protection`]), deploy tokens and revocations ([`deploy`]) and
//! additional claims ([`claims`]); and the principals file ([`directory`]: groups, projects,
//! users, what each may do); the bundle as an OCI artifact ([`oci`]); and how a filter follows
//! a bundle source ([`follow`]).
//!
//! May use `support`, `request` and `token` (the bundle's signature). In order, each module
//! may use the ones before it: `deploy`, `protection`, `claims`, `bundle`, `directory`, `oci`, `follow`.

pub mod bundle;
pub mod claims;
pub mod deploy;
pub mod directory;
pub mod follow;
pub mod oci;
pub mod protection;
