//! `rgctl push --oci REGISTRY/REPOSITORY:TAG`: uploads the signed bundle file as an OCI
//! artifact (layout in `registry_guard_core::policy::oci`): the empty config blob, the bundle
//! blob, then the manifest under the tag. Speaks the distribution API with the registry's
//! token auth: a `401` with `WWW-Authenticate: Bearer realm=…,service=…` is answered by asking
//! the realm for a token with the given username and password (Basic auth), as `docker login`
//! does, so the push can go through Envoy and the filter into the registry registry-guard
//! guards.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use registry_guard_core::policy::oci::{
    manifest_for, sha256_digest, EMPTY_CONFIG, EMPTY_CONFIG_DIGEST, MANIFEST_MEDIA_TYPE,
};
use registry_guard_core::request::name::{is_repository_name, is_tag};

/// `host[:port]/repository:tag`, split.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub registry: String,
    pub repository: String,
    pub tag: String,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        let (registry, rest) =
            s.split_once('/').with_context(|| format!("`{s}` is not REGISTRY/REPOSITORY:TAG (no `/`)"))?;
        if registry.is_empty() || rest.contains('@') {
            bail!("`{s}` is not REGISTRY/REPOSITORY:TAG (a push needs a tag, not a digest)");
        }
        let (repository, tag) =
            rest.rsplit_once(':').with_context(|| format!("`{s}` is not REGISTRY/REPOSITORY:TAG (no `:TAG`)"))?;
        if !is_repository_name(repository) {
            bail!("`{repository}` is not a repository name");
        }
        if !is_tag(tag) {
            bail!("`{tag}` is not a tag");
        }
        Ok(Target { registry: registry.to_owned(), repository: repository.to_owned(), tag: tag.to_owned() })
    }
}

/// A distribution API client for one repository, with the token it acquired.
struct Registry {
    base: String,
    repository: String,
    agent: ureq::Agent,
    creds: Option<(String, String)>,
    bearer: Option<String>,
}

impl Registry {
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Sends a request, answering one bearer challenge on the way.
    fn send(&mut self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Result<ureq::Response> {
        for attempt in 0..2 {
            let mut req = self.agent.request(method, &self.url(path));
            if let Some(token) = &self.bearer {
                req = req.set("authorization", &format!("Bearer {token}"));
            }
            if let Some(ct) = content_type {
                req = req.set("content-type", ct);
            }
            let result = if body.is_empty() && method != "PUT" { req.call() } else { req.send_bytes(body) };
            match result {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, r)) if attempt == 0 => {
                    let challenge = r.header("www-authenticate").unwrap_or_default().to_owned();
                    self.bearer = Some(self.token(&challenge)?);
                }
                Err(ureq::Error::Status(code, r)) => {
                    let text = r.into_string().unwrap_or_default();
                    bail!("{method} {path}: HTTP {code}: {}", text.trim());
                }
                Err(e) => bail!("{method} {path}: {e}"),
            }
        }
        bail!("{method} {path}: still unauthorized with the token the registry's realm issued")
    }

    /// Answers a `Bearer realm="…",service="…"` challenge with a token for pull and push of
    /// the repository.
    fn token(&self, challenge: &str) -> Result<String> {
        let params = challenge
            .strip_prefix("Bearer ")
            .with_context(|| format!("the registry asked for authentication this tool cannot give: `{challenge}`"))?;
        let param = |name: &str| {
            params.split(',').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        let realm = param("realm").context("the registry's bearer challenge names no realm")?;
        let (user, password) = self
            .creds
            .as_ref()
            .context("the registry requires a login: give --username and --password-file (or RGCTL_PASSWORD)")?;
        let mut req = self.agent.get(&realm).query("scope", &format!("repository:{}:pull,push", self.repository));
        if let Some(service) = param("service") {
            req = req.query("service", &service);
        }
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let answer: serde_json::Value = match req.set("authorization", &format!("Basic {basic}")).call() {
            Ok(r) => serde_json::from_str(&r.into_string().context("reading the token answer")?)
                .context("the token answer is not JSON")?,
            Err(ureq::Error::Status(code, r)) => {
                bail!(
                    "the token realm {realm} refused `{user}`: HTTP {code}: {}",
                    r.into_string().unwrap_or_default().trim()
                )
            }
            Err(e) => bail!("cannot reach the token realm {realm}: {e}"),
        };
        answer["token"]
            .as_str()
            .or_else(|| answer["access_token"].as_str())
            .map(str::to_owned)
            .context("the token answer holds no `token`")
    }

    /// Uploads a blob unless the registry has it (monolithic upload: POST then PUT ?digest=).
    fn upload(&mut self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        if self.send("HEAD", &path, None, &[]).is_ok() {
            return Ok(());
        }
        let started = self.send("POST", &format!("/v2/{}/blobs/uploads/", self.repository), None, &[])?;
        let location = started.header("location").context("the upload answer has no Location")?.to_owned();
        let sep = if location.contains('?') { '&' } else { '?' };
        self.send("PUT", &format!("{location}{sep}digest={digest}"), Some("application/octet-stream"), bytes)?;
        Ok(())
    }
}

/// Pushes the signed bundle `jws` (the file's bytes) as an artifact; returns the manifest
/// digest.
pub fn push(
    jws: &[u8],
    title: &str,
    target: &Target,
    insecure: bool,
    creds: Option<(String, String)>,
) -> Result<String> {
    let scheme = if insecure { "http" } else { "https" };
    let mut registry = Registry {
        base: format!("{scheme}://{}", target.registry),
        repository: target.repository.clone(),
        agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).redirects(0).build(),
        creds,
        bearer: None,
    };
    registry.upload(EMPTY_CONFIG_DIGEST, EMPTY_CONFIG).context("uploading the config blob")?;
    registry.upload(&sha256_digest(jws), jws).context("uploading the bundle blob")?;
    let manifest = serde_json::to_vec(&manifest_for(jws, title))?;
    let path = format!("/v2/{}/manifests/{}", target.repository, target.tag);
    let answer = registry.send("PUT", &path, Some(MANIFEST_MEDIA_TYPE), &manifest).context("putting the manifest")?;
    Ok(answer.header("docker-content-digest").map_or_else(|| sha256_digest(&manifest), str::to_owned))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed_with_clear_errors() {
        assert_eq!(
            Target::parse("127.0.0.1:5000/registry-guard/policy:prod").unwrap(),
            Target {
                registry: "127.0.0.1:5000".into(),
                repository: "registry-guard/policy".into(),
                tag: "prod".into()
            }
        );
        for (bad, want) in [
            ("registry-guard", "no `/`"),
            ("host/repo", "no `:TAG`"),
            ("host/repo@sha256:abc", "needs a tag"),
            ("host/Repo:prod", "`Repo` is not a repository name"),
            ("host/repo:bad tag", "`bad tag` is not a tag"),
        ] {
            let err = Target::parse(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
