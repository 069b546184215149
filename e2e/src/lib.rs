//! End-to-end harness: starts the real registry (distribution), the token service and Envoy
//! with the built filter on free loopback ports, from the files `rgctl stack render` writes
//! (as `make run` does: the same templates, keys and command lines), and drives them with
//! skopeo and raw HTTP. Every process is killed when the [`Stack`] drops; on a
//! failing test the components' logs are printed.
//!
//! Artifacts are the release builds (`make test` builds them first):
//! `target/release/{rgctl,registry-guard-token-service}`,
//! `target/filter/registry_guard.wasm`, `.venv/bin/envoy`; a stack started with a fault
//! option loads the test-only `target/filter-faults/registry_guard.wasm` instead (`make
//! build-faults`, the filter's `fault-injection` feature).

pub mod clients;
pub mod fleet;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The consumer's read credential (`--read-token-file`) in every stack.
pub const CONSUMER_READ_TOKEN: &str = "e2e-consumer-read-token";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn artifact(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(p.exists(), "missing artifact {} — run `make test` (it builds release artifacts first)", p.display());
    p
}

/// A free loopback port (bound then released; good enough on a test machine).
/// A loopback port nobody listens on now and that this test process has not handed out
/// before: the port is released before the component binds it, so without the memory two
/// stacks started in parallel could be given the same port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let port = l.local_addr().expect("local addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The environment every stack's components serve (`environment` in the example
/// token-service.json; `rgctl filter-config --environment`).
pub const ENVIRONMENT: &str = "example";
/// The id of the rule [`Stack::sign_bundle`] adds to every bundle.
pub const CANARY_RULE: &str = "e2e-canary";
/// The tag the canary rule protects (push needs admin, so an owner is denied).
pub const CANARY_TAG: &str = "e2e-canary";

/// `bundle` with this stack's environment (if it names none) and the canary rule (if absent).
pub fn with_canary(bundle: &serde_json::Value) -> serde_json::Value {
    let mut bundle = bundle.clone();
    let Some(obj) = bundle.as_object_mut() else { return bundle };
    obj.entry("environment").or_insert_with(|| ENVIRONMENT.into());
    let rules = obj.entry("protection_rules").or_insert_with(|| serde_json::json!([]));
    if let Some(rules) = rules.as_array_mut() {
        if !rules.iter().any(|r| r["id"] == CANARY_RULE) {
            rules.push(serde_json::json!({
                "id": CANARY_RULE,
                "owner": {"project": "acme/web"},
                "description": "e2e harness: proves after every push that protection is enforced",
                "repository_path_pattern": "acme/web/*",
                "tag_name_pattern": format!("^{CANARY_TAG}$"),
                "minimum_access_level_for_push": "admin",
            }));
        }
    }
    bundle
}

/// A registry token signed with `key` for `subject`, granting `actions` on `repository` (with
/// `meta.access_level` when given); valid for five minutes.
pub fn mint_token(
    key: &registry_guard_core::token::keys::SigningKey,
    subject: &str,
    repository: &str,
    actions: &[&str],
    access_level: Option<u8>,
) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let mut grant = serde_json::json!({"type": "repository", "name": repository, "actions": actions});
    if let Some(level) = access_level {
        grant["meta"] = serde_json::json!({ "access_level": level });
    }
    let claims = serde_json::json!({
        "iss": "registry-guard", "sub": subject, "aud": "container_registry", "jti": format!("e2e-{now}-{subject}"),
        "auth_type": "password", "access": [grant],
    });
    let validity =
        registry_guard_core::token::sign::Validity { issued_at: now, not_before: now, expires_at: now + 300 };
    registry_guard_core::token::sign::sign(key, claims, validity).expect("sign token")
}

pub struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub config_dir: PathBuf,
    pub envoy_port: u16,
    pub token_port: u16,
    pub registry_port: u16,
    pub admin_port: u16,
    pub cache_port: u16,
    pub hub_port: u16,
    pub consumer_port: u16,
    pub events_port: u16,
    /// Envoy's dependency-proxy listener (the group dependency proxy on its own endpoint).
    pub dependency_proxy_listen_port: u16,
    /// Whether the registry verifies tokens itself (see [`Options::registry_token_auth`]).
    pub registry_token_auth: bool,
    /// TEST ONLY: see [`Options::trap_on_header`].
    pub trap_on_header: Option<String>,
    /// TEST ONLY: see [`Options::refuse_configure_after_first`].
    pub refuse_configure_after_first: bool,
    /// See [`Options::bundle_source`].
    pub bundle_source: Option<&'static str>,
    /// See [`Options::keys_refresh_seconds`].
    pub keys_refresh_seconds: Option<u64>,
    /// See [`Options::remote_wasm`].
    pub remote_wasm: Option<RemoteWasm>,
    /// The loopback HTTP server the filter is fetched from with [`Options::remote_wasm`].
    pub wasm_server_port: u16,
    /// See [`Options::tls`].
    pub tls: bool,
    procs: Vec<Proc>,
    /// Each process's command line from `rgctl stack render`'s stack.json, by name.
    commands: Vec<(String, Vec<String>)>,
}

