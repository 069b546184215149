//! One route grammar: Envoy's dependency-proxy route (`envoy/envoy.yaml`) and the
//! filter's classification must agree for every name, including names whose components
//! include `dependency_proxy`, `containers` and the endpoint words. This test reads the two
//! regexes out of the committed Envoy configuration, replays them (RE2 syntax, which the
//! `regex` crate shares for these patterns) on generated paths, and compares with the core.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use registry_guard_core::policy::deploy::dependency_proxy_group;
use registry_guard_core::request::route::classify;

const ENVOY_YAML: &str = include_str!("../../../envoy/envoy.yaml");

/// The `regex:` strings of the dependency-proxy route: (match, rewrite pattern, substitution).
fn envoy_dependency_proxy_route() -> (regex::bytes::Regex, regex::bytes::Regex, String) {
    let regex_after = |marker: &str, from: usize| -> (String, usize) {
        let at = ENVOY_YAML[from..].find(marker).map(|i| i + from).expect("marker in envoy.yaml");
        let start = at + marker.len();
        let rest = &ENVOY_YAML[start..];
        let open = rest.find('"').expect("opening quote") + 1;
        let close = rest[open..].find('"').expect("closing quote") + open;
        (rest[open..close].replace("\\\\", "\\"), start + close)
    };
    let route = ENVOY_YAML.find("cluster: dependency_proxy").expect("dependency proxy route");
    // The match precedes the cluster; the rewrite follows it.
    let match_at = ENVOY_YAML[..route].rfind("safe_regex:").expect("safe_regex before the route");
    let (matcher, _) = regex_after("regex:", match_at);
    let (pattern, after) = regex_after("regex:", route);
    let (substitution, _) = regex_after("substitution:", after);
    let build = |p: &str| regex::bytes::RegexBuilder::new(p).unicode(false).build().expect("RE2 pattern");
    (build(&matcher), build(&pattern), substitution)
}

/// RE2-style substitution (`\1`) of the first match.
fn rewrite(pattern: &regex::bytes::Regex, substitution: &str, path: &str) -> Option<String> {
    let caps = pattern.captures(path.as_bytes())?;
    let mut out = String::new();
    let mut chars = substitution.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                chars.next();
                out.push_str(std::str::from_utf8(caps.get(d as usize)?.as_bytes()).ok()?);
                continue;
            }
        }
        out.push(c);
    }
    Some(out)
}

fn names() -> Vec<String> {
    const WORDS: [&str; 8] = ["acme", "dependency_proxy", "containers", "manifests", "blobs", "tags", "x", "uploads"];
    let mut out: Vec<String> = WORDS.iter().map(|w| w.to_string()).collect();
    let mut frontier = out.clone();
    for _ in 0..3 {
        let mut next = Vec::new();
        for n in &frontier {
            for w in WORDS {
                next.push(format!("{n}/{w}"));
            }
        }
        out.extend(next.iter().cloned());
        frontier = next;
    }
    out
}

#[test]
fn envoy_dependency_proxy_route_and_core_classification_agree() {
    let (matcher, pattern, substitution) = envoy_dependency_proxy_route();
    let digest = format!("sha256:{}", "a".repeat(64));
    let suffixes = [
        ("GET", "manifests/latest".to_owned()),
        ("GET", format!("manifests/{digest}")),
        ("HEAD", format!("blobs/{digest}")),
        ("GET", "tags/list".to_owned()),
        ("GET", format!("referrers/{digest}")),
        ("POST", "blobs/uploads/".to_owned()),
        ("PATCH", "blobs/uploads/abc-123".to_owned()),
    ];
    let (mut checked, mut proxied) = (0, 0);
    for name in names() {
        for (method, suffix) in &suffixes {
            let path = format!("/v2/{name}/{suffix}");
            let envoy_proxies = matcher.is_match(path.as_bytes());
            let Ok(route) = classify(method, &path, None) else {
                // The filter refuses it: nothing is routed anywhere.
                continue;
            };
            checked += 1;
            let repo = route.endpoint.repository().expect("a repository route");
            let core_proxies = dependency_proxy_group(repo).is_some();
            assert_eq!(envoy_proxies, core_proxies, "{method} {path}: Envoy {envoy_proxies}, core {core_proxies}");
            if core_proxies {
                proxied += 1;
                let group = dependency_proxy_group(repo).unwrap_or_default();
                let image = &repo[group.len() + "/dependency_proxy/containers/".len()..];
                let rewritten = rewrite(&pattern, &substitution, &path).expect("rewrite matches");
                assert_eq!(rewritten, format!("/v2/{image}/{suffix}"), "{path}");
            }
        }
    }
    assert!(checked > 5_000 && proxied > 300, "checked {checked}, proxied {proxied}");
}

#[test]
fn names_ending_in_the_marker_are_refused() {
    // Envoy would route this to the dependency proxy as `/v2/manifests/latest`.
    let e = classify("GET", "/v2/acme/dependency_proxy/containers/manifests/latest", None).unwrap_err();
    assert_eq!((e.status, e.code), (400, "NAME_INVALID"));
    // With an image after the marker, both agree on the dependency proxy.
    let r = classify("GET", "/v2/acme/dependency_proxy/containers/manifests/manifests/latest", None).unwrap();
    assert_eq!(r.endpoint.repository(), Some("acme/dependency_proxy/containers/manifests"));
    // A name that only starts with the marker is a plain repository for both.
    assert!(classify("GET", "/v2/dependency_proxy/containers/manifests/latest", None).is_ok());
}
