//! Usage analytics as GitLab's usage metrics mean them: unique users (by user id) and unique deploy tokens
//! (by deploy-token id) per event name, per ISO week and calendar month (UTC), beside the
//! lifetime totals; kept across restarts.

use serde_json::{json, Value};

use crate::helpers::*;

const PUSH_TAG_USER: &str = "i_container_registry_push_tag_user";
const PUSH_TAG_DT: &str = "i_container_registry_push_tag_deploy_token";
const CREATE_USER: &str = "i_container_registry_create_repository_user";
const DELETE_TAG_USER: &str = "i_container_registry_delete_tag_user";

/// `event` with its `timestamp` set.
fn at(mut event: Value, timestamp: &str) -> Value {
    event["timestamp"] = json!(timestamp);
    event
}

#[tokio::test]
async fn the_same_user_pushing_three_tags_counts_one_unique_user() {
    let app = spawn_app().await;
    let (dev, rita, ci) = (dev_jwt(), rita_jwt(), deploy_jwt());
    let today = chrono::DateTime::from_timestamp(now(), 0).unwrap().to_rfc3339();
    app.deliver(&envelope(vec![
        at(push("e1", "acme/web/app", Some("v1"), Some(&dev)), &today),
        at(push("e2", "acme/web/app", Some("v2"), Some(&dev)), &today),
        at(push("e3", "acme/web/app", Some("v3"), Some(&dev)), &today),
        at(push("e4", "acme/web/app", Some("v4"), Some(&rita)), &today),
        at(push("e5", "acme/web/app", Some("ci-1"), Some(&ci)), &today),
        at(push("e6", "acme/web/app", Some("ci-2"), Some(&ci)), &today),
        at(delete("e7", "acme/web/app", Some("v1"), Some(&dev)), &today),
    ]))
    .await;
    for period in ["week", "month"] {
        let counts = app.counts_at(&format!("period={period}")).await;
        assert_eq!(counts["period"], period);
        let unique = &counts["unique"];
        assert_eq!(unique[PUSH_TAG_USER], 2, "dev (3 tags) and rita: {counts:#}");
        assert_eq!(unique[PUSH_TAG_DT], 1, "one deploy token, two tags");
        assert_eq!(unique[CREATE_USER], 1, "dev created the repository");
        assert_eq!(unique[DELETE_TAG_USER], 1);
        assert_eq!(unique["i_container_registry_push_repository_user"], 0);
        assert_eq!(unique.as_object().unwrap().len(), 10, "all ten event names, 0 included");
        // Lifetime totals of events are kept beside them.
        assert_eq!(counts["counters"][PUSH_TAG_USER], 4);
        assert_eq!(counts["counters"][PUSH_TAG_DT], 2);
    }
    // Aggregates only: no usernames, repositories or event rows in /counts.
    let text = app.counts().await.to_string();
    for secret in ["dev", "rita", "acme-ci", "acme/web/app", "\"events\""] {
        assert!(!text.contains(secret), "`{secret}` in /counts: {text}");
    }
    // The default is this week; another week is empty.
    let this_week = app.counts().await;
    assert_eq!(this_week["period"], "week");
    assert_eq!(this_week["unique"][PUSH_TAG_USER], 2);
    let last_year = app.counts_at("period=week&at=2025-11-30").await;
    assert_eq!(last_year["unique"][PUSH_TAG_USER], 0);
    assert_eq!(last_year["counters"][PUSH_TAG_USER], 4, "lifetime totals do not depend on the period");
}

