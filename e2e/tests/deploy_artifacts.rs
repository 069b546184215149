//! Issue 19, tests without Kubernetes: the filter's OCI image (compat layout) pushed to a real
//! registry with skopeo and pulled back with an off-the-shelf OCI client (`oci-client`),
//! checked as Istio's fetcher checks it; and real Envoy loading the filter remotely (by URL
//! and sha256 from a loopback HTTP server), then the walking skeleton through it, and a wrong
//! sha256 failing closed.

use std::fs;
use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use registry_guard_e2e::{artifact, free_port, mint_token, Options, RemoteWasm, Stack};
use sha2::{Digest as _, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A bare distribution registry on a free loopback port, stopped on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(&format!("http://127.0.0.1:{port}/v2/")).call().is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Registry { child, port, _dir: dir }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn image_round_trip_as_istio_fetches_it() {
    let wasm = artifact("target/filter/registry_guard.wasm");
    let code = fs::read(&wasm).expect("the filter (make build)");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("image");
    let out = Command::new(artifact("target/release/rgctl"))
        .args(["image", "build", "--tag", "e2e"])
        .arg("--wasm")
        .arg(&wasm)
        .arg("--out")
        .arg(&layout)
        .output()
        .unwrap();
    assert!(out.status.success(), "rgctl image build: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    eprintln!("{printed}");
    let manifest_digest = printed
        .lines()
        .find_map(|l| l.strip_prefix("manifest "))
        .expect("rgctl prints the manifest digest")
        .trim()
        .to_owned();

    // Push with skopeo, as `make publish-image` does.
    let registry = Registry::start();
    let reference = format!("127.0.0.1:{}/registry-guard/filter:e2e", registry.port);
    let push = Command::new("skopeo")
        .env("HOME", work.path())
        .args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:e2e", layout.display()),
            &format!("docker://{reference}"),
        ])
        .output()
        .unwrap();
    assert!(push.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&push.stderr));

    // Pull with an off-the-shelf OCI client.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let parsed: oci_client::Reference = reference.parse().unwrap();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    let (manifest, digest) = runtime.block_on(client.pull_image_manifest(&parsed, &auth)).expect("pull the manifest");
    // Istio compares a WasmPlugin's sha256 with the manifest digest: the registry's must be
    // the one rgctl computed (skopeo pushed the manifest unchanged).
    assert_eq!(digest, manifest_digest, "manifest digest after the round trip");
    // Not Docker schema 2: Istio reads it as an OCI image, compat variant.
    assert_eq!(manifest.media_type.as_deref(), Some("application/vnd.oci.image.manifest.v1+json"));
    assert_eq!(
        manifest.annotations.as_ref().and_then(|a| a.get("module.wasm.image/variant")).map(String::as_str),
        Some("compat")
    );
    assert_eq!(manifest.layers.len(), 1, "the compat variant: one layer");
    let layer = &manifest.layers[0];
    assert_eq!(layer.media_type, "application/vnd.oci.image.layer.v1.tar+gzip");
    let image = runtime
        .block_on(client.pull(&parsed, &auth, vec!["application/vnd.oci.image.layer.v1.tar+gzip"]))
        .expect("pull the image");
    assert_eq!(image.layers.len(), 1);
    let blob = &image.layers[0].data;
    assert_eq!(format!("sha256:{}", sha256_hex(blob)), layer.digest, "layer digest");
    // Istio: gunzip, untar, the entry whose base name is plugin.wasm.
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&blob[..]));
    let mut files = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        files.push((entry.path().unwrap().display().to_string(), bytes));
    }
    assert_eq!(files.len(), 1, "one file in the layer");
    assert_eq!(files[0].0, "plugin.wasm");
    assert!(files[0].1 == code, "plugin.wasm is the filter, byte for byte");
    eprintln!(
        "pulled {reference}: manifest {digest}, layer {} ({} bytes), plugin.wasm sha256:{}",
        layer.digest,
        blob.len(),
        sha256_hex(&files[0].1)
    );

    // A tag that does not exist is an error, not an empty image.
    let missing: oci_client::Reference =
        format!("127.0.0.1:{}/registry-guard/filter:nope", registry.port).parse().unwrap();
    assert!(runtime.block_on(client.pull_image_manifest(&missing, &auth)).is_err());
}

