//! End to end: hostile tokens and requests sent as raw HTTP/1.1 through real Envoy
//! (normalize_path, merge_slashes, escaped slashes rejected) with the real filter, to the
//! real registry (distribution 2.8.2). Each reply is attributed to whoever produced it: the
//! filter (`x-registry-guard: denied`), the registry (`docker-distribution-api-version`) or
//! Envoy itself (neither). For path tricks the same request is also sent straight to the
//! registry, so "never allowed where distribution would deny" is checked against the real
//! thing rather than assumed.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::testing::es256_key;
use registry_guard_e2e::Stack;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Filter,
    Registry,
    Envoy,
}

#[derive(Debug)]
struct Reply {
    status: u16,
    from: From,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Sends `head` (request line and headers, without the final blank line) and `body` as is.
fn raw(port: u16, head: &str, body: &[u8]) -> Reply {
    raw_bytes(port, head.as_bytes(), body)
}

/// [`raw`] with a head that may hold any bytes (obs-text in header values).
fn raw_bytes(port: u16, head: &[u8], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut req = head.to_vec();
    req.extend_from_slice(format!("Host: 127.0.0.1:{port}\r\nConnection: close\r\n").as_bytes());
    if !String::from_utf8_lossy(head).to_ascii_lowercase().contains("\ncontent-length:") && !body.is_empty() {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let _ = s.write_all(&req);
    let is_head = head.starts_with(b"HEAD ");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if is_head || buf.len() >= end + 4 + len {
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
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let has = |n: &str| headers.iter().any(|(k, _)| k == n);
    let from = if headers.iter().any(|(k, v)| k == "x-registry-guard" && v == "denied") {
        From::Filter
    } else if has("docker-distribution-api-version") {
        From::Registry
    } else {
        From::Envoy
    };
    Reply { status, from, headers, body: body.to_owned() }
}

fn get(port: u16, method: &str, path: &str, token: Option<&str>) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    raw(port, &head, b"")
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn claims(grants: &[(&str, &[&str])]) -> Value {
    let t = now();
    json!({
        "iss": "registry-guard", "sub": "mallory", "aud": "container_registry", "jti": format!("j-{t}"),
        "exp": t + 300, "nbf": t, "iat": t, "auth_type": "password",
        "access": grants.iter().map(|(name, actions)| {
            let (ty, name) = if *name == "catalog" { ("registry", "catalog") } else { ("repository", *name) };
            json!({"type": ty, "name": name, "actions": actions})
        }).collect::<Vec<_>>(),
    })
}

/// Signs raw header and claims text (repeated keys survive) with ES256.
fn sign_raw(key: &SigningKey, header: &str, claims: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig: p256::ecdsa::Signature = key.key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn mint(key: &SigningKey, grants: &[(&str, &[&str])]) -> String {
    sign_raw(key, &json!({"alg": "ES256", "typ": "JWT", "kid": key.kid}).to_string(), &claims(grants).to_string())
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(msg.iter().copied()).collect();
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(Sha256::digest(&inner)).collect();
    Sha256::digest(&outer).to_vec()
}

/// Pushes a generated image straight into the registry (no Envoy, no auth) as `repo:tag`;
/// returns the digest of its layer.
fn seed(stack: &Stack, repo: &str, tag: &str) -> String {
    let layout = stack.path(&format!("seed-{}", repo.replace('/', "_")));
    let src = stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", tag, "--salt", repo]);
    let dst = format!("docker://127.0.0.1:{}/{repo}:{tag}", stack.registry_port);
    assert!(stack.skopeo(&["copy", "--dest-tls-verify=false", src.trim(), &dst]).status.success(), "seed {repo}");
    let m = raw(
        stack.registry_port,
        &format!("GET /v2/{repo}/manifests/{tag} HTTP/1.1\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n"),
        b"",
    );
    let v: Value = serde_json::from_str(&m.body).expect("manifest json");
    v["layers"][0]["digest"].as_str().expect("layer digest").to_owned()
}

#[test]
fn hostile_tokens_get_401_from_the_filter() {
    let stack = Stack::start();
    let key = stack.signing_key();
    let port = stack.envoy_port;
    let path = "/v2/acme/web/manifests/v1";
    let grants: &[(&str, &[&str])] = &[("acme/web", &["pull"])];
    let good = mint(&key, grants);
    let (h, p, sig) = {
        let mut it = good.split('.');
        (
            it.next().unwrap().to_owned(),
            it.next().unwrap().to_owned(),
            URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap(),
        )
    };
    let kid = key.kid.clone();
    let c = claims(grants).to_string();
    let hdr = |v: Value| b64(v.to_string().as_bytes());
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = claims(grants);
        f(&mut v);
        sign_raw(&key, &json!({"alg": "ES256", "kid": kid}).to_string(), &v.to_string())
    };
    let with_header = |v: Value| sign_raw(&key, &v.to_string(), &c);
    // The signature in the standard base64 alphabet: only a refusal case when its encoding
    // differs from base64url (a signature with no `-` or `_` encodes the same, about one in
    // fifteen), so take the first of a few signatures over distinct claims that does.
    let std_alphabet = (0..64)
        .map(|i| with(&|v: &mut Value| v["jti"] = json!(format!("std-alphabet-{i}"))))
        .find_map(|t| {
            let (input, s) = t.rsplit_once('.')?;
            let std = STANDARD.encode(URL_SAFE_NO_PAD.decode(s).ok()?).replace('=', "");
            (std != s).then(|| format!("{input}.{std}"))
        })
        .expect("one of 64 signatures has `-` or `_` in base64url");
    let pubkey = key.key.verifying_key().to_encoded_point(false).as_bytes().to_vec();
    let hs = {
        let input = format!("{}.{p}", hdr(json!({"alg": "HS256", "kid": kid})));
        format!("{input}.{}", b64(&hmac_sha256(&pubkey, input.as_bytes())))
    };
    let n: [u8; 32] = {
        let mut n = [0xffu8; 32];
        n[4..8].copy_from_slice(&[0; 4]);
        n[16..].copy_from_slice(&[
            0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
        ]);
        n
    };
    let der = p256::ecdsa::Signature::from_slice(&sig).unwrap().to_der();
    let t = now();
    let base = r#""iss":"registry-guard","sub":"mallory","aud":"container_registry","jti":"d""#;
    let acc = r#""access":[{"type":"repository","name":"acme/web","actions":["pull"]}]"#;
    let hjson = json!({"alg": "ES256", "kid": kid}).to_string();
    let cases: Vec<(&str, String)> = vec![
        ("alg none", format!("{}.{p}.", hdr(json!({"alg": "none", "kid": kid})))),
        ("alg None", format!("{}.{p}.", hdr(json!({"alg": "None", "kid": kid})))),
        ("alg empty", format!("{}.{p}.{}", hdr(json!({"alg": "", "kid": kid})), b64(&sig))),
        ("stripped signature", format!("{h}.{p}.")),
        ("HS256 keyed with the public key", hs),
        ("ES256 r = s = 0", format!("{h}.{p}.{}", b64(&[0u8; 64]))),
        ("ES256 r = s = n", format!("{h}.{p}.{}", b64(&[n, n].concat()))),
        ("DER signature", format!("{h}.{p}.{}", b64(der.as_bytes()))),
        ("jku", with_header(json!({"alg": "ES256", "kid": kid, "jku": "http://127.0.0.1:9/"}))),
        ("x5u", with_header(json!({"alg": "ES256", "kid": kid, "x5u": "http://127.0.0.1:9/"}))),
        ("jwk (attacker's key, attacker's signature)", {
            let evil = es256_key(9);
            sign_raw(&evil, &json!({"alg": "ES256", "kid": kid, "jwk": evil.public_jwk()}).to_string(), &c)
        }),
        ("x5c", with_header(json!({"alg": "ES256", "kid": kid, "x5c": ["MIIB"]}))),
        ("crit", with_header(json!({"alg": "ES256", "kid": kid, "crit": ["exp"], "exp": 1}))),
        ("crit null", with_header(json!({"alg": "ES256", "kid": kid, "crit": null}))),
        ("kid injection", with_header(json!({"alg": "ES256", "kid": "../../../../dev/null"}))),
        ("unknown kid", sign_raw(&es256_key(9), &json!({"alg": "ES256", "kid": "other"}).to_string(), &c)),
        ("duplicate alg", sign_raw(&key, &format!(r#"{{"alg":"ES256","kid":"{kid}","alg":"none"}}"#), &c)),
        ("duplicate exp", sign_raw(&key, &hjson, &format!(r#"{{{base},{acc},"exp":{},"exp":{}}}"#, t - 3600, t + 300))),
        (
            "duplicate access",
            sign_raw(
                &key,
                &hjson,
                &format!(
                    r#"{{{base},"exp":{},{acc},"access":[{{"type":"repository","name":"acme/web","actions":["pull","push"]}}]}}"#,
                    t + 300
                ),
            ),
        ),
        (
            "duplicate extra claim",
            sign_raw(&key, &hjson, &format!(r#"{{{base},{acc},"exp":{},"x":1,"x":2}}"#, t + 300)),
        ),
        ("exp as string", with(&|v| v["exp"] = json!((t + 300).to_string()))),
        ("exp = now - leeway - 2", with(&|v| v["exp"] = json!(t - 2 - 2))),
        ("nbf = now + leeway + 3", with(&|v| v["nbf"] = json!(t + 2 + 3))),
        ("exp huge", with(&|v| v["exp"] = json!(u64::MAX))),
        ("exp negative", with(&|v| v["exp"] = json!(-1))),
        ("aud other", with(&|v| v["aud"] = json!("other"))),
        ("aud array without us", with(&|v| v["aud"] = json!(["other"]))),
        ("access as object", with(&|v| v["access"] = json!({"type": "repository", "name": "acme/web"}))),
        ("oversized (16 KiB + 1)", {
            let mut pad = 12_000;
            loop {
                let tok = with(&|v| v["pad"] = json!("x".repeat(pad)));
                if tok.len() > 16 * 1024 {
                    break tok;
                }
                pad += 1;
            }
        }),
        ("bad base64url (padding)", format!("{h}.{p}.{}==", b64(&sig))),
        ("bad base64url (standard alphabet)", std_alphabet),
        ("four segments", format!("{good}.x")),
    ];
    let mut failures = Vec::new();
    let mut table = Vec::new();
    // Controls: the untouched token passes the filter (the registry answers, the manifest
    // does not exist), and so do a one-element `aud` array and a high-S twin signature.
    let mut controls =
        vec![("valid token", good.clone()), ("aud array", with(&|v| v["aud"] = json!(["container_registry"])))];
    let high_s = {
        let (r, s) = sig.split_at(32);
        let mut out = [0u8; 32];
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let mut d = n[i] as i16 - s[i] as i16 - borrow;
            borrow = i16::from(d < 0);
            if d < 0 {
                d += 256;
            }
            out[i] = d as u8;
        }
        format!("{h}.{p}.{}", b64(&[r, &out[..]].concat()))
    };
    controls.push(("high-S twin signature (accepted by design)", high_s));
    for (name, token) in &controls {
        let r = get(port, "GET", path, Some(token));
        table.push(format!("{:<48} {} {:?}", name, r.status, r.from));
        if r.from != From::Registry {
            failures
                .push(format!("control `{name}`: expected the registry to answer, got {} from {:?}", r.status, r.from));
        }
    }
    for (name, token) in &cases {
        let r = get(port, "GET", path, Some(token));
        table.push(format!("{:<48} {} {:?}", name, r.status, r.from));
        let www = r.header("www-authenticate").unwrap_or_default();
        if r.status != 401 || r.from != From::Filter || !www.contains(r#"error="invalid_token""#) {
            failures.push(format!("`{name}`: {} from {:?}, www-authenticate {www:?}", r.status, r.from));
        }
    }
    // Two Authorization headers: a valid one and a forged one, in both orders, and twice
    // the same valid one.
    for (name, first, second) in [
        ("valid then forged", &good, &cases[0].1),
        ("forged then valid", &cases[0].1, &good),
        ("valid twice", &good, &good),
    ] {
        let head =
            format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n");
        let r = raw(port, &head, b"");
        table.push(format!("{:<48} {} {:?}", format!("two Authorization headers, {name}"), r.status, r.from));
        if r.status != 401 || r.from != From::Filter {
            failures.push(format!("two Authorization headers ({name}): {} from {:?}", r.status, r.from));
        }
    }
    // A header value with obs-text bytes (legal in HTTP/1.1; Envoy forwards it): the filter
    // decides as usual. The proxy-wasm SDK's `get_map` panicked on it, trapping the VM (503).
    for (name, token, want) in
        [("obs-text header, valid token", &good, None), ("obs-text header, no token", &String::new(), Some(401))]
    {
        let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        if !token.is_empty() {
            head.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
        }
        head.extend_from_slice(b"X-Latin1: caf\xe9 \xff\r\n");
        let r = raw_bytes(port, &head, b"");
        table.push(format!("{name:<48} {} {:?}", r.status, r.from));
        let ok = match want {
            None => r.from == From::Registry,
            Some(status) => r.status == status && r.from == From::Filter,
        };
        if !ok {
            failures.push(format!("{name}: {} from {:?}: {}", r.status, r.from, r.body));
        }
    }
    // Larger than Envoy's request-header limit (60 KiB by default): Envoy refuses it before
    // any filter runs (431), which is also a refusal; recorded, not a filter case.
    let huge = format!("{h}.{}.{}", b64(&vec![b' '; 70 * 1024]), b64(&sig));
    let r = get(port, "GET", path, Some(&huge));
    table.push(format!("{:<48} {} {:?}", "token beyond Envoy's header limit", r.status, r.from));
    if r.status != 431 || r.from != From::Envoy {
        failures.push(format!("huge token: {} from {:?}", r.status, r.from));
    }
    eprintln!(
        "token attacks through Envoy ({} cases + {} controls):\n{}",
        cases.len() + 4,
        controls.len(),
        table.join("\n")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What a path case must get through Envoy.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Refused by Envoy before the filter (normalisation rules).
    Envoy(u16),
    /// Refused by the filter with this status.
    Filter(u16),
    /// Forwarded; the registry answers with this status.
    Registry(u16),
}

#[test]
fn path_tricks_are_refused_or_decided_as_distribution_does() {
    let stack = Stack::start();
    let _secret_layer = seed(&stack, "other/secret", "v1");
    let web_layer = seed(&stack, "acme/web", "v1");
    let key = stack.signing_key();
    // Everything on acme/web, nothing elsewhere.
    let token = mint(&key, &[("acme/web", &["pull", "push", "delete"])]);
    let secret_manifest = raw(
        stack.registry_port,
        "GET /v2/other/secret/manifests/v1 HTTP/1.1\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n",
        b"",
    )
    .body;
    assert!(secret_manifest.contains("layers"));
    let long255 = "a".repeat(255);
    let long256 = "a".repeat(256);
    let cases: Vec<(&str, String, Want)> = vec![
        ("control: own manifest", "/v2/acme/web/manifests/v1".into(), Want::Registry(200)),
        ("control: own layer", format!("/v2/acme/web/blobs/{web_layer}"), Want::Registry(200)),
        ("control: other repository", "/v2/other/secret/manifests/v1".into(), Want::Filter(401)),
        // Envoy resolves dot segments (raw and %2e) before the filter: the filter decides on
        // the repository the registry will serve.
        ("..", "/v2/acme/web/../../other/secret/manifests/v1".into(), Want::Filter(401)),
        ("../ back into own repo", "/v2/other/secret/../../acme/web/manifests/v1".into(), Want::Registry(200)),
        ("%2e%2e", "/v2/acme/web/%2e%2e/%2e%2e/other/secret/manifests/v1".into(), Want::Filter(401)),
        ("%2E%2E", "/v2/acme/web/%2E%2E/%2E%2E/other/secret/manifests/v1".into(), Want::Filter(401)),
        (". segment", "/v2/acme/./web/manifests/v1".into(), Want::Registry(200)),
        ("%2F", "/v2/other%2Fsecret/manifests/v1".into(), Want::Envoy(400)),
        ("%2f", "/v2/other%2fsecret/manifests/v1".into(), Want::Envoy(400)),
        ("%5C", "/v2/other%5Csecret/manifests/v1".into(), Want::Envoy(400)),
        ("%2F after ..", "/v2/acme/web/..%2F..%2Fother/secret/manifests/v1".into(), Want::Envoy(400)),
        // Envoy decodes percent-encoded unreserved characters while normalising.
        ("%61 (encoded a)", "/v2/%61cme/web/manifests/v1".into(), Want::Registry(200)),
        ("%6F%74%68%65%72 (encoded other)", "/v2/%6F%74%68%65%72/secret/manifests/v1".into(), Want::Filter(401)),
        ("// merged", "/v2/acme//web/manifests/v1".into(), Want::Registry(200)),
        ("// into another repo", "/v2/other//secret/manifests/v1".into(), Want::Filter(401)),
        ("leading //", "//v2/other/secret/manifests/v1".into(), Want::Filter(401)),
        ("; parameter", "/v2/other/secret;x=1/manifests/v1".into(), Want::Filter(400)),
        ("; in the tag", "/v2/acme/web/manifests/v1;x".into(), Want::Filter(400)),
        // A fragment in the request target is refused by Envoy's HTTP/1 parser.
        ("# fragment", "/v2/acme/web/manifests/v1#/../../../other/secret/manifests/v1".into(), Want::Envoy(400)),
        // Envoy turns `\` into `/` and then resolves the dot segments.
        ("backslash", "/v2/acme/web\\..\\..\\other/secret/manifests/v1".into(), Want::Filter(401)),
        ("backslash into own repo", "/v2/other\\..\\acme/web/manifests/v1".into(), Want::Registry(200)),
        ("uppercase name", "/v2/Other/Secret/manifests/v1".into(), Want::Filter(400)),
        ("uppercase endpoint", "/v2/acme/web/MANIFESTS/v1".into(), Want::Filter(404)),
        ("uppercase tag (valid)", "/v2/acme/web/manifests/V1".into(), Want::Registry(404)),
        ("255-char name", format!("/v2/{long255}/manifests/v1"), Want::Filter(401)),
        ("256-char name", format!("/v2/{long256}/manifests/v1"), Want::Filter(400)),
        ("name with blobs component", "/v2/acme/web/blobs/x/manifests/v1".into(), Want::Filter(401)),
        ("name with manifests component", "/v2/other/manifests/secret/manifests/v1".into(), Want::Filter(401)),
        ("blobs under a manifests name", format!("/v2/acme/web/manifests/blobs/{web_layer}"), Want::Filter(401)),
        ("tags/list of a name ending in tags", "/v2/acme/web/tags/tags/list".into(), Want::Filter(401)),
        ("own tags/list", "/v2/acme/web/tags/list".into(), Want::Registry(200)),
        ("trailing slash", "/v2/acme/web/manifests/v1/".into(), Want::Filter(404)),
        ("query with ../", "/v2/acme/web/manifests/v1?x=/../../other/secret".into(), Want::Registry(200)),
        (
            "absolute-form target",
            format!("http://127.0.0.1:{}/v2/other/secret/manifests/v1", stack.envoy_port),
            Want::Filter(401),
        ),
    ];
    let mut failures = Vec::new();
    let mut table = vec![format!("{:<38} {:>6} {:<9} {:>6}   want", "case", "envoy", "by", "direct")];
    for (name, path, want) in &cases {
        let head = format!(
            "GET {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n"
        );
        let r = raw(stack.envoy_port, &head, b"");
        let mut direct = raw(stack.registry_port, &head, b"");
        // Distribution's router cleans the path (`..`, `.`, `//`) by redirecting to it;
        // what it would serve is what the redirect leads to.
        if direct.status == 301 {
            let to = direct.header("location").unwrap_or_default().to_owned();
            let to = to.split_once("/v2/").map(|(_, rest)| format!("/v2/{rest}")).unwrap_or(to);
            let again = head.replacen(path.as_str(), &to, 1);
            direct = raw(stack.registry_port, &again, b"");
        }
        table.push(format!(
            "{name:<38} {:>6} {:<9} {:>6}   {want:?}",
            r.status,
            format!("{:?}", r.from),
            direct.status
        ));
        let ok = match want {
            Want::Envoy(s) => r.from == From::Envoy && r.status == *s,
            Want::Filter(s) => r.from == From::Filter && r.status == *s,
            Want::Registry(s) => r.from == From::Registry && r.status == *s,
        };
        if !ok {
            failures.push(format!("`{name}` {path}: got {} from {:?}, want {want:?}", r.status, r.from));
        }
        // Never allowed where distribution itself refuses, never the other repository.
        // Exception: Envoy rewrites `\` to `/` (distribution would take it literally and
        // 404); the registry then receives, and serves, the rewritten path the filter
        // authorised.
        let rewritten_by_envoy = path.contains('\\');
        if (200..300).contains(&r.status) && !(200..300).contains(&direct.status) && !rewritten_by_envoy {
            failures
                .push(format!("`{name}`: {} through Envoy but {} from the registry itself", r.status, direct.status));
        }
        if r.body.contains(&secret_manifest) || r.body.contains("other/secret") && r.from == From::Registry {
            failures.push(format!("`{name}`: other/secret leaked"));
        }
    }
    eprintln!("path tricks through Envoy ({} cases):\n{}", cases.len(), table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mounts_upload_sessions_and_catalog() {
    let stack = Stack::start();
    let port = stack.envoy_port;
    let secret_layer = seed(&stack, "other/secret", "v1");
    let key = stack.signing_key();
    let web = mint(&key, &[("acme/web", &["pull", "push"])]);
    let web_and_secret = mint(&key, &[("acme/web", &["pull", "push"]), ("other/secret", &["pull"])]);
    let tools = mint(&key, &[("other/tools", &["pull", "push"])]);
    let catalog = mint(&key, &[("catalog", &["*"])]);
    let mut table = Vec::new();
    let mut failures = Vec::new();
    let mut expect = |name: &str, r: &Reply, from: From, status: u16| {
        table.push(format!("{name:<62} {} {:?}", r.status, r.from));
        if r.from != from || r.status != status {
            failures
                .push(format!("`{name}`: got {} from {:?}, want {status} from {from:?}: {}", r.status, r.from, r.body));
        }
    };
    let post = |path: &str, token: &str, extra: &str, body: &[u8]| {
        raw(port, &format!("POST {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n{extra}"), body)
    };
    let up = "/v2/acme/web/blobs/uploads/";
    let head_blob =
        |repo: &str, token: &str| get(port, "HEAD", &format!("/v2/{repo}/blobs/{secret_layer}"), Some(token));

    // Cross-repository mount without pull on `from`.
    let r = post(&format!("{up}?mount={secret_layer}&from=other/secret"), &web, "", b"");
    expect("mount without pull on from", &r, From::Filter, 401);
    let www = r.header("www-authenticate").unwrap_or_default().to_owned();
    assert!(www.contains("repository:other/secret:pull") && www.contains("insufficient_scope"), "{www}");
    let r = post(&format!("{up}?mount={secret_layer}&from=other%2Fsecret"), &web, "", b"");
    expect("mount, from percent-encoded", &r, From::Filter, 401);
    let r = post(&format!("{up}?mount={secret_layer}&from=acme/web&from=other/secret"), &web, "", b"");
    expect("mount, from given twice", &r, From::Filter, 400);
    let r = post(&format!("{up}?mount={secret_layer}&from=other/secret&from=acme/web"), &web, "", b"");
    expect("mount, from given twice (other order)", &r, From::Filter, 400);
    let form = format!("mount={secret_layer}&from=other%2Fsecret");
    let ct = "Content-Type: application/x-www-form-urlencoded\r\n";
    let r = post(&format!("{up}?mount={secret_layer}&from=acme/web"), &web, ct, form.as_bytes());
    expect("mount, from in a form body", &r, From::Filter, 400);
    let r = post(up, &web, ct, form.as_bytes());
    expect("mount and from only in a form body", &r, From::Filter, 400);
    let two = "Content-Type: application/x-www-form-urlencoded\r\nContent-Type: application/octet-stream\r\n";
    let r = post(up, &web, two, form.as_bytes());
    expect("form body behind two Content-Types (form first)", &r, From::Filter, 400);
    let two = "Content-Type: application/octet-stream\r\nContent-Type: application/x-www-form-urlencoded\r\n";
    let r = post(up, &web, two, form.as_bytes());
    expect("form body behind two Content-Types (form second)", &r, From::Filter, 400);
    let mp = format!(
        "--b\r\nContent-Disposition: form-data; name=\"from\"\r\n\r\nother/secret\r\n--b\r\nContent-Disposition: form-data; name=\"mount\"\r\n\r\n{secret_layer}\r\n--b--\r\n"
    );
    let r = post(up, &web, "Content-Type: multipart/form-data; boundary=b\r\n", mp.as_bytes());
    expect("mount and from in a multipart body", &r, From::Filter, 400);
    let r = head_blob("acme/web", &web);
    expect("layer is not in acme/web after the refused mounts", &r, From::Registry, 404);
    // Control: with pull on the source the mount happens (so the refusals above mattered).
    let r = post(&format!("{up}?mount={secret_layer}&from=other/secret"), &web_and_secret, "", b"");
    expect("control: mount with pull on from", &r, From::Registry, 201);
    let r = head_blob("acme/web", &web);
    expect("control: layer is in acme/web after the mount", &r, From::Registry, 200);

    // Upload session reuse: a session started on acme/web, continued under other/tools.
    let r = post(up, &web, "", b"");
    expect("start an upload on acme/web", &r, From::Registry, 202);
    let location = r.header("location").expect("upload location").to_owned();
    let location = location.split_once("/v2/").map(|(_, rest)| format!("/v2/{rest}")).expect("location path");
    let (path, query) = location.split_once('?').expect("_state in location");
    let uuid = path.rsplit('/').next().unwrap().to_owned();
    let data = b"registry-guard upload reuse test".to_vec();
    let digest = format!("sha256:{}", Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect::<String>());
    let put = |path: &str, token: &str| {
        raw(
            port,
            &format!(
                "PUT {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            ),
            &data,
        )
    };
    let patch = |path: &str, token: &str| {
        raw(
            port,
            &format!(
                "PATCH {path} HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
            ),
            &data,
        )
    };
    let foreign = format!("/v2/other/tools/blobs/uploads/{uuid}?{query}");
    let r = put(&format!("{foreign}&digest={digest}"), &web);
    expect("acme/web token, its session id under other/tools", &r, From::Filter, 401);
    // A token that may push to other/tools passes the filter; distribution refuses the
    // session because its HMAC'd `_state` names acme/web.
    let r = put(&format!("{foreign}&digest={digest}"), &tools);
    // (distribution 2.8 answers BLOB_UPLOAD_INVALID with status 404)
    let invalid = |r: &Reply| r.body.contains(r#""code":"BLOB_UPLOAD_INVALID""#);
    assert!(invalid(&r), "{}", r.body);
    expect("other/tools token, acme/web session id and state (PUT)", &r, From::Registry, 404);
    let r = patch(&foreign, &tools);
    assert!(invalid(&r), "{}", r.body);
    expect("other/tools token, acme/web session id and state (PATCH)", &r, From::Registry, 404);
    let r = get(port, "GET", &foreign, Some(&tools));
    assert!(invalid(&r), "{}", r.body);
    expect("other/tools token, acme/web session id and state (GET)", &r, From::Registry, 404);
    let r = get(port, "GET", &format!("/v2/other/tools/blobs/uploads/{uuid}"), Some(&tools));
    assert!(invalid(&r), "{}", r.body);
    expect("other/tools token, acme/web session id, no state", &r, From::Registry, 404);
    // Its own session's state with the foreign id: the state names another upload id.
    let own = post("/v2/other/tools/blobs/uploads/", &tools, "", b"");
    expect("start an upload on other/tools", &own, From::Registry, 202);
    let own_query = own.header("location").and_then(|l| l.split_once('?')).map(|(_, q)| q.to_owned()).unwrap();
    let r = put(&format!("/v2/other/tools/blobs/uploads/{uuid}?{own_query}&digest={digest}"), &tools);
    assert!(invalid(&r), "{}", r.body);
    expect("other/tools token, foreign id with its own state", &r, From::Registry, 404);
    let r = get(port, "HEAD", &format!("/v2/other/tools/blobs/{digest}"), Some(&tools));
    expect("nothing was written to other/tools", &r, From::Registry, 404);
    // Control: the session completes where it was started.
    let r = put(&format!("{path}?{query}&digest={digest}"), &web);
    expect("control: complete the upload on acme/web", &r, From::Registry, 201);

    // `_catalog` with huge `n`: the catalog scope decides; the registry validates paging.
    // Distribution 2.8.2 refuses `n` above its limit (1000) with 400 and treats an `n` it
    // cannot parse as a positive int (overflow, negative) as its default page size (100).
    let r = get(port, "GET", "/v2/_catalog?n=100000000000000000000", Some(&web));
    expect("catalog without the catalog scope", &r, From::Filter, 401);
    for (n, status) in [
        ("100000000000000000000", 200),
        ("-1", 200),
        ("abc", 200),
        ("1000000", 400),
        ("1001", 400),
        ("1000", 200),
        ("1", 200),
    ] {
        let path = format!("/v2/_catalog?n={n}");
        let r = get(port, "GET", &path, Some(&catalog));
        let direct = get(stack.registry_port, "GET", &path, None);
        expect(&format!("catalog, n = {n}"), &r, From::Registry, status);
        assert_eq!(r.status, direct.status, "n = {n}: Envoy and registry differ");
        if status == 200 {
            let v: Value = serde_json::from_str(&r.body).unwrap();
            assert!(v["repositories"].as_array().unwrap().len() <= 100, "n = {n}: {}", r.body);
        }
    }
    let r = get(port, "GET", "/v2/_catalog?n=1", Some(&catalog));
    assert!(r.body.contains(r#"["acme/web"]"#), "paging by 1: {}", r.body);
    eprintln!("mounts, upload sessions and catalog through Envoy:\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
