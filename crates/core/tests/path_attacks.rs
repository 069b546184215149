//! Path and request suite (issue 7): traversal and encoding tricks, names that contain
//! endpoint words, cross-repository mounts, upload ids and `_catalog` paging, against the
//! route grammar and the guard. The filter must refuse what could be read two ways and,
//! where it allows, name exactly the repository distribution 2.8 would act on.
//!
//! The filter runs behind Envoy with `normalize_path`, `merge_slashes` and escaped slashes
//! rejected (envoy/envoy.yaml), so most of these never reach it in production; the core is
//! tested on the raw strings so that it is safe on its own (e2e/tests/attacks.rs shows
//! what Envoy does first).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::request::route::classify;
use registry_guard_core::token::claims::{AccessClaim, Audience, RegistryClaims};
use registry_guard_core::token::sign::{sign, Validity};
use registry_guard_core::token::testing::{es256_key, jwks};
use serde_json::json;

const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const NOW: i64 = 1_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Refused by the route grammar with this status.
    Refused(u16),
    /// Classified, needing exactly these scopes.
    Scopes(&'static [&'static str]),
}
use Want::*;

fn check(method: &str, path: &str, content_type: Option<&str>) -> Result<Vec<String>, u16> {
    classify(method, path, content_type).map(|r| r.scopes.iter().map(|s| s.to_string()).collect()).map_err(|e| e.status)
}

