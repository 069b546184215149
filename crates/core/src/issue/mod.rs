//! Layer `issue`: what the token service grants — a token request's scopes intersected with
//! what the principal may do — and the token it would issue for them.
//!
//! May use `support`, `request`, `token` and `policy`. It does not decide requests (that is
//! `decide`, a sibling it may not use): the token service issues, the filter decides.

pub mod grant;
pub mod job;
pub mod principal;