/// How to start a [`Stack`]; `Options::default()` is what [`Stack::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `token_ttl_seconds` of the token service (the example's 300 when `None`).
    pub token_ttl_seconds: Option<i64>,
    /// `login_limits.per_client` of the token service as `(burst, per_minute)`: every e2e
    /// client is 127.0.0.1, so a test that logs in at a high rate raises it (the defaults
    /// when `None`).
    pub per_client_login_rate: Option<(u64, u64)>,
    /// Defence in depth: the registry verifies the same tokens itself (`auth: token`, with a
    /// self-signed certificate of the token signing key as `rootcertbundle`), and the token
    /// service puts libtrust key ids in token headers (`kid_format: libtrust`).
    pub registry_token_auth: bool,
    /// TEST ONLY fault injection: the filter traps its wasm VM on requests carrying this
    /// header (`fault_injection.trap_on_header` in the filter configuration).
    pub trap_on_header: Option<String>,
    /// TEST ONLY fault injection: the filter refuses its configuration on every VM after
    /// the first (Envoy's main thread), so workers end up with no filter and Envoy's
    /// backstop must refuse every request (`fault_injection.refuse_configure_after_first`).
    pub refuse_configure_after_first: bool,
    /// The filter follows the token service's bundle itself: `"long-poll"` or `"poll"` (`rgctl
    /// stack render --bundle-source`); `None`: only through its ECDS files.
    pub bundle_source: Option<&'static str>,
    /// The filter fetches its trusted keys from the token service's `/jwks` every this many
    /// seconds (`rgctl stack render --keys-source token-service`); `None`: keys only in its
    /// configuration.
    pub keys_refresh_seconds: Option<u64>,
    /// Envoy fetches the filter by URL from a loopback HTTP server (Python's `http.server`
    /// serving target/filter/) and checks its sha256 (`rgctl stack render --wasm-url`),
    /// instead of reading the file.
    pub remote_wasm: Option<RemoteWasm>,
    /// Clients reach Envoy over TLS with a development CA (`rgctl stack render --tls`):
    /// [`Stack::tls_ca`]; the realm is https on Envoy's registry listener. Helpers that use
    /// plain HTTP to Envoy (`request`, `push`, `inspect`, `url`) do not apply.
    pub tls: bool,
}

/// How Envoy fetches the filter with [`Options::remote_wasm`].
#[derive(Debug, Clone, Default)]
pub struct RemoteWasm {
    /// The sha256 Envoy checks (`--wasm-sha256`); `None`: the filter's own.
    pub sha256: Option<String>,
}

impl Stack {
    /// Starts everything with the example principals and a fresh signing key.
    pub fn start() -> Stack {
        Stack::start_with(Options::default())
    }

