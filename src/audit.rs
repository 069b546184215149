//! The filter's bundle audit records: one JSON line (core [`audit::bundle_line`]) on Envoy's
//! log, at `warning` like the request records, when a filter VM activates or refuses a bundle
//! (from a plugin configuration or the bundle source). Root-context work only, never on a
//! request. Uses `host` (time) and the WASI random source.

use registry_guard_core::decide::audit::{self, BundleChange};
use registry_guard_core::policy::follow::BundleSource;

use crate::host::Host;

/// A random id for one audit record (128 bits, hex); `None` if the host has no randomness.
pub fn event_id() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(bytes.iter().fold(String::with_capacity(32), |mut out, b| {
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
        out
    }))
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
