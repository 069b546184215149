//! `rgctl stack render`: every file a registry-guard stack starts from, for given ports and a
//! configuration directory, and a summary (`stack.json`, `stack.env`) naming each port, file
//! and process command line, so that `make run` (deploy/run.sh), the e2e harness, `make
//! test-envoy` and the bench only start processes.
//!
//! The stack: the registry (distribution), the hub (the dependency proxy's upstream, a local
//! registry), the dependency proxy (a pull-through cache), the event consumer, the token
//! service and Envoy with the filter on two endpoints (`registry-guard`,
//! `registry-guard-dependency-proxy`) and the events role. What differs between stacks is
//! data: the port table ([`PORTS`]), the rendered templates ([`TEMPLATES`]) and the processes
//! ([`Stack::processes`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// One port of a stack: its name (`--ports NAME=PORT`), the variable that holds it in the
/// templates, `stack.env` and deploy/run.sh, its default, and its offset from `--port-base`.
pub struct PortSpec {
    pub name: &'static str,
    pub var: &'static str,
    pub default: u16,
    pub offset: u16,
    pub what: &'static str,
}

/// Every port of a stack. Without `--port-base`, the defaults of `make run`.
pub const PORTS: [PortSpec; 9] = [
    PortSpec { name: "listen", var: "LISTEN_PORT", default: 5000, offset: 0, what: "Envoy, the registry endpoint" },
    PortSpec { name: "token", var: "TOKEN_PORT", default: 5001, offset: 1, what: "token service" },
    PortSpec { name: "registry", var: "REGISTRY_PORT", default: 5002, offset: 2, what: "the stock registry" },
    PortSpec {
        name: "dependency-proxy",
        var: "DEPENDENCY_PROXY_PORT",
        default: 5003,
        offset: 3,
        what: "the pull-through cache",
    },
    PortSpec { name: "hub", var: "HUB_PORT", default: 5004, offset: 4, what: "the cache's upstream registry" },
    PortSpec { name: "consumer", var: "CONSUMER_PORT", default: 5005, offset: 5, what: "the event consumer" },
    PortSpec { name: "events", var: "EVENTS_PORT", default: 5006, offset: 6, what: "Envoy's notifications listener" },
    PortSpec {
        name: "dependency-proxy-listen",
        var: "DEPENDENCY_PROXY_LISTEN_PORT",
        default: 5007,
        offset: 7,
        what: "Envoy's dependency-proxy endpoint",
    },
    PortSpec { name: "admin", var: "ADMIN_PORT", default: 9901, offset: 8, what: "Envoy admin" },
];

/// The ports of one stack, by [`PortSpec::var`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(BTreeMap<&'static str, u16>);

impl Ports {
    /// The defaults, or `base + offset` for each port; then each `NAME=PORT` of `overrides`
    /// (comma-separated lists allowed). Ports must be distinct and non-zero.
    pub fn new(base: Option<u16>, overrides: &[String]) -> Result<Ports> {
        let mut ports = BTreeMap::new();
        for p in &PORTS {
            let port = match base {
                None => p.default,
                Some(0) => bail!("`--port-base 0`: ports start at 1"),
                Some(b) => b.checked_add(p.offset).with_context(|| {
                    format!("`--port-base {b}`: the stack needs {} ports from it, up to 65535", PORTS.len())
                })?,
            };
            ports.insert(p.var, port);
        }
        for item in overrides.iter().flat_map(|o| o.split(',')).map(str::trim).filter(|s| !s.is_empty()) {
            let (name, port) = item.split_once('=').with_context(|| format!("`--ports {item}` is not NAME=PORT"))?;
            let spec = PORTS.iter().find(|p| p.name == name || p.var == name).with_context(|| {
                let names: Vec<&str> = PORTS.iter().map(|p| p.name).collect();
                format!("`--ports {item}`: no port named `{name}` (one of: {})", names.join(", "))
            })?;
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .with_context(|| format!("`--ports {item}`: `{port}` is not a port (1-65535)"))?;
            ports.insert(spec.var, port);
        }
        let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
        for (var, port) in &ports {
            if let Some(other) = seen.insert(*port, var) {
                bail!("{other} and {var} are both {port}: every port of a stack must be its own");
            }
        }
        Ok(Ports(ports))
    }

    /// The port held by template variable `var` (one of [`PORTS`]).
    pub fn get(&self, var: &str) -> u16 {
        self.0.get(var).copied().unwrap_or_default()
    }

    /// Envoy's `--base-id`: its admin port, so that stacks (whose admin ports differ) run side
    /// by side without sharing Envoy's hot-restart shared memory and sockets.
    pub fn envoy_base_id(&self) -> u16 {
        self.get("ADMIN_PORT")
    }
}

