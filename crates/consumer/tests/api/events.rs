//! Classification and counting, as GitLab's usage metrics define them.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_user_pushing_a_tag_counts_push_tag_and_create_repository() {
    let app = spawn_app().await;
    let jwt = dev_jwt();
    let report = app.deliver(&envelope(vec![push("e1", "acme/web/app", Some("v1"), Some(&jwt))])).await;
    assert_eq!(report["counted"], 1);
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({"i_container_registry_create_repository_user": 1, "i_container_registry_push_tag_user": 1})
    );
    assert_eq!((counts["rejected"].clone(), counts["unattributed"].clone()), (json!(0), json!(0)));
    let e = row(&counts, "e1");
    assert_eq!(e["action"], "push");
    assert_eq!(e["repository"], "acme/web/app");
    assert_eq!(e["tag"], "v1");
    assert_eq!(e["outcome"], "counted");
    assert_eq!(e["token_type"], "password");
    assert_eq!(e["username"], "dev");
    assert_eq!(e["user_id"], 5);
    assert_eq!(e["deploy_token_id"], json!(null));
    assert_eq!(e["request_id"], "rid-e1");
    assert!(e["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(e["received_at"].as_i64().unwrap() >= now() - 60);
    assert_eq!(
        e["counted"],
        json!(["i_container_registry_push_tag_user", "i_container_registry_create_repository_user"])
    );
}

#[tokio::test]
async fn a_deploy_token_pushing_a_tag_counts_as_deploy_token() {
    let app = spawn_app().await;
    let jwt = deploy_jwt();
    app.deliver(&envelope(vec![push("e1", "acme/web/app", Some("v1"), Some(&jwt))])).await;
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({"i_container_registry_create_repository_deploy_token": 1, "i_container_registry_push_tag_deploy_token": 1})
    );
    let e = row(&counts, "e1");
    assert_eq!(e["token_type"], "deploy_token");
    assert_eq!(e["username"], "acme-ci");
    assert_eq!(e["deploy_token_id"], 1);
    assert_eq!(e["user_id"], json!(null));
}

#[tokio::test]
async fn tags_digests_and_the_first_push_of_each_repository() {
    let app = spawn_app().await;
    let (dev, ci, rita) = (dev_jwt(), deploy_jwt(), rita_jwt());
    app.deliver(&envelope(vec![
        push("e1", "acme/web/app", Some("v1"), Some(&dev)),
        push("e2", "acme/web/app", Some("v2"), Some(&ci)),
        // Pushed by digest: no tag.
        push("e3", "acme/platform/db", None, Some(&rita)),
    ]))
    .await;
    // A later envelope: the repository is not new any more.
    app.deliver(&envelope(vec![push("e4", "acme/platform/db", Some("v1"), Some(&ci))])).await;
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({
            "i_container_registry_create_repository_user": 2,
            "i_container_registry_push_repository_user": 1,
            "i_container_registry_push_tag_deploy_token": 2,
            "i_container_registry_push_tag_user": 1,
        })
    );
    let ids: Vec<&str> = counts["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["e1", "e2", "e3", "e4"], "events in arrival order");
    assert_eq!(row(&counts, "e3")["token_type"], "pat");
    assert_eq!(row(&counts, "e3")["tag"], json!(null));
    assert_eq!(row(&counts, "e3")["counted"][0], "i_container_registry_push_repository_user");
    assert_eq!(row(&counts, "e4")["counted"], json!(["i_container_registry_push_tag_deploy_token"]));
}

