//! Request ↔ event correlation, shared by the two roles: the registry role tags each allowed
//! request with a unique address and stores who made it under [`slot_key`]; the events role
//! reads the record back to fill in the event's actor (core `events`).

use std::cell::Cell;

use registry_guard_core::events::correlation_address;

/// Shared-data key of a correlation slot. The table is a bounded ring of `slots` keys:
/// proxy-wasm shared data has no eviction, so records overwrite older ones in place.
pub fn slot_key(slot: u32) -> String {
    format!("registry_guard.correlation.{slot}")
}

/// Where correlation addresses come from in this VM.
pub struct Correlation {
    pub slots: u32,
    prefix: u64,
    counter: Cell<u64>,
}

impl Correlation {
    /// `prefix`: random per VM, so addresses from different worker VMs never collide.
    pub fn new(slots: u32, prefix: u64) -> Correlation {
        Correlation { slots, prefix, counter: Cell::new(0) }
    }

    pub(crate) fn next_address(&self) -> String {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        correlation_address(self.prefix, n)
    }
}
