//! The route grammar of the distribution API: which repositories and actions a request needs.
//!
//! Strict by design: anything that does not parse under the OCI grammar, or that could be
//! read two ways (percent-encoded path bytes, `..`, `//`, `;`, repeated `mount`/`from`), is
//! refused here and never forwarded on a guess.

use crate::request::access::{Action, ActionSet};
use crate::request::name::{is_digest, is_reference, is_repository_name, is_upload_id};
use crate::request::scope::Scope;
use crate::support::text::quote;

/// What a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET|HEAD /v2/`: version check; any valid token.
    Base,
    /// `GET /v2/_catalog`.
    Catalog,
    Manifest {
        name: String,
        reference: String,
    },
    Blob {
        name: String,
        digest: String,
    },
    /// `POST /v2/<name>/blobs/uploads/`, optionally mounting `digest` from `from`.
    UploadStart {
        name: String,
        mount: Option<String>,
        from: Option<String>,
    },
    /// `GET|PATCH|PUT|DELETE /v2/<name>/blobs/uploads/<id>`.
    Upload {
        name: String,
        id: String,
    },
    TagsList {
        name: String,
    },
    Referrers {
        name: String,
        digest: String,
    },
}

impl Endpoint {
    /// The repository the request is about, if any.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Endpoint::Base | Endpoint::Catalog => None,
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::UploadStart { name, .. }
            | Endpoint::Upload { name, .. }
            | Endpoint::TagsList { name }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }
}

/// A classified request: the endpoint and every scope it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    pub endpoint: Endpoint,
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    pub fn parse(m: &str) -> Option<Method> {
        match m {
            "GET" => Some(Method::Get),
            "HEAD" => Some(Method::Head),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "PATCH" => Some(Method::Patch),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }
}

/// Why a request was refused before any authentication: status, OCI error code, message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl RouteError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> RouteError {
        RouteError { status, code, message: message.into() }
    }
    fn not_found(path: &str) -> RouteError {
        RouteError::new(404, "NOT_FOUND", format!("`{}` is not a registry API endpoint", quote(path)))
    }
    fn bad_name(name: &str) -> RouteError {
        RouteError::new(400, "NAME_INVALID", format!("invalid repository name `{}`", quote(name)))
    }
    fn method(method: &str, path: &str) -> RouteError {
        RouteError::new(405, "UNSUPPORTED", format!("method `{}` is not allowed on `{}`", quote(method), quote(path)))
    }
}

/// The last two components of a name that Envoy's dependency-proxy route would take for the
/// marker of a pull-through cache path (see `classify_repository_path`).
const DEPENDENCY_PROXY_TAIL: &str = "/dependency_proxy/containers";

fn set(actions: &[Action]) -> ActionSet {
    ActionSet::of(actions)
}

