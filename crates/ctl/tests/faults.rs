//! The release tooling cannot produce a filter configuration that traps: `rgctl
//! filter-config` has no fault flag, and `rgctl filter-resource` checks a configuration with
//! the release parser, which refuses the test-only `fault_injection` field (the filter's
//! `fault-injection` feature; the e2e harness adds it to the ECDS file itself).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::Command;

fn rgctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rgctl")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn filter_config_has_no_fault_flag_and_filter_resource_refuses_one() {
    let (ok, help, err) = rgctl(&["filter-config", "--help"]);
    assert!(ok, "{err}");
    assert!(!help.contains("--fault") && !help.contains("--trap") && !help.contains("inject"), "{help}");

    let dir = std::env::temp_dir().join(format!("rgctl-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    let (ok, _, err) = rgctl(&["keygen", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{err}");
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(keys.join("jwks.json")).unwrap()).unwrap();
    let mut config = serde_json::json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
        "issuer": "registry-guard", "jwks": jwks,
    });
    let wasm = dir.join("filter.wasm");
    std::fs::write(&wasm, b"\0asm").unwrap();
    let resource = |config: &serde_json::Value| {
        let path: PathBuf = dir.join("filter.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let out = dir.join("ecds.json");
        rgctl(&[
            "filter-resource",
            "--config",
            path.to_str().unwrap(),
            "--wasm",
            wasm.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (ok, _, err) = resource(&config);
    assert!(ok, "{err}");
    config["fault_injection"] = serde_json::json!({"trap_on_header": "x-registry-guard-trap"});
    let (ok, _, err) = resource(&config);
    assert!(!ok, "a fault configuration was accepted");
    assert!(err.contains("unknown field `fault_injection`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
