//! `rgctl image build`: the filter as an OCI image in the Wasm image spec's *compat* layout,
//! the layout Istio's `WasmPlugin` and Envoy Gateway's `EnvoyExtensionPolicy` fetch: an OCI
//! image manifest with exactly one layer of media type
//! `application/vnd.oci.image.layer.v1.tar+gzip` whose tar holds `plugin.wasm`, and the
//! manifest annotation `module.wasm.image/variant=compat`.
//!
//! What Istio's fetcher (`pkg/wasm/imagefetcher.go`) accepts: a manifest that is not Docker
//! schema 2 is read as compat if its *last* layer has the OCI tar+gzip media type and a tar
//! entry whose base name is `plugin.wasm`; the `sha256` of a `WasmPlugin` is compared with the
//! image manifest's digest. Envoy Gateway's fetcher is derived from it.
//!
//! The image is written as an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`),
//! which `skopeo copy oci:DIR:TAG docker://…` pushes (`make publish-image`). The content is
//! reproducible: tar entry times are 0 and the gzip header carries no time, so the same
//! `.wasm` always gives the same manifest digest.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, DescriptorBuilder, Digest, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, RootFsBuilder, Sha256Digest,
};
use sha2::{Digest as _, Sha256};

/// The one file of the layer, as the compat spec and Istio's fetcher name it.
pub const PLUGIN_FILE: &str = "plugin.wasm";
/// The manifest annotation that marks the compat variant.
pub const VARIANT_ANNOTATION: (&str, &str) = ("module.wasm.image/variant", "compat");

/// What was written: the image manifest's digest (what a `WasmPlugin`'s `sha256` names) and
/// the `.wasm`'s own sha256 (what Envoy's `code.remote.sha256` names).
pub struct Built {
    pub manifest_digest: String,
    pub wasm_sha256: String,
    pub layer_digest: String,
}

/// `sha256:<hex>` of `bytes`, written as a blob of the layout at `dir`.
fn write_blob(dir: &Path, bytes: &[u8]) -> Result<(Digest, u64)> {
    let hex = crate::hex(&Sha256::digest(bytes));
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("cannot create `{}`", blobs.display()))?;
    fs::write(blobs.join(&hex), bytes).with_context(|| format!("cannot write blob `{hex}`"))?;
    let digest: Sha256Digest = hex.parse().map_err(|e| anyhow::anyhow!("digest `{hex}`: {e}"))?;
    Ok((digest.into(), bytes.len() as u64))
}

/// Writes the compat image of `wasm` as an OCI layout at `out`, tagged `tag`.
pub fn build(wasm: &Path, out: &Path, tag: &str, version: &str) -> Result<Built> {
    let code = fs::read(wasm).with_context(|| format!("cannot read the filter `{}`", wasm.display()))?;
    if code.get(..4) != Some(b"\0asm".as_slice()) {
        bail!("`{}` is not a wasm module (no `\\0asm` header)", wasm.display());
    }
    if tag.is_empty() || tag.len() > 128 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        bail!("`{tag}` is not an image tag (letters, digits, `.`, `_`, `-`; at most 128)");
    }
    if out.join("index.json").exists() {
        // A layout holds one image here: start afresh so old blobs do not linger.
        fs::remove_dir_all(out).with_context(|| format!("cannot clear `{}`", out.display()))?;
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create `{}`", out.display()))?;

    let mut tar_bytes = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut tar_bytes);
        let mut header = tar::Header::new_ustar();
        header.set_size(code.len() as u64);
        header.set_mode(0o444);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, PLUGIN_FILE, code.as_slice()).context("cannot write the layer's tar")?;
        builder.finish().context("cannot write the layer's tar")?;
    }
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar_bytes).context("cannot gzip the layer")?;
    let layer = gz.finish().context("cannot gzip the layer")?;
    let diff_id: Sha256Digest =
        crate::hex(&Sha256::digest(&tar_bytes)).parse().map_err(|e| anyhow::anyhow!("diff id: {e}"))?;
    let (layer_digest, layer_size) = write_blob(out, &layer)?;

    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Wasm)
        .os(Os::Other("wasip1".into()))
        .config(ConfigBuilder::default().labels(labels(version)).build().map_err(err("image config"))?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![Digest::from(diff_id).to_string()])
                .build()
                .map_err(err("rootfs"))?,
        )
        .build()
        .map_err(err("image config"))?;
    let config_json = sorted_json(&config)?;
    let (config_digest, config_size) = write_blob(out, &config_json)?;

    let mut annotations = labels(version);
    annotations.insert(VARIANT_ANNOTATION.0.into(), VARIANT_ANNOTATION.1.into());
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(config_digest)
                .size(config_size)
                .build()
                .map_err(err("config descriptor"))?,
        )
        .layers(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageLayerGzip)
            .digest(layer_digest.clone())
            .size(layer_size)
            .annotations(std::collections::HashMap::from([(
                "org.opencontainers.image.title".to_owned(),
                PLUGIN_FILE.to_owned(),
            )]))
            .build()
            .map_err(err("layer descriptor"))?])
        .annotations(annotations)
        .build()
        .map_err(err("image manifest"))?;
    let manifest_json = sorted_json(&manifest)?;
    let (manifest_digest, manifest_size) = write_blob(out, &manifest_json)?;

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![DescriptorBuilder::default()
            .media_type(MediaType::ImageManifest)
            .digest(manifest_digest.clone())
            .size(manifest_size)
            .annotations(std::collections::HashMap::from([(
                "org.opencontainers.image.ref.name".to_owned(),
                tag.to_owned(),
            )]))
            .build()
            .map_err(err("index descriptor"))?])
        .build()
        .map_err(err("image index"))?;
    fs::write(out.join("index.json"), sorted_json(&index)?).context("cannot write index.json")?;
    let layout = OciLayoutBuilder::default().image_layout_version("1.0.0").build().map_err(err("oci-layout"))?;
    fs::write(out.join("oci-layout"), serde_json::to_vec(&layout)?).context("cannot write oci-layout")?;

    Ok(Built {
        manifest_digest: manifest_digest.to_string(),
        wasm_sha256: crate::hex(&Sha256::digest(&code)),
        layer_digest: layer_digest.to_string(),
    })
}

