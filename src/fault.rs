//! TEST ONLY fault injection, compiled only with the `fault-injection` cargo feature (the
//! e2e fault suite's filter, `target/filter-faults/registry_guard.wasm`, built by `make
//! build-faults`). The release filter has none of this, and its configuration parser
//! refuses `fault_injection` as an unknown field: it cannot be told to trap.

use std::cell::RefCell;

use registry_guard_core::decide::guard::Guard;

use crate::host::Host;

/// `fault_injection.trap_on_header`: a request carrying the header executes wasm
/// `unreachable`, a real VM trap.
pub fn trap_if_injected(host: &mut impl Host, guard: Option<&RefCell<Guard>>) {
    let header =
        guard.and_then(|g| g.try_borrow().ok()?.config.fault_injection.as_ref().and_then(|f| f.trap_on_header.clone()));
    if let Some(h) = header {
        if matches!(host.request_header(&h), Ok(Some(_))) {
            #[cfg(target_arch = "wasm32")]
            core::arch::wasm32::unreachable();
        }
    }
}

/// `fault_injection.refuse_configure_after_first`: whether this is the first time any VM of
/// this Envoy process is configured with `bytes` (a shared-data flag per configuration
/// digest).
pub fn first_configure(host: &mut impl Host, bytes: &[u8]) -> bool {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let key = format!("registry_guard.fault.configured.{:016x}", h.finish());
    match host.get_shared(&key) {
        Ok((Some(_), _)) => false,
        _ => {
            let _ = host.set_shared(&key, b"1", None);
            true
        }
    }
}
