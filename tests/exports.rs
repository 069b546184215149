//! The deployed filter keeps only some of the proxy-wasm SDK's exports (`make build` runs
//! `wasm-metadce --graph-file scripts/filter-exports.json`): Envoy does not enter the VM for a
//! callback the module does not export, which saves V8 entries on every request. A stripped
//! callback the filter implements would silently never run — for a response-side check, a
//! hole. This test ties the graph to the code: every SDK callback implemented in `src/` must
//! be kept, and what the SDK itself needs (memory, allocation, context lifecycle) too.
#![allow(clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

/// Each SDK export with the trait method that handles it in the filter's code.
const CALLBACKS: &[(&str, &str)] = &[
    ("proxy_on_vm_start", "fn on_vm_start("),
    ("proxy_on_configure", "fn on_configure("),
    ("proxy_on_tick", "fn on_tick("),
    ("proxy_on_queue_ready", "fn on_queue_ready("),
    ("proxy_on_http_call_response", "fn on_http_call_response("),
    ("proxy_on_request_headers", "fn on_http_request_headers("),
    ("proxy_on_request_body", "fn on_http_request_body("),
    ("proxy_on_request_trailers", "fn on_http_request_trailers("),
    ("proxy_on_response_headers", "fn on_http_response_headers("),
    ("proxy_on_response_body", "fn on_http_response_body("),
    ("proxy_on_response_trailers", "fn on_http_response_trailers("),
    ("proxy_on_log", "fn on_log("),
    ("proxy_on_done", "fn on_done("),
    ("proxy_on_new_connection", "fn on_new_connection("),
    ("proxy_on_downstream_data", "fn on_downstream_data("),
    ("proxy_on_upstream_data", "fn on_upstream_data("),
    ("proxy_on_grpc_receive", "fn on_grpc_stream_message("),
];

/// Needed whatever the filter implements: the SDK's memory, allocator and context lifecycle
/// (without `proxy_on_delete` the SDK would never free a request's context).
const ALWAYS: &[&str] = &[
    "memory",
    "_initialize",
    "proxy_abi_version_0_2_1",
    "proxy_on_memory_allocate",
    "proxy_on_context_create",
    "proxy_on_delete",
    "proxy_on_done",
    "proxy_on_vm_start",
    "proxy_on_configure",
];

fn kept_exports() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/filter-exports.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let graph: Vec<serde_json::Value> = serde_json::from_str(&text).expect("the graph is JSON");
    let roots: Vec<_> = graph.iter().filter(|n| n["root"] == true).collect();
    assert_eq!(roots.len(), 1, "one root (the host) reaching every kept export");
    let reached: BTreeSet<&str> =
        roots[0]["reaches"].as_array().expect("reaches").iter().filter_map(|v| v.as_str()).collect();
    graph
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?, n["export"].as_str()?)))
        .inspect(|(name, export)| assert!(reached.contains(name), "export `{export}` is listed but not reached"))
        .map(|(_, export)| export.to_owned())
        .collect()
}

fn filter_source() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = String::new();
    for entry in std::fs::read_dir(&dir).expect("src/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            all.push_str(&std::fs::read_to_string(&path).expect("source"));
        }
    }
    all
}

#[test]
fn every_implemented_callback_is_exported() {
    let kept = kept_exports();
    let source = filter_source();
    for (export, method) in CALLBACKS {
        if source.contains(method) {
            assert!(kept.contains(*export), "src/ implements `{method}…)` but {export} is stripped from the filter");
        }
    }
    for export in ALWAYS {
        assert!(kept.contains(*export), "{export} must be kept");
    }
    // The roles' own callbacks are found (so the scan itself works).
    for method in ["fn on_http_request_headers(", "fn on_http_request_body(", "fn on_http_call_response("] {
        assert!(source.contains(method), "`{method}` not found in src/");
    }
}

#[test]
fn the_stripped_callbacks_are_the_ones_no_role_implements() {
    let kept = kept_exports();
    let stripped: Vec<&str> = CALLBACKS.iter().map(|(e, _)| *e).filter(|e| !kept.contains(*e)).collect();
    assert_eq!(
        stripped,
        [
            "proxy_on_request_trailers",
            "proxy_on_response_headers",
            "proxy_on_response_body",
            "proxy_on_response_trailers",
            "proxy_on_log"
        ]
    );
}
