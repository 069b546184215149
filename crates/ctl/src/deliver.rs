//! Delivering bundles: the Envoy ECDS file and the token service's `/bundle` endpoint.
//!
//! Why a file (ECDS with `path_config_source`) and not the filter polling an endpoint: Envoy
//! already swaps a discovered filter configuration atomically (requests in flight finish
//! under the configuration they started with, new ones get the new one), rejects one the
//! filter refuses while the previous keeps serving, counts both in its own stats, and a
//! restarted Envoy reads the same file: last pushed bundle, no extra moving part in the
//! request path and no outbound calls from the filter.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use registry_guard_core::policy::bundle;
use registry_guard_core::token::jwks::KeySet;

const STAT_PREFIX: &str = "extension_config_discovery.http_filter.registry-guard.";

/// The ECDS stats prefix of the resource in `doc` (`registry-guard` unless it names another:
/// the dependency-proxy endpoint's resource is `registry-guard-dependency-proxy`).
fn stat_prefix(doc: &serde_json::Value) -> String {
    match doc.pointer("/resources/0/name").and_then(|v| v.as_str()) {
        Some(name) if name != "registry-guard" => format!("extension_config_discovery.http_filter.{name}."),
        _ => STAT_PREFIX.to_owned(),
    }
}

/// The ECDS resource (a DiscoveryResponse) holding the wasm filter with `config` JSON and
/// `code` as its `vm_config.code` (a local file, or a remote URL with its sha256).
fn resource(config_json: &str, code: serde_json::Value, name: &str) -> serde_json::Value {
    serde_json::json!({
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": name,
                    "root_id": "registry-guard",
                    // A trap kills the worker's VM: its requests get 503 (never a pass) and
                    // Envoy builds a new VM with this same configuration after a backoff
                    // (1 s base); FAIL_CLOSED would leave the worker refusing until restart.
                    "failure_policy": "FAIL_RELOAD",
                    // A refusal is sent only after the request body has been read (filter
                    // `DeniedBody`): pausing at the headers must still deliver the body to
                    // the filter (StopIteration), not stop everything (StopAllIteration).
                    "allow_on_headers_stop_iteration": true,
                    "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": config_json},
                    "vm_config": {
                        "vm_id": name,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": code
                    }
                }
            }
        }]
    })
}

/// Writes `bytes` to `path` atomically (temporary file in the same directory, then rename),
/// which is what Envoy's watched directory picks up.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("ecds")));
    fs::write(&tmp, bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot move into `{}`", path.display()))?;
    Ok(())
}

pub fn write_filter_resource(config_json: &str, wasm: &Path, out: &Path, name: &str) -> Result<()> {
    let wasm = fs::canonicalize(wasm).with_context(|| format!("no filter at `{}`", wasm.display()))?;
    write_filter_resource_code(config_json, local_code(&wasm), out, name)
}

/// `vm_config.code` for a local file.
pub fn local_code(wasm: &Path) -> serde_json::Value {
    serde_json::json!({"local": {"filename": wasm.display().to_string()}})
}

