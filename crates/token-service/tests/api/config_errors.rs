//! Bad configuration fails at startup with one message naming the file and the field.

use std::process::Command;

use serde_json::json;

use crate::helpers::*;

async fn startup_error(
    principals: &serde_json::Value,
    settings: Option<&str>,
    tweak: impl FnOnce(&std::path::Path),
) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), principals, settings);
    tweak(dir.path());
    let err = build(dir.path()).await.err().expect("startup should fail").to_string();
    (err, dir.path().display().to_string())
}

#[tokio::test]
async fn unknown_field_in_settings_names_file_and_field() {
    let (err, dir) = startup_error(&principals(), Some(r#"{"issuer": "x", "colour": "blue"}"#), |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/token-service.json: $")), "{err}");
    assert!(err.contains("unknown field `colour`"), "{err}");

    let (err, dir) = startup_error(&principals(), Some(r#"{"token_ttl_seconds": "long"}"#), |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/token-service.json: $.token_ttl_seconds: ")), "{err}");
    let (err, _) = startup_error(&principals(), Some(r#"{"token_ttl_seconds": 0}"#), |_| {}).await;
    assert!(err.contains("$.token_ttl_seconds: must be between 1 and 86400"), "{err}");
    for bad in ["-1", "3601"] {
        let settings = format!(r#"{{"user_jwt_reuse_seconds": {bad}}}"#);
        let (err, _) = startup_error(&principals(), Some(&settings), |_| {}).await;
        assert!(err.contains("$.user_jwt_reuse_seconds: must be between 0 and 3600"), "{err}");
    }
}

#[tokio::test]
async fn bad_password_hash_names_the_user() {
    let mut p = principals();
    p["users"][2]["password_hash"] = json!("$argon2id$v=19$m=oops");
    let (err, dir) = startup_error(&p, None, |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/principals.json: $.users[2].password_hash: ")), "{err}");
    // The core's own checks come through the same way.
    let mut p = principals();
    p["users"][0]["memberships"][0]["path"] = json!("nowhere");
    let (err, dir) = startup_error(&p, None, |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/principals.json: $.users[0].memberships[0].path: ")), "{err}");
}

#[tokio::test]
async fn missing_principals_and_bad_key_name_the_file() {
    let (err, dir) =
        startup_error(&principals(), None, |d| std::fs::remove_file(d.join("principals.json")).unwrap()).await;
    assert!(err.starts_with(&format!("{dir}/principals.json: cannot read")), "{err}");
    let (err, dir) =
        startup_error(&principals(), None, |d| std::fs::write(d.join("keys/signing-key.pem"), "junk").unwrap()).await;
    assert!(err.starts_with(&format!("{dir}/keys/signing-key.pem: is not a PKCS#8 PEM P-256 private key")), "{err}");
    let (err, dir) = startup_error(&principals(), Some(r#"{"signing_key": "elsewhere.pem"}"#), |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/elsewhere.pem: cannot read the signing key")), "{err}");
}

#[tokio::test]
async fn bad_bundles_and_operator_keys_name_the_file() {
    let bundle_settings = Some(BUNDLE_SETTINGS);
    // A corrupt bundle file.
    let (err, dir) = startup_error(&principals(), bundle_settings, |d| {
        write_operator_keys(d);
        std::fs::write(d.join("bundle.jws"), "corrupt").unwrap();
    })
    .await;
    assert!(err.starts_with(&format!("{dir}/bundle.jws: signature: not a compact JWS")), "{err}");
    // Signed by a stranger.
    let stranger = registry_guard_core::policy::bundle::sign(
        &platform_bundle(1),
        &registry_guard_core::token::testing::es256_key(9),
    )
    .unwrap();
    let (err, dir) = startup_error(&principals(), bundle_settings, |d| {
        write_operator_keys(d);
        std::fs::write(d.join("bundle.jws"), &stranger).unwrap();
    })
    .await;
    assert!(err.starts_with(&format!("{dir}/bundle.jws: signature: signed by unknown operator key")), "{err}");
    // Signed, but invalid.
    let invalid = sign_raw(&json!({"revision": 1, "protection_rules": [{"id": "x"}]}), &operator_key());
    let (err, dir) = startup_error(&principals(), bundle_settings, |d| {
        write_operator_keys(d);
        std::fs::write(d.join("bundle.jws"), &invalid).unwrap();
    })
    .await;
    assert!(err.starts_with(&format!("{dir}/bundle.jws: $.protection_rules[0]: ")), "{err}");
    // A bundle, but no operator keys configured to check it.
    let signed = sign_bundle(&platform_bundle(1));
    let (err, dir) =
        startup_error(&principals(), None, |d| std::fs::write(d.join("bundle.jws"), &signed).unwrap()).await;
    assert!(err.starts_with(&format!("{dir}/bundle.jws: a policy bundle is present but no operator keys")), "{err}");
    assert!(err.contains("`bundle_keys`"), "{err}");
    // Operator keys configured but missing, or not a key set.
    let (err, dir) = startup_error(&principals(), bundle_settings, |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/keys/operator-jwks.json: cannot read the operator keys")), "{err}");
    let (err, dir) = startup_error(&principals(), bundle_settings, |d| {
        std::fs::write(d.join("keys/operator-jwks.json"), r#"{"keys": []}"#).unwrap();
    })
    .await;
    assert!(err.starts_with(&format!("{dir}/keys/operator-jwks.json: key set is empty")), "{err}");
    let (err, dir) = startup_error(&principals(), Some(r#"{"bundle": ""}"#), |_| {}).await;
    assert!(err.starts_with(&format!("{dir}/token-service.json: $.bundle: must not be empty")), "{err}");
}

#[test]
fn binary_refuses_a_corrupt_bundle_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), Some(BUNDLE_SETTINGS));
    write_operator_keys(dir.path());
    std::fs::write(dir.path().join("bundle.jws"), "{\"revision\": 3}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_registry-guard-token-service"))
        .args(["--config-dir", &dir.path().display().to_string(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {}/bundle.jws: signature: bundle is not signed", dir.path().display())),
        "{stderr}"
    );
}

#[test]
fn binary_exits_non_zero_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = principals();
    p["users"][1]["password_hash"] = json!("$argon2id$broken");
    write_config(dir.path(), &p, None);
    let out = Command::new(env!("CARGO_BIN_EXE_registry-guard-token-service"))
        .args(["--config-dir", &dir.path().display().to_string(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: {}/principals.json: $.users[1].password_hash: ", dir.path().display())),
        "{stderr}"
    );
}
