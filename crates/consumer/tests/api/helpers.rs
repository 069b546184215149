use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use registry_guard_consumer::store::Database;
use registry_guard_consumer::{
    Application, Settings, StartupError, DEFAULT_MAX_EVENTS, DEFAULT_RETENTION_DAYS, DEFAULT_TOLERANCE_SECONDS,
};
use registry_guard_core::token;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::sign::Validity;
use registry_guard_core::token::testing;
use serde_json::{json, Value};

/// The bearer secret the "registry" sends.
pub const SECRET: &str = "notification-secret-0123456789";
/// The read credential for `GET /counts` and `GET /events`.
pub const READ_TOKEN: &str = "read-token-9876543210";
pub const EVENTS_V1: &str = "application/vnd.docker.distribution.events.v1+json";
pub const EVENTS_V2: &str = "application/vnd.docker.distribution.events.v2+json";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The token service's key: signs the `user` JWTs, published in the JWKS.
pub fn signing_key() -> SigningKey {
    testing::es256_key(1)
}

pub fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A `user` JWT signed by `key`, expiring at `expires_at`.
pub fn user_jwt_with(key: &SigningKey, jti: &str, user_info: Value, expires_at: i64) -> String {
    token::sign::sign(
        key,
        json!({"jti": jti, "user_info": user_info}),
        Validity { issued_at: expires_at - 300, not_before: expires_at - 300, expires_at },
    )
    .unwrap()
}

/// dev (user 5), signed in with a password; valid for five minutes.
pub fn dev_jwt() -> String {
    user_jwt_with(
        &signing_key(),
        "u-dev",
        json!({"token_type": "password", "username": "dev", "user_id": 5}),
        now() + 300,
    )
}

/// rita (user 2), with a personal access token.
pub fn rita_jwt() -> String {
    user_jwt_with(&signing_key(), "u-rita", json!({"token_type": "pat", "username": "rita", "user_id": 2}), now() + 300)
}

/// The deploy token `acme-ci` (id 1).
pub fn deploy_jwt() -> String {
    user_jwt_with(
        &signing_key(),
        "u-ci",
        json!({"token_type": "deploy_token", "username": "acme-ci", "deploy_token_id": 1}),
        now() + 300,
    )
}

/// The same token with its payload replaced (root, PAT), the signature kept.
pub fn tamper(jwt: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = jwt.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["user_info"] = json!({"token_type": "pat", "username": "root", "user_id": 1});
    let payload = b64.encode(serde_json::to_vec(&claims).unwrap());
    [parts[0], payload.as_str(), parts[2]].join(".")
}

/// A distribution 2.8 event as the filter leaves it: `actor` filled, `request.id` the edge's.
pub fn event(
    id: &str,
    action: &str,
    media_type: Option<&str>,
    repository: &str,
    tag: Option<&str>,
    user: Option<&str>,
) -> Value {
    let mut e = json!({
        "id": id,
        "timestamp": "2026-11-22T01:00:00.000000000Z",
        "action": action,
        "target": {"size": 527, "digest": format!("sha256:{:0>64}", id.len()), "length": 527, "repository": repository,
                   "url": format!("http://registry:5000/v2/{repository}/manifests/x")},
        "request": {"id": format!("rid-{id}"), "registry_request_id": "b1e5c0b6", "addr": "127.0.0.1:4242",
                    "host": "registry", "method": "PUT", "useragent": "skopeo/1.13"},
        "actor": {},
        "source": {"addr": "registry:5000", "instanceID": "f0c1a2"}
    });
    if let Some(m) = media_type {
        e["target"]["mediaType"] = m.into();
    }
    if let Some(t) = tag {
        e["target"]["tag"] = t.into();
    }
    if let Some(u) = user {
        e["actor"] = json!({"name": "someone", "user_type": "password", "user": u});
    }
    e
}

/// A manifest push of `repository:tag` (no tag: pushed by digest).
pub fn push(id: &str, repository: &str, tag: Option<&str>, user: Option<&str>) -> Value {
    event(id, "push", Some(MANIFEST), repository, tag, user)
}

/// A tag or manifest delete (distribution sends no `mediaType` for these).
pub fn delete(id: &str, repository: &str, tag: Option<&str>, user: Option<&str>) -> Value {
    event(id, "delete", None, repository, tag, user)
}

/// A layer push.
pub fn blob_push(id: &str, repository: &str, user: Option<&str>) -> Value {
    event(id, "push", Some(LAYER), repository, None, user)
}

pub fn envelope(events: Vec<Value>) -> Value {
    json!({ "events": events })
}

