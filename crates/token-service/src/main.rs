//! `registry-guard-token-service --config-dir DIR [--listen ADDR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use registry_guard_token_service::{Application, Settings, DEFAULT_LISTEN};

/// Issues Docker-registry tokens for the principals of a configuration directory.
#[derive(Debug, Parser)]
#[command(name = "registry-guard-token-service", version, about)]
struct Cli {
    /// Directory holding token-service.json (optional), principals.json and the signing key.
    #[arg(long, value_name = "DIR")]
    config_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    registry_guard_service::init_logging();
    registry_guard_service::exit_code(run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let app = Application::build(Settings { config_dir: cli.config_dir, listen: cli.listen }).await?;
    registry_guard_service::flush_logs();
    eprintln!("{}", app.startup_line());
    reload_keys_on_sighup(app.key_reloader());
    app.run_until(registry_guard_service::shutdown_signal()).await.context("serving HTTP")?;
    registry_guard_service::flush_logs();
    eprintln!("token service stopped");
    Ok(())
}

/// SIGHUP re-reads the key ring (rotation without a restart) and `principals.json` (users
/// added or removed without a restart); each is reloaded on its own, and a bad file is logged
/// and the current keys or principals stay.
fn reload_keys_on_sighup(reloader: registry_guard_token_service::KeyReloader) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::error!("cannot listen for SIGHUP: keys and principals reload only on restart");
            return;
        };
        while hangup.recv().await.is_some() {
            match reloader.reload() {
                Ok((kid, published)) => tracing::info!("keys reloaded: signing key id {kid}, {published} published"),
                Err(e) => tracing::error!("keys not reloaded, current keys stay: {e}"),
            }
            match reloader.reload_principals() {
                Ok(users) => tracing::info!("principals reloaded: {users} users"),
                Err(e) => tracing::error!("principals not reloaded, current principals stay: {e}"),
            }
        }
    });
    #[cfg(not(unix))]
    drop(reloader);
}
