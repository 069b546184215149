//! The bundle for the fleet: `GET /bundle` (read token, entity tags, long polling) and a
//! replica following another service's bundle (`bundle_source`).

use std::time::{Duration, Instant};

use registry_guard_token_service::{Application, Settings};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::helpers::*;

/// The bundle read token of test configurations written by [`fleet_config`].
const READ_TOKEN: &str = "test-bundle-read-token";

fn digest_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A configuration directory with operator keys, the read token and extra settings.
fn fleet_config(bundle_jws: Option<&str>, extra: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = json!({
        "bundle_keys": "keys/operator-jwks.json",
        "operator_token_sha256": "keys/operator-token.sha256",
        "bundle_read_token_sha256": "keys/bundle-read-token.sha256",
    });
    if let (Some(s), Some(e)) = (settings.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    write_config(dir.path(), &principals(), Some(&settings.to_string()));
    write_operator_keys(dir.path());
    std::fs::write(dir.path().join("keys/bundle-read-token.sha256"), digest_hex(READ_TOKEN)).unwrap();
    std::fs::write(dir.path().join("keys/bundle-read-token"), READ_TOKEN).unwrap();
    if let Some(jws) = bundle_jws {
        std::fs::write(dir.path().join("bundle.jws"), jws).unwrap();
    }
    dir
}

async fn get_bundle(app: &TestApp, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = app.client.get(format!("{}/bundle", app.address));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn get_bundle_needs_the_read_or_operator_token_and_is_conditional() {
    let jws = sign_bundle(&platform_bundle(3));
    let app = spawn_in(fleet_config(Some(&jws), json!({}))).await;

    for (auth, why) in [(None, "authentication required"), (Some(bearer("wrong")), "not valid")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        let resp = get_bundle(&app, &headers).await;
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"registry-guard-bundle\"");
        let body: Value = resp.json().await.unwrap();
        assert!(body["reason"].as_str().unwrap().contains(why), "{body}");
    }

    let read = bearer(READ_TOKEN);
    let resp = get_bundle(&app, &[("authorization", &read)]).await;
    assert_eq!(resp.status(), 200);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"sha256:{}\"", digest_hex(jws.trim())));
    assert_eq!(resp.headers()["x-registry-guard-revision"], "3");
    assert_eq!(resp.headers()["content-type"], "application/jose");
    assert_eq!(resp.text().await.unwrap(), jws.trim());

    // The operator token reads too; the same entity tag answers 304 with no body.
    let op = bearer(OPERATOR_TOKEN);
    let resp = get_bundle(&app, &[("authorization", &op), ("if-none-match", &etag)]).await;
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(resp.bytes().await.unwrap().len(), 0);
    // Another entity tag (or a list without ours) gets the bundle.
    let resp = get_bundle(&app, &[("authorization", &read), ("if-none-match", "\"sha256:00\", W/\"x\"")]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(app.bundle_status().await["etag"], json!(etag));
}

#[tokio::test]
async fn get_bundle_without_tokens_configured_or_without_a_bundle() {
    // No read token and no operator token: not served at all.
    let app = spawn_app().await;
    let resp = get_bundle(&app, &[("authorization", "Bearer anything")]).await;
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(body["reason"].as_str().unwrap().contains("bundle distribution is disabled"), "{body}");

    // Tokens configured, nothing pushed yet: 404 naming why.
    let app = spawn_in(fleet_config(None, json!({}))).await;
    let resp = get_bundle(&app, &[("authorization", &bearer(READ_TOKEN))]).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "no_bundle");
}

