//! `rgctl`: the operator CLI of registry-guard.

// Reading a `serde_json::Value` by key never panics (a missing key reads as `Null`); writes
// go through `as_object_mut`.
#![allow(clippy::indexing_slicing)]

mod deliver;
mod image;
mod mint;
mod oci;
mod stack;
mod wasm_image;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use argon2::password_hash::{PasswordHasher as _, SaltString};
use clap::{Parser, Subcommand};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::policy::bundle::Policy;
use registry_guard_core::policy::directory::Directory;
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys::SigningKey;
use sha2::{Digest as _, Sha256};

#[derive(Parser)]
#[command(name = "rgctl", version, about = "Operator CLI for registry-guard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an ES256 key (PKCS#8 PEM, mode 0600) unless one exists, and write its JWKS.
    /// `--name signing` (default): the token service's key → `signing-key.pem`, `jwks.json`;
    /// `--name operator`: the bundle-signing key → `operator-key.pem`, `operator-jwks.json`;
    /// any other name (e.g. `next`, for key rotation) → `<name>-key.pem`, `<name>-jwks.json`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "signing")]
        name: String,
        /// An RSA 2048 key (PKCS#8 PEM `<name>-key.pem`) for RS256 job ID tokens
        /// (`ci_jobs.id_token_rsa_key` of token-service.json), instead of a P-256 key.
        #[arg(long)]
        rsa: bool,
    },
    /// Check a policy bundle (JSON) and print its revision and rule count; errors name the
    /// JSON path. With `--keys`, the file is a signed bundle checked against those keys.
    Validate {
        bundle: PathBuf,
        #[arg(long)]
        keys: Option<PathBuf>,
    },
    /// Validate and sign a bundle with an operator key; prints the compact JWS.
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Deliver a signed bundle to running Envoys (by replacing their ECDS file) and token
    /// services, and report what each component did with it.
    Push {
        /// The signed bundle (`rgctl sign` output).
        bundle: PathBuf,
        /// An Envoy to update: `ECDS_FILE=ADMIN_URL` (e.g. `.run/example/ecds/registry-guard.json=http://127.0.0.1:9901`).
        #[arg(long = "envoy", value_name = "ECDS_FILE=ADMIN_URL")]
        envoys: Vec<String>,
        /// A token service to update (base URL, e.g. `http://127.0.0.1:5001`).
        #[arg(long = "token-service", value_name = "URL")]
        token_services: Vec<String>,
        /// Deliver even if the local check fails or the revision is older than the active
        /// one (an explicit rollback; also to exercise the components' own checks).
        #[arg(long)]
        force: bool,
        /// File holding the operator token that token services require for `PUT /bundle`
        /// (`rgctl operator-token` writes it).
        #[arg(long, value_name = "FILE", env = "RGCTL_OPERATOR_TOKEN_FILE")]
        operator_token_file: Option<PathBuf>,
        /// Also store the bundle as an OCI artifact under this tag
        /// (`REGISTRY/REPOSITORY:TAG`, e.g. `127.0.0.1:5000/registry-guard/policy:prod`), for
        /// filters and token services whose `bundle_source` is `oci`.
        #[arg(long, value_name = "REGISTRY/REPOSITORY:TAG")]
        oci: Option<String>,
        /// Speak plain HTTP to the `--oci` registry (loopback and tests).
        #[arg(long, requires = "oci")]
        insecure: bool,
        /// Username for the `--oci` registry's token service (a user with push rights on
        /// the repository).
        #[arg(long, requires = "oci", env = "RGCTL_USERNAME")]
        username: Option<String>,
        /// File holding that user's password (or set `RGCTL_PASSWORD`).
        #[arg(long, requires = "username", value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Create the operator token that authorises `PUT /bundle` on token services, unless one
    /// exists: `<out>/operator-token` (the secret, mode 0600, for `rgctl push`) and
    /// `<out>/operator-token.sha256` (its digest, for `operator_token_sha256` in
    /// token-service.json). `--name bundle-read` makes the token fleet members present to
    /// `GET /bundle` instead (`bundle-read-token`, for `bundle_read_token_sha256`).
    OperatorToken {
        #[arg(long)]
        out: PathBuf,
        /// File name stem: `<name>-token` and `<name>-token.sha256`.
        #[arg(long, default_value = "operator")]
        name: String,
    },
    /// Replace the token keys running Envoys trust (key rotation): the JWKS from a file or a
    /// token service's `/jwks` URL goes into each filter configuration; the bundle stays.
    PushKeys {
        /// A JWKS file or URL (e.g. `http://127.0.0.1:5001/jwks`).
        #[arg(long, value_name = "FILE_OR_URL")]
        jwks: String,
        /// An Envoy to update: `ECDS_FILE=ADMIN_URL`.
        #[arg(long = "envoy", value_name = "ECDS_FILE=ADMIN_URL")]
        envoys: Vec<String>,
    },
    /// Print a signing key's ids: RFC 7638 thumbprint and libtrust key id.
    Kid {
        /// PKCS#8 PEM P-256 private key.
        key: PathBuf,
    },
    /// Show the active bundle revision (and rejections) of each component.
    Status {
        #[arg(long = "envoy-admin", value_name = "URL")]
        envoys: Vec<String>,
        #[arg(long = "token-service", value_name = "URL")]
        token_services: Vec<String>,
        /// A file listing the fleet, one component per line: `envoy <admin URL>` or
        /// `token-service <URL>` (`#` starts a comment).
        #[arg(long, value_name = "FILE")]
        fleet: Option<PathBuf>,
    },
    /// Explain the decision for a principal and a request under a bundle.
    Explain {
        /// Bundle JSON (unsigned) or signed JWS (`--keys` to verify it).
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        keys: Option<PathBuf>,
        /// principals.json
        #[arg(long)]
        principals: PathBuf,
        /// The user, or the deploy token (its username, e.g. `acme-ci`), the request is made as.
        /// With `--job-project`: the user who triggered the CI job.
        #[arg(long = "as", value_name = "USERNAME")]
        user: String,
        /// Explain for the job token of a CI job of this project, triggered by `--as`.
        #[arg(long, value_name = "PROJECT")]
        job_project: Option<String>,
        /// The job's id (bundle revocations name jobs by id).
        #[arg(long, default_value_t = 1, requires = "job_project")]
        job_id: u64,
        /// The job's pipeline id.
        #[arg(long, default_value_t = 1, requires = "job_project")]
        pipeline_id: u64,
        /// e.g. `PUT`
        method: String,
        /// e.g. `/v2/acme/web/app/manifests/v1`
        path: String,
    },
    /// Access review: every user and deploy token that may pull, push or delete a repository,
    /// and the protection rules that apply; or what one user or deploy token may do on every
    /// project. Computed with the token service's grant functions and the filter's decision.
    #[command(group(clap::ArgGroup::new("subject").required(true).args(["repository", "principal"])))]
    Access {
        /// Bundle JSON (unsigned) or signed JWS (`--keys` to verify it).
        #[arg(long)]
        bundle: PathBuf,
        #[arg(long)]
        keys: Option<PathBuf>,
        /// principals.json
        #[arg(long)]
        principals: PathBuf,
        /// e.g. `acme/web/app`
        #[arg(long)]
        repository: Option<String>,
        /// A username or a deploy token's username (e.g. `acme-ci`).
        #[arg(long)]
        principal: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write the Envoy ECDS resource file for the filter (atomically).
    FilterResource {
        /// Filter configuration JSON (`rgctl filter-config` output).
        #[arg(long)]
        config: PathBuf,
        /// The filter's .wasm.
        #[arg(long)]
        wasm: PathBuf,
        /// The ECDS file to write (e.g. `.run/example/ecds/registry-guard.json`).
        #[arg(long)]
        out: PathBuf,
        /// The resource (and VM) name: the listener's `config_discovery` name in envoy.yaml
        /// (`registry-guard`, or `registry-guard-dependency-proxy` for that endpoint).
        #[arg(long, default_value = "registry-guard")]
        name: String,
    },
    /// Sign registry tokens offline with a PEM key, one per line (for load generators).
    Mint {
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "bench")]
        sub: String,
        #[arg(long, default_value = "registry-guard")]
        issuer: String,
        #[arg(long, default_value = "container_registry")]
        audience: String,
        /// e.g. `repository:acme/web/app:pull,push` (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// `meta.access_level` of every grant (e.g. 40 for maintainer).
        #[arg(long)]
        access_level: Option<u8>,
        #[arg(long, default_value = "pat")]
        auth_type: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: i64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the JWKS (public keys) of one or more PEM signing keys.
    Jwks {
        #[arg(required = true)]
        keys: Vec<PathBuf>,
    },
    /// Hash a password (read from stdin) as an argon2id PHC string for principals.json.
    HashPassword,
    /// Hash a personal access token (read from stdin) as SHA-256 hex for principals.json.
    HashToken,
    /// Write a new fleet attribution key (base64url of 32 random bytes, mode 0600) to FILE,
    /// unless FILE exists; give the same key to every Envoy's filter (both roles: `rgctl
    /// filter-config --attribution-key-file`, `attribution.key` of the events role).
    AttributionKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the filter configuration JSON for the given realm, service, issuer and JWKS.
    FilterConfig {
        #[arg(long)]
        realm: String,
        #[arg(long, default_value = "container_registry")]
        service: String,
        #[arg(long, default_value = "registry-guard")]
        issuer: String,
        /// JWKS file of the trusted token keys; with `--keys-source-cluster` the boot fallback,
        /// and optional (without it the filter refuses every request until its first good
        /// fetch).
        #[arg(long, required_unless_present = "keys_source_cluster")]
        jwks: Option<PathBuf>,
        #[arg(long, default_value_t = 30)]
        leeway_seconds: i64,
        /// A signed bundle to activate (`rgctl sign` output).
        #[arg(long, requires = "bundle_keys")]
        bundle: Option<PathBuf>,
        /// JWKS of the operator keys that may sign bundles.
        #[arg(long)]
        bundle_keys: Option<PathBuf>,
        /// The deployment this filter serves: only bundles naming it are accepted.
        #[arg(long)]
        environment: Option<String>,
        /// Where the client address restored into events comes from: `peer` (a property
        /// lookup per request) or `x-forwarded-for` (its last entry; only with the listener's
        /// `use_remote_address: true`, as in envoy/envoy.yaml).
        #[arg(long, value_parser = ["peer", "x-forwarded-for"], default_value = "peer")]
        client_address: String,
        /// A file holding the fleet's attribution key (base64url of 32 bytes; `rgctl
        /// attribution-key` writes one): the filter seals who made each request into it for
        /// the events role. Without it, events are not attributed.
        #[arg(long)]
        attribution_key_file: Option<PathBuf>,
        /// The endpoint the filter guards: `registry`, or `dependency-proxy` (the group
        /// dependency proxy on its own listener, with GitLab's login and pull rules for it).
        #[arg(long, value_parser = ["registry", "dependency-proxy"], default_value = "registry")]
        endpoint: String,
        /// The filter fetches newer bundles itself from this Envoy cluster (a token service's
        /// `GET /bundle`); `--bundle` is then the boot fallback. Needs `--bundle-keys`.
        #[arg(long, requires = "bundle_keys")]
        bundle_source_cluster: Option<String>,
        /// Path of the bundle on the source.
        #[arg(long, default_value = "/bundle", requires = "bundle_source_cluster")]
        bundle_source_path: String,
        /// A file holding the bundle read token presented to the source.
        #[arg(long, requires = "bundle_source_cluster")]
        bundle_source_token_file: Option<PathBuf>,
        /// Seconds between polls (and the base of the backoff after failures).
        #[arg(long, default_value_t = 10, requires = "bundle_source_cluster")]
        bundle_source_poll_seconds: u64,
        /// Long polling: how long the source may hold a fetch (0: plain polling).
        #[arg(long, default_value_t = 0, requires = "bundle_source_cluster")]
        bundle_source_wait_seconds: u64,
        /// Refuse every request (503) after this long without a successful fetch.
        #[arg(long, requires = "bundle_source_cluster")]
        max_staleness_seconds: Option<u64>,
        /// The filter fetches its trusted token keys itself from this Envoy cluster (a token
        /// service's `GET /jwks`), refreshed every `--keys-source-refresh-seconds`.
        #[arg(long)]
        keys_source_cluster: Option<String>,
        /// Path of the JWKS on the keys source.
        #[arg(long, default_value = "/jwks", requires = "keys_source_cluster")]
        keys_source_path: String,
        /// Seconds between fetches of the JWKS (and the base of the backoff after failures).
        #[arg(long, default_value_t = 30, requires = "keys_source_cluster")]
        keys_source_refresh_seconds: u64,
    },
    /// Write a small OCI image layout (one layer) to push in demos and tests; no network.
    DemoImage {
        /// Directory of the OCI layout (created).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "v1")]
        tag: String,
        /// Text mixed into the layer so that each image has its own digests.
        #[arg(long, default_value = "registry-guard demo")]
        salt: String,
    },
    /// The filter as an OCI image in the Wasm "compat" layout (Istio `WasmPlugin`, Envoy
    /// Gateway `EnvoyExtensionPolicy`): `rgctl image build`.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Everything a stack (registry, hub, dependency proxy, consumer, token service, Envoy) is
    /// started from: `rgctl stack render`.
    Stack {
        #[command(subcommand)]
        command: StackCommand,
    },
    /// Render a template, replacing every `${NAME}` with `--set NAME=VALUE`; a
    /// `--set-json NAME=FILE` inserts FILE's contents as a JSON string literal.
    /// Fails if a placeholder is left unset.
    Render {
        template: PathBuf,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        #[arg(long = "set-json", value_name = "NAME=FILE")]
        set_json: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Write the filter as an OCI image layout (one tar+gzip layer holding `plugin.wasm`,
    /// annotation `module.wasm.image/variant=compat`); prints `oci:OUT:TAG`, the manifest
    /// digest (a `WasmPlugin`'s `sha256`) and the .wasm's sha256 (Envoy's `code.remote.sha256`).
    /// Push it with `skopeo copy oci:OUT:TAG docker://REGISTRY/NAME:TAG` (`make publish-image`).
    Build {
        /// The filter (default: target/filter/registry_guard.wasm).
        #[arg(long, default_value = "target/filter/registry_guard.wasm")]
        wasm: PathBuf,
        /// Directory of the OCI layout (replaced).
        #[arg(long, default_value = "target/filter/image")]
        out: PathBuf,
        /// The image tag (default: rgctl's version).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
}

#[derive(Subcommand)]
enum StackCommand {
    /// Write every rendered file of a stack for the given ports and configuration directory
    /// (registry, hub and dependency-proxy configs, Envoy's bootstrap, both filter
    /// configurations and their ECDS files, secrets; keys and the operator token if absent)
    /// and OUT/stack.json + OUT/stack.env: every port, Envoy's base id (its admin port), each
    /// file and each process's command line, in start order.
    Render(stack::RenderArgs),
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out, name, rsa: false } => keygen(&out, &name),
        Command::Keygen { out, name, rsa: true } => keygen_rsa(&out.join(format!("{name}-key.pem"))),
        Command::Validate { bundle, keys } => {
            let text = read(&bundle)?;
            let policy = match keys {
                None => Policy::from_json(&text),
                Some(k) => registry_guard_core::policy::bundle::verify(&text, &load_keyset(&k)?),
            }
            .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
            let claims = policy.claims.levels();
            let claim_count: usize = claims.iter().map(|l| l.claims.len()).sum();
            println!(
                "ok: {} is valid: revision {}, {} protection rules, {} additional claims at {} levels",
                bundle.display(),
                policy.revision,
                policy.rules.len(),
                claim_count,
                claims.len()
            );
            Ok(())
        }
        Command::Sign { bundle, key } => {
            let text = read(&bundle)?;
            let key = load_signing_key(&key)?;
            let jws = registry_guard_core::policy::bundle::sign(&text, &key)
                .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
            println!("{jws}");
            eprintln!("signed {} with operator key {}", bundle.display(), key.kid);
            Ok(())
        }
        Command::Push {
            bundle,
            envoys,
            token_services,
            force,
            operator_token_file,
            oci,
            insecure,
            username,
            password_file,
        } => {
            let token = operator_token_file.map(|f| read(&f).map(|t| t.trim().to_owned())).transpose()?;
            if let Some(reference) = oci {
                push_oci(&bundle, &reference, insecure, username, password_file, force)?;
                if envoys.is_empty() && token_services.is_empty() {
                    return Ok(());
                }
            }
            deliver::push(&bundle, &envoys, &token_services, force, token.as_deref())
        }
        Command::OperatorToken { out, name } => operator_token(&out, &name),
        Command::Status { mut envoys, mut token_services, fleet } => {
            if let Some(file) = fleet {
                let (e, t) = deliver::read_fleet(&read(&file)?).with_context(|| format!("in `{}`", file.display()))?;
                envoys.extend(e);
                token_services.extend(t);
            }
            deliver::status(&envoys, &token_services)
        }
        Command::PushKeys { jwks, envoys } => deliver::push_keys(&jwks, &envoys),
        Command::Kid { key } => {
            let key = load_signing_key(&key)?;
            println!("rfc7638  {}", key.thumbprint());
            println!("libtrust {}", key.libtrust_kid());
            Ok(())
        }
        Command::Explain { bundle, keys, principals, user, job_project, job_id, pipeline_id, method, path } => {
            use registry_guard_core::inspect::explain;
            let (policy, dir) = load_world(&bundle, keys.as_deref(), &principals)?;
            let e = match job_project {
                None => explain::explain(&dir, &policy, &user, &method, &path, unix_now()),
                Some(project) => {
                    let job = registry_guard_core::issue::job::Job {
                        id: job_id,
                        pipeline_id,
                        project,
                        user,
                        ref_name: "main".into(),
                        ref_type: registry_guard_core::issue::job::RefType::Branch,
                        ref_protected: false,
                    };
                    explain::explain_job(&dir, &policy, &job, &method, &path, unix_now())
                }
            }
            .map_err(anyhow::Error::msg)?;
            print!("{e}");
            Ok(())
        }
        Command::Access { bundle, keys, principals, repository, principal, json } => {
            use registry_guard_core::inspect::review;
            let (policy, dir) = load_world(&bundle, keys.as_deref(), &principals)?;
            let (text, value) = match (repository, principal) {
                (Some(repo), _) => {
                    let r = review::review_repository(&dir, &policy, &repo, unix_now()).map_err(anyhow::Error::msg)?;
                    (r.to_string(), r.to_json())
                }
                (None, Some(name)) => {
                    let r = review::review_principal(&dir, &policy, &name, unix_now()).map_err(anyhow::Error::msg)?;
                    (r.to_string(), r.to_json())
                }
                (None, None) => bail!("pass --repository NAME or --principal NAME"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{text}");
            }
            Ok(())
        }
        Command::FilterResource { config, wasm, out, name } => {
            deliver::write_filter_resource(&read(&config)?, &wasm, &out, &name)
        }
        Command::Mint { key, count, sub, issuer, audience, scopes, access_level, auth_type, ttl_seconds, out } => {
            let key = load_signing_key(&key)?;
            let m = mint::Mint {
                key,
                count,
                subject: sub,
                issuer,
                audience,
                scopes,
                access_level,
                auth_type,
                ttl_seconds,
                out,
            };
            mint::mint(&m)
        }
        Command::Jwks { keys } => {
            let mut jwks = Vec::new();
            for k in keys {
                jwks.push(load_signing_key(&k)?.public_jwk());
            }
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "keys": jwks }))?);
            Ok(())
        }
        Command::HashPassword => {
            let password = read_secret()?;
            let salt = SaltString::generate(&mut rand_core::OsRng);
            let hash = argon2::Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map_err(|e| anyhow::anyhow!("cannot hash password: {e}"))?;
            println!("{hash}");
            Ok(())
        }
        Command::AttributionKey { out } => {
            stack::attribution_key(&out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::HashToken => {
            let token = read_secret()?;
            println!("{}", hex(&Sha256::digest(token.as_bytes())));
            Ok(())
        }
        Command::FilterConfig {
            realm,
            service,
            issuer,
            jwks,
            leeway_seconds,
            bundle,
            bundle_keys,
            environment,
            client_address,
            attribution_key_file,
            endpoint,
            bundle_source_cluster,
            bundle_source_path,
            bundle_source_token_file,
            bundle_source_poll_seconds,
            bundle_source_wait_seconds,
            max_staleness_seconds,
            keys_source_cluster,
            keys_source_path,
            keys_source_refresh_seconds,
        } => {
            let keys_source = keys_source_cluster.map(|cluster| {
                serde_json::json!({
                    "cluster": cluster, "path": keys_source_path, "refresh_seconds": keys_source_refresh_seconds,
                })
            });
            let bundle = bundle.map(|b| read(&b).map(|t| t.trim().to_owned())).transpose()?;
            let bundle_keys = bundle_keys.map(|k| read_json(&k)).transpose()?;
            let bundle_source = match bundle_source_cluster {
                None => None,
                Some(cluster) => {
                    let mut source = serde_json::json!({
                        "cluster": cluster, "path": bundle_source_path,
                        "poll_seconds": bundle_source_poll_seconds, "wait_seconds": bundle_source_wait_seconds,
                    });
                    if let Some(f) = bundle_source_token_file {
                        source["token"] = read(&f)?.trim().into();
                    }
                    if let Some(s) = max_staleness_seconds {
                        source["max_staleness_seconds"] = s.into();
                    }
                    Some(source)
                }
            };
            let config = filter_config(&FilterSettings {
                realm,
                service,
                issuer,
                jwks: jwks.map(|j| read_json(&j)).transpose()?.unwrap_or(serde_json::Value::Null),
                leeway_seconds,
                bundle,
                bundle_keys,
                environment,
                client_address,
                endpoint,
                bundle_source,
                keys_source,
                attribution_key: attribution_key_file.map(|f| read(&f).map(|k| k.trim().to_owned())).transpose()?,
            })?;
            println!("{}", serde_json::to_string(&config)?);
            Ok(())
        }
        Command::DemoImage { out, tag, salt } => {
            image::write_oci_layout(&out, &tag, &salt)
                .with_context(|| format!("cannot write OCI layout `{}`", out.display()))?;
            println!("oci:{}:{tag}", out.display());
            Ok(())
        }
        Command::Image { command: ImageCommand::Build { wasm, out, tag } } => {
            let built = wasm_image::build(&wasm, &out, &tag, env!("CARGO_PKG_VERSION"))?;
            println!("oci:{}:{tag}", out.display());
            println!("manifest {}", built.manifest_digest);
            println!("layer    {}", built.layer_digest);
            println!("wasm     sha256:{}", built.wasm_sha256);
            Ok(())
        }
        Command::Stack { command: StackCommand::Render(args) } => {
            let stack = stack::render(&args)?;
            print!("{}", stack::report(&stack));
            Ok(())
        }
        Command::Render { template, set, set_json } => {
            let mut vars = BTreeMap::new();
            for kv in set {
                let (k, v) = kv.split_once('=').with_context(|| format!("`--set {kv}` is not NAME=VALUE"))?;
                vars.insert(k.to_owned(), v.to_owned());
            }
            for kv in set_json {
                let (k, f) = kv.split_once('=').with_context(|| format!("`--set-json {kv}` is not NAME=FILE"))?;
                let text = fs::read_to_string(f).with_context(|| format!("cannot read `{f}`"))?;
                vars.insert(k.to_owned(), serde_json::to_string(text.trim())?);
            }
            let text = fs::read_to_string(&template)
                .with_context(|| format!("cannot read template `{}`", template.display()))?;
            print!("{}", render(&text, &vars).with_context(|| format!("in `{}`", template.display()))?);
            Ok(())
        }
    }
}

