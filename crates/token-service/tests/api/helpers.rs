use std::path::Path;

use argon2::password_hash::{PasswordHasher as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use registry_guard_core::token::jwks::KeySet;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::testing;
use registry_guard_core::token::verify::Verifier;
use registry_guard_token_service::{generate_signing_key_pem, Application, Settings, StartupError};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const ALICE_PASSWORD: &str = "alice-password";
pub const RITA_PASSWORD: &str = "rita-password";
pub const ROOT_PASSWORD: &str = "root-password";
pub const DEV_PASSWORD: &str = "dev-password";
/// Rita's personal access token (no expiry).
pub const RITA_PAT: &str = "glpat-rita-ci-token";
/// Rita's personal access token that expired long ago.
pub const RITA_OLD_PAT: &str = "glpat-rita-old-token";

/// An argon2id hash with parameters low enough for fast tests; the verifier reads them from
/// the PHC string.
pub fn hash_password(password: &str) -> String {
    let params = Params::new(256, 1, 1, None).unwrap();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::encode_b64(&rand_salt()).unwrap();
    argon.hash_password(password.as_bytes(), &salt).unwrap().to_string()
}

fn rand_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    getrandom_fill(&mut salt);
    salt
}

fn getrandom_fill(buf: &mut [u8]) {
    use rand_core::RngCore as _;
    rand_core::OsRng.fill_bytes(buf);
}

pub fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The test world: group `acme` with projects `acme/web` and `acme/platform`.
/// alice (1) maintainer of acme; rita (2) reporter of acme/web, with PATs; root (3) admin;
/// nopassword (4) has no password and no token; dev (5) developer of acme.
pub fn principals() -> Value {
    json!({
        "groups": [{"path": "acme"}],
        "projects": [{"path": "acme/web"}, {"path": "acme/platform"}],
        "users": [
            {"id": 1, "username": "alice", "password_hash": hash_password(ALICE_PASSWORD),
             "memberships": [{"path": "acme", "access_level": "maintainer"}]},
            {"id": 2, "username": "rita", "password_hash": hash_password(RITA_PASSWORD),
             "personal_access_tokens": [
                 {"name": "ci", "sha256": sha256_hex(RITA_PAT)},
                 {"name": "old", "sha256": sha256_hex(RITA_OLD_PAT), "expires_at": 1000}
             ],
             "memberships": [{"path": "acme/web", "access_level": "reporter"}]},
            {"id": 3, "username": "root", "admin": true, "password_hash": hash_password(ROOT_PASSWORD)},
            {"id": 4, "username": "nopassword"},
            {"id": 5, "username": "dev", "password_hash": hash_password(DEV_PASSWORD),
             "memberships": [{"path": "acme", "access_level": "developer"}]}
        ]
    })
}

/// Writes a config directory: `principals.json`, an optional `token-service.json` and a
/// fresh signing key at the default path.
pub fn write_config(dir: &Path, principals: &Value, settings: Option<&str>) {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::write(dir.join("keys/signing-key.pem"), generate_signing_key_pem()).unwrap();
    std::fs::write(dir.join("principals.json"), serde_json::to_string_pretty(principals).unwrap()).unwrap();
    if let Some(settings) = settings {
        std::fs::write(dir.join("token-service.json"), settings).unwrap();
    }
}

pub async fn build(dir: &Path) -> Result<Application, StartupError> {
    Application::build(Settings { config_dir: dir.to_path_buf(), listen: "127.0.0.1:0".parse().unwrap() }).await
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&principals(), None).await
}

pub async fn spawn_app_with(principals: &Value, settings: Option<&str>) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), principals, settings);
    spawn_in(dir).await
}

/// Starts the service on an already written configuration directory.
pub async fn spawn_in(dir: tempfile::TempDir) -> TestApp {
    let app = build(dir.path()).await.unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp { address, client: reqwest::Client::new(), dir, shutdown: Some(shutdown) }
}

/// Settings naming the operator keys written by [`write_operator_keys`].
pub const BUNDLE_SETTINGS: &str =
    r#"{"bundle_keys": "keys/operator-jwks.json", "operator_token_sha256": "keys/operator-token.sha256"}"#;

/// The operator token of test configurations (its SHA-256 is written by
/// [`write_operator_keys`]); `PUT /bundle` requires it.
pub const OPERATOR_TOKEN: &str = "test-operator-token";