/// What `rgctl stack render` is given.
#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// The configuration: principals.json, token-service.json (optionally bundle.json, signed
    /// into bundle.jws on first use); keys/ and the operator token are created in it if absent.
    #[arg(long, value_name = "DIR")]
    pub config_dir: PathBuf,
    /// Where the rendered files, the storage directories and stack.json/stack.env go (created).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number every port from N: listen N, token N+1, registry N+2, dependency-proxy N+3, hub
    /// N+4, consumer N+5, events N+6, dependency-proxy-listen N+7, admin N+8. Without it, the
    /// defaults 5000-5007 and admin 9901.
    #[arg(long, value_name = "N")]
    pub port_base: Option<u16>,
    /// Set ports by name, after --port-base: e.g. `--ports listen=6000,admin=6010` (names:
    /// listen, token, registry, dependency-proxy, hub, consumer, events,
    /// dependency-proxy-listen, admin; repeatable).
    #[arg(long, value_name = "NAME=PORT,...")]
    pub ports: Vec<String>,
    /// The checkout: the templates envoy/envoy.yaml, deploy/registry.yml and
    /// deploy/dependency-proxy.yml, and the default artifact paths below.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub root: PathBuf,
    /// The filter (default: ROOT/target/filter/registry_guard.wasm).
    #[arg(long, value_name = "PATH")]
    pub wasm: Option<PathBuf>,
    /// The Envoy binary in Envoy's command line (default: ROOT/.venv/bin/envoy).
    #[arg(long, value_name = "PATH")]
    pub envoy: Option<PathBuf>,
    /// The token service binary (default: registry-guard-token-service beside rgctl).
    #[arg(long, value_name = "PATH")]
    pub token_service: Option<PathBuf>,
    /// The event consumer binary (default: registry-guard-consumer beside rgctl).
    #[arg(long, value_name = "PATH")]
    pub consumer: Option<PathBuf>,
    /// The registry binary (distribution).
    #[arg(long, value_name = "PATH", default_value = "docker-registry")]
    pub registry: PathBuf,
    /// The signed bundle Envoy boots with. Default: the bundle in OUT's existing ECDS file
    /// (the last one an operator pushed), else OUT/envoy-bundle.jws, else CONFIG_DIR's
    /// bundle.json signed with the operator key; none if there is no bundle.json.
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// The filter's `leeway_seconds` (clock skew allowed on token times).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub leeway_seconds: i64,
    /// A JSON object whose members are set in both filter configurations (e.g.
    /// `{"correlation": {"slots": 0}}`); the result is checked as the filter checks it.
    #[arg(long, value_name = "JSON")]
    pub filter_extra: Option<String>,
    /// The registry verifies tokens itself too (`auth: token`), trusting this certificate of
    /// the token signing key (written by the caller, e.g. with openssl, before the registry
    /// starts).
    #[arg(long, value_name = "CERT")]
    pub registry_token_auth: Option<PathBuf>,
    /// The consumer's `--retention-days` (its own default when absent).
    #[arg(long, value_name = "DAYS")]
    pub consumer_retention_days: Option<i64>,
    /// Whether the filter fetches newer bundles from the token service itself (its `GET
    /// /bundle`, through Envoy's `token_service` cluster, with the bundle read token):
    /// `long-poll` (the token service holds each fetch until the bundle changes), `poll`
    /// (every few seconds), `oci` (the OCI artifact `registry-guard/policy:prod` in the
    /// stack's registry, through Envoy's `registry` cluster, polled every
    /// `--bundle-poll-seconds`; push it with `rgctl push --oci`) or `none` (bundles reach
    /// Envoy only through its ECDS files).
    #[arg(long, value_name = "MODE", value_parser = ["none", "poll", "long-poll", "oci"], default_value = "none")]
    pub bundle_source: String,
    /// Seconds between fetches with `--bundle-source poll`.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub bundle_poll_seconds: u64,
    /// Whether the filter fetches its trusted token keys from the token service's `GET /jwks`
    /// (through Envoy's `token_service` cluster, every `--keys-refresh-seconds`; the rendered
    /// `jwks` stays as the boot fallback): `token-service`, or `none` (keys only in the
    /// configuration, rotated with `rgctl push-keys`).
    #[arg(long, value_name = "MODE", value_parser = ["none", "token-service"], default_value = "none")]
    pub keys_source: String,
    /// Seconds between JWKS fetches with `--keys-source token-service`.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub keys_refresh_seconds: u64,
    /// Envoy fetches the filter from this `http://` URL (`vm_config.code.remote`, through a
    /// `wasm_source` cluster rendered for the URL's host and port) instead of reading --wasm,
    /// and loads it only if its sha256 is --wasm-sha256 (docs/deploying.md).
    #[arg(long, value_name = "URL")]
    pub wasm_url: Option<String>,
    /// With --wasm-url: the sha256 (64 hex digits) Envoy checks the fetched filter against
    /// (default: the sha256 of --wasm, i.e. of the filter built here).
    #[arg(long, value_name = "HEX", requires = "wasm_url")]
    pub wasm_sha256: Option<String>,
    /// Clients reach Envoy over TLS: a development CA and a certificate for 127.0.0.1 and
    /// localhost are generated in OUT/tls/ (openssl; kept if present), Envoy terminates TLS on
    /// the registry and dependency-proxy listeners, and the realm is
    /// https://127.0.0.1:LISTEN/jwt/auth, routed by Envoy to the token service (docs/deploying.md).
    #[arg(long)]
    pub tls: bool,
}

/// The development CA and server certificate of `--tls`, in OUT/tls/: `ca.pem` (what clients
/// trust), `ca-key.pem`, `server.pem` (the chain Envoy presents) and `server-key.pem`.
fn dev_certificates(out: &Path) -> Result<PathBuf> {
    let dir = out.join("tls");
    if dir.join("server.pem").is_file() && dir.join("server-key.pem").is_file() && dir.join("ca.pem").is_file() {
        return Ok(dir);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let openssl = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl")
            .current_dir(&dir)
            .args(args)
            .output()
            .context("cannot run openssl (Debian: apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[
            &["req", "-x509", "-days", "30", "-subj", "/CN=registry-guard development CA"],
            &ec[..],
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[&["req", "-new", "-subj", "/CN=127.0.0.1"], &ec[..], &["-keyout", "server-key.pem", "-out", "server.csr"]]
            .concat(),
    )?;
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .context("cannot write the certificate extensions")?;
    openssl(&[
        "x509",
        "-req",
        "-days",
        "30",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ])?;
    Ok(dir)
}

/// Envoy's downstream TLS for the client listeners with `--tls` (a YAML line in the template).
fn listener_tls(tls: Option<&Path>) -> String {
    match tls {
        None => "# plain HTTP (`rgctl stack render --tls` terminates TLS here)".into(),
        Some(dir) => format!(
            "transport_socket: {}",
            serde_json::json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "common_tls_context": {
                        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                        "alpn_protocols": ["h2", "http/1.1"],
                        "tls_certificates": [{
                            "certificate_chain": {"filename": dir.join("server.pem").display().to_string()},
                            "private_key": {"filename": dir.join("server-key.pem").display().to_string()},
                        }],
                    },
                },
            })
        ),
    }
}

/// Where Envoy gets the filter: its `vm_config.code`, and the cluster a remote source needs.
pub struct WasmCode {
    pub code: serde_json::Value,
    pub cluster: Option<serde_json::Value>,
}

/// The filter's `vm_config.code` for `--wasm-url` / `--wasm-sha256`, or the local file.
fn wasm_code(args: &RenderArgs, wasm: &Path) -> Result<WasmCode> {
    let Some(url) = &args.wasm_url else {
        return Ok(WasmCode { code: crate::deliver::local_code(wasm), cluster: None });
    };
    let rest = url.strip_prefix("http://").with_context(|| {
        format!("`--wasm-url {url}`: only http:// URLs are rendered here (Envoy checks the sha256, not the transport)")
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0)),
        None => (authority, Some(80)),
    };
    let port = port.with_context(|| format!("`--wasm-url {url}`: `{authority}` has no valid port"))?;
    if host.is_empty() || !rest.contains('/') {
        bail!("`--wasm-url {url}` is not http://HOST[:PORT]/PATH");
    }
    let sha256 = match &args.wasm_sha256 {
        Some(hex) => {
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("`--wasm-sha256 {hex}` is not a sha256 (64 hex digits)");
            }
            hex.to_ascii_lowercase()
        }
        None => {
            let bytes = fs::read(wasm).with_context(|| format!("cannot read `{}`", wasm.display()))?;
            crate::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        }
    };
    Ok(WasmCode {
        code: serde_json::json!({"remote": {
            "http_uri": {"uri": url, "cluster": "wasm_source", "timeout": "10s"},
            "sha256": sha256,
            // A failed fetch or a sha256 mismatch is retried a few times, then the filter
            // is not loaded (Envoy refuses its requests: docs/deploying.md).
            "retry_policy": {"num_retries": 3},
        }}),
        cluster: Some(serde_json::json!({
            "name": "wasm_source", "type": "LOGICAL_DNS", "dns_lookup_family": "V4_ONLY", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": "wasm_source", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]},
        })),
    })
}