#[tokio::test]
async fn weeks_and_months_are_iso_weeks_and_calendar_months_in_utc() {
    // A tolerance long enough that the events' own timestamps (in 2020/2021) place them.
    let dir = tempfile::tempdir().unwrap();
    let mut settings = write_inputs(dir.path());
    settings.tolerance_seconds = 10 * 366 * 86_400;
    settings.retention_days = 10 * 366;
    let app = spawn_with(dir, settings).await;
    let user = |id: u64| {
        user_jwt_with(
            &signing_key(),
            &format!("u{id}"),
            json!({"token_type": "pat", "username": format!("u{id}"), "user_id": id}),
            now() + 300,
        )
    };
    let (u1, u2, u3, u4, u5) = (user(1), user(2), user(3), user(4), user(5));
    app.deliver(&envelope(vec![
        at(push("a", "r", Some("a"), Some(&u1)), "2020-12-27T23:59:59Z"), // Sunday, 2020-W52
        at(push("b", "r", Some("b"), Some(&u2)), "2020-12-28T00:00:00Z"), // Monday, 2020-W53
        at(push("c", "r", Some("c"), Some(&u3)), "2020-12-31T23:59:59Z"), // 2020-W53, December
        at(push("d", "r", Some("d"), Some(&u4)), "2021-01-01T00:00:00Z"), // 2020-W53, January
        // 10:00 at +11:00 on Monday 2021-01-04 is still Sunday 23:00 UTC: 2020-W53.
        at(push("e", "r", Some("e"), Some(&u3)), "2021-01-04T10:00:00+11:00"),
        at(push("f", "r", Some("f"), Some(&u5)), "2021-01-04T00:00:00Z"), // Monday, 2021-W01
    ]))
    .await;
    let unique = |counts: &Value| counts["unique"][PUSH_TAG_USER].as_i64().unwrap();
    let w52 = app.counts_at("period=week&at=2020-12-27").await;
    assert_eq!(
        (w52["key"].as_str(), w52["from"].as_str(), w52["to"].as_str()),
        (Some("2020-W52"), Some("2020-12-21"), Some("2020-12-27"))
    );
    assert_eq!(unique(&w52), 1);
    for day in ["2020-12-28", "2020-12-31", "2021-01-01", "2021-01-03"] {
        let w53 = app.counts_at(&format!("period=week&at={day}")).await;
        assert_eq!(w53["key"], "2020-W53", "{day}");
        assert_eq!((w53["from"].as_str(), w53["to"].as_str()), (Some("2020-12-28"), Some("2021-01-03")));
        assert_eq!(unique(&w53), 3, "users 2, 3 (twice) and 4 on {day}");
    }
    let w01 = app.counts_at("period=week&at=2021-01-04").await;
    assert_eq!((w01["key"].as_str(), unique(&w01)), (Some("2021-W01"), 1));
    let december = app.counts_at("period=month&at=2020-12-31").await;
    assert_eq!(
        (december["key"].as_str(), december["from"].as_str(), december["to"].as_str()),
        (Some("2020-12"), Some("2020-12-01"), Some("2020-12-31"))
    );
    assert_eq!(unique(&december), 3, "users 1, 2, 3");
    let january = app.counts_at("period=month&at=2021-01-01").await;
    assert_eq!((january["key"].as_str(), unique(&january)), (Some("2021-01"), 3), "users 4, 3, 5");
    // The rows say when each event happened.
    let events = app.events().await;
    let e = events.iter().find(|e| e["id"] == "e").unwrap();
    assert_eq!(e["occurred_at"], 1_609_714_800, "2021-01-03T23:00:00Z");
}

#[tokio::test]
async fn unique_counts_survive_a_restart_and_redeliveries() {
    let app = spawn_app().await;
    let (dev, ci) = (dev_jwt(), deploy_jwt());
    let env = envelope(vec![
        push("e1", "acme/web/app", Some("v1"), Some(&dev)),
        push("e2", "acme/web/app", Some("v2"), Some(&dev)),
        push("e3", "acme/web/app", Some("v3"), Some(&ci)),
    ]);
    app.deliver(&env).await;
    let week = app.counts_at("period=week").await;
    let month = app.counts_at("period=month").await;
    let app = app.restart().await;
    assert_eq!(app.counts_at("period=week").await, week);
    assert_eq!(app.counts_at("period=month").await, month);
    // The registry retries after the restart: nothing changes.
    app.deliver(&env).await;
    let after = app.counts_at("period=week").await;
    assert_eq!(after["unique"], week["unique"]);
    assert_eq!(after["counters"], week["counters"]);
    // dev pushes again: one more event, still one unique user.
    app.deliver(&envelope(vec![push("e4", "acme/web/app", Some("v4"), Some(&dev))])).await;
    let later = app.counts_at("period=week").await;
    assert_eq!(later["unique"][PUSH_TAG_USER], 1);
    assert_eq!(later["counters"][PUSH_TAG_USER], 3);
    assert_eq!(later["unique"][PUSH_TAG_DT], 1);
}

#[tokio::test]
async fn bad_periods_dates_and_parameters_are_400() {
    let app = spawn_app().await;
    for query in [
        "period=year",
        "period=",
        "at=2026-02-30",
        "at=30.11.2026",
        "at=2026-11-30T00:00:00Z",
        "period=week&period=month",
        "peroid=week",
        "limit=10",
    ] {
        let response = app.read(&format!("/counts?{query}")).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains('`'), "{body}");
    }
    assert_eq!(app.read("/counts?period=month&at=2026-02-28").await.status(), 200);
}
