//! `--jwks-url`: the consumer takes its verification keys from a JWKS URL (a small server
//! here, answering as the token service's `/jwks` does: ETag, 304), refreshed on a period;
//! a failed or refused fetch keeps the keys in force; a removed key stops verifying.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use registry_guard_consumer::keys::JwksUrl;
use registry_guard_core::token::testing::{es256_key, jwks};
use serde_json::{json, Value};

use crate::helpers::*;

/// What the JWKS server answers: status and body; and how many 304s it sent.
#[derive(Default)]
struct Served {
    status: u16,
    body: String,
    not_modified: u32,
}

async fn jwks_server(served: Arc<Mutex<Served>>) -> String {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move |headers: HeaderMap| {
            let served = Arc::clone(&served);
            async move {
                let mut s = served.lock().unwrap();
                let etag = format!("\"{}\"", s.body.len() ^ (s.body.bytes().map(usize::from).sum::<usize>() << 8));
                if s.status == 200 && headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str())
                {
                    s.not_modified += 1;
                    return (StatusCode::NOT_MODIFIED, [("etag", etag)], String::new());
                }
                (StatusCode::from_u16(s.status).unwrap(), [("etag", etag)], s.body.clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn user_jwt(key: u8, jti: &str) -> String {
    user_jwt_with(&es256_key(key), jti, json!({"token_type": "pat", "username": "rita", "user_id": 2}), now() + 300)
}

/// Delivers one push by a user JWT signed with `key`; whether it was accepted (not rejected).
async fn accepted(app: &TestApp, key: u8, id: &str) -> bool {
    let report: Value =
        app.deliver(&envelope(vec![push(id, "acme/web/app", Some("v1"), Some(&user_jwt(key, id)))])).await;
    report["rejected"] == 0
}

#[tokio::test]
async fn keys_follow_the_jwks_url_with_last_known_good() {
    let served =
        Arc::new(Mutex::new(Served { status: 200, body: jwks(&[&es256_key(1)]).to_string(), not_modified: 0 }));
    let url = jwks_server(Arc::clone(&served)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = write_inputs(dir.path());
    settings.jwks = None;
    settings.jwks_url = Some(JwksUrl { url: url.clone(), refresh: Duration::from_secs(1) });
    let app = spawn_with(dir, settings).await;
    assert!(accepted(&app, 1, "k1-a").await);
    assert!(!accepted(&app, 2, "k2-a").await, "key 2 is not published yet");

    // Rotation: key 2 published beside key 1, then key 1 retired.
    served.lock().unwrap().body = jwks(&[&es256_key(1), &es256_key(2)]).to_string();
    let mut n = 0;
    while !accepted(&app, 2, &format!("k2-wait-{n}")).await {
        n += 1;
        assert!(n < 50, "key 2 not taken within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted(&app, 1, "k1-b").await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(served.lock().unwrap().not_modified >= 1, "the refresh is conditional (If-None-Match, 304)");
    served.lock().unwrap().body = jwks(&[&es256_key(2)]).to_string();
    let mut n = 0;
    while accepted(&app, 1, &format!("k1-wait-{n}")).await {
        n += 1;
        assert!(n < 50, "key 1 not retired within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted(&app, 2, "k2-b").await);

    // Refused documents and failures keep key 2 (last known good), and never re-admit key 1.
    for (status, body) in [
        (200, "<html>".to_owned()),
        (200, r#"{"keys": []}"#.to_owned()),
        (200, jwks(&(1..=17).map(es256_key).collect::<Vec<_>>().iter().collect::<Vec<_>>()).to_string()),
        (503, String::new()),
    ] {
        *served.lock().unwrap() = Served { status, body, not_modified: 0 };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(accepted(&app, 2, &format!("k2-lkg-{status}-{}", now())).await, "last known good after HTTP {status}");
    }
    assert!(!accepted(&app, 1, "k1-c").await);
}

#[tokio::test]
async fn a_jwks_url_that_does_not_answer_at_startup_needs_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = write_inputs(dir.path());
    let url = "http://127.0.0.1:9/jwks".to_owned();
    settings.jwks_url = Some(JwksUrl { url: url.clone(), refresh: Duration::from_secs(5) });
    let with_file = settings.clone();
    settings.jwks = None;
    let err = build(settings).await.err().expect("refused").to_string();
    assert!(err.contains(&url) && err.contains("no --jwks file"), "{err}");
    // With a --jwks file, it starts from the file's keys.
    let app = spawn_with(dir, with_file).await;
    assert!(accepted(&app, 1, "file-1").await);
}
