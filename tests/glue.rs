//! The filter glue against a fake host: headers in, decision out, local replies recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic, clippy::type_complexity)]

use std::cell::RefCell;

use registry_guard::host::Host;
use registry_guard::{on_request_headers, Outcome};
use registry_guard_core::config::FilterConfig;
use registry_guard_core::guard::Guard;
use registry_guard_core::token::testing::{es256_key, jwks};
use registry_guard_core::token::{sign, AccessClaim, Audience, RegistryClaims, Validity};

const NOW: i64 = 1_800_000_000;

#[derive(Default)]
struct FakeHost {
    headers: Vec<(String, String)>,
    fail_headers: bool,
    replies: Vec<(u16, Vec<(String, String)>, String)>,
}

impl FakeHost {
    fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    fn request(method: &str, path: &str) -> Self {
        FakeHost::default().with_header(":method", method).with_header(":path", path)
    }
}

impl Host for FakeHost {
    fn request_headers(&mut self) -> Result<Vec<(String, String)>, String> {
        if self.fail_headers {
            return Err("InternalFailure".into());
        }
        Ok(self.headers.clone())
    }
    fn now_unix_seconds(&mut self) -> Result<i64, String> {
        Ok(NOW)
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), String> {
        let h = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.replies.push((status, h, String::from_utf8_lossy(body).into_owned()));
        Ok(())
    }
    fn increment(&mut self, _metric: u32) -> Result<(), String> {
        Ok(())
    }
    fn record(&mut self, _metric: u32, _value: u64) -> Result<(), String> {
        Ok(())
    }
}

fn guard() -> RefCell<Guard> {
    let cfg = serde_json::json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": "container_registry",
        "issuer": "registry-guard", "jwks": jwks(&[&es256_key(1)]),
    });
    RefCell::new(Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap()))
}

fn bearer(actions: &[&str]) -> String {
    let claims = RegistryClaims {
        iss: "registry-guard".into(),
        sub: "dev".into(),
        aud: Audience::One("container_registry".into()),
        jti: "j".into(),
        access: vec![AccessClaim {
            resource_type: "repository".into(),
            name: "acme/web/app".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            meta: None,
        }],
        auth_type: Some("password".into()),
        user: None,
        extra: Default::default(),
    };
    let t = sign(&es256_key(1), claims, Validity { issued_at: NOW, not_before: NOW, expires_at: NOW + 60 }).unwrap();
    format!("Bearer {t}")
}

#[test]
fn allowed_request_continues_without_a_reply() {
    let mut host =
        FakeHost::request("GET", "/v2/acme/web/app/manifests/v1").with_header("authorization", &bearer(&["pull"]));
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard())), Outcome::Allowed);
    assert!(host.replies.is_empty());
}

#[test]
fn missing_token_gets_401_challenge_and_oci_body() {
    let mut host = FakeHost::request("PUT", "/v2/acme/web/app/manifests/v1");
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard())), Outcome::Denied);
    let (status, headers, body) = &host.replies[0];
    assert_eq!(*status, 401);
    let www = headers.iter().find(|(k, _)| k == "www-authenticate").unwrap();
    assert!(www.1.contains(r#"scope="repository:acme/web/app:pull,push""#));
    assert!(body.contains(r#""code":"UNAUTHORIZED""#));
}

#[test]
fn two_authorization_headers_are_refused() {
    let b = bearer(&["pull"]);
    let mut host = FakeHost::request("GET", "/v2/acme/web/app/manifests/v1")
        .with_header("authorization", &b)
        .with_header("authorization", &b);
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard())), Outcome::Denied);
    assert_eq!(host.replies[0].0, 401);
}

#[test]
fn internal_errors_fail_closed() {
    let mut host = FakeHost { fail_headers: true, ..FakeHost::request("GET", "/v2/") };
    assert_eq!(on_request_headers(&mut host, 1, Some(&guard())), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
    let mut host = FakeHost::request("GET", "/v2/");
    assert_eq!(on_request_headers(&mut host, 1, None), Outcome::Failed);
    assert_eq!(host.replies[0].0, 503);
}