/// Classifies one request. `path` is the `:path` pseudo-header (path and query);
/// `content_type` is used to refuse form bodies that distribution would read `mount`/`from`
/// from, which a header-only filter cannot see.
pub fn classify(method: &str, path: &str, content_type: Option<&str>) -> Result<Route, RouteError> {
    let (path_only, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    check_path_is_unambiguous(path_only)?;
    let m = Method::parse(method).ok_or_else(|| RouteError::method(method, path_only))?;
    let rest = match path_only.strip_prefix("/v2/") {
        Some(rest) => rest,
        None => return Err(RouteError::not_found(path_only)),
    };

    let (endpoint, actions_for_name): (Endpoint, ActionSet) = if rest.is_empty() {
        require(m, &[Method::Get, Method::Head], method, path_only)?;
        return Ok(Route { method: m, endpoint: Endpoint::Base, scopes: Vec::new() });
    } else if rest == "_catalog" {
        require(m, &[Method::Get], method, path_only)?;
        return Ok(Route { method: m, endpoint: Endpoint::Catalog, scopes: vec![Scope::catalog()] });
    } else {
        classify_repository_path(m, method, path_only, rest)?
    };

    let name = endpoint.repository().unwrap_or_default().to_owned();
    let mut scopes = vec![Scope::repository(name.clone(), actions_for_name)];
    let endpoint = match endpoint {
        Endpoint::UploadStart { name, .. } => {
            let q = parse_upload_query(query, content_type)?;
            if let Some(from) = &q.from {
                if from != &name {
                    scopes.push(Scope::repository(from.clone(), set(&[Action::Pull])));
                }
            }
            Endpoint::UploadStart { name, mount: q.mount, from: q.from }
        }
        other => other,
    };
    Ok(Route { method: m, endpoint, scopes })
}

fn require(m: Method, allowed: &[Method], method: &str, path: &str) -> Result<(), RouteError> {
    if allowed.contains(&m) {
        Ok(())
    } else {
        Err(RouteError::method(method, path))
    }
}

fn check_path_is_unambiguous(path: &str) -> Result<(), RouteError> {
    let reject = |what: &str| {
        Err(RouteError::new(
            400,
            "NAME_INVALID",
            format!("path `{}` {what}; refusing an ambiguous request", quote(path)),
        ))
    };
    if !path.starts_with('/') {
        return reject("does not start with `/`");
    }
    if path.contains('%') {
        return reject("contains percent-encoded bytes");
    }
    if path.contains("//") {
        return reject("contains an empty segment (`//`)");
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return reject("contains a `.` or `..` segment");
    }
    if let Some(c) = path.chars().find(|c| matches!(c, ';' | '#' | '\\') || !c.is_ascii_graphic()) {
        return reject(&format!("contains the character `{}`", quote(c.encode_utf8(&mut [0; 4]))));
    }
    Ok(())
}

/// `rest` is the path after `/v2/`. The endpoint is recognised from the end of the path, so a
/// name may itself contain `manifests`, `blobs` or `tags` components, as distribution allows.
fn classify_repository_path(
    m: Method,
    method: &str,
    path: &str,
    rest: &str,
) -> Result<(Endpoint, ActionSet), RouteError> {
    let pull = set(&[Action::Pull]);
    let pull_push = set(&[Action::Pull, Action::Push]);
    let delete = set(&[Action::Delete]);
    let named = |name: &str| -> Result<String, RouteError> {
        if !is_repository_name(name) {
            return Err(RouteError::bad_name(name));
        }
        // One route grammar with Envoy: its dependency-proxy route matches any path with
        // `/dependency_proxy/containers/` after a group, so a name ending in those two
        // components (`acme/dependency_proxy/containers`) would be decided here as a plain
        // repository and routed there as an image named after the endpoint. Refused.
        if name.ends_with(DEPENDENCY_PROXY_TAIL) && name.len() > DEPENDENCY_PROXY_TAIL.len() {
            return Err(RouteError::new(
                400,
                "NAME_INVALID",
                format!(
                    "invalid repository name `{}`: `dependency_proxy/containers` must be followed by an image name",
                    quote(name)
                ),
            ));
        }
        Ok(name.to_owned())
    };

    // `<name>/blobs/uploads/` (trailing slash: the last segment is empty).
    if let Some(name) = rest.strip_suffix("/blobs/uploads/") {
        require(m, &[Method::Post], method, path)?;
        let name = named(name)?;
        return Ok((Endpoint::UploadStart { name, mount: None, from: None }, pull_push));
    }
    let (head, last) = rest.rsplit_once('/').ok_or_else(|| RouteError::not_found(path))?;
    let (name_part, kind) = head.rsplit_once('/').ok_or_else(|| RouteError::not_found(path))?;
    match kind {
        "manifests" => {
            if !is_reference(last) {
                return Err(invalid_manifest_reference(last));
            }
            let name = named(name_part)?;
            let actions = match m {
                Method::Get | Method::Head => pull,
                Method::Put => pull_push,
                Method::Delete => delete,
                _ => return Err(RouteError::method(method, path)),
            };
            Ok((Endpoint::Manifest { name, reference: last.to_owned() }, actions))
        }
        "blobs" => {
            if !is_digest(last) {
                return Err(invalid_blob_digest(last));
            }
            let name = named(name_part)?;
            let actions = match m {
                Method::Get | Method::Head => pull,
                Method::Delete => delete,
                _ => return Err(RouteError::method(method, path)),
            };
            Ok((Endpoint::Blob { name, digest: last.to_owned() }, actions))
        }
        "uploads" => {
            let name = name_part.strip_suffix("/blobs").ok_or_else(|| RouteError::not_found(path))?;
            if !is_upload_id(last) {
                return Err(RouteError::new(
                    404,
                    "BLOB_UPLOAD_UNKNOWN",
                    format!("invalid upload id `{}`", quote(last)),
                ));
            }
            let name = named(name)?;
            require(m, &[Method::Get, Method::Patch, Method::Put, Method::Delete], method, path)?;
            Ok((Endpoint::Upload { name, id: last.to_owned() }, pull_push))
        }
        "tags" if last == "list" => {
            let name = named(name_part)?;
            require(m, &[Method::Get, Method::Head], method, path)?;
            Ok((Endpoint::TagsList { name }, pull))
        }
        "referrers" => {
            if !is_digest(last) {
                return Err(RouteError::new(
                    400,
                    "DIGEST_INVALID",
                    format!("invalid referrers digest `{}`", quote(last)),
                ));
            }
            let name = named(name_part)?;
            require(m, &[Method::Get, Method::Head], method, path)?;
            Ok((Endpoint::Referrers { name, digest: last.to_owned() }, pull))
        }
        _ => Err(RouteError::not_found(path)),
    }
}

/// A manifest reference that is neither a tag nor a digest. Distribution 2.8.2's router
/// only knows `<tag>` and `<digest>` references, so anything else is 404 there, and the OCI
/// spec answers 404 (conformance: `manifests/.INVALID_MANIFEST_NAME`): 404 `MANIFEST_UNKNOWN`.
/// A digest-shaped reference that does not verify (`sha256:totallywrong`, where distribution
/// answers 500) stays a clean 400 `MANIFEST_INVALID`. Never forwarded either way.
fn invalid_manifest_reference(reference: &str) -> RouteError {
    let shown = quote(reference);
    if is_digest_shaped(reference) {
        RouteError::new(400, "MANIFEST_INVALID", format!("invalid manifest digest `{shown}`"))
    } else {
        RouteError::new(404, "MANIFEST_UNKNOWN", format!("manifest unknown: `{shown}` is neither a tag nor a digest"))
    }
}

/// A blob path segment that is not a valid digest: 404 `BLOB_UNKNOWN` when it does not even
/// look like one (distribution's router: 404; the spec: 404), 400 `DIGEST_INVALID` when it
/// does but fails (as distribution answers, e.g. `sha256:abc`).
fn invalid_blob_digest(digest: &str) -> RouteError {
    let shown = quote(digest);
    if is_digest_shaped(digest) {
        RouteError::new(400, "DIGEST_INVALID", format!("invalid blob digest `{shown}`"))
    } else {
        RouteError::new(404, "BLOB_UNKNOWN", format!("blob unknown: `{shown}` is not a digest"))
    }
}

/// The shape distribution's router accepts as a digest before parsing it (go-digest's
/// `DigestRegexp`): `[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+`.
fn is_digest_shaped(s: &str) -> bool {
    let Some((algorithm, encoded)) = s.split_once(':') else { return false };
    let component = |c: &str| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let mut rest = algorithm;
    let algorithm_ok = loop {
        match rest.find(['.', '+', '_', '-']) {
            Some(i) => {
                let (head, tail) = rest.split_at(i);
                if !component(head) {
                    break false;
                }
                rest = tail.get(1..).unwrap_or_default();
            }
            None => break component(rest),
        }
    };
    algorithm_ok
        && !encoded.is_empty()
        && encoded.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

struct UploadQuery {
    mount: Option<String>,
    from: Option<String>,
}

fn parse_upload_query(query: Option<&str>, content_type: Option<&str>) -> Result<UploadQuery, RouteError> {
    // `content_type` may hold several values joined by `,` (a repeated header, as Envoy
    // merges it): refused if any of them is a form type, whichever one the registry reads.
    for value in content_type.unwrap_or_default().split(',') {
        let media = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if media == "application/x-www-form-urlencoded" || media == "multipart/form-data" {
            return Err(RouteError::new(
                400,
                "UNSUPPORTED",
                format!("upload start with a form body (`{media}`) is refused: `mount`/`from` must be in the query"),
            ));
        }
    }
    let mut out = UploadQuery { mount: None, from: None };
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key)?;
        let slot = match key.as_str() {
            "mount" => &mut out.mount,
            "from" => &mut out.from,
            _ => continue,
        };
        if slot.is_some() {
            return Err(RouteError::new(
                400,
                "UNSUPPORTED",
                format!("query parameter `{}` is given more than once", quote(&key)),
            ));
        }
        *slot = Some(percent_decode(raw_value)?);
    }
    if let Some(from) = &out.from {
        if !is_repository_name(from) {
            return Err(RouteError::new(400, "NAME_INVALID", format!("invalid `from` repository `{}`", quote(from))));
        }
    }
    if let Some(mount) = &out.mount {
        if !is_digest(mount) {
            return Err(RouteError::new(400, "DIGEST_INVALID", format!("invalid `mount` digest `{}`", quote(mount))));
        }
    }
    Ok(out)
}

