//! Layer `support`: small leaves every layer may use — client text made safe to quote
//! ([`text`]), strict JSON for signed documents ([`json`]) and deserialisation errors that
//! name the JSON path ([`de`]).
//!
//! Uses nothing else of the core; its modules do not use each other.

pub mod de;
pub mod json;
pub mod text;
