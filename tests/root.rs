//! The root context against a fake host: configuration (accepted, refused, kept), the
//! per-VM slot claimed by compare-and-swap, and the worker gauges it renews on every tick.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod fake;

use std::rc::Rc;
use std::time::Duration;

use fake::{bearer_signed_by, registry_config, take_logs, FakeHost, Shared, NOW};
use proxy_wasm::types::Action;
use registry_guard::root::VM_SLOTS_KEY;
use registry_guard::{GuardRoot, HttpFilter, RegistryHttp, Vm};

fn registry(root: &GuardRoot) -> RegistryHttp {
    match root.http_context(7) {
        HttpFilter::Registry(http) => http,
        HttpFilter::Events(_) => panic!("events role"),
    }
}

/// A bodiless pull of `acme/web/app:v1` with `authorization` through a fresh HTTP context.
fn pull(root: &GuardRoot, host: &mut FakeHost, authorization: Option<&str>) -> Action {
    host.new_request("GET", "/v2/acme/web/app/manifests/v1");
    if let Some(a) = authorization {
        host.headers.push(("authorization".into(), a.into()));
    }
    registry(root).request_headers(host, true)
}

fn configure(root: &mut GuardRoot, host: &mut FakeHost, config: &serde_json::Value) -> bool {
    host.configuration = Some(config.to_string().into_bytes());
    root.configure(host)
}

#[test]
fn a_good_configuration_is_accepted_and_serves() {
    take_logs();
    let mut host = FakeHost::default().with_configuration(&registry_config(1));
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(root.configure(&mut host));
    let logs = take_logs();
    assert!(logs.iter().any(|l| l.starts_with("INFO registry-guard configured: bundle revision 0")), "{logs:?}");
    // Metrics are defined and the flush tick asked for once.
    assert_eq!(host.tick_period, Some(Duration::from_secs(1)));
    assert!(host.has_metric("registry_guard.requests_allowed_total"));
    // Serving: a valid token is marked allowed; none gets the challenge.
    assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(1, &["pull"]))), Action::Continue);
    assert_eq!(host.header("x-registry-guard-decision"), Some("allow"));
    assert!(host.replies.is_empty());
    assert_eq!(pull(&root, &mut host, None), Action::Pause);
    assert_eq!(host.replies[0].0, 401);
    assert_eq!(host.header("x-registry-guard-decision"), None);
}

#[test]
fn a_bad_configuration_is_refused_naming_what_is_wrong() {
    let mut bad_key = registry_config(1);
    bad_key["jwks"] = serde_json::json!({"keys": []});
    let mut typo = registry_config(1);
    typo["leeway"] = 3.into();
    let mut realm = registry_config(1);
    realm["realm"] = "ftp://x".into();
    for (config, field) in [
        (bad_key, "$.jwks"),
        (typo, "unknown field `leeway`"),
        (realm, "$.realm: `ftp://x` is not an http(s) URL"),
        (serde_json::json!({"role": "audit"}), "$.role: unknown role `audit`"),
        (serde_json::json!("not an object"), "$"),
    ] {
        take_logs();
        let mut host = FakeHost::default();
        let mut root = GuardRoot::new(Rc::new(Vm::default()));
        assert!(!configure(&mut root, &mut host, &config), "{config}");
        let logs = take_logs();
        let refusal = logs.iter().find(|l| l.starts_with("ERROR registry-guard: rejected configuration: "));
        assert!(refusal.is_some_and(|l| l.contains(field)), "{field}: {logs:?}");
        assert_eq!(host.metric("registry_guard.bundle_rejected_total"), 1);
        // A root that never had a configuration refuses every request (503, never marked).
        assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(1, &["pull"]))), Action::Pause);
        assert_eq!(host.replies[0].0, 503);
        assert_eq!(host.header("x-registry-guard-decision"), None);
    }
    // No configuration at all.
    take_logs();
    let mut host = FakeHost::default();
    assert!(!GuardRoot::new(Rc::new(Vm::default())).configure(&mut host));
    assert!(take_logs().iter().any(|l| l.contains("plugin configuration is empty")));
}

