//! registry-guard core: everything the filter, the token service and the CLI decide, with no
//! proxy-wasm, no I/O and no clock. Time and inputs are arguments.
//!
//! # Module map
//!
//! A one-way stack of layers, top to bottom; each may use only the layers below it, never a
//! layer above or a sibling beside it, and inside a layer a module may use the modules listed
//! before it. `tests/layering.rs` enforces it; `README.md` beside `src/` says the same in
//! short.
//!
//! ```text
//! inspect  explain, review                          rgctl explain, rgctl review
//! decide   config, decision, guard, audit, corpus*  the filter, per request    } siblings:
//! issue    grant, job, principal                    the token service's grants } neither uses the other
//! policy   deploy, protection, claims, bundle, directory, follow
//! token    es256, keys, jwks, claims, verify, sign, user, testing*
//! request  access, name, scope, route
//! support  text, json, de
//! events   (a leaf beside the stack: uses only support; decide::config reads its key type)
//! ```
//!
//! `*`: test scaffolding, compiled only for the core's own tests and with the `testing`
//! feature, as are `token::sign::sign_jws_unchecked` and
//! `token::es256::Es256Key::verify_reference`; only test crates enable it, no production
//! binary.
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
//!   `rgctl explain` mints it, [`issue::principal`]; CI jobs (job token grants, job ID
//!   token claims), [`issue::job`].
//! - **A new module**: in the lowest layer whose modules it needs, added to that layer's
//!   order in `tests/layering.rs`. If two modules need each other, a third concept is hiding
//!   between them: name it and move it down.

pub mod decide;
pub mod events;
pub mod inspect;
pub mod issue;
pub mod policy;
pub mod request;
pub mod support;
pub mod token;
