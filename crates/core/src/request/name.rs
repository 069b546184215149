//! The OCI distribution grammar for repository names, tags, digests and upload ids.
//!
//! Hand-written matchers equivalent to the spec's regular expressions; they run on every
//! request in the filter, so they avoid allocation and backtracking.

/// Maximum length of a repository name, as distribution enforces it.
pub const MAX_NAME_LEN: usize = 255;

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most 255 bytes.
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('/').all(is_path_component)
}

/// One path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn is_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    let n = bytes.len();
    // At the start of each loop iteration we expect a run of [a-z0-9]+.
    loop {
        let start = i;
        while i < n && bytes.get(i).copied().is_some_and(alnum) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == n {
            return true;
        }
        // separator: `.`, `_`, `__` or `-+`
        match bytes.get(i) {
            Some(b'.') => i += 1,
            Some(b'_') => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            Some(b'-') => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() || b == b'_' => {}
        _ => return false,
    }
    tag.len() <= 128 && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `algorithm:encoded` with algorithm `[a-z0-9]+([+._-][a-z0-9]+)*` and encoded
/// `[a-zA-Z0-9=_-]+`; `sha256` and `sha512` must be lowercase hex of the right length.
pub fn is_digest(digest: &str) -> bool {
    let Some((alg, encoded)) = digest.split_once(':') else {
        return false;
    };
    // The registered algorithms (nearly every digest): lowercase hex of their length, which
    // implies the general grammar below; one pass over the bytes.
    let hex_len = match alg {
        "sha256" => Some(64),
        "sha512" => Some(128),
        _ => None,
    };
    if let Some(len) = hex_len {
        return encoded.len() == len && encoded.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    }
    let alg_ok = !alg.is_empty()
        && alg
            .split(['+', '.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    let enc_ok =
        !encoded.is_empty() && encoded.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'));
    alg_ok && enc_ok
}

/// A manifest reference: a tag or a digest.
pub fn is_reference(reference: &str) -> bool {
    is_tag(reference) || is_digest(reference)
}

/// Upload session ids as distribution routes them: `[a-zA-Z0-9-_.=]+`.
pub fn is_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        for ok in ["a", "acme/web", "acme/web/app", "a.b", "a_b", "a__b", "a---b", "0/1/2", "a/blobs/b"] {
            assert!(is_repository_name(ok), "{ok}");
        }
        for bad in [
            "", "A", "acme/Web", "a//b", "/a", "a/", "a..b", "a___b", ".a", "a.", "a-", "-a", "a b", "a%2Fb", "a/../b",
            "a;b", "é",
        ] {
            assert!(!is_repository_name(bad), "{bad}");
        }
        assert!(is_repository_name(&"a".repeat(255)));
        assert!(!is_repository_name(&"a".repeat(256)));
    }

    #[test]
    fn tags_digests_uploads() {
        assert!(is_tag("v1") && is_tag("_x") && is_tag("Latest.1-rc_2"));
        assert!(!is_tag("") && !is_tag(".x") && !is_tag("-x") && !is_tag("a:b"));
        assert!(is_tag(&"a".repeat(128)) && !is_tag(&"a".repeat(129)));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(is_digest(&d) && is_reference(&d));
        assert!(!is_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_digest("sha256:abc") && !is_digest("sha256") && !is_digest(":abc"));
        assert!(is_digest("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8"));
        assert!(is_upload_id("2f1c2b3a-1234-4cde-8f00-aa55aa55aa55"));
        assert!(!is_upload_id("a/b") && !is_upload_id(""));
    }
}
