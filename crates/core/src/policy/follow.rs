//! Following a bundle source from inside the filter: when to fetch, what to ask, and what an
//! answer means. Pure: the glue passes the time (milliseconds), a random number for jitter
//! and the HTTP answer; it makes the call (`dispatch_http_call`) and verifies a candidate
//! bundle with the same checks as a configured one (operator signature, environment,
//! strictly newer revision), then reports the outcome back.
//!
//! The protocol is the token service's `GET /bundle`: conditional (`If-None-Match` with the
//! entity tag of the last bundle seen, 304 when unchanged), optionally a long poll
//! (`Prefer: wait=N`: the source holds the request until the bundle changes). After an
//! answer a long poll is re-issued at once and a plain poll waits `poll_seconds` (jittered
//! ±20 %); after a failure the wait doubles from `poll_seconds` up to five minutes (jittered).
//! Whatever happens, the active bundle stays until a newer verified one replaces it (last
//! known good); with `max_staleness_seconds`, a filter that has not heard from its source
//! for that long reports itself stale, and the glue then refuses requests (fails closed).
//!
//! With `oci`, the source is an OCI registry holding the bundle as an artifact (see
//! [`super::oci`]): a fetch is two steps. The manifest is asked for conditionally
//! (`If-None-Match` with the last manifest's entity tag, which distribution answers with 304
//! while the tag still points at the same digest); a changed manifest is checked (media
//! types, one layer, declared size at most `max_bytes`) and [`Step::Fetch`] asks the glue for
//! the blob by digest; the blob must hash to that digest before the bundle inside is verified.
//! Registries do not long-poll: `wait_seconds` must be 0 there.

use serde::Deserialize;

use super::oci::{self, ArtifactError, BundleLayer, OciArtifact};

/// The longest wait between fetches after failures.
pub const MAX_BACKOFF_MS: u64 = 300_000;
/// Default largest bundle accepted from a source: 32 MiB (the token service's own limit).
pub const DEFAULT_MAX_BYTES: usize = 32 * 1024 * 1024;

/// `bundle_source` of the filter configuration: where the filter fetches its bundle.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSource {
    /// The Envoy cluster of the source (e.g. the token service).
    pub cluster: String,
    /// Request path (default `/bundle`).
    #[serde(default = "default_path")]
    pub path: String,
    /// `:authority` of the request (default: the cluster name).
    #[serde(default)]
    pub authority: Option<String>,
    /// Bearer token presented to the source (its bundle read token).
    #[serde(default)]
    pub token: Option<String>,
    /// Seconds between plain polls, and the base of the backoff.
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: u64,
    /// Long polling: the source may hold a request this many seconds (0: plain polling).
    #[serde(default)]
    pub wait_seconds: u64,
    /// Time allowed for an answer beyond `wait_seconds`.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Largest bundle accepted, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Without a successful fetch for this long, the filter is stale and refuses requests.
    #[serde(default)]
    pub max_staleness_seconds: Option<u64>,
    /// The bundle is an OCI artifact in the registry behind `cluster` (`path` unused).
    #[serde(default)]
    pub oci: Option<OciArtifact>,
}

fn default_path() -> String {
    "/bundle".into()
}
fn default_poll_seconds() -> u64 {
    10
}
fn default_timeout_seconds() -> u64 {
    10
}
fn default_max_bytes() -> usize {
    DEFAULT_MAX_BYTES
}

