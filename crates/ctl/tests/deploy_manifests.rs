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
    let all: Vec<_> = manifests("istio").into_iter().filter(|(_, m)| m["kind"] == "WasmPlugin").collect();
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

/// The Istio backstop (envoyfilter-backstop.yaml) guards the pods and port the registry
/// WasmPlugin serves, with the header the filter sets: first a strip of client copies, then
/// RBAC requiring `allow`, then the removal before the router.
#[test]
fn the_istio_backstop_guards_what_the_registry_wasmplugin_serves() {
    let all = manifests("istio");
    let kinds: Vec<&str> = all.iter().map(|(_, m)| m["kind"].as_str().unwrap()).collect();
    for (path, m) in &all {
        assert!(
            ["WasmPlugin", "EnvoyFilter"].contains(&m["kind"].as_str().unwrap()),
            "{}: unexpected kind {}",
            path.display(),
            m["kind"]
        );
    }
    let (_, plugin) = all.iter().find(|(_, m)| m["metadata"]["name"] == "registry-guard").unwrap();
    let (path, backstop) = all.iter().find(|(_, m)| m["kind"] == "EnvoyFilter").unwrap_or_else(|| panic!("{kinds:?}"));
    let what = path.display().to_string();
    let spec = &backstop["spec"];
    assert_eq!(backstop["metadata"]["namespace"], plugin["metadata"]["namespace"], "{what}");
    assert_eq!(spec["workloadSelector"]["labels"], plugin["spec"]["selector"]["matchLabels"], "{what}: the same pods");
    let ports: Vec<&serde_json::Value> =
        plugin["spec"]["match"][0]["ports"].as_array().unwrap().iter().map(|p| &p["number"]).collect();
    let patches = spec["configPatches"].as_array().unwrap();
    assert_eq!(patches.len(), 3, "{what}");
    for p in patches {
        assert_eq!(p["applyTo"], "HTTP_FILTER", "{what}");
        assert_eq!(p["match"]["context"], "SIDECAR_INBOUND", "{what}");
        assert!(ports.contains(&&p["match"]["listener"]["portNumber"]), "{what}: the WasmPlugin's port {ports:?}");
    }
    let header = registry_guard_core::decide::config::DECISION_HEADER;
    let lua = |p: &serde_json::Value| {
        p["patch"]["value"]["typed_config"]["default_source_code"]["inline_string"].as_str().unwrap().to_owned()
    };
    assert_eq!(patches[0]["patch"]["operation"], "INSERT_FIRST", "{what}");
    assert!(lua(&patches[0]).contains(&format!("remove(\"{header}\")")), "{what}: strips client copies");
    for p in &patches[1..] {
        assert_eq!(p["patch"]["operation"], "INSERT_BEFORE", "{what}");
        assert_eq!(
            p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"], "envoy.filters.http.router",
            "{what}"
        );
    }
    let rules = &patches[1]["patch"]["value"]["typed_config"]["rules"];
    assert_eq!(rules["action"], "ALLOW", "{what}");
    let policies = rules["policies"].as_object().unwrap();
    assert_eq!(policies.len(), 1, "{what}");
    let policy = policies.values().next().unwrap();
    assert_eq!(policy["permissions"][0]["header"]["name"], header, "{what}");
    assert_eq!(policy["permissions"][0]["header"]["string_match"]["exact"], "allow", "{what}");
    assert!(lua(&patches[2]).contains(&format!("remove(\"{header}\")")), "{what}: removed before the registry");
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
