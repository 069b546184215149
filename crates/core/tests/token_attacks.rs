//! Token attack suite (issue 7): forged, malformed and ambiguous registry JWTs against the
//! verifier and the request-time guard. Every case must be refused (401 at the HTTP level)
//! and none may panic; the few deliberate acceptances (high-S signatures, float timestamps,
//! time edges inside the leeway) are asserted as such, so a change in behaviour shows up here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use registry_guard_core::decide::config::FilterConfig;
use registry_guard_core::decide::guard::Guard;
use registry_guard_core::token::keys::SigningKey;
use registry_guard_core::token::testing::{es256_key, jwks};
use registry_guard_core::token::verify::{TokenError, Verifier, MAX_TOKEN_LEN};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

const NOW: i64 = 1_800_000_000;
const LEEWAY: i64 = 5;
const ISS: &str = "registry-guard";
const AUD: &str = "container_registry";
const PATH: &str = "/v2/acme/web/manifests/v1";
/// The order of the P-256 group.
const N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc, 0xe6, 0xfa,
    0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

fn key() -> SigningKey {
    es256_key(1)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn header(kid: &str) -> String {
    json!({"alg": "ES256", "typ": "JWT", "kid": kid}).to_string()
}

fn claims() -> Value {
    json!({
        "iss": ISS, "sub": "alice", "aud": AUD, "jti": "j1",
        "exp": NOW + 300, "nbf": NOW, "iat": NOW,
        "access": [{"type": "repository", "name": "acme/web", "actions": ["pull"]}],
    })
}

/// Signs raw header and payload text (not re-serialised: duplicate keys survive) with ES256.
fn sign_raw(key: &SigningKey, header: &str, payload: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig: p256::ecdsa::Signature = key.key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

fn valid() -> String {
    sign_raw(&key(), &header(&key().kid), &claims().to_string())
}

fn with_claims(f: impl FnOnce(&mut Value)) -> String {
    let mut c = claims();
    f(&mut c);
    sign_raw(&key(), &header(&key().kid), &c.to_string())
}

fn with_header(h: Value) -> String {
    sign_raw(&key(), &h.to_string(), &claims().to_string())
}

fn parts(t: &str) -> (String, String, Vec<u8>) {
    let mut it = t.split('.');
    let (h, p, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    (h.to_owned(), p.to_owned(), URL_SAFE_NO_PAD.decode(s).unwrap())
}

fn with_signature(t: &str, sig: &[u8]) -> String {
    let (h, p, _) = parts(t);
    format!("{h}.{p}.{}", b64(sig))
}

fn verifier() -> Verifier {
    Verifier {
        keys: registry_guard_core::token::jwks::KeySet::from_jwks(&jwks(&[&key()])).unwrap(),
        issuer: ISS.into(),
        audience: AUD.into(),
        leeway_seconds: LEEWAY,
    }
}

fn guard() -> Guard {
    let cfg = json!({
        "realm": "http://127.0.0.1:5001/jwt/auth", "service": AUD, "issuer": ISS,
        "leeway_seconds": LEEWAY, "jwks": jwks(&[&key()]),
    });
    Guard::new(FilterConfig::from_json(cfg.to_string().as_bytes()).unwrap())
}

/// HMAC-SHA256 (RFC 2104), for the algorithm-confusion forgeries.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(msg.iter().copied()).collect();
    let inner = Sha256::digest(&inner);
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(inner.iter().copied()).collect();
    Sha256::digest(&outer).to_vec()
}

/// 32-byte big-endian `a - b` (a ≥ b).
fn sub_be(a: &[u8; 32], b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = a[i] as i16 - b[i] as i16 - borrow;
        borrow = if d < 0 { 1 } else { 0 };
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

fn add_one_be(a: &[u8; 32]) -> [u8; 32] {
    let mut out = *a;
    for i in (0..32).rev() {
        let (v, carry) = out[i].overflowing_add(1);
        out[i] = v;
        if !carry {
            break;
        }
    }
    out
}

/// Every attack token, named. Each must be refused by the verifier and get a 401 from the
/// guard.
fn attacks() -> Vec<(String, String)> {
    let k = key();
    let kid = k.kid.clone();
    let good = valid();
    let (h, p, sig) = parts(&good);
    let input = format!("{h}.{p}");
    let payload = claims().to_string();
    let attacker = es256_key(7);
    let mut v: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, t: String| v.push((name.to_owned(), t));

    // --- `alg` none and friends, stripped signatures ---
    for alg in ["none", "None", "NONE", "nOnE", "", " ES256", "ES256 ", "es256", "ES384", "ES512", "ES256K"] {
        let hh = b64(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string().as_bytes());
        add(&format!("alg {alg:?}, no signature"), format!("{hh}.{p}."));
        add(&format!("alg {alg:?}, original signature"), format!("{hh}.{p}.{}", b64(&sig)));
    }
    for alg in [json!(null), json!(1), json!(["ES256"]), json!({"a": 1})] {
        add(&format!("alg {alg}"), with_header(json!({"alg": alg, "kid": kid})));
    }
    add("alg missing", with_header(json!({"typ": "JWT", "kid": kid})));
    add("stripped signature, trailing dot", format!("{input}."));
    add("stripped signature, two segments", input.clone());
    add("signature of another token", with_signature(&with_claims(|c| c["sub"] = "root".into()), &sig));
    add("payload swapped under a valid signature", {
        let other = b64(with_claims_value(|c| c["access"][0]["actions"] = json!(["pull", "push"])).as_bytes());
        format!("{h}.{other}.{}", b64(&sig))
    });

    // --- algorithm confusion: HS256 keyed with the public key in every usual encoding ---
    let vk = k.key.verifying_key();
    let sec1 = vk.to_encoded_point(false).as_bytes().to_vec();
    let sec1c = vk.to_encoded_point(true).as_bytes().to_vec();
    let jwk_text = k.public_jwk().to_string();
    let spki_b64 = {
        // SubjectPublicKeyInfo DER of a P-256 key: fixed prefix + uncompressed point.
        let mut der = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
        der.extend_from_slice(&sec1);
        der
    };
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD
            .encode(&spki_b64)
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (alg, enc, secret) in [
        ("HS256", "sec1", sec1.clone()),
        ("HS256", "sec1-compressed", sec1c),
        ("HS256", "jwk", jwk_text.into_bytes()),
        ("HS256", "spki-der", spki_b64),
        ("HS256", "pem", pem.into_bytes()),
        ("HS256", "kid", kid.clone().into_bytes()),
        ("HS256", "empty", Vec::new()),
        ("HS384", "sec1", sec1),
    ] {
        let hh = b64(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string().as_bytes());
        let signing_input = format!("{hh}.{p}");
        let mac = hmac_sha256(&secret, signing_input.as_bytes());
        add(&format!("{alg} keyed with the public key ({enc})"), format!("{signing_input}.{}", b64(&mac)));
    }
    for alg in ["RS256", "PS256", "EdDSA"] {
        let hh = b64(json!({"alg": alg, "kid": kid}).to_string().as_bytes());
        add(&format!("alg {alg} with the ES256 signature"), format!("{hh}.{p}.{}", b64(&sig)));
    }

    // --- ES256 signature values (CVE-2022-21449 class) ---
    let (r, s) = sig.split_at(32);
    let zero = [0u8; 32];
    let n_plus_1 = add_one_be(&N);
    for (name, rr, ss) in [
        ("r = s = 0", &zero[..], &zero[..]),
        ("r = 0", &zero[..], s),
        ("s = 0", r, &zero[..]),
        ("r = s = n", &N[..], &N[..]),
        ("r = n", &N[..], s),
        ("s = n", r, &N[..]),
        ("r = n + 1", &n_plus_1[..], s),
        ("s = n + 1", r, &n_plus_1[..]),
        ("r = s = 2^256 - 1", &[0xff; 32][..], &[0xff; 32][..]),
    ] {
        let mut forged = rr.to_vec();
        forged.extend_from_slice(ss);
        add(&format!("ES256 {name}"), with_signature(&good, &forged));
    }
    add("ES256 signature of 63 bytes", with_signature(&good, &sig[..63]));
    add("ES256 signature of 65 bytes", with_signature(&good, &[&sig[..], &[0]].concat()));
    add("ES256 signature empty", with_signature(&good, &[]));
    add("ES256 signature doubled", with_signature(&good, &[&sig[..], &sig[..]].concat()));
    let der = p256::ecdsa::Signature::from_slice(&sig).unwrap().to_der();
    add("ES256 DER signature instead of raw r||s", with_signature(&good, der.as_bytes()));
    let mut flipped = sig.clone();
    flipped[10] ^= 1;
    add("ES256 signature with one bit flipped", with_signature(&good, &flipped));
    add("ES256 r and s swapped", with_signature(&good, &[s, r].concat()));

    // --- key references in the header ---
    let ajwk = attacker.public_jwk();
    for (field, value) in [
        ("jku", json!("http://127.0.0.1:9/jwks.json")),
        ("x5u", json!("http://127.0.0.1:9/cert.pem")),
        ("jwk", ajwk.clone()),
        ("x5c", json!(["MIIBszCCAVmgAwIBAgIUYWJj"])),
    ] {
        let mut hv = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        hv[field] = value.clone();
        add(&format!("{field} header, signed by the trusted key"), with_header(hv.clone()));
        let mut hv2 = json!({"alg": "ES256", "typ": "JWT", "kid": attacker.kid});
        hv2[field] = value;
        add(&format!("{field} header, signed by the attacker's key"), sign_raw(&attacker, &hv2.to_string(), &payload));
    }
    // The attacker's key under the trusted kid: the signature must not verify.
    add("trusted kid, attacker's signature", sign_raw(&attacker, &header(&kid), &payload));

    // --- kid ---
    for bad_kid in [
        "unknown",
        "",
        "../../../../dev/null",
        "/dev/null",
        "' OR '1'='1",
        "x\u{0}y",
        "http://127.0.0.1:9/key",
        &format!("{kid} "),
        &format!(" {kid}"),
        &kid.to_uppercase(),
        &format!("{kid}\u{0}"),
        "line\nINFO forged log line",
        "\u{1b}[31mred",
        &"k".repeat(10_000),
    ] {
        add(&format!("kid {bad_kid:?}"), sign_raw(&k, &header(bad_kid), &payload));
    }
    for kid_value in [json!(null), json!(1), json!([kid]), json!({"kid": kid}), json!(true)] {
        add(&format!("kid {kid_value}"), with_header(json!({"alg": "ES256", "kid": kid_value})));
    }
    add("kid missing", with_header(json!({"alg": "ES256", "typ": "JWT"})));

    // --- crit ---
    for crit in [json!(["exp"]), json!([]), json!(["b64"]), json!("exp"), json!(null)] {
        add(&format!("crit {crit}"), with_header(json!({"alg": "ES256", "kid": kid, "crit": crit, "b64": false})));
    }

    // --- duplicate JSON keys (serde's derive refuses some; "last wins" must never happen) ---
    let hdup = |extra: &str| format!(r#"{{"alg":"ES256","kid":"{kid}"{extra}}}"#);
    for (name, hh) in [
        ("alg ES256 then none", hdup(r#","alg":"none""#)),
        ("alg none then ES256", format!(r#"{{"alg":"none","kid":"{kid}","alg":"ES256"}}"#)),
        ("alg escaped duplicate", hdup(r#","\u0061lg":"ES256""#)),
        ("kid twice", hdup(&format!(r#","kid":"{kid}""#))),
        ("kid unknown then trusted", format!(r#"{{"alg":"ES256","kid":"evil","kid":"{kid}"}}"#)),
        ("typ twice", hdup(r#","typ":"JWT","typ":"JWT""#)),
        ("unknown header field twice", hdup(r#","x":1,"x":2"#)),
        ("control characters in a repeated key", hdup(r#","a\nb":1,"a\nb":2"#)),
    ] {
        add(&format!("header duplicate: {name}"), sign_raw(&k, &hh, &payload));
    }
    let base = r#""iss":"registry-guard","sub":"alice","aud":"container_registry","jti":"j1","nbf":1800000000,"iat":1800000000"#;
    let acc = r#""access":[{"type":"repository","name":"acme/web","actions":["pull"]}]"#;
    for (name, body) in [
        ("exp twice (short then long)", format!(r#"{{{base},{acc},"exp":1800000300,"exp":1900000000}}"#)),
        ("exp twice (expired then valid)", format!(r#"{{{base},{acc},"exp":1,"exp":1800000300}}"#)),
        ("exp escaped duplicate", format!(r#"{{{base},{acc},"exp":1,"\u0065xp":1800000300}}"#)),
        (
            "access twice",
            format!(
                r#"{{{base},{acc},"exp":1800000300,"access":[{{"type":"repository","name":"acme/web","actions":["pull","push","delete"]}}]}}"#
            ),
        ),
        ("sub twice", format!(r#"{{{base},{acc},"exp":1800000300,"sub":"root"}}"#)),
        ("iss twice", format!(r#"{{{base},{acc},"exp":1800000300,"iss":"evil"}}"#)),
        ("aud twice", format!(r#"{{{base},{acc},"exp":1800000300,"aud":"other"}}"#)),
        ("nbf twice", format!(r#"{{{base},{acc},"exp":1800000300,"nbf":0}}"#)),
        ("jti twice", format!(r#"{{{base},{acc},"exp":1800000300,"jti":"j2"}}"#)),
        ("auth_type twice", format!(r#"{{{base},{acc},"exp":1800000300,"auth_type":"a","auth_type":"b"}}"#)),
        ("user twice", format!(r#"{{{base},{acc},"exp":1800000300,"user":"a","user":"b"}}"#)),
        ("extra claim twice", format!(r#"{{{base},{acc},"exp":1800000300,"x":1,"x":2}}"#)),
        (
            "access entry name twice",
            format!(
                r#"{{{base},"exp":1800000300,"access":[{{"type":"repository","name":"other","name":"acme/web","actions":["pull"]}}]}}"#
            ),
        ),
        (
            "access entry actions twice",
            format!(
                r#"{{{base},"exp":1800000300,"access":[{{"type":"repository","name":"acme/web","actions":["pull"],"actions":["push"]}}]}}"#
            ),
        ),
        (
            "access entry type twice",
            format!(
                r#"{{{base},"exp":1800000300,"access":[{{"type":"registry","type":"repository","name":"acme/web","actions":["pull"]}}]}}"#
            ),
        ),
        (
            "access meta access_level twice",
            format!(
                r#"{{{base},"exp":1800000300,"access":[{{"type":"repository","name":"acme/web","actions":["pull"],"meta":{{"access_level":10,"access_level":50}}}}]}}"#
            ),
        ),
        ("nested unknown object key twice", format!(r#"{{{base},{acc},"exp":1800000300,"x":{{"a":1,"a":2}}}}"#)),
    ] {
        add(&format!("claims duplicate: {name}"), sign_raw(&k, &header(&kid), &body));
    }

    // --- wrong claim types ---
    let typed: Vec<(&str, Edit)> = vec![
        ("exp as string", Box::new(|c| c["exp"] = json!((NOW + 300).to_string()))),
        ("exp as bool", Box::new(|c| c["exp"] = json!(true))),
        ("exp as array", Box::new(|c| c["exp"] = json!([NOW + 300]))),
        ("exp as object", Box::new(|c| c["exp"] = json!({"$numberLong": NOW + 300}))),
        ("exp null", Box::new(|c| c["exp"] = Value::Null)),
        ("exp missing", Box::new(|c| drop(c.as_object_mut().unwrap().remove("exp")))),
        ("nbf as string", Box::new(|c| c["nbf"] = json!(NOW.to_string()))),
        ("iat as string", Box::new(|c| c["iat"] = json!("now"))),
        ("sub as number", Box::new(|c| c["sub"] = json!(1))),
        ("sub null", Box::new(|c| c["sub"] = Value::Null)),
        ("sub missing", Box::new(|c| drop(c.as_object_mut().unwrap().remove("sub")))),
        ("iss as array", Box::new(|c| c["iss"] = json!([ISS]))),
        ("iss missing", Box::new(|c| drop(c.as_object_mut().unwrap().remove("iss")))),
        ("jti missing", Box::new(|c| drop(c.as_object_mut().unwrap().remove("jti")))),
        ("jti as number", Box::new(|c| c["jti"] = json!(1))),
        (
            "access as object",
            Box::new(|c| c["access"] = json!({"type": "repository", "name": "acme/web", "actions": ["pull"]})),
        ),
        ("access as string", Box::new(|c| c["access"] = json!("repository:acme/web:pull"))),
        ("access entry as string", Box::new(|c| c["access"] = json!(["repository:acme/web:pull"]))),
        ("access actions as string", Box::new(|c| c["access"][0]["actions"] = json!("pull"))),
        ("access name as number", Box::new(|c| c["access"][0]["name"] = json!(1))),
        ("access type missing", Box::new(|c| drop(c["access"][0].as_object_mut().unwrap().remove("type")))),
        ("access_level 300", Box::new(|c| c["access"][0]["meta"] = json!({"access_level": 300}))),
        ("access_level -1", Box::new(|c| c["access"][0]["meta"] = json!({"access_level": -1}))),
        ("access_level as string", Box::new(|c| c["access"][0]["meta"] = json!({"access_level": "50"}))),
        ("user as object", Box::new(|c| c["user"] = json!({"user_info": {}}))),
        ("claims are an array", Box::new(|c| *c = json!([claims()]))),
        ("claims are a string", Box::new(|c| *c = json!("alice"))),
        ("claims are null", Box::new(|c| *c = Value::Null)),
    ];
    for (name, f) in typed {
        add(&format!("claim type: {name}"), with_claims(f));
    }

    // --- time edges (leeway 5 s, now = NOW) and out-of-range numbers ---
    add("exp = now - leeway - 1", with_claims(|c| c["exp"] = json!(NOW - LEEWAY - 1)));
    add("nbf = now + leeway + 1", with_claims(|c| c["nbf"] = json!(NOW + LEEWAY + 1)));
    for (name, exp) in [
        ("exp 0", json!(0)),
        ("exp -1", json!(-1)),
        ("exp i64::MIN", json!(i64::MIN)),
        ("exp i64::MAX", json!(i64::MAX)),
        ("exp u64::MAX", json!(u64::MAX)),
        ("exp 1e300", json!(1e300)),
        ("exp -1e300", json!(-1e300)),
        ("exp 2^63 as float", json!(9.223372036854776e18)),
        ("exp 1e20", json!(1e20)),
    ] {
        add(&format!("time: {name}"), with_claims(|c| c["exp"] = exp));
    }
    add("exp 10^400 (out of f64 range)", {
        let body =
            claims().to_string().replace(&format!("\"exp\":{}", NOW + 300), &format!("\"exp\":1{}", "0".repeat(400)));
        sign_raw(&k, &header(&kid), &body)
    });
    for (name, nbf) in
        [("nbf i64::MAX", json!(i64::MAX)), ("nbf u64::MAX", json!(u64::MAX)), ("nbf 1e300", json!(1e300))]
    {
        add(&format!("time: {name}"), with_claims(|c| c["nbf"] = nbf));
    }
    add("time: iat i64::MAX", with_claims(|c| c["iat"] = json!(i64::MAX)));

    // --- audience and issuer ---
    for (name, aud) in [
        ("aud other", json!("other")),
        ("aud empty string", json!("")),
        ("aud differs in case", json!("Container_registry")),
        ("aud with trailing space", json!(format!("{AUD} "))),
        ("aud empty array", json!([])),
        ("aud array without us", json!(["a", "b"])),
        ("aud array of arrays", json!([[AUD]])),
        ("aud array with a number", json!([1, AUD])),
        ("aud null", Value::Null),
        ("aud object", json!({"aud": AUD})),
    ] {
        add(&format!("aud: {name}"), with_claims(|c| c["aud"] = aud));
    }
    add("aud missing", with_claims(|c| drop(c.as_object_mut().unwrap().remove("aud"))));
    add("iss other", with_claims(|c| c["iss"] = json!("evil")));
    add("iss with trailing NUL", with_claims(|c| c["iss"] = json!(format!("{ISS}\u{0}"))));

    // --- size ---
    add("oversized: validly signed, just over the limit", {
        let mut pad = MAX_TOKEN_LEN * 3 / 4 - 400;
        loop {
            let t = with_claims(|c| c["pad"] = json!("x".repeat(pad)));
            if t.len() > MAX_TOKEN_LEN {
                assert!(t.len() <= MAX_TOKEN_LEN + 4);
                break t;
            }
            pad += 1;
        }
    });
    add("oversized: 1 MiB of dots", ".".repeat(1 << 20));
    add("oversized: 64 KiB header", format!("{}.{p}.{}", b64(&vec![b'{'; 48 * 1024]), b64(&sig)));

    // --- encoding ---
    let padded = |s: &str| {
        let mut s = s.to_owned();
        while s.len() % 4 != 0 {
            s.push('=');
        }
        s
    };
    add("base64 padding on the signature", format!("{input}.{}", padded(&b64(&sig))));
    add("base64 padding on the header", format!("{}.{p}.{}", padded(&h), b64(&sig)));
    add("standard alphabet signature", format!("{input}.{}", STANDARD.encode(&sig).trim_end_matches('=')));
    add("whitespace in the signature", format!("{input}.{} {}", &b64(&sig)[..10], &b64(&sig)[10..]));
    add("newline in the payload", format!("{h}.{}\n{}.{}", &p[..8], &p[8..], b64(&sig)));
    add("non-ASCII in the header", format!("é{h}.{p}.{}", b64(&sig)));
    add("percent-encoded dot", good.replacen('.', "%2E", 1));
    add("non-canonical trailing bits in the signature", {
        // 64 bytes → 86 chars; the last char carries 2 data bits and 4 zero bits.
        let enc = b64(&sig);
        let last = enc.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.find(last).unwrap();
        let twin = alphabet.chars().nth(idx | 1).unwrap();
        assert_ne!(twin, last);
        format!("{input}.{}{twin}", &enc[..enc.len() - 1])
    });
    add("empty token", String::new());
    add("only dots", "..".into());
    add("four segments", format!("{good}.{}", b64(b"x")));
    add("five segments (JWE shape)", format!("{h}.{p}.{}.{}.{}", b64(b"iv"), b64(b"ct"), b64(b"tag")));
    add("leading dot", format!(".{good}"));
    add("header is not JSON", format!("{}.{p}.{}", b64(b"not json"), b64(&sig)));
    add("header is an array", sign_raw(&k, &format!(r#"[{}]"#, header(&kid)), &payload));
    add("header with trailing garbage", sign_raw(&k, &format!("{}x", header(&kid)), &payload));
    add("header is invalid UTF-8", {
        let hh = b64(format!("{{\"alg\":\"ES256\",\"kid\":\"{kid}\",\"x\":\"")
            .as_bytes()
            .iter()
            .chain(b"\xff\"}")
            .copied()
            .collect::<Vec<u8>>()
            .as_slice());
        let signing_input = format!("{hh}.{p}");
        let sig: p256::ecdsa::Signature = k.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", b64(&sig.to_bytes()))
    });
    add("payload with trailing garbage", sign_raw(&k, &header(&kid), &format!("{payload}x")));
    add("payload is not JSON", sign_raw(&k, &header(&kid), "not json"));
    add("header cty JWT (nested token)", with_header(json!({"alg": "ES256", "kid": kid, "cty": "JWT"})));

    v
}

/// A change to the baseline claims.
type Edit = Box<dyn Fn(&mut Value)>;

fn with_claims_value(f: impl FnOnce(&mut Value)) -> String {
    let mut c = claims();
    f(&mut c);
    c.to_string()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn the_baseline_token_is_accepted() {
    // Without this, every refusal below could be an artefact of a broken baseline.
    let v = verifier().verify(&valid(), NOW).unwrap();
    assert_eq!(v.subject, "alice");
    let mut g = guard();
    let c = g.check("GET", PATH, None, &[&format!("Bearer {}", valid())], NOW);
    assert!(c.decision.is_allow(), "{:?}", c.decision);
}

#[test]
fn every_attack_token_is_refused_with_401() {
    let cases = attacks();
    let mut failures = Vec::new();
    let ver = verifier();
    for (name, token) in &cases {
        let verdict = std::panic::catch_unwind(|| ver.verify(token, NOW));
        match verdict {
            Err(_) => failures.push(format!("{name}: verifier panicked")),
            Ok(Ok(v)) => failures.push(format!("{name}: verifier ACCEPTED (sub `{}`)", v.subject)),
            // Reasons reach logs: no raw control characters (log forging), bounded length.
            Ok(Err(e)) => {
                let m = e.to_string();
                if m.chars().any(char::is_control) || m.len() > 400 {
                    failures.push(format!("{name}: unsafe refusal message {m:?}"));
                }
            }
        }
        let mut g = guard();
        let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.check("GET", PATH, None, &[&format!("Bearer {token}")], NOW).decision.status()
        }));
        match status {
            Err(_) => failures.push(format!("{name}: guard panicked")),
            Ok(401) => {}
            Ok(s) => failures.push(format!("{name}: guard answered {s}, expected 401")),
        }
    }
    eprintln!("token attacks: {} cases, {} failures", cases.len(), failures.len());
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert!(cases.len() >= 150, "suite shrank to {} cases", cases.len());
}

#[test]
fn refusal_reasons_are_the_intended_ones() {
    // Spot checks that refusals happen for the right reason, not by accident.
    let k = key();
    let ver = verifier();
    let reason = |t: &str| ver.verify(t, NOW).unwrap_err();
    let mut h = json!({"alg": "ES256", "kid": k.kid});
    h["jku"] = json!("http://127.0.0.1:9/");
    assert_eq!(reason(&with_header(h)), TokenError::ForbiddenHeader("jku"));
    let h = json!({"alg": "ES256", "kid": k.kid, "jwk": k.public_jwk()});
    assert_eq!(reason(&with_header(h)), TokenError::ForbiddenHeader("jwk"));
    let h = json!({"alg": "ES256", "kid": k.kid, "crit": []});
    assert_eq!(reason(&with_header(h)), TokenError::ForbiddenHeader("crit"));
    assert_eq!(reason(&sign_raw(&k, &header("nope"), &claims().to_string())), TokenError::UnknownKey("nope".into()));
    assert_eq!(reason(&with_header(json!({"alg": "ES256"}))), TokenError::MissingKid);
    assert!(matches!(reason(&with_claims(|c| c["exp"] = json!(NOW - LEEWAY - 1))), TokenError::Expired(_)));
    assert!(matches!(reason(&with_claims(|c| c["nbf"] = json!(NOW + LEEWAY + 1))), TokenError::NotYetValid(_)));
    assert_eq!(reason(&with_claims(|c| drop(c.as_object_mut().unwrap().remove("exp")))), TokenError::NoExpiry);
    assert!(matches!(reason(&with_claims(|c| c["exp"] = Value::Null)), TokenError::BadClaims(_)));
    assert_eq!(reason(&"a".repeat(MAX_TOKEN_LEN + 1)), TokenError::TooLong);
    let (h, p, sig) = parts(&valid());
    let der = p256::ecdsa::Signature::from_slice(&sig).unwrap().to_der();
    assert!(matches!(reason(&format!("{h}.{p}.{}", b64(der.as_bytes()))), TokenError::BadSignature(_)));
    let none = format!("{}.{p}.", b64(json!({"alg": "none", "kid": k.kid}).to_string().as_bytes()));
    assert!(matches!(reason(&none), TokenError::BadSignature(m) if m.contains("lgorithm")));
}

#[test]
fn time_edges_inside_the_leeway_are_accepted() {
    let ver = verifier();
    for (name, t) in [
        ("exp = now - leeway", with_claims(|c| c["exp"] = json!(NOW - LEEWAY))),
        ("nbf = now + leeway", with_claims(|c| c["nbf"] = json!(NOW + LEEWAY))),
        ("nbf far in the past", with_claims(|c| c["nbf"] = json!(0))),
        ("nbf negative", with_claims(|c| c["nbf"] = json!(-1))),
        ("nbf missing", with_claims(|c| drop(c.as_object_mut().unwrap().remove("nbf")))),
        ("iat missing", with_claims(|c| drop(c.as_object_mut().unwrap().remove("iat")))),
        // RFC 7519 NumericDate may be non-integer; jwt-compact truncates toward zero (as
        // golang-jwt does), so a fractional exp never extends a token's life.
        ("exp as float", with_claims(|c| c["exp"] = json!((NOW + 300) as f64 + 0.9))),
        ("aud as array", with_claims(|c| c["aud"] = json!(["other", AUD]))),
        ("aud as one-element array", with_claims(|c| c["aud"] = json!([AUD]))),
    ] {
        assert!(ver.verify(&t, NOW).is_ok(), "{name}: {:?}", ver.verify(&t, NOW));
    }
    let t = with_claims(|c| c["exp"] = json!(NOW as f64 + 0.9));
    assert!(ver.verify(&t, NOW + LEEWAY).is_ok());
    assert!(matches!(ver.verify(&t, NOW + LEEWAY + 1), Err(TokenError::Expired(e)) if e == NOW));
}

#[test]
fn high_s_signatures_are_accepted_deliberately() {
    // Decision: ECDSA (r, n - s) is as valid as (r, s). p256 (RustCrypto) and Go's
    // crypto/ecdsa (GitLab's issuer, distribution's own verifier) accept both, and signers
    // do not normalise, so refusing high-S would refuse about half of genuine tokens. The
    // malleability gives a second token *string* with the same claims and key: the cache is
    // keyed by string (a second entry, bounded), revocation and audit use `jti`/`sub`.
    let good = valid();
    let (_, _, sig) = parts(&good);
    let (r, s) = sig.split_at(32);
    let high = sub_be(&N, s);
    let twin = with_signature(&good, &[r, &high].concat());
    assert_ne!(twin, good);
    let a = verifier().verify(&good, NOW).unwrap();
    let b = verifier().verify(&twin, NOW).unwrap();
    assert_eq!(a, b);
}

#[test]
fn authorization_header_shapes() {
    let t = valid();
    let mut g = guard();
    let mut status = |values: &[&str]| g.check("GET", PATH, None, values, NOW).decision.status();
    let bearer = format!("Bearer {t}");
    assert_eq!(status(&[&bearer]), 200);
    assert_eq!(status(&[&bearer, &bearer]), 401, "two identical Authorization headers");
    assert_eq!(status(&[&bearer, "Bearer x"]), 401, "two different Authorization headers");
    assert_eq!(status(&["Bearer x", &bearer]), 401, "forged first, valid second");
    assert_eq!(status(&[&format!("{bearer}, {bearer}")]), 401, "comma-joined values");
    assert_eq!(status(&[&format!("Basic {}", STANDARD.encode(b"alice:alice-pass"))]), 401);
    assert_eq!(status(&[&format!("Bearer {t} extra")]), 401);
    assert_eq!(status(&[&format!("Bearer\t{t}")]), 401);
    assert_eq!(status(&[&format!("Token {t}")]), 401);
    assert_eq!(status(&[&t]), 401, "no scheme");
    assert_eq!(status(&[""]), 401);
    assert_eq!(status(&["Bearer "]), 401);
}

#[test]
fn the_nested_user_jwt_and_other_signed_documents_are_not_access_tokens() {
    let k = key();
    // The `user` claim is signed by the same key; it has no iss/sub/aud.
    let user = registry_guard_core::token::sign::sign_jws_unchecked(
        &k,
        &json!({"exp": NOW + 300, "jti": "u", "user_info": {"token_type": "pat", "username": "root", "user_id": 1}}),
        "JWT",
    )
    .unwrap();
    assert!(verifier().verify(&user, NOW).is_err());
    let bundle =
        registry_guard_core::token::sign::sign_jws_unchecked(&k, &json!({"revision": 1}), "registry-guard-bundle+jwt")
            .unwrap();
    assert!(verifier().verify(&bundle, NOW).is_err());
}
