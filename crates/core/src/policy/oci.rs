//! The signed bundle stored as an OCI artifact: the layout `rgctl push --oci` writes (and
//! `oras push` produces with the same media types), and the checks a follower applies to a
//! fetched manifest and blob before the bundle itself is verified. Pure: no I/O.
//!
//! Layout (OCI image manifest, image-spec 1.1 artifact form):
//!
//! ```json
//! {"schemaVersion": 2,
//!  "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!  "artifactType": "application/vnd.registry-guard.bundle.v1+json",
//!  "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136f…", "size": 2},
//!  "layers": [{"mediaType": "application/vnd.registry-guard.bundle.v1+jwt",
//!              "digest": "sha256:<hex of the signed bundle file>", "size": <bytes>}]}
//! ```
//!
//! The older form without `artifactType`, where the config's media type names the artifact
//! (`oras push --image-spec v1.0 --artifact-type …`), is accepted too. The registry and the
//! transport are not trusted: the blob must hash to the layer's digest, and the bundle inside
//! must then pass the operator signature, environment and revision checks.

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::request::name::{is_reference, is_repository_name};

/// The artifact type of a registry-guard bundle.
pub const ARTIFACT_TYPE: &str = "application/vnd.registry-guard.bundle.v1+json";
/// The media type of the one layer: the signed bundle file (a compact JWS).
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.registry-guard.bundle.v1+jwt";
/// OCI image manifest media type (asked for with `Accept`).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config of image-spec 1.1 artifacts, its bytes and digest.
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_CONFIG: &[u8] = b"{}";
pub const EMPTY_CONFIG_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// The largest manifest read (distribution's own limit is 4 MiB; ours is one small layer).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Where the artifact lives in the registry: `repository` and `reference` (a tag or digest).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciArtifact {
    pub repository: String,
    pub reference: String,
}

impl OciArtifact {
    /// Checks the names; the error is the field and the reason.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !is_repository_name(&self.repository) {
            return Err(("repository", format!("`{}` is not a repository name", self.repository)));
        }
        if !is_reference(&self.reference) {
            return Err(("reference", format!("`{}` is not a tag or digest", self.reference)));
        }
        Ok(())
    }

    /// `/v2/<repository>/manifests/<reference>`.
    pub fn manifest_path(&self) -> String {
        format!("/v2/{}/manifests/{}", self.repository, self.reference)
    }

    /// `/v2/<repository>/blobs/<digest>`.
    pub fn blob_path(&self, digest: &str) -> String {
        format!("/v2/{}/blobs/{digest}", self.repository)
    }
}

/// The layer holding the signed bundle, from a checked manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleLayer {
    pub digest: String,
    pub size: usize,
}

/// Why a manifest or blob is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactError {
    /// Not a registry-guard bundle artifact (media types, layers, JSON).
    Layout(String),
    /// The layer is declared larger than allowed.
    Size(String),
    /// The blob does not match its digest or declared size (truncated, tampered).
    Digest(String),
}

impl ArtifactError {
    pub fn reason(&self) -> &str {
        match self {
            ArtifactError::Layout(r) | ArtifactError::Size(r) | ArtifactError::Digest(r) => r,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: String,
    digest: String,
    size: u64,
}

/// Checks a fetched manifest: an OCI image manifest of our artifact type with exactly one
/// layer of our layer media type, a sha256 digest and a declared size of at most
/// `max_bytes`. `content_type` is the answer's `Content-Type` (used when the manifest omits
/// its `mediaType`).
pub fn check_manifest(
    bytes: &[u8],
    content_type: Option<&str>,
    max_bytes: usize,
) -> Result<BundleLayer, ArtifactError> {
    let layout = |r: String| Err(ArtifactError::Layout(r));
    let m: RawManifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => return layout(format!("the manifest is not JSON of an OCI image manifest: {e}")),
    };
    if m.schema_version != Some(2) {
        return layout("the manifest's `schemaVersion` is not 2".into());
    }
    let media_type = m.media_type.as_deref().or_else(|| content_type.map(|c| c.split(';').next().unwrap_or(c).trim()));
    if media_type != Some(MANIFEST_MEDIA_TYPE) {
        return layout(format!(
            "the manifest's media type is `{}`, expected `{MANIFEST_MEDIA_TYPE}`",
            media_type.unwrap_or("none")
        ));
    }
    let config_type = m.config.as_ref().map(|c| c.media_type.as_str());
    let ours = m.artifact_type.as_deref() == Some(ARTIFACT_TYPE)
        || (m.artifact_type.is_none() && config_type == Some(ARTIFACT_TYPE));
    if !ours {
        return layout(format!(
            "the artifact type is `{}`, expected `{ARTIFACT_TYPE}` (as `artifactType` or the config's media type)",
            m.artifact_type.as_deref().or(config_type).unwrap_or("none")
        ));
    }
    let layers = m.layers.unwrap_or_default();
    let [layer] = layers.as_slice() else {
        return layout(format!("the artifact has {} layers, expected exactly one (the signed bundle)", layers.len()));
    };
    if layer.media_type != LAYER_MEDIA_TYPE {
        return layout(format!("the layer's media type is `{}`, expected `{LAYER_MEDIA_TYPE}`", layer.media_type));
    }
    if !is_sha256_digest(&layer.digest) {
        return layout(format!("the layer's digest `{}` is not `sha256:` and 64 lowercase hex digits", layer.digest));
    }
    let size = usize::try_from(layer.size).unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(ArtifactError::Size(format!(
            "the layer is declared {} bytes, more than max_bytes {max_bytes}",
            layer.size
        )));
    }
    if size == 0 {
        return layout("the layer is declared empty".into());
    }
    Ok(BundleLayer { digest: layer.digest.clone(), size })
}

