//! Client-controlled text (paths, names, methods, request ids, usernames, scopes) as it may
//! appear in an error message, an audit line, a log line or a stored record: bounded in
//! length and restricted to a safe character set, so no client can grow a log line, a
//! correlation record or an event by sending a long header, or forge a line with control
//! characters or quotes.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest client-supplied text quoted in a message, in characters (after escaping).
pub const MAX_QUOTED_CHARS: usize = 128;
/// Longest request path kept in an audit line, in characters (after escaping).
pub const MAX_AUDIT_PATH_CHARS: usize = 256;
/// Longest free-text reason kept in an audit line, in characters.
pub const MAX_REASON_CHARS: usize = 1024;
/// Longest `X-Request-Id` that is kept (logged, stored for correlation, copied into events).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Whether `c` is kept as is in quoted text: printable ASCII except the quote, backslash
/// and backtick characters (which frame quoted text in messages and JSON).
fn is_safe(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '`') || c == ' '
}

/// `text` made safe to quote: every character outside printable ASCII (and `"`, `\`, `` ` ``)
/// escaped as `\u{..}`, at most [`MAX_QUOTED_CHARS`] characters, then `…(+N bytes)` naming
/// what was cut. Borrowed when nothing had to change.
pub fn quote(text: &str) -> Cow<'_, str> {
    quote_max(text, MAX_QUOTED_CHARS)
}

/// [`quote`] with a bound of `max` characters.
pub fn quote_max(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max && text.chars().all(is_safe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(max.min(text.len()) + 16);
    let mut used = 0usize;
    let mut consumed = 0usize;
    for c in text.chars() {
        let piece_len = if is_safe(c) { 1 } else { escaped_len(c) };
        if used + piece_len > max {
            break;
        }
        if is_safe(c) {
            out.push(c);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        used += piece_len;
        consumed += c.len_utf8();
    }
    if consumed < text.len() {
        let _ = write!(out, "…(+{} bytes)", text.len() - consumed);
    }
    Cow::Owned(out)
}

fn escaped_len(c: char) -> usize {
    // `\u{` + hex digits + `}`
    let digits = format!("{:x}", u32::from(c)).len();
    4 + digits
}

/// Free text (a reason built from quoted parts) cut to `max` characters, on a character
/// boundary, with `…` when cut. Control characters are escaped.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max && !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(max.min(text.len()) + 4);
    for (n, c) in text.chars().enumerate() {
        if n >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The request id to log, store and copy into events: an `X-Request-Id` of 1 to
/// [`MAX_REQUEST_ID_LEN`] bytes of `[A-Za-z0-9._:/+=@-]` (UUIDs, Envoy's ids, most tracing
/// ids). Anything else is dropped (`None`): a hostile id is never stored, however long.
pub fn request_id(raw: &str) -> Option<&str> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_REQUEST_ID_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'+' | b'=' | b'@' | b'-'));
    ok.then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_text_is_borrowed() {
        assert!(matches!(quote("acme/web/app"), Cow::Borrowed("acme/web/app")));
        assert!(matches!(quote("GET /v2/ a:b"), Cow::Borrowed(_)));
    }

    #[test]
    fn unsafe_characters_are_escaped() {
        assert_eq!(quote("a\nb"), "a\\u{a}b");
        assert_eq!(quote("a`b\"c\\d"), "a\\u{60}b\\u{22}c\\u{5c}d");
        assert_eq!(quote("é"), "\\u{e9}");
    }

    #[test]
    fn long_text_is_cut_and_says_how_much() {
        let long = "a".repeat(60_000);
        let q = quote(&long);
        assert!(q.starts_with(&"a".repeat(MAX_QUOTED_CHARS)));
        assert!(q.ends_with(&format!("…(+{} bytes)", 60_000 - MAX_QUOTED_CHARS)), "{q}");
        assert!(q.chars().count() <= MAX_QUOTED_CHARS + 20);
        // Escapes count against the bound.
        let controls = "\u{1}".repeat(1000);
        let q = quote_max(&controls, 40);
        assert!(q.len() < 80, "{q}");
    }

    #[test]
    fn bounded_reasons() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("0123456789abc", 10), "0123456789…");
        assert_eq!(bounded("a\r\nb", 10), "a\\r\\nb");
    }

    #[test]
    fn request_ids() {
        for ok in ["0b8e4c1e-8a8e-4e4f-9c55-1f2d3c4b5a69", "req-1", "a:b/c+d=e@f.g_h"] {
            assert_eq!(request_id(ok), Some(ok));
        }
        for bad in ["", "a b", "a\nb", "<script>", "é", "a\"b"] {
            assert_eq!(request_id(bad), None, "{bad:?}");
        }
        assert!(request_id(&"a".repeat(MAX_REQUEST_ID_LEN)).is_some());
        assert!(request_id(&"a".repeat(MAX_REQUEST_ID_LEN + 1)).is_none());
        assert!(request_id(&"a".repeat(59 * 1024)).is_none());
    }
}