fn run(cases: &[(&str, String, Option<&str>, Want)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (method, path, ct, want) in cases {
        let got = std::panic::catch_unwind(|| check(method, path, *ct));
        let ok = match (&got, want) {
            (Err(_), _) => false,
            (Ok(Err(s)), Refused(w)) => s == w,
            (Ok(Ok(scopes)), Scopes(w)) => scopes == w,
            _ => false,
        };
        if !ok {
            failures.push(format!("{method} {path:?} (content-type {ct:?}): want {want:?}, got {got:?}"));
        }
    }
    failures
}

fn traversal_and_encoding() -> Vec<(&'static str, String, Option<&'static str>, Want)> {
    let mut v: Vec<(&str, String, Option<&str>, Want)> = Vec::new();
    let mut add = |m: &'static str, p: &str, w: Want| v.push((m, p.to_owned(), None, w));
    // Dot segments, raw and encoded (Envoy resolves them first; the filter never guesses).
    for p in [
        "/v2/acme/../other/secret/manifests/v1",
        "/v2/acme/web/../../other/secret/manifests/v1",
        "/v2/../v2/other/secret/manifests/v1",
        "/v2/acme/./web/manifests/v1",
        "/v2/acme/web/manifests/..",
        "/v2/acme/web/manifests/.",
        "/v2/acme/web/blobs/uploads/..",
        "/v2/./",
        "/v2/..",
    ] {
        add("GET", p, Refused(400));
    }
    // Percent-encoding anywhere in the path: distribution decodes before routing, so an
    // encoded byte could change the repository; refused rather than decoded twice.
    for p in [
        "/v2/acme%2Fweb/manifests/v1",
        "/v2/acme%2fweb/manifests/v1",
        "/v2/acme/web%2F..%2F..%2Fother/manifests/v1",
        "/v2/acme/%2e%2e/other/manifests/v1",
        "/v2/acme/%2E%2E/other/manifests/v1",
        "/v2/acme/.%2e/other/manifests/v1",
        "/v2/acme%5Cweb/manifests/v1",
        "/v2/acme%5cweb/manifests/v1",
        "/v2/%61cme/web/manifests/v1",
        "/v2/acme/web/manifests/v1%00",
        "/v2/acme/web/manifests/%76%31",
        "/v2/acme/web/manifests/v1%",
        "/v2/acme/web/manifests/v1%zz",
        "/v2%2F_catalog",
        "/v2/acme/web/%6danifests/v1",
    ] {
        add("GET", p, Refused(400));
    }
    // Empty segments, backslashes, parameters, fragments, whitespace and control bytes.
    for p in [
        "/v2/acme//web/manifests/v1",
        "//v2/acme/web/manifests/v1",
        "/v2//acme/web/manifests/v1",
        "/v2/acme/web//manifests/v1",
        "/v2/acme/web/manifests//v1",
        "/v2/acme/web/blobs/uploads//",
        "/v2/acme\\web/manifests/v1",
        "/v2/acme/web\\..\\..\\other/manifests/v1",
        "/v2/acme;x=y/web/manifests/v1",
        "/v2/acme/web/manifests/v1;x=y",
        "/v2/acme/web/manifests;/v1",
        "/v2/acme/web/manifests/v1#frag",
        "/v2/acme/web#/../../other/manifests/v1",
        "/v2/acme/web/manifests/v 1",
        "/v2/acme/web/manifests/v1\t",
        "/v2/acme/web/manifests/v1\0",
        "/v2/acme/web/manifests/v1\r\nX-Injected: 1",
        "/v2/acmé/web/manifests/v1",
        "/v2/acme/web/manifests/v1\u{200b}",
        "v2/acme/web/manifests/v1",
        "",
        "http://127.0.0.1/v2/acme/web/manifests/v1",
    ] {
        add("GET", p, Refused(400));
    }
    // Case: names are lowercase; endpoint words and the prefix are case-sensitive.
    add("GET", "/v2/Acme/web/manifests/v1", Refused(400));
    add("GET", "/v2/acme/WEB/manifests/v1", Refused(400));
    add("GET", "/v2/acme/web/MANIFESTS/v1", Refused(404));
    add("GET", "/v2/acme/web/Blobs/sha256:aaaa", Refused(404));
    add("GET", "/V2/acme/web/manifests/v1", Refused(404));
    add("GET", "/v2/_CATALOG", Refused(404));
    add("GET", "/v2/acme/web/manifests/V1", Scopes(&["repository:acme/web:pull"]));
    // Not digest-shaped (go-digest: lowercase algorithm): 404 as distribution answers.
    add("GET", &format!("/v2/acme/web/blobs/{}", D.to_uppercase()), Refused(404));
    add("GET", &format!("/v2/acme/web/blobs/{}", D.replacen("sha256", "SHA256", 1)), Refused(404));
    // Methods.
    for m in ["get", "Get", "TRACE", "OPTIONS", "CONNECT", "PROPFIND", ""] {
        add(m, "/v2/acme/web/manifests/v1", Refused(405));
    }
    add("HEAD", "/v2/acme/web/blobs/uploads/", Refused(405));
    add("GET", "/v2/acme/web/blobs/uploads/", Refused(405));
    add("POST", "/v2/acme/web/manifests/v1", Refused(405));
    add("PATCH", &format!("/v2/acme/web/blobs/{D}"), Refused(405));
    add("POST", "/v2/_catalog", Refused(405));
    add("DELETE", "/v2/acme/web/tags/list", Refused(405));
    // Prefix and shape.
    add("GET", "/v2", Refused(404));
    add("GET", "/v1/acme/web/manifests/v1", Refused(404));
    add("GET", "/v2/acme/web/manifests/", Refused(404));
    add("GET", "/v2/acme/web/manifests/v1/", Refused(404));
    add("GET", "/v2/acme/web/", Refused(404));
    add("GET", "/v2/acme", Refused(404));
    add("GET", "/v2/_catalog/", Refused(404));
    add("GET", "/v2/acme/_catalog", Refused(404));
    add("GET", "/v2/acme/web/tags/list/", Refused(404));
    add("GET", "/v2/acme/web/tags", Refused(404));
    add("GET", "/v2/acme/web/blobs/uploads", Refused(404));
    v
}

fn names() -> Vec<(&'static str, String, Option<&'static str>, Want)> {
    let mut v: Vec<(&str, String, Option<&str>, Want)> = Vec::new();
    let mut add = |m: &'static str, p: String, w: Want| v.push((m, p, None, w));
    // 255 bytes is the limit, in one component or many.
    let n255 = "a".repeat(255);
    let n256 = "a".repeat(256);
    let multi255 = format!("{}/{}", "b".repeat(127), "c".repeat(127));
    let multi256 = format!("{}/{}", "b".repeat(128), "c".repeat(127));
    assert_eq!((multi255.len(), multi256.len()), (255, 256));
    add("GET", format!("/v2/{n255}/manifests/v1"), Scopes(leak(format!("repository:{n255}:pull"))));
    add("GET", format!("/v2/{n256}/manifests/v1"), Refused(400));
    add("GET", format!("/v2/{multi255}/tags/list"), Scopes(leak(format!("repository:{multi255}:pull"))));
    add("GET", format!("/v2/{multi256}/tags/list"), Refused(400));
    add("POST", format!("/v2/{n256}/blobs/uploads/"), Refused(400));
    add("GET", format!("/v2/{}/manifests/v1", "a/".repeat(5000) + "a"), Refused(400));
    add("GET", format!("/v2/a/manifests/{}", "t".repeat(128)), Scopes(&["repository:a:pull"]));
    add("GET", format!("/v2/a/manifests/{}", "t".repeat(129)), Refused(404));
    // Endpoint words as name components: the endpoint is read from the end, as
    // distribution's router does (its name pattern is greedy and the suffix is anchored).
    add("GET", "/v2/a/blobs/b/manifests/latest".into(), Scopes(&["repository:a/blobs/b:pull"]));
    add("GET", "/v2/a/manifests/b/manifests/latest".into(), Scopes(&["repository:a/manifests/b:pull"]));
    add("PUT", "/v2/a/manifests/b/manifests/latest".into(), Scopes(&["repository:a/manifests/b:pull,push"]));
    add("GET", format!("/v2/a/manifests/blobs/{D}"), Scopes(&["repository:a/manifests:pull"]));
    add("DELETE", format!("/v2/a/manifests/blobs/{D}"), Scopes(&["repository:a/manifests:delete"]));
    add("GET", "/v2/a/manifests/tags/list".into(), Scopes(&["repository:a/manifests:pull"]));
    add("GET", "/v2/a/tags/list/tags/list".into(), Scopes(&["repository:a/tags/list:pull"]));
    add("GET", "/v2/a/tags/list/manifests/v1".into(), Scopes(&["repository:a/tags/list:pull"]));
    add("POST", "/v2/a/blobs/blobs/uploads/".into(), Scopes(&["repository:a/blobs:pull,push"]));
    add("POST", "/v2/a/blobs/uploads/blobs/uploads/".into(), Scopes(&["repository:a/blobs/uploads:pull,push"]));
    add("PATCH", "/v2/a/blobs/uploads/blobs/uploads/u1".into(), Scopes(&["repository:a/blobs/uploads:pull,push"]));
    add("GET", "/v2/a/blobs/uploads/manifests/v1".into(), Scopes(&["repository:a/blobs/uploads:pull"]));
    add("GET", "/v2/a/referrers/referrers/".to_owned() + D, Scopes(&["repository:a/referrers:pull"]));
    add("GET", "/v2/blobs/manifests/v1".into(), Scopes(&["repository:blobs:pull"]));
    add("GET", "/v2/manifests/manifests/manifests".into(), Scopes(&["repository:manifests:pull"]));
    // Not a digest after `blobs`: no reading of `blobs/<x>` as part of a tag.
    add("GET", "/v2/a/blobs/latest".into(), Refused(404));
    add("GET", "/v2/a/blobs/uploads/sha256:x".into(), Refused(404));
    // Grammar corners of names.
    for bad in ["a..b", "a___b", "-a", "a-", "a.", ".a", "_a", "a/_b", "a/.b", "a/-b", "é"] {
        add("GET", format!("/v2/{bad}/manifests/v1"), Refused(400));
    }
    for good in ["a__b", "a---b", "a.b", "a_b/c-d/e.f", "0/1"] {
        add("GET", format!("/v2/{good}/manifests/v1"), Scopes(leak(format!("repository:{good}:pull"))));
    }
    v
}

/// `Scopes` needs `'static` strings; the suite is built once per test run.
fn leak(s: String) -> &'static [&'static str] {
    Box::leak(vec![&*Box::leak(s.into_boxed_str())].into_boxed_slice())
}

