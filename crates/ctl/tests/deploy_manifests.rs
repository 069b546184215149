//! The Kubernetes manifests of deploy/istio and deploy/envoy-gateway: the filter configuration
//! each carries (Istio's `pluginConfig`, Envoy Gateway's `wasm[].config`) is accepted by the
//! filter's own parser, with the role the manifest is for, and every manifest fails closed.
//! (Their published schemas: `make test-deploy`, deploy/validate/.)

// A test: its helpers stop the test loudly on anything unexpected.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};

use registry_guard_core::decide::config::PluginConfig;

fn manifests(dir: &str) -> Vec<(PathBuf, serde_json::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let value: serde_json::Value = serde_yaml_ng::from_str(&fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, value)
        })
        .collect()
}

/// The role a configuration is parsed as, after the filter's own parser accepted it.
fn role(config: &serde_json::Value, what: &str) -> &'static str {
    // Istio and Envoy Gateway hand the filter the object as JSON text.
    let text = serde_json::to_string(config).unwrap();
    match PluginConfig::from_json(text.as_bytes()) {
        Ok(PluginConfig::Registry(_)) => "registry",
        Ok(PluginConfig::Events(_)) => "events",
        Err(e) => panic!("{what}: the filter refuses its configuration: {e}"),
    }
}

fn expected_role(name: &str) -> &'static str {
    if name.ends_with("-events") {
        "events"
    } else {
        "registry"
    }
}

#[test]
fn istio_wasmplugins_carry_configurations_the_filter_accepts_and_fail_closed() {
    let all = manifests("istio");
    for (path, m) in &all {
        let what = path.display().to_string();
        assert_eq!(m["apiVersion"], "extensions.istio.io/v1alpha1", "{what}");
        assert_eq!(m["kind"], "WasmPlugin", "{what}");
        let spec = &m["spec"];
        assert_eq!(spec["failStrategy"], "FAIL_CLOSE", "{what}");
        assert_eq!(spec["pluginName"], "registry-guard", "{what}: the filter's root id");
        assert!(spec["url"].as_str().is_some_and(|u| u.starts_with("oci://")), "{what}");
        assert!(spec["sha256"].as_str().is_some_and(|s| s.len() == 64), "{what}: pin the image digest");
        let name = m["metadata"]["name"].as_str().unwrap();
        assert_eq!(role(&spec["pluginConfig"], &what), expected_role(name), "{what}");
    }
    let roles: Vec<&str> = all.iter().map(|(_, m)| expected_role(m["metadata"]["name"].as_str().unwrap())).collect();
    assert!(roles.contains(&"registry") && roles.contains(&"events"), "both roles: {roles:?}");
}

#[test]
fn envoy_gateway_policies_carry_configurations_the_filter_accepts_and_fail_closed() {
    let all = manifests("envoy-gateway");
    for (path, m) in &all {
        let what = path.display().to_string();
        assert_eq!(m["apiVersion"], "gateway.envoyproxy.io/v1alpha1", "{what}");
        assert_eq!(m["kind"], "EnvoyExtensionPolicy", "{what}");
        let wasm = m["spec"]["wasm"].as_array().unwrap_or_else(|| panic!("{what}: no spec.wasm"));
        assert!(!wasm.is_empty(), "{what}");
        for w in wasm {
            assert_eq!(w["failOpen"], false, "{what}");
            assert_eq!(w["rootID"], "registry-guard", "{what}");
            let code = &w["code"];
            let sha = match code["type"].as_str() {
                Some("Image") => &code["image"]["sha256"],
                Some("HTTP") => &code["http"]["sha256"],
                other => panic!("{what}: code.type {other:?}"),
            };
            assert!(sha.as_str().is_some_and(|s| s.len() == 64), "{what}: pin the sha256");
            assert_eq!(role(&w["config"], &what), expected_role(w["name"].as_str().unwrap()), "{what}");
        }
    }
}

#[test]
fn a_configuration_the_filter_refuses_is_caught() {
    // The check above can fail: the registry role's configuration without its keys.
    let (_, m) = manifests("istio").into_iter().find(|(_, m)| m["metadata"]["name"] == "registry-guard").unwrap();
    let mut config = m["spec"]["pluginConfig"].clone();
    config.as_object_mut().unwrap().remove("jwks");
    let e = PluginConfig::from_json(serde_json::to_string(&config).unwrap().as_bytes()).expect_err("refused");
    assert!(e.to_string().contains("jwks"), "{e}");
}