/// What a filter configuration is made of (`rgctl filter-config`, `rgctl stack render`).
pub(crate) struct FilterSettings {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub jwks: serde_json::Value,
    pub leeway_seconds: i64,
    /// A signed bundle (compact JWS) to activate.
    pub bundle: Option<String>,
    pub bundle_keys: Option<serde_json::Value>,
    pub environment: Option<String>,
    /// `peer` or `x-forwarded-for`.
    pub client_address: String,
    /// `registry` or `dependency-proxy`.
    pub endpoint: String,
    /// `bundle_source` of the filter configuration (the filter fetches newer bundles).
    pub bundle_source: Option<serde_json::Value>,
    /// `keys_source` of the filter configuration (the filter fetches its trusted keys); with
    /// it, a `null` `jwks` is left out (no boot keys).
    pub keys_source: Option<serde_json::Value>,
    /// The fleet's attribution key (base64url), shared with the events role.
    pub attribution_key: Option<String>,
}

/// The filter configuration JSON, checked as the filter will check it.
pub(crate) fn filter_config(s: &FilterSettings) -> Result<serde_json::Value> {
    let mut config = serde_json::json!({
        "realm": s.realm, "service": s.service, "issuer": s.issuer,
        "leeway_seconds": s.leeway_seconds, "jwks": s.jwks,
    });
    if s.client_address != "peer" {
        config["correlation"] = serde_json::json!({ "client_address": s.client_address });
    }
    if s.endpoint != "registry" {
        config["endpoint"] = s.endpoint.clone().into();
    }
    if let Some(obj) = config.as_object_mut() {
        if let Some(keys) = &s.bundle_keys {
            obj.insert("bundle_keys".into(), keys.clone());
        }
        if let Some(b) = &s.bundle {
            obj.insert("bundle".into(), b.clone().into());
        }
        if let Some(env) = &s.environment {
            obj.insert("environment".into(), env.clone().into());
        }
        if let Some(source) = &s.bundle_source {
            obj.insert("bundle_source".into(), source.clone());
        }
        if let Some(source) = &s.keys_source {
            obj.insert("keys_source".into(), source.clone());
            if s.jwks.is_null() {
                obj.remove("jwks");
            }
        }
        if let Some(key) = &s.attribution_key {
            obj.insert("attribution".into(), serde_json::json!({ "key": key }));
        }
    }
    FilterConfig::from_json(serde_json::to_string(&config)?.as_bytes())?;
    Ok(config)
}