/// Decodes `application/x-www-form-urlencoded` query text (`+` is a space, as in Go's
/// `url.ParseQuery`, which distribution uses); malformed escapes are an error.
fn percent_decode(s: &str) -> Result<String, RouteError> {
    let bad = || RouteError::new(400, "UNSUPPORTED", format!("malformed percent-encoding in query `{}`", quote(s)));
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = bytes.next().and_then(hex).ok_or_else(bad)?;
                let lo = bytes.next().and_then(hex).ok_or_else(bad)?;
                out.push(hi << 4 | lo);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(method: &str, path: &str) -> Vec<String> {
        classify(method, path, None).unwrap().scopes.iter().map(|s| s.to_string()).collect()
    }

    fn err(method: &str, path: &str) -> (u16, &'static str) {
        let e = classify(method, path, None).unwrap_err();
        (e.status, e.code)
    }

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    #[test]
    fn table_of_endpoints() {
        let cases: &[(&str, String, &[&str])] = &[
            ("GET", "/v2/".into(), &[]),
            ("HEAD", "/v2/".into(), &[]),
            ("GET", "/v2/_catalog?n=10".into(), &["registry:catalog:*"]),
            ("GET", "/v2/acme/web/manifests/v1".into(), &["repository:acme/web:pull"]),
            ("HEAD", format!("/v2/acme/web/manifests/{D}"), &["repository:acme/web:pull"]),
            ("PUT", "/v2/acme/web/manifests/v1".into(), &["repository:acme/web:pull,push"]),
            ("DELETE", "/v2/acme/web/manifests/v1".into(), &["repository:acme/web:delete"]),
            ("GET", format!("/v2/acme/web/blobs/{D}"), &["repository:acme/web:pull"]),
            ("DELETE", format!("/v2/acme/web/blobs/{D}"), &["repository:acme/web:delete"]),
            ("POST", "/v2/acme/web/blobs/uploads/".into(), &["repository:acme/web:pull,push"]),
            ("PATCH", "/v2/acme/web/blobs/uploads/abc-123?_state=x".into(), &["repository:acme/web:pull,push"]),
            ("PUT", format!("/v2/acme/web/blobs/uploads/abc?digest={D}"), &["repository:acme/web:pull,push"]),
            ("GET", "/v2/acme/web/tags/list?n=5".into(), &["repository:acme/web:pull"]),
            ("GET", format!("/v2/acme/web/referrers/{D}"), &["repository:acme/web:pull"]),
            (
                "POST",
                format!("/v2/acme/web/blobs/uploads/?mount={D}&from=other%2Ftools"),
                &["repository:acme/web:pull,push", "repository:other/tools:pull"],
            ),
            ("GET", "/v2/a/blobs/b/manifests/latest".into(), &["repository:a/blobs/b:pull"]),
            ("GET", "/v2/a/manifests/tags/list".into(), &["repository:a/manifests:pull"]),
        ];
        for (m, p, want) in cases {
            assert_eq!(scopes(m, p), *want, "{m} {p}");
        }
    }

    #[test]
    fn ambiguous_or_invalid_paths_are_refused() {
        assert_eq!(err("GET", "/v2/acme%2Fweb/manifests/v1").0, 400);
        assert_eq!(err("GET", "/v2/acme//web/manifests/v1").0, 400);
        assert_eq!(err("GET", "/v2/acme/../web/manifests/v1").0, 400);
        assert_eq!(err("GET", "/v2/acme;x/manifests/v1").0, 400);
        assert_eq!(err("GET", "/v2/Acme/manifests/v1"), (400, "NAME_INVALID"));
        assert_eq!(err("GET", "/v2/acme/manifests/-bad"), (404, "MANIFEST_UNKNOWN"));
        assert_eq!(err("GET", "/v1/acme/manifests/v1").0, 404);
        assert_eq!(err("GET", "/v2/acme/blobs/uploads"), (404, "BLOB_UNKNOWN"));
        assert_eq!(err("POST", "/v2/acme/manifests/v1"), (405, "UNSUPPORTED"));
        assert_eq!(err("TRACE", "/v2/").0, 405);
        assert_eq!(err("POST", "/v2/a/blobs/uploads/?from=b&from=c").0, 400);
        assert_eq!(err("POST", &format!("/v2/a/blobs/uploads/?mount={D}&mount={D}&from=b")).0, 400);
        assert_eq!(err("POST", "/v2/a/blobs/uploads/?from=B").0, 400);
        assert_eq!(err("POST", "/v2/a/blobs/uploads/?from=%zz").0, 400);
        let long = format!("/v2/{}/manifests/v1", "a".repeat(256));
        assert_eq!(err("GET", &long), (400, "NAME_INVALID"));
    }

    #[test]
    fn invalid_references_and_digests_answer_as_distribution_does() {
        // (OCI conformance) 404 where distribution's router does not match …
        assert_eq!(err("GET", "/v2/acme/web/manifests/.INVALID_MANIFEST_NAME"), (404, "MANIFEST_UNKNOWN"));
        assert_eq!(err("HEAD", "/v2/acme/web/manifests/.INVALID_MANIFEST_NAME"), (404, "MANIFEST_UNKNOWN"));
        assert_eq!(err("PUT", "/v2/acme/web/manifests/.INVALID_MANIFEST_NAME"), (404, "MANIFEST_UNKNOWN"));
        assert_eq!(err("GET", "/v2/acme/web/blobs/.INVALID"), (404, "BLOB_UNKNOWN"));
        assert_eq!(err("GET", "/v2/acme/web/blobs/notadigest"), (404, "BLOB_UNKNOWN"));
        assert_eq!(err("DELETE", "/v2/acme/web/blobs/SHA256:abc"), (404, "BLOB_UNKNOWN"));
        // … and 400 where it parses a digest that fails (distribution: 400, or 500 for manifests).
        assert_eq!(err("GET", "/v2/acme/web/manifests/sha256:totallywrong"), (400, "MANIFEST_INVALID"));
        assert_eq!(err("GET", "/v2/acme/web/blobs/sha256:totallywrong"), (400, "DIGEST_INVALID"));
        assert_eq!(err("GET", "/v2/acme/web/blobs/sha256:abc"), (400, "DIGEST_INVALID"));
        assert!(is_digest_shaped("sha256+b64u.x-y_z:abc=-_"));
        for not in ["sha256", ":abc", "sha256:", "Sha256:abc", "sha256:a.b", "-sha:abc", "sha..x:abc"] {
            assert!(!is_digest_shaped(not), "{not}");
        }
    }

    #[test]
    fn form_bodies_on_upload_start_are_refused() {
        let e = classify("POST", "/v2/a/blobs/uploads/", Some("application/x-www-form-urlencoded; charset=utf-8"))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(classify("POST", "/v2/a/blobs/uploads/", Some("application/octet-stream")).is_ok());
        // Regression (issue 7): a repeated Content-Type arrives joined; the form one counted.
        let joined = "application/octet-stream, application/x-www-form-urlencoded";
        assert_eq!(classify("POST", "/v2/a/blobs/uploads/", Some(joined)).unwrap_err().status, 400);
    }
}