impl BundleSource {
    /// Checks ranges; the error names the field.
    pub fn check(&self) -> Result<(), (String, String)> {
        let field = |f: &str| format!("$.bundle_source.{f}");
        if self.cluster.trim().is_empty() {
            return Err((field("cluster"), "must name an Envoy cluster".into()));
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err((field("path"), format!("must be an absolute path, got {:?}", self.path)));
        }
        if let Some(token) = &self.token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((field("token"), "must be one token of printable ASCII".into()));
            }
        }
        if !(1..=3600).contains(&self.poll_seconds) {
            return Err((field("poll_seconds"), "must be between 1 and 3600".into()));
        }
        if self.wait_seconds > 300 {
            return Err((field("wait_seconds"), "must be between 0 and 300".into()));
        }
        if !(1..=300).contains(&self.timeout_seconds) {
            return Err((field("timeout_seconds"), "must be between 1 and 300".into()));
        }
        if !(1..=DEFAULT_MAX_BYTES * 4).contains(&self.max_bytes) {
            return Err((field("max_bytes"), format!("must be between 1 and {}", DEFAULT_MAX_BYTES * 4)));
        }
        if let Some(artifact) = &self.oci {
            if let Err((f, reason)) = artifact.check() {
                return Err((field(&format!("oci.{f}")), reason));
            }
            if self.path != default_path() {
                return Err((field("path"), "is not used with `oci` (the registry's /v2/ paths are)".into()));
            }
            if self.wait_seconds != 0 {
                return Err((field("wait_seconds"), "must be 0 with `oci`: registries do not long-poll".into()));
            }
        }
        if let Some(s) = self.max_staleness_seconds {
            if s < self.poll_seconds.max(self.wait_seconds) {
                return Err((
                    field("max_staleness_seconds"),
                    "must be at least poll_seconds and wait_seconds (the filter would go stale between fetches)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// One fetch to make: headers besides `:method`, `:path`, `:authority`, and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, String)>,
    pub timeout_ms: u64,
}

/// What the glue got back for a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<'a> {
    /// An HTTP answer: status, `ETag`, `Content-Type`, the body's announced size and the body
    /// (when read).
    Http { status: u16, etag: Option<&'a str>, content_type: Option<&'a str>, body_size: usize, body: Option<&'a [u8]> },
    /// No answer: the call could not be dispatched, timed out or the connection failed.
    Failed(String),
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing changed; nothing to verify.
    NotModified,
    /// A bundle to verify and, if it passes, activate; then call [`Follower::settle`].
    Verify(String),
    /// The second request of an OCI fetch (the blob): dispatch it and pass its answer to
    /// [`Follower::answer`] (the fetch stays in flight).
    Fetch(FetchRequest),
    /// The fetch failed (already recorded).
    Failed(String),
    /// The source answered with an artifact that is refused before any bundle is read
    /// (already recorded as a refusal).
    Refused(String),
}

/// The outcome of verifying a candidate bundle, reported by the glue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Verified and activated.
    Activated { revision: u64 },
    /// The active bundle again, byte for byte.
    Unchanged,
    /// Refused (signature, environment, revision): `kind` is the metric label, `reason` the
    /// explanation.
    Refused { kind: RefusalKind, reason: String },
}

/// Why a fetched bundle was not activated (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    Signature,
    Environment,
    Revision,
    Content,
    Size,
    Status,
    Unreachable,
    /// An OCI artifact whose layout is not a bundle's, or whose blob does not match its digest.
    Artifact,
}

impl RefusalKind {
    pub fn label(self) -> &'static str {
        match self {
            RefusalKind::Signature => "signature",
            RefusalKind::Environment => "environment",
            RefusalKind::Revision => "revision",
            RefusalKind::Content => "content",
            RefusalKind::Size => "size",
            RefusalKind::Status => "status",
            RefusalKind::Unreachable => "unreachable",
            RefusalKind::Artifact => "artifact",
        }
    }

    /// Classifies a bundle verification error by the JSON path it names.
    pub fn of_bundle_error(path: &str) -> RefusalKind {
        match path {
            "signature" => RefusalKind::Signature,
            "$.environment" => RefusalKind::Environment,
            "$.revision" => RefusalKind::Revision,
            _ => RefusalKind::Content,
        }
    }
}

/// Fetches by result, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchCounters {
    pub changed: u64,
    pub not_modified: u64,
    pub refused: u64,
    pub failed: u64,
}

/// The follower's state in one VM.
#[derive(Debug, Clone)]
pub struct Follower {
    source: BundleSource,
    /// Entity tag of the last bundle fetched (activated or refused): asked with
    /// `If-None-Match`, so a refused bundle is not fetched again until the source changes.
    last_seen_etag: Option<String>,
    failures: u32,
    next_fetch_ms: u64,
    in_flight: bool,
    /// OCI: the manifest was read and its blob asked for (the layer, the manifest's tag).
    pending_blob: Option<(BundleLayer, Option<String>)>,
    /// Start, or the last answer that proved the source reachable and its bundle acceptable.
    last_success_ms: u64,
    pub counters: FetchCounters,
    /// The last refusal or failure, for the log and status.
    pub last_error: Option<String>,
    /// The last refusal's kind (metric label of rejections).
    pub last_refusal: Option<RefusalKind>,
}

impl Follower {
    /// Starts following at `now_ms`: the first fetch is due at once.
    pub fn new(source: BundleSource, now_ms: u64) -> Follower {
        Follower {
            source,
            last_seen_etag: None,
            failures: 0,
            next_fetch_ms: now_ms,
            in_flight: false,
            pending_blob: None,
            last_success_ms: now_ms,
            counters: FetchCounters::default(),
            last_error: None,
            last_refusal: None,
        }
    }

