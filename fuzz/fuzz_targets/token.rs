//! Token parsing and verification: any bytes as a bearer token, through the verifier, the
//! request-time guard (cache included), the nested `user` JWT check and the unverified
//! decoder. Nothing may panic; anything accepted must really be signed by the trusted key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::token::testing::{es256_key, jwks};
use registry_guard_core::token::user::verify_user_jwt;
use registry_guard_core::token::verify::decode_unverified;

const NOW: i64 = 1_800_000_000;

/// Parsed once: the JWKS parse is not what is being fuzzed here.
static CONFIG: std::sync::OnceLock<Option<FilterConfig>> = std::sync::OnceLock::new();

fn config_kid(kid: &str) -> bool {
    CONFIG.get().and_then(Option::as_ref).is_some_and(|c| c.verifier.keys.kids().eq([kid]))
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let Some(config) = CONFIG
        .get_or_init(|| {
            let cfg = serde_json::json!({
                "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
                "issuer": "registry-guard", "leeway_seconds": 5, "jwks": jwks(&[&es256_key(1)]),
                "cache": {"max_entries": 2},
            });
            FilterConfig::from_json(cfg.to_string().as_bytes()).ok()
        })
        .clone()
    else {
        return;
    };
    let verified = config.verifier.verify(token, NOW);
    let mut guard = Guard::new(config);
    let header = format!("Bearer {token}");
    for _ in 0..2 {
        // Twice: the second pass goes through the cache when the first verified.
        let c = guard.check("GET", "/v2/acme/web/manifests/v1", None, &[&header], NOW);
        if c.decision.is_allow() {
            assert!(verified.is_ok(), "guard allowed a token the verifier refused");
        }
    }
    if let Ok(v) = &verified {
        // The seeds are signed by es256_key(1); a mutant that still verifies must carry the
        // same kid and must not outlive the leeway.
        assert!(config_kid(&v.kid), "verified under an unexpected kid");
        assert!(NOW <= v.expires_at.saturating_add(5));
    }
    if let Some(Some(config)) = CONFIG.get() {
        let _ = verify_user_jwt(token, &config.verifier.keys, NOW, 3600);
    }
    let _ = decode_unverified(token);
});
