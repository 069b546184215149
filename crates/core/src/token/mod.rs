//! Layer `token`: registry JWTs and their keys — key types and key ids, JWKS documents, the
//! claims, verification, signing, the nested `user` JWT and the fixed-base ES256 verifier.
//!
//! May use `support` and `request` only. Nothing here knows the policy bundle or a decision;
//! time is an argument (`now`, unix seconds), nothing reads a clock.

pub mod claims;
pub mod es256;
pub mod jwks;
pub mod keys;
pub mod keys_source;
pub mod sign;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod user;
pub mod verify;
