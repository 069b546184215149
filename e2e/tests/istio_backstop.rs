//! The Istio backstop (deploy/istio/envoyfilter-backstop.yaml) without Kubernetes: the three
//! HTTP filters its patches insert, taken from the manifest as shipped, in a real Envoy, in the
//! order Istio's patches put them (the strip first; RBAC then the removal just before the
//! router). Behind them a stand-in registry (a second listener of the same Envoy) that answers
//! 200, or 500 if the decision header reached it.
//! - No filter marked the request (the WasmPlugin does not apply to the pod): refused, with or
//!   without a client-sent `x-registry-guard-decision: allow`.
//! - A filter in registry-guard's place marked it allowed (a Lua stand-in that sets the header
//!   as the filter does; the real filter setting it is what every other e2e test's route
//!   backstop relies on): it reaches the registry, without the header.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use registry_guard_core::decide::config::DECISION_HEADER;
use registry_guard_e2e::{artifact, free_port, root};
use serde_json::{json, Value};

/// The HTTP filters the manifest's patches insert, in patch order.
fn backstop_filters() -> Vec<Value> {
    let path = root().join("deploy/istio/envoyfilter-backstop.yaml");
    let m: Value = serde_yaml_ng::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    m["spec"]["configPatches"].as_array().unwrap().iter().map(|p| p["patch"]["value"].clone()).collect()
}

struct Envoy {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Envoy with `[strip, middle…, rbac, remove, router]` on its front listener.
fn envoy_with(middle: &[Value]) -> Envoy {
    let f = backstop_filters();
    assert_eq!(f.len(), 3, "{f:?}");
    let (strip, rbac, remove) = (f[0].clone(), f[1].clone(), f[2].clone());
    let mut filters = vec![strip];
    filters.extend_from_slice(middle);
    filters.extend([
        rbac,
        remove,
        json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}),
    ]);
    let (port, registry_port, admin_port) = (free_port(), free_port(), free_port());
    let hcm = |stat: &str, routes: Value, http_filters: Value| {
        json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat,
                "route_config": {"virtual_hosts": [{"name": stat, "domains": ["*"], "routes": routes}]},
                "http_filters": http_filters,
            }
        })
    };
    let listener = |name: &str, port: u16, hcm: Value| {
        json!({"name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
               "filter_chains": [{"filters": [hcm]}]})
    };
    let registry_routes = json!([
        {"match": {"prefix": "/", "headers": [{"name": DECISION_HEADER, "present_match": true}]},
         "direct_response": {"status": 500, "body": {"inline_string": "the decision header reached the registry"}}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "registry reached"}}},
    ]);
    let config = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                listener("inbound", port, hcm("inbound", json!([{"match": {"prefix": "/"}, "route": {"cluster": "registry"}}]), Value::Array(filters))),
                listener("registry", registry_port, hcm("registry", registry_routes, json!([
                    {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]))),
            ],
            "clusters": [{
                "name": "registry", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "registry", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": registry_port}}}}]}]}
            }]
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("envoy.json");
    fs::write(&config_path, config.to_string()).unwrap();
    let log = fs::File::create(dir.path().join("envoy.log")).unwrap();
    let child = Command::new(artifact(".venv/bin/envoy"))
        .args(["-c", config_path.to_str().unwrap(), "--concurrency", "1", "--base-id", &admin_port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let envoy = Envoy { child, port, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("http://127.0.0.1:{admin_port}/ready")).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "envoy did not start: {}",
            fs::read_to_string(envoy._dir.path().join("envoy.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    envoy
}

fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = ureq::get(&format!("http://127.0.0.1:{}/v2/acme/web/app/manifests/v1", envoy.port));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn without_registry_guard_nothing_reaches_the_registry() {
    let envoy = envoy_with(&[]);
    for headers in [
        vec![],
        vec![(DECISION_HEADER, "allow")],
        vec![("X-Registry-Guard-Decision", "allow"), ("Authorization", "Bearer e30.e30.e30")],
    ] {
        let (status, body) = get(&envoy, &headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert!(!body.contains("registry reached"), "{headers:?}: {body}");
    }
}

#[test]
fn what_registry_guard_marked_allowed_reaches_the_registry_without_the_mark() {
    let mark = json!({
        "name": "stand-in-for-registry-guard",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": format!(
                "function envoy_on_request(r)\n  if r:headers():get(\"authorization\") == \"Bearer good\" then r:headers():replace(\"{DECISION_HEADER}\", \"allow\") end\nend\n"
            )}
        }
    });
    let envoy = envoy_with(&[mark]);
    let (status, body) = get(&envoy, &[("Authorization", "Bearer good")]);
    assert_eq!((status, body.as_str()), (200, "registry reached"));
    // Anything the stand-in did not mark is still refused, whatever the client sends.
    for headers in [vec![], vec![(DECISION_HEADER, "allow"), ("Authorization", "Bearer forged")]] {
        let (status, body) = get(&envoy, &headers);
        assert_eq!(status, 403, "{headers:?}: {body}");
    }
}