    pub fn source(&self) -> &BundleSource {
        &self.source
    }

    /// The fetch to dispatch now, if one is due and none is in flight; marks it in flight.
    pub fn due(&mut self, now_ms: u64) -> Option<FetchRequest> {
        if self.in_flight || now_ms < self.next_fetch_ms {
            return None;
        }
        self.in_flight = true;
        let mut headers = Vec::with_capacity(3);
        if let Some(token) = &self.source.token {
            headers.push(("authorization".to_owned(), format!("Bearer {token}")));
        }
        if let Some(etag) = &self.last_seen_etag {
            headers.push(("if-none-match".to_owned(), etag.clone()));
        }
        if self.source.wait_seconds > 0 {
            headers.push(("prefer".to_owned(), format!("wait={}", self.source.wait_seconds)));
        }
        let path = match &self.source.oci {
            Some(artifact) => {
                headers.push(("accept".to_owned(), oci::MANIFEST_MEDIA_TYPE.to_owned()));
                artifact.manifest_path()
            }
            None => self.source.path.clone(),
        };
        Some(FetchRequest {
            path,
            authority: self.authority(),
            headers,
            timeout_ms: (self.source.wait_seconds + self.source.timeout_seconds) * 1000,
        })
    }

    fn authority(&self) -> String {
        self.source.authority.clone().unwrap_or_else(|| self.source.cluster.clone())
    }

    /// The largest answer body worth reading for the request in flight (the manifest of an
    /// OCI source, else the bundle or blob): a larger one is refused unread.
    pub fn read_limit(&self) -> usize {
        if self.source.oci.is_some() && self.pending_blob.is_none() {
            oci::MAX_MANIFEST_BYTES
        } else {
            self.source.max_bytes
        }
    }

    /// The dispatch itself failed (no call in flight): recorded as a failed fetch.
    pub fn dispatch_failed(&mut self, now_ms: u64, rand: u32, reason: &str) {
        self.pending_blob = None;
        self.fail(now_ms, rand, RefusalKind::Unreachable, format!("cannot dispatch the fetch: {reason}"));
    }

    /// Reads an answer. `active_etag` is the entity tag of the active bundle, if known.
    pub fn answer(&mut self, now_ms: u64, rand: u32, answer: Answer<'_>) -> Step {
        if let Some((layer, manifest_etag)) = self.pending_blob.take() {
            return self.blob_answer(now_ms, rand, layer, manifest_etag, answer);
        }
        if self.source.oci.is_some() {
            if let Answer::Http { status: 200, etag, content_type, body_size, body } = answer {
                return self.manifest_answer(now_ms, rand, etag, content_type, body_size, body);
            }
        }
        match answer {
            Answer::Failed(reason) => {
                let reason = format!("no answer from cluster {}: {reason}", self.source.cluster);
                self.fail(now_ms, rand, RefusalKind::Unreachable, reason.clone());
                Step::Failed(reason)
            }
            Answer::Http { status: 304, etag, .. } => {
                if let Some(etag) = etag {
                    self.last_seen_etag = Some(etag.to_owned());
                }
                self.counters.not_modified += 1;
                self.succeed(now_ms, rand);
                Step::NotModified
            }
            Answer::Http { status: 200, etag, body_size, body, .. } => {
                if body_size > self.source.max_bytes {
                    let reason =
                        format!("the bundle is {body_size} bytes, more than max_bytes {}", self.source.max_bytes);
                    self.fail(now_ms, rand, RefusalKind::Size, reason.clone());
                    return Step::Failed(reason);
                }
                let text = body.map(|b| std::str::from_utf8(b).map(|t| t.trim().to_owned()));
                match text {
                    Some(Ok(text)) if !text.is_empty() => {
                        // Remembered now: a bundle that fails verification is not fetched
                        // again until the source serves another one.
                        self.last_seen_etag = etag.map(str::to_owned);
                        Step::Verify(text)
                    }
                    _ => {
                        let reason = "the answer's body is empty or not UTF-8 text (expected a compact JWS)".to_owned();
                        self.fail(now_ms, rand, RefusalKind::Content, reason.clone());
                        Step::Failed(reason)
                    }
                }
            }
            Answer::Http { status, .. } => {
                let reason = format!("the source answered HTTP {status}");
                self.fail(now_ms, rand, RefusalKind::Status, reason.clone());
                Step::Failed(reason)
            }
        }
    }