/// `value` as JSON with object members sorted (oci-spec keeps annotations and labels in hash
/// maps, whose order changes from run to run; a digest must not).
fn sorted_json(value: &impl serde::Serialize) -> Result<Vec<u8>> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut members: Vec<(String, serde_json::Value)> = m.into_iter().collect();
                members.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(members.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&sort(serde_json::to_value(value)?))?)
}

/// An oci-spec builder error, naming what was being built.
fn err(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> anyhow::Error {
    move |e| anyhow::anyhow!("{what}: {e}")
}

fn labels(version: &str) -> std::collections::HashMap<String, String> {
    [
        ("org.opencontainers.image.title".to_owned(), "registry-guard".to_owned()),
        ("org.opencontainers.image.version".to_owned(), version.to_owned()),
        (
            "org.opencontainers.image.description".to_owned(),
            "registry-guard proxy-wasm filter (compat Wasm image: plugin.wasm)".to_owned(),
        ),
    ]
    .into()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rgctl-image-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn compat_layout_as_istio_reads_it_and_reproducible() {
        let dir = temp("ok");
        let wasm = dir.join("f.wasm");
        fs::write(&wasm, b"\0asm\x01\0\0\0 some module").unwrap();
        let a = build(&wasm, &dir.join("a"), "v1", "0.1.0").unwrap();
        let b = build(&wasm, &dir.join("b"), "v1", "0.1.0").unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest, "same .wasm, same image");
        let blob = |d: &str| fs::read(dir.join("a/blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&a.manifest_digest)).unwrap();
        assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
        assert_eq!(manifest["annotations"]["module.wasm.image/variant"], "compat");
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
        let layer = blob(layers[0]["digest"].as_str().unwrap());
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(layer.as_slice()));
        let entries: Vec<(String, Vec<u8>)> = tar
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (e.path().unwrap().display().to_string(), v)
            })
            .collect();
        assert_eq!(entries, vec![("plugin.wasm".to_owned(), fs::read(&wasm).unwrap())]);
        assert_eq!(a.wasm_sha256, crate::hex(&Sha256::digest(fs::read(&wasm).unwrap())));
        let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("a/index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], a.manifest_digest.as_str());
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "v1");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_what_is_not_a_module_or_a_tag() {
        let dir = temp("bad");
        let text = dir.join("f.txt");
        fs::write(&text, b"hello").unwrap();
        let e = build(&text, &dir.join("o"), "v1", "0").err().unwrap().to_string();
        assert!(e.contains("is not a wasm module"), "{e}");
        let wasm = dir.join("f.wasm");
        fs::write(&wasm, b"\0asm\x01\0\0\0").unwrap();
        let e = build(&wasm, &dir.join("o"), "v1:bad", "0").err().unwrap().to_string();
        assert!(e.contains("`v1:bad` is not an image tag"), "{e}");
        let e = build(&dir.join("none.wasm"), &dir.join("o"), "v1", "0").err().unwrap().to_string();
        assert!(e.contains("cannot read the filter"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}
