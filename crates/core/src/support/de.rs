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