/// The bundle (unsigned, or signed and verified with `keys`) and the principals.
fn load_world(bundle: &Path, keys: Option<&Path>, principals: &Path) -> Result<(Policy, Directory)> {
    let text = read(bundle)?;
    let policy = match keys {
        None if text.trim_start().starts_with('{') => Policy::from_json(&text),
        None => bail!("{} is signed: pass --keys with the operator JWKS to verify it", bundle.display()),
        Some(k) => registry_guard_core::policy::bundle::verify(&text, &load_keyset(k)?),
    }
    .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let dir = Directory::from_json(&read(principals)?).map_err(|e| anyhow::anyhow!("{}: {e}", principals.display()))?;
    Ok((policy, dir))
}

/// Unix seconds now (deploy token expiry, user revocations); 0 if the clock is before 1970.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn read_secret() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    let s = s.trim_end_matches(['\n', '\r']).to_owned();
    if s.is_empty() {
        bail!("nothing on stdin: pipe the secret in, e.g. `printf %s \"$PASSWORD\" | rgctl hash-password`");
    }
    Ok(s)
}

/// `rgctl push --oci`: checks the signed bundle as `rgctl validate` would (unless `--force`),
/// then stores it as an OCI artifact.
fn push_oci(
    bundle: &Path,
    reference: &str,
    insecure: bool,
    username: Option<String>,
    password_file: Option<PathBuf>,
    force: bool,
) -> Result<()> {
    let target = oci::Target::parse(reference).context("--oci")?;
    let bytes = fs::read(bundle).with_context(|| format!("cannot read `{}`", bundle.display()))?;
    let text = std::str::from_utf8(&bytes).with_context(|| format!("`{}` is not UTF-8 text", bundle.display()))?;
    // The signature is checked by every follower with its own `bundle_keys`; here only that
    // this is a signed bundle (a compact JWS whose payload is a valid bundle).
    if !force {
        let payload = registry_guard_core::token::verify::decode_unverified(text.trim()).map_err(|e| {
            anyhow::anyhow!("{}: not a signed bundle (a compact JWS, `rgctl sign` output): {e}", bundle.display())
        })?;
        Policy::from_json(&payload.to_string())
            .map_err(|e| anyhow::anyhow!("{}: {}: {}", bundle.display(), e.path, e.reason))?;
    }
    let creds = match username {
        Some(user) => {
            let password = match password_file {
                Some(f) => read(&f)?.trim().to_owned(),
                None => std::env::var("RGCTL_PASSWORD")
                    .context("give --password-file or set RGCTL_PASSWORD for --username")?,
            };
            Some((user, password))
        }
        None => None,
    };
    let title = bundle.file_name().map_or_else(|| "bundle.jws".to_owned(), |n| n.to_string_lossy().into_owned());
    let digest =
        oci::push(&bytes, &title, &target, insecure, creds).with_context(|| format!("pushing to {reference}"))?;
    println!("oci {reference}: stored as {digest}");
    Ok(())
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(&read(path)?).with_context(|| format!("`{}` is not JSON", path.display()))
}