/// As [`write_filter_resource`], with `code` (see [`local_code`]; `rgctl stack render
/// --wasm-url` gives a `remote` one) as the filter's `vm_config.code`.
pub fn write_filter_resource_code(config_json: &str, code: serde_json::Value, out: &Path, name: &str) -> Result<()> {
    registry_guard_core::decide::config::FilterConfig::from_json(config_json.trim().as_bytes())?;
    let text = serde_json::to_string_pretty(&resource(config_json.trim(), code, name))?;
    write_atomically(out, text.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The filter configuration JSON inside an ECDS file.
pub(crate) fn read_filter_config(ecds: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
    let text = fs::read_to_string(ecds).with_context(|| format!("cannot read ECDS file `{}`", ecds.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", ecds.display()))?;
    let value = doc
        .pointer("/resources/0/typed_config/config/configuration/value")
        .and_then(|v| v.as_str())
        .with_context(|| format!("`{}` holds no registry-guard filter configuration", ecds.display()))?;
    let config: serde_json::Value = serde_json::from_str(value).context("filter configuration is not JSON")?;
    Ok((doc, config))
}

fn envoy_stats(admin: &str) -> Result<std::collections::BTreeMap<String, i64>> {
    let url = format!(
        "{}/stats?filter=registry_guard|registry-guard|^server.concurrency$|rq_direct_response$",
        admin.trim_end_matches('/')
    );
    let text = ureq::get(&url)
        .timeout(Duration::from_secs(5))
        .call()
        .with_context(|| format!("cannot reach Envoy admin at {admin}"))?
        .into_string()?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        .collect())
}

fn stat(stats: &std::collections::BTreeMap<String, i64>, name: &str) -> i64 {
    stats.get(name).copied().unwrap_or(0)
}

/// Revision claimed by a signed bundle's payload, without verifying it (for messages).
fn claimed_revision(jws: &str) -> Option<u64> {
    let payload = match serde_json::from_str::<serde_json::Value>(jws) {
        Ok(json) => json,
        Err(_) => registry_guard_core::token::verify::decode_unverified(jws).ok()?,
    };
    payload.get("revision")?.as_u64()
}

pub fn push(
    bundle_path: &Path,
    envoys: &[String],
    token_services: &[String],
    force: bool,
    operator_token: Option<&str>,
) -> Result<()> {
    if envoys.is_empty() && token_services.is_empty() {
        bail!("nothing to push to: give --envoy ECDS_FILE=ADMIN_URL, --token-service URL and/or --oci REGISTRY/REPOSITORY:TAG");
    }
    let jws = fs::read_to_string(bundle_path).with_context(|| format!("cannot read `{}`", bundle_path.display()))?;
    let jws = jws.trim();
    let revision = claimed_revision(jws).map_or("?".to_owned(), |r| r.to_string());
    let mut failures = 0;
    // Every Envoy is checked before any ECDS file is written: one refusing the revision
    // (older than what it runs) stops the push for all, so the fleet is not left split.
    let mut plans = Vec::new();
    for spec in envoys {
        let (ecds, admin) =
            spec.split_once('=').with_context(|| format!("`--envoy {spec}` is not ECDS_FILE=ADMIN_URL"))?;
        match plan_envoy(jws, Path::new(ecds), admin, force) {
            Ok(plan) => plans.push((admin, plan)),
            Err(e) => {
                failures += 1;
                println!("envoy {admin}: REFUSED revision {revision}: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} Envoy(s) refused the bundle before delivery; nothing was delivered");
    }
    for (admin, plan) in plans {
        match deliver_envoy(plan, admin) {
            Ok(msg) => println!("envoy {admin}: {msg}"),
            Err(e) => {
                failures += 1;
                println!("envoy {admin}: REJECTED revision {revision}: {e:#}");
            }
        }
    }
    for url in token_services {
        match push_token_service(jws, url, operator_token) {
            Ok(msg) => println!("token service {url}: {msg}"),
            Err(e) => {
                failures += 1;
                println!("token service {url}: REJECTED revision {revision}: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} component(s) did not accept the bundle; they keep their previous revision");
    }
    Ok(())
}

/// Rollback protection for an Envoy, decided before its ECDS file is touched: the revision
/// to deliver must be above both the revision of the bundle in the file (what a restart
/// would load) and the revision Envoy reports active; the same revision is a no-op only if
/// the bundle is byte for byte the one in the file. The filter itself accepts any valid
/// configuration (its decision depends on the configuration alone), so this is where an
/// older bundle is stopped; `--force` is an explicit rollback.
enum Delivery {
    Deliver,
    Unchanged(u64),
}

fn check_revision(
    new: u64,
    jws: &str,
    in_file: Option<(&str, u64)>,
    active: Option<i64>,
    force: bool,
) -> Result<Delivery> {
    if let Some((file_jws, file_revision)) = in_file {
        if new == file_revision && file_jws.trim() == jws.trim() {
            return Ok(Delivery::Unchanged(new));
        }
    }
    let current = in_file.map(|(_, r)| r).into_iter().chain(active.and_then(|a| u64::try_from(a).ok())).max();
    match current {
        Some(current) if new <= current && !force => bail!(
            "revision {new} is not newer than the active revision {current}: refused before touching the ECDS file \
             (a changed bundle needs a new revision; to roll back, sign the old content with a revision above \
             {current}, or pass --force)"
        ),
        Some(current) if new < current => {
            eprintln!("warning: --force: rolling back from revision {current} to {new}");
            Ok(Delivery::Deliver)
        }
        _ => Ok(Delivery::Deliver),
    }
}

/// What delivering a bundle to one Envoy will do, decided before anything is written.
struct EnvoyPlan<'a> {
    ecds: &'a Path,
    previous: Vec<u8>,
    doc: serde_json::Value,
    config: serde_json::Value,
    /// `Some(revision)`: the file already holds this very bundle.
    unchanged: Option<u64>,
}

fn deliver_envoy(mut plan: EnvoyPlan<'_>, admin: &str) -> Result<String> {
    if let Some(r) = plan.unchanged {
        return Ok(format!("revision {r} is already delivered, byte for byte: unchanged"));
    }
    replace_config(plan.ecds, admin, &plan.previous, &mut plan.doc, &plan.config)
}

fn plan_envoy<'a>(jws: &str, ecds: &'a Path, admin: &str, force: bool) -> Result<EnvoyPlan<'a>> {
    let previous = fs::read(ecds).with_context(|| format!("cannot read ECDS file `{}`", ecds.display()))?;
    let (doc, mut config) = read_filter_config(ecds)?;
    let environment = config.get("environment").and_then(|e| e.as_str()).map(str::to_owned);
    // The local check uses exactly the keys and environment the filter will use.
    let mut new_revision = None;
    let mut in_file = None;
    if let Some(keys) = config.get("bundle_keys") {
        let keys = KeySet::from_jwks(keys).map_err(|e| anyhow::anyhow!("bundle_keys in `{}`: {e}", ecds.display()))?;
        match bundle::verify_for(jws, &keys, environment.as_deref()) {
            Ok(policy) => new_revision = Some(policy.revision),
            Err(e) if !force => bail!("refused locally (use --force to deliver anyway): {e}"),
            Err(e) => eprintln!("warning: delivering a bundle that fails the local check: {e}"),
        }
        if let Some(current) = config.get("bundle").and_then(|b| b.as_str()) {
            // The file's own bundle was accepted by this Envoy; read its revision the same way.
            if let Ok(policy) = bundle::verify(current, &keys) {
                in_file = Some((current.to_owned(), policy.revision));
            }
        }
    } else if !force {
        bail!("`{}` has no `bundle_keys`: the filter would refuse any bundle", ecds.display());
    }
    if let Some(new) = new_revision {
        let active = envoy_stats(admin).ok().map(|s| stat(&s, "wasmcustom.registry_guard.bundle_revision"));
        let in_file = in_file.as_ref().map(|(j, r)| (j.as_str(), *r));
        if let Delivery::Unchanged(r) = check_revision(new, jws, in_file, active, force)? {
            return Ok(EnvoyPlan { ecds, previous, doc, config, unchanged: Some(r) });
        }
    }
    config
        .as_object_mut()
        .with_context(|| format!("filter configuration in `{}` is not a JSON object", ecds.display()))?
        .insert("bundle".into(), jws.into());
    Ok(EnvoyPlan { ecds, previous, doc, config, unchanged: None })
}

/// Writes `config` into the ECDS document `doc` (read from `ecds`, whose bytes were
/// `previous`) and waits for Envoy to load or reject it; on a rejection the previous file is
/// put back.
fn replace_config(
    ecds: &Path,
    admin: &str,
    previous: &[u8],
    doc: &mut serde_json::Value,
    config: &serde_json::Value,
) -> Result<String> {
    let config_text = serde_json::to_string(config)?;
    if let Some(v) = doc.pointer_mut("/resources/0/typed_config/config/configuration/value") {
        *v = config_text.into();
    }
    let before = envoy_stats(admin)?;
    write_atomically(ecds, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    let prefix = stat_prefix(doc);
    let (reload, rejected) = (format!("{prefix}config_reload"), format!("{prefix}update_rejected"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = envoy_stats(admin)?;
        if stat(&now, &rejected) > stat(&before, &rejected) {
            // Keep the last known good configuration on disk too, so a restart serves it.
            write_atomically(ecds, previous)?;
            bail!(
                "Envoy rejected the configuration (see its log for the filter's reason); active revision stays {}",
                stat(&now, "wasmcustom.registry_guard.bundle_revision")
            );
        }
        if stat(&now, &reload) > stat(&before, &reload) {
            return Ok(format!(
                "active revision {} (config_reload {})",
                stat(&now, "wasmcustom.registry_guard.bundle_revision"),
                stat(&now, &reload)
            ));
        }
        if Instant::now() > deadline {
            bail!("Envoy did not pick up `{}` within 15 s", ecds.display());
        }
    }
}

/// Reads a JWKS from a file or an `http://` URL (a token service's `/jwks`).
pub fn read_jwks(source: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value = if source.starts_with("http://") || source.starts_with("https://") {
        let text = ureq::get(source)
            .timeout(Duration::from_secs(10))
            .call()
            .with_context(|| format!("cannot fetch the JWKS at {source}"))?
            .into_string()?;
        serde_json::from_str(&text).with_context(|| format!("{source} did not answer JSON"))?
    } else {
        let text = fs::read_to_string(source).with_context(|| format!("cannot read `{source}`"))?;
        serde_json::from_str(&text).with_context(|| format!("`{source}` is not JSON"))?
    };
    KeySet::from_jwks(&value).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    Ok(value)
}

/// Replaces the trusted token keys (`jwks`) of running Envoys (key rotation), keeping the
/// rest of their filter configuration (bundle included), and reports what each did.
pub fn push_keys(jwks_source: &str, envoys: &[String]) -> Result<()> {
    if envoys.is_empty() {
        bail!("nothing to push to: give --envoy ECDS_FILE=ADMIN_URL");
    }
    let jwks = read_jwks(jwks_source)?;
    let keys = KeySet::from_jwks(&jwks).map_err(|e| anyhow::anyhow!("{jwks_source}: {e}"))?;
    let kids: Vec<&str> = keys.kids().collect();
    let mut failures = 0;
    for spec in envoys {
        let (ecds, admin) =
            spec.split_once('=').with_context(|| format!("`--envoy {spec}` is not ECDS_FILE=ADMIN_URL"))?;
        let result = (|| {
            let ecds = Path::new(ecds);
            let previous = fs::read(ecds).with_context(|| format!("cannot read ECDS file `{}`", ecds.display()))?;
            let (mut doc, mut config) = read_filter_config(ecds)?;
            config
                .as_object_mut()
                .with_context(|| format!("filter configuration in `{}` is not a JSON object", ecds.display()))?
                .insert("jwks".into(), jwks.clone());
            registry_guard_core::decide::config::FilterConfig::from_json(serde_json::to_string(&config)?.as_bytes())
                .map_err(|e| anyhow::anyhow!("refused locally: {e}"))?;
            replace_config(ecds, admin, &previous, &mut doc, &config)
        })();
        match result {
            Ok(msg) => println!("envoy {admin}: trusts {} key id(s) {kids:?}; {msg}", kids.len()),
            Err(e) => {
                failures += 1;
                println!("envoy {admin}: REJECTED the keys: {e:#}");
            }
        }
    }
    if failures > 0 {
        bail!("{failures} Envoy(s) did not accept the keys; they keep their previous keys");
    }
    Ok(())
}

fn push_token_service(jws: &str, url: &str, operator_token: Option<&str>) -> Result<String> {
    let endpoint = format!("{}/bundle", url.trim_end_matches('/'));
    let Some(token) = operator_token else {
        bail!(
            "token services require the operator token: pass --operator-token-file (`rgctl operator-token` writes it)"
        );
    };
    let request =
        ureq::put(&endpoint).timeout(Duration::from_secs(30)).set("authorization", &format!("Bearer {token}"));
    let resp = match request.send_string(jws) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => {
            let body: serde_json::Value =
                serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or_default();
            bail!(
                "{}: {} (active revision stays {})",
                body["path"].as_str().unwrap_or(body["error"].as_str().unwrap_or("error")),
                body["reason"].as_str().or(body["message"].as_str()).unwrap_or("rejected"),
                body["active_revision"]
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach {endpoint}")),
    };
    let body: serde_json::Value = serde_json::from_str(&resp.into_string()?)?;
    let unchanged = if body["unchanged"].as_bool() == Some(true) { "; unchanged (same bundle)" } else { "" };
    Ok(format!("active revision {} ({} rules){unchanged}", body["active_revision"], body["rules"]))
}

/// The line of an Envoy whose filter follows a keys source (`keys_source`), if it does; the
/// number of warnings printed (no keys at all).
fn keys_source_status(admin: &str, s: &std::collections::BTreeMap<String, i64>) -> usize {
    if !s.contains_key("wasmcustom.registry_guard.keys_fetch.changed") {
        return 0;
    }
    let keys = stat(s, "wasmcustom.registry_guard.keys.count");
    println!(
        "envoy {admin}: trusted keys from a keys source (JWKS URL): {keys} key(s); fetches changed {}, not modified {}, refused {}, failed {}; {} s since the last good fetch",
        stat(s, "wasmcustom.registry_guard.keys_fetch.changed"),
        stat(s, "wasmcustom.registry_guard.keys_fetch.not_modified"),
        stat(s, "wasmcustom.registry_guard.keys_fetch.refused"),
        stat(s, "wasmcustom.registry_guard.keys_fetch.failed"),
        stat(s, "wasmcustom.registry_guard.keys_fetch.seconds_since_success"),
    );
    if keys == 0 {
        println!(
            "  WARNING: the filter has no trusted keys yet: it refuses every request until its keys source answers"
        );
        return 1;
    }
    0
}

/// Parses a fleet file: `envoy <admin URL>` and `token-service <URL>` lines.
pub fn read_fleet(text: &str) -> Result<(Vec<String>, Vec<String>)> {
    let (mut envoys, mut token_services) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["envoy", url] => envoys.push((*url).to_owned()),
            ["token-service", url] => token_services.push((*url).to_owned()),
            _ => bail!("line {}: expected `envoy <admin URL>` or `token-service <URL>`, got `{line}`", i + 1),
        }
    }
    Ok((envoys, token_services))
}

/// Where the registry filter of the Envoy at `admin` fetches its bundle, read from the ECDS
/// part of its config dump (`bundle_source` of the filter configuration; only the cluster
/// and what is fetched, never the token). `None` when it cannot be read.
fn envoy_bundle_source(admin: &str) -> Option<String> {
    let url = format!("{}/config_dump?resource=ecds_filters", admin.trim_end_matches('/'));
    let dump: serde_json::Value =
        serde_json::from_str(&ureq::get(&url).timeout(Duration::from_secs(5)).call().ok()?.into_string().ok()?).ok()?;
    let configs = dump["configs"].as_array()?;
    let sources: Vec<String> = configs
        .iter()
        .filter_map(|c| {
            let text = c["ecds_filter"]["typed_config"]["config"]["configuration"]["value"].as_str()?;
            let config: serde_json::Value = serde_json::from_str(text).ok()?;
            bundle_source_label(&config["bundle_source"])
        })
        .collect();
    sources.first().cloned()
}

/// `(cluster `registry`, OCI artifact registry-guard/policy:prod)` or `(cluster
/// `token_service`, /bundle)`.
fn bundle_source_label(source: &serde_json::Value) -> Option<String> {
    let cluster = source["cluster"].as_str()?;
    Some(match source.get("oci") {
        Some(oci) => format!(
            "(cluster `{cluster}`, OCI artifact {}:{})",
            oci["repository"].as_str().unwrap_or("?"),
            oci["reference"].as_str().unwrap_or("?")
        ),
        None => format!("(cluster `{cluster}`, {})", source["path"].as_str().unwrap_or("/bundle")),
    })
}

pub fn status(envoys: &[String], token_services: &[String]) -> Result<()> {
    if envoys.is_empty() && token_services.is_empty() {
        bail!("give --envoy-admin URL, --token-service URL or --fleet FILE");
    }
    let mut warnings = 0;
    // Every component's active revision, for the fleet line.
    let mut revisions: Vec<(String, i64)> = Vec::new();
    for admin in envoys {
        let s = envoy_stats(admin)?;
        let revision = stat(&s, "wasmcustom.registry_guard.bundle_revision");
        revisions.push((format!("envoy {admin}"), revision));
        if s.contains_key("wasmcustom.registry_guard.bundle_fetch.changed") {
            let stale = stat(&s, "wasmcustom.registry_guard.bundle_fetch.stale") > 0;
            let source = envoy_bundle_source(admin).map(|s| format!(" {s}")).unwrap_or_default();
            println!(
                "envoy {admin}: follows a bundle source{source}: fetches changed {}, not modified {}, refused {}, failed {}; {} s since the last successful fetch{}",
                stat(&s, "wasmcustom.registry_guard.bundle_fetch.changed"),
                stat(&s, "wasmcustom.registry_guard.bundle_fetch.not_modified"),
                stat(&s, "wasmcustom.registry_guard.bundle_fetch.refused"),
                stat(&s, "wasmcustom.registry_guard.bundle_fetch.failed"),
                stat(&s, "wasmcustom.registry_guard.bundle_fetch.seconds_since_success"),
                if stale { "; STALE: refusing every request" } else { "" },
            );
            if stale {
                println!(
                    "  WARNING: the filter has not reached its bundle source for longer than max_staleness_seconds"
                );
                warnings += 1;
            }
        }
        warnings += keys_source_status(admin, &s);
        println!(
            "envoy {admin}: active revision {revision}; config reloads {}, rejected updates {} (filter refusals {}); protection denied {}, would deny {}",
            stat(&s, &format!("{STAT_PREFIX}config_reload")),
            stat(&s, &format!("{STAT_PREFIX}update_rejected")),
            stat(&s, "wasmcustom.registry_guard.bundle_rejected_total"),
            stat(&s, "wasmcustom.registry_guard.protection_denied_total"),
            stat(&s, "wasmcustom.registry_guard.protection_would_deny_total"),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let report = workers(&s, revision, now);
        println!("  {}", report.summary);
        for w in &report.warnings {
            println!("  WARNING: {w}");
        }
        warnings += report.warnings.len();
    }
    revisions.extend(token_service_status(token_services)?);
    if revisions.len() > 1 {
        let min = revisions.iter().map(|(_, r)| *r).min().unwrap_or(0);
        let max = revisions.iter().map(|(_, r)| *r).max().unwrap_or(0);
        if min == max {
            println!("fleet: {} components, all on revision {max}", revisions.len());
        } else {
            let behind: Vec<String> =
                revisions.iter().filter(|(_, r)| *r < max).map(|(c, r)| format!("{c} (r{r})")).collect();
            println!(
                "fleet: {} components, minimum revision {min}, newest {max}; behind: {}",
                revisions.len(),
                behind.join(", ")
            );
        }
    }
    if warnings > 0 {
        bail!("{warnings} warning(s): some Envoy worker is not enforcing the revision its Envoy reports");
    }
    Ok(())
}

/// What the per-VM gauges of one Envoy say.
struct Workers {
    summary: String,
    warnings: Vec<String>,
}

/// A VM whose heartbeat is older than this many seconds is gone or not configured.
const HEARTBEAT_STALE_SECONDS: i64 = 5;

/// Reads `registry_guard.vm.<slot>.<endpoint>.{revision,heartbeat}` (one pair per filter VM
/// and endpoint: Envoy's main thread and each worker) against `server.concurrency`, and the
/// backstop's refusals (`http.registry.rq_direct_response`: requests the filter did not mark
/// allowed). Every live VM of an endpoint must enforce the same revision as Envoy reports.
fn workers(s: &std::collections::BTreeMap<String, i64>, revision: i64, now: i64) -> Workers {
    type Vms = std::collections::BTreeMap<u32, (Option<i64>, Option<i64>, bool)>;
    let mut endpoints: std::collections::BTreeMap<String, Vms> = Default::default();
    for (name, value) in s {
        let Some(rest) = name.strip_prefix("wasmcustom.registry_guard.vm.") else { continue };
        let mut parts = rest.splitn(3, '.');
        let (Some(slot), Some(endpoint), Some(what)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let Ok(slot) = slot.parse::<u32>() else { continue };
        let entry = endpoints.entry(endpoint.to_owned()).or_default().entry(slot).or_default();
        match what {
            "revision" => entry.0 = Some(*value),
            "heartbeat" => entry.1 = Some(*value),
            "serving" => entry.2 = *value > 0,
            _ => {}
        }
    }
    let concurrency = stat(s, "server.concurrency");
    let mut warnings = Vec::new();
    let mut summaries = Vec::new();
    if endpoints.is_empty() {
        warnings.push("no filter VM reports a heartbeat: is the registry-guard filter configured?".to_owned());
    }
    for (endpoint, vms) in &endpoints {
        let live: Vec<(u32, i64, bool)> = vms
            .iter()
            .filter(|(_, (_, beat, _))| beat.is_some_and(|b| now - b <= HEARTBEAT_STALE_SECONDS))
            .map(|(slot, (rev, _, serving))| (*slot, rev.unwrap_or(-1), *serving))
            .collect();
        // A VM that serves requests under another revision is a worker left behind.
        for (slot, rev, serving) in &live {
            if *rev != revision && *serving {
                warnings
                    .push(format!("{endpoint}: VM slot {slot} serves requests under revision {rev}, not {revision}"));
            }
        }
        // Every worker must beat at the reported revision (a worker whose filter is not
        // configured does not beat at all). Envoy's main thread keeps a VM too, which never
        // serves; when it is at the reported revision it can hide one missing worker here,
        // but never its requests: those meet the backstop (the count below).
        let current = live.iter().filter(|(_, rev, _)| *rev == revision).count();
        let workers_expected = usize::try_from(concurrency).unwrap_or(0);
        if current < workers_expected {
            warnings.push(format!(
                "{endpoint}: {current} filter VMs enforce revision {revision}, fewer than Envoy's {concurrency} workers: a \
                 worker without a configured filter refuses every request (Envoy's backstop) until Envoy restarts"
            ));
        }
        let slots: Vec<String> = live
            .iter()
            .map(|(slot, rev, serving)| format!("{slot}:r{rev}{}", if *serving { "" } else { "(idle)" }))
            .collect();
        summaries.push(format!(
            "{endpoint}: {current} filter VMs on revision {revision} for {concurrency} workers [{}]",
            slots.join(" ")
        ));
    }
    // Requests that met no deciding filter (cumulative since Envoy started): with every
    // worker's filter configured there are none, so any is worth a look.
    let backstop = stat(s, "http.registry.rq_direct_response");
    if backstop > 0 {
        warnings.push(format!(
            "Envoy's backstop refused {backstop} request(s) since Envoy started that no registry-guard filter \
             decided (a worker without a configured filter, or a local reply that could not be sent)"
        ));
    }
    Workers {
        summary: format!(
            "{}; refused by Envoy's backstop (no filter decided) since start: {backstop}",
            summaries.join("; ")
        ),
        warnings,
    }
}

fn token_service_status(token_services: &[String]) -> Result<Vec<(String, i64)>> {
    let mut revisions = Vec::new();
    for url in token_services {
        let endpoint = format!("{}/bundle/status", url.trim_end_matches('/'));
        let body: serde_json::Value = serde_json::from_str(
            &ureq::get(&endpoint)
                .timeout(Duration::from_secs(5))
                .call()
                .with_context(|| format!("cannot reach {endpoint}"))?
                .into_string()?,
        )?;
        let rejected = match &body["last_rejected"] {
            serde_json::Value::Null => "none".to_owned(),
            r => format!(
                "revision {} at {}: {}: {}",
                r["revision"],
                r["at"].as_str().unwrap_or("?"),
                r["path"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?")
            ),
        };
        println!(
            "token service {url}: active revision {} ({} rules); last rejected: {rejected}",
            body["active_revision"], body["rules"]
        );
        let source = &body["source"];
        if source.is_object() {
            println!(
                "  follows {}: fetches {}; {} s since the last success; {} failure(s) in a row{}",
                source["url"].as_str().unwrap_or("?"),
                source["fetches"],
                source["seconds_since_success"],
                source["consecutive_failures"],
                source["last_error"].as_str().map(|e| format!("; last error: {e}")).unwrap_or_default(),
            );
        }
        revisions.push((format!("token service {url}"), body["active_revision"].as_i64().unwrap_or(-1)));
    }
    Ok(revisions)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bundle_sources_are_labelled_without_their_token() {
        let oci = serde_json::json!({"cluster": "registry", "token": "secret",
                                     "oci": {"repository": "registry-guard/policy", "reference": "prod"}});
        assert_eq!(bundle_source_label(&oci).unwrap(), "(cluster `registry`, OCI artifact registry-guard/policy:prod)");
        let http = serde_json::json!({"cluster": "token_service", "path": "/bundle", "token": "secret"});
        assert_eq!(bundle_source_label(&http).unwrap(), "(cluster `token_service`, /bundle)");
        assert_eq!(bundle_source_label(&serde_json::Value::Null), None);
    }

    #[test]
    fn fleet_file_lists_envoys_and_token_services() {
        let (e, t) = read_fleet(
            "# the fleet\nenvoy http://127.0.0.1:9901\n\n  token-service http://127.0.0.1:5001  # primary\nenvoy http://10.0.0.2:9901\n",
        )
        .unwrap();
        assert_eq!(e, ["http://127.0.0.1:9901", "http://10.0.0.2:9901"]);
        assert_eq!(t, ["http://127.0.0.1:5001"]);
        let err = read_fleet("envoy\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("envoy <admin URL>"), "{err}");
        assert!(read_fleet("proxy http://x\n").is_err());
    }
}
