//! Durability: counts and dedupe survive a restart; a failed write is a 500 and counts nothing.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn counts_and_dedupe_survive_a_restart() {
    let app = spawn_app().await;
    let (dev, ci) = (dev_jwt(), deploy_jwt());
    let env = envelope(vec![
        push("e1", "acme/web/app", Some("v1"), Some(&dev)),
        push("e2", "acme/web/app", Some("v2"), Some(&ci)),
        push("e3", "acme/web/app", Some("v3"), Some(&tamper(&dev))),
        push("e4", "acme/web/app", Some("v4"), None),
    ]);
    app.deliver(&env).await;
    let before = app.snapshot().await;
    let app = app.restart().await;
    let after = app.snapshot().await;
    assert_eq!(after, before);
    assert_eq!(after["counters"]["i_container_registry_push_tag_user"], 1);
    assert_eq!(after["rejected"], 1);
    assert_eq!(after["unattributed"], 1);
    // The registry retries the envelope after the restart: still counted once.
    let report = app.deliver(&env).await;
    assert_eq!(report["duplicates"], 4);
    // And the repository is not created a second time.
    app.deliver(&envelope(vec![push("e5", "acme/web/app", Some("v5"), Some(&dev))])).await;
    let counts = app.snapshot().await;
    assert_eq!(counts["counters"]["i_container_registry_create_repository_user"], 1);
    assert_eq!(counts["counters"]["i_container_registry_push_tag_user"], 2);
    assert_eq!(counts["duplicates"], 4);
}

#[tokio::test]
async fn a_failed_write_is_500_and_the_retry_counts_once() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    // Break the database under the running consumer.
    let conn = rusqlite::Connection::open(&app.database).unwrap();
    conn.execute_batch("DROP TABLE repositories").unwrap();
    let env =
        envelope(vec![push("e0", "acme/other", Some("v1"), None), push("e1", "acme/web/app", Some("v1"), Some(&dev))]);
    let response = app.post_events(&env).await;
    assert_eq!(response.status(), 500);
    // Nothing of the envelope was recorded: the first event was rolled back too.
    let counts = app.snapshot().await;
    assert_eq!(counts["events"], json!([]));
    assert_eq!(counts["unattributed"], 0);
    // The consumer restarts (recreating the table); the registry's retry is counted once.
    drop(conn);
    let app = app.restart().await;
    app.deliver(&env).await;
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({"i_container_registry_create_repository_user": 1, "i_container_registry_push_tag_user": 1})
    );
    assert_eq!(counts["unattributed"], 1);
    assert_eq!(counts["duplicates"], 0);
}

#[tokio::test]
async fn metrics_expose_every_counter_and_tally() {
    let app = spawn_app().await;
    let (dev, ci) = (dev_jwt(), deploy_jwt());
    let env = envelope(vec![
        push("e1", "acme/web/app", Some("v1"), Some(&dev)),
        delete("e2", "acme/web/app", Some("v1"), Some(&ci)),
        push("e3", "acme/web/app", Some("v2"), Some(&tamper(&ci))),
        push("e4", "acme/web/app", Some("v3"), None),
        blob_push("b1", "acme/web/app", Some(&dev)),
    ]);
    app.deliver(&env).await;
    app.deliver(&env).await;
    let text = app.metrics().await;
    for line in [
        r#"registry_guard_consumer_events_total{event="i_container_registry_push_tag_user"} 1"#,
        r#"registry_guard_consumer_events_total{event="i_container_registry_create_repository_user"} 1"#,
        r#"registry_guard_consumer_events_total{event="i_container_registry_delete_tag_deploy_token"} 1"#,
        r#"registry_guard_consumer_events_total{event="i_container_registry_push_tag_deploy_token"} 0"#,
        r#"registry_guard_consumer_events_total{event="i_container_registry_delete_repository_user"} 0"#,
        "registry_guard_consumer_rejected_total 1",
        "registry_guard_consumer_unattributed_total 1",
        "registry_guard_consumer_duplicates_total 5",
        "registry_guard_consumer_ignored_total 1",
        "registry_guard_consumer_invalid_total 0",
        "# TYPE registry_guard_consumer_events counter",
        "# TYPE registry_guard_consumer_unique_actors gauge",
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_user",period="week"} 1"#,
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_user",period="month"} 1"#,
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_delete_tag_deploy_token",period="month"} 1"#,
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_deploy_token",period="week"} 0"#,
        "# EOF",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert_eq!(text.lines().filter(|l| l.starts_with("registry_guard_consumer_events_total{")).count(), 10);
    assert_eq!(text.lines().filter(|l| l.starts_with("registry_guard_consumer_unique_actors{")).count(), 20);
}
