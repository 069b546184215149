//! Layer `inspect`: what `rgctl` shows operators — why the filter would decide a request the
//! way it does ([`explain`]) and who may do what on a repository ([`review`]). Both run the
//! token service's grant (`issue`) and the filter's decision function (`decide`) instead of
//! restating either.
//!
//! The top layer: may use every other one. `review` may use `explain`.

pub mod explain;
pub mod review;