#[tokio::test]
async fn long_poll_answers_on_the_next_push_or_304_when_the_wait_ends() {
    let app = spawn_in(fleet_config(Some(&sign_bundle(&platform_bundle(3))), json!({}))).await;
    let read = bearer(READ_TOKEN);
    let etag = get_bundle(&app, &[("authorization", &read)]).await.headers()["etag"].to_str().unwrap().to_owned();

    // Nothing changes: 304 after about the wait, saying the preference was applied.
    let started = Instant::now();
    let resp = get_bundle(&app, &[("authorization", &read), ("if-none-match", &etag), ("prefer", "wait=1")]).await;
    assert_eq!(resp.status(), 304);
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    assert_eq!(resp.headers()["preference-applied"], "wait=1");

    // A push during the wait answers at once with the new bundle.
    let waiting = {
        let (client, url, read, etag) =
            (app.client.clone(), format!("{}/bundle", app.address), read.clone(), etag.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let resp = client
                .get(url)
                .header("authorization", read)
                .header("if-none-match", etag)
                .header("prefer", "wait=20")
                .send()
                .await
                .unwrap();
            (resp.status(), resp.headers()["x-registry-guard-revision"].to_str().unwrap().to_owned(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.put_bundle(sign_bundle(&platform_bundle(4))).await.status(), 200);
    let (status, revision, elapsed) = waiting.await.unwrap();
    assert_eq!((status.as_u16(), revision.as_str()), (200, "4"));
    assert!(elapsed < Duration::from_secs(10), "the long poll did not answer on the push: {elapsed:?}");
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a service on `dir` at `port`; returns its address and a stop handle.
async fn start_at(dir: &std::path::Path, port: u16) -> (String, tokio::sync::oneshot::Sender<()>) {
    let app = Application::build(Settings {
        config_dir: dir.to_path_buf(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
    })
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    (format!("http://127.0.0.1:{port}"), stop)
}

async fn wait_for_revision(address: &str, revision: u64, within: Duration) -> Value {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let status: Value = client.get(format!("{address}/bundle/status")).send().await.unwrap().json().await.unwrap();
        if status["active_revision"] == revision {
            return status;
        }
        assert!(started.elapsed() < within, "revision {revision} not reached within {within:?}: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replica_follows_the_source_and_keeps_its_bundle_while_the_source_is_down() {
    let primary_dir = fleet_config(Some(&sign_bundle(&platform_bundle(3))), json!({}));
    let primary_port = free_port();
    let (primary, stop_primary) = start_at(primary_dir.path(), primary_port).await;
    let source = json!({"bundle_source": {"url": format!("{primary}/bundle"), "token_file": "keys/bundle-read-token",
                                          "poll_seconds": 1, "wait_seconds": 10}});
    let replica = spawn_in(fleet_config(None, source)).await;

    // The replica starts empty and converges on the primary's bundle, then follows pushes.
    let status = wait_for_revision(&replica.address, 3, Duration::from_secs(10)).await;
    assert_eq!(status["source"]["url"], json!(format!("{primary}/bundle")));
    let client = reqwest::Client::new();
    let pushed = Instant::now();
    let resp = client
        .put(format!("{primary}/bundle"))
        .header("authorization", bearer(OPERATOR_TOKEN))
        .body(sign_bundle(&platform_bundle(4)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_for_revision(&replica.address, 4, Duration::from_secs(5)).await;
    let converged = pushed.elapsed();
    // The replica decides under the new revision and persisted it (a restart keeps it).
    assert!(std::fs::read_to_string(replica.dir.path().join("bundle.jws")).unwrap().contains('.'));
    eprintln!("long-poll convergence: {converged:?}");
    assert!(converged < Duration::from_secs(3), "long polling should converge at once: {converged:?}");

    // The source goes away: the replica keeps revision 4 and backs off.
    let _ = stop_primary.send(());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = replica.bundle_status().await;
    assert_eq!(status["active_revision"], 4);
    assert!(status["source"]["consecutive_failures"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["source"]["fetches"]["failed"].as_u64().unwrap() >= 1, "{status}");
    assert!(status["source"]["last_error"].as_str().unwrap().contains("request failed"), "{status}");
    // Tokens are still issued under revision 4 (dev may not push to acme/platform).
    let access = replica.access("dev", DEV_PASSWORD, "repository:acme/platform/api:pull,push").await;
    assert_eq!(access[0]["actions"], json!(["pull"]));

    // The source returns with a newer bundle (pushed while the replica could not see it).
    std::fs::write(primary_dir.path().join("bundle.jws"), sign_bundle(&platform_bundle(5))).unwrap();
    let (_primary, _stop) = start_at(primary_dir.path(), primary_port).await;
    let status = wait_for_revision(&replica.address, 5, Duration::from_secs(30)).await;
    assert_eq!(status["source"]["consecutive_failures"], 0, "{status}");
}

/// A hostile or stale source: a tiny server answering whatever bundle the test sets.
async fn fake_source(body: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/bundle",
        get(move || {
            let body = body.lock().unwrap().clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

#[tokio::test]
async fn a_hostile_source_is_refused_and_the_active_bundle_stays() {
    let served = std::sync::Arc::new(std::sync::Mutex::new(sign_bundle(&platform_bundle(6))));
    let source = fake_source(served.clone()).await;
    let settings = json!({"bundle_source": {"url": format!("{source}/bundle"), "poll_seconds": 1}});
    let replica = spawn_in(fleet_config(None, settings)).await;
    wait_for_revision(&replica.address, 6, Duration::from_secs(10)).await;

    let other_key = registry_guard_core::token::testing::es256_key(99);
    let hostile = [
        ("older revision", sign_bundle(&platform_bundle(2)), "older than the active revision"),
        ("wrong signer", sign_raw(&serde_json::from_str(&platform_bundle(9)).unwrap(), &other_key), "signature"),
        ("truncated", sign_bundle(&platform_bundle(9))[..40].to_owned(), ""),
        (
            "other environment",
            sign_bundle(&platform_bundle(9).replace("{\"revision\"", "{\"environment\": \"elsewhere\", \"revision\"")),
            "environment",
        ),
    ];
    for (what, body, why) in hostile {
        *served.lock().unwrap() = body;
        let before = replica.bundle_status().await["source"]["fetches"]["refused"].as_u64().unwrap_or(0);
        let started = Instant::now();
        let status = loop {
            let status = replica.bundle_status().await;
            if status["source"]["fetches"]["refused"].as_u64().unwrap_or(0) > before {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{what}: never refused: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(status["active_revision"], 6, "{what}: {status}");
        assert!(status["source"]["last_error"].as_str().unwrap().contains(why), "{what}: {status}");
    }
}

#[tokio::test]
async fn bundle_source_settings_are_checked() {
    for (source, field, why) in [
        (json!({"url": "ftp://x/bundle"}), "$.bundle_source.url", "http://"),
        (json!({"url": "http:///bundle"}), "$.bundle_source.url", "no host"),
        (json!({"url": "http://127.0.0.1:1/bundle", "poll_seconds": 0}), "$.bundle_source.poll_seconds", "between"),
        (
            json!({"url": "http://127.0.0.1:1/bundle", "token_file": "keys/missing"}),
            "$.bundle_source.token_file",
            "cannot read",
        ),
    ] {
        let dir = fleet_config(None, json!({ "bundle_source": source }));
        let err = build(dir.path()).await.err().unwrap().to_string();
        assert!(err.contains(field) && err.contains(why), "{err}");
    }
}

/// What the fake OCI registry serves: the manifest under `prod` and blobs by digest.
#[derive(Default, Clone)]
struct Served {
    manifest: Vec<u8>,
    blobs: std::collections::HashMap<String, Vec<u8>>,
    manifest_gets: usize,
    not_modified: usize,
}

/// A tiny OCI registry: `GET /v2/registry-guard/policy/manifests/prod` (conditional on the
/// manifest digest, as distribution is) and `GET /v2/registry-guard/policy/blobs/{digest}`.
async fn fake_registry(served: std::sync::Arc<std::sync::Mutex<Served>>) -> String {
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use registry_guard_core::policy::oci::{sha256_digest, MANIFEST_MEDIA_TYPE};
    let m = served.clone();
    let app = axum::Router::new()
        .route(
            "/v2/registry-guard/policy/manifests/prod",
            get(move |headers: HeaderMap| {
                let mut s = m.lock().unwrap();
                s.manifest_gets += 1;
                let etag = format!("\"{}\"", sha256_digest(&s.manifest));
                let response = if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
                    s.not_modified += 1;
                    (StatusCode::NOT_MODIFIED, [("etag", etag)], Vec::new()).into_response()
                } else {
                    (
                        StatusCode::OK,
                        [("etag", etag), ("content-type", MANIFEST_MEDIA_TYPE.to_owned())],
                        s.manifest.clone(),
                    )
                        .into_response()
                };
                async move { response }
            }),
        )
        .route(
            "/v2/registry-guard/policy/blobs/{digest}",
            get(move |Path(digest): Path<String>| {
                let blob = served.lock().unwrap().blobs.get(&digest).cloned();
                async move {
                    match blob {
                        Some(b) => (StatusCode::OK, b).into_response(),
                        None => StatusCode::NOT_FOUND.into_response(),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// Stores `declared` as the artifact under `prod`, with `blob` served for its digest.
fn store(served: &std::sync::Mutex<Served>, declared: &str, blob: &[u8], artifact_type: Option<&str>) {
    use registry_guard_core::policy::oci::{manifest_for, sha256_digest};
    let mut manifest = manifest_for(declared.as_bytes(), "bundle.jws");
    if let Some(t) = artifact_type {
        manifest["artifactType"] = t.into();
    }
    let mut s = served.lock().unwrap();
    s.manifest = serde_json::to_vec(&manifest).unwrap();
    s.blobs.insert(sha256_digest(declared.as_bytes()), blob.to_vec());
}

#[tokio::test]
async fn a_replica_follows_an_oci_artifact_and_refuses_hostile_ones() {
    let served = std::sync::Arc::new(std::sync::Mutex::new(Served::default()));
    let b6 = sign_bundle(&platform_bundle(6));
    store(&served, &b6, b6.as_bytes(), None);
    let registry = fake_registry(served.clone()).await;
    let settings = json!({"bundle_source": {"url": registry, "poll_seconds": 1,
        "oci": {"repository": "registry-guard/policy", "reference": "prod"}}});
    let replica = spawn_in(fleet_config(None, settings)).await;
    let status = wait_for_revision(&replica.address, 6, Duration::from_secs(10)).await;
    assert_eq!(status["source"]["url"], json!(format!("oci:{registry}/registry-guard/policy:prod")));

    // Unchanged: the manifest is asked for conditionally and answered 304.
    let started = Instant::now();
    while served.lock().unwrap().not_modified == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no conditional manifest request");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let other_key = registry_guard_core::token::testing::es256_key(99);
    let b9 = sign_bundle(&platform_bundle(9));
    let b10 = sign_bundle(&platform_bundle(10));
    let mut tampered = b9.clone().into_bytes();
    let i = tampered.len() - 3;
    tampered[i] ^= 1;
    let wrong_signer = sign_raw(&serde_json::from_str(&platform_bundle(9)).unwrap(), &other_key);
    let older = sign_bundle(&platform_bundle(2));
    // (what, the bundle the manifest declares, the blob served, artifact type, reason)
    type Case<'a> = (&'a str, String, Vec<u8>, Option<&'a str>, &'a str);
    let hostile: Vec<Case> = vec![
        ("tampered blob", b9.clone(), tampered, None, "tampered"),
        // Each case is another manifest: a refused manifest is not fetched again until the tag moves.
        ("truncated blob", b10.clone(), b10.as_bytes()[..40].to_vec(), None, "truncated"),
        (
            "other artifact type",
            b9.clone(),
            b9.clone().into_bytes(),
            Some("application/vnd.example+json"),
            "artifact type",
        ),
        ("wrong signer", wrong_signer.clone(), wrong_signer.into_bytes(), None, "signature"),
        ("older revision", older.clone(), older.into_bytes(), None, "older than the active revision"),
    ];
    for (what, declared, blob, artifact_type, why) in hostile {
        store(&served, &declared, &blob, artifact_type);
        let before = replica.bundle_status().await["source"]["fetches"]["refused"].as_u64().unwrap_or(0);
        let started = Instant::now();
        let status = loop {
            let status = replica.bundle_status().await;
            if status["source"]["fetches"]["refused"].as_u64().unwrap_or(0) > before {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{what}: never refused: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(status["active_revision"], 6, "{what}: {status}");
        assert!(status["source"]["last_error"].as_str().unwrap().contains(why), "{what}: {status}");
    }
    // A good newer artifact is activated.
    store(&served, &b9, b9.as_bytes(), None);
    wait_for_revision(&replica.address, 9, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn oci_bundle_source_settings_are_checked() {
    let oci = json!({"repository": "registry-guard/policy", "reference": "prod"});
    for (source, field, why) in [
        (
            json!({"url": "http://127.0.0.1:1", "oci": oci, "wait_seconds": 5}),
            "$.bundle_source.wait_seconds",
            "long-poll",
        ),
        (json!({"url": "http://127.0.0.1:1/v2", "oci": oci}), "$.bundle_source.url", "host:port only"),
        (
            json!({"url": "http://127.0.0.1:1", "oci": {"repository": "Bad Name", "reference": "prod"}}),
            "$.bundle_source.oci.repository",
            "not a repository name",
        ),
    ] {
        let dir = fleet_config(None, json!({ "bundle_source": source }));
        let err = build(dir.path()).await.err().unwrap().to_string();
        assert!(err.contains(field) && err.contains(why), "{err}");
    }
}