    /// Starts everything as [`Stack::start`] does, adjusted by `options`.
    pub fn start_with(options: Options) -> Stack {
        remember_panics();
        let dir = tempfile::tempdir().expect("tempdir");
        let config_dir = dir.path().join("config");
        fs::create_dir_all(&config_dir).expect("mkdir config");
        for f in ["principals.json", "token-service.json"] {
            fs::copy(root().join("policies/example").join(f), config_dir.join(f)).expect("copy example config");
        }
        let settings_path = config_dir.join("token-service.json");
        let mut settings: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&settings_path).expect("read settings")).expect("settings json");
        if let Some(ttl) = options.token_ttl_seconds {
            settings["token_ttl_seconds"] = ttl.into();
        }
        if let Some((burst, per_minute)) = options.per_client_login_rate {
            settings["login_limits"] = serde_json::json!({"per_client": {"burst": burst, "per_minute": per_minute}});
        }
        if options.registry_token_auth {
            settings["kid_format"] = "libtrust".into();
        }
        fs::write(&settings_path, settings.to_string()).expect("write settings");
        let mut stack = Stack {
            config_dir,
            envoy_port: free_port(),
            token_port: free_port(),
            registry_port: free_port(),
            admin_port: free_port(),
            cache_port: free_port(),
            hub_port: free_port(),
            consumer_port: free_port(),
            events_port: free_port(),
            dependency_proxy_listen_port: free_port(),
            registry_token_auth: options.registry_token_auth,
            trap_on_header: options.trap_on_header.clone(),
            refuse_configure_after_first: options.refuse_configure_after_first,
            bundle_source: options.bundle_source,
            keys_refresh_seconds: options.keys_refresh_seconds,
            remote_wasm: options.remote_wasm.clone(),
            wasm_server_port: free_port(),
            tls: options.tls,
            procs: Vec::new(),
            commands: Vec::new(),
            dir,
        };
        // Secrets the tests know; `rgctl stack render` keeps files that exist.
        fs::write(stack.path("events-secret"), "e2e-events-secret").expect("events secret");
        fs::write(stack.path("consumer-read-token"), CONSUMER_READ_TOKEN).expect("consumer read token");
        fs::write(stack.path("http-secret"), "e2e-http-secret").expect("http secret");
        stack.render_stack();
        if stack.registry_token_auth {
            stack.write_token_signing_cert();
        }
        stack.start_consumer();
        stack.start_registry();
        stack.start_token_service();
        if stack.remote_wasm.is_some() {
            stack.start_wasm_server();
        }
        stack.start_envoy();
        stack
    }

    /// The loopback HTTP server Envoy fetches the filter from ([`Options::remote_wasm`]).
    fn start_wasm_server(&mut self) {
        let dir = self.filter_wasm().parent().expect("filter directory").to_owned();
        let port = self.wasm_server_port.to_string();
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"]).arg(&dir).arg(&port);
        self.spawn("wasm-server", &mut cmd);
        self.wait_http(self.wasm_server_port, "/", "wasm-server");
    }

    /// The URL Envoy fetches the filter from with [`Options::remote_wasm`].
    pub fn wasm_url(&self) -> String {
        let file = self.filter_wasm();
        let name = file.file_name().and_then(|n| n.to_str()).expect("filter file name");
        format!("http://127.0.0.1:{}/{name}", self.wasm_server_port)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn rgctl(&self, args: &[&str]) -> String {
        let out = Command::new(artifact("target/release/rgctl")).args(args).output().expect("run rgctl");
        assert!(out.status.success(), "rgctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Every file of the stack (keys, registry/hub/cache configs, Envoy's bootstrap, both
    /// filter endpoints' ECDS files) by `rgctl stack render`, as `make run` renders them;
    /// the processes' command lines come from its stack.json.
    fn render_stack(&mut self) {
        let ports = [
            ("listen", self.envoy_port),
            ("token", self.token_port),
            ("registry", self.registry_port),
            ("admin", self.admin_port),
            ("dependency-proxy", self.cache_port),
            ("hub", self.hub_port),
            ("consumer", self.consumer_port),
            ("events", self.events_port),
            ("dependency-proxy-listen", self.dependency_proxy_listen_port),
        ]
        .map(|(name, port)| format!("{name}={port}"))
        .join(",");
        let wasm = self.filter_wasm();
        let (root, config, out) = (root(), self.config_dir.clone(), self.dir.path().to_owned());
        let mut args: Vec<String> = vec!["stack".into(), "render".into()];
        for (flag, value) in [
            ("--root", root.display().to_string()),
            ("--config-dir", config.display().to_string()),
            ("--out", out.display().to_string()),
            ("--ports", ports),
            ("--wasm", wasm.display().to_string()),
            ("--envoy", artifact(".venv/bin/envoy").display().to_string()),
            ("--token-service", artifact("target/release/registry-guard-token-service").display().to_string()),
            ("--consumer", artifact("target/release/registry-guard-consumer").display().to_string()),
            ("--leeway-seconds", "2".into()),
        ] {
            args.extend([flag.to_owned(), value]);
        }
        if let Some(mode) = self.bundle_source {
            args.extend([
                "--bundle-source".to_owned(),
                mode.to_owned(),
                "--bundle-poll-seconds".to_owned(),
                "2".to_owned(),
            ]);
        }
        if let Some(seconds) = self.keys_refresh_seconds {
            args.extend([
                "--keys-source".to_owned(),
                "token-service".to_owned(),
                "--keys-refresh-seconds".to_owned(),
                seconds.to_string(),
            ]);
        }
        if self.tls {
            args.push("--tls".to_owned());
        }
        if let Some(remote) = &self.remote_wasm {
            args.extend(["--wasm-url".to_owned(), self.wasm_url()]);
            if let Some(sha) = &remote.sha256 {
                args.extend(["--wasm-sha256".to_owned(), sha.clone()]);
            }
        }
        if self.registry_token_auth {
            args.extend([
                "--registry-token-auth".to_owned(),
                self.path("token-signing-cert.pem").display().to_string(),
            ]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.rgctl(&refs);
        self.inject_faults();
        let summary: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(self.path("stack.json")).expect("stack.json")).expect("json");
        self.commands = summary["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .map(|p| {
                let argv =
                    p["command"].as_array().expect("command").iter().map(|a| a.as_str().expect("arg").to_owned());
                (p["name"].as_str().expect("name").to_owned(), argv.collect())
            })
            .collect();
    }

    /// Starts the process `name` of stack.json (its command line as rendered).
    fn start_process(&mut self, name: &'static str) {
        let argv = self
            .commands
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, argv)| argv.clone())
            .unwrap_or_else(|| panic!("no process `{name}` in stack.json"));
        let (program, args) = argv.split_first().expect("empty command line");
        self.spawn(name, Command::new(program).args(args));
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = self.path(&format!("{name}.log"));
        let f = fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.procs.push(Proc { name, child, log });
    }

    fn start_registry(&mut self) {
        self.start_process("registry");
        self.wait_http(self.registry_port, "/v2/", "registry");
        // The dependency proxy: a pull-through cache in front of a local "hub".
        self.start_process("hub");
        self.wait_http(self.hub_port, "/v2/", "hub");
        self.start_process("dependency-proxy");
        self.wait_http(self.cache_port, "/v2/", "dependency-proxy");
    }

    /// A self-signed X.509 certificate (openssl) of the token signing key, which the
    /// registry's `auth: token` section trusts (`rgctl stack render --registry-token-auth`):
    /// distribution 2.8 looks a token's `kid` up among the libtrust key ids of the
    /// certificates in `rootcertbundle`.
    fn write_token_signing_cert(&self) {
        let cert = self.path("token-signing-cert.pem");
        let out = Command::new("openssl")
            .args(["req", "-new", "-x509", "-days", "2", "-subj", "/CN=registry-guard token signing"])
            .arg("-key")
            .arg(self.config_dir.join("keys/signing-key.pem"))
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Sends SIGHUP to the token service (it re-reads its key ring) and waits until its
    /// `/jwks` lists exactly `kids` (in order).
    pub fn reload_token_service_keys(&self, kids: &[String]) {
        let pid = self.procs.iter().find(|p| p.name == "token-service").expect("token service").child.id();
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -HUP {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = self.jwks_kids();
            if listed == kids {
                return;
            }
            assert!(Instant::now() < deadline, "token service /jwks lists {listed:?}, expected {kids:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The key ids the token service publishes at `/jwks`.
    pub fn jwks_kids(&self) -> Vec<String> {
        let text = ureq::get(&format!("http://127.0.0.1:{}/jwks", self.token_port))
            .call()
            .expect("GET /jwks")
            .into_string()
            .expect("jwks body");
        let v: serde_json::Value = serde_json::from_str(&text).expect("jwks json");
        v["keys"].as_array().expect("keys").iter().map(|k| k["kid"].as_str().expect("kid").to_owned()).collect()
    }

    /// Pushes a generated image straight into the hub (no auth there) as `repo:tag`.
    pub fn seed_hub(&self, repo: &str, tag: &str) {
        let layout = self.path(&format!("hub-layout-{}", repo.replace('/', "_")));
        let src = self.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", "hub"]);
        let dst = format!("docker://127.0.0.1:{}/{repo}:{tag}", self.hub_port);
        let out = self.skopeo(&["copy", "--dest-tls-verify=false", src.trim(), &dst]);
        assert!(out.status.success(), "seeding the hub failed");
    }

    /// Starts (or restarts) the reference event consumer on its fixed port and database.
    pub fn start_consumer(&mut self) {
        self.start_process("consumer");
        self.wait_http(self.consumer_port, "/healthz", "consumer");
    }

    /// Stops the event consumer (the registry's deliveries then fail and are retried).
    pub fn stop_consumer(&mut self) {
        self.stop("consumer");
    }

    fn stop(&mut self, name: &str) {
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.procs.retain(|p| p.name != name);
    }

    /// The consumer's `/counts` document (this week's unique actors, the lifetime `counters`
    /// and the tallies), with every recorded event under `events` (read from the paged
    /// `GET /events`), as tests have always read it.
    pub fn counts(&self) -> serde_json::Value {
        let mut counts = self.consumer_get("/counts");
        let mut events = Vec::new();
        let mut after = 0;
        loop {
            let mut page = self.consumer_get(&format!("/events?after={after}&limit=1000"));
            if let Some(rows) = page["events"].as_array_mut() {
                events.append(rows);
            }
            match page["next_after"].as_i64() {
                Some(next) => after = next,
                None => break,
            }
        }
        counts["events"] = serde_json::Value::Array(events);
        counts
    }

    /// `GET path_and_query` on the consumer with its read token, as JSON.
    pub fn consumer_get(&self, path_and_query: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path_and_query}", self.consumer_port);
        let text = ureq::get(&url)
            .set("Authorization", &format!("Bearer {CONSUMER_READ_TOKEN}"))
            .timeout(Duration::from_secs(5))
            .call()
            .unwrap_or_else(|e| panic!("consumer {path_and_query}: {e}"))
            .into_string()
            .expect("body");
        serde_json::from_str(&text).expect("consumer json")
    }

    /// Stops the registry (Envoy's `registry` cluster then has no one to connect to).
    pub fn stop_registry(&mut self) {
        self.stop("registry");
    }

    /// Starts the registry again from the same configuration and storage.
    pub fn restart_registry(&mut self) {
        self.stop("registry");
        self.start_process("registry");
        self.wait_http(self.registry_port, "/v2/", "registry");
    }

    /// Points the registry's `notifications.endpoints` URL at the events listener on `port`
    /// (another Envoy of a fleet, `fleet::Envoy::events_port`) and restarts the registry.
    pub fn point_notifications_at(&mut self, port: u16) {
        let path = self.path("registry.yml");
        let text = fs::read_to_string(&path).expect("registry.yml");
        let from = format!("http://127.0.0.1:{}/events", self.events_port);
        assert!(text.contains(&from), "registry.yml has no `{from}`");
        fs::write(&path, text.replace(&from, &format!("http://127.0.0.1:{port}/events"))).expect("write registry.yml");
        self.restart_registry();
    }

    /// Stops the token service (logins fail; tokens already issued stay valid).
    pub fn stop_token_service(&mut self) {
        self.stop("token-service");
    }

    /// Starts (or restarts) the token service on its port with the same configuration.
    pub fn start_token_service(&mut self) {
        self.stop("token-service");
        self.start_process("token-service");
        self.wait_http(self.token_port, "/healthz", "token-service");
    }

    /// The ECDS file Envoy watches for the filter's configuration.
    pub fn ecds_file(&self) -> PathBuf {
        self.path("ecds/registry-guard.json")
    }

    /// The ECDS file of the dependency-proxy listener's filter.
    pub fn dependency_proxy_ecds_file(&self) -> PathBuf {
        self.path("ecds/registry-guard-dependency-proxy.json")
    }

    /// `host:port` of the dependency-proxy endpoint.
    pub fn dependency_proxy_host(&self) -> String {
        format!("127.0.0.1:{}", self.dependency_proxy_listen_port)
    }

    /// TEST ONLY: the `fault_injection` the options ask for, if any.
    fn fault_injection(&self) -> Option<serde_json::Value> {
        (self.trap_on_header.is_some() || self.refuse_configure_after_first).then(|| {
            serde_json::json!({
                "trap_on_header": self.trap_on_header,
                "refuse_configure_after_first": self.refuse_configure_after_first,
            })
        })
    }

    /// The filter Envoy loads: the test-only build with the `fault-injection` feature (`make
    /// build-faults`) when a fault option is set, the release filter otherwise (which refuses
    /// `fault_injection` as an unknown field).
    fn filter_wasm(&self) -> PathBuf {
        match self.fault_injection() {
            Some(_) => artifact("target/filter-faults/registry_guard.wasm"),
            None => artifact("target/filter/registry_guard.wasm"),
        }
    }

    /// TEST ONLY: adds `fault_injection` to the filter configuration in both ECDS files after
    /// `rgctl stack render` wrote them (rgctl checks configurations with the release parser,
    /// which refuses the field).
    fn inject_faults(&self) {
        let Some(faults) = self.fault_injection() else { return };
        for ecds in [self.ecds_file(), self.dependency_proxy_ecds_file()] {
            let mut doc: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&ecds).expect("read ECDS file")).expect("ECDS json");
            let value = &mut doc["resources"][0]["typed_config"]["config"]["configuration"]["value"];
            let mut config: serde_json::Value =
                serde_json::from_str(value.as_str().expect("filter configuration string")).expect("filter config json");
            config["fault_injection"] = faults.clone();
            *value = config.to_string().into();
            fs::write(&ecds, doc.to_string()).expect("write ECDS file");
        }
    }

    fn start_envoy(&mut self) {
        self.spawn_envoy();
    }

    fn spawn_envoy(&mut self) {
        self.start_process("envoy");
        self.wait_http(self.admin_port, "/ready", "envoy");
        // /ready answers before the listener is warmed by the ECDS file: wait for a reply.
        if self.tls {
            self.wait_https(self.envoy_port, "/v2/", "envoy");
        } else {
            self.wait_http(self.envoy_port, "/v2/", "envoy");
        }
    }

    /// The development CA clients trust with [`Options::tls`].
    pub fn tls_ca(&self) -> PathBuf {
        self.path("tls/ca.pem")
    }

    /// As `wait_http`, over https with the development CA (curl verifies the certificate).
    fn wait_https(&mut self, port: u16, path: &str, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("https://127.0.0.1:{port}{path}");
        loop {
            let ok = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "--max-time", "1", "--cacert"])
                .arg(self.tls_ca())
                .arg(&url)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            if Instant::now() > deadline {
                self.dump_logs();
                panic!("{name} not ready at {url}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops Envoy and starts it again from the same files (bootstrap + ECDS file).
    pub fn restart_envoy(&mut self) {
        self.stop("envoy");
        self.spawn_envoy();
    }

    /// Signs bundle JSON with the operator key; returns the path of the JWS. A bundle that
    /// names no environment is signed for this stack's ([`ENVIRONMENT`]), and every bundle
    /// gets the canary rule [`CANARY_RULE`] (unless it has a rule with that id), which
    /// [`Stack::push_bundle`] uses to check that protection is still enforced after a push.
    pub fn sign_bundle(&self, name: &str, bundle: &serde_json::Value) -> PathBuf {
        let bundle = with_canary(bundle);
        let json = self.path(&format!("{name}.json"));
        fs::write(&json, bundle.to_string()).expect("write bundle");
        let key = self.config_dir.join("keys/operator-key.pem").display().to_string();
        let jws = self.rgctl(&["sign", &json.display().to_string(), "--key", &key]);
        let out = self.path(&format!("{name}.jws"));
        fs::write(&out, jws).expect("write jws");
        out
    }

    /// Signs bundle JSON without validating it first (to test the components' own checks).
    pub fn sign_bundle_unchecked(&self, name: &str, bundle: &serde_json::Value) -> PathBuf {
        use p256::pkcs8::DecodePrivateKey as _;
        use registry_guard_core::token::keys::SigningKey;
        let pem = fs::read_to_string(self.config_dir.join("keys/operator-key.pem")).expect("operator key");
        let key = SigningKey::new(p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).expect("pem"));
        let jws = registry_guard_core::token::sign::sign_jws_unchecked(
            &key,
            &with_canary(bundle),
            registry_guard_core::policy::bundle::BUNDLE_TYP,
        )
        .expect("sign");
        let out = self.path(&format!("{name}.jws"));
        fs::write(&out, jws).expect("write jws");
        out
    }

    /// `rgctl push FILE` to this stack's Envoy and token service (extra args, e.g. `--force`),
    /// as the operator (with the operator token). After every push, accepted or refused,
    /// checks the fail-closed invariant ([`Stack::assert_fail_closed`]).
    pub fn push_bundle(&self, file: &Path, extra: &[&str]) -> Output {
        let envoy = format!("{}=http://127.0.0.1:{}", self.ecds_file().display(), self.admin_port);
        let ts = format!("http://127.0.0.1:{}", self.token_port);
        let token = self.config_dir.join("keys/operator-token").display().to_string();
        let mut args = vec![
            "push".to_owned(),
            file.display().to_string(),
            "--operator-token-file".into(),
            token,
            "--envoy".into(),
            envoy,
            "--token-service".into(),
            ts,
        ];
        // The dependency-proxy endpoint's filter gets the same bundle.
        let dp = format!("{}=http://127.0.0.1:{}", self.dependency_proxy_ecds_file().display(), self.admin_port);
        args.extend(["--envoy".to_owned(), dp]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(artifact("target/release/rgctl")).args(&args).output().expect("run rgctl push");
        eprintln!(
            "$ rgctl {}\n  -> {}\n{}{}",
            args.join(" "),
            out.status,
            indent(&String::from_utf8_lossy(&out.stdout)),
            indent(&String::from_utf8_lossy(&out.stderr))
        );
        self.assert_fail_closed();
        out
    }

    /// The fail-closed invariant, checked through Envoy: an anonymous request, an `alg: none`
    /// token and a token with a forged signature are refused (401) on every route kind, and,
    /// once a bundle with the canary rule is active, that enforced rule still denies (403) a
    /// push by an owner. Requests are repeated so that both Envoy workers are reached.
    pub fn assert_fail_closed(&self) {
        // Let Envoy finish any update in flight (ECDS reloads are asynchronous on workers).
        std::thread::sleep(Duration::from_millis(300));
        let key = self.signing_key();
        let owner = mint_token(&key, "e2e-owner", "acme/web/app", &["pull", "push", "delete"], Some(50));
        let (head, _) = owner.rsplit_once('.').expect("jws");
        let forged = format!("{head}.{}", "A".repeat(86));
        let unsigned = {
            let claims = owner.split('.').nth(1).expect("claims");
            let header = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                br#"{"alg":"none","typ":"JWT"}"#,
            );
            format!("{header}.{claims}.")
        };
        for round in 0..4 {
            for (what, method, path, bearer) in [
                ("anonymous catalog", "GET", "/v2/_catalog", None),
                ("anonymous base", "GET", "/v2/", None),
                ("anonymous manifest push", "PUT", "/v2/acme/web/app/manifests/e2e-anonymous", None),
                (
                    "anonymous dependency proxy",
                    "GET",
                    "/v2/acme/dependency_proxy/containers/alpine/manifests/latest",
                    None,
                ),
                ("alg none", "GET", "/v2/acme/web/app/tags/list", Some(unsigned.as_str())),
                ("forged signature", "GET", "/v2/acme/web/app/tags/list", Some(forged.as_str())),
                ("forged signature push", "PUT", "/v2/acme/web/app/manifests/e2e-forged", Some(forged.as_str())),
            ] {
                let r = self.request(method, path, bearer);
                assert_eq!(
                    r.status, 401,
                    "fail-closed invariant (round {round}): {what}: {method} {path} -> {} {}",
                    r.status, r.body
                );
            }
            if self.canary_active() {
                let r = self.request("PUT", &format!("/v2/acme/web/app/manifests/{CANARY_TAG}"), Some(&owner));
                assert!(
                    r.status == 403 && r.body.contains(CANARY_RULE),
                    "fail-closed invariant (round {round}): the enforced canary rule no longer denies: {} {}",
                    r.status,
                    r.body
                );
            }
        }
    }

    /// Whether the bundle in Envoy's ECDS file has the canary rule (then it must be enforced).
    fn canary_active(&self) -> bool {
        let Ok(text) = fs::read_to_string(self.ecds_file()) else { return false };
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
        let Some(config) = doc.pointer("/resources/0/typed_config/config/configuration/value").and_then(|v| v.as_str())
        else {
            return false;
        };
        let Ok(config) = serde_json::from_str::<serde_json::Value>(config) else { return false };
        let Some(jws) = config["bundle"].as_str() else { return false };
        registry_guard_core::token::verify::decode_unverified(jws)
            .ok()
            .and_then(|b| b["protection_rules"].as_array().cloned())
            .is_some_and(|rules| rules.iter().any(|r| r["id"] == CANARY_RULE))
    }

    /// `PUT /bundle` on the token service with raw `body` and an optional `Authorization`
    /// value; returns status and body.
    pub fn put_bundle_raw(&self, body: &[u8], authorization: Option<&str>) -> (u16, String) {
        let mut req =
            ureq::put(&format!("http://127.0.0.1:{}/bundle", self.token_port)).timeout(Duration::from_secs(30));
        if let Some(a) = authorization {
            req = req.set("Authorization", a);
        }
        match req.send_bytes(body) {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// The operator token of this stack (for `Authorization: Bearer …`).
    pub fn operator_token(&self) -> String {
        fs::read_to_string(self.config_dir.join("keys/operator-token")).expect("operator token").trim().to_owned()
    }

    /// `rgctl status` for this stack.
    pub fn status(&self) -> String {
        let envoy = format!("http://127.0.0.1:{}", self.admin_port);
        let ts = format!("http://127.0.0.1:{}", self.token_port);
        let out = Command::new(artifact("target/release/rgctl"))
            .args(["status", "--envoy-admin", &envoy, "--token-service", &ts])
            .output()
            .expect("run rgctl status");
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("$ rgctl status\n{}{}", indent(&s), indent(&String::from_utf8_lossy(&out.stderr)));
        assert!(out.status.success(), "rgctl status warns:\n{s}");
        s
    }

    fn wait_http(&mut self, port: u16, path: &str, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://127.0.0.1:{port}{path}");
        loop {
            match ureq::get(&url).timeout(Duration::from_secs(1)).call() {
                Ok(_) | Err(ureq::Error::Status(..)) => return,
                Err(_) if Instant::now() < deadline => {
                    if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            self.dump_logs();
                            panic!("{name} exited early with {status}");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    self.dump_logs();
                    panic!("{name} not ready at {url}: {e}");
                }
            }
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/jwt/auth", self.token_port)
    }

    pub fn registry_host(&self) -> String {
        format!("127.0.0.1:{}", self.envoy_port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.envoy_port)
    }

    /// The token service's signing key, for forging tokens with chosen claims in tests.
    pub fn signing_key(&self) -> registry_guard_core::token::keys::SigningKey {
        use p256::pkcs8::DecodePrivateKey as _;
        let pem = fs::read_to_string(self.config_dir.join("keys/signing-key.pem")).expect("read key");
        registry_guard_core::token::keys::SigningKey::new(p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).expect("pem"))
    }

    /// A valid registry token (signed with the token service's key) for `sub` of about
    /// `size` bytes — many pull grants on `acme/web/*` repositories, each naming project
    /// `acme/web` — with `jti` `hostile-<n>`, so every call yields a distinct token: what a
    /// client minting many large tokens sends.
    pub fn large_token(&self, sub: &str, n: u64, size: usize) -> String {
        use registry_guard_core::token::claims::{AccessClaim, AccessMeta, Audience, RegistryClaims};
        use registry_guard_core::token::sign::{sign, Validity};
        let mut access = Vec::new();
        let mut approx = 400;
        let mut i = 0;
        while approx < size * 16 / 25 {
            let name = format!("acme/web/app-{n}-{i}-{}", "x".repeat(60));
            approx += name.len() + 80;
            access.push(AccessClaim {
                resource_type: "repository".into(),
                name,
                actions: vec!["pull".into()],
                meta: Some(AccessMeta { project_path: Some("acme/web".into()), access_level: Some(30) }),
            });
            i += 1;
        }
        let claims = RegistryClaims {
            iss: "registry-guard".into(),
            sub: sub.into(),
            aud: Audience::One("container_registry".into()),
            jti: format!("hostile-{n}"),
            access,
            auth_type: Some("password".into()),
            user: None,
            extra: Default::default(),
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let validity = Validity { issued_at: now, not_before: now - 5, expires_at: now + 3600 };
        sign(&self.signing_key(), claims, validity).expect("sign a large token")
    }

    /// Fetches a token from the token service as `user:secret` for `scopes`.
    pub fn token(&self, user: &str, secret: &str, scopes: &[&str]) -> Result<String, (u16, String)> {
        let mut req = ureq::get(&self.realm()).query("service", "container_registry");
        for s in scopes {
            req = req.query("scope", s);
        }
        let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{user}:{secret}"));
        match req.set("Authorization", &format!("Basic {basic}")).call() {
            Ok(resp) => {
                let v: serde_json::Value =
                    serde_json::from_str(&resp.into_string().expect("token body")).expect("token json");
                Ok(v["token"].as_str().expect("token field").to_owned())
            }
            Err(ureq::Error::Status(code, resp)) => Err((code, resp.into_string().unwrap_or_default())),
            Err(e) => Err((0, e.to_string())),
        }
    }

    /// A raw request through Envoy; returns status, `WWW-Authenticate` and body.
    pub fn request(&self, method: &str, path: &str, bearer: Option<&str>) -> Reply {
        let mut req = ureq::request(method, &self.url(path)).timeout(Duration::from_secs(10)).set(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        );
        if let Some(t) = bearer {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        Reply {
            status: resp.status(),
            www_authenticate: resp.header("www-authenticate").map(str::to_owned),
            body: resp.into_string().unwrap_or_default(),
        }
    }

    /// Runs skopeo with a private auth file; returns its output.
    pub fn skopeo(&self, args: &[&str]) -> Output {
        let auth = self.path("auth.json");
        let out = Command::new("skopeo")
            .env("REGISTRY_AUTH_FILE", &auth)
            .env("HOME", self.dir.path())
            .args(["--command-timeout", "60s"])
            .args(args)
            .output()
            .expect("run skopeo");
        eprintln!(
            "$ skopeo {}\n  -> {}\n{}{}",
            args.join(" "),
            out.status,
            indent(&String::from_utf8_lossy(&out.stdout)),
            indent(&String::from_utf8_lossy(&out.stderr))
        );
        out
    }

    /// Pushes a freshly generated image to `repo:tag` as `user:secret`.
    pub fn push(&self, user: &str, secret: &str, repo: &str, tag: &str) -> Output {
        let layout = self.path(&format!("layout-{}-{tag}-{user}", repo.replace('/', "_")));
        let src = self.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", repo]);
        let src = src.trim();
        let dst = format!("docker://{}/{repo}:{tag}", self.registry_host());
        let creds = format!("{user}:{secret}");
        self.skopeo(&["copy", "--dest-tls-verify=false", "--dest-creds", &creds, src, &dst])
    }

    /// Inspects `repo:tag` as `user:secret`.
    pub fn inspect(&self, user: &str, secret: &str, repo: &str, tag: &str) -> Output {
        let creds = format!("{user}:{secret}");
        let src = format!("docker://{}/{repo}:{tag}", self.registry_host());
        self.skopeo(&["inspect", "--tls-verify=false", "--creds", &creds, &src])
    }

    /// The process id of a running component (`envoy`, `registry`, `token-service`, …).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.iter().find(|p| p.name == name).map(|p| p.child.id())
    }

    pub fn dump_logs(&self) {
        for p in &self.procs {
            let text = fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("----- {} log (last {} lines) -----\n{}", p.name, tail.len(), tail.join("\n"));
        }
    }

    pub fn log(&self, name: &str) -> String {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| fs::read_to_string(&p.log).unwrap_or_default())
            .unwrap_or_default()
    }
}

thread_local! {
    /// This thread's last panic, for [`Stack`]'s drop to repeat after the logs.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that remembers the panic's message for the panicking thread,
/// then runs the default hook.
fn remember_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info.to_string();
            LAST_PANIC.with(|m| *m.borrow_mut() = Some(message));
            default(info);
        }));
    });
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
            // The logs above can be long; CI shows the head and tail of a failure's output,
            // so the reason is repeated last.
            if let Some(message) = LAST_PANIC.with(|m| m.borrow_mut().take()) {
                let cut: String = message.chars().take(6000).collect();
                eprintln!("===== the test failed (repeated after the logs): {cut}");
            }
        }
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

