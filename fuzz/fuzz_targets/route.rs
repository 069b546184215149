//! The route grammar: method, path and Content-Type from the input (separated by `\n`).
//! Nothing may panic; a classified request must name only well-formed repositories and
//! come from an unambiguous path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use registry_guard_core::request::name::is_repository_name;
use registry_guard_core::request::route::{classify, Endpoint};
use registry_guard_core::request::scope::Resource;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\n');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let content_type = parts.next();
    let Ok(route) = classify(method, path, content_type) else { return };
    let path_only = path.split('?').next().unwrap_or_default();
    assert!(path_only.starts_with("/v2/"), "classified a path outside /v2/: {path:?}");
    for bad in ["%", "//", "/../", "/./", ";", "#", "\\"] {
        assert!(!path_only.contains(bad), "classified an ambiguous path {path:?}");
    }
    assert!(!path_only.ends_with("/..") && !path_only.ends_with("/."), "{path:?}");
    for scope in &route.scopes {
        if let Resource::Repository(name) = &scope.resource {
            assert!(is_repository_name(name), "scope names an invalid repository {name:?}");
        }
    }
    if let Some(name) = route.endpoint.repository() {
        // The repository is a literal part of the path, right after `/v2/`.
        assert!(path_only["/v2/".len()..].starts_with(&format!("{name}/")), "{name:?} vs {path:?}");
    }
    if let Endpoint::UploadStart { from: Some(from), .. } = &route.endpoint {
        assert!(is_repository_name(from));
    }
});
