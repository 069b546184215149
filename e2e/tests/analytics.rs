//! End to end: GitLab's weekly and monthly usage analytics. Real pushes through
//! Envoy, events attributed by the filter and verified by the consumer, which counts unique
//! users (by user id) and unique deploy tokens (by deploy-token id) per ISO week and calendar
//! month; the lifetime totals stay beside them, and everything survives a consumer restart.

use std::time::{Duration, Instant};

use registry_guard_e2e::{Stack, CONSUMER_READ_TOKEN};
use serde_json::{json, Value};

/// The example bundle without protection rules: dev, mia and the deploy token may push.
fn open_bundle(revision: u64) -> Value {
    let text = std::fs::read_to_string(registry_guard_e2e::root().join("policies/example/bundle.json")).unwrap();
    let mut b: Value = serde_json::from_str(&text).unwrap();
    b["revision"] = revision.into();
    b["protection_rules"] = json!([]);
    b
}

const PUSH_TAG_USER: &str = "i_container_registry_push_tag_user";
const PUSH_TAG_DT: &str = "i_container_registry_push_tag_deploy_token";
const CREATE_USER: &str = "i_container_registry_create_repository_user";
const CREATE_DT: &str = "i_container_registry_create_repository_deploy_token";

fn total(counts: &Value, name: &str) -> u64 {
    counts["counters"][name].as_u64().unwrap_or(0)
}

/// Polls `/counts` until the lifetime totals say `n` user and `m` deploy-token tag pushes.
fn wait_for_pushes(stack: &Stack, users: u64, deploy_tokens: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = stack.consumer_get("/counts");
        if total(&counts, PUSH_TAG_USER) >= users && total(&counts, PUSH_TAG_DT) >= deploy_tokens {
            return counts;
        }
        assert!(Instant::now() < deadline, "timed out waiting for the pushes; consumer has {counts:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn unique_users_and_deploy_tokens_per_week_and_month() {
    let mut stack = Stack::start();
    let b = stack.sign_bundle("open", &open_bundle(30));
    assert!(stack.push_bundle(&b, &[]).status.success());

    // dev pushes three tags, mia one, the deploy token acme-ci two; all to one repository.
    for (user, secret, tag) in [
        ("dev", "dev-pass", "v1"),
        ("dev", "dev-pass", "v2"),
        ("dev", "dev-pass", "v3"),
        ("mia", "mia-pass", "m1"),
        ("acme-ci", "gldt-acme-ci-rw", "ci-1"),
        ("acme-ci", "gldt-acme-ci-rw", "ci-2"),
    ] {
        let out = stack.push(user, secret, "acme/web/app", tag);
        assert!(out.status.success(), "{user} pushing {tag}: {}", registry_guard_e2e::stderr(&out));
    }
    let counts = wait_for_pushes(&stack, 4, 2);
    // The pushes' day (UTC), from the consumer's own rows: the week and month asked about.
    let events = stack.counts()["events"].as_array().unwrap().clone();
    let occurred = events.iter().find(|e| e["tag"] == "v1").unwrap()["occurred_at"].as_i64().unwrap();
    let day = time_to_day(occurred);

    let week = stack.consumer_get(&format!("/counts?period=week&at={day}"));
    let month = stack.consumer_get(&format!("/counts?period=month&at={day}"));
    eprintln!("GET /counts?period=week&at={day}\n{week:#}");
    eprintln!("GET /counts?period=month&at={day}\n{month:#}");
    for answer in [&week, &month] {
        let unique = &answer["unique"];
        assert_eq!(unique[PUSH_TAG_USER], 2, "dev (three tags) and mia: {answer:#}");
        assert_eq!(unique[PUSH_TAG_DT], 1, "acme-ci (two tags): {answer:#}");
        assert_eq!(unique[CREATE_USER].as_u64().unwrap() + unique[CREATE_DT].as_u64().unwrap(), 1, "{answer:#}");
        assert_eq!(total(answer, PUSH_TAG_USER), 4, "lifetime totals count events: {answer:#}");
        assert_eq!(total(answer, PUSH_TAG_DT), 2, "{answer:#}");
    }
    assert_eq!(counts["rejected"], 0);
    assert_eq!(counts["unattributed"], 0);

    // /counts needs the read token; /metrics is open and shows the current periods.
    let url = format!("http://127.0.0.1:{}/counts", stack.consumer_port);
    assert!(matches!(ureq::get(&url).call(), Err(ureq::Error::Status(401, _))));
    let wrong = ureq::get(&url).set("Authorization", &format!("Bearer {CONSUMER_READ_TOKEN}x")).call();
    assert!(matches!(wrong, Err(ureq::Error::Status(401, _))));
    let metrics =
        ureq::get(&format!("http://127.0.0.1:{}/metrics", stack.consumer_port)).call().unwrap().into_string().unwrap();
    for line in [
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_user",period="week"} 2"#,
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_user",period="month"} 2"#,
        r#"registry_guard_consumer_unique_actors{event="i_container_registry_push_tag_deploy_token",period="week"} 1"#,
        r#"registry_guard_consumer_events_total{event="i_container_registry_push_tag_user"} 4"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");
    }

    // A consumer restart keeps every count; dev pushing again adds an event, not a user.
    stack.stop_consumer();
    stack.start_consumer();
    assert_eq!(stack.consumer_get(&format!("/counts?period=week&at={day}")), week);
    assert!(stack.push("dev", "dev-pass", "acme/web/app", "v4").status.success());
    let after = wait_for_pushes(&stack, 5, 2);
    let week_after = stack.consumer_get(&format!("/counts?period=week&at={day}"));
    assert_eq!(week_after["unique"][PUSH_TAG_USER], 2, "{week_after:#}");
    assert_eq!(total(&after, PUSH_TAG_USER), 5);
}

/// `YYYY-MM-DD` (UTC) of unix seconds.
fn time_to_day(unix: i64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
