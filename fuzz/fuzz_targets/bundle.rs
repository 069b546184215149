//! Bundle parsing and validation: any text as bundle JSON, and as a signed bundle (JWS)
//! checked against a fixed operator key. Nothing may panic; a bundle that validates must,
//! once signed, verify to the same revision (JSON → `Value` → JWS claims → policy).
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_guard_core::policy::bundle::{self, Policy};
use registry_guard_core::token::testing::{es256_key, jwks};
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys::SigningKey;

/// The operator key and its key set, derived once.
static OPERATOR: std::sync::OnceLock<Option<(SigningKey, KeySet)>> = std::sync::OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let first = Policy::from_json(text).map(|p| p.revision);
    let operator = OPERATOR.get_or_init(|| {
        let key = es256_key(2);
        KeySet::from_jwks(&jwks(&[&key])).ok().map(|keys| (key, keys))
    });
    if let Some((key, keys)) = operator {
        let _ = bundle::verify(text, keys);
        // A bundle that validates, once signed, must verify with the same revision.
        if let Ok(revision) = first {
            if let Ok(jws) = bundle::sign(text, key) {
                let verified = bundle::verify(&jws, keys).map(|p| p.revision);
                assert_eq!(verified.ok(), Some(revision), "a valid bundle did not verify once signed");
            }
        }
    }
});
