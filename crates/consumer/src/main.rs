//! `registry-guard-consumer --database PATH|postgres://URL --jwks PATH|--jwks-url URL --secret-file PATH --read-token-file PATH
//! [--listen ADDR] [--tolerance-seconds N] [--retention-days N] [--max-events N]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use registry_guard_consumer::{
    Application, Settings, DEFAULT_LISTEN, DEFAULT_MAX_EVENTS, DEFAULT_RETENTION_DAYS, DEFAULT_TOLERANCE_SECONDS,
};

/// Counts container-registry usage per principal type from the registry's attributed events.
#[derive(Debug, Parser)]
#[command(name = "registry-guard-consumer", version, about)]
struct Cli {
    /// Address to listen on (the registry's notification endpoint is `POST /events`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Where the events and counts are kept: an SQLite file (created if missing), or a
    /// PostgreSQL URL `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?connect_timeout=S]`
    /// that several replicas share (tables created if absent; PGPASSWORD is read when the URL
    /// has no password; no TLS). See docs/consumer.md.
    #[arg(long, value_name = "PATH|URL")]
    database: PathBuf,
    /// The token service's JWKS file: the public keys that sign the nested `user` JWTs. With
    /// `--jwks-url`, optional: the keys to start from when the URL does not answer at startup.
    #[arg(long, value_name = "PATH", required_unless_present = "jwks_url")]
    jwks: Option<PathBuf>,
    /// The token service's JWKS URL (`http://HOST:PORT/jwks`): fetched at startup and every
    /// `--jwks-refresh-seconds`; on a failed or refused fetch the keys in force stay.
    #[arg(long, value_name = "URL")]
    jwks_url: Option<String>,
    /// Seconds between fetches of `--jwks-url` (1 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 30, requires = "jwks_url")]
    jwks_refresh_seconds: u64,
    /// File holding the bearer secret the registry sends in `Authorization`.
    #[arg(long, value_name = "PATH")]
    secret_file: PathBuf,
    /// File holding the bearer token that `GET /counts` and `GET /events` require.
    #[arg(long, value_name = "PATH")]
    read_token_file: PathBuf,
    /// Seconds a `user` JWT is still accepted after its expiry (events arrive late).
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TOLERANCE_SECONDS,
          value_parser = clap::value_parser!(i64).range(0..))]
    tolerance_seconds: i64,
    /// Days raw event rows are kept (at least 1, and at least the tolerance).
    #[arg(long, value_name = "DAYS", default_value_t = DEFAULT_RETENTION_DAYS,
          value_parser = clap::value_parser!(i64).range(1..))]
    retention_days: i64,
    /// The most raw event rows kept; the oldest are deleted first.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_EVENTS,
          value_parser = clap::value_parser!(i64).range(1..))]
    max_events: i64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    registry_guard_service::init_logging();
    registry_guard_service::exit_code(run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let app = Application::build(Settings {
        listen: cli.listen,
        database: cli.database.into(),
        jwks: cli.jwks,
        jwks_url: cli.jwks_url.map(|url| registry_guard_consumer::keys::JwksUrl {
            url,
            refresh: std::time::Duration::from_secs(cli.jwks_refresh_seconds),
        }),
        secret_file: cli.secret_file,
        read_token_file: cli.read_token_file,
        tolerance_seconds: cli.tolerance_seconds,
        retention_days: cli.retention_days,
        max_events: cli.max_events,
    })
    .await?;
    registry_guard_service::flush_logs();
    eprintln!("{}", app.startup_line());
    app.run_until(registry_guard_service::shutdown_signal()).await.context("serving HTTP")?;
    registry_guard_service::flush_logs();
    eprintln!("registry event consumer stopped");
    Ok(())
}
