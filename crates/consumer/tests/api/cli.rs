//! The binary: its startup line, and one clear error line with exit status 1 on bad input.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};

use registry_guard_consumer::StartupError;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_registry-guard-consumer");

fn args(dir: &Path) -> Vec<String> {
    let p = |name: &str| dir.join(name).display().to_string();
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database".into(),
        p("consumer.sqlite"),
        "--jwks".into(),
        p("jwks.json"),
        "--secret-file".into(),
        p("secret"),
        "--read-token-file".into(),
        p("read-token"),
    ]
}

/// Runs the binary on `dir` after `tweak`, expecting it to fail; returns its stderr.
fn failure(tweak: impl FnOnce(&Path)) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    tweak(dir.path());
    let out = Command::new(BIN).args(args(dir.path())).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    (stderr, dir.path().display().to_string())
}

#[test]
fn the_startup_line_names_address_database_and_key_count() {
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let mut child = Command::new(BIN).args(args(dir.path())).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let d = dir.path().display();
    assert!(line.starts_with("registry event consumer listening on http://127.0.0.1:"), "{line}");
    assert!(line.contains(&format!("database {d}/consumer.sqlite, 0 events recorded")), "{line}");
    assert!(line.contains(&format!("1 verification key from {d}/jwks.json")), "{line}");
    assert!(line.contains("tolerance 86400s"), "{line}");
    assert!(line.contains("retention 90 days, at most 1000000 events"), "{line}");
    assert!(!line.contains(SECRET));
    assert!(!line.contains(READ_TOKEN));
}

#[test]
fn bad_input_exits_1_with_one_line_naming_the_file() {
    let (err, d) = failure(|d| std::fs::write(d.join("secret"), " \n").unwrap());
    assert_eq!(err, format!("error: {d}/secret: the secret is empty\n"));
    let (err, d) = failure(|d| std::fs::remove_file(d.join("secret")).unwrap());
    assert!(err.starts_with(&format!("error: {d}/secret: cannot read the secret: ")), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "the cause is said once: {err}");
    let (err, d) = failure(|d| std::fs::write(d.join("jwks.json"), "{nope").unwrap());
    assert!(err.starts_with(&format!("error: {d}/jwks.json: the JWKS is not JSON: ")), "{err}");
    let (err, d) = failure(|d| std::fs::write(d.join("jwks.json"), r#"{"keys": []}"#).unwrap());
    assert_eq!(err, format!("error: {d}/jwks.json: key set is empty: at least one verification key is required\n"));
    let (err, d) =
        failure(|d| std::fs::write(d.join("jwks.json"), r#"{"keys": [{"kty": "oct", "k": "AAAA"}]}"#).unwrap());
    assert!(err.starts_with(&format!("error: {d}/jwks.json: keys[0]: symmetric keys are not accepted")), "{err}");
    let (err, d) = failure(|d| std::fs::remove_file(d.join("jwks.json")).unwrap());
    assert!(err.starts_with(&format!("error: {d}/jwks.json: cannot read the JWKS: ")), "{err}");
    let (err, d) = failure(|d| std::fs::write(d.join("read-token"), "\n").unwrap());
    assert_eq!(err, format!("error: {d}/read-token: the read token is empty\n"));
    let (err, d) = failure(|d| std::fs::write(d.join("read-token"), SECRET).unwrap());
    assert!(
        err.starts_with(&format!("error: {d}/read-token: the read token must differ from the registry's secret")),
        "{err}"
    );
    let (err, d) = failure(|d| std::fs::remove_file(d.join("read-token")).unwrap());
    assert!(err.starts_with(&format!("error: {d}/read-token: cannot read the read token: ")), "{err}");
    let (err, d) = failure(|d| std::fs::write(d.join("consumer.sqlite"), vec![b'x'; 4096]).unwrap());
    assert_eq!(err, format!("error: {d}/consumer.sqlite: cannot open the database: file is not a database\n"));
}

#[tokio::test]
async fn a_database_in_a_missing_directory_or_a_negative_tolerance_fails_startup() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = write_inputs(dir.path());
    s.database = dir.path().join("missing/consumer.sqlite").into();
    let err = build(s).await.err().unwrap();
    assert!(matches!(err, StartupError::Store(_)), "{err}");
    assert!(err.to_string().contains("missing/consumer.sqlite: cannot open the database"), "{err}");
    let mut s = settings(dir.path());
    s.tolerance_seconds = -1;
    assert!(matches!(build(s).await, Err(StartupError::Tolerance(-1))));
    // The retention must outlive every delivery that could still count (dedupe).
    let mut s = settings(dir.path());
    (s.retention_days, s.tolerance_seconds) = (1, 2 * 86_400);
    let err = build(s).await.err().unwrap();
    assert!(matches!(err, StartupError::Retention { days: 1, tolerance_seconds: 172_800 }), "{err}");
    let mut s = settings(dir.path());
    s.max_events = 0;
    assert!(matches!(build(s).await, Err(StartupError::MaxEvents(0))));
}