fn mounts_uploads_catalog() -> Vec<(&'static str, String, Option<&'static str>, Want)> {
    let mut v: Vec<(&str, String, Option<&str>, Want)> = Vec::new();
    let mut add = |m: &'static str, p: String, ct: Option<&'static str>, w: Want| v.push((m, p, ct, w));
    let up = "/v2/acme/web/blobs/uploads/";
    const MOUNT: &[&str] = &["repository:acme/web:pull,push", "repository:other/secret:pull"];
    const PUSH: &[&str] = &["repository:acme/web:pull,push"];
    add("POST", format!("{up}?mount={D}&from=other/secret"), None, Scopes(MOUNT));
    add("POST", format!("{up}?from=other/secret&mount={D}"), None, Scopes(MOUNT));
    add("POST", format!("{up}?mount={D}&from=other%2Fsecret"), None, Scopes(MOUNT));
    add("POST", format!("{up}?mount={D}&fr%6Fm=other/secret"), None, Scopes(MOUNT));
    add("POST", format!("{up}?mount={D}&from=other/secret&From=acme/web"), None, Scopes(MOUNT));
    // `from` without `mount`: distribution does not mount, but the scope is still asked.
    add("POST", format!("{up}?from=other/secret"), None, Scopes(MOUNT));
    add("POST", format!("{up}?mount={D}&from=acme/web"), None, Scopes(PUSH));
    add("POST", format!("{up}?mount={D}"), None, Scopes(PUSH));
    // Repeated or ambiguous: refused (Go's `FormValue` takes the first, others the last).
    add("POST", format!("{up}?mount={D}&from=acme/web&from=other/secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other/secret&from=other/secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=acme/web&fr%6fm=other/secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&mount={D}&from=other/secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other/secret;from=acme/web"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from="), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=Other/Secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other/../acme/web"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other%2F..%2Facme"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other/secret%00"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from=other/secret%"), None, Refused(400));
    add("POST", format!("{up}?mount=sha256:xyz&from=other/secret"), None, Refused(400));
    add("POST", format!("{up}?mount={D}&from={}", "a".repeat(256)), None, Refused(400));
    // `from` in a form body: distribution's `r.FormValue` prefers the body, which a
    // header-only filter cannot read, so any form body on upload start is refused.
    for ct in [
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-8",
        "Application/X-WWW-Form-Urlencoded",
        "  application/x-www-form-urlencoded  ",
        "multipart/form-data; boundary=x",
        "MULTIPART/FORM-DATA",
        // Several values joined (how Envoy merges a repeated Content-Type): refused if any is a form.
        "application/octet-stream, application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded,application/octet-stream",
    ] {
        add("POST", format!("{up}?mount={D}&from=acme/web"), Some(ct), Refused(400));
        add("POST", up.to_owned(), Some(ct), Refused(400));
    }
    add("POST", up.to_owned(), Some("application/octet-stream"), Scopes(PUSH));
    add("POST", up.to_owned(), Some(""), Scopes(PUSH));
    // Upload sessions: the id is opaque to the filter; every use needs push on the
    // repository in the path. Distribution binds the session to its repository (HMAC'd
    // `_state` names it), so an id reused under another repository fails there.
    let id = "0e0b2c3a-1d2e-4f5a-9b8c-7d6e5f4a3b2c";
    for m in ["GET", "PATCH", "PUT", "DELETE"] {
        add(
            m,
            format!("/v2/other/secret/blobs/uploads/{id}?_state=x"),
            None,
            Scopes(&["repository:other/secret:pull,push"]),
        );
    }
    add(
        "PUT",
        format!("/v2/other/secret/blobs/uploads/{id}?digest={D}&mount={D}&from=acme/web"),
        None,
        Scopes(&["repository:other/secret:pull,push"]),
    );
    add("POST", format!("/v2/other/secret/blobs/uploads/{id}"), None, Refused(405));
    add("PATCH", "/v2/other/secret/blobs/uploads/a:b".into(), None, Refused(404));
    add("PATCH", format!("/v2/other/secret/blobs/uploads/{}", "u".repeat(257)), None, Refused(404));
    // `_catalog`: paging is the registry's to validate (2.8.2 refuses `n` over its limit).
    for q in ["", "?n=10", "?n=100000000000000000000000", "?n=-1", "?n=abc", "?n=1&n=2", "?last=zzz&n=1"] {
        add("GET", format!("/v2/_catalog{q}"), None, Scopes(&["registry:catalog:*"]));
    }
    v
}

#[test]
fn path_and_request_cases() {
    let mut cases = traversal_and_encoding();
    cases.extend(names());
    cases.extend(mounts_uploads_catalog());
    let failures = run(&cases);
    eprintln!("path attacks: {} cases, {} failures", cases.len(), failures.len());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

fn token(grants: &[(&str, &[&str])]) -> String {
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "mallory".into(),
        aud: Audience::One("container_registry".into()),
        jti: "j".into(),
        access: grants
            .iter()
            .map(|(name, actions)| AccessClaim {
                resource_type: "repository".into(),
                name: (*name).into(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
                meta: None,
            })
            .collect(),
        auth_type: None,
        user: None,
        extra: Default::default(),
    };
    sign(&es256_key(1), claims, Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 300 }).unwrap()
}

#[test]
fn the_guard_never_allows_another_repository() {
    let cfg = json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry", "issuer": "registry-guard",
        "leeway_seconds": 0, "jwks": jwks(&[&es256_key(1)]),
    });
    let mut g = Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap());
    let t = format!("Bearer {}", token(&[("acme/web", &["pull", "push", "delete"])]));
    let mut status = |m: &str, p: &str, ct: Option<&str>| g.check(m, p, ct, &[&t], NOW).decision.status();
    // Every traversal/encoding case that names another repository is refused even with a
    // token holding everything on acme/web.
    let mut refused = 0;
    for (m, p, ct, want) in traversal_and_encoding() {
        if let Refused(code) = want {
            assert_eq!(status(m, &p, ct), code, "{m} {p:?}");
            refused += 1;
        }
    }
    assert!(refused > 60);
    let up = "/v2/acme/web/blobs/uploads/";
    assert_eq!(status("POST", up, None), 200);
    assert_eq!(status("POST", &format!("{up}?mount={D}&from=acme/web"), None), 200);
    // Mount without pull on `from`: insufficient scope (401 with a challenge naming it).
    assert_eq!(status("POST", &format!("{up}?mount={D}&from=other/secret"), None), 401);
    assert_eq!(status("POST", &format!("{up}?from=other/secret"), None), 401);
    assert_eq!(status("POST", &format!("{up}?mount={D}&from=acme/web&from=other/secret"), None), 400);
    assert_eq!(status("POST", up, Some("application/x-www-form-urlencoded")), 400);
    // An upload id under another repository needs push there.
    assert_eq!(status("PUT", &format!("/v2/other/secret/blobs/uploads/abc?digest={D}"), None), 401);
    assert_eq!(status("PUT", &format!("/v2/acme/web/blobs/uploads/abc?digest={D}"), None), 200);
    // Catalog needs the catalog scope whatever `n` is.
    assert_eq!(status("GET", "/v2/_catalog?n=100000000000000000000", None), 401);
    // With pull on the source, the mount is allowed.
    let t2 = format!("Bearer {}", token(&[("acme/web", &["pull", "push"]), ("other/secret", &["pull"])]));
    assert!(g.check("POST", &format!("{up}?mount={D}&from=other/secret"), None, &[&t2], NOW).decision.is_allow());
}