    /// OCI: a changed manifest. Checked, then its blob is asked for.
    fn manifest_answer(
        &mut self,
        now_ms: u64,
        rand: u32,
        etag: Option<&str>,
        content_type: Option<&str>,
        body_size: usize,
        body: Option<&[u8]>,
    ) -> Step {
        if body_size > oci::MAX_MANIFEST_BYTES {
            let reason = format!("the manifest is {body_size} bytes, more than {}", oci::MAX_MANIFEST_BYTES);
            return self.refuse_artifact(now_ms, rand, RefusalKind::Size, reason);
        }
        let Some(body) = body else {
            return self.refuse_artifact(now_ms, rand, RefusalKind::Artifact, "the manifest answer has no body".into());
        };
        let layer = match oci::check_manifest(body, content_type, self.source.max_bytes) {
            Ok(layer) => layer,
            Err(e) => {
                let kind = if matches!(e, ArtifactError::Size(_)) { RefusalKind::Size } else { RefusalKind::Artifact };
                let reason = format!("manifest {}: {}", self.manifest_label(), e.reason());
                // Not asked for again until the tag moves: remembered like a refused bundle.
                self.last_seen_etag = Some(manifest_tag(etag, body));
                return self.refuse_artifact(now_ms, rand, kind, reason);
            }
        };
        let Some(artifact) = &self.source.oci else {
            return Step::Failed("not an OCI source".into());
        };
        let request = FetchRequest {
            path: artifact.blob_path(&layer.digest),
            authority: self.authority(),
            headers: self.source.token.iter().map(|t| ("authorization".to_owned(), format!("Bearer {t}"))).collect(),
            timeout_ms: self.source.timeout_seconds * 1000,
        };
        self.pending_blob = Some((layer, Some(manifest_tag(etag, body))));
        Step::Fetch(request)
    }

    /// OCI: the blob of a checked manifest.
    fn blob_answer(
        &mut self,
        now_ms: u64,
        rand: u32,
        layer: BundleLayer,
        manifest_etag: Option<String>,
        answer: Answer<'_>,
    ) -> Step {
        let (body_size, body) = match answer {
            Answer::Failed(reason) => {
                let reason = format!("no answer from cluster {} for the blob: {reason}", self.source.cluster);
                self.fail(now_ms, rand, RefusalKind::Unreachable, reason.clone());
                return Step::Failed(reason);
            }
            Answer::Http { status: 200, body_size, body, .. } => (body_size, body),
            Answer::Http { status, .. } => {
                let reason = format!("the registry answered HTTP {status} for the blob {}", layer.digest);
                self.fail(now_ms, rand, RefusalKind::Status, reason.clone());
                return Step::Failed(reason);
            }
        };
        if body_size > self.source.max_bytes {
            let reason = format!("the blob is {body_size} bytes, more than max_bytes {}", self.source.max_bytes);
            return self.refuse_artifact(now_ms, rand, RefusalKind::Size, reason);
        }
        let blob = body.unwrap_or_default();
        if let Err(e) = oci::check_blob(&layer, blob) {
            // Remembered: the same manifest is not fetched again until the tag moves (a
            // registry serving a corrupt blob keeps serving it).
            self.last_seen_etag = manifest_etag;
            let reason = format!("blob of {}: {}", self.manifest_label(), e.reason());
            return self.refuse_artifact(now_ms, rand, RefusalKind::Artifact, reason);
        }
        match std::str::from_utf8(blob).map(str::trim) {
            Ok(text) if !text.is_empty() => {
                self.last_seen_etag = manifest_etag;
                Step::Verify(text.to_owned())
            }
            _ => {
                self.last_seen_etag = manifest_etag;
                let reason = "the blob is not UTF-8 text (expected a compact JWS)".to_owned();
                self.refuse_artifact(now_ms, rand, RefusalKind::Content, reason)
            }
        }
    }

    /// A source that answered with something we refuse: counted as refused, polled again at
    /// the normal pace (as [`Settled::Refused`]).
    fn refuse_artifact(&mut self, now_ms: u64, rand: u32, kind: RefusalKind, reason: String) -> Step {
        self.settle(now_ms, rand, &Settled::Refused { kind, reason: reason.clone() });
        Step::Refused(reason)
    }

    fn manifest_label(&self) -> String {
        self.source.oci.as_ref().map_or_else(String::new, |a| format!("{}:{}", a.repository, a.reference))
    }

