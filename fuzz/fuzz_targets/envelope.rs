//! Notification envelope rewriting: any bytes as an envelope, opened with the seeds' key
//! (`examples/seeds.rs` seals its user agents with it). Nothing may panic; a rewrite keeps the number and order of events and
//! their ids, and its output is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_guard_core::events::{rewrite_envelope, AttributionKey, Opener};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let keys = [AttributionKey::from_bytes([7; 32])];
    let opener = Opener { keys: &keys, now: 1_790_000_000, max_delay: 86_400 };
    let Ok((out, stats)) = rewrite_envelope(data, &opener) else { return };
    let before: Value = serde_json::from_slice(data).expect("input parsed once");
    let after: Value = serde_json::from_slice(&out).expect("output is JSON");
    let (Some(b), Some(a)) = (before["events"].as_array(), after["events"].as_array()) else {
        panic!("events array lost");
    };
    assert_eq!(a.len(), b.len());
    assert_eq!(stats.events as usize, b.len());
    assert_eq!((stats.attributed + stats.unattributed) as usize, b.len());
    for (x, y) in b.iter().zip(a) {
        assert_eq!(x.get("id"), y.get("id"), "event id changed");
    }
});
