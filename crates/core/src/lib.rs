//! registry-guard core: everything the filter, the token service and the CLI decide, with no
//! proxy-wasm, no I/O and no clock. Time and inputs are arguments.
//!
//! # Module map
//!
//! A one-way stack of layers; each may use only the layers below it (and `support`), never a
//! layer above or a sibling beside it. `tests::layering` (in this file) enforces it.
//!
//! ```text
//! inspect   explain, review                         rgctl explain / rgctl review
//!    |  \
//! decide    config, decision, guard, audit, corpus*  the filter, per request
//! issue     grant, principal                        the token service's grants
//!    |  /
//! policy    deploy, protection, claims, bundle, directory
//! token     es256, keys, jwks, claims, verify, sign, user, testing*
//! request   access, name, scope, route
//! support   text, json, de                          (events: a leaf beside the stack)
//! ```
//!
//! `decide` and `issue` are siblings: neither may use the other. Inside a layer, a module may
//! use the modules listed before it. `*`: test scaffolding, compiled only for the core's own
//! tests and with the `testing` feature (also [`token::sign::sign_jws_unchecked`] and
//! [`token::es256::Es256Key::verify_reference`]); no production binary enables it.
//!
//! # Where to change what
//!
//! - **An endpoint or route** of the distribution API: [`request::route`] (what a request
//!   needs), then its decision in [`decide::decision`]; a new filter endpoint kind is
//!   [`decide::config::ServedEndpoint`].
//! - **A deny kind**: [`decide::decision::DenyKind`] and the function that returns it in
//!   [`decide::decision`]; its audit line is [`decide::audit`]; add a corpus case
//!   (`corpus/decisions.json`).
//! - **A bundle field**: the raw and compiled types in [`policy::bundle`] (or the module the
//!   field's concept lives in: [`policy::protection`], [`policy::deploy`], [`policy::claims`]).
//! - **A claim**: of the registry token, [`token::claims`] (shape), [`token::verify`] (what
//!   is checked) and [`token::sign`]; an operator-defined additional claim, [`policy::claims`].
//! - **A grant** (what the token service puts in a token): [`issue::grant`]; the token as
//!   `rgctl explain` mints it, [`issue::principal`].

pub mod decide;
pub mod events;
pub mod inspect;
pub mod issue;
pub mod policy;
pub mod request;
pub mod support;
pub mod token;