/// The filter's `keys_source` for `--keys-source` (`None` for `none`).
fn keys_source(args: &RenderArgs) -> Option<serde_json::Value> {
    (args.keys_source == "token-service").then(|| {
        serde_json::json!({"cluster": "token_service", "path": "/jwks", "refresh_seconds": args.keys_refresh_seconds})
    })
}

/// Where `--bundle-source oci` has the filter look for the bundle artifact (a project of the
/// example world, so `root` may push it through Envoy).
pub const OCI_BUNDLE_REPOSITORY: &str = "registry-guard/policy";
pub const OCI_BUNDLE_TAG: &str = "prod";

/// The filter's `bundle_source` for `--bundle-source` (`None` for `none`).
fn bundle_source(args: &RenderArgs, read_token: &str) -> Option<serde_json::Value> {
    let (poll, wait) = match args.bundle_source.as_str() {
        "long-poll" => (5, 20),
        "poll" => (args.bundle_poll_seconds, 0),
        "oci" => {
            return Some(serde_json::json!({
                "cluster": "registry", "poll_seconds": args.bundle_poll_seconds,
                "oci": {"repository": OCI_BUNDLE_REPOSITORY, "reference": OCI_BUNDLE_TAG},
            }))
        }
        _ => return None,
    };
    Some(serde_json::json!({
        "cluster": "token_service", "path": "/bundle", "token": read_token,
        "poll_seconds": poll, "wait_seconds": wait,
    }))
}

/// One process of a stack: how to start it and the URL that answers once it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub name: &'static str,
    pub command: Vec<String>,
    pub ready: String,
}

