//! The hardened HTTP server loop: hyper's HTTP/1 connection driver with the limits a hostile
//! client must not outlast, which `axum::serve` does not set:
//!
//! - **header read timeout** (`header_read_timeout_ms`, default 10 s): a client must send a
//!   request's whole header within it; it also closes a keep-alive connection that stays
//!   idle that long between requests (hyper starts the timer whenever it waits for a head);
//! - **request timeout** (`request_timeout_ms`, default 30 s): reading the body and answering
//!   one request, so a slow body cannot hold a connection either (408 after it);
//! - **connection limit** (`max_connections`, default 1024): connections beyond it are
//!   closed as soon as they are accepted (and counted in the log, at most once a second).
//!
//! Each connection's peer address reaches handlers as `ConnectInfo<SocketAddr>` (the key of
//! the per-client login limit).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

/// The `server` section of a service's JSON configuration (`token-service.json`); every field
/// has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    pub header_read_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits { header_read_timeout_ms: 10_000, request_timeout_ms: 30_000, max_connections: 1024 }
    }
}

impl ServerLimits {
    /// Checks the ranges; the error names the field.
    pub fn check(&self) -> Result<(), (String, String)> {
        if !(100..=300_000).contains(&self.header_read_timeout_ms) {
            return Err(("$.server.header_read_timeout_ms".into(), "must be between 100 and 300000".into()));
        }
        if !(100..=3_600_000).contains(&self.request_timeout_ms) {
            return Err(("$.server.request_timeout_ms".into(), "must be between 100 and 3600000".into()));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(("$.server.max_connections".into(), "must be between 1 and 1000000".into()));
        }
        Ok(())
    }
}

/// Serves `router` on `listener` under `limits` until `shutdown` completes; then stops
/// accepting and waits for open connections to finish their requests.
pub async fn serve<F>(
    listener: TcpListener,
    router: axum::Router,
    limits: ServerLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let request_timeout = Duration::from_millis(limits.request_timeout_ms);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms))
        .keep_alive(true);
    let mut last_refusal_log: Option<Instant> = None;
    let mut refused_since_log = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            refused_since_log += 1;
            if last_refusal_log.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(
                    "connection limit reached ({} open): refused {refused_since_log} connection(s)",
                    limits.max_connections
                );
                last_refusal_log = Some(Instant::now());
                refused_since_log = 0;
            }
            drop(stream);
            continue;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = match tokio::time::timeout(request_timeout, router.oneshot(request)).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => (StatusCode::REQUEST_TIMEOUT, "request timeout\n").into_response(),
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection from {peer} ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