#[tokio::test]
async fn deletes_count_delete_tag_and_delete_repository_but_never_create() {
    let app = spawn_app().await;
    let (dev, ci) = (dev_jwt(), deploy_jwt());
    app.deliver(&envelope(vec![
        delete("d1", "acme/web/app", Some("v1"), Some(&dev)),
        delete("d2", "acme/web/app", None, Some(&ci)),
    ]))
    .await;
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({"i_container_registry_delete_repository_deploy_token": 1, "i_container_registry_delete_tag_user": 1})
    );
    assert_eq!(row(&counts, "d1")["username"], "dev");
    assert_eq!(row(&counts, "d2")["username"], "acme-ci");
    // Deletes do not make a repository "seen": the first push after them creates it.
    app.deliver(&envelope(vec![push("p1", "acme/web/app", Some("v1"), Some(&dev))])).await;
    assert_eq!(app.snapshot().await["counters"]["i_container_registry_create_repository_user"], 1);
}

#[tokio::test]
async fn blob_events_and_pulls_are_recorded_but_never_counted() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    let report = app
        .deliver(&envelope(vec![
            blob_push("b1", "acme/web/app", Some(&dev)),
            event("b2", "push", Some("application/octet-stream"), "acme/web/app", None, Some(&dev)),
            event("m1", "pull", Some(MANIFEST), "acme/web/app", Some("v1"), Some(&dev)),
            event("b3", "mount", Some(LAYER), "acme/web/app", None, Some(&dev)),
        ]))
        .await;
    assert_eq!(report["ignored"], 4);
    let counts = app.snapshot().await;
    assert_eq!(counts["counters"], json!({}));
    assert_eq!(counts["ignored"], 4);
    assert_eq!(counts["unattributed"], 0);
    let b1 = row(&counts, "b1");
    assert_eq!(b1["outcome"], "ignored");
    assert_eq!(b1["counted"], json!([]));
    assert_eq!(b1["username"], "dev", "who pushed the blob is still recorded");
    assert!(b1["reason"].as_str().unwrap().starts_with("blob event"));
    // Blob pushes did not make the repository "seen": the manifest push creates it.
    app.deliver(&envelope(vec![
        blob_push("b4", "acme/web/app", None),
        push("m2", "acme/web/app", Some("v1"), Some(&dev)),
    ]))
    .await;
    let counts = app.snapshot().await;
    assert_eq!(
        counts["counters"],
        json!({"i_container_registry_create_repository_user": 1, "i_container_registry_push_tag_user": 1})
    );
    assert_eq!(counts["unattributed"], 0, "an unattributed blob is not an unattributed usage event");
    assert_eq!(counts["ignored"], 5);
}

#[tokio::test]
async fn a_redelivered_envelope_counts_once() {
    let app = spawn_app().await;
    let (dev, ci) = (dev_jwt(), deploy_jwt());
    let env = envelope(vec![
        blob_push("b1", "acme/web/app", Some(&ci)),
        push("e1", "acme/web/app", Some("v1"), Some(&ci)),
        delete("e2", "acme/web/app", Some("old"), Some(&dev)),
        push("e3", "acme/web/app", Some("v2"), None),
    ]);
    app.deliver(&env).await;
    let first = app.snapshot().await;
    let report = app.deliver(&env).await;
    assert_eq!(report["duplicates"], 4);
    assert_eq!(report["counted"], 0);
    let second = app.snapshot().await;
    assert_eq!(second["counters"], first["counters"]);
    assert_eq!(second["events"], first["events"]);
    assert_eq!(second["duplicates"], 4);
    assert_eq!(second["unattributed"], 1, "the unattributed event is not tallied twice");
    assert_eq!(second["ignored"], 1);
    // The same id twice in one envelope.
    app.deliver(&envelope(vec![
        push("e9", "acme/x", Some("v1"), Some(&dev)),
        push("e9", "acme/x", Some("v1"), Some(&dev)),
    ]))
    .await;
    let third = app.snapshot().await;
    assert_eq!(third["counters"]["i_container_registry_push_tag_user"], 1);
    assert_eq!(third["duplicates"], 5);
}