/// The operator key that signs test bundles.
pub fn operator_key() -> SigningKey {
    testing::es256_key(7)
}

/// Writes `keys/operator-jwks.json` with the public part of [`operator_key`].
pub fn write_operator_keys(dir: &Path) {
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let jwks = testing::jwks(&[&operator_key()]);
    std::fs::write(dir.join("keys/operator-jwks.json"), serde_json::to_string_pretty(&jwks).unwrap()).unwrap();
    let digest: String = Sha256::digest(OPERATOR_TOKEN.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("keys/operator-token.sha256"), format!("{digest}\n")).unwrap();
}

/// A bundle protecting `acme/platform/*` from pushes by developers and below (the older
/// "protected up to" notation), plus a tag rule and a dry-run rule that must not withhold anything.
pub fn platform_bundle(revision: u64) -> String {
    json!({
        "revision": revision,
        "protection_rules": [
            {"id": "platform", "owner": {"group": "acme/platform"}, "repository_path_pattern": "acme/platform/*",
             "push_protected_up_to_access_level": "developer"},
            {"id": "web-release-tags", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*", "tag_name_pattern": "^v[0-9]+",
             "minimum_access_level_for_push": "owner"},
            {"id": "web-delete-dry-run", "owner": {"project": "acme/web"}, "repository_path_pattern": "acme/web/*",
             "minimum_access_level_for_delete": "owner", "enforce": false}
        ]
    })
    .to_string()
}

/// Signs bundle JSON with [`operator_key`] (validated by the core first).
pub fn sign_bundle(json_text: &str) -> String {
    registry_guard_core::policy::bundle::sign(json_text, &operator_key()).unwrap()
}

/// Signs any payload as a bundle JWS, skipping the core's validation (for invalid bundles).
pub fn sign_raw(payload: &Value, key: &SigningKey) -> String {
    use p256::ecdsa::signature::Signer as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = json!({"alg": "ES256", "kid": key.kid, "typ": "rg-bundle+jwt"});
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload.to_string().as_bytes()));
    let signature: p256::ecdsa::Signature = key.key.sign(input.as_bytes());
    format!("{input}.{}", b64(&signature.to_bytes()))
}

/// A configuration directory with operator keys and, optionally, an active bundle.
pub fn config_with_bundle(bundle_jws: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), Some(BUNDLE_SETTINGS));
    write_operator_keys(dir.path());
    if let Some(jws) = bundle_jws {
        std::fs::write(dir.path().join("bundle.jws"), jws).unwrap();
    }
    dir
}

pub fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}")))
}

impl TestApp {
    /// A handle on a service started elsewhere (it runs until the test process ends).
    pub fn attach(address: String, dir: tempfile::TempDir) -> TestApp {
        TestApp { address, client: reqwest::Client::new(), dir, shutdown: None }
    }

    /// Stops this instance and starts a new one on the same configuration directory.
    pub async fn restart(mut self) -> TestApp {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        spawn_in(self.dir).await
    }

    /// `PUT /bundle` with a raw body, as the operator.
    pub async fn put_bundle(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.put_bundle_as(Some(&format!("Bearer {OPERATOR_TOKEN}")), body).await
    }

    /// `PUT /bundle` with a raw body and the given `Authorization` (none: `None`).
    pub async fn put_bundle_as(
        &self,
        authorization: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut req = self.client.put(format!("{}/bundle", self.address)).body(body);
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        req.send().await.unwrap()
    }

