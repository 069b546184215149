//! The read API: a read credential for `/counts` and `/events`, aggregates rather
//! than raw events, pages, the retention of raw rows, and bounded storage under hostile ids.

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn counts_and_events_need_the_read_token_metrics_and_healthz_do_not() {
    let app = spawn_app().await;
    app.deliver(&envelope(vec![push("e1", "acme/web/app", Some("v1"), Some(&dev_jwt()))])).await;
    for path in ["/counts", "/counts?period=month", "/events", "/events?after=0&limit=1"] {
        for authorization in [
            None,
            Some("Bearer wrong".to_owned()),
            Some(format!("Bearer {READ_TOKEN}x")),
            Some(format!("Basic {READ_TOKEN}")),
            // The registry's secret posts events; it does not read them.
            Some(format!("Bearer {SECRET}")),
        ] {
            let mut request = app.client.get(format!("{}{path}", app.address));
            if let Some(a) = &authorization {
                request = request.header("authorization", a);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{path} {authorization:?}");
            assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer realm="));
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("read token"), "{body}");
            assert!(!body.to_string().contains("acme"), "nothing leaks in a 401");
        }
        // The scheme is case-insensitive.
        let response = app
            .client
            .get(format!("{}{path}", app.address))
            .header("authorization", format!("bearer {READ_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // The read token does not post events.
    let response =
        app.post_raw(envelope(vec![]).to_string(), Some(EVENTS_V1), Some(&format!("Bearer {READ_TOKEN}"))).await;
    assert_eq!(response.status(), 401);
    for path in ["/metrics", "/healthz"] {
        let response = app.client.get(format!("{}{path}", app.address)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // /metrics holds numbers under fixed labels: no usernames or repositories.
    let metrics = app.metrics().await;
    assert!(!metrics.contains("acme") && !metrics.contains("dev"), "{metrics}");
}

#[tokio::test]
async fn events_come_in_bounded_pages() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    let batch = (0..7).map(|i| push(&format!("e{i}"), "acme/web/app", Some(&format!("v{i}")), Some(&dev))).collect();
    app.deliver(&envelope(batch)).await;
    let page: Value = app.read("/events?limit=3").await.json().await.unwrap();
    let ids: Vec<&str> = page["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["e0", "e1", "e2"]);
    let next = page["next_after"].as_i64().unwrap();
    assert_eq!(next, page["events"][2]["seq"].as_i64().unwrap());
    let page: Value = app.read(&format!("/events?after={next}&limit=1000")).await.json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 4);
    assert_eq!(page["next_after"], json!(null));
    // The default page is 100 rows.
    let page: Value = app.read("/events").await.json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 7);
    for query in ["limit=0", "limit=1001", "limit=x", "after=-1", "after=x", "period=week", "after=1&after=2"] {
        let response = app.read(&format!("/events?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
    }
    assert_eq!(app.events().await.len(), 7);
}

#[tokio::test]
async fn raw_events_older_than_the_retention_are_pruned_and_the_counts_stay() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    app.deliver(&envelope(vec![
        push("old", "acme/web/app", Some("v1"), Some(&dev)),
        push("new", "acme/web/app", Some("v2"), Some(&dev)),
    ]))
    .await;
    let before = app.counts().await;
    // Age one row past the 90-day default retention.
    let conn = rusqlite::Connection::open(&app.database).unwrap();
    conn.execute("UPDATE events SET received_at = ?1 WHERE id = 'old'", [now() - 91 * 86_400]).unwrap();
    drop(conn);
    // The retention is applied at startup (and every minute while running).
    let app = app.restart().await;
    let ids: Vec<String> = app.events().await.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, ["new"]);
    assert_eq!(app.counts().await, before, "aggregates outlive the raw rows");
    // A row limit: only the newest rows stay.
    let batch = (0..5).map(|i| push(&format!("n{i}"), "acme/web/app", Some("v3"), Some(&dev))).collect();
    app.deliver(&envelope(batch)).await;
    let app = app.restart_with(|s| s.max_events = 2).await;
    let ids: Vec<String> = app.events().await.iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, ["n3", "n4"]);
    assert_eq!(app.counts().await["counters"]["i_container_registry_push_tag_user"], 7);
}

/// Size of the database and its WAL.
fn database_bytes(app: &TestApp) -> u64 {
    let wal = app.database.with_extension("sqlite-wal");
    std::fs::metadata(&app.database).unwrap().len() + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn hostile_ids_and_names_are_capped_before_they_are_stored() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    let mut sent = 0usize;
    let mut last = Value::Null;
    for batch in 0..5 {
        let events: Vec<Value> = (0..20)
            .map(|i| {
                let mut e =
                    push(&format!("{batch}-{i}-{}", "i".repeat(20_000)), "acme/web/app", Some("v1"), Some(&dev));
                e["request"]["id"] = json!("r".repeat(60_000));
                e["request"]["useragent"] = json!("u".repeat(60_000));
                e["target"]["tag"] = json!("t".repeat(30_000));
                e["target"]["repository"] = json!(format!("acme/{}", "a".repeat(30_000)));
                e
            })
            .collect();
        let body = envelope(events);
        sent += body.to_string().len();
        app.deliver(&body).await;
        last = body;
    }
    let rows = app.events().await;
    assert_eq!(rows.len(), 100);
    for row in &rows {
        assert!(row["id"].as_str().unwrap().starts_with("sha256:"));
        assert_eq!(row["request_id"].as_str().unwrap().len(), 128);
        assert_eq!(row["tag"].as_str().unwrap().len(), 128);
        assert_eq!(row["repository"].as_str().unwrap().len(), 255);
    }
    // A redelivery is still recognised: the digest is of the full id.
    assert_eq!(app.deliver(&last).await["duplicates"], 20);
    let bytes = database_bytes(&app);
    eprintln!("sent {sent} bytes in 100 events; database and WAL: {bytes} bytes");
    assert!(sent > 15_000_000);
    assert!(bytes < 2 * 1024 * 1024, "{bytes} bytes for 100 hostile events");
}