    /// Reports what became of a [`Step::Verify`] bundle.
    pub fn settle(&mut self, now_ms: u64, rand: u32, settled: &Settled) {
        match settled {
            Settled::Activated { .. } => {
                self.counters.changed += 1;
                self.succeed(now_ms, rand);
            }
            Settled::Unchanged => {
                self.counters.not_modified += 1;
                self.succeed(now_ms, rand);
            }
            Settled::Refused { kind, reason } => {
                // The source answered, but with a bundle we refuse: not a success for
                // staleness; polled again at the normal pace (not a failure to back off from).
                self.in_flight = false;
                self.failures = 0;
                self.counters.refused += 1;
                self.last_error = Some(reason.clone());
                self.last_refusal = Some(*kind);
                self.next_fetch_ms = now_ms + self.pace_ms(rand);
            }
        }
    }

    /// Whether the filter has gone without a successful fetch for longer than allowed.
    pub fn stale(&self, now_ms: u64) -> bool {
        self.source.max_staleness_seconds.is_some_and(|max| now_ms.saturating_sub(self.last_success_ms) > max * 1000)
    }

    /// Seconds since the last successful fetch (or the start).
    pub fn seconds_since_success(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_success_ms) / 1000
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// When the next fetch is due (ms).
    pub fn next_fetch_ms(&self) -> u64 {
        self.next_fetch_ms
    }

    fn succeed(&mut self, now_ms: u64, rand: u32) {
        self.in_flight = false;
        self.failures = 0;
        self.last_success_ms = now_ms;
        self.next_fetch_ms = now_ms + self.pace_ms(rand);
    }

    fn fail(&mut self, now_ms: u64, rand: u32, kind: RefusalKind, reason: String) {
        self.in_flight = false;
        self.failures = self.failures.saturating_add(1);
        self.counters.failed += 1;
        self.last_error = Some(reason);
        self.last_refusal = Some(kind);
        self.next_fetch_ms = now_ms + backoff_ms(self.source.poll_seconds * 1000, self.failures, rand);
    }

    /// After an answer: a long poll goes straight back to the source, a plain poll waits.
    fn pace_ms(&self, rand: u32) -> u64 {
        if self.source.wait_seconds > 0 {
            0
        } else {
            jitter_ms(self.source.poll_seconds * 1000, rand)
        }
    }
}

/// The entity tag of a manifest: the answer's `ETag`, else `"sha256:<hex>"` of its bytes (what
/// distribution compares `If-None-Match` with).
fn manifest_tag(etag: Option<&str>, body: &[u8]) -> String {
    etag.map_or_else(|| format!("\"{}\"", oci::sha256_digest(body)), str::to_owned)
}

/// `poll · 2^(failures-1)`, at most [`MAX_BACKOFF_MS`], jittered.
pub fn backoff_ms(poll_ms: u64, failures: u32, rand: u32) -> u64 {
    let factor = 1u64 << failures.saturating_sub(1).min(20);
    jitter_ms(poll_ms.saturating_mul(factor).min(MAX_BACKOFF_MS), rand)
}