    /// `GET /bundle/status`, checked to be 200.
    pub async fn bundle_status(&self) -> Value {
        let resp = self.client.get(format!("{}/bundle/status", self.address)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// The `access` claim of a token for `user` asking for `scope` (space-separated scopes).
    pub async fn access(&self, user: &str, password: &str, scope: &str) -> Value {
        let form = [("grant_type", "password"), ("username", user), ("password", password), ("scope", scope)];
        let resp = self.post_token(&form).await;
        assert_eq!(resp.status(), 200, "{user} {scope}");
        let body: Value = resp.json().await.unwrap();
        registry_guard_core::token::verify::decode_unverified(body["access_token"].as_str().unwrap()).unwrap()["access"]
            .clone()
    }

    /// `GET /jwt/auth` with a raw query string and optional Basic credentials.
    pub async fn get_token(&self, query: &str, creds: Option<(&str, &str)>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}/jwt/auth?{query}", self.address));
        if let Some((u, s)) = creds {
            req = req.header("Authorization", basic(u, s));
        }
        req.send().await.unwrap()
    }

    /// `POST /jwt/auth` with form fields.
    pub async fn post_token(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.client.post(format!("{}/jwt/auth", self.address)).form(form).send().await.unwrap()
    }

    /// A verifier built from the service's own JWKS.
    pub async fn verifier(&self) -> Verifier {
        let jwks: Value = self.client.get(format!("{}/jwks", self.address)).send().await.unwrap().json().await.unwrap();
        Verifier {
            keys: KeySet::from_jwks(&jwks).unwrap(),
            issuer: "registry-guard".into(),
            audience: "container_registry".into(),
            leeway_seconds: 5,
        }
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Deploy token secrets of [`deploy_bundle`] (only their SHA-256 is in the bundle).
pub const ACME_CI_SECRET: &str = "gldt-acme-ci-secret";
pub const ACME_READ_SECRET: &str = "gldt-acme-read-secret";
pub const WEB_SECRET: &str = "gldt-web-secret";
pub const EXPIRED_SECRET: &str = "gldt-expired-secret";
pub const REVOKED_SECRET: &str = "gldt-revoked-secret";
pub const REVOKED_LATER_SECRET: &str = "gldt-revoked-later-secret";

/// A bundle with deploy tokens and revocations:
/// 1 `acme-ci`: group `acme`, read+write; 2 `deploy-token-2`: group `acme`, read only;
/// 3 `deploy-token-3`: project `acme/web`, read+write; 4 `deploy-token-4`: expired;
/// 5 `deploy-token-5`: `revoked: true`; 6 `deploy-token-6`: revoked through
/// `revocations.deploy_tokens`. Users: rita is revoked (all tokens), dev's tokens issued
/// before 2020 are revoked (so dev may log in). Callers may edit the value before signing.
pub fn deploy_bundle(revision: u64) -> Value {
    json!({
        "revision": revision,
        "deploy_tokens": [
            {"id": 1, "username": "acme-ci", "name": "acme CI", "owner": {"group": "acme"},
             "scopes": ["read_registry", "write_registry"], "sha256": sha256_hex(ACME_CI_SECRET)},
            {"id": 2, "owner": {"group": "acme"}, "scopes": ["read_registry"], "sha256": sha256_hex(ACME_READ_SECRET)},
            {"id": 3, "owner": {"project": "acme/web"}, "scopes": ["read_registry", "write_registry"],
             "sha256": sha256_hex(WEB_SECRET)},
            {"id": 4, "owner": {"group": "acme"}, "scopes": ["read_registry"], "sha256": sha256_hex(EXPIRED_SECRET),
             "expires_at": "2020-01-01T00:00:00Z"},
            {"id": 5, "owner": {"group": "acme"}, "scopes": ["read_registry"], "sha256": sha256_hex(REVOKED_SECRET),
             "revoked": true},
            {"id": 6, "owner": {"group": "acme"}, "scopes": ["read_registry"],
             "sha256": sha256_hex(REVOKED_LATER_SECRET), "expires_at": "2999-01-01T00:00:00Z"}
        ],
        "revocations": {
            "deploy_tokens": [6],
            "users": [{"username": "rita"}, {"username": "dev", "issued_before": "2020-01-01T00:00:00Z"}]
        }
    })
}

/// Signs a bundle value with [`operator_key`].
pub fn sign_bundle_value(bundle: &Value) -> String {
    sign_bundle(&bundle.to_string())
}

/// A service whose active bundle is `bundle` (signed at startup from the config directory).
pub async fn spawn_with_bundle(bundle: &Value) -> TestApp {
    spawn_in(config_with_bundle(Some(&sign_bundle_value(bundle)))).await
}

/// The claims of the registry token in a 200 token response.
pub async fn token_claims(resp: reqwest::Response) -> Value {
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    registry_guard_core::token::verify::decode_unverified(body["token"].as_str().unwrap()).unwrap()
}

/// Everything the service logs in this test process (all tests share one global subscriber;
/// search for lines of your own). Installed on first use.
pub fn captured_logs() -> String {
    use std::sync::{Arc, Mutex, OnceLock};
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: OnceLock<Buffer> = OnceLock::new();
    let buffer = LOGS.get_or_init(|| {
        let buffer = Buffer(Arc::default());
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).with_target(false).finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    });
    String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned()
}