/// Checks a fetched blob against its layer: the declared size, then the sha256 digest.
pub fn check_blob(layer: &BundleLayer, blob: &[u8]) -> Result<(), ArtifactError> {
    if blob.len() != layer.size {
        return Err(ArtifactError::Digest(format!(
            "the blob is {} bytes, the manifest declares {} (truncated or tampered)",
            blob.len(),
            layer.size
        )));
    }
    let actual = sha256_digest(blob);
    if actual != layer.digest {
        return Err(ArtifactError::Digest(format!(
            "the blob's digest is {actual}, the manifest declares {} (tampered)",
            layer.digest
        )));
    }
    Ok(())
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The manifest `rgctl push --oci` writes for `bundle` (the signed bundle file's bytes), in
/// image-spec 1.1 artifact form, with the layer titled `title` as `oras push` does.
pub fn manifest_for(bundle: &[u8], title: &str) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": EMPTY_CONFIG_DIGEST, "size": EMPTY_CONFIG.len()},
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": sha256_digest(bundle),
            "size": bundle.len(),
            "annotations": {"org.opencontainers.image.title": title},
        }],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn manifest(v: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn the_pushed_layout_is_accepted_and_its_blob_verified() {
        assert_eq!(sha256_digest(EMPTY_CONFIG), EMPTY_CONFIG_DIGEST);
        let bundle = b"a.b.c";
        let m = manifest_for(bundle, "bundle.jws");
        let layer = check_manifest(&manifest(&m), None, 100).unwrap();
        assert_eq!(layer, BundleLayer { digest: sha256_digest(bundle), size: 5 });
        assert_eq!(check_blob(&layer, bundle), Ok(()));
        // Truncated, and same length but tampered.
        assert!(matches!(check_blob(&layer, b"a.b."), Err(ArtifactError::Digest(r)) if r.contains("truncated")));
        assert!(matches!(check_blob(&layer, b"a.b.d"), Err(ArtifactError::Digest(r)) if r.contains("tampered")));
    }

    #[test]
    fn the_image_spec_1_0_form_is_accepted() {
        let mut m = manifest_for(b"x", "b");
        m.as_object_mut().unwrap().remove("artifactType");
        m["config"]["mediaType"] = ARTIFACT_TYPE.into();
        assert!(check_manifest(&manifest(&m), None, 10).is_ok());
        // The mediaType from the answer's Content-Type when the manifest omits it.
        m.as_object_mut().unwrap().remove("mediaType");
        assert!(check_manifest(&manifest(&m), Some(MANIFEST_MEDIA_TYPE), 10).is_ok());
        assert!(check_manifest(&manifest(&m), None, 10).is_err());
    }

    #[test]
    fn other_layouts_are_refused_with_the_reason() {
        let ok = manifest_for(b"abc", "b");
        type Change = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "media type is `application/vnd.docker",
                Box::new(|m| m["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into()),
            ),
            (
                "artifact type is `application/vnd.example",
                Box::new(|m| m["artifactType"] = "application/vnd.example+json".into()),
            ),
            ("0 layers", Box::new(|m| m["layers"] = serde_json::json!([]))),
            (
                "2 layers",
                Box::new(|m| {
                    let l = m["layers"][0].clone();
                    m["layers"].as_array_mut().unwrap().push(l)
                }),
            ),
            ("layer's media type", Box::new(|m| m["layers"][0]["mediaType"] = "application/octet-stream".into())),
            ("not `sha256:`", Box::new(|m| m["layers"][0]["digest"] = "sha512:ab".into())),
            ("schemaVersion", Box::new(|m| m["schemaVersion"] = 1.into())),
        ];
        for (want, change) in cases {
            let mut m = ok.clone();
            change(&mut m);
            let err = check_manifest(&manifest(&m), None, 100).unwrap_err();
            assert!(matches!(&err, ArtifactError::Layout(r) if r.contains(want)), "{want}: {err:?}");
        }
        assert!(matches!(check_manifest(b"<html>", None, 100), Err(ArtifactError::Layout(_))));
        let err = check_manifest(&manifest(&ok), None, 2).unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Size(r) if r.contains("declared 3 bytes, more than max_bytes 2")),
            "{err:?}"
        );
    }

    #[test]
    fn names_are_checked() {
        let a = OciArtifact { repository: "registry-guard/policy".into(), reference: "prod".into() };
        assert_eq!(a.check(), Ok(()));
        assert_eq!(a.manifest_path(), "/v2/registry-guard/policy/manifests/prod");
        assert_eq!(a.blob_path("sha256:ab"), "/v2/registry-guard/policy/blobs/sha256:ab");
        let bad = OciArtifact { repository: "Registry Guard".into(), reference: "prod".into() };
        assert_eq!(bad.check().unwrap_err().0, "repository");
        let bad = OciArtifact { repository: "a/b".into(), reference: "no good".into() };
        assert_eq!(bad.check().unwrap_err().0, "reference");
    }
}