/// A file rendered from a template of the checkout.
pub struct Template {
    /// The file written in OUT.
    pub out: &'static str,
    /// The template, relative to ROOT.
    pub template: &'static str,
    /// Its placeholders' values.
    pub values: fn(&Stack) -> Vec<(&'static str, String)>,
}

/// The rendered configuration files other than the filter's.
pub const TEMPLATES: [Template; 4] = [
    Template {
        out: "registry.yml",
        template: "deploy/registry.yml",
        values: |s| {
            vec![
                ("STORAGE_DIR", s.path("storage")),
                ("REGISTRY_PORT", s.ports.get("REGISTRY_PORT").to_string()),
                ("HTTP_SECRET", s.http_secret.clone()),
                ("NOTIFICATIONS_DISABLED", "false".into()),
                ("EVENTS_URL", format!("http://127.0.0.1:{}/events", s.ports.get("EVENTS_PORT"))),
                ("EVENTS_SECRET", s.events_secret.clone()),
            ]
        },
    },
    Template {
        out: "hub.yml",
        template: "deploy/registry.yml",
        values: |s| {
            vec![
                ("STORAGE_DIR", s.path("hub-storage")),
                ("REGISTRY_PORT", s.ports.get("HUB_PORT").to_string()),
                ("HTTP_SECRET", s.http_secret.clone()),
                ("NOTIFICATIONS_DISABLED", "true".into()),
                ("EVENTS_URL", "http://127.0.0.1:1/unused".into()),
                ("EVENTS_SECRET", "unused".into()),
            ]
        },
    },
    Template {
        out: "dependency-proxy.yml",
        template: "deploy/dependency-proxy.yml",
        values: |s| {
            vec![
                ("STORAGE_DIR", s.path("cache-storage")),
                ("DEPENDENCY_PROXY_PORT", s.ports.get("DEPENDENCY_PROXY_PORT").to_string()),
                ("HUB_PORT", s.ports.get("HUB_PORT").to_string()),
                ("HTTP_SECRET", s.http_secret.clone()),
            ]
        },
    },
    Template {
        out: "envoy.yaml",
        template: "envoy/envoy.yaml",
        values: |s| {
            let mut v: Vec<(&'static str, String)> =
                PORTS.iter().map(|p| (p.var, s.ports.get(p.var).to_string())).collect();
            v.push(("WASM_CODE", s.wasm_code.code.to_string()));
            v.push(("LISTEN_TLS", listener_tls(s.tls.as_deref())));
            // With TLS the realm is on Envoy's registry listener: its route to the token
            // service, where the registry-guard filter does not run (the token service
            // authenticates logins itself).
            v.push((
                "TOKEN_ROUTE",
                match &s.tls {
                    None => "# (the realm is the token service's own port)".into(),
                    Some(_) => format!(
                        "- {}",
                        serde_json::json!({
                            "match": {"path": "/jwt/auth"},
                            "route": {"cluster": "token_service", "timeout": "30s"},
                            "typed_per_filter_config": {"registry-guard": {
                                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}},
                        })
                    ),
                },
            ));
            v.push((
                "EXTRA_CLUSTERS",
                match &s.wasm_code.cluster {
                    Some(c) => format!("  - {c}"),
                    None => "  # (the filter is a local file: no wasm_source cluster)".into(),
                },
            ));
            v.push(("EVENTS_FILTER_CONFIG", s.events_filter_config.clone()));
            v.push(("ECDS_DIR", s.path("ecds")));
            v
        },
    },
];

/// The two filter endpoints: (ECDS resource name, `endpoint` of the configuration, the
/// configuration file written in OUT).
pub const ENDPOINTS: [(&str, &str, &str); 2] = [
    ("registry-guard", "registry", "filter.json"),
    ("registry-guard-dependency-proxy", "dependency-proxy", "filter-dependency-proxy.json"),
];

/// The storage directories created in OUT.
const STORAGE: [&str; 3] = ["storage", "hub-storage", "cache-storage"];

/// A stack being rendered: resolved paths, ports and secrets.
pub struct Stack {
    pub config_dir: PathBuf,
    pub out: PathBuf,
    pub ports: Ports,
    pub wasm: PathBuf,
    /// Where Envoy gets the filter (`--wasm-url`, else `wasm`).
    pub wasm_code: WasmCode,
    /// `--tls`: the directory of the development CA and Envoy's certificate.
    pub tls: Option<PathBuf>,
    pub envoy: PathBuf,
    pub token_service: PathBuf,
    pub consumer: PathBuf,
    pub registry: PathBuf,
    pub consumer_retention_days: Option<i64>,
    /// The signed bundle Envoy boots with, if any (`--bundle`, or OUT/envoy-bundle.jws).
    pub envoy_bundle: Option<PathBuf>,
    http_secret: String,
    events_secret: String,
    /// The events role's filter configuration (with the attribution key).
    events_filter_config: String,
}

impl Stack {
    /// `rel` in OUT, as text.
    fn path(&self, rel: &str) -> String {
        self.out.join(rel).display().to_string()
    }

    /// The token URL clients are sent to: the token service's own port, or with `--tls`
    /// Envoy's registry listener over https.
    pub fn realm(&self) -> String {
        match self.tls {
            None => format!("http://127.0.0.1:{}/jwt/auth", self.ports.get("TOKEN_PORT")),
            Some(_) => format!("https://127.0.0.1:{}/jwt/auth", self.ports.get("LISTEN_PORT")),
        }
    }

    /// The processes, in the order to start them.
    pub fn processes(&self) -> Vec<Process> {
        let url = |port: &str, path: &str| format!("http://127.0.0.1:{}{path}", self.ports.get(port));
        let listen = |port: &str| format!("127.0.0.1:{}", self.ports.get(port));
        let registry = |cfg: &str| vec![self.registry.display().to_string(), "serve".into(), self.path(cfg)];
        let keys = self.config_dir.join("keys");
        let mut consumer = vec![
            self.consumer.display().to_string(),
            "--listen".into(),
            listen("CONSUMER_PORT"),
            "--database".into(),
            self.path("events.sqlite"),
            "--jwks".into(),
            keys.join("jwks.json").display().to_string(),
            "--secret-file".into(),
            self.path("events-secret"),
            "--read-token-file".into(),
            self.path("consumer-read-token"),
        ];
        if let Some(days) = self.consumer_retention_days {
            consumer.extend(["--retention-days".into(), days.to_string()]);
        }
        vec![
            Process { name: "registry", command: registry("registry.yml"), ready: url("REGISTRY_PORT", "/v2/") },
            Process { name: "hub", command: registry("hub.yml"), ready: url("HUB_PORT", "/v2/") },
            Process {
                name: "dependency-proxy",
                command: registry("dependency-proxy.yml"),
                ready: url("DEPENDENCY_PROXY_PORT", "/v2/"),
            },
            Process { name: "consumer", command: consumer, ready: url("CONSUMER_PORT", "/healthz") },
            Process {
                name: "token-service",
                command: vec![
                    self.token_service.display().to_string(),
                    "--config-dir".into(),
                    self.config_dir.display().to_string(),
                    "--listen".into(),
                    listen("TOKEN_PORT"),
                ],
                ready: url("TOKEN_PORT", "/healthz"),
            },
            Process {
                name: "envoy",
                command: vec![
                    self.envoy.display().to_string(),
                    "-c".into(),
                    self.path("envoy.yaml"),
                    "--concurrency".into(),
                    "2".into(),
                    "--base-id".into(),
                    self.ports.envoy_base_id().to_string(),
                    "--log-level".into(),
                    "warn".into(),
                    "--component-log-level".into(),
                    "wasm:info,config:info".into(),
                ],
                // The listener answers only once the filter's ECDS resource is loaded
                // (`/ready` on the admin port answers before).
                ready: url("LISTEN_PORT", "/v2/"),
            },
        ]
    }

    /// Every file of the stack by role, for stack.json.
    fn files(&self) -> Vec<(&'static str, String)> {
        let keys = self.config_dir.join("keys");
        let key = |f: &str| keys.join(f).display().to_string();
        let mut files = vec![
            ("registry_config", self.path("registry.yml")),
            ("hub_config", self.path("hub.yml")),
            ("dependency_proxy_config", self.path("dependency-proxy.yml")),
            ("envoy_bootstrap", self.path("envoy.yaml")),
            ("filter_config", self.path("filter.json")),
            ("dependency_proxy_filter_config", self.path("filter-dependency-proxy.json")),
            ("ecds", self.path("ecds/registry-guard.json")),
            ("dependency_proxy_ecds", self.path("ecds/registry-guard-dependency-proxy.json")),
            ("http_secret", self.path("http-secret")),
            ("events_secret", self.path("events-secret")),
            ("consumer_read_token", self.path("consumer-read-token")),
            ("events_database", self.path("events.sqlite")),
            ("signing_key", key("signing-key.pem")),
            ("jwks", key("jwks.json")),
            ("operator_key", key("operator-key.pem")),
            ("operator_jwks", key("operator-jwks.json")),
            ("operator_token", key("operator-token")),
            ("token_service_settings", self.config_dir.join("token-service.json").display().to_string()),
            ("wasm", self.wasm.display().to_string()),
        ];
        if let Some(dir) = &self.tls {
            files.push(("tls_ca", dir.join("ca.pem").display().to_string()));
            files.push(("tls_certificate", dir.join("server.pem").display().to_string()));
            files.push(("tls_key", dir.join("server-key.pem").display().to_string()));
        }
        files.extend(STORAGE.iter().map(|d| (storage_role(d), self.path(d))));
        if let Some(b) = &self.envoy_bundle {
            files.push(("envoy_bundle", b.display().to_string()));
        }
        files
    }

    /// stack.json: ports, Envoy's base id, files and processes.
    pub fn summary(&self) -> serde_json::Value {
        let ports: serde_json::Map<String, serde_json::Value> =
            PORTS.iter().map(|p| (p.name.to_owned(), self.ports.get(p.var).into())).collect();
        let files: serde_json::Map<String, serde_json::Value> =
            self.files().into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
        let processes: Vec<serde_json::Value> = self
            .processes()
            .into_iter()
            .map(|p| serde_json::json!({"name": p.name, "command": p.command, "ready": p.ready}))
            .collect();
        serde_json::json!({
            "config_dir": self.config_dir.display().to_string(),
            "out": self.out.display().to_string(),
            "ports": ports,
            "envoy_base_id": self.ports.envoy_base_id(),
            "files": files,
            "processes": processes,
        })
    }

    /// stack.env: the same as shell variables (bash: commands are arrays).
    pub fn env(&self) -> String {
        let mut s = String::from("# Written by `rgctl stack render`; `source` it in bash.\n");
        for p in &PORTS {
            let _ = writeln!(s, "{}={}", p.var, self.ports.get(p.var));
        }
        let _ = writeln!(s, "ENVOY_BASE_ID={}", self.ports.envoy_base_id());
        let _ = writeln!(s, "STACK_CONFIG_DIR={}", shell_quote(&self.config_dir.display().to_string()));
        let _ = writeln!(s, "STACK_DIR={}", shell_quote(&self.out.display().to_string()));
        for (role, path) in self.files() {
            let _ = writeln!(s, "STACK_FILE_{}={}", role.to_ascii_uppercase(), shell_quote(&path));
        }
        let processes = self.processes();
        let names: Vec<&str> = processes.iter().map(|p| p.name).collect();
        let _ = writeln!(s, "STACK_PROCESSES=({})", names.join(" "));
        for p in &processes {
            let var = p.name.replace('-', "_").to_ascii_uppercase();
            let argv: Vec<String> = p.command.iter().map(|a| shell_quote(a)).collect();
            let _ = writeln!(s, "STACK_CMD_{var}=({})", argv.join(" "));
            let _ = writeln!(s, "STACK_READY_{var}={}", shell_quote(&p.ready));
        }
        s
    }
}

fn storage_role(dir: &str) -> &'static str {
    match dir {
        "storage" => "registry_storage",
        "hub-storage" => "hub_storage",
        _ => "dependency_proxy_storage",
    }
}

/// `s` in single quotes for bash.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// An absolute form of `p` (existing or not) without resolving symlinks.
fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("cannot make `{}` absolute", p.display()))
}