/// Writes `jwks.json`, `secret` and `read-token` into `dir`; the database is
/// `dir/consumer.sqlite`.
pub fn write_inputs(dir: &Path) -> Settings {
    std::fs::write(dir.join("jwks.json"), testing::jwks(&[&signing_key()]).to_string()).unwrap();
    std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(dir.join("read-token"), format!("{READ_TOKEN}\n")).unwrap();
    settings(dir)
}

pub fn settings(dir: &Path) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        database: dir.join("consumer.sqlite").into(),
        jwks: Some(dir.join("jwks.json")),
        jwks_url: None,
        secret_file: dir.join("secret"),
        read_token_file: dir.join("read-token"),
        tolerance_seconds: DEFAULT_TOLERANCE_SECONDS,
        retention_days: DEFAULT_RETENTION_DAYS,
        max_events: DEFAULT_MAX_EVENTS,
    }
}

pub async fn build(settings: Settings) -> Result<Application, StartupError> {
    Application::build(settings).await
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// The SQLite file (meaningless when the settings name PostgreSQL).
    pub database: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let settings = write_inputs(dir.path());
    spawn_with(dir, settings).await
}

/// Starts the consumer with `settings` (whose files live in `dir`).
pub async fn spawn_with(dir: tempfile::TempDir, settings: Settings) -> TestApp {
    let database = match &settings.database {
        Database::Sqlite(path) => path.clone(),
        Database::Postgres(_) => PathBuf::new(),
    };
    let app = build(settings).await.unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp { address, client: reqwest::Client::new(), dir, database, shutdown: Some(shutdown), server: Some(server) }
}

impl TestApp {
    /// Stops the server (closing the database) and hands back its directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Starts a new consumer on the same files.
    pub async fn restart(self) -> TestApp {
        let dir = self.stop().await;
        let settings = settings(dir.path());
        spawn_with(dir, settings).await
    }

    /// Starts a new consumer on the same files with `tweak`ed settings.
    pub async fn restart_with(self, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        let dir = self.stop().await;
        let mut settings = settings(dir.path());
        tweak(&mut settings);
        spawn_with(dir, settings).await
    }

    /// `POST /events` as the registry does it.
    pub async fn post_events(&self, envelope: &Value) -> reqwest::Response {
        self.post_raw(envelope.to_string(), Some(EVENTS_V1), Some(&format!("Bearer {SECRET}"))).await
    }

    /// `POST /events` that must succeed; returns the report.
    pub async fn deliver(&self, envelope: &Value) -> Value {
        let response = self.post_events(envelope).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn post_raw(
        &self,
        body: String,
        content_type: Option<&str>,
        authorization: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(format!("{}/events", self.address)).body(body);
        if let Some(c) = content_type {
            request = request.header("content-type", c);
        }
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        request.send().await.unwrap()
    }

    /// `GET path` with the read token.
    pub async fn read(&self, path_and_query: &str) -> reqwest::Response {
        self.client.get(format!("{}{path_and_query}", self.address)).bearer_auth(READ_TOKEN).send().await.unwrap()
    }

    /// `GET /counts` (this week) with the read token; must succeed.
    pub async fn counts(&self) -> Value {
        self.counts_at("").await
    }

    /// `GET /counts?{query}` with the read token; must succeed.
    pub async fn counts_at(&self, query: &str) -> Value {
        let response = self.read(&format!("/counts?{query}")).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Every recorded event, read a page of 2 at a time (`GET /events?after=&limit=2`).
    pub async fn events(&self) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let response = self.read(&format!("/events?after={after}&limit=2")).await;
            assert_eq!(response.status(), 200);
            let page: Value = response.json().await.unwrap();
            all.extend(page["events"].as_array().unwrap().iter().cloned());
            match page["next_after"].as_i64() {
                Some(next) => after = next,
                None => return all,
            }
        }
    }

    /// `/counts` with every recorded event under `events`: everything the consumer knows.
    pub async fn snapshot(&self) -> Value {
        let mut counts = self.counts().await;
        counts["events"] = Value::Array(self.events().await);
        counts
    }

    pub async fn metrics(&self) -> String {
        let response = self.client.get(format!("{}/metrics", self.address)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        response.text().await.unwrap()
    }
}

/// The recorded event with `id`.
pub fn row<'a>(counts: &'a Value, id: &str) -> &'a Value {
    counts["events"].as_array().unwrap().iter().find(|e| e["id"] == id).unwrap_or_else(|| panic!("no event {id}"))
}
