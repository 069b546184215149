//! Startup and shutdown shared by registry-guard's HTTP services, the token service
//! (`crates/token-service`) and the reference event consumer (`crates/consumer`):
//!
//! - [`init_logging`]: `tracing` to stderr, without module targets, written in batches by a
//!   writer thread ([`log`]; [`flush_logs`] before a service's own stderr lines);
//! - [`bind`]: the listener and the address actually bound (port 0 in tests);
//! - [`shutdown_signal`]: completes on Ctrl-C (SIGINT) or SIGTERM, for graceful shutdown;
//! - [`server::serve`] with [`ServerLimits`]: the hardened HTTP/1 server loop (header read
//!   and request timeouts, connection limit, graceful shutdown);
//! - [`exit_code`]: a binary's `Result` as its exit code, printing `error: …` on failure.
//!
//! Each service keeps its own settings, error types and messages; this crate holds only what
//! was the same in both.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;

pub mod log;
pub mod server;

pub use log::flush_logs;

pub use server::{serve, ServerLimits};

/// Logs `tracing` events to stderr, without module targets (`INFO message`). Call once, at
/// the start of `main`. `INFO` lines are written in batches ([`log`]): one `write` for many
/// lines under load instead of one per line; `WARN` and `ERROR` lines at once; a panic
/// flushes them before its message.
pub fn init_logging() {
    let Some(batched) = log::batched_stderr() else {
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
        return;
    };
    tracing_subscriber::fmt().with_writer(log::LogWriters(batched)).with_target(false).init();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush_logs();
        previous(info);
    }));
}

/// Binds `addr` and returns the listener with the address actually bound (port 0 picks a free
/// port). Callers wrap the error into their own "cannot listen on ADDR" startup error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    Ok((listener, local_addr))
}

/// Completes on Ctrl-C (SIGINT) or, on Unix, SIGTERM: the shutdown future a service's
/// `run_until` takes. A signal that cannot be listened for never completes (the other still
/// works).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// A binary's outcome as its exit code: success is 0; an error is printed to stderr as
/// `error: ` followed by the error and its causes (`{:#}`), and exits 1. Buffered log lines
/// are written first.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_reports_the_port_actually_bound() -> std::io::Result<()> {
        let (_listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        assert_ne!(addr.port(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn bind_fails_on_a_taken_port() -> std::io::Result<()> {
        let (_listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        assert!(bind(addr).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn serve_answers_and_stops_on_shutdown() -> Result<(), Box<dyn std::error::Error>> {
        let (listener, addr) = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, ServerLimits::default(), async {
            let _ = stopped.await;
        }));
        let body = reqwest::get(format!("http://{addr}/")).await?.text().await?;
        assert_eq!(body, "ok");
        let _ = stop.send(());
        server.await??;
        Ok(())
    }

    #[test]
    fn limits_out_of_range_name_the_field() {
        let limits = ServerLimits { max_connections: 0, ..ServerLimits::default() };
        let Err((path, _)) = limits.check() else { panic!("0 connections accepted") };
        assert_eq!(path, "$.server.max_connections");
    }
}