/// A binary beside the running rgctl (as `cargo build` places the workspace's binaries).
fn beside_rgctl(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the rgctl executable")?;
    Ok(exe.with_file_name(name))
}

/// A secret file in OUT: kept if present, else 32 random bytes as hex (mode 0600).
/// The fleet's attribution key (32 random bytes, base64url) at `path`, created if absent:
/// every Envoy rendered from one configuration directory shares it, so any of them can
/// attribute any event (core `events`).
pub(crate) fn attribution_key(path: &Path) -> Result<String> {
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let key = registry_guard_core::events::AttributionKey::from_bytes(bytes).to_base64url();
        crate::write_private(path, key.as_bytes())?;
    }
    let key = crate::read(path)?.trim().to_owned();
    registry_guard_core::events::AttributionKey::from_base64url(&key)
        .map_err(|e| anyhow::anyhow!("`{}`: the attribution key {e}", path.display()))?;
    Ok(key)
}

/// The events role's filter configuration (Envoy's `notifications` listener, inline in
/// envoy/envoy.yaml as `${EVENTS_FILTER_CONFIG}`).
pub fn events_filter_config(key: &str) -> String {
    serde_json::json!({"role": "events", "max_envelope_bytes": 1_048_576, "attribution": {"key": key}}).to_string()
}

fn secret(path: &Path) -> Result<String> {
    if !path.exists() {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        crate::write_private(path, crate::hex(&bytes).as_bytes())?;
    }
    Ok(crate::read(path)?.trim().to_owned())
}

/// `rgctl stack render`: writes every file and returns the stack.
pub fn render(args: &RenderArgs) -> Result<Stack> {
    let config_dir = absolute(&args.config_dir)?;
    for f in ["principals.json", "token-service.json"] {
        if !config_dir.join(f).is_file() {
            bail!(
                "`{}` is missing (the configuration directory must hold principals.json and token-service.json)",
                config_dir.join(f).display()
            );
        }
    }
    let ports = Ports::new(args.port_base, &args.ports)?;
    let root = absolute(&args.root)?;
    let out = absolute(&args.out)?;
    fs::create_dir_all(&out).with_context(|| format!("cannot create `{}`", out.display()))?;
    for d in STORAGE {
        fs::create_dir_all(out.join(d)).with_context(|| format!("cannot create `{}`", out.join(d).display()))?;
    }
    let wasm = absolute(&args.wasm.clone().unwrap_or_else(|| root.join("target/filter/registry_guard.wasm")))?;
    if !wasm.is_file() {
        bail!("no filter at `{}` (`make build` builds it; or pass --wasm)", wasm.display());
    }
    let settings = crate::read_json(&config_dir.join("token-service.json"))?;
    let setting = |key: &str, default: &str| settings[key].as_str().unwrap_or(default).to_owned();

    // Keys and the operator token, unless they exist.
    let keys = config_dir.join("keys");
    crate::keygen(&keys, "signing")?;
    crate::keygen(&keys, "operator")?;
    crate::operator_token(&keys, "operator")?;
    // The RSA key of RS256 job ID tokens, when `ci_jobs.id_token_rsa_key` names one (issue 18).
    if let Some(rsa_key) = settings["ci_jobs"]["id_token_rsa_key"].as_str() {
        crate::keygen_rsa(&config_dir.join(rsa_key))?;
    }
    // The token the filter (and token-service replicas) present to `GET /bundle`.
    crate::operator_token(&keys, "bundle-read")?;
    let attribution_key = attribution_key(&keys.join("attribution-key"))?;
    let read_token = crate::read(&keys.join("bundle-read-token"))?.trim().to_owned();
    if !["none", "oci"].contains(&args.bundle_source.as_str())
        && settings["bundle_read_token_sha256"].as_str().is_none()
    {
        bail!(
            "`--bundle-source {}`: {} has no `bundle_read_token_sha256`, so the token service would not serve the \
             bundle (set it to \"keys/bundle-read-token.sha256\")",
            args.bundle_source,
            config_dir.join("token-service.json").display()
        );
    }
    // The token service's starting bundle: bundle.json signed once; the token service
    // rewrites bundle.jws on every push it accepts (its own state).
    let bundle_json = config_dir.join("bundle.json");
    let operator_key = keys.join("operator-key.pem");
    let sign = |json: &Path| -> Result<String> {
        registry_guard_core::policy::bundle::sign(&crate::read(json)?, &crate::load_signing_key(&operator_key)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", json.display()))
    };
    if !config_dir.join("bundle.jws").exists() && bundle_json.is_file() {
        fs::write(config_dir.join("bundle.jws"), sign(&bundle_json)? + "\n")
            .with_context(|| format!("cannot write `{}`", config_dir.join("bundle.jws").display()))?;
    }
    let (envoy_bundle_file, envoy_bundle) = match envoy_bundle(args, &out, &bundle_json, &sign)? {
        Some((file, jws)) => (Some(file), Some(jws)),
        None => (None, None),
    };

    let stack = Stack {
        ports,
        wasm_code: wasm_code(args, &wasm)?,
        tls: if args.tls { Some(dev_certificates(&out)?) } else { None },
        wasm,
        envoy: absolute(&args.envoy.clone().unwrap_or_else(|| root.join(".venv/bin/envoy")))?,
        token_service: match &args.token_service {
            Some(p) => absolute(p)?,
            None => beside_rgctl("registry-guard-token-service")?,
        },
        consumer: match &args.consumer {
            Some(p) => absolute(p)?,
            None => beside_rgctl("registry-guard-consumer")?,
        },
        registry: args.registry.clone(),
        consumer_retention_days: args.consumer_retention_days,
        envoy_bundle: envoy_bundle_file,
        http_secret: secret(&out.join("http-secret"))?,
        events_secret: secret(&out.join("events-secret"))?,
        events_filter_config: events_filter_config(&attribution_key),
        config_dir,
        out,
    };
    secret(&stack.out.join("consumer-read-token"))?;

    // The filter on both endpoints.
    let extra = match &args.filter_extra {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => bail!("`--filter-extra {text}` is not a JSON object"),
        },
    };
    for (name, endpoint, file) in ENDPOINTS {
        let mut config = crate::filter_config(&crate::FilterSettings {
            realm: stack.realm(),
            service: setting("service", "container_registry"),
            issuer: setting("issuer", "registry-guard"),
            jwks: crate::read_json(&keys.join("jwks.json"))?,
            leeway_seconds: args.leeway_seconds,
            bundle: envoy_bundle.clone(),
            bundle_keys: Some(crate::read_json(&keys.join("operator-jwks.json"))?),
            environment: settings["environment"].as_str().filter(|e| !e.is_empty()).map(str::to_owned),
            // envoy/envoy.yaml has `use_remote_address: true`.
            client_address: "x-forwarded-for".into(),
            endpoint: endpoint.into(),
            bundle_source: bundle_source(args, &read_token),
            keys_source: keys_source(args),
            attribution_key: Some(attribution_key.clone()),
        })?;
        if let Some(obj) = config.as_object_mut() {
            obj.extend(extra.clone());
        }
        let text = serde_json::to_string(&config)?;
        fs::write(stack.out.join(file), format!("{text}\n"))
            .with_context(|| format!("cannot write `{}`", stack.out.join(file).display()))?;
        crate::deliver::write_filter_resource_code(
            &text,
            stack.wasm_code.code.clone(),
            &stack.out.join("ecds").join(format!("{name}.json")),
            name,
        )
        .with_context(|| format!("the `{name}` filter configuration"))?;
    }

    for t in &TEMPLATES {
        let template = root.join(t.template);
        let text =
            fs::read_to_string(&template).with_context(|| format!("cannot read template `{}`", template.display()))?;
        let values: BTreeMap<String, String> = (t.values)(&stack).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let mut rendered = crate::render(&text, &values).with_context(|| format!("in `{}`", template.display()))?;
        if t.out == "registry.yml" {
            if let Some(cert) = &args.registry_token_auth {
                let _ = write!(
                    rendered,
                    "auth:\n  token:\n    realm: http://127.0.0.1:{}/jwt/auth\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    stack.ports.get("TOKEN_PORT"),
                    setting("service", "container_registry"),
                    setting("issuer", "registry-guard"),
                    absolute(cert)?.display()
                );
            }
        }
        let path = stack.out.join(t.out);
        fs::write(&path, rendered).with_context(|| format!("cannot write `{}`", path.display()))?;
    }

    let json = stack.out.join("stack.json");
    fs::write(&json, serde_json::to_string_pretty(&stack.summary())? + "\n")
        .with_context(|| format!("cannot write `{}`", json.display()))?;
    let env = stack.out.join("stack.env");
    fs::write(&env, stack.env()).with_context(|| format!("cannot write `{}`", env.display()))?;
    Ok(stack)
}

