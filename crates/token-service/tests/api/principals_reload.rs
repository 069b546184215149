//! `principals.json` reloads without a restart (SIGHUP in `main`): a user added to the file
//! can log in after the reload, a removed one cannot, a membership change changes the grant;
//! a broken file is refused with its error and the current principals stay. Anonymous and
//! wrong-password requests are refused throughout.

use serde_json::{json, Value};

use crate::helpers::*;

async fn status_of(app: &TestApp, user: &str, password: &str) -> u16 {
    app.get_token("scope=repository:acme/web/app:pull", Some((user, password))).await.status().as_u16()
}

async fn granted(app: &TestApp, user: &str, password: &str) -> Vec<String> {
    let resp = app.get_token("scope=repository:acme/web/app:pull,push", Some((user, password))).await;
    assert_eq!(resp.status(), 200, "{user} logs in");
    let claims = token_claims(resp).await;
    claims["access"]
        .as_array()
        .map(|a| a.iter().flat_map(|e| e["actions"].as_array().cloned().unwrap_or_default()))
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn write_principals(app: &TestApp, principals: &Value) {
    std::fs::write(app.dir.path().join("principals.json"), serde_json::to_string_pretty(principals).unwrap()).unwrap();
}

async fn assert_closed(app: &TestApp) {
    assert_eq!(app.get_token("scope=repository:acme/web/app:pull", None).await.status(), 401, "anonymous");
    assert_eq!(status_of(app, "alice", "not-her-password").await, 401, "wrong password");
}

#[tokio::test]
async fn principals_reload_adds_removes_and_keeps_the_current_file_on_error() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &principals(), None);
    let app = build(dir.path()).await.unwrap();
    let reloader = app.key_reloader();
    let address = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));
    let app = TestApp::attach(address, dir);

    // Before: no `newbie`; dev (developer of acme) may push.
    assert_eq!(status_of(&app, "newbie", "newbie-pass").await, 401);
    assert!(granted(&app, "dev", DEV_PASSWORD).await.contains(&"push".to_owned()));
    assert_closed(&app).await;

    // Added user, dev demoted to reporter, rita removed.
    let mut p = principals();
    let users = p["users"].as_array_mut().unwrap();
    users.retain(|u| u["username"] != "rita");
    for u in users.iter_mut() {
        if u["username"] == "dev" {
            u["memberships"] = json!([{"path": "acme", "access_level": "reporter"}]);
        }
    }
    users.push(json!({"id": 6, "username": "newbie", "password_hash": hash_password("newbie-pass"),
                      "memberships": [{"path": "acme/web", "access_level": "developer"}]}));
    write_principals(&app, &p);
    // Not read until the reload.
    assert_eq!(status_of(&app, "newbie", "newbie-pass").await, 401);
    assert_eq!(reloader.reload_principals().unwrap(), 5);
    assert_eq!(status_of(&app, "newbie", "newbie-pass").await, 200, "added user logs in");
    assert_eq!(status_of(&app, "rita", RITA_PASSWORD).await, 401, "removed user is refused");
    let dev = granted(&app, "dev", DEV_PASSWORD).await;
    assert!(dev.contains(&"pull".to_owned()) && !dev.contains(&"push".to_owned()), "dev demoted: {dev:?}");
    assert_closed(&app).await;

    // Broken files: refused, naming the file and what is wrong; the reloaded principals stay.
    for (text, needle) in [
        ("{not json", "principals.json"),
        (r#"{"users": [{"id": 7, "username": "x", "password_hash": "plain"}]}"#, "password_hash"),
    ] {
        std::fs::write(app.dir.path().join("principals.json"), text).unwrap();
        let e = reloader.reload_principals().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert_eq!(status_of(&app, "newbie", "newbie-pass").await, 200, "current principals stay");
        assert_eq!(status_of(&app, "rita", RITA_PASSWORD).await, 401);
        assert_closed(&app).await;
    }
    std::fs::remove_file(app.dir.path().join("principals.json")).unwrap();
    assert!(reloader.reload_principals().unwrap_err().to_string().contains("cannot read"));
    assert_eq!(status_of(&app, "newbie", "newbie-pass").await, 200);
}
