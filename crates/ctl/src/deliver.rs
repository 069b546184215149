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
use registry_guard_core::bundle;
use registry_guard_core::token::KeySet;

const STAT_PREFIX: &str = "extension_config_discovery.http_filter.registry-guard.";

/// The ECDS stats prefix of the resource in `doc` (`registry-guard` unless it names another:
/// the dependency-proxy endpoint's resource is `registry-guard-dependency-proxy`).
fn stat_prefix(doc: &serde_json::Value) -> String {
    match doc.pointer("/resources/0/name").and_then(|v| v.as_str()) {
        Some(name) if name != "registry-guard" => format!("extension_config_discovery.http_filter.{name}."),
        _ => STAT_PREFIX.to_owned(),
    }
}

/// The ECDS resource (a DiscoveryResponse) holding the wasm filter with `config` JSON.
fn resource(config_json: &str, wasm: &str, name: &str) -> serde_json::Value {
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
                        "code": {"local": {"filename": wasm}}
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
    registry_guard_core::config::FilterConfig::from_json(config_json.trim().as_bytes())?;
    let wasm = fs::canonicalize(wasm).with_context(|| format!("no filter at `{}`", wasm.display()))?;
    let text = serde_json::to_string_pretty(&resource(config_json.trim(), &wasm.display().to_string(), name))?;
    write_atomically(out, text.as_bytes())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// The filter configuration JSON inside an ECDS file.
fn read_filter_config(ecds: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
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
    let url = format!("{}/stats?filter=registry_guard|registry-guard", admin.trim_end_matches('/'));
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
        Err(_) => registry_guard_core::token::decode_unverified(jws).ok()?,
    };
    payload.get("revision")?.as_u64()
}

pub fn push(bundle_path: &Path, envoys: &[String], token_services: &[String], force: bool) -> Result<()> {
    if envoys.is_empty() && token_services.is_empty() {
        bail!("nothing to push to: give --envoy ECDS_FILE=ADMIN_URL and/or --token-service URL");
    }
    let jws = fs::read_to_string(bundle_path).with_context(|| format!("cannot read `{}`", bundle_path.display()))?;
    let jws = jws.trim();
    let revision = claimed_revision(jws).map_or("?".to_owned(), |r| r.to_string());
    let mut failures = 0;
    for spec in envoys {
        let (ecds, admin) =
            spec.split_once('=').with_context(|| format!("`--envoy {spec}` is not ECDS_FILE=ADMIN_URL"))?;
        match push_envoy(jws, Path::new(ecds), admin, force) {
            Ok(msg) => println!("envoy {admin}: {msg}"),
            Err(e) => {
                failures += 1;
                println!("envoy {admin}: REJECTED revision {revision}: {e:#}");
            }
        }
    }
    for url in token_services {
        match push_token_service(jws, url) {
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

fn push_envoy(jws: &str, ecds: &Path, admin: &str, force: bool) -> Result<String> {
    let previous = fs::read(ecds).with_context(|| format!("cannot read ECDS file `{}`", ecds.display()))?;
    let (mut doc, mut config) = read_filter_config(ecds)?;
    // The local check uses exactly the keys the filter will use.
    if let Some(keys) = config.get("bundle_keys") {
        let keys = KeySet::from_jwks(keys).map_err(|e| anyhow::anyhow!("bundle_keys in `{}`: {e}", ecds.display()))?;
        match bundle::verify(jws, &keys) {
            Ok(_) => {}
            Err(e) if !force => bail!("refused locally (use --force to deliver anyway): {e}"),
            Err(e) => eprintln!("warning: delivering a bundle that fails the local check: {e}"),
        }
    } else if !force {
        bail!("`{}` has no `bundle_keys`: the filter would refuse any bundle", ecds.display());
    }
    config
        .as_object_mut()
        .with_context(|| format!("filter configuration in `{}` is not a JSON object", ecds.display()))?
        .insert("bundle".into(), jws.into());
    replace_config(ecds, admin, &previous, &mut doc, &config)
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
            registry_guard_core::config::FilterConfig::from_json(serde_json::to_string(&config)?.as_bytes())
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

fn push_token_service(jws: &str, url: &str) -> Result<String> {
    let endpoint = format!("{}/bundle", url.trim_end_matches('/'));
    let resp = match ureq::put(&endpoint).timeout(Duration::from_secs(30)).send_string(jws) {
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
    Ok(format!("active revision {} ({} rules)", body["active_revision"], body["rules"]))
}

pub fn status(envoys: &[String], token_services: &[String]) -> Result<()> {
    if envoys.is_empty() && token_services.is_empty() {
        bail!("give --envoy-admin URL and/or --token-service URL");
    }
    for admin in envoys {
        let s = envoy_stats(admin)?;
        println!(
            "envoy {admin}: active revision {}; config reloads {}, rejected updates {} (filter refusals {}); protection denied {}, would deny {}",
            stat(&s, "wasmcustom.registry_guard.bundle_revision"),
            stat(&s, &format!("{STAT_PREFIX}config_reload")),
            stat(&s, &format!("{STAT_PREFIX}update_rejected")),
            stat(&s, "wasmcustom.registry_guard.bundle_rejected"),
            stat(&s, "wasmcustom.registry_guard.protection_denied"),
            stat(&s, "wasmcustom.registry_guard.protection_would_deny"),
        );
    }
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
    }
    Ok(())
}