fn load_keyset(path: &Path) -> Result<KeySet> {
    KeySet::from_jwks(&read_json(path)?).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn operator_token(out: &Path, name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        bail!("token name `{name}` must be letters, digits, `-` or `_`");
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    let secret_path = out.join(format!("{name}-token"));
    let digest_path = out.join(format!("{name}-token.sha256"));
    if secret_path.exists() {
        eprintln!("keeping existing {name} token {}", secret_path.display());
    } else {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&secret_path, format!("{secret}\n").as_bytes())?;
        eprintln!("generated {name} token {}", secret_path.display());
    }
    let secret = read(&secret_path)?;
    let digest: String = Sha256::digest(secret.trim().as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&digest_path, format!("{digest}\n"))?;
    eprintln!("its SHA-256 is in {}", digest_path.display());
    Ok(())
}

fn keygen(out: &Path, name: &str) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        bail!("key name `{name}` must be letters, digits, `-` or `_`");
    }
    let (pem_name, jwks_name) = match name {
        "signing" => ("signing-key.pem".to_owned(), "jwks.json".to_owned()),
        other => (format!("{other}-key.pem"), format!("{other}-jwks.json")),
    };
    let pem_path = out.join(&pem_name);
    if pem_path.exists() {
        eprintln!("keeping existing {name} key {}", pem_path.display());
    } else {
        let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("cannot encode key: {e}"))?;
        write_private(&pem_path, pem.as_bytes())?;
        eprintln!("generated {name} key {}", pem_path.display());
    }
    let key = load_signing_key(&pem_path)?;
    let jwks = serde_json::json!({ "keys": [key.public_jwk()] });
    fs::write(out.join(&jwks_name), serde_json::to_string_pretty(&jwks)? + "\n")?;
    eprintln!("key id {} (JWKS in {})", key.kid, out.join(&jwks_name).display());
    Ok(())
}

