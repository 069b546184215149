//! Layer `request`: what a registry request asks for — actions and access levels
//! ([`access`]), the OCI name grammar ([`name`]), token scopes ([`scope`]) and the route
//! grammar of the distribution API ([`route`]).
//!
//! May use `support` only. In order, each module may use the ones before it:
//! `access`, `name`, `scope`, `route`.

pub mod access;
pub mod name;
pub mod route;
pub mod scope;