#[test]
fn after_a_refused_configuration_the_previous_one_keeps_serving() {
    let mut host = FakeHost::default();
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(configure(&mut root, &mut host, &registry_config(1)));
    let mut bad = registry_config(2);
    bad["issuer"] = "".into();
    take_logs();
    assert!(!configure(&mut root, &mut host, &bad));
    assert!(take_logs().iter().any(|l| l.contains("rejected configuration: filter configuration: $.issuer")));
    // Still the first configuration: its key is trusted, the refused one's is not.
    assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(1, &["pull"]))), Action::Continue);
    assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(2, &["pull"]))), Action::Pause);
    assert_eq!(host.replies[0].0, 401);
    // A good configuration replaces it.
    assert!(configure(&mut root, &mut host, &registry_config(2)));
    assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(2, &["pull"]))), Action::Continue);
    assert_eq!(pull(&root, &mut host, Some(&bearer_signed_by(1, &["pull"]))), Action::Pause);
}

#[test]
fn an_older_bundle_revision_is_accepted_by_the_filter() {
    // Rollback protection lives in the delivery tools and the token service: the filter's
    // decision depends on the configuration alone (Envoy's workers must accept what its main
    // thread accepted), so a lower revision is activated like any other.
    let operator = registry_guard_core::token::testing::es256_key(9);
    let with_revision = |revision: u64| {
        let mut c = registry_config(1);
        let bundle = serde_json::json!({"revision": revision}).to_string();
        c["bundle_keys"] = registry_guard_core::token::testing::jwks(&[&operator]);
        c["bundle"] = registry_guard_core::policy::bundle::sign(&bundle, &operator).unwrap().into();
        c
    };
    let vm = Rc::new(Vm::default());
    let mut host = FakeHost::default();
    let mut newer = GuardRoot::new(vm.clone());
    assert!(configure(&mut newer, &mut host, &with_revision(5)));
    assert_eq!(host.metric("registry_guard.bundle_revision"), 5);
    let mut older = GuardRoot::new(vm);
    assert!(configure(&mut older, &mut host, &with_revision(3)));
    assert_eq!(host.metric("registry_guard.bundle_revision"), 3);
    assert_eq!(host.metric("registry_guard.vm.0.registry.revision"), 3);
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn the_release_filter_refuses_fault_injection() {
    // Built without the `fault-injection` feature, the filter cannot be told to trap.
    let mut config = registry_config(1);
    config["fault_injection"] = serde_json::json!({"trap_on_header": "x-registry-guard-trap"});
    take_logs();
    let mut host = FakeHost::default();
    assert!(!configure(&mut GuardRoot::new(Rc::new(Vm::default())), &mut host, &config));
    let logs = take_logs();
    assert!(
        logs.iter().any(|l| l.contains("rejected configuration") && l.contains("unknown field `fault_injection`")),
        "{logs:?}"
    );
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_test_only_filter_refuses_a_configuration_after_the_first_vm() {
    let mut config = registry_config(1);
    config["fault_injection"] = serde_json::json!({"refuse_configure_after_first": true});
    let shared = Shared::default();
    let mut main_thread = FakeHost::default().with_shared(&shared);
    assert!(configure(&mut GuardRoot::new(Rc::new(Vm::default())), &mut main_thread, &config));
    let mut worker = FakeHost::default().with_shared(&shared);
    assert!(!configure(&mut GuardRoot::new(Rc::new(Vm::default())), &mut worker, &config));
}

#[test]
fn each_vm_claims_its_own_slot_by_compare_and_swap() {
    let shared = Shared::default();
    let (first, second) = (Rc::new(Vm::default()), Rc::new(Vm::default()));
    let mut host = FakeHost::default().with_shared(&shared);
    assert_eq!(first.slot(&mut host), Some(0));
    assert_eq!(second.slot(&mut host), Some(1));
    // Claimed once: a VM keeps its slot across configurations.
    assert_eq!(first.slot(&mut host), Some(0));
    assert_eq!(shared.text(VM_SLOTS_KEY).as_deref(), Some("2"));
    // Other VMs win the swap three times in a row: this one retries and takes the next free slot.
    let third = Vm::default();
    let mut racing = FakeHost { lose_cas: 3, ..FakeHost::default().with_shared(&shared) };
    assert_eq!(third.slot(&mut racing), Some(5));
    assert_eq!(shared.text(VM_SLOTS_KEY).as_deref(), Some("6"));
    // Shared data unavailable: no slot (and no gauges), but no failure either.
    take_logs();
    let mut broken = FakeHost { fail_shared: true, ..FakeHost::default() };
    assert_eq!(Vm::default().slot(&mut broken), None);
    assert!(take_logs().iter().any(|l| l.contains("cannot read the VM slot counter")));
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(configure(&mut root, &mut broken, &registry_config(1)));
    assert!(!broken.metric_names.iter().any(|n| n.starts_with("registry_guard.vm.")));
}

#[test]
fn worker_gauges_report_revision_heartbeat_and_serving() {
    let shared = Shared::default();
    let mut host = FakeHost::default().with_shared(&shared);
    // Another VM (Envoy's main thread) took slot 0.
    assert_eq!(Vm::default().slot(&mut host), Some(0));
    let vm = Rc::new(Vm::default());
    let mut root = GuardRoot::new(vm.clone());
    assert!(configure(&mut root, &mut host, &registry_config(1)));
    assert_eq!(host.metric("registry_guard.vm.1.registry.revision"), 0);
    assert_eq!(host.metric("registry_guard.vm.1.registry.heartbeat"), NOW as u64);
    assert_eq!(host.metric("registry_guard.vm.1.registry.serving"), 0);
    // Serving once a request arrives, reported at the next tick.
    let _ = root.http_context(1);
    root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.vm.1.registry.serving"), 1);
    // The dependency-proxy endpoint has its own gauges, same slot.
    let mut proxy = registry_config(1);
    proxy["endpoint"] = "dependency-proxy".into();
    let mut proxy_root = GuardRoot::new(vm.clone());
    assert!(configure(&mut proxy_root, &mut host, &proxy));
    assert_eq!(host.metric("registry_guard.vm.1.dependency_proxy.heartbeat"), NOW as u64);
    // A newer configuration for the registry endpoint: only it beats there from now on.
    let operator = registry_guard_core::token::testing::es256_key(9);
    let mut newer = registry_config(1);
    newer["bundle_keys"] = registry_guard_core::token::testing::jwks(&[&operator]);
    newer["bundle"] =
        registry_guard_core::policy::bundle::sign(&serde_json::json!({"revision": 4}).to_string(), &operator)
            .unwrap()
            .into();
    let mut newer_root = GuardRoot::new(vm);
    assert!(configure(&mut newer_root, &mut host, &newer));
    assert_eq!(host.metric("registry_guard.vm.1.registry.revision"), 4);
    assert_eq!(host.metric("registry_guard.vm.1.registry.serving"), 0);
    root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.vm.1.registry.revision"), 4, "the old configuration no longer beats");
    proxy_root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.vm.1.registry.revision"), 4);
    assert_eq!(shared.text(VM_SLOTS_KEY).as_deref(), Some("2"));
}

#[test]
fn counts_wait_for_the_tick() {
    let mut host = FakeHost::default();
    let mut root = GuardRoot::new(Rc::new(Vm::default()));
    assert!(configure(&mut root, &mut host, &registry_config(1)));
    assert_eq!(pull(&root, &mut host, None), Action::Pause);
    assert_eq!(host.metric("registry_guard.requests_denied_total"), 0);
    root.tick(&mut host);
    assert_eq!(host.metric("registry_guard.requests_denied_total"), 1);
    assert_eq!(pull(&root, &mut host, None), Action::Pause);
    root.done(&mut host);
    assert_eq!(host.metric("registry_guard.requests_denied_total"), 2);
}