/// The signed bundle Envoy boots with (see [`RenderArgs::bundle`]) and its file: written to
/// OUT/envoy-bundle.jws unless given with `--bundle`.
fn envoy_bundle(
    args: &RenderArgs,
    out: &Path,
    bundle_json: &Path,
    sign: &dyn Fn(&Path) -> Result<String>,
) -> Result<Option<(PathBuf, String)>> {
    if let Some(b) = &args.bundle {
        return Ok(Some((absolute(b)?, crate::read(b)?.trim().to_owned())));
    }
    // Envoy boots only from what an operator delivered to it: the bundle in its own ECDS file
    // (written by `rgctl push`), never from a file another component writes.
    let kept = out.join("envoy-bundle.jws");
    let ecds = out.join("ecds/registry-guard.json");
    if ecds.is_file() {
        let (_, config) = crate::deliver::read_filter_config(&ecds)?;
        if let Some(b) = config["bundle"].as_str() {
            fs::write(&kept, b).with_context(|| format!("cannot write `{}`", kept.display()))?;
        }
    }
    if !kept.is_file() && bundle_json.is_file() {
        fs::write(&kept, sign(bundle_json)? + "\n").with_context(|| format!("cannot write `{}`", kept.display()))?;
    }
    if kept.is_file() {
        let jws = crate::read(&kept)?.trim().to_owned();
        return Ok(Some((kept, jws)));
    }
    Ok(None)
}

