//! registry-guard core: everything the filter, the token service and the CLI decide, with no
//! proxy-wasm, no I/O and no clock. Time and inputs are arguments.

pub mod access;
pub mod audit;
pub mod bundle;
pub mod claims;
pub mod config;
pub mod corpus;
pub mod de;
pub mod decision;
pub mod deploy;
pub mod directory;
pub mod es256;
pub mod events;
pub mod explain;
pub mod follow;
pub mod guard;
pub mod json;
pub mod name;
pub mod protection;
pub mod review;
pub mod route;
pub mod scope;
pub mod text;
pub mod token;