#[tokio::test]
async fn a_tampered_or_foreign_user_jwt_is_rejected_and_never_counted() {
    let app = spawn_app().await;
    let tampered = tamper(&deploy_jwt());
    let stranger = user_jwt_with(
        &registry_guard_core::token::testing::es256_key(2),
        "x",
        json!({"token_type": "pat", "username": "root", "user_id": 1}),
        now() + 300,
    );
    let report = app
        .deliver(&envelope(vec![
            push("t1", "acme/web/app", Some("v1"), Some(&tampered)),
            push("t2", "acme/web/app", Some("v1"), Some(&stranger)),
            push("t3", "acme/web/app", Some("v1"), Some("not-a-jwt")),
        ]))
        .await;
    assert_eq!(report["rejected"], 3);
    let counts = app.snapshot().await;
    assert_eq!(counts["counters"], json!({}));
    assert_eq!(counts["rejected"], 3);
    let t1 = row(&counts, "t1");
    assert_eq!(t1["outcome"], "rejected");
    assert_eq!(t1["username"], json!(null), "the forged identity is not recorded");
    assert_eq!(t1["token_type"], json!(null));
    assert!(t1["reason"].as_str().unwrap().contains("signature"), "{t1}");
    assert!(row(&counts, "t2")["reason"].as_str().unwrap().contains("unknown key"));
    // A rejected push does not make the repository "seen".
    let dev = dev_jwt();
    app.deliver(&envelope(vec![push("ok", "acme/web/app", Some("v1"), Some(&dev))])).await;
    assert_eq!(app.snapshot().await["counters"]["i_container_registry_create_repository_user"], 1);
}

#[tokio::test]
async fn expiry_is_checked_with_the_delivery_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = write_inputs(dir.path());
    settings.tolerance_seconds = 600;
    let app = spawn_with(dir, settings).await;
    let info = json!({"token_type": "password", "username": "dev", "user_id": 5});
    let late = user_jwt_with(&signing_key(), "late", info.clone(), now() - 300);
    let too_late = user_jwt_with(&signing_key(), "too-late", info, now() - 3600);
    app.deliver(&envelope(vec![
        push("late", "acme/web/app", Some("v1"), Some(&late)),
        push("too-late", "acme/web/app", Some("v2"), Some(&too_late)),
    ]))
    .await;
    let counts = app.snapshot().await;
    assert_eq!(counts["counters"]["i_container_registry_push_tag_user"], 1);
    assert_eq!(counts["rejected"], 1);
    assert!(row(&counts, "too-late")["reason"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn an_event_without_actor_user_is_unattributed() {
    let app = spawn_app().await;
    let mut e = push("u1", "acme/web/app", Some("v1"), None);
    e["actor"] = json!({"name": "registry-said-so"});
    let report = app.deliver(&envelope(vec![e, push("u2", "acme/web/app", None, None)])).await;
    assert_eq!(report["unattributed"], 2);
    let counts = app.snapshot().await;
    assert_eq!(counts["counters"], json!({}));
    assert_eq!(counts["unattributed"], 2);
    assert_eq!(row(&counts, "u1")["outcome"], "unattributed");
    assert_eq!(row(&counts, "u1")["username"], json!(null));
}

#[tokio::test]
async fn events_without_an_id_are_tallied_as_invalid_and_the_rest_recorded() {
    let app = spawn_app().await;
    let dev = dev_jwt();
    let mut no_id = push("x", "acme/web/app", Some("v1"), Some(&dev));
    no_id.as_object_mut().unwrap().remove("id");
    let report =
        app.deliver(&envelope(vec![json!("junk"), no_id, push("ok", "acme/web/app", Some("v1"), Some(&dev))])).await;
    assert_eq!(report["invalid"], 2);
    let counts = app.snapshot().await;
    assert_eq!(counts["invalid"], 2);
    assert_eq!(counts["counters"]["i_container_registry_push_tag_user"], 1);
    assert_eq!(counts["events"].as_array().unwrap().len(), 1);
}