/// `rgctl keygen --rsa`: an RSA 2048 private key as PKCS#8 PEM at `path`, unless it exists.
pub(crate) fn keygen_rsa(path: &Path) -> Result<()> {
    use rsa::pkcs8::EncodePrivateKey as _;
    if path.exists() {
        eprintln!("keeping existing RSA key {}", path.display());
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    }
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
        .map_err(|e| anyhow::anyhow!("cannot generate an RSA key: {e}"))?;
    let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).map_err(|e| anyhow::anyhow!("cannot encode key: {e}"))?;
    write_private(path, pem.as_bytes())?;
    eprintln!("generated RSA key {}", path.display());
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| anyhow::anyhow!("`{}` is not a PKCS#8 PEM P-256 private key: {e}", path.display()))?;
    Ok(SigningKey::new(key))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces `${NAME}`; a placeholder without a value is an error naming it.
fn render(text: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(rest.get(..start).unwrap_or_default());
        let after = rest.get(start + 2..).unwrap_or_default();
        let end = after.find('}').context("unterminated `${` placeholder")?;
        let name = after.get(..end).unwrap_or_default();
        let value =
            vars.get(name).with_context(|| format!("placeholder `${{{name}}}` has no value (use --set {name}=...)"))?;
        out.push_str(value);
        rest = after.get(end + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_replaces_and_reports_missing() {
        let mut vars = BTreeMap::new();
        vars.insert("A".to_owned(), "1".to_owned());
        assert_eq!(render("x ${A} y ${A}", &vars).unwrap(), "x 1 y 1");
        let e = render("${B}", &vars).unwrap_err().to_string();
        assert!(e.contains("`${B}`"), "{e}");
        assert!(render("${A", &vars).is_err());
    }
}
