//! TLS end to end (`rgctl stack render --tls`): Envoy terminates TLS with a certificate from a
//! development CA, the realm is https on Envoy, and real clients verify certificates: skopeo
//! and podman with `--tls-verify=true` and the CA in a containers cert dir push and pull; a
//! wrong CA is refused; anonymous and forged requests are still refused over TLS.

use std::fs;
use std::process::Command;
use std::time::Duration;

use registry_guard_e2e::clients::Podman;
use registry_guard_e2e::{mint_token, stderr, Options, Stack};

/// A containers cert dir (`--cert-dir`) trusting `ca` (`*.crt` files are CA roots).
fn cert_dir(stack: &Stack, name: &str, ca: &std::path::Path) -> String {
    let dir = stack.path(name);
    fs::create_dir_all(&dir).unwrap();
    fs::copy(ca, dir.join("ca.crt")).unwrap();
    dir.display().to_string()
}

/// `curl --cacert CA` through Envoy over https: (status, body, WWW-Authenticate).
fn curl(stack: &Stack, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-D", "-", "--max-time", "10", "--cacert"]).arg(stack.tls_ca());
    if let Some(t) = bearer {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.arg(format!("https://{}{path}", stack.registry_host())).output().unwrap();
    assert!(out.status.success(), "curl {path}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn skopeo_and_podman_verify_the_certificate_push_and_pull() {
    let stack = Stack::start_with(Options { tls: true, ..Default::default() });
    let host = stack.registry_host();
    let good = cert_dir(&stack, "certs-good", &stack.tls_ca());

    // The challenge names the https realm on Envoy; anonymous and forged are refused.
    let (status, text) = curl(&stack, "/v2/", None);
    assert_eq!(status, 401, "{text}");
    let realm = format!("realm=\"https://{host}/jwt/auth\"");
    assert!(text.to_ascii_lowercase().contains(&realm.to_ascii_lowercase()), "challenge without {realm}: {text}");
    let owner = mint_token(&stack.signing_key(), "e2e-owner", "acme/web/app", &["pull", "push"], Some(50));
    let (head, _) = owner.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", "A".repeat(86));
    let (status, text) = curl(&stack, "/v2/acme/web/app/tags/list", Some(&forged));
    assert_eq!(status, 401, "forged over TLS: {text}");
    let (status, text) = curl(&stack, "/v2/_catalog", None);
    assert_eq!(status, 401, "anonymous catalog over TLS: {text}");
    // Plain HTTP on the TLS port gets no registry answer.
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{host}/v2/"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "401", "plain HTTP answered on the TLS listener");

    // skopeo: login, push, inspect, pull, every step verifying the certificate.
    let login =
        stack.skopeo(&["login", "--tls-verify=true", "--cert-dir", &good, "-u", "dev", "-p", "dev-pass", &host]);
    assert!(login.status.success(), "skopeo login over TLS failed: {}", stderr(&login));
    let _ = stack.skopeo(&["logout", "--all"]);
    let layout = stack.path("layout");
    let src = stack.rgctl(&["demo-image", "--out", &layout.display().to_string(), "--tag", "v1", "--salt", "tls"]);
    let dst = format!("docker://{host}/acme/web/app:v1");
    let push = stack.skopeo(&[
        "copy",
        "--dest-tls-verify=true",
        "--dest-cert-dir",
        &good,
        "--dest-creds",
        "dev:dev-pass",
        src.trim(),
        &dst,
    ]);
    assert!(push.status.success(), "skopeo push over TLS failed: {}", stderr(&push));
    let inspect =
        stack.skopeo(&["inspect", "--tls-verify=true", "--cert-dir", &good, "--creds", "rita:rita-pass", &dst]);
    assert!(inspect.status.success(), "skopeo inspect over TLS failed: {}", stderr(&inspect));
    let denied = stack.skopeo(&[
        "copy",
        "--dest-tls-verify=true",
        "--dest-cert-dir",
        &good,
        "--dest-creds",
        "rita:rita-pass",
        src.trim(),
        &format!("docker://{host}/acme/web/app:v2"),
    ]);
    assert!(!denied.status.success(), "a reporter pushed over TLS");

    // A wrong CA (another development CA) and no CA at all are refused by the client.
    let other = stack.path("other-ca");
    fs::create_dir_all(&other).unwrap();
    let made = Command::new("openssl")
        .current_dir(&other)
        .args(["req", "-x509", "-days", "1", "-subj", "/CN=another CA", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-keyout", "key.pem", "-out", "ca.pem"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let wrong = cert_dir(&stack, "certs-wrong", &other.join("ca.pem"));
    for (what, dir) in [("a wrong CA", Some(wrong.as_str())), ("no CA", None)] {
        let mut args = vec!["login", "--tls-verify=true"];
        if let Some(d) = dir {
            args.extend(["--cert-dir", d]);
        }
        args.extend(["-u", "dev", "-p", "dev-pass", &host]);
        let refused = stack.skopeo(&args);
        assert!(!refused.status.success(), "skopeo login trusted {what}");
        let msg = stderr(&refused);
        assert!(msg.contains("x509") || msg.contains("certificate"), "{what}: unclear refusal: {msg}");
    }

    // podman: login, push and pull with the CA, verifying.
    let Some(podman) = Podman::new(&stack.path("podman")) else { return };
    let deadline = Duration::from_secs(180);
    let login = podman.run(
        "login",
        &["login", "--tls-verify=true", "--cert-dir", &good, "-u", "dev", "-p", "dev-pass", &host],
        deadline,
    );
    assert!(login.success(), "podman login over TLS failed: {}", login.output());
    let image = podman.load(src.trim());
    let push = podman.run(
        "push",
        &["push", "--tls-verify=true", "--cert-dir", &good, &image, &format!("docker://{host}/acme/web/app:podman")],
        deadline,
    );
    assert!(push.success(), "podman push over TLS failed: {}", push.output());
    let pull = podman.run(
        "pull",
        &["pull", "--tls-verify=true", "--cert-dir", &good, &format!("{host}/acme/web/app:podman")],
        deadline,
    );
    assert!(pull.success(), "podman pull over TLS failed: {}", pull.output());
    let wrong_pull = podman.run(
        "pull-wrong-ca",
        &["pull", "--tls-verify=true", "--cert-dir", &wrong, &format!("{host}/acme/web/app:podman")],
        deadline,
    );
    assert!(!wrong_pull.success(), "podman trusted a wrong CA");
}
