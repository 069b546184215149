//! The core is a one-way stack of layers (see the module map in `src/lib.rs`): this test
//! reads the core's source files and fails when non-test code imports from a layer above
//! its own, from a sibling layer, or from a module of its own layer listed after it.

use std::collections::BTreeSet;
use std::path::Path;

/// Each layer with the layers it may use, and its modules in order: a module may use the
/// modules listed before it in its own layer.
const LAYERS: &[(&str, &[&str], &[&str])] = &[
    ("support", &[], &["text", "json", "de"]),
    ("request", &["support"], &["access", "name", "scope", "route"]),
    (
        "token",
        &["support", "request"],
        &["es256", "keys", "jwks", "keys_source", "claims", "verify", "sign", "user", "testing"],
    ),
    (
        "policy",
        &["support", "request", "token"],
        &["deploy", "protection", "claims", "bundle", "directory", "oci", "follow"],
    ),
    (
        "decide",
        &["support", "request", "token", "policy", "events"],
        &["config", "decision", "guard", "audit", "corpus"],
    ),
    ("issue", &["support", "request", "token", "policy"], &["grant", "job", "principal"]),
    ("inspect", &["support", "request", "token", "policy", "decide", "issue"], &["explain", "review"]),
    // A leaf beside the stack, one module (`events/mod.rs`).
    ("events", &["support"], &[]),
];

fn layer(name: &str) -> Option<&'static (&'static str, &'static [&'static str], &'static [&'static str])> {
    LAYERS.iter().find(|(l, _, _)| *l == name)
}

/// The code of a source file without its test modules and comments.
fn non_test_code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let next = lines.iter().skip(i + 1).find(|l| !l.trim().is_empty()).map_or("", |l| l.trim());
        if line.trim() == "#[cfg(test)]" && next.starts_with("mod ") {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every `crate::a::b` and `super::b` path in `code`, as (`a` or `None` for `super`, `b`).
fn paths(code: &str) -> Vec<(Option<String>, Option<String>)> {
    let mut found = Vec::new();
    for (prefix, is_crate) in [("crate::", true), ("super::", false)] {
        for (at, _) in code.match_indices(prefix) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at + prefix.len()..];
            let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
            let first = ident(rest);
            if is_crate {
                let second = rest[first.len()..].strip_prefix("::").map(ident).filter(|s| !s.is_empty());
                found.push((Some(first), second));
            } else {
                found.push((None, Some(first).filter(|s| !s.is_empty())));
            }
        }
    }
    found
}

/// The violations of module `module` of layer `own` whose non-test code is `code`.
fn violations(own: &str, module: &str, code: &str) -> Vec<String> {
    let Some((_, may_use, order)) = layer(own) else { return vec![format!("`{own}` is not a layer")] };
    let position = |m: &str| order.iter().position(|o| *o == m);
    let mut out = BTreeSet::new();
    for (target_layer, target_module) in paths(code) {
        let target_layer = target_layer.unwrap_or_else(|| own.to_owned());
        if target_layer == own {
            let Some(m) = target_module else { continue };
            match (position(module), position(&m)) {
                (Some(a), Some(b)) if b < a => {}
                (_, None) => {} // an item of the layer's `mod.rs`, not a module
                _ if m == module => {}
                _ => {
                    out.insert(format!("{own}::{module} uses its sibling `{own}::{m}`, listed after it"));
                }
            }
        } else if layer(&target_layer).is_some() && !may_use.contains(&target_layer.as_str()) {
            out.insert(format!("{own}::{module} uses layer `{target_layer}`, which it may not"));
        } else if layer(&target_layer).is_none() {
            out.insert(format!("{own}::{module} uses `crate::{target_layer}`, which is not a layer"));
        }
    }
    out.into_iter().collect()
}

#[test]
fn imports_only_point_down() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut seen = 0;
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_file() {
            if name != "lib.rs" {
                problems.push(format!("src/{name}: every module belongs to a layer folder"));
            }
            continue;
        }
        let Some((_, _, order)) = layer(&name) else {
            problems.push(format!("src/{name}/ is not a layer listed in this test"));
            continue;
        };
        for file in std::fs::read_dir(&path).unwrap() {
            let file = file.unwrap().path();
            let file_name = file.file_name().unwrap().to_str().unwrap().to_owned();
            let module = file_name.trim_end_matches(".rs").to_owned();
            if module != "mod" && !order.contains(&module.as_str()) {
                problems.push(format!("src/{name}/{file_name}: add the module to its layer's order in this test"));
            }
            let text = std::fs::read_to_string(&file).unwrap();
            if module == "mod" && name != "events" && text.contains("pub use") {
                problems.push(format!("src/{name}/mod.rs re-exports: import items from their module"));
            }
            problems.extend(violations(&name, &module, &non_test_code(&text)));
            seen += 1;
        }
    }
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    if lib.contains("pub use") {
        problems.push("src/lib.rs re-exports: the crate root holds the layers only".into());
    }
    assert!(seen > 20, "read only {seen} files under {}", src.display());
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn the_check_catches_upward_sideways_and_later_sibling_imports() {
    let upward = "use crate::decide::decision::Decision;\n";
    assert_eq!(violations("policy", "bundle", upward).len(), 1);
    let sideways = "fn f() { crate::issue::grant::Grant; }\n";
    assert_eq!(violations("decide", "guard", sideways).len(), 1);
    let later_sibling = "use crate::policy::directory::Directory;\n";
    assert_eq!(violations("policy", "bundle", later_sibling).len(), 1);
    let later_by_super = "use super::bundle::Policy;\n";
    assert_eq!(violations("policy", "deploy", later_by_super).len(), 1);
    let down = "use crate::token::keys::SigningKey;\nuse crate::policy::deploy::Owner;\nuse super::claims::Claims;\n";
    assert!(violations("policy", "bundle", down).is_empty());
    let in_tests =
        "use crate::request::name::is_tag;\n#[cfg(test)]\nmod tests {\n    use crate::inspect::explain::explain;\n}\n";
    assert!(violations("request", "route", &non_test_code(in_tests)).is_empty());
    let in_comment = "//! See [`crate::inspect::review`].\n";
    assert!(violations("request", "route", &non_test_code(in_comment)).is_empty());
}
