//! The decision corpus against the real filter in real Envoy: each case is sent as raw
//! HTTP/1.1 (so repeated `Authorization` headers reach Envoy as sent); a denial must be the
//! filter's local reply (`x-registry-guard: denied`) with the expected status, OCI code and
//! challenge, and an allowed case must have been forwarded to the registry.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use registry_guard_core::decide::corpus;
use registry_guard_core::token::testing::es256_key;
use registry_guard_e2e::Stack;

struct RawReply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

fn raw_request(port: u16, method: &str, path: &str, headers: &[(String, String)]) -> RawReply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to envoy");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || method == "PUT" || method == "PATCH" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly Content-Length bytes: Envoy delays closing the connection
    // after a local reply (delayed_close_timeout), so reading to EOF would wait for it.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if method == "HEAD" || buf.len() >= end + 4 + len {
                break;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawReply { status, headers, body: body.to_owned() }
}

#[test]
fn decision_corpus_against_real_envoy() {
    let stack = Stack::start();
    let trusted = stack.signing_key();
    let untrusted = es256_key(2);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let corpus = corpus::load(corpus::DECISIONS).unwrap();
    // Cases without a bundle first, then each bundle (pushed live) in revision order.
    let mut groups: Vec<Option<&String>> = vec![None];
    let mut named: Vec<&String> = corpus.bundles.keys().collect();
    named.sort_by_key(|n| corpus.bundles[*n]["revision"].as_u64());
    groups.extend(named.into_iter().map(Some));
    let mut failures = Vec::new();
    let mut replayed = 0;
    for group in groups {
        if let Some(name) = group {
            let signed = stack.sign_bundle(name, &corpus.bundles[name]);
            assert!(stack.push_bundle(&signed, &[]).status.success(), "push bundle `{name}`");
        }
        for case in corpus.cases.iter().filter(|c| c.bundle.as_ref() == group) {
            replayed += 1;
            let mut headers: Vec<(String, String)> = case
                .authorization(&trusted, &untrusted, now)
                .unwrap()
                .into_iter()
                .map(|v| ("Authorization".to_owned(), v))
                .collect();
            if let Some(ct) = &case.request.content_type {
                headers.push(("Content-Type".into(), ct.clone()));
            }
            let started = std::time::Instant::now();
            let r = raw_request(stack.envoy_port, &case.request.method, &case.request.path, &headers);
            let took = started.elapsed();
            let header = |name: &str| r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            let from_filter = header("x-registry-guard") == Some("denied");
            let result = if from_filter {
                let body: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
                let code = body["errors"][0]["code"].as_str().map(str::to_owned);
                case.check(r.status, code.as_deref(), header("www-authenticate"))
            } else if r.status == 0 || r.status >= 500 {
                Err(format!("case `{}`: no usable reply (status {})", case.name, r.status))
            } else {
                // Forwarded to the registry: the filter allowed it.
                case.check(200, None, None)
            };
            eprintln!(
                "{:<60} {} {} {took:?}",
                case.name,
                r.status,
                if from_filter { "(filter)" } else { "(registry)" }
            );
            if let Err(e) = result {
                failures.push(e);
            }
        }
    }
    assert_eq!(replayed, corpus.cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
