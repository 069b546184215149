//! Request headers as the host hands them over: one buffer in proxy-wasm's map serialisation,
//! read in place.
//!
//! The SDK's `get_map` copies every name and value into a `String` and `unwrap`s the UTF-8
//! conversion, so a header value with obs-text bytes (`\xff`, which Envoy forwards) trapped
//! the VM — and, with `FAIL_RELOAD`, reloaded it — on every such request. Here the buffer is
//! parsed without copies, values are bytes, and a malformed buffer is an error, never a panic.

/// A serialised header map: `u32` count, then `count` pairs of `u32` name and value lengths,
/// then each name and value followed by a NUL byte (all integers little-endian).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    buf: Vec<u8>,
}

impl HeaderMap {
    /// Wraps a buffer in the host's serialisation (checked when iterated).
    pub fn from_serialized(buf: Vec<u8>) -> HeaderMap {
        HeaderMap { buf }
    }

    /// Serialises `pairs` (fakes and tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> HeaderMap {
        let pairs: Vec<_> = pairs.into_iter().collect();
        let mut buf = Vec::new();
        buf.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
        for (name, value) in &pairs {
            buf.extend_from_slice(&len_u32(name.len()).to_le_bytes());
            buf.extend_from_slice(&len_u32(value.len()).to_le_bytes());
        }
        for (name, value) in &pairs {
            buf.extend_from_slice(name.as_bytes());
            buf.push(0);
            buf.extend_from_slice(value);
            buf.push(0);
        }
        HeaderMap { buf }
    }

    /// The pairs in order; an error names the first malformed place.
    pub fn pairs(&self) -> Result<Vec<Pair<'_>>, String> {
        let buf = self.buf.as_slice();
        if buf.is_empty() {
            return Ok(Vec::new());
        }
        let count = word(buf, 0).ok_or("header map shorter than its count")?;
        let sizes_end = count.checked_mul(8).and_then(|n| n.checked_add(4)).filter(|&n| n <= buf.len());
        let mut at = sizes_end.ok_or_else(|| format!("header map of {} bytes cannot hold {count} pairs", buf.len()))?;
        let mut pairs = Vec::with_capacity(count);
        for i in 0..count {
            let name_len = word(buf, 4 + i * 8).ok_or("header map sizes truncated")?;
            let value_len = word(buf, 8 + i * 8).ok_or("header map sizes truncated")?;
            let name = field(buf, &mut at, name_len).ok_or_else(|| format!("header map name {i} truncated"))?;
            let value = field(buf, &mut at, value_len).ok_or_else(|| format!("header map value {i} truncated"))?;
            pairs.push((name, value));
        }
        Ok(pairs)
    }
}

/// A header name and value, borrowed from the buffer.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The little-endian `u32` at `at`.
fn word(buf: &[u8], at: usize) -> Option<usize> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

/// `len` bytes at `*at`, then a NUL; advances `*at` past both.
fn field<'a>(buf: &'a [u8], at: &mut usize, len: usize) -> Option<&'a [u8]> {
    let end = at.checked_add(len)?;
    let bytes = buf.get(*at..end)?;
    if buf.get(end) != Some(&0) {
        return None;
    }
    *at = end + 1;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_bytes() {
        let map = HeaderMap::from_pairs([(":path", &b"/v2/"[..]), ("x-latin1", &b"caf\xe9"[..]), ("empty", &b""[..])]);
        let pairs = map.pairs().unwrap();
        assert_eq!(
            pairs,
            vec![(&b":path"[..], &b"/v2/"[..]), (&b"x-latin1"[..], &b"caf\xe9"[..]), (&b"empty"[..], &b""[..])]
        );
        assert_eq!(HeaderMap::default().pairs().unwrap(), Vec::<Pair>::new());
    }

    #[test]
    fn malformed_buffers_are_errors() {
        let good = HeaderMap::from_pairs([("a", &b"1"[..]), ("bb", &b"22"[..])]).buf;
        for cut in 1..good.len() {
            let map = HeaderMap::from_serialized(good[..cut].to_vec());
            assert!(map.pairs().is_err(), "cut at {cut}");
        }
        // A count that cannot fit, a missing NUL, lengths past the end.
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderMap::from_serialized(huge).pairs().is_err());
        let mut no_nul = good.clone();
        let first_nul = 4 + 2 * 8 + 1;
        no_nul[first_nul] = b'x';
        assert!(HeaderMap::from_serialized(no_nul).pairs().is_err());
        let mut long = good;
        long[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(HeaderMap::from_serialized(long).pairs().is_err());
    }
}
