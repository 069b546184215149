//! `rgctl access` and `rgctl explain --as <deploy token>` against the example world, run as
//! the built binary.

// Test helpers: a failure here is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::Command;

fn example(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../policies/example").join(file)
}

fn rgctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rgctl"))
        .args(args)
        .arg("--bundle")
        .arg(example("bundle.json"))
        .arg("--principals")
        .arg(example("principals.json"))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// The cells of a table row starting with `head`, split at runs of two or more spaces.
fn row(text: &str, head: &str) -> Vec<String> {
    let line = text.lines().find(|l| l.starts_with(&format!("{head}  "))).unwrap_or_else(|| panic!("{head}: {text}"));
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect()
}

#[test]
fn who_may_pull_push_delete_a_repository() {
    let (ok, text, err) = rgctl(&["access", "--repository", "acme/web/app"]);
    assert!(ok, "{err}");
    let some = "some tags (rule web-release-tags)";
    let table: &[(&str, &str, [&str; 3])] = &[
        ("user root", "admin", ["yes", "yes", "yes"]),
        ("user alice", "owner (50)", ["yes", "yes", "yes"]),
        ("user mia", "maintainer (40)", ["yes", "yes", "yes"]),
        ("user dev", "developer (30)", ["yes", some, "no"]),
        ("user rita", "reporter (20)", ["yes", "no", "no"]),
        ("deploy token acme-ci", "group acme: read_registry, write_registry", ["yes", some, "no"]),
        ("deploy token deploy-token-2", "group acme: read_registry", ["yes", "no", "no"]),
        ("deploy token deploy-token-3", "project acme/web: read_registry, write_registry", ["yes", some, "no"]),
    ];
    for (head, standing, cells) in table {
        let mut want = vec![head.to_string(), standing.to_string()];
        want.extend(cells.iter().map(|c| c.to_string()));
        assert_eq!(row(&text, head), want, "{text}");
    }
    let no_access = text.lines().find(|l| l.starts_with("no access: ")).unwrap();
    for name in ["gus (", "olga (", "deploy-token-4 (", "deploy-token-5 (", "deploy-token-6 ("] {
        assert!(no_access.contains(name), "{name}: {text}");
    }
    assert!(text.contains("job scopes: jobs of acme/web (pull, push), as the user"), "{text}");
    assert_eq!(
        row(&text, "web-release-tags"),
        [
            "web-release-tags",
            "project acme/web",
            "acme/web/*",
            "^v[0-9]+",
            "maintainer or above",
            "maintainer or above",
            "enforced"
        ],
        "{text}"
    );
}

#[test]
fn what_a_principal_may_do_and_json() {
    let (ok, text, err) = rgctl(&["access", "--principal", "acme-ci"]);
    assert!(ok, "{err}");
    assert_eq!(row(&text, "acme/web")[2..], ["yes", "some (rule web-release-tags)", "no"], "{text}");
    assert_eq!(row(&text, "acme/platform/api")[2..], ["yes", "some (rule api-prod-maintainers)", "no"], "{text}");
    assert!(text.contains("no access: other/tools"), "{text}");

    let (ok, text, err) = rgctl(&["access", "--repository", "acme/web/app", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dev = v["principals"].as_array().unwrap().iter().find(|p| p["name"] == "dev").unwrap();
    assert_eq!(dev["push"]["verdict"], "some");
    assert_eq!(dev["push"]["rules"][0], "web-release-tags");
    assert_eq!(v["rules"][0]["id"], "web-release-tags");

    let (ok, _, err) = rgctl(&["access", "--principal", "nobody"]);
    assert!(!ok && err.contains("no user and no deploy token `nobody`"), "{err}");
    let (ok, _, err) = rgctl(&["access"]);
    assert!(!ok && err.contains("--repository"), "{err}");
}

#[test]
fn explain_accepts_deploy_tokens() {
    let (ok, text, err) = rgctl(&["explain", "--as", "acme-ci", "PUT", "/v2/acme/web/app/manifests/v1"]);
    assert!(ok, "{err}");
    assert!(text.starts_with("decision: DENY 403 DENIED\nrule: web-release-tags\n"), "{text}");
    assert!(text.contains("`acme-ci` is deploy token 1 of group `acme`"), "{text}");
    let (ok, text, err) = rgctl(&["explain", "--as", "acme-ci", "PUT", "/v2/acme/web/app/manifests/dev-1"]);
    assert!(ok && text.starts_with("decision: ALLOW"), "{err}{text}");
    let (ok, text, err) = rgctl(&["explain", "--as", "dev", "PUT", "/v2/acme/web/app/manifests/dev-1"]);
    assert!(ok && text.starts_with("decision: ALLOW"), "users still work: {err}{text}");
}
