//! JSON deserialisation whose errors name the place: `$.protection_rules[3].id`.
//!
//! With the `error-paths` feature (on by default: `rgctl`, the token service, tests) errors
//! carry the JSON path, through `serde_path_to_error`. The filter builds the core without
//! it to stay under 1 MiB of wasm (the path-tracking wrapper is instantiated for every
//! configuration type): its errors then name `$` and serde's line and column. Operators see
//! the paths where they matter, in `rgctl validate`/`sign`, before a bundle reaches a filter.

use serde::Deserialize;

/// Where (`$`, or a JSON path starting with `$.`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

/// Deserialises `T` from JSON bytes.
pub fn from_slice<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, PathError> {
    #[cfg(feature = "error-paths")]
    {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." || path == "?" { "$".to_owned() } else { format!("$.{path}") };
            PathError { path, reason: e.into_inner().to_string() }
        })
    }
    #[cfg(not(feature = "error-paths"))]
    {
        serde_json::from_slice(bytes).map_err(|e| PathError { path: "$".to_owned(), reason: e.to_string() })
    }
}

/// `#[serde(deserialize_with = "…")]` for an `Option<Cow<str>>` that borrows from the input
/// when the JSON string has no escapes. (serde's own `borrow` attribute borrows a bare
/// `Cow<str>` only; inside an `Option` it always copies, which for a bundle of 100,000 rules
/// is a 20 MiB copy held through activation.) An escaped string is copied, as serde would.
pub fn borrowed_cow_str<'de, D>(d: D) -> Result<Option<std::borrow::Cow<'de, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use std::borrow::Cow;
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or null")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
        fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
    }
    d.deserialize_option(Text)
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    #[derive(serde::Deserialize)]
    struct Holder<'a> {
        #[serde(default, borrow, deserialize_with = "super::borrowed_cow_str")]
        text: Option<Cow<'a, str>>,
    }

    #[test]
    fn an_unescaped_string_is_borrowed_an_escaped_one_copied() {
        let h: Holder = super::from_slice(br#"{"text": "eyJh.eyJi.c2ln"}"#).unwrap();
        assert!(matches!(h.text, Some(Cow::Borrowed("eyJh.eyJi.c2ln"))));
        let h: Holder = super::from_slice(br#"{"text": "a\/b"}"#).unwrap();
        assert!(matches!(h.text, Some(Cow::Owned(ref s)) if s == "a/b"));
        let h: Holder = super::from_slice(br#"{"text": null}"#).unwrap();
        assert!(h.text.is_none());
        let h: Holder = super::from_slice(br#"{}"#).unwrap();
        assert!(h.text.is_none());
        let e = super::from_slice::<Holder>(br#"{"text": 3}"#).err().unwrap();
        assert!(e.reason.contains("a string or null"), "{e:?}");
    }
}
