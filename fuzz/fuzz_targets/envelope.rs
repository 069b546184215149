//! Notification envelope rewriting: any bytes as an envelope, with a lookup that attributes
//! every address. Nothing may panic; a rewrite keeps the number and order of events and
//! their ids, and its output is JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_guard_core::events::{rewrite_envelope, Attribution};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let lookup = |addr: &str| {
        Some(Attribution {
            addr: addr.to_owned(),
            name: "alice".into(),
            user_type: "password".into(),
            user: Some("u.s.er".into()),
            request_id: Some("edge-1".into()),
            client_addr: Some("127.0.0.1".into()),
        })
    };
    let Ok((out, stats)) = rewrite_envelope(data, lookup) else { return };
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