pub struct Reply {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub body: String,
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  | {l}\n")).collect()
}

/// The HTTP status a registry client (skopeo, podman, ctr) reports in its error text, read
/// from the phrases the clients print, never from bare digits: the text also holds the
/// registry's address, whose port can be any number (a port 40377 once read as a 403).
/// `None` when the text names no status the suite distinguishes.
pub fn client_error_status(err: &str) -> Option<u16> {
    // Addresses and digests first, so no phrase below can match inside them.
    let masked: String = err
        .split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '/' || c == '`')
        .map(|w| if w.starts_with("127.0.0.1:") || w.starts_with("sha256:") { "<masked> " } else { w })
        .collect();
    let has = |phrases: &[&str]| phrases.iter().any(|p| masked.contains(p));
    if has(&["403 (Forbidden)", "status 403", "code 403"])
        || (masked.contains("denied") && !masked.contains("HTTP Basic"))
    {
        Some(403)
    } else if has(&["404 (Not Found)", "status 404", "code 404", "name unknown", "NAME_UNKNOWN", "manifest unknown"]) {
        Some(404)
    } else if has(&["401 (Unauthorized)", "status 401", "code 401", "unauthorized", "invalid username/password"]) {
        Some(401)
    } else if has(&["500 (Internal Server Error)", "status 500", "code 500", "Internal Server Error"]) {
        Some(500)
    } else {
        None
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_path_exists(p: &Path) {
    assert!(p.exists(), "{} does not exist", p.display());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod client_error_tests {
    use super::client_error_status;

    #[test]
    fn a_port_holding_a_status_code_is_not_a_status() {
        // What skopeo printed in a CI run whose dependency-proxy port was 40377.
        let err = r#"time="2026-11-30T09:56:16Z" level=fatal msg="Error parsing image name \"docker://127.0.0.1:40377/other/dependency_proxy/containers/alpine:latest\": reading manifest latest in 127.0.0.1:40377/other/dependency_proxy/containers/alpine: name unknown: repository name not known to registry: `other/dependency_proxy/containers/alpine`""#;
        assert_eq!(client_error_status(err), Some(404));
        let err = r#"level=fatal msg="reading manifest v1 in 127.0.0.1:50001/acme/web/app: manifest unknown""#;
        assert_eq!(client_error_status(err), Some(404));
        let err = r#"level=fatal msg="authenticating creds for \"127.0.0.1:40377\": invalid status code from registry 403 (Forbidden)""#;
        assert_eq!(client_error_status(err), Some(403));
        let err = r#"level=fatal msg="logging into \"127.0.0.1:40377\": invalid username/password""#;
        assert_eq!(client_error_status(err), Some(401));
        assert_eq!(client_error_status("unable to retrieve auth token: invalid username/password: unauthorized: HTTP Basic: Access denied: deploy token has expired"), Some(401));
        assert_eq!(client_error_status("dial tcp 127.0.0.1:40377: connect: connection refused"), None);
    }
}
