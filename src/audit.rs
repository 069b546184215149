//! The filter's bundle audit records: one JSON line (core [`audit::bundle_line`]) on Envoy's
//! log, at `warning` like the request records, when a filter VM activates or refuses a bundle
//! (from a plugin configuration or the bundle source). Root-context work only, never on a
//! request. Uses `host` (time) and the WASI random source (once per VM).
//! [`event_id`] also numbers the request records (`registry`).

use registry_guard_core::decide::audit::{self, BundleChange};
use registry_guard_core::policy::follow::BundleSource;

use crate::host::Host;

thread_local! {
    /// The audit event ids' generator state: seeded once per VM from WASI `random_get`.
    static EVENT_ID_STATE: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// A unique id for one audit record (128 bits, hex): two steps of SplitMix64 from a per-VM
/// random seed, so an audited request (and a bundle record) makes no host call for randomness (ids identify
/// records; they are not secrets). `None` if the host has no randomness to seed it.
pub fn event_id() -> Option<String> {
    let state = match EVENT_ID_STATE.with(std::cell::Cell::get) {
        Some(s) => s,
        None => {
            let mut seed = [0u8; 8];
            getrandom::getrandom(&mut seed).ok()?;
            u64::from_le_bytes(seed)
        }
    };
    let (state, high) = splitmix64(state);
    let (state, low) = splitmix64(state);
    EVENT_ID_STATE.with(|s| s.set(Some(state)));
    Some(format!("{high:016x}{low:016x}"))
}

/// One step of SplitMix64: the next state and its output (a bijection of the state, so a
/// VM's ids never repeat within 2^63 records).
fn splitmix64(state: u64) -> (u64, u64) {
    let state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (state, z ^ (z >> 31))
}

/// Writes the record of `change` (its `event_id` is made here).
pub fn bundle(host: &mut impl Host, change: BundleChange<'_>) {
    let now = host.now_unix_seconds().unwrap_or(0);
    let id = event_id();
    let line = audit::bundle_line(BundleChange { event_id: id.as_deref(), ..change }, now);
    log::warn!("{line}");
}

/// How a bundle source is named in records: `<cluster><path>`, or `<cluster> oci
/// <repository>:<reference>` for an OCI artifact.
pub fn source_label(source: &BundleSource) -> String {
    match &source.oci {
        Some(a) => format!("{} oci {}:{}", source.cluster, a.repository, a.reference),
        None => format!("{}{}", source.cluster, source.path),
    }
}
