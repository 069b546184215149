//! `rgctl filter-config --keys-source-cluster`: the filter fetches its trusted keys; `--jwks`
//! is then the optional boot fallback (and required without a keys source).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;

fn rgctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rgctl")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn filter_config_with_a_keys_source() {
    let realm = ["filter-config", "--realm", "http://127.0.0.1:5001/jwt/auth"];
    let (ok, _, err) = rgctl(&realm);
    assert!(!ok);
    assert!(err.contains("--jwks"), "{err}");
    let args: Vec<&str> = realm.iter().copied().chain(["--keys-source-cluster", "token_service"]).collect();
    let (ok, out, err) = rgctl(&args);
    assert!(ok, "{err}");
    let config: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        config["keys_source"],
        serde_json::json!({"cluster": "token_service", "path": "/jwks", "refresh_seconds": 30})
    );
    assert!(config.get("jwks").is_none(), "no boot keys: {config}");
    let dir = std::env::temp_dir().join(format!("rgctl-keys-source-{}", std::process::id()));
    let keys = dir.join("keys");
    assert!(rgctl(&["keygen", "--out", keys.to_str().unwrap()]).0);
    let jwks = keys.join("jwks.json");
    let args: Vec<&str> =
        args.iter().copied().chain(["--jwks", jwks.to_str().unwrap(), "--keys-source-refresh-seconds", "5"]).collect();
    let (ok, out, err) = rgctl(&args);
    assert!(ok, "{err}");
    let config: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(config["keys_source"]["refresh_seconds"], 5);
    assert_eq!(config["jwks"]["keys"].as_array().unwrap().len(), 1);
    // Out of range: the filter's own check names the field.
    let mut bad = args.clone();
    *bad.last_mut().unwrap() = "0";
    let (ok, _, err) = rgctl(&bad);
    assert!(!ok);
    assert!(err.contains("$.keys_source.refresh_seconds"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