#[test]
fn envoy_loads_the_filter_by_url_and_sha256_then_the_walking_skeleton() {
    let stack = Stack::start_with(Options { remote_wasm: Some(RemoteWasm::default()), ..Default::default() });
    // Envoy's configuration names the URL and the sha256, not a file.
    let ecds: serde_json::Value = serde_json::from_str(&fs::read_to_string(stack.ecds_file()).unwrap()).unwrap();
    let code = &ecds["resources"][0]["typed_config"]["config"]["vm_config"]["code"];
    let filter = fs::read(artifact("target/filter/registry_guard.wasm")).unwrap();
    assert_eq!(code["remote"]["sha256"], sha256_hex(&filter).as_str(), "{code}");
    assert_eq!(code["remote"]["http_uri"]["uri"], stack.wasm_url().as_str());
    assert!(code.get("local").is_none());
    // …and Envoy fetched it from the loopback server.
    assert!(stack.log("wasm-server").contains("GET /registry_guard.wasm"), "{}", stack.log("wasm-server"));

    let host = stack.registry_host();
    let ok = stack.skopeo(&["login", "--tls-verify=false", "-u", "alice", "-p", "alice-pass", &host]);
    assert!(ok.status.success(), "login as alice failed");
    let _ = stack.skopeo(&["logout", "--all"]);
    let push = stack.push("dev", "dev-pass", "acme/web/app", "v1");
    assert!(push.status.success(), "push as dev through the remotely loaded filter failed");
    let inspect = stack.inspect("rita", "rita-pass", "acme/web/app", "v1");
    assert!(inspect.status.success(), "inspect as rita failed");
    let denied = stack.push("rita", "rita-pass", "acme/web/app", "v2");
    assert!(!denied.status.success(), "a reporter pushed through the remotely loaded filter");
    stack.assert_fail_closed();
}

#[test]
fn a_wrong_sha256_fails_closed() {
    let wrong = "0".repeat(64);
    let stack =
        Stack::start_with(Options { remote_wasm: Some(RemoteWasm { sha256: Some(wrong) }), ..Default::default() });
    // Envoy did fetch the module, and refused it.
    assert!(stack.log("wasm-server").contains("GET /registry_guard.wasm"), "{}", stack.log("wasm-server"));
    let key = stack.signing_key();
    let owner = mint_token(&key, "e2e-owner", "acme/web/app", &["pull", "push", "delete"], Some(50));
    for round in 0..4 {
        for (what, method, path, bearer) in [
            ("anonymous base", "GET", "/v2/", None),
            ("anonymous catalog", "GET", "/v2/_catalog", None),
            ("owner tags", "GET", "/v2/acme/web/app/tags/list", Some(owner.as_str())),
            ("owner manifest push", "PUT", "/v2/acme/web/app/manifests/unchecked", Some(owner.as_str())),
        ] {
            let r = stack.request(method, path, bearer);
            assert_eq!(r.status, 503, "round {round}: {what}: {method} {path} -> {} {}", r.status, r.body);
        }
    }
    // skopeo with valid credentials gets nothing through either.
    let push = stack.push("dev", "dev-pass", "acme/web/app", "v1");
    assert!(!push.status.success(), "a push passed an Envoy whose filter failed to load");
    // Nothing reached the registry under /v2/acme.
    let registry_log = stack.log("registry");
    assert!(!registry_log.contains("/v2/acme"), "a request was forwarded unchecked: {registry_log}");
    let envoy_log = stack.log("envoy");
    eprintln!("envoy log mentions of the failed load:");
    for line in envoy_log.lines().filter(|l| l.contains("sha256") || l.contains("wasm")).take(10) {
        eprintln!("  {line}");
    }
}
