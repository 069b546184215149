//! registry-guard, the proxy-wasm filter: thin glue over `registry_guard_core`.
//!
//! One wasm module, two roles chosen by the plugin configuration:
//! - **registry** ([`registry`], in front of the registry and the dependency proxy): the
//!   root context ([`root`]) owns the compiled configuration and the token cache (one per
//!   VM); the HTTP context reads the request headers, asks core `Guard::check` and either
//!   continues — marked allowed and tagged for its events (a sealed attribution in the
//!   registry's `User-Agent`, core `events`) — or sends the local reply the core decided;
//! - **events** ([`events`], on the registry's notification path): fills every event's actor
//!   from the attribution its request carried and forwards the envelope.
//!
//! Every host call goes through the [`host::Host`] trait, so the glue runs natively against
//! a fake host (`tests/`). [`keys_follow`] fetches the trusted token keys from a JWKS URL
//! (`keys_source`) for a registry-role root. Imports point down only: `root` → `registry`,
//! `keys_follow`, `events`, `audit` (bundle records; `registry` numbers its request records with
//! it); `metrics` → `host` → `headers`. No policy logic
//! lives here.
//! With the `fault-injection` feature (test builds only), [`fault`] adds deliberate faults.

pub mod audit;
pub mod events;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod headers;
pub mod host;
pub mod keys_follow;
pub mod metrics;
pub mod registry;
pub mod root;

pub use events::{rewrite_request_body, EnvelopeOutcome, EventsHttp};
pub use registry::{
    on_request_headers, on_request_headers_before_body, tag_for_events, DeniedBody, HeldReply, LocalReply, Outcome,
    RegistryHttp,
};
pub use root::{GuardRoot, HttpFilter, Vm};

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(GuardRoot::new(Vm::this_vm()))
    });
}}
