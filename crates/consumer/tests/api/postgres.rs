//! `--database postgres://…`: replicas sharing one PostgreSQL database (a real server from
//! Debian's package, started by the tests) count a redelivered event once and serve the same
//! counts; a wrong URL or an unreachable server is one clear error line.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use registry_guard_consumer::store::Database;
use registry_guard_postgres_testing::{Server, SKIP_MESSAGE};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_registry-guard-consumer");

/// A fresh database on the shared server; `None` (skipping, with a message) only when no
/// PostgreSQL binaries are installed.
fn database(test: &str) -> Option<(Arc<Server>, String)> {
    static N: AtomicU32 = AtomicU32::new(0);
    let Some(server) = registry_guard_postgres_testing::shared().unwrap() else {
        eprintln!("{test}: {SKIP_MESSAGE}");
        return None;
    };
    let url = server.create_database(&format!("api_{test}_{}", N.fetch_add(1, Ordering::Relaxed))).unwrap();
    Some((server, url))
}

/// A consumer on `url`, with its own JWKS, secret and read-token files (the same values).
async fn replica(url: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = write_inputs(dir.path());
    settings.database = Database::Postgres(url.to_owned());
    spawn_with(dir, settings).await
}

#[tokio::test]
async fn two_replicas_on_one_postgres_count_a_redelivered_event_once() {
    let Some((_server, url)) = database("redelivery") else { return };
    let (a, b) = (replica(&url).await, replica(&url).await);
    let (dev, rita, ci) = (dev_jwt(), rita_jwt(), deploy_jwt());
    let env = envelope(vec![
        push("e1", "acme/web/app", Some("v1"), Some(&dev)),
        push("e2", "acme/web/app", Some("v2"), Some(&ci)),
    ]);
    // The registry retries through a load balancer: the envelope reaches both replicas, one
    // of them twice, two of the deliveries at the same moment.
    let first = a.deliver(&env).await;
    let (again_a, again_b) = tokio::join!(a.deliver(&env), b.deliver(&env));
    assert_eq!((first["counted"].as_u64(), first["duplicates"].as_u64()), (Some(2), Some(0)));
    assert_eq!(again_a["duplicates"], 2, "{again_a}");
    assert_eq!(again_b["duplicates"], 2, "{again_b}");
    // Different events on different replicas add up.
    b.deliver(&envelope(vec![push("e3", "acme/web/app", Some("v3"), Some(&rita))])).await;
    a.deliver(&envelope(vec![push("e4", "acme/web/lib", Some("v1"), Some(&dev))])).await;
    let (sa, sb) = (a.snapshot().await, b.snapshot().await);
    assert_eq!(sa, sb, "both replicas serve the same counts and events");
    assert_eq!(sa["counters"]["i_container_registry_push_tag_user"], 3, "{sa:#}");
    assert_eq!(sa["counters"]["i_container_registry_push_tag_deploy_token"], 1);
    assert_eq!(sa["counters"]["i_container_registry_create_repository_user"], 2, "acme/web/app and acme/web/lib");
    assert_eq!(sa["duplicates"], 4);
    assert_eq!(sa["unique"]["i_container_registry_push_tag_user"], 2, "dev and rita");
    assert_eq!(sa["events"].as_array().unwrap().len(), 4);
    // (`/metrics` lists a family's series in no fixed order.)
    let sorted = |text: String| {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(a.metrics().await), sorted(b.metrics().await));
    // A replica restarted on the same database keeps everything, and dedupe with it.
    let a = a.restart_with(|s| s.database = Database::Postgres(url.clone())).await;
    assert_eq!(a.snapshot().await, sb);
    assert_eq!(a.deliver(&env).await["duplicates"], 2);
    b.stop().await;
    a.stop().await;
}

#[test]
fn the_binary_names_the_postgres_database_without_its_password() {
    let Some((server, url)) = database("binary") else { return };
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let with_password = url.replacen("postgres@", "postgres:not-needed@", 1);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let args = |database: &str| {
        vec![
            "--listen".to_owned(),
            "127.0.0.1:0".into(),
            "--database".into(),
            database.to_owned(),
            "--jwks".into(),
            p("jwks.json"),
            "--secret-file".into(),
            p("secret"),
            "--read-token-file".into(),
            p("read-token"),
        ]
    };
    let mut child = Command::new(BIN).args(args(&with_password)).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let shown = url.replacen("postgres@", "postgres:***@", 1);
    assert!(line.contains(&format!("(database {shown}, 0 events recorded")), "{line}");
    assert!(!line.contains("not-needed"), "{line}");

    // Unreachable (nothing listens on port 1) and malformed: one line, naming the URL.
    for (database, expected) in [
        (
            "postgres://consumer:pw@127.0.0.1:1/counts",
            "postgres://consumer:***@127.0.0.1:1/counts: cannot connect to PostgreSQL: ",
        ),
        (
            "postgres://consumer@127.0.0.1:http/counts",
            "postgres://consumer@127.0.0.1:http/counts: not a PostgreSQL connection URL: ",
        ),
    ] {
        let out = Command::new(BIN).args(args(database)).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(&format!("error: {expected}")), "{stderr}");
        assert!(!stderr.contains("pw@"), "{stderr}");
    }
    // A database that does not exist is named too.
    let missing = server.url("no_such_database");
    let out = Command::new(BIN).args(args(&missing)).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with(&format!("error: {missing}: cannot connect to PostgreSQL: ")), "{stderr}");
    assert!(stderr.contains("FATAL: database \"no_such_database\" does not exist (SQLSTATE 3D000)"), "{stderr}");
}
