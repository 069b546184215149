//! Strict JSON for signed documents: no object may repeat a key, at any depth.
//!
//! serde's derived structs refuse a repeated *known* field, but flattened maps,
//! `serde_json::Value` and ignored fields keep the last value silently. For a signed token or
//! bundle that is an ambiguity (a reviewer or another parser may read the first value), so
//! signed JSON is walked once with this checker before it is interpreted.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The top-level keys of the JSON object in `bytes`, in document order. Fails if `bytes` is
/// not exactly one JSON object, or if any object in it repeats a key (after unescaping).
pub fn strict_object_keys(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let keys = de.deserialize_map(TopLevel).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(keys)
}

/// Any JSON value, checked for repeated keys and discarded.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(AnyValue)
    }
}

struct AnyValue;

impl<'de> Visitor<'de> for AnyValue {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_none<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Checked, A::Error> {
        check_map(map).map(|_| Checked)
    }
}

struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Vec<String>, A::Error> {
        check_map(map)
    }
}

fn check_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Vec<String>, A::Error> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        map.next_value::<Checked>()?;
        if !seen.insert(key.clone()) {
            let shown: String = key.chars().take(64).flat_map(char::escape_debug).collect();
            return Err(serde::de::Error::custom(format_args!("duplicate key `{shown}`")));
        }
        order.push(key);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert_eq!(strict_object_keys(br#"{"a":1,"b":[{"c":{}}]}"#).unwrap(), ["a", "b"]);
        for bad in [
            &br#"{"a":1,"a":1}"#[..],
            br#"{"a":1,"\u0061":2}"#,
            br#"{"a":{"b":1,"b":2}}"#,
            br#"{"a":[{"b":1},{"c":1,"c":null}]}"#,
            br#"[]"#,
            br#""a""#,
            br#"{"a":1} x"#,
            br#"{"a":1}{}"#,
            b"",
        ] {
            assert!(strict_object_keys(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // serde_json's recursion limit applies: deep nesting is an error, not a stack overflow.
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(strict_object_keys(deep.as_bytes()).is_err());
    }
}
