//! The notification endpoint's HTTP contract: bearer secret, media types, envelope shape.

use serde_json::json;

use crate::helpers::*;

fn one_push() -> String {
    envelope(vec![push("e1", "acme/web/app", Some("v1"), Some(&dev_jwt()))]).to_string()
}

#[tokio::test]
async fn a_wrong_or_missing_bearer_secret_is_401_and_records_nothing() {
    let app = spawn_app().await;
    for authorization in [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {SECRET}x")),
        Some(format!("Basic {SECRET}")),
        Some(SECRET.to_owned()),
        Some("Bearer ".to_owned()),
    ] {
        let response = app.post_raw(one_push(), Some(EVENTS_V1), authorization.as_deref()).await;
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer "));
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("Bearer"));
    }
    let counts = app.snapshot().await;
    assert_eq!(counts["events"], json!([]));
    // The scheme is case-insensitive.
    let response = app.post_raw(one_push(), Some(EVENTS_V1), Some(&format!("bearer {SECRET}"))).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unsupported_media_types_are_415() {
    let app = spawn_app().await;
    let auth = format!("Bearer {SECRET}");
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let response = app.post_raw(one_push(), content_type, Some(&auth)).await;
        assert_eq!(response.status(), 415, "{content_type:?}");
    }
    assert_eq!(app.snapshot().await["events"], json!([]));
    for (i, content_type) in [
        EVENTS_V1,
        EVENTS_V2,
        "application/json",
        "application/json; charset=utf-8",
        "Application/Vnd.Docker.Distribution.Events.V1+JSON",
    ]
    .into_iter()
    .enumerate()
    {
        let body = envelope(vec![push(&format!("e{i}"), "acme/web/app", Some("v1"), Some(&dev_jwt()))]).to_string();
        let response = app.post_raw(body, Some(content_type), Some(&auth)).await;
        assert_eq!(response.status(), 200, "{content_type}");
    }
    assert_eq!(app.snapshot().await["counters"]["i_container_registry_push_tag_user"], 5);
}

#[tokio::test]
async fn a_malformed_envelope_is_400() {
    let app = spawn_app().await;
    let auth = format!("Bearer {SECRET}");
    for body in ["{nope", "[]", r#"{"events": {}}"#, r#"{"event": []}"#, ""] {
        let response = app.post_raw(body.to_owned(), Some(EVENTS_V1), Some(&auth)).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().starts_with("envelope "), "{error}");
    }
    let response = app.post_raw(r#"{"events": []}"#.to_owned(), Some(EVENTS_V1), Some(&auth)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn healthz_is_200() {
    let app = spawn_app().await;
    let response = app.client.get(format!("{}/healthz", app.address)).send().await.unwrap();
    assert_eq!(response.status(), 200);
}