/// `ms` scaled by a factor in [0.8, 1.2) chosen by `rand`, so a fleet does not fetch in step.
pub fn jitter_ms(ms: u64, rand: u32) -> u64 {
    // 0.8 + 0.4 · rand/2^32, in integers.
    let scaled = u128::from(ms) * (4 * (1u128 << 32) + 2 * u128::from(rand)) / (5 * (1u128 << 32));
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn source(wait: u64) -> BundleSource {
        serde_json::from_value(serde_json::json!({
            "cluster": "token_service", "token": "read-token", "poll_seconds": 10, "wait_seconds": wait,
            "max_bytes": 1000, "max_staleness_seconds": 60
        }))
        .unwrap()
    }

    const HALF: u32 = 1 << 31; // jitter factor 1.0

    #[test]
    fn first_fetch_is_due_at_once_and_only_one_is_in_flight() {
        let mut f = Follower::new(source(30), 1_000);
        let req = f.due(1_000).unwrap();
        assert_eq!(req.path, "/bundle");
        assert_eq!(req.authority, "token_service");
        assert_eq!(
            req.headers,
            [("authorization".to_owned(), "Bearer read-token".to_owned()), ("prefer".to_owned(), "wait=30".to_owned())]
        );
        assert_eq!(req.timeout_ms, 40_000);
        assert_eq!(f.due(2_000), None, "one fetch in flight at a time");
    }

    #[test]
    fn a_fetched_bundle_is_verified_then_asked_for_conditionally() {
        let mut f = Follower::new(source(30), 0);
        f.due(0).unwrap();
        let step = f.answer(
            5,
            HALF,
            Answer::Http {
                content_type: None,
                status: 200,
                etag: Some("\"e1\""),
                body_size: 5,
                body: Some(b"a.b.c\n"),
            },
        );
        assert_eq!(step, Step::Verify("a.b.c".into()));
        f.settle(6, HALF, &Settled::Activated { revision: 4 });
        assert_eq!(f.counters.changed, 1);
        // Long polling: the next fetch is due at once, with the entity tag.
        let req = f.due(6).unwrap();
        assert!(req.headers.contains(&("if-none-match".to_owned(), "\"e1\"".to_owned())), "{req:?}");
        assert_eq!(
            f.answer(
                30_006,
                HALF,
                Answer::Http { content_type: None, status: 304, etag: None, body_size: 0, body: None }
            ),
            Step::NotModified
        );
        assert_eq!(f.counters.not_modified, 1);
        assert!(!f.stale(30_006));
    }

    #[test]
    fn plain_polling_waits_the_jittered_period() {
        let mut f = Follower::new(source(0), 0);
        f.due(0).unwrap();
        f.answer(0, 0, Answer::Http { content_type: None, status: 304, etag: None, body_size: 0, body: None });
        assert_eq!(f.next_fetch_ms(), 8_000, "rand 0: 0.8 × 10 s");
        assert_eq!(f.due(7_999), None);
        assert!(f.due(8_000).is_some());
        f.answer(
            8_000,
            u32::MAX,
            Answer::Http { content_type: None, status: 304, etag: None, body_size: 0, body: None },
        );
        assert!((19_999..=20_000).contains(&f.next_fetch_ms()), "rand max: ~1.2 × 10 s: {}", f.next_fetch_ms());
    }

    #[test]
    fn failures_back_off_exponentially_and_staleness_follows() {
        let mut f = Follower::new(source(30), 0);
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            f.due(now).unwrap();
            let step = f.answer(now, HALF, Answer::Failed("connection refused".into()));
            assert!(
                matches!(step, Step::Failed(ref r) if r.contains("token_service") && r.contains("connection refused"))
            );
            waits.push(f.next_fetch_ms() - now);
            now = f.next_fetch_ms();
        }
        assert_eq!(waits, [10_000, 20_000, 40_000, 80_000, 160_000, 300_000]);
        assert_eq!(f.consecutive_failures(), 6);
        assert_eq!(f.counters.failed, 6);
        assert!(f.stale(now), "no success for {now} ms > 60 s");
        // The source returns: not stale any more, back to the normal pace.
        f.due(now).unwrap();
        f.answer(now, HALF, Answer::Http { content_type: None, status: 304, etag: None, body_size: 0, body: None });
        assert!(!f.stale(now));
        assert_eq!(f.consecutive_failures(), 0);
    }

    #[test]
    fn hostile_answers_are_refused_without_backing_off_forever() {
        let mut f = Follower::new(source(0), 0);
        f.due(0).unwrap();
        let big = Answer::Http { content_type: None, status: 200, etag: Some("\"big\""), body_size: 1001, body: None };
        assert!(matches!(f.answer(0, HALF, big), Step::Failed(ref r) if r.contains("max_bytes 1000")));
        assert_eq!(f.last_refusal, Some(RefusalKind::Size));
        f.due(f.next_fetch_ms()).unwrap();
        let garbage =
            Answer::Http { content_type: None, status: 200, etag: None, body_size: 2, body: Some(&[0xff, 0xfe]) };
        assert!(matches!(f.answer(0, HALF, garbage), Step::Failed(_)));
        f.due(f.next_fetch_ms()).unwrap();
        assert!(
            matches!(f.answer(0, HALF, Answer::Http { content_type: None, status: 500, etag: None, body_size: 0, body: None }),
            Step::Failed(ref r) if r.contains("HTTP 500"))
        );
        // A signed bundle that verification refuses: remembered by entity tag, polled at pace.
        let t = f.next_fetch_ms();
        f.due(t).unwrap();
        let old =
            Answer::Http { content_type: None, status: 200, etag: Some("\"old\""), body_size: 5, body: Some(b"x.y.z") };
        assert_eq!(f.answer(t, 0, old), Step::Verify("x.y.z".into()));
        f.settle(t, 0, &Settled::Refused { kind: RefusalKind::Revision, reason: "older".into() });
        assert_eq!(f.counters.refused, 1);
        assert_eq!(f.next_fetch_ms(), t + 8_000);
        let req = f.due(t + 8_000).unwrap();
        assert!(req.headers.contains(&("if-none-match".to_owned(), "\"old\"".to_owned())));
    }

    #[test]
    fn settings_are_checked() {
        let mut s = source(30);
        assert_eq!(s.check(), Ok(()));
        s.max_staleness_seconds = Some(5);
        assert_eq!(s.check().unwrap_err().0, "$.bundle_source.max_staleness_seconds");
        let s: Result<BundleSource, _> = serde_json::from_value(serde_json::json!({"cluster": "x", "url": "y"}));
        assert!(s.unwrap_err().to_string().contains("unknown field `url`"));
        let mut s = source(0);
        s.path = "bundle".into();
        assert_eq!(s.check().unwrap_err().0, "$.bundle_source.path");
    }

    fn oci_source() -> BundleSource {
        serde_json::from_value(serde_json::json!({
            "cluster": "registry_direct", "poll_seconds": 10, "max_bytes": 100,
            "oci": {"repository": "registry-guard/policy", "reference": "prod"}
        }))
        .unwrap()
    }

    fn http<'a>(status: u16, etag: Option<&'a str>, body: &'a [u8]) -> Answer<'a> {
        Answer::Http { status, etag, content_type: None, body_size: body.len(), body: Some(body) }
    }

    /// Manifest answer → blob request → blob answer.
    fn oci_fetch(f: &mut Follower, now: u64, manifest: &[u8], etag: &str, blob: &[u8]) -> Step {
        let req = f.due(now).unwrap();
        assert_eq!(req.path, "/v2/registry-guard/policy/manifests/prod");
        assert!(req.headers.contains(&("accept".to_owned(), oci::MANIFEST_MEDIA_TYPE.to_owned())), "{req:?}");
        match f.answer(now, HALF, http(200, Some(etag), manifest)) {
            Step::Fetch(blob_req) => {
                assert!(blob_req.path.starts_with("/v2/registry-guard/policy/blobs/sha256:"), "{blob_req:?}");
                assert_eq!(f.due(now), None, "the fetch stays in flight during the blob request");
                f.answer(now, HALF, http(200, None, blob))
            }
            other => other,
        }
    }

    #[test]
    fn oci_manifest_then_blob_then_304_until_the_tag_moves() {
        let mut f = Follower::new(oci_source(), 0);
        let v1 = b"a.b.c".as_slice();
        let m1 = serde_json::to_vec(&oci::manifest_for(v1, "bundle.jws")).unwrap();
        assert_eq!(oci_fetch(&mut f, 0, &m1, "\"sha256:m1\"", v1), Step::Verify("a.b.c".into()));
        f.settle(0, HALF, &Settled::Activated { revision: 1 });
        // Asked again with the manifest's tag: 304.
        let req = f.due(10_000).unwrap();
        assert!(req.headers.contains(&("if-none-match".to_owned(), "\"sha256:m1\"".to_owned())), "{req:?}");
        assert_eq!(f.answer(10_000, HALF, http(304, None, b"")), Step::NotModified);
        assert_eq!(f.counters.not_modified, 1);
        // The tag moves to a new manifest: fetched and verified.
        let v2 = b"d.e.f".as_slice();
        let m2 = serde_json::to_vec(&oci::manifest_for(v2, "bundle.jws")).unwrap();
        assert_eq!(oci_fetch(&mut f, 20_000, &m2, "\"sha256:m2\"", v2), Step::Verify("d.e.f".into()));
        f.settle(20_000, HALF, &Settled::Activated { revision: 2 });
        assert_eq!(f.counters.changed, 2);
        // Without an ETag header the tag is the manifest's own digest.
        let req = f.due(40_000).unwrap();
        assert!(req.headers.contains(&("if-none-match".to_owned(), "\"sha256:m2\"".to_owned())));
        let v3 = b"g.h.i".as_slice();
        let m3 = serde_json::to_vec(&oci::manifest_for(v3, "b")).unwrap();
        let Step::Fetch(_) = f.answer(
            40_000,
            HALF,
            Answer::Http { status: 200, etag: None, content_type: None, body_size: m3.len(), body: Some(&m3) },
        ) else {
            panic!()
        };
        assert_eq!(f.answer(40_000, HALF, http(200, None, v3)), Step::Verify("g.h.i".into()));
        f.settle(40_000, HALF, &Settled::Activated { revision: 3 });
        let req = f.due(60_000).unwrap();
        let want = format!("\"{}\"", oci::sha256_digest(&m3));
        assert!(req.headers.contains(&("if-none-match".to_owned(), want)), "{req:?}");
    }

    #[test]
    fn oci_hostile_artifacts_are_refused_and_not_fetched_again() {
        let bundle = b"a.b.c".as_slice();
        let good = oci::manifest_for(bundle, "b");
        let mut wrong_type = good.clone();
        wrong_type["artifactType"] = "application/vnd.example+json".into();
        let mut no_layer = good.clone();
        no_layer["layers"] = serde_json::json!([]);
        let mut oversize = good.clone();
        oversize["layers"][0]["size"] = 101.into();
        let good = serde_json::to_vec(&good).unwrap();
        let cases: Vec<(Vec<u8>, &[u8], RefusalKind, &str)> = vec![
            (serde_json::to_vec(&wrong_type).unwrap(), bundle, RefusalKind::Artifact, "artifact type"),
            (serde_json::to_vec(&no_layer).unwrap(), bundle, RefusalKind::Artifact, "0 layers"),
            (serde_json::to_vec(&oversize).unwrap(), bundle, RefusalKind::Size, "declared 101 bytes"),
            (good.clone(), b"a.b.", RefusalKind::Artifact, "truncated"),
            (good.clone(), b"a.b.x", RefusalKind::Artifact, "tampered"),
        ];
        for (i, (manifest, blob, kind, want)) in cases.into_iter().enumerate() {
            let mut f = Follower::new(oci_source(), 0);
            let etag = format!("\"sha256:bad{i}\"");
            let step = oci_fetch(&mut f, 0, &manifest, &etag, blob);
            assert!(
                matches!(&step, Step::Refused(r) if r.contains(want) && r.contains("registry-guard/policy:prod")),
                "{want}: {step:?}"
            );
            assert_eq!(f.last_refusal, Some(kind), "{want}");
            assert_eq!((f.counters.refused, f.counters.failed), (1, 0), "{want}");
            // Polled again at the normal pace, conditionally on the refused manifest.
            assert_eq!(f.next_fetch_ms(), 10_000, "{want}");
            let req = f.due(10_000).unwrap();
            assert!(req.headers.contains(&("if-none-match".to_owned(), etag)), "{want}: {req:?}");
        }
    }

    #[test]
    fn oci_blob_failures_back_off_and_the_manifest_is_asked_again() {
        let mut f = Follower::new(oci_source(), 0);
        let bundle = b"a.b.c".as_slice();
        let m = serde_json::to_vec(&oci::manifest_for(bundle, "b")).unwrap();
        f.due(0).unwrap();
        assert!(matches!(f.answer(0, HALF, http(200, Some("\"m\""), &m)), Step::Fetch(_)));
        let step = f.answer(0, HALF, http(404, None, b"{}"));
        assert!(matches!(&step, Step::Failed(r) if r.contains("HTTP 404 for the blob")), "{step:?}");
        assert_eq!(f.counters.failed, 1);
        assert_eq!(f.next_fetch_ms(), 10_000);
        // The manifest was not remembered: asked again unconditionally.
        let req = f.due(10_000).unwrap();
        assert!(!req.headers.iter().any(|(k, _)| k == "if-none-match"), "{req:?}");
        // A blob answer larger than max_bytes is refused unread.
        assert!(matches!(f.answer(10_000, HALF, http(200, Some("\"m\""), &m)), Step::Fetch(_)));
        let big = Answer::Http { status: 200, etag: None, content_type: None, body_size: 5000, body: None };
        assert!(matches!(f.answer(10_000, HALF, big), Step::Refused(r) if r.contains("max_bytes 100")));
        assert_eq!(f.last_refusal, Some(RefusalKind::Size));
        // A missing tag (404 on the manifest) is a failure with backoff.
        let t = f.next_fetch_ms();
        f.due(t).unwrap();
        assert!(matches!(f.answer(t, HALF, http(404, None, b"")), Step::Failed(r) if r.contains("HTTP 404")));
    }

    #[test]
    fn oci_settings_are_checked() {
        assert_eq!(oci_source().check(), Ok(()));
        let mut s = oci_source();
        s.wait_seconds = 5;
        assert_eq!(s.check().unwrap_err().0, "$.bundle_source.wait_seconds");
        let mut s = oci_source();
        s.path = "/other".into();
        assert_eq!(s.check().unwrap_err().0, "$.bundle_source.path");
        let mut s = oci_source();
        s.oci.as_mut().unwrap().repository = "UPPER".into();
        assert_eq!(s.check().unwrap_err().0, "$.bundle_source.oci.repository");
        let e: Result<BundleSource, _> =
            serde_json::from_value(serde_json::json!({"cluster": "x", "oci": {"repository": "a", "tag": "b"}}));
        assert!(e.unwrap_err().to_string().contains("unknown field `tag`"));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        assert_eq!(jitter_ms(10_000, 0), 8_000);
        assert_eq!(jitter_ms(10_000, HALF), 10_000);
        assert!(jitter_ms(10_000, u32::MAX) < 12_000);
        assert_eq!(backoff_ms(1_000, 40, HALF), MAX_BACKOFF_MS);
    }
}