/// What `rgctl stack render` prints: where the summary is.
pub fn report(stack: &Stack) -> String {
    let mut s = format!("rendered the stack in {}\n", stack.out.display());
    for p in &PORTS {
        let _ = writeln!(s, "  {:<24} {:>5}  {}", p.name, stack.ports.get(p.var), p.what);
    }
    let _ = writeln!(s, "  envoy base id            {:>5}", stack.ports.envoy_base_id());
    let _ = writeln!(
        s,
        "  summary: {} (JSON), {} (bash)",
        stack.out.join("stack.json").display(),
        stack.out.join("stack.env").display()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_default_base_and_overrides() {
        let d = Ports::new(None, &[]).unwrap();
        assert_eq!((d.get("LISTEN_PORT"), d.get("ADMIN_PORT"), d.envoy_base_id()), (5000, 9901, 9901));
        let b = Ports::new(Some(6000), &[]).unwrap();
        let all: Vec<u16> = PORTS.iter().map(|p| b.get(p.var)).collect();
        assert_eq!(all, (6000..6009).collect::<Vec<u16>>());
        assert_eq!(b.envoy_base_id(), 6008);
        let o = Ports::new(Some(6000), &["listen=7000,ADMIN_PORT=7001".into(), "hub=7002".into()]).unwrap();
        assert_eq!(
            (o.get("LISTEN_PORT"), o.get("ADMIN_PORT"), o.get("HUB_PORT"), o.get("TOKEN_PORT")),
            (7000, 7001, 7002, 6001)
        );
    }

    #[test]
    fn ports_errors_name_the_mistake() {
        for (base, ports, needle) in [
            (Some(65530), vec![], "--port-base 65530"),
            (Some(0), vec![], "--port-base 0"),
            (None, vec!["nope=1".to_owned()], "no port named `nope`"),
            (None, vec!["listen".to_owned()], "is not NAME=PORT"),
            (None, vec!["listen=0".to_owned()], "`0` is not a port"),
            (None, vec!["listen=x".to_owned()], "`x` is not a port"),
            (None, vec!["listen=5001".to_owned()], "are both 5001"),
        ] {
            let e = Ports::new(base, &ports).unwrap_err().to_string();
            assert!(e.contains(needle), "{base:?} {ports:?}: {e}");
        }
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn args(dir: &Path, wasm: &Path) -> RenderArgs {
        let config = dir.join("config");
        fs::create_dir_all(&config).unwrap();
        for f in ["principals.json", "token-service.json", "bundle.json"] {
            fs::copy(repo().join("policies/example").join(f), config.join(f)).unwrap();
        }
        RenderArgs {
            config_dir: config,
            out: dir.join("out"),
            port_base: Some(42000),
            ports: vec![],
            root: repo(),
            wasm: Some(wasm.to_owned()),
            envoy: Some(repo().join(".venv/bin/envoy")),
            token_service: None,
            consumer: None,
            registry: "docker-registry".into(),
            bundle: None,
            leeway_seconds: 2,
            filter_extra: None,
            registry_token_auth: None,
            consumer_retention_days: Some(7),
            bundle_source: "none".into(),
            bundle_poll_seconds: 5,
            keys_source: "none".into(),
            keys_refresh_seconds: 30,
            wasm_url: None,
            wasm_sha256: None,
            tls: false,
        }
    }

    #[test]
    fn wasm_url_renders_remote_code_and_its_cluster_and_refuses_bad_input() {
        let dir = scratch("remote");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        a.wasm_url = Some("http://127.0.0.1:8080/f/registry_guard.wasm".into());
        render(&a).unwrap();
        let out = dir.join("out");
        let (doc, _) = crate::deliver::read_filter_config(&out.join("ecds/registry-guard.json")).unwrap();
        let code = doc.pointer("/resources/0/typed_config/config/vm_config/code").unwrap();
        // sha256 of "\0asm".
        assert_eq!(code["remote"]["sha256"], "cd5d4935a48c0672cb06407bb443bc0087aff947c6b864bac886982c73b3027f");
        assert_eq!(code["remote"]["http_uri"]["cluster"], "wasm_source");
        let envoy = fs::read_to_string(out.join("envoy.yaml")).unwrap();
        assert!(envoy.contains(r#""name":"wasm_source""#) && envoy.contains(r#""port_value":8080"#), "{envoy}");
        assert!(!envoy.contains("\"local\""), "the events role still reads a file");
        for (url, sha, needle) in [
            ("https://h/x.wasm", None, "only http:// URLs"),
            ("http://h:0/x.wasm", None, "has no valid port"),
            ("http://h:80", None, "is not http://HOST[:PORT]/PATH"),
            ("http://h/x.wasm", Some("abc"), "is not a sha256"),
        ] {
            a.wasm_url = Some(url.into());
            a.wasm_sha256 = sha.map(str::to_owned);
            let e = format!("{:#}", render(&a).err().unwrap());
            assert!(e.contains(needle), "{url}: {e}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_renders_certificates_listener_tls_and_an_https_realm() {
        let dir = scratch("tls");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        a.tls = true;
        render(&a).unwrap();
        let out = dir.join("out");
        for f in ["ca.pem", "server.pem", "server-key.pem"] {
            assert!(out.join("tls").join(f).is_file(), "tls/{f} missing");
        }
        let envoy = fs::read_to_string(out.join("envoy.yaml")).unwrap();
        assert_eq!(envoy.matches("DownstreamTlsContext").count(), 2, "both client listeners");
        assert!(envoy.contains(r#""path":"/jwt/auth""#) && envoy.contains(r#""disabled":true"#));
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("filter.json")).unwrap()).unwrap();
        assert_eq!(filter["realm"], "https://127.0.0.1:42000/jwt/auth");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A scratch directory under target/ (removed at the end of a passing test).
    fn scratch(name: &str) -> PathBuf {
        let d = repo().join("target/stack-render-tests").join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn renders_every_file_with_the_given_ports() {
        let dir = scratch("files");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        // An old setting (the shared-data ring of earlier versions) is still accepted.
        a.filter_extra = Some(r#"{"correlation": {"slots": 0}}"#.into());
        let stack = render(&a).unwrap();
        let out = dir.join("out");
        for f in [
            "registry.yml",
            "hub.yml",
            "dependency-proxy.yml",
            "envoy.yaml",
            "filter.json",
            "filter-dependency-proxy.json",
            "ecds/registry-guard.json",
            "ecds/registry-guard-dependency-proxy.json",
            "envoy-bundle.jws",
            "http-secret",
            "events-secret",
            "consumer-read-token",
            "stack.json",
            "stack.env",
        ] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        for f in ["signing-key.pem", "jwks.json", "operator-key.pem", "operator-jwks.json", "operator-token"] {
            assert!(a.config_dir.join("keys").join(f).is_file(), "keys/{f} missing");
        }
        assert!(a.config_dir.join("bundle.jws").is_file());
        let envoy = fs::read_to_string(out.join("envoy.yaml")).unwrap();
        assert!(!envoy.contains("${"), "placeholder left");
        for port in [42000, 42001, 42002, 42003, 42005, 42006, 42007, 42008] {
            assert!(envoy.contains(&format!("port_value: {port} ")), "port {port} not in envoy.yaml");
        }
        let registry = fs::read_to_string(out.join("registry.yml")).unwrap();
        assert!(registry.contains("addr: 127.0.0.1:42002") && registry.contains("http://127.0.0.1:42006/events"));
        assert!(fs::read_to_string(out.join("hub.yml")).unwrap().contains("addr: 127.0.0.1:42004"));
        let cache = fs::read_to_string(out.join("dependency-proxy.yml")).unwrap();
        assert!(cache.contains("127.0.0.1:42003") && cache.contains("remoteurl: http://127.0.0.1:42004"));
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("filter-dependency-proxy.json")).unwrap()).unwrap();
        assert_eq!(filter["endpoint"], "dependency-proxy");
        assert_eq!(filter["realm"], "http://127.0.0.1:42001/jwt/auth");
        assert_eq!(filter["environment"], "example");
        assert_eq!(filter["leeway_seconds"], 2);
        assert_eq!(filter["correlation"], serde_json::json!({"slots": 0}));
        // One attribution key for the registry role of every endpoint and the events role,
        // kept across renders (every Envoy rendered from this configuration shares it).
        let key = fs::read_to_string(a.config_dir.join("keys/attribution-key")).unwrap();
        assert_eq!(filter["attribution"]["key"], key.trim());
        let events_config = format!("value: '{}'", events_filter_config(key.trim()));
        assert!(envoy.contains(&events_config), "events role without the key");
        render(&a).unwrap();
        assert_eq!(fs::read_to_string(a.config_dir.join("keys/attribution-key")).unwrap(), key);
        assert!(filter["bundle"].as_str().is_some());
        let summary: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(out.join("stack.json")).unwrap()).unwrap();
        assert_eq!(summary["envoy_base_id"], 42008);
        assert!(summary["files"]["envoy_bundle"].as_str().unwrap().ends_with("out/envoy-bundle.jws"));
        assert_eq!(summary["ports"]["dependency-proxy-listen"], 42007);
        let names: Vec<&str> = stack.processes().iter().map(|p| p.name).collect();
        assert_eq!(names, ["registry", "hub", "dependency-proxy", "consumer", "token-service", "envoy"]);
        let envoy_cmd = summary["processes"][5]["command"].as_array().unwrap();
        assert!(envoy_cmd.windows(2).any(|w| w[0] == "--base-id" && w[1] == "42008"));
        let consumer_cmd = summary["processes"][3]["command"].as_array().unwrap();
        assert!(consumer_cmd.windows(2).any(|w| w[0] == "--retention-days" && w[1] == "7"));
        let env = fs::read_to_string(out.join("stack.env")).unwrap();
        assert!(env.contains("LISTEN_PORT=42000\n") && env.contains("ENVOY_BASE_ID=42008\n"), "{env}");
        assert!(env.contains("STACK_CMD_TOKEN_SERVICE=("), "{env}");

        // Rendering again keeps the secrets and keys, and the bundle an operator pushed.
        let secret = fs::read_to_string(out.join("http-secret")).unwrap();
        let key = fs::read_to_string(a.config_dir.join("keys/signing-key.pem")).unwrap();
        let ecds = out.join("ecds/registry-guard.json");
        let pushed = fs::read_to_string(&ecds).unwrap().replace(filter["bundle"].as_str().unwrap(), "PUSHED");
        fs::write(&ecds, pushed).unwrap();
        fs::remove_file(out.join("envoy-bundle.jws")).unwrap();
        let _ = render_err(&a); // `PUSHED` is not a signed bundle: refused, by name
        assert_eq!(fs::read_to_string(out.join("envoy-bundle.jws")).unwrap(), "PUSHED");
        fs::remove_file(&ecds).unwrap();
        fs::remove_file(out.join("envoy-bundle.jws")).unwrap();
        render(&a).unwrap();
        assert_eq!(fs::read_to_string(out.join("http-secret")).unwrap(), secret);
        assert_eq!(fs::read_to_string(a.config_dir.join("keys/signing-key.pem")).unwrap(), key);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_source_makes_the_filter_fetch_the_token_service_jwks() {
        let dir = scratch("keys-source");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        render(&a).unwrap();
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("out/filter.json")).unwrap()).unwrap();
        assert!(filter.get("keys_source").is_none());
        a.keys_source = "token-service".into();
        a.keys_refresh_seconds = 3;
        render(&a).unwrap();
        for file in ["out/filter.json", "out/filter-dependency-proxy.json"] {
            let filter: serde_json::Value = serde_json::from_str(&fs::read_to_string(dir.join(file)).unwrap()).unwrap();
            assert_eq!(
                filter["keys_source"],
                serde_json::json!({"cluster": "token_service", "path": "/jwks", "refresh_seconds": 3}),
                "{file}"
            );
            assert!(filter["jwks"]["keys"].as_array().is_some_and(|k| !k.is_empty()), "boot keys kept: {file}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bundle_source_makes_the_filter_follow_the_token_service() {
        let dir = scratch("follow");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        a.bundle_source = "long-poll".into();
        render(&a).unwrap();
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("out/filter.json")).unwrap()).unwrap();
        let token = fs::read_to_string(a.config_dir.join("keys/bundle-read-token")).unwrap();
        assert_eq!(
            filter["bundle_source"],
            serde_json::json!({"cluster": "token_service", "path": "/bundle", "token": token.trim(),
                               "poll_seconds": 5, "wait_seconds": 20})
        );
        assert!(a.config_dir.join("keys/bundle-read-token.sha256").is_file());
        a.bundle_source = "poll".into();
        a.bundle_poll_seconds = 2;
        render(&a).unwrap();
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("out/filter-dependency-proxy.json")).unwrap()).unwrap();
        assert_eq!(
            (filter["bundle_source"]["poll_seconds"].as_u64(), filter["bundle_source"]["wait_seconds"].as_u64()),
            (Some(2), Some(0))
        );
        // A token service that would not serve the bundle is named.
        let settings = a.config_dir.join("token-service.json");
        let text = fs::read_to_string(&settings).unwrap().replace("bundle_read_token_sha256", "x_unused");
        fs::write(&settings, text).unwrap();
        assert!(render_err(&a).contains("has no `bundle_read_token_sha256`"));
        // The OCI artifact in the stack's registry needs no read token; the filter
        // configuration it renders is one the filter accepts.
        a.bundle_source = "oci".into();
        render(&a).unwrap();
        let filter: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("out/filter.json")).unwrap()).unwrap();
        assert_eq!(
            filter["bundle_source"],
            serde_json::json!({"cluster": "registry", "poll_seconds": 2,
                               "oci": {"repository": "registry-guard/policy", "reference": "prod"}})
        );
        let source: registry_guard_core::policy::follow::BundleSource =
            serde_json::from_value(filter["bundle_source"].clone()).unwrap();
        assert_eq!(source.check(), Ok(()));
        let _ = fs::remove_dir_all(&dir);
    }

    fn render_err(a: &RenderArgs) -> String {
        match render(a) {
            Ok(_) => panic!("rendered"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn refuses_what_it_cannot_render() {
        let dir = scratch("errors");
        let wasm = dir.join("filter.wasm");
        fs::write(&wasm, b"\0asm").unwrap();
        let mut a = args(&dir, &wasm);
        a.filter_extra = Some("[1]".into());
        assert!(render_err(&a).contains("not a JSON object"));
        a.filter_extra = Some(r#"{"leeway_seconds": "soon"}"#.into());
        assert!(render_err(&a).contains("leeway_seconds"));
        a.filter_extra = None;
        a.wasm = Some(dir.join("missing.wasm"));
        assert!(render_err(&a).contains("no filter at"));
        a.wasm = Some(wasm);
        fs::remove_file(a.config_dir.join("principals.json")).unwrap();
        assert!(render_err(&a).contains("principals.json"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// The rendered bootstrap (with the ECDS files it points at) through `envoy --mode
    /// validate`, where Envoy and the built filter are available (`make build`).
    #[test]
    fn rendered_envoy_config_validates() {
        let (envoy, wasm) = (repo().join(".venv/bin/envoy"), repo().join("target/filter/registry_guard.wasm"));
        if !envoy.exists() || !wasm.exists() {
            eprintln!("skipped: needs {} and {}", envoy.display(), wasm.display());
            return;
        }
        let dir = scratch("validate");
        let stack = render(&args(&dir, &wasm)).unwrap();
        let out = std::process::Command::new(&envoy)
            .args(["--mode", "validate", "--log-level", "error", "-c"])
            .arg(stack.out.join("envoy.yaml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "envoy --mode validate: {}", String::from_utf8_lossy(&out.stderr));
        let _ = fs::remove_dir_all(&dir);
    }
}
