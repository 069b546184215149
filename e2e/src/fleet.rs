//! Fleet members beside a [`Stack`]: more Envoys with the filter in front of the same
//! registry (each rendered by `rgctl stack render` into its own directory, only Envoy
//! started), and token-service replicas that follow another token service's bundle
//! (`bundle_source`). Processes are killed on drop.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{artifact, free_port, root, Stack};

/// A process of the fleet, killed on drop.
pub struct Member {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, fs::read_to_string(&self.log).unwrap_or_default());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One more Envoy with the filter, in front of `stack`'s registry, following the token
/// service on `token_port` (`mode`: `long-poll` or `poll`), or the OCI artifact in the
/// registry (`oci`).
pub struct Envoy {
    pub member: Member,
    pub listen_port: u16,
    pub admin_port: u16,
    /// Its `notifications` listener (events role); see [`Stack::point_notifications_at`].
    pub events_port: u16,
}

fn spawn(name: &str, argv: &[String], dir: tempfile::TempDir) -> Member {
    let log = dir.path().join(format!("{name}.log"));
    let f = fs::File::create(&log).expect("log file");
    let (program, args) = argv.split_first().expect("command line");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("clone log"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Member { name: name.to_owned(), child, log, _dir: dir }
}

fn wait_http(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ureq::get(url).timeout(Duration::from_secs(1)).call() {
            Ok(_) | Err(ureq::Error::Status(..)) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what} not ready at {url}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

impl Envoy {
    pub fn start(stack: &Stack, name: &str, token_port: u16, mode: &str) -> Envoy {
        Envoy::start_with(stack, name, token_port, mode, &[])
    }

    /// [`Envoy::start`] with more `rgctl stack render` arguments (e.g. `--keys-source`).
    pub fn start_with(stack: &Stack, name: &str, token_port: u16, mode: &str, extra: &[&str]) -> Envoy {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listen, admin, events, dp_listen) = (free_port(), free_port(), free_port(), free_port());
        let ports = [
            ("listen", listen),
            ("admin", admin),
            ("events", events),
            ("dependency-proxy-listen", dp_listen),
            // Shared with the stack: the registry, the cache and the hub, the consumer.
            ("registry", stack.registry_port),
            ("dependency-proxy", stack.cache_port),
            ("hub", stack.hub_port),
            ("consumer", stack.consumer_port),
            ("token", token_port),
        ]
        .map(|(n, p)| format!("{n}={p}"))
        .join(",");
        let out = dir.path().display().to_string();
        let (root_dir, config_dir) = (root().display().to_string(), stack.config_dir.display().to_string());
        let wasm = artifact("target/filter/registry_guard.wasm").display().to_string();
        let envoy = artifact(".venv/bin/envoy").display().to_string();
        let mut args = vec![
            "stack",
            "render",
            "--root",
            &root_dir,
            "--config-dir",
            &config_dir,
            "--out",
            &out,
            "--ports",
            &ports,
            "--wasm",
            &wasm,
            "--envoy",
            &envoy,
            "--leeway-seconds",
            "2",
            "--bundle-source",
            mode,
            "--bundle-poll-seconds",
            "2",
        ];
        args.extend_from_slice(extra);
        stack.rgctl(&args);
        let summary: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.path().join("stack.json")).expect("stack.json"))
                .expect("json");
        let argv: Vec<String> = summary["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .find(|p| p["name"] == "envoy")
            .expect("envoy process")["command"]
            .as_array()
            .expect("command")
            .iter()
            .map(|a| a.as_str().expect("arg").to_owned())
            .collect();
        let member = spawn(name, &argv, dir);
        wait_http(&format!("http://127.0.0.1:{admin}/ready"), name);
        wait_http(&format!("http://127.0.0.1:{listen}/v2/"), name);
        Envoy { member, listen_port: listen, admin_port: admin, events_port: events }
    }
}

/// A token-service replica following `source_port`'s `GET /bundle` (long polling), on a copy
/// of `stack`'s configuration (same keys and principals, no bundle of its own).
pub struct TokenService {
    pub member: Member,
    pub port: u16,
}

impl TokenService {
    pub fn start_replica(stack: &Stack, name: &str, source_port: u16, wait_seconds: u64) -> TokenService {
        let source = serde_json::json!({
            "url": format!("http://127.0.0.1:{source_port}/bundle"),
            "token_file": "keys/bundle-read-token",
            "poll_seconds": 1,
            "wait_seconds": wait_seconds,
        });
        TokenService::start_following(stack, name, source)
    }

    /// A replica whose `bundle_source` is `source` (e.g. an OCI artifact in the registry).
    pub fn start_following(stack: &Stack, name: &str, source: serde_json::Value) -> TokenService {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        fs::create_dir_all(config.join("keys")).expect("mkdir");
        fs::copy(stack.config_dir.join("principals.json"), config.join("principals.json")).expect("principals");
        for f in fs::read_dir(stack.config_dir.join("keys")).expect("keys") {
            let f = f.expect("entry").path();
            fs::copy(&f, config.join("keys").join(f.file_name().expect("name"))).expect("copy key");
        }
        let mut settings: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(stack.config_dir.join("token-service.json")).expect("settings"))
                .expect("json");
        settings["bundle_source"] = source;
        fs::write(config.join("token-service.json"), settings.to_string()).expect("write settings");
        let port = free_port();
        let argv = [
            artifact("target/release/registry-guard-token-service").display().to_string(),
            "--config-dir".into(),
            config.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        let member = spawn(name, &argv, dir);
        wait_http(&format!("http://127.0.0.1:{port}/healthz"), name);
        TokenService { member, port }
    }
}

/// Envoy's stats as name → value (counters and gauges).
pub fn envoy_stats(admin_port: u16) -> std::collections::BTreeMap<String, i64> {
    let text = ureq::get(&format!("http://127.0.0.1:{admin_port}/stats"))
        .call()
        .expect("envoy stats")
        .into_string()
        .expect("stats text");
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The bundle revision each live filter VM of the registry endpoint enforces (per-VM gauges
/// whose heartbeat is at most 5 s old, as `rgctl status` counts them: a VM that Envoy only
/// configured to validate a configuration claims a slot and never beats again).
pub fn vm_revisions(admin_port: u16) -> Vec<i64> {
    vm_revisions_on(admin_port, "registry")
}

/// [`vm_revisions`] of the filter VMs serving `endpoint` (`registry`, `dependency_proxy`).
pub fn vm_revisions_on(admin_port: u16, endpoint: &str) -> Vec<i64> {
    let stats = envoy_stats(admin_port);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let suffix = format!(".{endpoint}.revision");
    stats
        .iter()
        .filter_map(|(k, v)| {
            let slot = k.strip_prefix("wasmcustom.registry_guard.vm.")?.strip_suffix(suffix.as_str())?;
            let beat = stats.get(&format!("wasmcustom.registry_guard.vm.{slot}.{endpoint}.heartbeat"))?;
            (now - beat <= 5).then_some(*v)
        })
        .collect()
}

/// `active_revision` of a token service.
pub fn token_service_revision(port: u16) -> i64 {
    let text = ureq::get(&format!("http://127.0.0.1:{port}/bundle/status"))
        .call()
        .expect("bundle status")
        .into_string()
        .expect("text");
    let status: serde_json::Value = serde_json::from_str(&text).expect("json");
    status["active_revision"].as_i64().unwrap_or(-1)
}
